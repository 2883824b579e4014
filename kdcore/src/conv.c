// conv2d
// https://pytorch.org/docs/stable/generated/torch.nn.Conv2d.html
// PyTorch's Conv2d is a cross-correlation: out[oc,oh,ow] = b[oc] +
//   sum_{c,kh,kw} w[oc,c,kh,kw] * inp[c, oh*S-P+kh, ow*S-P+kw].
//
// Design (implicit GEMM with our own micro-kernels; no BLAS call):
// - The batch is split across OpenMP threads in contiguous chunks and every image is done
//   by one thread in L2-sized per-thread buffers. Each output and input-gradient element is
//   one fma chain in a fixed order, so forward and dinp do not depend on the thread count.
// - Forward-type products C (M, pixels) = A (M, K) B (K, pixels) run an MR x NR = 8 x 32
//   micro-kernel over weights packed once per call, K in chunks so that the packed chunk
//   stays in L2 (a chunk continues the chains of the previous one: same bits).
// - "shift" path (stride 1, P <= K-1): the image is copied into a zero-padded buffer
//   (C, Hp, Wp). On the padded grid p = oh*Wp + ow, im2col row (c, kh, kw) is the slice
//   xpad[c*Hp*Wp + kh*Wp + kw + p], so the kernel reads it through a table of row offsets
//   and im2col is never built. The Wp - OW grid columns per row outside the output are
//   computed and dropped. The input gradient of a stride-1 conv is a stride-1 conv of the
//   padded dout with the flipped, transposed weights: same path, no col2im.
// - "col" path (other strides, and small maps where the dropped columns would cost more
//   than packing): im2col of a group of images side by side, built one K chunk at a time
//   so it stays in L2; dinp through dcol = W^T dout (in row chunks) and col2im.
// - Weight gradients dW (OC, CKK) += D (OC, pixels) B^T run a 4 x 6 tile of 16-lane dot
//   products (lane = pixel mod 16) reduced by a fixed tree, per image or image group, into
//   a per-thread partial; partials are added in thread order. So dW depends on the thread
//   count only through rounding.
// - Kernels: AVX-512 (runtime check) and portable C that performs exactly the same float
//   operations in the same order (bitwise equal; the C tests compare them).
// - Winograd F(2x2, 3x3) (winograd.c) runs the forward and both gradients of stride-1 3x3
//   convs with padding 0 or 1 and no groups where wino_rule says (KDCORE_WINOGRAD=0: never);
//   the weight gradient runs inside the units below (same partials and reduction), the
//   bias gradient stays here.
// Depthwise convs (one input and one output channel per group) use direct loops.

#include "kernels.h"

// Conv path hook for the C tests and benchmarks: 0 automatic, 1 shift, 2 col (both without
// Winograd), 3 Winograd wherever the shape allows it (weight gradient on the automatic path).
static int kd_path_forced = 0;
void kd_conv_force_path(int path);
void kd_conv_force_path(int path) { __atomic_store_n(&kd_path_forced, path, __ATOMIC_RELAXED); }

// ---- plan: path, blocking and workspace layout ---------------------------------------------

enum { CONV_SHIFT = 1, CONV_COL = 2, CONV_WINO = 3 };

struct conv_plan {
    int path;
    int Cg, OCg, KK, CKK;
    int kc;                     // K chunk of the forward product
    int kct;                    // shift: K chunk of the input-gradient product (OCg*KK)
    int mc;                     // col: dcol rows per pass (multiple of 8)
    int gi;                     // images per group (col: side by side; shift: backward only)
    size_t xs, zs;              // shift: image strides in the padded-image and dout buffers
    int Hp, Wp;                 // shift: padded input
    size_t plane;               // shift: Hp*Wp
    int Pt, Hq, Wq;             // shift: input-gradient conv: padding K-1-P, padded dout
    size_t qplane, grid2, ld2;  // shift: Hq*Wq, pixels H*Wq of its grid, row stride
    size_t grid;                // pixels of one image's output grid (OH*Wp, or OH*OW)
    size_t ld;                  // row stride of the staging, dout-grid and col buffers
    size_t a_off, o_off, shared;                           // shared: packed weights, offsets
    size_t x_off, q_off, z_off, t_off, w_off, b_off, per;  // per thread
    size_t x_n, q_n, z_n;
    int wino;                   // forward and both gradients by Winograd (winograd.c)
    struct wino_plan wp;        // its layout, whenever the shape allows it (the workspace covers both)
    size_t wdw_off;             // per thread: Winograd's weight-gradient region
};

// Where Winograd runs unless forced (KD_WINO_RULE_TEXT says it): measured on the zoo's shapes
// (benchmarks/PERF_NOTES.md, "Winograd F(2x2,3x3)").
static int wino_rule(const struct kd_conv_shape * s) {
    return s->C >= 32 && s->OC >= 32;
}

