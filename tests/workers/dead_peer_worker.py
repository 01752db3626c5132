"""Started by tests/test_exchange.py without torchrun: rank 1 dies before the epoch boundary."""

import os
import sys

import torch

from graft import core, dist, exchange
from graft.errors import PeerTimeout
from graft.rules import GraftSpec


def main():
    topo = dist.setup(1, "gloo", "cpu", timeout=float(sys.argv[1]))
    if topo.rank == 1:
        os._exit(9)  # die like a SIGKILLed process: no cleanup, no goodbye
    state = {"w": torch.randn(3, 3, 1, 1)}
    try:
        exchange.graft_step(topo, state, core.make_plan(state), GraftSpec(), when="epoch 3")
    except PeerTimeout as e:
        print(f"graft: error: {e}", file=sys.stderr, flush=True)
        os._exit(1)
    os._exit(0)


if __name__ == "__main__":
    main()
