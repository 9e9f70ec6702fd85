"""Update rules applied by the shards, in place on a block of the flat parameter vector.

Every rule is an :class:`Optimizer`: a dense step on a contiguous piece of the block, a row
step on rows of an embedding table (sparse pushes, :mod:`dbmpi.ps.sparse`), and the names of
the per-parameter state it keeps. A shard holds that state as one float32 array of shape
``(len(state_names), n)``, cuts it as it cuts its block, and the checkpoint stores it whole
(:mod:`dbmpi.checkpoint`): a new rule is a class here and an entry in :data:`OPTIMIZERS`
(plus its hyperparameters in :class:`dbmpi.config.OptimizerConfig`), nothing else.

Adagrad as in the paper: the learning rate of parameter i after K updates is
``gamma / sqrt(sum of its squared gradients)``; the sum (the accumulator) is state owned by the
shard that holds the parameter. ``eps`` keeps the first step finite:
``accum += g*g; p -= gamma * g / (sqrt(accum) + eps)`` (PyTorch's form). Momentum and Adam
follow PyTorch's ``SGD(momentum=mu)`` and ``Adam`` (with bias correction). Their row steps
are *lazy*, as TensorFlow's LazyAdam and PyTorch's SparseAdam: a row's state moves only when
the row is pushed, so Adam counts its steps per parameter (state ``t``).
"""

from __future__ import annotations

import abc
import contextlib
import math
from typing import ClassVar

import numpy as np

import cython_kernels as ck


def first_nonfinite(grad: np.ndarray) -> int:
    """-1 if ``grad`` is finite, else an index at which it is not.

    g.g is NaN/Inf iff g holds NaN/Inf (or |g| > ~1e19): one BLAS pass, no temporary.
    """
    if math.isfinite(float(np.dot(grad, grad))):
        return -1
    bad = np.flatnonzero(~np.isfinite(grad))
    return int(bad[0]) if bad.size else 0  # finite but so large that g.g overflows


class Optimizer(abc.ABC):
    """An update rule. ``state`` arguments are ``(len(state_names), ...)`` float32 views."""

    name: ClassVar[str]
    state_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, learning_rate: float):
        self.lr = float(learning_rate)

    @contextlib.contextmanager
    def lr_scaled(self, scale: float):
        """Steps inside use ``scale`` x the learning rate (a staleness-aware shard divides it
        by a push's staleness)."""
        base = self.lr
        self.lr = base * scale
        try:
            yield self
        finally:
            self.lr = base

    @classmethod
    @abc.abstractmethod
    def from_config(cls, cfg) -> Optimizer:
        """The rule with the hyperparameters of an :class:`~dbmpi.config.OptimizerConfig`."""

    def init_state(self, n: int) -> np.ndarray:
        """The state of ``n`` parameters that were never updated."""
        return np.zeros((len(self.state_names), n), dtype=np.float32)

    def step(self, param: np.ndarray, grad: np.ndarray, state: np.ndarray,
             check_finite: bool = False) -> int:
        """Apply ``grad`` to ``param`` (1-D, one length) and its ``state`` in place.

        With ``check_finite`` refuse a gradient holding NaN/Inf: return an index where it is
        not finite, nothing written from the piece holding it on (a kernel may have applied
        earlier pieces), else -1.
        """
        if check_finite:
            bad = first_nonfinite(grad)
            if bad >= 0:
                return bad
        self._dense(param, grad, state)
        return -1

    @abc.abstractmethod
    def _dense(self, param: np.ndarray, grad: np.ndarray, state: np.ndarray) -> None:
        """The update itself (``grad`` known to be finite)."""

    @abc.abstractmethod
    def step_rows(self, table: np.ndarray, rows: np.ndarray, grad_rows: np.ndarray,
                  state: np.ndarray) -> None:
        """Apply ``grad_rows`` (k, d) to rows ``rows`` (sorted, unique int64) of ``table``
        (R, d) and of ``state`` (len(state_names), R, d); no other row changes."""


class SGD(Optimizer):
    """``p -= lr * g``; no state."""

    name = "sgd"

    @classmethod
    def from_config(cls, cfg) -> SGD:
        return cls(cfg.learning_rate)

    def _dense(self, param, grad, state) -> None:
        ck.sgd_dense(param, grad, self.lr)

    def step_rows(self, table, rows, grad_rows, state) -> None:
        table[rows] -= np.float32(self.lr) * grad_rows


