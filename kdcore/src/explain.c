// Explaining distillation: the per-pixel information-discarding fit (kdcore.h, "Explaining
// distillation"). The images are independent problems; each chunk of images runs as one
// batch of images x samples noisy copies through the net, and the gradient w.r.t. the noise
// scale comes from the input gradient: dJ/ds_i = sum_k dJ/dx'_ki * sigma_i * eps_ki.
#include "kd_internal.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifndef _OPENMP
#pragma GCC diagnostic ignored "-Wunknown-pragmas"
#endif

// Noisy copies per forward: enough rows for the kernels to run at speed, few enough that
// the activations of a conv net stay small.
#define SIGMA_ROWS 256

struct kd_sigma_cfg kd_sigma_cfg_default(void) {
    return (struct kd_sigma_cfg){ .steps = 300, .samples = 16, .lr = 0.05f, .lambda = 1.0f, .delta2 = 1.0f,
                                  .init_sigma = 0.01f, .seed = 0 };
}

static enum kd_status check_args(const char * fn, struct kd_net * net, int node, const float * x, int N, int C, int H,
                                 int W, int samples, float lambda, float delta2) {
    if (!net || !x) return kd_set_error_(KD_ERR_VALUE, fn, "net and x must not be NULL");
    if (node < 0 || node >= kd_net_num_nodes(net))
        return kd_set_error_(KD_ERR_VALUE, fn, "node %d does not exist (the net has %d)", node, kd_net_num_nodes(net));
    if (N < 1 || C < 1 || H < 1 || W < 1) return kd_set_error_(KD_ERR_SHAPE, fn, "x (%d, %d, %d, %d) is empty", N, C, H, W);
    if (samples < 1) return kd_set_error_(KD_ERR_VALUE, fn, "samples (%d) must be >= 1", samples);
    if (!(lambda >= 0) || !isfinite(lambda)) return kd_set_error_(KD_ERR_VALUE, fn, "lambda (%g) must be >= 0", lambda);
    if (!(delta2 > 0) || !isfinite(delta2)) return kd_set_error_(KD_ERR_VALUE, fn, "delta2 (%g) must be > 0", delta2);
    return KD_OK;
}

// The objective over images [i0, i0 + G) given their clean features fstar (G x m), with
// scratch xb, eb, db (G*K x n) and gb (G*K x m).
struct sig_work { float * fstar, * xb, * eb, * db, * gb; };

static enum kd_status chunk_objective(struct kd_net * net, int node, const float * x, int i0, int G, int C, int H,
                                      int W, const float * s, const float * eps, int K, uint64_t seed, float lambda,
                                      float delta2, const struct sig_work * wk, double * value, float * grad) {
    const size_t n = (size_t)C * H * W;
    const int rows = G * K;
    // x' = x + sigma * eps; eps by (image, sample, value) index, so chunking does not change it
    #pragma omp parallel for schedule(static)
    for (int r = 0; r < rows; r++) {
        const int g = r / K, k = r % K;
        const size_t img = (size_t)(i0 + g);
        const float * xi = x + img * n, * si = s + img * n;
        float * xr = wk->xb + (size_t)r * n, * er = wk->eb + (size_t)r * n;
        const size_t base = (img * (size_t)K + (size_t)k) * n;
        for (size_t i = 0; i < n; i++) {
            er[i] = eps ? eps[base + i] : kd_normal(seed, base + i);
            xr[i] = xi[i] + expf(si[i]) * er[i];
        }
    }
    KD_TRY(kd_net_forward(net, wk->xb, rows, C, H, W, KD_MODE_EVAL, 0));
    int oc, oh, ow;
    kd_net_node_shape(net, node, &oc, &oh, &ow);
    const size_t m = (size_t)oc * oh * ow;
    const float * f = kd_net_output(net, node);
    double * dist = calloc((size_t)G, sizeof *dist);
    if (!dist) KD_FAIL(KD_ERR_NOMEM, "cannot allocate");
    const float gscale = 2.0f / (delta2 * (float)K);
    #pragma omp parallel for schedule(static)
    for (int g = 0; g < G; g++) {
        double acc = 0;
        for (int k = 0; k < K; k++) {
            const size_t r = (size_t)g * K + k;
            const float * fr = f + r * m, * fs = wk->fstar + (size_t)g * m;
            float * gr = wk->gb + r * m;
            for (size_t j = 0; j < m; j++) {
                const float d = fr[j] - fs[j];
                acc += (double)d * d;
                gr[j] = gscale * d;
            }
        }
        dist[g] = acc / ((double)delta2 * K);
    }
    for (int g = 0; g < G; g++) {
        const float * si = s + (size_t)(i0 + g) * n;
        double ms = 0;
        for (size_t i = 0; i < n; i++) ms += si[i];
        if (value) value[i0 + g] = dist[g] - (double)lambda * ms / (double)n;
        if (!isfinite(dist[g])) {
            free(dist);
            KD_FAIL(KD_ERR_NONFINITE, "the feature distance of image %d is not finite (sigma too large?)", i0 + g);
        }
    }
    free(dist);
    if (!grad) return KD_OK;
    KD_TRY(kd_net_grad_add(net, node, wk->gb, 1.0f));
    KD_TRY(kd_net_backward(net, NULL, wk->db));
    const float ent = lambda / (float)n;
    #pragma omp parallel for schedule(static)
    for (int g = 0; g < G; g++) {
        const size_t img = (size_t)(i0 + g);
        const float * si = s + img * n;
        float * gi = grad + img * n;
        for (size_t i = 0; i < n; i++) gi[i] = -ent;
        for (int k = 0; k < K; k++) {
            const size_t r = (size_t)g * K + k;
            const float * dr = wk->db + r * n, * er = wk->eb + r * n;
            for (size_t i = 0; i < n; i++) gi[i] += dr[i] * expf(si[i]) * er[i];
        }
    }
    return KD_OK;
}

