// Losses over logits (N, V). Each returns the batch-mean loss and the gradient of
// weight * loss with respect to the logits, fusing the softmax into the backward
// (llm.c's crossentropy_softmax_backward): d/dz of -sum_k q_k log softmax(z)_k is p - q.
#include "kd_internal.h"

// Softmax cross-entropy with label smoothing (torch.nn.functional.cross_entropy,
// https://pytorch.org/docs/stable/generated/torch.nn.CrossEntropyLoss.html):
// target q = (1-eps)*onehot(y) + eps/V; loss_i = -sum_k q_k log p_k; mean over the batch.
// Computed per row with the max subtracted (stable for |z| up to float max) and
// accumulated in double.
enum kd_status kd_cross_entropy(float * loss, float * dlogits, const float * logits,
                                const int64_t * labels, const float * sample_w, int N, int V,
                                float label_smoothing, float weight, bool accumulate) {
    if (!logits || !labels || N < 1 || V < 1) KD_FAIL(KD_ERR_VALUE, "logits and labels must be non-empty");
    if (!(label_smoothing >= 0 && label_smoothing <= 1))
        KD_FAIL(KD_ERR_VALUE, "label_smoothing (%g) must be in [0, 1]", label_smoothing);
    for (int i = 0; i < N; i++)
        if (labels[i] < 0 || labels[i] >= V)
            KD_FAIL(KD_ERR_VALUE, "label %lld at position %d is outside [0, %d)", (long long)labels[i], i, V);
    const double eps = label_smoothing, off = eps / V, on = 1.0 - eps + off;
    double total = 0;
    for (int i = 0; i < N; i++) {
        const float * z = logits + (size_t)i * V;
        float zmax = z[0];
        for (int k = 1; k < V; k++) zmax = z[k] > zmax ? z[k] : zmax;
        double sum = 0, zsum = 0;
        for (int k = 0; k < V; k++) { sum += exp((double)z[k] - zmax); zsum += (double)z[k] - zmax; }
        double lse = log(sum);                          // log sum exp(z - zmax)
        int y = (int)labels[i];
        double wi = sample_w ? sample_w[i] : 1.0;
        // -sum_k q_k (z_k - zmax - lse) = lse - off*sum_k(z_k - zmax) - (on-off)*(z_y - zmax)
        total += wi * (lse - off * zsum - (on - off) * ((double)z[y] - zmax));
        if (dlogits) {
            float * d = dlogits + (size_t)i * V;
            double scale = (double)weight * wi / N;
            for (int k = 0; k < V; k++) {
                double p = exp((double)z[k] - zmax - lse);
                double g = scale * (p - (k == y ? on : off));
                d[k] = accumulate ? d[k] + (float)g : (float)g;
            }
        }
    }
    if (loss) *loss = (float)(total / N);
    if (!isfinite(total)) KD_FAIL(KD_ERR_NONFINITE, "cross-entropy is %s (non-finite logits?)", isnan(total) ? "nan" : "inf");
    return KD_OK;
}

// ---------------------------------------------------------------------------------------
// Distillation losses. Conventions (RepDistiller / mdistiller, as kdcore.h states them):
// - softened distributions p = softmax(z / T);
// - KL summed over classes, averaged over the batch, multiplied by T^2 so that gradient
//   magnitudes do not shrink as 1/T^2 (Hinton et al. 2015);
// - the gradient written is that of weight * loss; per-sample weights w_i (NULL = 1) scale
//   each row's term, still divided by N (conditional teacher-student learning uses 0/1).
// Everything is computed from log-probabilities in double, with the row max subtracted, so
// |z| up to 1e4 and T from 1 to 20+ stay finite and exact where PyTorch's are.

// log-softmax of z/T over the entries with mask (k != skip), returned as (m, lse) so that
// log p_k = (z_k - m)/T - lse. skip < 0 keeps every entry.
static void row_lse(const float * z, int V, double T, int skip, double * m, double * lse) {
    double mx = -INFINITY;
    for (int k = 0; k < V; k++) if (k != skip && z[k] > mx) mx = z[k];
    double s = 0;
    for (int k = 0; k < V; k++) if (k != skip) s += exp(((double)z[k] - mx) / T);
    *m = mx;
    *lse = log(s);
}

static enum kd_status check_T(float T) {
    if (!(T > 0) || !isfinite(T)) KD_FAIL(KD_ERR_VALUE, "temperature T (%g) must be > 0", T);
    return KD_OK;
}

static inline void put(float * d, double g, bool accumulate) { *d = accumulate ? *d + (float)g : (float)g; }

enum kd_status kd_loss_kd(float * loss, float * dlogits, float * dteacher, const float * s, const float * t,
                          const float * sample_w, int N, int V, float T, float weight, bool accumulate) {
    if (!s || !t || N < 1 || V < 1) KD_FAIL(KD_ERR_VALUE, "student and teacher logits must be non-empty");
    KD_TRY(check_T(T));
    const double TT = T;
    double total = 0;
    for (int i = 0; i < N; i++) {
        const float * si = s + (size_t)i * V, * ti = t + (size_t)i * V;
        double ms, ls, mt, lt;
        row_lse(si, V, TT, -1, &ms, &ls);
        row_lse(ti, V, TT, -1, &mt, &lt);
        double wi = sample_w ? sample_w[i] : 1.0, kl = 0;
        for (int k = 0; k < V; k++) {
            double lpt = (ti[k] - mt) / TT - lt, lps = (si[k] - ms) / TT - ls;
            double pt = exp(lpt);
            if (pt > 0) kl += pt * (lpt - lps);
        }
        total += wi * kl;
        // d(T^2 KL)/ds_k = T (p_s,k - p_t,k)
        double gs = (double)weight * wi * TT / N;
        if (dlogits) for (int k = 0; k < V; k++) {
            double lpt = (ti[k] - mt) / TT - lt, lps = (si[k] - ms) / TT - ls;
            put(&dlogits[(size_t)i * V + k], gs * (exp(lps) - exp(lpt)), accumulate);
        }
        // d(T^2 KL)/dt_k = T p_t,k (log p_t,k - log p_s,k - KL): when the teacher is trained too
        if (dteacher) for (int k = 0; k < V; k++) {
            double lpt = (ti[k] - mt) / TT - lt, lps = (si[k] - ms) / TT - ls;
            double pt = exp(lpt);
            put(&dteacher[(size_t)i * V + k], gs * (pt > 0 ? pt * (lpt - lps - kl) : 0.0), accumulate);
        }
    }
    if (loss) *loss = (float)(TT * TT * total / N);
    if (!isfinite(total)) KD_FAIL(KD_ERR_NONFINITE, "KD loss is not finite");
    return KD_OK;
}

