"""Run under torchrun by tests/test_exchange.py: one graft step on a tiny model, states saved.

    torchrun --standalone --nproc_per_node=N tests/workers/exchange_worker.py OUT_DIR [replicas] [exchange] \
        [setting=value ...] [nan] [named]

The settings make the GraftSpec (criterion=bn_scale, partner=population, ...); ``nan`` puts a
NaN into network 1 before the graft; ``named`` names the layers conv1, bn1, ... (for the
reference criterion). GRAFT_WORKER_BACKEND and GRAFT_WORKER_DEVICE (default gloo,
cpu) put the ring elsewhere, e.g. nccl and cuda (tests/test_cuda.py). States are saved on the CPU.
"""

import os
import sys
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn as nn
import yaml

from graft import dist, exchange
from graft.errors import GraftError
from graft.rules import GraftSpec


def tiny_model(named: bool = False) -> nn.Module:
    layers = [nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6),
              nn.Flatten(), nn.LazyLinear(3)]
    if named:  # key names the official code's plan (criterion=reference) can group
        return nn.Sequential(OrderedDict(zip(("conv1", "bn1", "relu", "conv2", "bn2", "flatten", "fc"), layers)))
    return nn.Sequential(*layers)


def on_cpu(state: dict) -> dict:
    return {k: v.cpu() for k, v in state.items()}


def main():
    out = Path(sys.argv[1])
    replicas = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    mode = sys.argv[3] if len(sys.argv) > 3 else "auto"
    rest = sys.argv[4:]
    poison = "nan" in rest  # network 1 reaches the graft with a NaN
    settings = dict(item.split("=", 1) for item in rest if "=" in item)
    topo = dist.setup(replicas, os.environ.get("GRAFT_WORKER_BACKEND", "gloo"),
                      os.environ.get("GRAFT_WORKER_DEVICE", "cpu"), timeout=60)
    differ = settings.pop("differ", None)
    if differ and topo.network == 1:  # network 1 grafts with another setting (differ=1: another A)
        key, value = ("A", "0.3") if differ == "1" else differ.split(":", 1)
        if key == "exchange":  # not a GraftSpec setting: the transport
            mode = value
        else:
            settings[key] = value
    spec = GraftSpec.make(**{k: yaml.safe_load(v) for k, v in settings.items()})
    torch.manual_seed(100 + topo.network)  # replicas of a network share the seed
    model = tiny_model(named="named" in rest)
    model(torch.randn(2, 3, 8, 8))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(-1, 1)
                m.running_mean.normal_()
    state = model.to(topo.device).state_dict()
    if poison and topo.network == 1:
        state["3.weight"][0, 0, 0, 0] = float("nan")
    plan = spec.plan(state)
    try:
        new_state, result = exchange.graft_step(topo, state, plan, spec, when="epoch 0", exchange=mode)
    except GraftError as e:
        print(f"graft: error: {e}", file=sys.stderr, flush=True)
        torch.save({"error": str(e), "state": on_cpu(state)}, out / f"rank{topo.rank}.pt")
        sys.exit(1)
    torch.save({"network": topo.network, "replica": topo.replica, "peer": result.peer,
                "before": on_cpu(state), "after": on_cpu(new_state), "table": result.table, "bytes": result.bytes,
                "seconds": result.seconds, "layers": result.layers, "identical": result.identical,
                "records": result.report.as_records() if result.report else None},
               out / f"rank{topo.rank}.pt")
    dist.teardown(topo)


if __name__ == "__main__":
    main()
