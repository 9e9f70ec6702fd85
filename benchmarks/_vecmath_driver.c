/* Times the elementwise passes of cython_kernels/_vecmath.h as built for one instruction set
 * (benchmarks/vecmath.py compiles it once per ISA and flag set). Prints one JSON object: the
 * median microseconds per call of each pass over a 128 x 2560 float32 block (a dense layer's
 * output at batch 128) and an FNV-1a hash of the bytes each pass wrote, so that two builds
 * can be checked to compute the same bits. */
#include "_vecmath.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

enum { ROWS = 128, COLS = 2560, N = ROWS * COLS, REPS = 201 };

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static int cmp(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static uint64_t fnv(const void *p, size_t n)
{
    const unsigned char *c = p;
    uint64_t h = 1469598103934665603ULL;
    for (size_t i = 0; i < n; ++i)
        h = (h ^ c[i]) * 1099511628211ULL;
    return h;
}

static float *z0, *y, *dy0, *dy, *b, *db, *acc;

static void reset(void) { memcpy(y, z0, sizeof(float) * N); memcpy(dy, dy0, sizeof(float) * N); }

static void p_sigmoid(void) { dbm_bias_act_f32(y, b, ROWS, COLS, DBM_SIGMOID); }
static void p_tanh(void) { dbm_bias_act_f32(y, b, ROWS, COLS, DBM_TANH); }
static void p_relu(void) { dbm_bias_act_f32(y, b, ROWS, COLS, DBM_RELU); }
static void p_grad(void) { dbm_act_grad_f32(z0, dy, db, ROWS, COLS, DBM_SIGMOID); }
static void p_softmax(void)
{
    for (int i = 0; i < ROWS; ++i) {
        float m = dbm_row_max_f32(z0 + (size_t)i * COLS, COLS);
        float s = dbm_exp_shift_sum_f32(z0 + (size_t)i * COLS, y + (size_t)i * COLS, COLS, m);
        dbm_scale_f32(y + (size_t)i * COLS, COLS, 1.0f / s);
    }
}
static void p_adagrad(void) { dbm_adagrad_f32(y, dy0, acc, N, 0.01f, 1e-8f); }

int main(void)
{
    z0 = malloc(sizeof(float) * N); y = malloc(sizeof(float) * N);
    dy0 = malloc(sizeof(float) * N); dy = malloc(sizeof(float) * N);
    acc = malloc(sizeof(float) * N); b = malloc(sizeof(float) * COLS);
    db = calloc(COLS, sizeof(float));
    uint32_t s = 12345;
    for (int i = 0; i < N; ++i) {  /* pre-activations in [-8, 8), gradients in [-1, 1) */
        s = s * 1664525u + 1013904223u;
        z0[i] = (float)(s >> 8) / 16777216.0f * 16.0f - 8.0f;
        s = s * 1664525u + 1013904223u;
        dy0[i] = (float)(s >> 8) / 16777216.0f * 2.0f - 1.0f;
    }
    for (int j = 0; j < COLS; ++j) b[j] = 0.001f * (j % 97) - 0.05f;
    struct { const char *name; void (*fn)(void); float *out; size_t n; } pass[] = {
        {"bias+sigmoid", p_sigmoid, NULL, N}, {"bias+tanh", p_tanh, NULL, N},
        {"bias+relu", p_relu, NULL, N}, {"sigmoid' and db", p_grad, NULL, N},
        {"softmax rows", p_softmax, NULL, N}, {"adagrad", p_adagrad, NULL, N},
    };
    int np = sizeof pass / sizeof pass[0];
    printf("{");
    for (int k = 0; k < np; ++k) {
        double t[REPS];
        for (int r = 0; r < REPS; ++r) {
            reset();
            for (int i = 0; i < N; ++i) acc[i] = 1.0f;
            double t0 = now();
            pass[k].fn();
            t[r] = now() - t0;
        }
        qsort(t, REPS, sizeof t[0], cmp);
        /* the last rep's output: each pass starts from the same inputs (reset above) */
        uint64_t h = fnv(y, sizeof(float) * N) ^ fnv(dy, sizeof(float) * N) ^ fnv(db, sizeof(float) * COLS);
        printf("%s\"%s\": {\"us\": %.2f, \"hash\": \"%016llx\"}", k ? ", " : "", pass[k].name,
               1e6 * t[REPS / 2], (unsigned long long)h);
    }
    printf("}\n");
    return 0;
}