enum kd_status kd_loss_soft(float * loss, float * dlogits, const float * s, const float * q,
                            const float * sample_w, int N, int V, float T, float weight, bool accumulate) {
    if (!s || !q || N < 1 || V < 1) KD_FAIL(KD_ERR_VALUE, "student logits and targets must be non-empty");
    KD_TRY(check_T(T));
    const double TT = T;
    double total = 0;
    for (int i = 0; i < N; i++) {
        const float * si = s + (size_t)i * V, * qi = q + (size_t)i * V;
        double ms, ls;
        row_lse(si, V, TT, -1, &ms, &ls);
        double wi = sample_w ? sample_w[i] : 1.0, kl = 0, qsum = 0;
        for (int k = 0; k < V; k++) {
            double lps = (si[k] - ms) / TT - ls;
            if (qi[k] > 0) kl += qi[k] * (log((double)qi[k]) - lps);
            qsum += qi[k];
        }
        total += wi * kl;
        double gs = (double)weight * wi * TT / N;
        // With sum_k q_k = 1 this is T (p_s - q); q from float arithmetic sums to 1 only up
        // to rounding, so use the exact derivative of -sum q log p_s: T (qsum p_s - q).
        if (dlogits) for (int k = 0; k < V; k++) {
            double ps = exp((si[k] - ms) / TT - ls);
            put(&dlogits[(size_t)i * V + k], gs * (qsum * ps - qi[k]), accumulate);
        }
    }
    if (loss) *loss = (float)(TT * TT * total / N);
    if (!isfinite(total)) KD_FAIL(KD_ERR_NONFINITE, "soft-target loss is not finite");
    return KD_OK;
}

void kd_softmax_t(float * p, const float * z, int N, int V, float T) {
    for (int i = 0; i < N; i++) {
        double m, lse;
        row_lse(z + (size_t)i * V, V, T, -1, &m, &lse);
        for (int k = 0; k < V; k++) p[(size_t)i * V + k] = (float)exp(((double)z[(size_t)i * V + k] - m) / T - lse);
    }
}

// DKD (Zhao et al. 2022): with b = (p_y, 1 - p_y), TCKD = KL(b_t || b_s) and NCKD = KL of the
// distributions renormalised over the non-target classes. mdistiller masks the target by
// subtracting 1000 from its logit and takes log(b_s) without epsilon; here the non-target
// log-normaliser is computed exactly (lse over k != y), so extreme logits stay exact.
// Gradients (per unit of T^2 KL): TCKD: T (p_s - q), q_y = p_t,y, q_k = (1 - p_t,y) ps^_k;
// NCKD: T (ps^_k - pt^_k) for k != y, 0 for y.
enum kd_status kd_loss_dkd(float * tckd, float * nckd, float * dlogits, const float * s, const float * t,
                           const int64_t * labels, int N, int V, float T, float alpha, float beta,
                           float weight, bool accumulate) {
    if (!s || !t || !labels || N < 1) KD_FAIL(KD_ERR_VALUE, "logits and labels must be non-empty");
    if (V < 2) KD_FAIL(KD_ERR_VALUE, "DKD needs at least 2 classes, got %d", V);
    KD_TRY(check_T(T));
    for (int i = 0; i < N; i++)
        if (labels[i] < 0 || labels[i] >= V)
            KD_FAIL(KD_ERR_VALUE, "label %lld at position %d is outside [0, %d)", (long long)labels[i], i, V);
    const double TT = T;
    double tc_sum = 0, nc_sum = 0;
    for (int i = 0; i < N; i++) {
        const float * si = s + (size_t)i * V, * ti = t + (size_t)i * V;
        const int y = (int)labels[i];
        double ms, ls, mt, lt, msn, lsn, mtn, ltn;
        row_lse(si, V, TT, -1, &ms, &ls);
        row_lse(ti, V, TT, -1, &mt, &lt);
        row_lse(si, V, TT, y, &msn, &lsn);
        row_lse(ti, V, TT, y, &mtn, &ltn);
        // log p_y and log(1 - p_y) = lse over k != y minus lse over all k (same shift m)
        double lps_y = (si[y] - ms) / TT - ls, lpt_y = (ti[y] - mt) / TT - lt;
        double lps_n = (msn - ms) / TT + lsn - ls, lpt_n = (mtn - mt) / TT + ltn - lt;
        double pt_y = exp(lpt_y), pt_n = exp(lpt_n);
        double tc = 0;
        if (pt_y > 0) tc += pt_y * (lpt_y - lps_y);
        if (pt_n > 0) tc += pt_n * (lpt_n - lps_n);
        double nc = 0;
        for (int k = 0; k < V; k++) {
            if (k == y) continue;
            double lht = (ti[k] - mtn) / TT - ltn, lhs = (si[k] - msn) / TT - lsn;
            double ht = exp(lht);
            if (ht > 0) nc += ht * (lht - lhs);
        }
        tc_sum += tc;
        nc_sum += nc;
        if (dlogits) {
            double ga = (double)weight * alpha * TT / N, gb = (double)weight * beta * TT / N;
            for (int k = 0; k < V; k++) {
                double ps = exp((si[k] - ms) / TT - ls);
                double g;
                if (k == y) g = ga * (ps - pt_y);
                else {
                    double hs = exp((si[k] - msn) / TT - lsn), ht = exp((ti[k] - mtn) / TT - ltn);
                    g = ga * (ps - pt_n * hs) + gb * (hs - ht);
                }
                put(&dlogits[(size_t)i * V + k], g, accumulate);
            }
        }
    }
    if (tckd) *tckd = (float)(TT * TT * tc_sum / N);
    if (nckd) *nckd = (float)(TT * TT * nc_sum / N);
    if (!isfinite(tc_sum) || !isfinite(nc_sum)) KD_FAIL(KD_ERR_NONFINITE, "DKD loss is not finite");
    return KD_OK;
}

