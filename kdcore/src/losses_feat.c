// Parameter-free feature- and relation-based distillation losses over feature maps: AT, SP,
// NST, RKD, PKT, FSP (and, at the end, DeepInversion's BN-statistics loss and image priors).
// Each computes the loss as RepDistiller / mdistiller define it (the
// header's "Feature and relation losses" section says where a paper's form differs and which
// option gives it) and the gradient of weight * loss w.r.t. the student map and, when asked,
// the teacher map.
//
// Implementation rules (DEVELOPERS.md):
// - products of feature matrices are GEMMs on kdcore's linear product (layers.h:
//   kd_linear_forward out = A B^T, kd_linear_backward dinp += dout W, dW += dout^T inp), never
//   the references' broadcasts (NST's B x C x C x HW tensor, RKD's B x B x D differences);
// - everything else (normalisations, pooling, kernels of the losses, reductions) in double;
// - OpenMP only over independent outputs (a sample, a row of a pairwise matrix), each
//   computed by one thread in a fixed order, partial losses summed serially: results do not
//   depend on the thread count whenever the products do not (deterministic mode, or the own
//   product, which every element computes as one fma chain in k order);
// - scratch is one malloc per call, sized up front (struct scratch), freed before return; its
//   size is reported by kd_loss_feat_scratch().
#include "kd_internal.h"
#include "layers.h"

#include <stdint.h>

// ---------------------------------------------------------------------------------------
// Scratch: pieces reserved up front (64-byte aligned offsets), one allocation.

static _Thread_local size_t feat_scratch_bytes;

size_t kd_loss_feat_scratch(void) { return feat_scratch_bytes; }

struct scratch {
    size_t bytes;
    bool overflow;
    char * base;
};

static size_t sc_reserve(struct scratch * sc, size_t count, size_t elem) {
    size_t b;
    if (!kd_mul_ok(count, elem, &b) || b > SIZE_MAX / 2 || sc->bytes > SIZE_MAX / 2 - b - 64) {
        sc->overflow = true;
        return 0;
    }
    size_t off = sc->bytes;
    sc->bytes += (b + 63) & ~(size_t)63;
    return off;
}

// n * per-thread pieces: reserve `count` elements for each of `nt` threads.
static size_t sc_reserve_nt(struct scratch * sc, int nt, size_t count, size_t elem) {
    size_t c;
    if (!kd_mul_ok(count, (size_t)nt, &c)) { sc->overflow = true; return 0; }
    return sc_reserve(sc, c, elem);
}

static bool sc_alloc(struct scratch * sc) {
    feat_scratch_bytes = 0;
    if (sc->overflow) return false;
    sc->base = aligned_alloc(64, sc->bytes ? sc->bytes : 64);
    if (sc->base) feat_scratch_bytes = sc->bytes;
    return sc->base != NULL;
}

#define SC(sc, off, type) ((type *)(void *)((sc).base + (off)))
#define SC_FAIL(sc) KD_FAIL(KD_ERR_NOMEM, (sc).overflow ? "scratch size overflows size_t" \
                                                        : "cannot allocate %zu bytes of scratch", (sc).bytes)

// ---------------------------------------------------------------------------------------
// Argument checks. The messages name the argument; `func` is the API function.

static enum kd_status check_map(const char * func, struct kd_fmap m, const char * name) {
    if (!m.x) return kd_set_error_(KD_ERR_VALUE, func, "%s.x is NULL", name);
    if (m.n < 1 || m.c < 1 || m.h < 1 || m.w < 1)
        return kd_set_error_(KD_ERR_SHAPE, func, "%s has shape (n=%d, c=%d, h=%d, w=%d); every size must be >= 1",
                             name, m.n, m.c, m.h, m.w);
    size_t chw, all;
    if (!kd_mul_ok((size_t)m.c, (size_t)m.h, &chw) || !kd_mul_ok(chw, (size_t)m.w, &chw) || chw > INT32_MAX ||
        !kd_mul_ok(chw, (size_t)m.n, &all))
        return kd_set_error_(KD_ERR_SHAPE, func, "%s: c*h*w = %d*%d*%d is above %d", name, m.c, m.h, m.w, INT32_MAX);
    return KD_OK;
}

static enum kd_status check_same_n(const char * func, struct kd_fmap a, const char * an, struct kd_fmap b,
                                   const char * bn) {
    if (a.n != b.n) return kd_set_error_(KD_ERR_SHAPE, func, "%s.n (%d) must equal %s.n (%d)", bn, b.n, an, a.n);
    return KD_OK;
}

static enum kd_status check_weight(const char * func, float weight) {
    if (!isfinite(weight)) return kd_set_error_(KD_ERR_VALUE, func, "weight (%g) must be finite", (double)weight);
    return KD_OK;
}

static inline void put(float * d, double g, bool accumulate) { *d = accumulate ? *d + (float)g : (float)g; }
static inline int imin(int a, int b) { return a < b ? a : b; }
static inline int imax(int a, int b) { return a > b ? a : b; }
static inline size_t chw_of(struct kd_fmap m) { return (size_t)m.c * m.h * m.w; }

// Threads for a loop over `items` samples doing `work` operations in all: one below 2^16
// (a parallel region costs more than it saves there), else at most one per sample.
#define FEAT_PAR_MIN 65536.0
static int threads_for(int items, double work) {
    int nt = kd_omp_threads();
    if (work < FEAT_PAR_MIN) return 1;
    return nt < items ? nt : items < 1 ? 1 : items;
}

// ---------------------------------------------------------------------------------------
// Adaptive average pooling (torch.nn.functional.adaptive_avg_pool2d) of one sample's (C, H, W)
// map to (C, OH, OW), OH <= H, OW <= W: output bin i covers inputs [floor(i I/O),
// ceil((i+1) I/O)), so bins overlap when O does not divide I. Same sizes = identity.

// The bins of one dimension (I inputs -> O outputs): output i covers [lo[i], hi[i]) with
// inv[i] = 1 / (hi[i] - lo[i]); input y lies in the bins first[y]..last[y]. Tables built once
// per call (in the scratch), shared read-only by the threads.
struct bins { const int * lo, * hi, * first, * last; const double * inv; };
struct pool {
    int H, W, OH, OW;
    bool same;       // identity: no tables
    size_t off;      // the tables' offset in the scratch
    struct bins h, w;
};

static inline int bin_lo(int i, int I, int O) { return (int)(((int64_t)i * I) / O); }
static inline int bin_hi(int i, int I, int O) { return (int)(((int64_t)(i + 1) * I + O - 1) / O); }
static inline int bin_first(int y, int I, int O) { return (int)(((int64_t)y * O) / I); }
static inline int bin_last(int y, int I, int O) { return (int)(((int64_t)(y + 1) * O + I - 1) / I) - 1; }

// A map pooled to (OH, OW), and its tables' bytes: 16 (OH + OW) + 8 (H + W) when pooled.
static struct pool pool_to(struct kd_fmap m, int OH, int OW) {
    return (struct pool){ .H = m.h, .W = m.w, .OH = OH, .OW = OW, .same = m.h == OH && m.w == OW };
}
static void pool_reserve(struct scratch * sc, struct pool * p) {
    if (!p->same) p->off = sc_reserve(sc, 16 * ((size_t)p->OH + p->OW) + 8 * ((size_t)p->H + p->W), 1);
}
static void bins_fill(struct bins * b, double * inv, int * ints, int I, int O) {
    int * lo = ints, * hi = lo + O, * first = hi + O, * last = first + I;
    for (int i = 0; i < O; i++) {
        lo[i] = bin_lo(i, I, O);
        hi[i] = bin_hi(i, I, O);
        inv[i] = 1.0 / (hi[i] - lo[i]);
    }
    for (int y = 0; y < I; y++) { first[y] = bin_first(y, I, O); last[y] = bin_last(y, I, O); }
    *b = (struct bins){ lo, hi, first, last, inv };
}
static void pool_tables(char * base, struct pool * p) {
    if (p->same) return;
    double * inv = (double *)(void *)(base + p->off);
    int * ints = (int *)(inv + p->OH + p->OW);
    bins_fill(&p->h, inv, ints, p->H, p->OH);
    bins_fill(&p->w, inv + p->OH, ints + 2 * (p->OH + p->H), p->W, p->OW);
}

