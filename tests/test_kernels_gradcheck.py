"""Finite-difference checks of every backward pass, in float64, over awkward shapes.

The reference twins are the specification, so they are checked first; the compiled kernels
are checked the same way (they are also compared with the twins in test_kernels.py).
"""
import numpy as np
import pytest

import cython_kernels as ck
from cython_kernels import reference as ref

MODULES = [pytest.param(ref, id="reference"), pytest.param(ck, id="compiled")]
H = 1e-6
RTOL = 1e-6


def numeric_grad(f, a):
    """Central differences of the scalar f() with respect to every element of a (in place)."""
    g = np.zeros_like(a)
    flat, gflat = a.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + H
        fp = f()
        flat[i] = old - H
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * H)
    return g


def check(analytic, numeric):
    scale = max(1.0, float(np.max(np.abs(numeric))))
    np.testing.assert_allclose(analytic, numeric, rtol=RTOL, atol=RTOL * scale)


@pytest.mark.parametrize("mod", MODULES)
@pytest.mark.parametrize("act", ["linear", "relu", "sigmoid", "tanh"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 7, 13), (13, 2, 1), (2, 1, 7)])
def test_dense(mod, act, shape):
    B, n_in, n_out = shape
    rng = np.random.default_rng(10)
    x, W, b = rng.standard_normal((B, n_in)), rng.standard_normal((n_in, n_out)), \
        rng.standard_normal(n_out)
    R = rng.standard_normal((B, n_out))
    y = np.empty((B, n_out))

    def loss():
        mod.dense_forward(x, W, b, y, act)
        return float((R * y).sum())

    loss()
    dW, db, dx = np.empty_like(W), np.empty_like(b), np.empty_like(x)
    mod.dense_backward(x, W, y.copy(), R.copy(), act, dW, db, dx)
    check(dx, numeric_grad(loss, x))
    check(dW, numeric_grad(loss, W))
    check(db, numeric_grad(loss, b))


@pytest.mark.parametrize("mod", MODULES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (13, 2), (7, 13)])
def test_softmax_xent(mod, shape):
    rng = np.random.default_rng(11)
    logits = 3 * rng.standard_normal(shape)
    labels = rng.integers(0, shape[1], shape[0])
    d = np.empty_like(logits)
    mod.softmax_xent(logits, labels, d)
    check(d, numeric_grad(lambda: mod.softmax_xent(logits, labels, np.empty_like(logits)),
                          logits))


@pytest.mark.parametrize("mod", MODULES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (13, 2), (7, 13)])
@pytest.mark.parametrize("margin", [1.0, 0.5])
def test_multiclass_hinge(mod, shape, margin):
    rng = np.random.default_rng(12)
    scores = rng.standard_normal(shape)
    labels = rng.integers(0, shape[1], shape[0])
    d = np.empty_like(scores)
    mod.multiclass_hinge(scores, labels, d, margin)

    def loss():
        return mod.multiclass_hinge(scores, labels, np.empty_like(scores), margin)

    check(d, numeric_grad(loss, scores))


@pytest.mark.parametrize("mod", MODULES)
def test_embedding(mod):
    rng = np.random.default_rng(13)
    E = rng.standard_normal((7, 3))
    idx = np.array([3, 0, 3, 6, 3, 0, 1, 6, 5, 2, 3, 1, 4])
    R = rng.standard_normal((idx.size, 3))
    out = np.empty((idx.size, 3))

    def loss():
        mod.embedding_lookup(E, idx, out)
        return float((R * out).sum())

    dE = np.zeros_like(E)
    mod.embedding_scatter_add(R, idx, dE)
    num = numeric_grad(loss, E)
    check(dE, num)
    rows, g = mod.embedding_grad_rows(R, idx)
    check(g, num[rows])


@pytest.mark.parametrize("mod", MODULES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1, 1, 1), (2, 7, 5, 2, 3, 2, 1),
                                   (2, 7, 7, 1, 3, 3, 2), (1, 13, 7, 2, 2, 1, 2)])
