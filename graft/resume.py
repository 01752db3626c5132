"""Where a run starts: afresh in a new directory (``resume: never``) or from the newest epoch
every network completed (``resume: auto``).

Both are collective over every rank: the networks decide together, so that no network goes on
from an epoch another one does not have.
"""

from __future__ import annotations

import dataclasses
import logging
import shlex
from pathlib import Path

from . import checkpoint
from .config import Config, ConfigError
from .dist import Topology, all_gather_objects, together
from .records import EpochRecord

logger = logging.getLogger(__name__)


def fresh_output_dir(cfg: Config, topo: Topology) -> Config:
    """``resume: never`` with checkpoints in output_dir: start afresh in output_dir-1, -2, ...
    (rank 0 decides, everyone follows); nothing already saved is touched. Collective: every rank."""
    if cfg.resume != "never":
        return cfg
    base, path, n = cfg.output_dir, cfg.output_dir, 0
    while (Path(path) / "checkpoints").exists():
        n += 1
        path = f"{base}-{n}"
    path = all_gather_objects(topo, path, leaders_only=False)[0]
    # Named either way: after a stop, the same command would start afresh once more.
    why = f"{base} holds checkpoints; " if path != base else ""
    logger.info(f"resume=never: {why}this run writes to {path} (to resume it after a stop: "
                f"output_dir={shlex.quote(path)} resume=auto; the same command would start afresh again)")
    return dataclasses.replace(cfg, output_dir=path)


def resume(cfg: Config, topo: Topology, point: checkpoint.ResumePoint, *, grafting: bool,
           per_step: bool) -> list[EpochRecord]:
    """Load into ``point`` the newest epoch every network completed, and do the graft it owes
    (a run extended past its old last epoch, which ended without one). ``grafting`` and
    ``per_step`` are what ``train.setup`` decided (``Training``): whether this run grafts, and
    whether every k steps.

    Returns that epoch's metrics records, one per network, on the leaders ([] elsewhere, and when
    there is nothing to resume): the run may have stopped between its checkpoints and its
    metrics. Damaged epoch files are skipped with a warning naming them (one that cannot be read,
    or is misplaced, stops the resume, and so does a stop while reading: nothing is changed);
    epochs after the agreed one are removed, and a best.pt saved by one of them is set aside.
    Collective: every rank.
    """
    run_dir = Path(cfg.output_dir)
    with together(topo, "resume"):  # damaged or foreign files of one network   # collective: every rank
        newest, saved = _newest_usable(cfg, topo)
    agreed = _agree_on_epoch(cfg, topo, newest)                                   # collective: every rank
    if agreed < 0:
        return []
    path = checkpoint.epoch_path(run_dir, topo.network, agreed)
    with together(topo, "resume"):                                           # collective: every rank
        if not path.exists():
            raise checkpoint.CheckpointError(f"{path}: missing, but epoch {agreed + 1} is the newest that every "
                                             "network completed; cannot resume consistently")
        point.load_state_dict(saved if agreed == newest else checkpoint.load_epoch(path, topo.network, agreed))
    if len(set(all_gather_objects(topo, point.grafted, leaders_only=False))) > 1:  # collective: every rank
        raise _everywhere(checkpoint.CheckpointError(
            f"{run_dir}: the networks' checkpoints of epoch {agreed + 1} disagree on whether it was grafted (files "
            "of two different runs?); cannot resume consistently"))
    if point.grafted and agreed == cfg.epochs - 1 and not per_step:
        # A run planned for more epochs grafted after this one: ending here would report weights
        # that no epoch evaluated as the final ones.
        raise ConfigError(f"epochs: {cfg.epochs} would end the run in {run_dir} on epoch {agreed + 1}'s grafted "
                          f"weights (it was set up for more epochs, so that epoch ended with a graft); "
                          f"epochs={agreed + 2} or more continues it")
    records = []
    if topo.is_leader:
        with together(topo, "resume", leaders_only=True):                         # collective: leaders
            _forget_after(run_dir, topo.network, agreed)
    late = point.grafter.resume(point.model) if grafting else None                  # collective: every rank
    if late is not None and point.record is not None:
        point.record.add_graft(late)
    if topo.is_leader:
        records = all_gather_objects(topo, point.record)                          # collective: leaders
    logger.info(f"resuming after epoch {agreed + 1}/{cfg.epochs} (the newest epoch every network completed)")
    return records


def _newest_usable(cfg: Config, topo: Topology) -> tuple[int, dict | None]:
    """This network's newest loadable epoch checkpoint (-1, None without one), after checking
    that it was set up as this run is: a foreign setup is named before the networks agree."""
    run_dir = Path(cfg.output_dir)
    newest, saved, skipped = checkpoint.newest_complete(run_dir, topo.network)
    for reason in skipped:
        logger.warning(f"skipping damaged checkpoint: {reason}")
    if saved is not None:
        path = checkpoint.epoch_path(run_dir, topo.network, newest)
        checkpoint.check_setup(path, saved.get("setup"), cfg.setup(topo.networks))
    return newest, saved


def _agree_on_epoch(cfg: Config, topo: Topology, newest: int) -> int:
    """The newest epoch every network has (-1: none has any). Collective: every rank."""
    everyone = all_gather_objects(topo, newest, leaders_only=False)
    agreed = min(everyone)
    if agreed < 0 and max(everyone) >= 0:
        lacking = sorted({r // topo.replicas for r, e in enumerate(everyone) if e < 0})
        raise _everywhere(checkpoint.CheckpointError(
            f"{cfg.output_dir}: networks {lacking} have no usable checkpoint while others do; cannot resume "
            "consistently (resume=never starts afresh in a new directory)"))
    if agreed + 1 > cfg.epochs:
        raise ConfigError(f"epochs: {cfg.epochs}, but the run in {cfg.output_dir} already completed {agreed + 1} "
                          f"epochs: nothing to train. epochs={agreed + 2} or more extends it; {checkpoint.ELSEWHERE}")
    return agreed


def _everywhere(error):
    """An error every rank raises alike, from what they all gathered: rank 0 alone says it."""
    error.everywhere = True
    return error


def _forget_after(run_dir: Path, network: int, epoch: int) -> None:
    """The epochs after ``epoch`` are trained again: their files must not mix into this run."""
    for later in checkpoint.remove_epochs_after(run_dir, network, epoch):
        logger.warning(f"removed {later}: it comes after epoch {epoch + 1}, the newest every network completed, "
                       "and is trained again")
    stale = checkpoint.set_aside_best_after(run_dir, network, epoch)
    if stale:
        logger.warning(f"best.pt came from an epoch after {epoch + 1}, which is trained again; set aside as "
                       f"{stale.name}")
