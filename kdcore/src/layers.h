// Layer kernels: forward/backward pairs over raw float pointers (llm.c style).
// - No allocation inside kernels; scratch comes from the caller (`work`).
// - Every backward ACCUMULATES (+=) into dinp, dweight, dbias. Any of them may be NULL,
//   in which case that gradient is not computed.
// - Dimensions: N batch, C/OC channels, H,W / OH,OW spatial, K kernel, S stride,
//   P padding, G groups. Tensors are NCHW, C-contiguous.
// - Kernels are either BLAS-threaded (top-level cblas_sgemm) or OpenMP-threaded over the
//   dimension they write; sgemm called inside an OpenMP region runs single-threaded
//   (OpenMP build of OpenBLAS).
// - For a fixed thread count, results are deterministic. In deterministic mode
//   (kd_get_deterministic) they are also independent of the thread count: linear products
//   run on kdcore's own product (fixed fma chains), conv weight/bias gradients reduce fixed
//   batch chunks.
#ifndef KD_LAYERS_H
#define KD_LAYERS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

// ---- linear: out (N,OC) = inp (N,C) @ weight(OC,C)^T + bias(OC); bias may be NULL.
// `work` must hold kd_linear_workspace(N, C, OC) floats (any thread count).
size_t kd_linear_workspace(int N, int C, int OC);
const char * kd_linear_engine_name(void);   // what runs the products now (kd_blas_config)
void kd_linear_forward(float * out, const float * inp, const float * weight, const float * bias,
                       int N, int C, int OC, float * work);
void kd_linear_backward(float * dinp, float * dweight, float * dbias, const float * dout,
                        const float * inp, const float * weight, int N, int C, int OC, float * work);

// ---- conv2d: inp (N,C,H,W), weight (OC, C/G, K, K), bias (OC) or NULL, out (N,OC,OH,OW)
// OH = (H + 2P - K)/S + 1. `work` must hold kd_conv2d_workspace(s, nthreads) floats,
// where nthreads is the OpenMP thread count at the time of the call (in deterministic mode
// the size covers at least KD_DET_CONV_CHUNKS slots, whatever nthreads).
struct kd_conv_shape { int N, C, H, W, OC, OH, OW, K, S, P, G; };
size_t kd_conv2d_workspace(const struct kd_conv_shape * s, int nthreads);
void kd_conv2d_forward(float * out, const float * inp, const float * weight, const float * bias,
                       const struct kd_conv_shape * s, float * work);
void kd_conv2d_backward(float * dinp, float * dweight, float * dbias, const float * dout,
                        const float * inp, const float * weight, const struct kd_conv_shape * s,
                        float * work);

// ---- batchnorm over (N, C, HW): per channel c, statistics over N*HW values.
// weight and bias NULL: no affine map (PyTorch's affine=False), as weight 1 and bias 0;
// dweight/dbias NULL: those gradients are not computed.
// Train: biased batch variance normalises; running_var is updated with the unbiased one
// (PyTorch): run = (1-momentum)*run + momentum*batch. mean/rstd (C) are saved for backward.
void kd_batchnorm_forward_train(float * out, float * mean, float * rstd, float * run_mean,
                                float * run_var, const float * inp, const float * weight,
                                const float * bias, int N, int C, int HW, float eps, float momentum);
// Eval: uses running stats; also writes mean/rstd (from the running stats) so that
// kd_batchnorm_backward(batch_stats=false) can give input gradients of an eval-mode net.
void kd_batchnorm_forward_eval(float * out, float * mean, float * rstd, const float * inp,
                               const float * weight, const float * bias, const float * run_mean,
                               const float * run_var, int N, int C, int HW, float eps);
// batch_stats: true after forward_train (gradient flows through mean and variance),
// false after forward_eval (mean/rstd are constants).
void kd_batchnorm_backward(float * dinp, float * dweight, float * dbias, const float * dout,
                           const float * inp, const float * mean, const float * rstd,
                           const float * weight, int N, int C, int HW, int batch_stats);

// ---- relu: out = max(inp, 0), in place allowed (out == inp); backward uses the output (out > 0)
void kd_relu_forward(float * out, const float * inp, size_t n);
void kd_relu_backward(float * dinp, const float * dout, const float * out, size_t n);

// ---- max pool: inp (N,C,H,W) -> out (N,C,OH,OW); argmax (N,C,OH,OW) holds the flat
// h*W+w index of the chosen input within its (n,c) plane. Padding never wins.
void kd_maxpool2d_forward(float * out, int32_t * argmax, const float * inp, int N, int C, int H, int W,
                          int OH, int OW, int K, int S, int P);
