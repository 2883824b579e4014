/*
 * Machine peaks and per-kernel timings for kdcore.
 *
 *   fma      AVX-512 (and AVX2) FMA loop: the fp32 peak per core and for all threads
 *   sgemm    large OpenBLAS cblas_sgemm (the BLAS kdcore links), and a conv-shaped one
 *   kernels  kdcore layer kernels at the zoo's Fashion-MNIST shapes (batch 128): time,
 *            GFLOP/s for convs, GB/s (compulsory traffic) for the memory-bound ones
 *
 * Built by benchmarks/bench_train.py (or by hand, from the repository root):
 *   cc -std=c11 -D_GNU_SOURCE -O3 -march=x86-64-v3 -fopenmp -ffp-contract=fast -Ikdcore/include -Ikdcore/src \
 *      $(PKG_CONFIG_PATH=/usr/lib/x86_64-linux-gnu/openblas-openmp/pkgconfig pkg-config --cflags openblas) \
 *      benchmarks/bench_kernels.c kdcore/src/[a-z]*.c -o build/bench_kernels \
 *      -L/usr/lib/x86_64-linux-gnu/openblas-openmp -Wl,-rpath,/usr/lib/x86_64-linux-gnu/openblas-openmp \
 *      -lopenblas -lz -lm
 *   OMP_NUM_THREADS=2 build/bench_kernels [fma|sgemm|kernels|all] [--quick] [--cpu-clock] [--only TEXT]
 * (--only TEXT: only the conv cases whose name contains TEXT, and no memory-bound kernels)
 * Output lines are "key value" pairs that bench_train.py parses; the header says which
 * kernels run ("kdcore_isa avx2", then comment lines with how it was chosen and OpenBLAS's
 * core). KDCORE_ISA=avx512|avx2|portable chooses kdcore's kernels (a refused value stops the
 * run), OPENBLAS_CORETYPE OpenBLAS's; KD_CONV_PATH=1|2 forces the conv path (shift, col).
 */
#include "layers.h"
#include "kd_internal.h"

#include <cblas.h>
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

// --cpu-clock: time by the process's CPU time (with 1 thread, the time other jobs on a shared
// machine take is not counted; with more threads the threads' times add up).
static clockid_t bench_clock = CLOCK_MONOTONIC;

