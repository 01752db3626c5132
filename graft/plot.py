"""``graft-report RUN_DIR [RUN_DIR ...]``: a run's metrics.jsonl as a picture.

One PNG per run (``RUN_DIR/report.png``): per epoch, each network's test accuracy and the
ensemble's, the learning rate, the invalid filters and the mean peer distance; then per network
heatmaps of alpha, entropy and peer distance for every layer over the epochs. Given several
runs, one more PNG compares them (``--compare``). Needs matplotlib: ``pip install 'graft[plot]'``.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml

from .cli import say_error
from .config import upgrade_grafting
from .report import MetricsLog
from .stats import mean_std


class PlotError(ValueError):
    """A run directory that cannot be drawn: the message names it and why."""


@dataclass
class Run:
    """One run's metrics as arrays: networks x epochs, and networks x layers x epochs. NaN
    where there is no value (no graft after the last epoch, none at all in a baseline)."""

    name: str
    title: str
    split: str                     # the split evaluated every epoch: test, or val
    epochs: np.ndarray             # (E,) counted from 1, as printed
    acc: np.ndarray                # (N, E) on ``split``
    ensemble_acc: np.ndarray       # (E,)
    lr: np.ndarray                 # (N, E)
    invalid: dict[str, np.ndarray]  # threshold -> (N, E)
    filters: int
    mean_peer_distance: np.ndarray  # (N, E)
    layers: list[str] = field(default_factory=list)
    alpha: np.ndarray | None = None          # (N, L, E)
    score: np.ndarray | None = None          # (N, L, E): the criterion's layer score (entropy, L1 norm)
    score_name: str = ""
    peer_distance: np.ndarray | None = None  # (N, L, E)
    A: float | None = None
    grafted: bool = False                    # some epoch ended with a graft

    @property
    def networks(self) -> int:
        return self.acc.shape[0]

    @property
    def split_name(self) -> str:
        return "validation" if self.split == "val" else "test"


def load_run(run_dir: str | Path) -> Run:
    """Read ``RUN_DIR/metrics.jsonl`` (and config.yaml for the title)."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{run_dir}: no metrics.jsonl (not a graft run directory?)")
    try:
        latest = {(r.network, r.epoch): r for r in MetricsLog(path).read()}  # a rewritten record: the later
    except (TypeError, ValueError) as e:
        raise PlotError(f"{path}: not a graft metrics file ({e})") from None
    if not latest:
        raise PlotError(f"{path}: no epoch records yet")
    if all(r.acc is None for r in latest.values()):
        raise PlotError(f"{path}: no accuracy in any record (neither test_acc nor val_acc): nothing to draw")
    nets = sorted({n for n, _ in latest})
    epochs = sorted({e for _, e in latest})
    col = {e: j for j, e in enumerate(epochs)}
    shape = (len(nets), len(epochs))

    def grid(value) -> np.ndarray:
        out = np.full(shape, math.nan)
        for (n, e), r in latest.items():
            v = value(r)
            out[nets.index(n), col[e]] = math.nan if v is None else v
        return out

    ensemble = np.full(len(epochs), math.nan)
    for (_, e), r in latest.items():
        ensemble[col[e]] = math.nan if r.ensemble_acc is None else r.ensemble_acc
    first = next(iter(latest.values()))
    thresholds = list(first.invalid_filters)
    invalid = {t: grid(lambda r, t=t: r.invalid_filters.get(t)) for t in thresholds}

    cfg = _read_config(run_dir)
    grafting = cfg.get("grafting", {})
    entropy_alpha = grafting.get("criterion", "entropy") in ("entropy", "l1")
    run = Run(name=str(run_dir), title=_title(run_dir, cfg, len(nets)), split=first.split, epochs=np.array(epochs) + 1,
              acc=grid(lambda r: r.acc), ensemble_acc=ensemble, lr=grid(lambda r: r.lr), invalid=invalid,
              filters=first.filters, mean_peer_distance=grid(lambda r: r.mean_peer_distance),
              A=grafting.get("A") if entropy_alpha else None)
    grafted = [r for r in latest.values() if r.graft]
    run.grafted = bool(grafted) or any(r.grafts for r in latest.values())
    if grafted:
        run.layers = [layer["layer"] for layer in grafted[0].graft]
        run.score_name = next((k.removesuffix("_self") for k in grafted[0].graft[0] if k.endswith("_self")), "")
        keys = ("alpha", f"{run.score_name}_self", "peer_distance")
        per_layer = {key: np.full((len(nets), len(run.layers), len(epochs)), math.nan) for key in keys}
        for r in grafted:
            for key, values in per_layer.items():
                values[nets.index(r.network), :, col[r.epoch]] = [layer.get(key, math.nan) for layer in r.graft]
        run.alpha, run.score, run.peer_distance = (per_layer[k] for k in keys)
        if not run.score_name:
            run.score = None
    return run


