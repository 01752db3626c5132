"""The report of a study (``graft-study``): a Markdown table, paired differences, a picture.

Every figure is read back from the finished runs' files (summary.json, metrics.jsonl,
study.json), so the report can be rewritten at any time and says nothing the runs did not.
A run's single-network accuracy is the mean over its networks; the test set counts only as the
final weights and the best-validation weights (runs that select on ``data.eval_split: val``).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from ..config import ConfigError, load_config, setup_differences
from ..report import MetricsLog, writing
from ..stats import mean_std, paired_difference
from .archive import finished, read_json, read_state
from .plan import Plan, Run, run_setup

METRICS = (("final", "final"), ("best_val", "best-val"), ("ensemble", "ensemble final"),
           ("ensemble_best_val", "ensemble best-val"))


def fmt_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes // 60} h {minutes % 60:02d} min" if minutes >= 60 else f"{minutes} min"


def run_result(run: Run) -> dict | None:
    """The figures of one finished run (from its archived files), or None. A file that lacks
    what the report needs is named."""
    if not finished(run):
        return None
    try:
        return _run_result(run)
    except (KeyError, TypeError) as e:
        raise ConfigError(f"{run.archive}: an archived file lacks a value the report needs ({type(e).__name__}: "
                          f"{e}); restore it, or remove the folder to run it again") from None


def _run_result(run: Run) -> dict:
    state = read_state(run.archive)
    summary = read_json(run.archive / "summary.json")
    records = MetricsLog(run.archive / "metrics.jsonl").latest()
    if not records:
        raise ConfigError(f"{run.archive / 'metrics.jsonl'}: no epoch records in a finished run's archive; restore "
                          "it, or remove the folder to run it again")
    last_epoch = max(r.epoch for r in records)
    last = [r for r in records if r.epoch == last_epoch]
    split = records[0].split
    test = summary.get("test")
    if test:
        nets = test["networks"].values()
        accs = {"final": statistics.mean(n["final_test_acc"] for n in nets),
                "best_val": statistics.mean(n["best_val_test_acc"] for n in nets),
                "ensemble": test["ensemble_final_test_acc"],
                "ensemble_best_val": test["ensemble_best_val_test_acc"]}
    else:  # a run that evaluated the test set every epoch: no selection without it
        accs = {"final": summary["final_acc_mean"], "best_val": None, "ensemble": summary["ensemble_final_acc"],
                "ensemble_best_val": None}
    alphas = [r.mean_alpha for r in records if r.mean_alpha is not None]
    # With 2 networks the mean alpha is 0.5 by symmetry; how far alpha strays from 0.5 is what
    # separates grafting from plain averaging.
    strays = [abs(layer["alpha"] - 0.5) for r in records for layer in r.graft]
    epoch_seconds = sum(r.epoch_seconds for r in records)
    trained = max(sum(r.epoch_seconds for r in records if r.network == k) for k in {r.network for r in records})
    weights_file = run.archive / "weights.json"
    weights = read_json(weights_file) if weights_file.exists() else {}
    curve, invalid_curve = {}, {}
    for r in records:
        curve.setdefault(r.epoch, []).append(r.acc)
        for t, n in r.invalid_filters.items():
            invalid_curve.setdefault(t, {}).setdefault(r.epoch, []).append(n)
    invalid_networks = {t: [r.invalid_filters[t] for r in last] for t in last[0].invalid_filters}
    invalid = {t: statistics.mean(counts) for t, counts in invalid_networks.items()}
    return {
        **accs,
        **{f"invalid<{t}": n for t, n in invalid.items()},  # compared like the accuracies (invalid_metrics)
        "epochs": last_epoch + 1,
        "filters": last[0].filters,
        "invalid": invalid,
        "invalid_networks": invalid_networks,
        "mean_alpha": statistics.mean(alphas) if alphas else None,
        "alpha_stray": statistics.mean(strays) if strays else None,
        "distance": weights.get("final_distance"),
        "invalid_in_both": weights.get("invalid_in_both"),  # None: archived before it was measured
        "overhead": sum(r.graft_seconds for r in records) / epoch_seconds if epoch_seconds else 0.0,
        # A runner killed outright (before graft-study saved wall time while runs trained) lost its
        # attempt's time: the network's own epoch times are then the better (lower) bound.
        "wall_seconds": max(state["wall_seconds"], trained),
        "wall_at_least": trained > state["wall_seconds"],
        "versions": [(a["commit"], a["dirty"]) for a in state["attempts"]],
        "differs": differs_from_plan(run),
        "machines": [a.get("machine") for a in state["attempts"]],  # None: a runner that did not record it
        "curve_split": split,
        "curve": [statistics.mean(curve[e]) for e in sorted(curve)],
        "invalid_curve": {t: [statistics.mean(by[e]) for e in sorted(by)] for t, by in invalid_curve.items()},
    }


def differs_from_plan(run: Run) -> list[str]:
    """How the archived run's config differs from its arm's in the plan as read now (a plan
    edited after the run, or other key=value arguments given to graft-study): 'key: X in the run,
    Y in the plan', empty when it is the same experiment."""
    try:
        ran = run_setup(load_config(run.archive / "config.yaml"), run.arm.networks)
    except ConfigError as e:
        return [f"its config.yaml cannot be read by this version ({e})"]
    return [f"{k}: {now!r} in the run, {want!r} in the plan" for k, want, now in setup_differences(run.arm.setup, ran)]


