"""Compiled kernels against their numpy twins in cython_kernels.reference, plus argument checks.

Gradient checks of the reference backward passes live in test_kernels_gradcheck.py.
"""
import importlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cython_kernels as ck
from cython_kernels import local_backward_at, local_forward_at
from cython_kernels import reference as ref

DTYPES = [np.float32, np.float64]
# relative to the largest magnitude of the expected array
TOL = {np.float32: 1e-5, np.float64: 1e-10}
ACTS = ["linear", "relu", "sigmoid", "tanh"]


def rand(rng, shape, dtype, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(dtype)


def assert_close(actual, desired, dtype):
    desired = np.asarray(desired)
    tol = TOL[dtype]
    scale = float(np.max(np.abs(desired))) if desired.size else 0.0
    np.testing.assert_allclose(actual, desired, rtol=tol, atol=tol * scale)


def both(fn_name, make_args, out_names):
    """Run the compiled kernel and its twin on copies of the same arguments.

    make_args() -> dict of arguments; out_names: the arguments written in place.
    Returns (ret_ck, outs_ck, ret_ref, outs_ref).
    """
    a1, a2 = make_args(), make_args()
    r1 = getattr(ck, fn_name)(**a1)
    r2 = getattr(ref, fn_name)(**a2)
    return r1, [a1[k] for k in out_names], r2, [a2[k] for k in out_names]


# ------------------------------------------------------------------------------ dense layer

DENSE_SHAPES = [(1, 1, 1), (7, 13, 11), (13, 1, 7), (1, 13, 2), (16, 33, 65), (0, 3, 4)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", DENSE_SHAPES)
def test_dense_forward(dtype, act, shape):
    B, n_in, n_out = shape
    rng = np.random.default_rng(0)
    x, W, b = rand(rng, (B, n_in), dtype), rand(rng, (n_in, n_out), dtype), rand(rng, n_out, dtype)

    def args():
        return {"x": x, "W": W, "b": b, "y": np.full((B, n_out), np.nan, dtype), "activation": act}

    _, (y1,), _, (y2,) = both("dense_forward", args, ["y"])
    assert_close(y1, y2, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("shape", DENSE_SHAPES)
@pytest.mark.parametrize("with_dx", [True, False])
def test_dense_backward(dtype, act, shape, with_dx):
    B, n_in, n_out = shape
    rng = np.random.default_rng(1)
    x, W, b = rand(rng, (B, n_in), dtype), rand(rng, (n_in, n_out), dtype), rand(rng, n_out, dtype)
    y = np.empty((B, n_out), dtype)
    ref.dense_forward(x, W, b, y, act)
    dy = rand(rng, (B, n_out), dtype)

    def args():
        return {"x": x, "W": W, "y": y, "dy": dy.copy(), "activation": act,
                    "dW": np.full((n_in, n_out), np.nan, dtype),
                    "db": np.full(n_out, np.nan, dtype),
                    "dx": np.full((B, n_in), np.nan, dtype) if with_dx else None}

    names = ["dy", "dW", "db"] + (["dx"] if with_dx else [])
    _, out1, _, out2 = both("dense_backward", args, names)
    for a, d in zip(out1, out2):
        assert_close(a, d, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backward_route", ["blas", "numpy"])
@pytest.mark.parametrize("shape", DENSE_SHAPES)
def test_dense_backward_accumulate_adds_to_dW_db(monkeypatch, dtype, backward_route, shape):
    """accumulate=True adds this batch's dW, db to what is there (the numpy twin's result plus
    the old contents); dy and dx are as without it."""
    from cython_kernels import _dense

    monkeypatch.setitem(_dense.GEMM, "backward", backward_route)
    B, n_in, n_out = shape
    rng = np.random.default_rng(5)
    x, W, b = rand(rng, (B, n_in), dtype), rand(rng, (n_in, n_out), dtype), rand(rng, n_out, dtype)
    y = np.empty((B, n_out), dtype)
    ref.dense_forward(x, W, b, y, "sigmoid")
    dy = rand(rng, (B, n_out), dtype)
    old_W, old_b = rand(rng, (n_in, n_out), dtype), rand(rng, n_out, dtype)
    want = [dy.copy(), np.empty_like(W), np.empty_like(b), np.empty_like(x)]
    ref.dense_backward(x, W, y, want[0], "sigmoid", want[1], want[2], want[3])
    got = [dy.copy(), old_W.copy(), old_b.copy(), np.full_like(x, np.nan)]
    ck.dense_backward(x, W, y, got[0], "sigmoid", got[1], got[2], got[3], accumulate=True)
    for a, d in zip(got, [want[0], want[1] + old_W, want[2] + old_b, want[3]]):
        assert_close(a, d, dtype)


def test_dense_forward_extreme_inputs():
    """Sigmoid and tanh saturate cleanly instead of overflowing (float32 fast exp)."""
    x = np.array([[-1e4, -100.0, -20.0, -1e-3, 0.0, 1e-3, 20.0, 100.0, 1e4]], np.float32).T
    W = np.ones((1, 1), np.float32)
    b = np.zeros(1, np.float32)
    x64, W64, b64 = x.astype(np.float64), W.astype(np.float64), b.astype(np.float64)
    for act in ("sigmoid", "tanh"):
        y1 = np.empty_like(x)
        y2 = np.empty_like(x64)
        ck.dense_forward(x, W, b, y1, act)
        ref.dense_forward(x64, W64, b64, y2, act)
        assert np.all(np.isfinite(y1))
        np.testing.assert_allclose(y1, y2, rtol=1e-5, atol=1e-30)


ROUTES = [("auto", "blas", 1), ("auto", "blas", 2), ("blas-nn", "blas", 1),
          ("blas-tt", "numpy", 1), ("numpy-nn", "numpy", 1), ("numpy-tt", "blas", 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r[0]}/{r[1]}/{r[2]}thr")
@pytest.mark.parametrize("shape", [(7, 13, 11), (3, 5, 100), (1, 2, 70), (33, 17, 1)])
def test_dense_gemm_routes(monkeypatch, dtype, route, shape):
    """Every GEMM route (see cython_kernels._dense.GEMM) gives the reference result."""
    from cython_kernels import _dense

    fwd, bwd, threads = route
    monkeypatch.setitem(_dense.GEMM, "forward", fwd)
    monkeypatch.setitem(_dense.GEMM, "backward", bwd)
    monkeypatch.setattr(_dense, "blas_threads", lambda: threads)
    B, n_in, n_out = shape
    rng = np.random.default_rng(20)
    x, W, b = rand(rng, (B, n_in), dtype), rand(rng, (n_in, n_out), dtype), rand(rng, n_out, dtype)
    y1, y2 = np.empty((B, n_out), dtype), np.empty((B, n_out), dtype)
    ck.dense_forward(x, W, b, y1, "tanh")
    ref.dense_forward(x, W, b, y2, "tanh")
    assert_close(y1, y2, dtype)
    dy = rand(rng, (B, n_out), dtype)
    outs = []
    for mod in (ck, ref):
        o = [dy.copy(), np.empty_like(W), np.empty_like(b), np.empty_like(x)]
        mod.dense_backward(x, W, y2, o[0], "tanh", o[1], o[2], o[3])
        outs.append(o)
    for a, d in zip(*outs):
        assert_close(a, d, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("n,B", [(1, 1), (64, 32), (70, 37), (130, 8), (8, 130), (128, 64)])
def test_transposed_bias_activation_pass(dtype, act, n, B):
    """The pass behind the "tt" routes: tiles, 8 x 8 transposes and their remainders."""
    from cython_kernels import _dense

    rng = np.random.default_rng(22)
    yT, b = rand(rng, (n, B), dtype), rand(rng, n, dtype)
    want = np.empty((B, n), dtype)
    ref.dense_forward(np.ascontiguousarray(yT.T), np.eye(n, dtype=dtype), b, want, act)
    got = np.full((B, n), np.nan, dtype)
    _dense._tbias_act(yT.copy(), got, b, act)
    assert_close(got, want, dtype)


def test_dense_bad_route(monkeypatch):
    from cython_kernels import _dense

    monkeypatch.setitem(_dense.GEMM, "forward", "mkl")
    with pytest.raises(ValueError, match="GEMM\\['forward'\\] must be one of"):
        _dense_case()()


# --------------------------------------------------------------------------------- losses

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (13, 1), (7, 13), (64, 1000)])
@pytest.mark.parametrize("label_dtype", [np.int64, np.int32])
def test_softmax_xent(dtype, shape, label_dtype):
    B, n = shape
    rng = np.random.default_rng(2)
    logits = rand(rng, shape, dtype, scale=10.0)
    labels = rng.integers(0, n, B).astype(label_dtype)

    def args():
        return {"logits": logits, "labels": labels, "dlogits": np.full(shape, np.nan, dtype)}

    l1, (d1,), l2, (d2,) = both("softmax_xent", args, ["dlogits"])
    assert isinstance(l1, float)
    assert l1 == pytest.approx(l2, rel=TOL[dtype], abs=TOL[dtype])
    assert_close(d1, d2, dtype)
    # in place: dlogits is logits
    inplace = logits.copy()
    l3 = ck.softmax_xent(inplace, labels, inplace)
    assert l3 == pytest.approx(l2, rel=TOL[dtype], abs=TOL[dtype])
    assert_close(inplace, d2, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_softmax_xent_is_stable(dtype):
    logits = np.array([[1e4, 0.0, -1e4], [-1e4, -1e4, -1e4]], dtype)
    d = np.empty_like(logits)
    loss = ck.softmax_xent(logits, np.array([0, 2]), d)
    assert np.isfinite(loss) and np.all(np.isfinite(d))
    assert loss == pytest.approx(np.log(3) / 2, rel=1e-5)


@pytest.mark.parametrize("fn", ["softmax_xent", "multiclass_hinge"])
@pytest.mark.parametrize("bad", [-1, 7])
def test_label_out_of_range(fn, bad):
    logits = np.zeros((4, 7), np.float32)
    labels = np.array([0, 1, bad, 3])
    for mod in (ck, ref):
        with pytest.raises(ValueError, match=rf"labels\[2\] = {bad} .*\[0, 7\)"):
            getattr(mod, fn)(logits, labels, np.empty_like(logits))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (13, 2), (7, 13)])
@pytest.mark.parametrize("margin", [1.0, 0.3])
def test_multiclass_hinge(dtype, shape, margin):
    B, n = shape
    rng = np.random.default_rng(3)
    scores = rand(rng, shape, dtype)
    labels = rng.integers(0, n, B)

    def args():
        return {"scores": scores, "labels": labels, "dscores": np.full(shape, np.nan, dtype),
                    "margin": margin}

    l1, (d1,), l2, (d2,) = both("multiclass_hinge", args, ["dscores"])
    assert l1 == pytest.approx(l2, rel=TOL[dtype], abs=TOL[dtype])
    assert_close(d1, d2, dtype)


# ------------------------------------------------------------------------------ optimisers

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 13, 1031])
def test_adagrad_sgd_dense(dtype, n):
    rng = np.random.default_rng(4)
    p, g, a = rand(rng, n, dtype), rand(rng, n, dtype), np.abs(rand(rng, n, dtype))

    def args():
        return {"param": p.copy(), "grad": g, "accum": a.copy(), "lr": 0.1, "eps": 1e-6}

    _, out1, _, out2 = both("adagrad_dense", args, ["param", "accum"])
    for x1, x2 in zip(out1, out2):
        assert_close(x1, x2, dtype)

    def sgd_args():
        return {"param": p.copy(), "grad": g, "lr": 0.05}

    _, (s1,), _, (s2,) = both("sgd_dense", sgd_args, ["param"])
    assert_close(s1, s2, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,bad,value", [(5000, None, None), (5000, 4097, np.nan),
                                         (5000, 0, np.inf), (70, 69, -np.inf),
                                         (4096, 2048, np.nan)])
