"""Update rules applied by the shards, in place on a block of the flat parameter vector.

Adagrad as in the paper: the learning rate of parameter i after K updates is
``gamma / sqrt(sum of its squared gradients)``; the sum (the accumulator) is state owned by the
shard that holds the parameter. ``eps`` keeps the first step finite:
``accum += g*g; p -= gamma * g / (sqrt(accum) + eps)`` (PyTorch's form).
"""

from __future__ import annotations

import numpy as np

import cython_kernels as ck

from ..config import OptimizerConfig


class SGD:
    """``p -= lr * g``; no state."""

    def __init__(self, learning_rate: float):
        self.lr = float(learning_rate)

    def init_state(self, n: int) -> np.ndarray:
        return np.zeros(0, dtype=np.float32)

    def step(self, param: np.ndarray, grad: np.ndarray, state: np.ndarray) -> None:
        ck.sgd_dense(param, grad, self.lr)


class Adagrad:
    """Per-coordinate step ``lr / (sqrt(sum g^2) + eps)``; state = the accumulator."""

    def __init__(self, learning_rate: float, eps: float = 1e-8, initial_accumulator: float = 0.0):
        self.lr = float(learning_rate)
        self.eps = float(eps)
        self.initial_accumulator = float(initial_accumulator)

    def init_state(self, n: int) -> np.ndarray:
        return np.full(n, self.initial_accumulator, dtype=np.float32)

    def step(self, param: np.ndarray, grad: np.ndarray, state: np.ndarray) -> None:
        ck.adagrad_dense(param, grad, state, self.lr, self.eps)


def make_optimizer(cfg: OptimizerConfig) -> SGD | Adagrad:
    if cfg.name == "sgd":
        return SGD(cfg.learning_rate)
    return Adagrad(cfg.learning_rate, cfg.eps, cfg.initial_accumulator)
