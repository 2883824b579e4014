// Layer kernel tests: naive reference implementations (direct loops, double accumulation)
// vs the fast kernels, finite-difference gradchecks of every backward, accumulation
// (+=) semantics, and 1 vs 2 threads: bitwise equal where the kernel's arithmetic does not
// depend on the thread count (conv forward/dinp, batchnorm, dropout), equal to rounding
// where it does (conv weight gradients, the BLAS-threaded linear layer). Conv runs its
// reference cases on each path (automatic, shift, col) and with the AVX2 kernels; the
// AVX-512, AVX2 and portable versions of the conv, linear-product, BN and max-pool kernels
// must agree bitwise (every one the CPU supports). Everything else runs on the instruction
// set chosen by KDCORE_ISA (`make test-c-isa` runs this file under each one).
#include "kdtest.h"
#include "layers.h"
#include "kd_internal.h"

#include <cblas.h>
#include <time.h>

#ifndef _OPENMP
#pragma GCC diagnostic ignored "-Wunknown-pragmas"
#endif

// ----------------------------------------------------------------------------------------
// helpers

static float * fzeros(size_t n) {
    float * p = calloc(n ? n : 1, sizeof(float));
    if (p == NULL) { abort(); }
    return p;
}
static float * frand(size_t n, uint64_t seed) {
    float * p = fzeros(n);
    kdt_fill(p, n, seed);
    return p;
}
static float * fcopy(const float * x, size_t n) {
    float * p = fzeros(n);
    memcpy(p, x, n * sizeof(float));
    return p;
}
static int bitwise_equal(const float * a, const float * b, size_t n) {
    return memcmp(a, b, n * sizeof(float)) == 0;
}

// Instruction sets: the one this run uses (KDCORE_ISA, or the CPU's best), and switching
// to each one the CPU supports, best first.
static enum kd_isa run_isa;
static int supported_isas(enum kd_isa * out) {
    int n = 0;
    for (int l = KD_ISA_COUNT - 1; l > KD_ISA_AUTO; l--) {
        if (kd_isa_supported((enum kd_isa)l)) { out[n++] = (enum kd_isa)l; }
    }
    return n;
}
static void use_isa(enum kd_isa isa) {
    enum kd_status st = kd_set_isa(isa);
    CHECK(st == KD_OK && kd_get_isa() == isa, "kd_set_isa(%s): %s", kd_isa_name(isa), kd_last_error());
}
// Values distinct (spaced 0.05 apart, none within 0.025 of 0): a permutation of a grid.
static void fill_distinct(float * x, size_t n, size_t mult) {
    for (size_t i = 0; i < n; i++) { x[i] = ((double)((i * mult) % n) - (double)(n / 2)) * 0.05f + 0.025f; }
}
#ifdef _OPENMP
static void set_threads(int t) { omp_set_num_threads(t); }
static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}
#endif

// ----------------------------------------------------------------------------------------
// finite-difference gradcheck of L = sum(out * R); the analytic gradient of L is the
// backward pass with dout = R.

struct ctx {
    float * out, * inp, * inp2, * w, * b;
    // linear / conv
    int N, C, OC;
    struct kd_conv_shape cs;
    float * work;
    // batchnorm
    float * mean, * rstd, * rm, * rv;
    int HW;
    float eps, mom;
    // pools
    int32_t * am;
    int H, W, OH, OW, K, S, P;
    // elementwise
    size_t n;
    float p;
    uint64_t seed;
    void (*fwd)(struct ctx * c);
    size_t nout;
};

static double loss(struct ctx * c, const float * R) {
    c->fwd(c);
    double L = 0.0;
    for (size_t i = 0; i < c->nout; i++) { L += (double)c->out[i] * (double)R[i]; }
    return L;
}

// Checks grad against central differences of L wrt x (at most ~maxcheck entries, spread out).
static void gradcheck(const char * what, struct ctx * c, const float * R, float * x, size_t n,
                      const float * grad, float eps) {
    const size_t maxcheck = 150;
    size_t step = n <= maxcheck ? 1 : (n + maxcheck - 1) / maxcheck;
    float * fd = fzeros(n), * an = fzeros(n);
    size_t k = 0;
    for (size_t i = 0; i < n; i += step, k++) {
        float x0 = x[i];
        float xp = x0 + eps, xm = x0 - eps;
        x[i] = xp;
        double Lp = loss(c, R);
        x[i] = xm;
        double Lm = loss(c, R);
        x[i] = x0;
        fd[k] = (float)((Lp - Lm) / ((double)xp - (double)xm));
        an[k] = grad[i];
    }
    c->fwd(c);
    check_close(what, an, fd, k, 2e-3, 1e-2);
    free(fd);
    free(an);
}

// ----------------------------------------------------------------------------------------
// linear

static void ref_linear_fwd(float * out, const float * inp, const float * w, const float * b,
                           int N, int C, int OC) {
    for (int n = 0; n < N; n++) {
        for (int o = 0; o < OC; o++) {
            double acc = b != NULL ? b[o] : 0.0;
            for (int c = 0; c < C; c++) { acc += (double)inp[n * C + c] * w[o * C + c]; }
            out[n * OC + o] = (float)acc;
        }
    }
}

// Accumulates like the kernel.
static void ref_linear_bwd(float * dinp, float * dw, float * db, const float * dout, const float * inp,
                           const float * w, int N, int C, int OC) {
    for (int n = 0; n < N; n++) {
        for (int c = 0; c < C; c++) {
            double acc = 0;
            for (int o = 0; o < OC; o++) { acc += (double)dout[n * OC + o] * w[o * C + c]; }
            dinp[n * C + c] += (float)acc;
        }
    }
    for (int o = 0; o < OC; o++) {
        double sb = 0;
        for (int n = 0; n < N; n++) { sb += dout[n * OC + o]; }
        db[o] += (float)sb;
        for (int c = 0; c < C; c++) {
            double acc = 0;
            for (int n = 0; n < N; n++) { acc += (double)dout[n * OC + o] * inp[n * C + c]; }
            dw[o * C + c] += (float)acc;
        }
    }
}

void kd_linear_force_engine(int engine);   // test hook: 0 automatic, 1 kdcore's own product, 2 OpenBLAS

// The linear kernels with their scratch allocated for the call.
static void lin_fwd(float * out, const float * inp, const float * w, const float * b, int N, int C, int OC) {
    float * ws = malloc(kd_linear_workspace(N, C, OC) * sizeof(float));
    kd_linear_forward(out, inp, w, b, N, C, OC, ws);
    free(ws);
}
static void lin_bwd(float * dinp, float * dw, float * db, const float * dout, const float * inp, const float * w,
                    int N, int C, int OC) {
    float * ws = malloc(kd_linear_workspace(N, C, OC) * sizeof(float));
    kd_linear_backward(dinp, dw, db, dout, inp, w, N, C, OC, ws);
    free(ws);
}

static void fwd_linear(struct ctx * c) { lin_fwd(c->out, c->inp, c->w, c->b, c->N, c->C, c->OC); }

static void test_linear_ref(int N, int C, int OC, int has_bias, uint64_t seed) {
    char name[128];
    size_t ni = (size_t)N * C, nw = (size_t)OC * C, no = (size_t)N * OC;
    float * inp = frand(ni, seed), * w = frand(nw, seed + 1), * b = has_bias ? frand(OC, seed + 2) : NULL;
    float * out = fzeros(no), * ref = fzeros(no), * dout = frand(no, seed + 3);
    lin_fwd(out, inp, w, b, N, C, OC);
    ref_linear_fwd(ref, inp, w, b, N, C, OC);
    snprintf(name, sizeof name, "linear fwd N%d C%d OC%d b%d", N, C, OC, has_bias);
    check_close(name, out, ref, no, 2e-5, 1e-5);

    // Start from nonzero gradients: the kernel must accumulate.
    float * dinp = frand(ni, seed + 4), * dw = frand(nw, seed + 5), * db = frand(OC, seed + 6);
    float * rdinp = fcopy(dinp, ni), * rdw = fcopy(dw, nw), * rdb = fcopy(db, OC);
    lin_bwd(dinp, dw, db, dout, inp, w, N, C, OC);
    ref_linear_bwd(rdinp, rdw, rdb, dout, inp, w, N, C, OC);
    snprintf(name, sizeof name, "linear dinp N%d C%d OC%d", N, C, OC);
    check_close(name, dinp, rdinp, ni, 3e-5, 1e-5);
    snprintf(name, sizeof name, "linear dweight N%d C%d OC%d", N, C, OC);
    check_close(name, dw, rdw, nw, 3e-5, 1e-5);
    snprintf(name, sizeof name, "linear dbias N%d C%d OC%d", N, C, OC);
    check_close(name, db, rdb, OC, 3e-5, 1e-5);

    // NULL gradients are skipped.
    float * dw2 = fzeros(nw);
    lin_bwd(NULL, dw2, NULL, dout, inp, w, N, C, OC);
    float * dw1 = fzeros(nw), * tmpi = fzeros(ni), * tmpb = fzeros(OC);
    ref_linear_bwd(tmpi, dw1, tmpb, dout, inp, w, N, C, OC);
    snprintf(name, sizeof name, "linear dweight only N%d C%d OC%d", N, C, OC);
    check_close(name, dw2, dw1, nw, 3e-5, 1e-5);
    free(inp); free(w); free(b); free(out); free(ref); free(dout); free(dinp); free(dw); free(db);
    free(rdinp); free(rdw); free(rdb); free(dw2); free(dw1); free(tmpi); free(tmpb);
}

static void test_linear_gradcheck(void) {
    int N = 3, C = 5, OC = 4;
    struct ctx c = {0};
    c.N = N; c.C = C; c.OC = OC; c.fwd = fwd_linear; c.nout = (size_t)N * OC;
    c.inp = frand((size_t)N * C, 11); c.w = frand((size_t)OC * C, 12); c.b = frand(OC, 13);
    c.out = fzeros(c.nout);
    float * R = frand(c.nout, 14);
    float * dinp = fzeros((size_t)N * C), * dw = fzeros((size_t)OC * C), * db = fzeros(OC);
    fwd_linear(&c);
    lin_bwd(dinp, dw, db, R, c.inp, c.w, N, C, OC);
    gradcheck("linear gradcheck dinp", &c, R, c.inp, (size_t)N * C, dinp, 1e-2f);
    gradcheck("linear gradcheck dweight", &c, R, c.w, (size_t)OC * C, dw, 1e-2f);
    gradcheck("linear gradcheck dbias", &c, R, c.b, OC, db, 1e-2f);

    // Two calls from zero give twice one call.
    float * d1 = fzeros((size_t)N * C), * w1 = fzeros((size_t)OC * C), * b1 = fzeros(OC);
    lin_bwd(d1, w1, b1, R, c.inp, c.w, N, C, OC);
    lin_bwd(d1, w1, b1, R, c.inp, c.w, N, C, OC);
    for (int i = 0; i < N * C; i++) { dinp[i] *= 2; }
    for (int i = 0; i < OC * C; i++) { dw[i] *= 2; }
    for (int i = 0; i < OC; i++) { db[i] *= 2; }
    check_close("linear accumulate dinp", d1, dinp, (size_t)N * C, 1e-6, 1e-6);
    check_close("linear accumulate dweight", w1, dw, (size_t)OC * C, 1e-6, 1e-6);
    check_close("linear accumulate dbias", b1, db, OC, 1e-6, 1e-6);
    free(c.inp); free(c.w); free(c.b); free(c.out); free(R); free(dinp); free(dw); free(db);
    free(d1); free(w1); free(b1);
}

// ----------------------------------------------------------------------------------------
// conv2d

static struct kd_conv_shape conv_shape(int N, int C, int H, int W, int OC, int K, int S, int P, int G) {
    struct kd_conv_shape s = { N, C, H, W, OC, (H + 2 * P - K) / S + 1, (W + 2 * P - K) / S + 1, K, S, P, G };
    return s;
}

static void ref_conv_fwd(float * out, const float * inp, const float * w, const float * b,
                         const struct kd_conv_shape * s) {
    int Cg = s->C / s->G, OCg = s->OC / s->G, K = s->K;
    for (int n = 0; n < s->N; n++) {
        for (int oc = 0; oc < s->OC; oc++) {
            int g = oc / OCg;
            for (int oh = 0; oh < s->OH; oh++) {
                for (int ow = 0; ow < s->OW; ow++) {
                    double acc = b != NULL ? b[oc] : 0.0;
                    for (int ci = 0; ci < Cg; ci++) {
                        for (int kh = 0; kh < K; kh++) {
                            for (int kw = 0; kw < K; kw++) {
                                int ih = oh * s->S - s->P + kh, iw = ow * s->S - s->P + kw;
                                if (ih < 0 || ih >= s->H || iw < 0 || iw >= s->W) { continue; }
                                acc += (double)w[((oc * Cg + ci) * K + kh) * K + kw]
                                     * inp[(((size_t)n * s->C + g * Cg + ci) * s->H + ih) * s->W + iw];
                            }
                        }
                    }
                    out[(((size_t)n * s->OC + oc) * s->OH + oh) * s->OW + ow] = (float)acc;
                }
            }
        }
    }
}

// Accumulates into dinp/dw/db like the kernel.
static void ref_conv_bwd(float * dinp, float * dw, float * db, const float * dout, const float * inp,
                         const float * w, const struct kd_conv_shape * s) {
    int Cg = s->C / s->G, OCg = s->OC / s->G, K = s->K;
    size_t ni = (size_t)s->N * s->C * s->H * s->W, nw = (size_t)s->OC * Cg * K * K;
    double * ddi = calloc(ni, sizeof(double)), * ddw = calloc(nw, sizeof(double));
    double * ddb = calloc((size_t)s->OC, sizeof(double));
    for (int n = 0; n < s->N; n++) {
        for (int oc = 0; oc < s->OC; oc++) {
            int g = oc / OCg;
            for (int oh = 0; oh < s->OH; oh++) {
                for (int ow = 0; ow < s->OW; ow++) {
                    double d = dout[(((size_t)n * s->OC + oc) * s->OH + oh) * s->OW + ow];
                    ddb[oc] += d;
                    for (int ci = 0; ci < Cg; ci++) {
                        for (int kh = 0; kh < K; kh++) {
                            for (int kw = 0; kw < K; kw++) {
                                int ih = oh * s->S - s->P + kh, iw = ow * s->S - s->P + kw;
                                if (ih < 0 || ih >= s->H || iw < 0 || iw >= s->W) { continue; }
                                size_t ii = (((size_t)n * s->C + g * Cg + ci) * s->H + ih) * s->W + iw;
                                size_t wi = ((size_t)(oc * Cg + ci) * K + kh) * K + kw;
                                ddi[ii] += d * w[wi];
                                ddw[wi] += d * inp[ii];
                            }
                        }
                    }
                }
            }
        }
    }
    for (size_t i = 0; i < ni; i++) { dinp[i] += (float)ddi[i]; }
    for (size_t i = 0; i < nw; i++) { dw[i] += (float)ddw[i]; }
    for (int i = 0; i < s->OC; i++) { db[i] += (float)ddb[i]; }
    free(ddi); free(ddw); free(ddb);
}

