// Feature and relation losses (kdcore.h, "Feature and relation losses"): finite-difference
// checks of every gradient (student and teacher maps; all four FSP maps), on both linear
// product engines; weight and accumulate semantics; NULL gradients; bitwise equality across
// thread counts in deterministic mode; the scratch size against the documented formula;
// argument errors naming the argument; a non-finite loss; DeepInversion's losses (BN
// statistics, TV, l2 prior, ADI). Sizes are tiny: this runs under
// valgrind (`make valgrind`).
//
// Finite differences: the loss comes back as a float, so each derivative is a Richardson
// extrapolation of two central differences (steps h and h/2, the exact float steps), in
// double: O(h^4) truncation, rounding ~ 1e-7 |loss| / h.
#include "kdtest.h"
#include "kdcore.h"
#include "layers.h"

#ifdef _OPENMP
#include <omp.h>
#endif

void kd_linear_force_engine(int engine);   // linear.c test hook: 0 automatic, 1 own, 2 OpenBLAS

enum method { AT, SP, NST, RKD, PKT, FSP };
static const char * const method_name[] = { "AT", "SP", "NST", "RKD", "PKT", "FSP" };

struct fcase {
    enum method m;
    int nmaps;                 // 2 (s, t) or 4 (FSP: s1, s2, t1, t2)
    struct kd_fmap f[4];
    float p;                   // AT
    enum kd_at_form form;      // AT
    float wd, wa;              // RKD
    const char * what;
};

static size_t fsize(struct kd_fmap f) { return (size_t)f.n * f.c * f.h * f.w; }
static float * xof(struct fcase * c, int k) { return (float *)(uintptr_t)c->f[k].x; }

static enum kd_status run(const struct fcase * c, float * loss, float * const g[4], float weight, bool acc) {
    switch (c->m) {
    case AT:  return kd_loss_at(loss, g[0], g[1], c->f[0], c->f[1], c->p, c->form, weight, acc);
    case SP:  return kd_loss_sp(loss, g[0], g[1], c->f[0], c->f[1], weight, acc);
    case NST: return kd_loss_nst(loss, g[0], g[1], c->f[0], c->f[1], weight, acc);
    case RKD: return kd_loss_rkd(loss, g[0], g[1], c->f[0], c->f[1], c->wd, c->wa, NULL, weight, acc);
    case PKT: return kd_loss_pkt(loss, g[0], g[1], c->f[0], c->f[1], weight, acc);
    case FSP: return kd_loss_fsp(loss, g[0], g[1], g[2], g[3], c->f[0], c->f[1], c->f[2], c->f[3], weight, acc);
    }
    return KD_ERR_VALUE;
}

static double loss_of(const struct fcase * c) {
    float l = NAN;
    float * none[4] = { NULL, NULL, NULL, NULL };
    enum kd_status st = run(c, &l, none, 1.0f, false);
    if (st != KD_OK) printf("  %s: %s\n", c->what, kd_last_error());
    return l;
}

// Central difference at element e of map k with step h (the exact float steps are used).
static double central(struct fcase * c, int k, size_t e, float h) {
    float * x = xof(c, k);
    float x0 = x[e], xp = x0 + h, xm = x0 - h;
    x[e] = xp;
    double lp = loss_of(c);
    x[e] = xm;
    double lm = loss_of(c);
    x[e] = x0;
    return (lp - lm) / ((double)xp - (double)xm);
}