// Everything is sized for both directions: one workspace serves forward and backward.
static int conv_plan_make(const struct kd_conv_shape * s, struct conv_plan * p) {
    int bad = 0;
    memset(p, 0, sizeof *p);
    p->Cg = s->C / s->G;
    p->OCg = s->OC / s->G;
    size_t kk = smul(&bad, (size_t)s->K, (size_t)s->K);
    size_t ckk = smul(&bad, (size_t)p->Cg, kk);
    size_t ockk = smul(&bad, (size_t)p->OCg, kk);
    if (bad || ckk > INT_MAX / 2 || ockk > INT_MAX / 2) { return 0; }
    p->KK = (int)kk;
    p->CKK = (int)ckk;
    size_t OH = (size_t)s->OH, OW = (size_t)s->OW, H = (size_t)s->H, W = (size_t)s->W;
    size_t OHW = smul(&bad, OH, OW);
    size_t ocp = round_up((size_t)p->OCg, CV_MR), cp = round_up((size_t)p->Cg, CV_MR);
    size_t ckkp = round_up(ckk, CV_MR);

    // Path. Shift needs stride 1 and an input-gradient padding K-1-P >= 0. It computes
    // OH*Wp grid pixels (rounded up to panels) per OH*OW outputs; col computes almost only
    // outputs but packs im2col (and scatters dcol back), which costs about as much as ~24
    // multiply-adds per element (each element feeds OCg of them): the cheaper one wins.
    // Calibrated on the zoo shapes (benchmarks/bench_kernels.c): shift for 28x28 and 14x14
    // maps and for 7x7 with 64 channels, col for 7x7 with 128 or 256 channels (15-40%
    // faster there).
    int shift_ok = s->S == 1 && s->P <= s->K - 1;
    size_t wp = W + 2 * (size_t)s->P;
    size_t sgrid = smul(&bad, OH, wp);
    // col: images per group so that the group fills its panels well
    size_t gi = 1;
    if (OHW < CV_GROUP_PIX) {
        double best = 0;
        size_t gmax = zmax(1, zmin((size_t)s->N, 2 * CV_GROUP_PIX / zmax(OHW, 1)));
        for (size_t g = 1; g <= gmax; g++) {
            double e = (double)(g * OHW) / (double)round_up(g * OHW, CV_NR);
            if (e > best + 0.02) { best = e; gi = g; }
        }
    }
    int path = CONV_COL;
    if (shift_ok) {
        double shift_cost = (double)round_up(sgrid, CV_NR) / (double)OHW;
        double col_cost = (double)round_up(gi * OHW, CV_NR) / (double)(gi * OHW) + 24.0 / (double)p->OCg;
        path = shift_cost <= col_cost ? CONV_SHIFT : CONV_COL;
    }
    int forced = __atomic_load_n(&kd_path_forced, __ATOMIC_RELAXED);
    if (forced == CONV_COL || (forced == CONV_SHIFT && shift_ok)) { path = forced; }
    p->path = path;

    size_t slack = 0;
    if (path == CONV_SHIFT) {
        size_t hp = H + 2 * (size_t)s->P;
        if (hp > INT_MAX || wp > INT_MAX) { return 0; }
        p->Hp = (int)hp; p->Wp = (int)wp;
        p->plane = smul(&bad, hp, wp);
        p->grid = sgrid;
        p->Pt = s->K - 1 - s->P;
        p->Hq = (int)(OH + 2 * (size_t)p->Pt);
        p->Wq = (int)(OW + 2 * (size_t)p->Pt);
        p->qplane = smul(&bad, (size_t)p->Hq, (size_t)p->Wq);
        p->grid2 = smul(&bad, H, (size_t)p->Wq);
        p->ld2 = round_up(sadd(&bad, p->grid2, CV_NR - 1), CV_NR);
        // The last tap of the last channel reads up to K-1 + NR-1 floats past the plane.
        slack = 2 * CV_NR + 2 * (size_t)s->K;
        // Backward: the weight-gradient lanes run on across a group of images before they
        // are reduced; enough pixels to amortise the reduction, buffers within ~L2.
        size_t ldi = round_up(sadd(&bad, sgrid, CV_NR - 1), CV_NR);
        p->xs = round_up(smul(&bad, (size_t)s->C, p->plane), CV_ALIGN);
        p->zs = smul(&bad, (size_t)s->OC, ldi);
        size_t per_img = sadd(&bad, p->xs, p->zs);
        size_t g = zmin(2 * CV_L2_FLOATS / zmax(per_img, 1), (1024 + sgrid - 1) / zmax(sgrid, 1));
        p->gi = (int)zmax(1, zmin(g, (size_t)s->N));
    } else {
        p->grid = OHW;
        p->gi = (int)gi;
    }
    p->ld = round_up(sadd(&bad, smul(&bad, p->grid, path == CONV_COL ? (size_t)p->gi : 1), CV_NR - 1), CV_NR);
    p->kc = k_chunk(ckk, ocp, CV_L2_FLOATS);
    if (path == CONV_COL) {
        // the im2col chunk (kc x ld) should also stay within the L2 budget
        int kb = k_chunk(ckk, p->ld, CV_L2_FLOATS);
        if (kb < p->kc) { p->kc = kb; }
        p->mc = (int)zmin(ckkp, round_up(zmax(CV_L2_FLOATS / p->ld, CV_MR), CV_MR));
    } else {
        p->kct = k_chunk(ockk, cp, CV_L2_FLOATS);
    }
    // shared: packed weights (largest of the layouts) and offset tables
    size_t an = smul(&bad, ocp, ckk);
    size_t an2 = path == CONV_SHIFT ? smul(&bad, cp, ockk) : smul(&bad, ckkp, (size_t)p->OCg);
    an = smul(&bad, zmax(an, an2), (size_t)s->G);
    size_t top = 0;
    p->a_off = sreserve(&bad, &top, an);
    size_t noff = path == CONV_SHIFT ? sadd(&bad, ckk, ockk) : zmax((size_t)p->kc, (size_t)p->OCg);
    p->o_off = sreserve(&bad, &top, smul(&bad, noff, sizeof(ptrdiff_t) / sizeof(float)));
    p->shared = top;
    // per thread
    top = 0;
    size_t tn = smul(&bad, ocp, p->ld);
    if (path == CONV_SHIFT) {
        p->x_n = sadd(&bad, smul(&bad, (size_t)p->gi, p->xs), slack);       // padded images
        p->q_n = sadd(&bad, smul(&bad, (size_t)s->OC, p->qplane), slack);    // padded dout
        tn = zmax(tn, smul(&bad, cp, p->ld2));
    } else {
        p->x_n = smul(&bad, (size_t)p->kc, p->ld);                           // im2col chunk
        p->q_n = smul(&bad, (size_t)p->mc, p->ld);                           // dcol chunk
    }
    // dout on the output grid, zero elsewhere (shift: one block of OC rows per image)
    p->z_n = smul(&bad, smul(&bad, (size_t)s->OC, p->ld), path == CONV_SHIFT ? (size_t)p->gi : 1);
    p->x_off = sreserve(&bad, &top, p->x_n);
    p->q_off = sreserve(&bad, &top, p->q_n);
    p->z_off = sreserve(&bad, &top, p->z_n);
    p->t_off = sreserve(&bad, &top, tn);
    p->w_off = sreserve(&bad, &top, smul(&bad, (size_t)s->OC, ckk));
    p->b_off = sreserve(&bad, &top, (size_t)s->OC);
    p->per = top;
    // Winograd's layout overlays this one: sized whenever the shape allows it, so that the
    // workspace does not depend on the switch or the forced path.
    if (kd_wino_eligible(s)) {
        if (!kd_wino_plan(s, &p->wp)) { return 0; }
        p->shared = zmax(p->shared, p->wp.shared);
        // the weight gradient's region past both layouts: the slot's gradient partial (w_off)
        // stays intact while it runs
        p->wdw_off = round_up(zmax(p->per, p->wp.per), CV_ALIGN);
        p->per = sadd(&bad, p->wdw_off, p->wp.dw_per);
        p->wino = forced == CONV_WINO || (forced == 0 && kd_wino_enabled() && wino_rule(s));
    }
    return !bad;
}

