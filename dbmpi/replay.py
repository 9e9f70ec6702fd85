"""``python -m dbmpi replay RUN_DIR``: re-run a recorded Downpour run in one process, exactly.

A run recorded with ``run.record_order = true`` left, per shard, the order in which it applied
the pushes and, per worker, how many pushes each shard's block held at each of its fetches
(:mod:`dbmpi.order`). Everything else a run does is deterministic given those: each replica's
data order and dropout masks come from the run's seed, its gradients from the parameters it
fetched, a shard's update from the pushes it applies in order. The replay rebuilds every
replica's model and reader and every shard's block and optimizer state, and plays the
operations out in an order the run allowed:

* a worker takes fetch ``i`` when every shard holds exactly the pushes recorded for it, then
  computes (same batches, same kernels, same accumulation into its push slot) up to its next
  fetch, handing over each push it makes;
* a shard applies its next recorded push once that push exists and no worker still waits to
  fetch its block as it is now (in the same chunks and with the same learning-rate divisor).

With one BLAS thread per process (as ``dbmpi launch`` runs ranks) the result is the run's
``params.h5`` bit for bit; the replay says so or names the first parameter that differs.
``--until STEP`` stops each shard after the last push holding a step <= STEP (with every push
before it in that shard's order, as the run had applied them) and writes those parameters.

What is not replayable: partitioned replicas, sparse traffic (refused by the config), a run
resumed from a checkpoint, a run that lost a replica (its order file is missing).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import order as order_mod
from .checkpoint import load_params, save_params
from .errors import DbmpiError
from .protocol import NSLOTS
from .ps.apply import APPLY_CHUNK, apply_chunks
from .ps.layout import ParamLayout
from .rundir import RunDir


class ReplayMismatch(DbmpiError):
    """The replay ended on other parameters than the run's."""

    exit_code = 1


@dataclass
class _Shard:
    lo: int
    hi: int
    params: np.ndarray
    state: np.ndarray
    applies: np.ndarray  # (n, 3): worker, push, learning-rate divisor
    limit: int  # apply this many of them
    applied: int = 0


@dataclass
class _Worker:
    index: int
    rec: order_mod.WorkerOrder
    model: object
    ops: object  # the generator of its operations (_worker_ops)
    request: tuple | None = None  # ("fetch", i) or ("push", q, gradient); None when done
    fetches: int = 0
    pushes: int = 0
    copied: set = field(default_factory=set)  # shards of the pending fetch copied so far
    # per shard: the next fetch whose part of that shard is not copied yet
    next_copy: list = field(default_factory=list)


def _worker_ops(cfg, model, reader, rec: order_mod.WorkerOrder, slots: list):
    """A replica's operations, as :meth:`dbmpi.train.downpour.worker.Worker.run` makes them:
    yields ("fetch", i) (the caller fills ``model.params`` before resuming it) and ("push",
    q, gradient)."""
    dp = cfg.downpour
    pushes = 0
    yield ("fetch", 0)
    fetched = 1
    direct = hasattr(model, "set_grads") and (dp.n_push == 1 or model.can_accumulate)
    accum, pending, step = None, 0, 0
    while step < rec.steps:
        x, y = reader.next_batch()
        if step > 0 and step % dp.n_fetch == 0:
            yield ("fetch", fetched)
            fetched += 1
        if direct and pending == 0:
            accum = slots[pushes % NSLOTS]
            model.set_grads(accum)
        if direct and pending:
            model.forward_backward(x, y, accumulate=True)
        else:
            model.forward_backward(x, y)
        if not direct:
            if pending == 0:
                accum = slots[pushes % NSLOTS]
                np.copyto(accum, model.grads)
            else:
                accum += model.grads
        pending += 1
        if pending == dp.n_push:
            pushes += 1
            yield ("push", pushes, accum)
            pending = 0
        step += 1
    if pending:
        pushes += 1
        yield ("push", pushes, accum)


