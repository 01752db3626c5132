"""Two Grafters, one after the other, in one script under graft-run (two training phases):
the second must check in and exchange on keys and groups of its own."""

import sys

import torch
import torch.nn as nn

import graft

network = int(sys.argv[1])
torch.manual_seed(network)
model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
for phase in (1, 2):
    grafter = graft.Grafter(timeout=30)
    for _ in range(2):
        with torch.no_grad():
            model[0].weight.add_(torch.randn_like(model[0].weight) * 0.1)
        result = grafter.graft(model)
        print(f"network {network} phase {phase} distance {result.mean_peer_distance:.4f}", flush=True)