static float * conv_work(const struct kd_conv_shape * s) {
    size_t nw = kd_conv2d_workspace(s, kd_omp_threads());
    // Exact size (not rounded up) so ASan catches any overrun; NULL when nothing is needed.
    return nw ? malloc(nw * sizeof(float)) : NULL;
}

static void fwd_conv(struct ctx * c) { kd_conv2d_forward(c->out, c->inp, c->w, c->b, &c->cs, c->work); }

struct conv_bufs { size_t ni, nw, no; float * inp, * w, * b, * out, * dout; };

static struct conv_bufs conv_bufs_new(const struct kd_conv_shape * s, int has_bias, uint64_t seed) {
    struct conv_bufs q;
    q.ni = (size_t)s->N * s->C * s->H * s->W;
    q.nw = (size_t)s->OC * (s->C / s->G) * s->K * s->K;
    q.no = (size_t)s->N * s->OC * s->OH * s->OW;
    q.inp = frand(q.ni, seed); q.w = frand(q.nw, seed + 1);
    q.b = has_bias ? frand(s->OC, seed + 2) : NULL;
    q.out = fzeros(q.no); q.dout = frand(q.no, seed + 3);
    return q;
}
static void conv_bufs_free(struct conv_bufs * q) {
    free(q->inp); free(q->w); free(q->b); free(q->out); free(q->dout);
}

static void test_conv_ref(struct kd_conv_shape s, int has_bias, uint64_t seed) {
    char tag[128], name[160];
    snprintf(tag, sizeof tag, "N%d C%d %dx%d OC%d K%d S%d P%d G%d b%d", s.N, s.C, s.H, s.W, s.OC,
             s.K, s.S, s.P, s.G, has_bias);
    struct conv_bufs q = conv_bufs_new(&s, has_bias, seed);
    float * work = conv_work(&s), * ref = fzeros(q.no);
    kd_conv2d_forward(q.out, q.inp, q.w, q.b, &s, work);
    ref_conv_fwd(ref, q.inp, q.w, q.b, &s);
    snprintf(name, sizeof name, "conv fwd %s", tag);
    check_close(name, q.out, ref, q.no, 2e-5, 1e-5);

    float * dinp = frand(q.ni, seed + 4), * dw = frand(q.nw, seed + 5), * db = frand(s.OC, seed + 6);
    float * rdinp = fcopy(dinp, q.ni), * rdw = fcopy(dw, q.nw), * rdb = fcopy(db, s.OC);
    kd_conv2d_backward(dinp, dw, db, q.dout, q.inp, q.w, &s, work);
    ref_conv_bwd(rdinp, rdw, rdb, q.dout, q.inp, q.w, &s);
    snprintf(name, sizeof name, "conv dinp %s", tag);
    check_close(name, dinp, rdinp, q.ni, 3e-5, 1e-5);
    snprintf(name, sizeof name, "conv dweight %s", tag);
    check_close(name, dw, rdw, q.nw, 3e-5, 1e-5);
    snprintf(name, sizeof name, "conv dbias %s", tag);
    check_close(name, db, rdb, s.OC, 3e-5, 1e-5);

    // Each gradient alone (the others NULL) gives the same values.
    float * z1 = fzeros(q.ni), * z2 = fzeros(q.nw), * z3 = fzeros(s.OC);
    float * r1 = fzeros(q.ni), * r2 = fzeros(q.nw), * r3 = fzeros(s.OC);
    ref_conv_bwd(r1, r2, r3, q.dout, q.inp, q.w, &s);
    kd_conv2d_backward(z1, NULL, NULL, q.dout, q.inp, q.w, &s, work);
    kd_conv2d_backward(NULL, z2, NULL, q.dout, q.inp, q.w, &s, work);
    kd_conv2d_backward(NULL, NULL, z3, q.dout, q.inp, q.w, &s, work);
    snprintf(name, sizeof name, "conv dinp alone %s", tag);
    check_close(name, z1, r1, q.ni, 3e-5, 1e-5);
    snprintf(name, sizeof name, "conv dweight alone %s", tag);
    check_close(name, z2, r2, q.nw, 3e-5, 1e-5);
    snprintf(name, sizeof name, "conv dbias alone %s", tag);
    check_close(name, z3, r3, s.OC, 3e-5, 1e-5);

    // A second call doubles the gradients.
    kd_conv2d_backward(z1, z2, z3, q.dout, q.inp, q.w, &s, work);
    for (size_t i = 0; i < q.ni; i++) { r1[i] *= 2; }
    for (size_t i = 0; i < q.nw; i++) { r2[i] *= 2; }
    for (int i = 0; i < s.OC; i++) { r3[i] *= 2; }
    snprintf(name, sizeof name, "conv accumulate %s", tag);
    int ok = check_close(name, z1, r1, q.ni, 6e-5, 1e-5);
    ok &= check_close(name, z2, r2, q.nw, 6e-5, 1e-5);
    ok &= check_close(name, z3, r3, s.OC, 6e-5, 1e-5);
    (void)ok;
    free(work); free(ref); free(dinp); free(dw); free(db); free(rdinp); free(rdw); free(rdb);
    free(z1); free(z2); free(z3); free(r1); free(r2); free(r3);
    conv_bufs_free(&q);
}

static void test_conv_gradcheck(struct kd_conv_shape s, uint64_t seed) {
    char tag[128], name[160];
    snprintf(tag, sizeof tag, "N%d C%d %dx%d OC%d K%d S%d P%d G%d", s.N, s.C, s.H, s.W, s.OC, s.K,
             s.S, s.P, s.G);
    struct conv_bufs q = conv_bufs_new(&s, 1, seed);
    struct ctx c = {0};
    c.cs = s; c.work = conv_work(&s); c.inp = q.inp; c.w = q.w; c.b = q.b; c.out = q.out;
    c.fwd = fwd_conv; c.nout = q.no;
    float * dinp = fzeros(q.ni), * dw = fzeros(q.nw), * db = fzeros(s.OC);
    fwd_conv(&c);
    kd_conv2d_backward(dinp, dw, db, q.dout, q.inp, q.w, &s, c.work);
    snprintf(name, sizeof name, "conv gradcheck dinp %s", tag);
    gradcheck(name, &c, q.dout, q.inp, q.ni, dinp, 1e-2f);
    snprintf(name, sizeof name, "conv gradcheck dweight %s", tag);
    gradcheck(name, &c, q.dout, q.w, q.nw, dw, 1e-2f);
    snprintf(name, sizeof name, "conv gradcheck dbias %s", tag);
    gradcheck(name, &c, q.dout, q.b, s.OC, db, 1e-2f);
    free(c.work); free(dinp); free(dw); free(db);
    conv_bufs_free(&q);
}

#ifdef _OPENMP
// 1 vs 2 threads: forward and dinp bitwise (each image is done by one thread with the same
// single-threaded sgemm); dweight/dbias go through per-thread partials, so only rounding.
static void test_conv_threads(struct kd_conv_shape s, uint64_t seed) {
    char tag[128], name[160];
    snprintf(tag, sizeof tag, "N%d C%d %dx%d OC%d K%d S%d P%d G%d", s.N, s.C, s.H, s.W, s.OC, s.K,
             s.S, s.P, s.G);
    struct conv_bufs q = conv_bufs_new(&s, 1, seed);
    float * out[2], * dinp[2], * dw[2], * db[2];
    for (int t = 0; t < 2; t++) {
        set_threads(t + 1);
        float * work = conv_work(&s);
        out[t] = fzeros(q.no); dinp[t] = fzeros(q.ni); dw[t] = fzeros(q.nw); db[t] = fzeros(s.OC);
        kd_conv2d_forward(out[t], q.inp, q.w, q.b, &s, work);
        kd_conv2d_backward(dinp[t], dw[t], db[t], q.dout, q.inp, q.w, &s, work);
        free(work);
    }
    set_threads(2);
    CHECK(bitwise_equal(out[0], out[1], q.no), "conv fwd 1 vs 2 threads not bitwise equal: %s", tag);
    CHECK(bitwise_equal(dinp[0], dinp[1], q.ni), "conv dinp 1 vs 2 threads not bitwise equal: %s", tag);
    snprintf(name, sizeof name, "conv dweight 1 vs 2 threads %s", tag);
    // Each dweight is a sum of N*OH*OW terms (inputs in [-1, 1)) whose split into partials
    // depends on the thread count: allow float rounding of such a sum.
    check_close(name, dw[1], dw[0], q.nw, 2e-7 * sqrt((double)s.N * s.OH * s.OW) * 4, 1e-5);
    snprintf(name, sizeof name, "conv dbias 1 vs 2 threads %s", tag);
    check_close(name, db[1], db[0], s.OC, 1e-6, 1e-5);
    for (int t = 0; t < 2; t++) { free(out[t]); free(dinp[t]); free(dw[t]); free(db[t]); }
    conv_bufs_free(&q);
}
#endif

static void test_conv_workspace(void) {
    // A shared part (packed weights, offset tables) plus the same amount per thread.
    struct kd_conv_shape s = conv_shape(8, 16, 10, 12, 32, 3, 1, 1, 2);
    size_t w1 = kd_conv2d_workspace(&s, 1), w2 = kd_conv2d_workspace(&s, 2), w3 = kd_conv2d_workspace(&s, 3);
    CHECK(w1 > 0 && w2 > w1 && w3 - w2 == w2 - w1, "conv workspace grows linearly with threads: %zu %zu %zu",
          w1, w2, w3);
    CHECK(kd_conv2d_workspace(&s, 0) == w1, "conv workspace for 0 threads counts as 1");
    // Per thread it holds at least the padded image (C x 12 x 14) and the weight-gradient partial.
    CHECK(w2 - w1 >= (size_t)16 * 12 * 14 + (size_t)32 * 8 * 9, "conv workspace per thread too small: %zu", w2 - w1);
    struct kd_conv_shape dw = conv_shape(8, 16, 10, 12, 16, 3, 1, 1, 16);
    CHECK(kd_conv2d_workspace(&dw, 2) == 0, "depthwise conv needs no workspace");
    // Cg*K*K = 2^50 times OH*OW = 2^30 overflows 64 bits.
    struct kd_conv_shape huge = { 1, 1 << 30, 1 << 15, 1 << 15, 1 << 30, 1 << 15, 1 << 15, 1 << 10, 1, 0, 1 };
    CHECK(kd_conv2d_workspace(&huge, 64) == SIZE_MAX, "conv workspace overflow not detected");
    struct kd_conv_shape big = { 1, 1 << 16, 1 << 15, 1 << 15, 1 << 16, 1 << 15, 1 << 15, 1, 1, 0, 1 };
    CHECK(kd_conv2d_workspace(&big, 1 << 20) == SIZE_MAX, "conv workspace overflow (threads) not detected");
}

// The conv kernels have AVX-512, AVX2 and portable C versions that perform the same float
// operations in the same order: results must be bitwise equal, on every instruction set the
// CPU supports.
void kd_conv_force_path(int path);   // test hook: 0 automatic, 1 shift, 2 col, 3 Winograd

static void test_conv_isas(struct kd_conv_shape s, uint64_t seed) {
    char tag[128];
    snprintf(tag, sizeof tag, "N%d C%d %dx%d OC%d K%d S%d P%d G%d", s.N, s.C, s.H, s.W, s.OC, s.K,
             s.S, s.P, s.G);
    struct conv_bufs q = conv_bufs_new(&s, 1, seed);
    float * work = conv_work(&s);
    enum kd_isa isa[KD_ISA_COUNT];
    const int n = supported_isas(isa);
    float * out[KD_ISA_COUNT], * dinp[KD_ISA_COUNT], * dw[KD_ISA_COUNT], * db[KD_ISA_COUNT];
    for (int v = 0; v < n; v++) {
        use_isa(isa[v]);
        out[v] = fzeros(q.no); dinp[v] = fzeros(q.ni); dw[v] = fzeros(q.nw); db[v] = fzeros(s.OC);
        kd_conv2d_forward(out[v], q.inp, q.w, q.b, &s, work);
        kd_conv2d_backward(dinp[v], dw[v], db[v], q.dout, q.inp, q.w, &s, work);
    }
    use_isa(run_isa);
    for (int v = 1; v < n; v++) {
        const char * a = kd_isa_name(isa[0]), * b = kd_isa_name(isa[v]);
        CHECK(bitwise_equal(out[0], out[v], q.no), "conv fwd %s vs %s not bitwise equal: %s", a, b, tag);
        CHECK(bitwise_equal(dinp[0], dinp[v], q.ni), "conv dinp %s vs %s not bitwise equal: %s", a, b, tag);
        CHECK(bitwise_equal(dw[0], dw[v], q.nw), "conv dweight %s vs %s not bitwise equal: %s", a, b, tag);
        CHECK(bitwise_equal(db[0], db[v], s.OC), "conv dbias %s vs %s not bitwise equal: %s", a, b, tag);
    }
    for (int v = 0; v < n; v++) { free(out[v]); free(dinp[v]); free(dw[v]); free(db[v]); }
    free(work);
    conv_bufs_free(&q);
}

// ---- Winograd F(2x2, 3x3) (kd_conv_force_path(3) runs it wherever the shape allows) -----
//
// Error bound. Per output, Winograd computes sum_xi a_xi sum_c U_c,xi V_c,xi: V = B^T d B
// (each entry a signed sum of at most 4 input values of the tile, |V| <= S_d, the sum of |d|
// over the 4x4 tile), U = G g G^T (each entry a sum of at most 9 weights with factors 1/2^k,
// |U| <= S_g, the sum of |g| over the kernel), one fma chain over the Ci channels per xi, and
// the output transform adds at most 9 of the 16 products with 4 additions in sequence. With u
// = 2^-24, each rounding step adds at most u times the magnitude of what it sums, and at most
// Ci + 8 steps (transforms 2 + 2, chain Ci, output 4) stand between an exact term and the
// result, so |winograd - exact| <= 9 (Ci + 8) u sum_c S_g(o, c) S_d(c, tile) (+ the half ulp
// of the reference's own rounding to float). The direct path's error is below the same
// bound (9 Ci terms |g||d| <= S_g S_d per channel), so the two differ by at most twice it.
static void wino_bound(double * bound, const float * x, int N, int Ci, int Hi, int Wi, const float * w,
                       int transposed, int Co, int Ho, int Wo, int pad) {
    for (int n = 0; n < N; n++) {
        for (int o = 0; o < Co; o++) {
            for (int oh = 0; oh < Ho; oh++) {
                for (int ow = 0; ow < Wo; ow++) {
                    int r0 = 2 * (oh / 2) - pad, c0 = 2 * (ow / 2) - pad;
                    double acc = 0;
                    for (int c = 0; c < Ci; c++) {
                        const float * g = transposed ? w + ((size_t)c * Co + o) * 9 : w + ((size_t)o * Ci + c) * 9;
                        double sg = 0, sd = 0;
                        for (int k = 0; k < 9; k++) { sg += fabs((double)g[k]); }
                        for (int i = 0; i < 4; i++) {
                            for (int j = 0; j < 4; j++) {
                                int ih = r0 + i, iw = c0 + j;
                                if (ih >= 0 && ih < Hi && iw >= 0 && iw < Wi) {
                                    sd += fabs((double)x[(((size_t)n * Ci + c) * Hi + ih) * Wi + iw]);
                                }
                            }
                        }
                        acc += sg * sd;
                    }
                    bound[(((size_t)n * Co + o) * Ho + oh) * Wo + ow] = 9.0 * (Ci + 8) * 0x1p-24 * acc;
                }
            }
        }
    }
}

