"""The resume point and the one checkpoint format: written atomically, read as weights only,
keyed by network index (never by rank).

Layout under the run directory::

    checkpoints/net{k}/epoch{e:04d}.pt   the resume point after epoch e (e counted from 1, as
                                         the log prints it; grafted weights, optimizer,
                                         scheduler, scaler, grafter, RNG states, the epoch's
                                         record); the last ``keep`` epochs are kept so that the
                                         networks can agree on an epoch they all completed
    checkpoints/net{k}/best.pt           the best evaluated (pre-graft) weights of network k
    checkpoints/net{k}/best.prev.pt      the best before it (put back if a resume retrains
                                         the epoch best.pt came from)

Every file is a dict of tensors and plain values (``FORMAT``), so ``torch.load`` reads it with
``weights_only=True``: loading a checkpoint never runs code. Files of the format before it
(``graft-checkpoint/1``, whose numpy RNG state was a pickled array) still load: exactly the numpy
types that state needs are allowed for them.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import re
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .config import setup_differences
from .errors import CheckpointError, DamagedCheckpoint, UserError, disk_problem
from .records import EpochRecord

FORMAT = "graft-checkpoint/2"
FORMATS = ("graft-checkpoint/1", FORMAT)  # what ``load`` reads
_EPOCH_FILE = re.compile(r"epoch(\d+)\.pt$")


def network_dir(run_dir: str | Path, network: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"net{network}"


def epoch_path(run_dir: str | Path, network: int, epoch: int) -> Path:
    """The file of the resume point after ``epoch`` (counted from 0 in code): epoch0001.pt after
    the first epoch, as the log and every message count them (files of runs started before
    this numbering count from 0; their directory has no NUMBERING file and keeps theirs)."""
    d = network_dir(run_dir, network)
    return d / f"epoch{epoch + _first_number(d):04d}.pt"


def _first_number(directory: Path) -> int:
    """The number a directory's first epoch file has: 1, or 0 in a run started before file
    names counted from 1."""
    if (directory / NUMBERING).exists():
        return 1
    return 0 if any(directory.glob("epoch*.pt")) else 1


NUMBERING = "NUMBERING"  # its presence: this directory's file names count epochs from 1


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def atomic_save(obj, path: str | Path, what: str = "checkpoint") -> None:
    """Serialize in memory, write to a temporary file in the same directory, fsync, then rename
    over ``path``. A crash or a full disk leaves the previous file untouched (the temporary file
    is removed) and raises CheckpointError naming the path. (Serializing first keeps torch.save's
    zip writer away from the disk, where it turns a full disk into an opaque RuntimeError.)"""
    path = Path(path)
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it 0600; a checkpoint is shared like any file
        with os.fdopen(fd, "wb") as f:
            f.write(buffer.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        before = "the previous one is intact" if path.exists() else "nothing was written"
        raise CheckpointError(f"{path}: cannot write the {what} ({disk_problem(e)}); {before}", os_error=e) from None
    except BaseException:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_epoch(run_dir: str | Path, network: int, setup: dict, state: dict, keep: int = 2) -> Path:
    """Save network ``network``'s resume point (``ResumePoint.state_dict()``, after its epoch
    ``state["epoch"]``); of the epochs before it keep the newest ``keep - 1`` (files of later
    epochs, left by a run that resumed earlier, are replaced as training reaches them).
    Temporary files of a save that was killed are removed."""
    epoch = state["epoch"]
    d = network_dir(run_dir, network)
    if _first_number(d) == 1 and not (d / NUMBERING).exists():
        try:
            d.mkdir(parents=True, exist_ok=True)
            (d / NUMBERING).write_text("epoch files count epochs from 1, as the log does\n")
        except OSError as e:
            raise CheckpointError(f"{d / NUMBERING}: cannot write ({disk_problem(e)}); no checkpoint was written "
                                  "this epoch", os_error=e) from None
    path = epoch_path(run_dir, network, epoch)
    atomic_save({"format": FORMAT, "network": network, "setup": setup, **state}, path)
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
    atomic_save({"format": FORMAT, "network": network, "epoch": epoch, "acc": acc, "split": split,
                 "setup": setup, "model": model}, new, "best weights")
    if path.exists():
        os.replace(path, path.with_name("best.prev.pt"))
    os.replace(new, path)
    return path


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _numpy_rng_types() -> list:
    """What a graft-checkpoint/1 file's numpy RNG state unpickles to, and nothing else."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