def _read_config(run_dir: Path) -> dict:
    """The run's config.yaml as saved (older grafting keys read as the criterion they meant); {}
    where it is missing: the title and the alpha colour scale then fall back to defaults."""
    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}
    if isinstance(cfg.get("grafting"), dict):
        cfg["grafting"] = upgrade_grafting(cfg["grafting"])
    return cfg


def _title(run_dir: Path, cfg: dict, networks: int) -> str:
    g = cfg.get("grafting", {})
    if networks > 1 and g.get("enabled", True):
        criterion = g.get("criterion", "entropy")
        rule = f"rule {g['rule']}, " if g.get("rule") else ""
        how = f"grafting: {rule}{criterion}, {g.get('partner', 'ring')}, A {g.get('A', '?')}, c {g.get('c', '?')}"
    else:
        how = "no grafting"
    return f"{run_dir}: {cfg.get('model', '?')}, {networks} network(s), {how}"


# --------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------


def _figure(width: float, height: float):
    from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend

    return Figure(figsize=(width, height), layout="constrained")


def _style(ax, title: str, ylabel: str = "") -> None:
    """Common to the curves: epochs as integers on x, a grid, a legend when something is drawn."""
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title)
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    if ax.has_data():
        ax.legend(fontsize="small")


def _counts_axis(ax, values: list[np.ndarray]) -> None:
    """Filter counts: integers from 0 (all zero is a flat line at the bottom, not at mid-height)."""
    from matplotlib.ticker import MaxNLocator

    finite = [v[~np.isnan(v)] for v in values]
    ax.set_ylim(0, max([1.0] + [1.1 * float(v.max()) for v in finite if v.size]))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _distance_axis(ax, values: np.ndarray, grafted: bool) -> None:
    """Peer distance: log scale (independent networks start ~1.4 apart; grafted ones come close)."""
    if np.isnan(values).all():
        why = "not recorded (metrics older than the peer distance)" if grafted else "no grafting"
        ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
    elif np.nanmin(values) > 0:
        ax.set_yscale("log")


def _line_panels(run: Run, axes) -> None:
    acc, lr, inv, dist = axes
    grafted = not np.isnan(run.mean_peer_distance).all()
    for k in range(run.networks):
        acc.plot(run.epochs, run.acc[k], lw=1, label=f"network {k}")
        lr.plot(run.epochs, run.lr[k], lw=1, label=f"network {k}")
        for t, style in zip(run.invalid, ("-", "--", ":", "-.")):
            inv.plot(run.epochs, run.invalid[t][k], style, lw=1, color=f"C{k}", label=f"net {k}, L1 < {t}")
        if grafted:
            dist.plot(run.epochs, run.mean_peer_distance[k], "o-", ms=3, lw=1, label=f"network {k}")
    acc.plot(run.epochs, run.ensemble_acc, color="black", lw=2, label="ensemble")
    _style(acc, f"{run.split_name} accuracy", "%")
    _style(lr, "learning rate", "lr")
    _style(inv, f"invalid filters (of {run.filters})", "filters")
    _style(dist, "peer distance, mean over layers", "||W_peer - W|| / ||W||")
    _counts_axis(inv, list(run.invalid.values()))
    _distance_axis(dist, run.mean_peer_distance, run.grafted)


