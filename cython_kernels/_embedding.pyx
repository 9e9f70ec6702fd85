"""Embedding lookup and its sparse gradient (duplicate indices summed)."""
import numpy as np

from cython_kernels._checks import floats, indices

from cython_kernels._common cimport real, dbm_idx, dbm_add_f32, dbm_add_f64
from libc.stdint cimport int64_t
from libc.string cimport memcpy


cdef void _lookup(real[:, ::1] E, int64_t[::1] idx, real[:, ::1] out,
                  int64_t* bad) noexcept:
    cdef dbm_idx n = idx.shape[0], d = E.shape[1], V = E.shape[0], i, r
    with nogil:
        for i in range(n):
            r = idx[i]
            if r < 0 or r >= V:
                bad[0] = i
                return
            memcpy(&out[i, 0], &E[r, 0], d * sizeof(real))


def embedding_lookup(E, idx, out):
    """out[i] = E[idx[i]]; E (V, d), idx int64 (n,), out (n, d). ValueError if idx is out of range."""
    dt = floats("E", E, (None, None))
    V, d = E.shape
    idx = indices("idx", idx, (None,))
    n = idx.shape[0]
    floats("out", out, (n, d), dt, "E", out=True)
    if n == 0 or d == 0:
        _bounds(idx, V)
        return
    cdef int64_t bad = -1
    if dt == np.float32:
        _lookup[float](E, idx, out, &bad)
    else:
        _lookup[double](E, idx, out, &bad)
    if bad >= 0:
        raise ValueError(f"idx[{bad}] = {idx[bad]} is out of range: indices must be in [0, {V})")


def _bounds(idx, V):
    bad = np.flatnonzero((idx < 0) | (idx >= V))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"idx[{i}] = {idx[i]} is out of range: indices must be in [0, {V})")


cdef void _scatter_add(real[:, ::1] dout, int64_t[::1] idx, real[:, ::1] dE,
                       int64_t* bad) noexcept:
    cdef dbm_idx n = idx.shape[0], d = dE.shape[1], V = dE.shape[0], i, r
    with nogil:
        for i in range(n):  # check first so that nothing is written on bad input
            r = idx[i]
            if r < 0 or r >= V:
                bad[0] = i
                return
        for i in range(n):
            if real is float:
                dbm_add_f32(&dE[idx[i], 0], &dout[i, 0], d)
            else:
                dbm_add_f64(&dE[idx[i], 0], &dout[i, 0], d)


def embedding_scatter_add(dout, idx, dE):
    """dE[idx[i]] += dout[i] for every i, duplicates summed; dout (n, d), dE (V, d)."""
    dt = floats("dout", dout, (None, None))
    n, d = dout.shape
    idx = indices("idx", idx, (n,))
    floats("dE", dE, (None, d), dt, "dout", out=True)
    V = dE.shape[0]
    if n == 0 or d == 0:
        _bounds(idx, V)
        return
    cdef int64_t bad = -1
    if dt == np.float32:
        _scatter_add[float](dout, idx, dE, &bad)
    else:
        _scatter_add[double](dout, idx, dE, &bad)
    if bad >= 0:
        raise ValueError(f"idx[{bad}] = {idx[bad]} is out of range: indices must be in [0, {dE.shape[0]})")


cdef void _segment_sum(real[:, ::1] dout, int64_t[::1] order, int64_t[::1] seg,
                       real[:, ::1] g) noexcept:
    cdef dbm_idx n = order.shape[0], d = dout.shape[1], i
    with nogil:
        for i in range(n):
            if real is float:
                dbm_add_f32(&g[seg[i], 0], &dout[order[i], 0], d)
            else:
                dbm_add_f64(&g[seg[i], 0], &dout[order[i], 0], d)


def embedding_grad_rows(dout, idx):
    """(rows, grad_rows): rows = sorted unique idx (int64), grad_rows[r] = sum of dout[idx == r].

    The sparse gradient of an embedding table (what a replica pushes); allocates its outputs.
    """
    dt = floats("dout", dout, (None, None))
    n, d = dout.shape
    idx = indices("idx", idx, (n,))
    order = np.argsort(idx, kind="stable")
    sidx = idx[order]
    if n:
        starts = np.empty(n, dtype=bool)
        starts[0] = True
        np.not_equal(sidx[1:], sidx[:n - 1], out=starts[1:])
        rows = sidx[starts]
        seg = np.cumsum(starts, dtype=np.int64) - 1
    else:
        rows = np.empty(0, dtype=np.int64)
        seg = np.empty(0, dtype=np.int64)
    g = np.zeros((rows.shape[0], d), dtype=dt)
    if n and d:
        if dt == np.float32:
            _segment_sum[float](dout, order, seg, g)
        else:
            _segment_sum[double](dout, order, seg, g)
    return rows, g
