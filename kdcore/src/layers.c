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
// Threading: a kernel is either BLAS-threaded (the linear layer when it runs on OpenBLAS:
// cblas_sgemm called outside any OpenMP region, so the OpenMP build of OpenBLAS uses all
// threads) or OpenMP-threaded over the dimension it writes (convolutions, and the linear
// layer's own product, use our micro-kernels). Every reduction runs in an order fixed by the
// data layout (and, for OpenBLAS and conv weight gradients, by the thread count), so results
// are deterministic for a given thread count. Deterministic mode (kd_get_deterministic)
// removes the thread-dependent splits: linear layers run on the own product, conv weight
// gradients reduce fixed batch chunks -- results independent of the count.
//
//
// Where the kernels live: kernels.c (instruction-set dispatch, conv micro-kernels, packing),
// linear.c, conv.c, layers_combine.c, and this file (batchnorm, relu, pooling, dropout, add).
#include "kernels.h"

// ----------------------------------------------------------------------------------------
// batchnorm
// https://pytorch.org/docs/stable/generated/torch.nn.BatchNorm2d.html
// Each thread owns a contiguous range of channels and walks it image by image, so it reads
// long contiguous runs (n, c0..c1) instead of N strided planes per channel. Every channel
// is still reduced by one thread, over n then hw, in double and in the same order whatever
// the thread count: results are independent of it.

#define BN_CB 64   // channels whose accumulators a thread keeps at once

// [*c0, *c1): this thread's channels (contiguous, balanced).
static inline void channel_range(int * c0, int * c1, int C) { batch_chunk(c0, c1, C, kd_omp_tid(), kd_omp_team()); }

// Per-plane moments in double, 16 lanes (lane = index mod 16) summed by a fixed tree, so the
// AVX-512 and portable versions give the same bits.
static inline double lanes16_sum(const double * a) {
    double t[8];
    for (int l = 0; l < 8; l++) { t[l] = a[l] + a[l + 8]; }
    return ((t[0] + t[4]) + (t[2] + t[6])) + ((t[1] + t[5]) + (t[3] + t[7]));
}

// *s1 += sum(x - sh), *s2 += sum((x - sh)^2)
static void moments_c(const float * x, size_t n, double sh, double * s1, double * s2) {
    double a[16] = {0}, b[16] = {0}, ta = 0.0, tb = 0.0;
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        for (int j = 0; j < 16; j++) {
            double d = (double)x[i + j] - sh;
            a[j] += d;
            b[j] = fma(d, d, b[j]);
        }
    }
    for (; i < n; i++) {
        double d = (double)x[i] - sh;
        ta += d;
        tb = fma(d, d, tb);
    }
    *s1 += lanes16_sum(a) + ta;
    *s2 += lanes16_sum(b) + tb;
}

// *sy += sum(y), *sxy += sum((x - m) * y)
static void dot_dev_c(const float * x, const float * y, size_t n, double m, double * sy, double * sxy) {
    double a[16] = {0}, b[16] = {0}, ta = 0.0, tb = 0.0;
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        for (int j = 0; j < 16; j++) {
            double yv = (double)y[i + j];
            a[j] += yv;
            b[j] = fma((double)x[i + j] - m, yv, b[j]);
        }
    }
    for (; i < n; i++) {
        double yv = (double)y[i];
        ta += yv;
        tb = fma((double)x[i] - m, yv, tb);
    }
    *sy += lanes16_sum(a) + ta;
    *sxy += lanes16_sum(b) + tb;
}

#ifdef KD_HAVE_AVX512_KERNELS
__attribute__((target("avx512f")))
static inline void cvt16_pd(const float * p, __m512d * lo, __m512d * hi) {
    __m512 v = _mm512_loadu_ps(p);
    *lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
    *hi = _mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}

