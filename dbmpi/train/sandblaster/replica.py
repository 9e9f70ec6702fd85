"""A Sandblaster replica: computes the portions it is handed, sums their gradients in float64
and pushes the sum to the shards when the coordinator grants it."""

from __future__ import annotations

import math
import time

import numpy as np
from mpi4py import MPI

from ...errors import TrainingError
from ...protocol import Tag
from ...ps.vector import VectorClient
from ...topology import COORDINATOR_RANK
from .transport import poll_recv
from .wire import REPLY_SIZE, Decision, decode_reply, encode_request, request_buffer


class Replica:
    """Computes portions, sums their gradients, pushes when granted."""

    def __init__(self, cfg, topo, model, dataset, n_train, plan, win, metrics, fault):
        sb = cfg.sandblaster
        self.model, self.plan, self.metrics, self.fault = model, plan, metrics, fault
        self.replica = topo.index
        self.comm = win.comm
        self.client = VectorClient(win)
        self.x, self.y = dataset.load("train", limit=n_train)
        self.accum = np.zeros(model.num_params, np.float64)
        # fetch W straight into a float64 model's parameters; a float32 one needs a copy
        self.w = model.params if model.params.dtype == np.float64 else \
            np.zeros(model.num_params, np.float64)
        self.slow = sb.slowdown * (sb.straggler_factor if sb.straggler_replica == topo.index
                                   else 1.0)
        self._req = request_buffer(sb.push_every)
        self._rep = np.zeros(REPLY_SIZE, np.float64)
        self._reset()
        self.fetched = -1  # the evaluation whose W the model holds
        self.computed = 0
        self.compute_s = 0.0
        self.slept_s = 0.0
        self.wait_s = 0.0

    def _reset(self) -> None:
        """Forget the pending portions (pushed, or discarded)."""
        self.accum[:] = 0.0
        self.pending: list[int] = []
        self.pending_eval = -1
        self.pending_examples = 0
        self.loss_sum = 0.0
        self.n_correct = 0

    def _request(self, eval_id: int, finished: int) -> None:
        req = encode_request(self._req, eval_id, finished, self.loss_sum, self.n_correct,
                             self.pending)
        self.comm.Send([req, MPI.DOUBLE], COORDINATOR_RANK, Tag.REQUEST)

    def _compute(self, batch: int, lo: int, hi: int) -> None:
        t = time.perf_counter()
        rows = self.plan.rows(batch, lo, hi)
        loss, correct = self.model.forward_backward(self.x[rows], self.y[rows])
        if not math.isfinite(loss):
            raise TrainingError(f"replica {self.replica}: the training loss is {loss}: the "
                                f"model diverged; try sandblaster.l2 > 0 or a smaller model")
        n = hi - lo
        self.accum += n * self.model.grads  # sums of n * mean gradient: / N on the shards
        self.loss_sum += n * loss
        self.n_correct += correct
        self.pending_examples += n
        dt = time.perf_counter() - t
        self.compute_s += dt
        self.computed += 1
        if self.slow > 1:
            # emulate a slower machine; sleeping frees the core for the other ranks
            time.sleep((self.slow - 1) * dt)
            self.slept_s += (self.slow - 1) * dt

    def run(self) -> None:
        self._request(-1, -1)
        while True:
            t = time.perf_counter()
            poll_recv(self.comm, self._rep, COORDINATOR_RANK, Tag.REPLY, 1e-3, self.fault.check)
            self.wait_s += time.perf_counter() - t
            decision, eval_id, batch, portion, lo, hi = decode_reply(self._rep)
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
