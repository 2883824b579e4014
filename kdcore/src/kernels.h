// Internal to the layer kernels (kernels.c, linear.c, conv.c, layers.c): the micro-kernel
// shapes, their instruction-set dispatch and packing, and small shared helpers. Not part of
// the library's interface.
#ifndef KD_KERNELS_H
#define KD_KERNELS_H

#include "layers.h"
#include "kd_internal.h"

#include <cblas.h>
#include <limits.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <strings.h>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define KD_HAVE_AVX512_KERNELS 1   // the AVX-512 and AVX2 versions of the kernels are compiled
#endif

#ifndef _OPENMP
// NO_OMP builds: the omp pragmas are plain no-ops; keep -Wall quiet about them.
#pragma GCC diagnostic ignored "-Wunknown-pragmas"
#endif

// Elementwise loops below this size are not worth waking the thread team for.
#define KD_PAR_MIN 32768

#define CV_MR 8      // rows (output channels) of a forward micro-tile
#define CV_NR 32     // pixels of a forward micro-tile
#define DW_MR 4      // dout rows of a weight-gradient tile
#define DW_NR 6      // im2col rows of a weight-gradient tile
#define DW_L 16      // lanes of the weight-gradient dot products
#define CV_ALIGN 16  // floats (64 bytes): every workspace region starts on a cache line
#define CV_L2_FLOATS 65536   // target size of a packed weight chunk or an im2col chunk (256 KB)
#define CV_GROUP_PIX 256     // col path: pixels of an image group to aim for

// Instruction set the kernels run now (enum kd_isa; decided at first use, kernels.c).
int kd_simd_level(void);

// The conv micro-kernels of the current instruction set (kernels.c).
typedef void (*fwd_ukr_fn)(int, const float *, const float *, const ptrdiff_t *, float *, size_t, int);
typedef void (*dw_ukr_fn)(int, size_t, const float * const *, size_t, const float * const *, size_t, float *);
struct conv_kernels { fwd_ukr_fn fwd; dw_ukr_fn dw; };
struct conv_kernels kd_conv_kernels(void);

// Packing into micro-kernel panels (kernels.c): dst[k*ldd + r] = src[r*lds + k] for the
// rows r < rows of a row-major block (rows..7 zero); dst[k*ldd + c] = src[k*lds + c] for
// c < valid (valid..width-1 zero).
void kd_pack_rows8(float * dst, size_t ldd, const float * src, size_t lds, int rows, int K);
void kd_pack_cols(float * dst, size_t ldd, const float * src, size_t lds, int width, int valid, int K);

// Winograd F(2x2, 3x3) (winograd.c): stride-1 ungrouped 3x3 convs, padding 0 or 1. Its
// workspace is laid out like conv.c's (shared part, then one part per thread) and overlays
// conv.c's regions: a call uses one layout or the other.
struct wino_plan {
    int nb;                                  // tiles per block (multiple of CV_NR)
    size_t u_off, o_off, shared;             // shared: packed U, row offsets of V
    size_t v_off, m_off, r_off, y_off, per;  // per thread: V, M, row buffers
    size_t m_n, p_off, p_n;                  // floats of M; the padded input image
    // weight gradient (its own region of dw_per floats per thread, placed by conv.c)
    int nbw;                                 // tiles per block
    size_t ldb, ocp;                         // row stride of V^T (C rounded to 32); OC rounded to 8
    size_t du_off, dz_off, dv_off, xh_off, yh_off, dk_off, dw_per, xh_n, yh_n;
};
// The shape rule (conv.c): Winograd where it measured faster, as kd_winograd_config says it.
#define KD_WINO_RULE_TEXT "C, OC >= 32"
int kd_wino_eligible(const struct kd_conv_shape * s);
int kd_wino_enabled(void);
int kd_wino_plan(const struct kd_conv_shape * s, struct wino_plan * w);
void kd_wino_forward(float * out, const float * inp, const float * weight, const float * bias,
                     const struct kd_conv_shape * s, const struct wino_plan * w, float * ws, size_t shared, size_t per);
void kd_wino_dinp(float * dinp, const float * dout, const float * weight, const struct kd_conv_shape * s,
                  const struct wino_plan * w, float * ws, size_t shared, size_t per);
void kd_wino_dweight(float * dw, const float * dout, const float * inp, int n0, int n1,
                     const struct kd_conv_shape * s, const struct wino_plan * w, float * sc);

static inline int imin(int a, int b) { return a < b ? a : b; }
static inline int imax(int a, int b) { return a > b ? a : b; }

