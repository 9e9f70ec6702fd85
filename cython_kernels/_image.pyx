"""Image kernels, channels-last (B, H, W, C): locally connected layer, L2 pooling and local
contrast normalisation, forward and backward.

The locally connected layer gathers each receptive field of the batch into a (B, k*k*C)
scratch matrix (k contiguous runs of k*C values per image) and does one GEMM per output
location against that location's own (F, k*k*C) weights. Scratch is allocated once per call.
"""
import numpy as np

from cython_kernels._checks import floats, positive

from cython_kernels._common cimport (
    real, dbm_idx, gemm_rm, v_add, v_sub, v_sq_acc, v_mul_acc, v_sqrt_eps, v_scale, v_bias,
    v_colsum,
)
from libc.math cimport sqrt
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memset

cdef double _L2POOL_EPS = 1e-8
L2POOL_EPS = _L2POOL_EPS
LCN_EPS = 1e-4


# ------------------------------------------------------------------ locally connected layer

cdef inline void _gather(real* P, const real* x, dbm_idx B, dbm_idx H, dbm_idx Wd, dbm_idx C,
                         dbm_idx k, dbm_idx h0, dbm_idx w0) noexcept nogil:
    """P (B, k*k*C) = the k x k receptive fields at (h0, w0) of every image."""
    cdef dbm_idx n, u, kc = k * C, q = k * kc
    for n in range(B):
        for u in range(k):
            memcpy(P + n * q + u * kc, x + ((n * H + h0 + u) * Wd + w0) * C, kc * sizeof(real))


cdef inline void _scatter(real* dx, const real* P, dbm_idx B, dbm_idx H, dbm_idx Wd, dbm_idx C,
                          dbm_idx k, dbm_idx h0, dbm_idx w0) noexcept nogil:
    """The transpose of _gather, accumulating: dx fields += P."""
    cdef dbm_idx n, u, kc = k * C, q = k * kc
    for n in range(B):
        for u in range(k):
            v_add(dx + ((n * H + h0 + u) * Wd + w0) * C, P + n * q + u * kc, kc)


cdef int _local_forward(real[:, :, :, ::1] x, real[:, :, :, :, :, ::1] W, real[:, :, ::1] b,
                        dbm_idx s, real[:, :, :, ::1] y) except -1:
    cdef dbm_idx B = x.shape[0], H = x.shape[1], Wd = x.shape[2], C = x.shape[3]
    cdef dbm_idx OH = W.shape[0], OW = W.shape[1], F = W.shape[2], k = W.shape[3]
    cdef dbm_idx q = k * k * C, L = OH * OW, i, j
    cdef real* P = <real*>malloc(B * q * sizeof(real))
    if P == NULL:
        raise MemoryError()
    with nogil:
        for i in range(OH):
            for j in range(OW):
                _gather(P, &x[0, 0, 0, 0], B, H, Wd, C, k, i * s, j * s)
                # y[:, i, j, :] (B, F), row stride L*F  =  P (B, q) @ W[i, j] (F, q).T
                gemm_rm(False, True, B, F, q, <real>1, P, q, &W[i, j, 0, 0, 0, 0], q,
                        <real>0, &y[0, i, j, 0], L * F)
        v_bias(&y[0, 0, 0, 0], &b[0, 0, 0], B, L * F)
    free(P)
    return 0


