"""Errors a user can act on.

Every error that bad input can cause is a :class:`DbmpiError`: its message is one line that
names the file or config field and says how to fix it. ``python -m dbmpi`` prints such an
error without a traceback and exits with status 2; anything else is a bug or an MPI fault and
aborts the whole job (status 1) naming the rank that raised it.
"""

from __future__ import annotations

# A rank is gone or does not answer (frozen, killed, its node lost): EX_TEMPFAIL, "try again
# later": the same command resumes from the last checkpoint. Shared by the coordinator
# (dbmpi.ps.server.RankUnreachable) and the ranks that find the coordinator gone
# (dbmpi.liveness.Watchdog).
EX_TEMPFAIL = 75


class DbmpiError(Exception):
    """An error caused by input the user controls (config, data, command line)."""

    exit_code = 2


class ConfigError(DbmpiError, ValueError):
    """A config file or ``--set`` override is wrong: the message names the field."""


class TopologyError(DbmpiError):
    """The MPI job does not have the shape the config asks for (e.g. wrong rank count)."""


class TrainingError(DbmpiError):
    """Training cannot go on (e.g. the loss became NaN): the message says what to change."""
