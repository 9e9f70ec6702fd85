"""Image layers on one rank: locally connected, L2 pooling, local contrast normalisation.

Images are channels-last. Like :class:`~dbmpi.model.layers.Dense`, every layer takes and
returns 2-D ``(B, features)`` C-contiguous float32 arrays (the per-example image flattened
row-major, ``(h * W + w) * C + c``) so that layers chain without reshuffles; compute is in
:mod:`cython_kernels`. Only :class:`Local` has parameters, bound as views of the model's flat
vectors: ``W (OH, OW, F, k, k, C)`` then ``b (OH, OW, F)``.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import expit

import cython_kernels as ck

ACTIVATIONS = ("linear", "relu", "sigmoid", "tanh")


def _activate(y: np.ndarray, activation: str) -> None:
    """y <- act(y) in place."""
    if activation == "relu":
        np.maximum(y, 0, out=y)
    elif activation == "tanh":
        np.tanh(y, out=y)
    elif activation == "sigmoid":
        expit(y, out=y)
    elif activation != "linear":
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def _activation_grad(dy: np.ndarray, y: np.ndarray, activation: str) -> None:
    """dy <- dy * act'(z), from the output y = act(z), in place."""
    if activation == "relu":
        dy[y <= 0] = 0
    elif activation == "tanh":
        dy *= 1 - y * y
    elif activation == "sigmoid":
        dy *= y * (1 - y)


class _Buffers:
    """Output and input-gradient buffers per batch size (nothing allocated after step one)."""

    def __init__(self, in_shape, out_shape):
        self.n_in, self.n_out = math.prod(in_shape), math.prod(out_shape)
        self._by_batch: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def get(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        bufs = self._by_batch.get(batch)
        if bufs is None:
            bufs = (np.empty((batch, self.n_out), np.float32),
                    np.empty((batch, self.n_in), np.float32))
            self._by_batch[batch] = bufs
        return bufs


class Local:
    """Locally connected layer (untied weights, no padding) then an elementwise activation.

    ``y[n, i, j, f] = act(b[i, j, f] + sum_{u,v,c} x[n, i*s+u, j*s+v, c] W[i, j, f, u, v, c])``.
    """

    def __init__(self, in_shape, filters: int, kernel: int, stride: int = 1,
                 activation: str = "linear"):
        H, W, C = (int(v) for v in in_shape)
        self.in_shape = (H, W, C)
        self.F, self.k, self.s = int(filters), int(kernel), int(stride)
        self.activation = activation
        OH, OW = (H - self.k) // self.s + 1, (W - self.k) // self.s + 1
        self.out_shape = (OH, OW, self.F)
        self.w_shape = (OH, OW, self.F, self.k, self.k, C)
        self.n_in, self.n_out = H * W * C, OH * OW * self.F
        self.num_params = math.prod(self.w_shape) + OH * OW * self.F
        self._bufs = _Buffers(self.in_shape, self.out_shape)

    def bind(self, params: np.ndarray, grads: np.ndarray) -> None:
        k = math.prod(self.w_shape)
        self.W = params[:k].reshape(self.w_shape)
        self.b = params[k:self.num_params].reshape(self.out_shape)
        self.dW = grads[:k].reshape(self.w_shape)
        self.db = grads[k:self.num_params].reshape(self.out_shape)

    def init(self, params: np.ndarray, rng: np.random.Generator) -> None:
        """Uniform weights of variance 1/fan_in (2/fan_in for ReLU), zero biases."""
        fan = self.k * self.k * self.in_shape[2]
        limit = np.sqrt((6.0 if self.activation == "relu" else 3.0) / fan)
        k = math.prod(self.w_shape)
        params[:k] = rng.uniform(-limit, limit, size=k).astype(np.float32)
        params[k:self.num_params] = 0.0

    def forward(self, x: np.ndarray) -> np.ndarray:
        B = x.shape[0]
        self.x = x
        self.y = self._bufs.get(B)[0]
        ck.local_forward(x.reshape(B, *self.in_shape), self.W, self.b, self.s,
                         self.y.reshape(B, *self.out_shape))
        _activate(self.y, self.activation)
        return self.y

    def backward(self, dy: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        """Write dW, db; return dL/dx (``dy`` is overwritten)."""
        B = dy.shape[0]
        _activation_grad(dy, self.y, self.activation)
        dx = self._bufs.get(B)[1] if need_dx else None
        ck.local_backward(self.x.reshape(B, *self.in_shape), self.W,
                          dy.reshape(B, *self.out_shape), self.s, self.dW, self.db,
                          None if dx is None else dx.reshape(B, *self.in_shape))
        return dx


class _NoParams:
    num_params = 0

    def bind(self, params: np.ndarray, grads: np.ndarray) -> None:
        pass

    def init(self, params: np.ndarray, rng: np.random.Generator) -> None:
        pass


class L2Pool(_NoParams):
    """``y = sqrt(1e-8 + sum of x**2 over each size x size window)``, per channel, no padding."""

    def __init__(self, in_shape, size: int, stride: int | None = None):
        H, W, C = (int(v) for v in in_shape)
        self.in_shape = (H, W, C)
        self.size = int(size)
        self.s = int(stride or size)
        self.out_shape = ((H - self.size) // self.s + 1, (W - self.size) // self.s + 1, C)
        self.n_in, self.n_out = H * W * C, math.prod(self.out_shape)
        self._bufs = _Buffers(self.in_shape, self.out_shape)

    def forward(self, x: np.ndarray) -> np.ndarray:
        B = x.shape[0]
        self.x = x
        self.y = self._bufs.get(B)[0]
        ck.l2pool_forward(x.reshape(B, *self.in_shape), self.size, self.s,
                          self.y.reshape(B, *self.out_shape))
        return self.y

    def backward(self, dy: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        if not need_dx:
            return None
        B = dy.shape[0]
        dx = self._bufs.get(B)[1]
        ck.l2pool_backward(self.x.reshape(B, *self.in_shape), self.y.reshape(B, *self.out_shape),
                           dy.reshape(B, *self.out_shape), self.size, self.s,
                           dx.reshape(B, *self.in_shape))
        return dx


class LCN(_NoParams):
    """Local contrast normalisation over a ``size x size`` box (same padding, in-image counts)."""

    def __init__(self, in_shape, size: int):
        H, W, C = (int(v) for v in in_shape)
        self.in_shape = self.out_shape = (H, W, C)
        self.size = int(size)
        self.n_in = self.n_out = H * W * C
        self._bufs = _Buffers(self.in_shape, self.out_shape)
        self._state: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def forward(self, x: np.ndarray) -> np.ndarray:
        B = x.shape[0]
        self.y = self._bufs.get(B)[0]
        st = self._state.get(B)
        if st is None:
            st = self._state[B] = (np.empty((B, self.n_in), np.float32),
                                   np.empty((B, *self.in_shape[:2]), np.float32))
        self.v, self.den = st
        shape = (B, *self.in_shape)
        ck.lcn_forward(x.reshape(shape), self.size, self.y.reshape(shape), self.v.reshape(shape),
                       self.den)
        return self.y

    def backward(self, dy: np.ndarray, need_dx: bool = True) -> np.ndarray | None:
        if not need_dx:
            return None
        B = dy.shape[0]
        dx = self._bufs.get(B)[1]
        shape = (B, *self.in_shape)
        ck.lcn_backward(dy.reshape(shape), self.v.reshape(shape), self.den, self.size,
                        dx.reshape(shape))
        return dx
