// Linear layer: out = inp W^T + b and its two backward products, on OpenBLAS or on kdcore's
// own micro-kernel.
#include "kernels.h"

// ----------------------------------------------------------------------------------------
// linear
// https://pytorch.org/docs/stable/generated/torch.nn.Linear.html
// Three products: out = inp W^T (onto the bias), dinp += dout W, dW += dout^T inp. Two
// engines run them (linear_engine):
// - OpenBLAS cblas_sgemm, one top-level call per product, threaded by OpenBLAS. Its split
//   across threads changes which micro-kernel (and so which rounding) some elements get:
//   reproducible for a given thread count, equal only to rounding across counts.
// - kdcore's own product on the conv forward micro-kernel (8 x 32; AVX-512, AVX2 or
//   portable). Used when kdcore's kernels run AVX-512 (kd_get_isa) and OpenBLAS's do not
//   (an AVX2 core, e.g. OPENBLAS_CORETYPE=Haswell on an AVX-512 CPU; there it is ~1.5x
//   faster at the MLP shapes), and always
//   in deterministic mode: every element is one fma chain over k in order, starting from C's
//   value (the bias, or the gradient so far), whichever thread computes its tile -- results
//   do not depend on the thread count, at no cost. C += op(A) op(B) with
//   - op(A) packed once per call into panels of 8 rows ([panel][k][8], zero rows past M);
//   - op(B) read in place when its rows are contiguous (32-column panels at B + 32 j, row k
//     at k*ldb), else (the forward's W^T, and a partial last panel) packed [panel][k][32];
//   - K in chunks whose B panel (kc x 32) stays in L1 while a block of row panels uses it;
//   - tiles of (row-panel block, 32-column panel) shared out by OpenMP; edge tiles (rows
//     past M, columns past Nc) run on a staging tile and copy back what is valid.

enum { LINEAR_AUTO = 0, LINEAR_OWN = 1, LINEAR_BLAS = 2 };
static int kd_linear_forced = LINEAR_AUTO;
void kd_linear_force_engine(int engine);   // test hook: 0 automatic, 1 own, 2 OpenBLAS
void kd_linear_force_engine(int engine) { __atomic_store_n(&kd_linear_forced, engine, __ATOMIC_RELAXED); }

// Does OpenBLAS run AVX-512 sgemm kernels? Its core names for those (0.3.x). The core is
// fixed when OpenBLAS loads: asked once (0 not yet, 1 no, 2 yes).
static bool blas_uses_avx512(void) {
    static int known = 0;
    int k = __atomic_load_n(&known, __ATOMIC_RELAXED);
    if (k == 0) {
        const char * core = openblas_get_corename();
        static const char * const avx512[] = { "skylakex", "cooperlake", "sapphirerapids" };
        k = 1;
        for (size_t i = 0; core != NULL && i < sizeof avx512 / sizeof avx512[0]; i++) {
            if (strcasecmp(core, avx512[i]) == 0) { k = 2; }
        }
        __atomic_store_n(&known, k, __ATOMIC_RELAXED);
    }
    return k == 2;
}

// Follows the instruction set in use (kd_set_isa can change it), so it is decided per call.
static int linear_engine(void) {
    int f = __atomic_load_n(&kd_linear_forced, __ATOMIC_RELAXED);
    if (f != LINEAR_AUTO) return f;
    if (kd_get_deterministic()) return LINEAR_OWN;
    return kd_simd_level() == KD_ISA_AVX512 && !blas_uses_avx512() ? LINEAR_OWN : LINEAR_BLAS;
}

const char * kd_linear_engine_name(void) {
    static _Thread_local char buf[96];
    if (linear_engine() == LINEAR_BLAS) return "OpenBLAS sgemm";
    snprintf(buf, sizeof buf, "kdcore's own product (%s micro-kernel)", kd_isa_name(kd_get_isa()));
    return buf;
}

// Here rather than in status.c: it reports the kernels and the linear engine too.
const char * kd_blas_config(void) {
    static _Thread_local char buf[1024];
    snprintf(buf, sizeof buf, "%s; core=%s; parallel=%s; kdcore OpenMP=%s; kernels: %s; linear layers: %s",
             openblas_get_config(), openblas_get_corename(),
             openblas_get_parallel() == 2 ? "openmp" : openblas_get_parallel() == 1 ? "pthreads" : "none",
#ifdef _OPENMP
             "on"
#else
             "off"
#endif
             , kd_isa_config(), kd_linear_engine_name());
    return buf;
}

