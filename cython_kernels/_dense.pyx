"""Dense layer, softmax cross-entropy and multi-class hinge kernels.

Row-major GEMMs go to the kernels' BLAS without the GIL (numpy's OpenBLAS, else scipy's:
_blasinfo.py) or through np.matmul (see GEMM below); bias, activation and their gradients are
fused into one vectorised pass over the output (see _vecmath.h).
"""
import threading

import numpy as np

from cython_kernels import reference as _reference
from cython_kernels._blasinfo import blas_threads, kernel_blas
from cython_kernels._checks import floats, indices

from cython_kernels._common cimport (
    real, dbm_idx, gemm_rm, DBM_LINEAR, DBM_RELU, DBM_SIGMOID, DBM_TANH,
    dbm_bias_act_f32, dbm_bias_act_f64, dbm_act_grad_f32, dbm_act_grad_f64,
    dbm_tbias_act_f32, dbm_tbias_act_f64,
    dbm_exp_shift_sum_f32, dbm_exp_shift_sum_f64, dbm_row_max_f32, dbm_row_max_f64,
    dbm_scale_f32, dbm_scale_f64, use_blas,
)
from libc.math cimport log
from libc.stdint cimport int64_t

use_blas(kernel_blas()["pointers"])  # the GEMMs' library (_blasinfo.py, _blas.h)

# Where the dense GEMMs run, chosen by measurement (benchmarks/kernels.py --sweep):
#   forward:  "auto" | "blas-nn" | "blas-tt" | "numpy-nn" | "numpy-tt"
#   backward: "blas" | "numpy"
# "nn" computes y = x @ W in place; "tt" computes y.T = W.T @ x.T into a per-thread scratch
# buffer and the bias/activation pass transposes back (OpenBLAS 0.3.30/0.3.31 run these shapes
# faster that way round unless n_out >> batch). "blas" is the kernels' BLAS (numpy's OpenBLAS,
# else scipy's: _blasinfo.py) called here without the GIL; "numpy" is np.matmul.
# "auto": with a single-threaded BLAS "tt" when n_in >= AUTO_TT_MIN_K and n_out <=
# AUTO_TT_RATIO * B (below that the GEMM gains nothing and the transposing pass costs more than
# the plain one), else "nn"; with a threaded BLAS always "nn": the GEMM halves on 2 threads but
# "tt"'s transposing pass stays on one.
GEMM = {"forward": "auto", "backward": "blas"}
AUTO_TT_RATIO = 24
AUTO_TT_MIN_K = 1024
_FORWARD_MODES = ("auto", "blas-nn", "blas-tt", "numpy-nn", "numpy-tt")
_tls = threading.local()


def _scratch(n, dt):
    """A per-thread scratch vector of at least n elements of dt, kept between calls."""
    bufs = getattr(_tls, "bufs", None)
    if bufs is None:
        bufs = _tls.bufs = {}
    buf = bufs.get(dt)
    if buf is None or buf.shape[0] < n:
        buf = bufs[dt] = np.empty(n, dtype=dt)
    return buf


ACTIVATIONS = {"linear": DBM_LINEAR, "relu": DBM_RELU, "sigmoid": DBM_SIGMOID, "tanh": DBM_TANH}


cdef int _activation(object name) except -1:
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}") from None


# ------------------------------------------------------------------------------ dense layer

cdef enum:
    GEMM_HERE_NN = 0   # gemm here, into y
    GEMM_HERE_TT = 1   # gemm here, into scratch as y.T
    GEMM_DONE_NN = 2    # y already holds x @ W
    GEMM_DONE_TT = 3    # scratch already holds (x @ W).T


