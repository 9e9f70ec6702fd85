"""Test-only fault injection, so tests can prove that one failing rank ends the whole job.

``DBMPI_FAULT=RANK:SECONDS`` makes world rank RANK raise ``RuntimeError`` once it has run its
training loop for SECONDS. Unset (the normal case), :meth:`Fault.check` costs one comparison.
"""

from __future__ import annotations

import os
import time


class InjectedFault(RuntimeError):
    pass


class Fault:
    def __init__(self, rank: int, env: str | None = None):
        spec = os.environ.get("DBMPI_FAULT", "") if env is None else env
        self.deadline = None
        if spec:
            target, _, seconds = spec.partition(":")
            if int(target) == rank:
                self.deadline = time.monotonic() + float(seconds or 0)
        self.rank = rank

    def check(self) -> None:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            raise InjectedFault(f"fault injected on rank {self.rank} by DBMPI_FAULT")