// Every gradient of the case against Richardson-extrapolated finite differences.
static void gradcheck(struct fcase * c, float h, double rtol) {
    float * g[4] = { NULL, NULL, NULL, NULL };
    for (int k = 0; k < c->nmaps; k++) g[k] = calloc(fsize(c->f[k]), sizeof(float));
    float loss;
    enum kd_status st = run(c, &loss, g, 1.0f, false);
    CHECK(st == KD_OK, "%s %s: %s", method_name[c->m], c->what, kd_last_error());
    for (int k = 0; k < c->nmaps; k++) {
        size_t n = fsize(c->f[k]);
        float * fd = calloc(n, sizeof(float));
        double scale = 0;
        for (size_t e = 0; e < n; e++) {
            double d1 = central(c, k, e, h), d2 = central(c, k, e, h / 2);
            fd[e] = (float)((4 * d2 - d1) / 3);
            scale = fmax(scale, fabs(fd[e]));
        }
        char name[128];
        snprintf(name, sizeof name, "%s %s: d/dmap%d", method_name[c->m], c->what, k);
        check_close(name, g[k], fd, n, rtol * fmax(scale, 1e-6), rtol);
        free(fd);
    }
    for (int k = 0; k < 4; k++) free(g[k]);
}

// weight scales the gradient, accumulate adds it, NULL gradients leave the loss unchanged,
// and the loss does not depend on which gradients are asked for.
static void semantics(const struct fcase * c) {
    float * g[4] = { NULL, NULL, NULL, NULL }, * h[4] = { NULL, NULL, NULL, NULL };
    for (int k = 0; k < c->nmaps; k++) {
        g[k] = calloc(fsize(c->f[k]), sizeof(float));
        h[k] = calloc(fsize(c->f[k]), sizeof(float));
        kdt_fill(h[k], fsize(c->f[k]), 77 + (uint64_t)k);
    }
    float l1, l2, l3;
    run(c, &l1, g, 1.0f, false);
    float * h0[4] = { h[0], h[1], h[2], h[3] };
    float ** pre = malloc(4 * sizeof(float *));
    for (int k = 0; k < c->nmaps; k++) {
        pre[k] = malloc(fsize(c->f[k]) * sizeof(float));
        memcpy(pre[k], h[k], fsize(c->f[k]) * sizeof(float));
    }
    run(c, &l2, h0, 2.5f, true);
    for (int k = 0; k < c->nmaps; k++) {
        size_t n = fsize(c->f[k]);
        float * want = malloc(n * sizeof(float));
        double sc = 0;
        for (size_t e = 0; e < n; e++) { want[e] = pre[k][e] + 2.5f * g[k][e]; sc = fmax(sc, fabs(want[e])); }
        char name[128];
        snprintf(name, sizeof name, "%s %s: accumulate weight 2.5 map%d", method_name[c->m], c->what, k);
        check_close(name, h[k], want, n, 1e-5 * sc, 1e-5);
        free(want);
        free(pre[k]);
    }
    free(pre);
    CHECK(l1 == l2, "%s %s: the loss depends on weight/accumulate (%g vs %g)", method_name[c->m], c->what, l1, l2);
    // only the first gradient: the same values, the same loss
    float * only[4] = { h[0], NULL, NULL, NULL };
    run(c, &l3, only, 1.0f, false);
    CHECK(l3 == l1 && memcmp(h[0], g[0], fsize(c->f[0]) * sizeof(float)) == 0,
          "%s %s: ds alone differs from ds with dt", method_name[c->m], c->what);
    for (int k = 0; k < 4; k++) { free(g[k]); free(h[k]); }
}

static struct kd_fmap fmap(float * x, int n, int c, int h, int w) { return (struct kd_fmap){ x, n, c, h, w }; }

static float * rnd(size_t n, uint64_t seed, float lo, float hi) {
    float * x = malloc(n * sizeof(float));
    kdt_fill(x, n, seed);
    for (size_t i = 0; i < n; i++) x[i] = lo + (hi - lo) * (x[i] + 1) / 2;
    return x;
}

static struct fcase two(enum method m, const char * what, int n, int cs, int hs, int ws, int ct, int ht, int wt,
                        float lo, uint64_t seed) {
    struct fcase c = { .m = m, .nmaps = 2, .p = 2, .form = KD_AT_CODE, .wd = 25, .wa = 50, .what = what };
    c.f[0] = fmap(rnd((size_t)n * cs * hs * ws, seed, lo, 1), n, cs, hs, ws);
    c.f[1] = fmap(rnd((size_t)n * ct * ht * wt, seed + 1, lo, 1), n, ct, ht, wt);
    return c;
}

