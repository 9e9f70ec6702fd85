# Shared declarations of the dbmpi kernels: the one fused float type, the vectorised C
# elementwise cores (_vecmath.h) and a row-major GEMM and an axpy on top of the kernels' BLAS
# (numpy's OpenBLAS where a module has set _blas.h's pointers, else scipy's).
from scipy.linalg.cython_blas cimport sgemm, dgemm, saxpy, daxpy
from libc.stdint cimport int64_t, uintptr_t

cdef extern from "_blas.h" nogil:
    ctypedef void (*dbm_sgemm64_fn)(const char*, const char*, const int64_t*, const int64_t*,
                                    const int64_t*, const float*, const float*, const int64_t*,
                                    const float*, const int64_t*, const float*, float*,
                                    const int64_t*)
    ctypedef void (*dbm_dgemm64_fn)(const char*, const char*, const int64_t*, const int64_t*,
                                    const int64_t*, const double*, const double*,
                                    const int64_t*, const double*, const int64_t*,
                                    const double*, double*, const int64_t*)
    ctypedef void (*dbm_saxpy64_fn)(const int64_t*, const float*, const float*, const int64_t*,
                                    float*, const int64_t*)
    ctypedef void (*dbm_daxpy64_fn)(const int64_t*, const double*, const double*,
                                    const int64_t*, double*, const int64_t*)
    dbm_sgemm64_fn dbm_sgemm64
    dbm_dgemm64_fn dbm_dgemm64
    dbm_saxpy64_fn dbm_saxpy64
    dbm_daxpy64_fn dbm_daxpy64
    void dbm_blas_set(uintptr_t sgemm, uintptr_t dgemm, uintptr_t saxpy, uintptr_t daxpy)

ctypedef fused real:
    float
    double

cdef extern from "_vecmath.h" nogil:
    ctypedef int64_t dbm_idx
    enum:
        DBM_LINEAR
        DBM_RELU
        DBM_SIGMOID
        DBM_TANH
    float dbm_expf(float x)
    double dbm_exp(double x)
    void dbm_bias_act_f32(float* y, const float* b, dbm_idx rows, dbm_idx n, int act)
    void dbm_bias_act_f64(double* y, const double* b, dbm_idx rows, dbm_idx n, int act)
    void dbm_tbias_act_f32(float* yT, float* y, const float* b, dbm_idx rows, dbm_idx n,
                           int act)
    void dbm_tbias_act_f64(double* yT, double* y, const double* b, dbm_idx rows,
                           dbm_idx n, int act)
    void dbm_act_grad_f32(const float* y, float* dy, float* db, dbm_idx rows, dbm_idx n, int act)
    void dbm_act_grad_f64(const double* y, double* dy, double* db, dbm_idx rows, dbm_idx n,
                          int act)
    float dbm_exp_shift_sum_f32(const float* l, float* d, dbm_idx n, float m)
    double dbm_exp_shift_sum_f64(const double* l, double* d, dbm_idx n, double m)
    float dbm_row_max_f32(const float* l, dbm_idx n)
    double dbm_row_max_f64(const double* l, dbm_idx n)
    void dbm_scale_f32(float* d, dbm_idx n, float s)
    void dbm_scale_f64(double* d, dbm_idx n, double s)
    void dbm_adagrad_f32(float* p, const float* g, float* a, dbm_idx n, float lr, float eps)
    void dbm_adagrad_f64(double* p, const double* g, double* a, dbm_idx n, double lr,
                         double eps)
    dbm_idx dbm_adagrad_checked_f32(float* p, const float* g, float* a, dbm_idx n, float lr,
                                    float eps)
    dbm_idx dbm_adagrad_checked_f64(double* p, const double* g, double* a, dbm_idx n,
                                    double lr, double eps)
    void dbm_axpy_f32(float* p, const float* g, dbm_idx n, float lr)
    void dbm_axpy_f64(double* p, const double* g, dbm_idx n, double lr)
    void dbm_add_f32(float* a, const float* g, dbm_idx n)
    void dbm_add_f64(double* a, const double* g, dbm_idx n)
    void dbm_colsum_f32(const float* y, float* s, dbm_idx rows, dbm_idx n)
    void dbm_colsum_f64(const double* y, double* s, dbm_idx rows, dbm_idx n)
    void dbm_sub_f32(float* a, const float* g, dbm_idx n)
    void dbm_sub_f64(double* a, const double* g, dbm_idx n)
    void dbm_sq_acc_f32(float* a, const float* x, dbm_idx n)
    void dbm_sq_acc_f64(double* a, const double* x, dbm_idx n)
    void dbm_mul_acc_f32(float* a, const float* g, const float* x, dbm_idx n)
    void dbm_mul_acc_f64(double* a, const double* g, const double* x, dbm_idx n)
    void dbm_sqrt_eps_f32(float* a, dbm_idx n, float eps)
    void dbm_sqrt_eps_f64(double* a, dbm_idx n, double eps)


