// Layer kernels (forward/backward) over raw float pointers, in the spirit of llm.c.
//
// Dimension names used throughout:
//   N   batch size
//   C   input channels (or input features for linear), OC output channels / features
//   H,W input height/width, OH,OW output height/width, HW = H*W, OHW = OH*OW
//   K   (square) kernel size, S stride, P zero padding, G groups
//   Cg = C/G and OCg = OC/G channels per group, CKK = Cg*K*K (one im2col column)
//
// Conventions (see layers.h): tensors are NCHW, C-contiguous; backward kernels accumulate
// (+=) into every gradient they are given and skip the NULL ones; nothing here allocates.
//
// Threading: a kernel is either BLAS-threaded (the linear layer when it runs on OpenBLAS:
// cblas_sgemm called outside any OpenMP region, so the OpenMP build of OpenBLAS uses all
// threads) or OpenMP-threaded over the dimension it writes (convolutions, and the linear
// layer's own product, use our micro-kernels). Every reduction runs in an order fixed by the
// data layout (and, for OpenBLAS and conv weight gradients, by the thread count), so results
// are deterministic for a given thread count. Deterministic mode (kd_get_deterministic)
// removes the thread-dependent splits: linear layers run on the own product, conv weight
// gradients reduce fixed batch chunks -- results independent of the count.
//
// SIMD: the file is compiled for x86-64-v3 (AVX2/FMA). The hot kernels also have AVX-512
// versions (__attribute__((target("avx512f")))) and the conv micro-kernels AVX2 ones,
// chosen at run time (simd_level: the CPU, KDCORE_ISA or kd_set_isa), that perform the same
// float operations in the same order as their portable twins: results do not depend on
// the instruction set (the C tests compare them bitwise). Only the linear layers' engine
// choice follows it (linear_engine), and with it their rounding.
#include "layers.h"
#include "kd_internal.h"

#include <cblas.h>
#include <limits.h>
#include <pthread.h>
#include <strings.h>
#include <stddef.h>

#ifndef _OPENMP
// NO_OMP builds: the omp pragmas below are plain no-ops; keep -Wall quiet about them.
#pragma GCC diagnostic ignored "-Wunknown-pragmas"
#endif

// Elementwise loops below this size are not worth waking the thread team for.
#define KD_PAR_MIN 32768

// Number of threads in the current team (1 outside a parallel region or without OpenMP).

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
static double sum_f64(const float * x, size_t n) {
    double acc[8] = {0}, tail = 0.0;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        for (int j = 0; j < 8; j++) { acc[j] += (double)x[i + j]; }
    }
    for (; i < n; i++) { tail += (double)x[i]; }
    return lanes_sum(acc) + tail;
}

// sum(x[i*S] * y[i]); the S == 1 case uses the lanes.
static double dot_gather_f64(const float * x, const float * y, int n, int S) {
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

// ----------------------------------------------------------------------------------------
// conv2d
// https://pytorch.org/docs/stable/generated/torch.nn.Conv2d.html
// PyTorch's Conv2d is a cross-correlation: out[oc,oh,ow] = b[oc] +
//   sum_{c,kh,kw} w[oc,c,kh,kw] * inp[c, oh*S-P+kh, ow*S-P+kw].
//
// Design (implicit GEMM with our own micro-kernels; no BLAS call):
// - The batch is split across OpenMP threads in contiguous chunks and every image is done
//   by one thread in L2-sized per-thread buffers. Each output and input-gradient element is
//   one fma chain in a fixed order, so forward and dinp do not depend on the thread count.
// - Forward-type products C (M, pixels) = A (M, K) B (K, pixels) run an MR x NR = 8 x 32
//   micro-kernel over weights packed once per call, K in chunks so that the packed chunk
//   stays in L2 (a chunk continues the chains of the previous one: same bits).
// - "shift" path (stride 1, P <= K-1): the image is copied into a zero-padded buffer
//   (C, Hp, Wp). On the padded grid p = oh*Wp + ow, im2col row (c, kh, kw) is the slice
//   xpad[c*Hp*Wp + kh*Wp + kw + p], so the kernel reads it through a table of row offsets
//   and im2col is never built. The Wp - OW grid columns per row outside the output are
//   computed and dropped. The input gradient of a stride-1 conv is a stride-1 conv of the
//   padded dout with the flipped, transposed weights: same path, no col2im.
// - "col" path (other strides, and small maps where the dropped columns would cost more
//   than packing): im2col of a group of images side by side, built one K chunk at a time
//   so it stays in L2; dinp through dcol = W^T dout (in row chunks) and col2im.
// - Weight gradients dW (OC, CKK) += D (OC, pixels) B^T run a 4 x 6 tile of 16-lane dot
//   products (lane = pixel mod 16) reduced by a fixed tree, per image or image group, into
//   a per-thread partial; partials are added in thread order. So dW depends on the thread
//   count only through rounding.
// - Kernels: AVX-512 (runtime check) and portable C that performs exactly the same float
//   operations in the same order (bitwise equal; the C tests compare them).
// Depthwise convs (one input and one output channel per group) use direct loops.

#define CV_MR 8      // rows (output channels) of a forward micro-tile
#define CV_NR 32     // pixels of a forward micro-tile
#define DW_MR 4      // dout rows of a weight-gradient tile
#define DW_NR 6      // im2col rows of a weight-gradient tile
#define DW_L 16      // lanes of the weight-gradient dot products
#define CV_ALIGN 16  // floats (64 bytes): every workspace region starts on a cache line
#define CV_L2_FLOATS 65536   // target size of a packed weight chunk or an im2col chunk (256 KB)
#define CV_GROUP_PIX 256     // col path: pixels of an image group to aim for

// ---- dispatch and test hooks ---------------------------------------------------------------
// Instruction set of the kernels (enum kd_isa; kdcore.h says how it is chosen). Decided once,
// at the first kernel call or query, under a mutex; afterwards read with one atomic load per
// kernel call. kd_set_isa may switch it later: every kernel reads it once per call, and no
// workspace size depends on it, so a switch while a call runs is memory-safe.
enum isa_source {
    ISA_SRC_AUTO,      // KDCORE_ISA unset or empty
    ISA_SRC_ENV,       // KDCORE_ISA honoured (auto included)
    ISA_SRC_REFUSED,   // KDCORE_ISA refused: automatic choice
    ISA_SRC_SET,       // kd_set_isa
};

static pthread_mutex_t isa_lock = PTHREAD_MUTEX_INITIALIZER;
static int isa_ready = 0;                 // acquire/release: the fields below are set
static int isa_level = KD_ISA_PORTABLE;   // in use (relaxed atomic: kd_set_isa changes it)
static int isa_source = ISA_SRC_AUTO;     // how it was chosen (relaxed atomic)
static int isa_best = KD_ISA_PORTABLE;    // best the CPU supports (set once)
static int isa_cap = KD_ISA_COUNT;        // test hook: pretend the CPU stops at this level
static char isa_env[40];                  // KDCORE_ISA as read (set once, truncated)
static char isa_refusal[200];             // why it was refused (set once)

static int isa_cpu_best(void) {
    int l = KD_ISA_PORTABLE;
#if defined(__x86_64__) && defined(__GNUC__)
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) { l = KD_ISA_AVX2; }
    if (l == KD_ISA_AVX2 && __builtin_cpu_supports("avx512f")) { l = KD_ISA_AVX512; }
#endif
    return l < isa_cap ? l : isa_cap;
}

// "avx512 avx2 portable": the instruction sets up to `best`, best first.
static void isa_list(char * buf, size_t n, int best, const char * sep) {
    buf[0] = '\0';
    for (int l = best; l >= KD_ISA_PORTABLE; l--) {
        size_t u = strlen(buf);
        snprintf(buf + u, n - u, "%s%s", l == best ? "" : sep, kd_isa_name((enum kd_isa)l));
    }
}

// Called with isa_lock held.
static void isa_resolve_locked(void) {
    if (__atomic_load_n(&isa_ready, __ATOMIC_ACQUIRE)) return;
    isa_best = isa_cpu_best();
    int level = isa_best, source = ISA_SRC_AUTO;
    isa_env[0] = isa_refusal[0] = '\0';
    const char * e = getenv("KDCORE_ISA");
    if (e != NULL && e[0] != '\0') {
        snprintf(isa_env, sizeof isa_env, "%s", e);
        int want = -1;
        for (int l = 0; l < KD_ISA_COUNT; l++) {
            if (strcasecmp(e, kd_isa_name((enum kd_isa)l)) == 0) { want = l; }
        }
        char have[64];
        isa_list(have, sizeof have, isa_best, ", ");
        if (want < 0) {
            snprintf(isa_refusal, sizeof isa_refusal, "KDCORE_ISA=%s is not one of auto, avx512, avx2, portable", isa_env);
            source = ISA_SRC_REFUSED;
        } else if (want > isa_best) {
            snprintf(isa_refusal, sizeof isa_refusal, "KDCORE_ISA=%s: this CPU does not support %s (it supports %s)",
                     isa_env, kd_isa_name((enum kd_isa)want), have);
            source = ISA_SRC_REFUSED;
        } else {
            level = want == KD_ISA_AUTO ? isa_best : want;
            source = ISA_SRC_ENV;
        }
    }
    __atomic_store_n(&isa_level, level, __ATOMIC_RELAXED);
    __atomic_store_n(&isa_source, source, __ATOMIC_RELAXED);
    __atomic_store_n(&isa_ready, 1, __ATOMIC_RELEASE);
}

static void isa_resolve(void) {
    if (__atomic_load_n(&isa_ready, __ATOMIC_ACQUIRE)) return;
    pthread_mutex_lock(&isa_lock);
    isa_resolve_locked();
    pthread_mutex_unlock(&isa_lock);
}

static inline int simd_level(void) {
    isa_resolve();
    return __atomic_load_n(&isa_level, __ATOMIC_RELAXED);
}

// Test hook (declared in the C tests, not in a header): forget the choice, so that the next
// use decides again from KDCORE_ISA, with the CPU's support capped at `cap` (KD_ISA_COUNT:
// no cap) -- how the tests see a refusal on a CPU that has every instruction set. Only
// while no kernel runs.
void kd_isa_test_reset(int cap);
void kd_isa_test_reset(int cap) {
    pthread_mutex_lock(&isa_lock);
    isa_cap = cap;
    __atomic_store_n(&isa_ready, 0, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&isa_lock);
}

const char * kd_isa_name(enum kd_isa isa) {
    switch (isa) {
    case KD_ISA_AUTO:     return "auto";
    case KD_ISA_PORTABLE: return "portable";
    case KD_ISA_AVX2:     return "avx2";
    case KD_ISA_AVX512:   return "avx512";
    case KD_ISA_COUNT:    break;
    }
    return NULL;
}

bool kd_isa_supported(enum kd_isa isa) {
    isa_resolve();
    return (int)isa >= KD_ISA_AUTO && (int)isa <= isa_best;
}

enum kd_status kd_isa_init(void) {
    isa_resolve();
    if (isa_refusal[0] != '\0') { KD_FAIL(KD_ERR_VALUE, "%s", isa_refusal); }
    return KD_OK;
}

enum kd_status kd_set_isa(enum kd_isa isa) {
    isa_resolve();
    if ((int)isa < KD_ISA_AUTO || (int)isa >= KD_ISA_COUNT) { KD_FAIL(KD_ERR_VALUE, "isa %d is not an enum kd_isa value", (int)isa); }
    if ((int)isa > isa_best) {
        char have[64];
        isa_list(have, sizeof have, isa_best, ", ");
        KD_FAIL(KD_ERR_VALUE, "this CPU does not support %s (it supports %s)", kd_isa_name(isa), have);
    }
    pthread_mutex_lock(&isa_lock);
    __atomic_store_n(&isa_level, isa == KD_ISA_AUTO ? isa_best : (int)isa, __ATOMIC_RELAXED);
    __atomic_store_n(&isa_source, ISA_SRC_SET, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&isa_lock);
    return KD_OK;
}

enum kd_isa kd_get_isa(void) { return (enum kd_isa)simd_level(); }

const char * kd_isa_config(void) {
    static _Thread_local char buf[384];
    int level = simd_level(), source = __atomic_load_n(&isa_source, __ATOMIC_RELAXED);
    char have[64];
    isa_list(have, sizeof have, isa_best, " ");
    const char * name = kd_isa_name((enum kd_isa)level);
    switch (source) {
    case ISA_SRC_ENV:
        snprintf(buf, sizeof buf, "%s (KDCORE_ISA=%s; CPU supports %s)", name, isa_env, have); break;
    case ISA_SRC_REFUSED:
        snprintf(buf, sizeof buf, "%s (automatic; refused: %s)", name, isa_refusal); break;
    case ISA_SRC_SET:
        snprintf(buf, sizeof buf, "%s (kd_set_isa; CPU supports %s)", name, have); break;
    default:
        snprintf(buf, sizeof buf, "%s (automatic: KDCORE_ISA unset; CPU supports %s)", name, have); break;
    }
    return buf;
}

// Conv path hook for the C tests and benchmarks: 0 automatic, 1 shift, 2 col.
static int kd_path_forced = 0;
void kd_conv_force_path(int path);
void kd_conv_force_path(int path) { __atomic_store_n(&kd_path_forced, path, __ATOMIC_RELAXED); }

// ---- micro-kernels: portable C ------------------------------------------------------------
// C (8 x 32, row stride ldc) {=, +=} sum_k A[k*8 + i] * B[off[k] + j]: per element one fma
// chain over k in order, starting from 0 or (acc) from the value in C.
static void fwd_ukr_c(int K, const float * restrict A, const float * restrict B,
                      const ptrdiff_t * restrict off, float * restrict C, size_t ldc, int acc_in) {
    float acc[CV_MR][CV_NR];
    for (int i = 0; i < CV_MR; i++) {
        if (acc_in) { memcpy(acc[i], C + (size_t)i * ldc, sizeof acc[i]); }
        else { memset(acc[i], 0, sizeof acc[i]); }
    }
    for (int k = 0; k < K; k++) {
        const float * b = B + off[k];
        const float * a = A + (size_t)k * CV_MR;
        for (int i = 0; i < CV_MR; i++) {
            for (int j = 0; j < CV_NR; j++) { acc[i][j] = fmaf(a[i], b[j], acc[i][j]); }
        }
    }
    for (int i = 0; i < CV_MR; i++) { memcpy(C + (size_t)i * ldc, acc[i], sizeof acc[i]); }
}

