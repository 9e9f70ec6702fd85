"""In-place optimiser updates: SGD and Adagrad, dense and on a set of rows (one pass each)."""
import numpy as np

from cython_kernels._blasinfo import blas_threads, kernel_blas
from cython_kernels._checks import floats, indices

from cython_kernels._common cimport (
    real, dbm_idx, dbm_adagrad_f32, dbm_adagrad_f64, dbm_adagrad_checked_f32,
    dbm_adagrad_checked_f64, dbm_axpy_f32, dbm_axpy_f64, axpy, use_blas,
)
from libc.stdint cimport int64_t

use_blas(kernel_blas()["pointers"])  # the axpy's library (_blasinfo.py, _blas.h)


cdef void _adagrad_dense(real[::1] p, real[::1] g, real[::1] a, real lr,
                         real eps) noexcept:
    with nogil:
        if p.shape[0] == 0:
            return
        if real is float:
            dbm_adagrad_f32(&p[0], &g[0], &a[0], p.shape[0], lr, eps)
        else:
            dbm_adagrad_f64(&p[0], &g[0], &a[0], p.shape[0], lr, eps)


cdef dbm_idx _adagrad_checked(real[::1] p, real[::1] g, real[::1] a, real lr,
                              real eps) noexcept:
    cdef dbm_idx bad = -1
    with nogil:
        if p.shape[0] == 0:
            return -1
        if real is float:
            bad = dbm_adagrad_checked_f32(&p[0], &g[0], &a[0], p.shape[0], lr, eps)
        else:
            bad = dbm_adagrad_checked_f64(&p[0], &g[0], &a[0], p.shape[0], lr, eps)
    return bad


def adagrad_dense(param, grad, accum, lr, eps, check_finite=False):
    """accum += g*g; param -= lr * g / (sqrt(accum) + eps); 1-D arrays of one length.

    With ``check_finite`` the gradient is checked in L1-sized blocks on the way (no extra
    pass over memory): returns -1, or the start index of the first block whose gradient holds
    NaN or Inf (or |g| > ~1e19 in float32); blocks before it were applied, nothing from it on
    was written. Without it, returns -1.
    """
    dt = floats("param", param, (None,), out=True)
    n = param.shape[0]
    floats("grad", grad, (n,), dt, "param")
    floats("accum", accum, (n,), dt, "param", out=True)
    if check_finite:
        if dt == np.float32:
            return _adagrad_checked[float](param, grad, accum, <float>lr, <float>eps)
        return _adagrad_checked[double](param, grad, accum, <double>lr, <double>eps)
    if dt == np.float32:
        _adagrad_dense[float](param, grad, accum, <float>lr, <float>eps)
    else:
        _adagrad_dense[double](param, grad, accum, <double>lr, <double>eps)
    return -1


cdef void _adagrad_rows(real[:, ::1] p, int64_t[::1] rows, real[:, ::1] g, real[:, ::1] a,
                        real lr, real eps, int64_t* bad) noexcept:
    cdef dbm_idx k = rows.shape[0], d = p.shape[1], V = p.shape[0], i, r
    with nogil:
        if d == 0:
            return
        for i in range(k):
            r = rows[i]
            if r < 0 or r >= V:
                bad[0] = i
                return
        for i in range(k):
            r = rows[i]
            if real is float:
                dbm_adagrad_f32(&p[r, 0], &g[i, 0], &a[r, 0], d, lr, eps)
            else:
                dbm_adagrad_f64(&p[r, 0], &g[i, 0], &a[r, 0], d, lr, eps)


def adagrad_rows(param, rows, grad_rows, accum, lr, eps):
    """The Adagrad update on param[rows], accum[rows]; rows int64 (k,) unique, grad_rows (k, d).

    Duplicate rows are applied one after another (not summed): pass unique rows, e.g. from
    embedding_grad_rows. A row outside [0, V) raises ValueError before anything is written.
    """
    dt = floats("param", param, (None, None), out=True)
    V, d = param.shape
    rows = indices("rows", rows, (None,))
    k = rows.shape[0]
    floats("grad_rows", grad_rows, (k, d), dt, "param")
    floats("accum", accum, (V, d), dt, "param", out=True)
    cdef int64_t bad = -1
    if dt == np.float32:
        _adagrad_rows[float](param, rows, grad_rows, accum, <float>lr, <float>eps, &bad)
    else:
        _adagrad_rows[double](param, rows, grad_rows, accum, <double>lr, <double>eps, &bad)
    if bad >= 0:
        raise ValueError(f"rows[{bad}] = {rows[bad]} is out of range: rows must be in [0, {V})")


cdef void _sgd_dense(real[::1] p, real[::1] g, real lr, bint blas) noexcept:
    cdef dbm_idx n = p.shape[0]
    with nogil:
        if not blas:
            if real is float:
                dbm_axpy_f32(&p[0], &g[0], n, lr)
            else:
                dbm_axpy_f64(&p[0], &g[0], n, lr)
            return
        # OpenBLAS threads axpy over its pool: the update then uses every BLAS thread
        axpy(n, -lr, &g[0], &p[0])


def sgd_dense(param, grad, lr):
    """param -= lr * grad; 1-D arrays of one length."""
    dt = floats("param", param, (None,), out=True)
    floats("grad", grad, (param.shape[0],), dt, "param")
    if param.shape[0] == 0:
        return
    # a threaded BLAS splits this memory-bound pass over its threads; one thread: our loop
    cdef bint blas = param.shape[0] >= 65536 and blas_threads() > 1
    if dt == np.float32:
        _sgd_dense[float](param, grad, <float>lr, blas)
    else:
        _sgd_dense[double](param, grad, <double>lr, blas)
