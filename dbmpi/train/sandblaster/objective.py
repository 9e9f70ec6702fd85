"""The function L-BFGS minimises, evaluated by the replicas (an L-BFGS ``Objective``)."""

from __future__ import annotations

import time

from ...optim.lbfgs import GW, W
from ...ps.vector import ShardVectors
from .plan import BatchPlan


class SandblasterObjective:
    """The mean loss over a batch (+ L2): ``f = loss_sum / N + l2 / 2 W . W``.

    ``dispatcher`` (:class:`.coordinator.Dispatcher`) runs the replicas over the batch; the
    shards then form ``GW`` and the dot products L-BFGS asked for, in one program.
    """

    def __init__(self, vectors: ShardVectors, dispatcher, plan: BatchPlan, l2: float):
        self.vec, self.dispatcher, self.plan, self.l2 = vectors, dispatcher, plan, l2
        self.batch = 0
        self.log = []  # EvalStats of every evaluation, in order

    def begin_iteration(self, iteration: int) -> bool:
        """Iteration k uses batch k; True when the batch changed (L-BFGS then re-evaluates
        f and g at the iterate, so each curvature pair is measured on one batch)."""
        if self.plan.full:
            return False
        changed = iteration != self.batch
        self.batch = iteration
        return changed

    def evaluate(self, dots):
        t0 = time.perf_counter()
        self.vec.begin_eval()
        self.vec.flush()  # W is formed and gacc zeroed on every shard
        n = self.plan.size
        stats = self.dispatcher.run_eval(self.batch, n)
        # the shards wait until their count reaches the examples granted so far: every
        # granted push has landed (pushes are one-sided and not acknowledged)
        self.vec.end_eval(GW, n, self.dispatcher.sched.push_target, self.l2)
        res = self.vec.dots(list(dots) + [(W, W)])
        stats.wall_s = time.perf_counter() - t0
        self.log.append(stats)
        f = stats.loss_sum / n + 0.5 * self.l2 * res[-1]
        return f, res[:-1]
