"""The sharded parameter server, over MPI one-sided windows.

Protocol
========
The model's parameters are one flat float32 vector cut into S contiguous blocks
(:mod:`dbmpi.ps.layout`); shard s holds block s. Every window below is made with
``MPI.Win.Allocate`` over COMM_WORLD and used in one ``Lock_all(MODE_NOCHECK)`` epoch for the
whole run, each operation completed by ``Flush`` (:mod:`dbmpi.ps.rma`). Shards never post a
receive: they poll their own memory.

Windows on each shard (other ranks expose 0 bytes):

``params`` (float32, block)
    The current parameters. Workers ``Get`` their range (a *fetch*). The shard updates it in
    place with local stores followed by ``Win.Sync``.
``grads`` (float32, R x block)
    One *slot* per replica. A worker ``Put``s its accumulated gradient into its replica's slot
    (the partitions of one replica write disjoint ranges of it). A slot is never written while
    the shard may read it: see ``done`` below.
``ctrl`` (int64, 3 + 3W for W workers)
    ``[STOP, APPLIED, PUSHES, then per worker w: SEQ_w, DONE_w, BASE_w]``.

A *push* by worker w to shard s, step by step:

1. wait until ``DONE_w == SEQ_w`` (atomic reads): the shard has consumed w's previous push,
   so the slot is free. This also bounds what is in flight to one push per worker;
2. ``Put`` the gradient into the slot and ``Flush``: the data is complete at the shard;
3. ``SEQ_w += 1`` (``Fetch_and_op(SUM)``). The push is now *posted*.

The shard's loop reads ``ctrl`` atomically (``Get_accumulate(NO_OP)``); for every worker with
``SEQ_w > DONE_w`` it reads the slot from its own memory, applies the optimizer to its params
block and accumulator (state that never leaves the shard), calls ``Win.Sync`` on ``params``, and
then publishes, each with ``Accumulate(REPLACE)``: ``BASE_w`` = pushes applied before this one,
``APPLIED += 1`` and last ``DONE_w = SEQ_w``. A push becomes *visible* to fetches at that Sync,
and is *acknowledged* when DONE_w moves. Each push is applied exactly once: a slot is read only
after its SEQ moved and written again only after DONE caught up.

What a concurrent fetch may observe: a ``Get`` racing an update returns, per element, either
the old or the new value (float32 stores are single instructions), so a fetched vector may mix
versions of a block but never holds a value that no update produced. A worker that sets
``read_own_pushes`` waits for ``DONE_w == SEQ_w`` before fetching, so its fetch reflects all of
its own pushes (with one replica this makes Downpour equal to serial SGD/Adagrad).

Staleness of a push = the number of *other* workers' pushes the shard applied between this
worker's last fetch and this push: ``(BASE - my_pushes_before) - (APPLIED_f - DONE_f)`` where
``APPLIED_f`` and ``DONE_f`` were read at the fetch.

Each location has one writer op (SEQ: SUM by its worker; DONE, BASE, APPLIED, STOP: REPLACE)
and readers using NO_OP, as MPI's default ``accumulate_ops=same_op_no_op`` requires.
"""

from .layout import ParamLayout, Segment
from .server import ParameterServer, PSClient, ShardService

__all__ = ["ParamLayout", "Segment", "ParameterServer", "PSClient", "ShardService"]