// Logit regression (Ba & Caruana 2014) as the reference libraries write it:
// F.mse_loss(s, t) = mean over N*V of (s - t)^2. The paper's 1/2 ||s - t||^2 per sample is
// V/2 times this (scale the weight).
enum kd_status kd_loss_mse(float * loss, float * dlogits, const float * s, const float * t, int N, int V,
                           float weight, bool accumulate) {
    if (!s || !t || N < 1 || V < 1) KD_FAIL(KD_ERR_VALUE, "logits must be non-empty");
    double total = 0, g = 2.0 * weight / ((double)N * V);
    for (size_t i = 0; i < (size_t)N * V; i++) {
        double d = (double)s[i] - t[i];
        total += d * d;
        if (dlogits) put(&dlogits[i], g * d, accumulate);
    }
    if (loss) *loss = (float)(total / ((double)N * V));
    if (!isfinite(total)) KD_FAIL(KD_ERR_NONFINITE, "logit MSE is not finite");
    return KD_OK;
}

enum kd_status kd_loss_l1(float * loss, float * ds, float * dteacher, const float * s, const float * t, int N, int V,
                          float weight, bool accumulate) {
    if (!s || !t || N < 1 || V < 1) KD_FAIL(KD_ERR_VALUE, "logits must be non-empty");
    double total = 0, g = (double)weight / ((double)N * V);
    for (size_t i = 0; i < (size_t)N * V; i++) {
        double d = (double)s[i] - t[i], sg = d > 0 ? 1.0 : d < 0 ? -1.0 : 0.0;
        total += fabs(d);
        if (ds) put(&ds[i], g * sg, accumulate);
        if (dteacher) put(&dteacher[i], -g * sg, accumulate);
    }
    if (loss) *loss = (float)(total / ((double)N * V));
    if (!isfinite(total)) KD_FAIL(KD_ERR_NONFINITE, "logit L1 loss is not finite");
    return KD_OK;
}

enum kd_status kd_loss_bce(float * loss, float * dlogits, const float * x, float target, int N, int V, float weight,
                           bool accumulate) {
    if (!x || N < 1 || V < 1) KD_FAIL(KD_ERR_VALUE, "logits must be non-empty");
    if (!(target >= 0 && target <= 1)) KD_FAIL(KD_ERR_VALUE, "target (%g) must be in [0, 1]", target);
    double total = 0, g = (double)weight / ((double)N * V), y = target;
    for (size_t i = 0; i < (size_t)N * V; i++) {
        const double v = x[i], e = exp(-fabs(v));
        // log1p and the sigmoid from exp(-|x|) stay finite and exact for any |x|
        total += fmax(v, 0.0) - v * y + log1p(e);
        const double sig = v >= 0 ? 1.0 / (1.0 + e) : e / (1.0 + e);
        if (dlogits) put(&dlogits[i], g * (sig - y), accumulate);
    }
    if (loss) *loss = (float)(total / ((double)N * V));
    if (!isfinite(total)) KD_FAIL(KD_ERR_NONFINITE, "binary cross-entropy is not finite");
    return KD_OK;
}

// Tolerant teacher (Yang et al. 2019, Wang & Yoon's review, eq. 8): per sample, the gap between the
// largest logit and the mean of the next K-1, averaged over the batch. Minimising it keeps
// secondary classes alive in a teacher trained for later generations.
enum kd_status kd_loss_tolerant(float * loss, float * dlogits, const float * z, int N, int V, int K,
                                float weight, bool accumulate) {
    if (!z || N < 1) KD_FAIL(KD_ERR_VALUE, "logits must be non-empty");
    if (K < 2 || K > V || K > 64) KD_FAIL(KD_ERR_VALUE, "K (%d) must be in [2, min(classes=%d, 64)]", K, V);
    double total = 0;
    int top[64];
    for (int i = 0; i < N; i++) {
        const float * zi = z + (size_t)i * V;
        // The K largest in descending order (ties: lower index first); K is small, so an
        // insertion into a sorted prefix is enough.
        int n = 0;
        for (int k = 0; k < V; k++) {
            int pos;
            if (n < K) pos = n++;
            else if (zi[k] > zi[top[K - 1]]) pos = K - 1;
            else continue;
            while (pos > 0 && zi[k] > zi[top[pos - 1]]) { top[pos] = top[pos - 1]; pos--; }
            top[pos] = k;
        }
        double rest = 0;
        for (int j = 1; j < K; j++) rest += zi[top[j]];
        total += zi[top[0]] - rest / (K - 1);
        if (dlogits) {
            if (!accumulate) memset(dlogits + (size_t)i * V, 0, (size_t)V * sizeof(float));
            float * d = dlogits + (size_t)i * V;
            d[top[0]] += (float)((double)weight / N);
            for (int j = 1; j < K; j++) d[top[j]] -= (float)((double)weight / N / (K - 1));
        }
    }
    if (loss) *loss = (float)(total / N);
    if (!isfinite(total)) KD_FAIL(KD_ERR_NONFINITE, "tolerant-teacher term is not finite");
    return KD_OK;
}

// ---------------------------------------------------------------------------------------
// DIST: Pearson relations between the softened distributions, per sample (inter-class) and
// per class over the batch (intra-class). Computed in double: a correlation of nearly
// constant vectors cancels badly in float.