// Sum of 16 lanes by a fixed tree: l + l+8, then + l+4, then + l+2, then lane 0 + lane 1.
static inline float hsum16_c(const float * v) {
    float s8[8], s4[4], s2[2];
    for (int l = 0; l < 8; l++) { s8[l] = v[l] + v[l + 8]; }
    for (int l = 0; l < 4; l++) { s4[l] = s8[l] + s8[l + 4]; }
    for (int l = 0; l < 2; l++) { s2[l] = s4[l] + s4[l + 2]; }
    return s2[0] + s2[1];
}

// r[i*6 + j] = sum over images m < nimg and pixels p < nblk*16 of
// d[i][m*ds + p] * b[j][m*bs + p]: lane p%16 accumulates its pixels in order (image by
// image) with fma, then the lanes are summed by hsum16.
static void dw_ukr_c(int nimg, size_t nblk, const float * const * d, size_t ds, const float * const * b,
                     size_t bs, float * r) {
    float acc[DW_MR][DW_NR][DW_L];
    memset(acc, 0, sizeof acc);
    for (int m = 0; m < nimg; m++) {
        for (size_t q = 0; q < nblk * DW_L; q += DW_L) {
            for (int i = 0; i < DW_MR; i++) {
                const float * x = d[i] + m * ds + q;
                for (int j = 0; j < DW_NR; j++) {
                    const float * y = b[j] + m * bs + q;
                    for (int l = 0; l < DW_L; l++) { acc[i][j][l] = fmaf(x[l], y[l], acc[i][j][l]); }
                }
            }
        }
    }
    for (int i = 0; i < DW_MR; i++) {
        for (int j = 0; j < DW_NR; j++) { r[i * DW_NR + j] = hsum16_c(acc[i][j]); }
    }
}

// ---- micro-kernels: AVX-512 ---------------------------------------------------------------
#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define KD_HAVE_AVX512_KERNELS 1

__attribute__((target("avx512f")))
static void fwd_ukr_avx512(int K, const float * restrict A, const float * restrict B,
                           const ptrdiff_t * restrict off, float * restrict C, size_t ldc, int acc_in) {
    __m512 c0a, c0b, c1a, c1b, c2a, c2b, c3a, c3b, c4a, c4b, c5a, c5b, c6a, c6b, c7a, c7b;
#define KD_LD(i, ca, cb) ca = _mm512_loadu_ps(C + (size_t)(i) * ldc); cb = _mm512_loadu_ps(C + (size_t)(i) * ldc + 16);
#define KD_Z(i, ca, cb) ca = _mm512_setzero_ps(); cb = _mm512_setzero_ps();
    if (acc_in) {
        KD_LD(0, c0a, c0b) KD_LD(1, c1a, c1b) KD_LD(2, c2a, c2b) KD_LD(3, c3a, c3b)
        KD_LD(4, c4a, c4b) KD_LD(5, c5a, c5b) KD_LD(6, c6a, c6b) KD_LD(7, c7a, c7b)
    } else {
        KD_Z(0, c0a, c0b) KD_Z(1, c1a, c1b) KD_Z(2, c2a, c2b) KD_Z(3, c3a, c3b)
        KD_Z(4, c4a, c4b) KD_Z(5, c5a, c5b) KD_Z(6, c6a, c6b) KD_Z(7, c7a, c7b)
    }
#undef KD_LD
#undef KD_Z
    for (int k = 0; k < K; k++) {
        const float * b = B + off[k];
        const float * a = A + (size_t)k * CV_MR;
        __m512 b0 = _mm512_loadu_ps(b), b1 = _mm512_loadu_ps(b + 16), t;
#define KD_ROW(i, ca, cb) t = _mm512_set1_ps(a[i]); ca = _mm512_fmadd_ps(t, b0, ca); cb = _mm512_fmadd_ps(t, b1, cb);
        KD_ROW(0, c0a, c0b) KD_ROW(1, c1a, c1b) KD_ROW(2, c2a, c2b) KD_ROW(3, c3a, c3b)
        KD_ROW(4, c4a, c4b) KD_ROW(5, c5a, c5b) KD_ROW(6, c6a, c6b) KD_ROW(7, c7a, c7b)
#undef KD_ROW
    }
#define KD_ST(i, ca, cb) _mm512_storeu_ps(C + (size_t)(i) * ldc, ca); _mm512_storeu_ps(C + (size_t)(i) * ldc + 16, cb);
    KD_ST(0, c0a, c0b) KD_ST(1, c1a, c1b) KD_ST(2, c2a, c2b) KD_ST(3, c3a, c3b)
    KD_ST(4, c4a, c4b) KD_ST(5, c5a, c5b) KD_ST(6, c6a, c6b) KD_ST(7, c7a, c7b)
#undef KD_ST
}

// The same tree as hsum16_c.
__attribute__((target("avx512f")))
static inline float hsum16_avx512(__m512 v) {
    __m256 lo = _mm512_castps512_ps256(v);
    __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
    __m256 s8 = _mm256_add_ps(lo, hi);
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

__attribute__((target("avx512f")))
static void dw_ukr_avx512(int nimg, size_t nblk, const float * const * d, size_t ds, const float * const * b,
                          size_t bs, float * r) {
    __m512 acc[DW_MR][DW_NR];
    for (int i = 0; i < DW_MR; i++) {
        for (int j = 0; j < DW_NR; j++) { acc[i][j] = _mm512_setzero_ps(); }
    }
    for (int m = 0; m < nimg; m++) {
    const float * d0 = d[0] + m * ds, * d1 = d[1] + m * ds, * d2 = d[2] + m * ds, * d3 = d[3] + m * ds;
    const float * b0 = b[0] + m * bs, * b1 = b[1] + m * bs, * b2 = b[2] + m * bs, * b3 = b[3] + m * bs;
    const float * b4 = b[4] + m * bs, * b5 = b[5] + m * bs;
    for (size_t q = 0; q < nblk * DW_L; q += DW_L) {
        __m512 x0 = _mm512_loadu_ps(d0 + q), x1 = _mm512_loadu_ps(d1 + q);
        __m512 x2 = _mm512_loadu_ps(d2 + q), x3 = _mm512_loadu_ps(d3 + q), y;
        // The empty asm keeps y in a register: otherwise the compiler folds the load into
        // all four fmas (28 loads per 24 fmas, bound by the load ports).
#define KD_COL(j, bp) y = _mm512_loadu_ps(bp + q); __asm__("" : "+v"(y));                  \
        acc[0][j] = _mm512_fmadd_ps(x0, y, acc[0][j]); acc[1][j] = _mm512_fmadd_ps(x1, y, acc[1][j]); \
        acc[2][j] = _mm512_fmadd_ps(x2, y, acc[2][j]); acc[3][j] = _mm512_fmadd_ps(x3, y, acc[3][j]);
        KD_COL(0, b0) KD_COL(1, b1) KD_COL(2, b2) KD_COL(3, b3) KD_COL(4, b4) KD_COL(5, b5)
#undef KD_COL
    }
    }
    for (int i = 0; i < DW_MR; i++) {
        for (int j = 0; j < DW_NR; j++) { r[i * DW_NR + j] = hsum16_avx512(acc[i][j]); }
    }
}
#endif

#if defined(__x86_64__) && defined(__GNUC__)
// ---- micro-kernels: AVX2 (for CPUs without AVX-512) ----------------------------------------
// Same products and order as the portable C kernels, in sub-tiles that fit 16 ymm registers.

// Rows i0 .. i0+R-1 (R = 3 or 2) across all 32 columns of the 8 x 32 tile: 4R ymm
// accumulators (12 for R = 3, as a Haswell-class sgemm keeps), the R broadcasts of A held
// in registers while the 4 B vectors stream through one register each: 12 + 3 + 1 = 16 ymm.
// Per k: R broadcasts + 4 B loads for 4R fmas; the tile is three passes over K (3 + 3 + 2
// rows) instead of four 4 x 16 passes with 8 accumulators. Named variables, not arrays:
// with arrays GCC stored every accumulator to the stack on each k. The empty asm keeps each
// B vector in a register (as in dw_ukr_avx512): with -mtune=znver4 GCC folded the load into
// all R fmas that use it.
#define KD_LD(i, c0, c1, c2, c3)                                                                      \
    if (acc_in) { const float * p_ = C + (size_t)(i0 + (i)) * ldc;                                  \
                  c0 = _mm256_loadu_ps(p_); c1 = _mm256_loadu_ps(p_ + 8);                            \
                  c2 = _mm256_loadu_ps(p_ + 16); c3 = _mm256_loadu_ps(p_ + 24); }                    \
    else { c0 = _mm256_setzero_ps(); c1 = c0; c2 = c0; c3 = c0; }
#define KD_ST(i, c0, c1, c2, c3)                                                                      \
    { float * p_ = C + (size_t)(i0 + (i)) * ldc;                                                      \
      _mm256_storeu_ps(p_, c0); _mm256_storeu_ps(p_ + 8, c1);                                         \
      _mm256_storeu_ps(p_ + 16, c2); _mm256_storeu_ps(p_ + 24, c3); }

__attribute__((target("avx2,fma"), always_inline))
static inline void fwd_rows3_avx2(int K, const float * restrict A, const float * restrict B,
                                  const ptrdiff_t * restrict off, float * restrict C, size_t ldc, int acc_in, int i0) {
    __m256 c00, c01, c02, c03, c10, c11, c12, c13, c20, c21, c22, c23;
    KD_LD(0, c00, c01, c02, c03) KD_LD(1, c10, c11, c12, c13) KD_LD(2, c20, c21, c22, c23)
    for (int k = 0; k < K; k++) {
        const float * b = B + off[k];
        const float * a = A + (size_t)k * CV_MR + i0;
        const __m256 t0 = _mm256_broadcast_ss(a), t1 = _mm256_broadcast_ss(a + 1), t2 = _mm256_broadcast_ss(a + 2);
        __m256 v;
#define KD_COL(h, x0, x1, x2) v = _mm256_loadu_ps(b + 8 * (h)); __asm__("" : "+x"(v));                \
        x0 = _mm256_fmadd_ps(t0, v, x0); x1 = _mm256_fmadd_ps(t1, v, x1); x2 = _mm256_fmadd_ps(t2, v, x2);
        KD_COL(0, c00, c10, c20) KD_COL(1, c01, c11, c21) KD_COL(2, c02, c12, c22) KD_COL(3, c03, c13, c23)
#undef KD_COL
    }
    KD_ST(0, c00, c01, c02, c03) KD_ST(1, c10, c11, c12, c13) KD_ST(2, c20, c21, c22, c23)
}

__attribute__((target("avx2,fma"), always_inline))
static inline void fwd_rows2_avx2(int K, const float * restrict A, const float * restrict B,
                                  const ptrdiff_t * restrict off, float * restrict C, size_t ldc, int acc_in, int i0) {
    __m256 c00, c01, c02, c03, c10, c11, c12, c13;
    KD_LD(0, c00, c01, c02, c03) KD_LD(1, c10, c11, c12, c13)
    for (int k = 0; k < K; k++) {
        const float * b = B + off[k];
        const float * a = A + (size_t)k * CV_MR + i0;
        const __m256 t0 = _mm256_broadcast_ss(a), t1 = _mm256_broadcast_ss(a + 1);
        __m256 v;
#define KD_COL(h, x0, x1) v = _mm256_loadu_ps(b + 8 * (h)); __asm__("" : "+x"(v));                   \
        x0 = _mm256_fmadd_ps(t0, v, x0); x1 = _mm256_fmadd_ps(t1, v, x1);
        KD_COL(0, c00, c10) KD_COL(1, c01, c11) KD_COL(2, c02, c12) KD_COL(3, c03, c13)
#undef KD_COL
    }
    KD_ST(0, c00, c01, c02, c03) KD_ST(1, c10, c11, c12, c13)
}
#undef KD_LD
#undef KD_ST

__attribute__((target("avx2,fma")))
static void fwd_ukr_avx2(int K, const float * restrict A, const float * restrict B,
                         const ptrdiff_t * restrict off, float * restrict C, size_t ldc, int acc_in) {
    fwd_rows3_avx2(K, A, B, off, C, ldc, acc_in, 0);
    fwd_rows3_avx2(K, A, B, off, C, ldc, acc_in, 3);
    fwd_rows2_avx2(K, A, B, off, C, ldc, acc_in, 6);
}

// The hsum16 tree on lanes 0-7 (lo) and 8-15 (hi).
__attribute__((target("avx2,fma")))
static inline float hsum16_avx2(__m256 lo, __m256 hi) {
    __m256 s8 = _mm256_add_ps(lo, hi);
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)));
}

// The 4 x 6 tile as 2 x 6 sub-tiles, one half of the 16 lanes at a time (12 ymm
// accumulators, 8 loads per 12 fmas); the halves meet in the hsum16 tree.
__attribute__((target("avx2,fma")))
static void dw_ukr_avx2(int nimg, size_t nblk, const float * const * d, size_t ds, const float * const * b,
                        size_t bs, float * r) {
    for (int i0 = 0; i0 < DW_MR; i0 += 2) {
        __m256 part[2][2][DW_NR];
        for (int h = 0; h < 2; h++) {
            __m256 acc[2][DW_NR];
            for (int i = 0; i < 2; i++) {
                for (int j = 0; j < DW_NR; j++) { acc[i][j] = _mm256_setzero_ps(); }
            }
            for (int m = 0; m < nimg; m++) {
                const float * x0 = d[i0] + m * ds + 8 * h, * x1 = d[i0 + 1] + m * ds + 8 * h;
                const float * y[DW_NR];
                for (int j = 0; j < DW_NR; j++) { y[j] = b[j] + m * bs + 8 * h; }
                for (size_t q = 0; q < nblk * DW_L; q += DW_L) {
                    __m256 u0 = _mm256_loadu_ps(x0 + q), u1 = _mm256_loadu_ps(x1 + q);
                    for (int j = 0; j < DW_NR; j++) {
                        __m256 v = _mm256_loadu_ps(y[j] + q);
                        acc[0][j] = _mm256_fmadd_ps(u0, v, acc[0][j]);
                        acc[1][j] = _mm256_fmadd_ps(u1, v, acc[1][j]);
                    }
                }
            }
            for (int i = 0; i < 2; i++) {
                for (int j = 0; j < DW_NR; j++) { part[h][i][j] = acc[i][j]; }
            }
        }
        for (int i = 0; i < 2; i++) {
            for (int j = 0; j < DW_NR; j++) { r[(i0 + i) * DW_NR + j] = hsum16_avx2(part[0][i][j], part[1][i][j]); }
        }
    }
}
#endif

typedef void (*fwd_ukr_fn)(int, const float *, const float *, const ptrdiff_t *, float *, size_t, int);
typedef void (*dw_ukr_fn)(int, size_t, const float * const *, size_t, const float * const *, size_t, float *);
struct conv_kernels { fwd_ukr_fn fwd; dw_ukr_fn dw; };