// Weight gradient: dU = sum over tiles of Z V (Z = A dy A^T: each entry a signed sum of at
// most 4 values of the 2x2 output-gradient tile, |Z| <= S_dy; |V| <= S_d as above), one fma
// chain over at most T tiles, then dW = G^T dU G, whose weights sum to at most 4 in absolute
// value. At most T + 8 rounding steps (transforms 2 + 2, chain T, G transform 4) stand between
// an exact term and the result: |winograd - exact| <= 4 (T + 8) u sum_tiles S_dy S_d per
// (o, c). The direct path's error is below it too (each of its terms |dy||d| is in the sum).
static void wino_dw_bound(double * bound, const float * x, const float * dy, const struct kd_conv_shape * s) {
    int th = (s->OH + 1) / 2, tw = (s->OW + 1) / 2;
    double T = (double)s->N * th * tw;
    for (int o = 0; o < s->OC; o++) {
        for (int c = 0; c < s->C; c++) {
            double acc = 0;
            for (int n = 0; n < s->N; n++) {
                for (int ti = 0; ti < th; ti++) {
                    for (int tj = 0; tj < tw; tj++) {
                        double sy = 0, sd = 0;
                        for (int i = 0; i < 2; i++) {
                            for (int j = 0; j < 2; j++) {
                                int oh = 2 * ti + i, ow = 2 * tj + j;
                                if (oh < s->OH && ow < s->OW) {
                                    sy += fabs((double)dy[(((size_t)n * s->OC + o) * s->OH + oh) * s->OW + ow]);
                                }
                            }
                        }
                        for (int i = 0; i < 4; i++) {
                            for (int j = 0; j < 4; j++) {
                                int ih = 2 * ti - s->P + i, iw = 2 * tj - s->P + j;
                                if (ih >= 0 && ih < s->H && iw >= 0 && iw < s->W) {
                                    sd += fabs((double)x[(((size_t)n * s->C + c) * s->H + ih) * s->W + iw]);
                                }
                            }
                        }
                        acc += sy * sd;
                    }
                }
            }
            for (int k = 0; k < 9; k++) { bound[((size_t)o * s->C + c) * 9 + k] = 4.0 * (T + 8) * 0x1p-24 * acc; }
        }
    }
}

// |a - ref| <= k * bound + |ref| 2^-24 everywhere
static int within_bound(const char * what, const float * a, const float * ref, const double * bound, double k, size_t n) {
    size_t bad = 0;
    double worst = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)ref[i]), lim = k * bound[i] + fabs((double)ref[i]) * 0x1p-24;
        if (lim > 0 && d / lim > worst) { worst = d / lim; }
        if (!(d <= lim)) {
            if (bad < 5) { printf("  %s[%zu]: got %.9g want %.9g (bound %.3g)\n", what, i, a[i], ref[i], lim); }
            bad++;
        }
    }
    CHECK(bad == 0, "%s: %zu of %zu outside the bound (worst %.2f of it)", what, bad, n, worst);
    return bad == 0;
}

// Forward and input gradient by Winograd against the double reference and against the direct
// path (shift), within the bound above; xs, ws scale the inputs and weights (large values).
static void test_wino(struct kd_conv_shape s, int has_bias, uint64_t seed, float xs, float ws) {
    char tag[160], name[200];
    snprintf(tag, sizeof tag, "N%d C%d %dx%d OC%d P%d b%d scale %g/%g", s.N, s.C, s.H, s.W, s.OC, s.P, has_bias,
             (double)xs, (double)ws);
    struct conv_bufs q = conv_bufs_new(&s, has_bias, seed);
    for (size_t i = 0; i < q.ni; i++) { q.inp[i] *= xs; }
    for (size_t i = 0; i < q.nw; i++) { q.w[i] *= ws; }
    for (size_t i = 0; i < q.no; i++) { q.dout[i] *= xs; }
    float * out[2], * dinp[2], * dw[2], * dw2[2], * db[2];
    for (int v = 0; v < 2; v++) {      // 0: Winograd, 1: the direct (shift) path
        kd_conv_force_path(v == 0 ? 3 : 1);
        float * work = conv_work(&s);
        out[v] = fzeros(q.no); dinp[v] = fzeros(q.ni); dw[v] = fzeros(q.nw); dw2[v] = fzeros(q.nw);
        db[v] = fzeros(s.OC);
        kd_conv2d_forward(out[v], q.inp, q.w, q.b, &s, work);
        kd_conv2d_backward(dinp[v], NULL, NULL, q.dout, q.inp, q.w, &s, work);
        kd_conv2d_backward(NULL, dw[v], has_bias ? db[v] : NULL, q.dout, q.inp, q.w, &s, work);
        // all three at once, accumulating onto what is there (a second pass doubles it)
        memcpy(dw2[v], dw[v], q.nw * sizeof(float));
        float * dx2 = fzeros(q.ni);
        kd_conv2d_backward(dx2, dw2[v], NULL, q.dout, q.inp, q.w, &s, work);
        CHECK(bitwise_equal(dx2, dinp[v], q.ni), "dinp with dweight differs from dinp alone (path %d)", v);
        for (size_t i = 0; i < q.nw; i++) { dw2[v][i] -= dw[v][i]; }
        CHECK(bitwise_equal(dw2[v], dw[v], q.nw), "dweight does not accumulate exactly (path %d)", v);
        free(dx2);
        free(work);
    }
    kd_conv_force_path(3);
    float * ref = fzeros(q.no), * rdinp = fzeros(q.ni), * rdw = fzeros(q.nw), * rdb = fzeros(s.OC);
    ref_conv_fwd(ref, q.inp, q.w, q.b, &s);
    ref_conv_bwd(rdinp, rdw, rdb, q.dout, q.inp, q.w, &s);
    double * bo = malloc(q.no * sizeof(double)), * bi = malloc(q.ni * sizeof(double));
    wino_bound(bo, q.inp, s.N, s.C, s.H, s.W, q.w, 0, s.OC, s.OH, s.OW, s.P);
    wino_bound(bi, q.dout, s.N, s.OC, s.OH, s.OW, q.w, 1, s.C, s.H, s.W, 2 - s.P);
    snprintf(name, sizeof name, "winograd fwd vs reference %s", tag);
    within_bound(name, out[0], ref, bo, 1.0, q.no);
    snprintf(name, sizeof name, "winograd fwd vs direct %s", tag);
    within_bound(name, out[0], out[1], bo, 2.0, q.no);
    snprintf(name, sizeof name, "winograd dinp vs reference %s", tag);
    within_bound(name, dinp[0], rdinp, bi, 1.0, q.ni);
    snprintf(name, sizeof name, "winograd dinp vs direct %s", tag);
    within_bound(name, dinp[0], dinp[1], bi, 2.0, q.ni);
    double * bw = malloc(q.nw * sizeof(double));
    wino_dw_bound(bw, q.inp, q.dout, &s);
    snprintf(name, sizeof name, "winograd dweight vs reference %s", tag);
    within_bound(name, dw[0], rdw, bw, 1.0, q.nw);
    snprintf(name, sizeof name, "winograd dweight vs direct %s", tag);
    within_bound(name, dw[0], dw[1], bw, 2.0, q.nw);
    if (has_bias) {
        CHECK(bitwise_equal(db[0], db[1], (size_t)s.OC), "winograd: dbias differs from the direct path's %s", tag);
    }
    if (s.C >= 4 && s.OC >= 4 && s.N * s.OH * s.OW >= 16) {
        // the forced path did run: its rounding differs from the direct path's somewhere
        CHECK(!bitwise_equal(out[0], out[1], q.no) && !bitwise_equal(dinp[0], dinp[1], q.ni) &&
              !bitwise_equal(dw[0], dw[1], q.nw),
              "winograd forced but the results equal the direct path's bitwise: %s", tag);
    }
    for (int v = 0; v < 2; v++) { free(out[v]); free(dinp[v]); free(dw[v]); free(dw2[v]); free(db[v]); }
    free(ref); free(rdinp); free(rdw); free(rdb); free(bo); free(bi); free(bw);
    conv_bufs_free(&q);
}

// The automatic choice follows the shape rule (C, OC >= 32): Winograd's bits there, the
// direct path's below (C 16 < 32 <= OC); the workspace does not depend on the forced path.
static void test_wino_rule(void) {
    for (int big = 0; big <= 1; big++) {
        struct kd_conv_shape s = conv_shape(2, big ? 32 : 16, 9, 8, big ? 40 : 64, 3, 1, 1, 1);
        struct conv_bufs q = conv_bufs_new(&s, 1, 950 + big);
        kd_conv_force_path(0);
        size_t w0 = kd_conv2d_workspace(&s, 2);
        float * work = conv_work(&s), * auto_out = fzeros(q.no), * wino_out = fzeros(q.no);
        float * auto_dx = fzeros(q.ni), * wino_dx = fzeros(q.ni);
        kd_conv2d_forward(auto_out, q.inp, q.w, q.b, &s, work);
        kd_conv2d_backward(auto_dx, NULL, NULL, q.dout, q.inp, q.w, &s, work);
        kd_conv_force_path(3);
        CHECK(kd_conv2d_workspace(&s, 2) == w0, "conv workspace differs with Winograd forced: C%d", s.C);
        kd_conv2d_forward(wino_out, q.inp, q.w, q.b, &s, work);
        kd_conv2d_backward(wino_dx, NULL, NULL, q.dout, q.inp, q.w, &s, work);
        kd_conv_force_path(0);
        int same = bitwise_equal(auto_out, wino_out, q.no) && bitwise_equal(auto_dx, wino_dx, q.ni);
        CHECK(same == big, "automatic choice C%d OC%d: %s Winograd's result", s.C, s.OC, same ? "equals" : "differs from");
        CHECK(strstr(kd_winograd_config(), "on (KDCORE_WINOGRAD unset); F(2x2,3x3) for stride-1 3x3 convs with C, OC >= 32")
              != NULL || getenv("KDCORE_WINOGRAD") != NULL, "kd_winograd_config: %s", kd_winograd_config());
        free(work); free(auto_out); free(wino_out); free(auto_dx); free(wino_dx);
        conv_bufs_free(&q);
    }
}

// Inf/NaN in the input must reach the outputs they feed and only those (the grid columns
// the kernels compute and drop must not leak into real outputs).
static void test_conv_nonfinite(void) {
    struct kd_conv_shape s = conv_shape(2, 3, 6, 6, 4, 3, 1, 1, 1);
    struct conv_bufs q = conv_bufs_new(&s, 0, 77);
    float * work = conv_work(&s), * ref = fzeros(q.no);
    q.inp[(size_t)1 * 3 * 36 + 2 * 36 + 0] = INFINITY;   // image 1, channel 2, pixel (0, 0)
    kd_conv2d_forward(q.out, q.inp, q.w, NULL, &s, work);
    ref_conv_fwd(ref, q.inp, q.w, NULL, &s);
    int ok = 1;
    for (size_t i = 0; i < q.no; i++) {
        if (isfinite(ref[i]) != isfinite(q.out[i])) { ok = 0; }
        if (isfinite(ref[i]) && fabsf(ref[i] - q.out[i]) > 1e-4f) { ok = 0; }
    }
    CHECK(ok, "conv forward with an Inf input: non-finite exactly where the reference is");
    free(work); free(ref);
    conv_bufs_free(&q);
}

// ----------------------------------------------------------------------------------------
// batchnorm

static void ref_bn_train(float * out, float * mean, float * rstd, float * rm, float * rv, const float * x,
                         const float * w, const float * b, int N, int C, int HW, float eps, float mom) {
    size_t cnt = (size_t)N * HW;
    for (int c = 0; c < C; c++) {
        double s = 0, ss = 0;
        for (int n = 0; n < N; n++) { for (int i = 0; i < HW; i++) { s += x[((size_t)n * C + c) * HW + i]; } }
        double m = s / cnt;
        for (int n = 0; n < N; n++) {
            for (int i = 0; i < HW; i++) { double d = x[((size_t)n * C + c) * HW + i] - m; ss += d * d; }
        }
        double var = ss / cnt, r = 1.0 / sqrt(var + eps);
        mean[c] = (float)m; rstd[c] = (float)r;
        rm[c] = (float)((1 - mom) * rm[c] + mom * m);
        rv[c] = (float)((1 - mom) * rv[c] + mom * (cnt > 1 ? ss / (cnt - 1) : var));
        for (int n = 0; n < N; n++) {
            for (int i = 0; i < HW; i++) {
                size_t k = ((size_t)n * C + c) * HW + i;
                out[k] = (float)((x[k] - m) * r * w[c] + b[c]);
            }
        }
    }
}

// dx = rstd*w*(dy - mean(dy) - xhat*mean(dy*xhat)), in double from the float mean/rstd.
static void ref_bn_bwd(float * dx, float * dw, float * db, const float * dy, const float * x,
                       const float * mean, const float * rstd, const float * w, int N, int C, int HW,
                       int bs) {
    size_t cnt = (size_t)N * HW;
    for (int c = 0; c < C; c++) {
        double sdy = 0, sdyx = 0;
        for (int n = 0; n < N; n++) {
            for (int i = 0; i < HW; i++) {
                size_t k = ((size_t)n * C + c) * HW + i;
                sdy += dy[k];
                sdyx += dy[k] * (x[k] - (double)mean[c]) * rstd[c];
            }
        }
        dw[c] += (float)sdyx; db[c] += (float)sdy;
        for (int n = 0; n < N; n++) {
            for (int i = 0; i < HW; i++) {
                size_t k = ((size_t)n * C + c) * HW + i;
                double xhat = (x[k] - (double)mean[c]) * rstd[c];
                double g = bs ? dy[k] - sdy / cnt - xhat * sdyx / cnt : dy[k];
                dx[k] += (float)(g * rstd[c] * w[c]);
            }
        }
    }
}

