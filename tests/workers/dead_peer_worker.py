"""Started by tests/test_ring.py without torchrun: rank 1 dies before the epoch boundary."""

import os
import sys

import torch

from graft import core, ring


def main():
    topo = ring.setup(1, "gloo", "cpu", timeout=float(sys.argv[1]))
    if topo.rank == 1:
        os._exit(9)  # die like a SIGKILLed process: no cleanup, no goodbye
    state = {"w": torch.randn(3, 3, 1, 1)}
    try:
        ring.graft_step(topo, state, core.make_plan(state), when="epoch 3")
    except ring.PeerTimeout as e:
        print(f"graft: error: {e}", file=sys.stderr, flush=True)
        os._exit(1)
    os._exit(0)


if __name__ == "__main__":
    main()
