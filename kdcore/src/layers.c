// Layer kernels (forward/backward) over raw float pointers, in the spirit of llm.c.
//
// Dimension names used throughout:
//   N   batch size
//   C   input channels (or input features for linear), OC output channels / features
//   H,W input height/width, OH,OW output height/width, HW = H*W, OHW = OH*OW
//   K   (square) kernel size, S stride, P zero padding, G groups
//   Cg = C/G and OCg = OC/G channels per group, CKK = Cg*K*K (one im2col column)
//
// Conventions (see layers.h): tensors are NCHW, C-contiguous; backward kernels accumulate
// (+=) into every gradient they are given and skip the NULL ones; nothing here allocates.
//
// Threading: a kernel is either BLAS-threaded (cblas_sgemm called outside any OpenMP
// region, so the OpenMP build of OpenBLAS uses all threads) or OpenMP-threaded over the
// dimension it writes. sgemm calls made inside an OpenMP region run single-threaded,
// because OpenBLAS checks omp_in_parallel(). Every reduction runs in an order fixed by the
// data layout (and, for conv weight gradients, by the thread count), so results are
// deterministic for a given thread count.
#include "layers.h"
#include "kd_internal.h"

#include <cblas.h>

#ifndef _OPENMP
// NO_OMP builds: the omp pragmas below are plain no-ops; keep -Wall quiet about them.
#pragma GCC diagnostic ignored "-Wunknown-pragmas"
#endif

// Elementwise loops below this size are not worth waking the thread team for.
#define KD_PAR_MIN 32768

// Number of threads in the current team (1 outside a parallel region or without OpenMP).
static inline int team_size(void) {
#ifdef _OPENMP
    return omp_get_num_threads();
#else
    return 1;
#endif
}

static inline int imin(int a, int b) { return a < b ? a : b; }
static inline int imax(int a, int b) { return a > b ? a : b; }

// Reductions in double. Eight independent lanes (plus one for the tail) let the compiler
// vectorise the float->double accumulation and keep the lanes in registers; the lane of
// each element depends only on its index, so the result is the same whatever thread or
// thread count computes it.
static inline double lanes_sum(const double * a) {
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

// sum(x)
static double sum_f64(const float * x, size_t n) {
    double acc[8] = {0}, tail = 0.0;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        for (int j = 0; j < 8; j++) { acc[j] += (double)x[i + j]; }
    }
    for (; i < n; i++) { tail += (double)x[i]; }
    return lanes_sum(acc) + tail;
}

// sum((x - m)^2)
static double sumsq_dev_f64(const float * x, size_t n, double m) {
    double acc[8] = {0}, tail = 0.0;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        for (int j = 0; j < 8; j++) {
            double d = (double)x[i + j] - m;
            acc[j] += d * d;
        }
    }
    for (; i < n; i++) {
        double d = (double)x[i] - m;
        tail += d * d;
    }
    return lanes_sum(acc) + tail;
}

// *sy += sum(y) and *sxy += sum((x - m) * y), in one pass over y
static void sum_dot_dev_f64(double * sy, double * sxy, const float * x, const float * y, size_t n,
                            double m) {
    double a[8] = {0}, b[8] = {0}, ta = 0.0, tb = 0.0;
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        for (int j = 0; j < 8; j++) {
            a[j] += (double)y[i + j];
            b[j] += ((double)x[i + j] - m) * (double)y[i + j];
        }
    }
    for (; i < n; i++) {
        ta += (double)y[i];
        tb += ((double)x[i] - m) * (double)y[i];
    }
    *sy += lanes_sum(a) + ta;
    *sxy += lanes_sum(b) + tb;
}

// sum(x[i*S] * y[i]); the S == 1 case uses the lanes.
static double dot_gather_f64(const float * x, const float * y, int n, int S) {
    double acc[8] = {0}, tail = 0.0;
    int i = 0;
    if (S == 1) {
        for (; i + 8 <= n; i += 8) {
            for (int j = 0; j < 8; j++) { acc[j] += (double)x[i + j] * (double)y[i + j]; }
        }
    }
    for (; i < n; i++) { tail += (double)x[(size_t)i * S] * (double)y[i]; }
    return lanes_sum(acc) + tail;
}

// y[i] += a * x[i*S]. The S == 1 branch is a separate loop so that it vectorises.
static inline void axpy_gather(float * y, float a, const float * x, int n, int S) {
    if (S == 1) {
        for (int i = 0; i < n; i++) { y[i] += a * x[i]; }
    } else {
        for (int i = 0; i < n; i++) { y[i] += a * x[(size_t)i * S]; }
    }
}