static void work_free(struct sig_work * wk) { free(wk->fstar); free(wk->xb); free(wk->eb); free(wk->db); free(wk->gb); }

// Clean features of every image (node output, N x m) and the scratch of one chunk.
static enum kd_status setup(struct kd_net * net, int node, const float * x, int N, int C, int H, int W, int K,
                            int * G_out, float ** fall, struct sig_work * wk) {
    const size_t n = (size_t)C * H * W;
    memset(wk, 0, sizeof *wk);
    KD_TRY(kd_net_plan(net, 1, C, H, W));
    int oc, oh, ow;
    kd_net_node_shape(net, node, &oc, &oh, &ow);
    const size_t m = (size_t)oc * oh * ow;
    const int G = K >= SIGMA_ROWS ? 1 : (N < SIGMA_ROWS / K ? N : SIGMA_ROWS / K);
    const size_t rows = (size_t)G * K;
    *fall = malloc((size_t)N * m * sizeof(float));
    wk->xb = malloc(rows * n * sizeof(float));
    wk->eb = malloc(rows * n * sizeof(float));
    wk->db = malloc(rows * n * sizeof(float));
    wk->gb = malloc(rows * m * sizeof(float));
    if (!*fall || !wk->xb || !wk->eb || !wk->db || !wk->gb) {
        free(*fall); *fall = NULL; work_free(wk);
        KD_FAIL(KD_ERR_NOMEM, "cannot allocate %zu noisy copies of %zu values", rows, n);
    }
    for (int i0 = 0; i0 < N; i0 += G) {
        const int g = N - i0 < G ? N - i0 : G;
        enum kd_status st = kd_net_forward(net, x + (size_t)i0 * n, g, C, H, W, KD_MODE_EVAL, 0);
        if (st != KD_OK) { free(*fall); *fall = NULL; work_free(wk); return st; }
        memcpy(*fall + (size_t)i0 * m, kd_net_output(net, node), (size_t)g * m * sizeof(float));
    }
    *G_out = G;
    return KD_OK;
}

enum kd_status kd_sigma_objective(struct kd_net * net, int node, const float * x, int N, int C, int H, int W,
                                  const float * s, const float * eps, int samples, uint64_t seed, float lambda,
                                  float delta2, double * value, float * grad) {
    KD_TRY(check_args(__func__, net, node, x, N, C, H, W, samples, lambda, delta2));
    if (!s) KD_FAIL(KD_ERR_VALUE, "s must not be NULL");
    struct sig_work wk;
    float * fall;
    int G;
    KD_TRY(setup(net, node, x, N, C, H, W, samples, &G, &fall, &wk));
    int oc, oh, ow;
    kd_net_node_shape(net, node, &oc, &oh, &ow);
    const size_t m = (size_t)oc * oh * ow;
    enum kd_status st = KD_OK;
    for (int i0 = 0; i0 < N && st == KD_OK; i0 += G) {
        const int g = N - i0 < G ? N - i0 : G;
        wk.fstar = fall + (size_t)i0 * m;
        st = chunk_objective(net, node, x, i0, g, C, H, W, s, eps, samples, seed, lambda, delta2, &wk, value, grad);
    }
    wk.fstar = NULL;
    free(fall);
    work_free(&wk);
    kd_net_zero_grad(net);
    return st;
}