// Pearson correlation of a and b (n values each, strides sa, sb) and, when ga is given, its
// gradient w.r.t. a scaled by g, added to ga (stride sa).
static double pearson(const double * a, const double * b, int n, size_t sa, size_t sb, double g, double * ga) {
    double ma = 0, mb = 0;
    for (int k = 0; k < n; k++) { ma += a[k * sa]; mb += b[k * sb]; }
    ma /= n; mb /= n;
    double num = 0, na = 0, nbb = 0;
    for (int k = 0; k < n; k++) {
        const double x = a[k * sa] - ma, y = b[k * sb] - mb;
        num += x * y; na += x * x; nbb += y * y;
    }
    na = sqrt(na); nbb = sqrt(nbb);
    const double den = na * nbb + 1e-8, r = num / den;
    if (ga) {
        // d r / d a = (b - mean b) / den - num |b - mean b| (a - mean a) / (|a - mean a| den^2);
        // the centring's own derivative drops out (both vectors are centred).
        const double c = na > 0 ? num * nbb / (na * den * den) : 0.0;
        for (int k = 0; k < n; k++) ga[k * sa] += g * ((b[k * sb] - mb) / den - c * (a[k * sa] - ma));
    }
    return r;
}

static void softmax_rows_d(double * p, const float * z, int N, int V, double T) {
    for (int i = 0; i < N; i++) {
        double m = -INFINITY, sum = 0;
        for (int c = 0; c < V; c++) m = fmax(m, z[(size_t)i * V + c] / T);
        for (int c = 0; c < V; c++) sum += (p[(size_t)i * V + c] = exp(z[(size_t)i * V + c] / T - m));
        for (int c = 0; c < V; c++) p[(size_t)i * V + c] /= sum;
    }
}

enum kd_status kd_loss_dist(float * inter, float * intra, float * dlogits, const float * s, const float * t, int N,
                            int V, float T, float beta, float gamma, float weight, bool accumulate) {
    if (!s || !t || N < 1 || V < 2) KD_FAIL(KD_ERR_VALUE, "logits must be non-empty with at least 2 classes");
    KD_TRY(check_T(T));
    if (!(beta >= 0) || !(gamma >= 0) || !isfinite(beta) || !isfinite(gamma))
        KD_FAIL(KD_ERR_VALUE, "beta (%g) and gamma (%g) must be finite and >= 0", beta, gamma);
    const size_t nv = (size_t)N * V;
    double * ps = malloc(nv * sizeof *ps), * pt = malloc(nv * sizeof *pt), * gp = calloc(nv, sizeof *gp);
    if (!ps || !pt || !gp) { free(ps); free(pt); free(gp); KD_FAIL(KD_ERR_NOMEM, "cannot allocate %zu values", nv); }
    softmax_rows_d(ps, s, N, V, T);
    softmax_rows_d(pt, t, N, V, T);
    const double T2 = (double)T * T, w = weight;
    double r_inter = 0, r_intra = 0;
    // d loss / d p_s: inter weighs each row's correlation by beta T^2 / N, intra each column's
    // by gamma T^2 / V (a loss of 1 - mean r).
    for (int i = 0; i < N; i++)
        r_inter += pearson(ps + (size_t)i * V, pt + (size_t)i * V, V, 1, 1, -w * beta * T2 / N, gp + (size_t)i * V);
    if (N > 1)
        for (int c = 0; c < V; c++) r_intra += pearson(ps + c, pt + c, N, (size_t)V, (size_t)V, -w * gamma * T2 / V, gp + c);
    const double l_inter = 1.0 - r_inter / N, l_intra = N > 1 ? 1.0 - r_intra / V : 1.0;
    if (dlogits) {
        // through the softmax at temperature T: dz = p (g - <g, p>) / T
        for (int i = 0; i < N; i++) {
            const double * p = ps + (size_t)i * V, * g = gp + (size_t)i * V;
            double dot = 0;
            for (int c = 0; c < V; c++) dot += g[c] * p[c];
            for (int c = 0; c < V; c++) put(&dlogits[(size_t)i * V + c], p[c] * (g[c] - dot) / T, accumulate);
        }
    }
    free(ps); free(pt); free(gp);
    if (inter) *inter = (float)l_inter;
    if (intra) *intra = (float)l_intra;
    if (!isfinite(l_inter) || !isfinite(l_intra)) KD_FAIL(KD_ERR_NONFINITE, "DIST loss is not finite");
    return KD_OK;
}

// ---------------------------------------------------------------------------------------
// NormKD: KD at a temperature per sample and per side, t_norm times the row's std.

// Mean and unbiased std over the V values of a row, in double.
static double row_std(const float * z, int V, double * mean) {
    double m = 0, ss = 0;
    for (int k = 0; k < V; k++) m += z[k];
    m /= V;
    for (int k = 0; k < V; k++) ss += ((double)z[k] - m) * ((double)z[k] - m);
    *mean = m;
    return sqrt(ss / (V - 1));
}