// y[i*S] += a * x[i]
static inline void axpy_scatter(float * y, float a, const float * x, int n, int S) {
    if (S == 1) {
        for (int i = 0; i < n; i++) { y[i] += a * x[i]; }
    } else {
        for (int i = 0; i < n; i++) { y[(size_t)i * S] += a * x[i]; }
    }
}

// Range [*o0, *o1) of output positions o (0 <= o < O) whose input position o*S - P + k
// lies inside [0, L). Positions outside read zero padding.
static inline void valid_range(int * o0, int * o1, int L, int O, int k, int S, int P) {
    int lo = P - k;                     // need o*S >= P - k
    int hi = L - 1 + P - k;             // need o*S <= L - 1 + P - k
    *o0 = lo <= 0 ? 0 : imin(O, (lo + S - 1) / S);
    *o1 = hi < 0 ? 0 : imin(O, hi / S + 1);
    if (*o1 < *o0) { *o1 = *o0; }
}

// ----------------------------------------------------------------------------------------
// linear
// https://pytorch.org/docs/stable/generated/torch.nn.Linear.html
// One top-level sgemm per product, threaded by OpenBLAS. Its split of the matrices across
// threads changes which micro-kernel (and so which rounding) some elements get: results
// are reproducible for a given thread count, and equal only to rounding across counts.

// out (N,OC), inp (N,C), weight (OC,C), bias (OC) or NULL
void kd_linear_forward(float * out, const float * inp, const float * weight, const float * bias,
                       int N, int C, int OC) {
    // Prefill with the bias and let sgemm accumulate (beta=1): PyTorch's addmm does the same.
    float beta = 0.0f;
    if (bias != NULL) {
        for (int n = 0; n < N; n++) { memcpy(out + (size_t)n * OC, bias, (size_t)OC * sizeof(float)); }
        beta = 1.0f;
    }
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, N, OC, C,
                1.0f, inp, C, weight, C, beta, out, OC);
}

// dinp (N,C), dweight (OC,C), dbias (OC), dout (N,OC), inp (N,C), weight (OC,C)
void kd_linear_backward(float * dinp, float * dweight, float * dbias, const float * dout,
                        const float * inp, const float * weight, int N, int C, int OC) {
    // dinp += dout @ W
    if (dinp != NULL) {
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, N, C, OC,
                    1.0f, dout, OC, weight, C, 1.0f, dinp, C);
    }
    // dweight += dout^T @ inp
    if (dweight != NULL) {
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, OC, C, N,
                    1.0f, dout, OC, inp, C, 1.0f, dweight, C);
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

// ----------------------------------------------------------------------------------------
// conv2d: im2col + sgemm per image; the batch is split across OpenMP threads.
// https://pytorch.org/docs/stable/generated/torch.nn.Conv2d.html
// PyTorch's Conv2d is a cross-correlation: out[oc,oh,ow] = b[oc] +
//   sum_{c,kh,kw} w[oc,c,kh,kw] * inp[c, oh*S-P+kh, ow*S-P+kw].

// Depthwise convs (one input and one output channel per group) are done with direct loops:
// their im2col matrices have a single row per tap, so sgemm would be all overhead.
static inline int conv_is_depthwise(const struct kd_conv_shape * s) {
    return s->G == s->C && s->G == s->OC;
}

// A 1x1 kernel with stride 1 and no padding reads the input plane as is: the image itself
// is the (Cg, HW) column matrix and im2col is skipped.
static inline int conv_is_pointwise(const struct kd_conv_shape * s) {
    return s->K == 1 && s->S == 1 && s->P == 0;
}

// Floats of `work` one thread uses: [im2col buffer (CKK, OHW)] [dweight partial (OC, CKK)]
// [dbias partial (OC)]. Returns SIZE_MAX on overflow.
static size_t conv_thread_floats(const struct kd_conv_shape * s) {
    if (conv_is_depthwise(s)) { return 0; }
    size_t ckk, col = 0, dw, tot;
    if (!kd_mul_ok((size_t)(s->C / s->G), (size_t)s->K * (size_t)s->K, &ckk)) { return SIZE_MAX; }
    if (!conv_is_pointwise(s) && !kd_mul_ok(ckk, (size_t)s->OH * (size_t)s->OW, &col)) { return SIZE_MAX; }
    if (!kd_mul_ok(ckk, (size_t)s->OC, &dw)) { return SIZE_MAX; }
    if (__builtin_add_overflow(col, dw, &tot) || __builtin_add_overflow(tot, (size_t)s->OC, &tot)) {
        return SIZE_MAX;
    }
    return tot;
}

