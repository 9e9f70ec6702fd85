"""The coordinator (rank 0): drives L-BFGS through the shards and runs every function
evaluation over the replicas.

:class:`Dispatcher` is the scheduler's MPI side: it receives the replicas' requests, hands
them to the pure :class:`~.scheduler.PortionScheduler` and sends the replies it returns.
"""

from __future__ import annotations

import math
import time

import numpy as np
from mpi4py import MPI

from ...checkpoint import append_iterate, save_params
from ...errors import TrainingError
from ...log import get_logger
from ...optim.lbfgs import LBFGS, IterationRecord, W, X
from ...protocol import Tag
from ...ps.vector import ShardVectors, VectorClient
from ...topology import Topology
from .objective import SandblasterObjective
from .plan import portion_bounds
from .scheduler import EvalStats, PortionScheduler, Reply
from .transport import poll_recv
from .wire import REPLY_SIZE, decode_request, encode_reply, request_buffer

log = get_logger("sandblaster")


class Dispatcher:
    """The coordinator's message loop around the :class:`~.scheduler.PortionScheduler`: requests in,
    replies out, replicas translated between ranks and indices."""

    def __init__(self, comm: MPI.Comm, topo: Topology, portion_size: int, push_every: int,
                 backups: bool, heartbeat=None):
        self.comm = comm
        self.sched = PortionScheduler(topo.cfg.replicas, portion_size, push_every, backups)
        self.rank_of = [topo.worker_rank(r) for r in range(self.sched.R)]
        self.replica_of = {rank: r for r, rank in enumerate(self.rank_of)}
        self.heartbeat = heartbeat
        self._req = request_buffer(push_every)
        self._rep = np.zeros(REPLY_SIZE, np.float64)

    # the scheduler's state, for callers (and tests) that drive a Dispatcher directly
    @property
    def complete(self) -> bool:
        return self.sched.complete

    @property
    def stats(self) -> EvalStats:
        return self.sched.stats

    def start_eval(self, batch: int, n_examples: int) -> None:
        """Open the next evaluation and give work to the replicas waiting for it."""
        self._send(self.sched.start_eval(batch, n_examples))

    def handle(self, src: int, request: np.ndarray) -> None:
        """Process one request from rank ``src`` (received elsewhere; for tests)."""
        self._req[:len(request)] = request
        self._handle(src)

    def run_eval(self, batch: int, n_examples: int) -> EvalStats:
        """Schedule one pass over ``batch`` (``n_examples`` examples) until every portion is
        granted. The pushes may still be landing: the shards wait for them."""
        self.start_eval(batch, n_examples)
        while not self.sched.complete:
            self._handle(self._recv(2e-4))
        assert self.sched.examples_granted == n_examples
        return self.sched.stats

    def shutdown(self) -> None:
        """Tell every replica to stop (those still computing, once they ask again)."""
        self._send(self.sched.shutdown())
        while not self.sched.all_stopped:
            self._handle(self._recv(1e-3))

    def _recv(self, cap: float) -> int:
        return poll_recv(self.comm, self._req, MPI.ANY_SOURCE, Tag.REQUEST, cap, self.heartbeat)

    def _handle(self, src: int) -> None:
        r = self.replica_of[src]
        self._send(self.sched.request(r, *decode_request(self._req)))

    def _send(self, replies: list[Reply]) -> None:
        s = self.sched
        for rep in replies:
            bounds = s.bounds[rep.portion] if rep.portion >= 0 else None
            encode_reply(self._rep, rep.decision, s.eval_id, s.batch, rep.portion, bounds)
            self.comm.Send([self._rep, MPI.DOUBLE], self.rank_of[rep.replica], Tag.REPLY)


class Coordinator:
    """Drives L-BFGS through the shards and schedules every evaluation over the replicas."""

    def __init__(self, cfg, topo, model, dataset, plan, win, metrics, run_dir, t0, fault):
        self.cfg, self.model, self.dataset, self.plan = cfg, model, dataset, plan
        self.metrics, self.run_dir, self.t0, self.fault = metrics, run_dir, t0, fault
        sb = cfg.sandblaster
        self.vec = ShardVectors(win)
        self.dispatcher = Dispatcher(win.comm, topo, sb.portion_size, sb.push_every,
                                     sb.backups, fault.check)
        self.objective = SandblasterObjective(self.vec, self.dispatcher, plan, sb.l2)
        self.client = VectorClient(win)
        self.lbfgs = LBFGS(self.vec, self.objective, sb.history, sb.line_search, sb.c1, sb.c2,
                           sb.max_evals, sb.gtol)
        self._seen = 0  # evaluations already reported

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
        self.dispatcher.shutdown()
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