static void release(struct fcase * c) {
    for (int k = 0; k < c->nmaps; k++) free(xof(c, k));
}

static void check_case(struct fcase c, float h, double rtol) {
    gradcheck(&c, h, rtol);
    semantics(&c);
    release(&c);
}

static void test_gradcheck_all(void) {
    const int q = kdt_quick();
    // AT: pooling both ways (7 -> 5, 4 <- 9 overlapping bins), non-square, flat; p = 1, 3
    check_case(two(AT, "code 7x7 vs 5x5", 2, 3, 7, 7, 2, 5, 5, -1, 10), 1e-2f, 3e-4);
    check_case(two(AT, "paper 3x3 vs 5x5", 2, 2, 3, 3, 3, 5, 5, -1, 20), 1e-2f, 3e-4);
    struct fcase c = two(AT, "p=3 non-square 4x6 vs 3x4", 2, 2, 4, 6, 2, 3, 4, -1, 30);
    c.p = 3;
    check_case(c, 1e-2f, 3e-4);
    c = two(AT, "p=1 positive, paper", 2, 2, 4, 4, 3, 3, 3, 0.2f, 40);
    c.p = 1;
    c.form = KD_AT_PAPER;
    check_case(c, 1e-2f, 3e-4);
    if (!q) check_case(two(AT, "flat", 3, 5, 1, 1, 4, 1, 1, -1, 50), 1e-2f, 3e-4);
    // SP: different c, h, w; flat
    check_case(two(SP, "4x5x5 vs 3x3x3", 3, 4, 5, 5, 3, 3, 3, -1, 60), 1e-2f, 3e-4);
    check_case(two(SP, "flat", 4, 6, 1, 1, 5, 1, 1, -1, 70), 1e-2f, 3e-4);
    // NST: pooling, channel counts differ
    check_case(two(NST, "3x5x5 vs 4x3x3", 2, 3, 5, 5, 4, 3, 3, -1, 80), 1e-2f, 1e-3);
    if (!q) check_case(two(NST, "2x4x4 vs 2x4x4", 2, 2, 4, 4, 2, 4, 4, 0, 90), 1e-2f, 1e-3);
    // RKD: both terms, then each alone
    check_case(two(RKD, "d 5 vs 7", 5, 5, 1, 1, 7, 1, 1, -1, 100), 2e-3f, 3e-4);
    c = two(RKD, "angle only, maps", 4, 2, 2, 2, 3, 1, 2, -1, 110);
    c.wd = 0;
    c.wa = 1;
    check_case(c, 2e-3f, 3e-4);
    c = two(RKD, "distance only", 4, 3, 1, 1, 3, 1, 1, -1, 120);
    c.wd = 1;
    c.wa = 0;
    check_case(c, 2e-3f, 3e-4);
    // PKT
    check_case(two(PKT, "d 5 vs 4", 4, 5, 1, 1, 4, 1, 1, -1, 130), 1e-2f, 3e-4);
    check_case(two(PKT, "maps", 3, 2, 2, 2, 3, 2, 1, -1, 140), 1e-2f, 3e-4);
    // FSP: the first map larger (student), the second larger (teacher)
    struct fcase f = { .m = FSP, .nmaps = 4, .what = "pooled" };
    f.f[0] = fmap(rnd(2 * 2 * 5 * 5, 150, -1, 1), 2, 2, 5, 5);
    f.f[1] = fmap(rnd(2 * 3 * 3 * 3, 151, -1, 1), 2, 3, 3, 3);
    f.f[2] = fmap(rnd(2 * 2 * 2 * 2, 152, -1, 1), 2, 2, 2, 2);
    f.f[3] = fmap(rnd(2 * 3 * 4 * 4, 153, -1, 1), 2, 3, 4, 4);
    check_case(f, 1e-2f, 3e-4);
}

