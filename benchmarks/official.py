"""The official code's graft (fxmeng/filter-grafting, grafting_cifar/grafting.py), re-created
for the benchmarks: a 10-pass masked entropy per tensor, and file exchange with polling."""

import math
import os
import time
from pathlib import Path

import torch


def official_entropy(x, n=10):
    x = x.reshape(-1)
    scale = (x.max() - x.min()) / n
    entropy = 0
    for i in range(n):
        p = torch.sum((x >= x.min() + i * scale) * (x < x.min() + (i + 1) * scale), dtype=torch.float) / len(x)
        if p != 0:
            entropy -= p * torch.log(p)
    return float(entropy.cpu())


def official_graft(state, folder: Path, i: int, n: int, tag: int, poll: float, A=0.4, c=500):
    torch.save({"net": state}, folder / f"ckpt{i}_{tag}.t7")
    peer_file = folder / f"ckpt{(i - 1) % n}_{tag}.t7"
    device = next(iter(state.values())).device  # the peer's tensors were saved on the peer's GPU
    while True:
        try:
            checkpoint = torch.load(peer_file, map_location=device)["net"]
            break
        except Exception:
            time.sleep(poll)
    return official_blend(state, checkpoint, A, c), 2 * os.path.getsize(peer_file)  # written and read


def official_blend(state, peer, A=0.4, c=500):
    """The per-key loop: a key containing "conv" sets alpha from the two entropies; every key
    is blended with the last alpha set."""
    model = {}
    w = None
    for key, u in state.items():
        if "conv" in key:
            w = round(A / math.pi * math.atan(c * (official_entropy(u) - official_entropy(peer[key]))) + 0.5, 2)
        model[key] = u * w + peer[key] * (1 - w)
    return model