enum kd_status kd_loss_normkd(float * loss, float * dlogits, const float * s, const float * t, int N, int V,
                              float t_norm, bool detach_std, float weight, bool accumulate) {
    if (!s || !t || N < 1 || V < 2) KD_FAIL(KD_ERR_VALUE, "logits must be non-empty with at least 2 classes");
    if (!(t_norm > 0) || !isfinite(t_norm)) KD_FAIL(KD_ERR_VALUE, "t_norm (%g) must be > 0 and finite", t_norm);
    const double tn = t_norm;
    double total = 0;
    for (int i = 0; i < N; i++) {
        const float * si = s + (size_t)i * V, * ti = t + (size_t)i * V;
        double ms, mt;
        const double sd_s = row_std(si, V, &ms), sd_t = row_std(ti, V, &mt);
        if (sd_t == 0) {   // the T_t^2 factor is 0: no value, no gradient
            if (dlogits) for (int k = 0; k < V; k++) put(&dlogits[(size_t)i * V + k], 0.0, accumulate);
            continue;
        }
        // A constant student row: s / std has no limit (it depends on the direction the row
        // leaves the constant), so the row is softened at the teacher's temperature instead.
        const bool through_std = sd_s > 0 && !detach_std;
        const double Tt = tn * sd_t, Ts = sd_s > 0 ? tn * sd_s : Tt;
        double xs, ls, xt, lt;
        row_lse(si, V, Ts, -1, &xs, &ls);
        row_lse(ti, V, Tt, -1, &xt, &lt);
        double kl = 0, gc = 0;
        for (int k = 0; k < V; k++) {
            const double lpt = (ti[k] - xt) / Tt - lt, lps = (si[k] - xs) / Ts - ls, pt = exp(lpt);
            if (pt > 0) kl += pt * (lpt - lps);
            // sum_k g_k c_k with g = d(Tt^2 KL)/d(s / Ts) = Tt^2 (p_s - p_t), c the row's z-scores
            if (through_std) gc += Tt * Tt * (exp(lps) - pt) * (((double)si[k] - ms) / sd_s);
        }
        total += Tt * Tt * kl;
        if (dlogits) {
            // d/ds_j = (g_j - c_j sum_k g_k c_k / (V - 1)) / Ts: the first term at a fixed
            // temperature, the second through Ts = t_norm std(s) (d std / ds_j = c_j / (V - 1);
            // sum_k g_k s_k = std(s) sum_k g_k c_k as sum_k g_k = 0)
            const double sc = (double)weight / N, k2 = through_std ? gc / (V - 1) : 0.0;
            for (int k = 0; k < V; k++) {
                const double lpt = (ti[k] - xt) / Tt - lt, lps = (si[k] - xs) / Ts - ls;
                const double g = Tt * Tt * (exp(lps) - exp(lpt));
                const double c = through_std ? ((double)si[k] - ms) / sd_s : 0.0;
                put(&dlogits[(size_t)i * V + k], sc * (g - c * k2) / Ts, accumulate);
            }
        }
    }
    if (loss) *loss = (float)(total / N);
    if (!isfinite(total)) KD_FAIL(KD_ERR_NONFINITE, "NormKD loss is not finite");
    return KD_OK;
}

// ---------------------------------------------------------------------------------------
// WTTM: the student at T = 1 against the power-transformed teacher, each sample weighted by
// the teacher's power sum. In logs: with l1 = lse(t - max) and lg = lse(gamma (t - max)),
// log p~_k = gamma (t_k - max) - lg and log U = lg - gamma l1, so neither p^gamma nor U is
// formed from underflowing probabilities.

enum kd_status kd_loss_wttm(float * loss, float * dlogits, const float * s, const float * t, int N, int V,
                            float gamma, float weight, bool accumulate) {
    if (!s || !t || N < 1 || V < 1) KD_FAIL(KD_ERR_VALUE, "student and teacher logits must be non-empty");
    if (!(gamma > 0) || !isfinite(gamma)) KD_FAIL(KD_ERR_VALUE, "gamma (%g) must be > 0 and finite", gamma);
    const double g = gamma;
    double total = 0;
    for (int i = 0; i < N; i++) {
        const float * si = s + (size_t)i * V, * ti = t + (size_t)i * V;
        double xt = -INFINITY, l1 = 0, lg = 0, xs, ls;
        for (int k = 0; k < V; k++) xt = fmax(xt, ti[k]);
        for (int k = 0; k < V; k++) {
            l1 += exp((double)ti[k] - xt);
            lg += exp(g * ((double)ti[k] - xt));
        }
        l1 = log(l1);
        lg = log(lg);
        const double U = exp(lg - g * l1);
        row_lse(si, V, 1.0, -1, &xs, &ls);
        double kl = 0;
        for (int k = 0; k < V; k++) {
            const double lq = g * ((double)ti[k] - xt) - lg, q = exp(lq);
            if (q > 0) kl += q * (lq - ((si[k] - xs) - ls));
        }
        total += U * kl;
        if (dlogits) {
            const double sc = (double)weight * U / N;
            for (int k = 0; k < V; k++) {
                const double q = exp(g * ((double)ti[k] - xt) - lg), ps = exp((si[k] - xs) - ls);
                put(&dlogits[(size_t)i * V + k], sc * (ps - q), accumulate);
            }
        }
    }
    if (loss) *loss = (float)(total / N);
    if (!isfinite(total)) KD_FAIL(KD_ERR_NONFINITE, "WTTM loss is not finite");
    return KD_OK;
}

// ---------------------------------------------------------------------------------------
// CTKD: KD at a learned temperature. With u = 1/T, d = log p - log q (p the teacher's, q the
// student's softened distribution) and KL = E_p d:
//   dKL/du = Cov_p(t, d) + E_q s - E_p s   (shifts of t or s cancel),
//   d(T^2 KL)/dT = 2 T KL - T^2 dKL/du / T^2 = 2 T KL - (Cov_p(t, d) + E_q s - E_p s).

