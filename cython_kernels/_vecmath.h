/* Elementwise cores of the dbmpi kernels, written so that gcc vectorises them.
 *
 * Why C and not Cython: the float32 exp below is a Cephes-style polynomial (about 1 ulp)
 * written with integer bit tricks that gcc turns into SIMD code without -ffast-math, and
 * `target_clones` builds AVX-512, AVX2+FMA and baseline versions of each loop, picked at load
 * time, so one binary is both fast and portable. float64 goes through libm (accuracy first:
 * the float64 path is for tests and checks, float32 is the training path).
 *
 * Every function is a single pass over its data (these loops are memory-bound).
 */
#ifndef DBMPI_VECMATH_H
#define DBMPI_VECMATH_H

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(DBMPI_NO_CLONES)
#define DBMPI_CLONES \
    __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define DBMPI_CLONES
#endif

#if defined(__GNUC__)
#define DBM_STATIC static __attribute__((unused))
#else
#define DBM_STATIC static
#endif

typedef int64_t dbm_idx;

enum { DBM_LINEAR = 0, DBM_RELU = 1, DBM_SIGMOID = 2, DBM_TANH = 3 };

/* ---------------------------------------------------------------- float32 exp, tanh */

static inline float dbm_expf(float x)
{
    /* exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln2 / 2; Cephes expf polynomial. */
    const float magic = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer */
    x = x < -87.33654f ? -87.33654f : x;
    x = x > 88.37626f ? 88.37626f : x;
    float t = x * 1.44269504088896341f + magic;
    float fn = t - magic;
    int32_t n;
    memcpy(&n, &t, sizeof n);
    n -= 0x4B400000; /* the integer bits of `magic` */
    float r = x - fn * 0.693359375f;
    r = r - fn * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    /* 2^n in two halves so that n = -126..128 never overflows the exponent field */
    int32_t n1 = n >> 1, n2 = n - n1;
    int32_t b1 = (n1 + 127) << 23, b2 = (n2 + 127) << 23;
    float s1, s2;
    memcpy(&s1, &b1, sizeof s1);
    memcpy(&s2, &b2, sizeof s2);
    return p * s1 * s2;
}

static inline float dbm_sigmoidf(float z)
{
    /* stable: e = exp(-|z|) <= 1, sigmoid = 1/(1+e) for z >= 0 and e/(1+e) otherwise */
    float e = dbm_expf(-fabsf(z));
    float r = 1.0f / (1.0f + e);
    return z >= 0.0f ? r : e * r;
}

static inline float dbm_tanhf(float z)
{
    /* Cephes tanhf: odd polynomial for |z| < 0.625, 1 - 2/(exp(2|z|)+1) otherwise */
    float a = fabsf(z);
    float big = 1.0f - 2.0f / (dbm_expf(2.0f * a) + 1.0f);
    big = z < 0.0f ? -big : big;
    float s = z * z;
    float p = -5.70498872745e-3f;
    p = p * s + 2.06390887954e-2f;
    p = p * s - 5.37397155531e-2f;
    p = p * s + 1.33314422036e-1f;
    p = p * s - 3.33332819422e-1f;
    float small = p * s * z + z;
    return a < 0.625f ? small : big;
}

static inline double dbm_exp(double x) { return exp(x); }

static inline double dbm_sigmoid(double z)
{
    double e = exp(-fabs(z));
    double r = 1.0 / (1.0 + e);
    return z >= 0.0 ? r : e * r;
}

static inline double dbm_tanh(double z) { return tanh(z); }

/* ----------------------------------------------------- kernels, one body per dtype */

#define DBM_DEFINE(T, SFX, EXPF, SIGF, TANHF, SQRTF)                                              \
                                                                                             \
