// Logit losses (kdcore.h, "Losses"): every gradient against finite differences, in C, next to
// the PyTorch comparisons of the Python suite -- CE (label smoothing, sample weights), KD (both
// sides, sample weights), soft targets, DKD, DIST, NormKD, WTTM, CTKD (logits and temperature; the
// instance-wise form with a temperature per row, and its agreement with the global form),
// MSE, the tolerant term, DAFL's entropy and activation, ADI (both sides), the L1 logit loss
// (DFAD's discrepancy; both sides), MLKD (its masks come from the teacher), BCE with logits
// (adversarial KD's discriminator loss). Hard cases: one sample, two classes, large logits, small
// and large temperatures. Then weight and accumulate semantics for each loss, and the L1
// loss's subgradient at a tie, its errors and a non-finite input. Sizes are tiny: this runs
// under valgrind (`make valgrind`).
//
// Finite differences as in test_feature_losses.c: the loss is a float, so each derivative is a
// Richardson extrapolation of two central differences (steps h and h/2, the exact float steps),
// in double.
#include "kdtest.h"
#include "kdcore.h"

enum kind { CE, KD, SOFT, DKD, DIST, NORMKD, WTTM, CTKD, MSE, TOLERANT, ENTROPY, ACTIVATION, ADI, L1, MLKD, BCE,
            CTKD_ROWS };
static const char * const kind_name[] = { "CE", "KD", "soft", "DKD", "DIST", "NormKD", "WTTM", "CTKD", "MSE",
                                          "tolerant", "entropy", "activation", "ADI", "L1", "MLKD", "BCE",
                                          "CTKD rows" };

struct lcase {
    enum kind k;
    int N, V;
    float * s, * t;            // student logits (the input every loss differentiates), teacher logits
    float * q;                 // SOFT: target probabilities (rows sum to 1)
    int64_t * y;               // CE, DKD labels
    float * w;                 // CE, KD sample weights (or NULL)
    float * Tr;                // CTKD_ROWS: one temperature per row
    float T, a, b;             // temperature; per kind: CE eps; DKD alpha, beta; DIST beta, gamma; NormKD t_norm;
                               // WTTM gamma; tolerant K (a); BCE target (a)
    const char * what;
};

// Calls the loss; ds gets d(weight * loss)/ds, dt (when the kind has one: KD's teacher side,
// ADI's teacher side) d/dt, dT (CTKD) d/dT (CTKD_ROWS: N values, d/dT_i). Any of them may be NULL.
static enum kd_status run(const struct lcase * c, float * loss, float * ds, float * dt, float * dT, float weight,
                          bool acc) {
    const int N = c->N, V = c->V;
    switch (c->k) {
    case CE:       return kd_cross_entropy(loss, ds, c->s, c->y, c->w, N, V, c->a, weight, acc);
    case KD:       return kd_loss_kd(loss, ds, dt, c->s, c->t, c->w, N, V, c->T, weight, acc);
    case SOFT:     return kd_loss_soft(loss, ds, c->s, c->q, NULL, N, V, c->T, weight, acc);
    case DKD: {
        float tckd, nckd;
        enum kd_status st = kd_loss_dkd(&tckd, &nckd, ds, c->s, c->t, c->y, N, V, c->T, c->a, c->b, weight, acc);
        *loss = c->a * tckd + c->b * nckd;
        return st;
    }
    case DIST: {
        float inter, intra;
        enum kd_status st = kd_loss_dist(&inter, &intra, ds, c->s, c->t, N, V, c->T, c->a, c->b, weight, acc);
        *loss = c->T * c->T * (c->a * inter + c->b * intra);
        return st;
    }
    case NORMKD:   return kd_loss_normkd(loss, ds, c->s, c->t, N, V, c->a, false, weight, acc);
    case WTTM:     return kd_loss_wttm(loss, ds, c->s, c->t, N, V, c->a, weight, acc);
    case CTKD:     return kd_loss_ctkd(loss, ds, dT, c->s, c->t, N, V, c->T, weight, acc);
    case MSE:      return kd_loss_mse(loss, ds, c->s, c->t, N, V, weight, acc);
    case TOLERANT: return kd_loss_tolerant(loss, ds, c->s, N, V, (int)c->a, weight, acc);
    case ENTROPY:  return kd_loss_entropy(loss, ds, c->s, N, V, weight, acc);
    case ACTIVATION: return kd_loss_activation(loss, ds, c->s, (size_t)N * V, weight, acc);
    case ADI:      return kd_loss_adi(loss, dt, ds, c->t, c->s, N, V, c->T, weight, acc);
    case L1:       return kd_loss_l1(loss, ds, dt, c->s, c->t, N, V, weight, acc);
    case MLKD: {
        static const float temps[] = { 4, 3, 5, 2, 6 };   // the authors' temperatures
        return kd_loss_mlkd(loss, NULL, ds, c->s, c->t, N, V, temps, 5, c->a, weight, acc);
    }
    case BCE:      return kd_loss_bce(loss, ds, c->s, c->a, N, V, weight, acc);
    case CTKD_ROWS: return kd_loss_ctkd_rows(loss, ds, dT, c->s, c->t, N, V, c->Tr, weight, acc);
    }
    return KD_ERR_VALUE;
}