# What torch.load raises on damaged bytes in memory (found by cutting and flipping bytes of saved
# files). Anything else (a signal's Stop, MemoryError) says nothing about the file.
DAMAGED = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, LookupError, TypeError, AttributeError,
           AssertionError, struct.error)


def load(path: str | Path, map_location="cpu") -> dict:
    """Load a checkpoint as weights only, or raise DamagedCheckpoint naming the file (truncated,
    corrupt, foreign, or holding anything whose loading would run code), CheckpointError naming
    it when it cannot be read (missing, no permission, an I/O error: nothing about its bytes).
    A stop, MemoryError and the like go through unchanged.

    The bytes are read first and parsed from memory: an OSError is then the file system's, never
    a seek that damaged bytes sent astray."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({e.strerror or e})") from None
    try:
        with torch.serialization.safe_globals(_numpy_rng_types()):
            obj = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except UserError:  # a signal's Stop, raised while parsing
        raise
    except pickle.UnpicklingError as e:
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(e))
        if found is None:  # not a call of code: bytes that are no pickle torch wrote ("Unsupported operand 103")
            why = re.search(r"WeightsUnpickler error: \s*(\S[^\n]*)", str(e))
            raise DamagedCheckpoint(f"{path}: unreadable checkpoint (not a file torch.save wrote: "
                                    f"{why.group(1) if why else type(e).__name__})") from None
        raise DamagedCheckpoint(f"{path}: refused: loading it would run code ({found.group(1)}); graft reads "
                                "checkpoints as weights only") from None
    except DAMAGED as e:
        # Its first sentence: torch's zip reader appends a paragraph on how files get corrupted.
        why = (str(e).strip().splitlines() or [""])[0].split(". ")[0]
        raise DamagedCheckpoint(f"{path}: unreadable checkpoint ({type(e).__name__}: {why})") from None
    if not isinstance(obj, dict) or obj.get("format") not in FORMATS:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise DamagedCheckpoint(f"{path}: not a graft checkpoint (format {found!r})")
    if not isinstance(obj.get("model"), dict):
        raise DamagedCheckpoint(f"{path}: a graft checkpoint without model weights")
    return obj


# What ``ResumePoint.load_state_dict`` cannot do without (the rest has defaults).
RESUME_KEYS = ("epoch", "model", "optimizer", "scheduler", "rng")


def load_epoch(path: Path, network: int, epoch: int) -> dict:
    """Network ``network``'s resume point after ``epoch``, as ``load`` reads it. A file that is
    intact but misplaced (best.pt or a teacher under an epoch file's name, another network's
    file, another epoch's) is refused with CheckpointError, not skipped as damaged: skipping
    it would remove the files after it."""
    saved = load(path)
    if saved.get("network", network) != network:  # recorded since the first format
        raise CheckpointError(f"{path}: holds network {saved['network']}'s resume point, but lies in network "
                              f"{network}'s folder: files copied between checkpoints/net* folders? Put it back to "
                              "resume; nothing was changed")
    if saved.get("epoch", epoch) != epoch:  # the name's number says another epoch than the file
        raise CheckpointError(
            f"{path}: holds epoch {saved['epoch'] + 1}, but its name says epoch {epoch + 1}: files copied "
            f"without their directory's {NUMBERING} file? (its presence: names count epochs from 1) "
            "Restore it, or rename the files, to resume")
    missing = [k for k in RESUME_KEYS if k not in saved]
    if missing:
        raise CheckpointError(f"{path}: not a resume point (no {', '.join(missing)}): best.pt or a teacher's weights "
                              "under an epoch file's name? Move it away to resume; nothing was changed")
    return saved


def epoch_files(run_dir: str | Path, network: int) -> list[tuple[int, Path]]:
    """(epoch counted from 0, path) of each resume point of ``network``, oldest first."""
    d = network_dir(run_dir, network)
    if not d.is_dir():
        return []
    first = _first_number(d)
    found = [(int(m.group(1)) - first, p) for p in d.iterdir() if (m := _EPOCH_FILE.search(p.name))]
    return sorted(found)


def newest_complete(run_dir: str | Path, network: int) -> tuple[int, dict | None, list[str]]:
    """The newest epoch whose checkpoint for ``network`` loads, that checkpoint (on the CPU), and
    the files skipped as damaged and why. (-1, None, []) when there are none; CheckpointError when
    there are some but none loads (starting over would overwrite best.pt and the metrics of that
    run), and when one cannot be read or is misplaced (``load_epoch``)."""
    skipped = []
    files = epoch_files(run_dir, network)
    for epoch, path in reversed(files):
        try:
            return epoch, load_epoch(path, network, epoch), skipped
        except DamagedCheckpoint as e:
            skipped.append(str(e))
    if files:
        raise CheckpointError(
            f"{network_dir(run_dir, network)}: none of the {len(files)} epoch checkpoint(s) loads "
            f"({'; '.join(skipped)}); nothing was changed. Move them away to start this run over, or "
            "use resume=never to start afresh in a new directory")
    return -1, None, skipped


def _saved_epoch(path: Path) -> int:
    """The epoch a best.pt holds; a damaged one is named, never taken for another epoch's."""
    try:
        return load(path)["epoch"]
    except DamagedCheckpoint as e:
        raise CheckpointError(f"{e}. It holds a network's best-validation weights, which no other file "
                              f"replaces: restore it, or move it away to go on without it (then {path.name} "
                              "starts again from the epochs trained from now on)") from None


def set_aside_best_after(run_dir: str | Path, network: int, epoch: int) -> Path | None:
    """A resume trains the epochs after ``epoch`` again: a best.pt saved by one of them (before a
    crash stopped the others) is renamed out of the way, not deleted, and the best before it
    (best.prev.pt) takes its place. Returns the set-aside path, or None. A damaged best.pt stops
    the resume (CheckpointError naming it)."""
    path, prev = network_dir(run_dir, network) / "best.pt", network_dir(run_dir, network) / "best.prev.pt"
    if not path.exists() and prev.exists():  # stopped between save_best's two steps
        os.replace(prev, path)
    if not path.exists():
        return None
    saved = _saved_epoch(path)
    if saved <= epoch:
        return None
    stale = path.with_name(f"best.epoch{saved + _first_number(path.parent):04d}.stale.pt")
    os.replace(path, stale)
    if prev.exists() and _saved_epoch(prev) <= epoch:
        os.replace(prev, path)
    return stale


def remove_epochs_after(run_dir: str | Path, network: int, epoch: int) -> list[Path]:
    """Resume points later than the epoch every network agreed on belong to a trajectory that
    is trained again: they are removed, so that a later crash cannot mix them into this one."""
    later = [p for e, p in epoch_files(run_dir, network) if e > epoch]
    for p in later:
        p.unlink()
    return later


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


# --------------------------------------------------------------------------------------------
# The resume point
# --------------------------------------------------------------------------------------------


def capture_rng(device: torch.device) -> dict:
    """Every RNG the loop may draw from (the data order is a pure function of seed and epoch),
    as tensors and plain values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss],
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else keys
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if state.get("cuda") is not None:  # this process's GPU, whichever index it has now
        torch.cuda.set_rng_state(state["cuda"])


@dataclass
class ResumePoint:
    """What a network's resume point restores: the weights, optimizer, schedule, scaler, the
    grafter's count and RNGs, the last completed epoch (-1: none), the best evaluated accuracy
    so far and its epoch, and that epoch's record. ``state_dict`` / ``load_state_dict`` are each
    other's inverse; ``save_epoch`` adds the format, the network and the setup."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    grafter: object                   # a graft.Grafter (its state: grafts done, a graft owed)
    device: torch.device
    epoch: int = -1
    best_acc: float = -1.0
    best_epoch: int = -1
    record: EpochRecord | None = None

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "best_acc": self.best_acc, "best_epoch": self.best_epoch,
                "record": None if self.record is None else self.record.to_json(),
                "grafter": self.grafter.state_dict(), "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler else None, "rng": capture_rng(self.device)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        self.best_acc, self.best_epoch = state.get("best_acc", -1.0), state.get("best_epoch", -1)
        self.record = None if state.get("record") is None else EpochRecord.from_json(state["record"])
        grafter_state = state.get("grafter") or {"epoch": self.epoch, "grafted": state.get("grafted", False)}
        self.grafter.load_state_dict({"spec": self.grafter.spec.settings(), **grafter_state}
                                     if "spec" not in grafter_state else grafter_state)
        self.model.load_state_dict(state["model"])  # onto the model's device
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if isinstance(self.scheduler, torch.optim.lr_scheduler.LambdaLR):  # the curve as configured now:
            for group, base, f in zip(self.optimizer.param_groups, self.scheduler.base_lrs,  # epochs may have grown
                                      self.scheduler.lr_lambdas):
                group["lr"] = base * f(self.scheduler.last_epoch)
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        restore_rng(state["rng"])  # CPU tensors, as torch.set_rng_state wants

    @property
    def grafted(self) -> bool:
        """Whether the last completed epoch ended with a graft."""
        return self.grafter.grafted
