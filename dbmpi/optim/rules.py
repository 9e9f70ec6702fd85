"""Update rules applied by the shards, in place on a block of the flat parameter vector.

Adagrad as in the paper: the learning rate of parameter i after K updates is
``gamma / sqrt(sum of its squared gradients)``; the sum (the accumulator) is state owned by the
shard that holds the parameter. ``eps`` keeps the first step finite:
``accum += g*g; p -= gamma * g / (sqrt(accum) + eps)`` (PyTorch's form).
"""

from __future__ import annotations

import math

import numpy as np

import cython_kernels as ck

from ..config import OptimizerConfig


def _first_nonfinite(grad: np.ndarray) -> int:
    """-1 if ``grad`` is finite, else an index at which it is not.

    g.g is NaN/Inf iff g holds NaN/Inf (or |g| > ~1e19): one BLAS pass, no temporary.
    """
    if math.isfinite(float(np.dot(grad, grad))):
        return -1
    bad = np.flatnonzero(~np.isfinite(grad))
    return int(bad[0]) if bad.size else 0  # finite but so large that g.g overflows


class SGD:
    """``p -= lr * g``; no state."""

    def __init__(self, learning_rate: float):
        self.lr = float(learning_rate)

    def init_state(self, n: int) -> np.ndarray:
        return np.zeros(0, dtype=np.float32)

    def step(self, param: np.ndarray, grad: np.ndarray, state: np.ndarray,
             check_finite: bool = False) -> int:
        """Apply ``grad``; with ``check_finite`` refuse a non-finite one: return the index
        where it is not finite (nothing written), else -1."""
        if check_finite:
            bad = _first_nonfinite(grad)
            if bad >= 0:
                return bad
        ck.sgd_dense(param, grad, self.lr)
        return -1


class Adagrad:
    """Per-coordinate step ``lr / (sqrt(sum g^2) + eps)``; state = the accumulator."""

    def __init__(self, learning_rate: float, eps: float = 1e-8, initial_accumulator: float = 0.0):
        self.lr = float(learning_rate)
        self.eps = float(eps)
        self.initial_accumulator = float(initial_accumulator)

    def init_state(self, n: int) -> np.ndarray:
        return np.full(n, self.initial_accumulator, dtype=np.float32)

    def step(self, param: np.ndarray, grad: np.ndarray, state: np.ndarray,
             check_finite: bool = False) -> int:
        """Apply ``grad``; with ``check_finite`` stop at the first L1-sized block of it holding
        NaN/Inf and return that block's start (earlier blocks applied), else -1. The check
        rides on the update's own pass: refusing non-finite pushes costs no memory traffic."""
        return ck.adagrad_dense(param, grad, state, self.lr, self.eps, check_finite)


def make_optimizer(cfg: OptimizerConfig) -> SGD | Adagrad:
    if cfg.name == "sgd":
        return SGD(cfg.learning_rate)
    return Adagrad(cfg.learning_rate, cfg.eps, cfg.initial_accumulator)