cdef int _local_backward(real[:, :, :, ::1] x, real[:, :, :, :, :, ::1] W,
                         real[:, :, :, ::1] dy, dbm_idx s, real[:, :, :, :, :, ::1] dW,
                         real[:, :, ::1] db, real[:, :, :, ::1] dx, bint want_dx) except -1:
    cdef dbm_idx B = x.shape[0], H = x.shape[1], Wd = x.shape[2], C = x.shape[3]
    cdef dbm_idx OH = W.shape[0], OW = W.shape[1], F = W.shape[2], k = W.shape[3]
    cdef dbm_idx q = k * k * C, L = OH * OW, i, j
    cdef real* P = <real*>malloc(2 * B * q * sizeof(real))
    cdef real* dP = P + B * q
    if P == NULL:
        raise MemoryError()
    with nogil:
        v_colsum(&dy[0, 0, 0, 0], &db[0, 0, 0], B, L * F)
        if want_dx:
            memset(&dx[0, 0, 0, 0], 0, B * H * Wd * C * sizeof(real))
        for i in range(OH):
            for j in range(OW):
                _gather(P, &x[0, 0, 0, 0], B, H, Wd, C, k, i * s, j * s)
                # dW[i, j] (F, q) = dy[:, i, j, :].T (F, B) @ P (B, q)
                gemm_rm(True, False, F, q, B, <real>1, &dy[0, i, j, 0], L * F, P, q,
                        <real>0, &dW[i, j, 0, 0, 0, 0], q)
                if want_dx:
                    # dP (B, q) = dy[:, i, j, :] (B, F) @ W[i, j] (F, q)
                    gemm_rm(False, False, B, q, F, <real>1, &dy[0, i, j, 0], L * F,
                            &W[i, j, 0, 0, 0, 0], q, <real>0, dP, q)
                    _scatter(&dx[0, 0, 0, 0], dP, B, H, Wd, C, k, i * s, j * s)
    free(P)
    return 0


def _local_shapes(x, W, stride):
    dt = floats("x", x, (None, None, None, None))
    B, H, Wd, C = x.shape
    s = positive("stride", stride)
    if not isinstance(W, np.ndarray) or W.ndim != 6:
        floats("W", W, (None,) * 6, dt, "x")
    k = W.shape[3]
    if k < 1 or k > H or k > Wd:
        raise ValueError(f"W has kernel size {k} (W.shape[3]) but it must be in [1, min(H, W)] "
                         f"= [1, {min(H, Wd)}] for x of shape {x.shape}")
    OH, OW = (H - k) // s + 1, (Wd - k) // s + 1
    floats("W", W, (OH, OW, None, k, k, C), dt, "x")
    return dt, B, H, Wd, C, k, OH, OW, W.shape[2]


def local_forward(x, W, b, stride, y):
    """Locally connected layer (untied weights, no padding), channels-last.

    x (B, H, W, C); W (OH, OW, F, k, k, C); b (OH, OW, F); y (B, OH, OW, F) written with
    y[n, i, j, f] = b[i, j, f] + sum_{u, v, c} x[n, i*s + u, j*s + v, c] W[i, j, f, u, v, c],
    OH = (H - k) // stride + 1, OW likewise.
    """
    dt, B, H, Wd, C, k, OH, OW, F = _local_shapes(x, W, stride)
    floats("b", b, (OH, OW, F), dt, "x")
    floats("y", y, (B, OH, OW, F), dt, "x", out=True)
    if B == 0 or F == 0 or C == 0:
        y[...] = b
        return
    if dt == np.float32:
        _local_forward[float](x, W, b, stride, y)
    else:
        _local_forward[double](x, W, b, stride, y)


def local_backward(x, W, dy, stride, dW, db, dx):
    """Backward of local_forward: dW, db overwritten; dx overwritten unless None."""
    dt, B, H, Wd, C, k, OH, OW, F = _local_shapes(x, W, stride)
    floats("dy", dy, (B, OH, OW, F), dt, "x")
    floats("dW", dW, W.shape, dt, "x", out=True)
    floats("db", db, (OH, OW, F), dt, "x", out=True)
    cdef bint want_dx = dx is not None
    if want_dx:
        floats("dx", dx, x.shape, dt, "x", out=True)
    if B == 0 or F == 0 or C == 0:
        dW[...] = 0
        db[...] = dy.sum(0)
        if want_dx:
            dx[...] = 0
        return
    if not want_dx:
        dx = np.empty((1, 1, 1, 1), dtype=dt)
    if dt == np.float32:
        _local_backward[float](x, W, dy, stride, dW, db, dx, want_dx)
    else:
        _local_backward[double](x, W, dy, stride, dW, db, dx, want_dx)


# ------------------------------------------------------------------------------ L2 pooling

