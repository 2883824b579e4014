// Tests for losses_conn.c (kdcore.h, "Losses with connectors or state"): every gradient
// against central finite differences of the function's own loss (computed in double from the
// float outputs; inputs kept away from the kinks of the piecewise losses, where central
// differences of a piecewise quadratic are exact), VID's log_scale and CRD's two embeddings
// included; weight/accumulate/NULL-gradient semantics; results bitwise independent of the
// thread count; CRD's banks, sampler, update and state; argument errors naming the argument.
// Sizes are tiny so that valgrind runs it in seconds.
#include "kdtest.h"

#include "kd_internal.h"

static bool err_has_(const char * sub) { return strstr(kd_last_error(), sub) != NULL; }

// ---------------------------------------------------------------------------------------
// Finite differences: d loss / d x[i] ~ (L(x + h) - L(x - h)) / (x+h - (x-h)), the step taken
// as the float difference actually stored. `grad` is the analytic gradient of weight * loss.

typedef double (*loss_fn)(void * ctx);

static void fd_check(const char * what, float * x, size_t n, const float * grad, double weight, loss_fn f, void * ctx,
                     double h, double rtol, double atol_rel) {
    float * fd = malloc(n * sizeof *fd);
    double gmax = 0;
    for (size_t i = 0; i < n; i++) gmax = fmax(gmax, fabs((double)grad[i]));
    for (size_t i = 0; i < n; i++) {
        float save = x[i];
        x[i] = (float)(save + h);
        double xp = x[i], lp = f(ctx);
        x[i] = (float)(save - h);
        double xm = x[i], lm = f(ctx);
        x[i] = save;
        fd[i] = (float)(weight * (lp - lm) / (xp - xm));
    }
    check_close(what, grad, fd, n, atol_rel * fmax(gmax, 1e-6), rtol);
    free(fd);
}

// Moves x away from the kink k by at least `gap` (keeps the sign of x - k).
static float away_(float x, double k, double gap) {
    double d = (double)x - k;
    if (fabs(d) >= gap) return x;
    return (float)(k + (d >= 0 ? gap : -gap) * 1.5);
}

// ---------------------------------------------------------------------------------------
// OFD

struct ofd_ctx { struct kd_fmap s, t; const float * margin; };
static double ofd_f(void * p) {
    struct ofd_ctx * c = p;
    float l;
    kd_loss_ofd(&l, NULL, c->s, c->t, c->margin, 1.0f, false);
    return l;
}

static void test_ofd(void) {
    // margins: the mdistiller formula, the cut-off branch and the |w| = 0 limits
    float w[5] = { 1.0f, 0.5f, 1.0f, 0.0f, 0.0f }, b[5] = { 0.0f, -1.0f, 5.0f, -2.0f, 1.0f }, m[5];
    CHECK(kd_ofd_margin(m, w, b, 5) == KD_OK, "margin: %s", kd_last_error());
    CHECK(fabs(m[0] + 0.7978845608) < 1e-6, "margin(N(0,1)) = %g, want -sqrt(2/pi)", (double)m[0]);
    CHECK(m[2] == -3.0f && m[3] == -2.0f && m[4] == 0.0f, "cut-off / limits: %g %g %g", (double)m[2], (double)m[3], (double)m[4]);
    // E[x | x < 0] of N(-1, 0.25) by the closed form, independently: -1 - 0.5 phi(2) / Phi(2)
    double want = -1.0 - 0.5 * exp(-2.0) / sqrt(2 * M_PI) / (0.5 * erfc(-2.0 / sqrt(2.0)));
    CHECK(fabs(m[1] - want) < 1e-6, "margin[1] = %g, want %g", (double)m[1], want);

    const double h = 1e-2;
    int shapes[3][4] = { { 2, 3, 3, 4 }, { 1, 2, 5, 3 }, { 3, 4, 1, 1 } };
    for (int sh = 0; sh < 3; sh++) {
        int n = shapes[sh][0], c = shapes[sh][1], hh = shapes[sh][2], ww = shapes[sh][3];
        size_t N = (size_t)n * c * hh * ww;
        float * s = malloc(N * sizeof *s), * t = malloc(N * sizeof *t), * ds = malloc(N * sizeof *ds);
        float mg[4] = { -0.3f, -0.6f, -0.2f, -0.45f };
        kdt_fill(s, N, 10 + sh);
        kdt_fill(t, N, 20 + sh);
        for (size_t i = 0; i < N; i++) {
            double mm = mg[(i / ((size_t)hh * ww)) % c];
            if (i % 7 == 0) t[i] = (float)mm;                      // teacher exactly at the margin
            if (i % 11 == 0) t[i] = 0.0f;                          // and exactly 0
            s[i] = away_(away_(away_(s[i], mm, 2 * h), t[i], 2 * h), 0.0, 2 * h);
        }
        struct ofd_ctx ctx = { { s, n, c, hh, ww }, { t, n, c, hh, ww }, mg };
        float loss;
        CHECK(kd_loss_ofd(&loss, ds, ctx.s, ctx.t, mg, 0.7f, false) == KD_OK, "ofd: %s", kd_last_error());
        fd_check("ofd ds", s, N, ds, 0.7, ofd_f, &ctx, h, 1e-3, 1e-3);
        free(s); free(t); free(ds);
    }
    // teacher twice as large (pooled to the student's size), odd sizes
    {
        int n = 2, c = 2, hs = 3, ws = 2, H = 7, W = 5;
        size_t Ns = (size_t)n * c * hs * ws, Nt = (size_t)n * c * H * W;
        float * s = malloc(Ns * sizeof *s), * t = malloc(Nt * sizeof *t), * ds = malloc(Ns * sizeof *ds);
        float mg[2] = { -0.4f, -0.25f };
        kdt_fill(s, Ns, 31);
        kdt_fill(t, Nt, 32);
        for (size_t i = 0; i < Ns; i++) s[i] = away_(away_(s[i], mg[(i / (hs * ws)) % c], 2 * h), 0.0, 0.3);
        struct ofd_ctx ctx = { { s, n, c, hs, ws }, { t, n, c, H, W }, mg };
        float loss;
        CHECK(kd_loss_ofd(&loss, ds, ctx.s, ctx.t, mg, 1.0f, false) == KD_OK, "ofd pooled: %s", kd_last_error());
        // OFD's kinks (s = max(t, m) <= 0) are C1: central differences stay within O(h) there
        fd_check("ofd ds (pooled teacher)", s, Ns, ds, 1.0, ofd_f, &ctx, 1e-3, 2e-3, 2e-3);
        free(s); free(t); free(ds);
    }
}