__attribute__((target("avx512f")))
static void moments_avx512(const float * x, size_t n, double sh, double * s1, double * s2) {
    __m512d a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd(), b0 = _mm512_setzero_pd(), b1 = _mm512_setzero_pd();
    __m512d shv = _mm512_set1_pd(sh);
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512d lo, hi;
        cvt16_pd(x + i, &lo, &hi);
        lo = _mm512_sub_pd(lo, shv);
        hi = _mm512_sub_pd(hi, shv);
        a0 = _mm512_add_pd(a0, lo);
        a1 = _mm512_add_pd(a1, hi);
        b0 = _mm512_fmadd_pd(lo, lo, b0);
        b1 = _mm512_fmadd_pd(hi, hi, b1);
    }
    double a[16], b[16], ta = 0.0, tb = 0.0;
    _mm512_storeu_pd(a, a0); _mm512_storeu_pd(a + 8, a1);
    _mm512_storeu_pd(b, b0); _mm512_storeu_pd(b + 8, b1);
    for (; i < n; i++) {
        double d = (double)x[i] - sh;
        ta += d;
        tb = fma(d, d, tb);
    }
    *s1 += lanes16_sum(a) + ta;
    *s2 += lanes16_sum(b) + tb;
}

__attribute__((target("avx512f")))
static void dot_dev_avx512(const float * x, const float * y, size_t n, double m, double * sy, double * sxy) {
    __m512d a0 = _mm512_setzero_pd(), a1 = _mm512_setzero_pd(), b0 = _mm512_setzero_pd(), b1 = _mm512_setzero_pd();
    __m512d mv = _mm512_set1_pd(m);
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512d xl, xh, yl, yh;
        cvt16_pd(x + i, &xl, &xh);
        cvt16_pd(y + i, &yl, &yh);
        a0 = _mm512_add_pd(a0, yl);
        a1 = _mm512_add_pd(a1, yh);
        b0 = _mm512_fmadd_pd(_mm512_sub_pd(xl, mv), yl, b0);
        b1 = _mm512_fmadd_pd(_mm512_sub_pd(xh, mv), yh, b1);
    }
    double a[16], b[16], ta = 0.0, tb = 0.0;
    _mm512_storeu_pd(a, a0); _mm512_storeu_pd(a + 8, a1);
    _mm512_storeu_pd(b, b0); _mm512_storeu_pd(b + 8, b1);
    for (; i < n; i++) {
        double yv = (double)y[i];
        ta += yv;
        tb = fma((double)x[i] - m, yv, tb);
    }
    *sy += lanes16_sum(a) + ta;
    *sxy += lanes16_sum(b) + tb;
}
#endif

typedef void (*moments_fn)(const float *, size_t, double, double *, double *);
typedef void (*dot_dev_fn)(const float *, const float *, size_t, double, double *, double *);

// out = inp * alpha + beta over one plane (PyTorch's CPU kernel folds the affine map so).
static inline void affine_plane(float * restrict out, const float * restrict inp, float alpha, float beta, int HW) {
    for (int i = 0; i < HW; i++) { out[i] = inp[i] * alpha + beta; }
}

