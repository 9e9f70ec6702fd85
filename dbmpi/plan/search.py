"""Search shards S, replicas R, partitions P and n_fetch = n_push for the best predicted job.

Every candidate is predicted with :func:`dbmpi.plan.cost.downpour`; the ranking is by
predicted samples/s of the whole job, with two preferences the model cannot measure: a larger
n_fetch = n_push makes replicas compute on staler parameters (the ranking charges 2% per
doubling, so n = 16 must be ~8% faster than n = 1 to be chosen), and of two candidates within
1% of each other the one with fewer ranks wins.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from .cost import Job, Prediction, Replica

SHARDS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32)
PARTITIONS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)
N_FETCH = (1, 4, 16)
STALENESS_COST = 0.98  # score factor per doubling of n_fetch = n_push


@dataclass(frozen=True)
class Space:
    """Where to search: the hosts, and how far ranks may outnumber cores."""

    hosts: int
    cores_per_host: int
    max_ranks: int
    shards: tuple[int, ...] = SHARDS
    partitions: tuple[int, ...] = PARTITIONS
    n_fetch: tuple[int, ...] = N_FETCH
    max_replicas: int = 256


def score(p: Prediction) -> float:
    return p.samples_per_s * STALENESS_COST ** math.log2(p.job.n_fetch)


def jobs(space: Space, base: Job, partitions_ok: Callable[[int], bool]) -> Iterable[Job]:
    """Every job of the space whose ranks fit ``space.max_ranks``."""
    for P in space.partitions:
        if P > space.cores_per_host * 4 or not partitions_ok(P):
            continue
        for S in space.shards:
            room = space.max_ranks - 1 - S
            for R in range(1, min(room // P, space.max_replicas) + 1):
                for n in space.n_fetch:
                    yield replace(base, shards=S, replicas=R, partitions=P, n_fetch=n, n_push=n)


def rank(space: Space, base: Job, replica_of: Callable[[int], Replica | None],
         predict: Callable[[Replica, Job], Prediction], top: int = 5) -> list[Prediction]:
    """The best ``top`` predictions, best first. ``replica_of(P)`` gives the replica cut in P
    (None where the model cannot be cut so)."""
    cache: dict[int, Replica | None] = {}

    def ok(P: int) -> bool:
        if P not in cache:
            cache[P] = replica_of(P)
        return cache[P] is not None

    preds = [predict(cache[j.partitions], j) for j in jobs(space, base, ok)]
    preds.sort(key=lambda p: (-round(math.log(score(p)) / math.log(1.01)), p.job.ranks,
                              p.job.n_fetch))
    return preds[:top]


def describe(p: Prediction) -> str:
    j = p.job
    return (f"S={j.shards} R={j.replicas} P={j.partitions} n_fetch=n_push={j.n_fetch} "
            f"({j.ranks} ranks): {p.samples_per_s:,.0f} samples/s "
            f"({p.samples_per_s_replica:,.0f} per replica), step {1e3 * p.step_s:.1f} ms, "
            f"PS busy {p.ps_utilisation:.0%}, bottleneck: {p.bottleneck}")