// One body for the global temperature (Tr NULL: every row at T, *dT the sum over rows) and the
// instance-wise one (row i at Tr[i], dT[i] its own derivative).
static enum kd_status ctkd_rows(float * loss, float * dlogits, float * dT, const float * s, const float * t, int N,
                                int V, float T, const float * Tr, float weight, bool accumulate) {
    if (!s || !t || N < 1 || V < 1) KD_FAIL(KD_ERR_VALUE, "student and teacher logits must be non-empty");
    if (!Tr) KD_TRY(check_T(T));
    for (int i = 0; Tr && i < N; i++)
        if (!(Tr[i] > 0) || !isfinite(Tr[i])) KD_FAIL(KD_ERR_VALUE, "temperature T[%d] (%g) must be > 0", i, Tr[i]);
    double total = 0, gT = 0;
    for (int i = 0; i < N; i++) {
        const double TT = Tr ? Tr[i] : T;
        const float * si = s + (size_t)i * V, * ti = t + (size_t)i * V;
        double ms, ls, mt, lt;
        row_lse(si, V, TT, -1, &ms, &ls);
        row_lse(ti, V, TT, -1, &mt, &lt);
        double kl = 0, et = 0, eps = 0, eqs = 0;
        for (int k = 0; k < V; k++) {
            const double lpt = ((double)ti[k] - mt) / TT - lt, lps = ((double)si[k] - ms) / TT - ls, pt = exp(lpt);
            if (pt > 0) kl += pt * (lpt - lps);
            et += pt * ((double)ti[k] - mt);
            eps += pt * ((double)si[k] - ms);
            eqs += exp(lps) * ((double)si[k] - ms);
        }
        double cov = 0;
        for (int k = 0; k < V; k++) {
            const double lpt = ((double)ti[k] - mt) / TT - lt, pt = exp(lpt);
            if (pt > 0) cov += pt * ((double)ti[k] - mt - et) * (lpt - (((double)si[k] - ms) / TT - ls) - kl);
        }
        total += TT * TT * kl;
        const double gi = 2.0 * TT * kl - (cov + eqs - eps);
        gT += gi;
        if (dT && Tr) put(&dT[i], (double)weight * gi / N, accumulate);
        if (dlogits) {
            const double sc = (double)weight * TT / N;
            for (int k = 0; k < V; k++) {
                const double q = exp(((double)si[k] - ms) / TT - ls), pt = exp(((double)ti[k] - mt) / TT - lt);
                put(&dlogits[(size_t)i * V + k], sc * (q - pt), accumulate);
            }
        }
    }
    const double value = total / N;
    if (dT && !Tr) put(dT, (double)weight * gT / N, accumulate);
    if (loss) *loss = (float)value;
    if (!isfinite(value) || !isfinite(gT)) KD_FAIL(KD_ERR_NONFINITE, "CTKD loss is not finite");
    return KD_OK;
}

enum kd_status kd_loss_ctkd(float * loss, float * dlogits, float * dT, const float * s, const float * t, int N,
                            int V, float T, float weight, bool accumulate) {
    return ctkd_rows(loss, dlogits, dT, s, t, N, V, T, NULL, weight, accumulate);
}

enum kd_status kd_loss_ctkd_rows(float * loss, float * dlogits, float * dT, const float * s, const float * t, int N,
                                 int V, const float * T, float weight, bool accumulate) {
    if (!T) KD_FAIL(KD_ERR_VALUE, "T (one temperature per row) must not be NULL");
    return ctkd_rows(loss, dlogits, dT, s, t, N, V, 0.0f, T, weight, accumulate);
}

double kd_ctkd_temperature(float p, float t_start, float t_range, double * dT_dp) {
    const double sg = 1.0 / (1.0 + exp(-(double)p));
    if (dT_dp) *dT_dp = (double)t_range * sg * (1.0 - sg);
    return (double)t_start + (double)t_range * sg;
}

double kd_ctkd_lambda(int epoch, float lambda_min, float lambda_max, int decay_epochs) {
    if (decay_epochs < 1) return lambda_max;
    const int e = epoch + 1 < 0 ? 0 : epoch + 1 > decay_epochs ? decay_epochs : epoch + 1;
    const double pi = 3.14159265358979323846;
    return (double)lambda_min + ((double)lambda_max - lambda_min) * (1.0 - cos(pi * e / decay_epochs)) / 2.0;
}

// ---------------------------------------------------------------------------------------
// DAFL's activation and information-entropy losses

enum kd_status kd_loss_activation(float * loss, float * dx, const float * x, size_t n, float weight, bool accumulate) {
    if (!x || n == 0) KD_FAIL(KD_ERR_VALUE, "the features must be non-empty");
    double total = 0;
    const double g = -(double)weight / (double)n;
    for (size_t i = 0; i < n; i++) {
        total += fabs((double)x[i]);
        // d|x|/dx at 0 is 0, as torch.abs
        if (dx) put(&dx[i], x[i] > 0 ? g : x[i] < 0 ? -g : 0.0, accumulate);
    }
    if (loss) *loss = (float)(-total / (double)n);
    if (!isfinite(total)) KD_FAIL(KD_ERR_NONFINITE, "the activation loss is not finite");
    return KD_OK;
}

enum kd_status kd_loss_entropy(float * loss, float * dlogits, const float * z, int N, int V, float weight,
                               bool accumulate) {
    if (!z || N < 1 || V < 1) KD_FAIL(KD_ERR_VALUE, "logits must be non-empty");
    const size_t nv = (size_t)N * V;
    double * p = malloc(nv * sizeof *p), * pbar = calloc((size_t)V, sizeof *pbar);
    if (!p || !pbar) { free(p); free(pbar); KD_FAIL(KD_ERR_NOMEM, "cannot allocate"); }
    softmax_rows_d(p, z, N, V, 1.0);
    for (size_t i = 0; i < nv; i++) pbar[i % V] += p[i] / N;
    double L = 0;
    for (int c = 0; c < V; c++) L += pbar[c] > 0 ? pbar[c] * log10(pbar[c]) : 0.0;
    if (dlogits) {
        // dL/dpbar_c = log10 pbar_c + 1 / ln 10; through the mean and each row's softmax
        const double inv_ln10 = 1.0 / log(10.0);
        for (int c = 0; c < V; c++) pbar[c] = weight * (log10(fmax(pbar[c], 1e-300)) + inv_ln10) / N;
        for (int i = 0; i < N; i++) {
            const double * pi = p + (size_t)i * V;
            double dot = 0;
            for (int c = 0; c < V; c++) dot += pbar[c] * pi[c];
            for (int c = 0; c < V; c++) put(&dlogits[(size_t)i * V + c], pi[c] * (pbar[c] - dot), accumulate);
        }
    }
    free(p); free(pbar);
    if (loss) *loss = (float)L;
    if (!isfinite(L)) KD_FAIL(KD_ERR_NONFINITE, "the entropy loss is not finite");
    return KD_OK;
}