size_t kd_conv2d_workspace(const struct kd_conv_shape * s, int nthreads) {
    size_t per = conv_thread_floats(s), tot;
    if (nthreads < 1) { nthreads = 1; }
    if (per == SIZE_MAX || !kd_mul_ok(per, (size_t)nthreads, &tot)) { return SIZE_MAX; }
    return tot;
}

static void conv_check_shape(const struct kd_conv_shape * s) {
    KD_ASSERT(s->G >= 1 && s->C % s->G == 0 && s->OC % s->G == 0);
    KD_ASSERT(s->K >= 1 && s->S >= 1 && s->P >= 0);
    KD_ASSERT(s->OH == (s->H + 2 * s->P - s->K) / s->S + 1);
    KD_ASSERT(s->OW == (s->W + 2 * s->P - s->K) / s->S + 1);
    (void)s;
}

// col (Cg*K*K, OH*OW) <- inp (Cg, H, W); row (c*K + kh)*K + kw matches the weight layout
// (OCg, Cg, K, K), so the conv is W_g (OCg, CKK) @ col.
static void im2col(float * col, const float * inp, int Cg, int H, int W, int OH, int OW,
                   int K, int S, int P) {
    size_t OHW = (size_t)OH * OW;
    for (int c = 0; c < Cg; c++) {
        const float * plane = inp + (size_t)c * H * W;
        for (int kh = 0; kh < K; kh++) {
            for (int kw = 0; kw < K; kw++) {
                float * row = col + ((size_t)(c * K + kh) * K + kw) * OHW;
                int ow0, ow1;
                valid_range(&ow0, &ow1, W, OW, kw, S, P);
                for (int oh = 0; oh < OH; oh++) {
                    float * r = row + (size_t)oh * OW;
                    int ih = oh * S - P + kh;
                    if (ih < 0 || ih >= H) {
                        memset(r, 0, (size_t)OW * sizeof(float));
                        continue;
                    }
                    for (int ow = 0; ow < ow0; ow++) { r[ow] = 0.0f; }
                    for (int ow = ow1; ow < OW; ow++) { r[ow] = 0.0f; }
                    if (ow0 == ow1) { continue; }
                    const float * src = plane + (size_t)ih * W + (ow0 * S - P + kw);
                    if (S == 1) {
                        memcpy(r + ow0, src, (size_t)(ow1 - ow0) * sizeof(float));
                    } else {
                        for (int ow = ow0; ow < ow1; ow++) { r[ow] = src[(ow - ow0) * S]; }
                    }
                }
            }
        }
    }
}