cdef void _dense_forward(real[:, ::1] x, real[:, ::1] W, real[::1] b, real[:, ::1] y,
                         int act, real[::1] scratch, int mode) noexcept:
    """y = act(x @ W + b), the GEMM done here or before (mode)."""
    cdef int B = x.shape[0], n_in = x.shape[1], n_out = W.shape[1]
    with nogil:
        if mode == GEMM_HERE_TT:
            # y.T (n_out, B) = W.T @ x.T
            gemm_rm(True, True, n_out, B, n_in, <real>1, &W[0, 0], n_out, &x[0, 0], n_in,
                    <real>0, &scratch[0], B)
        elif mode == GEMM_HERE_NN:
            gemm_rm(False, False, B, n_out, n_in, <real>1, &x[0, 0], n_in, &W[0, 0], n_out,
                    <real>0, &y[0, 0], n_out)
        if mode == GEMM_HERE_TT or mode == GEMM_DONE_TT:
            if real is float:
                dbm_tbias_act_f32(&scratch[0], &y[0, 0], &b[0], B, n_out, act)
            else:
                dbm_tbias_act_f64(&scratch[0], &y[0, 0], &b[0], B, n_out, act)
        else:
            if real is float:
                dbm_bias_act_f32(&y[0, 0], &b[0], B, n_out, act)
            else:
                dbm_bias_act_f64(&y[0, 0], &b[0], B, n_out, act)


cdef void _dense_backward(real[:, ::1] x, real[:, ::1] W, real[:, ::1] y, real[:, ::1] dy,
                          int act, real[:, ::1] dW, real[::1] db, real[:, ::1] dx,
                          bint want_dx, bint gemms, real beta) noexcept:
    """dz = dy * act'(y) (into dy), db = dz.sum(0); if gemms: dW = x.T @ dz + beta dW,
    dx = dz @ W.T."""
    cdef int B = x.shape[0], n_in = x.shape[1], n_out = W.shape[1]
    with nogil:
        if real is float:
            dbm_act_grad_f32(&y[0, 0], &dy[0, 0], &db[0], B, n_out, act)
        else:
            dbm_act_grad_f64(&y[0, 0], &dy[0, 0], &db[0], B, n_out, act)
        if gemms:
            gemm_rm(True, False, n_in, n_out, B, <real>1, &x[0, 0], n_in, &dy[0, 0], n_out,
                    beta, &dW[0, 0], n_out)
            if want_dx:
                gemm_rm(False, True, B, n_in, n_out, <real>1, &dy[0, 0], n_out, &W[0, 0],
                        n_out, <real>0, &dx[0, 0], n_in)


def _tbias_act(yT, y, b, activation):
    """y = act(yT.T + b) with yT overwritten: the transposed routes' pass alone (for timing)."""
    dt = floats("yT", yT, (None, None), out=True)
    floats("y", y, (yT.shape[1], yT.shape[0]), dt, "yT", out=True)
    floats("b", b, (yT.shape[0],), dt, "yT")
    cdef int act = _activation(activation)
    cdef dbm_idx n = yT.shape[0], B = yT.shape[1]
    cdef float[:, ::1] t32, y32
    cdef float[::1] b32
    cdef double[:, ::1] t64, y64
    cdef double[::1] b64
    if dt == np.float32:
        t32, y32, b32 = yT, y, b
        with nogil:
            dbm_tbias_act_f32(&t32[0, 0], &y32[0, 0], &b32[0], B, n, act)
    else:
        t64, y64, b64 = yT, y, b
        with nogil:
            dbm_tbias_act_f64(&t64[0, 0], &y64[0, 0], &b64[0], B, n, act)


def _forward_mode(B, n_in, n_out):
    mode = GEMM["forward"]
    if mode == "auto":
        if blas_threads() > 1:
            # "nn" was 1-11% faster on every shape of the acoustic model at 2 threads
            # (interleaved A/B, docs/performance.md)
            mode = "blas-nn"
        else:
            tt = n_in >= AUTO_TT_MIN_K and n_out <= AUTO_TT_RATIO * B
            mode = "blas" + ("-tt" if tt else "-nn")
    if mode not in _FORWARD_MODES:
        raise ValueError(f"GEMM['forward'] must be one of {_FORWARD_MODES}, got {mode!r}")
    return mode


