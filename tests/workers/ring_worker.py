"""Run under torchrun by tests/test_ring.py: one graft step on a tiny model, states saved.

    torchrun --standalone --nproc_per_node=N tests/workers/ring_worker.py OUT_DIR [replicas] [exchange] [level] [nan]

GRAFT_WORKER_BACKEND and GRAFT_WORKER_DEVICE (default gloo, cpu) put the ring elsewhere, e.g.
nccl and cuda (tests/test_cuda.py). The states are saved on the CPU.
"""

import os
import sys
from pathlib import Path

import torch
import torch.nn as nn

from graft import core, ring


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.Flatten(), nn.LazyLinear(3))


def on_cpu(state: dict) -> dict:
    return {k: v.cpu() for k, v in state.items()}


def main():
    out = Path(sys.argv[1])
    replicas = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    exchange = sys.argv[3] if len(sys.argv) > 3 else "auto"
    level = sys.argv[4] if len(sys.argv) > 4 else "layer"
    poison = len(sys.argv) > 5 and sys.argv[5] == "nan"  # network 1 reaches the graft with a NaN
    topo = ring.setup(replicas, os.environ.get("GRAFT_WORKER_BACKEND", "gloo"),
                      os.environ.get("GRAFT_WORKER_DEVICE", "cpu"), timeout=60)
    torch.manual_seed(100 + topo.network)  # replicas of a network share the seed
    model = tiny_model()
    model(torch.randn(2, 3, 8, 8))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(-1, 1)
                m.running_mean.normal_()
    state = model.to(topo.device).state_dict()
    if poison and topo.network == 1:
        state["3.weight"][0, 0, 0, 0] = float("nan")
    plan = core.make_plan(state)
    try:
        new_state, result = ring.graft_step(topo, state, plan, when="epoch 0", level=level, exchange=exchange)
    except ring.GraftError as e:
        print(f"graft: error: {e}", file=sys.stderr, flush=True)
        torch.save({"error": str(e), "state": on_cpu(state)}, out / f"rank{topo.rank}.pt")
        sys.exit(1)
    torch.save({"network": topo.network, "replica": topo.replica, "peer": result.peer,
                "before": on_cpu(state), "after": on_cpu(new_state), "table": result.table, "bytes": result.bytes,
                "seconds": result.seconds, "layers": result.layers,
                "records": result.report.as_records() if result.report else None},
               out / f"rank{topo.rank}.pt")
    ring.teardown(topo)


if __name__ == "__main__":
    main()
