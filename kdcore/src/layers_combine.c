// Layers that combine or resample tensors: sigmoid, product (with channel broadcast),
// channel concatenation, nearest resizing (and DeepInversion's jitter: a shift and flip of each
// plane). They are what multi-input nets need -- ReviewKD's
// attention-based fusion (two maps, an upsampled residual, a sigmoid gate per map) and
// generator heads -- and are memory-bound, so they are plain loops threaded over images and
// channels. Conventions as layers.h: NCHW, backward accumulates (+=), NULL gradients skipped.
#include "layers.h"
#include "kd_internal.h"

#include <math.h>
#include <string.h>

#ifndef _OPENMP
#pragma GCC diagnostic ignored "-Wunknown-pragmas"
#endif

#define PAR_MIN 32768   // elements below which a loop is not worth waking the thread team

// ----------------------------------------------------------------------------------------
// sigmoid (https://pytorch.org/docs/stable/generated/torch.nn.Sigmoid.html)

// out, inp (n). 1 / (1 + exp(-x)) saturates to exactly 0 and 1 at the ends, as PyTorch's
// float kernel; NaN propagates.
void kd_sigmoid_forward(float * out, const float * inp, size_t n) {
    #pragma omp parallel for schedule(static) if(n > PAR_MIN)
    for (size_t i = 0; i < n; i++) out[i] = 1.0f / (1.0f + expf(-inp[i]));
}

void kd_sigmoid_backward(float * dinp, const float * dout, const float * out, size_t n) {
    #pragma omp parallel for schedule(static) if(n > PAR_MIN)
    for (size_t i = 0; i < n; i++) dinp[i] += dout[i] * (out[i] * (1.0f - out[i]));
}

// ----------------------------------------------------------------------------------------
// mul: elementwise, or a one-channel map broadcast over the channels of a

void kd_mul_forward(float * out, const float * a, const float * b, int N, int C, int Cb, int HW) {
    const size_t hw = (size_t)HW;
    #pragma omp parallel for schedule(static) if((size_t)N * C * hw > PAR_MIN)
    for (int nc = 0; nc < N * C; nc++) {
        const int n = nc / C, c = nc % C;
        const float * x = a + (size_t)nc * hw, * y = b + ((size_t)n * Cb + (Cb == 1 ? 0 : c)) * hw;
        float * o = out + (size_t)nc * hw;
        for (size_t i = 0; i < hw; i++) o[i] = x[i] * y[i];
    }
}

// db of a broadcast b sums over the channels of a in channel order (one thread per image),
// so the result does not depend on the thread count.
void kd_mul_backward(float * da, float * db, const float * dout, const float * a, const float * b,
                     int N, int C, int Cb, int HW) {
    const size_t hw = (size_t)HW;
    if (da) {
        #pragma omp parallel for schedule(static) if((size_t)N * C * hw > PAR_MIN)
        for (int nc = 0; nc < N * C; nc++) {
            const int n = nc / C, c = nc % C;
            const float * y = b + ((size_t)n * Cb + (Cb == 1 ? 0 : c)) * hw, * d = dout + (size_t)nc * hw;
            float * g = da + (size_t)nc * hw;
            for (size_t i = 0; i < hw; i++) g[i] += d[i] * y[i];
        }
    }
    if (!db) return;
    if (Cb == C) {
        #pragma omp parallel for schedule(static) if((size_t)N * C * hw > PAR_MIN)
        for (int nc = 0; nc < N * C; nc++) {
            const float * x = a + (size_t)nc * hw, * d = dout + (size_t)nc * hw;
            float * g = db + (size_t)nc * hw;
            for (size_t i = 0; i < hw; i++) g[i] += d[i] * x[i];
        }
        return;
    }
    #pragma omp parallel for schedule(static) if((size_t)N * C * hw > PAR_MIN)
    for (int n = 0; n < N; n++) {
        float * g = db + (size_t)n * hw;
        for (int c = 0; c < C; c++) {
            const float * x = a + ((size_t)n * C + c) * hw, * d = dout + ((size_t)n * C + c) * hw;
            for (size_t i = 0; i < hw; i++) g[i] += d[i] * x[i];
        }
    }
}

// ----------------------------------------------------------------------------------------
// concat along channels (torch.cat(dim=1))