def dense_forward(x, W, b, y, activation):
    """y = act(x @ W + b); x (B, n_in), W (n_in, n_out), b (n_out,), y (B, n_out) written.

    activation: "linear", "relu", "sigmoid" or "tanh". The GEMM route follows GEMM (above);
    the transposed routes keep one B * n_out scratch vector per thread and dtype between calls.
    """
    dt = floats("x", x, (None, None))
    B, n_in = x.shape
    floats("W", W, (n_in, None), dt, "x")
    n_out = W.shape[1]
    floats("b", b, (n_out,), dt, "x")
    floats("y", y, (B, n_out), dt, "x", out=True)
    cdef int act = _activation(activation)
    if B == 0 or n_in == 0 or n_out == 0:  # degenerate: BLAS rejects empty operands
        _reference.dense_forward(x, W, b, y, activation)
        return
    fmode = _forward_mode(B, n_in, n_out)
    cdef int mode
    if fmode.endswith("tt"):
        scratch = _scratch(B * n_out, dt)
        if fmode == "numpy-tt":
            np.matmul(x, W, out=scratch[:B * n_out].reshape(n_out, B).T)
            mode = GEMM_DONE_TT
        else:
            mode = GEMM_HERE_TT
    else:
        scratch = _scratch(1, dt)
        if fmode == "numpy-nn":
            np.matmul(x, W, out=y)
            mode = GEMM_DONE_NN
        else:
            mode = GEMM_HERE_NN
    if dt == np.float32:
        _dense_forward[float](x, W, b, y, act, scratch, mode)
    else:
        _dense_forward[double](x, W, b, y, act, scratch, mode)


def dense_backward(x, W, y, dy, activation, dW, db, dx, accumulate=False):
    """Backward of dense_forward; dy is overwritten with dz = dy * act'(y).

    dW = x.T @ dz and db = dz.sum(0) are overwritten (added to, with ``accumulate``: summing
    several batches' gradients costs no extra pass, the GEMM's beta = 1); dx = dz @ W.T is
    written unless None.
    """
    dt = floats("x", x, (None, None))
    B, n_in = x.shape
    floats("W", W, (n_in, None), dt, "x")
    n_out = W.shape[1]
    floats("y", y, (B, n_out), dt, "x")
    floats("dy", dy, (B, n_out), dt, "x", out=True)
    floats("dW", dW, (n_in, n_out), dt, "x", out=True)
    floats("db", db, (n_out,), dt, "x", out=True)
    cdef bint want_dx = dx is not None
    if want_dx:
        floats("dx", dx, (B, n_in), dt, "x", out=True)
    cdef int act = _activation(activation)
    if accumulate:
        db_sum, db = db, np.empty_like(db)  # db of this batch, added below (n_out values)
    if B == 0 or n_in == 0 or n_out == 0:
        if accumulate:
            dW_sum, dW = dW, np.empty_like(dW)
        _reference.dense_backward(x, W, y, dy, activation, dW, db, dx)
        if accumulate:
            dW_sum += dW
            db_sum += db
        return
    bmode = GEMM["backward"]
    if bmode not in ("blas", "numpy"):
        raise ValueError(f"GEMM['backward'] must be 'blas' or 'numpy', got {bmode!r}")
    cdef bint here = bmode == "blas"
    dx_view = dx if want_dx else np.empty((1, 1), dtype=dt)
    if dt == np.float32:
        _dense_backward[float](x, W, y, dy, act, dW, db, dx_view, want_dx, here,
                               <float>accumulate)
    else:
        _dense_backward[double](x, W, y, dy, act, dW, db, dx_view, want_dx, here,
                                <double>accumulate)
    if not here:
        if accumulate:
            dW += x.T @ dy
        else:
            np.matmul(x.T, dy, out=dW)
        if want_dx:
            np.matmul(dy, W.T, out=dx)
    if accumulate:
        db_sum += db


# --------------------------------------------------------------------------------- losses