// Reductions in double. Eight independent lanes (plus one for the tail) let the compiler
// vectorise the float->double accumulation and keep the lanes in registers; the lane of
// each element depends only on its index, so the result is the same whatever thread or
// thread count computes it.
static inline double lanes_sum(const double * a) {
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

// sum(x)
static inline double sum_f64(const float * x, size_t n) {
    double acc[8] = {0}, tail = 0.0;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        for (int j = 0; j < 8; j++) { acc[j] += (double)x[i + j]; }
    }
    for (; i < n; i++) { tail += (double)x[i]; }
    return lanes_sum(acc) + tail;
}

// sum(x[i*S] * y[i]); the S == 1 case uses the lanes.
static inline double dot_gather_f64(const float * x, const float * y, int n, int S) {
    double acc[8] = {0}, tail = 0.0;
    int i = 0;
    if (S == 1) {
        for (; i + 8 <= n; i += 8) {
            for (int j = 0; j < 8; j++) { acc[j] += (double)x[i + j] * (double)y[i + j]; }
        }
    }
    for (; i < n; i++) { tail += (double)x[(size_t)i * S] * (double)y[i]; }
    return lanes_sum(acc) + tail;
}

// y[i] += a * x[i*S]. The S == 1 branch is a separate loop so that it vectorises.
static inline void axpy_gather(float * y, float a, const float * x, int n, int S) {
    if (S == 1) {
        for (int i = 0; i < n; i++) { y[i] += a * x[i]; }
    } else {
        for (int i = 0; i < n; i++) { y[i] += a * x[(size_t)i * S]; }
    }
}

// y[i*S] += a * x[i]
static inline void axpy_scatter(float * y, float a, const float * x, int n, int S) {
    if (S == 1) {
        for (int i = 0; i < n; i++) { y[i] += a * x[i]; }
    } else if (S == 2) {
        for (int i = 0; i < n; i++) { y[2 * (size_t)i] += a * x[i]; }
    } else {
        for (int i = 0; i < n; i++) { y[(size_t)i * S] += a * x[i]; }
    }
}

// Range [*o0, *o1) of output positions o (0 <= o < O) whose input position o*S - P + k
// lies inside [0, L). Positions outside read zero padding.
static inline void valid_range(int * o0, int * o1, int L, int O, int k, int S, int P) {
    int lo = P - k;                     // need o*S >= P - k
    int hi = L - 1 + P - k;             // need o*S <= L - 1 + P - k
    *o0 = lo <= 0 ? 0 : imin(O, (lo + S - 1) / S);
    *o1 = hi < 0 ? 0 : imin(O, hi / S + 1);
    if (*o1 < *o0) { *o1 = *o0; }
}

static inline size_t round_up(size_t x, size_t m) { return (x + m - 1) / m * m; }
static inline size_t zmax(size_t a, size_t b) { return a > b ? a : b; }
static inline size_t zmin(size_t a, size_t b) { return a < b ? a : b; }

// Overflow-checked size arithmetic: on overflow *bad is set and the result is meaningless.
static inline size_t smul(int * bad, size_t a, size_t b) {
    size_t r;
    if (__builtin_mul_overflow(a, b, &r)) { *bad = 1; return 0; }
    return r;
}
static inline size_t sadd(int * bad, size_t a, size_t b) {
    size_t r;
    if (__builtin_add_overflow(a, b, &r)) { *bad = 1; return 0; }
    return r;
}
// Reserves n floats (rounded up to whole cache lines) at *top; returns the region offset.
static inline size_t sreserve(int * bad, size_t * top, size_t n) {
    size_t at = *top;
    *top = round_up(sadd(bad, sadd(bad, *top, n), CV_ALIGN - 1), CV_ALIGN);
    return at;
}


// K chunk for M padded rows: the packed chunk (Mp x kc) should stay within CV_L2_FLOATS.
// Chunks are balanced (kc = ceil(K / nchunks)).
static inline int k_chunk(size_t K, size_t Mp, size_t limit) {
    size_t per = zmax(limit / zmax(Mp, 1), 32);
    size_t n = (K + per - 1) / per;
    return (int)((K + n - 1) / n);
}

static inline float * align_floats(float * w) {
    uintptr_t u = (uintptr_t)w, a = CV_ALIGN * sizeof(float);
    return (float *)((u + a - 1) / a * a);
}

// Static contiguous chunk [*n0, *n1) of the N images for thread tid of nt: the first
// N % nt threads take one extra image; threads past N get an empty chunk.
static inline void batch_chunk(int * n0, int * n1, int N, int tid, int nt) {
    size_t a, b;
    kd_split((size_t)N, tid, nt, &a, &b);
    *n0 = (int)a;
    *n1 = (int)b;
}

#endif