static int has_dt(enum kind k) { return k == KD || k == ADI || k == L1; }
static int has_T(enum kind k) { return k == CTKD || k == CTKD_ROWS; }
// How many temperature derivatives the kind gives (one, or one per row).
static int n_T(const struct lcase * c) { return c->k == CTKD ? 1 : c->k == CTKD_ROWS ? c->N : 0; }

static double loss_of(const struct lcase * c) {
    float l = NAN;
    if (run(c, &l, NULL, NULL, NULL, 1.0f, false) != KD_OK) printf("  %s %s: %s\n", kind_name[c->k], c->what, kd_last_error());
    return l;
}

// Central difference of the loss in x[e] (x is c->s, c->t or &c->T), exact float steps.
static double central(struct lcase * c, float * x, size_t e, float h) {
    float x0 = x[e], xp = x0 + h, xm = x0 - h;
    x[e] = xp;
    double lp = loss_of(c);
    x[e] = xm;
    double lm = loss_of(c);
    x[e] = x0;
    return (lp - lm) / ((double)xp - (double)xm);
}

static void fd_check(struct lcase * c, const char * side, float * x, const float * g, size_t n, float h, double rtol) {
    float * fd = calloc(n, sizeof(float));
    double scale = 0;
    for (size_t e = 0; e < n; e++) {
        double d1 = central(c, x, e, h), d2 = central(c, x, e, h / 2);
        fd[e] = (float)((4 * d2 - d1) / 3);
        scale = fmax(scale, fabs(fd[e]));
    }
    char name[160];
    snprintf(name, sizeof name, "%s %s: d/d%s", kind_name[c->k], c->what, side);
    check_close(name, g, fd, n, rtol * fmax(scale, 1e-6), rtol);
    free(fd);
}

static void gradcheck(struct lcase * c, float h, double rtol) {
    size_t n = (size_t)c->N * c->V;
    float * ds = calloc(n, sizeof(float)), * dt = calloc(n, sizeof(float)), * dT = calloc((size_t)c->N, sizeof(float)),
          loss;
    enum kd_status st = run(c, &loss, ds, has_dt(c->k) ? dt : NULL, has_T(c->k) ? dT : NULL, 1.0f, false);
    CHECK(st == KD_OK && isfinite(loss), "%s %s: %s (loss %g)", kind_name[c->k], c->what,
          st == KD_OK ? "ok" : kd_last_error(), loss);
    fd_check(c, "s", c->s, ds, n, h, rtol);
    if (has_dt(c->k)) fd_check(c, "t", c->t, dt, n, h, rtol);
    if (c->k == CTKD) fd_check(c, "T", &c->T, dT, 1, h, rtol);
    if (c->k == CTKD_ROWS) fd_check(c, "T_i", c->Tr, dT, (size_t)c->N, h, rtol);
    free(ds);
    free(dt);
    free(dT);
}