/* y[i, :] = act(y[i, :] + b) for a (rows, n) row-major block, in place */                  \
DBMPI_CLONES DBM_STATIC void dbm_bias_act_##SFX(T *restrict y, const T *restrict b,              \
                                            dbm_idx rows, dbm_idx n, int act)                \
{                                                                                            \
    for (dbm_idx i = 0; i < rows; ++i) {                                                     \
        T *restrict yi = y + i * n;                                                          \
        switch (act) {                                                                       \
        case DBM_RELU:                                                                       \
            for (dbm_idx j = 0; j < n; ++j) {                                                \
                T z = yi[j] + b[j];                                                          \
                yi[j] = z > (T)0 ? z : (T)0;                                                 \
            }                                                                                \
            break;                                                                           \
        case DBM_SIGMOID:                                                                    \
            for (dbm_idx j = 0; j < n; ++j) yi[j] = SIGF(yi[j] + b[j]);                      \
            break;                                                                           \
        case DBM_TANH:                                                                       \
            for (dbm_idx j = 0; j < n; ++j) yi[j] = TANHF(yi[j] + b[j]);                     \
            break;                                                                           \
        default:                                                                             \
            for (dbm_idx j = 0; j < n; ++j) yi[j] += b[j];                                   \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
                                                                                             \
/* y (rows, n) = act(yT.T + b) from yT (n, rows): the bias/activation pass of a forward GEMM  \
 * done in transposed form; 32 x 64 tiles through an L1 buffer */                           \
DBMPI_CLONES DBM_STATIC void dbm_tbias_act_generic_##SFX(const T *restrict yT, T *restrict y,\
                                                 const T *restrict b, dbm_idx rows,          \
                                                 dbm_idx n, int act)                         \
{                                                                                            \
    enum { TJ = 32, TI = 64 };                                                               \
    T buf[TJ * TI];                                                                          \
    for (dbm_idx j0 = 0; j0 < n; j0 += TJ) {                                                 \
        dbm_idx nj = n - j0 < TJ ? n - j0 : TJ;                                              \
        for (dbm_idx i0 = 0; i0 < rows; i0 += TI) {                                          \
            dbm_idx ni = rows - i0 < TI ? rows - i0 : TI;                                    \
            for (dbm_idx jj = 0; jj < nj; ++jj) {                                            \
                const T *restrict src = yT + (j0 + jj) * rows + i0;                          \
                T *restrict dst = buf + jj * TI;                                             \
                const T bj = b[j0 + jj];                                                     \
                switch (act) {                                                               \
                case DBM_RELU:                                                               \
                    for (dbm_idx ii = 0; ii < ni; ++ii) {                                    \
                        T z = src[ii] + bj;                                                  \
                        dst[ii] = z > (T)0 ? z : (T)0;                                       \
                    }                                                                        \
                    break;                                                                   \
                case DBM_SIGMOID:                                                            \
                    for (dbm_idx ii = 0; ii < ni; ++ii) dst[ii] = SIGF(src[ii] + bj);        \
                    break;                                                                   \
                case DBM_TANH:                                                               \
                    for (dbm_idx ii = 0; ii < ni; ++ii) dst[ii] = TANHF(src[ii] + bj);       \
                    break;                                                                   \
                default:                                                                     \
                    for (dbm_idx ii = 0; ii < ni; ++ii) dst[ii] = src[ii] + bj;              \
                }                                                                            \
            }                                                                                \
            for (dbm_idx ii = 0; ii < ni; ++ii) {                                            \
                T *restrict out = y + (i0 + ii) * n + j0;                                    \
                for (dbm_idx jj = 0; jj < nj; ++jj) out[jj] = buf[jj * TI + ii];             \
            }                                                                                \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
                                                                                             \
/* dy <- dy * act'(y) (act' written through y), db = column sums of the new dy */           \
DBMPI_CLONES DBM_STATIC void dbm_act_grad_##SFX(const T *restrict y, T *restrict dy,             \
                                            T *restrict db, dbm_idx rows, dbm_idx n,         \
                                            int act)                                         \
{                                                                                            \
    for (dbm_idx j = 0; j < n; ++j) db[j] = (T)0;                                            \
    for (dbm_idx i = 0; i < rows; ++i) {                                                     \
        const T *restrict yi = y + i * n;                                                    \
        T *restrict di = dy + i * n;                                                         \
        switch (act) {                                                                       \
        case DBM_RELU:                                                                       \
            for (dbm_idx j = 0; j < n; ++j) {                                                \
                T g = yi[j] > (T)0 ? di[j] : (T)0;                                           \
                di[j] = g;                                                                   \
                db[j] += g;                                                                  \
            }                                                                                \
            break;                                                                           \
        case DBM_SIGMOID:                                                                    \
            for (dbm_idx j = 0; j < n; ++j) {                                                \
                T g = di[j] * yi[j] * ((T)1 - yi[j]);                                        \
                di[j] = g;                                                                   \
                db[j] += g;                                                                  \
            }                                                                                \
            break;                                                                           \
        case DBM_TANH:                                                                       \
            for (dbm_idx j = 0; j < n; ++j) {                                                \
                T g = di[j] * ((T)1 - yi[j] * yi[j]);                                        \
                di[j] = g;                                                                   \
                db[j] += g;                                                                  \
            }                                                                                \
            break;                                                                           \
        default:                                                                             \
            for (dbm_idx j = 0; j < n; ++j) db[j] += di[j];                                  \
        }                                                                                    \
    }                                                                                        \
}                                                                                            \
                                                                                             \
/* d = exp(l - m) for one row; returns the sum (16 lanes so that it vectorises) */           \
DBMPI_CLONES DBM_STATIC T dbm_exp_shift_sum_##SFX(const T *l, T *d, dbm_idx n, T m)             \
{                                                                                            \
    T acc[16] = {0};                                                                         \
    dbm_idx j = 0;                                                                           \
    for (; j + 16 <= n; j += 16) {                                                           \
        for (int k = 0; k < 16; ++k) {                                                       \
            T e = EXPF(l[j + k] - m);                                                        \
            d[j + k] = e;                                                                    \
            acc[k] += e;                                                                     \
        }                                                                                    \
    }                                                                                        \
    T s = (T)0;                                                                              \
    for (; j < n; ++j) {                                                                     \
        T e = EXPF(l[j] - m);                                                                \
        d[j] = e;                                                                            \
        s += e;                                                                              \
    }                                                                                        \
    for (int k = 0; k < 16; ++k) s += acc[k];                                                \
    return s;                                                                                \
}                                                                                            \
                                                                                             \
DBMPI_CLONES DBM_STATIC T dbm_row_max_##SFX(const T *l, dbm_idx n)                               \
{                                                                                            \
    T acc[16];                                                                               \
    T m = l[0];                                                                              \
    for (int k = 0; k < 16; ++k) acc[k] = m;                                                 \
    dbm_idx j = 0;                                                                           \
    for (; j + 16 <= n; j += 16)                                                             \
        for (int k = 0; k < 16; ++k) acc[k] = l[j + k] > acc[k] ? l[j + k] : acc[k];         \
    for (; j < n; ++j) m = l[j] > m ? l[j] : m;                                              \
    for (int k = 0; k < 16; ++k) m = acc[k] > m ? acc[k] : m;                                \
    return m;                                                                                \
}                                                                                            \
                                                                                             \
DBMPI_CLONES DBM_STATIC void dbm_scale_##SFX(T *restrict d, dbm_idx n, T s)                      \
{                                                                                            \
    for (dbm_idx j = 0; j < n; ++j) d[j] *= s;                                               \
}                                                                                            \
                                                                                             \
/* accum += g*g; p -= lr * g / (sqrt(accum) + eps) */                                        \
DBMPI_CLONES DBM_STATIC void dbm_adagrad_##SFX(T *restrict p, const T *restrict g,              \
                                           T *restrict a, dbm_idx n, T lr, T eps)            \
{                                                                                            \
    for (dbm_idx j = 0; j < n; ++j) {                                                        \
        T gj = g[j];                                                                         \
        T aj = a[j] + gj * gj;                                                               \
        a[j] = aj;                                                                           \
        p[j] -= lr * gj / (SQRTF(aj) + eps);                                                 \
    }                                                                                        \
}                                                                                            \
                                                                                             \
/* The Adagrad update above, refusing non-finite gradients without a separate pass: g is  \
 * taken in blocks that stay in L1; a block is applied only if the sum of its squares is   \
 * finite (false for NaN, Inf, or |g| > ~1e19), so the check costs no memory traffic.       \
 * Returns -1, or the start of the first refused block: blocks before it are applied,       \
 * nothing from it on is written. */                                                        \
DBMPI_CLONES DBM_STATIC dbm_idx dbm_adagrad_checked_##SFX(T *restrict p, const T *restrict g,   \
                                           T *restrict a, dbm_idx n, T lr, T eps)            \
{                                                                                            \
    const dbm_idx B = 2048;                                                                  \
    for (dbm_idx lo = 0; lo < n; lo += B) {                                                  \
        dbm_idx m = n - lo < B ? n - lo : B;                                                 \
        const T *gb = g + lo;                                                                \
        T acc[16] = {0};                                                                     \
        dbm_idx j = 0;                                                                       \
        for (; j + 16 <= m; j += 16)                                                         \
            for (int k = 0; k < 16; ++k) acc[k] += gb[j + k] * gb[j + k];                    \
        T s = (T)0;                                                                          \
        for (; j < m; ++j) s += gb[j] * gb[j];                                               \
        for (int k = 0; k < 16; ++k) s += acc[k];                                            \
        if (!isfinite(s)) return lo;                                                         \
        T *pb = p + lo, *ab = a + lo;                                                        \
        for (j = 0; j < m; ++j) {                                                            \
            T gj = gb[j];                                                                    \
            T aj = ab[j] + gj * gj;                                                          \
            ab[j] = aj;                                                                      \
            pb[j] -= lr * gj / (SQRTF(aj) + eps);                                            \
        }                                                                                    \
    }                                                                                        \
    return -1;                                                                               \
}                                                                                            \
                                                                                             \
/* p -= lr * g */                                                                            \
DBMPI_CLONES DBM_STATIC void dbm_axpy_##SFX(T *restrict p, const T *restrict g, dbm_idx n,      \
                                        T lr)                                                \
{                                                                                            \
    for (dbm_idx j = 0; j < n; ++j) p[j] -= lr * g[j];                                       \
}                                                                                            \
                                                                                             \
/* a += g (no aliasing) */                                                                   \
DBMPI_CLONES DBM_STATIC void dbm_add_##SFX(T *restrict a, const T *restrict g, dbm_idx n)       \
{                                                                                            \
    for (dbm_idx j = 0; j < n; ++j) a[j] += g[j];                                            \
}                                                                                            \
                                                                                             \
/* row = act(row + bias) for one contiguous row and a scalar bias; inlined into its callers \
 * (a call through the clone resolver per short segment would cost more than the work) */  \
static inline __attribute__((always_inline)) void dbm_row_bias_act_##SFX(T *restrict row,   \
                                                    T bias, dbm_idx n, int act)              \
{                                                                                            \
    switch (act) {                                                                           \
    case DBM_RELU:                                                                           \
        for (dbm_idx j = 0; j < n; ++j) {                                                    \
            T z = row[j] + bias;                                                             \
            row[j] = z > (T)0 ? z : (T)0;                                                    \
        }                                                                                    \
        break;                                                                               \
    case DBM_SIGMOID:                                                                        \
        for (dbm_idx j = 0; j < n; ++j) row[j] = SIGF(row[j] + bias);                        \
        break;                                                                               \
    case DBM_TANH:                                                                           \
        for (dbm_idx j = 0; j < n; ++j) row[j] = TANHF(row[j] + bias);                       \
        break;                                                                               \
    default:                                                                                 \
        for (dbm_idx j = 0; j < n; ++j) row[j] += bias;                                      \
    }                                                                                        \
}                                                                                            \
                                                                                             \
