"""The Downpour coordinator: evaluates, reports progress, checkpoints, decides when to stop."""

from __future__ import annotations

import json
import math
import time

import numpy as np

from ... import checkpoint as ckpt_mod
from ... import progress as prog
from ...errors import TrainingError
from ...faults import TERMINATION, Fault
from ...log import get_logger
from ...protocol import Board, Flag, Row
from ...ps import PSClient
from ...ps.server import Backoff, RankUnreachable, request_checkpoint, request_stop, stuck_shards
from .. import partitioned
from .census import Census

log = get_logger("downpour")


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
        # past every checkpoint directory present, also those moved aside or left pending
        self.sequence = max(resume.sequence if resume is not None else 0,
                            ckpt_mod.highest_sequence(run_dir))
        self.fault = Fault(topo.rank)
        self.live = prog.LiveLine(prog.live_wanted())  # the in-place line, on a terminal only
        self.steps_each = self._budget_each(dataset)
        self.census = Census(cfg, topo, ps, coord, self._who, t0, self.steps_each)

    def _watch(self) -> None:
        """Called from every wait: injected faults, and a census after a death notice."""
        self.fault.check()
        if self.census.due():
            self.census.take()

    def _finished(self, rows: np.ndarray) -> np.ndarray:
        """Workers that are done: finished, or lost with their replica."""
        return (rows[:, Row.FINISHED] == 1) | self.census.lost_mask(len(rows))

    def _budget_each(self, dataset) -> int:
        """Steps per replica the run is to make, for the progress lines and the ETA:
        ``downpour.steps``, or what ``downpour.epochs`` come to over the largest replica's
        share of the training shards (0: no end in steps, e.g. a target accuracy only)."""
        dp, R = self.cfg.downpour, self.cfg.topology.replicas
        budgets = [dp.steps] if dp.steps else []
        if dp.epochs:
            share = max(dataset.reader("train", r, R, self.cfg.data.batch_size).num_examples
                        for r in range(R))
            budgets.append(math.ceil(dp.epochs * share / self.cfg.data.batch_size))
        return min(budgets) if budgets else 0

    def _replica_steps(self, rows: np.ndarray) -> list[int]:
        """Each replica's own step count (its partition 0's row; rows are replica-major); a
        lost replica's is its last step reported by heartbeat."""
        P = self.cfg.topology.partitions
        steps = [int(s) for s in rows[::P, Row.STEP]]
        for loss in self.census.losses:
            steps[loss.replica] = loss.step
        return steps

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

    def _who(self, ranks: list[int]) -> str:
        """``rank 2 (shard 1 on HOST, pid N)``, from placement.json where it can be read."""
        try:
            rows = {int(r["rank"]): r for r in
                    json.loads((self.run_dir / "placement.json").read_text())["ranks"]}
        except (OSError, ValueError, KeyError, TypeError):
            rows = {}
        out = []
        for rank in ranks:
            r = rows.get(rank)
            out.append(f"rank {rank} ({r['role']} {r['index']} on {r['host']}, pid {r['pid']})"
                       if r else f"rank {rank}")
        return ", ".join(out)

    def _unreachable(self, when: str, workers: list[int], shards: list[int]):
        """End the job naming the ranks that did not answer within the deadline: the
        ``shards`` (the workers then wait on them), else the ``workers`` (ids). Nothing is
        committed."""
        raise RankUnreachable(
            f"{self._who(self._ranks(workers, shards))} did not answer within "
            f"checkpoint.deadline_s = {self.cfg.checkpoint.deadline_s:g} s {when} (frozen or "
            f"hung, or its node lost): no checkpoint was written, the previous one stays the "
            f"newest; once the rank's node is back, run the same command to resume")

    def _ranks(self, workers: list[int], shards: list[int]) -> list[int]:
        topo, P = self.topo, self.cfg.topology.partitions
        return ([topo.shard_rank(s) for s in shards] if shards
                else [topo.worker_rank(*divmod(w, P)) for w in workers])

    def _overdue(self, when: str, workers: list[int], shards: list[int] | None,
                 strict: bool) -> None:
        """A wait passed the deadline. End the job if a shard is seen stuck on a posted push
        (frozen for sure: a live one applies it in milliseconds) or ``strict`` or once a
        SIGTERM has come (the scheduler's KillWait comes next: a checkpoint already waiting
        on a frozen rank when it came must end too, not wait on); else warn and keep waiting,
        since a slow step or a large write on a slow file system looks the same from here."""
        stuck = stuck_shards(self.ps)
        if stuck or strict or TERMINATION.requested or self._get(Board.TERM):
            self._unreachable(when, workers, stuck or shards or [])
        log.warning("still waiting %s for %s after checkpoint.deadline_s = %g s (a slow "
                    "step or write, or a frozen rank)", when,
                    self._who(self._ranks(workers, shards or [])),
                    self.cfg.checkpoint.deadline_s)

    def checkpoint(self, final: bool, when: str = "", strict: bool = False) -> None:
        """Pause the workers (unless finished), have the shards write, commit. A wait on
        them past ``checkpoint.deadline_s`` ends the job (RankUnreachable, nothing
        committed) when ``strict`` or a shard is stuck, else is logged (see _overdue)."""
        t = time.time()
        d = self.cfg.checkpoint.deadline_s
        self.sequence += 1
        k = self.sequence
        when = when or f"for checkpoint {k}"
        deadline = time.monotonic() + d
        self.coord.raise_flag(Flag.CKPT_REQ, k)
        backoff = Backoff(cap=0.005)
        while True:
            self._watch()
            r = self.coord.rows()  # board_view() calls rma.progress(): our window advances
            waiting = ~((r[:, Row.ACK] >= k) | self._finished(r))
            if not waiting.any():
                break
            if time.monotonic() >= deadline:
                self._overdue(when, [int(w) for w in np.flatnonzero(waiting)], None, strict)
                deadline = time.monotonic() + d
            backoff.wait()
        while late := request_checkpoint(self.ps, k, heartbeat=self._watch,
                                         deadline=deadline):
            self._overdue(when, [], late, strict)
            deadline = time.monotonic() + d
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
        self.live.clear()
        log.info("checkpoint %d written: %s, %.2f s%s", k,
                 prog.steps_phrase(steps, self.cfg.topology.replicas, self._replica_steps(r)),
                 time.time() - t, " (final)" if final else "")

    def run(self) -> dict:
        dp, ck = self.cfg.downpour, self.cfg.checkpoint
        R = self.cfg.topology.replicas
        workers = self.topo.num_workers
        total = self.steps_each * R
        now = time.time()
        next_eval = now + dp.eval_every_s
        next_ckpt = now + ck.every_s if ck.every_s else math.inf
        next_ckpt_steps = ((self.resume.steps if self.resume else 0) + ck.every_steps
                           if ck.every_steps else math.inf)
        last_steps, last_t = self._get(Board.STEPS), now
        start_steps, start_t, rate, acc = last_steps, now, None, None
        observe = self.record if dp.record_iterates else self.evaluate
        observe(last_steps)  # the starting point of the learning curve
        stopped_early = interrupted = False
        stop_deadline = math.inf  # after SIGTERM: when the workers must have finished
        while True:
            self._watch()
            if self._get(Board.DONE) >= workers or (
                    self.census.lost_workers and self._finished(self.coord.rows()).all()):
                break
            if not interrupted and (TERMINATION.requested or self._get(Board.TERM)):
                log.warning("%s received: stopping after a last checkpoint",
                            TERMINATION.name)
                interrupted = True
                self.coord.raise_flag(Flag.STOP, 1)
                stop_deadline = time.monotonic() + ck.deadline_s
            if time.monotonic() >= stop_deadline:  # a worker, or a shard it waits on, is stuck
                rows = self.coord.rows()
                self._overdue("after SIGTERM", [int(w) for w in
                                                np.flatnonzero(~self._finished(rows))],
                              None, strict=True)
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
                done = prog.steps_done(steps, R, self.steps_each)
                self.live.clear()
                if rec is None:
                    log.info("%s | %.0f samples/s | parameters recorded | %.1f s", done,
                             rate, now - self.t0)
                elif "reconstruction" in rec:
                    log.info("%s | %.0f samples/s | test reconstruction %.4f sparsity "
                             "%.4f | %.1f s", done, rate, rec["reconstruction"],
                             rec["sparsity"], now - self.t0)
                else:
                    acc = rec["accuracy"]
                    log.info("%s | %.0f samples/s | test loss %.4f accuracy %.4f | "
                             "%.1f s", done, rate, rec["loss"], rec["accuracy"],
                             now - self.t0)
                if rec and dp.target_accuracy and rec["accuracy"] >= dp.target_accuracy \
                        and not stopped_early:
                    log.info("target accuracy %.4f reached: stopping", dp.target_accuracy)
                    self.coord.raise_flag(Flag.STOP, 1)
                    stopped_early = True
                next_eval = time.time() + dp.eval_every_s
            if self.live.due():
                eta = prog.eta_seconds(steps, total, start_steps, now - start_t)
                self.live.show(prog.progress_line(steps, R, self.steps_each, rate, acc,
                                                  now - self.t0, eta))
            time.sleep(0.02)
        self.live.clear()
        # Every worker's pushes are acknowledged: the shards hold the final parameters.
        steps = self._get(Board.STEPS)
        each = self._replica_steps(self.coord.rows())  # exact: every worker has finished
        if dp.record_iterates:
            self.record(steps)
        final = self.evaluate(steps)
        self.checkpoint(final=not interrupted,
                        when="for the last checkpoint after SIGTERM" if interrupted else "",
                        strict=interrupted)
        request_stop(self.ps)
        ckpt_mod.save_params(self.run_dir / "params.h5", self.model.params,
                    self.cfg.to_dict()["model"], steps)
        wall = time.time() - self.t0
        log.info("%s: %s in %.1f s | final test loss %.4f accuracy %.4f",
                 "interrupted" if interrupted else "done", prog.steps_phrase(steps, R, each),
                 wall, final["loss"], final["accuracy"])
        # steps: the sum over replicas (what readers of summary.json have always had)
        return {"steps": steps, "steps_per_replica": prog.steps_per_replica(steps, R, each),
                "replica_steps": each, "replicas": R,
                "wall_s": wall, "final_test_loss": final["loss"],
                "final_test_accuracy": final["accuracy"],
                "best_test_accuracy": max(r["accuracy"] for r in self.history),
                "target_reached": bool(dp.target_accuracy and (
                    stopped_early or final["accuracy"] >= dp.target_accuracy)),
                "interrupted": interrupted,
                "replicas_lost": [loss.record() for loss in self.census.losses],
                "resumed_from": ({"sequence": self.resume.sequence, "steps": self.resume.steps}
                                 if self.resume else None),
                "num_params": self.model.num_params,
                **({"final_test_reconstruction": final["reconstruction"],
                    "final_test_sparsity": final["sparsity"]} if "reconstruction" in final
                   else {})}
