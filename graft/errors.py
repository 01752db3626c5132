"""Every error a user sees, under one base class.

A ``UserError`` ends a run with one line, ``graft: error: <message>``, no traceback, and a
non-zero exit: its message names what to fix (the config key, the file, the rank). Anything
else is a bug and keeps its traceback. ``resumable`` says whether rerunning the same command can
help (a stopped peer, a signal) or cannot (a bad config, a read-only directory): cli.py words
the advice from it.
"""

import os
import signal
import threading


class UserError(Exception):
    """An error the user can act on; the message names the key, file or rank at fault."""

    resumable = False   # True: the run stopped between steps and the same command resumes it
    names_rank = False  # the message already says which rank (cli adds it otherwise)
    everywhere = False  # rank 0 says it: raised alike on every rank (from what they all gathered), or
    #                     a consequence on a rank whose cause rank 0 raises (a replica whose leader refused)


class ConfigError(UserError, ValueError):
    """A bad config, plan or argument: the message names the source and the key."""

    everywhere = True  # every rank reads the same config


class DataError(UserError, ValueError):
    """Data that cannot be read or used: the message names the file or the setting."""


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used or written: the message names the file and why. A failed
    write carries its ``os_error``: the advice that ends the line depends on it
    (``graft.cli.saving_checkpoints``)."""

    def __init__(self, message: str, os_error: OSError | None = None):
        super().__init__(message)
        self.os_error = os_error


class DamagedCheckpoint(CheckpointError):
    """A file whose bytes are no usable checkpoint (truncated, corrupt, foreign, or code): a
    resume may fall back to an older one. A file that cannot be read at all (missing, no
    permission, an I/O error) says nothing about its bytes and is never skipped."""


class OutputError(UserError):
    """A file of a run's or a study's outputs cannot be written (a full or read-only disk)."""


def disk_problem(error: OSError) -> str:
    """'disk full', 'read-only file system', or the system's own words, for a failed write."""
    import errno

    in_the_way = "a file stands where a folder should be"
    return {errno.ENOSPC: "disk full", errno.EROFS: "read-only file system", errno.EDQUOT: "disk quota exceeded",
            errno.EEXIST: in_the_way, errno.ENOTDIR: in_the_way}.get(error.errno, error.strerror or str(error))


def disk_is_full(error: OSError) -> bool:
    """Whether freeing space mends the failed write (and a rerun can then go on)."""
    import errno

    return error.errno in (errno.ENOSPC, errno.EDQUOT)


class TrainingError(UserError):
    """Training cannot go on (the loss is NaN or Inf)."""


class TopologyError(UserError, RuntimeError):
    """The processes cannot be arranged as asked (wrong world size, GPUs shared by NCCL...)."""


class GraftError(UserError, RuntimeError):
    """Grafting refused before any weight moved (NaN or Inf weights, another architecture, other
    settings on another rank)."""

    names_rank = True


class PeerTimeout(UserError, RuntimeError):
    """A rank did not reach a check-in point in time (it died, or waits at another point)."""

    names_rank = True


class PeerLost(UserError, RuntimeError):
    """A collective failed: another rank went away (its own error says why)."""


class PeerFailed(UserError, RuntimeError):
    """Some rank failed inside ``dist.together``: every rank raises this alike, naming the ranks
    that failed and repeating their errors."""

    names_rank = True
    everywhere = True

    def __init__(self, message: str, resumable: bool = False):
        super().__init__(message)
        self.resumable = resumable


class Stop(UserError):
    """SIGTERM / SIGINT: stopped between steps; the last complete checkpoint stays intact."""

    resumable = True


# graft-run sets this variable for its workers: they leave their error line in the error file
# torchrun gives each of them (TORCHELASTIC_ERROR_FILE) instead of printing it, and graft-run
# prints each distinct line once, after the workers have stopped.
REPORTED_BY_LAUNCHER = "GRAFT_RUN"


def quiet_start_under_graft_run() -> None:
    """In a graft-run worker, Ctrl-C while it still imports torch (seconds; a minute on a busy
    machine) exits with status 130 and no traceback: graft-run prints the one line. graft.train
    installs its own handlers once it runs; nothing changes outside graft-run's workers."""
    if os.environ.get(REPORTED_BY_LAUNCHER) == "1" and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _exit_quietly)


def _exit_quietly(signum, frame):
    raise SystemExit(128 + signum)