class Replay:
    """The replay of one recorded run directory (see the module doc)."""

    def __init__(self, run_dir: str | Path, until: int | None = None):
        self.rd = RunDir.open(run_dir)
        cfg = self.cfg = self.rd.config
        where = self.rd.file("config.toml")
        if not cfg.run.record_order:
            raise DbmpiError(f"{where}: run.record_order is false, so the run's order was not "
                             f"recorded: {order_mod.FIX}")
        summary = self.rd.summary()
        if summary.get("resumed_from"):
            raise DbmpiError(f"{self.rd.file('summary.json')}: the run resumed from a "
                             "checkpoint; only a run recorded from its start replays")
        from .data import open_dataset
        from .model import Model
        from .optim import make_optimizer
        from .train.partitioned import initial_params

        self.dataset = open_dataset(cfg.data.path)
        R, S = cfg.topology.replicas, cfg.topology.shards
        rec = order_mod.read(self.rd.path, S, R)
        ran, here = {w.blas_threads for w in rec.workers}, order_mod.blas_threads()
        if ran != {here}:
            theirs = sorted(ran)[0]
            fix = f"OPENBLAS_NUM_THREADS={theirs}" if theirs else "OPENBLAS_NUM_THREADS unset"
            raise DbmpiError(f"the run's ranks computed with OPENBLAS_NUM_THREADS="
                             f"{theirs or '(unset)'}, this replay with {here or '(unset)'}: "
                             f"the same threads give the same floats; run the replay with {fix}")
        ran, here = {w.blas_library for w in rec.workers} - {""}, order_mod.blas_library()
        if ran and ran != {here}:
            theirs = sorted(ran)[0]
            raise DbmpiError(f"the run's kernels called {theirs}'s BLAS, this replay's "
                             f"{here}'s: the same library gives the same floats; run the "
                             f"replay with DBMPI_BLAS={theirs}")
        model = Model.from_config(cfg.model, self.dataset.feature_shape,
                                  self.dataset.num_classes)
        init = initial_params(cfg, model, self.dataset).copy()
        layout = ParamLayout.even(init.size, S)
        self.optimizers = [make_optimizer(cfg.optimizer) for _ in range(S)]
        self.shards = []
        for s in range(S):
            lo, hi = layout.block(s)
            applies = rec.applies[s]
            limit = len(applies) if until is None else self._limit(applies, until)
            self.shards.append(_Shard(lo, hi, init[lo:hi].copy(),
                                      self.optimizers[s].init_state(hi - lo), applies, limit))
        self.workers = []
        for w in range(R):
            m = model if w == 0 else Model.from_config(cfg.model, self.dataset.feature_shape,
                                                       self.dataset.num_classes)
            if hasattr(m, "seed_training"):
                m.seed_training([cfg.run.seed, w])
            reader = self.dataset.reader(
                "train", replica=w, num_replicas=R, batch_size=cfg.data.batch_size,
                shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.run.seed * 1000 + w)
            slots = [np.zeros(m.num_params, np.float32) for _ in range(NSLOTS)]
            wk = _Worker(w, rec.workers[w], m, _worker_ops(cfg, m, reader, rec.workers[w], slots),
                         next_copy=[0] * S)
            self._advance(wk)
            self.workers.append(wk)
        self.until = until
        self.grads: dict[tuple[int, int], list] = {}  # (worker, push) -> [gradient, shards left]

    def _limit(self, applies: np.ndarray, until: int) -> int:
        """How many of a shard's applies come up to its last push of a step <= ``until``."""
        last = until // self.cfg.downpour.n_push  # pushes 1..last hold steps <= until
        hits = np.nonzero(applies[:, 1] <= last)[0]
        return int(hits[-1]) + 1 if hits.size else 0

    @staticmethod
    def _advance(wk: _Worker) -> None:
        wk.request = next(wk.ops, None)

    def _serve(self, wk: _Worker) -> bool:
        """Let worker ``wk`` run as far as it can; True if it moved."""
        moved = False
        while wk.request is not None:
            if wk.request[0] == "push":
                _, q, grad = wk.request
                self.grads[wk.index, q] = [grad.copy(), len(self.shards)]
                wk.pushes += 1
                self._advance(wk)
                moved = True
                continue
            i = wk.request[1]
            if i >= len(wk.rec.fetches):
                raise self._broken(f"worker {wk.index} makes fetch {i + 1} but the run "
                                   f"recorded {len(wk.rec.fetches)}")
            # each shard's part is copied when that shard holds the pushes the run's copy held
            # (a fetch's parts were copied one after another, other pushes landing between)
            for s, (sh, n) in enumerate(zip(self.shards, wk.rec.fetches[i])):
                if s in wk.copied:
                    continue
                if sh.applied > n:
                    raise self._broken(f"worker {wk.index}'s fetch {i + 1} saw fewer pushes on "
                                       f"shard {s} than it had applied by then")
                if sh.applied == n:
                    wk.model.params[sh.lo:sh.hi] = sh.params
                    wk.copied.add(s)
                    wk.next_copy[s] = i + 1
                    moved = True
            if len(wk.copied) < len(self.shards):
                return moved
            wk.copied.clear()
            wk.fetches += 1
            self._advance(wk)
            moved = True
        return moved

    def _apply(self, s: int) -> bool:
        """Let shard ``s`` apply what it can; True if it applied anything."""
        sh, moved = self.shards[s], False
        while sh.applied < sh.limit:
            w, q, divisor = (int(v) for v in sh.applies[sh.applied])
            held = self.grads.get((w, q))
            if held is None:
                return moved
            # a fetch that will copy this block as it is now goes first (a worker's fetches
            # see ever more pushes: its next copy of this shard decides)
            for wk in self.workers:
                i = wk.next_copy[s]
                if i < len(wk.rec.fetches) and wk.rec.fetches[i][s] <= sh.applied:
                    return moved
            opt = self.optimizers[s]
            scaled = opt.lr_scaled(1.0 / divisor) if self.cfg.downpour.staleness_aware \
                else contextlib.nullcontext()
            with scaled:
                bad = apply_chunks(opt, sh.params, sh.state, held[0][sh.lo:sh.hi], 0,
                                   APPLY_CHUNK)
            if bad >= 0:
                raise self._broken(f"worker {w}'s push {q} holds NaN or Inf at shard {s}")
            held[1] -= 1
            if held[1] == 0:
                del self.grads[w, q]
            sh.applied += 1
            moved = True
        return moved

    def _broken(self, what: str) -> DbmpiError:
        return DbmpiError(f"{self.rd.path / 'order'}: {what}: the record does not fit this "
                          f"run (another config or data?); {order_mod.FIX}")

    def run(self) -> np.ndarray:
        """Play the run out; returns the shards' parameters, as one flat vector."""
        while True:
            moved = False
            for wk in self.workers:
                moved |= self._serve(wk)
            for s in range(len(self.shards)):
                moved |= self._apply(s)
            if not moved:
                break
        if self.until is None:
            short = [wk.index for wk in self.workers if wk.request is not None]
            left = [s for s, sh in enumerate(self.shards) if sh.applied < len(sh.applies)]
            if short or left:
                raise self._broken(f"the replay stalled (workers {short} unfinished, shards "
                                   f"{left} with pushes left)")
            for wk in self.workers:
                if (wk.fetches, wk.pushes) != (len(wk.rec.fetches), wk.rec.pushes):
                    raise self._broken(f"worker {wk.index} fetched {wk.fetches} times and "
                                       f"pushed {wk.pushes}, the run {len(wk.rec.fetches)} and "
                                       f"{wk.rec.pushes}")
        return np.concatenate([sh.params for sh in self.shards])

    def pushes_applied(self) -> int:
        return sum(sh.applied for sh in self.shards)


