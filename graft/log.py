"""graft's messages, through the standard logging module.

Modules log to ``logging.getLogger(__name__)`` (children of the ``graft`` logger) and never ask
which rank they run on: ``setup`` installs one console handler whose filter lets rank 0 say
everything and the other ranks only warnings and errors, which are about that rank (a damaged
file, a removed checkpoint) and carry its number. Info goes to stdout, warnings to stderr, one
line each, flushed at once: a redirected log (nohup, a Slurm job) shows every epoch as it ends.

Library use (``graft.Grafter`` in someone else's loop) calls no ``setup``: the records then go
wherever that program's own logging configuration sends them.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT = "graft"


class RankFilter(logging.Filter):
    """Rank 0: every record. Other ranks: warnings and errors only, so that N processes print
    one epoch table, not N."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or record.levelno >= logging.WARNING


class ConsoleFormatter(logging.Formatter):
    """Info as it is; ``graft: warning: rank 3: ...`` for warnings (the rank when there are several)."""

    def __init__(self, rank: int, world: int):
        super().__init__()
        self.where = f"rank {rank}: " if world > 1 else ""

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"graft: {record.levelname.lower()}: {self.where}{message}"
        return message


class Console(logging.StreamHandler):
    """stdout for info, stderr for warnings, looked up at each record (so that a stream swapped
    after ``setup``, as pytest's capture does, is the one written to)."""

    def emit(self, record: logging.LogRecord) -> None:
        self.stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        super().emit(record)


def setup(rank: int | None = None, world: int | None = None) -> logging.Logger:
    """Send the ``graft`` loggers to the console, filtered for ``rank`` (default: torchrun's
    RANK / WORLD_SIZE). Called again once the topology is known; replaces its own handler."""
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", "1")) if world is None else world
    logger = logging.getLogger(ROOT)
    for handler in [h for h in logger.handlers if isinstance(h, Console)]:
        logger.removeHandler(handler)
    handler = Console()
    handler.addFilter(RankFilter(rank))
    handler.setFormatter(ConsoleFormatter(rank, world))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # a program that configured the root logger too gets each line once
    return logger