cdef void _l2pool_forward(real[:, :, :, ::1] x, dbm_idx size, dbm_idx s,
                          real[:, :, :, ::1] y) noexcept:
    cdef dbm_idx B = x.shape[0], C = x.shape[3], OH = y.shape[1], OW = y.shape[2]
    cdef dbm_idx n, i, j, u, v
    cdef real* yp
    with nogil:
        for n in range(B):
            for i in range(OH):
                for j in range(OW):
                    yp = &y[n, i, j, 0]
                    memset(yp, 0, C * sizeof(real))
                    for u in range(size):
                        for v in range(size):
                            v_sq_acc(yp, &x[n, i * s + u, j * s + v, 0], C)
                    v_sqrt_eps(yp, C, <real>_L2POOL_EPS)


cdef int _l2pool_backward(real[:, :, :, ::1] x, real[:, :, :, ::1] y, real[:, :, :, ::1] dy,
                          dbm_idx size, dbm_idx s, real[:, :, :, ::1] dx) except -1:
    cdef dbm_idx B = x.shape[0], C = x.shape[3], OH = y.shape[1], OW = y.shape[2]
    cdef dbm_idx n, i, j, u, v, c
    cdef real* g = <real*>malloc(C * sizeof(real))
    cdef real* yp
    cdef real* dyp
    if g == NULL:
        raise MemoryError()
    with nogil:
        memset(&dx[0, 0, 0, 0], 0, dx.shape[0] * dx.shape[1] * dx.shape[2] * C * sizeof(real))
        for n in range(B):
            for i in range(OH):
                for j in range(OW):
                    yp = &y[n, i, j, 0]
                    dyp = &dy[n, i, j, 0]
                    for c in range(C):
                        g[c] = dyp[c] / yp[c]
                    for u in range(size):
                        for v in range(size):
                            v_mul_acc(&dx[n, i * s + u, j * s + v, 0], g,
                                      &x[n, i * s + u, j * s + v, 0], C)
    free(g)
    return 0


def _pool_shapes(x, size, stride):
    dt = floats("x", x, (None, None, None, None))
    B, H, Wd, C = x.shape
    size, s = positive("size", size), positive("stride", stride)
    if size > H or size > Wd:
        raise ValueError(f"size {size} is larger than the image ({H} x {Wd}): pool with "
                         f"size <= min(H, W)")
    return dt, B, (H - size) // s + 1, (Wd - size) // s + 1, C


def l2pool_forward(x, size, stride, y):
    """L2 pooling per channel, no padding: y = sqrt(1e-8 + sum of x**2 over each window).

    x (B, H, W, C), y (B, OH, OW, C) with OH = (H - size) // stride + 1. The fixed 1e-8
    (L2POOL_EPS) keeps the gradient finite at an all-zero window.
    """
    dt, B, OH, OW, C = _pool_shapes(x, size, stride)
    floats("y", y, (B, OH, OW, C), dt, "x", out=True)
    if y.size == 0:
        return
    if dt == np.float32:
        _l2pool_forward[float](x, size, stride, y)
    else:
        _l2pool_forward[double](x, size, stride, y)


def l2pool_backward(x, y, dy, size, stride, dx):
    """dx = sum over the windows holding each pixel of dy * x / y (dx overwritten)."""
    dt, B, OH, OW, C = _pool_shapes(x, size, stride)
    floats("y", y, (B, OH, OW, C), dt, "x")
    floats("dy", dy, (B, OH, OW, C), dt, "x")
    floats("dx", dx, x.shape, dt, "x", out=True)
    if dx.size == 0:
        return
    if dt == np.float32:
        _l2pool_backward[float](x, y, dy, size, stride, dx)
    else:
        _l2pool_backward[double](x, y, dy, size, stride, dx)


# ---------------------------------------------------------------- local contrast normalisation

