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
    (:class:`Decision`: keep accumulating, GRANT = push them now, REJECT = discard them, STOP)
    and the next portion (-1: none).

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
:data:`MAX_COPIES` holders; fewest holders, then oldest first), never one it holds itself.
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
"""

from __future__ import annotations

import enum
import math
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mpi4py import MPI

from ..checkpoint import append_iterate, save_params
from ..config import Config
from ..data import open_dataset
from ..errors import DbmpiError, TrainingError
from ..faults import Fault
from ..log import get_logger
from ..metrics import MetricsWriter
from ..model import Dense, Model
from ..model.model import flat_batch
from ..optim.lbfgs import GW, LBFGS, IterationRecord, W, X, num_vectors
from ..protocol import Tag
from ..ps.layout import ParamLayout
from ..ps.server import Backoff
from ..ps.vector import ShardVectors, VectorClient, VectorShard, VectorWindows
from ..topology import COORDINATOR_RANK, Role, Topology

log = get_logger("sandblaster")

REQUEST_HEAD = 5  # eval, finished, loss_sum, n_correct, k
REPLY_SIZE = 6  # decision, eval, batch, portion, lo, hi
MAX_COPIES = 2  # holders of one portion at a time, the original included


@enum.unique
class Decision(enum.IntEnum):
    KEEP = 0  # keep accumulating the pending portions
    GRANT = 1  # push them now: they count
    REJECT = 2  # discard them
    STOP = 3  # discard them and leave


# -- the model in float64 --------------------------------------------------------------------
def _Dense64(n_in: int, n_out: int, activation: str = "relu") -> Dense:
    """:class:`Dense` with float64 activations (the kernels are fused over float and double)."""
    return Dense(n_in, n_out, activation, dtype=np.float64)


class Model64(Model):
    """The same network as :class:`Model`, with float64 parameters, gradients and arithmetic."""

    def __init__(self, layers: list, loss: str = "softmax"):
        super().__init__(layers, loss)
        self.params = np.zeros(self.num_params, dtype=np.float64)
        self.grads = np.zeros(self.num_params, dtype=np.float64)
        for layer, off in zip(self.layers, self.offsets):
            layer.bind(self.params[off:off + layer.num_params],
                       self.grads[off:off + layer.num_params])

    def _flat(self, x: np.ndarray) -> np.ndarray:
        return flat_batch(x, np.float64)


def build_model(cfg: Config, dataset) -> Model:
    """The configured model, computing in ``sandblaster.dtype``."""
    model = Model.from_config(cfg.model, dataset.feature_shape, dataset.num_classes)
    if cfg.sandblaster.dtype == "float32":
        return model
    layers = [layer.float64() for layer in model.layers]  # None: no float64 kernels
    if any(layer is None for layer in layers):
        raise DbmpiError("sandblaster.dtype: float64 replicas support dense layers only; set "
                         "sandblaster.dtype = \"float32\" for this model")
    return Model64(layers, cfg.model.loss)


# -- batches and portions --------------------------------------------------------------------
class BatchPlan:
    """Which examples (rows of the loaded training set) batch ``b`` holds."""

    def __init__(self, n_train: int, batch_size: int, seed: int):
        self.n = n_train
        self.full = batch_size == 0
        self.size = n_train if self.full else batch_size
        self.per_epoch = max(1, n_train // self.size)
        self.seed = seed
        self._perm: tuple[int, np.ndarray] | None = None

    def rows(self, batch: int, lo: int, hi: int):
        """Rows of examples ``[lo, hi)`` of batch ``batch`` (a slice or an index array)."""
        if self.full:
            return slice(lo, hi)
        epoch, j = divmod(batch, self.per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, 5, epoch]).permutation(self.n))
        base = j * self.size
        return np.sort(self._perm[1][base + lo:base + hi])


def portion_bounds(n: int, portion_size: int) -> list[tuple[int, int]]:
    return [(lo, min(lo + portion_size, n)) for lo in range(0, n, portion_size)]


def _poll_recv(comm: MPI.Comm, buf: np.ndarray, source: int, tag: int, cap: float,
               heartbeat=None) -> int:
    """Receive into ``buf`` (polling with backoff so a waiting rank yields); return the source."""
    status = MPI.Status()
    backoff = Backoff(cap=cap)
    while not comm.Iprobe(source, tag, status):
        if heartbeat is not None:
            heartbeat()
        backoff.wait()
    src = status.Get_source()
    comm.Recv([buf, MPI.DOUBLE], src, tag, status)
    return src


# -- the coordinator's scheduler -------------------------------------------------------------
@dataclass
class EvalStats:
    """What one function evaluation (one pass over a batch) took."""

    eval_id: int
    batch: int
    examples: int
    portions: int
    loss_sum: float = 0.0
    n_correct: float = 0.0
    computed: int = 0  # portion results received for this evaluation, duplicates included
    backups: int = 0  # backup copies handed out
    duplicates: int = 0  # pending results discarded: another copy was granted, or too late
    requeued: int = 0  # pending portions discarded with a rejected set, handed out again
    stale: int = 0  # results of earlier evaluations that arrived during this one
    wall_s: float = 0.0
    granted_by_replica: list = field(default_factory=list)
    computed_by_replica: list = field(default_factory=list)


class Scheduler:
    """Hands out portions, decides on pending sets, and schedules backups (coordinator)."""

    def __init__(self, comm: MPI.Comm, topo: Topology, portion_size: int, push_every: int,
                 backups: bool, heartbeat=None):
        self.comm = comm
        self.R = topo.cfg.replicas
        self.rank_of = [topo.worker_rank(r) for r in range(self.R)]
        self.replica_of = {rank: r for r, rank in enumerate(self.rank_of)}
        self.portion_size, self.push_every, self.backups = portion_size, push_every, backups
        self.heartbeat = heartbeat
        self.waiting: deque[int] = deque()  # replicas whose request awaits work
        self.eval_id = -1
        self.batch = 0
        self._req = np.zeros(REQUEST_HEAD + push_every, np.float64)
        self._rep = np.zeros(REPLY_SIZE, np.float64)

    def _reply(self, replica: int, decision: Decision, portion: int = -1) -> None:
        self._rep[:] = (decision, self.eval_id, self.batch, portion, -1, -1)
        if portion >= 0:
            self._rep[4:6] = self.bounds[portion]
        self.comm.Send([self._rep, MPI.DOUBLE], self.rank_of[replica], Tag.REPLY)

    def _pick(self, r: int) -> int:
        """The next portion for replica r, or -1."""
        if self.fresh:
            p = self.fresh.popleft()
        elif self.backups:
            best, key = -1, None
            for q in range(len(self.bounds)):
                h = self.holders[q]
                if self.granted[q] or r in h or len(h) >= MAX_COPIES:
                    continue
                k = (len(h), self.started[q])
                if key is None or k < key:
                    best, key = q, k
            if best < 0:
                return -1
            p = best
            self.stats.backups += 1
        else:
            return -1
        self.holders[p].add(r)
        if not math.isfinite(self.started[p]):
            self.started[p] = time.perf_counter()
        return p

    def _serve_waiting(self) -> None:
        for _ in range(len(self.waiting)):
            r = self.waiting.popleft()
            p = self._pick(r)
            if p < 0:
                self.waiting.append(r)
            else:
                self._reply(r, Decision.KEEP, p)

    def _handle(self, src: int) -> None:
        req = self._req
        r = self.replica_of[src]
        eval_id, finished, loss, correct, k = (int(req[0]), int(req[1]), float(req[2]),
                                               float(req[3]), int(req[4]))
        pend = [int(p) for p in req[REQUEST_HEAD:REQUEST_HEAD + k]]
        st = self.stats
        current = eval_id == self.eval_id
        if finished >= 0:
            if current:
                st.computed += 1
                st.computed_by_replica[r] += 1
            else:
                st.stale += 1
        decision = Decision.KEEP
        if k and not current:
            decision = Decision.REJECT
            st.duplicates += k
        elif k and (k >= self.push_every or not self.fresh):
            if not any(self.granted[p] for p in pend):
                decision = Decision.GRANT
                for p in pend:
                    self.granted[p] = True
                    self.holders[p].discard(r)
                    lo, hi = self.bounds[p]
                    self.examples_granted += hi - lo
                self.n_granted += k
                st.loss_sum += loss
                st.n_correct += correct
                st.granted_by_replica[r] += k
            else:
                decision = Decision.REJECT
                for p in pend:
                    self.holders[p].discard(r)
                    if self.granted[p]:
                        st.duplicates += 1
                    elif not self.holders[p]:
                        self.fresh.appendleft(p)
                        st.requeued += 1
        p = self._pick(r) if not self.complete else -1
        if p < 0 and decision is Decision.KEEP:
            self.waiting.append(r)  # nothing to say until there is work
        else:
            self._reply(r, decision, p)
        if decision is Decision.REJECT:
            self._serve_waiting()  # requeued portions

    def run_eval(self, batch: int, n_examples: int) -> EvalStats:
        """Schedule one pass over ``batch`` (``n_examples`` examples) until every portion is
        granted. The pushes may still be landing: the shards wait for them."""
        self.start_eval(batch, n_examples)
        while not self.complete:
            src = _poll_recv(self.comm, self._req, MPI.ANY_SOURCE, Tag.REQUEST, 2e-4,
                             self.heartbeat)
            self._handle(src)
        assert self.examples_granted == n_examples
        return self.stats

    @property
    def complete(self) -> bool:
        return self.n_granted == len(self.bounds)

    def handle(self, src: int, request: np.ndarray) -> None:
        """Process one request (``src`` is the sender's rank); for tests."""
        self._req[:len(request)] = request
        self._handle(src)

    def start_eval(self, batch: int, n_examples: int) -> None:
        """Open the next evaluation and give work to the replicas waiting for it."""
        self.eval_id += 1
        self.batch = batch
        self.bounds = portion_bounds(n_examples, self.portion_size)
        P = len(self.bounds)
        self.fresh = deque(range(P))
        self.granted = [False] * P
        self.holders: list[set[int]] = [set() for _ in range(P)]
        self.started = [math.inf] * P
        self.n_granted = 0
        self.examples_granted = 0
        self.stats = EvalStats(self.eval_id, batch, n_examples, P,
                               granted_by_replica=[0] * self.R,
                               computed_by_replica=[0] * self.R)
        self._serve_waiting()

    def shutdown(self) -> None:
        """Tell every replica to stop (those still computing, once they ask again)."""
        stopped = 0
        while self.waiting:
            self._reply(self.waiting.popleft(), Decision.STOP)
            stopped += 1
        while stopped < self.R:
            src = _poll_recv(self.comm, self._req, MPI.ANY_SOURCE, Tag.REQUEST, 1e-3,
                             self.heartbeat)
            self._reply(self.replica_of[src], Decision.STOP)
            stopped += 1


class SandblasterObjective:
    """The mean loss over a batch (+ L2), evaluated by the replicas: an L-BFGS Objective."""

    def __init__(self, vectors: ShardVectors, scheduler: Scheduler, plan: BatchPlan,
                 l2: float):
        self.vec, self.sched, self.plan, self.l2 = vectors, scheduler, plan, l2
        self.batch = 0
        self.target = 0  # examples pushed to each shard over the run, once all land
        self.log: list[EvalStats] = []

    def begin_iteration(self, iteration: int) -> bool:
        if self.plan.full:
            return False
        changed = iteration != self.batch
        self.batch = iteration
        return changed

    def evaluate(self, dots):
        t0 = time.perf_counter()
        self.vec.begin_eval()
        self.vec.flush()  # W is formed and gacc zeroed on every shard
        n = self.plan.size
        stats = self.sched.run_eval(self.batch, n)
        self.target += n
        self.vec.end_eval(GW, n, self.target, self.l2)
        res = self.vec.dots(list(dots) + [(W, W)])
        stats.wall_s = time.perf_counter() - t0
        self.log.append(stats)
        f = stats.loss_sum / n + 0.5 * self.l2 * res[-1]
        return f, res[:-1]


# -- ranks -----------------------------------------------------------------------------------
def run(cfg: Config, topo: Topology, run_dir: Path, t0: float, checkpoint=None) -> dict | None:
    """Run Sandblaster L-BFGS on this rank; the coordinator returns the summary, others None.

    Collective over ``topo.comm``: every rank must call it.
    """
    if checkpoint is not None:
        raise DbmpiError(f"sandblaster: {run_dir} holds a Downpour checkpoint; Sandblaster "
                         "runs do not resume: choose a new run.dir")
    sb = cfg.sandblaster
    dataset = open_dataset(cfg.data.path)
    n_total = dataset.num_examples("train")
    n_train = min(sb.train_limit, n_total) if sb.train_limit else n_total
    if sb.batch_size > n_train:
        raise DbmpiError(f"sandblaster.batch_size: {sb.batch_size} is more than the "
                         f"{n_train} training examples used; lower it (0 = all of them)")
    model = build_model(cfg, dataset)
    layout = ParamLayout.even(model.num_params, cfg.topology.shards)
    win = VectorWindows(topo, layout)
    metrics = MetricsWriter(run_dir, topo.rank, t0)
    fault = Fault(topo.rank)
    plan = BatchPlan(n_train, sb.batch_size, cfg.run.seed)
    result = None
    shard = None
    if topo.role is Role.SHARD:
        init = model.init_params(cfg.run.seed).astype(np.float64)
        lo, hi = layout.block(topo.index)
        shard = VectorShard(win, num_vectors(sb.history), init[lo:hi].copy(), fault.check)
        shard.init_vector(X, init[lo:hi])
    topo.comm.Barrier()  # the shards hold the initial point before anyone fetches
    try:
        if shard is not None:
            programs = shard.serve()
            metrics.write("shard", shard=topo.index, programs=programs,
                          busy_s=round(shard.busy_s, 3),
                          push_wait_s=round(shard.push_wait_s, 3))
        elif topo.role is Role.REPLICA:
            Replica(cfg, topo, model, dataset, n_train, plan, win, metrics, fault).run()
        else:
            result = Coordinator(cfg, topo, model, dataset, plan, win, metrics, run_dir, t0,
                                 fault).run()
    finally:
        metrics.close()
    topo.comm.Barrier()  # nobody frees a window another rank still uses
    win.free()
    return result


class Replica:
    """Computes portions, sums their gradients, pushes when granted."""

    def __init__(self, cfg, topo, model, dataset, n_train, plan, win, metrics, fault):
        sb = cfg.sandblaster
        self.cfg, self.model, self.plan, self.metrics, self.fault = cfg, model, plan, metrics, fault
        self.replica = topo.index
        self.comm = win.comm
        self.client = VectorClient(win)
        self.x, self.y = dataset.load("train", limit=n_train)
        self.accum = np.zeros(model.num_params, np.float64)
        self.w = model.params if model.params.dtype == np.float64 else \
            np.zeros(model.num_params, np.float64)
        self.slow = sb.slowdown * (sb.straggler_factor if sb.straggler_replica == topo.index
                                   else 1.0)
        self._req = np.zeros(REQUEST_HEAD + sb.push_every, np.float64)
        self._rep = np.zeros(REPLY_SIZE, np.float64)
        self._reset()
        self.fetched = -1
        self.computed = 0
        self.compute_s = 0.0
        self.slept_s = 0.0
        self.wait_s = 0.0

    def _reset(self) -> None:
        self.accum[:] = 0.0
        self.pending: list[int] = []
        self.pending_eval = -1
        self.pending_examples = 0
        self.loss_sum = 0.0
        self.n_correct = 0

    def _request(self, eval_id: int, finished: int) -> None:
        k = len(self.pending)
        req = self._req[:REQUEST_HEAD + k]
        req[:REQUEST_HEAD] = (eval_id, finished, self.loss_sum, self.n_correct, k)
        req[REQUEST_HEAD:] = self.pending
        self.comm.Send([req, MPI.DOUBLE], COORDINATOR_RANK, Tag.REQUEST)

    def _compute(self, batch: int, lo: int, hi: int) -> None:
        t = time.perf_counter()
        rows = self.plan.rows(batch, lo, hi)
        loss, correct = self.model.forward_backward(self.x[rows], self.y[rows])
        if not math.isfinite(loss):
            raise TrainingError(f"replica {self.replica}: the training loss is {loss}: the "
                                f"model diverged; try sandblaster.l2 > 0 or a smaller model")
        n = hi - lo
        self.accum += n * self.model.grads
        self.loss_sum += n * loss
        self.n_correct += correct
        self.pending_examples += n
        dt = time.perf_counter() - t
        self.compute_s += dt
        self.computed += 1
        if self.slow > 1:
            time.sleep((self.slow - 1) * dt)
            self.slept_s += (self.slow - 1) * dt

    def run(self) -> None:
        self._request(-1, -1)
        while True:
            t = time.perf_counter()
            _poll_recv(self.comm, self._rep, COORDINATOR_RANK, Tag.REPLY, 1e-3, self.fault.check)
            self.wait_s += time.perf_counter() - t
            decision, eval_id, batch, portion, lo, hi = (int(v) for v in self._rep)
            if decision == Decision.GRANT:
                self.client.push(self.accum, self.pending_examples)
                self._reset()
            elif decision in (Decision.REJECT, Decision.STOP):
                self._reset()
            if decision == Decision.STOP:
                break
            if portion < 0:
                self._request(eval_id, -1)
                continue
            if eval_id != self.fetched:
                self.client.fetch(self.w)
                if self.w is not self.model.params:
                    self.model.params[:] = self.w
                self.fetched = eval_id
            if self.pending and self.pending_eval != eval_id:
                self._reset()  # never mix evaluations (the coordinator rejects such sets)
            self._compute(batch, lo, hi)
            self.pending.append(portion)
            self.pending_eval = eval_id
            self._request(eval_id, portion)
        self.metrics.write("worker_done", replica=self.replica, portions=self.computed,
                           pushes=self.client.pushes, fetches=self.client.fetches,
                           compute_s=round(self.compute_s, 3), slept_s=round(self.slept_s, 3),
                           wait_s=round(self.wait_s, 3))


class Coordinator:
    """Drives L-BFGS through the shards and schedules every evaluation over the replicas."""

    def __init__(self, cfg, topo, model, dataset, plan, win, metrics, run_dir, t0, fault):
        self.cfg, self.topo, self.model, self.dataset = cfg, topo, model, dataset
        self.plan, self.win, self.metrics, self.run_dir, self.t0 = plan, win, metrics, run_dir, t0
        self.fault = fault
        sb = cfg.sandblaster
        self.vec = ShardVectors(win)
        self.sched = Scheduler(win.comm, topo, sb.portion_size, sb.push_every, sb.backups,
                               fault.check)
        self.objective = SandblasterObjective(self.vec, self.sched, plan, sb.l2)
        self.client = VectorClient(win)
        self.lbfgs = LBFGS(self.vec, self.objective, sb.history, sb.line_search, sb.c1, sb.c2,
                           sb.max_evals, sb.gtol)
        self._seen = 0
        self._iterates = None

    def _fetch(self) -> np.ndarray:
        out = np.zeros(self.model.num_params, np.float64)
        self.client.fetch(out)
        return out

    def _record_iterate(self) -> None:
        append_iterate(self.run_dir / "iterates.h5", self._fetch())  # W == X here

    def _report(self, rec: IterationRecord, t_iter: float) -> dict:
        evals = self.objective.log[self._seen:]
        self._seen = len(self.objective.log)
        for e in evals:
            self.metrics.write("batch", eval=e.eval_id, iteration=rec.iteration, batch=e.batch,
                               examples=e.examples, portions=e.portions, wall_s=e.wall_s,
                               computed=e.computed, backups=e.backups, duplicates=e.duplicates,
                               requeued=e.requeued, stale=e.stale,
                               granted_by_replica=e.granted_by_replica,
                               computed_by_replica=e.computed_by_replica)
        out = {"iteration": rec.iteration, "loss": rec.loss, "grad_norm": rec.grad_norm,
               "step": rec.step, "line_search_evals": rec.evals, "history": rec.history,
               "pair_skipped": rec.pair_skipped, "line_search_ok": rec.line_search_ok,
               "batch": self.objective.batch,
               "batch_time_s": float(np.mean([e.wall_s for e in evals])) if evals else 0.0,
               "iteration_time_s": t_iter,
               "portions": sum(e.computed for e in evals),
               "backups": sum(e.backups for e in evals),
               "duplicates_discarded": sum(e.duplicates for e in evals),
               "requeued": sum(e.requeued for e in evals),
               "train_accuracy": evals[-1].n_correct / evals[-1].examples if evals else 0.0}
        self.metrics.write("lbfgs", **out)
        return out

    def run(self) -> dict:
        sb = self.cfg.sandblaster
        opt = self.lbfgs
        t = time.perf_counter()
        opt.start()
        first = IterationRecord(0, opt.f, opt.grad_norm, 0.0, 1, 0, False, True, False)
        self._report(first, time.perf_counter() - t)
        if sb.record_iterates:
            self._record_iterate()
        log.info("iteration 0 | loss %.6f | |g| %.3e | %d examples in %d portions of %d | "
                 "%d replicas", opt.f, opt.grad_norm, self.plan.size,
                 len(portion_bounds(self.plan.size, sb.portion_size)), sb.portion_size,
                 self.cfg.topology.replicas)
        done, stalled = 0, False
        for _ in range(sb.iterations):
            self.fault.check()
            if opt.grad_norm <= sb.gtol:
                log.info("converged: |g| %.3e <= gtol %.1e", opt.grad_norm, sb.gtol)
                break
            t = time.perf_counter()
            rec = opt.step()
            out = self._report(rec, time.perf_counter() - t)
            if rec.stalled:
                stalled = True
                log.warning("iteration %d: the line search found no acceptable step in %d "
                            "evaluations: stopping", rec.iteration, rec.evals)
                break
            done = rec.iteration
            if sb.record_iterates:
                self._record_iterate()
            log.info("iteration %d | loss %.6f | |g| %.3e | step %.3g | %d evals | batch "
                     "%.3f s | %d portions, %d backups, %d discarded", rec.iteration, rec.loss,
                     rec.grad_norm, rec.step, rec.evals, out["batch_time_s"], out["portions"],
                     out["backups"], out["duplicates_discarded"])
            if not math.isfinite(rec.loss):
                raise TrainingError("the training loss is not finite: try sandblaster.l2 > 0")
        # the final point into W (a stalled line search left a trial point there)
        self.vec.copy(W, X)
        self.vec.flush()
        params = self._fetch()
        self.sched.shutdown()
        self.vec.stop()
        self.model.params[:] = params
        limit = self.cfg.data.eval_limit or None
        x_eval, y_eval = self.dataset.load(self.cfg.data.eval_split, limit=limit)
        test_loss, test_acc = self.model.evaluate(x_eval, y_eval)
        wall = time.time() - self.t0
        self.metrics.write("eval", step=done, loss=test_loss, accuracy=test_acc, wall_s=wall)
        save_params(self.run_dir / "params.h5", params, self.cfg.to_dict()["model"], done)
        evals = self.objective.log
        log.info("done: %d iterations, %d evaluations in %.1f s | train loss %.6f | test loss "
                 "%.4f accuracy %.4f", done, len(evals), wall, opt.f, test_loss, test_acc)
        return {"steps": done, "iterations": done, "wall_s": wall,
                "final_train_loss": opt.f, "final_grad_norm": opt.grad_norm,
                "final_test_loss": test_loss, "final_test_accuracy": test_acc,
                "best_test_accuracy": test_acc, "target_reached": False, "stalled": stalled,
                "evaluations": len(evals),
                "mean_batch_time_s": float(np.mean([e.wall_s for e in evals])),
                "portions_computed": sum(e.computed for e in evals),
                "backups": sum(e.backups for e in evals),
                "duplicates_discarded": sum(e.duplicates for e in evals),
                "command_round_trips": self.vec.round_trips,
                "num_params": self.model.num_params, "interrupted": False}