static void pool_fwd(double * out, const float * x, int C, const struct pool * p) {
    const size_t HW = (size_t)p->H * p->W, M = (size_t)p->OH * p->OW;
    if (p->same) {
        for (size_t k = 0; k < (size_t)C * HW; k++) out[k] = x[k];
        return;
    }
    const struct bins bh = p->h, bw = p->w;
    for (int c = 0; c < C; c++) {
        const float * xc = x + (size_t)c * HW;
        double * oc = out + (size_t)c * M;
        for (int i = 0; i < p->OH; i++) {
            for (int j = 0; j < p->OW; j++) {
                double sum = 0;
                for (int y = bh.lo[i]; y < bh.hi[i]; y++)
                    for (int xx = bw.lo[j]; xx < bw.hi[j]; xx++) sum += xc[(size_t)y * p->W + xx];
                oc[(size_t)i * p->OW + j] = sum * bh.inv[i] * bw.inv[j];
            }
        }
    }
}

// dx (C, H, W) = (or +=) the gradient through the pooling of dout (C, OH, OW): each input
// gathers dout / area over the bins that contain it, so it is written exactly once.
static void pool_bwd(float * dx, const double * dout, int C, const struct pool * p, bool accumulate) {
    const size_t HW = (size_t)p->H * p->W, M = (size_t)p->OH * p->OW;
    if (p->same) {
        for (size_t k = 0; k < (size_t)C * HW; k++) put(&dx[k], dout[k], accumulate);
        return;
    }
    const struct bins bh = p->h, bw = p->w;
    for (int c = 0; c < C; c++) {
        const double * dc = dout + (size_t)c * M;
        float * xc = dx + (size_t)c * HW;
        for (int y = 0; y < p->H; y++) {
            for (int xx = 0; xx < p->W; xx++) {
                double g = 0;
                for (int i = bh.first[y]; i <= bh.last[y]; i++) {
                    double gi = 0;
                    for (int j = bw.first[xx]; j <= bw.last[xx]; j++) gi += dc[(size_t)i * p->OW + j] * bw.inv[j];
                    g += gi * bh.inv[i];
                }
                put(&xc[(size_t)y * p->W + xx], g, accumulate);
            }
        }
    }
}

// F.normalize(v) = v / max(||v||, eps) and its backward: dv = (dy - y (y . dy)) / ||v|| when
// ||v|| >= eps, dy / eps otherwise (the clamp passes no gradient to the norm).
#define NORM_EPS 1e-12

// ||v||_2 without overflow or underflow (v in double; inputs are floats, so only sums of
// squares of powers can leave the range).
static double norm2(const double * v, size_t n) {
    double m = 0;
    for (size_t k = 0; k < n; k++) m = fabs(v[k]) > m ? fabs(v[k]) : m;
    if (m == 0 || !isfinite(m)) return m;
    double s = 0;
    for (size_t k = 0; k < n; k++) { double u = v[k] / m; s += u * u; }
    return m * sqrt(s);
}

// In place: dy (the gradient w.r.t. y = v / max(nrm, eps)) becomes the gradient w.r.t. v.
static void normalize_bwd(double * dy, const double * y, double nrm, size_t n) {
    if (nrm >= NORM_EPS) {
        double dot = 0;
        for (size_t k = 0; k < n; k++) dot += y[k] * dy[k];
        for (size_t k = 0; k < n; k++) dy[k] = (dy[k] - y[k] * dot) / nrm;
    } else {
        for (size_t k = 0; k < n; k++) dy[k] /= NORM_EPS;
    }
}


// ---------------------------------------------------------------------------------------
// AT

// |v|^p and its derivative p |v|^(p-1) sign(v) (0 at v = 0).
static inline double powp(double v, double p) {
    double a = fabs(v);
    return p == 2 ? a * a : p == 1 ? a : pow(a, p);
}
static inline double dpowp(double v, double p) {
    if (v == 0) return 0;
    double a = fabs(v), g = p == 2 ? 2 * a : p == 1 ? 1 : p * pow(a, p - 1);
    return v > 0 ? g : -g;
}

// q (M) = k * sum_c |P_c|^p, then a = q / max(||q||, eps); returns ||q||.
static double at_map(double * a, const double * P, int C, size_t M, double p, double k) {
    for (size_t m = 0; m < M; m++) a[m] = 0;
    for (int c = 0; c < C; c++)
        for (size_t m = 0; m < M; m++) a[m] += powp(P[(size_t)c * M + m], p);
    for (size_t m = 0; m < M; m++) a[m] *= k;
    double nrm = norm2(a, M), r = nrm >= NORM_EPS ? nrm : NORM_EPS;
    for (size_t m = 0; m < M; m++) a[m] /= r;
    return nrm;
}

// da (M): gradient w.r.t. a; returns through the normalisation, the power and the pooling
// into dx of one sample.
static void at_bwd(float * dx, double * da, const double * a, double nrm, const double * P, double * dP,
                   struct kd_fmap m, const struct pool * pl, size_t M, double p, double k, bool accumulate) {
    normalize_bwd(da, a, nrm, M);
    for (int c = 0; c < m.c; c++)
        for (size_t j = 0; j < M; j++) dP[(size_t)c * M + j] = da[j] * k * dpowp(P[(size_t)c * M + j], p);
    pool_bwd(dx, dP, m.c, pl, accumulate);
}

enum kd_status kd_loss_at(float * loss, float * ds, float * dt, struct kd_fmap s, struct kd_fmap t, float p,
                          enum kd_at_form form, float weight, bool accumulate) {
    KD_TRY(check_map(__func__, s, "s"));
    KD_TRY(check_map(__func__, t, "t"));
    KD_TRY(check_same_n(__func__, s, "s", t, "t"));
    KD_TRY(check_weight(__func__, weight));
    if (!(p >= 1) || !isfinite(p)) KD_FAIL(KD_ERR_VALUE, "p (%g) must be finite and >= 1", (double)p);
    if (form != KD_AT_CODE && form != KD_AT_PAPER) KD_FAIL(KD_ERR_VALUE, "form (%d) must be KD_AT_CODE or KD_AT_PAPER", (int)form);
    const int n = s.n, OH = imin(s.h, t.h), OW = imin(s.w, t.w);
    const size_t M = (size_t)OH * OW;
    struct pool ps = pool_to(s, OH, OW), pt = pool_to(t, OH, OW);
    const double ks = form == KD_AT_CODE ? 1.0 / s.c : 1.0, kt = form == KD_AT_CODE ? 1.0 / t.c : 1.0;
    const int nt = threads_for(n, (double)n * (chw_of(s) + chw_of(t)));
    const size_t cmax = (size_t)imax(s.c, t.c);
    // per thread: pooled maps (Cs + Ct) M, their gradient max(Cs, Ct) M, a_s, a_t, da M each
    struct scratch sc = { 0 };
    size_t o_loss = sc_reserve(&sc, (size_t)n, sizeof(double));
    size_t o_Ps = sc_reserve_nt(&sc, nt, (size_t)s.c * M, sizeof(double));
    size_t o_Pt = sc_reserve_nt(&sc, nt, (size_t)t.c * M, sizeof(double));
    size_t o_dP = sc_reserve_nt(&sc, nt, cmax * M, sizeof(double));
    size_t o_v = sc_reserve_nt(&sc, nt, 3 * M, sizeof(double));
    pool_reserve(&sc, &ps);
    pool_reserve(&sc, &pt);
    if (!sc_alloc(&sc)) SC_FAIL(sc);
    pool_tables(sc.base, &ps);
    pool_tables(sc.base, &pt);
    double * part = SC(sc, o_loss, double);
    const size_t ss = chw_of(s), st = chw_of(t);
    const double dp = p;

    #pragma omp parallel num_threads(nt)
    {
        const int tid = kd_omp_tid();
        double * Ps = SC(sc, o_Ps, double) + (size_t)tid * s.c * M;
        double * Pt = SC(sc, o_Pt, double) + (size_t)tid * t.c * M;
        double * dP = SC(sc, o_dP, double) + (size_t)tid * cmax * M;
        double * as = SC(sc, o_v, double) + (size_t)tid * 3 * M, * at = as + M, * da = at + M;
        #pragma omp for schedule(static)
        for (int i = 0; i < n; i++) {
            pool_fwd(Ps, s.x + (size_t)i * ss, s.c, &ps);
            pool_fwd(Pt, t.x + (size_t)i * st, t.c, &pt);
            double ns = at_map(as, Ps, s.c, M, dp, ks), nrt = at_map(at, Pt, t.c, M, dp, kt);
            double d2 = 0;
            for (size_t m = 0; m < M; m++) d2 += (as[m] - at[m]) * (as[m] - at[m]);
            double dist = sqrt(d2);
            part[i] = form == KD_AT_CODE ? d2 : dist;
            if (!ds && !dt) continue;
            // d loss_i / d a_s: code 2 (a_s - a_t) / (n M); paper (a_s - a_t) / (n ||a_s - a_t||), 0 at 0
            double g = form == KD_AT_CODE ? 2.0 * weight / ((double)n * M) : dist > 0 ? weight / (n * dist) : 0.0;
            if (ds) {
                for (size_t m = 0; m < M; m++) da[m] = g * (as[m] - at[m]);
                at_bwd(ds + (size_t)i * ss, da, as, ns, Ps, dP, s, &ps, M, dp, ks, accumulate);
            }
            if (dt) {
                for (size_t m = 0; m < M; m++) da[m] = g * (at[m] - as[m]);
                at_bwd(dt + (size_t)i * st, da, at, nrt, Pt, dP, t, &pt, M, dp, kt, accumulate);
            }
        }
    }
    double total = 0;
    for (int i = 0; i < n; i++) total += part[i];
    total /= form == KD_AT_CODE ? (double)n * M : (double)n;
    free(sc.base);
    if (loss) *loss = (float)total;
    if (!isfinite(total)) KD_FAIL(KD_ERR_NONFINITE, "AT loss is not finite");
    return KD_OK;
}

