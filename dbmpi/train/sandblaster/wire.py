"""Sandblaster's scheduling messages: the request and reply layouts and the decision words.

Both are float64 arrays (point-to-point, tags :attr:`~dbmpi.protocol.Tag.REQUEST` and
:attr:`~dbmpi.protocol.Tag.REPLY`): every field fits a double exactly, and one dtype keeps the
receive buffers fixed. The package docstring (:mod:`dbmpi.train.sandblaster`) describes the
protocol. No MPI here: the scheduler and its tests import the words without a communicator.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import numpy as np

REQUEST_HEAD = 5  # eval, finished, loss_sum, n_correct, k; then p_1 .. p_k
REPLY_SIZE = 6  # decision, eval, batch, portion, lo, hi


@enum.unique
class Decision(enum.IntEnum):
    """What the coordinator tells a replica to do with its pending portions."""

    KEEP = 0  # keep accumulating the pending portions
    GRANT = 1  # push them now: they count
    REJECT = 2  # discard them
    STOP = 3  # discard them and leave


class Request(NamedTuple):
    eval_id: int  # the evaluation the pending portions belong to (-1: none yet)
    finished: int  # the portion just computed, -1 if none
    loss_sum: float  # summed loss of the pending portions
    n_correct: float
    pending: list[int]  # computed, summed locally, not pushed yet


def request_buffer(push_every: int) -> np.ndarray:
    """Room for the longest request: a replica asks at the latest after ``push_every``."""
    return np.zeros(REQUEST_HEAD + push_every, np.float64)


def encode_request(buf: np.ndarray, eval_id: int, finished: int, loss_sum: float,
                   n_correct: float, pending: list[int]) -> np.ndarray:
    """Fill ``buf`` and return the view to send (only the pending portions that exist)."""
    k = len(pending)
    req = buf[:REQUEST_HEAD + k]
    req[:REQUEST_HEAD] = (eval_id, finished, loss_sum, n_correct, k)
    req[REQUEST_HEAD:] = pending
    return req


def decode_request(buf: np.ndarray) -> Request:
    k = int(buf[4])
    return Request(int(buf[0]), int(buf[1]), float(buf[2]), float(buf[3]),
                   [int(p) for p in buf[REQUEST_HEAD:REQUEST_HEAD + k]])


def encode_reply(buf: np.ndarray, decision: Decision, eval_id: int, batch: int, portion: int,
                 bounds: tuple[int, int] | None) -> np.ndarray:
    """``bounds``: the portion's examples ``[lo, hi)`` in the batch; None when no portion."""
    buf[:] = (decision, eval_id, batch, portion, -1, -1)
    if bounds is not None:
        buf[4:6] = bounds
    return buf


def decode_reply(buf: np.ndarray) -> tuple[int, int, int, int, int, int]:
    """``(decision, eval_id, batch, portion, lo, hi)`` as ints."""
    decision, eval_id, batch, portion, lo, hi = (int(v) for v in buf)
    return decision, eval_id, batch, portion, lo, hi