// Deterministic mode: bitwise equal at 1, 2 and 3 threads (on OpenMP builds). Sizes above
// the threshold under which the per-sample losses run on one thread (2^16 operations).
static void test_threads(void) {
#ifdef _OPENMP
    const int n = 8, m = 40;
    struct fcase cs[6] = {
        two(AT, "threads", n, 32, 16, 16, 12, 5, 5, -1, 200), two(SP, "threads", n, 6, 7, 7, 5, 5, 5, -1, 210),
        two(NST, "threads", n, 32, 16, 16, 12, 5, 5, -1, 220), two(RKD, "threads", m, 48, 1, 1, 40, 1, 1, -1, 230),
        two(PKT, "threads", m, 48, 1, 1, 40, 1, 1, -1, 240),
        { .m = FSP, .nmaps = 4, .what = "threads" },
    };
    cs[5].f[0] = fmap(rnd((size_t)n * 16 * 12 * 12, 250, -1, 1), n, 16, 12, 12);
    cs[5].f[1] = fmap(rnd((size_t)n * 12 * 6 * 6, 251, -1, 1), n, 12, 6, 6);
    cs[5].f[2] = fmap(rnd((size_t)n * 16 * 8 * 8, 252, -1, 1), n, 16, 8, 8);
    cs[5].f[3] = fmap(rnd((size_t)n * 12 * 8 * 8, 253, -1, 1), n, 12, 8, 8);
    const int before = omp_get_max_threads();
    kd_set_deterministic(true);
    for (int i = 0; i < 6; i++) {
        struct fcase * c = &cs[i];
        float * ref[4] = { NULL, NULL, NULL, NULL }, lref = 0;
        for (int t = 1; t <= 3; t++) {
            omp_set_num_threads(t);
            float * g[4] = { NULL, NULL, NULL, NULL }, l;
            for (int k = 0; k < c->nmaps; k++) g[k] = calloc(fsize(c->f[k]), sizeof(float));
            CHECK(run(c, &l, g, 1.0f, false) == KD_OK, "%s threads: %s", method_name[c->m], kd_last_error());
            if (t == 1) {
                lref = l;
                memcpy(ref, g, sizeof ref);
                continue;
            }
            bool same = l == lref;
            for (int k = 0; k < c->nmaps; k++) same = same && memcmp(g[k], ref[k], fsize(c->f[k]) * sizeof(float)) == 0;
            CHECK(same, "%s: %d threads differ from 1 in deterministic mode", method_name[c->m], t);
            for (int k = 0; k < 4; k++) free(g[k]);
        }
        for (int k = 0; k < 4; k++) free(ref[k]);
        release(c);
    }
    kd_set_deterministic(false);
    omp_set_num_threads(before);
#endif
}

// kd_loss_feat_scratch() against the formulas in kdcore.h (each piece rounded up to 64).
static size_t r64(size_t b) { return (b + 63) & ~(size_t)63; }
static size_t lw(int a, int k, int b) { return kd_linear_workspace(a, k, b); }
static size_t zmax(size_t a, size_t b) { return a > b ? a : b; }

// T, the threads a per-sample loss uses: 1 under 2^16 operations of work, else min(threads, n).
static size_t threads_for(int n, double work) {
    int t = kd_get_num_threads();
    return work < 65536 ? 1 : (size_t)(t < n ? t : n);
}

