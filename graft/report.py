"""A run's own files (config.yaml, metrics.jsonl, TensorBoard, summary.json), the per-epoch
table and the end-of-run summary: rank 0 only."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
import time
from pathlib import Path

from .cli import output_advice
from .config import Config, save_config
from .errors import OutputError, disk_problem
from .records import EpochRecord
from .stats import mean_std

logger = logging.getLogger(__name__)


class Progress:
    """A tqdm bar over one epoch's batches, with loss, accuracy and images/s.

    Shown on each node's local rank 0 when ``enabled`` (and stderr is a terminal). The postfix
    is refreshed every ``every`` steps, which costs one device sync each time.
    """

    def __init__(self, enabled: bool, desc: str, total: int, every: int = 20):
        self.enabled, self.desc, self.total, self.every = enabled, desc, total, every
        self.bar = None
        self.steps = 0
        self.start = time.perf_counter()

    def __call__(self, iterable):
        if not self.enabled:
            return iterable
        from tqdm import tqdm

        self.bar = tqdm(iterable, total=self.total, desc=self.desc, leave=False, dynamic_ncols=True)
        return self.bar

    def step(self, loss_sum, correct, seen: int) -> None:
        self.steps += 1
        if self.bar is None or self.steps % self.every:
            return
        rate = seen / (time.perf_counter() - self.start)
        self.bar.set_postfix(loss=f"{float(loss_sum) / seen:.3f}", acc=f"{100 * float(correct) / seen:.1f}%",
                             img_s=f"{rate:.0f}", refresh=False)


@contextlib.contextmanager
def writing(path: Path, what: str, setting: str = "output_dir", run_dir: Path | None = None, resume: str = "auto"):
    """A write of a run's or a study's own files: a full or read-only disk ends it in one line
    that names the file, says why and what to do (``setting`` names the folder's option; with
    ``run_dir``, a full disk's advice says whether a checkpoint is there to resume from)."""
    try:
        yield
    except OSError as e:
        advice = output_advice(e, setting, run_dir, resume)
        raise OutputError(f"{path}: cannot write {what} ({disk_problem(e)}); {advice}") from None


class TensorBoardLog:
    """Scalars per network per epoch, when tensorboard is installed (rank 0 only). Optional: a
    disk it cannot write turns it off with a warning (metrics.jsonl holds every value), at the
    start or whenever the disk fills later."""

    KEYS = ("lr", "train_loss", "train_acc", "mean_alpha", "mean_peer_distance", "images_per_sec", "epoch_seconds",
            "graft_seconds")

    def __init__(self, run_dir: str | Path, purge_from: int = 0):
        self.writer = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is optional
            return
        # Drop the points from purge_from on, which this run writes (again, after a resume or
        # when starting over), as metrics.jsonl does.
        folder = Path(run_dir) / "tensorboard"
        try:  # a probe first: on a full disk the writer's own thread dies with a traceback
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder) as probe:
                probe.write(b"\0" * 65536)
                probe.flush()
                os.fsync(probe.fileno())
            _quiet_writer_threads()
            self.writer = SummaryWriter(str(folder), purge_step=purge_from)
        except OSError as e:
            self.off(folder, e)

    def off(self, folder, error: OSError) -> None:
        logger.warning(f"{folder}: TensorBoard off ({disk_problem(error)}); metrics.jsonl holds every value")
        self.close()

    def close(self) -> None:
        """Stop the writer's thread and close its file (a writer that failed raises its error again)."""
        if self.writer is not None:
            writer, self.writer = self.writer, None
            with contextlib.suppress(OSError):
                writer.close()

    def write(self, records: list[EpochRecord]) -> None:
        if self.writer is None:
            return
        try:
            self._write(records)
        except OSError as e:
            self.off(self.writer.log_dir, e)

    def _write(self, records: list[EpochRecord]) -> None:
        for r in records:
            net, epoch = f"net{r.network}", r.epoch
            for key in self.KEYS:
                if getattr(r, key) is not None:
                    self.writer.add_scalar(f"{key}/{net}", getattr(r, key), epoch)
            for key, value in ((f"{r.split}_loss/{net}", r.loss), (f"{r.split}_acc/{net}", r.acc)):
                if value is not None:
                    self.writer.add_scalar(key, value, epoch)
            for thr, n in r.invalid_filters.items():
                self.writer.add_scalar(f"invalid_filters_{thr}/{net}", n, epoch)
            for layer in r.graft:
                self.writer.add_scalar(f"peer_distance/{net}/{layer['layer']}", layer["peer_distance"], epoch)
        if records[0].ensemble_acc is not None:  # None in a record that was never evaluated
            self.writer.add_scalar("ensemble_acc", records[0].ensemble_acc, records[0].epoch)
        self.writer.flush()