// weight scales every gradient, accumulate adds it, the loss does not depend on either or on
// which gradients are asked for.
static void semantics(const struct lcase * c) {
    size_t n = (size_t)c->N * c->V;
    float * g = calloc(n, sizeof(float)), * gt = calloc(n, sizeof(float));
    float * h = malloc(n * sizeof(float)), * ht = malloc(n * sizeof(float)), * want = calloc(n, sizeof(float));
    kdt_fill(h, n, 91);
    kdt_fill(ht, n, 92);
    float * h0 = malloc(n * sizeof(float)), * ht0 = malloc(n * sizeof(float));
    memcpy(h0, h, n * sizeof(float));
    memcpy(ht0, ht, n * sizeof(float));
    float * gT = calloc((size_t)c->N, sizeof(float)), * hT = malloc((size_t)c->N * sizeof(float)), l1, l2, l3;
    for (int i = 0; i < c->N; i++) hT[i] = 0.25f + 0.5f * (float)i;
    run(c, &l1, g, has_dt(c->k) ? gt : NULL, has_T(c->k) ? gT : NULL, 1.0f, false);
    run(c, &l2, h, has_dt(c->k) ? ht : NULL, has_T(c->k) ? hT : NULL, 2.5f, true);
    double sc = 0;
    for (size_t e = 0; e < n; e++) { want[e] = h0[e] + 2.5f * g[e]; sc = fmax(sc, fabs(want[e])); }
    char name[160];
    snprintf(name, sizeof name, "%s %s: accumulate, weight 2.5 (s)", kind_name[c->k], c->what);
    check_close(name, h, want, n, 1e-5 * sc, 1e-5);
    if (has_dt(c->k)) {
        sc = 0;
        for (size_t e = 0; e < n; e++) { want[e] = ht0[e] + 2.5f * gt[e]; sc = fmax(sc, fabs(want[e])); }
        snprintf(name, sizeof name, "%s %s: accumulate, weight 2.5 (t)", kind_name[c->k], c->what);
        check_close(name, ht, want, n, 1e-5 * sc, 1e-5);
    }
    for (int i = 0; i < n_T(c); i++) {
        const float want_T = 0.25f + 0.5f * (float)i + 2.5f * gT[i];
        CHECK(fabsf(hT[i] - want_T) <= 1e-5f * fmaxf(1.0f, fabsf(hT[i])), "%s %s: dT[%d] accumulate %g vs %g",
              kind_name[c->k], c->what, i, hT[i], want_T);
    }
    CHECK(l1 == l2, "%s %s: the loss depends on weight/accumulate (%g vs %g)", kind_name[c->k], c->what, l1, l2);
    memset(h, 0, n * sizeof(float));
    run(c, &l3, h, NULL, NULL, 1.0f, false);
    CHECK(l3 == l1 && memcmp(h, g, n * sizeof(float)) == 0, "%s %s: ds alone differs from ds with the others",
          kind_name[c->k], c->what);
    free(g); free(gt); free(h); free(ht); free(want); free(h0); free(ht0); free(gT); free(hT);
}

// Logits in [-amp, amp], deterministic.
static float * logits(int N, int V, uint64_t seed, float amp) {
    float * x = malloc((size_t)N * V * sizeof(float));
    kdt_fill(x, (size_t)N * V, seed);
    for (size_t i = 0; i < (size_t)N * V; i++) x[i] *= amp;
    return x;
}