// ---------------------------------------------------------------------------------------
// SP

// Gradient w.r.t. the rows of G (n x n, float) of the loss through Gh = row-normalised G:
// dG_ij = normalize_bwd(dGh_i)_j, then S = dG + dG^T (float, for the product with F).
static void sp_side(float * S, double * dG, const float * G, const double * r, const double * dGh, int n) {
    for (int i = 0; i < n; i++) {
        double rr = r[i] >= NORM_EPS ? r[i] : NORM_EPS, dot = 0;
        for (int j = 0; j < n; j++) dot += G[(size_t)i * n + j] / rr * dGh[(size_t)i * n + j];
        for (int j = 0; j < n; j++) {
            double y = G[(size_t)i * n + j] / rr;
            dG[(size_t)i * n + j] = r[i] >= NORM_EPS ? (dGh[(size_t)i * n + j] - y * dot) / r[i] : dGh[(size_t)i * n + j] / NORM_EPS;
        }
    }
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) S[(size_t)i * n + j] = (float)(dG[(size_t)i * n + j] + dG[(size_t)j * n + i]);
}

static void row_norms(double * r, const float * G, int n) {
    for (int i = 0; i < n; i++) {
        double s = 0;
        for (int j = 0; j < n; j++) s += (double)G[(size_t)i * n + j] * G[(size_t)i * n + j];
        r[i] = sqrt(s);
    }
}

enum kd_status kd_loss_sp(float * loss, float * ds, float * dt, struct kd_fmap s, struct kd_fmap t, float weight,
                          bool accumulate) {
    KD_TRY(check_map(__func__, s, "s"));
    KD_TRY(check_map(__func__, t, "t"));
    KD_TRY(check_same_n(__func__, s, "s", t, "t"));
    KD_TRY(check_weight(__func__, weight));
    const int n = s.n, Ds = (int)chw_of(s), Dt = (int)chw_of(t);
    const size_t nn = (size_t)n * n;
    struct scratch sc = { 0 };
    size_t o_Gs = sc_reserve(&sc, nn, sizeof(float)), o_Gt = sc_reserve(&sc, nn, sizeof(float));
    size_t o_S = sc_reserve(&sc, nn, sizeof(float));
    size_t o_dGh = sc_reserve(&sc, nn, sizeof(double)), o_dG = sc_reserve(&sc, nn, sizeof(double));
    size_t o_r = sc_reserve(&sc, 2 * (size_t)n, sizeof(double));
    size_t o_ws = sc_reserve(&sc, kd_linear_workspace(n, imax(Ds, Dt), n), sizeof(float));
    if (!sc_alloc(&sc)) SC_FAIL(sc);
    float * Gs = SC(sc, o_Gs, float), * Gt = SC(sc, o_Gt, float), * S = SC(sc, o_S, float), * ws = SC(sc, o_ws, float);
    double * dGh = SC(sc, o_dGh, double), * dG = SC(sc, o_dG, double), * rs = SC(sc, o_r, double), * rt = rs + n;
    kd_linear_forward(Gs, s.x, s.x, NULL, n, Ds, n, ws);   // G = F F^T
    kd_linear_forward(Gt, t.x, t.x, NULL, n, Dt, n, ws);
    row_norms(rs, Gs, n);
    row_norms(rt, Gt, n);
    double total = 0;
    for (int i = 0; i < n; i++) {
        double ris = rs[i] >= NORM_EPS ? rs[i] : NORM_EPS, rit = rt[i] >= NORM_EPS ? rt[i] : NORM_EPS;
        for (int j = 0; j < n; j++) {
            double d = Gs[(size_t)i * n + j] / ris - Gt[(size_t)i * n + j] / rit;
            total += d * d;
            dGh[(size_t)i * n + j] = 2.0 * weight * d / (double)nn;   // d(weight * loss) / dGh_s
        }
    }
    total /= (double)nn;
    if (loss) *loss = (float)total;
    if (!isfinite(total)) { free(sc.base); KD_FAIL(KD_ERR_NONFINITE, "SP loss is not finite"); }
    if (ds) {   // ds (+)= S F_s
        sp_side(S, dG, Gs, rs, dGh, n);
        if (!accumulate) memset(ds, 0, (size_t)n * Ds * sizeof(float));
        kd_linear_backward(ds, NULL, NULL, S, s.x, s.x, n, Ds, n, ws);
    }
    if (dt) {
        for (size_t k = 0; k < nn; k++) dGh[k] = -dGh[k];
        sp_side(S, dG, Gt, rt, dGh, n);
        if (!accumulate) memset(dt, 0, (size_t)n * Dt * sizeof(float));
        kd_linear_backward(dt, NULL, NULL, S, t.x, t.x, n, Dt, n, ws);
    }
    free(sc.base);
    return KD_OK;
}

// ---------------------------------------------------------------------------------------
// NST

// Pool one sample, L2-normalise each channel's spatial vector: P (double, pooled), U (float,
// normalised, the GEMM operand), nrm (C).
static void nst_prep(float * U, double * P, double * nrm, const float * x, int C, const struct pool * pl, size_t M) {
    pool_fwd(P, x, C, pl);
    for (int c = 0; c < C; c++) {
        nrm[c] = norm2(P + (size_t)c * M, M);
        double r = nrm[c] >= NORM_EPS ? nrm[c] : NORM_EPS;
        for (size_t m = 0; m < M; m++) U[(size_t)c * M + m] = (float)(P[(size_t)c * M + m] / r);
    }
}

static double sum_sq(const float * a, size_t n) {
    double s = 0;
    for (size_t k = 0; k < n; k++) s += (double)a[k] * a[k];
    return s;
}

// dU = a A - b B (C x M) in double; back through the channel normalisation (y = P / nrm
// recomputed in double) and the pooling into dx of one sample.
static void nst_bwd(float * dx, double * dU, const float * A, double a, const float * B, double b, const double * P,
                    const double * nrm, int C, size_t M, const struct pool * pl, bool accumulate) {
    // a == b (Cs == Ct) as a (A - B): exactly 0 when s = t (a A - b B may be contracted to
    // an fma that leaves the rounding error of a A)
    if (a == b)
        for (size_t k = 0; k < (size_t)C * M; k++) dU[k] = a * ((double)A[k] - B[k]);
    else
        for (size_t k = 0; k < (size_t)C * M; k++) dU[k] = a * A[k] - b * B[k];
    for (int c = 0; c < C; c++) {
        double * d = dU + (size_t)c * M;
        const double * pc = P + (size_t)c * M;
        if (nrm[c] >= NORM_EPS) {
            double dot = 0;
            for (size_t m = 0; m < M; m++) dot += pc[m] / nrm[c] * d[m];
            for (size_t m = 0; m < M; m++) d[m] = (d[m] - pc[m] / nrm[c] * dot) / nrm[c];
        } else {
            for (size_t m = 0; m < M; m++) d[m] /= NORM_EPS;
        }
    }
    pool_bwd(dx, dU, C, pl, accumulate);
}