enum kd_status kd_explain_sigma(struct kd_net * net, int node, const float * x, int N, int C, int H, int W,
                                const struct kd_sigma_cfg * cfg, float * s, double * objective) {
    if (!cfg || !s) KD_FAIL(KD_ERR_VALUE, "cfg and s must not be NULL");
    KD_TRY(check_args(__func__, net, node, x, N, C, H, W, cfg->samples, cfg->lambda, cfg->delta2));
    if (cfg->steps < 0) KD_FAIL(KD_ERR_VALUE, "steps (%d) must be >= 0", cfg->steps);
    if (!(cfg->lr > 0) || !isfinite(cfg->lr)) KD_FAIL(KD_ERR_VALUE, "lr (%g) must be > 0", cfg->lr);
    if (!(cfg->init_sigma > 0) || !isfinite(cfg->init_sigma)) KD_FAIL(KD_ERR_VALUE, "init_sigma (%g) must be > 0", cfg->init_sigma);
    const size_t n = (size_t)C * H * W, tot = (size_t)N * n;
    struct sig_work wk;
    float * fall;
    int G;
    KD_TRY(setup(net, node, x, N, C, H, W, cfg->samples, &G, &fall, &wk));
    int oc, oh, ow;
    kd_net_node_shape(net, node, &oc, &oh, &ow);
    const size_t m = (size_t)oc * oh * ow;
    float * grad = malloc(tot * sizeof(float)), * m1 = calloc(tot, sizeof(float)), * m2 = calloc(tot, sizeof(float));
    double * val = malloc((size_t)N * sizeof(double));
    enum kd_status st = KD_OK;
    if (!grad || !m1 || !m2 || !val) { st = kd_set_error_(KD_ERR_NOMEM, __func__, "cannot allocate"); goto done; }
    const float s0 = logf(cfg->init_sigma);
    for (size_t i = 0; i < tot; i++) s[i] = s0;
    const float b1 = 0.9f, b2 = 0.999f, ae = 1e-8f;
    for (int t = 0; t < cfg->steps; t++) {
        const uint64_t seed = kd_hash(cfg->seed, (uint64_t)t);
        for (int i0 = 0; i0 < N && st == KD_OK; i0 += G) {
            const int g = N - i0 < G ? N - i0 : G;
            wk.fstar = fall + (size_t)i0 * m;
            st = chunk_objective(net, node, x, i0, g, C, H, W, s, NULL, cfg->samples, seed, cfg->lambda, cfg->delta2,
                                 &wk, val, grad);
        }
        if (st != KD_OK) goto done;
        for (size_t i = 0; i < tot; i++)
            if (!isfinite(grad[i])) {
                st = kd_set_error_(KD_ERR_NONFINITE, __func__, "the fit's gradient is not finite at step %d "
                                   "(sigma grew too large: lower lr or lam)", t);
                goto done;
            }
        if (objective) {
            double a = 0;
            for (int i = 0; i < N; i++) a += val[i];
            objective[t] = a / N;
        }
        // Adam (bias-corrected), as torch.optim.Adam
        const float c1 = 1.0f - powf(b1, (float)(t + 1)), c2 = 1.0f - powf(b2, (float)(t + 1));
        #pragma omp parallel for schedule(static) if (tot > 65536)
        for (size_t i = 0; i < tot; i++) {
            m1[i] = b1 * m1[i] + (1.0f - b1) * grad[i];
            m2[i] = b2 * m2[i] + (1.0f - b2) * grad[i] * grad[i];
            s[i] -= cfg->lr * (m1[i] / c1) / (sqrtf(m2[i] / c2) + ae);
        }
        // exp(s) must stay a float: past ~88 the noise, and every later step, is infinite
        for (size_t i = 0; i < tot; i++)
            if (!(s[i] < 80.0f)) {
                st = kd_set_error_(KD_ERR_NONFINITE, __func__, "the fit diverged at step %d: log sigma reached %g, "
                                   "where the noise is not finite (lower lr or lam)", t, (double)s[i]);
                goto done;
            }
    }
done:
    wk.fstar = NULL;
    free(fall); work_free(&wk);
    free(grad); free(m1); free(m2); free(val);
    kd_net_zero_grad(net);
    return st;
}