def _heatmaps(run: Run, fig) -> None:
    """Rows alpha / the criterion's score / peer distance, one column per network, layers x epochs."""
    from matplotlib.colors import LogNorm, Normalize

    deviation = run.A / 2 if run.A else max(float(np.nanmax(np.abs(run.alpha - 0.5))), 1e-3)
    distance = run.peer_distance
    positive = distance[distance > 0]
    # Log colours: a few grafts bring networks from ~1.4 (independent) to ~0.01 apart.
    far = (LogNorm(max(positive.min(), 1e-6), positive.max()) if positive.size and positive.max() > positive.min()
           else Normalize(0, max(float(np.nanmax(distance)) if np.isfinite(distance).any() else 0.0, 1e-6)))
    rows = [("alpha (own share)", run.alpha, "coolwarm", Normalize(0.5 - deviation, 0.5 + deviation))]
    if run.score is not None:
        names = {"entropy": "entropy of the weights", "l1": "L1 norm of the weights"}
        label = names.get(run.score_name, run.score_name)
        rows.append((label, run.score, "viridis", Normalize(np.nanmin(run.score), np.nanmax(run.score))))
    if np.isfinite(distance).any():  # metrics older than the peer distance have none
        rows.append(("peer distance ||W_peer - W|| / ||W||", distance, "magma", far))
    axes = fig.subplots(len(rows), run.networks, squeeze=False, sharex=True, sharey=True)
    names = [name.removesuffix(".weight") for name in run.layers]
    step = max(1, math.ceil(len(names) / 40))  # at most 40 layer names on the axis
    e0, e1 = run.epochs[0] - 0.5, run.epochs[-1] + 0.5
    for row, (label, values, cmap, norm) in zip(axes, rows):
        for k, ax in enumerate(row):
            image = ax.imshow(values[k], aspect="auto", interpolation="nearest", cmap=cmap, norm=norm,
                              extent=(e0, e1, len(names) - 0.5, -0.5))
            ax.set_title(f"network {k}: {label}", fontsize="medium")
            ax.set_yticks(range(0, len(names), step), names[::step], fontsize=6)
        fig.colorbar(image, ax=list(row), shrink=0.9)
    for ax in axes[-1]:
        ax.set_xlabel("epoch (grafted at its end; none after the last)")


def draw_run(run: Run, path: str | Path) -> Path:
    """One run: curves on top, per-layer heatmaps below; written as PNG."""
    heat = run.alpha is not None
    panels = 1 + (run.score is not None) + bool(heat and np.isfinite(run.peer_distance).any())
    rows_height = panels * max(2.5, 0.12 * len(run.layers)) if heat else 0
    fig = _figure(max(18.0, 5.0 * run.networks), 4.2 + rows_height)
    fig.suptitle(run.title)
    top, bottom = fig.subfigures(2, 1, height_ratios=[4.2, rows_height]) if heat else (fig, None)
    _line_panels(run, top.subplots(1, 4))
    if heat:
        _heatmaps(run, bottom)
    fig.savefig(path, dpi=110)
    return Path(path)


def _over_networks(values: np.ndarray, reduce) -> np.ndarray:
    """``reduce`` (np.nanmean, ...) over axis 0 per epoch; NaN, without a warning, where no
    network has a value (no graft after the last epoch)."""
    out = np.full(values.shape[1], math.nan)
    some = ~np.isnan(values).all(axis=0)
    out[some] = reduce(values[:, some], axis=0)
    return out


