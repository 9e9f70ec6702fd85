"""A Downpour replica rank: the training loop, its fetches and pushes, and control.

See :mod:`dbmpi.train.downpour` for the algorithm and :mod:`.control` for the flags it reads.
"""

from __future__ import annotations

import math
import time

import numpy as np

from ...errors import TrainingError
from ...faults import TERMINATION, Fault, KillPoint
from ...log import get_logger
from ...protocol import Flag
from ...ps import PSClient
from ...ps.server import Backoff
from .. import partitioned
from .bound import StalenessBound
from .control import Control

log = get_logger("downpour")


class TermReporter:
    """Forward this rank's SIGTERM to the coordinator's TERM flag, once."""

    def __init__(self, coord: Control):
        self.coord = coord
        self.sent = False

    def check(self) -> None:
        if TERMINATION.requested and not self.sent:
            self.coord.terminate()
            self.sent = True


class Worker:
    """One rank of a model replica: the whole model, or one partition of it (P > 1)."""

    def __init__(self, cfg, topo, model, dataset, ps, coord, metrics, resume=None):
        self.cfg, self.topo, self.model = cfg, topo, model
        self.dp = cfg.downpour
        self.coord = coord
        self.metrics = metrics
        self.replica = topo.index
        self.worker = topo.worker_id
        if hasattr(model, "seed_training"):  # each replica its own dropout masks, corruptions
            model.seed_training([cfg.run.seed, self.worker])
        self.fault = Fault(topo.rank)
        self.term = TermReporter(coord)
        self.client = PSClient(ps, *model.param_range, worker=self.worker, replica=topo.index)
        self.client.report_fetch = self.dp.staleness_aware
        self.client.record_order = cfg.run.record_order
        kill = KillPoint(topo.rank)
        if kill.active:
            self.client.on_post = lambda shards: kill.at(self.client.pushes + 1, shards)
        self.reader = dataset.reader(
            "train", replica=topo.index, num_replicas=cfg.topology.replicas,
            batch_size=cfg.data.batch_size, shuffle_buffer=cfg.data.shuffle_buffer,
            seed=cfg.run.seed * 1000 + topo.index)
        self.step = 0
        self.answered = 0
        R = cfg.topology.replicas
        self.bound = (StalenessBound(self.client, self.worker,
                                     [r for r in range(R) if r != topo.index],
                                     self.dp.max_staleness)
                      if self.dp.max_staleness >= 0 and R > 1 else None)
        self._staleness: dict[int, list] = {}  # push -> staleness per shard, until complete
        self._head = np.zeros(len(Flag), np.int64)
        if resume is not None:
            step, epoch, position = (int(v) for v in resume.workers[self.worker])
            state = self.reader.state()
            state.update(epoch=epoch, position=position)
            self.reader.restore(state)
            self.step = step
            self.answered = resume.sequence

    def _read_head(self) -> np.ndarray:
        if self.topo.partition == 0:  # the partitions of a replica act on one reading
            np.copyto(self._head, self.coord.read_flags())
        return partitioned.agree(self.topo, self._head)

    def _publish_state(self) -> None:
        st = self.reader.state()
        self.coord.report(self.worker, STEP=self.step, EPOCH=st["epoch"],
                          POSITION=st["position"])

    def _service(self, head: np.ndarray) -> None:
        """Per-step control: faults, SIGTERM, and checkpoint requests (pause until done)."""
        self.fault.check()
        self.term.check()
        k = int(head[Flag.CKPT_REQ])
        if k <= self.answered:
            return
        self.client.wait_acknowledged()
        self._publish_state()
        self.coord.report(self.worker, ACK=k)
        self.answered = k
        backoff = Backoff(cap=0.005)
        while True:
            head = self._read_head()
            if head[Flag.CKPT_DONE] >= k or head[Flag.STOP]:
                return
            self.fault.check()
            self.coord.beat(self.step)
            backoff.wait()

    def _wait_release(self) -> bool:
        """Replicas other than 0 wait for the warm start to end; False if STOP came first."""
        backoff = Backoff(cap=0.01)
        while True:
            head = self._read_head()
            if head[Flag.RELEASED]:
                return True
            if head[Flag.STOP]:
                return False
            self._service(head)
            self.coord.beat(self.step)
            backoff.wait()

    def _release(self) -> None:
        self.client.wait_acknowledged()
        if self.topo.cfg.partitions > 1:
            self.topo.comm_replica.Barrier()  # every partition's pushes are applied
        self.metrics.write("released", replica=self.replica, step=self.step)
        self.coord.raise_flag(Flag.RELEASED, 1)
        log.info("warm start over: other replicas released")

    def _go_on(self) -> bool:
        """While waiting on the staleness bound: serve checkpoints, send heartbeats; False
        once told to stop."""
        head = self._read_head()
        if head[Flag.STOP] or head[Flag.TEARDOWN]:
            return False
        self._service(head)
        self.coord.beat(self.step)
        return True

    def _budget_spent(self) -> bool:
        dp = self.dp
        return bool((dp.steps and self.step >= dp.steps)
                    or (dp.epochs and self.reader.epochs_done >= dp.epochs))

    def run(self) -> None:
        dp, model, client = self.dp, self.model, self.client
        warm = dp.warm_start_steps > 0 and self.cfg.topology.replicas > 1
        if warm and self.replica != 0 and not self._wait_release():
            self._finish()
            return
        self.metrics.write("started", replica=self.replica, step=self.step)
        if self.bound is not None:
            self.bound.before_fetch(client.pushes + 1, self._go_on)
        client.fetch(model.params)
        # The gradient goes straight into a push slot of my window, which the shards pull:
        # the backward pass writes it there when the model can (`direct`; with n_push > 1 the
        # later steps' backward passes add to it), else it is copied or summed there. `accum`
        # is the slot being filled.
        direct = hasattr(model, "set_grads") and (dp.n_push == 1 or model.can_accumulate)
        accum = None
        pending, start_step = 0, self.step
        slow = self.replica == dp.straggler_replica and dp.straggler_factor > 1
        win_loss, win_correct, win_n, win_t = 0.0, 0, 0, time.perf_counter()
        win_fetch = win_push = win_ctrl = 0.0  # seconds in fetch, push, control this window
        win_bytes = np.zeros(3, np.int64)  # bytes fetched, bytes pushed, rows pushed
        win_bytes[0] = 4 * (client.stop - client.start)  # the first fetch, above
        win_pushes = 0
        while not self._budget_spent():
            t_step = time.perf_counter()
            self.coord.beat(self.step)
            head = self._read_head()
            if head[Flag.STOP] or head[Flag.TEARDOWN]:  # TEARDOWN here: my replica is lost
                break
            self._service(head)
            if self.bound is not None and pending == 0 and self.step > start_step:
                # the fetch for push q follows
                self.bound.before_fetch(client.pushes + 1, self._go_on)
            win_ctrl += time.perf_counter() - t_step
            x, y = self.reader.next_batch()
            if self.step > start_step and (self.step - start_step) % dp.n_fetch == 0:
                t_fetch = time.perf_counter()
                win_bytes[0] += self._fetch(x, y)
                win_fetch += time.perf_counter() - t_fetch
            if direct and pending == 0:
                t_push = time.perf_counter()
                accum = client.push_buffer()  # waits only if the shards still pull it
                model.set_grads(accum)
                win_push += time.perf_counter() - t_push
            if direct and pending:
                loss, correct = model.forward_backward(x, y, accumulate=True)
            else:
                loss, correct = model.forward_backward(x, y)
            if not math.isfinite(loss):
                raise TrainingError(
                    f"replica {self.replica}: the training loss is {loss} at step {self.step}: "
                    f"lower optimizer.learning_rate (now {self.cfg.optimizer.learning_rate})")
            t_push = time.perf_counter()
            if not direct:
                if pending == 0:
                    accum = client.push_buffer()
                    np.copyto(accum, model.grads)
                else:
                    accum += model.grads
            pending += 1
            if pending == dp.n_push:
                win_bytes[1:] += self._push(accum)  # no copy: accum is the slot
                win_pushes += 1
                pending = 0
            win_push += time.perf_counter() - t_push
            self.step += 1
            if slow:
                time.sleep((dp.straggler_factor - 1) * (time.perf_counter() - t_step))
            win_loss += loss * len(y)
            win_correct += correct
            win_n += len(y)
            if warm and self.replica == 0 and self.step == dp.warm_start_steps:
                self._release()
            if self.step % dp.log_every == 0:
                now = time.perf_counter()
                steps = win_n // len(y)
                extra = partitioned.train_fields(model, self.topo, steps)
                if extra is not None:  # one record and one STEPS count per replica
                    extra.update(fetch_bytes=round(win_bytes[0] / steps),
                                 push_bytes=round(win_bytes[1] / steps))
                    if self.counts_rows:
                        extra["rows"] = round(win_bytes[2] / max(win_pushes, 1), 1)
                    self.metrics.write("train", replica=self.replica, step=self.step,
                                       epoch=round(self.reader.epochs_done, 4),
                                       loss=win_loss / win_n, accuracy=win_correct / win_n,
                                       samples_per_s=win_n / (now - win_t),
                                       fetch_fraction=round(win_fetch / (now - win_t), 4),
                                       push_fraction=round(win_push / (now - win_t), 4),
                                       ctrl_fraction=round(win_ctrl / (now - win_t), 4),
                                       **extra)
                    self.coord.report_steps(steps)
                win_loss, win_correct, win_n, win_t = 0.0, 0, 0, now
                win_fetch = win_push = win_ctrl = 0.0
                win_bytes[:] = 0
                win_pushes = 0
                self._log_staleness()
        if pending:
            self._push(accum)
        client.wait_acknowledged()
        self._log_staleness()
        if warm and self.replica == 0 and self.step < dp.warm_start_steps:
            self._release()  # never leave the others waiting
        if win_n and self.topo.partition == 0:
            self.coord.report_steps(win_n // self.cfg.data.batch_size)
        self._finish()

    # the transport hooks: SparseWorker (dbmpi/train/downpour/sparse_worker.py) moves only the
    # embedding rows a minibatch touches; train records then also carry rows per push
    counts_rows = False

    def _fetch(self, x: np.ndarray, y: np.ndarray) -> int:
        """Fetch the parameters the step on minibatch ``(x, y)`` reads; returns the bytes."""
        self.client.fetch(self.model.params, read_own_pushes=self.dp.read_own_pushes)
        return 4 * (self.client.stop - self.client.start)

    def _push(self, accum: np.ndarray) -> tuple[int, int]:
        """Push the gradient summed in ``accum``; returns (bytes pushed, rows pushed)."""
        if self.bound is not None:
            self.bound.before_post(self.client.pushes + 1, self._go_on)
        self.client.push(accum)
        return 4 * (self.client.stop - self.client.start), 0

    def _log_staleness(self) -> None:
        """One ``push`` record per push acknowledged by every shard: its staleness on each.

        Shards acknowledge independently (two pushes may be in flight), so a push seen by
        some shards only waits here for the next call.
        """
        per_shard = self.client.drain_staleness()
        for i, records in enumerate(per_shard):
            for push, staleness in records:
                self._staleness.setdefault(push, [None] * len(per_shard))[i] = staleness
        for push in sorted(self._staleness):
            values = self._staleness[push]
            if any(v is None for v in values):
                break
            del self._staleness[push]
            self.metrics.write("push", replica=self.replica, partition=self.topo.partition,
                               push=push, step=min(push * self.dp.n_push, self.step),
                               staleness=values)

    def _finish(self) -> None:
        """Publish the final state, then tell the coordinator this worker is done."""
        self.client.retire()  # replicas bounding their staleness stop waiting for me
        st = self.reader.state()
        self.coord.finish(self.worker, self.step, st["epoch"], st["position"])
        self.metrics.write("worker_done", replica=self.replica, partition=self.topo.partition,
                           steps=self.step,
                           fetch_push_wait_s=round(self.client.wait_s, 3),
                           bound_wait_s=round(self.bound.wait_s if self.bound else 0.0, 3))