// ---------------------------------------------------------------------------------------
// AB

struct ab_ctx { struct kd_fmap s, t; float margin; };
static double ab_f(void * p) {
    struct ab_ctx * c = p;
    float l;
    kd_loss_ab(&l, NULL, c->s, c->t, c->margin, 1.0f, false);
    return l;
}

static void test_ab(void) {
    const double h = 1e-2;
    float margins[2] = { 1.0f, 0.3f };
    for (int k = 0; k < 2; k++) {
        int n = 2, c = 3, hh = 3, ww = 3;
        size_t N = (size_t)n * c * hh * ww;
        float * s = malloc(N * sizeof *s), * t = malloc(N * sizeof *t), * ds = malloc(N * sizeof *ds);
        kdt_fill(s, N, 40 + k);
        kdt_fill(t, N, 50 + k);
        for (size_t i = 0; i < N; i++) {
            s[i] *= 1.6f;
            if (i % 5 == 0) t[i] = 0.0f;
            s[i] = away_(away_(s[i], margins[k], 2 * h), -margins[k], 2 * h);
        }
        struct ab_ctx ctx = { { s, n, c, hh, ww }, { t, n, c, hh, ww }, margins[k] };
        float loss;
        CHECK(kd_loss_ab(&loss, ds, ctx.s, ctx.t, margins[k], 2.0f, false) == KD_OK, "ab: %s", kd_last_error());
        fd_check("ab ds", s, N, ds, 2.0, ab_f, &ctx, h, 1e-3, 1e-3);
        free(s); free(t); free(ds);
    }
}

// ---------------------------------------------------------------------------------------
// FT

struct ft_ctx { struct kd_fmap s, t; int p1; float p2; };
static double ft_f(void * p) {
    struct ft_ctx * c = p;
    float l;
    kd_loss_ft(&l, NULL, NULL, c->s, c->t, c->p1, c->p2, 1.0f, false);
    return l;
}

static void test_ft(void) {
    struct { int cs, hs, ws, ct, ht, wt, p1; float p2; } cases[] = {
        { 2, 3, 3, 3, 3, 3, 2, 1.0f },    // RepDistiller's p1 = 2, p2 = 1, channel counts differ
        { 3, 4, 4, 2, 2, 2, 2, 2.0f },    // student pooled 4x4 -> 2x2
        { 2, 2, 3, 2, 5, 7, 3, 1.5f },    // teacher pooled 5x7 -> 2x3
        { 1, 3, 2, 2, 3, 2, 1, 1.0f },
    };
    for (size_t k = 0; k < sizeof cases / sizeof cases[0]; k++) {
        int n = 2;
        size_t Ns = (size_t)n * cases[k].cs * cases[k].hs * cases[k].ws, Nt = (size_t)n * cases[k].ct * cases[k].ht * cases[k].wt;
        float * s = malloc(Ns * sizeof *s), * t = malloc(Nt * sizeof *t);
        float * ds = malloc(Ns * sizeof *ds), * dt = malloc(Nt * sizeof *dt);
        kdt_fill(s, Ns, 60 + k);
        kdt_fill(t, Nt, 70 + k);
        for (size_t i = 0; i < Ns; i++) s[i] += 0.5f;   // factors away from the origin
        struct ft_ctx ctx = { { s, n, cases[k].cs, cases[k].hs, cases[k].ws }, { t, n, cases[k].ct, cases[k].ht, cases[k].wt },
                              cases[k].p1, cases[k].p2 };
        float loss;
        CHECK(kd_loss_ft(&loss, ds, dt, ctx.s, ctx.t, ctx.p1, ctx.p2, 1.5f, false) == KD_OK, "ft: %s", kd_last_error());
        char name[64];
        snprintf(name, sizeof name, "ft ds case %zu", k);
        fd_check(name, s, Ns, ds, 1.5, ft_f, &ctx, 1e-3, 5e-3, 2e-3);
        snprintf(name, sizeof name, "ft dt case %zu", k);
        fd_check(name, t, Nt, dt, 1.5, ft_f, &ctx, 1e-3, 5e-3, 2e-3);
        free(s); free(t); free(ds); free(dt);
    }
}