static double now_s(void) {
    struct timespec ts;
    clock_gettime(bench_clock, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static float * frand(size_t n, uint64_t seed) {
    float * x = malloc(n * sizeof(float));
    uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
    for (size_t i = 0; i < n; i++) {
        s ^= s << 13; s ^= s >> 7; s ^= s << 17;
        x[i] = (float)((double)(s >> 11) / 9007199254740992.0 * 2.0 - 1.0);
    }
    return x;
}

static int cmp_d(const void * a, const void * b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}
static double median(double * t, int n) {
    qsort(t, (size_t)n, sizeof(double), cmp_d);
    return t[n / 2];
}

// Test hook in conv.c: force the conv path (0 automatic, 1 shift, 2 col); env KD_CONV_PATH.
void kd_conv_force_path(int path);

// ---- FMA peak: independent accumulator chains in registers (inline asm, so the compiler
// cannot spill or fold them): 24 zmm chains (AVX-512) or 12 ymm chains (AVX2) per thread.
__attribute__((target("avx512f"), noinline))
static float fma_loop_512(long iters) {
    __asm__ volatile(
        "vpxord %%zmm30, %%zmm30, %%zmm30\n\t"
        "vpxord %%zmm31, %%zmm31, %%zmm31\n\t"
        "1:\n\t"
        "vfmadd231ps %%zmm30, %%zmm31, %%zmm0\n\t"
        "vfmadd231ps %%zmm30, %%zmm31, %%zmm1\n\t"
        "vfmadd231ps %%zmm30, %%zmm31, %%zmm2\n\t"
        "vfmadd231ps %%zmm30, %%zmm31, %%zmm3\n\t"
        "vfmadd231ps %%zmm30, %%zmm31, %%zmm4\n\t"
        "vfmadd231ps %%zmm30, %%zmm31, %%zmm5\n\t"
        "vfmadd231ps %%zmm30, %%zmm31, %%zmm6\n\t"
        "vfmadd231ps %%zmm30, %%zmm31, %%zmm7\n\t"
        "vfmadd231ps %%zmm30, %%zmm31, %%zmm8\n\t"
        "vfmadd231ps %%zmm30, %%zmm31, %%zmm9\n\t"
        "vfmadd231ps %%zmm30, %%zmm31, %%zmm10\n\t"
        "vfmadd231ps %%zmm30, %%zmm31, %%zmm11\n\t"
        "vfmadd231ps %%zmm30, %%zmm31, %%zmm12\n\t"
        "vfmadd231ps %%zmm30, %%zmm31, %%zmm13\n\t"
        "vfmadd231ps %%zmm30, %%zmm31, %%zmm14\n\t"
        "vfmadd231ps %%zmm30, %%zmm31, %%zmm15\n\t"
        "vfmadd231ps %%zmm30, %%zmm31, %%zmm16\n\t"
        "vfmadd231ps %%zmm30, %%zmm31, %%zmm17\n\t"
        "vfmadd231ps %%zmm30, %%zmm31, %%zmm18\n\t"
        "vfmadd231ps %%zmm30, %%zmm31, %%zmm19\n\t"
        "vfmadd231ps %%zmm30, %%zmm31, %%zmm20\n\t"
        "vfmadd231ps %%zmm30, %%zmm31, %%zmm21\n\t"
        "vfmadd231ps %%zmm30, %%zmm31, %%zmm22\n\t"
        "vfmadd231ps %%zmm30, %%zmm31, %%zmm23\n\t"
        "dec %0\n\t"
        "jnz 1b\n\t"
        : "+r"(iters) : : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21", "xmm22", "xmm23", "xmm30", "xmm31", "cc");
    return 0.0f;
}

__attribute__((noinline))
static float fma_loop_256(long iters) {
    __asm__ volatile(
        "vxorps %%ymm14, %%ymm14, %%ymm14\n\t"
        "vxorps %%ymm15, %%ymm15, %%ymm15\n\t"
        "1:\n\t"
        "vfmadd231ps %%ymm14, %%ymm15, %%ymm0\n\t"
        "vfmadd231ps %%ymm14, %%ymm15, %%ymm1\n\t"
        "vfmadd231ps %%ymm14, %%ymm15, %%ymm2\n\t"
        "vfmadd231ps %%ymm14, %%ymm15, %%ymm3\n\t"
        "vfmadd231ps %%ymm14, %%ymm15, %%ymm4\n\t"
        "vfmadd231ps %%ymm14, %%ymm15, %%ymm5\n\t"
        "vfmadd231ps %%ymm14, %%ymm15, %%ymm6\n\t"
        "vfmadd231ps %%ymm14, %%ymm15, %%ymm7\n\t"
        "vfmadd231ps %%ymm14, %%ymm15, %%ymm8\n\t"
        "vfmadd231ps %%ymm14, %%ymm15, %%ymm9\n\t"
        "vfmadd231ps %%ymm14, %%ymm15, %%ymm10\n\t"
        "vfmadd231ps %%ymm14, %%ymm15, %%ymm11\n\t"
        "dec %0\n\t"
        "jnz 1b\n\t"
        : "+r"(iters) : : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10", "xmm11", "xmm14", "xmm15", "cc");
    return 0.0f;
}

static void bench_fma(int quick) {
    long iters = quick ? 20000000L : 60000000L;
    volatile float sink = 0;
    int nt = kd_omp_threads();
    int has512 = __builtin_cpu_supports("avx512f");
    for (int wide = has512 ? 1 : 0; wide >= 0; wide--) {
        int lanes = wide ? 16 : 8, chains = wide ? 24 : 12;
        int tcounts[2] = { 1, nt };
        for (int ti = 0; ti < (nt > 1 ? 2 : 1); ti++) {
            int threads = tcounts[ti];
            double best = 0;
            for (int r = 0; r < 3; r++) {
                double t0 = now_s();
                #pragma omp parallel num_threads(threads)
                {
                    float v = wide ? fma_loop_512(iters) : fma_loop_256(iters);
                    #pragma omp atomic
                    sink += v;
                }
                double dt = now_s() - t0;
                double gf = 2.0 * lanes * chains * (double)iters * threads / dt / 1e9;
                if (gf > best) { best = gf; }
            }
            printf("fma%s_t%d_gflops %.1f\n", wide ? "512" : "256", threads, best);
        }
    }
    (void)sink;
}

// ---- sgemm --------------------------------------------------------------------------------
static void bench_sgemm(int quick) {
    int shapes[][3] = { { 2048, 2048, 2048 }, { 64, 100352, 576 } };   // square; conv-like (OC, N*OHW, CKK)
    const char * names[] = { "sgemm_2048", "sgemm_conv64x100352x576" };
    for (int si = 0; si < 2; si++) {
        int M = shapes[si][0], N = shapes[si][1], K = shapes[si][2];
        if (quick && si == 1) { N /= 4; }
        float * A = frand((size_t)M * K, 1), * B = frand((size_t)K * N, 2), * C = frand((size_t)M * N, 3);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, N, K, 1.0f, A, K, B, N, 0.0f, C, N);
        double t[5];
        int reps = quick ? 3 : 5;
        for (int r = 0; r < reps; r++) {
            double t0 = now_s();
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, M, N, K, 1.0f, A, K, B, N, 0.0f, C, N);
            t[r] = now_s() - t0;
        }
        printf("%s_gflops %.1f\n", names[si], 2.0 * M * (double)N * K / median(t, reps) / 1e9);
        free(A); free(B); free(C);
    }
    printf("openblas_core %s\n", openblas_get_corename());
}

// ---- layer kernels at zoo shapes ------------------------------------------------------------
struct conv_case { const char * name; int N, C, H, OC, K, S, P; };

static void bench_conv(const struct conv_case * cc, int reps) {
    int OH = (cc->H + 2 * cc->P - cc->K) / cc->S + 1;
    struct kd_conv_shape s = { cc->N, cc->C, cc->H, cc->H, cc->OC, OH, OH, cc->K, cc->S, cc->P, 1 };
    size_t ni = (size_t)s.N * s.C * s.H * s.W, nw = (size_t)s.OC * s.C * s.K * s.K, no = (size_t)s.N * s.OC * OH * OH;
    float * x = frand(ni, 1), * w = frand(nw, 2), * y = frand(no, 3), * dy = frand(no, 4);
    float * dx = calloc(ni, sizeof(float)), * dw = calloc(nw, sizeof(float));
    float * work = malloc(kd_conv2d_workspace(&s, kd_omp_threads()) * sizeof(float));
    double macs = (double)no * s.C * s.K * s.K;
    double tf[9], tb[9];
    kd_conv2d_forward(y, x, w, NULL, &s, work);
    kd_conv2d_backward(cc->C > 1 ? dx : NULL, dw, NULL, dy, x, w, &s, work);
    for (int r = 0; r < reps; r++) {
        double t0 = now_s();
        kd_conv2d_forward(y, x, w, NULL, &s, work);
        double t1 = now_s();
        kd_conv2d_backward(cc->C > 1 ? dx : NULL, dw, NULL, dy, x, w, &s, work);
        tf[r] = t1 - t0;
        tb[r] = now_s() - t1;
    }
    double f = median(tf, reps), b = median(tb, reps);
    // backward = weight gradient + input gradient (the first layer, C = 1, has no input
    // gradient in training: weight gradient only)
    printf("conv_%s fwd_ms %.3f fwd_gflops %.1f bwd_ms %.3f bwd_gflops %.1f\n", cc->name, 1e3 * f,
           2 * macs / f / 1e9, 1e3 * b, (cc->C > 1 ? 4 : 2) * macs / b / 1e9);
    free(x); free(w); free(y); free(dy); free(dx); free(dw); free(work);
}

static void bench_memory_bound(int N, int C, int H, int reps) {
    size_t n = (size_t)N * C * H * H, no = n / 4;
    float * x = frand(n, 1), * y = frand(n, 2), * dy = frand(n, 3), * dx = calloc(n, sizeof(float));
    float * mean = calloc((size_t)C, 4), * rstd = calloc((size_t)C, 4), * rm = calloc((size_t)C, 4);
    float * rv = calloc((size_t)C, 4), * g = frand((size_t)C, 5), * bb = frand((size_t)C, 6);
    float * dg = calloc((size_t)C, 4), * dbb = calloc((size_t)C, 4), * po = calloc(no, 4), * pdy = frand(no, 7);
    int32_t * am = calloc(no, 4);
    double t[6][9];
    const char * names[6] = { "bn_fwd_train", "bn_bwd", "relu_fwd", "relu_bwd", "maxpool_fwd", "maxpool_bwd" };
    // compulsory bytes: reads + writes (+= counts as read and write)
    double bytes[6] = { 8.0 * n, 20.0 * n, 8.0 * n, 16.0 * n, 4.0 * n + 8.0 * no, 8.0 * n / 4 + 8.0 * n };
    for (int r = 0; r < reps; r++) {
        double t0 = now_s();
        kd_batchnorm_forward_train(y, mean, rstd, rm, rv, x, g, bb, N, C, H * H, 1e-5f, 0.1f);
        double t1 = now_s();
        kd_batchnorm_backward(dx, dg, dbb, dy, x, mean, rstd, g, N, C, H * H, 1);
        double t2 = now_s();
        kd_relu_forward(y, x, n);
        double t3 = now_s();
        kd_relu_backward(dx, dy, y, n);
        double t4 = now_s();
        kd_maxpool2d_forward(po, am, x, N, C, H, H, H / 2, H / 2, 2, 2, 0);
        double t5 = now_s();
        kd_maxpool2d_backward(dx, pdy, am, N, C, H, H, H / 2, H / 2);
        double t6 = now_s();
        t[0][r] = t1 - t0; t[1][r] = t2 - t1; t[2][r] = t3 - t2; t[3][r] = t4 - t3; t[4][r] = t5 - t4; t[5][r] = t6 - t5;
    }
    for (int k = 0; k < 6; k++) {
        double m = median(t[k], reps);
        printf("%s_N%d_C%d_%dx%d ms %.3f gbps %.1f\n", names[k], N, C, H, H, 1e3 * m, bytes[k] / m / 1e9);
    }
    free(x); free(y); free(dy); free(dx); free(mean); free(rstd); free(rm); free(rv); free(g); free(bb);
    free(dg); free(dbb); free(po); free(pdy); free(am);
}

static void bench_kernels(int quick, const char * only) {
    int reps = quick ? 3 : 7;
    const struct conv_case cases[] = {
        { "cnn32_c1_28", 128, 1, 28, 32, 3, 1, 1 },
        { "cnn32_c32_28", 128, 32, 28, 32, 3, 1, 1 },
        { "cnn32_c32to64_14", 128, 32, 14, 64, 3, 1, 1 },
        { "cnn32_c64_14", 128, 64, 14, 64, 3, 1, 1 },
        { "r8x4_c64_28", 128, 64, 28, 64, 3, 1, 1 },
        { "r8x4_c64to128_s2", 128, 64, 28, 128, 3, 2, 1 },
        { "r8x4_c128_14", 128, 128, 14, 128, 3, 1, 1 },
        { "r8x4_c256_7", 128, 256, 7, 256, 3, 1, 1 },
        { "r8x4_1x1s2_64to128", 128, 64, 28, 128, 1, 2, 0 },
        { "r8x4_c128to256_s2", 128, 128, 14, 256, 3, 2, 1 },
        { "r8_c16_28", 128, 16, 28, 16, 3, 1, 1 },
        { "r8_c16to32_s2", 128, 16, 28, 32, 3, 2, 1 },
        { "r8_1x1s2_16to32", 128, 16, 28, 32, 1, 2, 0 },
        { "r8_c32_14", 128, 32, 14, 32, 3, 1, 1 },
        { "r8_c32to64_s2", 128, 32, 14, 64, 3, 2, 1 },
        { "r8_c64_7", 128, 64, 7, 64, 3, 1, 1 },
        { "wrn2_c32to64_s2", 128, 32, 28, 64, 3, 2, 1 },
        { "wrn2_c64to128_s2", 128, 64, 14, 128, 3, 2, 1 },
        { "wrn2_c128_7", 128, 128, 7, 128, 3, 1, 1 },
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        if (only == NULL || strstr(cases[i].name, only) != NULL) { bench_conv(&cases[i], reps); }
    }
    if (only != NULL) { return; }
    bench_memory_bound(128, 32, 28, reps);
    bench_memory_bound(128, 64, 14, reps);
}

int main(int argc, char ** argv) {
    const char * what = argc > 1 ? argv[1] : "all";
    int quick = 0;
    const char * only = NULL;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--quick") == 0) { quick = 1; }
        if (strcmp(argv[i], "--only") == 0 && i + 1 < argc) { only = argv[++i]; }
        if (strcmp(argv[i], "--cpu-clock") == 0) { bench_clock = CLOCK_PROCESS_CPUTIME_ID; }
    }
    if (kd_isa_init() != KD_OK) {   // a measurement of other kernels than asked for is worse than none
        fprintf(stderr, "bench_kernels: %s\n", kd_last_error());
        return 2;
    }
    printf("threads %d\n", kd_omp_threads());
    printf("kdcore_isa %s\n", kd_isa_name(kd_get_isa()));
    printf("# kernels: %s\n# blas: %s\n", kd_isa_config(), kd_blas_config());
    if (bench_clock == CLOCK_PROCESS_CPUTIME_ID) { printf("# clock: process CPU time (--cpu-clock)\n"); }
    if (getenv("KD_CONV_PATH")) {
        kd_conv_force_path(atoi(getenv("KD_CONV_PATH")));
        printf("# conv path forced: KD_CONV_PATH=%s\n", getenv("KD_CONV_PATH"));
    }
    int all = strcmp(what, "all") == 0;
    if (all || strcmp(what, "fma") == 0) { bench_fma(quick); }
    if (all || strcmp(what, "sgemm") == 0) { bench_sgemm(quick); }
    if (all || strcmp(what, "kernels") == 0) { bench_kernels(quick, only); }
    return 0;
}
