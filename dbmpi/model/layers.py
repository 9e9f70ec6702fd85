"""Layers: forward and backward side by side, compute in :mod:`cython_kernels`.

A layer owns no memory for its parameters: :meth:`bind` gives it views into the model's flat
parameter and gradient vectors. Activation buffers are kept per batch size, so the training
loop allocates nothing after its first step.
"""

from __future__ import annotations

import numpy as np

import cython_kernels as ck

from .base import Layer


class Dropout:
    """Inverted dropout of a layer's output while training (Srivastava et al. 2014): each
    unit is zeroed with probability ``p`` and the others scaled by ``1 / (1 - p)``, so that
    evaluation uses the layer as it is. Each replica draws its own masks (:meth:`seed`)."""

    def __init__(self, p: float):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = float(p)
        self.rng = np.random.default_rng(0)
        self.mask: np.ndarray | None = None  # of the last training forward pass
        self._buffers: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def seed(self, seed) -> None:
        self.rng = np.random.default_rng(seed)

    def forward(self, y: np.ndarray) -> np.ndarray:
        """``y`` with units dropped (a new buffer: ``y`` stays what the backward pass of the
        activation reads)."""
        bufs = self._buffers.get(y.shape)
        if bufs is None:
            bufs = self._buffers[y.shape] = (np.empty(y.shape, y.dtype),
                                             np.empty(y.shape, y.dtype))
        mask, out = bufs
        self.rng.random(y.shape, dtype=y.dtype, out=mask)
        np.greater_equal(mask, self.p, out=mask, casting="unsafe")
        mask *= np.float32(1.0 / (1.0 - self.p))
        self.mask = mask
        return np.multiply(y, mask, out=out)

    def backward(self, dy: np.ndarray) -> None:
        """Through the mask of the last training forward pass, in place."""
        dy *= self.mask


class Dense(Layer):
    """``y = act(x @ W + b)`` with ``W`` of shape (n_in, n_out); optionally dropout on ``y``
    while training (``dropout`` > 0). ``dtype``: of the activations (the kernels are fused
    over float and double; Sandblaster's float64 replicas bind float64 vectors)."""

    can_accumulate = True  # backward(accumulate=True) adds to dW, db

    def __init__(self, n_in: int, n_out: int, activation: str = "relu", dropout: float = 0.0,
                 dtype=np.float32):
        self.n_in, self.n_out, self.activation = int(n_in), int(n_out), activation
        self.out_shape = (self.n_out,)
        self.dtype = np.dtype(dtype)
        self.num_params = self.n_in * self.n_out + self.n_out
        self._buffers: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.dropout = Dropout(dropout) if dropout > 0 else None
        self._dropped = False

    def bind(self, params: np.ndarray, grads: np.ndarray) -> None:
        k = self.n_in * self.n_out
        self.W = params[:k].reshape(self.n_in, self.n_out)
        self.b = params[k:self.num_params]
        self.dW = grads[:k].reshape(self.n_in, self.n_out)
        self.db = grads[k:self.num_params]

    def init(self, params: np.ndarray, rng: np.random.Generator) -> None:
        """Glorot-uniform weights (He-uniform for ReLU), zero biases, into ``params``."""
        fan = self.n_in if self.activation == "relu" else (self.n_in + self.n_out) / 2
        limit = np.sqrt(3.0 / fan) if self.activation != "relu" else np.sqrt(6.0 / fan)
        k = self.n_in * self.n_out
        params[:k] = rng.uniform(-limit, limit, size=k).astype(np.float32)
        params[k:self.num_params] = 0.0

    def _bufs(self, batch: int) -> tuple[np.ndarray, np.ndarray]:
        bufs = self._buffers.get(batch)
        if bufs is None:
            bufs = (np.empty((batch, self.n_out), self.dtype),
                    np.empty((batch, self.n_in), self.dtype))
            self._buffers[batch] = bufs
        return bufs

    def forward(self, x: np.ndarray, train: bool = False,
                out: np.ndarray | None = None) -> np.ndarray:
        """The layer's output; with ``train``, after dropout (when the layer has it)."""
        self._check_io(out)
        self.x = x
        self.y = self._bufs(x.shape[0])[0]
        ck.dense_forward(x, self.W, self.b, self.y, self.activation)
        self._dropped = train and self.dropout is not None
        return self.dropout.forward(self.y) if self._dropped else self.y

    def backward(self, dy: np.ndarray, need_dx: bool = True, accumulate: bool = False,
                 dx_out: np.ndarray | None = None) -> np.ndarray | None:
        """Write (or, with ``accumulate``, add) dW, db into the gradient vector; return dL/dx
        (``dy`` is overwritten)."""
        self._check_io(None, dx_out)
        dx = self._bufs(dy.shape[0])[1] if need_dx else None
        if self._dropped:
            self.dropout.backward(dy)
        ck.dense_backward(self.x, self.W, self.y, dy, self.activation, self.dW, self.db, dx,
                          accumulate)
        return dx

    def float64(self) -> Dense:
        """Without dropout: float64 replicas run batch L-BFGS, which needs a deterministic
        objective (the config refuses dropout there)."""
        return Dense(self.n_in, self.n_out, self.activation, dtype=np.float64)