def _pm(values: list[float], digits: int = 2) -> str:
    if not values:
        return "-"
    mean, std = mean_std(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def _short(version: tuple) -> str:
    commit, dirty = version
    return commit[:10] + (" (changes)" if dirty else "")


def _versions(commits: dict[str, set], mixed: list[str]) -> list[str]:
    """What the report can say of the code its runs ran."""
    every = set().union(*commits.values())
    if not every:
        return []
    lines = []
    unknown = [a for a, c in commits.items() if "unknown" in c]
    if unknown:
        lines += [f"**Code version unknown** for runs of arm(s) {', '.join(unknown)} (git was not available).", ""]
    if mixed:
        lines += [f"**Mixed code versions** in arm(s) {', '.join(mixed)}: their runs ran different commits or a "
                  "tree with changes (see the code column).", ""]
    elif len(every) > 1:
        lines += ["**Arms ran different commits** (see the code column): their paired differences compare code "
                  "versions too.", ""]
    elif not unknown:
        lines += [f"Every run ran one commit, {next(iter(every))[:10]}, from a clean tree.", ""]
    return lines


def _machine_keys(results) -> dict[str, str]:
    """A short key (A, B, ...) for each machine the finished runs recorded, in order of first use."""
    keys: dict[str, str] = {}
    for res in results:
        for m in res["machines"] if res else ():
            if m and m not in keys:
                keys[m] = chr(ord("A") + len(keys)) if len(keys) < 26 else f"M{len(keys) + 1}"
    return keys


def write_report(plan: Plan, runs: list[Run], plan_path: str | None = None) -> Path:
    """Write ``<results>/<name>.md`` (and ``.png`` when matplotlib is installed); returns the .md
    path. A results folder it cannot write ends in one line (OutputError)."""
    with writing(Path(plan.results), "the study's report", setting="--results"):
        return _write_report(plan, runs, plan_path)


def _write_report(plan: Plan, runs: list[Run], plan_path: str | None) -> Path:
    results = {r.label: run_result(r) for r in runs}
    arms = [a.name for a in plan.arms]
    per_arm = {a: {r.seed: results[r.label] for r in runs if r.arm.name == a and results[r.label]} for a in arms}
    out = Path(plan.results)
    out.mkdir(parents=True, exist_ok=True)
    md = out / f"{plan.name}.md"
    png = out / f"{plan.name}.png"
    drew = _plot(plan, per_arm, png)
    done = sum(1 for v in results.values() if v)
    lines = [f"# Study: {plan.name}", ""]
    if plan.description:
        lines += [plan.description.strip(), ""]
    lines += [f"Status: {done} of {len(runs)} runs finished ({len(plan.seeds)} seeds x {len(arms)} arms). "
              + (f"Base config `{plan.config}`" if plan.config else "Each arm names its config")
              + (f", with `{' '.join(plan.overrides)}`" if plan.overrides else "")
              + ".", ""]
    if plan_path:
        lines += [f"Reproduce or continue: `graft-study {plan_path}` (finished runs are skipped, an interrupted "
                  "one resumes); this file is rewritten after every run. Each finished run's config, metrics and "
                  f"summary are in `{Path(plan.results) / plan.name}/<arm>/seed<k>/`.", ""]
    lines += ["## Test accuracy (%, mean ± std over seeds)", "",
              "Single-network figures are the mean over a run's networks. *final*: the weights after the last "
              "epoch; *best-val*: each network's weights from its best validation epoch; *ensemble*: the mean of "
              "the networks' softmax outputs.", "",
              "| arm | networks | seeds | final | best-val | ensemble final | ensemble best-val |",
              "|---|---|---|---|---|---|---|"]
    arm_of = {a.name: a for a in plan.arms}
    for a in arms:
        rs = list(per_arm[a].values())
        cols = [_pm([r[m] for r in rs if r[m] is not None]) for m, _ in METRICS]
        lines.append(f"| {a} | {arm_of[a].networks} | {len(rs)} | " + " | ".join(cols) + " |")
    lines += ["", f"## Paired differences against `{plan.reference}` (same seeds, 95% t interval)", ""]
    others = [a for a in arms if a != plan.reference]
    lines += difference_table([(a, plan.reference) for a in others], per_arm, METRICS)
    pairs = [(a, b) for i, a in enumerate(others) for b in others[i + 1:]]
    if pairs:  # e.g. graft against average: is entropy weighting better than plain averaging?
        lines += ["## Paired differences between the other arms", ""]
        lines += difference_table(pairs, per_arm, [m for m in METRICS if m[0] in ("final", "ensemble")])
    counted = invalid_metrics(per_arm)
    if counted:  # some run ended with invalid filters: the paper's premise is testable, so test it
        lines += [f"## Invalid filters against `{plan.reference}` (last epoch, mean per network; paired over the "
                  "same seeds, 95% t interval)", "",
                  "A filter is invalid when the L1 norm of its weights is under the threshold. Below 0: the arm "
                  f"ends with fewer invalid filters than `{plan.reference}`.", ""]
        lines += difference_table([(a, plan.reference) for a in others], per_arm, counted)
        lines += where_invalid(per_arm, [key.removeprefix("invalid<") for key, _ in counted])
    lines += ["## Per arm", "", "*mean alpha*: over networks, layers and grafts; *mean abs(alpha - 0.5)*: how far a "
              "layer's alpha strays from plain averaging; *distance*: how far apart the networks' final weights are "
              "(mean over layers of ||W_peer - W_self|| / ||W_self||, each network against its ring peer; near 0: "
              "the networks have become one); *ensemble gain*: ensemble final minus final.", "",
              "| arm | invalid filters (last epoch, mean per network; fewest to most) | mean alpha "
              "| mean abs(alpha - 0.5) | distance | ensemble gain | graft overhead (% of epoch time) "
              "| wall time per run |",
              "|---|---|---|---|---|---|---|---|"]
    for a in arms:
        rs = list(per_arm[a].values())
        if not rs:
            lines.append(f"| {a} |" + " - |" * 7)
            continue
        inv = invalid_cell(rs)
        alphas = [r["mean_alpha"] for r in rs if r["mean_alpha"] is not None]
        alpha = _pm(alphas, digits=3) if alphas else "- (no graft)"
        strays = [r["alpha_stray"] for r in rs if r["alpha_stray"] is not None]
        stray = f"{statistics.mean(strays):.3f}" if strays else "-"
        distance = _pm([r["distance"] for r in rs if r["distance"] is not None], digits=3)
        gain = _pm([r["ensemble"] - r["final"] for r in rs])
        overhead = f"{100 * statistics.mean(r['overhead'] for r in rs):.3f}"
        wall = _at_least(rs) + fmt_duration(statistics.mean(r["wall_seconds"] for r in rs))
        lines.append(f"| {a} | {inv} | {alpha} | {stray} | {distance} | {gain} | {overhead} | {wall} |")
    lines += ["", "## Runs", "", "| run | epochs | final | best-val | ensemble final | wall time | code | machine |",
              "|---|---|---|---|---|---|---|---|"]
    mixed, spread = [], []  # arms whose runs ran different code / different machines
    keys = _machine_keys(results.values())
    commits = {}  # arm -> the commits its runs ran
    for a in arms:
        versions, machines = set(), set()
        for r in runs:
            if r.arm.name != a:
                continue
            res = results[r.label]
            if res is None:
                lines.append(f"| {r.label} | - | not finished | | | | | |")
                continue
            versions.update(res["versions"])
            machines.update(m for m in res["machines"] if m)
            code = ", ".join(sorted({_short(v) for v in res["versions"]}))
            machine = ", ".join(sorted({keys[m] for m in res["machines"] if m})) or "-"
            best = "-" if res["best_val"] is None else f"{res['best_val']:.2f}"
            lines.append(f"| {r.label} | {res['epochs']} | {res['final']:.2f} | {best} | {res['ensemble']:.2f} | "
                         f"{_at_least([res])}{fmt_duration(res['wall_seconds'])} | {code} | {machine} |")
        commits[a] = {v[0] for v in versions}
        if len(commits[a]) > 1 or any(v[1] for v in versions):
            mixed.append(a)
        if len(machines) > 1:
            spread.append(a)
    lines.append("")
    if any(res and res["wall_at_least"] for res in results.values()):
        lines += ["≥: an attempt of the run was killed before graft-study saved its time; the figure is the sum of "
                  "its epochs' own times, a lower bound.", ""]
    lines += _versions(commits, mixed)
    differ = [f"{label}: {'; '.join(res['differs'])}" for label, res in results.items() if res and res["differs"]]
    if differ:
        lines += ["**Runs that differ from their arm in the plan** (the plan was edited after they ran, or "
                  "graft-study was given other key=value arguments): they are pooled with the others all the same.",
                  "", *[f"- {d}" for d in differ], ""]
    unrecorded = any(m is None for res in results.values() if res for m in res["machines"])
    if keys:
        lines += ["Machines: " + "; ".join(f"{k}: {m}" for m, k in keys.items())
                  + (". -: not recorded (a runner older than the record)." if unrecorded else "."), ""]
    elif unrecorded:
        lines += ["Machines: not recorded (a runner older than the record).", ""]
    if spread:
        lines += [f"**Runs on different machines** in arm(s) {', '.join(spread)}: wall times compare only within a "
                  "machine.", ""]
    if drew:
        lines += [f"![{plan.name}]({png.name})", ""]
    md.write_text("\n".join(lines))
    return md


def _at_least(results: list[dict]) -> str:
    return "≥ " if any(r["wall_at_least"] for r in results) else ""


def invalid_cell(runs: list[dict]) -> str:
    """An arm's invalid filters at the last epoch: the mean per network, and the fewest and the
    most any one network had where they differ (a mean of 37 may be 3 in one network and 71 in
    the other)."""
    cells = []
    for t in runs[0]["invalid"]:
        cell = f"<{t}: {statistics.mean(r['invalid'][t] for r in runs):.1f}"
        counts = [n for r in runs for n in r.get("invalid_networks", {}).get(t, [])]
        if counts and min(counts) != max(counts):
            cell += f" ({min(counts)} to {max(counts)})"
        cells.append(cell)
    return ", ".join(cells) + (f" of {runs[0]['filters']}" if runs[0]["filters"] else "")


def where_invalid(per_arm: dict, thresholds: list[str]) -> list[str]:
    """The section that says whether grafting could revive the invalid filters at all: a graft
    blends each filter with the one at its position in the peer, so a filter whose peer is
    invalid there too stays invalid. Empty when no finished run measured it (weights.json)."""
    rows = []
    for arm, by_seed in per_arm.items():
        rs = [r for r in by_seed.values() if r.get("invalid_in_both") is not None]
        for t in thresholds:
            if not rs or t not in rs[0]["invalid_in_both"]:
                continue
            invalid = statistics.mean(r["invalid"][t] for r in rs)
            both = statistics.mean(r["invalid_in_both"][t] for r in rs)
            share = f"{100 * both / invalid:.0f}%" if invalid else "-"
            rows.append(f"| {arm} | < {t} | {len(rs)} | {invalid:.1f} | {both:.1f} | {share} |")
    if not rows:
        return []
    return ["## Where the invalid filters sit (last epoch, mean per network)", "",
            "A graft blends each filter with the filter at the same position in the ring peer, so it can revive an "
            "invalid filter only where the peer's filter there is valid. *Invalid in the peer too*: the invalid "
            "filters whose filter at the same position in the peer is invalid as well, from the final checkpoints. "
            "Between networks that never blended, positions do not correspond (each network starts from its own "
            "initialization), and this overlap is chance.", "",
            "| arm | L1 norm | runs | invalid | invalid in the peer too | share |", "|---|---|---|---|---|---|",
            *rows, ""]


def invalid_metrics(per_arm: dict) -> list[tuple[str, str]]:
    """(key, name) of each invalid-filter threshold under which some finished run ended with an
    invalid filter; none where every count is 0 (nothing to compare)."""
    results = [r for runs in per_arm.values() for r in runs.values()]
    thresholds = dict.fromkeys(t for r in results for t in r.get("invalid", {}))
    return [(f"invalid<{t}", f"invalid filters, L1 < {t}") for t in thresholds
            if any(r.get(f"invalid<{t}") for r in results)]


def difference_table(pairs: list[tuple[str, str]], per_arm: dict, metrics) -> list[str]:
    """A table of paired differences (arm a minus arm b, on the seeds both finished) and a
    sentence for each final and ensemble-final difference."""
    lines = ["| arm | against | metric | pairs | mean difference | 95% interval |", "|---|---|---|---|---|---|"]
    sentences = []
    for a, b in pairs:
        seeds = sorted(set(per_arm[a]) & set(per_arm[b]))
        for m, name in metrics:
            both = [(per_arm[a][s][m], per_arm[b][s][m]) for s in seeds
                    if per_arm[a][s][m] is not None and per_arm[b][s][m] is not None]
            if not both:
                continue
            d = paired_difference([x for x, _ in both], [y for _, y in both])
            interval = "-" if d.n < 2 else f"[{d.low:+.2f}, {d.high:+.2f}]"
            lines.append(f"| {a} | {b} | {name} | {d.n} | {d.mean:+.2f} | {interval} |")
            if m in ("final", "ensemble"):
                sentences.append(_sentence(a, b, name, d))
    if len(lines) == 2:  # a study under way: no seed is finished in both arms of any pair yet
        return ["No seed has finished in both arms of a pair yet.", ""]
    return lines + ["", *[f"- {s}" for s in sentences], ""]


def _sentence(arm: str, ref: str, metric: str, d) -> str:
    head = f"{arm} vs {ref}, {metric}: {d.mean:+.2f} points"
    if d.n < 2:
        return f"{head} from one seed; no interval yet."
    if d.same_every_time:  # sd 0: the t interval collapses to a point
        same = "the same" if abs(d.mean) < 0.005 else ("above" if d.mean > 0 else "below")
        return (f"{head} on each of {d.n} seeds: the difference was the same on every seed, so the interval has "
                f"no width. Read it as '{same} on each of {d.n} seeds', not as a precise estimate.")
    if d.excludes_zero:
        side = "above" if d.mean > 0 else "below"
        agree = sum(1 for x in d.diffs if (x > 0) == (d.mean > 0) and x != 0)
        return (f"{head}; the 95% interval excludes 0: over these {d.n} seeds {arm} is {side} {ref} on average "
                f"({side} on {agree} of {d.n} seeds).")
    return f"{head}; the 95% interval includes 0: no difference resolved with {d.n} seeds."


def _plot(plan: Plan, per_arm: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plot extra is optional
        return False
    arms = list(per_arm)
    counted = invalid_metrics(per_arm)  # a third panel where some run has invalid filters
    threshold = counted[0][0].removeprefix("invalid<") if counted else None
    fig, (left, right, *third) = plt.subplots(1, 2 + bool(counted), figsize=(12 + 6 * bool(counted), 4.5))
    for i, a in enumerate(arms):
        rs = list(per_arm[a].values())
        for j, (m, name) in enumerate((("final", "final"), ("ensemble", "ensemble final"))):
            ys = [r[m] for r in rs if r[m] is not None]
            x = i + (j - 0.5) * 0.3
            left.scatter([x] * len(ys), ys, color=f"C{j}", alpha=0.6, s=18, label=name if i == 0 else None)
            if ys:
                left.hlines(mean_std(ys)[0], x - 0.12, x + 0.12, color=f"C{j}", linewidth=2)
        if rs:
            n = max(len(r["curve"]) for r in rs)
            curve = [statistics.mean(r["curve"][e] for r in rs if e < len(r["curve"])) for e in range(n)]
            right.plot(range(1, n + 1), curve, label=a, color=f"C{i}")
            if counted:
                _plot_invalid(third[0], a, rs, threshold, f"C{i}")
    left.set_xticks(range(len(arms)), arms, rotation=20)
    left.set_ylabel("test accuracy (%)")
    left.set_title("per seed (dots) and mean (bars)")
    left.legend(fontsize=8)
    split = next((r["curve_split"] for rs in per_arm.values() for r in rs.values()), "val")
    right.set_xlabel("epoch")
    right.set_ylabel(f"{'validation' if split == 'val' else 'test'} accuracy (%), mean")
    right.set_title("learning curves")
    right.legend(fontsize=8)
    # Zoom on the second half of the shortest run, where the arms differ (a longer arm, twice the
    # epochs, must not push the others out of view), low enough for every point shown there.
    lengths = [len(r["curve"]) for rs in per_arm.values() for r in rs.values() if r["curve"]]
    first = min(lengths) // 2 + 1 if lengths else 1
    lows = [v for rs in per_arm.values() for r in rs.values() for e, v in enumerate(r["curve"], 1) if e >= first]
    if lows and not math.isnan(min(lows)):
        right.set_ylim(min(lows) - 1, None)
        right.set_xlim(first - 0.5, None)
        right.set_title(f"learning curves from epoch {first}")
    if counted:
        third[0].set_xlabel("epoch")
        third[0].set_ylabel("invalid filters per network, mean")
        third[0].set_title(f"invalid filters (L1 < {threshold}, of {_filters(per_arm)})")
        third[0].legend(fontsize=8)
    fig.suptitle(f"study {plan.name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _plot_invalid(ax, arm: str, rs: list[dict], threshold: str, color: str) -> None:
    """The arm's invalid-filter count by epoch, mean over its runs (each a mean over networks)."""
    curves = [r["invalid_curve"].get(threshold, []) for r in rs]
    n = max(map(len, curves), default=0)
    if n:
        ax.plot(range(1, n + 1), [statistics.mean(c[e] for c in curves if e < len(c)) for e in range(n)],
                label=arm, color=color)


def _filters(per_arm: dict) -> str:
    return str(next((r["filters"] for rs in per_arm.values() for r in rs.values() if r["filters"]), "?"))