static struct conv_kernels conv_kernels(void) {
    struct conv_kernels k = { fwd_ukr_c, dw_ukr_c };
#ifdef KD_HAVE_AVX512_KERNELS
    int l = simd_level();
    if (l == KD_ISA_AVX512) { k.fwd = fwd_ukr_avx512; k.dw = dw_ukr_avx512; }
    if (l == KD_ISA_AVX2) { k.fwd = fwd_ukr_avx2; k.dw = dw_ukr_avx2; }
#endif
    return k;
}

// ---- plan: path, blocking and workspace layout ---------------------------------------------

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
static int k_chunk(size_t K, size_t Mp, size_t limit) {
    size_t per = zmax(limit / zmax(Mp, 1), 32);
    size_t n = (K + per - 1) / per;
    return (int)((K + n - 1) / n);
}

enum { CONV_SHIFT = 1, CONV_COL = 2 };

struct conv_plan {
    int path;
    int Cg, OCg, KK, CKK;
    int kc;                     // K chunk of the forward product
    int kct;                    // shift: K chunk of the input-gradient product (OCg*KK)
    int mc;                     // col: dcol rows per pass (multiple of 8)
    int gi;                     // images per group (col: side by side; shift: backward only)
    size_t xs, zs;              // shift: image strides in the padded-image and dout buffers
    int Hp, Wp;                 // shift: padded input
    size_t plane;               // shift: Hp*Wp
    int Pt, Hq, Wq;             // shift: input-gradient conv: padding K-1-P, padded dout
    size_t qplane, grid2, ld2;  // shift: Hq*Wq, pixels H*Wq of its grid, row stride
    size_t grid;                // pixels of one image's output grid (OH*Wp, or OH*OW)
    size_t ld;                  // row stride of the staging, dout-grid and col buffers
    size_t a_off, o_off, shared;                           // shared: packed weights, offsets
    size_t x_off, q_off, z_off, t_off, w_off, b_off, per;  // per thread
    size_t x_n, q_n, z_n;
};

// Everything is sized for both directions: one workspace serves forward and backward.
static int conv_plan_make(const struct kd_conv_shape * s, struct conv_plan * p) {
    int bad = 0;
    memset(p, 0, sizeof *p);
    p->Cg = s->C / s->G;
    p->OCg = s->OC / s->G;
    size_t kk = smul(&bad, (size_t)s->K, (size_t)s->K);
    size_t ckk = smul(&bad, (size_t)p->Cg, kk);
    size_t ockk = smul(&bad, (size_t)p->OCg, kk);
    if (bad || ckk > INT_MAX / 2 || ockk > INT_MAX / 2) { return 0; }
    p->KK = (int)kk;
    p->CKK = (int)ckk;
    size_t OH = (size_t)s->OH, OW = (size_t)s->OW, H = (size_t)s->H, W = (size_t)s->W;
    size_t OHW = smul(&bad, OH, OW);
    size_t ocp = round_up((size_t)p->OCg, CV_MR), cp = round_up((size_t)p->Cg, CV_MR);
    size_t ckkp = round_up(ckk, CV_MR);

    // Path. Shift needs stride 1 and an input-gradient padding K-1-P >= 0. It computes
    // OH*Wp grid pixels (rounded up to panels) per OH*OW outputs; col computes almost only
    // outputs but packs im2col (and scatters dcol back), which costs about as much as ~24
    // multiply-adds per element (each element feeds OCg of them): the cheaper one wins.
    // Calibrated on the zoo shapes (benchmarks/bench_kernels.c): shift for 28x28 and 14x14
    // maps and for 7x7 with 64 channels, col for 7x7 with 128 or 256 channels (15-40%
    // faster there).
    int shift_ok = s->S == 1 && s->P <= s->K - 1;
    size_t wp = W + 2 * (size_t)s->P;
    size_t sgrid = smul(&bad, OH, wp);
    // col: images per group so that the group fills its panels well
    size_t gi = 1;
    if (OHW < CV_GROUP_PIX) {
        double best = 0;
        size_t gmax = zmax(1, zmin((size_t)s->N, 2 * CV_GROUP_PIX / zmax(OHW, 1)));
        for (size_t g = 1; g <= gmax; g++) {
            double e = (double)(g * OHW) / (double)round_up(g * OHW, CV_NR);
            if (e > best + 0.02) { best = e; gi = g; }
        }
    }
    int path = CONV_COL;
    if (shift_ok) {
        double shift_cost = (double)round_up(sgrid, CV_NR) / (double)OHW;
        double col_cost = (double)round_up(gi * OHW, CV_NR) / (double)(gi * OHW) + 24.0 / (double)p->OCg;
        path = shift_cost <= col_cost ? CONV_SHIFT : CONV_COL;
    }
    int forced = __atomic_load_n(&kd_path_forced, __ATOMIC_RELAXED);
    if (forced == CONV_COL || (forced == CONV_SHIFT && shift_ok)) { path = forced; }
    p->path = path;

    size_t slack = 0;
    if (path == CONV_SHIFT) {
        size_t hp = H + 2 * (size_t)s->P;
        if (hp > INT_MAX || wp > INT_MAX) { return 0; }
        p->Hp = (int)hp; p->Wp = (int)wp;
        p->plane = smul(&bad, hp, wp);
        p->grid = sgrid;
        p->Pt = s->K - 1 - s->P;
        p->Hq = (int)(OH + 2 * (size_t)p->Pt);
        p->Wq = (int)(OW + 2 * (size_t)p->Pt);
        p->qplane = smul(&bad, (size_t)p->Hq, (size_t)p->Wq);
        p->grid2 = smul(&bad, H, (size_t)p->Wq);
        p->ld2 = round_up(sadd(&bad, p->grid2, CV_NR - 1), CV_NR);
        // The last tap of the last channel reads up to K-1 + NR-1 floats past the plane.
        slack = 2 * CV_NR + 2 * (size_t)s->K;
        // Backward: the weight-gradient lanes run on across a group of images before they
        // are reduced; enough pixels to amortise the reduction, buffers within ~L2.
        size_t ldi = round_up(sadd(&bad, sgrid, CV_NR - 1), CV_NR);
        p->xs = round_up(smul(&bad, (size_t)s->C, p->plane), CV_ALIGN);
        p->zs = smul(&bad, (size_t)s->OC, ldi);
        size_t per_img = sadd(&bad, p->xs, p->zs);
        size_t g = zmin(2 * CV_L2_FLOATS / zmax(per_img, 1), (1024 + sgrid - 1) / zmax(sgrid, 1));
        p->gi = (int)zmax(1, zmin(g, (size_t)s->N));
    } else {
        p->grid = OHW;
        p->gi = (int)gi;
    }
    p->ld = round_up(sadd(&bad, smul(&bad, p->grid, path == CONV_COL ? (size_t)p->gi : 1), CV_NR - 1), CV_NR);
    p->kc = k_chunk(ckk, ocp, CV_L2_FLOATS);
    if (path == CONV_COL) {
        // the im2col chunk (kc x ld) should also stay within the L2 budget
        int kb = k_chunk(ckk, p->ld, CV_L2_FLOATS);
        if (kb < p->kc) { p->kc = kb; }
        p->mc = (int)zmin(ckkp, round_up(zmax(CV_L2_FLOATS / p->ld, CV_MR), CV_MR));
    } else {
        p->kct = k_chunk(ockk, cp, CV_L2_FLOATS);
    }
    // shared: packed weights (largest of the layouts) and offset tables
    size_t an = smul(&bad, ocp, ckk);
    size_t an2 = path == CONV_SHIFT ? smul(&bad, cp, ockk) : smul(&bad, ckkp, (size_t)p->OCg);
    an = smul(&bad, zmax(an, an2), (size_t)s->G);
    size_t top = 0;
    p->a_off = sreserve(&bad, &top, an);
    size_t noff = path == CONV_SHIFT ? sadd(&bad, ckk, ockk) : zmax((size_t)p->kc, (size_t)p->OCg);
    p->o_off = sreserve(&bad, &top, smul(&bad, noff, sizeof(ptrdiff_t) / sizeof(float)));
    p->shared = top;
    // per thread
    top = 0;
    size_t tn = smul(&bad, ocp, p->ld);
    if (path == CONV_SHIFT) {
        p->x_n = sadd(&bad, smul(&bad, (size_t)p->gi, p->xs), slack);       // padded images
        p->q_n = sadd(&bad, smul(&bad, (size_t)s->OC, p->qplane), slack);    // padded dout
        tn = zmax(tn, smul(&bad, cp, p->ld2));
    } else {
        p->x_n = smul(&bad, (size_t)p->kc, p->ld);                           // im2col chunk
        p->q_n = smul(&bad, (size_t)p->mc, p->ld);                           // dcol chunk
    }
    // dout on the output grid, zero elsewhere (shift: one block of OC rows per image)
    p->z_n = smul(&bad, smul(&bad, (size_t)s->OC, p->ld), path == CONV_SHIFT ? (size_t)p->gi : 1);
    p->x_off = sreserve(&bad, &top, p->x_n);
    p->q_off = sreserve(&bad, &top, p->q_n);
    p->z_off = sreserve(&bad, &top, p->z_n);
    p->t_off = sreserve(&bad, &top, tn);
    p->w_off = sreserve(&bad, &top, smul(&bad, (size_t)s->OC, ckk));
    p->b_off = sreserve(&bad, &top, (size_t)s->OC);
    p->per = top;
    return !bad;
}

static inline int conv_is_depthwise(const struct kd_conv_shape * s) {
    return s->G == s->C && s->G == s->OC;
}

size_t kd_conv2d_workspace(const struct kd_conv_shape * s, int nthreads) {
    if (conv_is_depthwise(s)) { return 0; }      // direct loops
    struct conv_plan p;
    if (nthreads < 1) { nthreads = 1; }
    // Deterministic mode: one slot per batch chunk too (kd_conv2d_backward's units).
    if (kd_get_deterministic() && nthreads < KD_DET_CONV_CHUNKS) { nthreads = KD_DET_CONV_CHUNKS; }
    if (!conv_plan_make(s, &p)) { return SIZE_MAX; }
    int bad = 0;
    size_t tot = sadd(&bad, sadd(&bad, p.shared, smul(&bad, p.per, (size_t)nthreads)), CV_ALIGN);
    return bad ? SIZE_MAX : tot;
}

static inline float * align_floats(float * w) {
    uintptr_t u = (uintptr_t)w, a = CV_ALIGN * sizeof(float);
    return (float *)((u + a - 1) / a * a);
}

static void conv_check_shape(const struct kd_conv_shape * s) {
    KD_ASSERT(s->G >= 1 && s->C % s->G == 0 && s->OC % s->G == 0);
    KD_ASSERT(s->K >= 1 && s->S >= 1 && s->P >= 0);
    KD_ASSERT(s->OH == (s->H + 2 * s->P - s->K) / s->S + 1);
    KD_ASSERT(s->OW == (s->W + 2 * s->P - s->K) / s->S + 1);
    (void)s;
}

// Static contiguous chunk [*n0, *n1) of the N images for thread tid of nt: the first
// N % nt threads take one extra image; threads past N get an empty chunk.
static inline void batch_chunk(int * n0, int * n1, int N, int tid, int nt) {
    size_t a, b;
    kd_split((size_t)N, tid, nt, &a, &b);
    *n0 = (int)a;
    *n1 = (int)b;
}

// ----------------------------------------------------------------------------------------
// linear
// https://pytorch.org/docs/stable/generated/torch.nn.Linear.html
// Three products: out = inp W^T (onto the bias), dinp += dout W, dW += dout^T inp. Two
// engines run them (linear_engine):
// - OpenBLAS cblas_sgemm, one top-level call per product, threaded by OpenBLAS. Its split
//   across threads changes which micro-kernel (and so which rounding) some elements get:
//   reproducible for a given thread count, equal only to rounding across counts.
// - kdcore's own product on the conv forward micro-kernel (8 x 32; AVX-512, AVX2 or
//   portable). Used when kdcore's kernels run AVX-512 (kd_get_isa) and OpenBLAS's do not
//   (an AVX2 core, e.g. OPENBLAS_CORETYPE=Haswell on an AVX-512 CPU; there it is ~1.5x
//   faster at the MLP shapes), and always
//   in deterministic mode: every element is one fma chain over k in order, starting from C's
//   value (the bias, or the gradient so far), whichever thread computes its tile -- results
//   do not depend on the thread count, at no cost. C += op(A) op(B) with
//   - op(A) packed once per call into panels of 8 rows ([panel][k][8], zero rows past M);
//   - op(B) read in place when its rows are contiguous (32-column panels at B + 32 j, row k
//     at k*ldb), else (the forward's W^T, and a partial last panel) packed [panel][k][32];
//   - K in chunks whose B panel (kc x 32) stays in L1 while a block of row panels uses it;
//   - tiles of (row-panel block, 32-column panel) shared out by OpenMP; edge tiles (rows
//     past M, columns past Nc) run on a staging tile and copy back what is valid.

enum { LINEAR_AUTO = 0, LINEAR_OWN = 1, LINEAR_BLAS = 2 };
static int kd_linear_forced = LINEAR_AUTO;
void kd_linear_force_engine(int engine);   // test hook: 0 automatic, 1 own, 2 OpenBLAS
void kd_linear_force_engine(int engine) { __atomic_store_n(&kd_linear_forced, engine, __ATOMIC_RELAXED); }

// Does OpenBLAS run AVX-512 sgemm kernels? Its core names for those (0.3.x). The core is
// fixed when OpenBLAS loads: asked once (0 not yet, 1 no, 2 yes).
static bool blas_uses_avx512(void) {
    static int known = 0;
    int k = __atomic_load_n(&known, __ATOMIC_RELAXED);
    if (k == 0) {
        const char * core = openblas_get_corename();
        static const char * const avx512[] = { "skylakex", "cooperlake", "sapphirerapids" };
        k = 1;
        for (size_t i = 0; core != NULL && i < sizeof avx512 / sizeof avx512[0]; i++) {
            if (strcasecmp(core, avx512[i]) == 0) { k = 2; }
        }
        __atomic_store_n(&known, k, __ATOMIC_RELAXED);
    }
    return k == 2;
}

// Follows the instruction set in use (kd_set_isa can change it), so it is decided per call.
static int linear_engine(void) {
    int f = __atomic_load_n(&kd_linear_forced, __ATOMIC_RELAXED);
    if (f != LINEAR_AUTO) return f;
    if (kd_get_deterministic()) return LINEAR_OWN;
    return simd_level() == KD_ISA_AVX512 && !blas_uses_avx512() ? LINEAR_OWN : LINEAR_BLAS;
}