cdef inline void use_blas(tuple pointers):
    """Point this module's _blas.h at (sgemm, dgemm, saxpy, daxpy), or zeros for scipy's."""
    dbm_blas_set(<uintptr_t>pointers[0], <uintptr_t>pointers[1], <uintptr_t>pointers[2],
                 <uintptr_t>pointers[3])


cdef inline void gemm_rm(bint trans_a, bint trans_b, int m, int n, int k, real alpha,
                         real* a, int lda, real* b, int ldb, real beta,
                         real* c, int ldc) noexcept nogil:
    """Row-major c (m, n) = alpha op(a) @ op(b) + beta c.

    BLAS is column-major, so a row-major matrix is its transpose: c.T = op(b).T @ op(a).T.
    `lda`, `ldb`, `ldc` are row lengths as stored. k == 0 gives beta * c (scaled by BLAS).
    """
    cdef char ta = b'T' if trans_b else b'N'
    cdef char tb = b'T' if trans_a else b'N'
    if m == 0 or n == 0:
        return
    # an empty axis makes a leading dimension 0, which BLAS rejects; 1 is then valid
    lda = 1 if lda < 1 else lda
    ldb = 1 if ldb < 1 else ldb
    cdef int64_t m8 = m, n8 = n, k8 = k, lda8 = lda, ldb8 = ldb, ldc8 = ldc
    if real is float:
        if dbm_sgemm64 != NULL:
            dbm_sgemm64(&ta, &tb, &n8, &m8, &k8, &alpha, b, &ldb8, a, &lda8, &beta, c, &ldc8)
        else:
            sgemm(&ta, &tb, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc)
    else:
        if dbm_dgemm64 != NULL:
            dbm_dgemm64(&ta, &tb, &n8, &m8, &k8, &alpha, b, &ldb8, a, &lda8, &beta, c, &ldc8)
        else:
            dgemm(&ta, &tb, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc)


cdef inline void axpy(int64_t n, real alpha, real* x, real* y) noexcept nogil:
    """y += alpha x (contiguous), through the kernels' BLAS (threaded over its pool)."""
    cdef int64_t one8 = 1, off = 0
    cdef int chunk, one = 1
    if real is float:
        if dbm_saxpy64 != NULL:
            dbm_saxpy64(&n, &alpha, x, &one8, y, &one8)
            return
    else:
        if dbm_daxpy64 != NULL:
            dbm_daxpy64(&n, &alpha, x, &one8, y, &one8)
            return
    while off < n:  # scipy's BLAS takes 32-bit lengths
        chunk = <int>(n - off if n - off < 1073741824 else 1073741824)
        if real is float:
            saxpy(&chunk, &alpha, x + off, &one, y + off, &one)
        else:
            daxpy(&chunk, &alpha, x + off, &one, y + off, &one)
        off += chunk


# fused front ends of the vectorised loops, so kernels need no `if real is float` per call
cdef inline void v_add(real* a, const real* g, dbm_idx n) noexcept nogil:
    if real is float:
        dbm_add_f32(a, g, n)
    else:
        dbm_add_f64(a, g, n)


cdef inline void v_sub(real* a, const real* g, dbm_idx n) noexcept nogil:
    if real is float:
        dbm_sub_f32(a, g, n)
    else:
        dbm_sub_f64(a, g, n)


cdef inline void v_sq_acc(real* a, const real* x, dbm_idx n) noexcept nogil:
    if real is float:
        dbm_sq_acc_f32(a, x, n)
    else:
        dbm_sq_acc_f64(a, x, n)


cdef inline void v_mul_acc(real* a, const real* g, const real* x, dbm_idx n) noexcept nogil:
    if real is float:
        dbm_mul_acc_f32(a, g, x, n)
    else:
        dbm_mul_acc_f64(a, g, x, n)


cdef inline void v_sqrt_eps(real* a, dbm_idx n, real eps) noexcept nogil:
    if real is float:
        dbm_sqrt_eps_f32(a, n, eps)
    else:
        dbm_sqrt_eps_f64(a, n, eps)


cdef inline void v_scale(real* a, dbm_idx n, real s) noexcept nogil:
    if real is float:
        dbm_scale_f32(a, n, s)
    else:
        dbm_scale_f64(a, n, s)


cdef inline void v_bias(real* y, const real* b, dbm_idx rows, dbm_idx n) noexcept nogil:
    """y[i, :] += b for a (rows, n) block."""
    if real is float:
        dbm_bias_act_f32(y, b, rows, n, DBM_LINEAR)
    else:
        dbm_bias_act_f64(y, b, rows, n, DBM_LINEAR)


cdef inline void v_colsum(const real* y, real* s, dbm_idx rows, dbm_idx n) noexcept nogil:
    """s = y.sum(0) for a (rows, n) block (y is only read)."""
    if real is float:
        dbm_colsum_f32(y, s, rows, n)
    else:
        dbm_colsum_f64(y, s, rows, n)
