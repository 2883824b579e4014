// Losses of the distillation methods with connectors or state (kdcore.h, "Losses with
// connectors or state"): OFD, AB, FT, VID, CC, ReviewKD's HCL and CRD. The connectors are
// ordinary nets; these take their outputs. Reference forms, read from the public code:
// - mdistiller (megvii-research/mdistiller): distillers/OFD.py (feat_loss, margins from
//   the teacher's BN), distillers/ReviewKD.py (hcl_loss), distillers/CRD.py;
// - RepDistiller (HobbitLong/RepDistiller): distiller_zoo/AB.py, FT.py, VID.py, CC.py,
//   crd/criterion.py, crd/memory.py, dataset/cifar100.py (CRD's negative sampling).
//
// Conventions: sums in double; gradient of weight * loss written (or added, accumulate);
// OpenMP only over independent outputs (planes, samples, channels, anchors) with partial
// sums combined in a fixed order afterwards, so nothing depends on the thread count.
#include "kd_internal.h"

#include <float.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#define PAR_MIN 32768   // elements below which the loops stay serial

static const double SQRT2 = 1.41421356237309504880, SQRT_2PI = 2.50662827463100050242;

static inline void put(float * d, double g, bool accumulate) { *d = accumulate ? *d + (float)g : (float)g; }

// A feature map's validity; *count = n*c*h*w, small enough for a double buffer.
static enum kd_status fmap_check(const char * func, const char * name, const struct kd_fmap * m, size_t * count) {
    if (!m) return kd_set_error_(KD_ERR_VALUE, func, "%s is NULL", name);
    if (!m->x) return kd_set_error_(KD_ERR_VALUE, func, "%s->x is NULL", name);
    if (m->n < 1 || m->c < 1 || m->h < 1 || m->w < 1)
        return kd_set_error_(KD_ERR_SHAPE, func, "%s has shape (%d, %d, %d, %d): every dimension must be >= 1", name,
                             m->n, m->c, m->h, m->w);
    size_t a, b, bytes;
    if (!kd_mul_ok((size_t)m->n, (size_t)m->c, &a) || !kd_mul_ok(a, (size_t)m->h, &b) ||
        !kd_mul_ok(b, (size_t)m->w, count) || !kd_mul_ok(*count, sizeof(double), &bytes))
        return kd_set_error_(KD_ERR_SHAPE, func, "%s (%d, %d, %d, %d) is too large", name, m->n, m->c, m->h, m->w);
    return KD_OK;
}
#define FMAP_CHECK(name, m, count) KD_TRY(fmap_check(__func__, name, m, count))

static enum kd_status check_weight(const char * func, float weight) {
    if (!isfinite(weight)) return kd_set_error_(KD_ERR_VALUE, func, "weight (%g) must be finite", (double)weight);
    return KD_OK;
}

// Sum of v[0..n) in order.
static double sum_in_order(const double * v, size_t n) {
    double s = 0;
    for (size_t i = 0; i < n; i++) s += v[i];
    return s;
}

// ---------------------------------------------------------------------------------------
// Adaptive average pooling (torch.nn.functional.adaptive_avg_pool2d): output cell (i, j)
// averages input rows [floor(i H / OH), ceil((i+1) H / OH)) and the same for columns. Works
// for any sizes (bins overlap when the input does not divide, repeat when OH > H).

static inline int bin_lo(int i, int in, int out) { return (int)(((int64_t)i * in) / out); }
static inline int bin_hi(int i, int in, int out) { return (int)(((int64_t)(i + 1) * in + out - 1) / out); }

// One body for float and double inputs (the maps arrive as float, pooled intermediates are
// double).
#define APOOL_BODY                                                                        \
    for (int i = 0; i < OH; i++) {                                                        \
        int r0 = bin_lo(i, H, OH), r1 = bin_hi(i, H, OH);                                 \
        for (int j = 0; j < OW; j++) {                                                    \
            int c0 = bin_lo(j, W, OW), c1 = bin_hi(j, W, OW);                             \
            double s = 0;                                                                 \
            for (int r = r0; r < r1; r++)                                                 \
                for (int c = c0; c < c1; c++) s += in[(size_t)r * W + c];                 \
            out[(size_t)i * OW + j] = s / ((double)(r1 - r0) * (c1 - c0));                \
        }                                                                                 \
    }
static void apool_f(double * out, const float * in, int H, int W, int OH, int OW) { APOOL_BODY }
static void apool_d(double * out, const double * in, int H, int W, int OH, int OW) { APOOL_BODY }
#undef APOOL_BODY

// din (H, W) += the pooling's transpose applied to dout (OH, OW).
static void apool_back(double * din, const double * dout, int H, int W, int OH, int OW) {
    for (int i = 0; i < OH; i++) {
        int r0 = bin_lo(i, H, OH), r1 = bin_hi(i, H, OH);
        for (int j = 0; j < OW; j++) {
            int c0 = bin_lo(j, W, OW), c1 = bin_hi(j, W, OW);
            double g = dout[(size_t)i * OW + j] / ((double)(r1 - r0) * (c1 - c0));
            for (int r = r0; r < r1; r++)
                for (int c = c0; c < c1; c++) din[(size_t)r * W + c] += g;
        }
    }
}

// ---------------------------------------------------------------------------------------
// OFD (mdistiller OFD.py): margins from the teacher's BN (init_ofd_modules) and feat_loss.

enum kd_status kd_ofd_margin(float * margin, const float * bn_weight, const float * bn_bias, int c) {
    if (!margin) KD_FAIL(KD_ERR_VALUE, "margin is NULL");
    if (!bn_weight) KD_FAIL(KD_ERR_VALUE, "bn_weight is NULL");
    if (!bn_bias) KD_FAIL(KD_ERR_VALUE, "bn_bias is NULL");
    if (c < 1) KD_FAIL(KD_ERR_VALUE, "c (%d) must be >= 1", c);
    for (int k = 0; k < c; k++) {
        if (!isfinite(bn_weight[k])) KD_FAIL(KD_ERR_VALUE, "bn_weight[%d] = %g is not finite", k, (double)bn_weight[k]);
        if (!isfinite(bn_bias[k])) KD_FAIL(KD_ERR_VALUE, "bn_bias[%d] = %g is not finite", k, (double)bn_bias[k]);
    }
    for (int k = 0; k < c; k++) {
        double s = fabs((double)bn_weight[k]), m = bn_bias[k], r;
        if (s == 0) {
            r = m < 0 ? m : 0.0;                        // the limits of both branches
        } else {
            double z = m / s;
            double cdf = 0.5 * erfc(z / SQRT2);         // Phi(-m/s), scipy's norm.cdf
            if (cdf > 0.001) r = m - s * exp(-0.5 * z * z) / SQRT_2PI / cdf;
            else r = -3.0 * s;                          // mdistiller's cut-off
        }
        margin[k] = (float)r;
    }
    return KD_OK;
}