// out, inp (N,C,HW); mean, rstd, run_mean, run_var, weight, bias (C)
void kd_batchnorm_forward_train(float * out, float * mean, float * rstd, float * run_mean,
                                float * run_var, const float * inp, const float * weight,
                                const float * bias, int N, int C, int HW, float eps, float momentum) {
    size_t cnt = (size_t)N * HW;
    moments_fn moments = moments_c;
#ifdef KD_HAVE_AVX512_KERNELS
    if (kd_simd_level() == KD_ISA_AVX512) { moments = moments_avx512; }
#endif
    #pragma omp parallel if((size_t)N * C * HW > KD_PAR_MIN)
    {
        int c0, c1;
        channel_range(&c0, &c1, C);
        for (int cb = c0; cb < c1; cb += BN_CB) {
            int nc = imin(BN_CB, c1 - cb);
            double s1[BN_CB], s2[BN_CB], sh[BN_CB];
            float alpha[BN_CB], beta[BN_CB];
            // One pass for both moments, around a shift (the channel's first value) so that
            // E[d^2] - E[d]^2 does not cancel; in double.
            for (int j = 0; j < nc; j++) { s1[j] = 0.0; s2[j] = 0.0; sh[j] = (double)inp[(size_t)(cb + j) * HW]; }
            for (int n = 0; n < N; n++) {
                const float * x = inp + ((size_t)n * C + cb) * HW;
                for (int j = 0; j < nc; j++) { moments(x + (size_t)j * HW, (size_t)HW, sh[j], &s1[j], &s2[j]); }
            }
            for (int j = 0; j < nc; j++) {
                int c = cb + j;
                double md = s1[j] / (double)cnt;
                double ss = s2[j] - s1[j] * md;             // sum of squared deviations
                if (ss < 0.0) { ss = 0.0; }
                double m = sh[j] + md;
                double var = ss / (double)cnt;              // biased: used to normalise
                // Unbiased for the running estimate, as PyTorch; a single value has no spread
                // estimate, so fall back to the biased one (0) instead of dividing by zero.
                double var_unbiased = cnt > 1 ? ss / (double)(cnt - 1) : var;
                mean[c] = (float)m;
                rstd[c] = (float)(1.0 / sqrt(var + (double)eps));
                double mom = (double)momentum;
                if (run_mean != NULL) { run_mean[c] = (float)(mom * m + (1.0 - mom) * (double)run_mean[c]); }
                if (run_var != NULL) { run_var[c] = (float)(mom * var_unbiased + (1.0 - mom) * (double)run_var[c]); }
                alpha[j] = weight != NULL ? rstd[c] * weight[c] : rstd[c];
                beta[j] = bias != NULL ? bias[c] - mean[c] * alpha[j] : -(mean[c] * alpha[j]);
            }
            for (int n = 0; n < N; n++) {
                size_t off = ((size_t)n * C + cb) * HW;
                for (int j = 0; j < nc; j++) {
                    affine_plane(out + off + (size_t)j * HW, inp + off + (size_t)j * HW, alpha[j], beta[j], HW);
                }
            }
        }
    }
}

// out, inp (N,C,HW); mean, rstd, weight, bias, run_mean, run_var (C)
void kd_batchnorm_forward_eval(float * out, float * mean, float * rstd, const float * inp,
                               const float * weight, const float * bias, const float * run_mean,
                               const float * run_var, int N, int C, int HW, float eps) {
    #pragma omp parallel if((size_t)N * C * HW > KD_PAR_MIN)
    {
        int c0, c1;
        channel_range(&c0, &c1, C);
        for (int cb = c0; cb < c1; cb += BN_CB) {
            int nc = imin(BN_CB, c1 - cb);
            float alpha[BN_CB], beta[BN_CB];
            for (int j = 0; j < nc; j++) {
                int c = cb + j;
                mean[c] = run_mean[c];
                rstd[c] = 1.0f / sqrtf(run_var[c] + eps);
                alpha[j] = weight != NULL ? rstd[c] * weight[c] : rstd[c];
                beta[j] = bias != NULL ? bias[c] - mean[c] * alpha[j] : -(mean[c] * alpha[j]);
            }
            for (int n = 0; n < N; n++) {
                size_t off = ((size_t)n * C + cb) * HW;
                for (int j = 0; j < nc; j++) {
                    affine_plane(out + off + (size_t)j * HW, inp + off + (size_t)j * HW, alpha[j], beta[j], HW);
                }
            }
        }
    }
}