def test_adagrad_dense_checked_refuses_from_the_bad_block_on(dtype, n, bad, value):
    """check_finite: the update of the numpy twin on every 2048-element block before the
    first non-finite gradient, nothing written from that block on, its start returned."""
    rng = np.random.default_rng(9)
    p, g, a = rand(rng, n, dtype), rand(rng, n, dtype), np.abs(rand(rng, n, dtype))
    if bad is not None:
        g[bad] = value
    p1, a1 = p.copy(), a.copy()
    got = ck.adagrad_dense(p1, g, a1, 0.1, 1e-6, check_finite=True)
    stop = n if bad is None else (bad // 2048) * 2048
    assert got == (-1 if bad is None else stop)
    p2, a2 = p.copy(), a.copy()
    ref.adagrad_dense(p2[:stop], g[:stop], a2[:stop], 0.1, 1e-6)
    assert_close(p1, p2, dtype)
    assert_close(a1, a2, dtype)
    assert np.array_equal(p1[stop:], p[stop:]) and np.array_equal(a1[stop:], a[stop:])
    assert ck.adagrad_dense(p.copy(), g, a.copy(), 0.1, 1e-6) == -1  # unchecked: no verdict


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("threads", [1, 2])
def test_sgd_dense_blas_route(monkeypatch, dtype, threads):
    """With a threaded BLAS, sgd_dense goes through ?axpy; the result is the same."""
    from cython_kernels import _optim

    monkeypatch.setattr(_optim, "blas_threads", lambda: threads)
    rng = np.random.default_rng(21)
    p, g = rand(rng, 70001, dtype), rand(rng, 70001, dtype)
    p1, p2 = p.copy(), p.copy()
    ck.sgd_dense(p1, g, 0.3)
    ref.sgd_dense(p2, g, 0.3)
    assert_close(p1, p2, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V,d,rows", [(1, 1, [0]), (13, 7, [12, 0, 5]), (7, 3, []),
                                      (50, 13, list(range(0, 50, 7)))])
