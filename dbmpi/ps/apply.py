"""How a shard applies one push to its block: the optimizer over cache-sized chunks.

Pure numpy, no MPI: the shard's loop (:class:`dbmpi.ps.server.ShardService`) calls it with a
progress call between chunks, and the replay of a recorded run (:mod:`dbmpi.replay`) without,
so that both compute the same floats in the same order.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

# Elements a shard applies between two progress calls (1 MiB of float32, ~0.1 ms of Adagrad):
# off-node operations aimed at the shard wait for its next MPI call, so it never computes for
# long without one; the chunk is also cache-sized, so a gradient crosses memory once.
APPLY_CHUNK = 1 << 18


def apply_chunks(optimizer, params: np.ndarray, state: np.ndarray, grad: np.ndarray, at: int,
                 chunk: int, between: Callable[[], None] | None = None) -> int:
    """Apply ``grad`` to ``params[at:at + len(grad)]`` and the optimizer's ``state`` columns
    there, ``chunk`` elements at a time, calling ``between()`` after each chunk.

    Returns -1, or the index in ``grad`` near which a non-finite value stopped it (the
    optimizer checks block by block inside its own pass: no block holding it is applied).
    """
    for lo in range(0, grad.shape[0], chunk):
        part = grad[lo:lo + chunk]
        s = slice(at + lo, at + lo + part.shape[0])
        bad = optimizer.step(params[s], part, state[:, s], check_finite=True)
        if bad >= 0:
            return lo + bad
        if between is not None:
            between()
    return -1