enum kd_status kd_loss_ofd(float * loss, float * ds, struct kd_fmap s_v, struct kd_fmap t_v,
                           const float * margin, float weight, bool accumulate) {
    const struct kd_fmap * s = &s_v, * t = &t_v;
    size_t ns = 0, nt = 0;
    FMAP_CHECK("s", s, &ns);
    FMAP_CHECK("t", t, &nt);
    if (t->n != s->n || t->c != s->c)
        KD_FAIL(KD_ERR_SHAPE, "t (%d, %d, %d, %d) must have the batch size and channels of s (%d, %d, %d, %d)",
                t->n, t->c, t->h, t->w, s->n, s->c, s->h, s->w);
    if (!margin) KD_FAIL(KD_ERR_VALUE, "margin is NULL");
    for (int k = 0; k < s->c; k++)
        if (!isfinite(margin[k])) KD_FAIL(KD_ERR_VALUE, "margin[%d] = %g is not finite", k, (double)margin[k]);
    KD_TRY(check_weight(__func__, weight));
    const int n = s->n, C = s->c, h = s->h, w = s->w, H = t->h, W = t->w;
    const size_t hw = (size_t)h * w, HW = (size_t)H * W, planes = (size_t)n * C;
    const bool pool = H != h || W != w;
    const int nth = kd_omp_threads();
    double * partial = malloc(planes * sizeof *partial);
    double * tbuf = pool ? malloc((size_t)nth * hw * sizeof *tbuf) : NULL;
    if (!partial || (pool && !tbuf)) {
        free(partial); free(tbuf);
        KD_FAIL(KD_ERR_NOMEM, "cannot allocate scratch for %zu planes", planes);
    }
    const double g_scale = 2.0 * weight / n;
    #pragma omp parallel for schedule(static) if (ns + nt > PAR_MIN)
    for (size_t p = 0; p < planes; p++) {
        const float * sp = s->x + p * hw, * tp = t->x + p * HW;
        double * tb = pool ? tbuf + (size_t)kd_omp_tid() * hw : NULL;
        if (pool) apool_f(tb, tp, H, W, h, w);
        const double m = margin[p % (size_t)C];
        double acc = 0;
        for (size_t k = 0; k < hw; k++) {
            const double sv = sp[k], tv = pool ? tb[k] : (double)tp[k];
            double e = 0, g = 0;
            if (sv > m && tv <= m) { e += (sv - m) * (sv - m); g += sv - m; }
            if (sv > tv && tv > m && tv <= 0) { e += (sv - tv) * (sv - tv); g += sv - tv; }
            if (tv > 0) { e += (sv - tv) * (sv - tv); g += sv - tv; }
            acc += e;
            if (ds) put(&ds[p * hw + k], g_scale * g, accumulate);
        }
        partial[p] = acc;
    }
    double total = sum_in_order(partial, planes) / n;
    free(partial);
    free(tbuf);
    if (loss) *loss = (float)total;
    if (!isfinite(total)) KD_FAIL(KD_ERR_NONFINITE, "OFD loss is not finite");
    return KD_OK;
}

// t must have the shape of s (AB, HCL: no pooling between them).
static enum kd_status same_shape(const char * func, const struct kd_fmap * s, const struct kd_fmap * t) {
    if (t->n == s->n && t->c == s->c && t->h == s->h && t->w == s->w) return KD_OK;
    return kd_set_error_(KD_ERR_SHAPE, func, "t (%d, %d, %d, %d) must have the shape of s (%d, %d, %d, %d)", t->n, t->c,
                         t->h, t->w, s->n, s->c, s->h, s->w);
}

// ---------------------------------------------------------------------------------------
// AB (RepDistiller AB.py criterion_alternative_l2, divided by the batch size).

enum kd_status kd_loss_ab(float * loss, float * ds, struct kd_fmap s_v, struct kd_fmap t_v,
                          float margin, float weight, bool accumulate) {
    const struct kd_fmap * s = &s_v, * t = &t_v;
    size_t ns = 0, nt = 0;
    FMAP_CHECK("s", s, &ns);
    FMAP_CHECK("t", t, &nt);
    KD_TRY(same_shape(__func__, s, t));
    if (!(margin >= 0) || !isfinite(margin)) KD_FAIL(KD_ERR_VALUE, "margin (%g) must be >= 0 and finite", (double)margin);
    KD_TRY(check_weight(__func__, weight));
    const int n = s->n;
    const size_t per = ns / (size_t)n;
    double * partial = malloc((size_t)n * sizeof *partial);
    if (!partial) KD_FAIL(KD_ERR_NOMEM, "cannot allocate scratch for %d samples", n);
    const double mu = margin, g_scale = 2.0 * weight / n;
    #pragma omp parallel for schedule(static) if (ns > PAR_MIN)
    for (int i = 0; i < n; i++) {
        const float * sp = s->x + (size_t)i * per, * tp = t->x + (size_t)i * per;
        double acc = 0;
        for (size_t k = 0; k < per; k++) {
            const double sv = sp[k];
            double e = 0, g = 0;
            if (sv > -mu && tp[k] <= 0) { e += (sv + mu) * (sv + mu); g += sv + mu; }
            if (sv <= mu && tp[k] > 0) { e += (sv - mu) * (sv - mu); g += sv - mu; }
            acc += e;
            if (ds) put(&ds[(size_t)i * per + k], g_scale * g, accumulate);
        }
        partial[i] = acc;
    }
    double total = sum_in_order(partial, (size_t)n) / n;
    free(partial);
    if (loss) *loss = (float)total;
    if (!isfinite(total)) KD_FAIL(KD_ERR_NONFINITE, "AB loss is not finite");
    return KD_OK;
}

// ---------------------------------------------------------------------------------------
// FT (RepDistiller FT.py): factor = F.normalize(mean_c(x^p1) flattened), mean |diff|^p2.

static inline double ipow(double x, int p) {
    double r = 1;
    for (int i = 0; i < p; i++) r *= x;
    return r;
}

#define FT_NORM_EPS 1e-12   // F.normalize's default eps

// One side of a sample: pooled/converted planes P (c, oh*ow), a = channel mean of P^p1,
// returns the norm of a (the divisor is max(norm, eps)).
static double ft_factor(double * P, double * a, const float * x, int c, int H, int W, int oh, int ow, int p1) {
    const size_t ohw = (size_t)oh * ow, HW = (size_t)H * W;
    const bool pool = H != oh || W != ow;
    for (int ch = 0; ch < c; ch++) {
        if (pool) apool_f(P + (size_t)ch * ohw, x + (size_t)ch * HW, H, W, oh, ow);
        else for (size_t k = 0; k < ohw; k++) P[(size_t)ch * ohw + k] = x[(size_t)ch * HW + k];
    }
    double nn = 0;
    for (size_t k = 0; k < ohw; k++) {
        double s = 0;
        for (int ch = 0; ch < c; ch++) s += ipow(P[(size_t)ch * ohw + k], p1);
        a[k] = s / c;
        nn += a[k] * a[k];
    }
    return sqrt(nn);
}

// Gradient of one side: gf = dL/dF (ohw), F = a / max(norm, eps); writes dL/dx into dx
// (c, H, W) (overwrite or add), using back (H*W doubles) when pooling.
static void ft_back(float * dx, double * ga, double * back, const double * gf, const double * P, const double * a,
                    double norm, int c, int H, int W, int oh, int ow, int p1, bool accumulate) {
    const size_t ohw = (size_t)oh * ow, HW = (size_t)H * W;
    const bool pool = H != oh || W != ow;
    if (norm >= FT_NORM_EPS) {
        double fg = 0;
        for (size_t k = 0; k < ohw; k++) fg += a[k] / norm * gf[k];
        for (size_t k = 0; k < ohw; k++) ga[k] = (gf[k] - a[k] / norm * fg) / norm;
    } else {
        for (size_t k = 0; k < ohw; k++) ga[k] = gf[k] / FT_NORM_EPS;
    }
    for (int ch = 0; ch < c; ch++) {
        const double * Pc = P + (size_t)ch * ohw;
        float * d = dx + (size_t)ch * HW;
        if (pool) {
            double * gp = back + HW;   // ohw doubles after the H*W plane
            for (size_t k = 0; k < ohw; k++) gp[k] = ga[k] * p1 * ipow(Pc[k], p1 - 1) / c;
            memset(back, 0, HW * sizeof *back);
            apool_back(back, gp, H, W, oh, ow);
            for (size_t k = 0; k < HW; k++) put(&d[k], back[k], accumulate);
        } else {
            for (size_t k = 0; k < ohw; k++) put(&d[k], ga[k] * p1 * ipow(Pc[k], p1 - 1) / c, accumulate);
        }
    }
}