/* s = y.sum(0) for a (rows, n) row-major block */                                          \
DBMPI_CLONES DBM_STATIC void dbm_colsum_##SFX(const T *restrict y, T *restrict s,            \
                                              dbm_idx rows, dbm_idx n)                       \
{                                                                                            \
    for (dbm_idx j = 0; j < n; ++j) s[j] = (T)0;                                             \
    for (dbm_idx i = 0; i < rows; ++i)                                                       \
        for (dbm_idx j = 0; j < n; ++j) s[j] += y[i * n + j];                                \
}                                                                                            \
                                                                                             \
/* a -= g (no aliasing) */                                                                   \
DBMPI_CLONES DBM_STATIC void dbm_sub_##SFX(T *restrict a, const T *restrict g, dbm_idx n)   \
{                                                                                            \
    for (dbm_idx j = 0; j < n; ++j) a[j] -= g[j];                                            \
}                                                                                            \
                                                                                             \
/* a += x*x */                                                                               \
DBMPI_CLONES DBM_STATIC void dbm_sq_acc_##SFX(T *restrict a, const T *restrict x, dbm_idx n)\
{                                                                                            \
    for (dbm_idx j = 0; j < n; ++j) a[j] += x[j] * x[j];                                     \
}                                                                                            \
                                                                                             \