enum kd_status kd_loss_nst(float * loss, float * ds, float * dt, struct kd_fmap s, struct kd_fmap t, float weight,
                           bool accumulate) {
    KD_TRY(check_map(__func__, s, "s"));
    KD_TRY(check_map(__func__, t, "t"));
    KD_TRY(check_same_n(__func__, s, "s", t, "t"));
    KD_TRY(check_weight(__func__, weight));
    const int n = s.n, Cs = s.c, Ct = t.c, OH = imin(s.h, t.h), OW = imin(s.w, t.w);
    const size_t M = (size_t)OH * OW, cmax = (size_t)imax(Cs, Ct);
    struct pool pls = pool_to(s, OH, OW), plt = pool_to(t, OH, OW);
    const int nt = threads_for(n, (double)n * (Cs + Ct) * (Cs + Ct) * M), Mi = (int)M;
    const bool grad = ds || dt;
    size_t wsz = kd_linear_workspace(Cs, Mi, Cs), w2 = kd_linear_workspace(Cs, Mi, Ct), w3 = kd_linear_workspace(Ct, Mi, Ct);
    wsz = wsz > w2 ? wsz : w2;
    wsz = wsz > w3 ? wsz : w3;
    // per thread: P_s, P_t (double), U_s, U_t (float), norms, the three kernels (float), the
    // four products K U (float) and dU (double) when a gradient is wanted, the GEMM workspace
    struct scratch sc = { 0 };
    size_t o_loss = sc_reserve(&sc, (size_t)n, sizeof(double));
    size_t o_P = sc_reserve_nt(&sc, nt, ((size_t)Cs + Ct) * M, sizeof(double));
    size_t o_U = sc_reserve_nt(&sc, nt, ((size_t)Cs + Ct) * M, sizeof(float));
    size_t o_nrm = sc_reserve_nt(&sc, nt, (size_t)Cs + Ct, sizeof(double));
    size_t o_K = sc_reserve_nt(&sc, nt, (size_t)Cs * Cs + (size_t)Ct * Ct + (size_t)Cs * Ct, sizeof(float));
    size_t o_A = grad ? sc_reserve_nt(&sc, nt, 2 * ((size_t)Cs + Ct) * M, sizeof(float)) : 0;
    size_t o_dU = grad ? sc_reserve_nt(&sc, nt, cmax * M, sizeof(double)) : 0;
    size_t o_ws = sc_reserve_nt(&sc, nt, wsz, sizeof(float));
    pool_reserve(&sc, &pls);
    pool_reserve(&sc, &plt);
    if (!sc_alloc(&sc)) SC_FAIL(sc);
    pool_tables(sc.base, &pls);
    pool_tables(sc.base, &plt);
    double * part = SC(sc, o_loss, double);
    const size_t ss = chw_of(s), st = chw_of(t);
    // d(weight * loss) / dU_s = a_s K_ss U_s - b K_st U_t; / dU_t = a_t K_tt U_t - b K_st^T U_s
    const double as = 4.0 * weight / ((double)n * Cs * Cs), at = 4.0 * weight / ((double)n * Ct * Ct),
                 b = 4.0 * weight / ((double)n * Cs * Ct);

    #pragma omp parallel num_threads(nt)
    {
        const int tid = kd_omp_tid();
        double * Ps = SC(sc, o_P, double) + (size_t)tid * (Cs + Ct) * M, * Pt = Ps + (size_t)Cs * M;
        float * Us = SC(sc, o_U, float) + (size_t)tid * (Cs + Ct) * M, * Ut = Us + (size_t)Cs * M;
        double * ns = SC(sc, o_nrm, double) + (size_t)tid * (Cs + Ct), * ntt = ns + Cs;
        float * Kss = SC(sc, o_K, float) + (size_t)tid * ((size_t)Cs * Cs + (size_t)Ct * Ct + (size_t)Cs * Ct);
        float * Ktt = Kss + (size_t)Cs * Cs, * Kst = Ktt + (size_t)Ct * Ct;
        float * A1 = grad ? SC(sc, o_A, float) + (size_t)tid * 2 * (Cs + Ct) * M : NULL;   // K_ss U_s
        float * A2 = grad ? A1 + (size_t)Cs * M : NULL;                                     // K_st U_t
        float * B1 = grad ? A2 + (size_t)Cs * M : NULL;                                     // K_tt U_t
        float * B2 = grad ? B1 + (size_t)Ct * M : NULL;                                     // K_st^T U_s
        double * dU = grad ? SC(sc, o_dU, double) + (size_t)tid * cmax * M : NULL;
        float * ws = SC(sc, o_ws, float) + (size_t)tid * wsz;
        #pragma omp for schedule(static)
        for (int i = 0; i < n; i++) {
            nst_prep(Us, Ps, ns, s.x + (size_t)i * ss, Cs, &pls, M);
            nst_prep(Ut, Pt, ntt, t.x + (size_t)i * st, Ct, &plt, M);
            kd_linear_forward(Kss, Us, Us, NULL, Cs, Mi, Cs, ws);
            kd_linear_forward(Ktt, Ut, Ut, NULL, Ct, Mi, Ct, ws);
            kd_linear_forward(Kst, Us, Ut, NULL, Cs, Mi, Ct, ws);
            // poly-2 MMD^2: mean k(t,t) + mean k(s,s) - 2 mean k(s,t), k(u,v) = (u.v)^2
            part[i] = sum_sq(Ktt, (size_t)Ct * Ct) / ((double)Ct * Ct) + sum_sq(Kss, (size_t)Cs * Cs) / ((double)Cs * Cs) -
                      2.0 * sum_sq(Kst, (size_t)Cs * Ct) / ((double)Cs * Ct);
            if (!grad) continue;
            memset(A1, 0, 2 * ((size_t)Cs + Ct) * M * sizeof(float));
            if (ds) kd_linear_backward(A1, NULL, NULL, Kss, Us, Us, Cs, Mi, Cs, ws);
            kd_linear_backward(ds ? A2 : NULL, dt ? B2 : NULL, NULL, Kst, Us, Ut, Cs, Mi, Ct, ws);
            if (dt) kd_linear_backward(B1, NULL, NULL, Ktt, Ut, Ut, Ct, Mi, Ct, ws);
            if (ds) nst_bwd(ds + (size_t)i * ss, dU, A1, as, A2, b, Ps, ns, Cs, M, &pls, accumulate);
            if (dt) nst_bwd(dt + (size_t)i * st, dU, B1, at, B2, b, Pt, ntt, Ct, M, &plt, accumulate);
        }
    }
    double total = 0;
    for (int i = 0; i < n; i++) total += part[i];
    total /= n;
    free(sc.base);
    if (loss) *loss = (float)total;
    if (!isfinite(total)) KD_FAIL(KD_ERR_NONFINITE, "NST loss is not finite");
    return KD_OK;
}

// ---------------------------------------------------------------------------------------
// RKD

// Pairwise squared distances in double, computed directly (no |x|^2 + |y|^2 - 2 x.y
// cancellation); Q symmetric with a zero diagonal, each pair computed once.
static void pair_sq(double * Q, const float * x, int n, size_t d) {
    #pragma omp parallel for schedule(dynamic, 1) if((double)n * n * d >= FEAT_PAR_MIN)
    for (int i = 0; i < n; i++) {
        const float * xi = x + (size_t)i * d;
        Q[(size_t)i * n + i] = 0;
        for (int j = i + 1; j < n; j++) {
            const float * xj = x + (size_t)j * d;
            double q = 0;
            #pragma omp simd reduction(+: q)
            for (size_t k = 0; k < d; k++) { double v = (double)xi[k] - xj[k]; q += v * v; }
            Q[(size_t)i * n + j] = q;
        }
    }
    for (int i = 0; i < n; i++)
        for (int j = 0; j < i; j++) Q[(size_t)i * n + j] = Q[(size_t)j * n + i];
}

// dx_i (+)= 2 sum_j (W_ij + W_ji) (x_i - x_j): the gradient w.r.t. x of sum_ij W_ij q_ij.
static void pair_sq_bwd(float * dx, const double * W, const float * x, int n, size_t d, double * acc_all, bool accumulate) {
    #pragma omp parallel if((double)n * n * d >= FEAT_PAR_MIN)
    {
        double * acc = acc_all + (size_t)kd_omp_tid() * d;
        #pragma omp for schedule(static)
        for (int i = 0; i < n; i++) {
            const float * xi = x + (size_t)i * d;
            for (size_t k = 0; k < d; k++) acc[k] = 0;
            for (int j = 0; j < n; j++) {
                if (j == i) continue;
                double w = W[(size_t)i * n + j] + W[(size_t)j * n + i];
                if (w == 0) continue;
                const float * xj = x + (size_t)j * d;
                for (size_t k = 0; k < d; k++) acc[k] += w * ((double)xi[k] - xj[k]);
            }
            for (size_t k = 0; k < d; k++) put(&dx[(size_t)i * d + k], 2.0 * acc[k], accumulate);
        }
    }
}