static void fwd_bn_train(struct ctx * c) {
    kd_batchnorm_forward_train(c->out, c->mean, c->rstd, c->rm, c->rv, c->inp, c->w, c->b, c->N, c->C,
                               c->HW, c->eps, c->mom);
}
static void fwd_bn_eval(struct ctx * c) {
    kd_batchnorm_forward_eval(c->out, c->mean, c->rstd, c->inp, c->w, c->b, c->rm, c->rv, c->N, c->C,
                              c->HW, c->eps);
}

static void test_bn_ref(int N, int C, int HW, uint64_t seed) {
    char tag[64], name[128];
    snprintf(tag, sizeof tag, "N%d C%d HW%d", N, C, HW);
    size_t n = (size_t)N * C * HW;
    float eps = 1e-5f, mom = 0.1f;
    float * x = frand(n, seed), * w = frand(C, seed + 1), * b = frand(C, seed + 2);
    for (size_t i = 0; i < n; i++) { x[i] = 3.0f * x[i] + 0.5f; }   // nonzero mean, var != 1
    float * rm = frand(C, seed + 3), * rv = frand(C, seed + 4);
    for (int c = 0; c < C; c++) { rv[c] = 1.0f + 0.5f * rv[c]; }
    float * rrm = fcopy(rm, C), * rrv = fcopy(rv, C);
    float * out = fzeros(n), * ref = fzeros(n), * mean = fzeros(C), * rstd = fzeros(C);
    float * rmean = fzeros(C), * rrstd = fzeros(C);
    kd_batchnorm_forward_train(out, mean, rstd, rm, rv, x, w, b, N, C, HW, eps, mom);
    ref_bn_train(ref, rmean, rrstd, rrm, rrv, x, w, b, N, C, HW, eps, mom);
    snprintf(name, sizeof name, "bn train out %s", tag);
    check_close(name, out, ref, n, 1e-5, 1e-5);
    snprintf(name, sizeof name, "bn train mean %s", tag);
    check_close(name, mean, rmean, C, 1e-6, 1e-6);
    snprintf(name, sizeof name, "bn train rstd %s", tag);
    check_close(name, rstd, rrstd, C, 1e-6, 1e-6);
    snprintf(name, sizeof name, "bn running_mean %s", tag);
    check_close(name, rm, rrm, C, 1e-6, 1e-6);
    snprintf(name, sizeof name, "bn running_var %s", tag);
    check_close(name, rv, rrv, C, 1e-6, 1e-6);

    float * dy = frand(n, seed + 5);
    float * dx = frand(n, seed + 6), * dw = frand(C, seed + 7), * db = frand(C, seed + 8);
    float * rdx = fcopy(dx, n), * rdw = fcopy(dw, C), * rdb = fcopy(db, C);
    kd_batchnorm_backward(dx, dw, db, dy, x, mean, rstd, w, N, C, HW, 1);
    ref_bn_bwd(rdx, rdw, rdb, dy, x, mean, rstd, w, N, C, HW, 1);
    snprintf(name, sizeof name, "bn train dinp %s", tag);
    check_close(name, dx, rdx, n, 2e-5, 1e-5);
    snprintf(name, sizeof name, "bn train dweight %s", tag);
    check_close(name, dw, rdw, C, 2e-5, 1e-5);
    snprintf(name, sizeof name, "bn train dbias %s", tag);
    check_close(name, db, rdb, C, 2e-5, 1e-5);

    // Eval: normalise with the running stats; mean/rstd come from them.
    kd_batchnorm_forward_eval(out, mean, rstd, x, w, b, rm, rv, N, C, HW, eps);
    for (int c = 0; c < C; c++) {
        double r = 1.0 / sqrt((double)rv[c] + eps);
        rmean[c] = rm[c]; rrstd[c] = (float)r;
        for (int k = 0; k < N; k++) {
            for (int i = 0; i < HW; i++) {
                size_t j = ((size_t)k * C + c) * HW + i;
                ref[j] = (float)((x[j] - (double)rm[c]) * r * w[c] + b[c]);
            }
        }
    }
    snprintf(name, sizeof name, "bn eval out %s", tag);
    check_close(name, out, ref, n, 1e-5, 1e-5);
    snprintf(name, sizeof name, "bn eval mean %s", tag);
    check_close(name, mean, rmean, C, 0, 0);
    snprintf(name, sizeof name, "bn eval rstd %s", tag);
    check_close(name, rstd, rrstd, C, 1e-6, 1e-6);
    kd_batchnorm_backward(dx, dw, db, dy, x, mean, rstd, w, N, C, HW, 0);
    ref_bn_bwd(rdx, rdw, rdb, dy, x, mean, rstd, w, N, C, HW, 0);
    snprintf(name, sizeof name, "bn eval dinp %s", tag);
    check_close(name, dx, rdx, n, 2e-5, 1e-5);
    snprintf(name, sizeof name, "bn eval dweight %s", tag);
    check_close(name, dw, rdw, C, 2e-5, 1e-5);
    snprintf(name, sizeof name, "bn eval dbias %s", tag);
    check_close(name, db, rdb, C, 2e-5, 1e-5);
    free(x); free(w); free(b); free(rm); free(rv); free(rrm); free(rrv); free(out); free(ref);
    free(mean); free(rstd); free(rmean); free(rrstd); free(dy); free(dx); free(dw); free(db);
    free(rdx); free(rdw); free(rdb);
}

static void test_bn_gradcheck(int N, int C, int HW, int train) {
    char tag[64], name[128];
    snprintf(tag, sizeof tag, "%s N%d C%d HW%d", train ? "train" : "eval", N, C, HW);
    size_t n = (size_t)N * C * HW;
    struct ctx c = {0};
    c.N = N; c.C = C; c.HW = HW; c.eps = 1e-5f; c.mom = 0.1f; c.nout = n;
    c.fwd = train ? fwd_bn_train : fwd_bn_eval;
    c.inp = frand(n, 31); c.w = frand(C, 32); c.b = frand(C, 33);
    c.rm = frand(C, 34); c.rv = frand(C, 35);
    for (int k = 0; k < C; k++) { c.rv[k] = 1.0f + 0.5f * c.rv[k]; c.w[k] += 1.5f; }
    c.out = fzeros(n); c.mean = fzeros(C); c.rstd = fzeros(C);
    float * R = frand(n, 36), * dx = fzeros(n), * dw = fzeros(C), * db = fzeros(C);
    c.fwd(&c);
    kd_batchnorm_backward(dx, dw, db, R, c.inp, c.mean, c.rstd, c.w, N, C, HW, train);
    snprintf(name, sizeof name, "bn gradcheck dinp %s", tag);
    gradcheck(name, &c, R, c.inp, n, dx, 1e-2f);
    snprintf(name, sizeof name, "bn gradcheck dweight %s", tag);
    gradcheck(name, &c, R, c.w, C, dw, 1e-2f);
    snprintf(name, sizeof name, "bn gradcheck dbias %s", tag);
    gradcheck(name, &c, R, c.b, C, db, 1e-2f);

    // Two calls from zero give twice one call.
    float * dx2 = fzeros(n), * dw2 = fzeros(C), * db2 = fzeros(C);
    c.fwd(&c);
    kd_batchnorm_backward(dx2, dw2, db2, R, c.inp, c.mean, c.rstd, c.w, N, C, HW, train);
    kd_batchnorm_backward(dx2, dw2, db2, R, c.inp, c.mean, c.rstd, c.w, N, C, HW, train);
    for (size_t i = 0; i < n; i++) { dx[i] *= 2; }
    for (int i = 0; i < C; i++) { dw[i] *= 2; db[i] *= 2; }
    snprintf(name, sizeof name, "bn accumulate %s", tag);
    check_close(name, dx2, dx, n, 1e-6, 1e-6);
    check_close(name, dw2, dw, C, 1e-6, 1e-6);
    check_close(name, db2, db, C, 1e-6, 1e-6);
    free(c.inp); free(c.w); free(c.b); free(c.rm); free(c.rv); free(c.out); free(c.mean); free(c.rstd);
    free(R); free(dx); free(dw); free(db); free(dx2); free(dw2); free(db2);
}

static void test_bn_single_value(void) {
    // One value per channel: biased variance 0, no division by zero in the running update.
    float x[2] = { 0.7f, -0.2f }, w[2] = { 1, 1 }, b[2] = { 0, 0 }, out[2], mean[2], rstd[2];
    float rm[2] = { 0, 0 }, rv[2] = { 1, 1 };
    kd_batchnorm_forward_train(out, mean, rstd, rm, rv, x, w, b, 1, 2, 1, 1e-5f, 0.1f);
    CHECK(isfinite(rv[0]) && isfinite(rv[1]) && fabsf(rv[0] - 0.9f) < 1e-6f, "bn n=1 running_var %g", rv[0]);
    // x*alpha + beta with alpha = rstd*w ~ 316 cancels only to float rounding (as in PyTorch).
    CHECK(fabsf(out[0]) < 1e-4f && fabsf(out[1]) < 1e-4f, "bn n=1 output %g %g", out[0], out[1]);
}

static int value_equal(const float * a, const float * b, size_t n) {
    for (size_t i = 0; i < n; i++) { if (!(a[i] == b[i])) { return 0; } }
    return 1;
}

// weight/bias NULL (affine=False) must be BN with weight 1, bias 0: same outputs, running
// statistics and input gradients (train and eval); the gradients of the absent parameters
// are not asked for (dweight, dbias NULL).
static void test_bn_no_affine(int N, int C, int HW) {
    char name[128];
    size_t n = (size_t)N * C * HW;
    float * x = frand(n, 61), * dy = frand(n, 62), * ones = fzeros(C), * zeros = fzeros(C);
    for (int c = 0; c < C; c++) { ones[c] = 1.0f; }
    for (size_t i = 0; i < n; i++) { x[i] = 2.0f * x[i] - 0.3f; }
    for (int train = 1; train >= 0; train--) {
        float * out[2], * mean[2], * rstd[2], * rm[2], * rv[2], * dx[2];
        for (int v = 0; v < 2; v++) {
            out[v] = fzeros(n); mean[v] = fzeros(C); rstd[v] = fzeros(C); dx[v] = frand(n, 63);
            rm[v] = frand(C, 64); rv[v] = frand(C, 65);
            for (int c = 0; c < C; c++) { rv[v][c] = 1.0f + 0.5f * rv[v][c]; }
            const float * w = v ? NULL : ones, * b = v ? NULL : zeros;
            if (train) {
                kd_batchnorm_forward_train(out[v], mean[v], rstd[v], rm[v], rv[v], x, w, b, N, C, HW, 1e-5f, 0.1f);
            } else {
                kd_batchnorm_forward_eval(out[v], mean[v], rstd[v], x, w, b, rm[v], rv[v], N, C, HW, 1e-5f);
            }
            kd_batchnorm_backward(dx[v], NULL, NULL, dy, x, mean[v], rstd[v], w, N, C, HW, train);
        }
        snprintf(name, sizeof name, "bn affine=False %s N%d C%d HW%d", train ? "train" : "eval", N, C, HW);
        CHECK(value_equal(out[0], out[1], n), "%s: output differs from weight 1, bias 0", name);
        CHECK(value_equal(rm[0], rm[1], C) && value_equal(rv[0], rv[1], C), "%s: running statistics differ", name);
        CHECK(value_equal(dx[0], dx[1], n), "%s: input gradient differs from weight 1", name);
        for (int v = 0; v < 2; v++) {
            free(out[v]); free(mean[v]); free(rstd[v]); free(rm[v]); free(rv[v]); free(dx[v]);
        }
    }
    free(x); free(dy); free(ones); free(zeros);
}

// ----------------------------------------------------------------------------------------
// relu, pools, gap, dropout, add

static void fwd_relu(struct ctx * c) { kd_relu_forward(c->out, c->inp, c->n); }
static void fwd_maxpool(struct ctx * c) {
    kd_maxpool2d_forward(c->out, c->am, c->inp, c->N, c->C, c->H, c->W, c->OH, c->OW, c->K, c->S, c->P);
}
static void fwd_avgpool(struct ctx * c) {
    kd_avgpool2d_forward(c->out, c->inp, c->N, c->C, c->H, c->W, c->OH, c->OW, c->K, c->S, c->P);
}
static void fwd_gap(struct ctx * c) { kd_gap_forward(c->out, c->inp, c->N, c->C, c->HW); }
static void fwd_dropout(struct ctx * c) { kd_dropout_forward(c->out, c->work, c->inp, c->n, c->p, c->seed); }
static void fwd_add(struct ctx * c) { kd_add_forward(c->out, c->inp, c->inp2, c->n); }

static void test_relu(void) {
    size_t n = 300;
    struct ctx c = {0};
    c.n = n; c.nout = n; c.fwd = fwd_relu;
    c.inp = frand(n, 41); c.out = fzeros(n);
    // Away from the kink at 0.
    for (size_t i = 0; i < n; i++) { c.inp[i] = c.inp[i] < 0 ? c.inp[i] - 0.05f : c.inp[i] + 0.05f; }
    fwd_relu(&c);
    int ok = 1;
    for (size_t i = 0; i < n; i++) { ok &= c.out[i] == (c.inp[i] > 0 ? c.inp[i] : 0.0f); }
    CHECK(ok, "relu forward");
    float * R = frand(n, 42), * dx = fzeros(n);
    kd_relu_backward(dx, R, c.out, n);
    gradcheck("relu gradcheck", &c, R, c.inp, n, dx, 1e-2f);
    float * dx2 = fcopy(dx, n);
    kd_relu_backward(dx2, R, c.out, n);
    for (size_t i = 0; i < n; i++) { dx[i] *= 2; }
    check_close("relu accumulate", dx2, dx, n, 0, 0);
    float nan_in = NAN, nan_out = 0;
    kd_relu_forward(&nan_out, &nan_in, 1);
    CHECK(isnan(nan_out), "relu should propagate NaN like PyTorch");
    free(c.inp); free(c.out); free(R); free(dx); free(dx2);
}

static void ref_maxpool(float * out, int32_t * am, const float * x, int N, int C, int H, int W, int OH,
                        int OW, int K, int S, int P) {
    for (int nc = 0; nc < N * C; nc++) {
        for (int oh = 0; oh < OH; oh++) {
            for (int ow = 0; ow < OW; ow++) {
                float best = -INFINITY;
                int32_t bi = -1;
                for (int kh = 0; kh < K; kh++) {
                    for (int kw = 0; kw < K; kw++) {
                        int h = oh * S - P + kh, w = ow * S - P + kw;
                        if (h < 0 || h >= H || w < 0 || w >= W) { continue; }
                        float v = x[(size_t)nc * H * W + h * W + w];
                        if (bi < 0 || v > best) { best = v; bi = h * W + w; }
                    }
                }
                out[(size_t)nc * OH * OW + oh * OW + ow] = best;
                am[(size_t)nc * OH * OW + oh * OW + ow] = bi;
            }
        }
    }
}