// dinp (Cg, H, W) += scatter of col (Cg*K*K, OH*OW): the adjoint of im2col. Padding
// positions are dropped.
static void col2im_add(float * dinp, const float * col, int Cg, int H, int W, int OH, int OW,
                       int K, int S, int P) {
    size_t OHW = (size_t)OH * OW;
    for (int c = 0; c < Cg; c++) {
        float * plane = dinp + (size_t)c * H * W;
        for (int kh = 0; kh < K; kh++) {
            for (int kw = 0; kw < K; kw++) {
                const float * row = col + ((size_t)(c * K + kh) * K + kw) * OHW;
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
    }
}

// Static contiguous chunk [*n0, *n1) of the N images for thread tid of nt: the first
// N % nt threads take one extra image; threads past N get an empty chunk.
static inline void batch_chunk(int * n0, int * n1, int N, int tid, int nt) {
    int base = N / nt, rem = N % nt;
    *n0 = tid * base + imin(tid, rem);
    *n1 = *n0 + base + (tid < rem ? 1 : 0);
}

// out (OC,OH,OW) for one image inp (C,H,W); weight (OC,Cg,K,K); col: im2col buffer
static void conv_forward_image(float * out, const float * inp, const float * weight,
                               const float * bias, const struct kd_conv_shape * s, float * col) {
    int Cg = s->C / s->G, OCg = s->OC / s->G, CKK = Cg * s->K * s->K;
    int OHW = s->OH * s->OW;
    size_t HW = (size_t)s->H * s->W;
    for (int g = 0; g < s->G; g++) {
        const float * inp_g = inp + (size_t)g * Cg * HW;
        const float * w_g = weight + (size_t)g * OCg * CKK;
        float * out_g = out + (size_t)g * OCg * OHW;
        const float * b = inp_g;
        if (!conv_is_pointwise(s)) {
            im2col(col, inp_g, Cg, s->H, s->W, s->OH, s->OW, s->K, s->S, s->P);
            b = col;
        }
        // out_g (OCg, OHW) = W_g (OCg, CKK) @ col (CKK, OHW)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, OCg, OHW, CKK,
                    1.0f, w_g, CKK, b, OHW, 0.0f, out_g, OHW);
    }
    // Bias after the product, as oneDNN/PyTorch apply it.
    if (bias != NULL) {
        for (int oc = 0; oc < s->OC; oc++) {
            float * o = out + (size_t)oc * OHW;
            float bv = bias[oc];
            for (int i = 0; i < OHW; i++) { o[i] += bv; }
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
        #pragma omp parallel for schedule(static)
        for (int nc = 0; nc < NC; nc++) {
            int c = nc % s->C;
            dw_forward_plane(out + (size_t)nc * OHW, inp + (size_t)nc * HW, weight + c * KK,
                             bias != NULL ? bias[c] : 0.0f, s);
        }
        return;
    }
    size_t per = conv_thread_floats(s);
    #pragma omp parallel
    {
        int n0, n1;
        batch_chunk(&n0, &n1, s->N, kd_omp_tid(), team_size());
        float * col = work + (size_t)kd_omp_tid() * per;
        for (int n = n0; n < n1; n++) {
            conv_forward_image(out + (size_t)n * s->OC * OHW, inp + (size_t)n * s->C * HW,
                               weight, bias, s, col);
        }
    }
}

// Backward of one image. dinp (C,H,W) or NULL; dw (OC,CKK) and db (OC) are this thread's
// partials or NULL; dout (OC,OH,OW); inp (C,H,W); col: im2col buffer.
static void conv_backward_image(float * dinp, float * dw, float * db, const float * dout,
                                const float * inp, const float * weight,
                                const struct kd_conv_shape * s, float * col) {
    int Cg = s->C / s->G, OCg = s->OC / s->G, CKK = Cg * s->K * s->K;
    int OHW = s->OH * s->OW, pw = conv_is_pointwise(s);
    size_t HW = (size_t)s->H * s->W;
    for (int g = 0; g < s->G; g++) {
        const float * inp_g = inp + (size_t)g * Cg * HW;
        const float * w_g = weight + (size_t)g * OCg * CKK;
        const float * dout_g = dout + (size_t)g * OCg * OHW;
        if (dw != NULL) {
            // dW_g (OCg, CKK) += dout_g (OCg, OHW) @ col^T (OHW, CKK)
            const float * b = inp_g;
            if (!pw) {
                im2col(col, inp_g, Cg, s->H, s->W, s->OH, s->OW, s->K, s->S, s->P);
                b = col;
            }
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, OCg, CKK, OHW,
                        1.0f, dout_g, OHW, b, OHW, 1.0f, dw + (size_t)g * OCg * CKK, CKK);
        }
        if (dinp != NULL) {
            // dcol (CKK, OHW) = W_g^T (CKK, OCg) @ dout_g (OCg, OHW), scattered back by
            // col2im. For 1x1/S1/P0 dcol is the input gradient itself: accumulate directly.
            float * dinp_g = dinp + (size_t)g * Cg * HW;
            if (pw) {
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, CKK, OHW, OCg,
                            1.0f, w_g, CKK, dout_g, OHW, 1.0f, dinp_g, OHW);
            } else {
                cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, CKK, OHW, OCg,
                            1.0f, w_g, CKK, dout_g, OHW, 0.0f, col, OHW);
                col2im_add(dinp_g, col, Cg, s->H, s->W, s->OH, s->OW, s->K, s->S, s->P);
            }
        }
    }
    if (db != NULL) {
        for (int oc = 0; oc < s->OC; oc++) { db[oc] += (float)sum_f64(dout + (size_t)oc * OHW, (size_t)OHW); }
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
    int CKK = s->C / s->G * s->K * s->K;
    size_t HW = (size_t)s->H * s->W, OHW = (size_t)s->OH * s->OW;
    size_t per = conv_thread_floats(s);
    size_t col_floats = per - (size_t)s->OC * CKK - (size_t)s->OC;
    size_t nw = (size_t)s->OC * CKK;
    int nteam = 1;
    #pragma omp parallel
    {
        int tid = kd_omp_tid(), nt = team_size(), n0, n1;
        if (tid == 0) { nteam = nt; }
        batch_chunk(&n0, &n1, s->N, tid, nt);
        float * col = work + (size_t)tid * per;
        // Private partials, so no thread ever writes another's gradient.
        float * dw = dweight != NULL ? col + col_floats : NULL;
        float * db = dbias != NULL ? col + col_floats + nw : NULL;
        if (n0 < n1) {
            if (dw != NULL) { memset(dw, 0, nw * sizeof(float)); }
            if (db != NULL) { memset(db, 0, (size_t)s->OC * sizeof(float)); }
        }
        for (int n = n0; n < n1; n++) {
            conv_backward_image(dinp != NULL ? dinp + (size_t)n * s->C * HW : NULL, dw, db,
                                dout + (size_t)n * s->OC * OHW, inp + (size_t)n * s->C * HW,
                                weight, s, col);
        }
    }
    // Reduce the partials in thread order (fixed for a given thread count). Only threads
    // that got images wrote a partial: with balanced chunks, those are the first min(nt, N).
    int nactive = imin(nteam, s->N);
    if (dweight != NULL) {
        const float * p0 = work + col_floats;
        #pragma omp parallel for schedule(static) if(nw * (size_t)nactive > KD_PAR_MIN)
        for (size_t i = 0; i < nw; i++) {
            float acc = p0[i];
            for (int t = 1; t < nactive; t++) { acc += p0[(size_t)t * per + i]; }
            dweight[i] += acc;
        }
    }
    if (dbias != NULL) {
        const float * p0 = work + col_floats + nw;
        for (int oc = 0; oc < s->OC; oc++) {
            float acc = p0[oc];
            for (int t = 1; t < nactive; t++) { acc += p0[(size_t)t * per + oc]; }
            dbias[oc] += acc;
        }
    }
}

