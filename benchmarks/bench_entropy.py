"""Entropy of every conv layer of a model: one batched call against the official 10-pass loop.

    python benchmarks/bench_entropy.py [--model resnet56] [--write]
"""

import argparse
import statistics

import torch

from common import timeit, write_section
from official import official_entropy
from graft import weight_entropies
from graft.models import build_model


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet56")
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--write", action="store_true", help="write the figures into BENCHMARKS.md")
    args = parser.parse_args()

    torch.manual_seed(0)
    state = build_model(args.model, 10).state_dict()
    convs = [t for k, t in state.items() if t.dim() == 4]
    n_values = sum(t.numel() for t in convs)
    # Interleaved rounds (this machine's speed drifts): each round times both, the ratio is the
    # median of the rounds' ratios.
    batched, official, ratios = [], [], []
    for _ in range(args.repeat):
        batched.append(timeit(lambda: weight_entropies(convs).tolist(), 10))
        official.append(timeit(lambda: [official_entropy(t) for t in convs], 2, warmup=1))
        ratios.append(official[-1] / batched[-1])
    official, batched = statistics.median(official), statistics.median(batched)
    body = (f"| model | conv layers | values | official loop (ms) | batched (ms) | speed-up |\n"
            f"|---|---|---|---|---|---|\n"
            f"| {args.model} | {len(convs)} | {n_values:,} | {official * 1e3:.1f} | {batched * 1e3:.2f} "
            f"| {statistics.median(ratios):.1f}x (rounds: {min(ratios):.1f}x to {max(ratios):.1f}x) |\n\n"
            f"{args.repeat} interleaved rounds, each the median of 10 batched calls and of 2 official "
            "loops; the speed-up is the median of the rounds' ratios. Both compute every conv layer's "
            "entropy and bring the values to the host.")
    if args.write:
        write_section(f"entropy-{args.model}", "## Entropy of every conv layer\n\n" + body)
    else:
        print(body)


if __name__ == "__main__":
    main()