static void test_maxpool(int N, int C, int H, int W, int K, int S, int P, uint64_t seed) {
    char tag[96], name[160];
    snprintf(tag, sizeof tag, "N%d C%d %dx%d K%d S%d P%d", N, C, H, W, K, S, P);
    int OH = (H + 2 * P - K) / S + 1, OW = (W + 2 * P - K) / S + 1;
    size_t ni = (size_t)N * C * H * W, no = (size_t)N * C * OH * OW;
    struct ctx c = {0};
    c.N = N; c.C = C; c.H = H; c.W = W; c.OH = OH; c.OW = OW; c.K = K; c.S = S; c.P = P;
    c.nout = no; c.fwd = fwd_maxpool;
    c.inp = fzeros(ni); c.out = fzeros(no); c.am = calloc(no, sizeof(int32_t));
    // 7919 is prime: coprime with every size used here, so fill_distinct gives a permutation.
    fill_distinct(c.inp, ni, 7919);
    fwd_maxpool(&c);
    float * ref = fzeros(no);
    int32_t * ram = calloc(no, sizeof(int32_t));
    ref_maxpool(ref, ram, c.inp, N, C, H, W, OH, OW, K, S, P);
    snprintf(name, sizeof name, "maxpool fwd %s", tag);
    check_close(name, c.out, ref, no, 0, 0);
    CHECK(memcmp(c.am, ram, no * sizeof(int32_t)) == 0, "maxpool argmax %s", tag);

    float * R = frand(no, seed + 1), * dx = fzeros(ni);
    kd_maxpool2d_backward(dx, R, c.am, N, C, H, W, OH, OW);
    snprintf(name, sizeof name, "maxpool gradcheck %s", tag);
    gradcheck(name, &c, R, c.inp, ni, dx, 1e-3f);

    // Ties: a constant plane takes the first in-image cell of each window.
    float * cst = fzeros(ni);
    for (size_t i = 0; i < ni; i++) { cst[i] = 0.5f; }
    kd_maxpool2d_forward(c.out, c.am, cst, N, C, H, W, OH, OW, K, S, P);
    ref_maxpool(ref, ram, cst, N, C, H, W, OH, OW, K, S, P);
    CHECK(memcmp(c.am, ram, no * sizeof(int32_t)) == 0, "maxpool ties take the first max %s", tag);
    // Padding never wins: an all-negative input keeps negative maxima.
    for (size_t i = 0; i < ni; i++) { cst[i] = -1.0f - (float)(i % 3); }
    kd_maxpool2d_forward(c.out, c.am, cst, N, C, H, W, OH, OW, K, S, P);
    ref_maxpool(ref, ram, cst, N, C, H, W, OH, OW, K, S, P);
    int ok = memcmp(c.am, ram, no * sizeof(int32_t)) == 0;
    for (size_t i = 0; i < no; i++) { ok &= c.out[i] == ref[i] && c.out[i] < 0; }
    CHECK(ok, "maxpool padding must not win %s", tag);
    // NaN wins (PyTorch propagates it).
    cst[0] = NAN;
    kd_maxpool2d_forward(c.out, c.am, cst, N, C, H, W, OH, OW, K, S, P);
    CHECK(isnan(c.out[0]) && c.am[0] == 0, "maxpool NaN should propagate %s", tag);
    free(c.inp); free(c.out); free(c.am); free(ref); free(ram); free(R); free(dx); free(cst);
}

// 2x2/stride-2 max pooling has an AVX-512 and a portable path: same values and argmax
// (bitwise) on every supported instruction set, on data with ties, -inf, +inf and NaN.
static void test_maxpool2x2_isas(int N, int C, int H, int W, uint64_t seed) {
    int OH = H / 2, OW = W / 2;
    size_t ni = (size_t)N * C * H * W, no = (size_t)N * C * OH * OW;
    float * x = frand(ni, seed);
    for (size_t i = 0; i < ni; i++) {
        if (i % 7 == 0) { x[i] = 0.25f; }              // ties
        if (i % 29 == 3) { x[i] = -INFINITY; }
        if (i % 31 == 5) { x[i] = INFINITY; }
        if (i % 37 == 11) { x[i] = NAN; }
    }
    enum kd_isa isa[KD_ISA_COUNT];
    const int n = supported_isas(isa);
    float * o[KD_ISA_COUNT];
    int32_t * a[KD_ISA_COUNT];
    for (int v = 0; v < n; v++) {
        use_isa(isa[v]);
        o[v] = fzeros(no); a[v] = calloc(no, sizeof(int32_t));
        kd_maxpool2d_forward(o[v], a[v], x, N, C, H, W, OH, OW, 2, 2, 0);
    }
    use_isa(run_isa);
    for (int v = 1; v < n; v++) {
        CHECK(bitwise_equal(o[0], o[v], no) && memcmp(a[0], a[v], no * sizeof(int32_t)) == 0,
              "maxpool 2x2 %s vs %s N%d C%d %dx%d", kd_isa_name(isa[0]), kd_isa_name(isa[v]), N, C, H, W);
    }
    for (int v = 0; v < n; v++) { free(o[v]); free(a[v]); }
    free(x);
}

// BN statistics have an AVX-512 and a portable path with the same lanes and reduction tree:
// bitwise equal on every supported instruction set.
static void test_bn_isas(int N, int C, int HW) {
    size_t n = (size_t)N * C * HW;
    float * x = frand(n, 95), * w = frand(C, 96), * b = frand(C, 97), * dy = frand(n, 98);
    for (size_t i = 0; i < n; i++) { x[i] = 2.0f * x[i] + 0.3f; }
    enum kd_isa isa[KD_ISA_COUNT];
    const int ni = supported_isas(isa);
    float * out[KD_ISA_COUNT], * mean[KD_ISA_COUNT], * rstd[KD_ISA_COUNT], * rm[KD_ISA_COUNT], * rv[KD_ISA_COUNT];
    float * dx[KD_ISA_COUNT], * dw[KD_ISA_COUNT], * db[KD_ISA_COUNT];
    for (int v = 0; v < ni; v++) {
        use_isa(isa[v]);
        out[v] = fzeros(n); mean[v] = fzeros(C); rstd[v] = fzeros(C); rm[v] = fzeros(C); rv[v] = fzeros(C);
        dx[v] = fzeros(n); dw[v] = fzeros(C); db[v] = fzeros(C);
        kd_batchnorm_forward_train(out[v], mean[v], rstd[v], rm[v], rv[v], x, w, b, N, C, HW, 1e-5f, 0.1f);
        kd_batchnorm_backward(dx[v], dw[v], db[v], dy, x, mean[v], rstd[v], w, N, C, HW, 1);
    }
    use_isa(run_isa);
    for (int v = 1; v < ni; v++) {
        int ok = bitwise_equal(out[0], out[v], n) && bitwise_equal(mean[0], mean[v], C) && bitwise_equal(rstd[0], rstd[v], C)
              && bitwise_equal(rv[0], rv[v], C) && bitwise_equal(dx[0], dx[v], n) && bitwise_equal(dw[0], dw[v], C)
              && bitwise_equal(db[0], db[v], C);
        CHECK(ok, "bn %s vs %s not bitwise equal N%d C%d HW%d", kd_isa_name(isa[0]), kd_isa_name(isa[v]), N, C, HW);
    }
    for (int v = 0; v < ni; v++) {
        free(out[v]); free(mean[v]); free(rstd[v]); free(rm[v]); free(rv[v]); free(dx[v]); free(dw[v]); free(db[v]);
    }
    free(x); free(w); free(b); free(dy);
}

static void test_avgpool(int N, int C, int H, int W, int K, int S, int P, uint64_t seed) {
    char tag[96], name[160];
    snprintf(tag, sizeof tag, "N%d C%d %dx%d K%d S%d P%d", N, C, H, W, K, S, P);
    int OH = (H + 2 * P - K) / S + 1, OW = (W + 2 * P - K) / S + 1;
    size_t ni = (size_t)N * C * H * W, no = (size_t)N * C * OH * OW;
    struct ctx c = {0};
    c.N = N; c.C = C; c.H = H; c.W = W; c.OH = OH; c.OW = OW; c.K = K; c.S = S; c.P = P;
    c.nout = no; c.fwd = fwd_avgpool;
    c.inp = frand(ni, seed); c.out = fzeros(no);
    fwd_avgpool(&c);
    float * ref = fzeros(no), * R = frand(no, seed + 1);
    float * dx = frand(ni, seed + 2), * rdx = fcopy(dx, ni);
    for (int nc = 0; nc < N * C; nc++) {
        for (int oh = 0; oh < OH; oh++) {
            for (int ow = 0; ow < OW; ow++) {
                double s = 0;
                size_t o = (size_t)nc * OH * OW + oh * OW + ow;
                for (int kh = 0; kh < K; kh++) {
                    for (int kw = 0; kw < K; kw++) {
                        int h = oh * S - P + kh, w = ow * S - P + kw;
                        if (h < 0 || h >= H || w < 0 || w >= W) { continue; }
                        s += c.inp[(size_t)nc * H * W + h * W + w];
                        rdx[(size_t)nc * H * W + h * W + w] += R[o] / (float)(K * K);
                    }
                }
                ref[o] = (float)(s / (K * K));   // count_include_pad: always K*K
            }
        }
    }
    snprintf(name, sizeof name, "avgpool fwd %s", tag);
    check_close(name, c.out, ref, no, 1e-6, 1e-6);
    kd_avgpool2d_backward(dx, R, N, C, H, W, OH, OW, K, S, P);
    snprintf(name, sizeof name, "avgpool bwd %s", tag);
    check_close(name, dx, rdx, ni, 1e-6, 1e-6);
    float * dx0 = fzeros(ni);
    kd_avgpool2d_backward(dx0, R, N, C, H, W, OH, OW, K, S, P);
    snprintf(name, sizeof name, "avgpool gradcheck %s", tag);
    gradcheck(name, &c, R, c.inp, ni, dx0, 1e-2f);
    free(c.inp); free(c.out); free(ref); free(R); free(dx); free(rdx); free(dx0);
}

static void test_gap(void) {
    int N = 3, C = 4, HW = 13;
    size_t ni = (size_t)N * C * HW, no = (size_t)N * C;
    struct ctx c = {0};
    c.N = N; c.C = C; c.HW = HW; c.nout = no; c.fwd = fwd_gap;
    c.inp = frand(ni, 51); c.out = fzeros(no);
    fwd_gap(&c);
    float * ref = fzeros(no);
    for (size_t k = 0; k < no; k++) {
        double s = 0;
        for (int i = 0; i < HW; i++) { s += c.inp[k * HW + i]; }
        ref[k] = (float)(s / HW);
    }
    check_close("gap fwd", c.out, ref, no, 1e-7, 1e-6);
    float * R = frand(no, 52), * dx = fzeros(ni);
    kd_gap_backward(dx, R, N, C, HW);
    gradcheck("gap gradcheck", &c, R, c.inp, ni, dx, 1e-2f);
    float * dx2 = fcopy(dx, ni);
    kd_gap_backward(dx2, R, N, C, HW);
    for (size_t i = 0; i < ni; i++) { dx[i] *= 2; }
    check_close("gap accumulate", dx2, dx, ni, 0, 0);
    free(c.inp); free(c.out); free(ref); free(R); free(dx); free(dx2);
}

static void test_dropout(void) {
    size_t n = 100000;
    float * x = frand(n, 61), * out = fzeros(n), * mask = fzeros(n);
    kd_dropout_forward(out, mask, x, n, 0.0f, 7);
    int ok = 1;
    for (size_t i = 0; i < n; i++) { ok &= mask[i] == 1.0f && out[i] == x[i]; }
    CHECK(ok, "dropout p=0 is the identity");

    float p = 0.3f, scale = 1.0f / (1.0f - p);
    kd_dropout_forward(out, mask, x, n, p, 7);
    size_t zeros = 0;
    ok = 1;
    for (size_t i = 0; i < n; i++) {
        float want = kd_uniform(kd_hash(7, i)) < p ? 0.0f : scale;
        ok &= mask[i] == want && out[i] == x[i] * want;
        zeros += mask[i] == 0.0f;
    }
    CHECK(ok, "dropout mask follows kd_hash(seed, i)");
    CHECK(fabs((double)zeros / n - p) < 0.01, "dropout drop rate %g", (double)zeros / n);
#ifdef _OPENMP
    float * mask1 = fzeros(n);
    set_threads(1);
    kd_dropout_forward(out, mask1, x, n, p, 7);
    set_threads(2);
    CHECK(bitwise_equal(mask, mask1, n), "dropout mask 1 vs 2 threads");
    free(mask1);
#endif
    float * other = fzeros(n);
    kd_dropout_forward(out, other, x, n, p, 8);
    CHECK(!bitwise_equal(mask, other, n), "dropout masks differ across seeds");
    free(other);

    // Small gradcheck: with the mask fixed by the seed the layer is linear.
    struct ctx c = {0};
    size_t m = 200;
    c.n = m; c.nout = m; c.p = 0.4f; c.seed = 3; c.fwd = fwd_dropout;
    c.inp = frand(m, 62); c.out = fzeros(m); c.work = fzeros(m);
    fwd_dropout(&c);
    float * R = frand(m, 63), * dx = fzeros(m);
    kd_dropout_backward(dx, R, c.work, m);
    gradcheck("dropout gradcheck", &c, R, c.inp, m, dx, 1e-2f);
    float * dx2 = fcopy(dx, m);
    kd_dropout_backward(dx2, R, c.work, m);
    for (size_t i = 0; i < m; i++) { dx[i] *= 2; }
    check_close("dropout accumulate", dx2, dx, m, 0, 0);
    free(x); free(out); free(mask); free(c.inp); free(c.out); free(c.work); free(R); free(dx); free(dx2);
}

// ----------------------------------------------------------------------------------------
// layers_combine.c: sigmoid, mul (with channel broadcast), concat, nearest resize. Each
// against a direct reference, its backward against finite differences, and accumulation.

static void fwd_sigmoid(struct ctx * c) { kd_sigmoid_forward(c->out, c->inp, c->n); }
static void fwd_mul(struct ctx * c) { kd_mul_forward(c->out, c->inp, c->inp2, c->N, c->C, c->OC, c->HW); }
static void fwd_concat(struct ctx * c) { kd_concat_forward(c->out, c->inp, c->inp2, c->N, c->C, c->OC, c->HW); }
static void fwd_nearest(struct ctx * c) { kd_nearest_forward(c->out, c->inp, c->N, c->C, c->H, c->W, c->OH, c->OW); }

