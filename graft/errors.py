"""The one base class of the errors a user sees.

A ``UserError`` (ConfigError, DataError, CheckpointError, the ring's errors, a stop by signal...)
ends a run with one line, ``graft: error: <message>``, no traceback, and a non-zero exit: its
message names what to fix (the config key, the file, the rank). Anything else is a bug and keeps
its traceback.
"""

import os
import signal
import threading


class UserError(Exception):
    """An error the user can act on; the message names the key, file or rank at fault."""


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
