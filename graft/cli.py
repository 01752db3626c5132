"""What graft's commands share at their edges: the one error line, the advice after a stop,
and signals. graft-train, graft-run (and its script workers), graft-eval and graft-study word
these here and nowhere else.

The advice is true to the case: "rerun the same command to resume" only where a rerun can help
(a stop by signal, a peer that went away) and names the checkpoint only where one exists; a
rank stopped because another failed says so and repeats that rank's reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import sys
import time
from pathlib import Path

from .errors import REPORTED_BY_LAUNCHER, CheckpointError, Stop, UserError, disk_is_full

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def has_checkpoint(output_dir: str | Path, network: int | None = None) -> bool:
    """Whether a run directory holds a resume point of some network (of ``network``, if given)."""
    return any(Path(output_dir).glob(f"checkpoints/net{'*' if network is None else network}/epoch*.pt"))


def resume_hint(output_dir: str, resume: str = "auto") -> str:
    """How to continue a stopped run. Under resume=never the same command would start afresh
    beside it, so the hint names the directory."""
    if resume == "never":
        return f"to resume it, rerun with output_dir={shlex.quote(str(output_dir))} resume=auto"
    return "rerun the same command to resume"


def after_stop(output_dir: str | None, resume: str = "auto") -> str:
    """What is left after a stop, and how to go on."""
    if output_dir is None:  # graft-run, before the workers chose the directory (resume=never)
        return ("the last complete checkpoint is intact; to resume, rerun with output_dir=(the directory the run "
                "named) resume=auto")
    if not has_checkpoint(output_dir):
        return "it stopped before its first checkpoint: nothing to resume"
    return f"the last complete checkpoint is intact; {resume_hint(output_dir, resume)}"


def output_advice(error: OSError, setting: str, run_dir: str | Path | None = None, resume: str = "auto",
                  network: int | None = None) -> str:
    """What to do about an output that cannot be written: every write of a run's or a study's own
    files ends with this. Space mends a full disk, and a rerun then resumes where a checkpoint
    exists (of ``network``, for that network's own save); a read-only folder, or a file in the
    way, needs another folder, whatever is rerun."""
    if not disk_is_full(error):
        return f"give {setting} a folder that can be written"
    if run_dir is not None and has_checkpoint(run_dir, network):
        then = " and " if resume != "never" else "; "  # "; to resume it, rerun with output_dir=..."
        return f"the last complete checkpoint is intact: free some space{then}{resume_hint(str(run_dir), resume)}"
    return f"free some space (or give {setting} another disk) and rerun"


@contextlib.contextmanager
def saving_checkpoints(run_dir: str | Path, network: int, resume: str = "auto"):
    """A network's checkpoint save that cannot write ends with the same advice as any other
    output (its CheckpointError carries the OSError)."""
    try:
        yield
    except CheckpointError as e:
        if e.os_error is None:
            raise
        raise CheckpointError(f"{e}; {output_advice(e.os_error, 'output_dir', run_dir, resume, network)}") from None


def stop_message(signum: int, output_dir: str | None, resume: str = "auto") -> str:
    return f"received {signal.Signals(signum).name}: stopped between steps; {after_stop(output_dir, resume)}"


def install_signal_handlers(output_dir: str, resume: str) -> dict:
    """Turn SIGTERM and SIGINT into Stop; returns the handlers they had."""
    def handler(signum, _frame):
        # Under srun a worker gets SIGTERM twice (from slurmstepd, then from torchrun's agent):
        # the second must not interrupt the first's clean stop.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Stop(stop_message(signum, output_dir, resume))
    return {s: signal.signal(s, handler) for s in STOP_SIGNALS}


def restore_signal_handlers(handlers: dict) -> None:
    for s, previous in handlers.items():
        signal.signal(s, previous)


def says_it(e: BaseException, rank: int) -> bool:
    """Whether this rank prints ``e``: an error that is the same on every rank (a config error, a
    failure they all gathered) is said by rank 0."""
    return rank == 0 if getattr(e, "everywhere", False) else True


def error_line(e: BaseException, rank: int | None = None, network: int | None = None,
               distributed: bool = False) -> str:
    """``graft: error: ...`` in one line, naming the rank where the message does not."""
    names_rank = getattr(e, "everywhere", False) or getattr(e, "names_rank", False)  # every rank: no rank
    where = f"rank {rank} (network {network}): " if distributed and not names_rank and rank is not None else ""
    return f"graft: error: {where}{message_of(e)}"


def message_of(e: BaseException) -> str:
    """The error's message; one re-raised from a DataLoader worker carries the worker's whole
    traceback ("Caught DataError in DataLoader worker process 0. Original Traceback ..."), and
    its last line is the message."""
    text = str(e)
    if text.startswith("Caught ") and "\nOriginal Traceback" in text:
        last = text.rstrip().splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


def report_error(e: BaseException, rank: int, network: int | None = None, distributed: bool = False) -> None:
    """Say the error in one line. Under torchrun the line also goes into the error file torchrun
    gives each worker, where its failure summary and graft-run find it; under graft-run only there
    (graft-run prints each distinct line once, after the workers stopped)."""
    line = error_line(e, rank, network, distributed)
    if (record_error(line) and os.environ.get(REPORTED_BY_LAUNCHER) == "1") or not says_it(e, rank):
        return
    print(line, file=sys.stderr, flush=True)


def say_error(message: str, prog: str = "graft") -> None:
    """``<prog>: error: <message>`` on stderr: the one line a command ends with."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)


def record_error(line: str) -> bool:
    """Write a worker's error line into the error file torchrun gives it (TORCHELASTIC_ERROR_FILE),
    where torchrun's failure summary and graft-run read it. Whether it was written."""
    error_file = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not error_file:
        return False
    try:
        Path(error_file).write_text(json.dumps({"message": line, "timestamp": int(time.time())}))
        return True
    except OSError:
        return False


def is_user_error(e: BaseException) -> bool:
    """An error that ends a command in one line (the file system's own errors name their file)."""
    return isinstance(e, (UserError, OSError))
