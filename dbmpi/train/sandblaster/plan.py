"""Which examples each batch and each portion of a batch holds (coordinator and replicas agree
on it by computing it, so a reply carries only a batch number and a range)."""

from __future__ import annotations

import numpy as np


class BatchPlan:
    """Which examples (rows of the loaded training set) batch ``b`` holds."""

    def __init__(self, n_train: int, batch_size: int, seed: int):
        self.n = n_train
        self.full = batch_size == 0
        self.size = n_train if self.full else batch_size
        self.per_epoch = max(1, n_train // self.size)
        self.seed = seed
        self._perm: tuple[int, np.ndarray] | None = None

    def rows(self, batch: int, lo: int, hi: int):
        """Rows of examples ``[lo, hi)`` of batch ``batch`` (a slice or an index array)."""
        if self.full:
            return slice(lo, hi)
        epoch, j = divmod(batch, self.per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, 5, epoch]).permutation(self.n))
        base = j * self.size
        return np.sort(self._perm[1][base + lo:base + hi])


def portion_bounds(n: int, portion_size: int) -> list[tuple[int, int]]:
    """The ``[lo, hi)`` example ranges of an ``n``-example batch's portions (the last may be
    shorter)."""
    return [(lo, min(lo + portion_size, n)) for lo in range(0, n, portion_size)]