// ---------------------------------------------------------------------------------------
// VID

struct vid_ctx { struct kd_fmap mu, t; const float * ls; float eps; };
static double vid_f(void * p) {
    struct vid_ctx * c = p;
    float l;
    kd_loss_vid(&l, NULL, NULL, c->mu, c->t, c->ls, c->eps, 1.0f, false);
    return l;
}

static void test_vid(void) {
    int n = 2, c = 3, hh = 3, ww = 2;
    size_t N = (size_t)n * c * hh * ww;
    float * mu = malloc(N * sizeof *mu), * t = malloc(N * sizeof *t), * dmu = malloc(N * sizeof *dmu);
    float ls[3] = { kd_vid_log_scale_init(5.0f, 1e-5f), -2.0f, 0.3f }, dls[3];
    CHECK(fabs(log1p(exp((double)ls[0])) + 1e-5 - 5.0) < 1e-5, "vid init: softplus(%g) + eps != 5", (double)ls[0]);
    kdt_fill(mu, N, 80);
    kdt_fill(t, N, 81);
    struct vid_ctx ctx = { { mu, n, c, hh, ww }, { t, n, c, hh, ww }, ls, 1e-5f };
    float loss;
    CHECK(kd_loss_vid(&loss, dmu, dls, ctx.mu, ctx.t, ls, 1e-5f, 0.5f, false) == KD_OK, "vid: %s", kd_last_error());
    fd_check("vid dmu", mu, N, dmu, 0.5, vid_f, &ctx, 1e-2, 1e-3, 1e-3);
    fd_check("vid dlog_scale", ls, 3, dls, 0.5, vid_f, &ctx, 1e-3, 1e-3, 1e-3);
    free(mu); free(t); free(dmu);
}

// ---------------------------------------------------------------------------------------
// CC

struct cc_ctx { float * es, * et; int n, d; };
static double cc_f(void * p) {
    struct cc_ctx * c = p;
    float l;
    kd_loss_cc(&l, NULL, NULL, c->es, c->et, c->n, c->d, 1.0f, false);
    return l;
}

static void test_cc(void) {
    const double h = 1e-2;
    int sizes[3][2] = { { 2, 3 }, { 5, 4 }, { 3, 1 } };
    for (int k = 0; k < 3; k++) {
        int n = sizes[k][0], d = sizes[k][1];
        size_t N = (size_t)n * d;
        float * es = malloc(N * sizeof *es), * et = malloc(N * sizeof *et), * des = malloc(N * sizeof *des), * det = malloc(N * sizeof *det);
        kdt_fill(es, N, 90 + k);
        kdt_fill(et, N, 95 + k);
        for (size_t i = 0; i < N; i++) es[i] = away_(es[i], et[i], 2 * h);
        struct cc_ctx ctx = { es, et, n, d };
        float loss;
        CHECK(kd_loss_cc(&loss, des, det, es, et, n, d, 3.0f, false) == KD_OK, "cc: %s", kd_last_error());
        fd_check("cc des", es, N, des, 3.0, cc_f, &ctx, h, 1e-3, 1e-3);
        fd_check("cc det", et, N, det, 3.0, cc_f, &ctx, h, 1e-3, 1e-3);
        free(es); free(et); free(des); free(det);
    }
}

// ---------------------------------------------------------------------------------------
// HCL

struct hcl_ctx { struct kd_fmap s, t; };
static double hcl_f(void * p) {
    struct hcl_ctx * c = p;
    float l;
    kd_loss_hcl(&l, NULL, c->s, c->t, 1.0f, false);
    return l;
}

static void test_hcl(void) {
    int shapes[4][4] = { { 2, 2, 5, 5 }, { 1, 3, 8, 8 }, { 2, 1, 3, 4 }, { 2, 2, 1, 1 } };
    for (int k = 0; k < 4; k++) {
        int n = shapes[k][0], c = shapes[k][1], hh = shapes[k][2], ww = shapes[k][3];
        size_t N = (size_t)n * c * hh * ww;
        float * s = malloc(N * sizeof *s), * t = malloc(N * sizeof *t), * ds = malloc(N * sizeof *ds);
        kdt_fill(s, N, 100 + k);
        kdt_fill(t, N, 110 + k);
        struct hcl_ctx ctx = { { s, n, c, hh, ww }, { t, n, c, hh, ww } };
        float loss;
        CHECK(kd_loss_hcl(&loss, ds, ctx.s, ctx.t, 1.0f, false) == KD_OK, "hcl: %s", kd_last_error());
        char name[64];
        snprintf(name, sizeof name, "hcl ds %dx%d", hh, ww);
        fd_check(name, s, N, ds, 1.0, hcl_f, &ctx, 1e-2, 1e-3, 1e-3);
        free(s); free(t); free(ds);
    }
    // 8x8: levels 4, 2, 1 with weights 1/2, 1/4, 1/8; a constant difference of 1 gives mse 1 at every level
    float s[64], t[64], l;
    for (int i = 0; i < 64; i++) { s[i] = 1.0f; t[i] = 0.0f; }
    struct kd_fmap fs = { s, 1, 1, 8, 8 }, ft = { t, 1, 1, 8, 8 };
    kd_loss_hcl(&l, NULL, fs, ft, 1.0f, false);
    CHECK(fabs(l - 1.0) < 1e-6, "hcl constant difference: %g, want 1", (double)l);
}