def test_adagrad_rows(dtype, V, d, rows):
    rng = np.random.default_rng(5)
    rows = np.array(rows, dtype=np.int64)
    p, a = rand(rng, (V, d), dtype), np.abs(rand(rng, (V, d), dtype))
    g = rand(rng, (rows.size, d), dtype)

    def args():
        return {"param": p.copy(), "rows": rows, "grad_rows": g, "accum": a.copy(),
                "lr": 0.1, "eps": 1e-6}

    _, out1, _, out2 = both("adagrad_rows", args, ["param", "accum"])
    for x1, x2 in zip(out1, out2):
        assert_close(x1, x2, dtype)
    untouched = np.setdiff1d(np.arange(V), rows)
    np.testing.assert_array_equal(out1[0][untouched], p[untouched])


def test_adagrad_rows_out_of_range_writes_nothing():
    p = np.zeros((5, 3), np.float32)
    with pytest.raises(ValueError, match=r"rows\[1\] = 5 .*\[0, 5\)"):
        ck.adagrad_rows(p, np.array([0, 5]), np.ones((2, 3), np.float32), np.zeros_like(p),
                        0.1, 1e-8)
    assert not p.any()


# ------------------------------------------------------------------------------ embeddings

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V,d,n", [(1, 1, 1), (13, 7, 29), (7, 1, 13), (5, 3, 0)])
def test_embedding(dtype, V, d, n):
    rng = np.random.default_rng(6)
    E = rand(rng, (V, d), dtype)
    idx = rng.integers(0, V, n)
    dout = rand(rng, (n, d), dtype)

    def look():
        return {"E": E, "idx": idx, "out": np.full((n, d), np.nan, dtype)}

    _, (o1,), _, (o2,) = both("embedding_lookup", look, ["out"])
    np.testing.assert_array_equal(o1, o2)

    def scat():
        return {"dout": dout, "idx": idx, "dE": E.copy()}

    _, (s1,), _, (s2,) = both("embedding_scatter_add", scat, ["dE"])
    assert_close(s1, s2, dtype)

    r1, g1 = ck.embedding_grad_rows(dout, idx)
    r2, g2 = ref.embedding_grad_rows(dout, idx)
    assert r1.dtype == np.int64 and g1.dtype == dtype
    np.testing.assert_array_equal(r1, r2)
    assert_close(g1, g2, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_embedding_duplicates_summed(dtype):
    dout = np.arange(12, dtype=dtype).reshape(4, 3)
    idx = np.array([2, 0, 2, 2])
    dE = np.zeros((3, 3), dtype)
    ck.embedding_scatter_add(dout, idx, dE)
    np.testing.assert_array_equal(dE[2], dout[0] + dout[2] + dout[3])
    np.testing.assert_array_equal(dE[0], dout[1])
    np.testing.assert_array_equal(dE[1], 0)
    rows, g = ck.embedding_grad_rows(dout, idx)
    np.testing.assert_array_equal(rows, [0, 2])
    np.testing.assert_array_equal(g, dE[[0, 2]])


@pytest.mark.parametrize("bad", [-1, 3])
def test_embedding_out_of_range(bad):
    E = np.zeros((3, 2), np.float32)
    idx = np.array([0, bad])
    for mod in (ck, ref):
        with pytest.raises(ValueError, match=rf"idx\[1\] = {bad} .*\[0, 3\)"):
            mod.embedding_lookup(E, idx, np.empty((2, 2), np.float32))
    with pytest.raises(ValueError, match=rf"idx\[1\] = {bad}"):
        ck.embedding_scatter_add(np.ones((2, 2), np.float32), idx, E)
    assert not E.any()


# ------------------------------------------------------------------------------ image kernels

# (B, H, W, C, k, F, stride)
LOCAL_SHAPES = [(1, 1, 1, 1, 1, 1, 1), (2, 7, 5, 3, 3, 2, 1), (3, 7, 7, 2, 3, 5, 2),
                (1, 13, 7, 1, 7, 1, 2), (4, 5, 5, 3, 5, 4, 3), (2, 8, 9, 4, 2, 3, 2)]


def _local_args(rng, dtype, shape):
    B, H, Wd, C, k, F, s = shape
    OH, OW = (H - k) // s + 1, (Wd - k) // s + 1
    x = rand(rng, (B, H, Wd, C), dtype)
    W = rand(rng, (OH, OW, F, k, k, C), dtype)
    b = rand(rng, (OH, OW, F), dtype)
    return x, W, b, s, (B, OH, OW, F)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LOCAL_SHAPES)