// ---------------------------------------------------------------------------------------
// Adaptive DeepInversion's competition term: 1 - clamp(JS, 0, 1) with the authors' clamped
// distributions (kdcore.h). J is a batch mean, so its value is known before any gradient:
// the outer clamp passes dL/dJ = -1 inside [0, 1], 0 outside (torch.clamp's rule at the
// bounds: inside).
static inline bool adi_in(double v) { return v >= 0.01 && v <= 0.99; }
static inline double adi_clamp(double v) { return v < 0.01 ? 0.01 : v > 0.99 ? 0.99 : v; }

enum kd_status kd_loss_adi(float * loss, float * dt, float * ds, const float * t, const float * s, int N, int V,
                           float T, float weight, bool accumulate) {
    if (!s || !t || N < 1 || V < 1) KD_FAIL(KD_ERR_VALUE, "teacher and student logits must be non-empty");
    KD_TRY(check_T(T));
    const size_t nv = (size_t)N * V;
    double * P = malloc(2 * nv * sizeof *P);
    if (!P) KD_FAIL(KD_ERR_NOMEM, "cannot allocate %zu probabilities", 2 * nv);
    double * Q = P + nv;
    softmax_rows_d(P, s, N, V, T);
    softmax_rows_d(Q, t, N, V, T);
    double J = 0;
    for (size_t j = 0; j < nv; j++) {
        const double mc = adi_clamp(0.5 * (P[j] + Q[j]));
        J += 0.5 * mc * (log(mc) - log(adi_clamp(P[j]))) + 0.5 * mc * (log(mc) - log(adi_clamp(Q[j])));
    }
    J /= N;
    const double L = 1.0 - (J < 0 ? 0.0 : J > 1 ? 1.0 : J);
    if (loss) *loss = (float)L;
    if (!isfinite(J)) { free(P); KD_FAIL(KD_ERR_NONFINITE, "the ADI competition loss is not finite"); }
    const double g = (J >= 0 && J <= 1) ? -(double)weight / N : 0.0;
    for (int i = 0; i < N && (dt || ds); i++) {
        const double * p = P + (size_t)i * V, * q = Q + (size_t)i * V;
        double dotp = 0, dotq = 0;
        // dJ/dP and dJ/dQ through the clamps, then through each softmax: (1/T) p (g - <g, p>)
        for (int k = 0; k < V; k++) {
            const double m = 0.5 * (p[k] + q[k]), mc = adi_clamp(m), pc = adi_clamp(p[k]), qc = adi_clamp(q[k]);
            const double gm = adi_in(m) ? 0.5 * (log(mc) + 1.0 - 0.5 * log(pc) - 0.5 * log(qc)) : 0.0;
            const double a = (adi_in(p[k]) ? -0.5 * mc / pc : 0.0) + gm, b = (adi_in(q[k]) ? -0.5 * mc / qc : 0.0) + gm;
            dotp += a * p[k];
            dotq += b * q[k];
        }
        for (int k = 0; k < V; k++) {
            const double m = 0.5 * (p[k] + q[k]), mc = adi_clamp(m), pc = adi_clamp(p[k]), qc = adi_clamp(q[k]);
            const double gm = adi_in(m) ? 0.5 * (log(mc) + 1.0 - 0.5 * log(pc) - 0.5 * log(qc)) : 0.0;
            const double a = (adi_in(p[k]) ? -0.5 * mc / pc : 0.0) + gm, b = (adi_in(q[k]) ? -0.5 * mc / qc : 0.0) + gm;
            if (ds) put(&ds[(size_t)i * V + k], g * p[k] * (a - dotp) / T, accumulate);
            if (dt) put(&dt[(size_t)i * V + k], g * q[k] * (b - dotq) / T, accumulate);
        }
    }
    free(P);
    return KD_OK;
}

// ---------------------------------------------------------------------------------------
// MLKD: KD, class-correlation and sample-correlation alignment at several temperatures,
// scaled by the fractions the teacher-confidence masks keep.