enum kd_status kd_loss_ft(float * loss, float * ds, float * dt, struct kd_fmap s_v, struct kd_fmap t_v,
                          int p1, float p2, float weight, bool accumulate) {
    const struct kd_fmap * s = &s_v, * t = &t_v;
    size_t ns = 0, nt = 0;
    FMAP_CHECK("s", s, &ns);
    FMAP_CHECK("t", t, &nt);
    if (t->n != s->n) KD_FAIL(KD_ERR_SHAPE, "t has %d samples, s has %d", t->n, s->n);
    if (p1 < 1 || p1 > 8) KD_FAIL(KD_ERR_VALUE, "p1 (%d) must be in [1, 8]", p1);
    if (!(p2 >= 1) || !isfinite(p2)) KD_FAIL(KD_ERR_VALUE, "p2 (%g) must be >= 1 and finite", (double)p2);
    KD_TRY(check_weight(__func__, weight));
    // RepDistiller: the map with the larger h is pooled to the other's size.
    int oh, ow;
    if (s->h > t->h) { oh = t->h; ow = t->w; }
    else { oh = s->h; ow = s->w; }
    if ((s->h < t->h && (s->w > t->w)) || (s->h > t->h && s->w < t->w) || (s->h == t->h && s->w != t->w))
        KD_FAIL(KD_ERR_SHAPE, "s (%d x %d) and t (%d x %d): the spatial sizes must be equal or one map at least as "
                "large as the other in both dimensions", s->h, s->w, t->h, t->w);
    const int n = s->n;
    const size_t ohw = (size_t)oh * ow, HWs = (size_t)s->h * s->w, HWt = (size_t)t->h * t->w;
    const size_t HWmax = HWs > HWt ? HWs : HWt;
    // per thread: Ps (c_s planes), Pt (c_t planes), as, at, gf, ga (ohw each), back (HWmax + ohw)
    const size_t per = ((size_t)s->c + (size_t)t->c) * ohw + 5 * ohw + HWmax;
    const int nth = kd_omp_threads();
    size_t all, bytes;
    if (!kd_mul_ok(per, (size_t)nth, &all) || !kd_mul_ok(all, sizeof(double), &bytes))
        KD_FAIL(KD_ERR_SHAPE, "s and t are too large for the scratch");
    double * scratch = malloc(bytes);
    double * partial = malloc((size_t)n * sizeof *partial);
    if (!scratch || !partial) {
        free(scratch); free(partial);
        KD_FAIL(KD_ERR_NOMEM, "cannot allocate %zu doubles of scratch", all);
    }
    const double P2 = p2, g_scale = (double)weight / ((double)n * ohw);
    const size_t s_per = ns / (size_t)n, t_per = nt / (size_t)n;
    #pragma omp parallel for schedule(static) if (ns + nt > PAR_MIN)
    for (int i = 0; i < n; i++) {
        double * Ps = scratch + (size_t)kd_omp_tid() * per, * Pt = Ps + (size_t)s->c * ohw;
        double * as = Pt + (size_t)t->c * ohw, * at = as + ohw, * gf = at + ohw, * ga = gf + ohw, * back = ga + ohw;
        double nsn = ft_factor(Ps, as, s->x + (size_t)i * s_per, s->c, s->h, s->w, oh, ow, p1);
        double ntn = ft_factor(Pt, at, t->x + (size_t)i * t_per, t->c, t->h, t->w, oh, ow, p1);
        double ds_ = nsn > FT_NORM_EPS ? nsn : FT_NORM_EPS, dt_ = ntn > FT_NORM_EPS ? ntn : FT_NORM_EPS;
        double acc = 0;
        for (size_t k = 0; k < ohw; k++) {
            double d = as[k] / ds_ - at[k] / dt_, ad = fabs(d);
            double sg = d > 0 ? 1.0 : d < 0 ? -1.0 : 0.0;
            if (P2 == 1) { acc += ad; gf[k] = g_scale * sg; }
            else { acc += pow(ad, P2); gf[k] = g_scale * P2 * pow(ad, P2 - 1) * sg; }
        }
        partial[i] = acc;
        if (ds)
            ft_back(ds + (size_t)i * s_per, ga, back, gf, Ps, as, nsn, s->c, s->h, s->w, oh, ow, p1, accumulate);
        if (dt) {
            for (size_t k = 0; k < ohw; k++) gf[k] = -gf[k];
            ft_back(dt + (size_t)i * t_per, ga, back, gf, Pt, at, ntn, t->c, t->h, t->w, oh, ow, p1, accumulate);
        }
    }
    double total = sum_in_order(partial, (size_t)n) / ((double)n * ohw);
    free(scratch);
    free(partial);
    if (loss) *loss = (float)total;
    if (!isfinite(total)) KD_FAIL(KD_ERR_NONFINITE, "FT loss is not finite");
    return KD_OK;
}

// ---------------------------------------------------------------------------------------
// VID (RepDistiller VID.py): var_c = softplus(log_scale_c) + eps, mean of
// 0.5 ((mu - t)^2 / var + log var).

static inline double softplus(double a) { return a > 0 ? a + log1p(exp(-a)) : log1p(exp(a)); }
static inline double sigmoid(double a) { return a >= 0 ? 1.0 / (1.0 + exp(-a)) : exp(a) / (1.0 + exp(a)); }

float kd_vid_log_scale_init(float init_var, float eps) {
    return (float)log(expm1((double)init_var - (double)eps));
}

enum kd_status kd_loss_vid(float * loss, float * dmu, float * dlog_scale, struct kd_fmap mu_v,
                           struct kd_fmap t_v, const float * log_scale, float eps, float weight, bool accumulate) {
    const struct kd_fmap * mu = &mu_v, * t = &t_v;
    size_t nm = 0, nt = 0;
    FMAP_CHECK("mu", mu, &nm);
    FMAP_CHECK("t", t, &nt);
    if (t->n != mu->n || t->c != mu->c || t->h != mu->h || t->w != mu->w)
        KD_FAIL(KD_ERR_SHAPE, "t (%d, %d, %d, %d) must have the shape of mu (%d, %d, %d, %d) (pool the regressor's "
                "input to the teacher's size)", t->n, t->c, t->h, t->w, mu->n, mu->c, mu->h, mu->w);
    if (!log_scale) KD_FAIL(KD_ERR_VALUE, "log_scale is NULL");
    for (int k = 0; k < mu->c; k++)
        if (!isfinite(log_scale[k])) KD_FAIL(KD_ERR_VALUE, "log_scale[%d] = %g is not finite", k, (double)log_scale[k]);
    if (!(eps >= 0) || !isfinite(eps)) KD_FAIL(KD_ERR_VALUE, "eps (%g) must be >= 0 and finite", (double)eps);
    KD_TRY(check_weight(__func__, weight));
    const int n = mu->n, C = mu->c;
    const size_t hw = (size_t)mu->h * mu->w, chw = (size_t)C * hw;
    const double N = (double)nm;
    double * partial = malloc((size_t)C * sizeof *partial);
    if (!partial) KD_FAIL(KD_ERR_NOMEM, "cannot allocate scratch for %d channels", C);
    #pragma omp parallel for schedule(static) if (nm > PAR_MIN)
    for (int c = 0; c < C; c++) {
        const double a = log_scale[c], var = softplus(a) + eps, lv = log(var);
        const double gmu = (double)weight / (N * var);
        double se = 0;
        for (int i = 0; i < n; i++) {
            const size_t off = (size_t)i * chw + (size_t)c * hw;
            for (size_t k = 0; k < hw; k++) {
                double d = (double)mu->x[off + k] - t->x[off + k];
                se += d * d;
                if (dmu) put(&dmu[off + k], gmu * d, accumulate);
            }
        }
        const double cnt = (double)n * hw;
        partial[c] = 0.5 * (se / var + cnt * lv);
        // d/da of 0.5 (se / var + cnt log var) / N, var = softplus(a) + eps
        if (dlog_scale) put(&dlog_scale[c], (double)weight * 0.5 * (cnt / var - se / (var * var)) * sigmoid(a) / N, accumulate);
    }
    double total = sum_in_order(partial, (size_t)C) / N;
    free(partial);
    if (loss) *loss = (float)total;
    if (!isfinite(total)) KD_FAIL(KD_ERR_NONFINITE, "VID loss is not finite");
    return KD_OK;
}