// ---------------------------------------------------------------------------------------
// weight, accumulate and NULL gradients

static void test_weight_accumulate(void) {
    int n = 2, c = 3, hh = 4, ww = 4;
    size_t N = (size_t)n * c * hh * ww;
    float * s = malloc(N * sizeof *s), * t = malloc(N * sizeof *t), * g1 = malloc(N * sizeof *g1), * g2 = malloc(N * sizeof *g2);
    float * g3 = malloc(N * sizeof *g3);
    kdt_fill(s, N, 120);
    kdt_fill(t, N, 121);
    struct kd_fmap fs = { s, n, c, hh, ww }, ft = { t, n, c, hh, ww };
    float mg[3] = { -0.5f, -0.5f, -0.5f }, ls[3] = { 0, 1, 2 }, dl1[3], dl2[3];
    for (int which = 0; which < 6; which++) {
        float l1, l2, l3;
        enum kd_status st = KD_OK;
        // g1 = grad with weight 1; g2 = 0.5-weighted grad written, then 2-weighted added: 2.5 g1
        for (int pass = 0; pass < 3; pass++) {
            float * g = pass == 0 ? g1 : g2;
            float wgt = pass == 0 ? 1.0f : pass == 1 ? 0.5f : 2.0f;
            bool acc = pass == 2;
            float * l = pass == 0 ? &l1 : pass == 1 ? &l2 : &l3;
            switch (which) {
            case 0: st = kd_loss_ofd(l, g, fs, ft, mg, wgt, acc); break;
            case 1: st = kd_loss_ab(l, g, fs, ft, 1.0f, wgt, acc); break;
            case 2: st = kd_loss_ft(l, g, NULL, fs, ft, 2, 1.0f, wgt, acc); break;
            case 3: st = kd_loss_vid(l, g, pass == 0 ? dl1 : dl2, fs, ft, ls, 1e-5f, wgt, acc); break;
            case 4: st = kd_loss_cc(l, g, NULL, s, t, n, c * hh * ww, wgt, acc); break;
            case 5: st = kd_loss_hcl(l, g, fs, ft, wgt, acc); break;
            }
            CHECK(st == KD_OK, "loss %d pass %d: %s", which, pass, kd_last_error());
        }
        CHECK(l1 == l2 && l2 == l3, "loss %d: the loss does not depend on weight (%g %g %g)", which, (double)l1, (double)l2, (double)l3);
        for (size_t i = 0; i < N; i++) g3[i] = 2.5f * g1[i];
        check_close(which == 0 ? "ofd accumulate" : which == 1 ? "ab accumulate" : which == 2 ? "ft accumulate"
                    : which == 3 ? "vid accumulate" : which == 4 ? "cc accumulate" : "hcl accumulate", g2, g3, N, 1e-7, 1e-5);
        if (which == 3) {
            float e[3] = { 2.5f * dl1[0], 2.5f * dl1[1], 2.5f * dl1[2] };
            check_close("vid dlog_scale accumulate", dl2, e, 3, 1e-8, 1e-5);
        }
        // loss only (every gradient NULL): same value
        float l0 = -1;
        switch (which) {
        case 0: kd_loss_ofd(&l0, NULL, fs, ft, mg, 1, false); break;
        case 1: kd_loss_ab(&l0, NULL, fs, ft, 1.0f, 1, false); break;
        case 2: kd_loss_ft(&l0, NULL, NULL, fs, ft, 2, 1.0f, 1, false); break;
        case 3: kd_loss_vid(&l0, NULL, NULL, fs, ft, ls, 1e-5f, 1, false); break;
        case 4: kd_loss_cc(&l0, NULL, NULL, s, t, n, c * hh * ww, 1, false); break;
        case 5: kd_loss_hcl(&l0, NULL, fs, ft, 1, false); break;
        }
        CHECK(l0 == l1, "loss %d without gradients: %g vs %g", which, (double)l0, (double)l1);
    }
    free(s); free(t); free(g1); free(g2); free(g3);
}

// ---------------------------------------------------------------------------------------
// thread-count independence (sizes above the parallel threshold)

