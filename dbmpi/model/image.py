"""Image layers on one rank: locally connected, L2 pooling, local contrast normalisation.

Images are channels-last. Like :class:`~dbmpi.model.layers.Dense`, every layer takes and
returns 2-D ``(B, features)`` float32 arrays (the per-example image flattened row-major,
``(h * W + w) * C + c``) so that layers chain without reshuffles; compute is in
:mod:`cython_kernels`. Only :class:`Local` has parameters, bound as views of the model's flat
vectors: ``W (OH, OW, F, k, k, C)`` then ``b (OH, OW, F)``.

Inputs and gradients may be column blocks of wider matrices (``big[:, a:b]``: every example
contiguous, any row stride), and ``forward(x, out=...)`` / ``backward(dy, dx_out=...)`` write
into such blocks instead of the layer's own buffers: model parallelism reads its halo-padded
row slabs and writes its rows into the next layer's slab that way, without copies.
"""

from __future__ import annotations

import math

import numpy as np

import cython_kernels as ck

from .base import Layer, NoParams

ACTIVATIONS = ("linear", "relu", "sigmoid", "tanh")


def _activate(y: np.ndarray, activation: str) -> None:
    """y <- act(y) in place."""
    if activation == "relu":
        np.maximum(y, 0, out=y)
    elif activation == "tanh":
        np.tanh(y, out=y)
    elif activation == "sigmoid":
        # imported here: scipy.special costs every rank 0.25 s at start (its array-API
        # layer), and only image models with a sigmoid need it
        from scipy.special import expit

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


def image_view(a: np.ndarray, shape) -> np.ndarray:
    """The (B, *shape) view of a (B, features) block whose examples are contiguous (never a
    copy: an output written into a copy would be lost)."""
    return a.reshape(a.shape[0], *shape, copy=False)


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


class Local(Layer):
    """Locally connected layer (untied weights, no padding) then an elementwise activation.

    ``y[n, i, j, f] = act(b[i, j, f] + sum_{u,v,c} x[n, i*s+u, j*s+v, c] W[i, j, f, u, v, c])``.

    ``locations = (first, count)``: only output locations ``[first, first + count)`` of the
    input's output grid (row-major, location ``l`` is ``(l // OW, l % OW)``), with their own
    weights ``W (count, F, k, k, C)`` and ``b (count, F)``; the output is ``(count, F)`` per
    example (model parallelism may cut the layer inside a row).
    """

    takes_views = True  # forward(out=...) / backward(dx_out=...) write into column blocks

    def __init__(self, in_shape, filters: int, kernel: int, stride: int = 1,
                 activation: str = "linear", locations: tuple[int, int] | None = None):
        H, W, C = (int(v) for v in in_shape)
        self.in_shape = (H, W, C)
        self.F, self.k, self.s = int(filters), int(kernel), int(stride)
        self.activation = activation
        OH, OW = (H - self.k) // self.s + 1, (W - self.k) // self.s + 1
        self.first = None if locations is None else int(locations[0])
        if locations is None:
            self.out_shape = (OH, OW, self.F)
            self.w_shape = (OH, OW, self.F, self.k, self.k, C)
        else:
            n = int(locations[1])
            if self.first < 0 or n < 1 or self.first + n > OH * OW:
                raise ValueError(f"locations {locations} outside the {OH} x {OW} output grid")
            self.out_shape = (n, self.F)
            self.w_shape = (n, self.F, self.k, self.k, C)
        self.n_in, self.n_out = H * W * C, math.prod(self.out_shape)
        self.num_params = math.prod(self.w_shape) + self.n_out
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

    def forward(self, x: np.ndarray, train: bool = False,
                out: np.ndarray | None = None) -> np.ndarray:
        B = x.shape[0]
        self.x = x
        self.y = self._bufs.get(B)[0] if out is None else out
        if self.first is None:
            ck.local_forward(image_view(x, self.in_shape), self.W, self.b, self.s,
                             image_view(self.y, self.out_shape))
        else:
            ck.local_forward_at(image_view(x, self.in_shape), self.W, self.b, self.s, self.first,
                                image_view(self.y, self.out_shape))
        _activate(self.y, self.activation)
        return self.y

    def backward(self, dy: np.ndarray, need_dx: bool = True, accumulate: bool = False,
                 dx_out: np.ndarray | None = None) -> np.ndarray | None:
        """Write dW, db; return dL/dx (``dy`` is overwritten)."""
        self._check_io(None, None, accumulate)
        B = dy.shape[0]
        _activation_grad(dy, self.y, self.activation)
        dx = None if not need_dx else self._bufs.get(B)[1] if dx_out is None else dx_out
        dx4 = None if dx is None else image_view(dx, self.in_shape)
        if self.first is None:
            ck.local_backward(image_view(self.x, self.in_shape), self.W,
                              image_view(dy, self.out_shape), self.s, self.dW, self.db, dx4)
        else:
            ck.local_backward_at(image_view(self.x, self.in_shape), self.W,
                                 image_view(dy, self.out_shape), self.s, self.first, self.dW,
                                 self.db, dx4)
        return dx