// A_s - A_t = Ns ids - Nt idt, exactly 0 when the two sides are equal: with
// -ffp-contract=fast the compiler may fuse one product into the subtraction, which would
// leave that product's rounding error.
static inline double rkd_diff(double Ns, double ids, double Nt, double idt) {
    const double d = Ns * ids - Nt * idt;
    return (Ns == Nt) & (ids == idt) ? 0.0 : d;
}

// Smooth L1 (beta = 1, F.smooth_l1_loss) and its derivative.
static inline double huber(double x) {   // 0.5 x^2 for |x| < 1, |x| - 0.5 beyond: 0.5 m (2|x| - m), m = min(|x|, 1)
    const double a = fabs(x), m = a < 1 ? a : 1.0;
    return 0.5 * m * (2 * a - m);
}
static inline double dhuber(double x) { return x > 1 ? 1.0 : x < -1 ? -1.0 : x; }

// One (a, b, c) of pass 1: the loss and the sums for the q_ab dependence of both sides.
static inline void rkd_term(double qs, double qt, double hs, double ht, double qsac, double qsbc, double isac,
                            double qtac, double qtbc, double itac, double * l, double * r1s, double * r2s, double * r1t,
                            double * r2t) {
    const double ids = hs * isac, idt = ht * itac, Ns = qs + qsac - qsbc, Nt = qt + qtac - qtbc;
    const double x = rkd_diff(Ns, ids, Nt, idt), g = dhuber(x);
    *l += huber(x);
    *r1s += g * ids;
    *r2s += g * (Ns * ids);
    *r1t += g * idt;
    *r2t += g * (Nt * idt);
}

// One (a, b, c) of pass 2: -dA/dq_bc = 1/den, times the Huber derivative, per side.
static inline void rkd_term_bc(double qs, double qt, double qsab, double qsac, double isab, double isac, double qtab,
                               double qtac, double itab, double itac, double * rs, double * rt) {
    const double ids = 0.5 * isab * isac, idt = 0.5 * itab * itac;
    const double g = dhuber(rkd_diff(qsab + qsac - qs, ids, qtab + qtac - qt, idt));
    *rs -= g * ids;
    *rt += g * idt;
}

enum kd_status kd_loss_rkd(float * loss, float * ds, float * dt, struct kd_fmap s, struct kd_fmap t, float w_dist,
                           float w_angle, float parts[2], float weight, bool accumulate) {
    KD_TRY(check_map(__func__, s, "s"));
    KD_TRY(check_map(__func__, t, "t"));
    KD_TRY(check_same_n(__func__, s, "s", t, "t"));
    KD_TRY(check_weight(__func__, weight));
    if (!(w_dist >= 0) || !isfinite(w_dist)) KD_FAIL(KD_ERR_VALUE, "w_dist (%g) must be finite and >= 0", (double)w_dist);
    if (!(w_angle >= 0) || !isfinite(w_angle)) KD_FAIL(KD_ERR_VALUE, "w_angle (%g) must be finite and >= 0", (double)w_angle);
    const int n = s.n;
    const size_t Ds = chw_of(s), Dt = chw_of(t), nn = (size_t)n * n;
    if (n < 2) {   // no pairs: both terms are 0 (the references' mean over no distances is NaN)
        if (loss) *loss = 0;
        if (parts) parts[0] = parts[1] = 0;
        feat_scratch_bytes = 0;
        if (!accumulate) {
            if (ds) memset(ds, 0, Ds * (size_t)n * sizeof(float));
            if (dt) memset(dt, 0, Dt * (size_t)n * sizeof(float));
        }
        return KD_OK;
    }
    const int nt = kd_omp_threads();
    // Q (squared distances), IM (1 / the angle normaliser max(sqrt q, eps)) per side; W (the
    // gradient w.r.t. q, ordered pairs) per side; per-anchor partial losses; a row accumulator
    // per thread
    struct scratch sc = { 0 };
    size_t o_Q = sc_reserve(&sc, 4 * nn, sizeof(double));
    size_t o_W = sc_reserve(&sc, 2 * nn, sizeof(double));
    size_t o_part = sc_reserve(&sc, (size_t)n, sizeof(double));
    size_t o_acc = sc_reserve_nt(&sc, nt, Ds > Dt ? Ds : Dt, sizeof(double));
    if (!sc_alloc(&sc)) SC_FAIL(sc);
    double * Qs = SC(sc, o_Q, double), * Qt = Qs + nn, * IMs = Qt + nn, * IMt = IMs + nn;
    double * Ws = SC(sc, o_W, double), * Wt = Ws + nn, * part = SC(sc, o_part, double);
    pair_sq(Qs, s.x, n, Ds);
    pair_sq(Qt, t.x, n, Dt);
    for (size_t k = 0; k < nn; k++) {
        IMs[k] = 1.0 / (sqrt(Qs[k]) >= NORM_EPS ? sqrt(Qs[k]) : NORM_EPS);
        IMt[k] = 1.0 / (sqrt(Qt[k]) >= NORM_EPS ? sqrt(Qt[k]) : NORM_EPS);
    }

    // Distance term: D = sqrt(max(q, 1e-12)) off the diagonal, 0 on it, divided by its mean over
    // the n(n-1) off-diagonal entries (all positive); smooth L1 averaged over the n^2 entries.
    const double PD_EPS = 1e-12, npair = (double)n * (n - 1);
    double mus = 0, mut = 0;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++)
            if (i != j) {
                mus += sqrt(fmax(Qs[(size_t)i * n + j], PD_EPS));
                mut += sqrt(fmax(Qt[(size_t)i * n + j], PD_EPS));
            }
    mus /= npair;
    mut /= npair;
    double ld = 0, gDs = 0, gDt = 0;   // sum_ij g_ij D_ij per side (the mean's gradient)
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) {
            if (i == j) continue;
            double Dsij = sqrt(fmax(Qs[(size_t)i * n + j], PD_EPS)), Dtij = sqrt(fmax(Qt[(size_t)i * n + j], PD_EPS));
            double x = Dsij / mus - Dtij / mut;
            ld += huber(x);
            gDs += dhuber(x) * Dsij;
            gDt += dhuber(x) * Dtij;
        }
    ld /= (double)nn;
    const double cd = (double)weight * w_dist / (double)nn;   // d(weight w_dist L_d) / d huber'
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) {
            size_t k = (size_t)i * n + j;
            Ws[k] = Wt[k] = 0;
            if (i == j) continue;
            double qs = Qs[k], qt = Qt[k], Dsij = sqrt(fmax(qs, PD_EPS)), Dtij = sqrt(fmax(qt, PD_EPS));
            double g = dhuber(Dsij / mus - Dtij / mut);
            // dL/dD_ij = g/mu - (sum g D)/(mu^2 n(n-1)); dD/dq = 1/(2D) where q >= eps (clamp)
            if (qs >= PD_EPS) Ws[k] = cd * (g / mus - gDs / (mus * mus * npair)) / (2 * Dsij);
            if (qt >= PD_EPS) Wt[k] = -cd * (g / mut - gDt / (mut * mut * npair)) / (2 * Dtij);
        }

    // Angle term over the n^3 (a, b, c): A_abc = (q_ab + q_ac - q_bc) / (2 m_ab m_ac), with
    // m = max(sqrt q, eps); 1/den = (IM_ab / 2) IM_ac. Where b or c is a, the
    // numerator is exactly 0 (Q is exactly symmetric with a zero diagonal), so A = 0 on both
    // sides, the Huber derivative is 0, and those terms add nothing: the loops need no skips.
    // Pass 1, per anchor a (row a of W): the loss and the q_ab, q_ac dependences (equal by the
    // b <-> c symmetry, hence 2x): dA/dq_ab = 1/den - A/(2 q_ab) (the second part only where
    // the clamp does not hold m). Pass 2, per b (row b of W): dA/dq_bc = -1/den, summed over a.
    const double n3 = (double)n * n * n, ca = (double)weight * w_angle / n3;
    const bool par = (double)n * n * n >= FEAT_PAR_MIN / 8;
    #pragma omp parallel for schedule(dynamic, 1) if(par)
    for (int a = 0; a < n; a++) {
        const double * Qsa = Qs + (size_t)a * n, * Qta = Qt + (size_t)a * n;
        const double * Isa = IMs + (size_t)a * n, * Ita = IMt + (size_t)a * n;
        double la = 0;
        for (int b = 0; b < n; b++) {
            if (b == a) continue;
            const double * Qsb = Qs + (size_t)b * n, * Qtb = Qt + (size_t)b * n;
            const double qs = Qsa[b], qt = Qta[b], hs = 0.5 * Isa[b], ht = 0.5 * Ita[b];
            double r1s = 0, r2s = 0, r1t = 0, r2t = 0, l = 0;
            for (int c = 0; c < n; c++)
                rkd_term(qs, qt, hs, ht, Qsa[c], Qsb[c], Isa[c], Qta[c], Qtb[c], Ita[c], &l, &r1s, &r2s, &r1t, &r2t);
            la += l;
            const double iqs = sqrt(qs) >= NORM_EPS ? 0.5 / qs : 0.0, iqt = sqrt(qt) >= NORM_EPS ? 0.5 / qt : 0.0;
            Ws[(size_t)a * n + b] += 2 * ca * (r1s - r2s * iqs);
            Wt[(size_t)a * n + b] -= 2 * ca * (r1t - r2t * iqt);
        }
        part[a] = la;
    }
    if (ds || dt) {
        #pragma omp parallel for schedule(dynamic, 1) if(par)
        for (int b = 0; b < n; b++) {
            const double * Qsb = Qs + (size_t)b * n, * Qtb = Qt + (size_t)b * n;
            const double * Isb = IMs + (size_t)b * n, * Itb = IMt + (size_t)b * n;
            for (int c = 0; c < n; c++) {
                if (c == b) continue;
                const double * Qsc = Qs + (size_t)c * n, * Qtc = Qt + (size_t)c * n;
                const double * Isc = IMs + (size_t)c * n, * Itc = IMt + (size_t)c * n;
                const double qs = Qsb[c], qt = Qtb[c];
                double rs = 0, rt = 0;
                for (int a = 0; a < n; a++)   // q_ab = Q[b][a], q_ac = Q[c][a] (symmetric)
                    rkd_term_bc(qs, qt, Qsb[a], Qsc[a], Isb[a], Isc[a], Qtb[a], Qtc[a], Itb[a], Itc[a], &rs, &rt);
                Ws[(size_t)b * n + c] += ca * rs;
                Wt[(size_t)b * n + c] += ca * rt;
            }
        }
    }
    double la = 0;
    for (int a = 0; a < n; a++) la += part[a];
    la /= n3;
    double total = (double)w_dist * ld + (double)w_angle * la;
    if (loss) *loss = (float)total;
    if (parts) { parts[0] = (float)ld; parts[1] = (float)la; }
    if (!isfinite(total)) { free(sc.base); KD_FAIL(KD_ERR_NONFINITE, "RKD loss is not finite"); }
    double * acc = SC(sc, o_acc, double);
    if (ds) pair_sq_bwd(ds, Ws, s.x, n, Ds, acc, accumulate);
    if (dt) pair_sq_bwd(dt, Wt, t.x, n, Dt, acc, accumulate);
    free(sc.base);
    return KD_OK;
}

