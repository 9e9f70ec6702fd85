"""Downpour SGD (Dean et al. 2012, section 4.1): asynchronous replicas, sharded parameters.

Each replica trains on its own shards of the data. Every ``n_fetch`` steps it fetches the
current parameters from the parameter-server shards, and every ``n_push`` steps it pushes the
gradients it accumulated since its last push; the shards apply them (Adagrad by default) as
they arrive. Replicas never wait for each other. Warm start: replica 0 trains alone for
``warm_start_steps`` steps, then releases the others, which start from its parameters.

The coordinator (rank 0) evaluates the current parameters on held-out data every
``eval_every_s`` seconds (or, with ``record_iterates``, only records them to be evaluated
after the run, so that evaluating takes no core from the replicas), logs progress, and raises
STOP when ``target_accuracy`` is reached or any rank received SIGTERM. A replica stops at its
step or epoch budget or at STOP; when every worker is finished (all its pushes acknowledged),
the coordinator has the shards write a last checkpoint, stops them, and everyone frees the
windows.

Checkpoints (:mod:`dbmpi.checkpoint`): every ``checkpoint.every_s`` seconds the coordinator
raises CKPT_REQ = k; each worker, at its next step boundary, waits until its pushes are
applied, publishes its step and data position, acknowledges k and pauses; when every worker
has acknowledged (or finished), each shard writes its block and optimizer state, the
coordinator commits the checkpoint directory and raises CKPT_DONE = k, and workers go on. The
pause makes the checkpoint consistent: no push is in flight while the shards write.

Control flags and reports go through :mod:`dbmpi.train.control` (flags in the workers' memory,
reports on the coordinator's board), so that no per-step operation waits for the coordinator.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from .. import checkpoint as ckpt_mod
from ..config import Config
from ..data import open_dataset
from ..errors import TrainingError
from ..faults import TERMINATION, Fault, checkpoint_delay
from ..log import get_logger
from ..metrics import MetricsWriter
from ..model import Model
from ..optim import make_optimizer
from ..protocol import Board, Flag, Row
from ..ps import ParameterServer, ParamLayout, PSClient, ShardService
from ..ps.server import Backoff, request_checkpoint, request_stop
from ..topology import Role, Topology
from . import partitioned
from .control import HEAD, ROW, Control

log = get_logger("downpour")


def build_model(cfg: Config, dataset) -> Model:
    return Model.from_config(cfg.model, dataset.feature_shape, dataset.num_classes)


def run(cfg: Config, topo: Topology, run_dir: Path, t0: float,
        resume: ckpt_mod.Checkpoint | None = None) -> dict | None:
    """Run Downpour on this rank; the coordinator returns the summary, others None.

    Collective over ``topo.comm``: every rank must call it. ``resume`` continues from a
    checkpoint (its parameters, optimizer state, step counts and data positions).
    """
    dataset = open_dataset(cfg.data.path)
    model = build_model(cfg, dataset)
    sparse = _sparse_parts(cfg, model)  # None: dense traffic (every model without a table)
    if sparse is None:
        layout = ParamLayout.even(model.num_params, cfg.topology.shards)
        ps = ParameterServer(topo, layout, partitioned.param_ranges(cfg, model, dataset))
    else:
        layout, ps = sparse["layout"], sparse["ps"](topo)
    coord = Control(topo)
    if resume is not None:  # every rank writes only its own memory here
        if coord.flags.local.size:
            coord.flags.local[Flag.RELEASED] = 1  # no second warm start
        if topo.role is Role.COORDINATOR:
            board = coord.board.local
            board[Board.STEPS] = int(resume.workers[:, 0].sum()) // cfg.topology.partitions
            rows = board[HEAD:].reshape(-1, ROW)
            rows[:, Row.STEP:Row.POSITION + 1] = resume.workers
        for win in (coord.flags, coord.board):
            win.sync()
    metrics = MetricsWriter(run_dir, topo.rank, t0)
    service = None
    if topo.role is Role.SHARD:
        lo, hi = layout.block(topo.index)
        if resume is None:
            init = partitioned.initial_params(cfg, model, dataset)[lo:hi].copy()
            state, applied = None, 0
        else:
            (init, state), applied = resume.load_block(lo, hi), 0

        delay = checkpoint_delay()

        def write_checkpoint(sequence: int, svc: ShardService) -> None:
            ckpt_mod.write_shard(run_dir, sequence, topo.index, lo, hi, svc.params, svc.state,
                                 svc.applied, svc.optimizer.state_names)
            if delay:
                time.sleep(delay)

        service = (ShardService if sparse is None else sparse["service"])(
                               ps, make_optimizer(cfg.optimizer), init, state, applied,
                               on_checkpoint=write_checkpoint)
    topo.comm.Barrier()  # the shards hold the initial parameters before anyone fetches
    result = None
    try:
        if service is not None:
            fault = Fault(topo.rank)
            term = _TermReporter(coord)

            def heartbeat():
                fault.check()
                term.check()

            applied = service.serve(heartbeat=heartbeat)
            metrics.write("shard", shard=topo.index, pushes_applied=applied,
                          inbox_workers=sum(s == topo.index for s, _ in ps.inbox_at),
                          busy_s=round(service.busy_s, 3),
                          busy_cpu_s=round(service.busy_cpu_s, 3))
        elif topo.role is Role.REPLICA:
            (Worker if sparse is None else sparse["worker"])(
                   cfg, topo, partitioned.replica_model(cfg, topo, model, dataset), dataset, ps,
                   coord, metrics, resume).run()
        else:
            result = Coordinator(cfg, topo, model, dataset, ps, coord, metrics, run_dir, t0,
                                 resume).run()
    finally:
        metrics.close()
    topo.comm.Barrier()  # nobody frees a window another rank still uses
    coord.free()
    ps.free()
    return result


def _sparse_parts(cfg: Config, model) -> dict | None:
    """The sparse-embedding variants of the layout, PS, shard loop and worker (see
    :mod:`dbmpi.ps.sparse`), or None when the run moves whole vectors."""
    from ..ps import sparse

    if not sparse.enabled(cfg, model):
        return None
    from .sparse_worker import SparseWorker

    emb = sparse.embedding_of(model)
    layout = sparse.row_layout(model.num_params, cfg.topology.shards, emb.vocab, emb.dim)
    return {"layout": layout, "service": sparse.SparseShardService, "worker": SparseWorker,
            "ps": lambda topo: sparse.SparseParameterServer(
                topo, layout, [(0, model.num_params)], emb.vocab, emb.dim,
                sparse.max_rows(cfg, model))}


class _TermReporter:
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
        self.term = _TermReporter(coord)
        self.client = PSClient(ps, *model.param_range, worker=self.worker, replica=topo.index)
        self.reader = dataset.reader(
            "train", replica=topo.index, num_replicas=cfg.topology.replicas,
            batch_size=cfg.data.batch_size, shuffle_buffer=cfg.data.shuffle_buffer,
            seed=cfg.run.seed * 1000 + topo.index)
        self.step = 0
        self.answered = 0
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
            backoff.wait()

    def _release(self) -> None:
        self.client.wait_acknowledged()
        if self.topo.cfg.partitions > 1:
            self.topo.comm_replica.Barrier()  # every partition's pushes are applied
        self.metrics.write("released", replica=self.replica, step=self.step)
        self.coord.raise_flag(Flag.RELEASED, 1)
        log.info("warm start over: other replicas released")

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
            head = self._read_head()
            if head[Flag.STOP]:
                break
            self._service(head)
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

    # the transport hooks: SparseWorker (dbmpi/train/sparse_worker.py) moves only the
    # embedding rows a minibatch touches; train records then also carry rows per push
    counts_rows = False

    def _fetch(self, x: np.ndarray, y: np.ndarray) -> int:
        """Fetch the parameters the step on minibatch ``(x, y)`` reads; returns the bytes."""
        self.client.fetch(self.model.params, read_own_pushes=self.dp.read_own_pushes)
        return 4 * (self.client.stop - self.client.start)

    def _push(self, accum: np.ndarray) -> tuple[int, int]:
        """Push the gradient summed in ``accum``; returns (bytes pushed, rows pushed)."""
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
        st = self.reader.state()
        self.coord.finish(self.worker, self.step, st["epoch"], st["position"])
        self.metrics.write("worker_done", replica=self.replica, partition=self.topo.partition,
                           steps=self.step,
                           fetch_push_wait_s=round(self.client.wait_s, 3))


class Coordinator:
    """Evaluates, reports progress, checkpoints, decides when to stop, writes the results."""

    def __init__(self, cfg, topo, model, dataset, ps, coord, metrics, run_dir, t0, resume):
        self.cfg, self.topo, self.model, self.ps = cfg, topo, model, ps
        self.coord, self.metrics, self.run_dir, self.t0 = coord, metrics, run_dir, t0
        limit = cfg.data.eval_limit or None
        self.x_eval, self.y_eval = dataset.load(cfg.data.eval_split, limit=limit)
        self.client = partitioned.coordinator_client(PSClient(ps, 0, model.num_params), cfg,
                                                     dataset)
        self.history: list[dict] = []
        self.resume = resume
        self.sequence = resume.sequence if resume is not None else 0
        self.fault = Fault(topo.rank)

    def _get(self, field: Board) -> int:
        return int(self.coord.board_view()[field])

    def _fetch(self) -> float:
        """The shards' parameters into the model; returns when they were fetched."""
        self.client.fetch(self.model.params)
        fetched = time.time()
        if not np.isfinite(self.model.params).all():
            raise TrainingError("the parameters on the shards hold NaN or Inf: training "
                                "diverged; lower optimizer.learning_rate")
        return fetched

    def record(self, steps: int) -> None:
        """``record_iterates``: append the current parameters to iterates.h5, unevaluated."""
        fetched = self._fetch()
        ckpt_mod.append_iterate(self.run_dir / "iterates.h5", self.model.params, step=steps,
                                wall_s=fetched - self.t0)

    def evaluate(self, steps: int) -> dict:
        # the parameters evaluated are those of this moment: wall_s is when they were fetched
        # (what a time-to-accuracy curve needs), eval_s how long evaluating them took
        fetched = self._fetch()
        loss, acc = self.model.evaluate(self.x_eval, self.y_eval)
        rec = {"step": steps, "loss": loss, "accuracy": acc, "wall_s": fetched - self.t0,
               "eval_s": round(time.time() - fetched, 4)}
        if getattr(self.model, "unsupervised", False):  # autoencoder: its objective's terms
            rec.update(reconstruction=self.model.last_eval["reconstruction"],
                       sparsity=self.model.last_eval["sparsity"])
        self.metrics.write("eval", **rec)
        self.history.append(rec)
        return rec

    def checkpoint(self, final: bool) -> None:
        """Pause the workers (unless finished), have the shards write, commit."""
        t = time.time()
        self.sequence += 1
        k = self.sequence
        self.coord.raise_flag(Flag.CKPT_REQ, k)
        backoff = Backoff(cap=0.005)
        while True:
            self.fault.check()
            r = self.coord.rows()
            if np.all((r[:, Row.ACK] >= k) | (r[:, Row.FINISHED] == 1)):
                break
            backoff.wait()
        request_checkpoint(self.ps, k, heartbeat=self.fault.check)
        # exact (STEPS lags by up to log_every per worker); each partition counts its replica
        steps = int(r[:, Row.STEP].sum()) // self.cfg.topology.partitions
        ckpt_mod.commit(self.run_dir, k, steps=steps, num_params=self.model.num_params,
                        num_shards=self.cfg.topology.shards,
                        workers=r[:, Row.STEP:Row.POSITION + 1], final=final,
                        model=self.cfg.to_dict()["model"], config=self.cfg.to_dict(),
                        keep=self.cfg.checkpoint.keep)
        self.coord.raise_flag(Flag.CKPT_DONE, k)
        self.metrics.write("checkpoint", sequence=k, steps=steps, final=final,
                           seconds=round(time.time() - t, 3))
        log.info("checkpoint %d written (%d steps, %.2f s)%s", k, steps, time.time() - t,
                 " (final)" if final else "")

    def run(self) -> dict:
        dp, ck = self.cfg.downpour, self.cfg.checkpoint
        R = self.cfg.topology.replicas
        workers = self.topo.num_workers
        total = dp.steps * R if dp.steps else 0
        now = time.time()
        next_eval = now + dp.eval_every_s
        next_ckpt = now + ck.every_s if ck.every_s else math.inf
        next_ckpt_steps = ((self.resume.steps if self.resume else 0) + ck.every_steps
                           if ck.every_steps else math.inf)
        last_steps, last_t = self._get(Board.STEPS), now
        observe = self.record if dp.record_iterates else self.evaluate
        observe(last_steps)  # the starting point of the learning curve
        stopped_early = interrupted = False
        while True:
            self.fault.check()
            if self._get(Board.DONE) >= workers:
                break
            if not interrupted and (TERMINATION.requested or self._get(Board.TERM)):
                log.warning("SIGTERM received: stopping after a last checkpoint")
                interrupted = True
                self.coord.raise_flag(Flag.STOP, 1)
            now = time.time()
            steps = self._get(Board.STEPS)
            if not interrupted and (now >= next_ckpt or steps >= next_ckpt_steps):
                self.checkpoint(final=False)
                next_ckpt = time.time() + ck.every_s if ck.every_s else math.inf
                while next_ckpt_steps <= self._get(Board.STEPS):
                    next_ckpt_steps += ck.every_steps
            if now >= next_eval:
                rec = observe(steps)
                rate = (steps - last_steps) * self.cfg.data.batch_size / max(now - last_t, 1e-9)
                last_steps, last_t = steps, now
                pct = f" ({100 * steps / total:.0f}%)" if total else ""
                if rec is None:
                    log.info("step %d%s | %.0f samples/s | parameters recorded | %.1f s", steps,
                             pct, rate, now - self.t0)
                elif "reconstruction" in rec:
                    log.info("step %d%s | %.0f samples/s | test reconstruction %.4f sparsity "
                             "%.4f | %.1f s", steps, pct, rate, rec["reconstruction"],
                             rec["sparsity"], now - self.t0)
                else:
                    log.info("step %d%s | %.0f samples/s | test loss %.4f accuracy %.4f | "
                             "%.1f s", steps, pct, rate, rec["loss"], rec["accuracy"],
                             now - self.t0)
                if rec and dp.target_accuracy and rec["accuracy"] >= dp.target_accuracy \
                        and not stopped_early:
                    log.info("target accuracy %.4f reached: stopping", dp.target_accuracy)
                    self.coord.raise_flag(Flag.STOP, 1)
                    stopped_early = True
                next_eval = time.time() + dp.eval_every_s
            time.sleep(0.02)
        # Every worker's pushes are acknowledged: the shards hold the final parameters.
        steps = self._get(Board.STEPS)
        if dp.record_iterates:
            self.record(steps)
        final = self.evaluate(steps)
        self.checkpoint(final=not interrupted)
        request_stop(self.ps)
        ckpt_mod.save_params(self.run_dir / "params.h5", self.model.params,
                    self.cfg.to_dict()["model"], steps)
        wall = time.time() - self.t0
        log.info("%s: %d steps in %.1f s | final test loss %.4f accuracy %.4f",
                 "interrupted" if interrupted else "done", steps, wall, final["loss"],
                 final["accuracy"])
        return {"steps": steps, "wall_s": wall, "final_test_loss": final["loss"],
                "final_test_accuracy": final["accuracy"],
                "best_test_accuracy": max(r["accuracy"] for r in self.history),
                "target_reached": bool(dp.target_accuracy and (
                    stopped_early or final["accuracy"] >= dp.target_accuracy)),
                "interrupted": interrupted,
                "resumed_from": ({"sequence": self.resume.sequence, "steps": self.resume.steps}
                                 if self.resume else None),
                "num_params": self.model.num_params,
                **({"final_test_reconstruction": final["reconstruction"],
                    "final_test_sparsity": final["sparsity"]} if "reconstruction" in final
                   else {})}