static struct lcase mk(enum kind k, const char * what, int N, int V, float amp, float T, uint64_t seed) {
    struct lcase c = { .k = k, .N = N, .V = V, .T = T, .what = what };
    c.s = logits(N, V, seed, amp);
    c.t = logits(N, V, seed + 1, amp);
    c.y = malloc((size_t)N * sizeof(int64_t));
    for (int i = 0; i < N; i++) c.y[i] = (int64_t)((seed + 7 * (uint64_t)i) % (uint64_t)V);
    return c;
}

static void release(struct lcase * c) {
    free(c->s); free(c->t); free(c->q); free(c->y); free(c->w); free(c->Tr);
}

static void check_case(struct lcase c, float h, double rtol) {
    gradcheck(&c, h, rtol);
    semantics(&c);
    release(&c);
}

static float * sample_weights(int N) {
    float * w = malloc((size_t)N * sizeof(float));
    for (int i = 0; i < N; i++) w[i] = 0.25f + 0.5f * (float)i;
    return w;
}

static void test_gradcheck_all(void) {
    const int q = kdt_quick();
    struct lcase c;
    // CE: plain, label smoothing with sample weights, one sample of two classes, large logits
    check_case(mk(CE, "plain", 3, 5, 2, 1, 1), 1e-2f, 3e-4);
    c = mk(CE, "smoothing 0.1, sample weights", 4, 6, 2, 1, 2);
    c.a = 0.1f;
    c.w = sample_weights(4);
    check_case(c, 1e-2f, 3e-4);
    check_case(mk(CE, "N=1 V=2", 1, 2, 1, 1, 3), 1e-2f, 3e-4);
    check_case(mk(CE, "logits +-30", 2, 4, 30, 1, 4), 1e-2f, 1e-3);
    // KD: T = 4 with sample weights; T = 1; small T on large logits; T = 20; N=1 V=2
    c = mk(KD, "T=4, sample weights", 3, 5, 3, 4, 10);
    c.w = sample_weights(3);
    check_case(c, 1e-2f, 3e-4);
    check_case(mk(KD, "T=1", 2, 7, 2, 1, 11), 1e-2f, 3e-4);
    check_case(mk(KD, "T=0.5, logits +-20", 2, 4, 20, 0.5f, 12), 1e-2f, 1e-3);
    if (!q) check_case(mk(KD, "T=20", 3, 5, 5, 20, 13), 1e-1f, 1e-3);
    check_case(mk(KD, "N=1 V=2", 1, 2, 2, 4, 14), 1e-2f, 3e-4);
    // soft targets: rows of q from a softmax
    c = mk(SOFT, "T=4", 3, 5, 3, 4, 20);
    c.q = malloc(15 * sizeof(float));
    kd_softmax_t(c.q, c.t, 3, 5, 2.0f);
    check_case(c, 1e-2f, 3e-4);
    // DKD: alpha 1, beta 8 (mdistiller); a second with large logits
    c = mk(DKD, "T=4 a=1 b=8", 4, 6, 3, 4, 30);
    c.a = 1; c.b = 8;
    check_case(c, 1e-2f, 3e-4);
    c = mk(DKD, "T=1 a=0.5 b=2, logits +-15", 3, 5, 15, 1, 31);
    c.a = 0.5f; c.b = 2;
    check_case(c, 1e-2f, 1e-3);
    // DIST: beta = gamma = 1 at T = 1 (the authors' CIFAR setting); T = 4 with unequal weights
    c = mk(DIST, "T=1 b=1 g=1", 4, 5, 2, 1, 40);
    c.a = 1; c.b = 1;
    check_case(c, 1e-2f, 1e-3);
    c = mk(DIST, "T=4 b=2 g=0.5", 5, 3, 3, 4, 41);
    c.a = 2; c.b = 0.5f;
    check_case(c, 1e-2f, 1e-3);
    // NormKD: the gradient through the student's std; t_norm 2 (the authors') and 1
    c = mk(NORMKD, "t_norm 2", 3, 6, 3, 1, 50);
    c.a = 2;
    check_case(c, 1e-2f, 1e-3);
    c = mk(NORMKD, "t_norm 1, N=1 V=2", 1, 2, 2, 1, 51);
    c.a = 1;
    check_case(c, 1e-2f, 1e-3);
    // WTTM: gamma 0.2 (the authors' CIFAR value) and 1 (plain KD at T = 1 times U = 1)
    c = mk(WTTM, "gamma 0.2", 3, 6, 3, 1, 60);
    c.a = 0.2f;
    check_case(c, 1e-2f, 3e-4);
    c = mk(WTTM, "gamma 1, logits +-10", 2, 4, 10, 1, 61);
    c.a = 1;
    check_case(c, 1e-2f, 1e-3);
    // CTKD: gradients w.r.t. the logits and the temperature, at T = 1 and T = 9
    check_case(mk(CTKD, "T=1", 3, 5, 2, 1, 70), 1e-2f, 1e-3);
    check_case(mk(CTKD, "T=9", 2, 6, 4, 9, 71), 1e-2f, 1e-3);
    // CTKD, instance-wise: a temperature per row, from 0.7 to 12 (each row's own dT_i)
    c = mk(CTKD_ROWS, "T_i 0.7..12", 4, 5, 3, 1, 72);
    c.Tr = malloc(4 * sizeof(float));
    c.Tr[0] = 0.7f; c.Tr[1] = 2.5f; c.Tr[2] = 6.0f; c.Tr[3] = 12.0f;
    check_case(c, 1e-2f, 1e-3);
    c = mk(CTKD_ROWS, "N=1 V=2, T 3", 1, 2, 2, 1, 73);
    c.Tr = malloc(sizeof(float));
    c.Tr[0] = 3.0f;
    check_case(c, 1e-2f, 1e-3);
    // MSE, tolerant (top-3 of 6; the logits are distinct, away from ties), entropy, activation
    check_case(mk(MSE, "3x5", 3, 5, 2, 1, 80), 1e-2f, 3e-4);
    c = mk(TOLERANT, "K=3", 2, 6, 2, 1, 82);
    c.a = 3;
    check_case(c, 1e-2f, 3e-4);
    check_case(mk(ENTROPY, "4x5", 4, 5, 2, 1, 82), 1e-2f, 3e-4);
    check_case(mk(ACTIVATION, "4x5 away from 0", 4, 5, 2, 1, 83), 1e-2f, 3e-4);
    // ADI: probabilities inside the clamps [0.01, 0.99] (small logits), T = 3 (the authors')
    check_case(mk(ADI, "T=3", 3, 4, 2, 3, 90), 1e-2f, 1e-3);
    // L1: |s - t| is piecewise linear; the inputs keep every |s - t| above the step (checked below)
    check_case(mk(L1, "3x5", 3, 5, 2, 1, 100), 1e-2f, 3e-4);
    // MLKD: percentile 50 (the authors') and 100 (every sample and class kept)
    c = mk(MLKD, "percentile 50", 6, 5, 3, 1, 110);
    c.a = 50;
    check_case(c, 1e-2f, 1e-3);
    c = mk(MLKD, "percentile 100, N=2 V=3", 2, 3, 2, 1, 111);
    c.a = 100;
    check_case(c, 1e-2f, 1e-3);
    // BCE with logits: a discriminator's single logit against 1 and 0, a soft target, and
    // logits of +-12 (the stable form's far tails)
    c = mk(BCE, "target 1, 6x1", 6, 1, 3, 1, 120);
    c.a = 1;
    check_case(c, 1e-2f, 3e-4);
    c = mk(BCE, "target 0, 6x1", 6, 1, 3, 1, 121);
    c.a = 0;
    check_case(c, 1e-2f, 3e-4);
    c = mk(BCE, "target 0.3, 3x4", 3, 4, 2, 1, 122);
    c.a = 0.3f;
    check_case(c, 1e-2f, 3e-4);
    c = mk(BCE, "target 1, logits +-12", 4, 1, 12, 1, 123);
    c.a = 1;
    check_case(c, 1e-2f, 1e-3);
}

