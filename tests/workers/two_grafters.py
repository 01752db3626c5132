"""Two Grafters, one after the other, in one script (two training phases): the second must
check in and exchange on keys and groups of its own. Under graft-run (argument: the network) or
plain torchrun with the script's own process group (no network argument). With ``absent``
(plain torchrun), network 1 makes the second Grafter but leaves before its first graft: network 0
must name it, not pass the check-in on the first Grafter's keys."""

import os
import sys

import torch
import torch.nn as nn

import graft
from graft.errors import PeerTimeout

if len(sys.argv) > 1 and sys.argv[1].isdigit():
    network = int(sys.argv[1])
else:
    torch.distributed.init_process_group("gloo")
    network = torch.distributed.get_rank()
absent = sys.argv[-1] == "absent"
torch.manual_seed(network)
model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
for phase in (1, 2):
    grafter = graft.Grafter(timeout=30 if not absent or phase == 1 else 3)
    if absent and phase == 2 and network == 1:
        sys.exit(0)
    for _ in range(2):
        with torch.no_grad():
            model[0].weight.add_(torch.randn_like(model[0].weight) * 0.1)
        try:
            result = grafter.graft(model)
        except PeerTimeout as e:
            print(f"network {network} phase {phase}: {e}", flush=True)
            os._exit(3)
        print(f"network {network} phase {phase} distance {result.mean_peer_distance:.4f}", flush=True)