const char * kd_linear_engine_name(void) {
    static _Thread_local char buf[96];
    if (linear_engine() == LINEAR_BLAS) return "OpenBLAS sgemm";
    snprintf(buf, sizeof buf, "kdcore's own product (%s micro-kernel)", kd_isa_name(kd_get_isa()));
    return buf;
}

// Here rather than in status.c: it reports the kernels and the linear engine too.
const char * kd_blas_config(void) {
    static _Thread_local char buf[1024];
    snprintf(buf, sizeof buf, "%s; core=%s; parallel=%s; kdcore OpenMP=%s; kernels: %s; linear layers: %s",
             openblas_get_config(), openblas_get_corename(),
             openblas_get_parallel() == 2 ? "openmp" : openblas_get_parallel() == 1 ? "pthreads" : "none",
#ifdef _OPENMP
             "on"
#else
             "off"
#endif
             , kd_isa_config(), kd_linear_engine_name());
    return buf;
}

#define LN_ROW_BLOCK 8    // row panels (64 rows) per tile: the A chunk they read stays in L2
#define LN_L1_FLOATS 8192 // target floats of a B panel chunk (kc x 32): 32 KB

struct gemm_operand {
    const float * p;  // the matrix
    int ld;           // its row stride
    bool trans;       // op(X) = X^T
};

// Floats of workspace for C (M x Nc) += op(A) (M x K) op(B) (K x Nc): packed A, packed B
// (all of it when transposed, else the partial last panel), two offset tables, alignment.
static size_t gemm_workspace(int M, int Nc, int K, bool trans_b) {
    size_t Kz = (size_t)K;
    size_t a = round_up((size_t)M, CV_MR) * Kz;
    size_t b = trans_b ? round_up((size_t)Nc, CV_NR) * Kz : (size_t)CV_NR * Kz;
    size_t offs = 2 * Kz * (sizeof(ptrdiff_t) / sizeof(float));
    return a + b + offs + 4 * CV_ALIGN;
}

// dst[k * ldd + r] = src[r * lds + k] for r < 8, k < kn <= 8: an 8 x 8 block transposed.
// The packing of row-major operands is all such blocks; scalar, it took most of the time
// of packing W^T (a strided store per float).
static inline void transpose8(float * restrict dst, size_t ldd, const float * restrict src, size_t lds, int kn) {
#ifdef __AVX2__
    if (kn == 8) {
        __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + lds), r2 = _mm256_loadu_ps(src + 2 * lds),
               r3 = _mm256_loadu_ps(src + 3 * lds), r4 = _mm256_loadu_ps(src + 4 * lds), r5 = _mm256_loadu_ps(src + 5 * lds),
               r6 = _mm256_loadu_ps(src + 6 * lds), r7 = _mm256_loadu_ps(src + 7 * lds);
        __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
               t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
               t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
        __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE),
               u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE),
               u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE),
               u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
        _mm256_storeu_ps(dst, _mm256_permute2f128_ps(u0, u4, 0x20));
        _mm256_storeu_ps(dst + ldd, _mm256_permute2f128_ps(u1, u5, 0x20));
        _mm256_storeu_ps(dst + 2 * ldd, _mm256_permute2f128_ps(u2, u6, 0x20));
        _mm256_storeu_ps(dst + 3 * ldd, _mm256_permute2f128_ps(u3, u7, 0x20));
        _mm256_storeu_ps(dst + 4 * ldd, _mm256_permute2f128_ps(u0, u4, 0x31));
        _mm256_storeu_ps(dst + 5 * ldd, _mm256_permute2f128_ps(u1, u5, 0x31));
        _mm256_storeu_ps(dst + 6 * ldd, _mm256_permute2f128_ps(u2, u6, 0x31));
        _mm256_storeu_ps(dst + 7 * ldd, _mm256_permute2f128_ps(u3, u7, 0x31));
        return;
    }
#endif
    for (int r = 0; r < 8; r++) {
        for (int k = 0; k < kn; k++) { dst[(size_t)k * ldd + r] = src[(size_t)r * lds + k]; }
    }
}

// dst[k * ldd + r] = op[r][k] for rows r < rows of a row-major matrix at src (row stride
// lds), k < K; rows rows..7 are zero.
static void pack_rows8(float * dst, size_t ldd, const float * src, size_t lds, int rows, int K) {
    if (rows == 8) {
        for (int k = 0; k < K; k += 8) { transpose8(dst + (size_t)k * ldd, ldd, src + k, lds, imin(8, K - k)); }
        return;
    }
    for (int k = 0; k < K; k++) {
        for (int r = 0; r < 8; r++) { dst[(size_t)k * ldd + r] = r < rows ? src[(size_t)r * lds + k] : 0.0f; }
    }
}

// dst[k * ldd + c] = src[k * lds + c] for c < valid, 0 for valid <= c < width, k < K:
// `width` contiguous floats per k, the ones past `valid` zero.
static void pack_cols(float * dst, size_t ldd, const float * src, size_t lds, int width, int valid, int K) {
    for (int k = 0; k < K; k++) {
        for (int c = 0; c < width; c++) { dst[(size_t)k * ldd + c] = c < valid ? src[(size_t)k * lds + c] : 0.0f; }
    }
}

// op(A) rows [8i, 8i+8) into panel i; rows past M are zero.
static void gemm_pack_a(float * Ap, struct gemm_operand A, int M, int K) {
    int npan = (M + CV_MR - 1) / CV_MR;
    #pragma omp for schedule(static)
    for (int i = 0; i < npan; i++) {
        float * d = Ap + (size_t)i * K * CV_MR;
        int mi = imin(CV_MR, M - i * CV_MR);
        if (A.trans) {   // op(A)[m][k] = A[k][m]: 8 contiguous floats per k
            pack_cols(d, CV_MR, A.p + (size_t)i * CV_MR, (size_t)A.ld, CV_MR, mi, K);
        } else {         // op(A)[m][k] = A[m][k]: 8 rows transposed
            pack_rows8(d, CV_MR, A.p + (size_t)i * CV_MR * A.ld, (size_t)A.ld, mi, K);
        }
    }
}

// op(B) columns [32j, 32j+32) into a [k][32] panel at d; columns past Nc are zero.
static void gemm_pack_b_panel(float * d, struct gemm_operand B, int Nc, int K, int j) {
    int nj = imin(CV_NR, Nc - j * CV_NR);
    if (B.trans) {   // op(B)[k][n] = B[n][k]: four blocks of 8 rows of B transposed
        for (int c0 = 0; c0 < CV_NR; c0 += 8) {
            pack_rows8(d + c0, CV_NR, B.p + (size_t)(j * CV_NR + c0) * B.ld, (size_t)B.ld, imax(0, imin(8, nj - c0)), K);
        }
    } else {         // op(B)[k][n] = B[k][n]
        pack_cols(d, CV_NR, B.p + (size_t)j * CV_NR, (size_t)B.ld, CV_NR, nj, K);
    }
}

// C (M x Nc, row stride ldc) += op(A) op(B), K >= 1. `work` holds gemm_workspace floats.
static void gemm_acc(int M, int Nc, int K, struct gemm_operand A, struct gemm_operand B,
                     float * C, int ldc, float * work) {
    const fwd_ukr_fn ukr = conv_kernels().fwd;
    const int mpan = (M + CV_MR - 1) / CV_MR, npan = (Nc + CV_NR - 1) / CV_NR;
    const int direct = B.trans ? 0 : Nc / CV_NR;   // panels read in place
    const int kc = k_chunk((size_t)K, CV_NR, LN_L1_FLOATS);
    float * ws = align_floats(work);
    float * Ap = ws;
    float * Bp = align_floats(Ap + (size_t)mpan * CV_MR * K);   // panels direct..npan-1
    ptrdiff_t * off_direct = (ptrdiff_t *)align_floats(Bp + (size_t)(npan - direct) * CV_NR * K);
    ptrdiff_t * off_packed = off_direct + K;
    const int nrb = (mpan + LN_ROW_BLOCK - 1) / LN_ROW_BLOCK;
    const long ntiles = (long)nrb * npan;
    const double flops = 2.0 * M * Nc * K;
    #pragma omp parallel if(flops > 4e6)
    {
        gemm_pack_a(Ap, A, M, K);
        #pragma omp for schedule(static) nowait
        for (int j = direct; j < npan; j++) { gemm_pack_b_panel(Bp + (size_t)(j - direct) * CV_NR * K, B, Nc, K, j); }
        #pragma omp for schedule(static)
        for (int k = 0; k < K; k++) { off_direct[k] = (ptrdiff_t)k * B.ld; off_packed[k] = (ptrdiff_t)k * CV_NR; }
        float stage[CV_MR * CV_NR] __attribute__((aligned(64)));
        // Tiles of one column panel are consecutive, so a thread's tiles share B chunks.
        #pragma omp for schedule(static)
        for (long t = 0; t < ntiles; t++) {
            const int j = (int)(t / nrb), rb = (int)(t % nrb);
            const int nj = imin(CV_NR, Nc - j * CV_NR);
            const float * b = j < direct ? B.p + (size_t)j * CV_NR : Bp + (size_t)(j - direct) * CV_NR * K;
            const ptrdiff_t * off = j < direct ? off_direct : off_packed;
            const int i0 = rb * LN_ROW_BLOCK, i1 = imin(mpan, i0 + LN_ROW_BLOCK);
            for (int k0 = 0; k0 < K; k0 += kc) {
                const int kn = imin(kc, K - k0);
                for (int i = i0; i < i1; i++) {
                    const int mi = imin(CV_MR, M - i * CV_MR);
                    const float * a = Ap + ((size_t)i * K + (size_t)k0) * CV_MR;
                    float * c = C + (size_t)i * CV_MR * ldc + (size_t)j * CV_NR;
                    if (mi == CV_MR && nj == CV_NR) { ukr(kn, a, b, off + k0, c, (size_t)ldc, 1); continue; }
                    memset(stage, 0, sizeof stage);
                    for (int r = 0; r < mi; r++) { memcpy(stage + r * CV_NR, c + (size_t)r * ldc, (size_t)nj * sizeof(float)); }
                    ukr(kn, a, b, off + k0, stage, CV_NR, 1);
                    for (int r = 0; r < mi; r++) { memcpy(c + (size_t)r * ldc, stage + r * CV_NR, (size_t)nj * sizeof(float)); }
                }
            }
        }
    }
}

size_t kd_linear_workspace(int N, int C, int OC) {
    size_t f = gemm_workspace(N, OC, C, true);       // out = inp W^T
    size_t d = gemm_workspace(N, C, OC, false);      // dinp += dout W
    size_t w = gemm_workspace(OC, C, N, false);      // dW += dout^T inp
    return zmax(f, zmax(d, w));
}

// out (N,OC), inp (N,C), weight (OC,C), bias (OC) or NULL
void kd_linear_forward(float * out, const float * inp, const float * weight, const float * bias,
                       int N, int C, int OC, float * work) {
    // Start from the bias and accumulate the product onto it, as PyTorch's addmm does.
    for (int n = 0; n < N; n++) {
        if (bias != NULL) { memcpy(out + (size_t)n * OC, bias, (size_t)OC * sizeof(float)); }
        else { memset(out + (size_t)n * OC, 0, (size_t)OC * sizeof(float)); }
    }
    if (C == 0 || N == 0) return;
    if (linear_engine() == LINEAR_BLAS) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, OC, C, 1.0f, inp, C, weight, C, 1.0f, out, OC);
        return;
    }
    gemm_acc(N, OC, C, (struct gemm_operand){ inp, C, false }, (struct gemm_operand){ weight, C, true },
             out, OC, work);
}

// dinp (N,C), dweight (OC,C), dbias (OC), dout (N,OC), inp (N,C), weight (OC,C)
void kd_linear_backward(float * dinp, float * dweight, float * dbias, const float * dout,
                        const float * inp, const float * weight, int N, int C, int OC, float * work) {
    const bool blas = linear_engine() == LINEAR_BLAS;
    if (dinp != NULL && OC > 0 && N > 0 && blas) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, C, OC, 1.0f, dout, OC, weight, C, 1.0f, dinp, C);
    } else if (dinp != NULL && OC > 0) {
        gemm_acc(N, C, OC, (struct gemm_operand){ dout, OC, false }, (struct gemm_operand){ weight, C, false },
                 dinp, C, work);
    }
    if (dweight != NULL && N > 0 && blas) {
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, OC, C, N, 1.0f, dout, OC, inp, C, 1.0f, dweight, C);
    } else if (dweight != NULL && N > 0) {
        gemm_acc(OC, C, N, (struct gemm_operand){ dout, OC, true }, (struct gemm_operand){ inp, C, false },
                 dweight, C, work);
    }
    // dbias += column sums of dout; each thread owns whole columns and sums over N in
    // order, so the result does not depend on the thread count.
    if (dbias != NULL) {
        #pragma omp parallel for schedule(static) if((size_t)N * OC > KD_PAR_MIN)
        for (int oc = 0; oc < OC; oc++) {
            double s = 0.0;
            for (int n = 0; n < N; n++) { s += (double)dout[(size_t)n * OC + oc]; }
            dbias[oc] += (float)s;
        }
    }
}

// ---- packing -------------------------------------------------------------------------------
// Packed A for M rows and K columns: panels of 8 rows, [panel][k][8], zero rows past M.
// Called inside the conv's parallel region: the panels are shared out by an omp for, whose
// closing barrier makes them visible to every thread before use.

// Forward: A_g (OCg, CKK) = the weights as they are.
static void pack_fwd(float * Ap, const float * weight, const struct conv_plan * p, int G) {
    size_t ocp = round_up((size_t)p->OCg, CV_MR), CKK = (size_t)p->CKK, npan = ocp / CV_MR;
    long total = (long)(npan * (size_t)G);
    #pragma omp for schedule(static)
    for (long t = 0; t < total; t++) {
        size_t g = (size_t)t / npan, m0 = (size_t)t % npan * CV_MR;
        const float * w = weight + g * p->OCg * CKK;
        pack_rows8(Ap + g * ocp * CKK + m0 * CKK, CV_MR, w + m0 * CKK, CKK, (int)zmin(CV_MR, (size_t)p->OCg - m0),
                   p->CKK);
    }
}

