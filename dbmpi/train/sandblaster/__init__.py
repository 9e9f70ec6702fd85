"""Sandblaster L-BFGS (Dean et al. 2012, section 4.2): batch optimisation over many replicas.

Roles
=====
coordinator (rank 0)
    Runs L-BFGS (:mod:`dbmpi.optim.lbfgs`) without holding the parameters: it sends small
    vector commands to the shards (:mod:`dbmpi.ps.vector`) and gets dot products back, and it
    schedules the work of every function evaluation over the replicas.
shards (ranks 1..S)
    Hold their block of every L-BFGS vector in float64 and execute the commands.
replicas
    Compute the loss and gradient of *portions* of the current batch.

One function evaluation (at the point ``W`` the coordinator asked the shards to form)
=====================================================================================
The batch of N examples is cut into portions of ``portion_size`` examples (much smaller than
N / R, so fast replicas do more of them). Scheduling messages are point-to-point float64
arrays on the vector service's communicator:

request, replica -> coordinator (:attr:`~dbmpi.protocol.Tag.REQUEST`)
    ``[eval, finished, loss_sum, n_correct, k, p_1 .. p_k]``: the portion it just finished
    (-1 if none) and its *pending* portions ``p_1..p_k`` (finished, gradient summed locally,
    not pushed yet) with their summed loss. A replica's first request has no portions.
reply, coordinator -> replica (:attr:`~dbmpi.protocol.Tag.REPLY`)
    ``[decision, eval, batch, portion, lo, hi]``: what to do with the pending portions
    (:class:`~.wire.Decision`: keep accumulating, GRANT = push them now, REJECT = discard them,
    STOP) and the next portion (-1: none).

A free replica asks for work; the coordinator answers with an unassigned portion. A replica
fetches the parameters (a ``Get`` of ``W`` from every shard) when it receives its first
portion of an evaluation, and adds ``n * grad(mean loss)`` of each portion of ``n`` examples
to a float64 accumulator.
Every ``push_every`` portions, and for every request once no unassigned portion is left
(the end of the batch), the coordinator decides on the pending set: GRANT if none of its
portions has been granted to anyone (they are marked done, their loss is added), REJECT
otherwise (duplicates discarded; the pending portions nobody else holds go back to the queue).
On GRANT the replica pushes at once: ``Accumulate(SUM)`` of its accumulator into every shard's
``gacc``, ``Flush``, then ``count += examples``. So each portion's gradient and loss count
exactly once however many copies ran.

Backup tasks: once every portion has been handed out, a free replica gets a copy of an
outstanding portion (not yet granted; computing or pending elsewhere; at most
:data:`~.scheduler.MAX_COPIES` holders; fewest holders, then oldest first), never one it holds
itself.
The first copy to be granted wins. A straggler's pending portions are outstanding too, so a
slow replica never holds up the end of a batch, and results of an old evaluation are always
rejected. Without backups (``backups = false``) the batch waits for its slowest portion.

The evaluation is complete when every portion is granted; the coordinator then tells the
shards ``END_EVAL``: each waits until its ``count`` has reached the examples granted so far
(every granted push has landed), sets ``GW = gacc / N + l2 W``, and the same program returns
``GW . D``, ``GW . GW`` and ``W . W``; ``f = loss_sum / N + l2 / 2 W . W``.

Precision: the shards keep every vector in float64 and replicas sum gradients in float64, so
the distributed iterates equal a serial float64 L-BFGS up to rounding (sums taken in another
order). ``dtype`` picks the replicas' model arithmetic: float64 (default, exact comparisons,
L-BFGS curvature pairs ``s . y`` lose digits in float32) or float32 (the kernels' fast path).

Batches: ``batch_size = 0`` uses the first ``train_limit`` training examples (0: all) as the
one batch (deterministic full-batch L-BFGS). Otherwise iteration k uses batch k, the k-th run
of ``batch_size`` examples through a seeded permutation of them (new permutation each epoch);
f and g at the iterate are evaluated again on each new batch before the direction is
computed, so each curvature pair is measured on one batch.

Straggler (tests and benchmarks only): replica ``straggler_replica`` sleeps
``(straggler_factor - 1)`` times the time it spent computing after each portion, as a
replica on a machine that much slower would take (sleeping frees its core for the others).
``slowdown`` makes every replica sleep that way (the straggler ``slowdown * straggler_factor``):
with a slowdown of k, R replicas need R / k cores, so a machine with fewer cores than replicas
can emulate one dedicated core per replica.

Modules
=======
:mod:`.wire`
    the request and reply layouts and :class:`~.wire.Decision` (no MPI)
:mod:`.scheduler`
    :class:`~.scheduler.PortionScheduler`: portions, grants, backups, pushes to wait for (no MPI)
:mod:`.coordinator`
    :class:`~.coordinator.Dispatcher` (the scheduler's message loop) and the L-BFGS driver
:mod:`.objective`
    the L-BFGS objective evaluated by the replicas
:mod:`.replica`
    a replica's loop
:mod:`.model64`, :mod:`.plan`
    the float64 model; which examples each batch and portion holds
:mod:`.transport`, :mod:`.job`
    polling receive; :func:`run`, the entry point of every rank
"""

from __future__ import annotations

import importlib

from .model64 import Dense64, Model64, build_model
from .plan import BatchPlan, portion_bounds
from .scheduler import MAX_COPIES, EvalStats, PortionScheduler, Reply
from .wire import REPLY_SIZE, REQUEST_HEAD, Decision

# The MPI side loads on first use, so that importing the scheduler (and its tests) does not
# initialise MPI.
_MPI_SIDE = {"run": ("job", "run"), "Coordinator": ("coordinator", "Coordinator"),
             "Dispatcher": ("coordinator", "Dispatcher"),
             "Replica": ("replica", "Replica"),
             "SandblasterObjective": ("objective", "SandblasterObjective")}


def __getattr__(name: str):
    if name not in _MPI_SIDE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _MPI_SIDE[name]
    value = getattr(importlib.import_module(f".{module}", __name__), attr)
    globals()[name] = value
    return value


__all__ = ["MAX_COPIES", "REPLY_SIZE", "REQUEST_HEAD", "BatchPlan", "Coordinator", "Decision",
           "Dispatcher", "EvalStats", "Model64", "PortionScheduler", "Replica", "Reply",
           "SandblasterObjective", "Dense64", "build_model", "portion_bounds",
           "run"]