/* a += g*x */                                                                               \
DBMPI_CLONES DBM_STATIC void dbm_mul_acc_##SFX(T *restrict a, const T *restrict g,           \
                                               const T *restrict x, dbm_idx n)               \
{                                                                                            \
    for (dbm_idx j = 0; j < n; ++j) a[j] += g[j] * x[j];                                     \
}                                                                                            \
                                                                                             \
/* a = sqrt(eps + a) */                                                                      \
DBMPI_CLONES DBM_STATIC void dbm_sqrt_eps_##SFX(T *restrict a, dbm_idx n, T eps)            \
{                                                                                            \
    for (dbm_idx j = 0; j < n; ++j) a[j] = SQRTF(eps + a[j]);                                \
}

DBM_DEFINE(float, f32, dbm_expf, dbm_sigmoidf, dbm_tanhf, sqrtf)
DBM_DEFINE(double, f64, dbm_exp, dbm_sigmoid, dbm_tanh, sqrt)

/* ------------------------------------------- transposed bias/activation pass, float32 */

#if defined(__GNUC__) && !defined(__clang__)
/* the 32-byte vector helpers are always inlined: no ABI crosses a call */
#pragma GCC diagnostic ignored "-Wpsabi"
#ifndef TBIAS_TJ
#define TBIAS_TJ 64
#define TBIAS_TI 32
#endif
typedef float dbm_v8sf __attribute__((vector_size(32)));
typedef int32_t dbm_v8si __attribute__((vector_size(32)));

