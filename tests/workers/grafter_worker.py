"""Run under torchrun by tests/test_grafter.py: graft.Grafter on a model whose layers are named freely.

    torchrun --standalone --nproc_per_node=N tests/workers/grafter_worker.py OUT_DIR MODE

MODE: own (the Grafter starts the process group), joined (the script starts it and grafts a
torch.compile'd wrapper), hybrid (2 networks x 2 DDP replicas), steps (every_steps=2 over 5
optimizer steps), mismatch (network 1 has another classifier size), extra_layer (network 1 has one
layer more).
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import graft
from graft.errors import GraftError


class Freely(nn.Module):
    """No layer is called conv or bn; one norm keeps no running statistics, one is a GroupNorm."""

    def __init__(self, classes: int = 3):
        super().__init__()
        self.entry = nn.Conv2d(3, 4, 3, bias=False)
        self.entry_scale = nn.BatchNorm2d(4)
        self.squeeze = nn.Conv2d(4, 6, 3)
        self.squash = nn.BatchNorm2d(6, track_running_stats=False)
        self.widen = nn.Conv2d(6, 8, 1, bias=False)
        self.groups = nn.GroupNorm(2, 8)
        self.readout = nn.Linear(8, classes)

    def forward(self, x):
        x = F.relu(self.entry_scale(self.entry(x)))
        x = F.relu(self.squash(self.squeeze(x)))
        return self.readout(F.relu(self.groups(self.widen(x))).mean((2, 3)))


def make_model(seed: int, classes: int = 3) -> Freely:
    torch.manual_seed(seed)
    model = Freely(classes)
    with torch.no_grad():  # non-trivial norm parameters, and running statistics from one batch
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                m.weight.uniform_(-1, 1)
                m.bias.normal_()
        model(torch.randn(4, 3, 8, 8))
    return model


def copy(model: nn.Module) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def main():
    out, mode = Path(sys.argv[1]), sys.argv[2]
    if mode == "joined":
        dist.init_process_group("gloo")
    grafter = graft.Grafter(timeout=60, data_parallel=2 if mode == "hybrid" else 1,
                            every_steps=2 if mode == "steps" else 0)
    topo = grafter.topology
    model = make_model(100 + topo.network, 4 if mode == "mismatch" and topo.network == 1 else 3)
    if mode == "extra_layer" and topo.network == 1:
        model.add_module("extra", nn.Linear(2, 2))
    wrapped = model
    if mode == "hybrid":  # one DDP step over the network's group first
        wrapped = nn.parallel.DistributedDataParallel(model, process_group=topo.network_group)
        opt = torch.optim.SGD(wrapped.parameters(), lr=0.1)
        torch.manual_seed(topo.rank)
        wrapped(torch.randn(4, 3, 8, 8)).square().mean().backward()
        opt.step()
    if mode == "joined":
        wrapped = torch.compile(model)  # never run: grafting must reach the weights inside it
    saved = {"network": topo.network, "replica": topo.replica, "plan": grafter.plan(wrapped),
             "network_group": dist.get_world_size(topo.network_group)}
    if mode == "steps":
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        saved["log"] = []
        for _ in range(5):
            model(torch.randn(4, 3, 8, 8)).square().mean().backward()
            opt.step()
            opt.zero_grad()
            before = copy(model)
            result = grafter.step(model)
            saved["log"].append({"before": before, "after": copy(model), "grafted": result is not None})
    else:
        saved["before"] = copy(model)
        try:
            result = grafter.graft(wrapped)
        except GraftError as e:
            print(f"graft: error: {e}", file=sys.stderr, flush=True)
            sys.exit(1)
        saved.update(after=copy(model), peer=result.peer, bytes=result.bytes, records=result.records(),
                     mean_alpha=result.mean_alpha, mean_peer_distance=result.mean_peer_distance)
    torch.save(saved, out / f"rank{topo.rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