static void scratch_case(int n, int Cs, int Hs, int Ct, int Ht) {
    const size_t Ms_ = (size_t)Hs * Hs, Mt_ = (size_t)Ht * Ht, M = Ms_ < Mt_ ? Ms_ : Mt_;
    const size_t Ds = (size_t)Cs * Ms_, Dt = (size_t)Ct * Mt_, Dm = zmax(Ds, Dt), nn = (size_t)n * n;
    const size_t cm = (size_t)(Cs > Ct ? Cs : Ct);
    float * s = rnd(n * Ds, 300, -1, 1), * t = rnd(n * Dt, 301, -1, 1);
    float * ds = calloc(n * Ds, sizeof(float)), * dt = calloc(n * Dt, sizeof(float));
    struct kd_fmap fs = fmap(s, n, Cs, Hs, Hs), ft = fmap(t, n, Ct, Ht, Ht);
    float loss;

    const size_t tab = r64(16 * 2 * (size_t)Ht + 8 * 2 * (size_t)Hs);   // s is pooled (Hs > Ht)
    size_t T = threads_for(n, (double)n * (Ds + Dt));
    kd_loss_at(&loss, ds, dt, fs, ft, 2, KD_AT_CODE, 1, false);
    size_t want = r64(8 * n) + r64(8 * T * Cs * M) + r64(8 * T * Ct * M) + r64(8 * T * cm * M) + r64(8 * T * 3 * M) + tab;
    CHECK(kd_loss_feat_scratch() == want, "AT scratch %zu, formula %zu (T = %zu)", kd_loss_feat_scratch(), want, T);

    kd_loss_sp(&loss, ds, dt, fs, ft, 1, false);
    want = 3 * r64(4 * nn) + 2 * r64(8 * nn) + r64(16 * n) + r64(4 * lw(n, (int)Dm, n));
    CHECK(kd_loss_feat_scratch() == want, "SP scratch %zu, formula %zu", kd_loss_feat_scratch(), want);

    T = threads_for(n, (double)n * (Cs + Ct) * (Cs + Ct) * M);
    kd_loss_nst(&loss, ds, dt, fs, ft, 1, false);
    size_t L = zmax(lw(Cs, (int)M, Cs), zmax(lw(Cs, (int)M, Ct), lw(Ct, (int)M, Ct)));
    want = r64(8 * n) + r64(8 * T * (Cs + Ct) * M) + r64(4 * T * (Cs + Ct) * M) + r64(8 * T * (Cs + Ct)) +
           r64(4 * T * (Cs * Cs + Ct * Ct + Cs * Ct)) + r64(8 * T * (Cs + Ct) * M) + r64(8 * T * cm * M) + r64(4 * T * L) + tab;
    CHECK(kd_loss_feat_scratch() == want, "NST scratch %zu, formula %zu (T = %zu)", kd_loss_feat_scratch(), want, T);
    kd_loss_nst(&loss, NULL, NULL, fs, ft, 1, false);   // no gradient: no gradient buffers
    want -= r64(8 * T * (Cs + Ct) * M) + r64(8 * T * cm * M);
    CHECK(kd_loss_feat_scratch() == want, "NST (loss only) scratch %zu, formula %zu", kd_loss_feat_scratch(), want);

    kd_loss_rkd(&loss, ds, dt, fs, ft, 25, 50, NULL, 1, false);
    want = r64(32 * nn) + r64(16 * nn) + r64(8 * n) + r64(8 * (size_t)kd_get_num_threads() * Dm);
    CHECK(kd_loss_feat_scratch() == want, "RKD scratch %zu, formula %zu", kd_loss_feat_scratch(), want);

    kd_loss_pkt(&loss, ds, dt, fs, ft, 1, false);
    want = r64(4 * n * Ds) + r64(4 * n * Dt) + r64(12 * nn) + r64(24 * nn) + r64(32 * n) + r64(4 * n * Dm) +
           r64(4 * lw(n, (int)Dm, n));
    CHECK(kd_loss_feat_scratch() == want, "PKT scratch %zu, formula %zu", kd_loss_feat_scratch(), want);

    // FSP with s1 = s, s2 = t, t1 = (a prefix of) s at t's size, t2 = t: Ms = Mt = M
    const int C1 = Cs, C2 = Ct;
    T = threads_for(n, (double)n * C1 * C2 * 2 * M + (double)n * (Ds + Dt));
    kd_loss_fsp(&loss, ds, dt, NULL, NULL, fs, ft, fmap(s, n, Cs, Ht, Ht), ft, 1, false);
    L = lw(C1, (int)M, C2);
    want = r64(8 * n) + r64(4 * T * (C1 + C2) * 2 * M) + r64(12 * T * C1 * C2) + r64(4 * T * (C1 + C2) * M) +
           r64(8 * T * cm * M) + r64(4 * T * L) + tab;
    CHECK(kd_loss_feat_scratch() == want, "FSP scratch %zu, formula %zu (T = %zu)", kd_loss_feat_scratch(), want, T);
    free(s); free(t); free(ds); free(dt);
}

