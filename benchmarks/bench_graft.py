"""The graft step: ours (collectives) against the official mechanism (files + polling), and how
its cost grows with N and model size. Every figure is the slowest rank's median over repeats.

    python benchmarks/bench_graft.py [--write]            # ours vs official, ResNet-56 and MobileNetV2, N = 2, 3
    python benchmarks/bench_graft.py --scaling [--write]  # ours, N = 2..4, ResNet-20..110
    python benchmarks/bench_graft.py --hybrid [--write]   # ours, 2 networks x 1 or 2 replicas
    python benchmarks/bench_graft.py --device cuda --models resnet56 --networks 2   # on GPUs (NCCL with a
                                                          # GPU per network, else gloo through the host)
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from common import write_section

ROOT = Path(__file__).resolve().parent.parent
OFFICIAL_POLL = 10.0  # seconds: grafting_cifar/grafting.py's time.sleep(10)


def measure(model: str, n: int, repeat: int, polls: list[float], exchanges: list[str],
            replicas: int = 1, device: str = "cpu") -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               str(ROOT / "benchmarks" / "graft_worker.py"), model, tmp, str(repeat), str(out),
               ",".join(map(str, polls)) or "", ",".join(exchanges), str(replicas), device]
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
        subprocess.run(cmd, check=True, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        return json.loads(out.read_text())


def slowest(ranks: list[dict], key: str) -> tuple[float, int]:
    return max(r[key]["seconds"] for r in ranks), max(r[key]["bytes"] for r in ranks)


def compare(args) -> str:
    rows = ["| model | N | ours, all_gather (ms) | ours, ring (ms) | official, no poll wait (ms) "
            "| official with its 10 s poll, modelled (s) | speed-up vs no-poll | speed-up vs 10 s poll "
            "| bytes in, ours ring / official (MB) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for model in args.models:
        for n in args.networks:
            ranks = measure(model, n, args.repeat, [0.001], ["all_gather", "ring"], device=args.device)
            ag, _ = slowest(ranks, "ours-all_gather")
            rg, rg_bytes = slowest(ranks, "ours-ring")
            fast, off_bytes = slowest(ranks, "official-poll0.001")
            slow = fast + OFFICIAL_POLL / 2
            best = min(ag, rg)
            rows.append(f"| {model} | {n} | {ag * 1e3:.1f} | {rg * 1e3:.1f} | {fast * 1e3:.1f} | {slow:.2f} | "
                        f"{fast / best:.1f}x | {slow / best:.0f}x | {rg_bytes / 1e6:.2f} / {off_bytes / 1e6:.2f} |")
            print(rows[-1], flush=True)
    on = "gloo" if args.device == "cpu" else f"{args.device} (NCCL with a GPU per network, else gloo)"
    return ("## Graft step: ours against the official mechanism\n\n"
            f"Ours: `graft.exchange.graft_step` on {on} (check-in, entropy table, flat-buffer exchange, batched "
            "entropies, blend). Official, re-created: `torch.save` of the state dict, the neighbour polling "
            "for the file, `torch.load`, the per-key Python loop with its 10-pass entropy. \"No poll wait\" "
            "polls every 1 ms, the best case for files. All processes start each repeat together (a "
            "barrier), as if every epoch ended at once; the figure is the slowest rank's median. The "
            "official code sleeps 10 s whenever its neighbour's file is not there yet, so a network that "
            "waits overshoots the file's arrival by 0 to 10 s, 5 s on average when the file lands at a "
            "random moment of the sleep: the modelled column is the measured no-poll time + 5 s (a "
            "measurement would only show whether each repeat happened to win the race: 0 or 10 s). "
            "Official bytes: the file written plus the file read.\n\n"
            + "\n".join(rows))


def scaling(args) -> str:
    rows = ["| model | N | parameters+buffers (MB) | all_gather (ms) | bytes in (MB) | ring (ms) | bytes in (MB) "
            "| peak RSS per rank (MB) |",
            "|---|---|---|---|---|---|---|---|"]
    for model in ("resnet20", "resnet32", "resnet56", "resnet110"):
        for n in (2, 3, 4):
            ranks = measure(model, n, args.repeat, [], ["all_gather", "ring"])
            ag, ag_bytes = slowest(ranks, "ours-all_gather")
            rg, rg_bytes = slowest(ranks, "ours-ring")
            rss = max(r["max_rss_mb"] for r in ranks)
            rows.append(f"| {model} | {n} | {rg_bytes / 1e6:.2f} | {ag * 1e3:.1f} | {ag_bytes / 1e6:.2f} | "
                        f"{rg * 1e3:.1f} | {rg_bytes / 1e6:.2f} | {rss:.0f} |")
            print(rows[-1], flush=True)
    return ("## Graft step: how the cost grows (ours, gloo, CPU)\n\n"
            "All ranks share this machine's cores, so N > cores measures contention too. all_gather "
            "receives N-1 models per rank, the ring shift one; the ring is the default (`grafting.exchange: auto`).\n\n"
            + "\n".join(rows))


def hybrid(args) -> str:
    rows = ["| model | networks x replicas | graft step, slowest rank (ms) | slowest leader rank (ms) |",
            "|---|---|---|---|"]
    for model in ("resnet20", "resnet56"):
        for n, g in ((2, 1), (2, 2)):
            ranks = measure(model, n * g, args.repeat, [], ["ring"], replicas=g)
            every, _ = slowest(ranks, "ours-ring")
            leaders = max(r["ours-ring"]["seconds"] for r in ranks if r["ours-ring"]["leader"])
            rows.append(f"| {model} | {n} x {g} | {every * 1e3:.1f} | {leaders * 1e3:.1f} |")
            print(rows[-1], flush=True)
    return ("## Graft step in hybrid mode (ours, gloo, CPU)\n\n"
            "Hybrid mode: replica 0 of each network exchanges with the ring, then broadcasts the grafted "
            "state inside its network (chosen so that replicas stay bit-identical: DDP replicas' BatchNorm "
            "statistics drift apart within an epoch, so counterparts exchanging independently would graft "
            "slightly different states). 4 processes share this machine's 2 cores.\n\n" + "\n".join(rows))


def main():
    parser = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    parser.add_argument("--scaling", action="store_true")
    parser.add_argument("--hybrid", action="store_true")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--models", nargs="+", default=["resnet56", "mobilenetv2"], help="ours vs official only")
    parser.add_argument("--networks", nargs="+", type=int, default=[2, 3], help="ours vs official only")
    parser.add_argument("--device", default="cpu", help="ours vs official only: cpu or cuda")
    parser.add_argument("--write", action="store_true")
    args = parser.parse_args()
    name, section = (("graft-scaling", scaling) if args.scaling else ("graft-hybrid", hybrid) if args.hybrid
                     else ("graft-vs-official", compare))
    body = section(args)
    if args.write:
        write_section(name, body)
    else:
        print(body)


if __name__ == "__main__":
    main()