class L2Pool(NoParams):
    """``y = sqrt(1e-8 + sum of x**2 over each size x size window)``, per channel, no padding."""

    takes_views = True  # forward(out=...) / backward(dx_out=...) write into column blocks

    def __init__(self, in_shape, size: int, stride: int | None = None):
        H, W, C = (int(v) for v in in_shape)
        self.in_shape = (H, W, C)
        self.size = int(size)
        self.s = int(stride or size)
        self.out_shape = ((H - self.size) // self.s + 1, (W - self.size) // self.s + 1, C)
        self.n_in, self.n_out = H * W * C, math.prod(self.out_shape)
        self._bufs = _Buffers(self.in_shape, self.out_shape)

    def forward(self, x: np.ndarray, train: bool = False,
                out: np.ndarray | None = None) -> np.ndarray:
        B = x.shape[0]
        self.x = x
        self.y = self._bufs.get(B)[0] if out is None else out
        ck.l2pool_forward(image_view(x, self.in_shape), self.size, self.s,
                          image_view(self.y, self.out_shape))
        return self.y

    def backward(self, dy: np.ndarray, need_dx: bool = True, accumulate: bool = False,
                 dx_out: np.ndarray | None = None) -> np.ndarray | None:
        if not need_dx:
            return None
        B = dy.shape[0]
        dx = self._bufs.get(B)[1] if dx_out is None else dx_out
        ck.l2pool_backward(image_view(self.x, self.in_shape), image_view(self.y, self.out_shape),
                           image_view(dy, self.out_shape), self.size, self.s,
                           image_view(dx, self.in_shape))
        return dx


class LCN(NoParams):
    """Local contrast normalisation over a ``size x size`` box (same padding, in-image counts).

    ``rows = (a, b)``: the input is a slab of the image and only output rows ``[a, b)`` of it
    are computed (model parallelism: the slab holds the ``2r`` halo rows each side that those
    rows read; the outputs near the slab's cut edges would be wrong and are never made).
    """

    takes_views = True  # forward(out=...) / backward(dx_out=...) write into column blocks

    def __init__(self, in_shape, size: int, rows: tuple[int, int] | None = None):
        H, W, C = (int(v) for v in in_shape)
        self.in_shape = (H, W, C)
        self.rows = None if rows is None or tuple(rows) == (0, H) else tuple(rows)
        a, b = self.rows or (0, H)
        self.out_shape = (b - a, W, C)
        self.size = int(size)
        self.n_in, self.n_out = H * W * C, (b - a) * W * C
        self._bufs = _Buffers(self.in_shape, self.out_shape)
        self._state: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def forward(self, x: np.ndarray, train: bool = False,
                out: np.ndarray | None = None) -> np.ndarray:
        B = x.shape[0]
        self.y = self._bufs.get(B)[0] if out is None else out
        st = self._state.get(B)
        if st is None:
            st = self._state[B] = (np.empty((B, self.n_in), np.float32),
                                   np.empty((B, *self.out_shape[:2]), np.float32))
        self.v, self.den = st
        ck.lcn_forward(image_view(x, self.in_shape), self.size, image_view(self.y, self.out_shape),
                       image_view(self.v, self.in_shape), self.den, rows=self.rows)
        return self.y

    def backward(self, dy: np.ndarray, need_dx: bool = True, accumulate: bool = False,
                 dx_out: np.ndarray | None = None) -> np.ndarray | None:
        if not need_dx:
            return None
        B = dy.shape[0]
        dx = self._bufs.get(B)[1] if dx_out is None else dx_out
        ck.lcn_backward(image_view(dy, self.out_shape), image_view(self.v, self.in_shape), self.den,
                        self.size, image_view(dx, self.in_shape), rows=self.rows)
        return dx