static void test_scratch(void) {
    scratch_case(5, 6, 7, 4, 5);      // small: one thread
    scratch_case(6, 16, 16, 12, 12);  // above the threshold: min(threads, n)
}

static void expect_fail(enum kd_status st, enum kd_status want, const char * needle, const char * what) {
    CHECK(st == want && strstr(kd_last_error(), needle) != NULL, "%s: status %d (want %d), message '%s' lacks '%s'",
          what, (int)st, (int)want, kd_last_error(), needle);
}

static void test_errors(void) {
    float x[2 * 3 * 4 * 4] = { 0 }, l;
    struct kd_fmap s = fmap(x, 2, 3, 4, 4), t = fmap(x, 2, 3, 4, 4);
    struct kd_fmap t1 = fmap(x, 1, 3, 4, 4), bad = fmap(NULL, 2, 3, 4, 4), zero_h = fmap(x, 2, 3, 0, 4);
    expect_fail(kd_loss_at(&l, NULL, NULL, bad, t, 2, KD_AT_CODE, 1, false), KD_ERR_VALUE, "kd_loss_at: s.x is NULL", "NULL s");
    expect_fail(kd_loss_sp(&l, NULL, NULL, s, t1, 1, false), KD_ERR_SHAPE, "kd_loss_sp: t.n (1) must equal s.n (2)", "n");
    expect_fail(kd_loss_nst(&l, NULL, NULL, s, zero_h, 1, false), KD_ERR_SHAPE, "kd_loss_nst: t has shape (n=2, c=3, h=0, w=4)",
                "h = 0");
    expect_fail(kd_loss_at(&l, NULL, NULL, s, t, 0.5f, KD_AT_CODE, 1, false), KD_ERR_VALUE, "p (0.5) must be finite and >= 1", "p");
    expect_fail(kd_loss_at(&l, NULL, NULL, s, t, 2, (enum kd_at_form)3, 1, false), KD_ERR_VALUE, "form (3)", "form");
    expect_fail(kd_loss_rkd(&l, NULL, NULL, s, t, NAN, 50, NULL, 1, false), KD_ERR_VALUE, "w_dist (nan)", "w_dist");
    expect_fail(kd_loss_pkt(&l, NULL, NULL, s, t, INFINITY, false), KD_ERR_VALUE, "weight (inf) must be finite", "weight");
    expect_fail(kd_loss_fsp(&l, NULL, NULL, NULL, NULL, s, s, fmap(x, 2, 2, 4, 4), s, 1, false), KD_ERR_SHAPE,
                "t1.c (2) must equal s1.c (3)", "FSP channels");
    expect_fail(kd_loss_fsp(&l, NULL, NULL, NULL, NULL, s, s, s, t1, 1, false), KD_ERR_SHAPE, "t2.n (1) must equal s1.n (2)",
                "FSP n");
    struct kd_fmap huge = fmap(x, 1, 65536, 65536, 1);
    expect_fail(kd_loss_sp(&l, NULL, NULL, huge, huge, 1, false), KD_ERR_SHAPE, "c*h*w = 65536*65536*1 is above", "c*h*w");
    // a non-finite loss: SP's Gram matrix of values ~1e20 overflows in float
    float big[2 * 4];
    for (int i = 0; i < 8; i++) big[i] = 1e20f * (float)(i + 1);
    struct kd_fmap b = fmap(big, 2, 4, 1, 1);
    float g[8];
    expect_fail(kd_loss_sp(&l, g, NULL, b, b, 1, false), KD_ERR_NONFINITE, "SP loss is not finite", "SP overflow");
}