void kd_concat_forward(float * out, const float * a, const float * b, int N, int Ca, int Cb, int HW) {
    const size_t na = (size_t)Ca * HW, nb = (size_t)Cb * HW;
    #pragma omp parallel for schedule(static) if((size_t)N * (na + nb) > PAR_MIN)
    for (int n = 0; n < N; n++) {
        float * o = out + (size_t)n * (na + nb);
        memcpy(o, a + (size_t)n * na, na * sizeof(float));
        memcpy(o + na, b + (size_t)n * nb, nb * sizeof(float));
    }
}

void kd_concat_backward(float * da, float * db, const float * dout, int N, int Ca, int Cb, int HW) {
    const size_t na = (size_t)Ca * HW, nb = (size_t)Cb * HW;
    #pragma omp parallel for schedule(static) if((size_t)N * (na + nb) > PAR_MIN)
    for (int n = 0; n < N; n++) {
        const float * d = dout + (size_t)n * (na + nb);
        if (da) { float * g = da + (size_t)n * na; for (size_t i = 0; i < na; i++) g[i] += d[i]; }
        if (db) { float * g = db + (size_t)n * nb; for (size_t i = 0; i < nb; i++) g[i] += d[na + i]; }
    }
}

// ----------------------------------------------------------------------------------------
// nearest resize (https://pytorch.org/docs/stable/generated/torch.nn.functional.interpolate.html)
// PyTorch computes the source index as floor(dst * scale) in float with scale = in / out
// (or 1 / scale_factor, the same float for an integer factor), clamped to in - 1.

static inline int nearest_src(int o, int in, int out) {
    if (in == out) return o;
    const float scale = (float)in / (float)out;
    const int s = (int)floorf((float)o * scale);
    return s < in - 1 ? s : in - 1;
}

void kd_nearest_forward(float * out, const float * inp, int N, int C, int H, int W, int OH, int OW) {
    const size_t hw = (size_t)H * W, ohw = (size_t)OH * OW;
    #pragma omp parallel for schedule(static) if((size_t)N * C * ohw > PAR_MIN)
    for (int nc = 0; nc < N * C; nc++) {
        const float * x = inp + (size_t)nc * hw;
        float * o = out + (size_t)nc * ohw;
        for (int oh = 0; oh < OH; oh++) {
            const float * row = x + (size_t)nearest_src(oh, H, OH) * W;
            for (int ow = 0; ow < OW; ow++) o[(size_t)oh * OW + ow] = row[nearest_src(ow, W, OW)];
        }
    }
}

// Each input cell sums the output cells that copied it, in output scan order (one thread
// per plane): deterministic.
void kd_nearest_backward(float * dinp, const float * dout, int N, int C, int H, int W, int OH, int OW) {
    const size_t hw = (size_t)H * W, ohw = (size_t)OH * OW;
    #pragma omp parallel for schedule(static) if((size_t)N * C * ohw > PAR_MIN)
    for (int nc = 0; nc < N * C; nc++) {
        float * g = dinp + (size_t)nc * hw;
        const float * d = dout + (size_t)nc * ohw;
        for (int oh = 0; oh < OH; oh++) {
            float * row = g + (size_t)nearest_src(oh, H, OH) * W;
            for (int ow = 0; ow < OW; ow++) row[nearest_src(ow, W, OW)] += d[(size_t)oh * OW + ow];
        }
    }
}

// ----------------------------------------------------------------------------------------
// bilinear resize, align_corners=False (PyTorch's default for F.interpolate / nn.Upsample):
// source coordinate (o + 0.5) * in / out - 0.5 in float, clamped below at 0; the upper
// neighbour is clamped to in - 1, so edges repeat.

struct lerp { int i0, i1; float w0, w1; };

static inline struct lerp bilinear_src(int o, int in, int out) {
    const float scale = (float)in / (float)out;
    float src = scale * ((float)o + 0.5f) - 0.5f;
    if (src < 0.0f) src = 0.0f;
    const int i0 = (int)src;   // floor: src >= 0
    const int i1 = i0 < in - 1 ? i0 + 1 : i0;
    const float l1 = src - (float)i0;
    return (struct lerp){ i0, i1, 1.0f - l1, l1 };
}

void kd_bilinear_forward(float * out, const float * inp, int N, int C, int H, int W, int OH, int OW) {
    const size_t hw = (size_t)H * W, ohw = (size_t)OH * OW;
    #pragma omp parallel for schedule(static) if((size_t)N * C * ohw > PAR_MIN)
    for (int nc = 0; nc < N * C; nc++) {
        const float * x = inp + (size_t)nc * hw;
        float * o = out + (size_t)nc * ohw;
        for (int oh = 0; oh < OH; oh++) {
            const struct lerp h = bilinear_src(oh, H, OH);
            const float * r0 = x + (size_t)h.i0 * W, * r1 = x + (size_t)h.i1 * W;
            for (int ow = 0; ow < OW; ow++) {
                const struct lerp w = bilinear_src(ow, W, OW);
                o[(size_t)oh * OW + ow] = h.w0 * (w.w0 * r0[w.i0] + w.w1 * r0[w.i1]) +
                                          h.w1 * (w.w0 * r1[w.i0] + w.w1 * r1[w.i1]);
            }
        }
    }
}