// ---------------------------------------------------------------------------------------
// CC (RepDistiller CC.py, the authors' code): delta = |es - et|, mean over consecutive pairs
// of sum_d delta_i delta_i+1.

enum kd_status kd_loss_cc(float * loss, float * des, float * det, const float * es, const float * et, int n, int d,
                          float weight, bool accumulate) {
    if (!es) KD_FAIL(KD_ERR_VALUE, "es is NULL");
    if (!et) KD_FAIL(KD_ERR_VALUE, "et is NULL");
    if (n < 2) KD_FAIL(KD_ERR_VALUE, "n (%d) must be >= 2: CC pairs consecutive samples of the batch", n);
    if (d < 1) KD_FAIL(KD_ERR_VALUE, "d (%d) must be >= 1", d);
    KD_TRY(check_weight(__func__, weight));
    const size_t D = (size_t)d;
    double total = 0;
    for (int i = 0; i + 1 < n; i++) {
        const float * a0 = es + (size_t)i * D, * b0 = et + (size_t)i * D, * a1 = a0 + D, * b1 = b0 + D;
        double row = 0;
        for (size_t k = 0; k < D; k++) row += fabs((double)a0[k] - b0[k]) * fabs((double)a1[k] - b1[k]);
        total += row;
    }
    if (des || det) {
        const double g_scale = (double)weight / (n - 1);
        for (int i = 0; i < n; i++)
            for (size_t k = 0; k < D; k++) {
                const size_t o = (size_t)i * D + k;
                double dl = (double)es[o] - et[o], nb = 0;
                if (i > 0) nb += fabs((double)es[o - D] - et[o - D]);
                if (i + 1 < n) nb += fabs((double)es[o + D] - et[o + D]);
                double g = g_scale * nb * (dl > 0 ? 1.0 : dl < 0 ? -1.0 : 0.0);
                if (des) put(&des[o], g, accumulate);
                if (det) put(&det[o], -g, accumulate);
            }
    }
    total /= (n - 1);
    if (loss) *loss = (float)total;
    if (!isfinite(total)) KD_FAIL(KD_ERR_NONFINITE, "CC loss is not finite");
    return KD_OK;
}

// ---------------------------------------------------------------------------------------
// ReviewKD's hierarchical context loss (mdistiller ReviewKD.py hcl_loss), one pair of maps.

enum kd_status kd_loss_hcl(float * loss, float * ds, struct kd_fmap s_v, struct kd_fmap t_v, float weight,
                           bool accumulate) {
    const struct kd_fmap * s = &s_v, * t = &t_v;
    size_t ns = 0, nt = 0;
    FMAP_CHECK("s", s, &ns);
    FMAP_CHECK("t", t, &nt);
    KD_TRY(same_shape(__func__, s, t));
    KD_TRY(check_weight(__func__, weight));
    const int h = s->h, w = s->w;
    // Levels used (l < h, as mdistiller: it compares with h only) and their weights.
    int lv[3], nl = 0;
    double wl[3], cnt = 1.0, tot = 1.0;
    for (int l = 4; l >= 1; l /= 2) {
        if (l >= h) continue;
        cnt /= 2;
        lv[nl] = l;
        wl[nl] = cnt;
        tot += cnt;
        nl++;
    }
    const size_t hw = (size_t)h * w, planes = (size_t)s->n * s->c;
    const int nth = kd_omp_threads();
    const size_t per = 2 * hw + 16;   // d, g, pooled (at most 4 x 4)
    double * scratch = malloc((size_t)nth * per * sizeof *scratch);
    double * partial = malloc(planes * 4 * sizeof *partial);
    if (!scratch || !partial) {
        free(scratch); free(partial);
        KD_FAIL(KD_ERR_NOMEM, "cannot allocate scratch for %zu planes", planes);
    }
    const double N = (double)ns;
    #pragma omp parallel for schedule(static) if (ns > PAR_MIN)
    for (size_t p = 0; p < planes; p++) {
        double * d = scratch + (size_t)kd_omp_tid() * per, * g = d + hw, * pl = g + hw;
        const float * sp = s->x + p * hw, * tp = t->x + p * hw;
        double full = 0;
        for (size_t k = 0; k < hw; k++) {
            d[k] = (double)sp[k] - tp[k];
            full += d[k] * d[k];
            g[k] = 2.0 * d[k] / N;
        }
        partial[p * 4] = full;
        for (int j = 0; j < nl; j++) {
            const int l = lv[j];
            apool_d(pl, d, h, w, l, l);
            double e = 0;
            for (int k = 0; k < l * l; k++) {
                e += pl[k] * pl[k];
                pl[k] *= 2.0 * wl[j] / ((double)planes * l * l);   // d/dpooled of w_l * mse_l
            }
            partial[p * 4 + 1 + j] = e;
            if (ds) apool_back(g, pl, h, w, l, l);
        }
        if (ds) for (size_t k = 0; k < hw; k++) put(&ds[p * hw + k], (double)weight * g[k] / tot, accumulate);
    }
    double total = 0;
    for (int j = 0; j <= nl; j++) {
        double e = 0;
        for (size_t p = 0; p < planes; p++) e += partial[p * 4 + j];
        total += j == 0 ? e / N : wl[j - 1] * e / ((double)planes * lv[j - 1] * lv[j - 1]);
    }
    total /= tot;
    free(scratch);
    free(partial);
    if (loss) *loss = (float)total;
    if (!isfinite(total)) KD_FAIL(KD_ERR_NONFINITE, "HCL loss is not finite");
    return KD_OK;
}

// ---------------------------------------------------------------------------------------
// CRD (RepDistiller crd/): memory banks, NCE loss, momentum update.

#define CRD_EPS 1e-7   // RepDistiller's eps in ContrastLoss

struct kd_crd {
    int64_t n_data;
    int dim, n_neg;            // n_neg = 0: in-batch mode
    float T, momentum;
    uint64_t seed;
    float * banks;             // 2 * n_data * dim floats (bank 0 then bank 1); NULL in-batch
    float z[2];
    int64_t steps;
    int64_t * labels;          // data-set labels (n_data) or NULL
    int64_t * order;           // 0..n_data-1 sorted by (label, index)
};

#define FAIL_NULL_(st, ...) do { kd_set_error_((st), __func__, __VA_ARGS__); goto fail; } while (0)

