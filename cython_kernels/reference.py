"""Plain numpy twins of the Cython kernels: same names, same signatures, same in-place contract.

They are the specification: the tests compare every compiled kernel with its twin here and
check the backward passes here against finite differences. They favour clarity over speed
and check nothing beyond what numpy checks itself.

Conventions shared with the compiled kernels:

* dense weights are ``(n_in, n_out)``, ``y = x @ W``; images are channels-last ``(B, H, W, C)``;
* outputs are preallocated by the caller and overwritten (``dx=None`` skips the input gradient);
* ``l2pool`` uses ``L2POOL_EPS = 1e-8`` inside the square root;
* ``lcn`` uses a ``size x size`` box (``size`` odd) with same-padding, counting only in-image
  pixels: ``mean = boxsum(sum_c x) / (count * C)``, ``v = x - mean``,
  ``den = sqrt(eps + boxsum(sum_c v**2) / (count * C))``, ``y = v / den``; ``den`` is a smooth
  ``max(sqrt(eps), sigma)``.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

L2POOL_EPS = 1e-8
LCN_EPS = 1e-4
ACTIVATIONS = ("linear", "relu", "sigmoid", "tanh")


# ------------------------------------------------------------------------------ dense layer

def _act(z: np.ndarray, activation: str) -> np.ndarray:
    if activation == "linear":
        return z
    if activation == "relu":
        return np.maximum(z, 0)
    if activation == "sigmoid":
        e = np.exp(-np.abs(z))
        return np.where(z >= 0, 1 / (1 + e), e / (1 + e)).astype(z.dtype, copy=False)
    if activation == "tanh":
        return np.tanh(z)
    raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")


def _act_grad(y: np.ndarray, activation: str) -> np.ndarray:
    if activation == "linear":
        return np.ones_like(y)
    if activation == "relu":
        return (y > 0).astype(y.dtype)
    if activation == "sigmoid":
        return y * (1 - y)
    if activation == "tanh":
        return 1 - y * y
    raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")


def dense_forward(x, W, b, y, activation):
    """y = act(x @ W + b)."""
    y[...] = _act(x @ W + b, activation)


def dense_backward(x, W, y, dy, activation, dW, db, dx):
    """dy <- dz = dy * act'(y); dW = x.T @ dz; db = dz.sum(0); dx = dz @ W.T (unless None)."""
    dy *= _act_grad(y, activation)
    dW[...] = x.T @ dy
    db[...] = dy.sum(0)
    if dx is not None:
        dx[...] = dy @ W.T


# --------------------------------------------------------------------------------- losses

def _check_labels(labels, n):
    bad = np.flatnonzero((labels < 0) | (labels >= n))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"labels[{i}] = {labels[i]} is out of range: labels must be in "
                         f"[0, {n}) for logits with {n} classes")


def softmax_xent(logits, labels, dlogits):
    """Mean softmax cross-entropy; dlogits = (softmax - onehot) / B (may alias logits)."""
    B, n = logits.shape
    _check_labels(labels, n)
    rows = np.arange(B)
    z = logits - logits.max(1, keepdims=True)
    zy = z[rows, labels].copy()
    e = np.exp(z)
    s = e.sum(1, keepdims=True)
    loss = float(np.mean(np.log(s[:, 0].astype(np.float64)) - zy))
    dlogits[...] = e / s / B
    dlogits[rows, labels] -= np.asarray(1 / B, dtype=logits.dtype)
    return loss


def multiclass_hinge(scores, labels, dscores, margin=1.0):
    """Weston-Watkins: mean_i sum_{j != y_i} max(0, margin + s_ij - s_iy_i); its gradient / B."""
    B, n = scores.shape
    _check_labels(labels, n)
    rows = np.arange(B)
    v = margin + scores - scores[rows, labels][:, None]
    v[rows, labels] = 0
    active = v > 0
    loss = float(np.where(active, v, 0).astype(np.float64).sum() / B)
    g = active.astype(scores.dtype) / B
    g[rows, labels] = -active.sum(1) / B
    dscores[...] = g
    return loss