static void test_sigmoid(void) {
    size_t n = 300;
    struct ctx c = {0};
    c.n = n; c.nout = n; c.fwd = fwd_sigmoid;
    c.inp = frand(n, 61); c.out = fzeros(n);
    for (size_t i = 0; i < n; i++) c.inp[i] *= 6.0f;
    fwd_sigmoid(&c);
    int ok = 1;
    for (size_t i = 0; i < n; i++) ok &= fabs(c.out[i] - 1.0 / (1.0 + exp(-(double)c.inp[i]))) < 1e-6;
    CHECK(ok, "sigmoid forward");
    float * R = frand(n, 62), * dx = fzeros(n);
    kd_sigmoid_backward(dx, R, c.out, n);
    gradcheck("sigmoid gradcheck", &c, R, c.inp, n, dx, 1e-2f);
    float * dx2 = fcopy(dx, n);
    kd_sigmoid_backward(dx2, R, c.out, n);
    for (size_t i = 0; i < n; i++) dx[i] *= 2;
    check_close("sigmoid accumulate", dx2, dx, n, 0, 0);
    float big[4] = { -200.0f, 200.0f, NAN, 0.0f }, o[4];
    kd_sigmoid_forward(o, big, 4);
    CHECK(o[0] == 0.0f && o[1] == 1.0f && isnan(o[2]) && o[3] == 0.5f, "sigmoid saturates to 0 and 1, propagates NaN");
    free(c.inp); free(c.out); free(R); free(dx); free(dx2);
}

// b with Cb = C (elementwise) or 1 (broadcast over channels)
static void test_mul(int N, int C, int Cb, int HW) {
    struct ctx c = {0};
    const size_t na = (size_t)N * C * HW, nb = (size_t)N * Cb * HW;
    c.N = N; c.C = C; c.OC = Cb; c.HW = HW; c.nout = na; c.fwd = fwd_mul;
    c.inp = frand(na, 71); c.inp2 = frand(nb, 72); c.out = fzeros(na);
    fwd_mul(&c);
    int ok = 1;
    for (int n = 0; n < N; n++)
        for (int ch = 0; ch < C; ch++)
            for (int i = 0; i < HW; i++) {
                size_t k = ((size_t)n * C + ch) * HW + i, kb = ((size_t)n * Cb + (Cb == 1 ? 0 : ch)) * HW + i;
                ok &= c.out[k] == c.inp[k] * c.inp2[kb];
            }
    CHECK(ok, "mul forward (C %d, Cb %d)", C, Cb);
    float * R = frand(na, 73), * da = fzeros(na), * db = fzeros(nb);
    kd_mul_backward(da, db, R, c.inp, c.inp2, N, C, Cb, HW);
    gradcheck("mul gradcheck a", &c, R, c.inp, na, da, 1e-2f);
    gradcheck("mul gradcheck b", &c, R, c.inp2, nb, db, 1e-2f);
    float * db2 = fcopy(db, nb);
    kd_mul_backward(NULL, db2, R, c.inp, c.inp2, N, C, Cb, HW);
    for (size_t i = 0; i < nb; i++) db[i] *= 2;
    check_close("mul accumulate", db2, db, nb, 1e-6, 1e-6);
    free(c.inp); free(c.inp2); free(c.out); free(R); free(da); free(db); free(db2);
}

static void test_concat(int N, int Ca, int Cb, int HW) {
    struct ctx c = {0};
    const size_t na = (size_t)N * Ca * HW, nb = (size_t)N * Cb * HW, no = na + nb;
    c.N = N; c.C = Ca; c.OC = Cb; c.HW = HW; c.nout = no; c.fwd = fwd_concat;
    c.inp = frand(na, 81); c.inp2 = frand(nb, 82); c.out = fzeros(no);
    fwd_concat(&c);
    int ok = 1;
    for (int n = 0; n < N; n++)
        for (int ch = 0; ch < Ca + Cb; ch++)
            for (int i = 0; i < HW; i++) {
                float want = ch < Ca ? c.inp[((size_t)n * Ca + ch) * HW + i] : c.inp2[((size_t)n * Cb + ch - Ca) * HW + i];
                ok &= c.out[((size_t)n * (Ca + Cb) + ch) * HW + i] == want;
            }
    CHECK(ok, "concat forward");
    float * R = frand(no, 83), * da = fzeros(na), * db = fzeros(nb);
    kd_concat_backward(da, db, R, N, Ca, Cb, HW);
    gradcheck("concat gradcheck a", &c, R, c.inp, na, da, 1e-2f);
    gradcheck("concat gradcheck b", &c, R, c.inp2, nb, db, 1e-2f);
    free(c.inp); free(c.inp2); free(c.out); free(R); free(da); free(db);
}

// Reference: PyTorch's rule, source index floor(o * (float)in / out) clamped to in - 1.
static void test_nearest(int N, int C, int H, int W, int OH, int OW) {
    struct ctx c = {0};
    const size_t ni = (size_t)N * C * H * W, no = (size_t)N * C * OH * OW;
    c.N = N; c.C = C; c.H = H; c.W = W; c.OH = OH; c.OW = OW; c.nout = no; c.fwd = fwd_nearest;
    c.inp = frand(ni, 91); c.out = fzeros(no);
    fwd_nearest(&c);
    int ok = 1;
    for (int p = 0; p < N * C; p++)
        for (int oh = 0; oh < OH; oh++)
            for (int ow = 0; ow < OW; ow++) {
                int sh = (int)floorf((float)oh * ((float)H / (float)OH)), sw = (int)floorf((float)ow * ((float)W / (float)OW));
                sh = sh < H - 1 ? sh : H - 1;
                sw = sw < W - 1 ? sw : W - 1;
                ok &= c.out[((size_t)p * OH + oh) * OW + ow] == c.inp[((size_t)p * H + sh) * W + sw];
            }
    CHECK(ok, "nearest forward %dx%d -> %dx%d", H, W, OH, OW);
    float * R = frand(no, 92), * dx = fzeros(ni);
    kd_nearest_backward(dx, R, N, C, H, W, OH, OW);
    gradcheck("nearest gradcheck", &c, R, c.inp, ni, dx, 1e-2f);
    free(c.inp); free(c.out); free(R); free(dx);
}

static void fwd_bilinear(struct ctx * c) { kd_bilinear_forward(c->out, c->inp, c->N, c->C, c->H, c->W, c->OH, c->OW); }
static void fwd_leaky(struct ctx * c) { kd_leaky_relu_forward(c->out, c->inp, c->n, c->p); }
static void fwd_tanh(struct ctx * c) { kd_tanh_forward(c->out, c->inp, c->n); }

// Reference in double from PyTorch's align_corners=False rule.
static void test_bilinear(int N, int C, int H, int W, int OH, int OW) {
    struct ctx c = {0};
    const size_t ni = (size_t)N * C * H * W, no = (size_t)N * C * OH * OW;
    c.N = N; c.C = C; c.H = H; c.W = W; c.OH = OH; c.OW = OW; c.nout = no; c.fwd = fwd_bilinear;
    c.inp = frand(ni, 101); c.out = fzeros(no);
    fwd_bilinear(&c);
    double maxerr = 0;
    for (int p = 0; p < N * C; p++)
        for (int oh = 0; oh < OH; oh++)
            for (int ow = 0; ow < OW; ow++) {
                double sh = fmax(0.0, (oh + 0.5) * H / OH - 0.5), sw = fmax(0.0, (ow + 0.5) * W / OW - 0.5);
                int h0 = (int)sh, w0 = (int)sw, h1 = h0 < H - 1 ? h0 + 1 : h0, w1 = w0 < W - 1 ? w0 + 1 : w0;
                double lh = sh - h0, lw = sw - w0;
                const float * x = c.inp + (size_t)p * H * W;
                double want = (1 - lh) * ((1 - lw) * x[h0 * W + w0] + lw * x[h0 * W + w1]) +
                              lh * ((1 - lw) * x[h1 * W + w0] + lw * x[h1 * W + w1]);
                maxerr = fmax(maxerr, fabs(want - c.out[((size_t)p * OH + oh) * OW + ow]));
            }
    CHECK(maxerr < 1e-5, "bilinear forward %dx%d -> %dx%d: max error %g", H, W, OH, OW, maxerr);
    float * R = frand(no, 102), * dx = fzeros(ni);
    kd_bilinear_backward(dx, R, N, C, H, W, OH, OW);
    gradcheck("bilinear gradcheck", &c, R, c.inp, ni, dx, 1e-2f);
    free(c.inp); free(c.out); free(R); free(dx);
}

static void test_leaky_tanh(void) {
    size_t n = 300;
    struct ctx c = {0};
    c.n = n; c.nout = n;
    c.inp = frand(n, 111); c.out = fzeros(n);
    for (size_t i = 0; i < n; i++) c.inp[i] = c.inp[i] < 0 ? c.inp[i] * 3 - 0.05f : c.inp[i] * 3 + 0.05f;
    float * R = frand(n, 112), * dx = fzeros(n);
    const float slopes[3] = { 0.01f, 0.2f, -0.5f };
    for (int k = 0; k < 3; k++) {
        c.p = slopes[k]; c.fwd = fwd_leaky;
        fwd_leaky(&c);
        int ok = 1;
        for (size_t i = 0; i < n; i++) ok &= c.out[i] == (c.inp[i] > 0 ? c.inp[i] : c.inp[i] * slopes[k]);
        CHECK(ok, "leaky relu forward (slope %g)", slopes[k]);
        memset(dx, 0, n * sizeof(float));
        kd_leaky_relu_backward(dx, R, c.inp, n, slopes[k]);
        gradcheck("leaky relu gradcheck", &c, R, c.inp, n, dx, 1e-2f);
    }
    c.fwd = fwd_tanh;
    fwd_tanh(&c);
    int ok = 1;
    for (size_t i = 0; i < n; i++) ok &= fabs(c.out[i] - tanh((double)c.inp[i])) < 1e-6;
    CHECK(ok, "tanh forward");
    memset(dx, 0, n * sizeof(float));
    kd_tanh_backward(dx, R, c.out, n);
    gradcheck("tanh gradcheck", &c, R, c.inp, n, dx, 1e-2f);
    free(c.inp); free(c.out); free(R); free(dx);
}

static void test_add(void) {
    size_t n = 50000;    // above the parallel threshold
    struct ctx c = {0};
    c.n = n; c.nout = n; c.fwd = fwd_add;
    c.inp = frand(n, 71); c.inp2 = frand(n, 72); c.out = fzeros(n);
    fwd_add(&c);
    int ok = 1;
    for (size_t i = 0; i < n; i++) { ok &= c.out[i] == c.inp[i] + c.inp2[i]; }
    CHECK(ok, "add forward");
    float * R = frand(n, 73), * da = frand(n, 74), * db = frand(n, 75);
    float * rda = fcopy(da, n), * rdb = fcopy(db, n);
    kd_add_backward(da, db, R, n);
    kd_add_backward(NULL, db, R, n);
    for (size_t i = 0; i < n; i++) { rda[i] += R[i]; rdb[i] += R[i]; rdb[i] += R[i]; }
    check_close("add backward da", da, rda, n, 0, 0);
    check_close("add backward db (twice)", db, rdb, n, 0, 0);
    // A small gradcheck of both operands.
    c.n = c.nout = 64;
    float * g = fzeros(64), * g2 = fzeros(64);
    kd_add_backward(g, g2, R, 64);
    gradcheck("add gradcheck a", &c, R, c.inp, 64, g, 1e-2f);
    gradcheck("add gradcheck b", &c, R, c.inp2, 64, g2, 1e-2f);
    free(c.inp); free(c.inp2); free(c.out); free(R); free(da); free(db); free(rda); free(rdb);
    free(g); free(g2);
}

// ----------------------------------------------------------------------------------------
// thread invariance (OpenMP builds)

#ifdef _OPENMP
// Linear runs one top-level, BLAS-threaded sgemm. OpenBLAS splits the matrices into
// per-thread blocks and its edge micro-kernels round differently from the full ones, so
// the result changes in the last bits with the thread count: deterministic for a given
// count (checked bitwise), equal only to rounding across counts.
static void test_linear_threads(int engine) {
    // Large enough for OpenBLAS to actually use 2 threads at top level.
    int N = 64, C = 300, OC = 200;
    size_t ni = (size_t)N * C, nw = (size_t)OC * C, no = (size_t)N * OC;
    float * inp = frand(ni, 81), * w = frand(nw, 82), * b = frand(OC, 83), * dout = frand(no, 84);
    float * out[3], * dinp[3], * dw[3], * db[3];
    kd_linear_force_engine(engine);
    for (int t = 0; t < 3; t++) {
        set_threads(t == 0 ? 1 : 2);
        out[t] = fzeros(no); dinp[t] = fzeros(ni); dw[t] = fzeros(nw); db[t] = fzeros(OC);
        lin_fwd(out[t], inp, w, b, N, C, OC);
        lin_bwd(dinp[t], dw[t], db[t], dout, inp, w, N, C, OC);
    }
    kd_linear_force_engine(0);
    set_threads(2);
    int ok = bitwise_equal(out[1], out[2], no) && bitwise_equal(dinp[1], dinp[2], ni)
          && bitwise_equal(dw[1], dw[2], nw) && bitwise_equal(db[1], db[2], OC);
    CHECK(ok, "linear (engine %d) with 2 threads not deterministic", engine);
    CHECK(bitwise_equal(db[0], db[1], OC), "linear dbias 1 vs 2 threads not bitwise equal");
    if (engine == 1) {   // own product: fixed chains, whatever the thread count
        CHECK(bitwise_equal(out[0], out[1], no) && bitwise_equal(dinp[0], dinp[1], ni) && bitwise_equal(dw[0], dw[1], nw),
              "linear own product: 1 vs 2 threads not bitwise equal");
    }
    check_close("linear fwd 1 vs 2 threads", out[1], out[0], no, 3e-5, 1e-5);
    check_close("linear dinp 1 vs 2 threads", dinp[1], dinp[0], ni, 3e-5, 1e-5);
    check_close("linear dweight 1 vs 2 threads", dw[1], dw[0], nw, 3e-5, 1e-5);
    for (int t = 0; t < 3; t++) { free(out[t]); free(dinp[t]); free(dw[t]); free(db[t]); }
    free(inp); free(w); free(b); free(dout);
}