// The banks (exactly 2 * n_data * dim floats). Large ones are 2 MB-aligned and marked for
// transparent huge pages: the loss reads rows at random all over them, and with 4 KB pages
// nearly every row is a TLB miss (a page walk, dearer still in a VM). Freed with free().
static float * bank_alloc(size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    const size_t huge = (size_t)2 << 20;
    if (bytes >= 2 * huge) {
        void * p = NULL;
        if (posix_memalign(&p, huge, bytes) != 0) return NULL;
        madvise(p, bytes - bytes % huge, MADV_HUGEPAGE);   // a hint: failure changes nothing
        return p;
    }
#endif
    return malloc(bytes);
}

static enum kd_status crd_check_common(const char * func, int64_t n_data, int dim, float T) {
    if (n_data < 2) return kd_set_error_(KD_ERR_VALUE, func, "n_data (%lld) must be >= 2", (long long)n_data);
    if (dim < 1) return kd_set_error_(KD_ERR_VALUE, func, "dim (%d) must be >= 1", dim);
    if (!(T > 0) || !isfinite(T)) return kd_set_error_(KD_ERR_VALUE, func, "T (%g) must be > 0 and finite", (double)T);
    return KD_OK;
}

struct kd_crd * kd_crd_new(int64_t n_data, int dim, int n_neg, float T, float momentum, uint64_t seed) {
    struct kd_crd * c = NULL;
    if (crd_check_common(__func__, n_data, dim, T) != KD_OK) return NULL;
    if (n_neg < 1) FAIL_NULL_(KD_ERR_VALUE, "n_neg (%d) must be >= 1 (kd_crd_new_in_batch for in-batch negatives)", n_neg);
    if (!(momentum >= 0 && momentum < 1)) FAIL_NULL_(KD_ERR_VALUE, "momentum (%g) must be in [0, 1)", (double)momentum);
    size_t rows, elems, bytes;
    if (!kd_mul_ok((size_t)n_data, 2, &rows) || !kd_mul_ok(rows, (size_t)dim, &elems) ||
        !kd_mul_ok(elems, sizeof(float), &bytes))
        FAIL_NULL_(KD_ERR_VALUE, "n_data (%lld) x dim (%d) banks are too large", (long long)n_data, dim);
    c = calloc(1, sizeof *c);
    if (!c) FAIL_NULL_(KD_ERR_NOMEM, "out of memory");
    c->banks = bank_alloc(bytes);
    if (!c->banks) FAIL_NULL_(KD_ERR_NOMEM, "cannot allocate the memory banks (2 x %lld x %d floats, %zu bytes)",
                              (long long)n_data, dim, bytes);
    c->n_data = n_data; c->dim = dim; c->n_neg = n_neg; c->T = T; c->momentum = momentum; c->seed = seed;
    c->z[0] = c->z[1] = -1.0f;
    // uniform in [-stdv, stdv), stdv = 1/sqrt(dim/3) (RepDistiller's rand * 2 stdv - stdv)
    const double stdv = 1.0 / sqrt(dim / 3.0);
    const uint64_t key = kd_splitmix64(seed ^ 0x62616e6b696e6974ull);
    float * b = c->banks;
    #pragma omp parallel for schedule(static) if (elems > PAR_MIN)
    for (size_t e = 0; e < elems; e++)
        b[e] = (float)((double)kd_uniform(kd_hash(key, e)) * 2.0 * stdv - stdv);
    return c;
fail:
    kd_crd_free(c);
    return NULL;
}

struct kd_crd * kd_crd_new_in_batch(int64_t n_data, int dim, float T) {
    if (crd_check_common(__func__, n_data, dim, T) != KD_OK) return NULL;
    struct kd_crd * c = calloc(1, sizeof *c);
    if (!c) { kd_set_error_(KD_ERR_NOMEM, __func__, "out of memory"); return NULL; }
    c->n_data = n_data; c->dim = dim; c->n_neg = 0; c->T = T;
    c->z[0] = c->z[1] = -1.0f;
    return c;
}

void kd_crd_free(struct kd_crd * c) {
    if (!c) return;
    free(c->banks);
    free(c->labels);
    free(c->order);
    free(c);
}

static _Thread_local const int64_t * tl_labels_;   // qsort's comparator has no context argument
static int cmp_by_label_(const void * a, const void * b) {
    int64_t i = *(const int64_t *)a, j = *(const int64_t *)b;
    int64_t li = tl_labels_[i], lj = tl_labels_[j];
    if (li != lj) return li < lj ? -1 : 1;
    return i < j ? -1 : i > j;
}

enum kd_status kd_crd_set_labels(struct kd_crd * c, const int64_t * labels, int64_t n_data) {
    if (!c) KD_FAIL(KD_ERR_VALUE, "crd is NULL");
    if (!c->banks) KD_FAIL(KD_ERR_STATE, "in-batch mode has no banks: pass the batch's labels to kd_crd_loss");
    if (!labels) KD_FAIL(KD_ERR_VALUE, "labels is NULL");
    if (n_data != c->n_data) KD_FAIL(KD_ERR_SHAPE, "labels has %lld entries, the banks %lld rows", (long long)n_data,
                                     (long long)c->n_data);
    for (int64_t i = 0; i < n_data; i++)
        if (labels[i] < 0) KD_FAIL(KD_ERR_VALUE, "labels[%lld] = %lld is negative", (long long)i, (long long)labels[i]);
    int64_t * lab = malloc((size_t)n_data * sizeof *lab), * ord = malloc((size_t)n_data * sizeof *ord);
    if (!lab || !ord) {
        free(lab); free(ord);
        KD_FAIL(KD_ERR_NOMEM, "cannot allocate the label index (%lld entries)", (long long)n_data);
    }
    memcpy(lab, labels, (size_t)n_data * sizeof *lab);
    for (int64_t i = 0; i < n_data; i++) ord[i] = i;
    tl_labels_ = lab;
    qsort(ord, (size_t)n_data, sizeof *ord, cmp_by_label_);
    tl_labels_ = NULL;
    free(c->labels);
    free(c->order);
    c->labels = lab;
    c->order = ord;
    return KD_OK;
}

// [lo, hi) of label y in c->order.
static void class_range(const struct kd_crd * c, int64_t y, int64_t * lo, int64_t * hi) {
    int64_t a = 0, b = c->n_data;
    while (a < b) { int64_t m = a + (b - a) / 2; if (c->labels[c->order[m]] < y) a = m + 1; else b = m; }
    *lo = a;
    b = c->n_data;
    while (a < b) { int64_t m = a + (b - a) / 2; if (c->labels[c->order[m]] <= y) a = m + 1; else b = m; }
    *hi = a;
}

static inline uint64_t below(uint64_t h, uint64_t m) { return (uint64_t)(((unsigned __int128)h * m) >> 64); }

// Open-addressing set of draws for Floyd's sampling; a slot is live when its stamp is `cur`.
struct hset { uint64_t * key; uint32_t * stamp; size_t mask; uint32_t cur; };

static bool hset_add(struct hset * s, uint64_t k) {
    size_t i = (size_t)(kd_splitmix64(k) & s->mask);
    while (s->stamp[i] == s->cur) {
        if (s->key[i] == k) return false;
        i = (i + 1) & s->mask;
    }
    s->stamp[i] = s->cur;
    s->key[i] = k;
    return true;
}