// n = 1 and all-zero inputs: the documented values (0) with finite, zero gradients.
static void test_degenerate(void) {
    float s[6] = { 0.5f, -1, 2, 0.25f, 3, -2 }, t[6] = { 1, 2, 3, 4, 5, 6 }, z[6] = { 0 };
    float ds[6], dt[6], loss, parts[2] = { -1, -1 };
    struct kd_fmap fs = fmap(s, 1, 6, 1, 1), ft = fmap(t, 1, 6, 1, 1);
    CHECK(kd_loss_rkd(&loss, ds, dt, fs, ft, 25, 50, parts, 1, false) == KD_OK && loss == 0 && parts[0] == 0 && parts[1] == 0,
          "RKD n = 1 should be 0");
    bool zero = true;
    for (int i = 0; i < 6; i++) zero = zero && ds[i] == 0 && dt[i] == 0;
    CHECK(zero, "RKD n = 1 gradients should be 0");
    CHECK(kd_loss_pkt(&loss, ds, dt, fs, ft, 1, false) == KD_OK && loss == 0, "PKT n = 1 should be 0");
    CHECK(kd_loss_sp(&loss, ds, dt, fs, ft, 1, false) == KD_OK && loss == 0, "SP n = 1 should be 0");
    struct kd_fmap zs = fmap(z, 2, 3, 1, 1), zt = fmap(z, 2, 3, 1, 1);
    enum kd_status st[5] = {
        kd_loss_at(&loss, ds, dt, zs, zt, 2, KD_AT_PAPER, 1, false), kd_loss_sp(&loss, ds, dt, zs, zt, 1, false),
        kd_loss_nst(&loss, ds, dt, zs, zt, 1, false), kd_loss_rkd(&loss, ds, dt, zs, zt, 25, 50, NULL, 1, false),
        kd_loss_pkt(&loss, ds, dt, zs, zt, 1, false),
    };
    for (int i = 0; i < 5; i++) CHECK(st[i] == KD_OK, "zero maps, method %d: %s", i, kd_last_error());
}

// DeepInversion's losses (BN statistics, TV in both forms, the l2 prior, ADI's competition
// term): every gradient against Richardson-extrapolated central differences, weight and
// accumulate, and the refusals of maps too small for them.
enum di_kind { DI_BNSTAT, DI_TV_L2, DI_TV_L1, DI_L2PRIOR, DI_ADI_T, DI_ADI_S };
struct di_case { enum di_kind k; struct kd_fmap x; float * other; const float * rm, * rv; };

static enum kd_status di_run(const struct di_case * c, float * loss, float * g, float weight, bool acc) {
    const size_t n = fsize(c->x);
    switch (c->k) {
    case DI_BNSTAT: return kd_loss_bnstat(loss, g, c->x, c->rm, c->rv, weight, acc);
    case DI_TV_L2: return kd_loss_tv(loss, g, c->x, false, weight, acc);
    case DI_TV_L1: return kd_loss_tv(loss, g, c->x, true, weight, acc);
    case DI_L2PRIOR: return kd_loss_l2prior(loss, g, c->x.x, n, weight, acc);
    case DI_ADI_T: return kd_loss_adi(loss, g, NULL, c->x.x, c->other, c->x.n, c->x.c, 1.5f, weight, acc);
    case DI_ADI_S: return kd_loss_adi(loss, NULL, g, c->other, c->x.x, c->x.n, c->x.c, 1.5f, weight, acc);
    }
    return KD_ERR_VALUE;
}

static double di_loss(const struct di_case * c) {
    float l = NAN;
    enum kd_status st = di_run(c, &l, NULL, 1.0f, false);
    if (st != KD_OK) printf("  deepinversion %d: %s\n", (int)c->k, kd_last_error());
    return l;
}