void kd_maxpool2d_backward(float * dinp, const float * dout, const int32_t * argmax, int N, int C,
                           int H, int W, int OH, int OW);

// ---- average pool (count_include_pad=True, PyTorch's default): divisor K*K
void kd_avgpool2d_forward(float * out, const float * inp, int N, int C, int H, int W, int OH, int OW,
                          int K, int S, int P);
void kd_avgpool2d_backward(float * dinp, const float * dout, int N, int C, int H, int W, int OH,
                           int OW, int K, int S, int P);

// ---- global average pool: (N,C,HW) -> (N,C)
void kd_gap_forward(float * out, const float * inp, int N, int C, int HW);
void kd_gap_backward(float * dinp, const float * dout, int N, int C, int HW);

// ---- dropout (inverted): mask[i] = 0 or 1/(1-p), drawn from kd_hash(seed, i)
void kd_dropout_forward(float * out, float * mask, const float * inp, size_t n, float p, uint64_t seed);
void kd_dropout_backward(float * dinp, const float * dout, const float * mask, size_t n);

// ---- add: out = a + b, in place allowed (out == a or b); backward accumulates dout into da and db
void kd_add_forward(float * out, const float * a, const float * b, size_t n);
void kd_add_backward(float * da, float * db, const float * dout, size_t n);

// ---- layers_combine.c: the layers of multi-input nets (ReviewKD's fusion, attention,
// generators). Same conventions: backward accumulates, NULL gradients are skipped.

// sigmoid: out = 1 / (1 + exp(-inp)); backward reads the output: dinp += dout * out (1 - out)
void kd_sigmoid_forward(float * out, const float * inp, size_t n);
void kd_sigmoid_backward(float * dinp, const float * dout, const float * out, size_t n);

// mul: out (N,C,HW) = a (N,C,HW) * b (N,Cb,HW) with Cb = C, or Cb = 1 (b broadcast over channels)
void kd_mul_forward(float * out, const float * a, const float * b, int N, int C, int Cb, int HW);
void kd_mul_backward(float * da, float * db, const float * dout, const float * a, const float * b,
                     int N, int C, int Cb, int HW);

// concat along channels: out (N, Ca+Cb, HW) = [a (N,Ca,HW), b (N,Cb,HW)]
void kd_concat_forward(float * out, const float * a, const float * b, int N, int Ca, int Cb, int HW);
void kd_concat_backward(float * da, float * db, const float * dout, int N, int Ca, int Cb, int HW);

// nearest resize, PyTorch's mode='nearest': output row oh reads input row
// min(floor(oh * (float)H / OH), H - 1), columns alike. inp (N,C,H,W) -> out (N,C,OH,OW).
void kd_nearest_forward(float * out, const float * inp, int N, int C, int H, int W, int OH, int OW);
void kd_nearest_backward(float * dinp, const float * dout, int N, int C, int H, int W, int OH, int OW);

// bilinear resize, PyTorch's mode='bilinear', align_corners=False: output row oh samples the
// input at max(0, (oh + 0.5) * H / OH - 0.5) between rows floor and floor + 1 (clamped),
// columns alike. inp (N,C,H,W) -> out (N,C,OH,OW).
void kd_bilinear_forward(float * out, const float * inp, int N, int C, int H, int W, int OH, int OW);
void kd_bilinear_backward(float * dinp, const float * dout, int N, int C, int H, int W, int OH, int OW);

// leaky relu: out = inp > 0 ? inp : slope * inp; backward reads the input (any slope)
void kd_leaky_relu_forward(float * out, const float * inp, size_t n, float slope);
void kd_leaky_relu_backward(float * dinp, const float * dout, const float * inp, size_t n, float slope);

// tanh; backward reads the output: dinp += dout * (1 - out^2)
void kd_tanh_forward(float * out, const float * inp, size_t n);
void kd_tanh_backward(float * dinp, const float * dout, const float * out, size_t n);

// jitter (KD_LAYER_JITTER): out[n][c][i][j] = inp[n][c][(i - dy) mod H][(j' - dx) mod W] with
// j' = flip ? W-1-j : j (torch.roll by (dy, dx), then torch.flip over W); backward adds dout
// back through the same permutation
void kd_jitter_forward(float * out, const float * inp, int N, int C, int H, int W, int dy, int dx, bool flip);
void kd_jitter_backward(float * dinp, const float * dout, int N, int C, int H, int W, int dy, int dx, bool flip);

#endif // KD_LAYERS_H