// Rows for the anchor with data-set index a: rows[0] = a, rows[1..K] negatives drawn from the
// pool (other samples, or other classes when by_class), keyed by (seed, step, a).
static void crd_draw(const struct kd_crd * c, int64_t * rows, int64_t a, bool by_class, int64_t step, struct hset * hs) {
    const int K = c->n_neg;
    int64_t lo = 0, cnt = 0, P;
    if (by_class) {
        int64_t hi;
        class_range(c, c->labels[a], &lo, &hi);
        cnt = hi - lo;
        P = c->n_data - cnt;
    } else {
        P = c->n_data - 1;
    }
    const uint64_t key = kd_hash(kd_hash(c->seed ^ 0x6e65676174697665ull, (uint64_t)step), (uint64_t)a);
    rows[0] = a;
    int64_t * out = rows + 1;
    if ((int64_t)K <= P) {   // Floyd: K distinct values of [0, P)
        hs->cur++;
        int k = 0;
        for (int64_t j = P - K; j < P; j++) {
            uint64_t r = below(kd_hash(key, (uint64_t)j), (uint64_t)j + 1);
            if (!hset_add(hs, r)) { r = (uint64_t)j; hset_add(hs, r); }
            out[k++] = (int64_t)r;
        }
    } else {
        for (int k = 0; k < K; k++) out[k] = (int64_t)below(kd_hash(key, (uint64_t)k), (uint64_t)P);
    }
    for (int k = 0; k < K; k++) {
        int64_t r = out[k];
        out[k] = by_class ? (r < lo ? c->order[r] : c->order[r + cnt]) : r + (r >= a);
    }
}

// Dot product in double with a fixed association (16 lanes: four independent AVX2 chains);
// b is the anchor, converted to double once per anchor.
static inline double dotf(const float * a, const double * b, int n) {
    double acc[16] = { 0 };
    int k = 0;
    for (; k + 16 <= n; k += 16)
        for (int l = 0; l < 16; l++) acc[l] += (double)a[k + l] * b[k + l];
    double tail = 0;
    for (; k < n; k++) tail += (double)a[k] * b[k];
    for (int l = 0; l < 8; l++) acc[l] += acc[l + 8];
    return (((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))) + tail;
}

// Rows are gathered at random from banks far larger than the caches: fetch a few ahead.
#define CRD_PREFETCH 8
static inline void prefetch_row(const float * r, int dim) {
    for (size_t off = 0; off < (size_t)dim * sizeof(float); off += 64) __builtin_prefetch((const char *)r + off, 0, 3);
}

// log of sum_j exp(<cand[rows[j]], v> / T) over j = 0..K (Z's first batch); vd: dim scratch.
static double crd_lse(const float * v, const float * cand, const int64_t * rows, int K1, int dim, double invT,
                      double * vd) {
    for (int k = 0; k < dim; k++) vd[k] = v[k];
    v = NULL;
    double m = -INFINITY, s = 0;
    for (int j = 0; j < CRD_PREFETCH && j < K1; j++) prefetch_row(cand + (size_t)rows[j] * dim, dim);
    for (int j = 0; j < K1; j++) {
        if (j + CRD_PREFETCH < K1) prefetch_row(cand + (size_t)rows[j + CRD_PREFETCH] * dim, dim);
        double x = dotf(cand + (size_t)rows[j] * dim, vd, dim) * invT;
        if (x > m) { s = s * exp(m - x) + 1.0; m = x; }
        else s += exp(x - m);
    }
    return m + log(s);
}

// NCE loss of anchor v against candidates cand[rows[0]] (positive) and cand[rows[1..K]].
// dL/d<cand_j, v> = coef_j / T: when g != NULL, g (dim) = gscale * dL/dv (gscale includes 1/T);
// when coef != NULL, coef[rows[j]] = gscale * coef_j (the others untouched). vd: dim scratch.
// With lp = log P_j and u = lc - lp: log(P_j + c) = lp + softplus(u), P_j / (P_j + c) =
// 1 / (1 + e^u): one exp and one log1p per row.
static double crd_anchor(const float * v, const float * cand, const int64_t * rows, int K, int dim, double invT,
                         double logZ, double lc, double lkpn, double * g, double * coef_out, double gscale,
                         double * vd) {
    double L = 0;
    for (int k = 0; k < dim; k++) vd[k] = v[k];
    if (g) memset(g, 0, (size_t)dim * sizeof *g);
    for (int j = 0; j < CRD_PREFETCH && j <= K; j++) prefetch_row(cand + (size_t)rows[j] * dim, dim);
    for (int j = 0; j <= K; j++) {
        if (j + CRD_PREFETCH <= K) prefetch_row(cand + (size_t)rows[j + CRD_PREFETCH] * dim, dim);
        const float * r = cand + (size_t)rows[j] * dim;
        double lp = dotf(r, vd, dim) * invT - logZ;   // log P_j
        double u = lc - lp, sp, sig;                  // softplus(u), P_j / (P_j + c)
        if (u > 0) { double e = exp(-u); sp = u + log1p(e); sig = e / (1.0 + e); }
        else { double e = exp(u); sp = log1p(e); sig = 1.0 / (1.0 + e); }
        double coef;
        if (j == 0) { L += sp; coef = sig - 1.0; }             // -log(P / (P + c))
        else { L += lp + sp - lkpn; coef = sig; }              // log(P + c) - log(K Pn)
        coef *= gscale;
        if (coef_out) coef_out[rows[j]] = coef;
        if (g) for (int k = 0; k < dim; k++) g[k] += coef * r[k];
    }
    return L;
}

static enum kd_status crd_check_batch(const char * func, const struct kd_crd * c, const float * es, const float * et,
                                      const int64_t * idx, int n) {
    if (!es) return kd_set_error_(KD_ERR_VALUE, func, "es is NULL");
    if (!et) return kd_set_error_(KD_ERR_VALUE, func, "et is NULL");
    if (n < 1) return kd_set_error_(KD_ERR_VALUE, func, "n (%d) must be >= 1", n);
    if (c->banks || idx) {
        if (!idx) return kd_set_error_(KD_ERR_VALUE, func, "idx is NULL");
        for (int i = 0; i < n; i++)
            if (idx[i] < 0 || idx[i] >= c->n_data)
                return kd_set_error_(KD_ERR_VALUE, func, "idx[%d] = %lld is outside [0, n_data = %lld)", i,
                                     (long long)idx[i], (long long)c->n_data);
    }
    return KD_OK;
}

static enum kd_status crd_check_labels(const char * func, const struct kd_crd * c, const int64_t * idx,
                                       const int64_t * labels, int n) {
    if (!labels || !c->banks) return KD_OK;
    if (!c->labels)
        return kd_set_error_(KD_ERR_STATE, func, "labels given but the data set's labels are not set (kd_crd_set_labels)");
    for (int i = 0; i < n; i++)
        if (labels[i] != c->labels[idx[i]])
            return kd_set_error_(KD_ERR_VALUE, func, "labels[%d] = %lld but sample idx[%d] = %lld has label %lld", i,
                                 (long long)labels[i], i, (long long)idx[i], (long long)c->labels[idx[i]]);
    for (int i = 0; i < n; i++) {
        int64_t lo, hi;
        class_range(c, c->labels[idx[i]], &lo, &hi);
        if (hi - lo == c->n_data)
            return kd_set_error_(KD_ERR_VALUE, func, "every sample has label %lld: no negatives of another class",
                                 (long long)labels[i]);
    }
    return KD_OK;
}

// Mode of one call: given rows (sample_idx), drawn rows, or the batch itself.
enum crd_mode { CRD_GIVEN, CRD_DRAW, CRD_BATCH };