// Input gradient, shift path: rows c (Cg), columns (oc, kh, kw) of the flipped kernel:
// A[c][(oc*K + kh)*K + kw] = w[oc][c][K-1-kh][K-1-kw].
static void pack_tdinp(float * Ap, const float * weight, const struct conv_plan * p, int G, int K) {
    size_t cp = round_up((size_t)p->Cg, CV_MR), KK = (size_t)p->KK, npan = cp / CV_MR;
    size_t Kt = (size_t)p->OCg * KK, CKK = (size_t)p->CKK;
    long total = (long)(npan * (size_t)G);
    #pragma omp for schedule(static)
    for (long t = 0; t < total; t++) {
        size_t g = (size_t)t / npan, m0 = (size_t)t % npan * CV_MR;
        float * panel = Ap + g * cp * Kt + m0 * Kt;
        const float * w = weight + g * p->OCg * CKK;
        for (size_t oc = 0; oc < (size_t)p->OCg; oc++) {
            for (int kh = 0; kh < K; kh++) {
                for (int kw = 0; kw < K; kw++) {
                    size_t kk = (oc * K + kh) * K + kw;
                    size_t src = (K - 1 - kh) * K + (K - 1 - kw);
                    for (size_t i = 0; i < CV_MR; i++) {
                        size_t c = m0 + i;
                        panel[kk * CV_MR + i] = c < (size_t)p->Cg ? w[oc * CKK + c * KK + src] : 0.0f;
                    }
                }
            }
        }
    }
}

// Input gradient, col path: dcol = W_g^T dout_g: rows k (CKK), columns oc (OCg).
static void pack_tcol(float * Ap, const float * weight, const struct conv_plan * p, int G) {
    size_t ckkp = round_up((size_t)p->CKK, CV_MR), CKK = (size_t)p->CKK, OCg = (size_t)p->OCg;
    size_t npan = ckkp / CV_MR;
    long total = (long)(npan * (size_t)G);
    #pragma omp for schedule(static)
    for (long t = 0; t < total; t++) {
        size_t g = (size_t)t / npan, m0 = (size_t)t % npan * CV_MR;
        const float * w = weight + g * OCg * CKK;
        pack_cols(Ap + g * ckkp * OCg + m0 * OCg, CV_MR, w + m0, CKK, CV_MR, (int)zmin(CV_MR, CKK - m0), (int)OCg);
    }
}

// Row offsets of the implicit im2col matrix on the shift path: (c, kh, kw) -> c*plane +
// kh*row + kw; and plain row offsets k*ld of a buffer.
static void shift_offsets(ptrdiff_t * off, int C, int K, size_t plane, size_t row) {
    size_t k = 0;
    for (int c = 0; c < C; c++) {
        for (int kh = 0; kh < K; kh++) {
            for (int kw = 0; kw < K; kw++) { off[k++] = (ptrdiff_t)(c * plane + kh * row + kw); }
        }
    }
}
static void row_offsets(ptrdiff_t * off, int n, size_t ld) {
    for (int k = 0; k < n; k++) { off[k] = (ptrdiff_t)(k * ld); }
}

// ---- building blocks -----------------------------------------------------------------------

// C (mpan*8 rows x npix, row stride ldc) = A B, or += (acc_in) continuing the chains: A is
// packed with panel stride 8*lda and column 0 at Ap; B row k at B + off[k]; npix is a
// multiple of NR. Panel-major, so each B panel is reused from L1 by all row panels.
static void gemm_panels(fwd_ukr_fn ukr, float * C, size_t ldc, const float * Ap, size_t lda, size_t mpan,
                        int K, const float * B, const ptrdiff_t * off, size_t npix, int acc_in) {
    for (size_t j = 0; j < npix; j += CV_NR) {
        for (size_t mp = 0; mp < mpan; mp++) {
            ukr(K, Ap + mp * CV_MR * lda, B + j, off, C + mp * CV_MR * ldc + j, ldc, acc_in);
        }
    }
}

// The full product over K in chunks of kc (chunk c continues the chains of chunk c-1).
static void gemm_chunked(fwd_ukr_fn ukr, float * C, size_t ldc, const float * Ap, size_t mpan, int K,
                         int kc, const float * B, const ptrdiff_t * off, size_t npix) {
    for (int k0 = 0; k0 < K; k0 += kc) {
        gemm_panels(ukr, C, ldc, Ap + (size_t)k0 * CV_MR, (size_t)K, mpan, imin(kc, K - k0), B, off + k0,
                    npix, k0 > 0);
    }
}

// part (M x N, row stride ldp) += D B^T: D row i at D + i*ldd, B row k at B + off[k], over
// nblk*16 pixels of nimg images (image m at D + m*ds, B + m*bs). Edge tiles repeat a valid
// row and drop its result.
static void dw_accumulate(dw_ukr_fn ukr, float * part, size_t ldp, int M, int N, const float * D,
                          size_t ldd, size_t ds, const float * B, const ptrdiff_t * off, size_t bs,
                          int nimg, size_t nblk) {
    const float * dr[DW_MR], * br[DW_NR];
    float r[DW_MR * DW_NR];
    for (int i0 = 0; i0 < M; i0 += DW_MR) {
        int mi = imin(DW_MR, M - i0);
        for (int i = 0; i < DW_MR; i++) { dr[i] = D + (size_t)(i0 + (i < mi ? i : 0)) * ldd; }
        for (int j0 = 0; j0 < N; j0 += DW_NR) {
            int nj = imin(DW_NR, N - j0);
            for (int j = 0; j < DW_NR; j++) { br[j] = B + off[j0 + (j < nj ? j : 0)]; }
            ukr(nimg, nblk, dr, ds, br, bs, r);
            for (int i = 0; i < mi; i++) {
                float * prow = part + (size_t)(i0 + i) * ldp + j0;
                for (int j = 0; j < nj; j++) { prow[j] += r[i * DW_NR + j]; }
            }
        }
    }
}

static inline void copy_floats(float * restrict d, const float * restrict s, size_t n) {
    for (size_t i = 0; i < n; i++) { d[i] = s[i]; }
}

// dst (C planes of dcols-wide rows, plane stride dplane) at row r0, column c0 <- src (C, H, W).
// Only the interior is written; the caller zeroes the borders once per call.
static void pad_copy(float * dst, size_t dplane, size_t dcols, int r0, int c0, const float * src,
                     int C, int H, int W) {
    for (int c = 0; c < C; c++) {
        float * d = dst + (size_t)c * dplane + (size_t)r0 * dcols + c0;
        const float * x = src + (size_t)c * H * W;
        for (int h = 0; h < H; h++) { copy_floats(d + (size_t)h * dcols, x + (size_t)h * W, W); }
    }
}

// Rows [k0, k1) of im2col for one image inp (Cg, H, W), written at col (row k at
// col + (k - k0)*ld, output pixel o at column o). Row (c*K + kh)*K + kw matches the weight
// layout (OCg, Cg, K, K).
static void im2col_rows(float * col, size_t ld, const float * inp, int H, int W, int OH, int OW,
                        int K, int S, int P, int k0, int k1) {
    for (int k = k0; k < k1; k++) {
        int c = k / (K * K), kh = (k / K) % K, kw = k % K;
        const float * plane = inp + (size_t)c * H * W;
        float * row = col + (size_t)(k - k0) * ld;
        int ow0, ow1;
        valid_range(&ow0, &ow1, W, OW, kw, S, P);
        for (int oh = 0; oh < OH; oh++) {
            float * r = row + (size_t)oh * OW;
            int ih = oh * S - P + kh;
            if (ih < 0 || ih >= H || ow0 == ow1) {
                for (int ow = 0; ow < OW; ow++) { r[ow] = 0.0f; }
                continue;
            }
            for (int ow = 0; ow < ow0; ow++) { r[ow] = 0.0f; }
            for (int ow = ow1; ow < OW; ow++) { r[ow] = 0.0f; }
            const float * src = plane + (size_t)ih * W + (ow0 * S - P + kw);
            if (S == 1) {
                copy_floats(r + ow0, src, (size_t)(ow1 - ow0));
            } else if (S == 2) {   // constant stride: the compiler vectorises it with permutes
                for (int ow = ow0; ow < ow1; ow++) { r[ow] = src[2 * (ow - ow0)]; }
            } else {
                for (int ow = ow0; ow < ow1; ow++) { r[ow] = src[(ow - ow0) * S]; }
            }
        }
    }
}

// dinp (Cg, H, W) += scatter of rows [k0, k1) of a col matrix (row k at col + (k-k0)*ld):
// the adjoint of im2col_rows.
static void col2im_rows_add(float * dinp, const float * col, size_t ld, int H, int W, int OH, int OW,
                            int K, int S, int P, int k0, int k1) {
    for (int k = k0; k < k1; k++) {
        int c = k / (K * K), kh = (k / K) % K, kw = k % K;
        float * plane = dinp + (size_t)c * H * W;
        const float * row = col + (size_t)(k - k0) * ld;
        int ow0, ow1;
        valid_range(&ow0, &ow1, W, OW, kw, S, P);
        if (ow0 == ow1) { continue; }
        for (int oh = 0; oh < OH; oh++) {
            int ih = oh * S - P + kh;
            if (ih < 0 || ih >= H) { continue; }
            const float * r = row + (size_t)oh * OW;
            axpy_scatter(plane + (size_t)ih * W + (ow0 * S - P + kw), 1.0f, r + ow0, ow1 - ow0, S);
        }
    }
}

// out rows (one image, OCg channels) <- staging rows (grid row stride gw), dropping the grid
// columns outside the output; bias after the product, as PyTorch.
static void store_out(float * o, const float * stage, size_t ld, size_t gw, int OCg, int OH, int OW,
                      const float * bias) {
    size_t OHW = (size_t)OH * OW;
    for (int oc = 0; oc < OCg; oc++) {
        float * orow = o + (size_t)oc * OHW;
        const float * srow = stage + (size_t)oc * ld;
        if (bias != NULL) {
            float bv = bias[oc];
            for (int oh = 0; oh < OH; oh++) {
                float * d = orow + (size_t)oh * OW;
                const float * r = srow + (size_t)oh * gw;
                for (int ow = 0; ow < OW; ow++) { d[ow] = r[ow] + bv; }
            }
        } else if (gw == (size_t)OW) {
            copy_floats(orow, srow, OHW);
        } else {
            for (int oh = 0; oh < OH; oh++) { copy_floats(orow + (size_t)oh * OW, srow + (size_t)oh * gw, OW); }
        }
    }
}

// One (n, c) plane of a depthwise conv: out (OH,OW), inp (H,W), w (K,K).
static void dw_forward_plane(float * out, const float * inp, const float * w, float bias,
                             const struct kd_conv_shape * s) {
    int K = s->K, S = s->S, P = s->P, OW = s->OW;
    memset(out, 0, (size_t)s->OH * OW * sizeof(float));
    // Tap-major order: each (kh, kw) adds a shifted, strided copy of the input; the plane
    // stays in L1 across the K*K passes.
    for (int kh = 0; kh < K; kh++) {
        int oh0, oh1;
        valid_range(&oh0, &oh1, s->H, s->OH, kh, S, P);
        for (int kw = 0; kw < K; kw++) {
            int ow0, ow1;
            valid_range(&ow0, &ow1, s->W, OW, kw, S, P);
            if (ow0 == ow1) { continue; }
            float wv = w[kh * K + kw];
            for (int oh = oh0; oh < oh1; oh++) {
                const float * src = inp + (size_t)(oh * S - P + kh) * s->W + (ow0 * S - P + kw);
                axpy_gather(out + (size_t)oh * OW + ow0, wv, src, ow1 - ow0, S);
            }
        }
    }
    for (size_t i = 0; i < (size_t)s->OH * OW; i++) { out[i] += bias; }
}

// out (N,OC,OH,OW), inp (N,C,H,W), weight (OC,C/G,K,K), bias (OC) or NULL
void kd_conv2d_forward(float * out, const float * inp, const float * weight, const float * bias,
                       const struct kd_conv_shape * s, float * work) {
    conv_check_shape(s);
    size_t HW = (size_t)s->H * s->W, OHW = (size_t)s->OH * s->OW;
    if (conv_is_depthwise(s)) {
        // Every (n, c) plane is independent.
        int NC = s->N * s->C;
        size_t KK = (size_t)s->K * s->K;
        #pragma omp parallel for schedule(static) if((size_t)NC * OHW * KK > KD_PAR_MIN)
        for (int nc = 0; nc < NC; nc++) {
            int c = nc % s->C;
            dw_forward_plane(out + (size_t)nc * OHW, inp + (size_t)nc * HW, weight + c * KK,
                             bias != NULL ? bias[c] : 0.0f, s);
        }
        return;
    }
    struct conv_plan pl;
    if (!conv_plan_make(s, &pl)) { KD_ASSERT(0); return; }
    struct conv_kernels kr = conv_kernels();
    float * ws = align_floats(work);
    float * Ap = ws + pl.a_off;
    ptrdiff_t * off = (ptrdiff_t *)(ws + pl.o_off);
    if (pl.path == CONV_SHIFT) { shift_offsets(off, pl.Cg, s->K, pl.plane, (size_t)pl.Wp); }
    else { row_offsets(off, pl.kc, pl.ld); }
    size_t ocp = round_up((size_t)pl.OCg, CV_MR), CKK = (size_t)pl.CKK, mpan = ocp / CV_MR;
    #pragma omp parallel
    {
        pack_fwd(Ap, weight, &pl, s->G);
        int n0, n1;
        batch_chunk(&n0, &n1, s->N, kd_omp_tid(), kd_omp_team());
        float * tw = ws + pl.shared + (size_t)kd_omp_tid() * pl.per;
        float * xb = tw + pl.x_off, * stage = tw + pl.t_off;
        // Borders of the padded image and columns past the grid are zeroed once here and
        // never written again (only finite values may be read where results are dropped).
        if (n0 < n1) { memset(xb, 0, pl.x_n * sizeof(float)); }
        if (pl.path == CONV_SHIFT) {
            for (int n = n0; n < n1; n++) {
                float * o = out + (size_t)n * s->OC * OHW;
                pad_copy(xb, pl.plane, (size_t)pl.Wp, s->P, s->P, inp + (size_t)n * s->C * HW, s->C, s->H, s->W);
                for (int g = 0; g < s->G; g++) {
                    gemm_chunked(kr.fwd, stage, pl.ld, Ap + (size_t)g * ocp * CKK, mpan, pl.CKK, pl.kc,
                                 xb + (size_t)g * pl.Cg * pl.plane, off, pl.ld);
                    store_out(o + (size_t)g * pl.OCg * OHW, stage, pl.ld, (size_t)pl.Wp, pl.OCg, s->OH, s->OW,
                              bias != NULL ? bias + g * pl.OCg : NULL);
                }
            }
        } else {
            for (int n = n0; n < n1; n += pl.gi) {
                int ni = imin(pl.gi, n1 - n);
                size_t npix = round_up((size_t)ni * OHW, CV_NR);
                for (int g = 0; g < s->G; g++) {
                    const float * Ag = Ap + (size_t)g * ocp * CKK;
                    for (int k0 = 0; k0 < pl.CKK; k0 += pl.kc) {
                        int k1 = imin(pl.CKK, k0 + pl.kc);
                        for (int i = 0; i < ni; i++) {
                            im2col_rows(xb + (size_t)i * OHW, pl.ld, inp + ((size_t)(n + i) * s->C + (size_t)g * pl.Cg) * HW,
                                        s->H, s->W, s->OH, s->OW, s->K, s->S, s->P, k0, k1);
                        }
                        gemm_panels(kr.fwd, stage, pl.ld, Ag + (size_t)k0 * CV_MR, CKK, mpan, k1 - k0, xb, off,
                                    npix, k0 > 0);
                    }
                    for (int i = 0; i < ni; i++) {
                        store_out(out + ((size_t)(n + i) * s->OC + (size_t)g * pl.OCg) * OHW, stage + (size_t)i * OHW,
                                  pl.ld, (size_t)s->OW, pl.OCg, s->OH, s->OW, bias != NULL ? bias + g * pl.OCg : NULL);
                    }
                }
            }
        }
    }
}