// dinp, dout, inp (N,C,HW); dweight, dbias, mean, rstd, weight (C)
void kd_batchnorm_backward(float * dinp, float * dweight, float * dbias, const float * dout,
                           const float * inp, const float * mean, const float * rstd,
                           const float * weight, int N, int C, int HW, int batch_stats) {
    size_t cnt = (size_t)N * HW;
    dot_dev_fn dot_dev = dot_dev_c;
#ifdef KD_HAVE_AVX512_KERNELS
    if (kd_simd_level() == KD_ISA_AVX512) { dot_dev = dot_dev_avx512; }
#endif
    #pragma omp parallel if((size_t)N * C * HW > KD_PAR_MIN)
    {
        int c0, c1;
        channel_range(&c0, &c1, C);
        for (int cb = c0; cb < c1; cb += BN_CB) {
            int nc = imin(BN_CB, c1 - cb);
            // sum(dy) and sum((x - mean) * dy); sum(dy * xhat) = rstd * the latter.
            double sdy[BN_CB], sdyx[BN_CB];
            float mf[BN_CB], a[BN_CB], k[BN_CB], mdy[BN_CB];
            for (int j = 0; j < nc; j++) { sdy[j] = 0.0; sdyx[j] = 0.0; }
            for (int n = 0; n < N; n++) {
                size_t off = ((size_t)n * C + cb) * HW;
                for (int j = 0; j < nc; j++) {
                    dot_dev(inp + off + (size_t)j * HW, dout + off + (size_t)j * HW, (size_t)HW,
                            (double)mean[cb + j], &sdy[j], &sdyx[j]);
                }
            }
            for (int j = 0; j < nc; j++) {
                int c = cb + j;
                float r = rstd[c];
                if (dbias != NULL) { dbias[c] += (float)sdy[j]; }
                if (dweight != NULL) { dweight[c] += (float)(sdyx[j] * (double)r); }
                // dx = rstd*w * (dy - mean(dy) - xhat * mean(dy*xhat)), with
                // xhat * mean(dy*xhat) = (x - mean) * k, k = sum((x-mean)*dy) * rstd^2 / cnt.
                // The means run through the batch statistics, hence the two extra terms.
                // Eval: mean and rstd are constants, so BN is a per-channel affine map.
                a[j] = weight != NULL ? r * weight[c] : r;
                mf[j] = mean[c];
                mdy[j] = (float)(sdy[j] / (double)cnt);
                k[j] = (float)(sdyx[j] * (double)r * (double)r / (double)cnt);
            }
            if (dinp == NULL) { continue; }
            for (int n = 0; n < N; n++) {
                size_t off = ((size_t)n * C + cb) * HW;
                for (int j = 0; j < nc; j++) {
                    float * restrict dx = dinp + off + (size_t)j * HW;
                    const float * restrict dy = dout + off + (size_t)j * HW;
                    const float * restrict x = inp + off + (size_t)j * HW;
                    float aj = a[j];
                    if (batch_stats) {
                        float m = mf[j], kj = k[j], md = mdy[j];
                        for (int i = 0; i < HW; i++) { dx[i] += (dy[i] - md - (x[i] - m) * kj) * aj; }
                    } else {
                        for (int i = 0; i < HW; i++) { dx[i] += dy[i] * aj; }
                    }
                }
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

// 2x2 windows, stride 2, no padding (the common case), one plane: the same candidate rule as
// the general loop below (start at -inf with the first cell's index, take strictly greater
// values or NaN, in the scan order (0,0) (0,1) (1,0) (1,1)).
static void maxpool2x2_plane_c(float * o, int32_t * a, const float * x, int H2, int W, int OH, int OW) {
    (void)H2;
    for (int oh = 0; oh < OH; oh++) {
        const float * r0 = x + (size_t)(2 * oh) * W, * r1 = r0 + W;
        for (int ow = 0; ow < OW; ow++) {
            int i0 = 2 * oh * W + 2 * ow;
            float v[4] = { r0[2 * ow], r0[2 * ow + 1], r1[2 * ow], r1[2 * ow + 1] };
            int id[4] = { i0, i0 + 1, i0 + W, i0 + W + 1 };
            float m = -INFINITY;
            int32_t am = i0;
            for (int t = 0; t < 4; t++) {
                int take = (v[t] > m) | (v[t] != v[t]);
                m = take ? v[t] : m;
                am = take ? id[t] : am;
            }
            o[(size_t)oh * OW + ow] = m;
            a[(size_t)oh * OW + ow] = am;
        }
    }
}

#ifdef KD_HAVE_AVX512_KERNELS
// The same, 16 outputs of a row at a time: masked loads of the two input rows, even/odd
// lanes split by permutes, and the candidate rule with compare masks.
__attribute__((target("avx512f")))
static void maxpool2x2_plane_avx512(float * o, int32_t * a, const float * x, int H2, int W, int OH, int OW) {
    const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    const __m512i lane2 = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    for (int oh = 0; oh < OH; oh++) {
        const float * r0 = x + (size_t)(2 * oh) * W, * r1 = r0 + W;
        for (int ow = 0; ow < OW; ow += 16) {
            int n = imin(16, OW - ow);
            __mmask16 mo = (__mmask16)((1u << n) - 1u);
            __mmask16 ml = (__mmask16)(n >= 8 ? 0xFFFFu : (1u << (2 * n)) - 1u);
            __mmask16 mh = (__mmask16)(n > 8 ? (1u << (2 * n - 16)) - 1u : 0u);
            // Whole vectors are read where they stay inside the plane (the extra lanes are
            // next-row values, never used): masked memory accesses are much slower on some
            // cores, so they are kept for the plane's end.
            __m512 a0, b0, a1, b1;
            if ((size_t)(2 * oh + 1) * W + 2 * ow + 32 <= (size_t)H2 * W) {
                a0 = _mm512_loadu_ps(r0 + 2 * ow); b0 = _mm512_loadu_ps(r0 + 2 * ow + 16);
                a1 = _mm512_loadu_ps(r1 + 2 * ow); b1 = _mm512_loadu_ps(r1 + 2 * ow + 16);
            } else {
                a0 = _mm512_maskz_loadu_ps(ml, r0 + 2 * ow); b0 = _mm512_maskz_loadu_ps(mh, r0 + 2 * ow + 16);
                a1 = _mm512_maskz_loadu_ps(ml, r1 + 2 * ow); b1 = _mm512_maskz_loadu_ps(mh, r1 + 2 * ow + 16);
            }
            __m512 v[4] = { _mm512_permutex2var_ps(a0, even, b0), _mm512_permutex2var_ps(a0, odd, b0),
                            _mm512_permutex2var_ps(a1, even, b1), _mm512_permutex2var_ps(a1, odd, b1) };
            __m512i i0 = _mm512_add_epi32(_mm512_set1_epi32(2 * oh * W + 2 * ow), lane2);
            __m512i id[4] = { i0, _mm512_add_epi32(i0, _mm512_set1_epi32(1)), _mm512_add_epi32(i0, _mm512_set1_epi32(W)),
                              _mm512_add_epi32(i0, _mm512_set1_epi32(W + 1)) };
            __m512 m = ninf;
            __m512i am = i0;
            for (int t = 0; t < 4; t++) {
                __mmask16 take = _mm512_cmp_ps_mask(v[t], m, _CMP_GT_OQ) | _mm512_cmp_ps_mask(v[t], v[t], _CMP_UNORD_Q);
                m = _mm512_mask_mov_ps(m, take, v[t]);
                am = _mm512_mask_mov_epi32(am, take, id[t]);
            }
            if ((size_t)oh * OW + ow + 16 <= (size_t)OH * OW) {
                // lanes past the row land in the next output row, which is written after
                _mm512_storeu_ps(o + (size_t)oh * OW + ow, m);
                _mm512_storeu_si512((void *)(a + (size_t)oh * OW + ow), am);
            } else {
                _mm512_mask_storeu_ps(o + (size_t)oh * OW + ow, mo, m);
                _mm512_mask_storeu_epi32(a + (size_t)oh * OW + ow, mo, am);
            }
        }
    }
}
#endif

// out, argmax (N,C,OH,OW), inp (N,C,H,W)
void kd_maxpool2d_forward(float * out, int32_t * argmax, const float * inp, int N, int C, int H, int W,
                          int OH, int OW, int K, int S, int P) {
    int NC = N * C;
    size_t HW = (size_t)H * W, OHW = (size_t)OH * OW;
    if (K == 2 && S == 2 && P == 0) {
        void (*plane)(float *, int32_t *, const float *, int, int, int, int) = maxpool2x2_plane_c;
#ifdef KD_HAVE_AVX512_KERNELS
        if (kd_simd_level() == KD_ISA_AVX512) { plane = maxpool2x2_plane_avx512; }
#endif
        #pragma omp parallel for schedule(static) if((size_t)NC * HW > KD_PAR_MIN)
        for (int nc = 0; nc < NC; nc++) {
            plane(out + (size_t)nc * OHW, argmax + (size_t)nc * OHW, inp + (size_t)nc * HW, H, W, OH, OW);
        }
        return;
    }
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