static void test_threads(void) {
    int n = 4, c = 16, hh = 24, ww = 24;
    size_t N = (size_t)n * c * hh * ww;
    float * s = malloc(N * sizeof *s), * t = malloc(N * sizeof *t), * g[3], * gt[3];
    kdt_fill(s, N, 130);
    kdt_fill(t, N, 131);
    struct kd_fmap fs = { s, n, c, hh, ww }, ft = { t, n, c, hh, ww };
    float mg[16], ls[16], dls[3][16];
    for (int k = 0; k < 16; k++) { mg[k] = -0.4f; ls[k] = 0.1f * k; }
    for (int which = 0; which < 5; which++) {
        float loss[3];
        for (int r = 0; r < 3; r++) {
            g[r] = malloc(N * sizeof(float));
            gt[r] = malloc(N * sizeof(float));
            kd_set_num_threads(r + 1);
            switch (which) {
            case 0: kd_loss_ofd(&loss[r], g[r], fs, ft, mg, 1, false); break;
            case 1: kd_loss_ab(&loss[r], g[r], fs, ft, 1.0f, 1, false); break;
            case 2: kd_loss_ft(&loss[r], g[r], gt[r], fs, ft, 2, 1.0f, 1, false); break;
            case 3: kd_loss_vid(&loss[r], g[r], dls[r], fs, ft, ls, 1e-5f, 1, false); break;
            case 4: kd_loss_hcl(&loss[r], g[r], fs, ft, 1, false); break;
            }
        }
        for (int r = 1; r < 3; r++) {
            CHECK(loss[r] == loss[0], "loss %d at %d threads: %.9g vs %.9g", which, r + 1, (double)loss[r], (double)loss[0]);
            CHECK(memcmp(g[r], g[0], N * sizeof(float)) == 0, "gradient %d differs at %d threads", which, r + 1);
            if (which == 2) CHECK(memcmp(gt[r], gt[0], N * sizeof(float)) == 0, "ft dt differs at %d threads", r + 1);
            if (which == 3) CHECK(memcmp(dls[r], dls[0], sizeof dls[0]) == 0, "vid dlog_scale differs at %d threads", r + 1);
        }
        for (int r = 0; r < 3; r++) { free(g[r]); free(gt[r]); }
    }
    // CRD: banks, loss and gradients
    const int B = 16, D = 32, K = 100;
    float * es = malloc((size_t)B * D * sizeof *es), * et = malloc((size_t)B * D * sizeof *et);
    kdt_fill(es, (size_t)B * D, 140);
    kdt_fill(et, (size_t)B * D, 141);
    int64_t idx[16];
    for (int i = 0; i < B; i++) idx[i] = (i * 37) % 500;
    float l[3], * d1[3], * d2[3];
    for (int r = 0; r < 3; r++) {
        kd_set_num_threads(r + 1);
        struct kd_crd * crd = kd_crd_new(500, D, K, 0.07f, 0.5f, 3);
        d1[r] = malloc((size_t)B * D * sizeof(float));
        d2[r] = malloc((size_t)B * D * sizeof(float));
        CHECK(crd && kd_crd_loss(crd, &l[r], d1[r], d2[r], es, et, idx, NULL, B, 1, false) == KD_OK, "crd: %s", kd_last_error());
        kd_crd_free(crd);
    }
    for (int r = 1; r < 3; r++) {
        CHECK(l[r] == l[0], "crd loss at %d threads: %.9g vs %.9g", r + 1, (double)l[r], (double)l[0]);
        CHECK(!memcmp(d1[r], d1[0], (size_t)B * D * sizeof(float)) && !memcmp(d2[r], d2[0], (size_t)B * D * sizeof(float)),
              "crd gradients differ at %d threads", r + 1);
    }
    for (int r = 0; r < 3; r++) { free(d1[r]); free(d2[r]); }
    kd_set_num_threads(2);
    free(es); free(et); free(s); free(t);
}

// ---------------------------------------------------------------------------------------
// CRD

struct crd_ctx { struct kd_crd * crd; float * es, * et; const int64_t * rows; const int64_t * idx; int n; };
static double crd_f(void * p) {
    struct crd_ctx * c = p;
    float l;
    enum kd_status st = c->rows ? kd_crd_loss_idx(c->crd, &l, NULL, NULL, c->es, c->et, c->rows, c->n, 1.0f, false)
                                : kd_crd_loss(c->crd, &l, NULL, NULL, c->es, c->et, c->idx, NULL, c->n, 1.0f, false);
    return st == KD_OK ? l : NAN;
}

static void normalise_rows_(float * x, int n, int d) {
    for (int i = 0; i < n; i++) {
        double ss = 0;
        for (int k = 0; k < d; k++) ss += (double)x[i * d + k] * x[i * d + k];
        for (int k = 0; k < d; k++) x[i * d + k] = (float)(x[i * d + k] / sqrt(ss));
    }
}