class Adagrad(Optimizer):
    """Per-coordinate step ``lr / (sqrt(sum g^2) + eps)``; state = the accumulator."""

    name = "adagrad"
    state_names = ("sum_sq",)

    def __init__(self, learning_rate: float, eps: float = 1e-8, initial_accumulator: float = 0.0):
        super().__init__(learning_rate)
        self.eps = float(eps)
        self.initial_accumulator = float(initial_accumulator)

    @classmethod
    def from_config(cls, cfg) -> Adagrad:
        return cls(cfg.learning_rate, cfg.eps, cfg.initial_accumulator)

    def init_state(self, n: int) -> np.ndarray:
        return np.full((1, n), self.initial_accumulator, dtype=np.float32)

    def step(self, param, grad, state, check_finite: bool = False) -> int:
        """As :meth:`Optimizer.step`; the check stops at the first L1-sized block holding
        NaN/Inf and rides on the update's own pass (no extra memory traffic)."""
        return ck.adagrad_dense(param, grad, state[0], self.lr, self.eps, check_finite)

    def _dense(self, param, grad, state) -> None:
        ck.adagrad_dense(param, grad, state[0], self.lr, self.eps, False)

    def step_rows(self, table, rows, grad_rows, state) -> None:
        ck.adagrad_rows(table, rows, grad_rows, state[0], self.lr, self.eps)


class Momentum(Optimizer):
    """Heavy ball, as PyTorch's ``SGD(momentum=mu)``: ``v = mu v + g; p -= lr v``."""

    name = "momentum"
    state_names = ("velocity",)

    def __init__(self, learning_rate: float, momentum: float = 0.9):
        super().__init__(learning_rate)
        self.mu = float(momentum)

    @classmethod
    def from_config(cls, cfg) -> Momentum:
        return cls(cfg.learning_rate, cfg.momentum)

    def _dense(self, param, grad, state) -> None:
        v = state[0]
        v *= np.float32(self.mu)
        v += grad
        param -= np.float32(self.lr) * v

    def step_rows(self, table, rows, grad_rows, state) -> None:
        v = np.float32(self.mu) * state[0][rows] + grad_rows
        state[0][rows] = v
        table[rows] -= np.float32(self.lr) * v


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction, as PyTorch's ``Adam``; state m, v and the
    parameter's own step count t (float32: exact up to 2**24 updates)."""

    name = "adam"
    state_names = ("m", "v", "t")

    def __init__(self, learning_rate: float, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8):
        super().__init__(learning_rate)
        self.b1, self.b2, self.eps = float(beta1), float(beta2), float(eps)

    @classmethod
    def from_config(cls, cfg) -> Adam:
        return cls(cfg.learning_rate, cfg.beta1, cfg.beta2, cfg.eps)

    def _update(self, g: np.ndarray, m: np.ndarray, v: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Advance m, v, t in place; return the step to subtract from the parameters."""
        f = np.float32
        t += 1
        m *= f(self.b1)
        m += f(1 - self.b1) * g
        v *= f(self.b2)
        v += f(1 - self.b2) * (g * g)
        mhat = m / (1 - np.power(f(self.b1), t))
        vhat = v / (1 - np.power(f(self.b2), t))
        return f(self.lr) * mhat / (np.sqrt(vhat) + f(self.eps))

    def _dense(self, param, grad, state) -> None:
        param -= self._update(grad, state[0], state[1], state[2])

    def step_rows(self, table, rows, grad_rows, state) -> None:
        m, v, t = (state[i][rows] for i in range(3))
        table[rows] -= self._update(grad_rows, m, v, t)
        for i, x in enumerate((m, v, t)):
            state[i][rows] = x


OPTIMIZERS: dict[str, type[Optimizer]] = {c.name: c for c in (Adagrad, SGD, Momentum, Adam)}


def make_optimizer(cfg) -> Optimizer:
    """The rule an :class:`~dbmpi.config.OptimizerConfig` names."""
    return OPTIMIZERS[cfg.name].from_config(cfg)