# ------------------------------------------------------------------------------ optimisers

def adagrad_dense(param, grad, accum, lr, eps):
    """accum += g*g; param -= lr * g / (sqrt(accum) + eps)."""
    accum += grad * grad
    param -= (lr * grad / (np.sqrt(accum) + eps)).astype(param.dtype, copy=False)


def adagrad_rows(param, rows, grad_rows, accum, lr, eps):
    """The Adagrad update on param[rows], accum[rows] only (rows unique)."""
    a = accum[rows] + grad_rows * grad_rows
    accum[rows] = a
    param[rows] -= (lr * grad_rows / (np.sqrt(a) + eps)).astype(param.dtype, copy=False)


def sgd_dense(param, grad, lr):
    """param -= lr * grad."""
    param -= (lr * grad).astype(param.dtype, copy=False)


# ------------------------------------------------------------------------------ embeddings

def embedding_lookup(E, idx, out):
    """out = E[idx]."""
    V = E.shape[0]
    bad = np.flatnonzero((idx < 0) | (idx >= V))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"idx[{i}] = {idx[i]} is out of range: indices must be in [0, {V})")
    out[...] = E[idx]


def embedding_scatter_add(dout, idx, dE):
    """dE[idx[i]] += dout[i] for every i (duplicates summed)."""
    np.add.at(dE, idx, dout)


def embedding_grad_rows(dout, idx):
    """(rows, grad_rows): sorted unique idx and the summed dout of each."""
    rows, inverse = np.unique(idx, return_inverse=True)
    g = np.zeros((rows.size, dout.shape[1]), dtype=dout.dtype)
    np.add.at(g, inverse.ravel(), dout)
    return rows.astype(np.int64), g


# ------------------------------------------------------------------ locally connected layer

def _patches(x, k, stride):
    """(B, OH, OW, k, k, C) view of the receptive fields."""
    p = sliding_window_view(x, (k, k), axis=(1, 2))[:, ::stride, ::stride]
    return p.transpose(0, 1, 2, 4, 5, 3)


def local_forward(x, W, b, stride, y):
    """y[n, i, j, f] = b[i, j, f] + sum_{u, v, c} x[n, i*s+u, j*s+v, c] W[i, j, f, u, v, c]."""
    k = W.shape[3]
    y[...] = np.einsum("nijuvc,ijfuvc->nijf", _patches(x, k, stride), W, optimize=True) + b


def local_backward(x, W, dy, stride, dW, db, dx):
    """dW, db overwritten; dx overwritten unless None."""
    OH, OW, _, k = W.shape[:4]
    dW[...] = np.einsum("nijf,nijuvc->ijfuvc", dy, _patches(x, k, stride), optimize=True)
    db[...] = dy.sum(0)
    if dx is not None:
        dx[...] = 0
        s = stride
        for u in range(k):
            for v in range(k):
                dx[:, u:u + s * (OH - 1) + 1:s, v:v + s * (OW - 1) + 1:s, :] += np.einsum(
                    "nijf,ijfc->nijc", dy, W[:, :, :, u, v, :], optimize=True)


def _grid(x, W, stride, first):
    """The full output grid's (OH, OW) and the (rows, cols) of locations first .. first+n-1."""
    k = W.shape[2]
    OH, OW = (x.shape[1] - k) // stride + 1, (x.shape[2] - k) // stride + 1
    loc = first + np.arange(W.shape[0])
    return k, OH, OW, loc // OW, loc % OW


def local_forward_at(x, W, b, stride, first, y):
    """local_forward for output locations [first, first + n) (row-major over the grid):
    W (n, F, k, k, C), b (n, F), y (B, n, F)."""
    k, _, _, i, j = _grid(x, W, stride, first)
    p = _patches(x, k, stride)[:, i, j]  # (B, n, k, k, C)
    y[...] = np.einsum("nluvc,lfuvc->nlf", p, W, optimize=True) + b


