// Internal helpers shared by the kdcore sources: error reporting, RNG, OpenMP shims.
// Nothing here is part of the public API.
#ifndef KD_INTERNAL_H
#define KD_INTERNAL_H

#include "kdcore.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

// ---------------------------------------------------------------------------------------
// Errors: KD_FAIL records "func: message" in a thread-local buffer and returns the status.

enum kd_status kd_set_error_(enum kd_status st, const char * func, const char * fmt, ...)
    __attribute__((format(printf, 3, 4)));
#define KD_FAIL(st, ...) return kd_set_error_((st), __func__, __VA_ARGS__)
#define KD_TRY(expr) do { enum kd_status st_ = (expr); if (st_ != KD_OK) return st_; } while (0)

#ifdef KD_DEBUG
#include <stdio.h>
#define KD_ASSERT(x) do { if (!(x)) { fprintf(stderr, "%s:%d: KD_ASSERT(%s)\n", __FILE__, __LINE__, #x); abort(); } } while (0)
#else
#define KD_ASSERT(x) ((void)0)
#endif

// size_t multiplication with overflow detection: returns false on overflow.
static inline bool kd_mul_ok(size_t a, size_t b, size_t * out) {
    return !__builtin_mul_overflow(a, b, out);
}

// ---------------------------------------------------------------------------------------
// RNG: splitmix64 as a counter-based generator. kd_hash(seed, i) is a pure function, so
// random draws indexed by element or sample position do not depend on thread scheduling.

static inline uint64_t kd_splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}
static inline uint64_t kd_hash(uint64_t seed, uint64_t i) {
    return kd_splitmix64(kd_splitmix64(seed) ^ (i * 0xD1B54A32D192ED03ull));
}
// Uniform in [0, 1) with 24 random bits (exactly representable in float).
static inline float kd_uniform(uint64_t h) { return (float)(h >> 40) * (1.0f / 16777216.0f); }
// Standard normal from two hashed uniforms (Box-Muller; u1 in (0,1]).
static inline float kd_normal(uint64_t seed, uint64_t i) {
    uint64_t a = kd_hash(seed, 2 * i), b = kd_hash(seed, 2 * i + 1);
    double u1 = ((double)(a >> 11) + 1.0) * (1.0 / 9007199254740992.0);
    double u2 = (double)(b >> 11) * (1.0 / 9007199254740992.0);
    return (float)(sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2));
}

// ---------------------------------------------------------------------------------------
// OpenMP shims so NO_OMP=1 builds compile unchanged.

#ifdef _OPENMP
static inline int kd_omp_threads(void) { return omp_get_max_threads(); }
static inline int kd_omp_tid(void) { return omp_get_thread_num(); }
static inline int kd_omp_team(void) { return omp_get_num_threads(); }   // of the current region
#else
static inline int kd_omp_threads(void) { return 1; }
static inline int kd_omp_tid(void) { return 0; }
static inline int kd_omp_team(void) { return 1; }
#endif

// Static contiguous share [*i0, *i1) of n items for part `part` of `parts`: the first
// n % parts parts take one extra item; parts past n get an empty range.
static inline void kd_split(size_t n, int part, int parts, size_t * i0, size_t * i1) {
    size_t p = (size_t)part, np = (size_t)parts, base = n / np, rem = n % np;
    *i0 = p * base + (p < rem ? p : rem);
    *i1 = *i0 + base + (p < rem ? 1 : 0);
}

// ---------------------------------------------------------------------------------------
// Deterministic mode (kd_set_deterministic): work that would be split by the thread count
// is split into pieces fixed by the shapes alone instead.

// Conv weight/bias gradients: the batch is cut into this many chunks (fewer when N is
// smaller), each reduced into its own partial, the partials summed in chunk order.
#define KD_DET_CONV_CHUNKS 8

// ---------------------------------------------------------------------------------------
// The step engine (train.c), shared by kd_step_epoch and the schemes (schemes.c).

// kd_step_epoch, with `fn` (the public function called) naming failures.
enum kd_status kd_step_run_(const struct kd_step_cfg * s, const struct kd_dataset * ds, const struct kd_train_cfg * cfg,
                            int epoch, struct kd_step_stats * out, const char * fn);
// A term's weight at an epoch: its warm-up ramp and stop epoch applied.
float kd_term_weight_(const struct kd_term * t, int epoch);
// A BN node's running mean and variance (in_ch floats each, in the net's buffer block);
// false when the node is not a BatchNorm node of a finalized net.
bool kd_net_bn_running_(struct kd_net * net, int node, const float ** rmean, const float ** rvar);

// ---- loss terms of the step engine (terms.c) -----------------------------------------
// The index of a row's largest value (the first of equal ones).
static inline int kd_argmax_row(const float * z, int V) {
    int best = 0;
    for (int k = 1; k < V; k++) if (z[k] > z[best]) best = k;
    return best;
}

// A term's computation on one target. `a` is the learning input, `b` one target (a source
// reference, or a mixture of several); da/db (NULL: no gradient there) receive the gradient
// of w * term, added. Shapes are per sample.
struct pair_io {
    const float * a, * b, * a2, * b2;
    float * da, * db, * da2, * db2;
    int nb, ac, ah, aw, bc, bh, bw, a2c, a2h, a2w, b2c, b2h, b2w;
    const int64_t * y, * idx; // labels; data-set indices of the batch (CRD)
    const float * mask;       // per-sample weights of the term (conditional learning) or NULL
    const float * rmean, * rvar;   // a BN node's running statistics (BN-statistics term)
    const float * params;     // a parameter holder's block and gradient (VID's log_scale,
    float * dparams;          // CTKD's temperature)
    int epoch;                // CTKD's curriculum
    float * scratch;          // the term's own scratch (CRD: normalised rows and their gradients)
    float smooth;             // the train cfg's label smoothing (CE)
    float w;
    float value, part[2];     // out: the unweighted term, its parts (DKD: TCKD, NCKD)
};

// Per kind: its name, what it reads, and how it computes. A kind reads logits (V values per
// sample, checked against the labels' classes) or maps of any shape.
struct term_kind_info {
    const char * name;        // kd_term_kind_name
    const char * what;        // default name in messages
    bool logits;              // its inputs are logits
    bool src;                 // it has a target (a source); else it reads `a` and the labels
    bool src_grad;            // it can give the gradient w.r.t. its target (src.grad)
    bool same_shape;          // a and the target must have the same shape
    bool params;              // it has parameters of its own, in a parameter-holder net (kd_term.params)
    enum kd_status (*pair)(const struct kd_term *, struct pair_io *);
};
extern const struct term_kind_info kd_term_kinds[KD_TERM_COUNT];

#endif // KD_INTERNAL_H