// Depthwise backward for channel c over the whole batch. Weight/bias gradients need a sum
// over n, so the parallel loop is over c only and n runs in order inside.
static void dw_backward_channel(float * dinp, float * dweight, float * dbias, const float * dout,
                                const float * inp, const float * weight, int c,
                                const struct kd_conv_shape * s) {
    int K = s->K, S = s->S, P = s->P, OW = s->OW;
    size_t HW = (size_t)s->H * s->W, OHW = (size_t)s->OH * OW;
    size_t cstride_in = (size_t)s->C * HW, cstride_out = (size_t)s->C * OHW;
    const float * inp_c = inp + (size_t)c * HW;
    const float * dout_c = dout + (size_t)c * OHW;
    if (dbias != NULL) {
        double sb = 0.0;
        for (int n = 0; n < s->N; n++) { sb += sum_f64(dout_c + n * cstride_out, OHW); }
        dbias[c] += (float)sb;
    }
    if (dweight == NULL && dinp == NULL) { return; }
    for (int kh = 0; kh < K; kh++) {
        int oh0, oh1;
        valid_range(&oh0, &oh1, s->H, s->OH, kh, S, P);
        for (int kw = 0; kw < K; kw++) {
            int ow0, ow1;
            valid_range(&ow0, &ow1, s->W, OW, kw, S, P);
            if (ow0 == ow1) { continue; }     // this tap only ever sees padding
            float wv = weight[(size_t)c * K * K + kh * K + kw];
            double sw = 0.0;
            for (int n = 0; n < s->N; n++) {
                const float * x = inp_c + n * cstride_in;
                const float * dy = dout_c + n * cstride_out;
                float * dx = dinp != NULL ? dinp + (size_t)c * HW + n * cstride_in : NULL;
                for (int oh = oh0; oh < oh1; oh++) {
                    size_t off = (size_t)(oh * S - P + kh) * s->W + (ow0 * S - P + kw);
                    const float * dyr = dy + (size_t)oh * OW + ow0;
                    if (dweight != NULL) { sw += dot_gather_f64(x + off, dyr, ow1 - ow0, S); }
                    if (dx != NULL) { axpy_scatter(dx + off, wv, dyr, ow1 - ow0, S); }
                }
            }
            if (dweight != NULL) { dweight[(size_t)c * K * K + kh * K + kw] += (float)sw; }
        }
    }
}

// dinp (N,C,H,W), dweight (OC,C/G,K,K), dbias (OC), dout (N,OC,OH,OW)
void kd_conv2d_backward(float * dinp, float * dweight, float * dbias, const float * dout,
                        const float * inp, const float * weight, const struct kd_conv_shape * s,
                        float * work) {
    conv_check_shape(s);
    if (dinp == NULL && dweight == NULL && dbias == NULL) { return; }
    if (conv_is_depthwise(s)) {
        #pragma omp parallel for schedule(static)
        for (int c = 0; c < s->C; c++) {
            dw_backward_channel(dinp, dweight, dbias, dout, inp, weight, c, s);
        }
        return;
    }
    struct conv_plan pl;
    if (!conv_plan_make(s, &pl)) { KD_ASSERT(0); return; }
    struct conv_kernels kr = conv_kernels();
    float * ws = align_floats(work);
    float * Ap = ws + pl.a_off;
    ptrdiff_t * off = (ptrdiff_t *)(ws + pl.o_off);
    ptrdiff_t * off2 = off + pl.CKK;                      // shift: rows of the padded dout
    size_t HW = (size_t)s->H * s->W, OHW = (size_t)s->OH * s->OW;
    size_t CKK = (size_t)pl.CKK, nw = (size_t)s->OC * CKK;
    size_t cp = round_up((size_t)pl.Cg, CV_MR), ckkp = round_up(CKK, CV_MR);
    size_t Kt = (size_t)pl.OCg * pl.KK;
    int shift = pl.path == CONV_SHIFT;
    if (shift) {
        shift_offsets(off, pl.Cg, s->K, pl.plane, (size_t)pl.Wp);
        shift_offsets(off2, pl.OCg, s->K, pl.qplane, (size_t)pl.Wq);
    } else {
        row_offsets(off, imax(pl.kc, pl.OCg), pl.ld);     // im2col chunk rows, and dout rows
    }
    // Units of work, each with its own weight/bias-gradient partial in workspace slot u: one
    // per thread (its contiguous share of the batch); in deterministic mode a fixed number of
    // batch chunks handed out round-robin, so which images meet in a partial, and the order
    // in which the partials are summed, do not depend on the thread count. A thread's
    // scratch (images, dout, staging) is always its own slot's.
    const int det = kd_get_deterministic();
    const int nchunks = imin(s->N, KD_DET_CONV_CHUNKS);
    int nteam = 1;
    #pragma omp parallel
    {
        if (dinp != NULL && shift) { pack_tdinp(Ap, weight, &pl, s->G, s->K); }
        if (dinp != NULL && !shift) { pack_tcol(Ap, weight, &pl, s->G); }
        int tid = kd_omp_tid(), nt = kd_omp_team(), n0, n1;
        if (tid == 0) { nteam = nt; }
        const int nunits = det ? nchunks : nt;
        float * tw = ws + pl.shared + (size_t)tid * pl.per;
        float * xb = tw + pl.x_off, * qb = tw + pl.q_off, * zb = tw + pl.z_off, * stage = tw + pl.t_off;
        const int need_z = dweight != NULL || (!shift && dinp != NULL);   // dout on the forward grid
        if (tid < nunits) {
            // Zero the thread's scratch once, whatever its units: padding, grid columns
            // outside the output, row tails are never written afterwards.
            if (dweight != NULL) { memset(xb, 0, pl.x_n * sizeof(float)); }
            if (dinp != NULL && shift) { memset(qb, 0, pl.q_n * sizeof(float)); }
            if (need_z) { memset(zb, 0, pl.z_n * sizeof(float)); }
        }
        for (int u = tid; u < nunits; u += nt) {
            batch_chunk(&n0, &n1, s->N, u, nunits);
            float * part = ws + pl.shared + (size_t)u * pl.per;
            // Private partials, so no thread ever writes another's gradient.
            float * dw = dweight != NULL ? part + pl.w_off : NULL;
            float * db = dbias != NULL ? part + pl.b_off : NULL;
            if (n0 < n1) {
                if (dw != NULL) { memset(dw, 0, nw * sizeof(float)); }
                if (db != NULL) { memset(db, 0, (size_t)s->OC * sizeof(float)); }
            }
            for (int n = n0; n < n1; n += pl.gi) {
                int ni = imin(pl.gi, n1 - n);
                const float * x = inp + (size_t)n * s->C * HW;
                const float * dy = dout + (size_t)n * s->OC * OHW;
                float * dx = dinp != NULL ? dinp + (size_t)n * s->C * HW : NULL;
                if (db != NULL) {
                    for (int i = 0; i < ni; i++) {
                        for (int oc = 0; oc < s->OC; oc++) {
                            db[oc] += (float)sum_f64(dy + ((size_t)i * s->OC + oc) * OHW, OHW);
                        }
                    }
                }
                if (dw == NULL && dx == NULL) { continue; }
                size_t npix = shift ? pl.grid : (size_t)ni * pl.grid;   // grid pixels (shift: per image)
                size_t nblk = round_up(npix, DW_L) / DW_L;
                if (need_z && shift) {
                    // dout of each image on the padded grid (row stride Wp), in its own block of
                    // OC rows; the dropped columns stay zero.
                    for (int i = 0; i < ni; i++) {
                        for (int oc = 0; oc < s->OC; oc++) {
                            float * zrow = zb + (size_t)i * pl.zs + (size_t)oc * pl.ld;
                            const float * drow = dy + ((size_t)i * s->OC + oc) * OHW;
                            for (int oh = 0; oh < s->OH; oh++) {
                                copy_floats(zrow + (size_t)oh * pl.Wp, drow + (size_t)oh * s->OW, s->OW);
                            }
                        }
                    }
                } else if (need_z) {
                    // dout of the group side by side: row oc holds image i at i*OH*OW; a short
                    // last group leaves stale values past its pixels, so zero up to the block.
                    for (int oc = 0; oc < s->OC; oc++) {
                        float * zrow = zb + (size_t)oc * pl.ld;
                        for (int i = 0; i < ni; i++) { copy_floats(zrow + (size_t)i * OHW, dy + ((size_t)i * s->OC + oc) * OHW, OHW); }
                        for (size_t p = npix; p < nblk * DW_L; p++) { zrow[p] = 0.0f; }
                    }
                }
                if (shift && dw != NULL) {
                    for (int i = 0; i < ni; i++) {
                        pad_copy(xb + (size_t)i * pl.xs, pl.plane, (size_t)pl.Wp, s->P, s->P, x + (size_t)i * s->C * HW,
                                 s->C, s->H, s->W);
                    }
                }
                for (int g = 0; g < s->G; g++) {
                    const float * zg = zb + (size_t)g * pl.OCg * pl.ld;
                    float * dwg = dw != NULL ? dw + (size_t)g * pl.OCg * CKK : NULL;
                    if (shift) {
                        if (dwg != NULL) {
                            dw_accumulate(kr.dw, dwg, CKK, pl.OCg, pl.CKK, zg, pl.ld, pl.zs,
                                          xb + (size_t)g * pl.Cg * pl.plane, off, pl.xs, ni, nblk);
                        }
                        continue;
                    }
                    // col path
                    if (dwg != NULL) {
                        for (int k0 = 0; k0 < pl.CKK; k0 += pl.kc) {
                            int k1 = imin(pl.CKK, k0 + pl.kc);
                            for (int i = 0; i < ni; i++) {
                                im2col_rows(xb + (size_t)i * OHW, pl.ld, x + ((size_t)i * s->C + (size_t)g * pl.Cg) * HW,
                                            s->H, s->W, s->OH, s->OW, s->K, s->S, s->P, k0, k1);
                            }
                            dw_accumulate(kr.dw, dwg + k0, CKK, pl.OCg, k1 - k0, zg, pl.ld, 0, xb, off, 0, 1, nblk);
                        }
                    }
                    if (dx != NULL) {
                        // dcol (CKK, pixels) = W_g^T dout_g, mc rows at a time, then col2im.
                        const float * At = Ap + (size_t)g * ckkp * pl.OCg;
                        size_t npan = round_up(npix, CV_NR);
                        for (int m0 = 0; m0 < pl.CKK; m0 += pl.mc) {
                            int m1 = imin(pl.CKK, m0 + pl.mc);
                            size_t mpan = round_up((size_t)(m1 - m0), CV_MR) / CV_MR;
                            gemm_panels(kr.fwd, qb, pl.ld, At + (size_t)m0 * pl.OCg, (size_t)pl.OCg, mpan, pl.OCg, zg,
                                        off, npan, 0);
                            for (int i = 0; i < ni; i++) {
                                col2im_rows_add(dx + ((size_t)i * s->C + (size_t)g * pl.Cg) * HW, qb + (size_t)i * OHW,
                                                pl.ld, s->H, s->W, s->OH, s->OW, s->K, s->S, s->P, m0, m1);
                            }
                        }
                    }
                }
                // Shift path input gradient, image by image: dinp_g = conv(padded dout_g,
                // flipped W_g^T) on the grid H x Wq.
                for (int i = 0; shift && dx != NULL && i < ni; i++) {
                    pad_copy(qb, pl.qplane, (size_t)pl.Wq, pl.Pt, pl.Pt, dy + (size_t)i * s->OC * OHW, s->OC, s->OH, s->OW);
                    for (int g = 0; g < s->G; g++) {
                        float * dxg = dx + ((size_t)i * s->C + (size_t)g * pl.Cg) * HW;
                        gemm_chunked(kr.fwd, stage, pl.ld2, Ap + (size_t)g * cp * Kt, cp / CV_MR, (int)Kt, pl.kct,
                                     qb + (size_t)g * pl.OCg * pl.qplane, off2, pl.ld2);
                        for (int c = 0; c < pl.Cg; c++) {
                            float * drow = dxg + (size_t)c * HW;
                            const float * srow = stage + (size_t)c * pl.ld2;
                            for (int h = 0; h < s->H; h++) {
                                float * d = drow + (size_t)h * s->W;
                                const float * r = srow + (size_t)h * pl.Wq;
                                for (int w = 0; w < s->W; w++) { d[w] += r[w]; }
                            }
                        }
                    }
                }
            }
        }
    }
    // Reduce the partials in slot order (fixed for a given thread count; in deterministic
    // mode, fixed). Only units that got images wrote a partial: with balanced chunks, those
    // are the first min(units, N).
    int nactive = det ? nchunks : imin(nteam, s->N);
    if (dweight != NULL) {
        const float * p0 = ws + pl.shared + pl.w_off;
        #pragma omp parallel for schedule(static) if(nw * (size_t)nactive > KD_PAR_MIN)
        for (size_t i = 0; i < nw; i++) {
            float acc = p0[i];
            for (int t = 1; t < nactive; t++) { acc += p0[(size_t)t * pl.per + i]; }
            dweight[i] += acc;
        }
    }
    if (dbias != NULL) {
        const float * p0 = ws + pl.shared + pl.b_off;
        for (int oc = 0; oc < s->OC; oc++) {
            float acc = p0[oc];
            for (int t = 1; t < nactive; t++) { acc += p0[(size_t)t * pl.per + oc]; }
            dbias[oc] += acc;
        }
    }
}

