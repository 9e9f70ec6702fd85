/* The BLAS routines the kernels call when numpy's own OpenBLAS can be reached (see
 * _blasinfo.py): its Fortran entry points with 64-bit integers, as numpy's wheels build it.
 *
 * Why not scipy.linalg.cython_blas alone: numpy and scipy wheels each bundle an OpenBLAS, often
 * of different releases, and each has its own thread pool. numpy's is the one a user's own
 * array code (and dbmpi's own np.dot) runs on; every GEMM and axpy of the kernels goes to one
 * of them so that a training step never hands work between two pools. The pointers are per module (these are
 * `static`): each module that calls BLAS sets its own at import (dbm_blas_set). While they
 * are null, _common.pxd calls scipy's. */
#ifndef DBMPI_BLAS_H
#define DBMPI_BLAS_H

#include <stdint.h>

#if defined(__GNUC__)
#define DBM_BLAS_STATIC static __attribute__((unused))
#else
#define DBM_BLAS_STATIC static
#endif

typedef void (*dbm_sgemm64_fn)(const char *, const char *, const int64_t *, const int64_t *,
                               const int64_t *, const float *, const float *, const int64_t *,
                               const float *, const int64_t *, const float *, float *,
                               const int64_t *);
typedef void (*dbm_dgemm64_fn)(const char *, const char *, const int64_t *, const int64_t *,
                               const int64_t *, const double *, const double *, const int64_t *,
                               const double *, const int64_t *, const double *, double *,
                               const int64_t *);
typedef void (*dbm_saxpy64_fn)(const int64_t *, const float *, const float *, const int64_t *,
                               float *, const int64_t *);
typedef void (*dbm_daxpy64_fn)(const int64_t *, const double *, const double *, const int64_t *,
                               double *, const int64_t *);

DBM_BLAS_STATIC dbm_sgemm64_fn dbm_sgemm64 = 0;
DBM_BLAS_STATIC dbm_dgemm64_fn dbm_dgemm64 = 0;
DBM_BLAS_STATIC dbm_saxpy64_fn dbm_saxpy64 = 0;
DBM_BLAS_STATIC dbm_daxpy64_fn dbm_daxpy64 = 0;

/* All four or none: addresses from ctypes, 0 to call scipy's BLAS. */
DBM_BLAS_STATIC void dbm_blas_set(uintptr_t sgemm, uintptr_t dgemm, uintptr_t saxpy, uintptr_t daxpy)
{
    int all = sgemm && dgemm && saxpy && daxpy;
    dbm_sgemm64 = all ? (dbm_sgemm64_fn)sgemm : 0;
    dbm_dgemm64 = all ? (dbm_dgemm64_fn)dgemm : 0;
    dbm_saxpy64 = all ? (dbm_saxpy64_fn)saxpy : 0;
    dbm_daxpy64 = all ? (dbm_daxpy64_fn)daxpy : 0;
}

#endif