def local_backward_at(x, W, dy, stride, first, dW, db, dx):
    """dW, db overwritten; dx (the whole x) overwritten unless None."""
    k, _, _, i, j = _grid(x, W, stride, first)
    dW[...] = np.einsum("nlf,nluvc->lfuvc", dy, _patches(x, k, stride)[:, i, j], optimize=True)
    db[...] = dy.sum(0)
    if dx is not None:
        dx[...] = 0
        s = stride
        for t in range(W.shape[0]):
            dx[:, i[t] * s:i[t] * s + k, j[t] * s:j[t] * s + k, :] += np.einsum(
                "nf,fuvc->nuvc", dy[:, t], W[t], optimize=True)


# ------------------------------------------------------------------------------ L2 pooling

def l2pool_forward(x, size, stride, y):
    """y = sqrt(L2POOL_EPS + sum of x**2 over each size x size window), per channel."""
    w = sliding_window_view(x * x, (size, size), axis=(1, 2))[:, ::stride, ::stride]
    y[...] = np.sqrt(L2POOL_EPS + w.sum((4, 5)))


def l2pool_backward(x, y, dy, size, stride, dx):
    """dx = sum over the windows containing each pixel of dy * x / y."""
    OH, OW = y.shape[1:3]
    g = dy / y
    dx[...] = 0
    s = stride
    for u in range(size):
        for v in range(size):
            sl = (slice(None), slice(u, u + s * (OH - 1) + 1, s),
                  slice(v, v + s * (OW - 1) + 1, s))
            dx[sl] += g * x[sl]


# ---------------------------------------------------------------- local contrast normalisation

def _box(p, size):
    """Same-padded size x size box sum over axes 1, 2 of a (B, H, W) array."""
    r = size // 2
    q = np.pad(p, ((0, 0), (r, r), (r, r)))
    return sliding_window_view(q, (size, size), axis=(1, 2)).sum((3, 4))


def _count(H, W, size, C, dtype):
    return _box(np.ones((1, H, W), dtype=dtype), size) * C


def _lcn_rows(rows, H, size):
    """Output rows [a, b) and the rows [v0, v1) of v they depend on."""
    a, b = (0, H) if rows is None else rows
    r = size // 2
    return a, b, max(0, a - r), min(H, b + r)


def lcn_forward(x, size, y, v, den, eps=LCN_EPS, rows=None):
    """Local contrast normalisation; v (B, H, W, C) and den (B, H, W) are kept for backward.

    ``rows = (a, b)``: y and den hold output rows [a, b) only; v is written on its rows
    [a - r, b + r) (clipped) only, the rows those outputs depend on."""
    _, H, W, C = x.shape
    a, b, v0, v1 = _lcn_rows(rows, H, size)
    n = _count(H, W, size, C, x.dtype)
    vf = x - (_box(x.sum(3), size) / n)[..., None]
    df = np.sqrt(eps + _box((vf * vf).sum(3), size) / n)
    v[:, v0:v1] = vf[:, v0:v1]
    den[...] = df[:, a:b]
    y[...] = (vf / df[..., None])[:, a:b]


def lcn_backward(dy, v, den, size, dx, rows=None):
    """Exact gradient of lcn_forward given its v and den; dx overwritten. With ``rows =
    (a, b)``, dy and den hold output rows [a, b) only (the others' gradient is zero)."""
    _, H, W, C = v.shape
    a, b, v0, v1 = _lcn_rows(rows, H, size)
    if rows is not None:  # back to whole planes: zero dy, unit den, v only where written
        dy_f, den_f, v_f = np.zeros_like(v), np.ones(v.shape[:3], v.dtype), np.zeros_like(v)
        dy_f[:, a:b], den_f[:, a:b], v_f[:, v0:v1] = dy, den, v[:, v0:v1]
        dy, den, v = dy_f, den_f, v_f
    n = _count(H, W, size, C, v.dtype)
    dS = -(dy * v).sum(3) / (2 * den ** 3) / n  # d loss / d (box sum of sum_c v**2)
    dv = dy / den[..., None] + 2 * v * _box(dS, size)[..., None]
    dx[...] = dv - (_box(dv.sum(3) / n, size))[..., None]
