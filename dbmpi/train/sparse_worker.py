"""The Downpour replica loop with sparse embedding traffic (``downpour.sparse = true``).

Same control flow as :class:`dbmpi.train.downpour.Worker` (checkpoint pauses, STOP, warm
start, staleness records), with three differences, see :mod:`dbmpi.ps.sparse`:

* the minibatch is read *before* a fetch, which then reads the dense rest of the model and
  only the embedding rows of that minibatch's words;
* the embedding layer keeps its gradient as (rows, row gradients); every ``n_push`` steps the
  touched rows (duplicates summed) and the dense rest's gradient are pushed;
* ``train`` records carry ``fetch_bytes`` and ``push_bytes`` (parameter and gradient bytes
  per step, row ids included in pushes) and ``rows`` (unique rows per push).
"""

from __future__ import annotations

import math
import time

import numpy as np

from ..errors import TrainingError
from ..ps.sparse import SparseClient, embedding_of
from ..topology import COORDINATOR_RANK
from .downpour import STEPS, STOP, Worker


class SparseWorker(Worker):
    def __init__(self, cfg, topo, model, dataset, ps, coord, metrics, resume=None):
        super().__init__(cfg, topo, model, dataset, ps, coord, metrics, resume)
        self.client = SparseClient(ps, *model.param_range, worker=self.worker,
                                   replica=topo.index)
        self.emb = embedding_of(model)
        self.emb.sparse = True

    def run(self) -> None:
        dp, model, client, emb = self.dp, self.model, self.client, self.emb
        warm = dp.warm_start_steps > 0 and self.cfg.topology.replicas > 1
        if warm and self.replica != 0 and not self._wait_release():
            self._finish()
            return
        self.metrics.write("started", replica=self.replica, step=self.step)
        client.fetch(model.params)  # the whole vector once
        accum = None
        pending, start_step = 0, self.step
        win_loss, win_correct, win_n, win_t = 0.0, 0, 0, time.perf_counter()
        win_fetch = win_push = 0.0
        win_fbytes = win_pbytes = win_rows = win_pushes = 0
        while not self._budget_spent():
            head = self._read_head()
            if head[STOP]:
                break
            self._service(head)
            t_step = time.perf_counter()
            x, y = self.reader.next_batch()
            if self.step > start_step and (self.step - start_step) % dp.n_fetch == 0:
                rows = np.unique(x).astype(np.int64)
                win_fbytes += client.fetch_rows(model.params, rows,
                                                read_own_pushes=dp.read_own_pushes)
                win_fetch += time.perf_counter() - t_step
            if pending == 0:
                t_push = time.perf_counter()
                accum = client.push_buffer()  # waits only if the shards still pull it
                model.set_grads(accum)
                win_push += time.perf_counter() - t_push
            loss, correct = model.forward_backward(x, y, accumulate=pending > 0)
            if not math.isfinite(loss):
                raise TrainingError(
                    f"replica {self.replica}: the training loss is {loss} at step {self.step}: "
                    f"lower optimizer.learning_rate (now {self.cfg.optimizer.learning_rate})")
            t_push = time.perf_counter()
            pending += 1
            if pending == dp.n_push:
                rows, grad_rows = emb.take_rows()
                win_pbytes += client.push_rows(accum, rows, grad_rows)
                win_rows += rows.shape[0]
                win_pushes += 1
                pending = 0
            win_push += time.perf_counter() - t_push
            self.step += 1
            win_loss += loss * len(y)
            win_correct += correct
            win_n += len(y)
            if warm and self.replica == 0 and self.step == dp.warm_start_steps:
                self._release()
            if self.step % dp.log_every == 0:
                now = time.perf_counter()
                steps = max(win_n // len(y), 1)
                self.metrics.write("train", replica=self.replica, step=self.step,
                                   epoch=round(self.reader.epochs_done, 4),
                                   loss=win_loss / win_n, accuracy=win_correct / win_n,
                                   samples_per_s=win_n / (now - win_t),
                                   fetch_fraction=round(win_fetch / (now - win_t), 4),
                                   push_fraction=round(win_push / (now - win_t), 4),
                                   fetch_bytes=round(win_fbytes / steps),
                                   push_bytes=round(win_pbytes / steps),
                                   rows=round(win_rows / max(win_pushes, 1), 1))
                self.coord.accumulate(np.array([steps], np.int64), COORDINATOR_RANK, STEPS)
                self.coord.flush(COORDINATOR_RANK)
                win_loss, win_correct, win_n, win_t = 0.0, 0, 0, now
                win_fetch = win_push = 0.0
                win_fbytes = win_pbytes = win_rows = win_pushes = 0
                self._log_staleness()
        if pending:
            rows, grad_rows = emb.take_rows()
            client.push_rows(accum, rows, grad_rows)
        client.wait_acknowledged()
        self._log_staleness()
        if warm and self.replica == 0 and self.step < dp.warm_start_steps:
            self._release()
        if win_n:
            self.coord.accumulate(np.array([win_n // self.cfg.data.batch_size], np.int64),
                                  COORDINATOR_RANK, STEPS)
        self._finish()

