"""The coordinator's scheduler: which portion goes to which replica, and which pushes count.

Pure bookkeeping, no MPI: the coordinator's loop (:class:`.coordinator.Dispatcher`) decodes
each request, calls :meth:`PortionScheduler.request`, and sends the :class:`Reply` objects it gets
back, in order. That keeps every scheduling rule (portions in order, backup copies for
stragglers, one grant per portion, the end of an evaluation) testable with plain calls
(tests/test_sandblaster_scheduler.py). Replicas are named by index ``0..R-1``, not rank.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import NamedTuple

from .plan import portion_bounds
from .wire import Decision

MAX_COPIES = 2  # holders of one portion at a time, the original included


class Reply(NamedTuple):
    """One message to send: ``decision`` on the replica's pending portions, then ``portion``
    to compute (-1: none)."""

    replica: int
    decision: Decision
    portion: int = -1


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
    wall_s: float = 0.0  # set by the objective, which sees the whole evaluation
    granted_by_replica: list = field(default_factory=list)
    computed_by_replica: list = field(default_factory=list)


class PortionScheduler:
    """Hands out portions, decides on pending sets, and schedules backups.

    Lifecycle: :meth:`start_eval` opens evaluation ``eval_id`` (0, 1, ...); :meth:`request`
    for every request received until :attr:`complete`; then the next :meth:`start_eval`, or
    :meth:`shutdown` and :meth:`request` until :attr:`all_stopped`. A request that finds no
    work and needs no decision gets no reply yet: the replica waits until a portion is free
    (a rejected set, or the next evaluation).
    """

    def __init__(self, replicas: int, portion_size: int, push_every: int, backups: bool):
        self.R = replicas
        self.portion_size, self.push_every, self.backups = portion_size, push_every, backups
        self.waiting: deque[int] = deque()  # replicas whose request awaits work
        self.eval_id = -1
        self.batch = 0
        # examples granted over the whole run: each shard's count reaches it once every
        # granted push has landed, so END_EVAL waits for it (pushes are not acknowledged)
        self.push_target = 0
        self._clock = 0  # hand-out order: "oldest first" for backups, deterministic
        self.stopping = False
        self.n_stopped = 0

    # -- evaluations ---------------------------------------------------------------------
    def start_eval(self, batch: int, n_examples: int) -> list[Reply]:
        """Open the next evaluation; the replies give work to the replicas waiting for it."""
        self.eval_id += 1
        self.batch = batch
        self.bounds = portion_bounds(n_examples, self.portion_size)
        P = len(self.bounds)
        self.fresh = deque(range(P))  # never handed out, or requeued: handed out first
        self.granted = [False] * P
        self.holders: list[set[int]] = [set() for _ in range(P)]  # computing or pending
        self.started = [-1] * P  # hand-out time of the first copy
        self.n_granted = 0
        self.examples_granted = 0
        self.stats = EvalStats(self.eval_id, batch, n_examples, P,
                               granted_by_replica=[0] * self.R,
                               computed_by_replica=[0] * self.R)
        return self._serve_waiting()

    @property
    def complete(self) -> bool:
        """Every portion of the evaluation is granted (the pushes may still be landing)."""
        return self.n_granted == len(self.bounds)

    def request(self, replica: int, eval_id: int, finished: int, loss_sum: float,
                n_correct: float, pending: list[int]) -> list[Reply]:
        """A request from ``replica``: it finished ``finished`` (-1: none) of evaluation
        ``eval_id`` and holds ``pending`` (loss ``loss_sum``). Returns the replies to send."""
        if self.stopping:
            self.n_stopped += 1
            return [Reply(replica, Decision.STOP)]
        r, st, k = replica, self.stats, len(pending)
        current = eval_id == self.eval_id
        if finished >= 0:
            if current:
                st.computed += 1
                st.computed_by_replica[r] += 1
            else:
                st.stale += 1
        decision = Decision.KEEP
        if k and not current:
            decision = Decision.REJECT  # an old evaluation's gradients: W has moved
            st.duplicates += k
        elif k and (k >= self.push_every or not self.fresh):
            # decide every push_every portions, and at every request at the end of the batch
            # (nothing fresh left), so no replica sits on portions the batch waits for
            if not any(self.granted[p] for p in pending):
                decision = Decision.GRANT
                for p in pending:
                    self.granted[p] = True
                    self.holders[p].discard(r)
                    lo, hi = self.bounds[p]
                    self.examples_granted += hi - lo
                    self.push_target += hi - lo
                self.n_granted += k
                st.loss_sum += loss_sum
                st.n_correct += n_correct
                st.granted_by_replica[r] += k
            else:
                # the set is all or nothing (one summed gradient): drop it; its portions that
                # nobody else holds go back to the front of the queue
                decision = Decision.REJECT
                for p in pending:
                    self.holders[p].discard(r)
                    if self.granted[p]:
                        st.duplicates += 1
                    elif not self.holders[p]:
                        self.fresh.appendleft(p)
                        st.requeued += 1
        p = self._pick(r) if not self.complete else -1
        out = []
        if p < 0 and decision is Decision.KEEP:
            self.waiting.append(r)  # nothing to say until there is work
        else:
            out.append(Reply(r, decision, p))
        if decision is Decision.REJECT:
            out += self._serve_waiting()  # requeued portions
        return out

    # -- the end of the run --------------------------------------------------------------
    def shutdown(self) -> list[Reply]:
        """STOP for the waiting replicas; from now on every request is answered STOP (those
        still computing, once they ask again)."""
        self.stopping = True
        out = [Reply(r, Decision.STOP) for r in self.waiting]
        self.waiting.clear()
        self.n_stopped += len(out)
        return out

    @property
    def all_stopped(self) -> bool:
        return self.n_stopped >= self.R

    # -- handing out work ----------------------------------------------------------------
    def _pick(self, r: int) -> int:
        """The next portion for replica r, or -1."""
        if self.fresh:
            p = self.fresh.popleft()
        elif self.backups:
            # a backup copy of an outstanding portion: fewest holders, then oldest first,
            # never one r holds itself; the first copy granted wins
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
        if self.started[p] < 0:
            self.started[p] = self._clock
            self._clock += 1
        return p

    def _serve_waiting(self) -> list[Reply]:
        out = []
        for _ in range(len(self.waiting)):
            r = self.waiting.popleft()
            p = self._pick(r)
            if p < 0:
                self.waiting.append(r)
            else:
                out.append(Reply(r, Decision.KEEP, p))
        return out