// Deterministic mode: linear and conv results bitwise equal at 1, 2 and 3 threads, weight
// gradients included (the kernels whose reductions otherwise follow the thread count). The
// sizes span several linear tiles and give conv batches that do not divide evenly into the
// threads or the chunks.
static void test_deterministic_threads(void) {
    kd_set_deterministic(true);
    int N = 150, C = 300, OC = 270;
    size_t ni = (size_t)N * C, nw = (size_t)OC * C, no = (size_t)N * OC;
    float * inp = frand(ni, 85), * w = frand(nw, 86), * b = frand(OC, 87), * dout = frand(no, 88);
    float * out[3], * dinp[3], * dw[3], * db[3];
    for (int t = 0; t < 3; t++) {
        set_threads(t + 1);
        out[t] = fzeros(no); dinp[t] = fzeros(ni); dw[t] = fzeros(nw); db[t] = fzeros(OC);
        lin_fwd(out[t], inp, w, b, N, C, OC);
        lin_bwd(dinp[t], dw[t], db[t], dout, inp, w, N, C, OC);
    }
    for (int t = 1; t < 3; t++) {
        CHECK(bitwise_equal(out[0], out[t], no) && bitwise_equal(dinp[0], dinp[t], ni) &&
              bitwise_equal(dw[0], dw[t], nw) && bitwise_equal(db[0], db[t], OC),
              "deterministic linear: 1 vs %d threads not bitwise equal", t + 1);
    }
    // Still the same product (tiling changes rounding only).
    float * ref = fzeros(no), * rdinp = fzeros(ni), * rdw = fzeros(nw), * rdb = fzeros(OC);
    ref_linear_fwd(ref, inp, w, b, N, C, OC);
    ref_linear_bwd(rdinp, rdw, rdb, dout, inp, w, N, C, OC);
    check_close("deterministic linear fwd vs reference", out[0], ref, no, 3e-5, 1e-5);
    check_close("deterministic linear dinp vs reference", dinp[0], rdinp, ni, 3e-5, 1e-5);
    check_close("deterministic linear dweight vs reference", dw[0], rdw, nw, 1e-4, 1e-5);
    free(ref); free(rdinp); free(rdw); free(rdb);
    for (int t = 0; t < 3; t++) { free(out[t]); free(dinp[t]); free(dw[t]); free(db[t]); }
    free(inp); free(w); free(b); free(dout);

    const struct kd_conv_shape shapes[] = {
        conv_shape(13, 8, 12, 11, 16, 3, 1, 1, 1),   // shift path, 13 images in 8 chunks
        conv_shape(5, 16, 14, 14, 32, 3, 2, 1, 1),   // stride 2, fewer images than chunks
        conv_shape(11, 64, 7, 7, 64, 3, 1, 1, 1),    // col path, groups of images
        conv_shape(9, 8, 6, 6, 16, 3, 1, 1, 2),      // groups
    };
    for (size_t k = 0; k < sizeof shapes / sizeof *shapes; k++) {
        const struct kd_conv_shape * s = &shapes[k];
        struct conv_bufs q = conv_bufs_new(s, 1, 900 + 10 * k);
        float * cout[3], * cdinp[3], * cdw[3], * cdb[3];
        for (int t = 0; t < 3; t++) {
            set_threads(t + 1);
            float * work = conv_work(s);
            cout[t] = fzeros(q.no); cdinp[t] = fzeros(q.ni); cdw[t] = fzeros(q.nw); cdb[t] = fzeros(s->OC);
            kd_conv2d_forward(cout[t], q.inp, q.w, q.b, s, work);
            kd_conv2d_backward(cdinp[t], cdw[t], cdb[t], q.dout, q.inp, q.w, s, work);
            free(work);
        }
        for (int t = 1; t < 3; t++) {
            CHECK(bitwise_equal(cout[0], cout[t], q.no) && bitwise_equal(cdinp[0], cdinp[t], q.ni) &&
                  bitwise_equal(cdw[0], cdw[t], q.nw) && bitwise_equal(cdb[0], cdb[t], s->OC),
                  "deterministic conv N%d C%d OC%d S%d G%d: 1 vs %d threads not bitwise equal",
                  s->N, s->C, s->OC, s->S, s->G, t + 1);
        }
        for (int t = 0; t < 3; t++) { free(cout[t]); free(cdinp[t]); free(cdw[t]); free(cdb[t]); }
        conv_bufs_free(&q);
    }
    // The workspace covers the chunks' partials whatever the thread count.
    struct kd_conv_shape ws = conv_shape(8, 16, 10, 12, 32, 3, 1, 1, 2);
    CHECK(kd_conv2d_workspace(&ws, 1) == kd_conv2d_workspace(&ws, KD_DET_CONV_CHUNKS),
          "deterministic conv workspace holds every chunk's partial");
    kd_set_deterministic(false);
    CHECK(kd_conv2d_workspace(&ws, 1) < kd_conv2d_workspace(&ws, 2), "workspace back to per-thread");
    set_threads(2);
}

static void test_bn_threads(void) {
    int N = 8, C = 16, HW = 300;
    size_t n = (size_t)N * C * HW;
    float * x = frand(n, 91), * w = frand(C, 92), * b = frand(C, 93), * dy = frand(n, 94);
    float * out[2], * mean[2], * rstd[2], * rm[2], * rv[2], * dx[2], * dw[2], * db[2], * eout[2], * edx[2];
    for (int t = 0; t < 2; t++) {
        set_threads(t + 1);
        out[t] = fzeros(n); mean[t] = fzeros(C); rstd[t] = fzeros(C); rm[t] = fzeros(C); rv[t] = fzeros(C);
        dx[t] = fzeros(n); dw[t] = fzeros(C); db[t] = fzeros(C); eout[t] = fzeros(n); edx[t] = fzeros(n);
        for (int c = 0; c < C; c++) { rv[t][c] = 1.0f; }
        kd_batchnorm_forward_train(out[t], mean[t], rstd[t], rm[t], rv[t], x, w, b, N, C, HW, 1e-5f, 0.1f);
        kd_batchnorm_backward(dx[t], dw[t], db[t], dy, x, mean[t], rstd[t], w, N, C, HW, 1);
        float em[16], er[16];
        kd_batchnorm_forward_eval(eout[t], em, er, x, w, b, rm[t], rv[t], N, C, HW, 1e-5f);
        kd_batchnorm_backward(edx[t], NULL, NULL, dy, x, em, er, w, N, C, HW, 0);
    }
    set_threads(2);
    int ok = bitwise_equal(out[0], out[1], n) && bitwise_equal(mean[0], mean[1], C)
          && bitwise_equal(rstd[0], rstd[1], C) && bitwise_equal(rm[0], rm[1], C)
          && bitwise_equal(rv[0], rv[1], C);
    CHECK(ok, "bn train forward 1 vs 2 threads not bitwise equal");
    ok = bitwise_equal(dx[0], dx[1], n) && bitwise_equal(dw[0], dw[1], C) && bitwise_equal(db[0], db[1], C);
    CHECK(ok, "bn backward 1 vs 2 threads not bitwise equal");
    ok = bitwise_equal(eout[0], eout[1], n) && bitwise_equal(edx[0], edx[1], n);
    CHECK(ok, "bn eval 1 vs 2 threads not bitwise equal");
    for (int t = 0; t < 2; t++) {
        free(out[t]); free(mean[t]); free(rstd[t]); free(rm[t]); free(rv[t]); free(dx[t]); free(dw[t]);
        free(db[t]); free(eout[t]); free(edx[t]);
    }
    free(x); free(w); free(b); free(dy);
}

// sgemm inside our OpenMP region must run single-threaded: needs OpenBLAS's OpenMP build.
// Also reports the conv speedup from 1 to 2 threads (informational; timing is not asserted).
static void test_blas_threading(void) {
    CHECK(openblas_get_parallel() == 2, "OpenBLAS is not the OpenMP build (parallel=%d)",
          openblas_get_parallel());
    struct kd_conv_shape s = conv_shape(16, 32, 32, 32, 64, 3, 1, 1, 1);
    struct conv_bufs q = conv_bufs_new(&s, 1, 101);
    double t[2];
    const int reps = kdt_quick() ? 1 : 3;   // under valgrind one run (~100 s) is the whole point
    for (int k = 0; k < 2; k++) {
        set_threads(k + 1);
        float * work = conv_work(&s);
        if (!kdt_quick()) kd_conv2d_forward(q.out, q.inp, q.w, q.b, &s, work);   // warm-up
        double t0 = now_s();
        for (int r = 0; r < reps; r++) { kd_conv2d_forward(q.out, q.inp, q.w, q.b, &s, work); }
        t[k] = (now_s() - t0) / reps;
        free(work);
    }
    set_threads(2);
    printf("conv fwd N16 C32 32x32 OC64 K3: %.2f ms (1 thread), %.2f ms (2 threads)%s\n",
           1e3 * t[0], 1e3 * t[1], kdt_quick() ? " [KDTEST_QUICK: one run, not a measurement]" : "");
    conv_bufs_free(&q);
}
#endif

// ----------------------------------------------------------------------------------------
// instruction-set choice (kdcore.h, "Instruction set")

void kd_isa_test_reset(int cap);   // test hook: decide again at next use, CPU capped at `cap`

static void with_env(const char * value) {
    if (value == NULL) { unsetenv("KDCORE_ISA"); } else { setenv("KDCORE_ISA", value, 1); }
}

