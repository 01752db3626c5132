"""Small-scale reproduction on real CIFAR-10 (2-core CPU, well under an hour per study).

Arms with the same schedule, each for several seeds, all through the launcher:
  baseline   2 networks trained independently (grafting disabled, same difflr learning rates)
  graft-2    2 networks, grafting
  graft-3    3 networks, grafting                               (study "grafting")
  kd         2 networks, no grafting, distilled from a teacher  (study "cultivation")
  graft-kd   2 networks, grafting and distillation              (study "cultivation")
The cultivation teacher is a one-network run of the same launcher (--teacher-model, trained once).
Writes results/<study>_small.md (table) and a PNG of the curves beside it. Runs already finished
(their summary.json exists) are not repeated, so the script can be rerun after a stop.

    python benchmarks/cifar10_small.py [--study grafting|cultivation] [--epochs 15] [--seeds 0 1]
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# arm -> (networks, grafting, distilled from the teacher)
ARMS = {"baseline": (2, False, False), "graft-2": (2, True, False), "graft-3": (3, True, False),
        "kd": (2, False, True), "graft-kd": (2, True, True)}
STUDIES = {"grafting": ("baseline", "graft-2", "graft-3"),
           "cultivation": ("baseline", "graft-2", "kd", "graft-kd")}


def project_path(path: str) -> str:
    """A path as the report prints it: relative to the project, so that it holds on any machine."""
    return os.path.relpath(path, ROOT) if os.path.isabs(path) else path


def launch(args, out: Path, nproc: int, overrides: list[str], threads: int = 1) -> Path:
    if (out / "summary.json").exists():
        return out
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "graft.train", "--config", str(ROOT / "configs" / "quickstart.yaml"),
           f"output_dir={out}", "batch_size=128", "optim.lr=0.1", "optim.schedule=cosine", "data.name=tar",
           f"data.root={args.data}", f"data.train_subset={args.train_subset}", "progress=false", *overrides]
    print("+", " ".join(cmd), flush=True)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS=str(threads))
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    return out


def teacher(args) -> Path:
    """A one-network baseline run; its best checkpoint is the teacher."""
    out = launch(args, Path(args.runs) / f"teacher-{args.teacher_model}", 1,
                 [f"model={args.teacher_model}", f"epochs={args.teacher_epochs}", "seed=100",
                  "grafting.enabled=false", "data.test_subset=2000"], threads=2)
    return out / "checkpoints" / "net0" / "best.pt"


def run_arm(args, arm: str, seed: int) -> Path:
    nproc, grafting, distilled = ARMS[arm]
    overrides = [f"seed={seed}", f"epochs={args.epochs}", f"model={args.model}", "optim.difflr=true",
                 f"grafting.enabled={str(grafting).lower()}", "data.test_subset=0"]
    if distilled:
        overrides.append(f"distill.teachers=[{teacher(args)}]")
    return launch(args, Path(args.runs) / f"{arm}-seed{seed}", nproc, overrides)


def load(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def train_minutes(recs: list[dict]) -> float:
    """A run's training time: per epoch the slowest network's epoch time, summed."""
    slowest: dict[int, float] = {}
    for r in recs:
        slowest[r["epoch"]] = max(slowest.get(r["epoch"], 0.0), r["epoch_seconds"])
    return sum(slowest.values()) / 60


def mean_std(xs) -> str:
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs) if len(xs) > 1 else 0.0:.2f}"


def arm_figures(runs: list[list[dict]]) -> dict:
    """Per-seed figures, then mean ± std over seeds."""
    per_seed = {k: [] for k in ("net1_final", "net1_best", "mean_final", "mean_best", "ens_final", "ens_best",
                                "inv01", "inv001", "overhead")}
    total_filters = 0
    for recs in runs:
        nets = sorted({r["network"] for r in recs})
        last = max(r["epoch"] for r in recs)
        acc = {k: [r["test_acc"] for r in sorted(recs, key=lambda r: r["epoch"]) if r["network"] == k] for k in nets}
        per_seed["net1_final"].append(acc[0][-1])
        per_seed["net1_best"].append(max(acc[0]))
        per_seed["mean_final"].append(statistics.mean(a[-1] for a in acc.values()))
        per_seed["mean_best"].append(statistics.mean(max(a) for a in acc.values()))
        ens = [r["ensemble_acc"] for r in recs if r["network"] == 0]
        per_seed["ens_final"].append(ens[-1])
        per_seed["ens_best"].append(max(ens))
        final = [r for r in recs if r["epoch"] == last]
        total_filters = final[0]["filters"]
        per_seed["inv01"].append(statistics.mean(r["invalid_filters"]["0.1"] for r in final))
        per_seed["inv001"].append(statistics.mean(r["invalid_filters"]["0.01"] for r in final))
        # Median over epochs, so that one slow epoch (a paused or busy machine) does not skew it.
        shares = [r["graft_seconds"] / r["epoch_seconds"] for r in recs if r["epoch"] < last]
        per_seed["overhead"].append(100 * statistics.median(shares) if shares else 0.0)
    return {"per_seed": per_seed, "filters": total_filters}


def findings(figures: dict) -> str:
    """What the measured numbers say, in sentences generated from them."""
    mean = {arm: statistics.mean(f["per_seed"]["mean_final"]) for arm, f in figures.items()}
    spread = max(statistics.stdev(f["per_seed"]["mean_final"]) if len(f["per_seed"]["mean_final"]) > 1 else 0.0
                 for f in figures.values())
    lines = [f"- Mean final accuracy against the baseline ({mean['baseline']:.2f}%): "
             + ", ".join(f"{arm} {m - mean['baseline']:+.2f} points" for arm, m in mean.items() if arm != "baseline")
             + f"; the largest seed-to-seed standard deviation of an arm is {spread:.2f} points."]
    invalid = max(max(f["per_seed"]["inv01"]) for f in figures.values())
    lines.append(f"- Invalid filters (L1 < 0.1) at the end: at most {invalid:.1f} per network in any arm"
                 + (": at this scale there is nothing for grafting to revive." if invalid < 1 else "."))
    factors = {n: statistics.mean((1 + math.cos(math.pi * (n - k) / n)) / 2 for k in range(1, n + 1))
               for n in sorted({ARMS[arm][0] for arm in figures})}
    if len(factors) > 1:
        lines.append("- difflr gives arms with more networks a lower mean learning rate ("
                     + ", ".join(f"N={n}: {f:.2f} x lr" for n, f in factors.items())
                     + "), which at this short schedule confounds the comparison across N.")
    overhead = max(statistics.mean(f["per_seed"]["overhead"]) for f in figures.values())
    lines.append(f"- The graft step costs at most {overhead:.2f}% of an epoch here.")
    return "\n".join(lines)


def write_report(args, results: dict[str, list[list[dict]]]) -> None:
    out = ROOT / "results"
    name = f"{'cifar10' if args.study == 'grafting' else 'cultivation'}_small"
    out.mkdir(exist_ok=True)
    rows, figures = [], {}
    for arm, runs in results.items():
        f = figures[arm] = arm_figures(runs)
        p = f["per_seed"]
        rows.append(f"| {arm} | {len(runs)} | {mean_std(p['net1_final'])} | {mean_std(p['net1_best'])} | "
                    f"{mean_std(p['mean_final'])} | {mean_std(p['mean_best'])} | {mean_std(p['ens_final'])} | "
                    f"{mean_std(p['ens_best'])} | {statistics.mean(p['inv01']):.1f} / {f['filters']} | "
                    f"{statistics.mean(p['inv001']):.1f} / {f['filters']} | {statistics.mean(p['overhead']):.2f}% |")
    cmd = "python benchmarks/cifar10_small.py " + " ".join(map(project_path, sys.argv[1:]))
    minutes = {arm: sum(train_minutes(recs) for recs in runs) for arm, runs in results.items()}
    time_line = ("Time on this machine (2-core CPU; per epoch the slowest network, summed): "
                 + ", ".join(f"{arm} {m:.0f} min" for arm, m in minutes.items())
                 + f"; {sum(minutes.values()):.0f} min in all, plus about a minute per run to start and load "
                 "the data.\n")
    teacher_line, teacher_finding = "", ""
    if args.study == "cultivation":
        t = load(Path(args.runs) / f"teacher-{args.teacher_model}")
        teacher_finding = (f"\n- The teacher ({max(r['test_acc'] for r in t):.2f}% on its 2,000-image test subset) is "
                           f"hardly better than the students it teaches (baseline mean final "
                           f"{statistics.mean(figures['baseline']['per_seed']['mean_final']):.2f}%): at this budget "
                           "distillation has little to pass on.")
        teacher_line = (f"Teacher: {args.teacher_model}, one network, {args.teacher_epochs} epochs on the same subset, "
                        f"best on a 2,000-image test subset {max(r['test_acc'] for r in t):.2f}% "
                        f"(kept as best.pt); distillation tau 2, weight 1.\n")
    title = "Filter grafting" if args.study == "grafting" else "Cultivation (grafting + distillation)"
    text = f"""# {title} on real CIFAR-10, small scale (CPU)