// ----------------------------------------------------------------------------------------
// batchnorm
// https://pytorch.org/docs/stable/generated/torch.nn.BatchNorm2d.html
// Each channel's statistics are reduced by one thread, over n then hw, in double: the
// result is independent of the thread count.

// Applies out = inp * alpha + beta with alpha = rstd*w, beta = b - mean*alpha, which is how
// PyTorch's CPU kernel folds the affine transform.
static void bn_apply_channel(float * out, const float * inp, float mean, float rstd, float w,
                             float b, int c, int N, int C, int HW) {
    float alpha = rstd * w;
    float beta = b - mean * alpha;
    for (int n = 0; n < N; n++) {
        size_t off = ((size_t)n * C + c) * HW;
        for (int i = 0; i < HW; i++) { out[off + i] = inp[off + i] * alpha + beta; }
    }
}

// out, inp (N,C,HW); mean, rstd, run_mean, run_var, weight, bias (C)
void kd_batchnorm_forward_train(float * out, float * mean, float * rstd, float * run_mean,
                                float * run_var, const float * inp, const float * weight,
                                const float * bias, int N, int C, int HW, float eps, float momentum) {
    size_t cnt = (size_t)N * HW;
    #pragma omp parallel for schedule(static)
    for (int c = 0; c < C; c++) {
        // Two passes (mean, then squared deviations) avoid the cancellation of E[x^2]-E[x]^2.
        double s = 0.0;
        for (int n = 0; n < N; n++) { s += sum_f64(inp + ((size_t)n * C + c) * HW, (size_t)HW); }
        double m = s / (double)cnt;
        double ss = 0.0;
        for (int n = 0; n < N; n++) { ss += sumsq_dev_f64(inp + ((size_t)n * C + c) * HW, (size_t)HW, m); }
        double var = ss / (double)cnt;              // biased: used to normalise
        // Unbiased for the running estimate, as PyTorch; a single value has no spread
        // estimate, so fall back to the biased one (0) instead of dividing by zero.
        double var_unbiased = cnt > 1 ? ss / (double)(cnt - 1) : var;
        mean[c] = (float)m;
        rstd[c] = (float)(1.0 / sqrt(var + (double)eps));
        double mom = (double)momentum;
        if (run_mean != NULL) { run_mean[c] = (float)(mom * m + (1.0 - mom) * (double)run_mean[c]); }
        if (run_var != NULL) { run_var[c] = (float)(mom * var_unbiased + (1.0 - mom) * (double)run_var[c]); }
        bn_apply_channel(out, inp, mean[c], rstd[c], weight[c], bias[c], c, N, C, HW);
    }
}