static inline int conv_is_depthwise(const struct kd_conv_shape * s) {
    return s->G == s->C && s->G == s->OC;
}

size_t kd_conv2d_workspace(const struct kd_conv_shape * s, int nthreads) {
    if (conv_is_depthwise(s)) { return 0; }      // direct loops
    struct conv_plan p;
    if (nthreads < 1) { nthreads = 1; }
    // Deterministic mode: one slot per batch chunk too (kd_conv2d_backward's units).
    if (kd_get_deterministic() && nthreads < KD_DET_CONV_CHUNKS) { nthreads = KD_DET_CONV_CHUNKS; }
    if (!conv_plan_make(s, &p)) { return SIZE_MAX; }
    int bad = 0;
    size_t tot = sadd(&bad, sadd(&bad, p.shared, smul(&bad, p.per, (size_t)nthreads)), CV_ALIGN);
    return bad ? SIZE_MAX : tot;
}


static void conv_check_shape(const struct kd_conv_shape * s) {
    KD_ASSERT(s->G >= 1 && s->C % s->G == 0 && s->OC % s->G == 0);
    KD_ASSERT(s->K >= 1 && s->S >= 1 && s->P >= 0);
    KD_ASSERT(s->OH == (s->H + 2 * s->P - s->K) / s->S + 1);
    KD_ASSERT(s->OW == (s->W + 2 * s->P - s->K) / s->S + 1);
    (void)s;
}

// ---- packing -------------------------------------------------------------------------------
// Packed A for M rows and K columns: panels of 8 rows, [panel][k][8], zero rows past M.
// Called inside the conv's parallel region: the panels are shared out by an omp for, whose
// closing barrier makes them visible to every thread before use.

// Forward: A_g (OCg, CKK) = the weights as they are.
static void pack_fwd(float * Ap, const float * weight, const struct conv_plan * p, int G) {
    size_t ocp = round_up((size_t)p->OCg, CV_MR), CKK = (size_t)p->CKK, npan = ocp / CV_MR;
    long total = (long)(npan * (size_t)G);
    #pragma omp for schedule(static)
    for (long t = 0; t < total; t++) {
        size_t g = (size_t)t / npan, m0 = (size_t)t % npan * CV_MR;
        const float * w = weight + g * p->OCg * CKK;
        kd_pack_rows8(Ap + g * ocp * CKK + m0 * CKK, CV_MR, w + m0 * CKK, CKK, (int)zmin(CV_MR, (size_t)p->OCg - m0),
                   p->CKK);
    }
}

// Input gradient, shift path: rows c (Cg), columns (oc, kh, kw) of the flipped kernel:
// A[c][(oc*K + kh)*K + kw] = w[oc][c][K-1-kh][K-1-kw].
static void pack_tdinp(float * Ap, const float * weight, const struct conv_plan * p, int G, int K) {
    size_t cp = round_up((size_t)p->Cg, CV_MR), KK = (size_t)p->KK, npan = cp / CV_MR;
    size_t Kt = (size_t)p->OCg * KK, CKK = (size_t)p->CKK;
    long total = (long)(npan * (size_t)G);
    #pragma omp for schedule(static)
    for (long t = 0; t < total; t++) {
        size_t g = (size_t)t / npan, m0 = (size_t)t % npan * CV_MR;
        float * panel = Ap + g * cp * Kt + m0 * Kt;
        const float * w = weight + g * p->OCg * CKK;
        for (size_t oc = 0; oc < (size_t)p->OCg; oc++) {
            for (int kh = 0; kh < K; kh++) {
                for (int kw = 0; kw < K; kw++) {
                    size_t kk = (oc * K + kh) * K + kw;
                    size_t src = (K - 1 - kh) * K + (K - 1 - kw);
                    for (size_t i = 0; i < CV_MR; i++) {
                        size_t c = m0 + i;
                        panel[kk * CV_MR + i] = c < (size_t)p->Cg ? w[oc * CKK + c * KK + src] : 0.0f;
                    }
                }
            }
        }
    }
}