cdef void _box(const real* src, real* dst, dbm_idx H, dbm_idx Wd, dbm_idx r,
               real* tmp) noexcept nogil:
    """dst = same-padded (2r+1)^2 box sum of the (H, Wd) plane src; tmp is an (H, Wd) plane.

    Direct sums (no running sums) so that float32 loses nothing to cancellation.
    """
    cdef dbm_idx h, w, d, lo, hi
    memset(tmp, 0, H * Wd * sizeof(real))
    for h in range(H):  # along w: tmp[h, w] = sum_{|d| <= r} src[h, w + d]
        for d in range(-r, r + 1):
            lo = -d if d < 0 else 0
            hi = Wd - d if d > 0 else Wd
            if hi > lo:
                v_add(tmp + h * Wd + lo, src + h * Wd + lo + d, hi - lo)
    memset(dst, 0, H * Wd * sizeof(real))
    for h in range(H):  # along h, whole rows at a time
        lo = h - r if h > r else 0
        hi = h + r + 1 if h + r + 1 < H else H
        for d in range(lo, hi):
            v_add(dst + h * Wd, tmp + d * Wd, Wd)


cdef int _lcn_forward(real[:, :, :, ::1] x, dbm_idx size, real[:, :, :, ::1] y,
                      real[:, :, :, ::1] v, real[:, :, ::1] den, real eps) except -1:
    cdef dbm_idx B = x.shape[0], H = x.shape[1], Wd = x.shape[2], C = x.shape[3]
    cdef dbm_idx r = size // 2, n, h, w, c, hw = H * Wd
    cdef real* A = <real*>malloc((3 * hw + H + Wd) * sizeof(real))
    cdef real* Bp = A + hw
    cdef real* T = Bp + hw
    cdef real* inv = T + hw  # inv[h] * inv[H + w] = 1 / (count(h, w) * C)
    cdef real acc, m, val, dn
    cdef const real* xp
    cdef real* vp
    cdef real* yp
    if A == NULL:
        raise MemoryError()
    with nogil:
        _inverse_counts(inv, H, Wd, r, C)
        for n in range(B):
            for h in range(H):  # A = sum over channels
                for w in range(Wd):
                    xp = &x[n, h, w, 0]
                    acc = 0
                    for c in range(C):
                        acc = acc + xp[c]
                    A[h * Wd + w] = acc
            _box(A, Bp, H, Wd, r, T)
            for h in range(H):  # v = x - mean; A = sum_c v**2
                for w in range(Wd):
                    m = Bp[h * Wd + w] * inv[h] * inv[H + w]
                    xp = &x[n, h, w, 0]
                    vp = &v[n, h, w, 0]
                    acc = 0
                    for c in range(C):
                        val = xp[c] - m
                        vp[c] = val
                        acc = acc + val * val
                    A[h * Wd + w] = acc
            _box(A, Bp, H, Wd, r, T)
            for h in range(H):  # den = sqrt(eps + local mean of v**2); y = v / den
                for w in range(Wd):
                    dn = sqrt(eps + Bp[h * Wd + w] * inv[h] * inv[H + w])
                    den[n, h, w] = dn
                    dn = 1 / dn
                    vp = &v[n, h, w, 0]
                    yp = &y[n, h, w, 0]
                    for c in range(C):
                        yp[c] = vp[c] * dn
    free(A)
    return 0


cdef void _inverse_counts(real* inv, dbm_idx H, dbm_idx Wd, dbm_idx r, dbm_idx C) noexcept nogil:
    """inv[h] = 1 / (rows in the window at h * C); inv[H + w] = 1 / (columns at w)."""
    cdef dbm_idx h, w, lo, hi
    for h in range(H):
        lo = h - r if h > r else 0
        hi = h + r + 1 if h + r + 1 < H else H
        inv[h] = (<real>1) / ((hi - lo) * C)
    for w in range(Wd):
        lo = w - r if w > r else 0
        hi = w + r + 1 if w + r + 1 < Wd else Wd
        inv[H + w] = (<real>1) / (hi - lo)