static inline __attribute__((always_inline)) dbm_v8sf dbm_ld8(const float *p)
{
    dbm_v8sf v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline __attribute__((always_inline)) void dbm_st8(float *p, dbm_v8sf v)
{
    memcpy(p, &v, sizeof v);
}

/* dst (8 x 8, row stride ldd) = transpose of src (8 x 8, row stride lds); gcc lowers the
 * shuffles to the unpack/shuffle/permute sequence of whatever SIMD the clone targets */
static inline __attribute__((always_inline)) void dbm_transpose8(const float *src, dbm_idx lds,
                                                                float *dst, dbm_idx ldd)
{
    const dbm_v8si lo = {0, 8, 1, 9, 4, 12, 5, 13}, hi = {2, 10, 3, 11, 6, 14, 7, 15};
    const dbm_v8si p0 = {0, 1, 8, 9, 4, 5, 12, 13}, p1 = {2, 3, 10, 11, 6, 7, 14, 15};
    const dbm_v8si h0 = {0, 1, 2, 3, 8, 9, 10, 11}, h1 = {4, 5, 6, 7, 12, 13, 14, 15};
    dbm_v8sf r0 = dbm_ld8(src), r1 = dbm_ld8(src + lds), r2 = dbm_ld8(src + 2 * lds),
             r3 = dbm_ld8(src + 3 * lds), r4 = dbm_ld8(src + 4 * lds),
             r5 = dbm_ld8(src + 5 * lds), r6 = dbm_ld8(src + 6 * lds),
             r7 = dbm_ld8(src + 7 * lds);
    dbm_v8sf t0 = __builtin_shuffle(r0, r1, lo), t1 = __builtin_shuffle(r0, r1, hi);
    dbm_v8sf t2 = __builtin_shuffle(r2, r3, lo), t3 = __builtin_shuffle(r2, r3, hi);
    dbm_v8sf t4 = __builtin_shuffle(r4, r5, lo), t5 = __builtin_shuffle(r4, r5, hi);
    dbm_v8sf t6 = __builtin_shuffle(r6, r7, lo), t7 = __builtin_shuffle(r6, r7, hi);
    dbm_v8sf u0 = __builtin_shuffle(t0, t2, p0), u1 = __builtin_shuffle(t0, t2, p1);
    dbm_v8sf u2 = __builtin_shuffle(t1, t3, p0), u3 = __builtin_shuffle(t1, t3, p1);
    dbm_v8sf u4 = __builtin_shuffle(t4, t6, p0), u5 = __builtin_shuffle(t4, t6, p1);
    dbm_v8sf u6 = __builtin_shuffle(t5, t7, p0), u7 = __builtin_shuffle(t5, t7, p1);
    dbm_st8(dst, __builtin_shuffle(u0, u4, h0));
    dbm_st8(dst + ldd, __builtin_shuffle(u1, u5, h0));
    dbm_st8(dst + 2 * ldd, __builtin_shuffle(u2, u6, h0));
    dbm_st8(dst + 3 * ldd, __builtin_shuffle(u3, u7, h0));
    dbm_st8(dst + 4 * ldd, __builtin_shuffle(u0, u4, h1));
    dbm_st8(dst + 5 * ldd, __builtin_shuffle(u1, u5, h1));
    dbm_st8(dst + 6 * ldd, __builtin_shuffle(u2, u6, h1));
    dbm_st8(dst + 7 * ldd, __builtin_shuffle(u3, u7, h1));
}

/* y (rows, n) = act(yT.T + b); yT (n, rows) is scratch and is overwritten. Tiles of 64 rows
 * of yT x 32 of its columns: bias + activation in place while in L1, then out as 8 x 8
 * transposes, 32 rows of y x 256 contiguous bytes each (few pages, whole cache lines: a
 * long strip of y would touch one page per row at n = 8192 and thrash the TLB). */
DBMPI_CLONES DBM_STATIC void dbm_tbias_act_f32(float *restrict yT, float *restrict y,
                                               const float *restrict b, dbm_idx rows,
                                               dbm_idx n, int act)
{
    enum { TJ = TBIAS_TJ, TI = TBIAS_TI };
    for (dbm_idx j0 = 0; j0 < n; j0 += TJ) {
        dbm_idx nj = n - j0 < TJ ? n - j0 : TJ;
        for (dbm_idx i0 = 0; i0 < rows; i0 += TI) {
            dbm_idx ni = rows - i0 < TI ? rows - i0 : TI;
            for (dbm_idx jj = 0; jj < nj; ++jj)
                dbm_row_bias_act_f32(yT + (j0 + jj) * rows + i0, b[j0 + jj], ni, act);
            if (nj == TJ && ni == TI) {
                for (dbm_idx ii = 0; ii < TI; ii += 8)
                    for (dbm_idx jj = 0; jj < TJ; jj += 8)
                        dbm_transpose8(yT + (j0 + jj) * rows + i0 + ii, rows,
                                       y + (i0 + ii) * n + j0 + jj, n);
            } else {
                for (dbm_idx ii = 0; ii < ni; ++ii)
                    for (dbm_idx jj = 0; jj < nj; ++jj)
                        y[(i0 + ii) * n + j0 + jj] = yT[(j0 + jj) * rows + i0 + ii];
            }
        }
    }
}
#else
#define dbm_tbias_act_f32(yT, y, b, rows, n, act) dbm_tbias_act_generic_f32(yT, y, b, rows, n, act)
#endif

#define dbm_tbias_act_f64(yT, y, b, rows, n, act) dbm_tbias_act_generic_f64(yT, y, b, rows, n, act)

#endif /* DBMPI_VECMATH_H */