static void test_crd(void) {
    const int64_t n_data = 30;
    const int D = 6, K = 5, n = 3;
    struct kd_crd * crd = kd_crd_new(n_data, D, K, 0.07f, 0.5f, 11);
    CHECK(crd != NULL, "kd_crd_new: %s", kd_last_error());
    if (!crd) return;
    // banks: n_data x dim each, one block, uniform in +-1/sqrt(dim/3)
    int64_t rows0, rows1;
    int dim0, dim1;
    float * b0 = kd_crd_bank(crd, 0, &rows0, &dim0), * b1 = kd_crd_bank(crd, 1, &rows1, &dim1);
    CHECK(b0 && b1 && rows0 == n_data && rows1 == n_data && dim0 == D && dim1 == D, "bank shapes");
    CHECK(b1 == b0 + n_data * D, "teacher bank follows the student bank in one block");
    CHECK(kd_crd_bank(crd, 2, NULL, NULL) == NULL, "bank 2 does not exist");
    double stdv = 1 / sqrt(D / 3.0), lo = 1, hi = -1;
    for (int64_t e = 0; e < 2 * n_data * D; e++) { lo = fmin(lo, b0[e]); hi = fmax(hi, b0[e]); }
    CHECK(lo >= -stdv && hi < stdv && lo < -0.8 * stdv && hi > 0.8 * stdv, "bank init range [%g, %g], stdv %g", lo, hi, stdv);
    CHECK(kd_crd_z(crd)[0] < 0 && kd_crd_z(crd)[1] < 0 && *kd_crd_steps(crd) == 0, "fresh state");

    float es[18], et[18], des[18], det[18], des2[18], det2[18], loss, loss2;
    kdt_fill(es, 18, 150);
    kdt_fill(et, 18, 151);
    normalise_rows_(es, n, D);
    normalise_rows_(et, n, D);
    int64_t idx[3] = { 4, 29, 4 };
    int64_t rows[3 * 6];
    CHECK(kd_crd_sample(crd, rows, idx, NULL, n) == KD_OK, "sample: %s", kd_last_error());
    for (int i = 0; i < n; i++) {
        CHECK(rows[i * 6] == idx[i], "row %d: positive first", i);
        for (int j = 1; j <= K; j++) {
            CHECK(rows[i * 6 + j] != idx[i] && rows[i * 6 + j] >= 0 && rows[i * 6 + j] < n_data, "negative %lld", (long long)rows[i * 6 + j]);
            for (int j2 = 1; j2 < j; j2++) CHECK(rows[i * 6 + j] != rows[i * 6 + j2], "distinct negatives");
        }
    }
    CHECK(kd_crd_loss(crd, &loss, des, det, es, et, idx, NULL, n, 1.0f, false) == KD_OK, "crd loss: %s", kd_last_error());
    CHECK(*kd_crd_steps(crd) == 1 && kd_crd_z(crd)[0] > 0 && kd_crd_z(crd)[1] > 0, "step counted, Z set");
    // the drawn rows were the sampled ones
    CHECK(kd_crd_loss_idx(crd, &loss2, des2, det2, es, et, rows, n, 1.0f, false) == KD_OK, "loss_idx: %s", kd_last_error());
    CHECK(loss2 == loss && !memcmp(des, des2, sizeof des) && !memcmp(det, det2, sizeof det), "loss == loss_idx(sample)");
    // gradients by finite differences (Z fixed now, rows fixed)
    struct crd_ctx ctx = { crd, es, et, rows, NULL, n };
    CHECK(kd_crd_loss_idx(crd, &loss2, des2, det2, es, et, rows, n, 0.8f, false) == KD_OK, "loss_idx weighted");
    fd_check("crd des", es, 18, des2, 0.8, crd_f, &ctx, 1e-3, 2e-3, 2e-3);
    fd_check("crd det", et, 18, det2, 0.8, crd_f, &ctx, 1e-3, 2e-3, 2e-3);

    // momentum update against a double computation; the repeated index keeps its last sample
    float old0[2][6], old1[6];
    memcpy(old0[0], b0 + 4 * D, sizeof old0[0]);
    memcpy(old0[1], b1 + 29 * D, sizeof old0[1]);
    memcpy(old1, b1 + 4 * D, sizeof old1);
    CHECK(kd_crd_update(crd, es, et, idx, n) == KD_OK, "update: %s", kd_last_error());
    double want[6], ss = 0;
    for (int k = 0; k < D; k++) { want[k] = 0.5 * old0[0][k] + 0.5 * es[2 * D + k]; ss += want[k] * want[k]; }
    float wf[6];
    for (int k = 0; k < D; k++) wf[k] = (float)(want[k] / sqrt(ss));
    check_close("student bank row 4 (last sample wins)", b0 + 4 * D, wf, D, 1e-7, 1e-6);
    ss = 0;
    for (int k = 0; k < D; k++) { want[k] = 0.5 * old0[1][k] + 0.5 * et[1 * D + k]; ss += want[k] * want[k]; }
    for (int k = 0; k < D; k++) wf[k] = (float)(want[k] / sqrt(ss));
    check_close("teacher bank row 29", b1 + 29 * D, wf, D, 1e-7, 1e-6);
    ss = 0;
    for (int k = 0; k < D; k++) { want[k] = 0.5 * old1[k] + 0.5 * et[2 * D + k]; ss += want[k] * want[k]; }
    for (int k = 0; k < D; k++) wf[k] = (float)(want[k] / sqrt(ss));
    check_close("teacher bank row 4", b1 + 4 * D, wf, D, 1e-7, 1e-6);

    // negatives from other classes
    int64_t labels[30];
    for (int i = 0; i < 30; i++) labels[i] = i % 3;
    int64_t lab_batch[3] = { labels[4], labels[29], labels[4] };
    CHECK(kd_crd_loss(crd, &loss, NULL, NULL, es, et, idx, lab_batch, n, 1, false) == KD_ERR_STATE && err_has_("kd_crd_set_labels"),
          "labels before set_labels: %s", kd_last_error());
    CHECK(kd_crd_set_labels(crd, labels, 30) == KD_OK, "set_labels: %s", kd_last_error());
    CHECK(kd_crd_sample(crd, rows, idx, lab_batch, n) == KD_OK, "sample by class: %s", kd_last_error());
    for (int i = 0; i < n; i++)
        for (int j = 1; j <= K; j++) CHECK(labels[rows[i * 6 + j]] != labels[idx[i]], "negative of another class");
    lab_batch[1] = 0;
    CHECK(kd_crd_loss(crd, &loss, NULL, NULL, es, et, idx, lab_batch, n, 1, false) == KD_ERR_VALUE && err_has_("labels[1]"),
          "inconsistent labels: %s", kd_last_error());

    // state accessors are writable (checkpoint restore)
    kd_crd_z(crd)[0] = 123.0f;
    *kd_crd_steps(crd) = 7;
    CHECK(kd_crd_z(crd)[0] == 123.0f && *kd_crd_steps(crd) == 7 && kd_crd_n_neg(crd) == K && kd_crd_dim(crd) == D &&
          kd_crd_n_data(crd) == n_data, "accessors");
    kd_crd_free(crd);

    // in-batch mode: no banks, gradients by finite differences through kd_crd_loss itself
    struct kd_crd * ib = kd_crd_new_in_batch(1000, D, 0.1f);
    CHECK(ib && kd_crd_bank(ib, 0, NULL, NULL) == NULL && kd_crd_n_neg(ib) == 0, "in-batch: no banks");
    CHECK(kd_crd_loss(ib, &loss, des, det, es, et, NULL, NULL, n, 1.5f, false) == KD_OK, "in-batch loss: %s", kd_last_error());
    struct crd_ctx ictx = { ib, es, et, NULL, NULL, n };
    fd_check("in-batch des", es, 18, des, 1.5, crd_f, &ictx, 1e-3, 2e-3, 2e-3);
    fd_check("in-batch det", et, 18, det, 1.5, crd_f, &ictx, 1e-3, 2e-3, 2e-3);
    int64_t ibl[3] = { 0, 1, 0 };
    CHECK(kd_crd_loss(ib, &loss, des, det, es, et, NULL, ibl, n, 1.5f, false) == KD_OK, "in-batch with labels");
    CHECK(kd_crd_update(ib, es, et, NULL, n) == KD_OK, "in-batch update is a no-op");
    CHECK(kd_crd_sample(ib, rows, idx, NULL, n) == KD_ERR_STATE, "in-batch sample");
    CHECK(kd_crd_loss(ib, &loss, des, det, es, et, NULL, NULL, 1, 1, false) == KD_ERR_VALUE && err_has_("n (1)"), "in-batch n=1");
    kd_crd_free(ib);
    kd_crd_free(NULL);

    // K larger than the pool: with replacement, never the sample itself
    struct kd_crd * sm = kd_crd_new(4, 2, 9, 0.07f, 0.5f, 1);
    int64_t r9[10], i2 = 2;
    CHECK(sm && kd_crd_sample(sm, r9, &i2, NULL, 1) == KD_OK, "small sample");
    for (int j = 1; j < 10; j++) CHECK(r9[j] != 2 && r9[j] >= 0 && r9[j] < 4, "small pool draw %lld", (long long)r9[j]);
    kd_crd_free(sm);
}