def test_local(mod, shape):
    B, Hh, Wd, C, k, F, s = shape
    OH, OW = (Hh - k) // s + 1, (Wd - k) // s + 1
    rng = np.random.default_rng(14)
    x = rng.standard_normal((B, Hh, Wd, C))
    W = rng.standard_normal((OH, OW, F, k, k, C))
    b = rng.standard_normal((OH, OW, F))
    R = rng.standard_normal((B, OH, OW, F))
    y = np.empty((B, OH, OW, F))

    def loss():
        mod.local_forward(x, W, b, s, y)
        return float((R * y).sum())

    dW, db, dx = np.empty_like(W), np.empty_like(b), np.empty_like(x)
    mod.local_backward(x, W, R, s, dW, db, dx)
    check(dx, numeric_grad(loss, x))
    check(dW, numeric_grad(loss, W))
    check(db, numeric_grad(loss, b))


@pytest.mark.parametrize("mod", MODULES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1, 1), (2, 7, 5, 2, 2, 1), (1, 7, 7, 3, 3, 2),
                                   (1, 13, 5, 1, 3, 3)])
def test_l2pool(mod, shape):
    B, Hh, Wd, C, size, s = shape
    OH, OW = (Hh - size) // s + 1, (Wd - size) // s + 1
    rng = np.random.default_rng(15)
    x = rng.standard_normal((B, Hh, Wd, C))
    R = rng.standard_normal((B, OH, OW, C))
    y = np.empty((B, OH, OW, C))

    def loss():
        mod.l2pool_forward(x, size, s, y)
        return float((R * y).sum())

    loss()
    dx = np.empty_like(x)
    mod.l2pool_backward(x, y.copy(), R, size, s, dx)
    check(dx, numeric_grad(loss, x))


@pytest.mark.parametrize("mod", MODULES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1, 1), (2, 7, 5, 2, 3), (1, 5, 7, 3, 5),
                                   (1, 3, 2, 1, 7)])
@pytest.mark.parametrize("eps", [1e-4, 1.0])
def test_lcn(mod, shape, eps):
    B, Hh, Wd, C, size = shape
    rng = np.random.default_rng(16)
    x = rng.standard_normal((B, Hh, Wd, C))
    R = rng.standard_normal(x.shape)
    y, v, den = np.empty_like(x), np.empty_like(x), np.empty(x.shape[:3])

    def loss():
        mod.lcn_forward(x, size, y, v, den, eps)
        return float((R * y).sum())

    loss()
    dx = np.empty_like(x)
    mod.lcn_backward(R, v.copy(), den.copy(), size, dx)
    check(dx, numeric_grad(loss, x))


@pytest.mark.parametrize("mod", MODULES)
@pytest.mark.parametrize("shape", [(2, 7, 5, 2, 3), (1, 9, 4, 3, 5), (1, 4, 3, 1, 7)])
@pytest.mark.parametrize("rows", [(0, 1), (2, 4), (3, 4), "last"])
def test_lcn_rows(mod, shape, rows):
    """Output rows [a, b) of the slab alone (model parallelism keeps its own rows)."""
    B, Hh, Wd, C, size = shape
    a, b = (Hh - 1, Hh) if rows == "last" else rows
    rng = np.random.default_rng(20)
    x = rng.standard_normal((B, Hh, Wd, C))
    R = rng.standard_normal((B, b - a, Wd, C))
    y, v, den = np.empty_like(R), np.empty_like(x), np.empty((B, b - a, Wd))

    def loss():
        mod.lcn_forward(x, size, y, v, den, rows=(a, b))
        return float((R * y).sum())

    loss()
    dx = np.empty_like(x)
    mod.lcn_backward(R, v.copy(), den.copy(), size, dx, rows=(a, b))
    check(dx, numeric_grad(loss, x))


def _strided(a, before=2, after=1):
    """a's rows inside a larger batch (rows before and after): (view, base)."""
    B, h = a.shape[:2]
    base = np.full((B, before + h + after, *a.shape[2:]), np.nan)
    base[:, :before] = base[:, before + h:] = 7.0
    view = base[:, before:before + h]
    view[...] = a
    return view, base