// out, inp (N,C,HW); mean, rstd, weight, bias, run_mean, run_var (C)
void kd_batchnorm_forward_eval(float * out, float * mean, float * rstd, const float * inp,
                               const float * weight, const float * bias, const float * run_mean,
                               const float * run_var, int N, int C, int HW, float eps) {
    #pragma omp parallel for schedule(static) if((size_t)N * C * HW > KD_PAR_MIN)
    for (int c = 0; c < C; c++) {
        mean[c] = run_mean[c];
        rstd[c] = 1.0f / sqrtf(run_var[c] + eps);
        bn_apply_channel(out, inp, mean[c], rstd[c], weight[c], bias[c], c, N, C, HW);
    }
}

// dinp, dout, inp (N,C,HW); dweight, dbias, mean, rstd, weight (C)
void kd_batchnorm_backward(float * dinp, float * dweight, float * dbias, const float * dout,
                           const float * inp, const float * mean, const float * rstd,
                           const float * weight, int N, int C, int HW, int batch_stats) {
    size_t cnt = (size_t)N * HW;
    #pragma omp parallel for schedule(static)
    for (int c = 0; c < C; c++) {
        double m = (double)mean[c];
        float r = rstd[c];
        // sum(dy) and sum((x - mean) * dy); sum(dy * xhat) = rstd * the latter.
        double sdy = 0.0, sdyx = 0.0;
        for (int n = 0; n < N; n++) {
            size_t off = ((size_t)n * C + c) * HW;
            sum_dot_dev_f64(&sdy, &sdyx, inp + off, dout + off, (size_t)HW, m);
        }
        if (dbias != NULL) { dbias[c] += (float)sdy; }
        if (dweight != NULL) { dweight[c] += (float)(sdyx * (double)r); }
        if (dinp == NULL) { continue; }
        float w = weight[c];
        if (batch_stats) {
            // dx = rstd*w * (dy - mean(dy) - xhat * mean(dy*xhat)), with
            // xhat * mean(dy*xhat) = (x - mean) * k, k = sum((x-mean)*dy) * rstd^2 / cnt.
            // The means run through the batch statistics, hence the two extra terms.
            float mdy = (float)(sdy / (double)cnt);
            float k = (float)(sdyx * (double)r * (double)r / (double)cnt);
            float mf = mean[c];
            for (int n = 0; n < N; n++) {
                size_t off = ((size_t)n * C + c) * HW;
                for (int i = 0; i < HW; i++) {
                    float xk = (inp[off + i] - mf) * k;
                    dinp[off + i] += (dout[off + i] - mdy - xk) * r * w;
                }
            }
        } else {
            // Eval: mean and rstd are constants, so BN is a per-channel affine map.
            for (int n = 0; n < N; n++) {
                size_t off = ((size_t)n * C + c) * HW;
                for (int i = 0; i < HW; i++) { dinp[off + i] += dout[off + i] * r * w; }
            }
        }
    }
}

// ----------------------------------------------------------------------------------------
// relu
// https://pytorch.org/docs/stable/generated/torch.nn.ReLU.html

// out, inp (n). Written as "x < 0 ? 0 : x" so that NaN propagates, as in PyTorch.
void kd_relu_forward(float * out, const float * inp, size_t n) {
    #pragma omp parallel for schedule(static) if(n > KD_PAR_MIN)
    for (size_t i = 0; i < n; i++) { out[i] = inp[i] < 0.0f ? 0.0f : inp[i]; }
}

// dinp, dout, out (n). out > 0 exactly where inp > 0, so the input need not be kept;
// the gradient at 0 is 0, as in PyTorch.
void kd_relu_backward(float * dinp, const float * dout, const float * out, size_t n) {
    #pragma omp parallel for schedule(static) if(n > KD_PAR_MIN)
    for (size_t i = 0; i < n; i++) { dinp[i] += out[i] > 0.0f ? dout[i] : 0.0f; }
}

// ----------------------------------------------------------------------------------------
// max pool
// https://pytorch.org/docs/stable/generated/torch.nn.MaxPool2d.html

