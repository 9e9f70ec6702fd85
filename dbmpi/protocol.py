"""Every word dbmpi puts on the wire, in one place: message tags and control-window layouts.

The protocols that use them are described where they are implemented: the parameter server's
in :mod:`dbmpi.ps`, Sandblaster's vector service in :mod:`dbmpi.ps.vector`, Downpour's control
plane in :mod:`dbmpi.train.downpour.control`, Sandblaster's scheduling in
:mod:`dbmpi.train.sandblaster`.
Keeping the numbers together is what stops two modules from giving one word two values.
"""

from __future__ import annotations

import enum


class Tag(enum.IntEnum):
    """Point-to-point message tags (each on its own communicator or use)."""

    COMMAND = 101  # coordinator -> shards: a Sandblaster vector program
    REQUEST = 201  # replica -> coordinator: Sandblaster work request (and results)
    REPLY = 202  # coordinator -> replica: Sandblaster work decision
    PROGRESS = 32_000  # never sent: probing it only drives MPI's progress engine


# Gradient slots per worker in the parameter server's windows (dbmpi.ps): a worker fills push
# q+1 into one while the shards still apply push q from the other.
NSLOTS = 2


class ShardCtrl(enum.IntEnum):
    """Head of a shard's ``ctrl`` window; per-worker rows follow (:mod:`dbmpi.ps.server`)."""

    STOP = 0  # coordinator REPLACE: finish once nothing is pending
    APPLIED = 1  # shard: pushes applied so far
    CKPT_REQ = 2  # coordinator REPLACE: write checkpoint k
    CKPT_ACK = 3  # shard: checkpoint k written
    WRITING = 4  # shard: 1 while it changes its block (recorded runs: a fetch copies around it)


class Flag(enum.IntEnum):
    """Flags in the memory of every Downpour worker and shard, written by the coordinator
    (:mod:`dbmpi.train.downpour.control`)."""

    STOP = 0  # finish now (target reached, SIGTERM)
    CKPT_REQ = 1  # checkpoint k requested: pause at the next step boundary
    CKPT_DONE = 2  # checkpoint k committed: go on
    RELEASED = 3  # the warm start is over
    CENSUS = 4  # censuses taken after a process of the job died (dbmpi.train.downpour.census)
    TEARDOWN = 5  # the run's outputs are written: 1 free the windows together, 2 leave


class Board(enum.IntEnum):
    """Head of the Downpour coordinator's board; one :class:`Row` per worker follows."""

    TERM = 0  # some rank received SIGTERM
    DONE = 1  # workers finished
    STEPS = 2  # steps trained, summed over replicas (lags by up to log_every per replica)


class Row(enum.IntEnum):
    """A worker's row on the coordinator's board."""

    ACK = 0  # last checkpoint this worker answered
    STEP = 1
    EPOCH = 2
    POSITION = 3  # of its data reader
    FINISHED = 4
    BEAT = 5  # heartbeats sent (a census tells the live from the dead by it)
    AT_STEP = 6  # the worker's step at its last heartbeat
