// The L1 logit loss (kd_loss_l1, DFAD's discrepancy): finite-difference checks of both
// gradients (student and teacher logits) away from ties, the subgradient 0 at a tie, weight
// and accumulate semantics, NULL gradients, argument errors and a non-finite loss. Sizes are
// tiny: this runs under valgrind (`make valgrind`).
//
// Finite differences: |s - t| is piecewise linear, so a central difference whose step stays
// inside one piece is exact up to rounding; the inputs keep every |s - t| above 0.05 and the
// step is 1e-2, in double from the float loss.
#include "kdtest.h"
#include "kdcore.h"

enum { N = 3, V = 5 };

static double l1_of(const float * s, const float * t) {
    float l = NAN;
    enum kd_status st = kd_loss_l1(&l, NULL, NULL, s, t, N, V, 1.0f, false);
    if (st != KD_OK) printf("  %s\n", kd_last_error());
    return l;
}

static void fill(float * s, float * t) {
    kdt_fill(s, N * V, 11);
    kdt_fill(t, N * V, 12);
    for (int i = 0; i < N * V; i++)   // keep every difference away from 0 (a kink of |.|)
        if (fabsf(s[i] - t[i]) < 0.05f) s[i] = t[i] + (i % 2 ? 0.3f : -0.3f);
}

static void test_l1_gradcheck(void) {
    float s[N * V], t[N * V], ds[N * V], dt[N * V], fds[N * V], fdt[N * V], loss;
    fill(s, t);
    CHECK(kd_loss_l1(&loss, ds, dt, s, t, N, V, 1.0f, false) == KD_OK, "l1: %s", kd_last_error());
    double want = 0;
    for (int i = 0; i < N * V; i++) want += fabs((double)s[i] - t[i]);
    want /= N * V;
    CHECK(fabs(loss - want) <= 1e-6 * want, "l1 value %g, want %g", loss, want);
    const float h = 1e-2f;
    for (int k = 0; k < 2; k++) {
        float * x = k ? t : s, * fd = k ? fdt : fds;
        for (int i = 0; i < N * V; i++) {
            const float x0 = x[i], xp = x0 + h, xm = x0 - h;
            x[i] = xp;
            const double lp = l1_of(s, t);
            x[i] = xm;
            const double lm = l1_of(s, t);
            x[i] = x0;
            fd[i] = (float)((lp - lm) / ((double)xp - xm));
        }
    }
    check_close("l1 d/ds", ds, fds, N * V, 2e-5, 1e-3);
    check_close("l1 d/dt", dt, fdt, N * V, 2e-5, 1e-3);
}

static void test_l1_semantics(void) {
    float s[N * V], t[N * V], g[N * V], acc[N * V], want[N * V], l1, l2, l3;
    fill(s, t);
    s[4] = t[4];   // a tie: subgradient 0, as torch.sign
    kd_loss_l1(&l1, g, NULL, s, t, N, V, 1.0f, false);
    CHECK(g[4] == 0.0f, "l1: the gradient at a tie is %g, not 0", g[4]);
    for (int i = 0; i < N * V; i++) CHECK(fabsf(fabsf(g[i]) - (i == 4 ? 0.0f : 1.0f / (N * V))) < 1e-9f,
                                          "l1: |d/ds[%d]| = %g", i, g[i]);
    kdt_fill(acc, N * V, 5);
    for (int i = 0; i < N * V; i++) want[i] = acc[i] - 2.5f * g[i];
    kd_loss_l1(&l2, NULL, acc, s, t, N, V, 2.5f, true);   // teacher side, accumulated, weight 2.5
    check_close("l1 accumulate weight 2.5 (teacher)", acc, want, N * V, 1e-7, 1e-6);
    CHECK(l1 == l2, "l1: the loss depends on weight/accumulate (%g vs %g)", l1, l2);
    kd_loss_l1(&l3, NULL, NULL, s, t, N, V, -1.0f, false);
    CHECK(l3 == l1, "l1: the value is unweighted (%g vs %g)", l3, l1);
    // a negative weight (a reversed term) negates the gradient
    float gneg[N * V];
    kd_loss_l1(&l3, gneg, NULL, s, t, N, V, -1.0f, false);
    for (int i = 0; i < N * V; i++) CHECK(gneg[i] == -g[i], "l1: weight -1 gives %g, not %g", gneg[i], -g[i]);
}

static void test_l1_errors(void) {
    float s[N * V], t[N * V], l;
    fill(s, t);
    CHECK(kd_loss_l1(&l, NULL, NULL, NULL, t, N, V, 1.0f, false) == KD_ERR_VALUE, "l1: NULL student accepted");
    CHECK(kd_loss_l1(&l, NULL, NULL, s, t, 0, V, 1.0f, false) == KD_ERR_VALUE, "l1: N = 0 accepted");
    CHECK(strstr(kd_last_error(), "non-empty") != NULL, "l1: message %s", kd_last_error());
    s[3] = INFINITY;
    CHECK(kd_loss_l1(&l, NULL, NULL, s, t, N, V, 1.0f, false) == KD_ERR_NONFINITE, "l1: an Inf logit gave a finite loss");
}

int main(void) {
    KDT_RUN(test_l1_gradcheck);
    KDT_RUN(test_l1_semantics);
    KDT_RUN(test_l1_errors);
    return kdt_finish();
}