// ----------------------------------------------------------------------------------------
// batchnorm
// https://pytorch.org/docs/stable/generated/torch.nn.BatchNorm2d.html
// Each thread owns a contiguous range of channels and walks it image by image, so it reads
// long contiguous runs (n, c0..c1) instead of N strided planes per channel. Every channel
// is still reduced by one thread, over n then hw, in double and in the same order whatever
// the thread count: results are independent of it.

#define BN_CB 64   // channels whose accumulators a thread keeps at once

// [*c0, *c1): this thread's channels (contiguous, balanced).
static inline void channel_range(int * c0, int * c1, int C) { batch_chunk(c0, c1, C, kd_omp_tid(), kd_omp_team()); }

// Per-plane moments in double, 16 lanes (lane = index mod 16) summed by a fixed tree, so the
// AVX-512 and portable versions give the same bits.
static inline double lanes16_sum(const double * a) {
    double t[8];
    for (int l = 0; l < 8; l++) { t[l] = a[l] + a[l + 8]; }
    return ((t[0] + t[4]) + (t[2] + t[6])) + ((t[1] + t[5]) + (t[3] + t[7]));
}

// *s1 += sum(x - sh), *s2 += sum((x - sh)^2)
static void moments_c(const float * x, size_t n, double sh, double * s1, double * s2) {
    double a[16] = {0}, b[16] = {0}, ta = 0.0, tb = 0.0;
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        for (int j = 0; j < 16; j++) {
            double d = (double)x[i + j] - sh;
            a[j] += d;
            b[j] = fma(d, d, b[j]);
        }
    }
    for (; i < n; i++) {
        double d = (double)x[i] - sh;
        ta += d;
        tb = fma(d, d, tb);
    }
    *s1 += lanes16_sum(a) + ta;
    *s2 += lanes16_sum(b) + tb;
}

// *sy += sum(y), *sxy += sum((x - m) * y)
static void dot_dev_c(const float * x, const float * y, size_t n, double m, double * sy, double * sxy) {
    double a[16] = {0}, b[16] = {0}, ta = 0.0, tb = 0.0;
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        for (int j = 0; j < 16; j++) {
            double yv = (double)y[i + j];
            a[j] += yv;
            b[j] = fma((double)x[i + j] - m, yv, b[j]);
        }
    }
    for (; i < n; i++) {
        double yv = (double)y[i];
        ta += yv;
        tb = fma((double)x[i] - m, yv, tb);
    }
    *sy += lanes16_sum(a) + ta;
    *sxy += lanes16_sum(b) + tb;
}

#ifdef KD_HAVE_AVX512_KERNELS
__attribute__((target("avx512f")))
static inline void cvt16_pd(const float * p, __m512d * lo, __m512d * hi) {
    __m512 v = _mm512_loadu_ps(p);
    *lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    *hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

__attribute__((target("avx512f")))
static void moments_avx512(const float * x, size_t n, double sh, double * s1, double * s2) {
    __m512d a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd(), b0 = _mm512_setzero_pd(), b1 = _mm512_setzero_pd();
    __m512d shv = _mm512_set1_pd(sh);
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512d lo, hi;
        cvt16_pd(x + i, &lo, &hi);
        lo = _mm512_sub_pd(lo, shv);
        hi = _mm512_sub_pd(hi, shv);
        a0 = _mm512_add_pd(a0, lo);
        a1 = _mm512_add_pd(a1, hi);
        b0 = _mm512_fmadd_pd(lo, lo, b0);
        b1 = _mm512_fmadd_pd(hi, hi, b1);
    }
    double a[16], b[16], ta = 0.0, tb = 0.0;
    _mm512_storeu_pd(a, a0); _mm512_storeu_pd(a + 8, a1);
    _mm512_storeu_pd(b, b0); _mm512_storeu_pd(b + 8, b1);
    for (; i < n; i++) {
        double d = (double)x[i] - sh;
        ta += d;
        tb = fma(d, d, tb);
    }
    *s1 += lanes16_sum(a) + ta;
    *s2 += lanes16_sum(b) + tb;
}

__attribute__((target("avx512f")))
static void dot_dev_avx512(const float * x, const float * y, size_t n, double m, double * sy, double * sxy) {
    __m512d a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd(), b0 = _mm512_setzero_pd(), b1 = _mm512_setzero_pd();
    __m512d mv = _mm512_set1_pd(m);
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512d xl, xh, yl, yh;
        cvt16_pd(x + i, &xl, &xh);
        cvt16_pd(y + i, &yl, &yh);
        a0 = _mm512_add_pd(a0, yl);
        a1 = _mm512_add_pd(a1, yh);
        b0 = _mm512_fmadd_pd(_mm512_sub_pd(xl, mv), yl, b0);
        b1 = _mm512_fmadd_pd(_mm512_sub_pd(xh, mv), yh, b1);
    }
    double a[16], b[16], ta = 0.0, tb = 0.0;
    _mm512_storeu_pd(a, a0); _mm512_storeu_pd(a + 8, a1);
    _mm512_storeu_pd(b, b0); _mm512_storeu_pd(b + 8, b1);
    for (; i < n; i++) {
        double yv = (double)y[i];
        ta += yv;
        tb = fma((double)x[i] - m, yv, tb);
    }
    *sy += lanes16_sum(a) + ta;
    *sxy += lanes16_sum(b) + tb;
}
#endif

typedef void (*moments_fn)(const float *, size_t, double, double *, double *);
typedef void (*dot_dev_fn)(const float *, const float *, size_t, double, double *, double *);

// out = inp * alpha + beta over one plane (PyTorch's CPU kernel folds the affine map so).
static inline void affine_plane(float * restrict out, const float * restrict inp, float alpha, float beta, int HW) {
    for (int i = 0; i < HW; i++) { out[i] = inp[i] * alpha + beta; }
}

// out, inp (N,C,HW); mean, rstd, run_mean, run_var, weight, bias (C)
void kd_batchnorm_forward_train(float * out, float * mean, float * rstd, float * run_mean,
                                float * run_var, const float * inp, const float * weight,
                                const float * bias, int N, int C, int HW, float eps, float momentum) {
    size_t cnt = (size_t)N * HW;
    moments_fn moments = moments_c;
#ifdef KD_HAVE_AVX512_KERNELS
    if (simd_level() == KD_ISA_AVX512) { moments = moments_avx512; }
#endif
    #pragma omp parallel if((size_t)N * C * HW > KD_PAR_MIN)
    {
        int c0, c1;
        channel_range(&c0, &c1, C);
        for (int cb = c0; cb < c1; cb += BN_CB) {
            int nc = imin(BN_CB, c1 - cb);
            double s1[BN_CB], s2[BN_CB], sh[BN_CB];
            float alpha[BN_CB], beta[BN_CB];
            // One pass for both moments, around a shift (the channel's first value) so that
            // E[d^2] - E[d]^2 does not cancel; in double.
            for (int j = 0; j < nc; j++) { s1[j] = 0.0; s2[j] = 0.0; sh[j] = (double)inp[(size_t)(cb + j) * HW]; }
            for (int n = 0; n < N; n++) {
                const float * x = inp + ((size_t)n * C + cb) * HW;
                for (int j = 0; j < nc; j++) { moments(x + (size_t)j * HW, (size_t)HW, sh[j], &s1[j], &s2[j]); }
            }
            for (int j = 0; j < nc; j++) {
                int c = cb + j;
                double md = s1[j] / (double)cnt;
                double ss = s2[j] - s1[j] * md;             // sum of squared deviations
                if (ss < 0.0) { ss = 0.0; }
                double m = sh[j] + md;
                double var = ss / (double)cnt;              // biased: used to normalise
                // Unbiased for the running estimate, as PyTorch; a single value has no spread
                // estimate, so fall back to the biased one (0) instead of dividing by zero.
                double var_unbiased = cnt > 1 ? ss / (double)(cnt - 1) : var;
                mean[c] = (float)m;
                rstd[c] = (float)(1.0 / sqrt(var + (double)eps));
                double mom = (double)momentum;
                if (run_mean != NULL) { run_mean[c] = (float)(mom * m + (1.0 - mom) * (double)run_mean[c]); }
                if (run_var != NULL) { run_var[c] = (float)(mom * var_unbiased + (1.0 - mom) * (double)run_var[c]); }
                alpha[j] = rstd[c] * weight[c];
                beta[j] = bias[c] - mean[c] * alpha[j];
            }
            for (int n = 0; n < N; n++) {
                size_t off = ((size_t)n * C + cb) * HW;
                for (int j = 0; j < nc; j++) {
                    affine_plane(out + off + (size_t)j * HW, inp + off + (size_t)j * HW, alpha[j], beta[j], HW);
                }
            }
        }
    }
}

// out, inp (N,C,HW); mean, rstd, weight, bias, run_mean, run_var (C)
void kd_batchnorm_forward_eval(float * out, float * mean, float * rstd, const float * inp,
                               const float * weight, const float * bias, const float * run_mean,
                               const float * run_var, int N, int C, int HW, float eps) {
    #pragma omp parallel if((size_t)N * C * HW > KD_PAR_MIN)
    {
        int c0, c1;
        channel_range(&c0, &c1, C);
        for (int cb = c0; cb < c1; cb += BN_CB) {
            int nc = imin(BN_CB, c1 - cb);
            float alpha[BN_CB], beta[BN_CB];
            for (int j = 0; j < nc; j++) {
                int c = cb + j;
                mean[c] = run_mean[c];
                rstd[c] = 1.0f / sqrtf(run_var[c] + eps);
                alpha[j] = rstd[c] * weight[c];
                beta[j] = bias[c] - mean[c] * alpha[j];
            }
            for (int n = 0; n < N; n++) {
                size_t off = ((size_t)n * C + cb) * HW;
                for (int j = 0; j < nc; j++) {
                    affine_plane(out + off + (size_t)j * HW, inp + off + (size_t)j * HW, alpha[j], beta[j], HW);
                }
            }
        }
    }
}

// dinp, dout, inp (N,C,HW); dweight, dbias, mean, rstd, weight (C)
void kd_batchnorm_backward(float * dinp, float * dweight, float * dbias, const float * dout,
                           const float * inp, const float * mean, const float * rstd,
                           const float * weight, int N, int C, int HW, int batch_stats) {
    size_t cnt = (size_t)N * HW;
    dot_dev_fn dot_dev = dot_dev_c;
#ifdef KD_HAVE_AVX512_KERNELS
    if (simd_level() == KD_ISA_AVX512) { dot_dev = dot_dev_avx512; }
#endif
    #pragma omp parallel if((size_t)N * C * HW > KD_PAR_MIN)
    {
        int c0, c1;
        channel_range(&c0, &c1, C);
        for (int cb = c0; cb < c1; cb += BN_CB) {
            int nc = imin(BN_CB, c1 - cb);
            // sum(dy) and sum((x - mean) * dy); sum(dy * xhat) = rstd * the latter.
            double sdy[BN_CB], sdyx[BN_CB];
            float mf[BN_CB], a[BN_CB], k[BN_CB], mdy[BN_CB];
            for (int j = 0; j < nc; j++) { sdy[j] = 0.0; sdyx[j] = 0.0; }
            for (int n = 0; n < N; n++) {
                size_t off = ((size_t)n * C + cb) * HW;
                for (int j = 0; j < nc; j++) {
                    dot_dev(inp + off + (size_t)j * HW, dout + off + (size_t)j * HW, (size_t)HW,
                            (double)mean[cb + j], &sdy[j], &sdyx[j]);
                }
            }
            for (int j = 0; j < nc; j++) {
                int c = cb + j;
                float r = rstd[c];
                if (dbias != NULL) { dbias[c] += (float)sdy[j]; }
                if (dweight != NULL) { dweight[c] += (float)(sdyx[j] * (double)r); }
                // dx = rstd*w * (dy - mean(dy) - xhat * mean(dy*xhat)), with
                // xhat * mean(dy*xhat) = (x - mean) * k, k = sum((x-mean)*dy) * rstd^2 / cnt.
                // The means run through the batch statistics, hence the two extra terms.
                // Eval: mean and rstd are constants, so BN is a per-channel affine map.
                a[j] = r * weight[c];
                mf[j] = mean[c];
                mdy[j] = (float)(sdy[j] / (double)cnt);
                k[j] = (float)(sdyx[j] * (double)r * (double)r / (double)cnt);
            }
            if (dinp == NULL) { continue; }
            for (int n = 0; n < N; n++) {
                size_t off = ((size_t)n * C + cb) * HW;
                for (int j = 0; j < nc; j++) {
                    float * restrict dx = dinp + off + (size_t)j * HW;
                    const float * restrict dy = dout + off + (size_t)j * HW;
                    const float * restrict x = inp + off + (size_t)j * HW;
                    float aj = a[j];
                    if (batch_stats) {
                        float m = mf[j], kj = k[j], md = mdy[j];
                        for (int i = 0; i < HW; i++) { dx[i] += (dy[i] - md - (x[i] - m) * kj) * aj; }
                    } else {
                        for (int i = 0; i < HW; i++) { dx[i] += dy[i] * aj; }
                    }
                }
            }
        }
    }
}

// ----------------------------------------------------------------------------------------
// relu
// https://pytorch.org/docs/stable/generated/torch.nn.ReLU.html

// out, inp (n). Written as "x < 0 ? 0 : x" so that NaN propagates, as in PyTorch.
void kd_relu_forward(float * out, const float * inp, size_t n) {
    #pragma omp parallel for schedule(static) if(n > KD_PAR_MIN)
    for (size_t i = 0; i < n; i++) { out[i] = inp[i] < 0.0f ? 0.0f : inp[i]; }
}

// dinp, dout, out (n). out > 0 exactly where inp > 0, so the input need not be kept;
// the gradient at 0 is 0, as in PyTorch.
void kd_relu_backward(float * dinp, const float * dout, const float * out, size_t n) {
    #pragma omp parallel for schedule(static) if(n > KD_PAR_MIN)
    for (size_t i = 0; i < n; i++) { dinp[i] += out[i] > 0.0f ? dout[i] : 0.0f; }
}

// ----------------------------------------------------------------------------------------
// max pool
// https://pytorch.org/docs/stable/generated/torch.nn.MaxPool2d.html