Command: `{cmd}`
Data: `{project_path(args.data)}` (real CIFAR-10 JPEGs), class-balanced training subset of {args.train_subset} images,
the full 10,000-image test set. Model {args.model}, {args.epochs} epochs, batch 128 per network, SGD lr 0.1
momentum 0.9 wd 5e-4, cosine schedule, difflr (network k of N starts at lr (1 + cos(pi (N-k)/N)) / 2),
seeds {", ".join(map(str, args.seeds))}. {teacher_line}Accuracies in %, mean ± std over seeds. "net 1" is the first network
(the one with the smallest difflr learning rate); "mean" is the mean over the networks of a run.
Invalid filters: conv filters with L1 norm below the threshold at the end, mean over networks.
Graft overhead: time in the graft step (check-in, exchange, entropies, blend) as a share of the epoch's
time, median over the grafted epochs (0 where nothing is grafted).
{time_line}
| arm | seeds | net 1 final | net 1 best | mean final | mean best | ensemble final | ensemble best | invalid < 0.1 | invalid < 0.01 | graft overhead |
|---|---|---|---|---|---|---|---|---|---|---|
""" + "\n".join(rows) + f"""

![test accuracy and invalid filters per epoch]({name}.png)

## What this scale can and cannot show
{findings(figures)}{teacher_finding}
- It runs the real pipeline end to end (real images, the launcher, the ring, a graft every epoch)
  and shows the mechanics: alpha, the entropy table, invalid-filter counts, the graft overhead.