def replay(run_dir: str | Path, until: int | None = None, out: str | Path | None = None) -> str:
    """Replay ``run_dir`` (to ``until``), write the parameters, compare; returns one line."""
    rp = Replay(run_dir, until)
    params = rp.run()
    path = Path(out) if out else rp.rd.path / (
        "replay_params.h5" if until is None else f"replay_params_until_{until}.h5")
    # the model spec as the coordinator writes it into params.h5
    save_params(path, params, rp.cfg.to_dict()["model"], step=until if until is not None else 0)
    done = f"replayed {rp.pushes_applied()} pushes on {len(rp.shards)} shards"
    if until is not None:
        return f"{done} up to step {until}; wrote {path}"
    original, _ = load_params(rp.rd.require("params.h5", "the run did not finish: its "
                                            "params.h5 is missing"))
    if original.shape != params.shape:
        raise ReplayMismatch(f"{rp.rd.file('params.h5')}: holds {original.size} parameters, "
                             f"the replay {params.size}")
    differ = np.nonzero(original.view(np.uint32) != params.view(np.uint32))[0]
    if differ.size:
        i = int(differ[0])
        raise ReplayMismatch(
            f"the replay's parameters differ from {rp.rd.file('params.h5')} in {differ.size} "
            f"of {params.size} (first: parameter {i}, {original[i]!r} against {params[i]!r}); "
            f"wrote {path}")
    return f"{done}: equal to {rp.rd.file('params.h5')} bit for bit; wrote {path}"

