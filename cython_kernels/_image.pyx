"""Image kernels, channels-last (B, H, W, C): locally connected layer, L2 pooling and local
contrast normalisation, forward and backward.

The locally connected layer gathers each receptive field of the batch into a (B, k*k*C)
scratch matrix (k contiguous runs of k*C values per image) and does one GEMM per output
location against that location's own (F, k*k*C) weights. Scratch is allocated once per call.

Batch-strided images: the image arguments (x, y, dy, dx) may be views whose batch axis has any
stride, as long as every example ``a[n]`` is C-contiguous, e.g. rows ``[lo, hi)`` of a larger
``(B, H, W, C)`` batch (``big[:, lo:hi]``) or a column block of a ``(B, features)`` matrix
reshaped. Model parallelism reads its row slabs and writes its outputs in place that way,
without copies. The other arguments (weights, v, den) must be C-contiguous.
"""
import numpy as np

from cython_kernels._blasinfo import kernel_blas
from cython_kernels._checks import _INT32_MAX, _shape, floats, positive

from cython_kernels._common cimport (
    real, dbm_idx, gemm_rm, v_add, v_sq_acc, v_mul_acc, v_sqrt_eps, use_blas,
)
from libc.math cimport sqrt
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memset

use_blas(kernel_blas()["pointers"])  # the GEMMs' library (_blasinfo.py, _blas.h)

cdef double _L2POOL_EPS = 1e-8
L2POOL_EPS = _L2POOL_EPS
LCN_EPS = 1e-4


def _images(name, a, shape, dtype=None, ref="", out=False):
    """floats() for a batch of images: axis 0 may have any stride of at least one example,
    every example a[n] must be C-contiguous. Returns (dtype, batch stride in elements)."""
    if (isinstance(a, np.ndarray) and a.ndim == len(shape) and a.ndim > 1 and a.shape[0] > 1
            and not a.flags.c_contiguous):
        one = a[:1]  # C-contiguous exactly when every example is
        st = a.strides[0]
        if one.flags.c_contiguous and st > 0 and st % a.itemsize == 0 and st >= one.nbytes \
                and st // a.itemsize <= _INT32_MAX:
            dt = floats(name, one, (None, *shape[1:]), dtype, ref, out)
            _shape(name, a, shape)
            return dt, st // a.itemsize
        if one.flags.c_contiguous:
            raise ValueError(f"{name} has a batch stride of {st} bytes: pass a view whose "
                             f"examples do not overlap, or np.ascontiguousarray({name})")
        raise ValueError(f"{name} must be C-contiguous: pass np.ascontiguousarray({name}) "
                         f"(a batch-strided view is fine if every example {name}[n] is "
                         f"C-contiguous)")
    dt = floats(name, a, shape, dtype, ref, out)
    n = 1
    for s in a.shape[1:]:
        n *= s
    return dt, n


# ------------------------------------------------------------------ locally connected layer

cdef inline void _gather(real* P, const real* x, dbm_idx B, dbm_idx xs, dbm_idx Wd, dbm_idx C,
                         dbm_idx k, dbm_idx h0, dbm_idx w0) noexcept nogil:
    """P (B, k*k*C) = the k x k receptive fields at (h0, w0) of every image (batch stride xs)."""
    cdef dbm_idx n, u, kc = k * C, q = k * kc
    for n in range(B):
        for u in range(k):
            memcpy(P + n * q + u * kc, x + n * xs + ((h0 + u) * Wd + w0) * C, kc * sizeof(real))


cdef inline void _scatter(real* dx, const real* P, dbm_idx B, dbm_idx xs, dbm_idx Wd, dbm_idx C,
                          dbm_idx k, dbm_idx h0, dbm_idx w0) noexcept nogil:
    """The transpose of _gather, accumulating: dx fields += P."""
    cdef dbm_idx n, u, kc = k * C, q = k * kc
    for n in range(B):
        for u in range(k):
            v_add(dx + n * xs + ((h0 + u) * Wd + w0) * C, P + n * q + u * kc, kc)