// Input gradient, col path: dcol = W_g^T dout_g: rows k (CKK), columns oc (OCg).
static void pack_tcol(float * Ap, const float * weight, const struct conv_plan * p, int G) {
    size_t ckkp = round_up((size_t)p->CKK, CV_MR), CKK = (size_t)p->CKK, OCg = (size_t)p->OCg;
    size_t npan = ckkp / CV_MR;
    long total = (long)(npan * (size_t)G);
    #pragma omp for schedule(static)
    for (long t = 0; t < total; t++) {
        size_t g = (size_t)t / npan, m0 = (size_t)t % npan * CV_MR;
        const float * w = weight + g * OCg * CKK;
        kd_pack_cols(Ap + g * ckkp * OCg + m0 * OCg, CV_MR, w + m0, CKK, CV_MR, (int)zmin(CV_MR, CKK - m0), (int)OCg);
    }
}

// Row offsets of the implicit im2col matrix on the shift path: (c, kh, kw) -> c*plane +
// kh*row + kw; and plain row offsets k*ld of a buffer.
static void shift_offsets(ptrdiff_t * off, int C, int K, size_t plane, size_t row) {
    size_t k = 0;
    for (int c = 0; c < C; c++) {
        for (int kh = 0; kh < K; kh++) {
            for (int kw = 0; kw < K; kw++) { off[k++] = (ptrdiff_t)(c * plane + kh * row + kw); }
        }
    }
}
static void row_offsets(ptrdiff_t * off, int n, size_t ld) {
    for (int k = 0; k < n; k++) { off[k] = (ptrdiff_t)(k * ld); }
}

// ---- building blocks -----------------------------------------------------------------------

// C (mpan*8 rows x npix, row stride ldc) = A B, or += (acc_in) continuing the chains: A is
// packed with panel stride 8*lda and column 0 at Ap; B row k at B + off[k]; npix is a
// multiple of NR. Panel-major, so each B panel is reused from L1 by all row panels.
static void gemm_panels(fwd_ukr_fn ukr, float * C, size_t ldc, const float * Ap, size_t lda, size_t mpan,
                        int K, const float * B, const ptrdiff_t * off, size_t npix, int acc_in) {
    for (size_t j = 0; j < npix; j += CV_NR) {
        for (size_t mp = 0; mp < mpan; mp++) {
            ukr(K, Ap + mp * CV_MR * lda, B + j, off, C + mp * CV_MR * ldc + j, ldc, acc_in);
        }
    }
}

// The full product over K in chunks of kc (chunk c continues the chains of chunk c-1).
static void gemm_chunked(fwd_ukr_fn ukr, float * C, size_t ldc, const float * Ap, size_t mpan, int K,
                         int kc, const float * B, const ptrdiff_t * off, size_t npix) {
    for (int k0 = 0; k0 < K; k0 += kc) {
        gemm_panels(ukr, C, ldc, Ap + (size_t)k0 * CV_MR, (size_t)K, mpan, imin(kc, K - k0), B, off + k0,
                    npix, k0 > 0);
    }
}

// part (M x N, row stride ldp) += D B^T: D row i at D + i*ldd, B row k at B + off[k], over
// nblk*16 pixels of nimg images (image m at D + m*ds, B + m*bs). Edge tiles repeat a valid
// row and drop its result.
static void dw_accumulate(dw_ukr_fn ukr, float * part, size_t ldp, int M, int N, const float * D,
                          size_t ldd, size_t ds, const float * B, const ptrdiff_t * off, size_t bs,
                          int nimg, size_t nblk) {
    const float * dr[DW_MR], * br[DW_NR];
    float r[DW_MR * DW_NR];
    for (int i0 = 0; i0 < M; i0 += DW_MR) {
        int mi = imin(DW_MR, M - i0);
        for (int i = 0; i < DW_MR; i++) { dr[i] = D + (size_t)(i0 + (i < mi ? i : 0)) * ldd; }
        for (int j0 = 0; j0 < N; j0 += DW_NR) {
            int nj = imin(DW_NR, N - j0);
            for (int j = 0; j < DW_NR; j++) { br[j] = B + off[j0 + (j < nj ? j : 0)]; }
            ukr(nimg, nblk, dr, ds, br, bs, r);
            for (int i = 0; i < mi; i++) {
                float * prow = part + (size_t)(i0 + i) * ldp + j0;
                for (int j = 0; j < nj; j++) { prow[j] += r[i * DW_NR + j]; }
            }
        }
    }
}

static inline void copy_floats(float * restrict d, const float * restrict s, size_t n) {
    for (size_t i = 0; i < n; i++) { d[i] = s[i]; }
}

// dst (C planes of dcols-wide rows, plane stride dplane) at row r0, column c0 <- src (C, H, W).
// Only the interior is written; the caller zeroes the borders once per call.
static void pad_copy(float * dst, size_t dplane, size_t dcols, int r0, int c0, const float * src,
                     int C, int H, int W) {
    for (int c = 0; c < C; c++) {
        float * d = dst + (size_t)c * dplane + (size_t)r0 * dcols + c0;
        const float * x = src + (size_t)c * H * W;
        for (int h = 0; h < H; h++) { copy_floats(d + (size_t)h * dcols, x + (size_t)h * W, W); }
    }
}

// Rows [k0, k1) of im2col for one image inp (Cg, H, W), written at col (row k at
// col + (k - k0)*ld, output pixel o at column o). Row (c*K + kh)*K + kw matches the weight
// layout (OCg, Cg, K, K).
static void im2col_rows(float * col, size_t ld, const float * inp, int H, int W, int OH, int OW,
                        int K, int S, int P, int k0, int k1) {
    for (int k = k0; k < k1; k++) {
        int c = k / (K * K), kh = (k / K) % K, kw = k % K;
        const float * plane = inp + (size_t)c * H * W;
        float * row = col + (size_t)(k - k0) * ld;
        int ow0, ow1;
        valid_range(&ow0, &ow1, W, OW, kw, S, P);
        for (int oh = 0; oh < OH; oh++) {
            float * r = row + (size_t)oh * OW;
            int ih = oh * S - P + kh;
            if (ih < 0 || ih >= H || ow0 == ow1) {
                for (int ow = 0; ow < OW; ow++) { r[ow] = 0.0f; }
                continue;
            }
            for (int ow = 0; ow < ow0; ow++) { r[ow] = 0.0f; }
            for (int ow = ow1; ow < OW; ow++) { r[ow] = 0.0f; }
            const float * src = plane + (size_t)ih * W + (ow0 * S - P + kw);
            if (S == 1) {
                copy_floats(r + ow0, src, (size_t)(ow1 - ow0));
            } else if (S == 2) {   // constant stride: the compiler vectorises it with permutes
                for (int ow = ow0; ow < ow1; ow++) { r[ow] = src[2 * (ow - ow0)]; }
            } else {
                for (int ow = ow0; ow < ow1; ow++) { r[ow] = src[(ow - ow0) * S]; }
            }
        }
    }
}