cdef double _softmax_xent(real[:, ::1] logits, int64_t[::1] labels, real[:, ::1] d,
                          int64_t* bad) noexcept:
    """Mean cross-entropy; d = (softmax - onehot) / B. d may alias logits."""
    cdef dbm_idx B = logits.shape[0], n = logits.shape[1], i, lab
    cdef double total = 0.0
    cdef real m, s, ly, inv_b = (<real>1) / B
    with nogil:
        for i in range(B):
            lab = labels[i]
            if lab < 0 or lab >= n:
                bad[0] = i
                return 0.0
            if real is float:
                m = dbm_row_max_f32(&logits[i, 0], n)
            else:
                m = dbm_row_max_f64(&logits[i, 0], n)
            ly = logits[i, lab]  # read before d (which may alias logits) is written
            if real is float:
                s = dbm_exp_shift_sum_f32(&logits[i, 0], &d[i, 0], n, m)
            else:
                s = dbm_exp_shift_sum_f64(&logits[i, 0], &d[i, 0], n, m)
            total += log(<double>s) - <double>(ly - m)
            if real is float:
                dbm_scale_f32(&d[i, 0], n, inv_b / s)
            else:
                dbm_scale_f64(&d[i, 0], n, inv_b / s)
            d[i, lab] -= inv_b
        return total / B


def softmax_xent(logits, labels, dlogits):
    """Mean softmax cross-entropy; dlogits = (softmax(logits) - onehot(labels)) / B.

    logits, dlogits (B, n) (dlogits may be logits itself); labels int64 (int32 is widened).
    Returns the loss as a Python float. Raises ValueError for a label outside [0, n).
    """
    dt = floats("logits", logits, (None, None))
    B, n = logits.shape
    if B == 0 or n == 0:
        raise ValueError(f"logits has shape {logits.shape}: softmax_xent needs B >= 1 and n >= 1")
    labels = indices("labels", labels, (B,))
    floats("dlogits", dlogits, (B, n), dt, "logits", out=True)
    cdef int64_t bad = -1
    cdef double loss
    if dt == np.float32:
        loss = _softmax_xent[float](logits, labels, dlogits, &bad)
    else:
        loss = _softmax_xent[double](logits, labels, dlogits, &bad)
    if bad >= 0:
        raise ValueError(f"labels[{bad}] = {labels[bad]} is out of range: labels must be in "
                         f"[0, {n}) for logits with {n} classes")
    return loss


cdef double _hinge(real[:, ::1] s, int64_t[::1] labels, real[:, ::1] d, real margin,
                   int64_t* bad) noexcept:
    cdef dbm_idx B = s.shape[0], n = s.shape[1], i, j, lab, count
    cdef double total = 0.0
    cdef real sy, v, inv_b = (<real>1) / B
    with nogil:
        for i in range(B):
            lab = labels[i]
            if lab < 0 or lab >= n:
                bad[0] = i
                return 0.0
            sy = s[i, lab]
            count = 0
            for j in range(n):
                v = margin + s[i, j] - sy
                if j != lab and v > 0:
                    total += v
                    d[i, j] = inv_b
                    count += 1
                else:
                    d[i, j] = 0
            d[i, lab] = -count * inv_b
        return total / B


def multiclass_hinge(scores, labels, dscores, margin=1.0):
    """Weston-Watkins hinge: mean_i sum_{j != y_i} max(0, margin + s_ij - s_iy_i).

    dscores (B, n) gets its gradient (divided by B); it may be scores itself. Returns the loss.
    """
    dt = floats("scores", scores, (None, None))
    B, n = scores.shape
    if B == 0 or n == 0:
        raise ValueError(f"scores has shape {scores.shape}: multiclass_hinge needs B, n >= 1")
    labels = indices("labels", labels, (B,))
    floats("dscores", dscores, (B, n), dt, "scores", out=True)
    cdef int64_t bad = -1
    cdef double loss
    if dt == np.float32:
        loss = _hinge[float](scores, labels, dscores, <float>margin, &bad)
    else:
        loss = _hinge[double](scores, labels, dscores, <double>margin, &bad)
    if bad >= 0:
        raise ValueError(f"labels[{bad}] = {labels[bad]} is out of range: labels must be in "
                         f"[0, {n}) for scores with {n} classes")
    return loss
