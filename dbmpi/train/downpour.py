"""Downpour SGD (Dean et al. 2012, section 4.1): asynchronous replicas, sharded parameters.

Each replica trains on its own shards of the data. Every ``n_fetch`` steps it fetches the
current parameters from the parameter-server shards, and every ``n_push`` steps it pushes the
gradients it accumulated since its last push; the shards apply them (Adagrad by default) as
they arrive. Replicas never wait for each other. Warm start: replica 0 trains alone for
``warm_start_steps`` steps, then releases the others, which start from its parameters.

The coordinator (rank 0) evaluates the current parameters on held-out data every
``eval_every_s`` seconds, logs progress, and raises the STOP flag when ``target_accuracy`` is
reached. A replica stops at its step or epoch budget or at STOP; when every worker is done
(all its pushes acknowledged), the coordinator stops the shards and everyone frees the windows.

Control flags live in a small int64 window on the coordinator (see :data:`COORD_FIELDS`);
every location has one writer op and NO_OP readers, as in :mod:`dbmpi.ps`.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from ..checkpoint import save_params
from ..config import Config
from ..data import open_dataset
from ..errors import TrainingError
from ..faults import Fault
from ..log import get_logger
from ..metrics import MetricsWriter
from ..model import Model
from ..optim import make_optimizer
from ..ps import ParameterServer, ParamLayout, PSClient, ShardService
from ..ps.rma import Window
from ..ps.server import Backoff, request_stop
from ..topology import COORDINATOR_RANK, Role, Topology

log = get_logger("downpour")

# Coordinator window: STOP (coordinator REPLACE), RELEASED (replica 0 REPLACE),
# DONE (workers SUM), STEPS (workers SUM), all read by others with NO_OP.
STOP, RELEASED, DONE, STEPS = 0, 1, 2, 3
COORD_FIELDS = 4


def build_model(cfg: Config, dataset) -> Model:
    return Model.from_config(cfg.model, dataset.feature_shape, dataset.num_classes)


def run(cfg: Config, topo: Topology, run_dir: Path, t0: float) -> dict | None:
    """Run Downpour on this rank; the coordinator returns the summary, others None.

    Collective over ``topo.comm``: every rank must call it.
    """
    dataset = open_dataset(cfg.data.path)
    model = build_model(cfg, dataset)
    layout = ParamLayout.even(model.num_params, cfg.topology.shards)
    ps = ParameterServer(topo, layout, [(0, model.num_params)])
    coord = Window(topo.comm, COORD_FIELDS if topo.role is Role.COORDINATOR else 0, np.int64,
                   "coord")
    metrics = MetricsWriter(run_dir, topo.rank, t0)
    result = None
    service = None
    if topo.role is Role.SHARD:
        init = model.init_params(cfg.run.seed)
        lo, hi = layout.block(topo.index)
        service = ShardService(ps, make_optimizer(cfg.optimizer), init[lo:hi].copy())
    topo.comm.Barrier()  # the shards hold the initial parameters before anyone fetches
    try:
        if service is not None:
            applied = service.serve(heartbeat=Fault(topo.rank).check)
            log.debug("applied %d pushes, busy %.2f s", applied, service.busy_s)
            metrics.write("shard", shard=topo.index, pushes_applied=applied,
                          busy_s=round(service.busy_s, 3))
        elif topo.role is Role.REPLICA:
            Worker(cfg, topo, model, dataset, ps, coord, metrics).run()
        else:
            result = Coordinator(cfg, topo, model, dataset, ps, coord, metrics, run_dir, t0).run()
    finally:
        metrics.close()
    topo.comm.Barrier()  # nobody frees a window another rank still uses
    coord.free()
    ps.free()
    return result


class Worker:
    """One model replica (one partition rank per replica until model parallelism)."""

    def __init__(self, cfg, topo, model, dataset, ps, coord, metrics):
        self.cfg, self.topo, self.model = cfg, topo, model
        self.dp = cfg.downpour
        self.coord = coord
        self.metrics = metrics
        self.replica = topo.index
        self.fault = Fault(topo.rank)
        self.client = PSClient(ps, 0, model.num_params, worker=topo.worker_id,
                               replica=topo.index)
        self.reader = dataset.reader(
            "train", replica=topo.index, num_replicas=cfg.topology.replicas,
            batch_size=cfg.data.batch_size, shuffle_buffer=cfg.data.shuffle_buffer,
            seed=cfg.run.seed * 1000 + topo.index)

    def _coord(self, field: int) -> int:
        return self.coord.load(COORDINATOR_RANK, field)

    def _wait_release(self) -> bool:
        """Replicas other than 0 wait for the warm start to end; False if STOP came first."""
        backoff = Backoff(cap=0.01)
        while not self._coord(RELEASED):
            if self._coord(STOP):
                return False
            backoff.wait()
        return True

    def _release(self) -> None:
        self.client.wait_acknowledged()
        self.coord.store(1, COORDINATOR_RANK, RELEASED)
        log.info("warm start over: other replicas released")

    def run(self) -> None:
        dp, model, client = self.dp, self.model, self.client
        warm = dp.warm_start_steps > 0 and self.cfg.topology.replicas > 1
        if warm and self.replica != 0 and not self._wait_release():
            self._finish(0)
            return
        client.fetch(model.params)
        accum = np.zeros_like(model.grads) if dp.n_push > 1 else None
        step, pending = 0, 0
        self.step = 0
        win_loss, win_correct, win_n, win_t = 0.0, 0, 0, time.perf_counter()
        while True:
            if dp.steps and step >= dp.steps:
                break
            if dp.epochs and self.reader.epochs_done >= dp.epochs:
                break
            if self._coord(STOP):
                break
            self.fault.check()
            if step and step % dp.n_fetch == 0:
                client.fetch(model.params, read_own_pushes=dp.read_own_pushes)
            x, y = self.reader.next_batch()
            loss, correct = model.forward_backward(x, y)
            if not math.isfinite(loss):
                raise TrainingError(
                    f"replica {self.replica}: the training loss is {loss} at step {step}: lower "
                    f"optimizer.learning_rate (now {self.cfg.optimizer.learning_rate})")
            if accum is None:
                client.push(model.grads)
            else:
                accum += model.grads
                pending += 1
                if pending == dp.n_push:
                    client.push(accum)
                    accum[:] = 0
                    pending = 0
            step += 1
            self.step = step
            win_loss += loss * len(y)
            win_correct += correct
            win_n += len(y)
            if warm and self.replica == 0 and step == dp.warm_start_steps:
                self._release()
            if step % dp.log_every == 0:
                now = time.perf_counter()
                self.metrics.write("train", replica=self.replica, step=step,
                                   epoch=round(self.reader.epochs_done, 4),
                                   loss=win_loss / win_n, accuracy=win_correct / win_n,
                                   samples_per_s=win_n / (now - win_t))
                self.coord.accumulate(np.array([dp.log_every], np.int64), COORDINATOR_RANK,
                                      STEPS)
                self.coord.flush(COORDINATOR_RANK)
                win_loss, win_correct, win_n, win_t = 0.0, 0, 0, now
                self._log_staleness()
        if accum is not None and pending:
            client.push(accum)
        client.wait_acknowledged()
        self._log_staleness()
        if warm and self.replica == 0 and step < dp.warm_start_steps:
            self._release()  # never leave the others waiting
        self._finish(step)

    def _log_staleness(self) -> None:
        """One ``push`` record per acknowledged push: its staleness on each shard."""
        by_push: dict[int, list] = {}
        per_shard = self.client.drain_staleness()
        for i, records in enumerate(per_shard):
            for push, staleness in records:
                by_push.setdefault(push, [None] * len(per_shard))[i] = staleness
        for push in sorted(by_push):
            self.metrics.write("push", replica=self.replica, push=push,
                               step=min(push * self.dp.n_push, self.step),
                               staleness=by_push[push])

    def _finish(self, step: int) -> None:
        self.coord.accumulate(np.array([step % self.dp.log_every], np.int64), COORDINATOR_RANK,
                              STEPS)
        self.coord.accumulate(np.array([1], np.int64), COORDINATOR_RANK, DONE)
        self.coord.flush(COORDINATOR_RANK)
        self.metrics.write("worker_done", replica=self.replica, steps=step,
                           fetch_push_wait_s=round(self.client.wait_s, 3))


class Coordinator:
    """Evaluates, reports progress, decides when to stop, writes the results."""

    def __init__(self, cfg, topo, model, dataset, ps, coord, metrics, run_dir, t0):
        self.cfg, self.topo, self.model, self.ps = cfg, topo, model, ps
        self.coord, self.metrics, self.run_dir, self.t0 = coord, metrics, run_dir, t0
        limit = cfg.data.eval_limit or None
        self.x_eval, self.y_eval = dataset.load(cfg.data.eval_split, limit=limit)
        self.client = PSClient(ps, 0, model.num_params)
        self.best = 0.0
        self.history: list[dict] = []

    def evaluate(self, steps: int) -> dict:
        self.client.fetch(self.model.params)
        if not np.isfinite(self.model.params).all():
            raise TrainingError("the parameters on the shards hold NaN or Inf: training "
                                "diverged; lower optimizer.learning_rate")
        loss, acc = self.model.evaluate(self.x_eval, self.y_eval)
        rec = {"step": steps, "loss": loss, "accuracy": acc,
               "wall_s": time.time() - self.t0}
        self.metrics.write("eval", **rec)
        self.history.append(rec)
        return rec

    def run(self) -> dict:
        dp = self.cfg.downpour
        R = self.cfg.topology.replicas
        workers = self.topo.num_workers
        total = dp.steps * R if dp.steps else 0
        next_eval = time.time() + dp.eval_every_s
        last_steps, last_t = 0, time.time()
        stopped_early = False
        fault = Fault(self.topo.rank)
        while True:
            fault.check()
            if self.coord.load(COORDINATOR_RANK, DONE) >= workers:
                break
            now = time.time()
            if now >= next_eval:
                steps = self.coord.load(COORDINATOR_RANK, STEPS)
                rec = self.evaluate(steps)
                rate = (steps - last_steps) * self.cfg.data.batch_size / (now - last_t)
                last_steps, last_t = steps, now
                pct = f" ({100 * steps / total:.0f}%)" if total else ""
                log.info("step %d%s | %.0f samples/s | test loss %.4f accuracy %.4f | %.1f s",
                         steps, pct, rate, rec["loss"], rec["accuracy"], now - self.t0)
                if dp.target_accuracy and rec["accuracy"] >= dp.target_accuracy \
                        and not stopped_early:
                    log.info("target accuracy %.4f reached: stopping", dp.target_accuracy)
                    self.coord.store(1, COORDINATOR_RANK, STOP)
                    stopped_early = True
                next_eval = time.time() + dp.eval_every_s
            time.sleep(0.02)
        # Every worker's pushes are acknowledged: the shards hold the final parameters.
        steps = self.coord.load(COORDINATOR_RANK, STEPS)
        final = self.evaluate(steps)
        request_stop(self.ps)
        save_params(self.run_dir / "params.h5", self.model.params, self.cfg.to_dict()["model"],
                    steps)
        wall = time.time() - self.t0
        log.info("done: %d steps in %.1f s | final test loss %.4f accuracy %.4f",
                 steps, wall, final["loss"], final["accuracy"])
        return {"steps": steps, "wall_s": wall, "final_test_loss": final["loss"],
                "final_test_accuracy": final["accuracy"],
                "best_test_accuracy": max(r["accuracy"] for r in self.history),
                "target_reached": bool(dp.target_accuracy and (
                    stopped_early or final["accuracy"] >= dp.target_accuracy)),
                "num_params": self.model.num_params}