// ---------------------------------------------------------------------------------------
// PKT

#define PKT_EPS 1e-7

// x_hat = x / (||x|| + eps) per row (float, the GEMM operand); nrm (n).
static void pkt_rows(float * X, double * nrm, const float * x, int n, size_t d) {
    for (int i = 0; i < n; i++) {
        double q = 0;
        for (size_t k = 0; k < d; k++) q += (double)x[(size_t)i * d + k] * x[(size_t)i * d + k];
        nrm[i] = sqrt(q);
        for (size_t k = 0; k < d; k++) X[(size_t)i * d + k] = (float)(x[(size_t)i * d + k] / (nrm[i] + PKT_EPS));
    }
}

// P = (S + 1)/2 row-normalised, from the float cosine matrix S: P (double), r (row sums).
static void pkt_probs(double * P, double * r, const float * S, int n) {
    for (int i = 0; i < n; i++) {
        double sum = 0;
        for (int j = 0; j < n; j++) sum += ((double)S[(size_t)i * n + j] + 1.0) / 2.0;
        r[i] = sum;
        for (int j = 0; j < n; j++) P[(size_t)i * n + j] = ((double)S[(size_t)i * n + j] + 1.0) / 2.0 / sum;
    }
}

// dP (double, n x n) -> dS -> Ssym = dS + dS^T (float) -> dX_hat = Ssym X_hat -> dx.
static void pkt_side(float * dx, double * dP, const double * P, const double * r, float * Ssym, float * dXh,
                     const float * Xh, const double * nrm, const float * x, int n, size_t d, float * ws, bool accumulate) {
    for (int i = 0; i < n; i++) {   // dM_ij = (dP_ij - sum_k dP_ik P_ik) / r_i, dS = dM / 2
        double dot = 0;
        for (int k = 0; k < n; k++) dot += dP[(size_t)i * n + k] * P[(size_t)i * n + k];
        for (int j = 0; j < n; j++) dP[(size_t)i * n + j] = (dP[(size_t)i * n + j] - dot) / r[i] / 2.0;
    }
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) Ssym[(size_t)i * n + j] = (float)(dP[(size_t)i * n + j] + dP[(size_t)j * n + i]);
    memset(dXh, 0, (size_t)n * d * sizeof(float));
    kd_linear_backward(dXh, NULL, NULL, Ssym, Xh, Xh, n, (int)d, n, ws);
    // x_hat = x / (nu + eps), nu = ||x||: dx = dxh / (nu + eps) - x (x . dxh) / ((nu + eps)^2 nu)
    for (int i = 0; i < n; i++) {
        const float * xi = x + (size_t)i * d, * gi = dXh + (size_t)i * d;
        double nu = nrm[i], den = nu + PKT_EPS, dot = 0;
        if (nu > 0)
            for (size_t k = 0; k < d; k++) dot += (double)xi[k] * gi[k];
        double c2 = nu > 0 ? dot / (den * den * nu) : 0.0;
        for (size_t k = 0; k < d; k++) put(&dx[(size_t)i * d + k], gi[k] / den - xi[k] * c2, accumulate);
    }
}

enum kd_status kd_loss_pkt(float * loss, float * ds, float * dt, struct kd_fmap s, struct kd_fmap t, float weight,
                           bool accumulate) {
    KD_TRY(check_map(__func__, s, "s"));
    KD_TRY(check_map(__func__, t, "t"));
    KD_TRY(check_same_n(__func__, s, "s", t, "t"));
    KD_TRY(check_weight(__func__, weight));
    const int n = s.n;
    const size_t Ds = chw_of(s), Dt = chw_of(t), nn = (size_t)n * n, Dm = Ds > Dt ? Ds : Dt;
    const bool grad = ds || dt;
    struct scratch sc = { 0 };
    size_t o_Xs = sc_reserve(&sc, (size_t)n * Ds, sizeof(float)), o_Xt = sc_reserve(&sc, (size_t)n * Dt, sizeof(float));
    size_t o_S = sc_reserve(&sc, 3 * nn, sizeof(float));                     // S_s, S_t, Ssym
    size_t o_P = sc_reserve(&sc, 3 * nn, sizeof(double));                    // P_s, P_t, dP
    size_t o_v = sc_reserve(&sc, 4 * (size_t)n, sizeof(double));             // norms, row sums
    size_t o_dX = grad ? sc_reserve(&sc, (size_t)n * Dm, sizeof(float)) : 0;
    size_t o_ws = sc_reserve(&sc, kd_linear_workspace(n, (int)Dm, n), sizeof(float));
    if (!sc_alloc(&sc)) SC_FAIL(sc);
    float * Xs = SC(sc, o_Xs, float), * Xt = SC(sc, o_Xt, float), * Ss = SC(sc, o_S, float), * St = Ss + nn, * Ssym = St + nn;
    double * Ps = SC(sc, o_P, double), * Pt = Ps + nn, * dP = Pt + nn;
    double * nus = SC(sc, o_v, double), * nut = nus + n, * rs = nut + n, * rt = rs + n;
    float * dXh = grad ? SC(sc, o_dX, float) : NULL, * ws = SC(sc, o_ws, float);
    pkt_rows(Xs, nus, s.x, n, Ds);
    pkt_rows(Xt, nut, t.x, n, Dt);
    kd_linear_forward(Ss, Xs, Xs, NULL, n, (int)Ds, n, ws);
    kd_linear_forward(St, Xt, Xt, NULL, n, (int)Dt, n, ws);
    pkt_probs(Ps, rs, Ss, n);
    pkt_probs(Pt, rt, St, n);
    double total = 0;
    for (size_t k = 0; k < nn; k++) total += Pt[k] * log((Pt[k] + PKT_EPS) / (Ps[k] + PKT_EPS));
    total /= (double)nn;
    if (loss) *loss = (float)total;
    if (!isfinite(total)) { free(sc.base); KD_FAIL(KD_ERR_NONFINITE, "PKT loss is not finite"); }
    const double c = (double)weight / (double)nn;
    if (ds) {
        for (size_t k = 0; k < nn; k++) dP[k] = -c * Pt[k] / (Ps[k] + PKT_EPS);
        pkt_side(ds, dP, Ps, rs, Ssym, dXh, Xs, nus, s.x, n, Ds, ws, accumulate);
    }
    if (dt) {
        for (size_t k = 0; k < nn; k++)
            dP[k] = c * (log((Pt[k] + PKT_EPS) / (Ps[k] + PKT_EPS)) + Pt[k] / (Pt[k] + PKT_EPS));
        pkt_side(dt, dP, Pt, rt, Ssym, dXh, Xt, nut, t.x, n, Dt, ws, accumulate);
    }
    free(sc.base);
    return KD_OK;
}