#define LN_ROW_BLOCK 8    // row panels (64 rows) per tile: the A chunk they read stays in L2
#define LN_L1_FLOATS 8192 // target floats of a B panel chunk (kc x 32): 32 KB

struct gemm_operand {
    const float * p;  // the matrix
    int ld;           // its row stride
    bool trans;       // op(X) = X^T
};

// Floats of workspace for C (M x Nc) += op(A) (M x K) op(B) (K x Nc): packed A, packed B
// (all of it when transposed, else the partial last panel), two offset tables, alignment.
static size_t gemm_workspace(int M, int Nc, int K, bool trans_b) {
    size_t Kz = (size_t)K;
    size_t a = round_up((size_t)M, CV_MR) * Kz;
    size_t b = trans_b ? round_up((size_t)Nc, CV_NR) * Kz : (size_t)CV_NR * Kz;
    size_t offs = 2 * Kz * (sizeof(ptrdiff_t) / sizeof(float));
    return a + b + offs + 4 * CV_ALIGN;
}

// op(A) rows [8i, 8i+8) into panel i; rows past M are zero.
static void gemm_pack_a(float * Ap, struct gemm_operand A, int M, int K) {
    int npan = (M + CV_MR - 1) / CV_MR;
    #pragma omp for schedule(static)
    for (int i = 0; i < npan; i++) {
        float * d = Ap + (size_t)i * K * CV_MR;
        int mi = imin(CV_MR, M - i * CV_MR);
        if (A.trans) {   // op(A)[m][k] = A[k][m]: 8 contiguous floats per k
            kd_pack_cols(d, CV_MR, A.p + (size_t)i * CV_MR, (size_t)A.ld, CV_MR, mi, K);
        } else {         // op(A)[m][k] = A[m][k]: 8 rows transposed
            kd_pack_rows8(d, CV_MR, A.p + (size_t)i * CV_MR * A.ld, (size_t)A.ld, mi, K);
        }
    }
}

// op(B) columns [32j, 32j+32) into a [k][32] panel at d; columns past Nc are zero.
static void gemm_pack_b_panel(float * d, struct gemm_operand B, int Nc, int K, int j) {
    int nj = imin(CV_NR, Nc - j * CV_NR);
    if (B.trans) {   // op(B)[k][n] = B[n][k]: four blocks of 8 rows of B transposed
        for (int c0 = 0; c0 < CV_NR; c0 += 8) {
            kd_pack_rows8(d + c0, CV_NR, B.p + (size_t)(j * CV_NR + c0) * B.ld, (size_t)B.ld, imax(0, imin(8, nj - c0)), K);
        }
    } else {         // op(B)[k][n] = B[k][n]
        kd_pack_cols(d, CV_NR, B.p + (size_t)j * CV_NR, (size_t)B.ld, CV_NR, nj, K);
    }
}

// C (M x Nc, row stride ldc) += op(A) op(B), K >= 1. `work` holds gemm_workspace floats.
static void gemm_acc(int M, int Nc, int K, struct gemm_operand A, struct gemm_operand B,
                     float * C, int ldc, float * work) {
    const fwd_ukr_fn ukr = kd_conv_kernels().fwd;
    const int mpan = (M + CV_MR - 1) / CV_MR, npan = (Nc + CV_NR - 1) / CV_NR;
    const int direct = B.trans ? 0 : Nc / CV_NR;   // panels read in place
    const int kc = k_chunk((size_t)K, CV_NR, LN_L1_FLOATS);
    float * ws = align_floats(work);
    float * Ap = ws;
    float * Bp = align_floats(Ap + (size_t)mpan * CV_MR * K);   // panels direct..npan-1
    ptrdiff_t * off_direct = (ptrdiff_t *)align_floats(Bp + (size_t)(npan - direct) * CV_NR * K);
    ptrdiff_t * off_packed = off_direct + K;
    const int nrb = (mpan + LN_ROW_BLOCK - 1) / LN_ROW_BLOCK;
    const long ntiles = (long)nrb * npan;
    const double flops = 2.0 * M * Nc * K;
    #pragma omp parallel if(flops > 4e6)
    {
        gemm_pack_a(Ap, A, M, K);
        #pragma omp for schedule(static) nowait
        for (int j = direct; j < npan; j++) { gemm_pack_b_panel(Bp + (size_t)(j - direct) * CV_NR * K, B, Nc, K, j); }
        #pragma omp for schedule(static)
        for (int k = 0; k < K; k++) { off_direct[k] = (ptrdiff_t)k * B.ld; off_packed[k] = (ptrdiff_t)k * CV_NR; }
        float stage[CV_MR * CV_NR] __attribute__((aligned(64)));
        // Tiles of one column panel are consecutive, so a thread's tiles share B chunks.
        #pragma omp for schedule(static)
        for (long t = 0; t < ntiles; t++) {
            const int j = (int)(t / nrb), rb = (int)(t % nrb);
            const int nj = imin(CV_NR, Nc - j * CV_NR);
            const float * b = j < direct ? B.p + (size_t)j * CV_NR : Bp + (size_t)(j - direct) * CV_NR * K;
            const ptrdiff_t * off = j < direct ? off_direct : off_packed;
            const int i0 = rb * LN_ROW_BLOCK, i1 = imin(mpan, i0 + LN_ROW_BLOCK);
            for (int k0 = 0; k0 < K; k0 += kc) {
                const int kn = imin(kc, K - k0);
                for (int i = i0; i < i1; i++) {
                    const int mi = imin(CV_MR, M - i * CV_MR);
                    const float * a = Ap + ((size_t)i * K + (size_t)k0) * CV_MR;
                    float * c = C + (size_t)i * CV_MR * ldc + (size_t)j * CV_NR;
                    if (mi == CV_MR && nj == CV_NR) { ukr(kn, a, b, off + k0, c, (size_t)ldc, 1); continue; }
                    memset(stage, 0, sizeof stage);
                    for (int r = 0; r < mi; r++) { memcpy(stage + r * CV_NR, c + (size_t)r * ldc, (size_t)nj * sizeof(float)); }
                    ukr(kn, a, b, off + k0, stage, CV_NR, 1);
                    for (int r = 0; r < mi; r++) { memcpy(c + (size_t)r * ldc, stage + r * CV_NR, (size_t)nj * sizeof(float)); }
                }
            }
        }
    }
}