// Every row at the same T: the instance-wise form is the global one (value, logits' gradient,
// and the per-row dT summing to the global dT); a row's T <= 0 or a NULL T is refused.
static void test_ctkd_rows_global(void) {
    const int N = 3, V = 5;
    struct lcase c = mk(CTKD, "", N, V, 3, 4.0f, 74);
    float Tr[3] = { 4.0f, 4.0f, 4.0f }, dTr[3], dT, lg, lr;
    float * dg = calloc((size_t)N * V, sizeof(float)), * dr = calloc((size_t)N * V, sizeof(float));
    CHECK(kd_loss_ctkd(&lg, dg, &dT, c.s, c.t, N, V, 4.0f, 0.9f, false) == KD_OK, "ctkd: %s", kd_last_error());
    CHECK(kd_loss_ctkd_rows(&lr, dr, dTr, c.s, c.t, N, V, Tr, 0.9f, false) == KD_OK, "ctkd rows: %s", kd_last_error());
    CHECK(fabsf(lr - lg) <= 1e-6f * fabsf(lg), "ctkd rows at one T: loss %g vs %g", lr, lg);
    check_close("ctkd rows at one T: d/ds", dr, dg, (size_t)N * V, 1e-7, 1e-6);
    CHECK(fabsf(dTr[0] + dTr[1] + dTr[2] - dT) <= 1e-5f * fmaxf(1.0f, fabsf(dT)), "ctkd rows: sum dT_i %g vs dT %g",
          dTr[0] + dTr[1] + dTr[2], dT);
    Tr[1] = 0.0f;
    CHECK(kd_loss_ctkd_rows(&lr, dr, dTr, c.s, c.t, N, V, Tr, 1.0f, false) == KD_ERR_VALUE &&
              strstr(kd_last_error(), "T[1]"), "ctkd rows: T[1] = 0 accepted (%s)", kd_last_error());
    Tr[1] = NAN;
    CHECK(kd_loss_ctkd_rows(&lr, dr, dTr, c.s, c.t, N, V, Tr, 1.0f, false) == KD_ERR_VALUE, "ctkd rows: NaN T accepted");
    CHECK(kd_loss_ctkd_rows(&lr, dr, dTr, c.s, c.t, N, V, NULL, 1.0f, false) == KD_ERR_VALUE, "ctkd rows: NULL T accepted");
    free(dg); free(dr);
    release(&c);
}