// ---------------------------------------------------------------------------------------
// FSP

// Pool one sample of a map to (C, M) floats through the double buffer tmp.
static void pool_float(float * out, double * tmp, const float * x, int C, const struct pool * pl, size_t M) {
    pool_fwd(tmp, x, C, pl);
    for (size_t k = 0; k < (size_t)C * M; k++) out[k] = (float)tmp[k];
}

static void scale_unpool(float * dx, double * tmp, const float * g, double scale, int C, const struct pool * pl, size_t M,
                         bool accumulate) {
    for (size_t k = 0; k < (size_t)C * M; k++) tmp[k] = scale * g[k];
    pool_bwd(dx, tmp, C, pl, accumulate);
}

enum kd_status kd_loss_fsp(float * loss, float * ds1, float * ds2, float * dt1, float * dt2, struct kd_fmap s1,
                           struct kd_fmap s2, struct kd_fmap t1, struct kd_fmap t2, float weight, bool accumulate) {
    KD_TRY(check_map(__func__, s1, "s1"));
    KD_TRY(check_map(__func__, s2, "s2"));
    KD_TRY(check_map(__func__, t1, "t1"));
    KD_TRY(check_map(__func__, t2, "t2"));
    KD_TRY(check_same_n(__func__, s1, "s1", s2, "s2"));
    KD_TRY(check_same_n(__func__, s1, "s1", t1, "t1"));
    KD_TRY(check_same_n(__func__, s1, "s1", t2, "t2"));
    KD_TRY(check_weight(__func__, weight));
    if (t1.c != s1.c)
        KD_FAIL(KD_ERR_SHAPE, "t1.c (%d) must equal s1.c (%d): FSP compares the student's and the teacher's "
                "C1 x C2 matrices, so they need the same channel counts", t1.c, s1.c);
    if (t2.c != s2.c)
        KD_FAIL(KD_ERR_SHAPE, "t2.c (%d) must equal s2.c (%d): FSP compares the student's and the teacher's "
                "C1 x C2 matrices, so they need the same channel counts", t2.c, s2.c);
    const int n = s1.n, C1 = s1.c, C2 = s2.c;
    const int OHs = imin(s1.h, s2.h), OWs = imin(s1.w, s2.w), OHt = imin(t1.h, t2.h), OWt = imin(t1.w, t2.w);
    const size_t Ms = (size_t)OHs * OWs, Mt = (size_t)OHt * OWt, Mm = Ms > Mt ? Ms : Mt, cc = (size_t)C1 * C2;
    const size_t cm = (size_t)imax(C1, C2);
    struct pool p1s = pool_to(s1, OHs, OWs), p2s = pool_to(s2, OHs, OWs);
    struct pool p1t = pool_to(t1, OHt, OWt), p2t = pool_to(t2, OHt, OWt);
    const bool gs = ds1 || ds2, gt = dt1 || dt2;
    const int nt = threads_for(n, (double)n * C1 * C2 * (Ms + Mt) + (double)n * (chw_of(s1) + chw_of(s2)));
    size_t wsz = kd_linear_workspace(C1, (int)Ms, C2), w2 = kd_linear_workspace(C1, (int)Mt, C2);
    wsz = wsz > w2 ? wsz : w2;
    // per thread: the four pooled maps (float), G_s, G_t, dG (float), dF1, dF2 (float), a
    // double buffer for pooling, the GEMM workspace
    struct scratch sc = { 0 };
    size_t o_loss = sc_reserve(&sc, (size_t)n, sizeof(double));
    size_t o_F = sc_reserve_nt(&sc, nt, ((size_t)C1 + C2) * (Ms + Mt), sizeof(float));
    size_t o_G = sc_reserve_nt(&sc, nt, 3 * cc, sizeof(float));
    size_t o_dF = gs || gt ? sc_reserve_nt(&sc, nt, ((size_t)C1 + C2) * Mm, sizeof(float)) : 0;
    size_t o_tmp = sc_reserve_nt(&sc, nt, cm * Mm, sizeof(double));
    size_t o_ws = sc_reserve_nt(&sc, nt, wsz, sizeof(float));
    struct pool * pools[4] = { &p1s, &p2s, &p1t, &p2t };
    for (int k = 0; k < 4; k++) pool_reserve(&sc, pools[k]);
    if (!sc_alloc(&sc)) SC_FAIL(sc);
    for (int k = 0; k < 4; k++) pool_tables(sc.base, pools[k]);
    double * part = SC(sc, o_loss, double);
    const size_t s1z = chw_of(s1), s2z = chw_of(s2), t1z = chw_of(t1), t2z = chw_of(t2);
    const double g0 = 2.0 * weight / ((double)n * cc);

    #pragma omp parallel num_threads(nt)
    {
        const int tid = kd_omp_tid();
        float * F1s = SC(sc, o_F, float) + (size_t)tid * (C1 + C2) * (Ms + Mt), * F2s = F1s + (size_t)C1 * Ms;
        float * F1t = F2s + (size_t)C2 * Ms, * F2t = F1t + (size_t)C1 * Mt;
        float * Gs = SC(sc, o_G, float) + (size_t)tid * 3 * cc, * Gt = Gs + cc, * dG = Gt + cc;
        float * dF1 = gs || gt ? SC(sc, o_dF, float) + (size_t)tid * (C1 + C2) * Mm : NULL;
        float * dF2 = gs || gt ? dF1 + (size_t)C1 * Mm : NULL;
        double * tmp = SC(sc, o_tmp, double) + (size_t)tid * cm * Mm;
        float * ws = SC(sc, o_ws, float) + (size_t)tid * wsz;
        #pragma omp for schedule(static)
        for (int i = 0; i < n; i++) {
            pool_float(F1s, tmp, s1.x + (size_t)i * s1z, C1, &p1s, Ms);
            pool_float(F2s, tmp, s2.x + (size_t)i * s2z, C2, &p2s, Ms);
            pool_float(F1t, tmp, t1.x + (size_t)i * t1z, C1, &p1t, Mt);
            pool_float(F2t, tmp, t2.x + (size_t)i * t2z, C2, &p2t, Mt);
            kd_linear_forward(Gs, F1s, F2s, NULL, C1, (int)Ms, C2, ws);   // G = F1 F2^T / hw
            kd_linear_forward(Gt, F1t, F2t, NULL, C1, (int)Mt, C2, ws);
            double l = 0;
            for (size_t k = 0; k < cc; k++) {
                double d = (double)Gs[k] / Ms - (double)Gt[k] / Mt;
                l += d * d;
                dG[k] = (float)(g0 * d);   // d(weight * loss) / dG_s
            }
            part[i] = l;
            // dF1 = dG F2 / hw, dF2 = dG^T F1 / hw (the teacher's with -dG)
            if (gs) {
                memset(dF1, 0, ((size_t)C1 + C2) * Mm * sizeof(float));
                kd_linear_backward(ds1 ? dF1 : NULL, ds2 ? dF2 : NULL, NULL, dG, F1s, F2s, C1, (int)Ms, C2, ws);
                if (ds1) scale_unpool(ds1 + (size_t)i * s1z, tmp, dF1, 1.0 / Ms, C1, &p1s, Ms, accumulate);
                if (ds2) scale_unpool(ds2 + (size_t)i * s2z, tmp, dF2, 1.0 / Ms, C2, &p2s, Ms, accumulate);
            }
            if (gt) {
                memset(dF1, 0, ((size_t)C1 + C2) * Mm * sizeof(float));
                kd_linear_backward(dt1 ? dF1 : NULL, dt2 ? dF2 : NULL, NULL, dG, F1t, F2t, C1, (int)Mt, C2, ws);
                if (dt1) scale_unpool(dt1 + (size_t)i * t1z, tmp, dF1, -1.0 / Mt, C1, &p1t, Mt, accumulate);
                if (dt2) scale_unpool(dt2 + (size_t)i * t2z, tmp, dF2, -1.0 / Mt, C2, &p2t, Mt, accumulate);
            }
        }
    }
    double total = 0;
    for (int i = 0; i < n; i++) total += part[i];
    total /= (double)n * cc;
    free(sc.base);
    if (loss) *loss = (float)total;
    if (!isfinite(total)) KD_FAIL(KD_ERR_NONFINITE, "FSP loss is not finite");
    return KD_OK;
}