def test_local(dtype, shape):
    rng = np.random.default_rng(7)
    x, W, b, s, yshape = _local_args(rng, dtype, shape)

    def fwd():
        return {"x": x, "W": W, "b": b, "stride": s, "y": np.full(yshape, np.nan, dtype)}

    _, (y1,), _, (y2,) = both("local_forward", fwd, ["y"])
    assert_close(y1, y2, dtype)
    dy = rand(rng, yshape, dtype)
    for with_dx in (True, False):
        def bwd(with_dx=with_dx):
            return {"x": x, "W": W, "dy": dy, "stride": s, "dW": np.full(W.shape, np.nan, dtype),
                        "db": np.full(b.shape, np.nan, dtype),
                        "dx": np.full(x.shape, np.nan, dtype) if with_dx else None}

        names = ["dW", "db"] + (["dx"] if with_dx else [])
        _, out1, _, out2 = both("local_backward", bwd, names)
        for a, d in zip(out1, out2):
            assert_close(a, d, dtype)


POOL_SHAPES = [(1, 1, 1, 1, 1, 1), (2, 7, 5, 3, 2, 1), (3, 7, 7, 2, 3, 2), (1, 13, 13, 5, 3, 3),
               (2, 8, 9, 1, 2, 2), (1, 5, 7, 2, 5, 1)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", POOL_SHAPES)
def test_l2pool(dtype, shape):
    B, H, Wd, C, size, s = shape
    rng = np.random.default_rng(8)
    x = rand(rng, (B, H, Wd, C), dtype)
    yshape = (B, (H - size) // s + 1, (Wd - size) // s + 1, C)

    def fwd():
        return {"x": x, "size": size, "stride": s, "y": np.full(yshape, np.nan, dtype)}

    _, (y1,), _, (y2,) = both("l2pool_forward", fwd, ["y"])
    assert_close(y1, y2, dtype)
    dy = rand(rng, yshape, dtype)

    def bwd():
        return {"x": x, "y": y2, "dy": dy, "size": size, "stride": s,
                "dx": np.full(x.shape, np.nan, dtype)}

    _, (dx1,), _, (dx2,) = both("l2pool_backward", bwd, ["dx"])
    assert_close(dx1, dx2, dtype)


LCN_SHAPES = [(1, 1, 1, 1, 1), (2, 7, 5, 3, 3), (1, 13, 7, 2, 5), (2, 5, 5, 1, 9), (1, 6, 8, 4, 3)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LCN_SHAPES)
def test_lcn(dtype, shape):
    B, H, Wd, C, size = shape
    rng = np.random.default_rng(9)
    x = rand(rng, (B, H, Wd, C), dtype)

    def fwd():
        return {"x": x, "size": size, "y": np.full(x.shape, np.nan, dtype),
                    "v": np.full(x.shape, np.nan, dtype),
                    "den": np.full(x.shape[:3], np.nan, dtype)}

    _, out1, _, out2 = both("lcn_forward", fwd, ["y", "v", "den"])
    for a, d in zip(out1, out2):
        assert_close(a, d, dtype)
    _, v, den = out2
    dy = rand(rng, x.shape, dtype)

    def bwd():
        return {"dy": dy, "v": v, "den": den, "size": size, "dx": np.full(x.shape, np.nan, dtype)}

    _, (dx1,), _, (dx2,) = both("lcn_backward", bwd, ["dx"])
    assert_close(dx1, dx2, dtype)


def _slab(rng, shape, dtype, fill=None, pad=(2, 3)):
    """A batch-strided (B, h, W, C) view: rows [pad0, pad0 + h) of a (B, pad0 + h + pad1, W, C)
    array (random, or ``fill`` everywhere), and that array."""
    B, h, Wd, C = shape
    big_shape = (B, pad[0] + h + pad[1], Wd, C)
    big = rand(rng, big_shape, dtype) if fill is None else np.full(big_shape, fill, dtype)
    return big[:, pad[0]:pad[0] + h], big


def _untouched(big, pad, h):
    """The rows of a NaN-filled array outside the view are still NaN."""
    assert np.isnan(big[:, :pad[0]]).all() and np.isnan(big[:, pad[0] + h:]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LOCAL_SHAPES)
def test_local_batch_strided(dtype, shape):
    """x, y, dy, dx as views of whole rows of larger batches: the same as contiguous."""
    if shape[0] < 2:
        shape = (3, *shape[1:])
    rng = np.random.default_rng(17)
    x, W, b, s, yshape = _local_args(rng, dtype, shape)
    xs, _ = _slab(rng, x.shape, dtype)
    xs[...] = x
    y, ybig = _slab(rng, yshape, dtype, fill=np.nan, pad=(1, 2))
    ck.local_forward(xs, W, b, s, y)
    y2 = np.full(yshape, np.nan, dtype)
    ref.local_forward(x, W, b, s, y2)
    assert_close(y, y2, dtype)
    _untouched(ybig, (1, 2), yshape[1])
    dy, _ = _slab(rng, yshape, dtype, pad=(3, 1))
    dx, dxbig = _slab(rng, x.shape, dtype, fill=np.nan)
    dW, db = np.empty_like(W), np.empty_like(b)
    ck.local_backward(xs, W, dy, s, dW, db, dx)
    dW2, db2, dx2 = np.empty_like(W), np.empty_like(b), np.empty_like(x)
    ref.local_backward(x, W, np.ascontiguousarray(dy), s, dW2, db2, dx2)
    for a, d in ((dW, dW2), (db, db2), (dx, dx2)):
        assert_close(a, d, dtype)
    _untouched(dxbig, (2, 3), x.shape[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", POOL_SHAPES)
def test_l2pool_batch_strided(dtype, shape):
    B, H, Wd, C, size, s = shape
    B = max(B, 2)
    rng = np.random.default_rng(18)
    x, _ = _slab(rng, (B, H, Wd, C), dtype)
    yshape = (B, (H - size) // s + 1, (Wd - size) // s + 1, C)
    y, ybig = _slab(rng, yshape, dtype, fill=np.nan, pad=(1, 1))
    ck.l2pool_forward(x, size, s, y)
    y2 = np.empty(yshape, dtype)
    ref.l2pool_forward(np.ascontiguousarray(x), size, s, y2)
    assert_close(y, y2, dtype)
    _untouched(ybig, (1, 1), yshape[1])
    dy, _ = _slab(rng, yshape, dtype, pad=(0, 2))
    dx, dxbig = _slab(rng, x.shape, dtype, fill=np.nan)
    ck.l2pool_backward(x, y, dy, size, s, dx)
    dx2 = np.empty(x.shape, dtype)
    ref.l2pool_backward(np.ascontiguousarray(x), y2, np.ascontiguousarray(dy), size, s, dx2)
    assert_close(dx, dx2, dtype)
    _untouched(dxbig, (2, 3), H)


def _lcn_row_ranges(H, size):
    """Row ranges to test: whole, first, last, interior, single rows."""
    out = {(0, H), (0, 1), (H - 1, H), (H // 2, H // 2 + 1)}
    if H > 2:
        out |= {(1, H - 1), (0, H // 2), (H // 2, H)}
    return sorted(out)


LCN_ROWS_SHAPES = [(2, 7, 5, 3, 3), (1, 13, 7, 2, 5), (2, 11, 4, 1, 3), (3, 9, 6, 2, 7),
                   (2, 3, 3, 2, 9)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LCN_ROWS_SHAPES)
@pytest.mark.parametrize("strided", [False, True])
def test_lcn_rows(dtype, shape, strided):
    """lcn_forward/backward on output rows [a, b) of the slab against the twin, and against
    the whole-slab kernel's rows; x, y, dy, dx batch-strided or not."""
    B, H, Wd, C, size = shape
    r = size // 2
    rng = np.random.default_rng(19)
    x0 = rand(rng, (B, H, Wd, C), dtype)
    yf, vf, denf = np.empty_like(x0), np.empty_like(x0), np.empty((B, H, Wd), dtype)
    ck.lcn_forward(x0, size, yf, vf, denf)
    for a, b in _lcn_row_ranges(H, size):
        v0, v1 = max(0, a - r), min(H, b + r)
        if strided:
            x, _ = _slab(rng, x0.shape, dtype)
            x[...] = x0
            y, ybig = _slab(rng, (B, b - a, Wd, C), dtype, fill=np.nan, pad=(1, 2))
        else:
            x, y = x0, np.full((B, b - a, Wd, C), np.nan, dtype)
        v = np.full(x0.shape, np.nan, dtype)
        if strided:  # den a batch-strided view too
            den = np.full((B, b - a + 2, Wd), np.nan, dtype)[:, 1:-1]
        else:
            den = np.full((B, b - a, Wd), np.nan, dtype)
        ck.lcn_forward(x, size, y, v, den, rows=(a, b))
        y2, v2, den2 = np.empty_like(y), np.full(x0.shape, np.nan, dtype), np.empty_like(den)
        ref.lcn_forward(x0, size, y2, v2, den2, rows=(a, b))
        assert_close(y, y2, dtype)
        assert_close(den, den2, dtype)
        assert_close(v[:, v0:v1], v2[:, v0:v1], dtype)
        assert np.isnan(v[:, :v0]).all() and np.isnan(v[:, v1:]).all()
        assert_close(y, yf[:, a:b], dtype)  # the whole slab's rows
        if strided:
            _untouched(ybig, (1, 2), b - a)
        dy0 = rand(rng, (B, b - a, Wd, C), dtype)
        if strided:
            dy, _ = _slab(rng, dy0.shape, dtype, pad=(0, 3))
            dy[...] = dy0
            dx, dxbig = _slab(rng, x0.shape, dtype, fill=np.nan)
        else:
            dy, dx = dy0, np.full(x0.shape, np.nan, dtype)
        ck.lcn_backward(dy, v, den, size, dx, rows=(a, b))
        dx2 = np.empty(x0.shape, dtype)
        ref.lcn_backward(dy0, v2, den2, size, dx2, rows=(a, b))
        assert_close(dx, dx2, dtype)
        dyf = np.zeros_like(x0)  # the whole slab's backward with dy zero outside [a, b)
        dyf[:, a:b] = dy0
        dxf = np.empty_like(x0)
        ck.lcn_backward(dyf, vf, denf, size, dxf)
        assert_close(dx, dxf, dtype)
        if strided:
            _untouched(dxbig, (2, 3), H)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lcn_rows_in_pieces_equal_one_call(dtype):
    """Consecutive row ranges into views of one y and den: bitwise the single call's."""
    B, H, Wd, C, size = 2, 12, 5, 3, 5
    rng = np.random.default_rng(24)
    x = rand(rng, (B, H, Wd, C), dtype)
    a, b = 3, 10
    y1, v1, d1 = (np.empty((B, b - a, Wd, C), dtype), np.empty(x.shape, dtype),
                  np.empty((B, b - a, Wd), dtype))
    ck.lcn_forward(x, size, y1, v1, d1, rows=(a, b))
    y2, v2, d2 = np.empty_like(y1), np.empty_like(v1), np.empty_like(d1)
    for lo, hi in ((5, 8), (3, 5), (8, 10)):
        ck.lcn_forward(x, size, y2[:, lo - a:hi - a], v2, d2[:, lo - a:hi - a], rows=(lo, hi))
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(d1, d2)
    r = size // 2
    np.testing.assert_array_equal(v1[:, a - r:b + r], v2[:, a - r:b + r])


def test_image_kernels_reject_bad_batch_strides():
    x = np.ones((3, 6, 4, 2), np.float32)
    y = np.empty((3, 4, 4, 2), np.float32)
    with pytest.raises(ValueError, match=r"^x must be C-contiguous: pass np.ascontiguousarray"):
        ck.lcn_forward(x[:, :, ::2], 3, np.empty((3, 6, 2, 2), np.float32),
                       np.empty((3, 6, 2, 2), np.float32), np.empty((3, 6, 2), np.float32))
    overlapping = np.lib.stride_tricks.as_strided(y, (3, 2, 2, 2), (16, 16, 8, 4))
    with pytest.raises(ValueError, match=r"y has a batch stride of 16 bytes"):
        ck.l2pool_forward(np.ones((3, 3, 3, 2), np.float32), 2, 1, overlapping)
    with pytest.raises(ValueError, match=r"rows must be a range"):
        ck.lcn_forward(x, 3, y, np.empty_like(x), np.empty((3, 4, 4), np.float32), rows=(4, 2))


def test_lcn_rejects_even_size():
    x = np.zeros((1, 4, 4, 1))
    with pytest.raises(ValueError, match="size must be odd"):
        ck.lcn_forward(x, 2, np.empty_like(x), np.empty_like(x), np.empty((1, 4, 4)))


# --------------------------------------------------------------------------- argument checks

def _dense_case(x=None, W=None, dtype=np.float32):
    x = np.ones((4, 3), dtype) if x is None else x
    W = np.ones((3, 5), dtype) if W is None else W
    return lambda: ck.dense_forward(x, W, np.zeros(5, dtype), np.empty((4, 5), dtype), "relu")


NONCONTIG = {
    "dense_forward x": (lambda: _dense_case(x=np.ones((3, 4), np.float32).T)(), "x"),
    "dense_forward W": (lambda: _dense_case(W=np.ones((6, 5), np.float32)[::2])(), "W"),
    "dense_backward dy": (lambda: ck.dense_backward(
        np.ones((4, 3)), np.ones((3, 5)), np.ones((4, 5)), np.ones((4, 10))[:, ::2], "linear",
        np.empty((3, 5)), np.empty(5), None), "dy"),
    "softmax_xent logits": (lambda: ck.softmax_xent(
        np.ones((5, 4)).T, np.zeros(4, np.int64), np.empty((4, 5))), "logits"),
    "adagrad_dense grad": (lambda: ck.adagrad_dense(
        np.ones(4), np.ones(8)[::2], np.ones(4), 0.1, 1e-8), "grad"),
    "embedding_lookup out": (lambda: ck.embedding_lookup(
        np.ones((3, 2)), np.zeros(4, np.int64), np.empty((2, 4)).T), "out"),
    "local_forward x": (lambda: ck.local_forward(
        np.ones((1, 3, 3, 4))[..., ::2], np.ones((2, 2, 1, 2, 2, 2)), np.ones((2, 2, 1)), 1,
        np.empty((1, 2, 2, 1))), "x"),
    "l2pool_forward x": (lambda: ck.l2pool_forward(
        np.ones((1, 4, 4, 2))[:, ::2], 1, 1, np.empty((1, 2, 4, 2))), "x"),
    "lcn_backward dy": (lambda: ck.lcn_backward(
        np.ones((1, 3, 3, 2)).transpose(0, 2, 1, 3), np.ones((1, 3, 3, 2)), np.ones((1, 3, 3)),
        3, np.empty((1, 3, 3, 2))), "dy"),
}


@pytest.mark.parametrize("case", sorted(NONCONTIG))
def test_rejects_non_contiguous(case):
    call, name = NONCONTIG[case]
    with pytest.raises(ValueError, match=rf"^{name} must be C-contiguous: pass "
                                         rf"np.ascontiguousarray\({name}\)"):
        call()


def test_rejects_dtype_mismatch_and_bad_shapes():
    with pytest.raises(ValueError, match=r"W has dtype float64 but x is float32.*astype"):
        _dense_case(W=np.ones((3, 5)))()
    with pytest.raises(ValueError, match=r"x has dtype int64 but must be float32 or float64"):
        _dense_case(x=np.ones((4, 3), np.int64))()
    with pytest.raises(ValueError, match=r"W has shape \(4, 5\) but must have shape \(3, \*\)"):
        _dense_case(W=np.ones((4, 5), np.float32))()
    with pytest.raises(ValueError, match=r"labels has dtype float64 but must be int64"):
        ck.softmax_xent(np.ones((2, 3)), np.zeros(2), np.empty((2, 3)))
    with pytest.raises(ValueError, match=r"activation must be one of \['linear', 'relu', "
                                         r"'sigmoid', 'tanh'\], got 'gelu'"):
        ck.dense_forward(np.ones((1, 1)), np.ones((1, 1)), np.ones(1), np.empty((1, 1)), "gelu")
    ro = np.empty((4, 5), np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="y is written in place but is read-only"):
        ck.dense_forward(np.ones((4, 3), np.float32), np.ones((3, 5), np.float32),
                         np.zeros(5, np.float32), ro, "linear")
    with pytest.raises(TypeError, match="param must be a numpy array"):
        ck.sgd_dense([1.0], np.ones(1), 0.1)
    with pytest.raises(ValueError, match="stride must be a positive integer"):
        ck.l2pool_forward(np.ones((1, 2, 2, 1)), 1, 0, np.empty((1, 2, 2, 1)))


def test_blas_threads(monkeypatch):
    from cython_kernels import _blasinfo

    assert _blasinfo.blas_threads() >= 1
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "3")
    assert _blasinfo._from_env() == 3
    monkeypatch.delenv("OPENBLAS_NUM_THREADS")
    monkeypatch.setenv("OMP_NUM_THREADS", "2,1")
    assert _blasinfo._from_env() == 2


_BLAS_CHECK = """
import sys
import numpy as np
import cython_kernels as ck
from cython_kernels import _blasinfo
rng = np.random.default_rng(1)
ok = []
for dt, tol in ((np.float32, 1e-5), (np.float64, 1e-12)):
    x, W, b = (rng.standard_normal(s).astype(dt) for s in ((37, 300), (300, 70), (70,)))
    y = np.empty((37, 70), dt)
    ck.dense_forward(x, W, b, y, "linear")
    want = x.astype(np.float64) @ W.astype(np.float64) + b
    ok.append(np.abs(y - want).max() <= tol * np.abs(want).max())
    p = rng.standard_normal(70000).astype(dt)
    g = rng.standard_normal(70000).astype(dt)
    want = p.astype(np.float64) - 0.25 * g
    ck.sgd_dense(p, g, 0.25)  # >= 65536 elements: the BLAS axpy when threaded
    ok.append(np.abs(p - want).max() <= tol * 8)
print(_blasinfo.kernel_blas()["library"], all(ok))
"""


@pytest.mark.parametrize("choice", ["auto", "scipy", "numpy"])
@pytest.mark.parametrize("threads", ["1", "2"])
def test_the_kernels_blas_is_chosen_and_computes_right(choice, threads):
    """DBMPI_BLAS picks the library behind the kernels' GEMM and axpy (numpy's OpenBLAS by its
    64-bit entry points when found: numpy's wheels have them, so auto takes it here) and both
    give the float64 numpy result, on one thread and on a pool."""
    libs = Path(np.__file__).resolve().parent.parent / "numpy.libs"  # a wheel's bundled libs
    wheel = libs.is_dir() and any("openblas64" in f.name for f in libs.iterdir())
    env = {**os.environ, "DBMPI_BLAS": choice, "OPENBLAS_NUM_THREADS": threads}
    p = subprocess.run([sys.executable, "-c", _BLAS_CHECK], capture_output=True, text=True,
                       env=env)
    if choice == "numpy" and not wheel:
        assert "DBMPI_BLAS=numpy, but numpy's BLAS" in p.stderr
        return
    assert p.returncode == 0, p.stderr
    want = "scipy" if choice == "scipy" or not wheel else "numpy"
    assert p.stdout.split() == [want, "True"]


def test_a_bad_blas_choice_is_one_line(tmp_path):
    env = {**os.environ, "DBMPI_BLAS": "mkl"}
    p = subprocess.run([sys.executable, "-c", "import cython_kernels"], capture_output=True,
                       text=True, env=env)
    assert p.returncode != 0
    assert p.stderr.strip().splitlines()[-1] == (
        "ImportError: DBMPI_BLAS='mkl' is not one of auto, numpy, scipy: unset it or pick one")
    p = subprocess.run([sys.executable, "-m", "dbmpi", "launch", str(tmp_path / "x.toml")],
                       capture_output=True, text=True, env=env)
    assert (p.returncode, p.stdout) == (2, "")
    assert p.stderr == ("dbmpi: error: DBMPI_BLAS='mkl' is not one of auto, numpy, scipy "
                        "(which BLAS the kernels call): unset it or pick one\n")


# ---------------------------------------------------------------------------- build message

@pytest.mark.parametrize("hidden", ["cython_kernels._dense", "cython_kernels._image"])
def test_missing_build_says_how_to_build(monkeypatch, hidden):
    monkeypatch.delitem(sys.modules, "cython_kernels")
    monkeypatch.setitem(sys.modules, hidden, None)  # makes `import hidden` raise ImportError
    with pytest.raises(ImportError, match=r"not built: run `make build` \(or `pip install -e "
                                          r"\.`\) in the project root") as info:
        importlib.import_module("cython_kernels")
    assert isinstance(info.value.__cause__, ImportError)


def test_kernels_load_their_blas_without_the_rest_of_scipy_linalg():
    """In a fresh process: loading the kernels and a rank's modules leaves scipy.linalg and
    scipy.special unimported, the kernels' GEMM matches numpy, and scipy.linalg imported
    afterwards works and holds the very cython_blas module the kernels use."""
    code = """
import sys
import numpy as np
import dbmpi.runner, cython_kernels as ck
print(sorted(m for m in ("scipy.linalg", "scipy.special") if m in sys.modules))
rng = np.random.default_rng(0)
x, W, b = (rng.standard_normal(s) for s in ((5, 3), (3, 4), (4,)))
y = np.empty((5, 4))
ck.dense_forward(x, W, b, y, "linear")
print(np.abs(y - (x @ W + b)).max() < 1e-12)
import scipy.linalg
print(scipy.linalg.cython_blas is sys.modules["scipy.linalg.cython_blas"],
      float(scipy.linalg.det([[2.0, 0.0], [0.0, 3.0]])))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split("\n")
    assert out[:3] == ["[]", "True", "True 6.0"], out


# local layer on a range of output locations (model parallelism cuts a layer at any location)

def _at_ranges(OH, OW):
    n = OH * OW
    out = {(0, n), (0, 1), (n - 1, n), (n // 3, n - n // 3)}
    if OW > 1:
        out |= {(1, OW + 1), (OW - 1, n)}
    return sorted((a, b) for a, b in out if a < b)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LOCAL_SHAPES)
@pytest.mark.parametrize("strided", [False, True])
def test_local_at(dtype, shape, strided):
    """Locations [a, b) of the grid: against the twin and against the whole layer's rows."""
    rng = np.random.default_rng(22)
    x0, Wf, bf, s, yshape = _local_args(rng, dtype, shape)
    B, OH, OW, F = yshape
    yf = np.empty(yshape, dtype)
    ck.local_forward(x0, Wf, bf, s, yf)
    dyf_all = rand(rng, yshape, dtype)
    for a, b in _at_ranges(OH, OW):
        n = b - a
        W = np.ascontiguousarray(Wf.reshape(OH * OW, *Wf.shape[2:])[a:b])
        bb = np.ascontiguousarray(bf.reshape(OH * OW, F)[a:b])
        if strided and B > 1:
            x, _ = _slab(rng, x0.shape, dtype)
            x[...] = x0
            y, ybig = _slab(rng, (B, n, F, 1), dtype, fill=np.nan, pad=(1, 1))
            y = y[..., 0]
        else:
            x, y = x0, np.full((B, n, F), np.nan, dtype)
        local_forward_at(x, W, bb, s, a, y)
        y2 = np.empty((B, n, F), dtype)
        ref.local_forward_at(x0, W, bb, s, a, y2)
        assert_close(y, y2, dtype)
        assert_close(y, yf.reshape(B, OH * OW, F)[:, a:b], dtype)
        if strided and B > 1:
            _untouched(ybig, (1, 1), n)
        dy = np.ascontiguousarray(dyf_all.reshape(B, OH * OW, F)[:, a:b])
        for with_dx in (True, False):
            dW, db = np.full(W.shape, np.nan, dtype), np.full(bb.shape, np.nan, dtype)
            dx = np.full(x0.shape, np.nan, dtype) if with_dx else None
            local_backward_at(x, W, dy, s, a, dW, db, dx)
            dW2, db2 = np.empty_like(W), np.empty_like(bb)
            dx2 = np.empty(x0.shape, dtype) if with_dx else None
            ref.local_backward_at(x0, W, dy, s, a, dW2, db2, dx2)
            for got, want in ((dW, dW2), (db, db2), (dx, dx2)):
                if want is not None:
                    assert_close(got, want, dtype)
            if with_dx:
                dx_at = dx
        # dx equals the whole layer's with dy zero outside [a, b)
        dyz = np.zeros((B, OH * OW, F), dtype)
        dyz[:, a:b] = dy
        dxf = np.empty_like(x0)
        ck.local_backward(x0, Wf, dyz.reshape(yshape), s, np.empty_like(Wf), np.empty_like(bf),
                          dxf)
        assert_close(dx_at, dxf, dtype)


def test_local_at_rejects_locations_past_the_slab():
    x = np.ones((2, 5, 5, 1), np.float32)  # k 3, s 1: a 3 x 3 grid
    W, b, y = np.ones((2, 1, 3, 3, 1), np.float32), np.ones((2, 1), np.float32), \
        np.empty((2, 2, 1), np.float32)
    local_forward_at(x, W, b, 1, 7, y)  # locations 7, 8: the last row
    with pytest.raises(ValueError, match=r"locations \[8, 10\) of an output grid 3 wide"):
        local_forward_at(x, W, b, 1, 8, y)


@pytest.mark.parametrize("threads, shape, want", [
    (1, (128, 2560, 2560), "blas-tt"),   # n_in >= 1024, n_out <= 24 B
    (1, (128, 2560, 8192), "blas-nn"),   # n_out > 24 B
    (1, (128, 440, 2560), "blas-nn"),    # n_in < 1024
    (2, (128, 2560, 2560), "blas-nn"),   # threaded: no single-threaded transposing pass
    (2, (256, 440, 2560), "blas-nn"),
])
def test_auto_forward_route(monkeypatch, threads, shape, want):
    from cython_kernels import _dense

    monkeypatch.setitem(_dense.GEMM, "forward", "auto")
    monkeypatch.setattr(_dense, "blas_threads", lambda: threads)
    assert _dense._forward_mode(*shape) == want