// dinp (Cg, H, W) += scatter of rows [k0, k1) of a col matrix (row k at col + (k-k0)*ld):
// the adjoint of im2col_rows.
static void col2im_rows_add(float * dinp, const float * col, size_t ld, int H, int W, int OH, int OW,
                            int K, int S, int P, int k0, int k1) {
    for (int k = k0; k < k1; k++) {
        int c = k / (K * K), kh = (k / K) % K, kw = k % K;
        float * plane = dinp + (size_t)c * H * W;
        const float * row = col + (size_t)(k - k0) * ld;
        int ow0, ow1;
        valid_range(&ow0, &ow1, W, OW, kw, S, P);
        if (ow0 == ow1) { continue; }
        for (int oh = 0; oh < OH; oh++) {
            int ih = oh * S - P + kh;
            if (ih < 0 || ih >= H) { continue; }
            const float * r = row + (size_t)oh * OW;
            axpy_scatter(plane + (size_t)ih * W + (ow0 * S - P + kw), 1.0f, r + ow0, ow1 - ow0, S);
        }
    }
}

// out rows (one image, OCg channels) <- staging rows (grid row stride gw), dropping the grid
// columns outside the output; bias after the product, as PyTorch.
static void store_out(float * o, const float * stage, size_t ld, size_t gw, int OCg, int OH, int OW,
                      const float * bias) {
    size_t OHW = (size_t)OH * OW;
    for (int oc = 0; oc < OCg; oc++) {
        float * orow = o + (size_t)oc * OHW;
        const float * srow = stage + (size_t)oc * ld;
        if (bias != NULL) {
            float bv = bias[oc];
            for (int oh = 0; oh < OH; oh++) {
                float * d = orow + (size_t)oh * OW;
                const float * r = srow + (size_t)oh * gw;
                for (int ow = 0; ow < OW; ow++) { d[ow] = r[ow] + bv; }
            }
        } else if (gw == (size_t)OW) {
            copy_floats(orow, srow, OHW);
        } else {
            for (int oh = 0; oh < OH; oh++) { copy_floats(orow + (size_t)oh * OW, srow + (size_t)oh * gw, OW); }
        }
    }
}

// One (n, c) plane of a depthwise conv: out (OH,OW), inp (H,W), w (K,K).
static void dw_forward_plane(float * out, const float * inp, const float * w, float bias,
                             const struct kd_conv_shape * s) {
    int K = s->K, S = s->S, P = s->P, OW = s->OW;
    memset(out, 0, (size_t)s->OH * OW * sizeof(float));
    // Tap-major order: each (kh, kw) adds a shifted, strided copy of the input; the plane
    // stays in L1 across the K*K passes.
    for (int kh = 0; kh < K; kh++) {
        int oh0, oh1;
        valid_range(&oh0, &oh1, s->H, s->OH, kh, S, P);
        for (int kw = 0; kw < K; kw++) {
            int ow0, ow1;
            valid_range(&ow0, &ow1, s->W, OW, kw, S, P);
            if (ow0 == ow1) { continue; }
            float wv = w[kh * K + kw];
            for (int oh = oh0; oh < oh1; oh++) {
                const float * src = inp + (size_t)(oh * S - P + kh) * s->W + (ow0 * S - P + kw);
                axpy_gather(out + (size_t)oh * OW + ow0, wv, src, ow1 - ow0, S);
            }
        }
    }
    for (size_t i = 0; i < (size_t)s->OH * OW; i++) { out[i] += bias; }
}