def accuracy_over_networks(run: Run) -> tuple[tuple[float, float], tuple[float, float]]:
    """(mean, std) over networks of each network's final accuracy (its last epoch) and of its
    best (at its own best epoch): the figures of summary.json, with its sample std."""
    finals, bests = [], []
    for acc in run.acc:
        acc = acc[~np.isnan(acc)]
        if acc.size:
            finals.append(float(acc[-1]))
            bests.append(float(acc.max()))
    return mean_std(finals), mean_std(bests)


def draw_comparison(runs: list[Run], path: str | Path) -> Path:
    """Several runs on common axes: mean accuracy over networks (band: min to max), ensemble,
    learning rate, invalid filters, peer distance, and a table of summary.json's accuracies."""
    fig = _figure(18, 9)
    fig.suptitle("graft-report: " + ", ".join(r.name for r in runs))
    (acc, ens, lr), (inv, dist, table) = fig.subplots(2, 3)
    rows, distances = [], []
    for i, run in enumerate(runs):
        color, label = f"C{i}", run.name
        acc.plot(run.epochs, _over_networks(run.acc, np.nanmean), color=color, label=f"{label} ({run.split_name})")
        acc.fill_between(run.epochs, _over_networks(run.acc, np.nanmin), _over_networks(run.acc, np.nanmax),
                         color=color, alpha=0.2)
        ens.plot(run.epochs, run.ensemble_acc, color=color, label=label)
        for k in range(run.networks):
            lr.plot(run.epochs, run.lr[k], color=color, lw=1, label=label if k == 0 else None)
        if run.invalid:
            t = next(iter(run.invalid))
            inv.plot(run.epochs, _over_networks(run.invalid[t], np.nanmean), color=color, label=f"{label} (L1 < {t})")
        if not np.isnan(run.mean_peer_distance).all():
            dist.plot(run.epochs, _over_networks(run.mean_peer_distance, np.nanmean), "o-", ms=3, color=color,
                      label=label)
            distances.append(run.mean_peer_distance)
        (final_mean, final_std), (best_mean, best_std) = accuracy_over_networks(run)
        rows.append([label[-40:], run.split_name, str(run.networks), f"{final_mean:.2f} ± {final_std:.2f}",
                     f"{best_mean:.2f} ± {best_std:.2f}", f"{run.ensemble_acc[-1]:.2f}"])
    splits = sorted({run.split_name for run in runs})
    _style(acc, f"{' / '.join(splits)} accuracy, mean of networks (band: min to max)", "%")
    _style(ens, f"ensemble {' / '.join(splits)} accuracy", "%")
    _style(lr, "learning rate", "lr")
    _style(inv, "invalid filters, mean of networks", "filters")
    _style(dist, "peer distance, mean of networks and layers", "||W_peer - W|| / ||W||")
    _counts_axis(inv, [_over_networks(v, np.nanmean) for run in runs for v in run.invalid.values()])
    _distance_axis(dist, np.concatenate([d.ravel() for d in distances]) if distances else np.array([math.nan]),
                   any(run.grafted for run in runs))
    table.axis("off")
    table.set_title("accuracy, %: mean ± sample std over networks (as summary.json)\n"
                    "best: each network at its own best epoch")
    table.table(cellText=rows, colLabels=["run", "split", "networks", "final, mean ± std", "best, mean ± std",
                                          "ensemble final"],
                loc="upper center", cellLoc="left").auto_set_font_size(True)
    fig.savefig(path, dpi=110)
    return Path(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="graft-report", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories (output_dir of graft-train)")
    parser.add_argument("--compare", default="graft-compare.png",
                        help="where the comparison of several runs goes (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        say_error("matplotlib is not installed: pip install 'graft[plot]'", "graft-report")
        return 1
    try:
        runs = [load_run(d) for d in args.runs]
        for run in runs:
            print(draw_run(run, Path(run.name) / "report.png"))
        if len(runs) > 1:
            print(draw_comparison(runs, args.compare))
    except (PlotError, OSError) as e:
        say_error(str(e), "graft-report")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