def _quiet_writer_threads() -> None:
    """A disk that fills during the run kills TensorBoard's writer thread, and Python prints the
    thread's traceback. The same error is raised again in the next ``add_scalar`` or ``flush``,
    where ``TensorBoardLog.write`` turns TensorBoard off with one warning: that thread's failed
    write is silenced, nothing else."""
    previous = threading.excepthook
    if getattr(previous, "graft_quiet", False):
        return

    def hook(args):
        if isinstance(args.exc_value, OSError) and type(args.thread).__module__.startswith("tensorboard."):
            return
        previous(args)

    hook.graft_quiet = True
    threading.excepthook = hook


class MetricsLog:
    """One JSON line per network per epoch (an EpochRecord); after a resume, records past the
    resume point are dropped so that each (network, epoch) appears exactly once."""

    def __init__(self, path: str | Path, resume: str = "auto"):
        self.path, self.resume = Path(path), resume

    def write(self, records: list[EpochRecord]) -> None:
        with writing(self.path, "the metrics", run_dir=self.path.parent, resume=self.resume):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                for r in records:
                    f.write(json.dumps(r.to_json()) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def read(self) -> list[EpochRecord]:
        if not self.path.exists():
            return []
        records = []
        for line in self.path.read_text().splitlines():
            try:
                values = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            if isinstance(values, dict) and "epoch" in values and "network" in values:
                records.append(EpochRecord.from_json(values))
        return records

    def latest(self) -> list[EpochRecord]:
        """The records with one per (network, epoch), the later where one was written twice (a run
        that stopped between its checkpoint and its metrics), in (epoch, network) order."""
        by_key = {r.key: r for r in self.read()}
        return [by_key[k] for k in sorted(by_key)]

    def set_aside(self) -> Path:
        """Rename the file out of the way (a run starting over); returns the new path."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        aside = self.path.with_name(f"metrics.before-{stamp}.jsonl")
        os.replace(self.path, aside)
        return aside

    def truncate(self, after_epoch: int) -> list[EpochRecord]:
        """Drop the records after ``after_epoch``; returns the records kept."""
        keep = [r for r in self.read() if r.epoch <= after_epoch]
        self._rewrite(keep)
        return keep

    def replace(self, records: list[EpochRecord]) -> None:
        """Put ``records`` in place of those with the same (epoch, network); add the others."""
        new = {r.key: r for r in records}
        old = self.read()
        have = {r.key for r in old}
        self._rewrite([new.get(r.key, r) for r in old] + [r for key, r in new.items() if key not in have])

    def _rewrite(self, records: list[EpochRecord]) -> None:
        tmp = self.path.with_suffix(".jsonl.tmp")
        with writing(self.path, "the metrics", run_dir=self.path.parent, resume=self.resume):
            try:
                tmp.write_text("".join(json.dumps(r.to_json()) + "\n" for r in records))
                os.replace(tmp, self.path)
            finally:
                tmp.unlink(missing_ok=True)


class RunLog:
    """Rank 0's record of a run: config.yaml, metrics.jsonl, TensorBoard scalars, the epoch
    table on the console, and summary.json at the end.

    Created once the run knows where it starts (``first_epoch``): after a resume the metrics
    keep the epochs before it, completed by the records the resumed checkpoints carry
    (``resumed``: the run may have stopped between a checkpoint and its metrics); a run that
    starts over sets the earlier metrics aside. config.yaml is written only now, so that a
    refused resume leaves the run's config as it was.
    """

    def __init__(self, cfg: Config, first_epoch: int, resumed: list[EpochRecord]):
        self.dir = Path(cfg.output_dir)
        self.grafting = {"enabled": cfg.grafting.enabled, **cfg.grafting.spec().settings()}
        self.epochs, self.thresholds = cfg.epochs, tuple(cfg.invalid_thresholds)
        self.resume = cfg.resume
        with writing(self.dir / "config.yaml", "the run's config", run_dir=self.dir, resume=self.resume):
            save_config(cfg, self.dir / "config.yaml")
        self.metrics = MetricsLog(self.dir / "metrics.jsonl", cfg.resume)
        if first_epoch == 0 and self.metrics.read():
            logger.info(f"starting over: the metrics of the earlier run are kept in {self.metrics.set_aside()}")
        elif first_epoch > 0:
            # The resumed checkpoints' records are the truth for their epoch: the run may have
            # stopped before logging them, or the resume grafted late (a run extended past its end).
            self.metrics.truncate(after_epoch=first_epoch - 1)
            self.metrics.replace([r for r in resumed if r])
        # The resumed epoch's points are written again as well: a graft it owed changed its records.
        rewrite = first_epoch > 0 and bool(resumed) and all(resumed)
        self.tensorboard = TensorBoardLog(self.dir, purge_from=first_epoch - 1 if rewrite else first_epoch)
        if rewrite:
            self.tensorboard.write(resumed)

    def epoch(self, records: list[EpochRecord]) -> None:
        """One epoch's records, one per network."""
        self.metrics.write(records)
        self.tensorboard.write(records)
        logger.info(epoch_table(records, self.epochs, self.thresholds))

    def finish(self, test: dict | None) -> dict | None:
        """summary.json from every epoch's records (None when there are none)."""
        self.tensorboard.close()
        records = self.metrics.latest()
        if not records:
            return None
        summary = {**summarize(records, test), "grafting": self.grafting}  # the GraftSpec the run grafted with
        with writing(self.dir / "summary.json", "the summary", run_dir=self.dir, resume=self.resume):
            (self.dir / "summary.json").write_text(json.dumps(summary, indent=2))
        logger.info(summary["table"])
        return summary


def epoch_table(records: list[EpochRecord], epochs: int, thresholds) -> str:
    """The table rank 0 prints after every epoch: one row per network."""
    records = sorted(records, key=lambda r: r.network)
    epoch, split = records[0].epoch, records[0].split
    thr = [str(float(t)) for t in thresholds]
    ensemble = records[0].ensemble_acc
    head = (f"epoch {epoch + 1}/{epochs}  ensemble acc {float('nan') if ensemble is None else ensemble:.2f}%\n"
            f"{'net':>3} {'lr':>8} {'loss':>7} {'train%':>7} {split + '%':>7} {'alpha':>6} {'dist':>6} "
            + " ".join(f"{'inv<' + t:>9}" for t in thr) + f" {'img/s':>7} {'epoch s':>8} {'graft s':>8}")
    rows = [head]
    def cell(value) -> str:
        return f"{'-' if value is None else format(value, '.3f'):>6}"

    for r in records:
        inv = " ".join(f"{r.invalid_filters[t]:>4}/{r.filters:<4}" for t in thr)
        rows.append(f"{r.network:>3} {r.lr:>8.4f} {r.train_loss:>7.3f} {r.train_acc:>7.2f} "
                    f"{r.acc:>7.2f} {cell(r.mean_alpha)} {cell(r.mean_peer_distance)} {inv} "
                    f"{r.images_per_sec:>7.0f} {r.epoch_seconds:>8.2f} {r.graft_seconds:>8.3f}")
    return "\n".join(rows)


def summarize(records: list[EpochRecord], test: dict | None = None) -> dict:
    """Final and best accuracy on the evaluated split, per network and of the ensemble; mean and
    spread. ``test`` (runs that select on validation) is the end-of-run test evaluation of the
    final and the best-validation weights (``train.final_test``); it is kept as ``summary["test"]``."""
    by_net: dict[int, dict[int, EpochRecord]] = {}
    for r in records:  # a (network, epoch) written twice counts once: the later record
        by_net.setdefault(r.network, {})[r.epoch] = r
    split = records[0].split
    nets, ens = {}, []
    for k, per_epoch in sorted(by_net.items()):
        rs = [per_epoch[e] for e in sorted(per_epoch)]
        best = max(rs, key=lambda r: r.acc)
        nets[k] = {"final_acc": rs[-1].acc, "best_acc": best.acc, "best_epoch": best.epoch, "epochs": len(rs)}
        ens = ens or [r.ensemble_acc for r in rs]
    final_mean, final_std = mean_std([n["final_acc"] for n in nets.values()])
    best_mean, best_std = mean_std([n["best_acc"] for n in nets.values()])
    summary = {
        "split": split,
        "networks": {str(k): v for k, v in nets.items()},
        "final_acc_mean": final_mean, "final_acc_std": final_std,
        "best_acc_mean": best_mean, "best_acc_std": best_std,
        "ensemble_final_acc": ens[-1], "ensemble_best_acc": max(ens),
    }
    lines = [f"summary ({'validation' if split == 'val' else 'test'} accuracy, %)",
             f"{'network':>8} {'final':>7} {'best':>7} {'best epoch':>10}"]
    lines += [f"{k:>8} {v['final_acc']:>7.2f} {v['best_acc']:>7.2f} {v['best_epoch'] + 1:>10}" for k, v in nets.items()]
    lines.append(f"{'mean':>8} {summary['final_acc_mean']:>7.2f} {summary['best_acc_mean']:>7.2f}"
                 f"   (std {summary['final_acc_std']:.2f} / {summary['best_acc_std']:.2f})")
    lines.append(f"{'ensemble':>8} {summary['ensemble_final_acc']:>7.2f} {summary['ensemble_best_acc']:>7.2f}")
    if test is not None:
        summary["test"] = test
        lines += ["test accuracy, % (once, at the end)", f"{'network':>8} {'final':>7} {'best val':>9}"]
        lines += [f"{k:>8} {v['final_test_acc']:>7.2f} {v['best_val_test_acc']:>9.2f}"
                  for k, v in sorted(test["networks"].items(), key=lambda kv: int(kv[0]))]
        lines.append(f"{'ensemble':>8} {test['ensemble_final_test_acc']:>7.2f} "
                     f"{test['ensemble_best_val_test_acc']:>9.2f}")
    summary["table"] = "\n".join(lines)
    return summary
