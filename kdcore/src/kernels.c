// Instruction-set dispatch, the conv micro-kernels (forward 8 x 32 tile, weight-gradient
// 4 x 6 tile of 16-lane dot products) in portable C, AVX-512 and AVX2, and the packing into
// their panels; conv.c and linear.c run them.
//
// SIMD: the file is compiled for x86-64-v3 (AVX2/FMA). The hot kernels also have AVX-512
// versions (__attribute__((target("avx512f")))) and the conv micro-kernels AVX2 ones,
// chosen at run time (simd_level: the CPU, KDCORE_ISA or kd_set_isa), that perform the same
// float operations in the same order as their portable twins: results do not depend on
// the instruction set (the C tests compare them bitwise). Only the linear layers' engine
// choice follows it (linear_engine), and with it their rounding.
#include "kernels.h"

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

int kd_simd_level(void) {
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

enum kd_isa kd_get_isa(void) { return (enum kd_isa)kd_simd_level(); }

const char * kd_isa_config(void) {
    static _Thread_local char buf[384];
    int level = kd_simd_level(), source = __atomic_load_n(&isa_source, __ATOMIC_RELAXED);
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

// K in chunks of CV_KB_AVX2: the three row passes of a chunk read the same B rows, which stay
// in L1 between passes (a whole K of B rows does not fit). A chunk continues the chains of
// the previous one through C (a float store and reload is exact), so the order of the fmas
// per element is unchanged.
#define CV_KB_AVX2 96
__attribute__((target("avx2,fma")))
static void fwd_ukr_avx2(int K, const float * restrict A, const float * restrict B,
                         const ptrdiff_t * restrict off, float * restrict C, size_t ldc, int acc_in) {
    int k0 = 0;
    do {
        int kn = imin(CV_KB_AVX2, K - k0), in = acc_in || k0 > 0;
        const float * a = A + (size_t)k0 * CV_MR;
        fwd_rows3_avx2(kn, a, B, off + k0, C, ldc, in, 0);
        fwd_rows3_avx2(kn, a, B, off + k0, C, ldc, in, 3);
        fwd_rows2_avx2(kn, a, B, off + k0, C, ldc, in, 6);
        k0 += kn;
    } while (k0 < K);
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
// accumulators, 8 loads per 12 fmas); the halves meet in the hsum16 tree. The empty asm keeps
// each B vector in a register: otherwise GCC folds its load into both fmas (14 loads per 12).
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
                        __asm__("" : "+x"(v));
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

struct conv_kernels kd_conv_kernels(void) {
    struct conv_kernels k = { fwd_ukr_c, dw_ukr_c };
#ifdef KD_HAVE_AVX512_KERNELS
    int l = kd_simd_level();
    if (l == KD_ISA_AVX512) { k.fwd = fwd_ukr_avx512; k.dw = dw_ukr_avx512; }
    if (l == KD_ISA_AVX2) { k.fwd = fwd_ukr_avx2; k.dw = dw_ukr_avx2; }
#endif
    return k;
}


// ---- packing -------------------------------------------------------------------------------
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
void kd_pack_rows8(float * dst, size_t ldd, const float * src, size_t lds, int rows, int K) {
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
void kd_pack_cols(float * dst, size_t ldd, const float * src, size_t lds, int width, int valid, int K) {
    for (int k = 0; k < K; k++) {
        for (int c = 0; c < width; c++) { dst[(size_t)k * ldd + c] = c < valid ? src[(size_t)k * lds + c] : 0.0f; }
    }
}