// out, argmax (N,C,OH,OW), inp (N,C,H,W)
void kd_maxpool2d_forward(float * out, int32_t * argmax, const float * inp, int N, int C, int H, int W,
                          int OH, int OW, int K, int S, int P) {
    int NC = N * C;
    size_t HW = (size_t)H * W, OHW = (size_t)OH * OW;
    #pragma omp parallel for schedule(static) if((size_t)NC * OHW * K * K > KD_PAR_MIN)
    for (int nc = 0; nc < NC; nc++) {
        const float * x = inp + (size_t)nc * HW;
        float * o = out + (size_t)nc * OHW;
        int32_t * a = argmax + (size_t)nc * OHW;
        for (int oh = 0; oh < OH; oh++) {
            float * orow = o + (size_t)oh * OW;
            int32_t * arow = a + (size_t)oh * OW;
            // PyTorch starts each window at its first in-image cell with -inf, then takes
            // strictly greater values (so ties keep the first in scan order) and lets NaN
            // win. Padded cells are never candidates.
            int h0 = imax(oh * S - P, 0);
            for (int ow = 0; ow < OW; ow++) {
                orow[ow] = -INFINITY;
                arow[ow] = (int32_t)(h0 * W + imax(ow * S - P, 0));
            }
            // Tap-major over the row of windows: each tap visits its windows in the same
            // (kh, kw) scan order as a per-window loop, but the inner loop runs along ow
            // with selects instead of data-dependent branches, so it vectorises.
            for (int kh = 0; kh < K; kh++) {
                int ih = oh * S - P + kh;
                if (ih < 0 || ih >= H) { continue; }
                for (int kw = 0; kw < K; kw++) {
                    int ow0, ow1;
                    valid_range(&ow0, &ow1, W, OW, kw, S, P);
                    int base = ih * W - P + kw;
                    for (int ow = ow0; ow < ow1; ow++) {
                        int idx = base + ow * S;
                        float v = x[idx];
                        int take = (v > orow[ow]) | (v != v);
                        orow[ow] = take ? v : orow[ow];
                        arow[ow] = take ? idx : arow[ow];
                    }
                }
            }
        }
    }
}

// dinp (N,C,H,W), dout, argmax (N,C,OH,OW). Windows overlap when S < K, so several
// outputs may route to one input; one thread owns each plane, so no races.
void kd_maxpool2d_backward(float * dinp, const float * dout, const int32_t * argmax, int N, int C,
                           int H, int W, int OH, int OW) {
    int NC = N * C;
    size_t HW = (size_t)H * W, OHW = (size_t)OH * OW;
    #pragma omp parallel for schedule(static) if((size_t)NC * OHW > KD_PAR_MIN)
    for (int nc = 0; nc < NC; nc++) {
        float * dx = dinp + (size_t)nc * HW;
        const float * dy = dout + (size_t)nc * OHW;
        const int32_t * a = argmax + (size_t)nc * OHW;
        for (size_t i = 0; i < OHW; i++) { dx[a[i]] += dy[i]; }
    }
}

// ----------------------------------------------------------------------------------------
// average pool
// https://pytorch.org/docs/stable/generated/torch.nn.AvgPool2d.html
// count_include_pad=True: padded zeros count, so the divisor is always K*K (ceil_mode is
// not supported, so windows never reach past the padding).

// out (N,C,OH,OW), inp (N,C,H,W)
void kd_avgpool2d_forward(float * out, const float * inp, int N, int C, int H, int W, int OH, int OW,
                          int K, int S, int P) {
    int NC = N * C;
    size_t HW = (size_t)H * W, OHW = (size_t)OH * OW;
    float div = (float)(K * K);
    #pragma omp parallel for schedule(static) if((size_t)NC * OHW * K * K > KD_PAR_MIN)
    for (int nc = 0; nc < NC; nc++) {
        const float * x = inp + (size_t)nc * HW;
        float * o = out + (size_t)nc * OHW;
        for (int oh = 0; oh < OH; oh++) {
            float * orow = o + (size_t)oh * OW;
            memset(orow, 0, (size_t)OW * sizeof(float));
            // Tap-major along the row of windows (vectorises along ow); each window still
            // sums its cells in (kh, kw) order, as a per-window loop would.
            for (int kh = 0; kh < K; kh++) {
                int ih = oh * S - P + kh;
                if (ih < 0 || ih >= H) { continue; }
                for (int kw = 0; kw < K; kw++) {
                    int ow0, ow1;
                    valid_range(&ow0, &ow1, W, OW, kw, S, P);
                    if (ow0 == ow1) { continue; }
                    axpy_gather(orow + ow0, 1.0f, x + (size_t)ih * W + (ow0 * S - P + kw), ow1 - ow0, S);
                }
            }
            // Divide (not multiply by 1/K^2) to round like PyTorch.
            for (int ow = 0; ow < OW; ow++) { orow[ow] /= div; }
        }
    }
}

