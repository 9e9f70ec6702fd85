"""Receiving a scheduling message without spinning (replicas and coordinator)."""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from ...ps.server import Backoff


def poll_recv(comm: MPI.Comm, buf: np.ndarray, source: int, tag: int, cap: float,
              heartbeat=None) -> int:
    """Receive into ``buf`` (polling with backoff so a waiting rank yields); return the source.

    ``heartbeat`` (the rank's :meth:`~dbmpi.faults.Fault.check`) runs between polls, so a
    fault injected into a waiting rank still fires.
    """
    status = MPI.Status()
    backoff = Backoff(cap=cap)
    while not comm.Iprobe(source, tag, status):
        if heartbeat is not None:
            heartbeat()
        backoff.wait()
    src = status.Get_source()
    comm.Recv([buf, MPI.DOUBLE], src, tag, status)
    return src