// ---------------------------------------------------------------------------------------
// argument errors

static void test_errors(void) {
    float x[24] = { 0 }, g[24], m[3] = { -1, -1, -1 }, l;
    struct kd_fmap a = { x, 2, 3, 2, 2 }, b = { x, 2, 3, 2, 2 }, bad_c = { x, 2, 2, 2, 2 }, empty = { x, 0, 3, 2, 2 },
                   nul = { NULL, 2, 3, 2, 2 };
    CHECK(kd_loss_ofd(&l, g, a, bad_c, m, 1, false) == KD_ERR_SHAPE && err_has_("t (2, 2"), "ofd channels: %s", kd_last_error());
    CHECK(kd_loss_ofd(&l, g, a, b, NULL, 1, false) == KD_ERR_VALUE && err_has_("margin"), "ofd margin NULL");
    CHECK(kd_loss_ofd(&l, g, empty, b, m, 1, false) == KD_ERR_SHAPE && err_has_("s has shape"), "ofd empty: %s", kd_last_error());
    CHECK(kd_loss_ofd(&l, g, nul, b, m, 1, false) == KD_ERR_VALUE && err_has_("s->x"), "ofd NULL data");
    CHECK(kd_loss_ofd(&l, g, a, b, m, NAN, false) == KD_ERR_VALUE && err_has_("weight"), "weight NaN");
    float bw[2] = { 1, NAN }, bb[2] = { 0, 0 };
    CHECK(kd_ofd_margin(m, bw, bb, 2) == KD_ERR_VALUE && err_has_("bn_weight[1]"), "margin nan: %s", kd_last_error());
    CHECK(kd_ofd_margin(m, bw, bb, 0) == KD_ERR_VALUE && err_has_("c (0)"), "margin c");
    CHECK(kd_loss_ab(&l, g, a, bad_c, 1, 1, false) == KD_ERR_SHAPE && err_has_("t ("), "ab shape");
    CHECK(kd_loss_ab(&l, g, a, b, -1, 1, false) == KD_ERR_VALUE && err_has_("margin"), "ab margin");
    struct kd_fmap wide = { x, 2, 1, 2, 6 };
    CHECK(kd_loss_ft(&l, g, NULL, a, wide, 2, 1, 1, false) == KD_ERR_SHAPE && err_has_("spatial"), "ft sizes: %s", kd_last_error());
    CHECK(kd_loss_ft(&l, g, NULL, a, b, 0, 1, 1, false) == KD_ERR_VALUE && err_has_("p1"), "ft p1");
    CHECK(kd_loss_ft(&l, g, NULL, a, b, 2, 0.5f, 1, false) == KD_ERR_VALUE && err_has_("p2"), "ft p2");
    float lsv[3] = { 0, INFINITY, 0 };
    CHECK(kd_loss_vid(&l, g, NULL, a, b, lsv, 1e-5f, 1, false) == KD_ERR_VALUE && err_has_("log_scale[1]"), "vid log_scale");
    CHECK(kd_loss_vid(&l, g, NULL, a, bad_c, m, 1e-5f, 1, false) == KD_ERR_SHAPE && err_has_("mu"), "vid shape");
    CHECK(kd_loss_vid(&l, g, NULL, a, b, m, -1, 1, false) == KD_ERR_VALUE && err_has_("eps"), "vid eps");
    CHECK(kd_loss_cc(&l, g, g, x, x, 1, 4, 1, false) == KD_ERR_VALUE && err_has_("n (1)"), "cc n");
    CHECK(kd_loss_cc(&l, g, g, NULL, x, 2, 4, 1, false) == KD_ERR_VALUE && err_has_("es"), "cc NULL");
    CHECK(kd_loss_hcl(&l, g, a, bad_c, 1, false) == KD_ERR_SHAPE, "hcl shape");
    CHECK(!kd_crd_new(1, 4, 4, 0.07f, 0.5f, 0) && err_has_("n_data"), "crd n_data");
    CHECK(!kd_crd_new(10, 0, 4, 0.07f, 0.5f, 0) && err_has_("dim"), "crd dim");
    CHECK(!kd_crd_new(10, 4, 0, 0.07f, 0.5f, 0) && err_has_("n_neg"), "crd n_neg");
    CHECK(!kd_crd_new(10, 4, 4, 0, 0.5f, 0) && err_has_("T ("), "crd T");
    CHECK(!kd_crd_new(10, 4, 4, 0.07f, 1.0f, 0) && err_has_("momentum"), "crd momentum");
    CHECK(!kd_crd_new(INT64_MAX / 2, 1 << 20, 4, 0.07f, 0.5f, 0), "crd too large");
    struct kd_crd * c = kd_crd_new(10, 2, 3, 0.07f, 0.5f, 0);
    float e[4] = { 1, 0, 0, 1 };
    int64_t idx[2] = { 0, 10 }, rows[8] = { 0, 1, 2, 3, 4, 5, 6, 99 };
    CHECK(kd_crd_loss(c, &l, NULL, NULL, e, e, idx, NULL, 2, 1, false) == KD_ERR_VALUE && err_has_("idx[1] = 10"), "crd idx");
    CHECK(kd_crd_loss(c, &l, NULL, NULL, e, e, NULL, NULL, 2, 1, false) == KD_ERR_VALUE && err_has_("idx"), "crd idx NULL");
    CHECK(kd_crd_loss_idx(c, &l, NULL, NULL, e, e, rows, 2, 1, false) == KD_ERR_VALUE && err_has_("sample_idx[1, 3]"),
          "crd sample_idx: %s", kd_last_error());
    CHECK(kd_crd_update(c, e, NULL, idx, 2) == KD_ERR_VALUE && err_has_("et"), "crd update NULL");
    int64_t labels[10] = { 0, 0, 0, 0, 0, 0, 0, 0, 0, -1 };
    CHECK(kd_crd_set_labels(c, labels, 10) == KD_ERR_VALUE && err_has_("labels[9]"), "labels negative");
    CHECK(kd_crd_set_labels(c, labels, 9) == KD_ERR_SHAPE, "labels count");
    labels[9] = 0;
    int64_t i01[2] = { 0, 1 }, y01[2] = { 0, 0 };
    CHECK(kd_crd_set_labels(c, labels, 10) == KD_OK, "set one class");
    CHECK(kd_crd_loss(c, &l, NULL, NULL, e, e, i01, y01, 2, 1, false) == KD_ERR_VALUE && err_has_("another class"),
          "single class: %s", kd_last_error());
    CHECK(*kd_crd_steps(c) == 0 && kd_crd_z(c)[0] < 0, "failed calls leave the state alone");
    kd_crd_free(c);
}

int main(void) {
    kd_set_num_threads(2);
    KDT_RUN(test_ofd);
    KDT_RUN(test_ab);
    KDT_RUN(test_ft);
    KDT_RUN(test_vid);
    KDT_RUN(test_cc);
    KDT_RUN(test_hcl);
    KDT_RUN(test_weight_accumulate);
    KDT_RUN(test_threads);
    KDT_RUN(test_crd);
    KDT_RUN(test_errors);
    return kdt_finish();
}