// out (N,OC,OH,OW), inp (N,C,H,W), weight (OC,C/G,K,K), bias (OC) or NULL
void kd_conv2d_forward(float * out, const float * inp, const float * weight, const float * bias,
                       const struct kd_conv_shape * s, float * work) {
    conv_check_shape(s);
    size_t HW = (size_t)s->H * s->W, OHW = (size_t)s->OH * s->OW;
    if (conv_is_depthwise(s)) {
        // Every (n, c) plane is independent.
        int NC = s->N * s->C;
        size_t KK = (size_t)s->K * s->K;
        #pragma omp parallel for schedule(static) if((size_t)NC * OHW * KK > KD_PAR_MIN)
        for (int nc = 0; nc < NC; nc++) {
            int c = nc % s->C;
            dw_forward_plane(out + (size_t)nc * OHW, inp + (size_t)nc * HW, weight + c * KK,
                             bias != NULL ? bias[c] : 0.0f, s);
        }
        return;
    }
    struct conv_plan pl;
    if (!conv_plan_make(s, &pl)) { KD_ASSERT(0); return; }
    struct conv_kernels kr = kd_conv_kernels();
    float * ws = align_floats(work);
    if (pl.wino) {
        kd_wino_forward(out, inp, weight, bias, s, &pl.wp, ws, pl.shared, pl.per);
        return;
    }
    float * Ap = ws + pl.a_off;
    ptrdiff_t * off = (ptrdiff_t *)(ws + pl.o_off);
    if (pl.path == CONV_SHIFT) { shift_offsets(off, pl.Cg, s->K, pl.plane, (size_t)pl.Wp); }
    else { row_offsets(off, pl.kc, pl.ld); }
    size_t ocp = round_up((size_t)pl.OCg, CV_MR), CKK = (size_t)pl.CKK, mpan = ocp / CV_MR;
    #pragma omp parallel
    {
        pack_fwd(Ap, weight, &pl, s->G);
        int n0, n1;
        batch_chunk(&n0, &n1, s->N, kd_omp_tid(), kd_omp_team());
        float * tw = ws + pl.shared + (size_t)kd_omp_tid() * pl.per;
        float * xb = tw + pl.x_off, * stage = tw + pl.t_off;
        // Borders of the padded image and columns past the grid are zeroed once here and
        // never written again (only finite values may be read where results are dropped).
        if (n0 < n1) { memset(xb, 0, pl.x_n * sizeof(float)); }
        if (pl.path == CONV_SHIFT) {
            for (int n = n0; n < n1; n++) {
                float * o = out + (size_t)n * s->OC * OHW;
                pad_copy(xb, pl.plane, (size_t)pl.Wp, s->P, s->P, inp + (size_t)n * s->C * HW, s->C, s->H, s->W);
                for (int g = 0; g < s->G; g++) {
                    gemm_chunked(kr.fwd, stage, pl.ld, Ap + (size_t)g * ocp * CKK, mpan, pl.CKK, pl.kc,
                                 xb + (size_t)g * pl.Cg * pl.plane, off, pl.ld);
                    store_out(o + (size_t)g * pl.OCg * OHW, stage, pl.ld, (size_t)pl.Wp, pl.OCg, s->OH, s->OW,
                              bias != NULL ? bias + g * pl.OCg : NULL);
                }
            }
        } else {
            for (int n = n0; n < n1; n += pl.gi) {
                int ni = imin(pl.gi, n1 - n);
                size_t npix = round_up((size_t)ni * OHW, CV_NR);
                for (int g = 0; g < s->G; g++) {
                    const float * Ag = Ap + (size_t)g * ocp * CKK;
                    for (int k0 = 0; k0 < pl.CKK; k0 += pl.kc) {
                        int k1 = imin(pl.CKK, k0 + pl.kc);
                        for (int i = 0; i < ni; i++) {
                            im2col_rows(xb + (size_t)i * OHW, pl.ld, inp + ((size_t)(n + i) * s->C + (size_t)g * pl.Cg) * HW,
                                        s->H, s->W, s->OH, s->OW, s->K, s->S, s->P, k0, k1);
                        }
                        gemm_panels(kr.fwd, stage, pl.ld, Ag + (size_t)k0 * CV_MR, CKK, mpan, k1 - k0, xb, off,
                                    npix, k0 > 0);
                    }
                    for (int i = 0; i < ni; i++) {
                        store_out(out + ((size_t)(n + i) * s->OC + (size_t)g * pl.OCg) * OHW, stage + (size_t)i * OHW,
                                  pl.ld, (size_t)s->OW, pl.OCg, s->OH, s->OW, bias != NULL ? bias + g * pl.OCg : NULL);
                    }
                }
            }
        }
    }
}

// Depthwise backward for channel c over the whole batch. Weight/bias gradients need a sum
// over n, so the parallel loop is over c only and n runs in order inside.
static void dw_backward_channel(float * dinp, float * dweight, float * dbias, const float * dout,
                                const float * inp, const float * weight, int c,
                                const struct kd_conv_shape * s) {
    int K = s->K, S = s->S, P = s->P, OW = s->OW;
    size_t HW = (size_t)s->H * s->W, OHW = (size_t)s->OH * OW;
    size_t cstride_in = (size_t)s->C * HW, cstride_out = (size_t)s->C * OHW;
    const float * inp_c = inp + (size_t)c * HW;
    const float * dout_c = dout + (size_t)c * OHW;
    if (dbias != NULL) {
        double sb = 0.0;
        for (int n = 0; n < s->N; n++) { sb += sum_f64(dout_c + n * cstride_out, OHW); }
        dbias[c] += (float)sb;
    }
    if (dweight == NULL && dinp == NULL) { return; }
    for (int kh = 0; kh < K; kh++) {
        int oh0, oh1;
        valid_range(&oh0, &oh1, s->H, s->OH, kh, S, P);
        for (int kw = 0; kw < K; kw++) {
            int ow0, ow1;
            valid_range(&ow0, &ow1, s->W, OW, kw, S, P);
            if (ow0 == ow1) { continue; }     // this tap only ever sees padding
            float wv = weight[(size_t)c * K * K + kh * K + kw];
            double sw = 0.0;
            for (int n = 0; n < s->N; n++) {
                const float * x = inp_c + n * cstride_in;
                const float * dy = dout_c + n * cstride_out;
                float * dx = dinp != NULL ? dinp + (size_t)c * HW + n * cstride_in : NULL;
                for (int oh = oh0; oh < oh1; oh++) {
                    size_t off = (size_t)(oh * S - P + kh) * s->W + (ow0 * S - P + kw);
                    const float * dyr = dy + (size_t)oh * OW + ow0;
                    if (dweight != NULL) { sw += dot_gather_f64(x + off, dyr, ow1 - ow0, S); }
                    if (dx != NULL) { axpy_scatter(dx + off, wv, dyr, ow1 - ow0, S); }
                }
            }
            if (dweight != NULL) { dweight[(size_t)c * K * K + kh * K + kw] += (float)sw; }
        }
    }
}

