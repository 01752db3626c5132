"""A training script of our own that does what torchvision's and timm's reference scripts do with
torch.distributed (a DistributedSampler, DDP when its world has several processes, an
all-reduced metric, rank-0 saving, its own checkpoint and --resume), and knows nothing of graft
beyond the lines marked GRAFT. tests/test_script.py runs it under graft-run.

    graft-run --standalone --nproc_per_node=2 tests/workers/own_script.py --output OUT/net{network} --seed {network}
"""

import argparse
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, TensorDataset

import graft  # GRAFT


def make_data():
    g = torch.Generator().manual_seed(1234)
    images = torch.randn(48, 3, 8, 8, generator=g)
    labels = torch.randint(0, 3, (48,), generator=g)
    return TensorDataset(images, labels, torch.arange(48))


def make_model():
    return nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 3))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--output", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    args = p.parse_args()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:  # as torchvision's utils.init_distributed_mode: only when the world has several processes
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    torch.manual_seed(args.seed)
    data = make_data()
    sampler = DistributedSampler(data, world, rank, seed=args.seed) if distributed else \
        RandomSampler(data, generator=torch.Generator().manual_seed(args.seed))
    loader = DataLoader(data, batch_size=8, sampler=sampler)
    model = make_model()
    train_model = nn.parallel.DistributedDataParallel(model) if distributed else model
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    grafter = graft.Grafter(epochs=args.epochs, timeout=60)  # GRAFT
    out = Path(args.output)
    checkpoint, start, log = out / "checkpoint.pt", 0, []
    if args.resume and checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        grafter.load_state_dict(saved["grafter"])  # GRAFT (resuming)
        start, log = saved["epoch"] + 1, torch.load(out / "log.pt", weights_only=False)["epochs"]
        grafter.resume(model)  # GRAFT (resuming: a graft the extended run owes)
    for epoch in range(start, args.epochs):
        if distributed:
            sampler.set_epoch(epoch)
        else:
            sampler.generator.manual_seed(args.seed * 1000 + epoch)
        seen, totals = [], torch.zeros(2)
        for images, labels, index in loader:
            loss = F.cross_entropy(train_model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += index.tolist()
            totals += torch.tensor([loss.item() * len(labels), len(labels)])
        if distributed:  # the metric over the world, as the reference scripts reduce theirs
            dist.all_reduce(totals)
            everyone = [None] * world
            dist.all_gather_object(everyone, seen)
            seen = sum(everyone, [])
        before = {k: v.clone() for k, v in model.state_dict().items()}
        result = grafter.graft(model)  # GRAFT
        after = {k: v.clone() for k, v in model.state_dict().items()}
        log.append({"epoch": epoch, "seen": sorted(seen), "samples": totals[1].item(), "before": before,
                    "after": after, "peer": None if result is None else result.peer,
                    "distance": None if result is None else result.mean_peer_distance})
        if distributed:  # (for the test only: each replica's weights after the graft)
            out.mkdir(parents=True, exist_ok=True)
            torch.save(after, out / f"replica{rank}-epoch{epoch}.pt")
        if rank == 0:  # save_on_master
            out.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "grafter": grafter.state_dict(), "epoch": epoch}, checkpoint)
            torch.save({"epochs": log, "env": {k: v for k, v in os.environ.items()
                                               if k.startswith(("GRAFT_", "RANK", "WORLD_SIZE", "LOCAL_",
                                                                "MASTER_", "CUDA_VISIBLE"))}
                        | {"all": sorted(os.environ)}}, out / "log.pt")
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