// Names, support, kd_set_isa/kd_get_isa, and how KDCORE_ISA is read and refused (a CPU
// without AVX-512, or with AVX2 only, is simulated by capping the detected support).
// Leaves the choice as KDCORE_ISA made it for this run.
static void test_isa_api(void) {
    const char * env = getenv("KDCORE_ISA");
    char * saved = env ? strdup(env) : NULL;
    const char * names[KD_ISA_COUNT] = { "auto", "portable", "avx2", "avx512" };
    for (int l = 0; l < KD_ISA_COUNT; l++) {
        CHECK(strcmp(kd_isa_name((enum kd_isa)l), names[l]) == 0, "kd_isa_name(%d)", l);
    }
    CHECK(kd_isa_name(KD_ISA_COUNT) == NULL && kd_isa_name((enum kd_isa)-1) == NULL, "kd_isa_name of a bad value");
    CHECK(kd_isa_supported(KD_ISA_AUTO) && kd_isa_supported(KD_ISA_PORTABLE), "auto and portable always supported");
    CHECK(!kd_isa_supported(KD_ISA_COUNT) && !kd_isa_supported((enum kd_isa)-1), "bad values unsupported");
    CHECK(kd_isa_supported(KD_ISA_AVX2) == (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")),
          "AVX2 support as the CPU reports it");
    CHECK(kd_isa_supported(KD_ISA_AVX512) == (kd_isa_supported(KD_ISA_AVX2) && __builtin_cpu_supports("avx512f")),
          "AVX-512 support as the CPU reports it");
    enum kd_isa isa[KD_ISA_COUNT];
    const int n = supported_isas(isa);
    for (int v = 0; v < n; v++) {
        use_isa(isa[v]);
        char want[64];
        snprintf(want, sizeof want, "kernels: %s (kd_set_isa;", kd_isa_name(isa[v]));
        CHECK(strstr(kd_blas_config(), want) != NULL, "kd_blas_config reports %s: %s", want, kd_blas_config());
    }
    CHECK(kd_set_isa(KD_ISA_AUTO) == KD_OK && kd_get_isa() == isa[0], "kd_set_isa(auto) = the best supported");
    CHECK(kd_set_isa(KD_ISA_COUNT) == KD_ERR_VALUE && strstr(kd_last_error(), "not an enum kd_isa") != NULL
          && kd_get_isa() == isa[0], "kd_set_isa(bad value) refused, nothing changed: %s", kd_last_error());

    // KDCORE_ISA, read at the next use after a reset
    struct { const char * env; int cap; int ok; enum kd_isa want; const char * says; } cases[] = {
        { NULL, KD_ISA_COUNT, 1, isa[0], "(automatic: KDCORE_ISA unset;" },
        { "", KD_ISA_COUNT, 1, isa[0], "(automatic: KDCORE_ISA unset;" },
        { "auto", KD_ISA_COUNT, 1, isa[0], "(KDCORE_ISA=auto;" },
        { "Portable", KD_ISA_COUNT, 1, KD_ISA_PORTABLE, "portable (KDCORE_ISA=Portable;" },
        { "avx3", KD_ISA_COUNT, 0, isa[0], "is not one of auto, avx512, avx2, portable" },
        { "avx512", KD_ISA_AVX2, 0, KD_ISA_AVX2, "KDCORE_ISA=avx512: this CPU does not support avx512 (it supports avx2, portable)" },
        { "avx2", KD_ISA_PORTABLE, 0, KD_ISA_PORTABLE, "does not support avx2 (it supports portable)" },
        { "auto", KD_ISA_AVX2, 1, KD_ISA_AVX2, "avx2 (KDCORE_ISA=auto; CPU supports avx2 portable)" },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        if (cases[i].cap < KD_ISA_COUNT && !kd_isa_supported((enum kd_isa)cases[i].cap)) continue;
        if (cases[i].cap == KD_ISA_COUNT && cases[i].want != isa[0] && !kd_isa_supported(cases[i].want)) continue;
        with_env(cases[i].env);
        kd_isa_test_reset(cases[i].cap);
        enum kd_status st = kd_isa_init();
        const char * e = cases[i].env ? cases[i].env : "(unset)";
        CHECK((st == KD_OK) == cases[i].ok, "KDCORE_ISA=%s: kd_isa_init %s", e, kd_status_str(st));
        if (!cases[i].ok) {
            CHECK(strstr(kd_last_error(), cases[i].says) != NULL, "KDCORE_ISA=%s: message %s", e, kd_last_error());
            CHECK(strstr(kd_isa_config(), "(automatic; refused: ") != NULL, "refusal in kd_isa_config: %s", kd_isa_config());
            CHECK(kd_isa_init() == KD_ERR_VALUE, "kd_isa_init keeps reporting the refusal");
        } else {
            CHECK(strstr(kd_isa_config(), cases[i].says) != NULL, "KDCORE_ISA=%s: kd_isa_config %s", e, kd_isa_config());
        }
        CHECK(kd_get_isa() == cases[i].want, "KDCORE_ISA=%s: runs %s, want %s", e, kd_isa_name(kd_get_isa()),
              kd_isa_name(cases[i].want));
        if (cases[i].cap == KD_ISA_AVX2) {
            CHECK(!kd_isa_supported(KD_ISA_AVX512) && kd_set_isa(KD_ISA_AVX512) == KD_ERR_VALUE
                  && strstr(kd_last_error(), "does not support avx512") != NULL && kd_get_isa() == cases[i].want,
                  "kd_set_isa(avx512) refused without AVX-512: %s", kd_last_error());
        }
    }
    with_env(saved);
    free(saved);
    kd_isa_test_reset(KD_ISA_COUNT);
    CHECK(kd_isa_init() == KD_OK && kd_get_isa() == run_isa, "the run's choice restored");
}

// ----------------------------------------------------------------------------------------

// conv2d reference cases: N, C, H, W, OC, K, S, P, G
static void test_conv_ref_all(void) {
    test_conv_ref(conv_shape(1, 3, 7, 5, 4, 3, 1, 1, 1), 1, 100);     // batch 1, H != W
    test_conv_ref(conv_shape(3, 4, 9, 8, 6, 3, 2, 0, 1), 0, 110);     // stride 2, no padding, no bias
    test_conv_ref(conv_shape(2, 4, 6, 7, 6, 3, 1, 1, 2), 1, 120);     // groups 2
    test_conv_ref(conv_shape(3, 5, 7, 6, 5, 3, 1, 1, 5), 1, 130);     // depthwise
    test_conv_ref(conv_shape(2, 4, 8, 7, 4, 3, 2, 1, 4), 0, 140);     // depthwise, stride 2
    test_conv_ref(conv_shape(1, 2, 5, 5, 2, 3, 3, 2, 2), 1, 145);     // depthwise, big padding
    test_conv_ref(conv_shape(2, 6, 5, 5, 8, 1, 1, 0, 1), 1, 150);     // 1x1 fast path
    test_conv_ref(conv_shape(3, 6, 5, 4, 8, 1, 1, 0, 2), 0, 160);     // 1x1 fast path, groups
    test_conv_ref(conv_shape(2, 4, 7, 7, 6, 1, 2, 0, 1), 1, 170);     // 1x1 stride 2 (im2col)
    test_conv_ref(conv_shape(4, 3, 10, 9, 5, 5, 2, 2, 1), 1, 180);    // K5
    test_conv_ref(conv_shape(3, 4, 6, 6, 8, 3, 1, 1, 4), 1, 190);     // groups = C, OC = 2C (not depthwise)
    test_conv_ref(conv_shape(5, 8, 12, 11, 16, 3, 1, 1, 1), 1, 200);  // N odd: uneven thread chunks
    test_conv_ref(conv_shape(2, 3, 4, 4, 2, 3, 1, 2, 1), 1, 210);     // padding 2 > K/2
    test_conv_ref(conv_shape(1, 1, 1, 1, 3, 1, 1, 0, 1), 1, 220);     // 1x1 image
    test_conv_ref(conv_shape(3, 1, 28, 28, 16, 3, 1, 1, 1), 0, 230);  // first layer: CKK 9 < tile
    test_conv_ref(conv_shape(5, 24, 14, 14, 40, 3, 1, 1, 1), 0, 240); // several row panels, OC % 8 != 0
    test_conv_ref(conv_shape(3, 20, 9, 9, 36, 3, 2, 1, 1), 0, 250);   // stride 2, several panels
    test_conv_ref(conv_shape(3, 16, 9, 9, 24, 1, 2, 0, 1), 0, 260);   // 1x1 stride 2 (ResNet shortcut)
    test_conv_ref(conv_shape(4, 8, 11, 10, 12, 3, 2, 1, 2), 1, 270);  // stride 2 + groups
    test_conv_ref(conv_shape(3, 6, 8, 9, 10, 5, 1, 2, 1), 1, 280);    // K5 stride 1 (shift path)
    test_conv_ref(conv_shape(2, 5, 8, 8, 7, 3, 1, 0, 1), 1, 290);     // no padding, stride 1
    test_conv_ref(conv_shape(2, 5, 6, 6, 7, 1, 1, 1, 1), 1, 295);     // padding > K-1 (col path)
    test_conv_ref(conv_shape(7, 9, 7, 7, 13, 3, 1, 1, 1), 1, 297);    // 7x7 maps, odd everything
    test_conv_ref(conv_shape(3, 5, 11, 10, 7, 3, 3, 1, 1), 1, 298);   // stride 3: 3x3 phase planes
    test_conv_ref(conv_shape(3, 6, 9, 8, 10, 2, 2, 0, 1), 0, 299);    // even kernel, stride 2, odd size
    test_conv_ref(conv_shape(4, 16, 15, 15, 24, 3, 2, 1, 2), 1, 301); // stride 2, odd size, groups
}


static void test_linear_ref_all(void) {
    test_linear_ref(1, 7, 5, 1, 1);          // batch 1, odd sizes
    test_linear_ref(13, 33, 17, 0, 2);       // bias off
    test_linear_ref(13, 33, 17, 1, 3);
    test_linear_ref(64, 300, 200, 1, 4);
    test_linear_ref(1, 1, 1, 1, 5);          // K = 1
    test_linear_ref(9, 700, 33, 1, 6);       // K in several chunks, one column past a panel
    test_linear_ref(130, 40, 64, 1, 7);      // several row blocks, whole column panels (read in place)
    test_linear_ref(3, 784, 10, 1, 8);       // the classifier shape: one partial panel
    test_linear_gradcheck();
}

// The own product: AVX-512, AVX2 and portable kernels give the same bits (those the CPU
// supports).
static void test_linear_isa(void) {
    int N = 37, C = 301, OC = 70;
    size_t ni = (size_t)N * C, nw = (size_t)OC * C, no = (size_t)N * OC;
    float * inp = frand(ni, 91), * w = frand(nw, 92), * b = frand(OC, 93), * dout = frand(no, 94);
    enum kd_isa isa[KD_ISA_COUNT];
    const int n = supported_isas(isa);
    float * out[KD_ISA_COUNT], * dinp[KD_ISA_COUNT], * dw[KD_ISA_COUNT];
    kd_linear_force_engine(1);
    for (int v = 0; v < n; v++) {
        use_isa(isa[v]);
        out[v] = fzeros(no); dinp[v] = frand(ni, 95); dw[v] = frand(nw, 96);
        lin_fwd(out[v], inp, w, b, N, C, OC);
        lin_bwd(dinp[v], dw[v], NULL, dout, inp, w, N, C, OC);
    }
    use_isa(run_isa);
    kd_linear_force_engine(0);
    for (int v = 1; v < n; v++) {
        CHECK(bitwise_equal(out[0], out[v], no) && bitwise_equal(dinp[0], dinp[v], ni) && bitwise_equal(dw[0], dw[v], nw),
              "linear own product: %s vs %s kernels not bitwise equal", kd_isa_name(isa[0]), kd_isa_name(isa[v]));
    }
    for (int v = 0; v < n; v++) { free(out[v]); free(dinp[v]); free(dw[v]); }
    free(inp); free(w); free(b); free(dout);
}

int main(void) {
    CHECK(kd_isa_init() == KD_OK, "%s", kd_last_error());
    run_isa = kd_get_isa();
    printf("kernels: %s\n", kd_isa_config());
    fflush(stdout);
    test_isa_api();

    // linear: each engine against the double-precision reference, then the automatic choice
    for (int e = 1; e <= 2; e++) {
        kd_linear_force_engine(e);
        test_linear_ref_all();
    }
    kd_linear_force_engine(0);
    test_linear_ref_all();
    test_linear_isa();

    // conv2d: the automatic path choice, then each path forced (shift: stride 1 with
    // P <= K-1, else col; col: grouped im2col; Winograd where the shape allows it, else the
    // automatic path); the workspace follows the forced path.
    for (int path = 0; path <= 3; path++) {
        kd_conv_force_path(path);
        test_conv_ref_all();
        test_conv_gradcheck(conv_shape(2, 4, 5, 5, 6, 3, 1, 1, 2), 310 + path);
    }
    kd_conv_force_path(0);
    if (run_isa != KD_ISA_AVX2 && kd_isa_supported(KD_ISA_AVX2)) {
        use_isa(KD_ISA_AVX2);      // the kernels of CPUs without AVX-512 against the reference
        test_conv_ref_all();
        use_isa(run_isa);
    }
    test_conv_gradcheck(conv_shape(2, 3, 6, 5, 4, 3, 2, 1, 1), 300);
    test_conv_gradcheck(conv_shape(2, 4, 5, 5, 6, 3, 1, 1, 2), 310);
    test_conv_gradcheck(conv_shape(2, 3, 5, 6, 3, 3, 1, 1, 3), 320);
    test_conv_gradcheck(conv_shape(2, 4, 4, 3, 5, 1, 1, 0, 1), 330);
    test_conv_workspace();
    test_conv_nonfinite();
    test_conv_isas(conv_shape(3, 8, 12, 11, 16, 3, 1, 1, 1), 800);
    test_conv_isas(conv_shape(3, 12, 9, 9, 20, 3, 2, 1, 2), 810);
    test_conv_isas(conv_shape(3, 16, 28, 28, 32, 3, 2, 1, 1), 815);  // stride 2, phase planes
    test_conv_isas(conv_shape(2, 1, 28, 28, 16, 3, 1, 1, 1), 820);
    test_conv_isas(conv_shape(2, 6, 8, 9, 10, 1, 1, 0, 1), 830);
    kd_conv_force_path(2);
    test_conv_isas(conv_shape(5, 8, 7, 7, 16, 3, 1, 1, 1), 840);   // col path, image groups
    kd_conv_force_path(0);
    // Winograd: N, C, H, W, OC, K, S, P, G
    kd_conv_force_path(3);
    test_wino(conv_shape(1, 3, 7, 5, 4, 3, 1, 1, 1), 1, 900, 1, 1);       // batch 1, odd H and W
    test_wino(conv_shape(2, 5, 3, 2, 7, 3, 1, 1, 1), 0, 901, 1, 1);       // H, W < 4
    test_wino(conv_shape(2, 5, 3, 3, 7, 3, 1, 0, 1), 1, 902, 1, 1);       // no padding, 1x1 output
    test_wino(conv_shape(1, 1, 4, 4, 1, 3, 1, 0, 1), 0, 903, 1, 1);       // one channel, one tile
    test_wino(conv_shape(3, 17, 9, 11, 19, 3, 1, 0, 1), 1, 904, 1, 1);    // odd everything, padding 0
    test_wino(conv_shape(2, 20, 28, 27, 36, 3, 1, 1, 1), 0, 905, 1, 1);   // several blocks across images
    test_wino(conv_shape(3, 64, 7, 7, 72, 3, 1, 1, 1), 1, 906, 1, 1);     // the rule's sizes, 7x7
    test_wino(conv_shape(2, 9, 10, 13, 11, 3, 1, 1, 1), 1, 907, 1e3f, 1e2f);   // large values
    test_wino(conv_shape(2, 9, 10, 13, 11, 3, 1, 0, 1), 0, 908, 1e-3f, 1e3f);
    test_conv_gradcheck(conv_shape(2, 4, 5, 5, 6, 3, 1, 1, 1), 910);
    test_conv_gradcheck(conv_shape(2, 3, 6, 7, 5, 3, 1, 0, 1), 911);
    test_conv_nonfinite();
    test_conv_isas(conv_shape(3, 8, 12, 11, 16, 3, 1, 1, 1), 920);
    test_conv_isas(conv_shape(2, 17, 9, 7, 19, 3, 1, 0, 1), 921);
    test_conv_isas(conv_shape(2, 64, 14, 14, 64, 3, 1, 1, 1), 922);
    kd_conv_force_path(0);
    test_wino_rule();

    // batchnorm: (N, C, HW)
    test_bn_ref(4, 3, 25, 400);
    test_bn_ref(1, 2, 7, 410);     // batch 1
    test_bn_ref(6, 4, 1, 420);     // BN1d-like
    test_bn_ref(5, 3, 1001, 430);  // plane not a multiple of the accumulator lanes
    test_bn_gradcheck(3, 2, 5, 1);
    test_bn_gradcheck(3, 2, 5, 0);
    test_bn_gradcheck(5, 3, 1, 1);
    test_bn_single_value();
    test_bn_no_affine(3, 5, 7);
    test_bn_no_affine(4, 20, 1);
    test_bn_ref(3, 70, 49, 440);   // more channels than one accumulator block (64)
    test_bn_ref(2, 5, 4, 450);     // planes shorter than the 16 lanes
    test_bn_isas(5, 7, 196);
    test_bn_isas(3, 70, 37);

    test_relu();
    test_maxpool(2, 3, 7, 5, 3, 2, 1, 500);  // padding + stride
    test_maxpool(1, 2, 6, 6, 2, 2, 0, 510);
    test_maxpool(2, 2, 5, 7, 3, 1, 1, 520);  // overlapping windows
    enum kd_isa isa[KD_ISA_COUNT];
    for (int v = 0, n = supported_isas(isa); v < n; v++) {   // 2x2/2 fast path: AVX-512 and portable
        use_isa(isa[v]);
        test_maxpool(2, 3, 28, 28, 2, 2, 0, 530);
        test_maxpool(2, 3, 7, 7, 2, 2, 0, 540);    // odd size: last row/column unused
        test_maxpool(1, 2, 6, 40, 2, 2, 0, 550);   // rows of more than 16 outputs
        test_maxpool(1, 2, 4, 2, 2, 2, 0, 560);    // one output per row
    }
    use_isa(run_isa);
    test_maxpool2x2_isas(3, 5, 28, 28, 570);
    test_maxpool2x2_isas(2, 3, 9, 35, 580);
    test_avgpool(2, 3, 7, 5, 3, 2, 1, 600);  // padding: divisor stays K*K
    test_avgpool(1, 2, 6, 6, 2, 2, 0, 610);
    test_gap();
    test_dropout();
    test_add();
    test_sigmoid();
    test_mul(2, 3, 3, 10);
    test_mul(3, 5, 1, 7);        // one-channel attention map broadcast over channels
    test_concat(2, 3, 4, 9);
    test_nearest(2, 3, 1, 1, 7, 7);     // a pooled feature spread over a map
    test_nearest(1, 2, 7, 7, 14, 14);   // x2
    test_nearest(2, 2, 4, 4, 7, 7);     // non-integer ratio up
    test_nearest(1, 3, 7, 5, 4, 3);     // down, unequal sides
    test_bilinear(2, 3, 4, 4, 8, 8);
    test_bilinear(1, 2, 4, 4, 7, 7);    // non-integer ratio
    test_bilinear(1, 3, 7, 5, 4, 3);    // down
    test_bilinear(2, 1, 1, 1, 3, 2);    // a single pixel spread
    test_leaky_tanh();

#ifdef _OPENMP
    test_linear_threads(1);
    test_linear_threads(2);
    test_conv_threads(conv_shape(5, 8, 12, 11, 16, 3, 1, 1, 1), 700);
    test_conv_threads(conv_shape(3, 6, 9, 9, 8, 3, 2, 1, 2), 710);
    test_conv_threads(conv_shape(1, 8, 10, 10, 16, 1, 1, 0, 1), 720);  // N < threads
    test_conv_threads(conv_shape(4, 8, 10, 10, 8, 3, 1, 1, 8), 730);   // depthwise
    test_conv_threads(conv_shape(7, 16, 14, 14, 32, 3, 1, 1, 1), 740);  // odd batch, real sizes
    test_conv_threads(conv_shape(5, 16, 14, 14, 32, 3, 2, 1, 1), 750);  // odd batch, stride 2
    test_conv_threads(conv_shape(11, 64, 7, 7, 64, 3, 1, 1, 1), 760);  // Winograd by the rule
    kd_conv_force_path(2);
    test_conv_threads(conv_shape(9, 8, 6, 6, 16, 3, 1, 1, 2), 770);    // col path forced, G 2
    test_conv_threads(conv_shape(11, 64, 7, 7, 64, 3, 1, 1, 1), 761);  // 760's shape on the col path
    kd_conv_force_path(3);                                              // Winograd
    test_conv_threads(conv_shape(5, 8, 12, 11, 16, 3, 1, 1, 1), 780);
    test_conv_threads(conv_shape(1, 16, 9, 9, 24, 3, 1, 0, 1), 781);   // N < threads
    test_conv_threads(conv_shape(7, 20, 14, 13, 36, 3, 1, 1, 1), 782);  // odd batch, blocks across images
    kd_conv_force_path(0);
    test_bn_threads();
    test_blas_threading();
    test_deterministic_threads();
#endif
    return kdt_finish();
}