// Rows of anchor i into `rows` (scratch of K+1 or n entries); returns the number of negatives.
static int crd_rows(const struct kd_crd * c, enum crd_mode mode, int i, int n, const int64_t * idx,
                    const int64_t * labels, const int64_t * given, int64_t * rows, const int64_t ** out,
                    struct hset * hs) {
    switch (mode) {
    case CRD_GIVEN:
        *out = given + (size_t)i * (c->n_neg + 1);
        return c->n_neg;
    case CRD_DRAW:
        crd_draw(c, rows, idx[i], labels != NULL, c->steps, hs);
        *out = rows;
        return c->n_neg;
    case CRD_BATCH: {
        int k = 0;
        rows[k++] = i;
        for (int j = 0; j < n; j++)
            if (j != i && !(labels && labels[j] == labels[i])) rows[k++] = j;
        *out = rows;
        return k - 1;
    }
    }
    return 0;
}

static enum kd_status crd_run(const char * func, struct kd_crd * c, enum crd_mode mode, float * loss, float * des,
                              float * det, const float * es, const float * et, const int64_t * idx,
                              const int64_t * labels, const int64_t * given, int n, float weight, bool accumulate) {
    const int dim = c->dim;
    const int K1max = mode == CRD_BATCH ? n : c->n_neg + 1;
    const double invT = 1.0 / (double)c->T, lPn = -log((double)c->n_data);
    // candidates: student anchors (side 0) against bank 1 / the teacher embeddings, teacher
    // anchors (side 1) against bank 0 / the student embeddings
    const float * cand[2], * anc[2] = { es, et };
    float * grad[2] = { des, det };
    if (mode == CRD_BATCH) { cand[0] = et; cand[1] = es; }
    else { cand[0] = c->banks + (size_t)c->n_data * dim; cand[1] = c->banks; }
    const int nth = kd_omp_threads();
    size_t cap = 16;
    if (mode == CRD_DRAW) while (cap < 2 * (size_t)c->n_neg) cap *= 2;
    // scratch per thread: rows (K1max int64), g and vd (dim doubles each), hash set (draw mode)
    const size_t per = (size_t)K1max * sizeof(int64_t) + 2 * (size_t)dim * sizeof(double) +
                       (mode == CRD_DRAW ? cap * (sizeof(uint64_t) + sizeof(uint32_t)) : 0);
    char * scratch = calloc((size_t)nth, per);
    double * part = malloc((size_t)n * 2 * sizeof *part);
    struct hset * hs = calloc((size_t)nth, sizeof *hs);
    // in-batch: the coefficient matrices of both sides (anchor i, candidate j), for the
    // gradient through the candidates
    const bool batch_grad = mode == CRD_BATCH && (des || det);
    double * coef = batch_grad ? calloc(2 * (size_t)n * n, sizeof *coef) : NULL;
    if (!scratch || !part || !hs || (batch_grad && !coef)) {
        free(scratch); free(part); free(hs); free(coef);
        return kd_set_error_(KD_ERR_NOMEM, func, "cannot allocate %zu bytes of scratch per thread", per);
    }
    for (int th = 0; th < nth; th++) {
        char * base = scratch + (size_t)th * per + (size_t)K1max * sizeof(int64_t) + 2 * (size_t)dim * sizeof(double);
        hs[th].key = (uint64_t *)base;
        hs[th].stamp = (uint32_t *)(base + cap * sizeof(uint64_t));
        hs[th].mask = cap - 1;
    }
    const bool par = (size_t)n * K1max * (size_t)dim > PAR_MIN;
    (void)par;   // NO_OMP builds
    enum kd_status st = KD_OK;
    // Z, once: mean of exp(score / T) over this batch's scores, times n_data (RepDistiller);
    // both sides computed before either is stored.
    float znew[2] = { c->z[0], c->z[1] };
    for (int side = 0; side < 2; side++) {
        if (c->z[side] > 0) continue;
        double cnt_total = 0;
        #pragma omp parallel for schedule(static) if (par)
        for (int i = 0; i < n; i++) {
            const int th = kd_omp_tid();
            int64_t * rows = (int64_t *)(scratch + (size_t)th * per);
            const int64_t * r;
            int K = crd_rows(c, mode, i, n, idx, labels, given, rows, &r, &hs[th]);
            double * vd = (double *)(scratch + (size_t)th * per + (size_t)K1max * sizeof(int64_t)) + dim;
            part[2 * i] = crd_lse(anc[side] + (size_t)i * dim, cand[side], r, K + 1, dim, invT, vd);
            part[2 * i + 1] = K + 1;
        }
        double m = -INFINITY, s = 0;
        for (int i = 0; i < n; i++) {
            double x = part[2 * i];
            cnt_total += part[2 * i + 1];
            if (x == -INFINITY) continue;
            if (x > m) { s = s * exp(m - x) + 1.0; m = x; }
            else s += exp(x - m);
        }
        double z = exp(m + log(s) - log(cnt_total) - lPn);
        if (!(z > 0) || !((float)z <= FLT_MAX) || (float)z == 0) {
            st = kd_set_error_(KD_ERR_NONFINITE, func, "normalisation constant Z (%g) is not a positive finite float", z);
            goto done;
        }
        znew[side] = (float)z;
    }
    c->z[0] = znew[0];
    c->z[1] = znew[1];
    {
        const double logZ[2] = { log((double)c->z[0]), log((double)c->z[1]) };
        const double gscale = (double)weight * invT / n;
        #pragma omp parallel for schedule(static) if (par)
        for (int i = 0; i < n; i++) {
            const int th = kd_omp_tid();
            int64_t * rows = (int64_t *)(scratch + (size_t)th * per);
            double * g = (double *)(scratch + (size_t)th * per + (size_t)K1max * sizeof(int64_t)), * vd = g + dim;
            const int64_t * r;
            int K = crd_rows(c, mode, i, n, idx, labels, given, rows, &r, &hs[th]);
            const double kpn = K * exp(lPn), lc = log(kpn + CRD_EPS), lkpn = log(kpn);
            for (int side = 0; side < 2; side++) {
                if (batch_grad) {
                    part[2 * i + side] = crd_anchor(anc[side] + (size_t)i * dim, cand[side], r, K, dim, invT,
                                                    logZ[side], lc, lkpn, NULL, coef + ((size_t)side * n + i) * n, gscale,
                                                    vd);
                    continue;
                }
                part[2 * i + side] = crd_anchor(anc[side] + (size_t)i * dim, cand[side], r, K, dim, invT, logZ[side],
                                                lc, lkpn, grad[side] ? g : NULL, NULL, gscale, vd);
                if (grad[side])
                    for (int k = 0; k < dim; k++) put(&grad[side][(size_t)i * dim + k], g[k], accumulate);
            }
        }
        if (batch_grad) {
            // score s_ij = <anchor_i, cand_j>: student anchors (side 0) score es_i against et_j,
            // teacher anchors (side 1) et_i against es_j. d/des_i = sum_j C0[i][j] et_j + sum_j C1[j][i] et_j,
            // d/det_i = sum_j C1[i][j] es_j + sum_j C0[j][i] es_j.
            const double * C0 = coef, * C1 = coef + (size_t)n * n;
            #pragma omp parallel for schedule(static) if (par)
            for (int i = 0; i < n; i++) {
                double * g = (double *)(scratch + (size_t)kd_omp_tid() * per + (size_t)K1max * sizeof(int64_t));
                for (int side = 0; side < 2; side++) {
                    if (!grad[side]) continue;
                    const double * own = side == 0 ? C0 : C1, * other = side == 0 ? C1 : C0;
                    const float * partner = side == 0 ? et : es;
                    memset(g, 0, (size_t)dim * sizeof *g);
                    for (int j = 0; j < n; j++) {
                        double cj = own[(size_t)i * n + j] + other[(size_t)j * n + i];
                        if (cj == 0) continue;
                        const float * r = partner + (size_t)j * dim;
                        for (int k = 0; k < dim; k++) g[k] += cj * r[k];
                    }
                    for (int k = 0; k < dim; k++) put(&grad[side][(size_t)i * dim + k], g[k], accumulate);
                }
            }
        }
        double ls = 0, lt = 0;
        for (int i = 0; i < n; i++) { ls += part[2 * i]; lt += part[2 * i + 1]; }
        double total = (ls + lt) / n;
        if (loss) *loss = (float)total;
        if (!isfinite(total)) st = kd_set_error_(KD_ERR_NONFINITE, func, "CRD loss is not finite");
    }
done:
    free(scratch);
    free(part);
    free(hs);
    free(coef);
    return st;
}