cdef int _lcn_backward(real[:, :, :, ::1] dy, real[:, :, :, ::1] v, real[:, :, ::1] den,
                       dbm_idx size, real[:, :, :, ::1] dx) except -1:
    cdef dbm_idx B = v.shape[0], H = v.shape[1], Wd = v.shape[2], C = v.shape[3]
    cdef dbm_idx r = size // 2, n, h, w, c, hw = H * Wd
    cdef real* A = <real*>malloc((3 * hw + H + Wd) * sizeof(real))
    cdef real* Bp = A + hw
    cdef real* T = Bp + hw
    cdef real* inv = T + hw
    cdef real acc, dn, g, q, val
    cdef const real* dyp
    cdef const real* vp
    cdef real* dxp
    if A == NULL:
        raise MemoryError()
    with nogil:
        _inverse_counts(inv, H, Wd, r, C)
        for n in range(B):
            for h in range(H):  # A = dL/d(box sum of sum_c v**2) = -(sum_c dy v) / (2 den^3 n)
                for w in range(Wd):
                    dyp = &dy[n, h, w, 0]
                    vp = &v[n, h, w, 0]
                    acc = 0
                    for c in range(C):
                        acc = acc + dyp[c] * vp[c]
                    dn = den[n, h, w]
                    A[h * Wd + w] = -acc / (2 * dn * dn * dn) * inv[h] * inv[H + w]
            _box(A, Bp, H, Wd, r, T)  # the box is symmetric: its transpose is itself
            for h in range(H):  # dv = dy / den + 2 v q (into dx); A = sum_c dv / n
                for w in range(Wd):
                    dyp = &dy[n, h, w, 0]
                    vp = &v[n, h, w, 0]
                    dxp = &dx[n, h, w, 0]
                    g = 1 / den[n, h, w]
                    q = 2 * Bp[h * Wd + w]
                    acc = 0
                    for c in range(C):
                        val = dyp[c] * g + vp[c] * q
                        dxp[c] = val
                        acc = acc + val
                    A[h * Wd + w] = acc * inv[h] * inv[H + w]
            _box(A, Bp, H, Wd, r, T)
            for h in range(H):  # dx = dv - box(sum_c dv / n)
                for w in range(Wd):
                    dxp = &dx[n, h, w, 0]
                    q = Bp[h * Wd + w]
                    for c in range(C):
                        dxp[c] = dxp[c] - q
    free(A)
    return 0


def _lcn_size(size):
    size = positive("size", size)
    if size % 2 == 0:
        raise ValueError(f"size must be odd (a centred size x size box), got {size}")
    return size


def lcn_forward(x, size, y, v, den, eps=LCN_EPS):
    """Local contrast normalisation over a size x size box (size odd) across all channels.

    x (B, H, W, C) in; y (B, H, W, C) out; v (B, H, W, C) and den (B, H, W) are written too
    and must be kept for lcn_backward. With same-padding that counts only in-image pixels
    (count(h, w) = window pixels inside the image):

        mean = boxsum(sum_c x) / (count * C);  v = x - mean
        den  = sqrt(eps + boxsum(sum_c v**2) / (count * C));  y = v / den

    den is a smooth max(sqrt(eps), local std); eps = 1e-4 by default (LCN_EPS), i.e. c = 0.01.
    Allocates O(H * W) scratch once per call.
    """
    dt = floats("x", x, (None, None, None, None))
    B, H, Wd, C = x.shape
    size = _lcn_size(size)
    floats("y", y, x.shape, dt, "x", out=True)
    floats("v", v, x.shape, dt, "x", out=True)
    floats("den", den, (B, H, Wd), dt, "x", out=True)
    if float(eps) <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if x.size == 0:
        den[...] = np.sqrt(eps)
        return
    if dt == np.float32:
        _lcn_forward[float](x, size, y, v, den, <float>eps)
    else:
        _lcn_forward[double](x, size, y, v, den, <double>eps)


def lcn_backward(dy, v, den, size, dx):
    """Exact gradient of lcn_forward from its v and den (dy and dx (B, H, W, C); dx overwritten)."""
    dt = floats("dy", dy, (None, None, None, None))
    B, H, Wd, C = dy.shape
    size = _lcn_size(size)
    floats("v", v, dy.shape, dt, "dy")
    floats("den", den, (B, H, Wd), dt, "dy")
    floats("dx", dx, dy.shape, dt, "dy", out=True)
    if dx.size == 0:
        return
    if dt == np.float32:
        _lcn_backward[float](dy, v, den, size, dx)
    else:
        _lcn_backward[double](dy, v, den, size, dx)
