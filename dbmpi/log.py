"""One logging setup for every rank.

Each line carries the rank and its role (``[rank 3 replica 1]``) so that interleaved output
from mpiexec stays readable. Only rank 0 (the coordinator) logs at INFO; the other ranks log
warnings and errors unless ``DBMPI_LOG_LEVEL`` says otherwise (e.g. ``DEBUG`` for all ranks).
"""

from __future__ import annotations

import logging
import os
import sys

_LOGGER_NAME = "dbmpi"


def setup_logging(rank: int, role: str = "", level: str | None = None) -> logging.Logger:
    """Configure the ``dbmpi`` logger for this rank and return it.

    Calling it again (e.g. once the role is known) replaces the prefix.
    """
    prefix = f"[rank {rank}{' ' + role if role else ''}]"
    env_level = level or os.environ.get("DBMPI_LOG_LEVEL")
    if env_level:
        lvl = getattr(logging, env_level.upper(), None)
        if not isinstance(lvl, int):
            lvl = logging.INFO
    else:
        lvl = logging.INFO if rank == 0 else logging.WARNING
    logger = logging.getLogger(_LOGGER_NAME)
    for h in list(logger.handlers):
        logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s {prefix} %(levelname)s %(message)s",
                                           datefmt="%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(lvl)
    logger.propagate = False
    return logger


def get_logger(name: str = "") -> logging.Logger:
    """The dbmpi logger (or a child of it)."""
    return logging.getLogger(f"{_LOGGER_NAME}.{name}" if name else _LOGGER_NAME)
