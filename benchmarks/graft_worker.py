"""Run under torchrun by bench_graft.py: time one graft step, ours against the official mechanism.

Ours: graft.exchange.graft_step (check-in, entropy table, flat-buffer exchange, batched entropies,
blend). Official (fxmeng/filter-grafting grafting_cifar/grafting.py, re-created): torch.save the
state dict to a shared folder, poll for the neighbour's file every POLL seconds, torch.load it,
then the per-key Python loop with the 10-pass masked entropy and round(alpha, 2).
"""

import json
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from graft import dist as gdist
from graft import exchange as gexchange
from graft.models import build_model
from graft.rules import GraftSpec
from official import official_graft


def main():
    model_name, folder, repeat, out = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    polls = [float(p) for p in sys.argv[5].split(",") if p]
    exchanges = sys.argv[6].split(",")
    replicas = int(sys.argv[7]) if len(sys.argv) > 7 else 1
    device = sys.argv[8] if len(sys.argv) > 8 else "cpu"
    topo = gdist.setup(replicas, "gloo" if device == "cpu" else "auto", device, timeout=600)
    sync = torch.cuda.synchronize if topo.device.type == "cuda" else lambda: None
    torch.manual_seed(topo.network)
    state = build_model(model_name, 10).to(topo.device).state_dict()
    spec = GraftSpec()
    plan = spec.plan(state)
    results = {}
    for exchange in exchanges:
        times = []
        for r in range(repeat + 1):
            dist.barrier()
            start = time.perf_counter()  # to the end of the blend's kernels (on a GPU they outlast graft_step)
            _, res = gexchange.graft_step(topo, state, plan, spec, when=f"round {r}", exchange=exchange)
            sync()
            times.append(time.perf_counter() - start)
        results[f"ours-{exchange}"] = {"seconds": statistics.median(times[1:]), "bytes": res.bytes,
                                       "leader": topo.is_leader}
    for poll in polls:
        times = []
        for r in range(repeat + 1):
            tag = int(poll * 1000) * 1000 + r
            dist.barrier()
            start = time.perf_counter()
            _, nbytes = official_graft(state, folder, topo.rank, topo.world, tag, poll)
            sync()
            times.append(time.perf_counter() - start)
        results[f"official-poll{poll:g}"] = {"seconds": statistics.median(times[1:]), "bytes": nbytes}
    results["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gathered = [None] * topo.world
    dist.all_gather_object(gathered, results)
    if topo.rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.barrier()
    gdist.teardown(topo)


if __name__ == "__main__":
    main()
