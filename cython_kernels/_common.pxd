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
    void dbm_axpy_f32(float* p, const float* g, dbm_idx n, float lr)
    void dbm_axpy_f64(double* p, const double* g, dbm_idx n, double lr)
    void dbm_add_f32(float* a, const float* g, dbm_idx n)
    void dbm_add_f64(double* a, const double* g, dbm_idx n)


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