cdef int _local_fwd(real* x, dbm_idx xs, dbm_idx B, dbm_idx Wd, dbm_idx C, real* W, real* b,
                    dbm_idx F, dbm_idx k, dbm_idx s, dbm_idx OW, dbm_idx first, dbm_idx n,
                    real* y, dbm_idx ys) except -1:
    """Output locations [first, first + n) (row-major over an OW-wide grid) of every image:
    y (B, n, F) with batch stride ys; W (n, F, k*k*C), b (n, F)."""
    cdef dbm_idx q = k * k * C, t, l, i, j, m
    cdef real* P = <real*>malloc(B * q * sizeof(real))
    if P == NULL:
        raise MemoryError()
    with nogil:
        for t in range(n):
            l = first + t
            i = l // OW
            j = l - i * OW
            _gather(P, x, B, xs, Wd, C, k, i * s, j * s)
            # y[:, t, :] (B, F), row stride ys  =  P (B, q) @ W[t] (F, q).T
            gemm_rm(False, True, B, F, q, <real>1, P, q, W + t * F * q, q, <real>0, y + t * F, ys)
        for m in range(B):
            v_add(y + m * ys, b, n * F)
    free(P)
    return 0


cdef int _local_bwd(real* x, dbm_idx xs, dbm_idx B, dbm_idx H, dbm_idx Wd, dbm_idx C, real* W,
                    real* dy, dbm_idx dys, dbm_idx F, dbm_idx k, dbm_idx s, dbm_idx OW,
                    dbm_idx first, dbm_idx n, real* dW, real* db, real* dx, dbm_idx dxs,
                    bint want_dx) except -1:
    cdef dbm_idx q = k * k * C, t, l, i, j, m
    cdef real* P = <real*>malloc(2 * B * q * sizeof(real))
    cdef real* dP = P + B * q
    if P == NULL:
        raise MemoryError()
    with nogil:
        memset(db, 0, n * F * sizeof(real))  # db = dy summed over the batch
        for m in range(B):
            v_add(db, dy + m * dys, n * F)
        if want_dx:
            for m in range(B):
                memset(dx + m * dxs, 0, H * Wd * C * sizeof(real))
        for t in range(n):
            l = first + t
            i = l // OW
            j = l - i * OW
            _gather(P, x, B, xs, Wd, C, k, i * s, j * s)
            # dW[t] (F, q) = dy[:, t, :].T (F, B) @ P (B, q)
            gemm_rm(True, False, F, q, B, <real>1, dy + t * F, dys, P, q, <real>0,
                    dW + t * F * q, q)
            if want_dx:
                # dP (B, q) = dy[:, t, :] (B, F) @ W[t] (F, q)
                gemm_rm(False, False, B, q, F, <real>1, dy + t * F, dys, W + t * F * q, q,
                        <real>0, dP, q)
                _scatter(dx, dP, B, dxs, Wd, C, k, i * s, j * s)
    free(P)
    return 0


cdef int _local_forward(real[:, :, :, :] x, dbm_idx xs, real[:, :, ::1] W, real[:, ::1] b,
                        dbm_idx k, dbm_idx s, dbm_idx OW, dbm_idx first, real[:, :, :] y,
                        dbm_idx ys) except -1:
    return _local_fwd(&x[0, 0, 0, 0], xs, x.shape[0], x.shape[2], x.shape[3], &W[0, 0, 0],
                      &b[0, 0], W.shape[1], k, s, OW, first, W.shape[0], &y[0, 0, 0], ys)


cdef int _local_backward(real[:, :, :, :] x, dbm_idx xs, real[:, :, ::1] W,
                         real[:, :, :] dy, dbm_idx dys, dbm_idx k, dbm_idx s, dbm_idx OW,
                         dbm_idx first, real[:, :, ::1] dW, real[:, ::1] db,
                         real[:, :, :, :] dx, dbm_idx dxs, bint want_dx) except -1:
    return _local_bwd(&x[0, 0, 0, 0], xs, x.shape[0], x.shape[1], x.shape[2], x.shape[3],
                      &W[0, 0, 0], &dy[0, 0, 0], dys, W.shape[1], k, s, OW, first, W.shape[0],
                      &dW[0, 0, 0], &db[0, 0], &dx[0, 0, 0, 0], dxs, want_dx)