// Each plane by one thread, outputs in scan order: deterministic.
void kd_bilinear_backward(float * dinp, const float * dout, int N, int C, int H, int W, int OH, int OW) {
    const size_t hw = (size_t)H * W, ohw = (size_t)OH * OW;
    #pragma omp parallel for schedule(static) if((size_t)N * C * ohw > PAR_MIN)
    for (int nc = 0; nc < N * C; nc++) {
        float * g = dinp + (size_t)nc * hw;
        const float * d = dout + (size_t)nc * ohw;
        for (int oh = 0; oh < OH; oh++) {
            const struct lerp h = bilinear_src(oh, H, OH);
            float * r0 = g + (size_t)h.i0 * W, * r1 = g + (size_t)h.i1 * W;
            for (int ow = 0; ow < OW; ow++) {
                const struct lerp w = bilinear_src(ow, W, OW);
                const float v = d[(size_t)oh * OW + ow];
                r0[w.i0] += h.w0 * w.w0 * v;
                r0[w.i1] += h.w0 * w.w1 * v;
                r1[w.i0] += h.w1 * w.w0 * v;
                r1[w.i1] += h.w1 * w.w1 * v;
            }
        }
    }
}

// ----------------------------------------------------------------------------------------
// leaky relu and tanh (generators: DAFL's, DFAD's)

void kd_leaky_relu_forward(float * out, const float * inp, size_t n, float slope) {
    #pragma omp parallel for schedule(static) if(n > PAR_MIN)
    for (size_t i = 0; i < n; i++) out[i] = inp[i] > 0.0f ? inp[i] : inp[i] * slope;
}

// The gradient at 0 is the slope, as PyTorch's (it tests inp > 0).
void kd_leaky_relu_backward(float * dinp, const float * dout, const float * inp, size_t n, float slope) {
    #pragma omp parallel for schedule(static) if(n > PAR_MIN)
    for (size_t i = 0; i < n; i++) dinp[i] += inp[i] > 0.0f ? dout[i] : dout[i] * slope;
}

void kd_tanh_forward(float * out, const float * inp, size_t n) {
    #pragma omp parallel for schedule(static) if(n > PAR_MIN)
    for (size_t i = 0; i < n; i++) out[i] = tanhf(inp[i]);
}

void kd_tanh_backward(float * dinp, const float * dout, const float * out, size_t n) {
    #pragma omp parallel for schedule(static) if(n > PAR_MIN)
    for (size_t i = 0; i < n; i++) dinp[i] += dout[i] * (1.0f - out[i] * out[i]);
}

// Source column/row of output index j (k) of a jitter: a permutation of each plane.
static inline int jitter_src(int j, int shift, int n) { int r = (j - shift) % n; return r < 0 ? r + n : r; }

void kd_jitter_forward(float * out, const float * inp, int N, int C, int H, int W, int dy, int dx, bool flip) {
    const size_t planes = (size_t)N * C, hw = (size_t)H * W;
    #pragma omp parallel for schedule(static) if(planes * hw > PAR_MIN)
    for (size_t p = 0; p < planes; p++)
        for (int i = 0; i < H; i++) {
            const float * src = inp + p * hw + (size_t)jitter_src(i, dy, H) * W;
            float * dst = out + p * hw + (size_t)i * W;
            for (int j = 0; j < W; j++) dst[j] = src[jitter_src(flip ? W - 1 - j : j, dx, W)];
        }
}

void kd_jitter_backward(float * dinp, const float * dout, int N, int C, int H, int W, int dy, int dx, bool flip) {
    const size_t planes = (size_t)N * C, hw = (size_t)H * W;
    #pragma omp parallel for schedule(static) if(planes * hw > PAR_MIN)
    for (size_t p = 0; p < planes; p++)
        for (int i = 0; i < H; i++) {
            float * dst = dinp + p * hw + (size_t)jitter_src(i, dy, H) * W;
            const float * src = dout + p * hw + (size_t)i * W;
            for (int j = 0; j < W; j++) dst[jitter_src(flip ? W - 1 - j : j, dx, W)] += src[j];
        }
}
