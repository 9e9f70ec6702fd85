# Shared declarations of the dbmpi kernels: the one fused float type, the vectorised C
# elementwise cores (_vecmath.h) and a row-major GEMM on top of scipy's BLAS.
from scipy.linalg.cython_blas cimport sgemm, dgemm
from libc.stdint cimport int64_t

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
    if real is float:
        sgemm(&ta, &tb, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc)
    else:
        dgemm(&ta, &tb, &n, &m, &k, &alpha, b, &ldb, a, &lda, &beta, c, &ldc)


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