// dinp (N,C,H,W), dout (N,C,OH,OW)
void kd_avgpool2d_backward(float * dinp, const float * dout, int N, int C, int H, int W, int OH,
                           int OW, int K, int S, int P) {
    int NC = N * C;
    size_t HW = (size_t)H * W, OHW = (size_t)OH * OW;
    float div = (float)(K * K);
    #pragma omp parallel for schedule(static) if((size_t)NC * OHW * K * K > KD_PAR_MIN)
    for (int nc = 0; nc < NC; nc++) {
        float * dx = dinp + (size_t)nc * HW;
        const float * dy = dout + (size_t)nc * OHW;
        for (int oh = 0; oh < OH; oh++) {
            for (int kh = 0; kh < K; kh++) {
                int ih = oh * S - P + kh;
                if (ih < 0 || ih >= H) { continue; }
                for (int kw = 0; kw < K; kw++) {
                    int ow0, ow1;
                    valid_range(&ow0, &ow1, W, OW, kw, S, P);
                    float * dxr = dx + (size_t)ih * W + (ow0 * S - P + kw);
                    const float * dyr = dy + (size_t)oh * OW;
                    // Every window shares the divisor K*K (padding counts).
                    for (int ow = ow0; ow < ow1; ow++) { dxr[(size_t)(ow - ow0) * S] += dyr[ow] / div; }
                }
            }
        }
    }
}

// ----------------------------------------------------------------------------------------
// global average pool
// https://pytorch.org/docs/stable/generated/torch.nn.AdaptiveAvgPool2d.html (output 1x1)

// out (N,C), inp (N,C,HW)
void kd_gap_forward(float * out, const float * inp, int N, int C, int HW) {
    int NC = N * C;
    #pragma omp parallel for schedule(static) if((size_t)NC * HW > KD_PAR_MIN)
    for (int nc = 0; nc < NC; nc++) {
        out[nc] = (float)(sum_f64(inp + (size_t)nc * HW, (size_t)HW) / (double)HW);
    }
}

// dinp (N,C,HW), dout (N,C)
void kd_gap_backward(float * dinp, const float * dout, int N, int C, int HW) {
    int NC = N * C;
    #pragma omp parallel for schedule(static) if((size_t)NC * HW > KD_PAR_MIN)
    for (int nc = 0; nc < NC; nc++) {
        float g = dout[nc] / (float)HW;
        float * dx = dinp + (size_t)nc * HW;
        for (int i = 0; i < HW; i++) { dx[i] += g; }
    }
}

// ----------------------------------------------------------------------------------------
// dropout (inverted: kept values are scaled by 1/(1-p) in training, eval is the identity)
// https://pytorch.org/docs/stable/generated/torch.nn.Dropout.html
// The draw for element i is a pure function of (seed, i), so the mask does not depend on
// the thread count. It will not match PyTorch's RNG stream, only its distribution.

// out, mask, inp (n)
void kd_dropout_forward(float * out, float * mask, const float * inp, size_t n, float p, uint64_t seed) {
    if (p <= 0.0f) {
        #pragma omp parallel for schedule(static) if(n > KD_PAR_MIN)
        for (size_t i = 0; i < n; i++) {
            mask[i] = 1.0f;
            out[i] = inp[i];
        }
        return;
    }
    // p >= 1 drops everything (every draw is < 1); avoid the infinite scale.
    float scale = p < 1.0f ? 1.0f / (1.0f - p) : 0.0f;
    #pragma omp parallel for schedule(static) if(n > KD_PAR_MIN)
    for (size_t i = 0; i < n; i++) {
        float m = kd_uniform(kd_hash(seed, (uint64_t)i)) < p ? 0.0f : scale;
        mask[i] = m;
        out[i] = inp[i] * m;
    }
}

// dinp, dout, mask (n)
void kd_dropout_backward(float * dinp, const float * dout, const float * mask, size_t n) {
    #pragma omp parallel for schedule(static) if(n > KD_PAR_MIN)
    for (size_t i = 0; i < n; i++) { dinp[i] += dout[i] * mask[i]; }
}

// ----------------------------------------------------------------------------------------
// add (residual connections)

// out, a, b (n)
void kd_add_forward(float * out, const float * a, const float * b, size_t n) {
    #pragma omp parallel for schedule(static) if(n > KD_PAR_MIN)
    for (size_t i = 0; i < n; i++) { out[i] = a[i] + b[i]; }
}

// da, db, dout (n); the gradient of a sum passes unchanged to both operands
void kd_add_backward(float * da, float * db, const float * dout, size_t n) {
    if (da != NULL) {
        #pragma omp parallel for schedule(static) if(n > KD_PAR_MIN)
        for (size_t i = 0; i < n; i++) { da[i] += dout[i]; }
    }
    if (db != NULL) {
        #pragma omp parallel for schedule(static) if(n > KD_PAR_MIN)
        for (size_t i = 0; i < n; i++) { db[i] += dout[i]; }
    }
}