static int cmp_double(const void * a, const void * b) {
    const double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

// np.percentile(x, q) with its default linear interpolation (x is sorted in place); numpy
// interpolates from the upper neighbour when the fraction is >= 0.5, so the same is done here
// to land on the same double.
static double percentile_linear(double * x, int n, double q) {
    qsort(x, (size_t)n, sizeof *x, cmp_double);
    const double pos = q / 100.0 * (n - 1);
    int lo = (int)floor(pos);
    if (lo > n - 1) lo = n - 1;
    const int hi = lo + 1 < n ? lo + 1 : lo;
    const double f = pos - lo, d = x[hi] - x[lo];
    return f >= 0.5 ? x[hi] - d * (1.0 - f) : x[lo] + d * f;
}

// Fraction of the n values (a copy goes to work) that are <= their q-th percentile.
static double kept_fraction(const double * v, double * work, int n, double q) {
    memcpy(work, v, (size_t)n * sizeof *work);
    const double thr = percentile_linear(work, n, q);
    int kept = 0;
    for (int k = 0; k < n; k++) kept += v[k] <= thr;
    return (double)kept / n;
}

static void softmax_rows_T(double * P, const float * z, int N, int V, double T) {
    for (int i = 0; i < N; i++) {
        double m, l;
        row_lse(z + (size_t)i * V, V, T, -1, &m, &l);
        for (int k = 0; k < V; k++) P[(size_t)i * V + k] = exp(((double)z[(size_t)i * V + k] - m) / T - l);
    }
}

enum kd_status kd_loss_mlkd(float * loss, float * parts, float * dlogits, const float * s, const float * t, int N,
                            int V, const float * temps, int n_temps, float percentile, float weight,
                            bool accumulate) {
    if (!s || !t || N < 1 || V < 1) KD_FAIL(KD_ERR_VALUE, "student and teacher logits must be non-empty");
    if (!temps || n_temps < 1 || n_temps > KD_MLKD_MAX_TEMPS)
        KD_FAIL(KD_ERR_VALUE, "temperatures: between 1 and %d needed, got %d", KD_MLKD_MAX_TEMPS, n_temps);
    for (int j = 0; j < n_temps; j++)
        if (!(temps[j] > 0) || !isfinite(temps[j]))
            KD_FAIL(KD_ERR_VALUE, "temperatures[%d] (%g) must be > 0 and finite", j, temps[j]);
    if (!(percentile >= 0 && percentile <= 100))
        KD_FAIL(KD_ERR_VALUE, "percentile (%g) must be in [0, 100]", percentile);
    const size_t nv = (size_t)N * V, w = (size_t)(N > V ? N : V);
    double * buf = malloc((4 * nv + (size_t)V * V + (size_t)N * N + 2 * w) * sizeof *buf);
    if (!buf) KD_FAIL(KD_ERR_NOMEM, "MLKD: %zu bytes of scratch", (4 * nv + (size_t)V * V + (size_t)N * N + 2 * w) * 8);
    double * P = buf, * Q = P + nv, * gP = Q + nv, * ds = gP + nv, * D = ds + nv, * E = D + (size_t)V * V;
    double * conf = E + (size_t)N * N, * work = conf + w;

    // The masks: the teacher's probabilities at T = 1, per sample (top probability) and per
    // class (summed over the batch).
    softmax_rows_T(Q, t, N, V, 1.0);
    for (int i = 0; i < N; i++) {
        double c = 0;
        for (int k = 0; k < V; k++) c = fmax(c, Q[(size_t)i * V + k]);
        conf[i] = c;
    }
    const double f_s = kept_fraction(conf, work, N, percentile);
    for (int k = 0; k < V; k++) conf[k] = 0;
    for (int i = 0; i < N; i++)
        for (int k = 0; k < V; k++) conf[k] += Q[(size_t)i * V + k];
    const double f_c = kept_fraction(conf, work, V, percentile);

    double inst = 0, cls = 0, bat = 0;
    if (dlogits) memset(ds, 0, nv * sizeof *ds);
    for (int j = 0; j < n_temps; j++) {
        const double T = temps[j];
        softmax_rows_T(P, s, N, V, T);
        softmax_rows_T(Q, t, N, V, T);
        // instance level: T^2 KL, from the logs (a probability that underflows adds nothing)
        double kl = 0;
        for (int i = 0; i < N; i++) {
            const float * si = s + (size_t)i * V, * ti = t + (size_t)i * V;
            double ms, ls, mt, lt;
            row_lse(si, V, T, -1, &ms, &ls);
            row_lse(ti, V, T, -1, &mt, &lt);
            for (int k = 0; k < V; k++) {
                const double lq = ((double)ti[k] - mt) / T - lt, lp = ((double)si[k] - ms) / T - ls, q = exp(lq);
                if (q > 0) kl += q * (lq - lp);
            }
        }
        inst += f_s * T * T * kl / N;
        // class level: D = Q'Q - P'P (V x V, symmetric)
        memset(D, 0, (size_t)V * V * sizeof *D);
        for (int i = 0; i < N; i++) {
            const double * p = P + (size_t)i * V, * q = Q + (size_t)i * V;
            for (int a = 0; a < V; a++) {
                double * Da = D + (size_t)a * V;
                const double qa = q[a], pa = p[a];
                for (int b = 0; b < V; b++) Da[b] += qa * q[b] - pa * p[b];
            }
        }
        double c2 = 0;
        for (size_t k = 0; k < (size_t)V * V; k++) c2 += D[k] * D[k];
        cls += f_c * c2 / V;
        // batch level: E = QQ' - PP' (N x N, symmetric)
        for (int i = 0; i < N; i++)
            for (int r = 0; r < N; r++) {
                const double * pi = P + (size_t)i * V, * pr = P + (size_t)r * V;
                const double * qi = Q + (size_t)i * V, * qr = Q + (size_t)r * V;
                double e = 0;
                for (int k = 0; k < V; k++) e += qi[k] * qr[k] - pi[k] * pr[k];
                E[(size_t)i * N + r] = e;
            }
        double b2 = 0;
        for (size_t k = 0; k < (size_t)N * N; k++) b2 += E[k] * E[k];
        bat += f_s * b2 / N;
        if (!dlogits) continue;
        // d/dP of the class and batch terms: -4 f_c P D / V and -4 f_s E P / N (D, E symmetric)
        for (int i = 0; i < N; i++) {
            double * g = gP + (size_t)i * V;
            const double * p = P + (size_t)i * V;
            for (int b = 0; b < V; b++) g[b] = 0;
            for (int a = 0; a < V; a++) {
                const double ca = -4.0 * f_c / V * p[a];
                const double * Da = D + (size_t)a * V;
                for (int b = 0; b < V; b++) g[b] += ca * Da[b];
            }
            for (int r = 0; r < N; r++) {
                const double er = -4.0 * f_s / N * E[(size_t)i * N + r];
                const double * pr = P + (size_t)r * V;
                for (int b = 0; b < V; b++) g[b] += er * pr[b];
            }
        }
        // through the softmax at T: dz_k = P_k (g_k - sum_m g_m P_m) / T; plus KD's T (P - Q) / N
        for (int i = 0; i < N; i++) {
            const double * g = gP + (size_t)i * V, * p = P + (size_t)i * V, * q = Q + (size_t)i * V;
            double gp = 0;
            for (int k = 0; k < V; k++) gp += g[k] * p[k];
            for (int k = 0; k < V; k++)
                ds[(size_t)i * V + k] += p[k] * (g[k] - gp) / T + f_s * T * (p[k] - q[k]) / N;
        }
    }
    if (dlogits)
        for (size_t k = 0; k < nv; k++) put(&dlogits[k], (double)weight * ds[k], accumulate);
    free(buf);
    const double total = inst + cls + bat;
    if (loss) *loss = (float)total;
    if (parts) { parts[0] = (float)inst; parts[1] = (float)(cls + bat); }
    if (!isfinite(total)) KD_FAIL(KD_ERR_NONFINITE, "MLKD loss is not finite");
    return KD_OK;
}