// ---------------------------------------------------------------------------------------
// DeepInversion: BN statistics and image priors.

enum kd_status kd_loss_bnstat(float * loss, float * dx, struct kd_fmap x, const float * rmean, const float * rvar,
                              float weight, bool accumulate) {
    KD_TRY(check_map(__func__, x, "x"));
    if (!rmean || !rvar) KD_FAIL(KD_ERR_VALUE, "rmean and rvar must not be NULL");
    const size_t hw = (size_t)x.h * x.w, m = (size_t)x.n * hw;
    if (m < 2)
        KD_FAIL(KD_ERR_SHAPE, "x has one value per channel (n*h*w = 1): its batch variance is 0 and says nothing "
                "(use a batch of at least 2)");
    double * mu = malloc(2 * (size_t)x.c * sizeof *mu);
    if (!mu) KD_FAIL(KD_ERR_NOMEM, "cannot allocate %d channel statistics", x.c);
    double * var = mu + x.c;
    const size_t chw = (size_t)x.c * hw;
    #pragma omp parallel for schedule(static) if (m * x.c > 65536)
    for (int c = 0; c < x.c; c++) {
        double s = 0, q = 0;
        for (int i = 0; i < x.n; i++) {
            const float * p = x.x + (size_t)i * chw + (size_t)c * hw;
            for (size_t k = 0; k < hw; k++) s += p[k];
        }
        const double mc = s / (double)m;
        for (int i = 0; i < x.n; i++) {
            const float * p = x.x + (size_t)i * chw + (size_t)c * hw;
            for (size_t k = 0; k < hw; k++) q += (p[k] - mc) * (p[k] - mc);
        }
        mu[c] = mc;
        var[c] = q / (double)m;
    }
    double nm = 0, nv = 0;
    for (int c = 0; c < x.c; c++) {
        nm += (mu[c] - rmean[c]) * (mu[c] - rmean[c]);
        nv += (var[c] - rvar[c]) * (var[c] - rvar[c]);
    }
    nm = sqrt(nm);
    nv = sqrt(nv);
    const double L = nv + nm;
    if (loss) *loss = (float)L;
    if (!isfinite(L)) { free(mu); KD_FAIL(KD_ERR_NONFINITE, "the BN-statistics loss is not finite"); }
    if (dx) {
        #pragma omp parallel for schedule(static) if (m * x.c > 65536)
        for (int c = 0; c < x.c; c++) {
            // d/dx = (dL/dmu + dL/dvar 2 (x - mu)) / m, a zero norm passing no gradient
            const double gm = nm > 0 ? (double)weight * (mu[c] - rmean[c]) / nm / (double)m : 0.0;
            const double gv = nv > 0 ? 2.0 * (double)weight * (var[c] - rvar[c]) / nv / (double)m : 0.0;
            for (int i = 0; i < x.n; i++) {
                const size_t o = (size_t)i * chw + (size_t)c * hw;
                for (size_t k = 0; k < hw; k++) put(&dx[o + k], gm + gv * (x.x[o + k] - mu[c]), accumulate);
            }
        }
    }
    free(mu);
    return KD_OK;
}

// The four neighbour differences of pixel (i, j) of a plane (h x w), each defined where both
// pixels exist: 0 right, 1 down, 2 the anti-diagonal x[i+1][j] - x[i][j+1], 3 the diagonal.
static inline bool tv_diff(const float * p, int h, int w, int k, int i, int j, double * d) {
    if (i < 0 || j < 0) return false;
    switch (k) {
    case 0: if (j >= w - 1) return false; *d = (double)p[i * w + j] - p[i * w + j + 1]; return true;
    case 1: if (i >= h - 1) return false; *d = (double)p[i * w + j] - p[(i + 1) * w + j]; return true;
    case 2: if (i >= h - 1 || j >= w - 1) return false; *d = (double)p[(i + 1) * w + j] - p[i * w + j + 1]; return true;
    default: if (i >= h - 1 || j >= w - 1) return false; *d = (double)p[i * w + j] - p[(i + 1) * w + j + 1]; return true;
    }
}

enum kd_status kd_loss_tv(float * loss, float * dx, struct kd_fmap x, bool l1, float weight, bool accumulate) {
    KD_TRY(check_map(__func__, x, "x"));
    if (x.h < 2 || x.w < 2) KD_FAIL(KD_ERR_SHAPE, "x has %d x %d pixels; total variation needs h and w >= 2", x.h, x.w);
    const int h = x.h, w = x.w;
    const size_t planes = (size_t)x.n * x.c, hw = (size_t)h * w;
    double * part = calloc(planes * 4, sizeof *part);
    if (!part) KD_FAIL(KD_ERR_NOMEM, "cannot allocate %zu partial sums", planes * 4);
    // Per plane and direction: sum of |d| (l1) or d^2 (l2); summed over planes in order.
    #pragma omp parallel for schedule(static) if (planes * hw > 65536)
    for (size_t pl = 0; pl < planes; pl++) {
        const float * p = x.x + pl * hw;
        for (int i = 0; i < h; i++)
            for (int j = 0; j < w; j++)
                for (int k = 0; k < 4; k++) {
                    double d;
                    if (tv_diff(p, h, w, k, i, j, &d)) part[pl * 4 + k] += l1 ? fabs(d) : d * d;
                }
    }
    const double cnt[4] = { (double)planes * h * (w - 1), (double)planes * (h - 1) * w,
                            (double)planes * (h - 1) * (w - 1), (double)planes * (h - 1) * (w - 1) };
    double tot[4] = { 0, 0, 0, 0 }, L = 0, g[4];
    for (size_t pl = 0; pl < planes; pl++)
        for (int k = 0; k < 4; k++) tot[k] += part[pl * 4 + k];
    free(part);
    for (int k = 0; k < 4; k++) {
        const double v = l1 ? tot[k] / cnt[k] : sqrt(tot[k]);
        L += v;
        // the factor of each difference's gradient: sign(d) / count (l1), d / norm (l2)
        g[k] = (double)weight * (l1 ? 1.0 / cnt[k] : v > 0 ? 1.0 / v : 0.0);
    }
    if (loss) *loss = (float)L;
    if (!isfinite(L)) KD_FAIL(KD_ERR_NONFINITE, "the total-variation loss is not finite");
    if (!dx) return KD_OK;
    #pragma omp parallel for schedule(static) if (planes * hw > 65536)
    for (size_t pl = 0; pl < planes; pl++) {
        const float * p = x.x + pl * hw;
        float * dp = dx + pl * hw;
        // Pixel (i, j) is the first pixel of differences 0, 1, 3 at (i, j) and of 2 at (i-1, j);
        // the second of 0 at (i, j-1), 1 at (i-1, j), 2 at (i, j-1), 3 at (i-1, j-1).
        static const int first[4][2] = { { 0, 0 }, { 0, 0 }, { -1, 0 }, { 0, 0 } };
        static const int second[4][2] = { { 0, -1 }, { -1, 0 }, { 0, -1 }, { -1, -1 } };
        for (int i = 0; i < h; i++)
            for (int j = 0; j < w; j++) {
                double s = 0, d;
                for (int k = 0; k < 4; k++) {
                    if (tv_diff(p, h, w, k, i + first[k][0], j + first[k][1], &d))
                        s += g[k] * (l1 ? (d > 0) - (d < 0) : d);
                    if (tv_diff(p, h, w, k, i + second[k][0], j + second[k][1], &d))
                        s -= g[k] * (l1 ? (d > 0) - (d < 0) : d);
                }
                put(&dp[(size_t)i * w + j], s, accumulate);
            }
    }
    return KD_OK;
}

enum kd_status kd_loss_l2prior(float * loss, float * dx, const float * x, size_t n, float weight, bool accumulate) {
    if (!x || n == 0) KD_FAIL(KD_ERR_VALUE, "x must be non-empty");
    double q = 0;
    for (size_t i = 0; i < n; i++) q += (double)x[i] * x[i];
    const double L = sqrt(q);
    if (loss) *loss = (float)L;
    if (!isfinite(L)) KD_FAIL(KD_ERR_NONFINITE, "the l2 prior is not finite");
    if (dx) {
        const double g = L > 0 ? (double)weight / L : 0.0;
        for (size_t i = 0; i < n; i++) put(&dx[i], g * x[i], accumulate);
    }
    return KD_OK;
}
