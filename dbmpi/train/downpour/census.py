"""Who is alive after a process of the job died: the coordinator's census (docs/faults.md).

The paper's case for Downpour: "if one machine in a model replica fails, other model replicas
continue processing their training data and updating the model". Under ``dbmpi launch`` a
dead rank does not end the job (:mod:`dbmpi.launch`, :mod:`dbmpi.liveness`): every survivor
gets a death notice, and the coordinator takes a census. Every worker and shard sends a
heartbeat at least every :data:`~.control.BEAT_S` while it works or waits (and a worker stuck
in a halo exchange with a dead partition sends none); a rank whose heartbeat does not move for
``downpour.lost_after_s`` seconds after the notice is counted lost.

- A lost worker loses its whole replica: the other replicas go on, the lost one's data
  shards are not read again (the summary says which replica, when, at which step, and the
  steps it did not make). Its surviving partitions leave by their watchdog.
- A push is applied whole or not at all: its data is complete on every shard (put and
  flushed, or in the worker's mapped memory, which outlives it) before its first SEQ moves.
  A worker that died between moving SEQ on one shard and the next has its push rolled
  forward: the census moves SEQ on the shards it had not reached, and they apply it.
- A lost shard, or every replica lost: the job ends (exit 75) and the same command resumes
  from the last checkpoint, as when any rank died before.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from ...liveness import NOTICE, TEARDOWN
from ...log import get_logger
from ...protocol import Flag, Row
from ...ps.server import RETIRED, RankUnreachable, seq_index

log = get_logger("downpour")
LEAVE = TEARDOWN.LEAVE


@dataclass
class Loss:
    """One replica counted lost."""

    replica: int
    ranks: list[int]
    who: str  # ranks with their hosts and pids
    notice_s: float  # wall time of the death notice since the job's start
    detected_s: float  # ... and of the census that counted it
    notice_unix: float  # the notice's time.time(), to compare with the kill's
    step: int  # its last step (its pushes applied, or its last heartbeat's if later)
    steps_lost: int | None  # steps of its budget it will not make (None: no step budget)
    pushes: list[int] = field(default_factory=list)  # its pushes applied, per shard of its range

    def record(self) -> dict:
        return {"replica": self.replica, "ranks": self.ranks, "who": self.who,
                "notice_s": round(self.notice_s, 3), "detected_s": round(self.detected_s, 3),
                "detection_s": round(self.detected_s - self.notice_s, 3),
                "notice_unix": round(self.notice_unix, 3), "step": self.step,
                "steps_lost": self.steps_lost, "pushes_applied_per_shard": self.pushes,
                "data": "its training shards were not read after its last step"}


class Census:
    """The coordinator's side: notices seen, ranks lost, losses recorded."""

    def __init__(self, cfg, topo, ps, coord, who, t0: float, steps_each: int):
        self.cfg, self.topo, self.ps, self.coord, self.who = cfg, topo, ps, coord, who
        self.t0, self.steps_each = t0, steps_each
        self.seen = 0  # notices answered
        self.taken = 0  # censuses published
        self.lost_workers: set[int] = set()
        self.losses: list[Loss] = []

    def due(self) -> bool:
        return NOTICE.count != self.seen

    def lost_mask(self, num_workers: int) -> np.ndarray:
        mask = np.zeros(num_workers, bool)
        mask[list(self.lost_workers)] = True
        return mask

    def take(self) -> None:
        """Count the ranks whose heartbeat stands still for ``lost_after_s``; go on without
        their replicas, or end the job (RankUnreachable) if a shard or every replica is lost."""
        self.seen = NOTICE.count
        notice = time.time() - (time.monotonic() - NOTICE.at)
        wait = self.cfg.downpour.lost_after_s
        workers0, shards0 = self.coord.beats()
        end = time.monotonic() + wait
        while True:
            workers, shards = self.coord.beats()  # calls progress: the beats land
            still_w = [w for w in np.flatnonzero(workers == workers0)
                       if int(w) not in self.lost_workers]
            still_s = [int(s) for s in np.flatnonzero(shards == shards0)]
            if not still_w and not still_s:  # a spurious notice: nobody is missing
                break
            if time.monotonic() >= end:
                break
            time.sleep(0.02)
        if still_s:
            ranks = [self.topo.shard_rank(s) for s in still_s]
            raise RankUnreachable(
                f"{self.who(ranks)} died (no heartbeat for downpour.lost_after_s = {wait:g} s "
                f"after a process of the job ended): a parameter-server shard is lost, so the "
                f"job ends; re-run the same command to resume from the last checkpoint")
        P = self.cfg.topology.partitions
        replicas = sorted({int(w) // P for w in still_w})
        for r in replicas:
            self._lose(r, notice, {int(w) for w in still_w})
        if replicas and len({w // P for w in self.lost_workers}) == self.cfg.topology.replicas:
            raise RankUnreachable(
                "every replica is lost (" + "; ".join(x.who for x in self.losses) + "): the "
                "job ends; re-run the same command to resume from the last checkpoint")
        self.taken += 1
        self.coord.raise_flag(Flag.CENSUS, self.taken, shards=True)

    def _lose(self, replica: int, notice: float, silent: set[int]) -> None:
        """Count ``replica`` lost: its ``silent`` workers are dead or stuck (never written to
        again); the others, alive, are told to leave (TEARDOWN = LEAVE)."""
        P = self.cfg.topology.partitions
        ids = [replica * P + p for p in range(P)]
        ranks = [self.topo.worker_rank(replica, p) for p in range(P)]
        self.coord.lost.update(r for w, r in zip(ids, ranks) if w in silent)
        alive = [r for w, r in zip(ids, ranks) if w not in silent]
        if alive:
            self.coord.tell(alive, Flag.TEARDOWN, LEAVE)
        self.coord.lost.update(ranks)
        self.lost_workers.update(ids)
        pushes = []
        for w in ids:
            pushes += self._roll_forward(w)
        rows = self.coord.rows()
        # its last heartbeat may be a few steps old; its pushes applied are exact
        step = max(int(rows[ids[0], Row.AT_STEP]),
                   min(pushes, default=0) * self.cfg.downpour.n_push)
        left = max(0, self.steps_each - step) if self.steps_each else None
        loss = Loss(replica, ranks, self.who(ranks), notice - self.t0,
                    time.time() - self.t0, notice, step, left, pushes)
        self.losses.append(loss)
        log.warning("replica %d lost (%s: killed, or its host gone) at step %d%s, %.1f s "
                    "after the notice: going on with the other replicas; its data shards "
                    "are skipped", replica, loss.who, step,
                    f" of {self.steps_each}" if self.steps_each else "",
                    loss.detected_s - loss.notice_s)
        if replica == 0 and self.cfg.downpour.warm_start_steps and \
                self.cfg.topology.replicas > 1:
            self.coord.raise_flag(Flag.RELEASED, 1)  # the others must not wait for it

    def _roll_forward(self, w: int) -> list[int]:
        """Complete worker ``w``'s last push on the shards its SEQ had not reached yet; returns
        its pushes posted, per shard of its range."""
        ps = self.ps
        ranks = [self.topo.shard_rank(s) for s in range(ps.layout.num_shards)
                 if ps.overlap(s, w)]
        seqs = [int(ps.ctrl.load(r, seq_index(w))) for r in ranks]
        top = max(seqs, default=0)
        for r, seq in zip(ranks, seqs):
            if seq < top:
                ps.ctrl.fetch_and_op(top - seq, r, seq_index(w))
                log.warning("worker %d died while posting push %d: rolled forward on rank %d",
                            w, top, r)
            ps.ctrl.store(1, r, seq_index(w) + RETIRED)  # nobody waits for its pushes
        return [top] * len(ranks)