// The activation loss has a kink at 0 and the tolerant term one at ties: the test inputs must
// stay further from them than the finite-difference step (1e-2), or the differences above
// straddle the kink.
static void test_inputs_away_from_kinks(void) {
    struct lcase c = mk(ACTIVATION, "", 4, 5, 2, 1, 83);
    float m = INFINITY;
    for (int i = 0; i < 20; i++) m = fminf(m, fabsf(c.s[i]));
    CHECK(m > 2e-2f, "activation input within the finite-difference step of 0 (%g)", m);
    release(&c);
    c = mk(TOLERANT, "", 2, 6, 2, 1, 82);
    for (int i = 0; i < 2; i++) {
        for (int a = 0; a < 6; a++) {
            for (int b = a + 1; b < 6; b++) {
                CHECK(fabsf(c.s[i * 6 + a] - c.s[i * 6 + b]) > 2e-2f, "tolerant: logits %d and %d of row %d tie", a, b, i);
            }
        }
    }
    release(&c);
    c = mk(L1, "", 3, 5, 2, 1, 100);
    float gap = INFINITY;
    for (int i = 0; i < 15; i++) gap = fminf(gap, fabsf(c.s[i] - c.t[i]));
    CHECK(gap > 2e-2f, "L1: |s - t| within the finite-difference step of its kink (%g)", gap);
    release(&c);
}

