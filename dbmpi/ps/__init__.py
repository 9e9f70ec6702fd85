"""The sharded parameter server, over MPI one-sided windows.

Protocol
========
The model's parameters are one flat float32 vector cut into S contiguous blocks
(:mod:`dbmpi.ps.layout`); shard s holds block s. Every window below is made with
``MPI.Win.Allocate`` over COMM_WORLD and used in one ``Lock_all(MODE_NOCHECK)`` epoch for the
whole run, each operation completed by ``Flush`` (:mod:`dbmpi.ps.rma`). Shards never post a
receive: they poll their own memory.

Windows are zeroed when they are made (``Win.Allocate`` does not zero, and off-node a new
window can hold an old one's bytes), and every rank that owns a window others operate on calls
:func:`dbmpi.ps.rma.progress` while it polls or computes in chunks: over MPI's network path
(UCX or libfabric over TCP, and accumulates on any fabric) a one-sided operation completes
only while its target is inside such a call. No operation targets a rank that computes for
long: workers are read only by shards on their own node, through mapped memory.

Windows (a rank exposes 0 bytes in a window that is not its own):

``params`` (float32, block; on each shard)
    The current parameters. Workers ``Get`` their range (a *fetch*; on the same node, a copy
    from the mapped memory). The shard updates it in place with local stores followed by
    ``Win.Sync``.
``grads`` (float32, NSLOTS x range, NSLOTS = 2; on each worker)
    Two *slots* of the worker's own parameter range. Push number q is written to slot
    (q - 1) % 2, so a worker can fill push q + 1 while the shards still apply push q.
``inbox`` (float32; on each shard, NSLOTS x overlap per worker it cannot map)
    How a push reaches a shard on another node. ``mapped[s, w]`` (decided once, when the
    windows are made: shard s can map worker w's memory with ``Shared_query``, i.e. they share
    a node and ``DBMPI_RMA_SHARED`` is not 0) says whether shard s reads worker w's slot in
    place (mapped memory, the gradient crosses memory once) or the worker puts its part of
    the slot into slot ``(q - 1) % 2`` of its inbox on s. The pull of old (a shard ``Get``
    from the worker's window) waited over TCP for the worker's next MPI call, i.e. its whole
    compute step.
    Memory: a shard holds 2 x its block per worker on another node (4 bytes a parameter
    each): 16 remote replicas of a 50M-parameter block take 6.4 GB; add shards (smaller
    blocks) as replicas grow. A pool of receive slots shared by the workers would bound it.
``ctrl`` (int64, 5 + 7W for W workers; on each shard)
    ``[STOP, APPLIED, CKPT_REQ, CKPT_ACK, WRITING, then per worker w: SEQ_w, DONE_w,
    BASE_w[2], RETIRED_w, FETCHED_w[2]]``. RETIRED_w = 1: w pushes no more (finished, or
    lost); workers bounding their staleness (``downpour.max_staleness``) wait only for the
    others. FETCHED_w[slot]: the others' pushes applied at the fetch that slot's gradient was
    computed on (staleness-aware shards). WRITING: see *Recorded runs* below.

A *push* (number q) by worker w, step by step:

1. wait until ``DONE_w >= q - 2`` on every shard of its range (atomic reads): they have
   applied the push that last used this slot. At most two pushes per worker are in flight;
2. write the gradient into the slot with local stores (the backward pass writes it there
   directly, or gradients are summed there: no copy), then ``Win.Sync``; for every shard that
   cannot map the slot, ``Put`` its part into that shard's inbox, and ``Flush``;
3. ``SEQ_w += 1`` on each of those shards (``Fetch_and_op(SUM)``). The push is now *posted*.

The shard's loop calls ``progress`` and reads its own ``ctrl`` with local loads after
``Win.Sync``; for every worker with ``SEQ_w > DONE_w`` it takes the pending slots in push order
(from the worker's mapped memory or from its inbox), refuses a gradient holding NaN/Inf
(checked block by block inside the Adagrad kernel: the job ends before a non-finite value
reaches the block), applies the optimizer to its params block and accumulator (state that
never leaves the shard) one cache-sized chunk at a time with a progress call between chunks,
records ``BASE_w[slot]`` = pushes applied before this one, calls ``Win.Sync`` on ``params``,
and then publishes ``APPLIED`` and last ``DONE_w = SEQ_w`` with local stores and ``Win.Sync``
on ``ctrl``. A push becomes *visible* to fetches at that Sync, and is *acknowledged* when DONE_w
moves. Each push is applied exactly once: a slot (and its inbox slot) is read only after its
SEQ moved and written again only after DONE caught up.

A worker that dies (:mod:`dbmpi.train.downpour.census`): a push whose SEQ moved on no shard
is applied nowhere; one whose SEQ moved on some of its shards is complete on all of them (step
2 ends before step 3 starts; a mapped slot outlives its process), and the coordinator moves
SEQ (``Fetch_and_op(SUM)``, the worker's own op: it is dead, so SEQ still has one live writer)
on the shards it had not reached: every push is applied on all its shards or on none.

Checkpoints: the coordinator stores ``CKPT_REQ = k`` once every worker has paused with its
pushes acknowledged; the shard writes its block and accumulator and stores ``CKPT_ACK = k``.

What a concurrent fetch may observe: a ``Get`` racing an update returns, per element, either
the old or the new value (float32 stores are single instructions), so a fetched vector may mix
versions of a block but never holds a value that no update produced. A worker that sets
``read_own_pushes`` waits for ``DONE_w == SEQ_w`` before fetching, so its fetch reflects all of
its own pushes (with one replica this makes Downpour equal to serial SGD/Adagrad).

Recorded runs (``run.record_order``, :mod:`dbmpi.order`): the shard stores WRITING = 1 (and
``Win.Sync``) before the first store of a poll to its block and WRITING = 0 after APPLIED, in
the same Sync; a fetch copies a shard's part only between two readings of (WRITING, APPLIED)
that are both (0, n) and equal, retrying otherwise (a sequence lock), so it sees the block
after exactly n pushes, and notes n. The shard notes each push it applies (worker, push,
learning-rate divisor). That makes the run replayable bit for bit (:mod:`dbmpi.replay`); a
fetch may wait while a busy shard applies.

Staleness of push q = the number of *other* workers' pushes the shard applied between this
worker's last fetch and push q: ``(BASE_q - (q - 1)) - (APPLIED_f - DONE_f)`` where
``APPLIED_f`` and ``DONE_f`` were read at the fetch.

Order: a shard applies the pushes pending in one poll in the order (push number, worker), the
global order a staleness bound relies on (:mod:`dbmpi.train.downpour.bound`).

Each counter has one writer: SEQ is changed only by its worker's ``Fetch_and_op(SUM)``, RETIRED
by its worker's ``REPLACE`` (or the coordinator's once the worker is lost),
STOP and CKPT_REQ only by the coordinator's ``REPLACE``, and the shard's own DONE, BASE,
APPLIED and CKPT_ACK only by the shard's local stores; remote readers use ``NO_OP``, as MPI's
default ``accumulate_ops=same_op_no_op`` requires. Every counter is an aligned int64, so a
load, store or atomic sees it whole; in MPI's unified memory model (which ``Win.Allocate``
windows have) remote atomics become visible to the owner's loads, and its stores to remote
reads, at ``Win.Sync``. A worker remembers the last DONE it read from each shard and reads
the counters again only when it needs a later one (one read per shard per fetch, none per
push while its slots are free).
"""

from .client import PSClient
from .layout import ParamLayout, Segment
from .server import ParameterServer, ShardService

__all__ = ["ParamLayout", "Segment", "ParameterServer", "PSClient", "ShardService"]