@pytest.mark.parametrize("mod", MODULES)
@pytest.mark.parametrize("layer", ["local", "l2pool", "lcn", "lcn_rows"])
def test_batch_strided(mod, layer):
    """Inputs, outputs and gradients as views of whole rows of larger batches."""
    rng = np.random.default_rng(21)
    B, Hh, Wd, C = 3, 7, 5, 2
    x, xbase = _strided(rng.standard_normal((B, Hh, Wd, C)))
    if layer == "local":
        k, F, s = 3, 2, 2
        OH, OW = (Hh - k) // s + 1, (Wd - k) // s + 1
        W, b = rng.standard_normal((OH, OW, F, k, k, C)), rng.standard_normal((OH, OW, F))
        yshape = (B, OH, OW, F)

        def fwd(y):
            return mod.local_forward(x, W, b, s, y)

        def bwd(R, y, dx):
            return mod.local_backward(x, W, R, s, np.empty_like(W), np.empty_like(b), dx)
    elif layer == "l2pool":
        yshape = (B, Hh - 1, Wd - 1, C)

        def fwd(y):
            return mod.l2pool_forward(x, 2, 1, y)

        def bwd(R, y, dx):
            return mod.l2pool_backward(x, y, R, 2, 1, dx)
    else:
        rows = (2, 5) if layer == "lcn_rows" else None
        h = 3 if rows else Hh
        yshape = (B, h, Wd, C)
        v, den = np.empty(x.shape), np.empty((B, h, Wd))

        def fwd(y):
            return mod.lcn_forward(x, 3, y, v, den, rows=rows)

        def bwd(R, y, dx):
            return mod.lcn_backward(R, v, den, 3, dx, rows=rows)

    y, ybase = _strided(np.zeros(yshape), 1, 2)
    R, _ = _strided(rng.standard_normal(yshape), 0, 3)

    def loss():
        fwd(y)
        return float((R * y).sum())

    loss()
    dx, dxbase = _strided(np.zeros(x.shape), 1, 1)
    bwd(R, y.copy(), dx)
    assert (ybase[:, :1] == 7).all() and (ybase[:, -2:] == 7).all()
    assert (dxbase[:, :1] == 7).all() and (dxbase[:, -1:] == 7).all()
    num = numeric_grad(loss, xbase)
    check(dx, num[:, 2:2 + Hh])
    assert (num[:, :2] == 0).all() and (num[:, 2 + Hh:] == 0).all()


@pytest.mark.parametrize("mod", MODULES)
@pytest.mark.parametrize("shape,first,n", [((2, 7, 5, 2, 3, 2, 1), 4, 5),
                                           ((1, 7, 7, 1, 3, 3, 2), 0, 1),
                                           ((2, 9, 6, 2, 2, 1, 2), 5, 6),
                                           ((1, 5, 5, 1, 5, 2, 1), 0, 1)])
@pytest.mark.parametrize("strided", [False, True])
def test_local_at(mod, shape, first, n, strided):
    """Output locations [first, first + n) of the grid only (a partial first and last row)."""
    from cython_kernels import _image

    fwd = getattr(mod, "local_forward_at", None) or _image.local_forward_at
    bwd = getattr(mod, "local_backward_at", None) or _image.local_backward_at
    B, Hh, Wd, C, k, F, s = shape
    rng = np.random.default_rng(23)
    x0 = rng.standard_normal((B, Hh, Wd, C))
    x, xbase = _strided(x0) if strided else (x0, x0)
    W, b = rng.standard_normal((n, F, k, k, C)), rng.standard_normal((n, F))
    R = rng.standard_normal((B, n, F))
    y = np.empty((B, n, F))

    def loss():
        fwd(x, W, b, s, first, y)
        return float((R * y).sum())

    dW, db = np.empty_like(W), np.empty_like(b)
    dx, _ = _strided(np.zeros(x.shape), 1, 1) if strided else (np.empty_like(x), None)
    bwd(x, W, R, s, first, dW, db, dx)
    num = numeric_grad(loss, xbase)
    check(dx, num[:, 2:2 + Hh] if strided else num)
    check(dW, numeric_grad(loss, W))
    check(db, numeric_grad(loss, b))