static void di_gradcheck(struct di_case * c, float h, double rtol) {
    const size_t n = fsize(c->x);
    float * x = (float *)(uintptr_t)c->x.x, * g = calloc(n, sizeof(float)), * fd = calloc(n, sizeof(float));
    float * acc = malloc(n * sizeof(float));
    float loss, loss2;
    CHECK(di_run(c, &loss, g, 1.0f, false) == KD_OK, "deepinversion %d: %s", (int)c->k, kd_last_error());
    double scale = 0;
    for (size_t e = 0; e < n; e++) {
        double d[2];
        for (int r = 0; r < 2; r++) {
            const float hr = r ? h / 2 : h, x0 = x[e], xp = x0 + hr, xm = x0 - hr;
            x[e] = xp;
            const double lp = di_loss(c);
            x[e] = xm;
            const double lm = di_loss(c);
            x[e] = x0;
            d[r] = (lp - lm) / ((double)xp - (double)xm);
        }
        fd[e] = (float)((4 * d[1] - d[0]) / 3);
        scale = fmax(scale, fabs(fd[e]));
    }
    char name[96];
    snprintf(name, sizeof name, "deepinversion loss %d: gradient", (int)c->k);
    check_close(name, g, fd, n, rtol * fmax(scale, 1e-6), rtol);
    for (size_t e = 0; e < n; e++) acc[e] = 1.0f;
    CHECK(di_run(c, &loss2, acc, 2.5f, true) == KD_OK && loss2 == loss, "deepinversion %d: weight changed the loss",
          (int)c->k);
    for (size_t e = 0; e < n; e++) fd[e] = 1.0f + 2.5f * g[e];
    snprintf(name, sizeof name, "deepinversion loss %d: accumulate weight 2.5", (int)c->k);
    check_close(name, acc, fd, n, 1e-5 * fmax(scale, 1.0), 1e-5);
    free(g); free(fd); free(acc);
}

static void test_deepinversion_losses(void) {
    const int n = 3, ch = 2, hh = 4, ww = 5;
    float * x = rnd((size_t)n * ch * hh * ww, 91, -1.5f, 1.5f);
    // on a grid of 0.1: every nonzero neighbour difference is >= 0.1, so no central difference
    // of step <= 0.01 crosses the l1 form's kink (a zero difference gives 0 on both sides)
    for (int e = 0; e < n * ch * hh * ww; e++) x[e] = roundf(x[e] * 10) / 10;
    const float rm[2] = { 0.2f, -0.4f }, rv[2] = { 0.0f, 1.3f };   // a channel with zero running variance
    struct kd_fmap f = fmap(x, n, ch, hh, ww);
    const enum di_kind maps[4] = { DI_BNSTAT, DI_TV_L2, DI_TV_L1, DI_L2PRIOR };
    for (int k = 0; k < 4; k++) {
        struct di_case c = { .k = maps[k], .x = f, .rm = rm, .rv = rv };
        di_gradcheck(&c, 1e-2f, 2e-3);
    }
    float * t = rnd(6 * 4, 92, -1.5f, 1.5f), * s = rnd(6 * 4, 93, -1.5f, 1.5f);
    struct di_case ct = { .k = DI_ADI_T, .x = fmap(t, 6, 4, 1, 1), .other = s };
    struct di_case cs = { .k = DI_ADI_S, .x = fmap(s, 6, 4, 1, 1), .other = t };
    di_gradcheck(&ct, 1e-2f, 2e-3);
    di_gradcheck(&cs, 1e-2f, 2e-3);
    float loss, one[3] = { 1, 2, 3 }, g[3];
    CHECK(kd_loss_bnstat(&loss, g, fmap(one, 1, 2, 1, 1), rm, rv, 1, false) == KD_ERR_SHAPE,
          "bnstat: one value per channel must be refused");
    CHECK(kd_loss_tv(&loss, g, fmap(one, 1, 1, 1, 3), false, 1, false) == KD_ERR_SHAPE, "tv: h = 1 must be refused");
    free(x); free(t); free(s);
}

int main(void) {
    KDT_RUN(test_deepinversion_losses);
    KDT_RUN(test_gradcheck_all);
    kd_linear_force_engine(2);   // the same checks with OpenBLAS running the products
    KDT_RUN(test_gradcheck_all);
    kd_linear_force_engine(0);
    KDT_RUN(test_threads);
    KDT_RUN(test_scratch);
    KDT_RUN(test_errors);
    KDT_RUN(test_degenerate);
    return kdt_finish();
}
