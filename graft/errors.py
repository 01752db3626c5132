"""The one base class of the errors a user sees.

A ``UserError`` (ConfigError, DataError, CheckpointError, the ring's errors, a stop by signal...)
ends a run with one line, ``graft: error: <message>``, no traceback, and a non-zero exit: its
message names what to fix (the config key, the file, the rank). Anything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """An error the user can act on; the message names the key, file or rank at fault."""


# graft-run sets this variable for its workers: they leave their error line in the error file
# torchrun gives each of them (TORCHELASTIC_ERROR_FILE) instead of printing it, and graft-run
# prints each distinct line once, after the workers have stopped.
REPORTED_BY_LAUNCHER = "GRAFT_RUN"