// 2x2 windows, stride 2, no padding (the common case), one plane: the same candidate rule as
// the general loop below (start at -inf with the first cell's index, take strictly greater
// values or NaN, in the scan order (0,0) (0,1) (1,0) (1,1)).
static void maxpool2x2_plane_c(float * o, int32_t * a, const float * x, int H2, int W, int OH, int OW) {
    (void)H2;
    for (int oh = 0; oh < OH; oh++) {
        const float * r0 = x + (size_t)(2 * oh) * W, * r1 = r0 + W;
        for (int ow = 0; ow < OW; ow++) {
            int i0 = 2 * oh * W + 2 * ow;
            float v[4] = { r0[2 * ow], r0[2 * ow + 1], r1[2 * ow], r1[2 * ow + 1] };
            int id[4] = { i0, i0 + 1, i0 + W, i0 + W + 1 };
            float m = -INFINITY;
            int32_t am = i0;
            for (int t = 0; t < 4; t++) {
                int take = (v[t] > m) | (v[t] != v[t]);
                m = take ? v[t] : m;
                am = take ? id[t] : am;
            }
            o[(size_t)oh * OW + ow] = m;
            a[(size_t)oh * OW + ow] = am;
        }
    }
}

#ifdef KD_HAVE_AVX512_KERNELS
// The same, 16 outputs of a row at a time: masked loads of the two input rows, even/odd
// lanes split by permutes, and the candidate rule with compare masks.
__attribute__((target("avx512f")))
static void maxpool2x2_plane_avx512(float * o, int32_t * a, const float * x, int H2, int W, int OH, int OW) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    const __m512i lane2 = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    for (int oh = 0; oh < OH; oh++) {
        const float * r0 = x + (size_t)(2 * oh) * W, * r1 = r0 + W;
        for (int ow = 0; ow < OW; ow += 16) {
            int n = imin(16, OW - ow);
            __mmask16 mo = (__mmask16)((1u << n) - 1u);
            __mmask16 ml = (__mmask16)(n >= 8 ? 0xFFFFu : (1u << (2 * n)) - 1u);
            __mmask16 mh = (__mmask16)(n > 8 ? (1u << (2 * n - 16)) - 1u : 0u);
            // Whole vectors are read where they stay inside the plane (the extra lanes are
            // next-row values, never used): masked memory accesses are much slower on some
            // cores, so they are kept for the plane's end.
            __m512 a0, b0, a1, b1;
            if ((size_t)(2 * oh + 1) * W + 2 * ow + 32 <= (size_t)H2 * W) {
                a0 = _mm512_loadu_ps(r0 + 2 * ow); b0 = _mm512_loadu_ps(r0 + 2 * ow + 16);
                a1 = _mm512_loadu_ps(r1 + 2 * ow); b1 = _mm512_loadu_ps(r1 + 2 * ow + 16);
            } else {
                a0 = _mm512_maskz_loadu_ps(ml, r0 + 2 * ow); b0 = _mm512_maskz_loadu_ps(mh, r0 + 2 * ow + 16);
                a1 = _mm512_maskz_loadu_ps(ml, r1 + 2 * ow); b1 = _mm512_maskz_loadu_ps(mh, r1 + 2 * ow + 16);
            }
            __m512 v[4] = { _mm512_permutex2var_ps(a0, even, b0), _mm512_permutex2var_ps(a0, odd, b0),
                            _mm512_permutex2var_ps(a1, even, b1), _mm512_permutex2var_ps(a1, odd, b1) };
            __m512i i0 = _mm512_add_epi32(_mm512_set1_epi32(2 * oh * W + 2 * ow), lane2);
            __m512i id[4] = { i0, _mm512_add_epi32(i0, _mm512_set1_epi32(1)), _mm512_add_epi32(i0, _mm512_set1_epi32(W)),
                              _mm512_add_epi32(i0, _mm512_set1_epi32(W + 1)) };
            __m512 m = ninf;
            __m512i am = i0;
            for (int t = 0; t < 4; t++) {
                __mmask16 take = _mm512_cmp_ps_mask(v[t], m, _CMP_GT_OQ) | _mm512_cmp_ps_mask(v[t], v[t], _CMP_UNORD_Q);
                m = _mm512_mask_mov_ps(m, take, v[t]);
                am = _mm512_mask_mov_epi32(am, take, id[t]);
            }
            if ((size_t)oh * OW + ow + 16 <= (size_t)OH * OW) {
                // lanes past the row land in the next output row, which is written after
                _mm512_storeu_ps(o + (size_t)oh * OW + ow, m);
                _mm512_storeu_si512((void *)(a + (size_t)oh * OW + ow), am);
            } else {
                _mm512_mask_storeu_ps(o + (size_t)oh * OW + ow, mo, m);
                _mm512_mask_storeu_epi32(a + (size_t)oh * OW + ow, mo, am);
            }
        }
    }
}
#endif

// out, argmax (N,C,OH,OW), inp (N,C,H,W)
void kd_maxpool2d_forward(float * out, int32_t * argmax, const float * inp, int N, int C, int H, int W,
                          int OH, int OW, int K, int S, int P) {
    int NC = N * C;
    size_t HW = (size_t)H * W, OHW = (size_t)OH * OW;
    if (K == 2 && S == 2 && P == 0) {
        void (*plane)(float *, int32_t *, const float *, int, int, int, int) = maxpool2x2_plane_c;
#ifdef KD_HAVE_AVX512_KERNELS
        if (simd_level() == KD_ISA_AVX512) { plane = maxpool2x2_plane_avx512; }
#endif
        #pragma omp parallel for schedule(static) if((size_t)NC * HW > KD_PAR_MIN)
        for (int nc = 0; nc < NC; nc++) {
            plane(out + (size_t)nc * OHW, argmax + (size_t)nc * OHW, inp + (size_t)nc * HW, H, W, OH, OW);
        }
        return;
    }
    #pragma omp parallel for schedule(static) if((size_t)NC * OHW * K * K > KD_PAR_MIN)
    for (int nc = 0; nc < NC; nc++) {
        const float * x = inp + (size_t)nc * HW;
        float * o = out + (size_t)nc * OHW;
        int32_t * a = argmax + (size_t)nc * OHW;
        for (int oh = 0; oh < OH; oh++) {
            float * orow = o + (size_t)oh * OW;
            int32_t * arow = a + (size_t)oh * OW;
            // PyTorch starts each window at its first in-image cell with -inf, then takes
            // strictly greater values (so ties keep the first in scan order) and lets NaN
            // win. Padded cells are never candidates.
            int h0 = imax(oh * S - P, 0);
            for (int ow = 0; ow < OW; ow++) {
                orow[ow] = -INFINITY;
                arow[ow] = (int32_t)(h0 * W + imax(ow * S - P, 0));
            }
            // Tap-major over the row of windows: each tap visits its windows in the same
            // (kh, kw) scan order as a per-window loop, but the inner loop runs along ow
            // with selects instead of data-dependent branches, so it vectorises.
            for (int kh = 0; kh < K; kh++) {
                int ih = oh * S - P + kh;
                if (ih < 0 || ih >= H) { continue; }
                for (int kw = 0; kw < K; kw++) {
                    int ow0, ow1;
                    valid_range(&ow0, &ow1, W, OW, kw, S, P);
                    int base = ih * W - P + kw;
                    for (int ow = ow0; ow < ow1; ow++) {
                        int idx = base + ow * S;
                        float v = x[idx];
                        int take = (v > orow[ow]) | (v != v);
                        orow[ow] = take ? v : orow[ow];
                        arow[ow] = take ? idx : arow[ow];
                    }
                }
            }
        }
    }
}

// dinp (N,C,H,W), dout, argmax (N,C,OH,OW). Windows overlap when S < K, so several
// outputs may route to one input; one thread owns each plane, so no races.
void kd_maxpool2d_backward(float * dinp, const float * dout, const int32_t * argmax, int N, int C,
                           int H, int W, int OH, int OW) {
    int NC = N * C;
    size_t HW = (size_t)H * W, OHW = (size_t)OH * OW;
    #pragma omp parallel for schedule(static) if((size_t)NC * OHW > KD_PAR_MIN)
    for (int nc = 0; nc < NC; nc++) {
        float * dx = dinp + (size_t)nc * HW;
        const float * dy = dout + (size_t)nc * OHW;
        const int32_t * a = argmax + (size_t)nc * OHW;
        for (size_t i = 0; i < OHW; i++) { dx[a[i]] += dy[i]; }
    }
}

// ----------------------------------------------------------------------------------------
// average pool
// https://pytorch.org/docs/stable/generated/torch.nn.AvgPool2d.html
// count_include_pad=True: padded zeros count, so the divisor is always K*K (ceil_mode is
// not supported, so windows never reach past the padding).

// out (N,C,OH,OW), inp (N,C,H,W)
void kd_avgpool2d_forward(float * out, const float * inp, int N, int C, int H, int W, int OH, int OW,
                          int K, int S, int P) {
    int NC = N * C;
    size_t HW = (size_t)H * W, OHW = (size_t)OH * OW;
    float div = (float)(K * K);
    #pragma omp parallel for schedule(static) if((size_t)NC * OHW * K * K > KD_PAR_MIN)
    for (int nc = 0; nc < NC; nc++) {
        const float * x = inp + (size_t)nc * HW;
        float * o = out + (size_t)nc * OHW;
        for (int oh = 0; oh < OH; oh++) {
            float * orow = o + (size_t)oh * OW;
            memset(orow, 0, (size_t)OW * sizeof(float));
            // Tap-major along the row of windows (vectorises along ow); each window still
            // sums its cells in (kh, kw) order, as a per-window loop would.
            for (int kh = 0; kh < K; kh++) {
                int ih = oh * S - P + kh;
                if (ih < 0 || ih >= H) { continue; }
                for (int kw = 0; kw < K; kw++) {
                    int ow0, ow1;
                    valid_range(&ow0, &ow1, W, OW, kw, S, P);
                    if (ow0 == ow1) { continue; }
                    axpy_gather(orow + ow0, 1.0f, x + (size_t)ih * W + (ow0 * S - P + kw), ow1 - ow0, S);
                }
            }
            // Divide (not multiply by 1/K^2) to round like PyTorch.
            for (int ow = 0; ow < OW; ow++) { orow[ow] /= div; }
        }
    }
}

// dinp (N,C,H,W), dout (N,C,OH,OW)
void kd_avgpool2d_backward(float * dinp, const float * dout, int N, int C, int H, int W, int OH,
                           int OW, int K, int S, int P) {
    int NC = N * C;
    size_t HW = (size_t)H * W, OHW = (size_t)OH * OW;
    float div = (float)(K * K);
    #pragma omp parallel for schedule(static) if((size_t)NC * OHW * K * K > KD_PAR_MIN)
    for (int nc = 0; nc < NC; nc++) {
        float * dx = dinp + (size_t)nc * HW;
        const float * dy = dout + (size_t)nc * OHW;
        for (int oh = 0; oh < OH; oh++) {
            for (int kh = 0; kh < K; kh++) {
                int ih = oh * S - P + kh;
                if (ih < 0 || ih >= H) { continue; }
                for (int kw = 0; kw < K; kw++) {
                    int ow0, ow1;
                    valid_range(&ow0, &ow1, W, OW, kw, S, P);
                    float * dxr = dx + (size_t)ih * W + (ow0 * S - P + kw);
                    const float * dyr = dy + (size_t)oh * OW;
                    // Every window shares the divisor K*K (padding counts).
                    for (int ow = ow0; ow < ow1; ow++) { dxr[(size_t)(ow - ow0) * S] += dyr[ow] / div; }
                }
            }
        }
    }
}

// ----------------------------------------------------------------------------------------
// global average pool
// https://pytorch.org/docs/stable/generated/torch.nn.AdaptiveAvgPool2d.html (output 1x1)

// out (N,C), inp (N,C,HW)
void kd_gap_forward(float * out, const float * inp, int N, int C, int HW) {
    int NC = N * C;
    #pragma omp parallel for schedule(static) if((size_t)NC * HW > KD_PAR_MIN)
    for (int nc = 0; nc < NC; nc++) {
        out[nc] = (float)(sum_f64(inp + (size_t)nc * HW, (size_t)HW) / (double)HW);
    }
}

// dinp (N,C,HW), dout (N,C)
void kd_gap_backward(float * dinp, const float * dout, int N, int C, int HW) {
    int NC = N * C;
    #pragma omp parallel for schedule(static) if((size_t)NC * HW > KD_PAR_MIN)
    for (int nc = 0; nc < NC; nc++) {
        float g = dout[nc] / (float)HW;
        float * dx = dinp + (size_t)nc * HW;
        for (int i = 0; i < HW; i++) { dx[i] += g; }
    }
}

// ----------------------------------------------------------------------------------------
// dropout (inverted: kept values are scaled by 1/(1-p) in training, eval is the identity)
// https://pytorch.org/docs/stable/generated/torch.nn.Dropout.html
// The draw for element i is a pure function of (seed, i), so the mask does not depend on
// the thread count. It will not match PyTorch's RNG stream, only its distribution.

// out, mask, inp (n)
void kd_dropout_forward(float * out, float * mask, const float * inp, size_t n, float p, uint64_t seed) {
    if (p <= 0.0f) {
        #pragma omp parallel for schedule(static) if(n > KD_PAR_MIN)
        for (size_t i = 0; i < n; i++) {
            mask[i] = 1.0f;
            out[i] = inp[i];
        }
        return;
    }
    // p >= 1 drops everything (every draw is < 1); avoid the infinite scale.
    float scale = p < 1.0f ? 1.0f / (1.0f - p) : 0.0f;
    #pragma omp parallel for schedule(static) if(n > KD_PAR_MIN)
    for (size_t i = 0; i < n; i++) {
        float m = kd_uniform(kd_hash(seed, (uint64_t)i)) < p ? 0.0f : scale;
        mask[i] = m;
        out[i] = inp[i] * m;
    }
}

// dinp, dout, mask (n)
void kd_dropout_backward(float * dinp, const float * dout, const float * mask, size_t n) {
    #pragma omp parallel for schedule(static) if(n > KD_PAR_MIN)
    for (size_t i = 0; i < n; i++) { dinp[i] += dout[i] * mask[i]; }
}

// ----------------------------------------------------------------------------------------
// add (residual connections)

// out, a, b (n)
void kd_add_forward(float * out, const float * a, const float * b, size_t n) {
    #pragma omp parallel for schedule(static) if(n > KD_PAR_MIN)
    for (size_t i = 0; i < n; i++) { out[i] = a[i] + b[i]; }
}

// da, db, dout (n); the gradient of a sum passes unchanged to both operands
void kd_add_backward(float * da, float * db, const float * dout, size_t n) {
    if (da != NULL) {
        #pragma omp parallel for schedule(static) if(n > KD_PAR_MIN)
        for (size_t i = 0; i < n; i++) { da[i] += dout[i]; }
    }
    if (db != NULL) {
        #pragma omp parallel for schedule(static) if(n > KD_PAR_MIN)
        for (size_t i = 0; i < n; i++) { db[i] += dout[i]; }
    }
}