// The L1 loss at a tie (subgradient 0, as torch.sign), a reversed term's negative weight, errors.
enum { L1N = 3, L1V = 5 };

static void l1_fill(float * s, float * t) {
    kdt_fill(s, L1N * L1V, 11);
    kdt_fill(t, L1N * L1V, 12);
    for (int i = 0; i < L1N * L1V; i++)   // keep every difference away from 0 (a kink of |.|)
        if (fabsf(s[i] - t[i]) < 0.05f) s[i] = t[i] + (i % 2 ? 0.3f : -0.3f);
}
static void test_l1_semantics(void) {
    float s[L1N * L1V], t[L1N * L1V], g[L1N * L1V], acc[L1N * L1V], want[L1N * L1V], l1, l2, l3;
    l1_fill(s, t);
    s[4] = t[4];   // a tie: subgradient 0, as torch.sign
    kd_loss_l1(&l1, g, NULL, s, t, L1N, L1V, 1.0f, false);
    CHECK(g[4] == 0.0f, "l1: the gradient at a tie is %g, not 0", g[4]);
    for (int i = 0; i < L1N * L1V; i++) CHECK(fabsf(fabsf(g[i]) - (i == 4 ? 0.0f : 1.0f / (L1N * L1V))) < 1e-9f,
                                          "l1: |d/ds[%d]| = %g", i, g[i]);
    kdt_fill(acc, L1N * L1V, 5);
    for (int i = 0; i < L1N * L1V; i++) want[i] = acc[i] - 2.5f * g[i];
    kd_loss_l1(&l2, NULL, acc, s, t, L1N, L1V, 2.5f, true);   // teacher side, accumulated, weight 2.5
    check_close("l1 accumulate weight 2.5 (teacher)", acc, want, L1N * L1V, 1e-7, 1e-6);
    CHECK(l1 == l2, "l1: the loss depends on weight/accumulate (%g vs %g)", l1, l2);
    kd_loss_l1(&l3, NULL, NULL, s, t, L1N, L1V, -1.0f, false);
    CHECK(l3 == l1, "l1: the value is unweighted (%g vs %g)", l3, l1);
    // a negative weight (a reversed term) negates the gradient
    float gneg[L1N * L1V];
    kd_loss_l1(&l3, gneg, NULL, s, t, L1N, L1V, -1.0f, false);
    for (int i = 0; i < L1N * L1V; i++) CHECK(gneg[i] == -g[i], "l1: weight -1 gives %g, not %g", gneg[i], -g[i]);
}

static void test_l1_errors(void) {
    float s[L1N * L1V], t[L1N * L1V], l;
    l1_fill(s, t);
    CHECK(kd_loss_l1(&l, NULL, NULL, NULL, t, L1N, L1V, 1.0f, false) == KD_ERR_VALUE, "l1: NULL student accepted");
    CHECK(kd_loss_l1(&l, NULL, NULL, s, t, 0, L1V, 1.0f, false) == KD_ERR_VALUE, "l1: N = 0 accepted");
    CHECK(strstr(kd_last_error(), "non-empty") != NULL, "l1: message %s", kd_last_error());
    s[3] = INFINITY;
    CHECK(kd_loss_l1(&l, NULL, NULL, s, t, L1N, L1V, 1.0f, false) == KD_ERR_NONFINITE, "l1: an Inf logit gave a finite loss");
}

int main(void) {
    KDT_RUN(test_gradcheck_all);
    KDT_RUN(test_ctkd_rows_global);
    KDT_RUN(test_inputs_away_from_kinks);
    KDT_RUN(test_l1_semantics);
    KDT_RUN(test_l1_errors);
    return kdt_finish();
}