enum kd_status kd_crd_loss(struct kd_crd * c, float * loss, float * des, float * det, const float * es,
                           const float * et, const int64_t * idx, const int64_t * labels, int n, float weight,
                           bool accumulate) {
    if (!c) KD_FAIL(KD_ERR_VALUE, "crd is NULL");
    KD_TRY(crd_check_batch(__func__, c, es, et, idx, n));
    KD_TRY(check_weight(__func__, weight));
    if (!c->banks && n < 2) KD_FAIL(KD_ERR_VALUE, "n (%d) must be >= 2 for in-batch negatives", n);
    KD_TRY(crd_check_labels(__func__, c, idx, labels, n));
    enum kd_status st = crd_run(__func__, c, c->banks ? CRD_DRAW : CRD_BATCH, loss, des, det, es, et, idx, labels,
                                NULL, n, weight, accumulate);
    if (st == KD_OK) c->steps++;
    return st;
}

enum kd_status kd_crd_sample(struct kd_crd * c, int64_t * sample_idx, const int64_t * idx, const int64_t * labels,
                             int n) {
    if (!c) KD_FAIL(KD_ERR_VALUE, "crd is NULL");
    if (!c->banks) KD_FAIL(KD_ERR_STATE, "in-batch mode draws no negatives");
    if (!sample_idx) KD_FAIL(KD_ERR_VALUE, "sample_idx is NULL");
    if (!idx) KD_FAIL(KD_ERR_VALUE, "idx is NULL");
    if (n < 1) KD_FAIL(KD_ERR_VALUE, "n (%d) must be >= 1", n);
    for (int i = 0; i < n; i++)
        if (idx[i] < 0 || idx[i] >= c->n_data)
            KD_FAIL(KD_ERR_VALUE, "idx[%d] = %lld is outside [0, n_data = %lld)", i, (long long)idx[i], (long long)c->n_data);
    KD_TRY(crd_check_labels(__func__, c, idx, labels, n));
    size_t cap = 16;
    while (cap < 2 * (size_t)c->n_neg) cap *= 2;
    struct hset hs = { calloc(cap, sizeof(uint64_t)), calloc(cap, sizeof(uint32_t)), cap - 1, 0 };
    if (!hs.key || !hs.stamp) {
        free(hs.key); free(hs.stamp);
        KD_FAIL(KD_ERR_NOMEM, "cannot allocate the sampler's table (%zu entries)", cap);
    }
    for (int i = 0; i < n; i++)
        crd_draw(c, sample_idx + (size_t)i * (c->n_neg + 1), idx[i], labels != NULL, c->steps, &hs);
    free(hs.key);
    free(hs.stamp);
    return KD_OK;
}

enum kd_status kd_crd_loss_idx(struct kd_crd * c, float * loss, float * des, float * det, const float * es,
                               const float * et, const int64_t * sample_idx, int n, float weight, bool accumulate) {
    if (!c) KD_FAIL(KD_ERR_VALUE, "crd is NULL");
    if (!c->banks) KD_FAIL(KD_ERR_STATE, "in-batch mode has no banks to index");
    if (!es) KD_FAIL(KD_ERR_VALUE, "es is NULL");
    if (!et) KD_FAIL(KD_ERR_VALUE, "et is NULL");
    if (!sample_idx) KD_FAIL(KD_ERR_VALUE, "sample_idx is NULL");
    if (n < 1) KD_FAIL(KD_ERR_VALUE, "n (%d) must be >= 1", n);
    KD_TRY(check_weight(__func__, weight));
    const size_t K1 = (size_t)c->n_neg + 1;
    for (size_t e = 0; e < (size_t)n * K1; e++)
        if (sample_idx[e] < 0 || sample_idx[e] >= c->n_data)
            KD_FAIL(KD_ERR_VALUE, "sample_idx[%zu, %zu] = %lld is outside [0, n_data = %lld)", e / K1, e % K1,
                    (long long)sample_idx[e], (long long)c->n_data);
    return crd_run(__func__, c, CRD_GIVEN, loss, des, det, es, et, NULL, NULL, sample_idx, n, weight, accumulate);
}

enum kd_status kd_crd_update(struct kd_crd * c, const float * es, const float * et, const int64_t * idx, int n) {
    if (!c) KD_FAIL(KD_ERR_VALUE, "crd is NULL");
    KD_TRY(crd_check_batch(__func__, c, es, et, c->banks ? idx : NULL, n));
    if (!c->banks) return KD_OK;
    const int dim = c->dim;
    const size_t nd = (size_t)n * dim;
    float * rows = malloc(2 * nd * sizeof *rows);
    if (!rows) KD_FAIL(KD_ERR_NOMEM, "cannot allocate %zu floats of scratch", 2 * nd);
    const double m = c->momentum;
    const float * src[2] = { es, et };
    for (int side = 0; side < 2; side++) {
        const float * bank = c->banks + (size_t)side * c->n_data * dim;
        for (int i = 0; i < n; i++) {
            const float * old = bank + (size_t)idx[i] * dim, * v = src[side] + (size_t)i * dim;
            float * out = rows + (size_t)side * nd + (size_t)i * dim;
            double ss = 0;
            for (int k = 0; k < dim; k++) {
                double x = m * old[k] + (1.0 - m) * v[k];
                ss += x * x;
            }
            double nrm = sqrt(ss);
            if (!(nrm > 0) || !isfinite(nrm)) {
                free(rows);
                KD_FAIL(KD_ERR_NONFINITE, "updated %s bank row %lld has norm %g", side ? "teacher" : "student",
                        (long long)idx[i], nrm);
            }
            for (int k = 0; k < dim; k++) out[k] = (float)((m * old[k] + (1.0 - m) * v[k]) / nrm);
        }
    }
    for (int side = 0; side < 2; side++) {
        float * bank = c->banks + (size_t)side * c->n_data * dim;
        for (int i = 0; i < n; i++)
            memcpy(bank + (size_t)idx[i] * dim, rows + (size_t)side * nd + (size_t)i * dim, (size_t)dim * sizeof(float));
    }
    free(rows);
    return KD_OK;
}

float * kd_crd_bank(struct kd_crd * c, int which, int64_t * rows, int * dim) {
    if (rows) *rows = 0;
    if (dim) *dim = 0;
    if (!c || !c->banks || which < 0 || which > 1) return NULL;
    if (rows) *rows = c->n_data;
    if (dim) *dim = c->dim;
    return c->banks + (size_t)which * c->n_data * c->dim;
}

float * kd_crd_z(struct kd_crd * c) { return c ? c->z : NULL; }
int64_t * kd_crd_steps(struct kd_crd * c) { return c ? &c->steps : NULL; }
int kd_crd_n_neg(const struct kd_crd * c) { return c ? c->n_neg : 0; }
int kd_crd_dim(const struct kd_crd * c) { return c ? c->dim : 0; }
int64_t kd_crd_n_data(const struct kd_crd * c) { return c ? c->n_data : 0; }
