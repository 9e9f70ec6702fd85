"""Where each parameter lives: a flat float32 vector cut into contiguous shard blocks.

Pure arithmetic, no MPI, so it is tested directly. Blocks are as even as possible and ignore
layer boundaries (a shard edge may fall inside a weight matrix); a worker that owns the range
``[start, stop)`` of the vector talks only to the shards whose blocks intersect it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Segment:
    """The part of a range ``[start, stop)`` that lives on one shard."""

    shard: int
    start: int  # global index of the first element
    offset: int  # index of that element inside the shard's block
    count: int

    @property
    def stop(self) -> int:
        return self.start + self.count


@dataclass(frozen=True)
class ParamLayout:
    total: int
    bounds: tuple[int, ...]  # num_shards + 1 global offsets

    @classmethod
    def even(cls, total: int, num_shards: int) -> "ParamLayout":
        if num_shards < 1:
            raise ValueError("num_shards must be >= 1")
        edges = np.linspace(0, total, num_shards + 1).round().astype(np.int64)
        return cls(int(total), tuple(int(e) for e in edges))

    @property
    def num_shards(self) -> int:
        return len(self.bounds) - 1

    def block(self, shard: int) -> tuple[int, int]:
        """Global ``[start, stop)`` held by ``shard``."""
        return self.bounds[shard], self.bounds[shard + 1]

    def block_size(self, shard: int) -> int:
        lo, hi = self.block(shard)
        return hi - lo

    def segments(self, start: int, stop: int) -> list[Segment]:
        """Split the global range ``[start, stop)`` by shard (empty pieces dropped)."""
        if not 0 <= start <= stop <= self.total:
            raise ValueError(f"range [{start}, {stop}) outside [0, {self.total})")
        out = []
        for s in range(self.num_shards):
            lo, hi = self.block(s)
            a, b = max(lo, start), min(hi, stop)
            if a < b:
                out.append(Segment(s, a, a - lo, b - a))
        return out
