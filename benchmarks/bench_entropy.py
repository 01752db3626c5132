"""Entropy of every conv layer of a model: one batched call against the official 10-pass loop;
and the whole graft computation (graft_state_dict) against the official per-key loop.

    python benchmarks/bench_entropy.py [--model resnet56] [--threads N] [--write]
"""

import argparse
import statistics

import torch

from common import timeit, write_section
from graft import graft_state_dict, weight_entropies
from graft.models import build_model
from official import official_blend, official_entropy


def interleaved(ours, official, repeat: int, ours_calls: int, official_calls: int):
    """This machine's speed drifts: each round times both, and the ratio is the median of the
    rounds' ratios. Returns (median official s, median ours s, ratios)."""
    times_ours, times_official, ratios = [], [], []
    for _ in range(repeat):
        times_ours.append(timeit(ours, ours_calls))
        times_official.append(timeit(official, official_calls, warmup=1))
        ratios.append(times_official[-1] / times_ours[-1])
    return statistics.median(times_official), statistics.median(times_ours), ratios


def speedup(ratios) -> str:
    return f"{statistics.median(ratios):.1f}x (rounds: {min(ratios):.1f}x to {max(ratios):.1f}x)"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--write", action="store_true", help="write the figures into BENCHMARKS.md")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    state = build_model(args.model, 10).state_dict()
    torch.manual_seed(1)
    peer = build_model(args.model, 10).state_dict()
    convs = [t for k, t in state.items() if t.dim() == 4]
    n_values = sum(t.numel() for t in convs)
    official, batched, ratios = interleaved(lambda: weight_entropies(convs).tolist(),
                                            lambda: [official_entropy(t) for t in convs], args.repeat, 10, 2)
    graft_official, graft_ours, graft_ratios = interleaved(lambda: graft_state_dict(state, peer),
                                                           lambda: official_blend(state, peer), args.repeat, 5, 2)
    threads = torch.get_num_threads()
    body = (f"| model | conv layers | values | official loop (ms) | batched (ms) | speed-up |\n"
            f"|---|---|---|---|---|---|\n"
            f"| {args.model} | {len(convs)} | {n_values:,} | {official * 1e3:.1f} | {batched * 1e3:.2f} "
            f"| {speedup(ratios)} |\n\n"
            f"{args.repeat} interleaved rounds, each the median of 10 batched calls and of 2 official "
            "loops; the speed-up is the median of the rounds' ratios. Both compute every conv layer's "
            f"entropy and bring the values to the host. {threads} thread(s).\n\n"
            f"The whole graft of one state from another, {threads} thread(s): `graft_state_dict` (checks, "
            "plan, both states' entropies, blend) against the official per-key loop (two 10-pass "
            "entropies per conv key, `round(alpha, 2)`, the blend), no file exchange:\n\n"
            f"| model | official per-key loop (ms) | graft_state_dict (ms) | speed-up |\n|---|---|---|---|\n"
            f"| {args.model} | {graft_official * 1e3:.1f} | {graft_ours * 1e3:.2f} | {speedup(graft_ratios)} |")
    if args.write:
        write_section(f"entropy-{args.model}", "## Entropy of every conv layer\n\n" + body)
    else:
        print(body)


if __name__ == "__main__":
    main()