size_t kd_linear_workspace(int N, int C, int OC) {
    size_t f = gemm_workspace(N, OC, C, true);       // out = inp W^T
    size_t d = gemm_workspace(N, C, OC, false);      // dinp += dout W
    size_t w = gemm_workspace(OC, C, N, false);      // dW += dout^T inp
    return zmax(f, zmax(d, w));
}

// out (N,OC), inp (N,C), weight (OC,C), bias (OC) or NULL
void kd_linear_forward(float * out, const float * inp, const float * weight, const float * bias,
                       int N, int C, int OC, float * work) {
    // Start from the bias and accumulate the product onto it, as PyTorch's addmm does.
    for (int n = 0; n < N; n++) {
        if (bias != NULL) { memcpy(out + (size_t)n * OC, bias, (size_t)OC * sizeof(float)); }
        else { memset(out + (size_t)n * OC, 0, (size_t)OC * sizeof(float)); }
    }
    if (C == 0 || N == 0) return;
    if (linear_engine() == LINEAR_BLAS) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, OC, C, 1.0f, inp, C, weight, C, 1.0f, out, OC);
        return;
    }
    gemm_acc(N, OC, C, (struct gemm_operand){ inp, C, false }, (struct gemm_operand){ weight, C, true },
             out, OC, work);
}

// dinp (N,C), dweight (OC,C), dbias (OC), dout (N,OC), inp (N,C), weight (OC,C)
void kd_linear_backward(float * dinp, float * dweight, float * dbias, const float * dout,
                        const float * inp, const float * weight, int N, int C, int OC, float * work) {
    const bool blas = linear_engine() == LINEAR_BLAS;
    if (dinp != NULL && OC > 0 && N > 0 && blas) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, C, OC, 1.0f, dout, OC, weight, C, 1.0f, dinp, C);
    } else if (dinp != NULL && OC > 0) {
        gemm_acc(N, C, OC, (struct gemm_operand){ dout, OC, false }, (struct gemm_operand){ weight, C, false },
                 dinp, C, work);
    }
    if (dweight != NULL && N > 0 && blas) {
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, OC, C, N, 1.0f, dout, OC, inp, C, 1.0f, dweight, C);
    } else if (dweight != NULL && N > 0) {
        gemm_acc(OC, C, N, (struct gemm_operand){ dout, OC, true }, (struct gemm_operand){ inp, C, false },
                 dweight, C, work);
    }
    // dbias += column sums of dout; each thread owns whole columns and sums over N in
    // order, so the result does not depend on the thread count.
    if (dbias != NULL) {
        #pragma omp parallel for schedule(static) if((size_t)N * OC > KD_PAR_MIN)
        for (int oc = 0; oc < OC; oc++) {
            double s = 0.0;
            for (int n = 0; n < N; n++) { s += (double)dout[(size_t)n * OC + oc]; }
            dbias[oc] += (float)s;
        }
    }
}
