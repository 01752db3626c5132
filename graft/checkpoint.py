"""One checkpoint format, written atomically, keyed by network index (never by rank).

Layout under the run directory::

    checkpoints/net{k}/epoch{e:04d}.pt   the resume point after epoch e (grafted weights,
                                         optimizer, scheduler, scaler, RNG states, the epoch's
                                         metrics record); the last ``keep`` epochs are kept so
                                         that networks can agree on an epoch they all completed
    checkpoints/net{k}/best.pt           the best evaluated (pre-graft) weights of network k
    checkpoints/net{k}/best.prev.pt      the best before it (put back if a resume retrains
                                         the epoch best.pt came from)
"""

from __future__ import annotations

import errno
import os
import random
import re
import tempfile
from pathlib import Path

import numpy as np
import torch

from .config import setup_differences
from .errors import UserError

FORMAT = "graft-checkpoint/1"
_EPOCH_FILE = re.compile(r"epoch(\d+)\.pt$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used: the message names the file and why."""


def network_dir(run_dir: str | Path, network: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"net{network}"


def epoch_path(run_dir: str | Path, network: int, epoch: int) -> Path:
    return network_dir(run_dir, network) / f"epoch{epoch:04d}.pt"


def atomic_save(obj, path: str | Path) -> None:
    """Write to a temporary file in the same directory, fsync, then rename over ``path``.

    A crash or a full disk leaves the previous file untouched (the temporary file is removed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it 0600; a checkpoint is shared like any file
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            why = "disk full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
            raise CheckpointError(f"{path}: cannot write checkpoint ({why}); the previous one is intact") from None
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_epoch(run_dir: str | Path, network: int, epoch: int, payload: dict, keep: int = 2) -> Path:
    """Save network ``network``'s resume point after ``epoch``; of the epochs before it keep the
    newest ``keep - 1`` (files of later epochs, left by a run that resumed earlier, are replaced
    as training reaches them). Temporary files of a save that was killed are removed."""
    path = epoch_path(run_dir, network, epoch)
    atomic_save({"format": FORMAT, "network": network, "epoch": epoch, **payload}, path)
    older = [p for e, p in epoch_files(run_dir, network) if e < epoch]
    for old in older[:len(older) - (keep - 1)]:
        old.unlink(missing_ok=True)
    for partial in path.parent.glob(".*.pt.*.tmp"):  # this process is the directory's only writer
        partial.unlink(missing_ok=True)
    return path


def save_best(run_dir: str | Path, network: int, epoch: int, acc: float, split: str, setup: dict,
              model: dict) -> Path:
    """The best evaluated weights (``acc`` on ``split``: test, or val when the run selects on a
    validation split); ``setup`` names the model, so the file can serve as a teacher.

    The best before it is kept as best.prev.pt: a resume that trains this epoch again (another
    network died in it) puts that one back (``set_aside_best_after``).
    """
    path = network_dir(run_dir, network) / "best.pt"
    new = path.with_name("best.new.pt")  # written in full first: a full disk changes nothing
    atomic_save({"format": FORMAT, "network": network, "epoch": epoch, "acc": acc, "split": split, "setup": setup,
                 "model": model}, new)
    if path.exists():
        os.replace(path, path.with_name("best.prev.pt"))
    os.replace(new, path)
    return path


def _saved_epoch(path: Path) -> int | None:
    try:
        return load(path)["epoch"]
    except CheckpointError:
        return None


def set_aside_best_after(run_dir: str | Path, network: int, epoch: int) -> Path | None:
    """A resume trains the epochs after ``epoch`` again: a best.pt saved by one of them (before a
    crash stopped the others) is renamed out of the way, not deleted, and the best before it
    (best.prev.pt) takes its place. Returns the set-aside path, or None."""
    path, prev = network_dir(run_dir, network) / "best.pt", network_dir(run_dir, network) / "best.prev.pt"
    if not path.exists() and prev.exists():  # stopped between save_best's two steps
        os.replace(prev, path)
    if not path.exists():
        return None
    saved = _saved_epoch(path)
    if saved is not None and saved <= epoch:
        return None
    stale = path.with_name(f"best.epoch{saved if saved is not None else epoch + 1:04d}.stale.pt")
    os.replace(path, stale)
    prev_epoch = _saved_epoch(prev) if prev.exists() else None
    if prev_epoch is not None and prev_epoch <= epoch:
        os.replace(prev, path)
    return stale


def remove_epochs_after(run_dir: str | Path, network: int, epoch: int) -> list[Path]:
    """Resume points later than the epoch every network agreed on belong to a trajectory that
    is trained again: they are removed, so that a later crash cannot mix them into this one."""
    later = [p for e, p in epoch_files(run_dir, network) if e > epoch]
    for p in later:
        p.unlink()
    return later


def epoch_files(run_dir: str | Path, network: int) -> list[tuple[int, Path]]:
    d = network_dir(run_dir, network)
    if not d.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _EPOCH_FILE.search(p.name))]
    return sorted(found)


def load(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint, or raise CheckpointError naming the file (truncated, corrupt, foreign)."""
    try:
        obj = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises many types for a damaged file
        why = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {why})") from None
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: not a graft checkpoint (format {found!r})")
    return obj


def newest_complete(run_dir: str | Path, network: int) -> tuple[int, dict | None, list[str]]:
    """The newest epoch whose checkpoint for ``network`` loads, that checkpoint (on the CPU), and
    the files skipped and why. (-1, None, []) when there are none; CheckpointError when there are
    some but none loads (starting over would overwrite best.pt and the metrics of that run)."""
    skipped = []
    files = epoch_files(run_dir, network)
    for epoch, path in reversed(files):
        try:
            return epoch, load(path), skipped
        except CheckpointError as e:
            skipped.append(str(e))
    if files:
        raise CheckpointError(
            f"{network_dir(run_dir, network)}: none of the {len(files)} epoch checkpoint(s) loads "
            f"({'; '.join(skipped)}); nothing was changed. Move them away to start this run over, or "
            "use resume=never to start afresh in a new directory")
    return -1, None, skipped


def capture_rng(device: torch.device) -> dict:
    """Every RNG the loop may draw from (the data order is a pure function of seed and epoch)."""
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state.get("cuda") is not None:  # this process's GPU, whichever index it has now
        torch.cuda.set_rng_state(state["cuda"])


# What a refused resume suggests: the run asked for is another run, and belongs in its own directory.
ELSEWHERE = ("to start this run alongside it, give it its own output_dir=... (or resume=never, which picks "
             "output_dir-1, -2, ...)")


def check_setup(path: Path, saved: dict | None, current: dict) -> None:
    """Raise CheckpointError listing every setting that differs from the checkpoint's.

    Only settings the checkpoint records are compared (one written before a setting existed
    can still be resumed), and a recorded ``num_classes`` of 0 ("from the data") matches any.
    """
    diffs = [f"{k}: {was!r} in the checkpoint, {now!r} now" for k, was, now in setup_differences(saved or {}, current)]
    if diffs:
        raise CheckpointError(f"{path}: cannot resume, the run was set up differently ({'; '.join(diffs)}); "
                              f"{ELSEWHERE}, or restore those settings to continue it")