- It cannot test the paper's claims: {args.epochs} epochs on {args.train_subset} images leave the networks far
  from convergence, where the paper trains 200 epochs on 50,000 images and counts invalid filters
  after full training; and {len(args.seeds)} seeds cannot resolve
  differences smaller than the seed-to-seed spread. Read the table as a low-cost check that the
  method runs and costs little, not as evidence for or against the paper.
- Ensembles differ by construction: grafted networks become similar (with 2 networks, identical
  after each graft), so their ensemble gains less over a single network than independent ones.
"""
    (out / f"{name}.md").write_text(text)
    plot(results, out / f"{name}.png")
    print(text)


def plot(results, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e .[plot]): no plot", file=sys.stderr)
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for (arm, runs), color in zip(results.items(), ("tab:gray", "tab:blue", "tab:red", "tab:green")):
        for i, recs in enumerate(runs):
            epochs = sorted({r["epoch"] for r in recs})
            acc = [statistics.mean(r["test_acc"] for r in recs if r["epoch"] == e) for e in epochs]
            inv = [statistics.mean(r["invalid_filters"]["0.1"] for r in recs if r["epoch"] == e) for e in epochs]
            label = arm if i == 0 else None
            ax1.plot([e + 1 for e in epochs], acc, color=color, alpha=0.8, label=label)
            ax2.plot([e + 1 for e in epochs], inv, color=color, alpha=0.8, label=label)
    ax1.set(xlabel="epoch", ylabel="test accuracy (%), mean over networks", title="CIFAR-10 test accuracy")
    ax2.set(xlabel="epoch", ylabel="filters with L1 < 0.1, mean over networks", title="invalid filters")
    ax1.legend()
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", choices=sorted(STUDIES), default="grafting")
    parser.add_argument("--teacher-model", default="resnet32")
    parser.add_argument("--teacher-epochs", type=int, default=30)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"))
    parser.add_argument("--model", default="resnet20")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--train-subset", type=int, default=5000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--runs", default=str(ROOT / "runs" / "cifar10_small"))
    args = parser.parse_args()
    if not Path(args.data).is_file():
        parser.error(f"--data {args.data}: no such file. Pass all of CIFAR-10 as a .tar.gz of JPEGs in the "
                     "ImageFolder layout (train/<class>/*.jpg, test/<class>/*.jpg)")
    results = {arm: [load(run_arm(args, arm, seed)) for seed in args.seeds] for arm in STUDIES[args.study]}
    write_report(args, results)


if __name__ == "__main__":
    main()