def _local_shapes(x, W, stride):
    dt, xs = _images("x", x, (None, None, None, None))
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
    return dt, xs, B, H, Wd, C, k, OH, OW, W.shape[2]


def _flat(a, n, F):
    """(B, OH, OW, F) -> (B, OH*OW, F) view (batch stride kept)."""
    return a.reshape(a.shape[0], n, F, copy=False)


def local_forward(x, W, b, stride, y):
    """Locally connected layer (untied weights, no padding), channels-last.

    x (B, H, W, C); W (OH, OW, F, k, k, C); b (OH, OW, F); y (B, OH, OW, F) written with
    y[n, i, j, f] = b[i, j, f] + sum_{u, v, c} x[n, i*s + u, j*s + v, c] W[i, j, f, u, v, c],
    OH = (H - k) // stride + 1, OW likewise. x and y may be batch-strided.
    """
    dt, xs, B, H, Wd, C, k, OH, OW, F = _local_shapes(x, W, stride)
    floats("b", b, (OH, OW, F), dt, "x")
    _, ys = _images("y", y, (B, OH, OW, F), dt, "x", out=True)
    if B == 0 or F == 0 or C == 0:
        y[...] = b
        return
    n = OH * OW
    W3, b2, y3 = W.reshape(n, F, k * k * C), b.reshape(n, F), _flat(y, n, F)
    if dt == np.float32:
        _local_forward[float](x, xs, W3, b2, k, stride, OW, 0, y3, ys)
    else:
        _local_forward[double](x, xs, W3, b2, k, stride, OW, 0, y3, ys)


def local_backward(x, W, dy, stride, dW, db, dx):
    """Backward of local_forward: dW, db overwritten; dx overwritten unless None. x, dy and dx
    may be batch-strided."""
    dt, xs, B, H, Wd, C, k, OH, OW, F = _local_shapes(x, W, stride)
    _, dys = _images("dy", dy, (B, OH, OW, F), dt, "x")
    floats("dW", dW, W.shape, dt, "x", out=True)
    floats("db", db, (OH, OW, F), dt, "x", out=True)
    cdef bint want_dx = dx is not None
    dxs = 0
    if want_dx:
        _, dxs = _images("dx", dx, x.shape, dt, "x", out=True)
    if B == 0 or F == 0 or C == 0:
        dW[...] = 0
        db[...] = dy.sum(0)
        if want_dx:
            dx[...] = 0
        return
    if not want_dx:
        dx = np.empty((1, 1, 1, 1), dtype=dt)
    n, q = OH * OW, k * k * C
    W3, dy3, dW3, db2 = W.reshape(n, F, q), _flat(dy, n, F), dW.reshape(n, F, q), db.reshape(n, F)
    if dt == np.float32:
        _local_backward[float](x, xs, W3, dy3, dys, k, stride, OW, 0, dW3, db2, dx, dxs, want_dx)
    else:
        _local_backward[double](x, xs, W3, dy3, dys, k, stride, OW, 0, dW3, db2, dx, dxs,
                                want_dx)