// dinp (N,C,H,W), dweight (OC,C/G,K,K), dbias (OC), dout (N,OC,OH,OW)
void kd_conv2d_backward(float * dinp, float * dweight, float * dbias, const float * dout,
                        const float * inp, const float * weight, const struct kd_conv_shape * s,
                        float * work) {
    conv_check_shape(s);
    if (dinp == NULL && dweight == NULL && dbias == NULL) { return; }
    if (conv_is_depthwise(s)) {
        #pragma omp parallel for schedule(static)
        for (int c = 0; c < s->C; c++) {
            dw_backward_channel(dinp, dweight, dbias, dout, inp, weight, c, s);
        }
        return;
    }
    struct conv_plan pl;
    if (!conv_plan_make(s, &pl)) { KD_ASSERT(0); return; }
    if (pl.wino && dinp != NULL) {
        // Weight and bias gradients first (the units below; they finish with their
        // reduction, so the workspace is free again), then the input gradient.
        kd_conv2d_backward(NULL, dweight, dbias, dout, inp, weight, s, work);
        kd_wino_dinp(dinp, dout, weight, s, &pl.wp, align_floats(work), pl.shared, pl.per);
        return;
    }
    struct conv_kernels kr = kd_conv_kernels();
    float * ws = align_floats(work);
    float * Ap = ws + pl.a_off;
    ptrdiff_t * off = (ptrdiff_t *)(ws + pl.o_off);
    ptrdiff_t * off2 = off + pl.CKK;                      // shift: rows of the padded dout
    size_t HW = (size_t)s->H * s->W, OHW = (size_t)s->OH * s->OW;
    size_t CKK = (size_t)pl.CKK, nw = (size_t)s->OC * CKK;
    size_t cp = round_up((size_t)pl.Cg, CV_MR), ckkp = round_up(CKK, CV_MR);
    size_t Kt = (size_t)pl.OCg * pl.KK;
    int shift = pl.path == CONV_SHIFT;
    if (shift) {
        shift_offsets(off, pl.Cg, s->K, pl.plane, (size_t)pl.Wp);
        shift_offsets(off2, pl.OCg, s->K, pl.qplane, (size_t)pl.Wq);
    } else {
        row_offsets(off, imax(pl.kc, pl.OCg), pl.ld);     // im2col chunk rows, and dout rows
    }
    // Units of work, each with its own weight/bias-gradient partial in workspace slot u: one
    // per thread (its contiguous share of the batch); in deterministic mode a fixed number of
    // batch chunks handed out round-robin, so which images meet in a partial, and the order
    // in which the partials are summed, do not depend on the thread count. A thread's
    // scratch (images, dout, staging) is always its own slot's.
    const int det = kd_get_deterministic();
    const int nchunks = imin(s->N, KD_DET_CONV_CHUNKS);
    int nteam = 1;
    #pragma omp parallel
    {
        if (dinp != NULL && shift) { pack_tdinp(Ap, weight, &pl, s->G, s->K); }
        if (dinp != NULL && !shift) { pack_tcol(Ap, weight, &pl, s->G); }
        int tid = kd_omp_tid(), nt = kd_omp_team(), n0, n1;
        if (tid == 0) { nteam = nt; }
        const int nunits = det ? nchunks : nt;
        float * tw = ws + pl.shared + (size_t)tid * pl.per;
        float * xb = tw + pl.x_off, * qb = tw + pl.q_off, * zb = tw + pl.z_off, * stage = tw + pl.t_off;
        const int need_z = (dweight != NULL && !pl.wino) || (!shift && dinp != NULL);   // dout on the forward grid
        if (tid < nunits) {
            // Zero the thread's scratch once, whatever its units: padding, grid columns
            // outside the output, row tails are never written afterwards.
            if (dweight != NULL && !pl.wino) { memset(xb, 0, pl.x_n * sizeof(float)); }
            if (dinp != NULL && shift) { memset(qb, 0, pl.q_n * sizeof(float)); }
            if (need_z) { memset(zb, 0, pl.z_n * sizeof(float)); }
        }
        for (int u = tid; u < nunits; u += nt) {
            batch_chunk(&n0, &n1, s->N, u, nunits);
            float * part = ws + pl.shared + (size_t)u * pl.per;
            // Private partials, so no thread ever writes another's gradient.
            float * dw = dweight != NULL ? part + pl.w_off : NULL;
            float * db = dbias != NULL ? part + pl.b_off : NULL;
            if (n0 < n1) {
                if (dw != NULL && pl.wino) {
                    // the whole unit at once; the direct path below then skips the weights
                    kd_wino_dweight(dw, dout, inp, n0, n1, s, &pl.wp, tw + pl.wdw_off);
                    dw = NULL;
                } else if (dw != NULL) {
                    memset(dw, 0, nw * sizeof(float));
                }
                if (db != NULL) { memset(db, 0, (size_t)s->OC * sizeof(float)); }
            }
            for (int n = n0; n < n1; n += pl.gi) {
                int ni = imin(pl.gi, n1 - n);
                const float * x = inp + (size_t)n * s->C * HW;
                const float * dy = dout + (size_t)n * s->OC * OHW;
                float * dx = dinp != NULL ? dinp + (size_t)n * s->C * HW : NULL;
                if (db != NULL) {
                    for (int i = 0; i < ni; i++) {
                        for (int oc = 0; oc < s->OC; oc++) {
                            db[oc] += (float)sum_f64(dy + ((size_t)i * s->OC + oc) * OHW, OHW);
                        }
                    }
                }
                if (dw == NULL && dx == NULL) { continue; }
                size_t npix = shift ? pl.grid : (size_t)ni * pl.grid;   // grid pixels (shift: per image)
                size_t nblk = round_up(npix, DW_L) / DW_L;
                if (need_z && shift) {
                    // dout of each image on the padded grid (row stride Wp), in its own block of
                    // OC rows; the dropped columns stay zero.
                    for (int i = 0; i < ni; i++) {
                        for (int oc = 0; oc < s->OC; oc++) {
                            float * zrow = zb + (size_t)i * pl.zs + (size_t)oc * pl.ld;
                            const float * drow = dy + ((size_t)i * s->OC + oc) * OHW;
                            for (int oh = 0; oh < s->OH; oh++) {
                                copy_floats(zrow + (size_t)oh * pl.Wp, drow + (size_t)oh * s->OW, s->OW);
                            }
                        }
                    }
                } else if (need_z) {
                    // dout of the group side by side: row oc holds image i at i*OH*OW; a short
                    // last group leaves stale values past its pixels, so zero up to the block.
                    for (int oc = 0; oc < s->OC; oc++) {
                        float * zrow = zb + (size_t)oc * pl.ld;
                        for (int i = 0; i < ni; i++) { copy_floats(zrow + (size_t)i * OHW, dy + ((size_t)i * s->OC + oc) * OHW, OHW); }
                        for (size_t p = npix; p < nblk * DW_L; p++) { zrow[p] = 0.0f; }
                    }
                }
                if (shift && dw != NULL) {
                    for (int i = 0; i < ni; i++) {
                        pad_copy(xb + (size_t)i * pl.xs, pl.plane, (size_t)pl.Wp, s->P, s->P, x + (size_t)i * s->C * HW,
                                 s->C, s->H, s->W);
                    }
                }
                for (int g = 0; g < s->G; g++) {
                    const float * zg = zb + (size_t)g * pl.OCg * pl.ld;
                    float * dwg = dw != NULL ? dw + (size_t)g * pl.OCg * CKK : NULL;
                    if (shift) {
                        if (dwg != NULL) {
                            dw_accumulate(kr.dw, dwg, CKK, pl.OCg, pl.CKK, zg, pl.ld, pl.zs,
                                          xb + (size_t)g * pl.Cg * pl.plane, off, pl.xs, ni, nblk);
                        }
                        continue;
                    }
                    // col path
                    if (dwg != NULL) {
                        for (int k0 = 0; k0 < pl.CKK; k0 += pl.kc) {
                            int k1 = imin(pl.CKK, k0 + pl.kc);
                            for (int i = 0; i < ni; i++) {
                                im2col_rows(xb + (size_t)i * OHW, pl.ld, x + ((size_t)i * s->C + (size_t)g * pl.Cg) * HW,
                                            s->H, s->W, s->OH, s->OW, s->K, s->S, s->P, k0, k1);
                            }
                            dw_accumulate(kr.dw, dwg + k0, CKK, pl.OCg, k1 - k0, zg, pl.ld, 0, xb, off, 0, 1, nblk);
                        }
                    }
                    if (dx != NULL) {
                        // dcol (CKK, pixels) = W_g^T dout_g, mc rows at a time, then col2im.
                        const float * At = Ap + (size_t)g * ckkp * pl.OCg;
                        size_t npan = round_up(npix, CV_NR);
                        for (int m0 = 0; m0 < pl.CKK; m0 += pl.mc) {
                            int m1 = imin(pl.CKK, m0 + pl.mc);
                            size_t mpan = round_up((size_t)(m1 - m0), CV_MR) / CV_MR;
                            gemm_panels(kr.fwd, qb, pl.ld, At + (size_t)m0 * pl.OCg, (size_t)pl.OCg, mpan, pl.OCg, zg,
                                        off, npan, 0);
                            for (int i = 0; i < ni; i++) {
                                col2im_rows_add(dx + ((size_t)i * s->C + (size_t)g * pl.Cg) * HW, qb + (size_t)i * OHW,
                                                pl.ld, s->H, s->W, s->OH, s->OW, s->K, s->S, s->P, m0, m1);
                            }
                        }
                    }
                }
                // Shift path input gradient, image by image: dinp_g = conv(padded dout_g,
                // flipped W_g^T) on the grid H x Wq.
                for (int i = 0; shift && dx != NULL && i < ni; i++) {
                    pad_copy(qb, pl.qplane, (size_t)pl.Wq, pl.Pt, pl.Pt, dy + (size_t)i * s->OC * OHW, s->OC, s->OH, s->OW);
                    for (int g = 0; g < s->G; g++) {
                        float * dxg = dx + ((size_t)i * s->C + (size_t)g * pl.Cg) * HW;
                        gemm_chunked(kr.fwd, stage, pl.ld2, Ap + (size_t)g * cp * Kt, cp / CV_MR, (int)Kt, pl.kct,
                                     qb + (size_t)g * pl.OCg * pl.qplane, off2, pl.ld2);
                        for (int c = 0; c < pl.Cg; c++) {
                            float * drow = dxg + (size_t)c * HW;
                            const float * srow = stage + (size_t)c * pl.ld2;
                            for (int h = 0; h < s->H; h++) {
                                float * d = drow + (size_t)h * s->W;
                                const float * r = srow + (size_t)h * pl.Wq;
                                for (int w = 0; w < s->W; w++) { d[w] += r[w]; }
                            }
                        }
                    }
                }
            }
        }
    }
    // Reduce the partials in slot order (fixed for a given thread count; in deterministic
    // mode, fixed). Only units that got images wrote a partial: with balanced chunks, those
    // are the first min(units, N).
    int nactive = det ? nchunks : imin(nteam, s->N);
    if (dweight != NULL) {
        const float * p0 = ws + pl.shared + pl.w_off;
        #pragma omp parallel for schedule(static) if(nw * (size_t)nactive > KD_PAR_MIN)
        for (size_t i = 0; i < nw; i++) {
            float acc = p0[i];
            for (int t = 1; t < nactive; t++) { acc += p0[(size_t)t * pl.per + i]; }
            dweight[i] += acc;
        }
    }
    if (dbias != NULL) {
        const float * p0 = ws + pl.shared + pl.b_off;
        for (int oc = 0; oc < s->OC; oc++) {
            float acc = p0[oc];
            for (int t = 1; t < nactive; t++) { acc += p0[(size_t)t * pl.per + oc]; }
            dbias[oc] += acc;
        }
    }
}