def _local_at_shapes(x, W, stride, first):
    dt, xs = _images("x", x, (None, None, None, None))
    B, H, Wd, C = x.shape
    s = positive("stride", stride)
    if not isinstance(W, np.ndarray) or W.ndim != 5:
        floats("W", W, (None,) * 5, dt, "x")
    n, F, k = W.shape[0], W.shape[1], W.shape[2]
    if k < 1 or k > H or k > Wd:
        raise ValueError(f"W has kernel size {k} (W.shape[2]) but it must be in [1, min(H, W)] "
                         f"= [1, {min(H, Wd)}] for x of shape {x.shape}")
    floats("W", W, (n, F, k, k, C), dt, "x")
    OW = (Wd - k) // s + 1
    first = int(first)
    if first < 0 or (n and ((first + n - 1) // OW) * s + k > H):
        raise ValueError(f"locations [{first}, {first + n}) of an output grid {OW} wide need "
                         f"input rows up to {((first + n - 1) // OW) * s + k if n else 0} but x "
                         f"has {H} (first must be >= 0)")
    return dt, xs, B, H, Wd, C, k, OW, n, F, first


def local_forward_at(x, W, b, stride, first, y):
    """local_forward for output locations [first, first + n) only, counted row-major over the
    output grid of x (OW = (W - k) // stride + 1 wide): location l is (l // OW, l % OW).

    x (B, H, W, C); W (n, F, k, k, C) and b (n, F) those locations' weights and biases;
    y (B, n, F). Model parallelism cuts a locally connected layer at any location this way.
    x and y may be batch-strided.
    """
    dt, xs, B, H, Wd, C, k, OW, n, F, first = _local_at_shapes(x, W, stride, first)
    floats("b", b, (n, F), dt, "x")
    _, ys = _images("y", y, (B, n, F), dt, "x", out=True)
    if B == 0 or F == 0 or C == 0 or n == 0:
        y[...] = b
        return
    W3 = W.reshape(n, F, k * k * C)
    if dt == np.float32:
        _local_forward[float](x, xs, W3, b, k, stride, OW, first, y, ys)
    else:
        _local_forward[double](x, xs, W3, b, k, stride, OW, first, y, ys)


def local_backward_at(x, W, dy, stride, first, dW, db, dx):
    """Backward of local_forward_at: dW (n, F, k, k, C), db (n, F) overwritten; dx (the whole
    x) overwritten unless None. x, dy and dx may be batch-strided."""
    dt, xs, B, H, Wd, C, k, OW, n, F, first = _local_at_shapes(x, W, stride, first)
    _, dys = _images("dy", dy, (B, n, F), dt, "x")
    floats("dW", dW, W.shape, dt, "x", out=True)
    floats("db", db, (n, F), dt, "x", out=True)
    cdef bint want_dx = dx is not None
    dxs = 0
    if want_dx:
        _, dxs = _images("dx", dx, x.shape, dt, "x", out=True)
    if B == 0 or F == 0 or C == 0 or n == 0:
        dW[...] = 0
        db[...] = dy.sum(0)
        if want_dx:
            dx[...] = 0
        return
    if not want_dx:
        dx = np.empty((1, 1, 1, 1), dtype=dt)
    q = k * k * C
    W3, dW3 = W.reshape(n, F, q), dW.reshape(n, F, q)
    if dt == np.float32:
        _local_backward[float](x, xs, W3, dy, dys, k, stride, OW, first, dW3, db, dx, dxs, want_dx)
    else:
        _local_backward[double](x, xs, W3, dy, dys, k, stride, OW, first, dW3, db, dx, dxs,
                                want_dx)


# ------------------------------------------------------------------------------ L2 pooling

cdef void _l2pool_forward(real[:, :, :, :] x, dbm_idx xs, dbm_idx size, dbm_idx s,
                          real[:, :, :, :] y, dbm_idx ys) noexcept:
    cdef dbm_idx B = x.shape[0], Wd = x.shape[2], C = x.shape[3], OH = y.shape[1]
    cdef dbm_idx OW = y.shape[2], n, i, j, u, v
    cdef real* x0 = &x[0, 0, 0, 0]
    cdef real* y0 = &y[0, 0, 0, 0]
    cdef real* xb
    cdef real* yp
    with nogil:
        for n in range(B):
            xb = x0 + n * xs
            for i in range(OH):
                for j in range(OW):
                    yp = y0 + n * ys + (i * OW + j) * C
                    memset(yp, 0, C * sizeof(real))
                    for u in range(size):
                        for v in range(size):
                            v_sq_acc(yp, xb + ((i * s + u) * Wd + j * s + v) * C, C)
                    v_sqrt_eps(yp, C, <real>_L2POOL_EPS)


cdef int _l2pool_backward(real[:, :, :, :] x, dbm_idx xs, real[:, :, :, :] y,
                          dbm_idx ys, real[:, :, :, :] dy, dbm_idx dys, dbm_idx size,
                          dbm_idx s, real[:, :, :, :] dx, dbm_idx dxs) except -1:
    cdef dbm_idx B = x.shape[0], H = x.shape[1], Wd = x.shape[2], C = x.shape[3]
    cdef dbm_idx OH = y.shape[1], OW = y.shape[2], n, i, j, u, v, c, off
    cdef real* g = <real*>malloc(C * sizeof(real))
    cdef real* x0 = &x[0, 0, 0, 0]
    cdef real* y0 = &y[0, 0, 0, 0]
    cdef real* dy0 = &dy[0, 0, 0, 0]
    cdef real* dx0 = &dx[0, 0, 0, 0]
    cdef real* yp
    cdef real* dyp
    if g == NULL:
        raise MemoryError()
    with nogil:
        for n in range(B):
            memset(dx0 + n * dxs, 0, H * Wd * C * sizeof(real))
            for i in range(OH):
                for j in range(OW):
                    yp = y0 + n * ys + (i * OW + j) * C
                    dyp = dy0 + n * dys + (i * OW + j) * C
                    for c in range(C):
                        g[c] = dyp[c] / yp[c]
                    for u in range(size):
                        for v in range(size):
                            off = ((i * s + u) * Wd + j * s + v) * C
                            v_mul_acc(dx0 + n * dxs + off, g, x0 + n * xs + off, C)
    free(g)
    return 0


def _pool_shapes(x, size, stride):
    dt, xs = _images("x", x, (None, None, None, None))
    B, H, Wd, C = x.shape
    size, s = positive("size", size), positive("stride", stride)
    if size > H or size > Wd:
        raise ValueError(f"size {size} is larger than the image ({H} x {Wd}): pool with "
                         f"size <= min(H, W)")
    return dt, xs, B, (H - size) // s + 1, (Wd - size) // s + 1, C


def l2pool_forward(x, size, stride, y):
    """L2 pooling per channel, no padding: y = sqrt(1e-8 + sum of x**2 over each window).

    x (B, H, W, C), y (B, OH, OW, C) with OH = (H - size) // stride + 1. The fixed 1e-8
    (L2POOL_EPS) keeps the gradient finite at an all-zero window. x and y may be batch-strided.
    """
    dt, xs, B, OH, OW, C = _pool_shapes(x, size, stride)
    _, ys = _images("y", y, (B, OH, OW, C), dt, "x", out=True)
    if y.size == 0:
        return
    if dt == np.float32:
        _l2pool_forward[float](x, xs, size, stride, y, ys)
    else:
        _l2pool_forward[double](x, xs, size, stride, y, ys)


def l2pool_backward(x, y, dy, size, stride, dx):
    """dx = sum over the windows holding each pixel of dy * x / y (dx overwritten). All four
    may be batch-strided."""
    dt, xs, B, OH, OW, C = _pool_shapes(x, size, stride)
    _, ys = _images("y", y, (B, OH, OW, C), dt, "x")
    _, dys = _images("dy", dy, (B, OH, OW, C), dt, "x")
    _, dxs = _images("dx", dx, x.shape, dt, "x", out=True)
    if dx.size == 0:
        return
    if y.size == 0:
        dx[...] = 0
        return
    if dt == np.float32:
        _l2pool_backward[float](x, xs, y, ys, dy, dys, size, stride, dx, dxs)
    else:
        _l2pool_backward[double](x, xs, y, ys, dy, dys, size, stride, dx, dxs)


# ---------------------------------------------------------------- local contrast normalisation

cdef void _box(const real* src, real* dst, dbm_idx H, dbm_idx Wd, dbm_idx r, real* tmp,
               dbm_idx o0, dbm_idx o1) noexcept nogil:
    """dst rows [o0, o1) = same-padded (2r+1)^2 box sums of the (H, Wd) plane src; tmp is an
    (H, Wd) plane. Only src rows [o0 - r, o1 + r) are read; other dst rows are not written.

    Direct sums (no running sums) so that float32 loses nothing to cancellation.
    """
    cdef dbm_idx h, w, d, lo, hi
    cdef dbm_idx h0 = o0 - r if o0 > r else 0
    cdef dbm_idx h1 = o1 + r if o1 + r < H else H
    memset(tmp + h0 * Wd, 0, (h1 - h0) * Wd * sizeof(real))
    for h in range(h0, h1):  # along w: tmp[h, w] = sum_{|d| <= r} src[h, w + d]
        for d in range(-r, r + 1):
            lo = -d if d < 0 else 0
            hi = Wd - d if d > 0 else Wd
            if hi > lo:
                v_add(tmp + h * Wd + lo, src + h * Wd + lo + d, hi - lo)
    memset(dst + o0 * Wd, 0, (o1 - o0) * Wd * sizeof(real))
    for h in range(o0, o1):  # along h, whole rows at a time
        lo = h - r if h > r else 0
        hi = h + r + 1 if h + r + 1 < H else H
        for d in range(lo, hi):
            v_add(dst + h * Wd, tmp + d * Wd, Wd)


cdef int _lcn_forward(real[:, :, :, :] x, dbm_idx xs, dbm_idx size, real[:, :, :, :] y,
                      dbm_idx ys, real[:, :, :, ::1] v, real[:, :, :] den, real eps,
                      dbm_idx ra, dbm_idx rb) except -1:
    cdef dbm_idx B = x.shape[0], H = x.shape[1], Wd = x.shape[2], C = x.shape[3]
    cdef dbm_idx r = size // 2, n, h, w, c, hw = H * Wd
    # rows read of x, rows of v (and of the local mean) that output rows [ra, rb) depend on
    cdef dbm_idx m0 = ra - 2 * r if ra > 2 * r else 0
    cdef dbm_idx m1 = rb + 2 * r if rb + 2 * r < H else H
    cdef dbm_idx v0 = ra - r if ra > r else 0
    cdef dbm_idx v1 = rb + r if rb + r < H else H
    cdef real* A = <real*>malloc((3 * hw + H + Wd) * sizeof(real))
    cdef real* Bp = A + hw
    cdef real* T = Bp + hw
    cdef real* inv = T + hw  # inv[h] * inv[H + w] = 1 / (count(h, w) * C)
    cdef real acc, m, val, dn
    cdef real* x0 = &x[0, 0, 0, 0]
    cdef real* y0 = &y[0, 0, 0, 0]
    cdef real* xp
    cdef real* vp
    cdef real* yp
    if A == NULL:
        raise MemoryError()
    with nogil:
        _inverse_counts(inv, H, Wd, r, C)
        for n in range(B):
            for h in range(m0, m1):  # A = sum over channels
                for w in range(Wd):
                    xp = x0 + n * xs + (h * Wd + w) * C
                    acc = 0
                    for c in range(C):
                        acc = acc + xp[c]
                    A[h * Wd + w] = acc
            _box(A, Bp, H, Wd, r, T, v0, v1)
            for h in range(v0, v1):  # v = x - mean; A = sum_c v**2
                for w in range(Wd):
                    m = Bp[h * Wd + w] * inv[h] * inv[H + w]
                    xp = x0 + n * xs + (h * Wd + w) * C
                    vp = &v[n, h, w, 0]
                    acc = 0
                    for c in range(C):
                        val = xp[c] - m
                        vp[c] = val
                        acc = acc + val * val
                    A[h * Wd + w] = acc
            _box(A, Bp, H, Wd, r, T, ra, rb)
            for h in range(ra, rb):  # den = sqrt(eps + local mean of v**2); y = v / den
                for w in range(Wd):
                    dn = sqrt(eps + Bp[h * Wd + w] * inv[h] * inv[H + w])
                    den[n, h - ra, w] = dn
                    dn = 1 / dn
                    vp = &v[n, h, w, 0]
                    yp = y0 + n * ys + ((h - ra) * Wd + w) * C
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


cdef int _lcn_backward(real[:, :, :, :] dy, dbm_idx dys, real[:, :, :, ::1] v,
                       real[:, :, :] den, dbm_idx size, real[:, :, :, :] dx, dbm_idx dxs,
                       dbm_idx ra, dbm_idx rb) except -1:
    cdef dbm_idx B = v.shape[0], H = v.shape[1], Wd = v.shape[2], C = v.shape[3]
    cdef dbm_idx r = size // 2, n, h, w, c, hw = H * Wd
    cdef dbm_idx m0 = ra - 2 * r if ra > 2 * r else 0
    cdef dbm_idx m1 = rb + 2 * r if rb + 2 * r < H else H
    cdef dbm_idx v0 = ra - r if ra > r else 0
    cdef dbm_idx v1 = rb + r if rb + r < H else H
    cdef real* A = <real*>malloc((3 * hw + H + Wd) * sizeof(real))
    cdef real* Bp = A + hw
    cdef real* T = Bp + hw
    cdef real* inv = T + hw
    cdef real acc, dn, g, q, val
    cdef real* dy0 = &dy[0, 0, 0, 0]
    cdef real* dx0 = &dx[0, 0, 0, 0]
    cdef real* dyp
    cdef real* vp
    cdef real* dxp
    if A == NULL:
        raise MemoryError()
    with nogil:
        _inverse_counts(inv, H, Wd, r, C)
        for n in range(B):
            memset(A, 0, hw * sizeof(real))  # dy is zero outside rows [ra, rb)
            for h in range(ra, rb):  # A = dL/d(box sum of sum_c v**2) = -(sum_c dy v) / (2 den^3 n)
                for w in range(Wd):
                    dyp = dy0 + n * dys + ((h - ra) * Wd + w) * C
                    vp = &v[n, h, w, 0]
                    acc = 0
                    for c in range(C):
                        acc = acc + dyp[c] * vp[c]
                    dn = den[n, h - ra, w]
                    A[h * Wd + w] = -acc / (2 * dn * dn * dn) * inv[h] * inv[H + w]
            _box(A, Bp, H, Wd, r, T, v0, v1)  # the box is symmetric: its transpose is itself
            for h in range(v0, v1):  # dv = dy / den + 2 v q (into dx); A = sum_c dv / n
                for w in range(Wd):
                    vp = &v[n, h, w, 0]
                    dxp = dx0 + n * dxs + (h * Wd + w) * C
                    q = 2 * Bp[h * Wd + w]
                    acc = 0
                    if ra <= h < rb:
                        dyp = dy0 + n * dys + ((h - ra) * Wd + w) * C
                        g = 1 / den[n, h - ra, w]
                        for c in range(C):
                            val = dyp[c] * g + vp[c] * q
                            dxp[c] = val
                            acc = acc + val
                    else:
                        for c in range(C):
                            val = vp[c] * q
                            dxp[c] = val
                            acc = acc + val
                    A[h * Wd + w] = acc * inv[h] * inv[H + w]
            _box(A, Bp, H, Wd, r, T, m0, m1)
            for h in range(H):  # dx = dv - box(sum_c dv / n); dv = 0 outside rows [v0, v1)
                dxp = dx0 + n * dxs + h * Wd * C
                if h < m0 or h >= m1:
                    memset(dxp, 0, Wd * C * sizeof(real))
                elif h < v0 or h >= v1:
                    for w in range(Wd):
                        q = Bp[h * Wd + w]
                        for c in range(C):
                            dxp[w * C + c] = -q
                else:
                    for w in range(Wd):
                        q = Bp[h * Wd + w]
                        for c in range(C):
                            dxp[w * C + c] = dxp[w * C + c] - q
    free(A)
    return 0


def _lcn_size(size):
    size = positive("size", size)
    if size % 2 == 0:
        raise ValueError(f"size must be odd (a centred size x size box), got {size}")
    return size


def _lcn_rows(rows, H):
    if rows is None:
        return 0, H
    ra, rb = (int(v) for v in rows)
    if not 0 <= ra < rb <= H:
        raise ValueError(f"rows must be a range (a, b) with 0 <= a < b <= H = {H}, got {rows}")
    return ra, rb


def lcn_forward(x, size, y, v, den, eps=LCN_EPS, rows=None):
    """Local contrast normalisation over a size x size box (size odd) across all channels.

    x (B, H, W, C) in; y (B, H, W, C) out; v (B, H, W, C) and den (B, H, W) are written too
    and must be kept for lcn_backward. With same-padding that counts only in-image pixels
    (count(h, w) = window pixels inside the image):

        mean = boxsum(sum_c x) / (count * C);  v = x - mean
        den  = sqrt(eps + boxsum(sum_c v**2) / (count * C));  y = v / den

    den is a smooth max(sqrt(eps), local std); eps = 1e-4 by default (LCN_EPS), i.e. c = 0.01.

    ``rows = (a, b)`` computes output rows [a, b) only: y (B, b - a, W, C) and den
    (B, b - a, W) hold those rows, and v only its rows [a - r, b + r) (clipped, r = size // 2;
    the others are not written). x, y and den may be batch-strided (so may dy, dx and den in
    lcn_backward): calls on consecutive row ranges fill one y and den, each row exactly as one
    call would. Allocates O(H * W) scratch once per call.
    """
    dt, xs = _images("x", x, (None, None, None, None))
    B, H, Wd, C = x.shape
    size = _lcn_size(size)
    ra, rb = _lcn_rows(rows, H) if H else (0, 0)
    _, ys = _images("y", y, (B, rb - ra, Wd, C), dt, "x", out=True)
    floats("v", v, x.shape, dt, "x", out=True)
    _images("den", den, (B, rb - ra, Wd), dt, "x", out=True)
    if float(eps) <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if x.size == 0:
        den[...] = np.sqrt(eps)
        return
    if dt == np.float32:
        _lcn_forward[float](x, xs, size, y, ys, v, den, <float>eps, ra, rb)
    else:
        _lcn_forward[double](x, xs, size, y, ys, v, den, <double>eps, ra, rb)


def lcn_backward(dy, v, den, size, dx, rows=None):
    """Exact gradient of lcn_forward from its v and den; dx (B, H, W, C) overwritten.

    dy (B, H, W, C), or with ``rows = (a, b)`` (as given to lcn_forward) dy (B, b - a, W, C)
    and den (B, b - a, W): the gradient of output rows [a, b) alone (the other rows' dy taken
    as zero). dy and dx may be batch-strided.
    """
    if rows is None:
        dt, dys = _images("dy", dy, (None, None, None, None))
        B, H, Wd, C = dy.shape
        floats("v", v, dy.shape, dt, "dy")
        ref = "dy"
    else:
        dt = floats("v", v, (None, None, None, None))
        B, H, Wd, C = v.shape
        ref = "v"
    size = _lcn_size(size)
    ra, rb = _lcn_rows(rows, H) if H else (0, 0)
    if rows is not None:
        _, dys = _images("dy", dy, (B, rb - ra, Wd, C), dt, ref)
    _images("den", den, (B, rb - ra, Wd), dt, ref)
    _, dxs = _images("dx", dx, (B, H, Wd, C), dt, ref, out=True)
    if dx.size == 0:
        return
    if dt == np.float32:
        _lcn_backward[float](dy, dys, v, den, size, dx, dxs, ra, rb)
    else:
        _lcn_backward[double](dy, dys, v, den, size, dx, dxs, ra, rb)
