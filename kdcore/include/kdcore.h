// kdcore: knowledge distillation in C (float32, NCHW, OpenBLAS sgemm, OpenMP).
//
// This is the only public header. The Python package (python/kdcore) is a thin
// binding over exactly these functions; C users get the same library.
//
// A minimal training program:
//
//     struct kd_net * net = kd_net_new();
//     struct kd_layer_spec fc1 = kd_layer_default(KD_LAYER_LINEAR);
//     fc1.name = "fc1"; fc1.inp[0] = KD_INPUT; fc1.in_ch = 784; fc1.out_ch = 256;
//     int h = kd_net_add(net, &fc1);                  // node index, or -1 (see kd_last_error)
//     struct kd_layer_spec act = kd_layer_default(KD_LAYER_RELU);
//     act.name = "relu"; act.inp[0] = h;
//     h = kd_net_add(net, &act);
//     ...                                             // more nodes; the last one is the output
//     kd_net_finalize(net, /*seed=*/0);               // allocates and initialises parameters
//
//     struct kd_optim * opt = kd_optim_new(net, &(struct kd_optim_cfg){
//         .kind = KD_OPTIM_SGD, .lr = 0.1f, .momentum = 0.9f, .weight_decay = 5e-4f });
//     struct kd_dataset ds = { .x = images, .x_dtype = KD_U8, .y = labels, .n = 60000,
//                              .c = 1, .h = 28, .w = 28, .scale = 1.0f / 255 };
//     struct kd_train_cfg cfg = kd_train_cfg_default();
//     cfg.batch_size = 128; cfg.seed = 1;
//     struct kd_epoch_stats st;
//     for (int e = 0; e < 10; e++) {
//         if (kd_train_epoch(net, opt, &ds, &cfg, e, &st) != KD_OK) {
//             fprintf(stderr, "%s\n", kd_last_error()); break;
//         }
//     }
//     kd_optim_free(opt);
//     kd_net_free(net);
//
// Conventions
// - Fallible functions return enum kd_status; on failure kd_last_error() holds a
//   message (per thread) naming the argument and the problem. Nothing here exits,
//   aborts or prints.
// - Tensors are float32, C-contiguous, NCHW. Flat features are (N, C) and are treated
//   as C channels of 1x1 pixels.
// - Backward functions ACCUMULATE parameter gradients (+=); kd_net_zero_grad clears them.
// - Pointers passed in are borrowed for the duration of the call only.
// - Results are deterministic for a given seed and thread count; with
//   kd_set_deterministic(true) they are also independent of the thread count.
#ifndef KDCORE_H
#define KDCORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(__GNUC__)
#define KD_API __attribute__((visibility("default")))
#else
#define KD_API
#endif

#define KDCORE_VERSION "0.1.0"

// ---------------------------------------------------------------------------------------
// Status and errors

enum kd_status {
    KD_OK = 0,
    KD_ERR_NOMEM,        // allocation failed
    KD_ERR_SHAPE,        // shapes inconsistent with the network or each other
    KD_ERR_VALUE,        // an argument is out of its domain (NaN, label out of range, ...)
    KD_ERR_STATE,        // call not valid now (net not finalized, no forward before backward)
    KD_ERR_NONFINITE,    // a loss or gradient became NaN/Inf during training
    KD_ERR_IO,           // file missing, unreadable or malformed
    KD_ERR_INTERRUPTED,  // the progress callback asked to stop
};

KD_API const char * kd_status_str(enum kd_status st);
// Message of the last failure on the calling thread ("" if none).
KD_API const char * kd_last_error(void);

// Threads: sets OpenMP's (and so the OpenMP OpenBLAS's) thread count.
KD_API void kd_set_num_threads(int n);
KD_API int  kd_get_num_threads(void);
// Deterministic mode (off by default): every kernel whose reduction order would follow
// the thread count (the BLAS products of linear layers, the per-thread partial sums of conv
// weight and bias gradients) splits its work into pieces fixed by the shapes alone, so
// results are bitwise identical for any thread count, not only for the same one. Costs some
// speed (see DEVELOPERS.md, "Determinism"). Process-wide; do not change it while a call runs.
KD_API void kd_set_deterministic(bool on);
KD_API bool kd_get_deterministic(void);
// A one-line description of the BLAS build, its CPU core, OpenMP, the instruction set of
// kdcore's kernels and what runs the linear layers ("OpenBLAS 0.3.21 ... USE_OPENMP;
// core=Haswell; ...; kernels: avx512 (automatic ...); linear layers: ...").
KD_API const char * kd_blas_config(void);

// Index of the first NaN or Inf among x[0..n), or SIZE_MAX if all are finite. Scans blocks
// in parallel with a branch-free test, so checking a batch costs little next to a forward;
// the answer does not depend on the thread count.
KD_API size_t kd_first_nonfinite(const float * x, size_t n);

// Instruction set of kdcore's own kernels: the convolution and linear-product micro-kernels,
// BatchNorm statistics, 2x2 max pooling. Every one of them performs the same float
// operations in the same order on each instruction set, so their results are bitwise equal
// across instruction sets. What can differ is which engine runs the linear layers: kdcore's
// own product when the kernels run AVX-512 and OpenBLAS does not (its core is then an AVX2
// one, e.g. OPENBLAS_CORETYPE=Haswell), else OpenBLAS's sgemm; the two agree to float
// rounding (in deterministic mode the own product always runs: bitwise equal again).
// OpenBLAS picks its own kernels from OPENBLAS_CORETYPE when it loads; KDCORE_ISA and
// OPENBLAS_CORETYPE together choose both (e.g. KDCORE_ISA=avx2 OPENBLAS_CORETYPE=Haswell
// runs what an AVX2-only CPU runs).
//
// The choice is made once, at the first kernel call or query below: the environment
// variable KDCORE_ISA = auto | avx512 | avx2 | portable (case-insensitive; unset or empty =
// auto = the best the CPU supports). A value that names an unknown instruction set, or
// one the CPU lacks, is refused: the kernels cannot fail, so they run the automatic choice,
// kd_blas_config/kd_isa_config say so, and kd_isa_init returns KD_ERR_VALUE with the
// message (the Python package raises RuntimeError at import). The library is compiled for
// x86-64-v3 (AVX2, FMA); "portable" selects the plain C kernels that non-x86 builds run.
enum kd_isa {
    KD_ISA_AUTO = 0,      // kd_set_isa: the best the CPU supports
    KD_ISA_PORTABLE,      // plain C kernels
    KD_ISA_AVX2,          // AVX2 + FMA micro-kernels
    KD_ISA_AVX512,        // AVX-512F micro-kernels
    KD_ISA_COUNT
};
// Makes the choice now if no kernel has yet (reads KDCORE_ISA). KD_ERR_VALUE if the
// variable was refused, every time it is called; KD_OK otherwise.
KD_API enum kd_status kd_isa_init(void);
// Switches the kernels to `isa` (KD_ISA_AUTO: the best the CPU supports). KD_ERR_VALUE,
// nothing changed, for an instruction set the CPU lacks or a bad value. Process-wide; call
// it between calls: a call running in another thread may then mix kernels (memory-safe;
// only its linear layers can change rounding, through the engine choice above).
KD_API enum kd_status kd_set_isa(enum kd_isa isa);
// The instruction set the kernels run now (never KD_ISA_AUTO).
KD_API enum kd_isa kd_get_isa(void);
KD_API bool kd_isa_supported(enum kd_isa isa);      // by this CPU (and build); AUTO: true
// "auto", "portable", "avx2", "avx512" (the KDCORE_ISA spellings); NULL for a bad value.
KD_API const char * kd_isa_name(enum kd_isa isa);
// The instruction set in use and how it was chosen, e.g. "avx2 (KDCORE_ISA=avx2; CPU
// supports avx512 avx2 portable)" or "avx2 (automatic; KDCORE_ISA=avx3 refused: ...)".
KD_API const char * kd_isa_config(void);
// Whether Winograd F(2x2,3x3) runs the stride-1 3x3 convs (KDCORE_WINOGRAD=0 turns it off;
// read once) and for which shapes, e.g. "on (KDCORE_WINOGRAD unset); F(2x2,3x3) for ...".
KD_API const char * kd_winograd_config(void);

// ---------------------------------------------------------------------------------------
// Networks: a list of nodes in topological order. Each node reads one input (two for
// KD_LAYER_ADD, _MUL and _CONCAT, none for KD_LAYER_INPUT) from an earlier node or from the
// network input (KD_INPUT), and writes one output tensor. Every node output is a "tap":
// readable after forward, and a gradient can be added to it before backward (feature-based
// distillation). A net with KD_LAYER_INPUT nodes has more than one input (ReviewKD's fusion
// reads four student maps): their data is given by kd_net_set_input before each forward.

#define KD_INPUT (-1)
#define KD_MAX_NAME 96

enum kd_layer_type {
    KD_LAYER_LINEAR,          // y = x W^T + b; x must be flat (C,1,1), W (out_ch, in_ch)
    KD_LAYER_CONV2D,          // square kernel, stride, zero padding, groups; W (OC, C/groups, K, K)
    KD_LAYER_BATCHNORM,       // per-channel over N (and H, W); covers BatchNorm1d and 2d
    KD_LAYER_RELU,
    KD_LAYER_MAXPOOL2D,       // kernel, stride, padding (padding acts as -inf)
    KD_LAYER_AVGPOOL2D,       // kernel, stride, padding (zeros counted, as PyTorch's default)
    KD_LAYER_GLOBAL_AVGPOOL,  // (C,H,W) -> (C,1,1)
    KD_LAYER_DROPOUT,         // inverted dropout with probability p; identity in eval mode
    KD_LAYER_FLATTEN,         // (C,H,W) -> (C*H*W,1,1); no data movement
    KD_LAYER_ADD,             // out = inp[0] + inp[1], same shapes (residual connections)
    KD_LAYER_INPUT,           // an extra network input of in_ch channels (kd_net_set_input)
    KD_LAYER_UPSAMPLE,        // nearest resize (PyTorch mode='nearest'): to size[0] x size[1],
                              //   or (size 0) by the integer scale factor `stride`
    KD_LAYER_SIGMOID,
    KD_LAYER_MUL,             // out = inp[0] * inp[1]; inp[1] has inp[0]'s shape, or one channel
                              //   (broadcast over channels: attention maps)
    KD_LAYER_CONCAT,          // channels of inp[0] then inp[1] (same H, W)
    KD_LAYER_UPSAMPLE_BILINEAR, // bilinear resize, PyTorch's align_corners=False; size/stride as UPSAMPLE
    KD_LAYER_LEAKY_RELU,      // x > 0 ? x : slope * x
    KD_LAYER_TANH,
    KD_LAYER_RESHAPE,         // (C*H*W,...) -> (out_ch, size[0], size[1]), same values in order
    KD_LAYER_JITTER,          // random augmentation of a whole batch, in KD_MODE_DROPOUT forwards only
                              //   (identity otherwise): a circular shift by dy, dx drawn uniformly
                              //   from [-padding, padding] (torch.roll over H, W), then a horizontal
                              //   flip with probability p; one draw per forward from its dropout seed
                              //   (DeepInversion's jitter of the optimised images)
    KD_LAYER_COUNT
};

enum kd_init {
    KD_INIT_DEFAULT,          // PyTorch's default: W, b ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    KD_INIT_KAIMING_OUT,      // W ~ N(0, 2/fan_out) (CIFAR ResNets), b = 0
    KD_INIT_KAIMING_IN,       // W ~ N(0, 2/fan_in), b = 0
};

struct kd_layer_spec {
    enum kd_layer_type type;
    const char * name;        // unique within the net, < KD_MAX_NAME bytes; param keys are name.weight ...
    int  inp[2];              // node indices (< this node) or KD_INPUT; inp[1] for two-input layers
    int  in_ch, out_ch;       // LINEAR: in/out features; CONV2D: in/out channels; BATCHNORM: in_ch
    int  kernel, stride, padding, groups;   // CONV2D and pools (stride 0 = kernel for pools);
                                            // UPSAMPLE: stride is the scale factor
    int  size[2];             // UPSAMPLE: output (H, W); 0 = input size x stride
    bool bias;                // LINEAR, CONV2D
    float eps, momentum;      // BATCHNORM (PyTorch semantics: momentum 0.1, eps 1e-5)
    bool affine;              // BATCHNORM: learnable weight and bias; false = PyTorch's affine=False
                              // (no such tensors; the layer normalises only)
    float slope;              // LEAKY_RELU: PyTorch's negative_slope (0.01)
    float p;                  // DROPOUT probability
    enum kd_init init;        // LINEAR, CONV2D
};

// Defaults (bias true, affine true, groups 1, stride 1, eps 1e-5, momentum 0.1, slope 0.01, inp = {KD_INPUT, KD_INPUT}).
KD_API struct kd_layer_spec kd_layer_default(enum kd_layer_type type);
KD_API const char * kd_layer_type_name(enum kd_layer_type type);

struct kd_net;

KD_API struct kd_net * kd_net_new(void);
KD_API void kd_net_free(struct kd_net * net);   // NULL is a no-op
// Appends a node; returns its index, or -1 with kd_last_error() set.
KD_API int  kd_net_add(struct kd_net * net, const struct kd_layer_spec * spec);
// Allocates parameters, their gradients and buffers and initialises them from seed. After this
// the net's structure is frozen. The output is the last node unless kd_net_set_output says otherwise.
KD_API enum kd_status kd_net_finalize(struct kd_net * net, uint64_t seed);
// Re-initialises all parameters and BN buffers from seed.
KD_API void kd_net_init_params(struct kd_net * net, uint64_t seed);

// The network output: the last node added, unless set (multi-exit nets put their exit
// heads after the main output). node = -1 in the functions below means this node.
KD_API enum kd_status kd_net_set_output(struct kd_net * net, int node);
KD_API int  kd_net_output_node(const struct kd_net * net);
KD_API int  kd_net_num_nodes(const struct kd_net * net);
KD_API int  kd_net_find(const struct kd_net * net, const char * name);   // -1 if absent
KD_API const struct kd_layer_spec * kd_net_node_spec(const struct kd_net * net, int node);

// Parameter tensors (trainable) and buffers (BN running stats), in node order.
// Each tensor is a slice of one contiguous block (kd_net_params / kd_net_grads /
// kd_net_buffers), so optimisers and checkpoints treat them as one array.
struct kd_tensor_info {
    char   name[KD_MAX_NAME + 24];   // "layer1.0.conv1.weight", "bn1.running_mean", ...
    int    ndim;
    int    shape[4];
    size_t offset;                   // in floats, into the params or buffers block
    size_t numel;
    bool   is_buffer;
    bool   decay;                    // weight decay applies (weights yes; BN and biases too
                                     // by default, as in PyTorch; see kd_optim_cfg)
};
KD_API int  kd_net_num_tensors(const struct kd_net * net);   // params then buffers
KD_API const struct kd_tensor_info * kd_net_tensor(const struct kd_net * net, int i);
KD_API size_t  kd_net_num_params(const struct kd_net * net);
KD_API float * kd_net_params(struct kd_net * net);
KD_API float * kd_net_grads(struct kd_net * net);
KD_API size_t  kd_net_num_buffers(const struct kd_net * net);
KD_API float * kd_net_buffers(struct kd_net * net);
// num_batches_tracked per BN node (PyTorch's int64 buffer), indexed by node.
KD_API int64_t * kd_net_bn_batches(struct kd_net * net, int node);

// Shapes: plans activations for a batch of N samples of (C,H,W). Called by forward when
// the shape changes; call it directly to validate a shape or to learn the output size.
// Planning allocates nothing: a forward allocates the memory its mode needs, the first
// backward (or kd_net_grad_add) the activation gradients.
KD_API enum kd_status kd_net_plan(struct kd_net * net, int N, int C, int H, int W);
// Per-sample output shape of a node for the current plan.
KD_API void kd_net_node_shape(const struct kd_net * net, int node, int * C, int * H, int * W);
KD_API int  kd_net_batch(const struct kd_net * net);   // N of the current plan (0 = none)
// Per-sample input shape of the current plan (zeros when there is none).
KD_API void kd_net_input_shape(const struct kd_net * net, int * C, int * H, int * W);

// Forward modes: bit flags, so that a teacher can keep dropout on with BN frozen (a
// "fickle" teacher) while a trained model uses both.
enum kd_mode {
    KD_MODE_EVAL     = 0,   // BN uses running stats, dropout is the identity
    KD_MODE_BN_BATCH = 1,   // BN uses (and updates running stats from) batch statistics
    KD_MODE_DROPOUT  = 2,   // dropout active
    KD_MODE_TRAIN    = 3,   // both: PyTorch's model.train()
    KD_MODE_NO_GRAD  = 4,   // inference only (torch.no_grad): no backward or kd_net_grad_add
                            // may follow. See "Inference forwards" below.
    KD_MODE_LEAN     = 8,   // training forward that lets a ReLU overwrite its input where
                            // nothing else reads it. See "Lean forwards" below.
};

// Forward: x (N,C,H,W) with a combination of kd_mode flags. The output is
// kd_net_output(net, ...). dropout_seed makes dropout masks reproducible (mixed with the
// node index).
KD_API enum kd_status kd_net_forward(struct kd_net * net, const float * x, int N, int C, int H, int W,
                                     unsigned mode, uint64_t dropout_seed);
// Output of a node after forward: pointer into the activation arena, (N, C*H*W) floats.
// Valid until the next plan/forward. node = -1 means the output node. NULL when there was
// no forward, or when the last forward was KD_MODE_NO_GRAD and the node is neither the
// output node nor kept (kd_net_keep).
KD_API const float * kd_net_output(const struct kd_net * net, int node);

// Inference forwards (mode | KD_MODE_NO_GRAD). Any forward without the flag keeps every
// node's output (all taps readable) plus what backward needs, for the whole batch. With it:
//  - only the output node and the nodes marked with kd_net_keep keep their outputs (the
//    rule for taps: a caller that reads a tap after an inference forward keeps it first;
//    feature distillation reads taps of training forwards, which keep everything); nodes
//    that neither lead to a kept node nor to the output are not computed;
//  - other activations live in a scratch reused as soon as all consumers of a node ran
//    (residual inputs stay alive until their add), and no gradient or backward cache is
//    allocated; kd_net_backward and kd_net_grad_add then fail with KD_ERR_STATE;
//  - without KD_MODE_BN_BATCH and KD_MODE_DROPOUT, the batch runs in chunks of images, each
//    chunk through the whole net before the next one: memory is bounded whatever N is, and
//    a chunk's activations stay in cache. Images are independent in eval mode: convolutions,
//    BN, pools and adds give the same bits as an unchunked pass; so do linear layers on
//    kdcore's own product, while on OpenBLAS (whose summation order may depend on the row
//    count) they agree to float rounding, as they do between batch sizes. With BN batch statistics or dropout masks (which depend on
//    the whole batch) the batch is one chunk. kd_evaluate and the teacher forwards of the
//    training loops use inference forwards.
KD_API enum kd_status kd_net_keep(struct kd_net * net, int node, bool keep);
KD_API bool kd_net_kept(const struct kd_net * net, int node);   // false for a bad node

// Lean forwards (mode | KD_MODE_LEAN, without KD_MODE_NO_GRAD): backward works as after any
// forward, with the same bits, but a ReLU or an add writes its output over an input's
// buffer when that input has no other consumer, is not a ReLU, is not the output node and
// is not kept (kd_net_keep). No backward reads such an output -- BN, add, conv and linear
// backwards read their inputs, a ReLU's its own output -- so the activation arena shrinks
// by those buffers (conv -> BN -> ReLU stores two tensors instead of three, BN -> add ->
// ReLU one instead of three).
// kd_net_output of an overwritten node returns NULL until the next plain forward. The
// training loops (train.c) use lean forwards: they read only outputs and exit heads.
// Images per chunk of inference forwards: 0 (default) = automatic. Nets with convolutions:
// 64-128 images, from the per-image activation footprint against the threads' L2 caches --
// one thread's in deterministic mode, so that chunks do not follow the thread count -- then
// balanced (1000 images run as 16 chunks of 63 or 8 of 125). Nets without: as many images
// as fit 64 MB of activations (at least 128), since their working set is the weights and
// sgemm is faster on more rows. n >= N = one chunk.
KD_API enum kd_status kd_net_set_chunk(struct kd_net * net, int images);
// Images per chunk used by the last forward (0 if it was not an inference forward).
KD_API int  kd_net_last_chunk(const struct kd_net * net);
// Bytes currently allocated by a net, per block (for memory tests and reports).
struct kd_net_memory {
    size_t params;        // parameters and BN buffers
    size_t grads;         // parameter gradients
    size_t activations;   // node outputs of forwards that backward may follow
    size_t gradients;     // activation gradients (first backward / kd_net_grad_add)
    size_t cache;         // backward cache (BN statistics, maxpool argmax, dropout masks)
    size_t inference;     // the KD_MODE_NO_GRAD arena
    size_t work;          // convolution scratch
};
KD_API void kd_net_memory(const struct kd_net * net, struct kd_net_memory * out);
// Adds g (N, C*H*W of that node) to the gradient of a node's output. Between forward and
// backward; the gradient of the network output is added by kd_net_backward itself.
KD_API enum kd_status kd_net_grad_add(struct kd_net * net, int node, const float * g, float scale);
// Backward from dout (gradient of the output node, may be NULL if only tap gradients were
// added). Accumulates parameter gradients into kd_net_grads. If dinp is not NULL it
// receives (overwrites) the gradient with respect to the input x.
KD_API enum kd_status kd_net_backward(struct kd_net * net, const float * dout, float * dinp);

// Data of an extra input (a KD_LAYER_INPUT node) for the next forwards: per-sample shape
// (C, H, W) with C the node's in_ch, x holding N * C*H*W floats for the forward's N. x may
// be NULL to plan shapes only (kd_net_plan); a forward then fails. dx (same size, or NULL)
// receives the input's gradient at each backward (zeros where none reaches it). Both are
// borrowed: they must stay valid until they are replaced.
KD_API enum kd_status kd_net_set_input(struct kd_net * net, int node, const float * x, int C, int H, int W,
                                       float * dx);
KD_API void kd_net_zero_grad(struct kd_net * net);

// ---------------------------------------------------------------------------------------
// Losses. Each returns the batch-mean loss and writes (or with accumulate, adds) the
// gradient of `weight * loss` with respect to the logits.

// Softmax cross-entropy with optional label smoothing eps: target distribution
// (1-eps)*onehot + eps/V (PyTorch's label_smoothing). labels in [0, V). sample_w (N) or
// NULL scales each sample's term (the mean still divides by N).
KD_API enum kd_status kd_cross_entropy(float * loss, float * dlogits, const float * logits,
                                       const int64_t * labels, const float * sample_w, int N, int V,
                                       float label_smoothing, float weight, bool accumulate);

// Distillation losses. Conventions (RepDistiller / mdistiller): p = softmax(z/T); KL summed
// over classes, mean over the batch, times T^2. Gradients are those of weight * loss.
//
// Hinton KD: loss = T^2 * mean_i KL(softmax(t_i/T) || softmax(s_i/T)). dlogits w.r.t. the
// student s; dteacher (or NULL) w.r.t. the teacher logits t, for schemes where the
// "teacher" is trained too (DML with gradient to both sides, SLKD's slt_grad option).
KD_API enum kd_status kd_loss_kd(float * loss, float * dlogits, float * dteacher, const float * s,
                                 const float * t, const float * sample_w, int N, int V, float T,
                                 float weight, bool accumulate);
// Soft targets given as probabilities q (N, V), rows summing to 1 (multi-teacher averages,
// fused SL-teachers): loss = T^2 * mean_i KL(q_i || softmax(s_i/T)).
KD_API enum kd_status kd_loss_soft(float * loss, float * dlogits, const float * s, const float * q,
                                   const float * sample_w, int N, int V, float T, float weight,
                                   bool accumulate);
// p = softmax(z/T) row-wise, computed stably.
KD_API void kd_softmax_t(float * p, const float * z, int N, int V, float T);
// DKD: tckd = T^2 mean KL(b_t || b_s) with b = (p_y, 1-p_y); nckd = T^2 mean KL over the
// non-target classes, renormalised (exactly, no -1000 mask). Gradient of
// weight * (alpha * tckd + beta * nckd).
KD_API enum kd_status kd_loss_dkd(float * tckd, float * nckd, float * dlogits, const float * s,
                                  const float * t, const int64_t * labels, int N, int V, float T,
                                  float alpha, float beta, float weight, bool accumulate);
// DIST (Huang et al. 2022, "Knowledge distillation from a stronger teacher"; the authors'
// dist_kd.py): with p = softmax(z / T) for student and teacher,
//   inter = 1 - mean over samples i of pearson(p_s[i, :], p_t[i, :])
//   intra = 1 - mean over classes c of pearson(p_s[:, c], p_t[:, c])
//   loss  = T^2 (beta * inter + gamma * intra)
// pearson(a, b) = <a - mean a, b - mean b> / (|a - mean a| |b - mean b| + 1e-8). inter and
// intra (unweighted, without T^2) may be NULL; dlogits is the gradient w.r.t. s.
KD_API enum kd_status kd_loss_dist(float * inter, float * intra, float * dlogits, const float * s, const float * t,
                                   int N, int V, float T, float beta, float gamma, float weight, bool accumulate);
// NormKD (Chi et al. 2023, "NormKD: Normalized logits for knowledge distillation"; the authors'
// mdistiller-based code): a temperature per sample and per side from the unbiased std over
// the classes, T_t,i = t_norm std(t_i), T_s,i = t_norm std(s_i), and
//   loss = mean over samples i of T_t,i^2 KL(softmax(t_i / T_t,i) || softmax(s_i / T_s,i)).
// The gradient goes through the student's std too (the code's form: only the teacher is under
// no_grad); detach_std treats T_s,i as a constant. A teacher row with std 0 (all logits equal)
// contributes nothing (the limit of its T^2 factor); a student row with std 0, where s / std
// is undefined, is softened at the teacher's temperature and its std gets no gradient.
KD_API enum kd_status kd_loss_normkd(float * loss, float * dlogits, const float * s, const float * t, int N, int V,
                                     float t_norm, bool detach_std, float weight, bool accumulate);
// WTTM (Zheng & Yang, ICLR 2024, "Knowledge distillation based on transformed teacher
// matching"; the authors' wttm.py): the teacher's distribution p = softmax(t) transformed by
// the power gamma (= 1/T) and renormalised, p~ = p^gamma / U = softmax(gamma t), with
// U_i = sum_k p_ik^gamma (the power sum behind the Renyi entropy of order gamma); the
// student at T = 1:
//   loss = mean over samples i of U_i KL(p~_i || softmax(s_i))   (no T^2 factor).
// U is the teacher's and carries no gradient (frozen teacher); dlogits is w.r.t. s.
KD_API enum kd_status kd_loss_wttm(float * loss, float * dlogits, const float * s, const float * t, int N, int V,
                                   float gamma, float weight, bool accumulate);
// CTKD (Li et al., AAAI 2023, "Curriculum temperature for knowledge distillation"; the
// authors' code, global temperature): KD at a learned temperature T, mdistiller/RepDistiller form
//   loss = T^2 mean over samples i of KL(softmax(t_i / T) || softmax(s_i / T)).
// dlogits is w.r.t. s; dT (may be NULL) receives d(weight * loss)/dT (the plain gradient: the
// step engine reverses it, see KD_TERM_CTKD). accumulate applies to both.
KD_API enum kd_status kd_loss_ctkd(float * loss, float * dlogits, float * dT, const float * s, const float * t, int N,
                                   int V, float T, float weight, bool accumulate);
// CTKD's instance-wise form: row i at its own temperature T[i] (N values, each > 0),
//   loss = mean over samples i of T_i^2 KL(softmax(t_i / T_i) || softmax(s_i / T_i));
// dT (may be NULL) receives N values, d(weight * loss)/dT_i. accumulate applies to dlogits and dT.
KD_API enum kd_status kd_loss_ctkd_rows(float * loss, float * dlogits, float * dT, const float * s, const float * t,
                                        int N, int V, const float * T, float weight, bool accumulate);
// CTKD's temperature from its parameter p (the authors' global temperature):
// T = t_start + t_range sigmoid(p); *dT_dp (may be NULL) receives dT/dp.
KD_API double kd_ctkd_temperature(float p, float t_start, float t_range, double * dT_dp);
// CTKD's curriculum: the gradient-reversal factor at a 0-based epoch, cosine from lambda_min to
// lambda_max over decay_epochs, evaluated at the 1-based epoch e = min(epoch + 1, decay_epochs)
// as the authors' loop does: lambda_min + (lambda_max - lambda_min) (1 - cos(pi e / decay_epochs)) / 2.
KD_API double kd_ctkd_lambda(int epoch, float lambda_min, float lambda_max, int decay_epochs);
// DAFL's generator losses (Chen et al. 2019, "Data-free learning of student networks"; the
// authors' code): activation = -mean |x| over all n values of a feature tap; entropy = sum_c
// pbar_c log10 pbar_c with pbar the batch mean of softmax(z) (minus the entropy of the mean
// prediction, in decimal digits as the code's log10). Minimising them makes a generator's
// samples excite the teacher's features and cover the classes evenly.
KD_API enum kd_status kd_loss_activation(float * loss, float * dx, const float * x, size_t n, float weight,
                                         bool accumulate);
KD_API enum kd_status kd_loss_entropy(float * loss, float * dlogits, const float * z, int N, int V, float weight,
                                      bool accumulate);
// Adaptive DeepInversion's competition term (Yin et al. 2020, "Dreaming to distill"; the
// authors' code): with P = softmax(s / T), Q = softmax(t / T), M = (P + Q) / 2, each clamped
// to [0.01, 0.99] (Pc, Qc, Mc: the clamp passes no gradient outside),
//   J = 1/2 KL(Mc || Pc) + 1/2 KL(Mc || Qc)   (KL summed over classes, mean over samples)
//   loss = 1 - clamp(J, 0, 1).
// Minimising it moves the inputs to where teacher and student disagree. dt and ds (each may
// be NULL) receive the gradients of weight * loss w.r.t. t and s.
KD_API enum kd_status kd_loss_adi(float * loss, float * dt, float * ds, const float * t, const float * s, int N, int V,
                                  float T, float weight, bool accumulate);
// MLKD (Jin, Wang & Lin, CVPR 2023, "Multi-level logit distillation"; the authors'
// mdistiller-based code, its weak-view losses): for each temperature T of temps, with
// P = softmax(s / T), Q = softmax(t / T) (N x V),
//   instance T = T^2 mean over samples of KL(Q_i || P_i)
//   class    T = sum_ab ((Q'Q)_ab - (P'P)_ab)^2 / V      (V x V class correlations)
//   batch    T = sum_ij ((QQ')_ij - (PP')_ij)^2 / N      (N x N sample correlations)
//   loss = f_s sum_T instance_T + f_c sum_T class_T + f_s sum_T batch_T.
// The confidence masks come from the teacher at T = 1: f_s is the fraction of samples whose
// top probability is <= its percentile over the batch, f_c the fraction of classes whose
// summed probability is <= its percentile over the classes (np.percentile, linear; the
// authors' 50). The code multiplies each batch-mean term by its boolean mask and averages, so
// a mask scales the whole term by the fraction it keeps; kdcore computes that. parts (may be
// NULL) receives, unweighted with the fractions applied, [0] the instance sum and [1] the class
// plus batch sums; dlogits is w.r.t. s.
#define KD_MLKD_MAX_TEMPS 8
KD_API enum kd_status kd_loss_mlkd(float * loss, float * parts, float * dlogits, const float * s, const float * t, int N,
                                   int V, const float * temps, int n_temps, float percentile, float weight,
                                   bool accumulate);
// Logit regression: mean over N*V of (s - t)^2 (F.mse_loss; the paper's 1/2||s-t||^2 per
// sample is V/2 times this).
KD_API enum kd_status kd_loss_mse(float * loss, float * dlogits, const float * s, const float * t,
                                  int N, int V, float weight, bool accumulate);
// Mean absolute error between logits: mean over N*V of |s - t| (F.l1_loss; DFAD's
// discrepancy). Its subgradient sign(s - t) / (N V) is 0 where s == t, as torch.sign;
// dteacher (may be NULL) receives the opposite of ds, for a source that passes gradient on.
KD_API enum kd_status kd_loss_l1(float * loss, float * ds, float * dteacher, const float * s, const float * t,
                                 int N, int V, float weight, bool accumulate);
// Binary cross-entropy with logits against one target y in [0, 1] for every entry (a
// discriminator's loss): mean over N*V of max(x, 0) - x y + log(1 + exp(-|x|))
// (F.binary_cross_entropy_with_logits, mean reduction); the gradient (sigmoid(x) - y) / (N V).
KD_API enum kd_status kd_loss_bce(float * loss, float * dlogits, const float * x, float target, int N, int V,
                                  float weight, bool accumulate);
// Tolerant-teacher term (Wang & Yoon's review, eq. 8): mean_i [z_(1) - mean(z_(2..K))] over the K
// largest logits of each sample.
KD_API enum kd_status kd_loss_tolerant(float * loss, float * dlogits, const float * z, int N, int V,
                                       int K, float weight, bool accumulate);

// ---------------------------------------------------------------------------------------
// Feature and relation losses: the parameter-free feature-map and embedding methods (AT, SP,
// NST, RKD, PKT, FSP). Conventions:
// - A batch of feature maps: x is float32 (n, c, h, w), C-contiguous; a flat feature vector
//   (an embedding, a pooled feature) is (n, d) passed as c = d, h = w = 1.
// - *loss (may be NULL) receives the loss as the method defines it, weight NOT applied;
//   ds and dt, each may be NULL, receive the gradient of weight * loss w.r.t. the student map
//   s and the teacher map t (dt: when the "teacher" side is trained too, e.g. online or
//   mutual feature distillation; it is the gradient of the whole loss, including terms the
//   references compute under no_grad because their teacher is frozen), overwritten or, with
//   accumulate, added.
// - Defaults are the RepDistiller / mdistiller forms (so results compare with the
//   literature); where the paper differs, an option gives the paper's form.
// - Where sizes differ spatially (AT, NST, and the two layers of one network in FSP), each map
//   is adaptive-average-pooled (torch adaptive_avg_pool2d: bin i covers [floor(iH/OH),
//   ceil((i+1)H/OH))) to (min of the heights, min of the widths); a map already that size is
//   used as is. For square maps this is the references' rule (pool the larger map to the
//   smaller); they decide on the height alone and pool to a square (H, H), which for
//   non-square maps is not "the smaller size" -- kdcore pools each dimension to the smaller.
// - Normalisations keep the references' epsilons: F.normalize's v / max(||v||, 1e-12) (AT, SP,
//   NST, RKD angles), PKT's v / (||v|| + 1e-7), RKD's distance clamp sqrt(max(q, 1e-12)).
//   An all-zero map or row therefore normalises to zero, as in the references.
// - Computed in double (pooling, normalisations, the losses and their reductions), with the
//   feature products (Gram and kernel matrices, their backward products) on kdcore's linear
//   product as GEMMs: no broadcast tensors. OpenMP runs over samples or rows only: results
//   are deterministic, and thread-count independent in deterministic mode.
// - Errors: KD_ERR_VALUE (NULL map, option out of range, non-finite weight), KD_ERR_SHAPE
//   (a size < 1, c*h*w above INT32_MAX, n or channel mismatch), KD_ERR_NOMEM (scratch),
//   KD_ERR_NONFINITE if the loss is not finite (*loss holds it; ds/dt may have been written).
//   Input values are not checked (the Python binding rejects NaN/Inf).
// - Scratch: one allocation per call, freed before it returns; kd_loss_feat_scratch() gives
//   its size in bytes. With M = the pooled h*w, D = c*h*w, T = threads used: 1 when the
//   work is under 2^16 (AT: n (Ds + Dt); NST: n (Cs + Ct)^2 M; FSP: n C1 C2 (Ms + Mt) +
//   n (D1 + D2) of the student), else min(kd_get_num_threads(), n),
//   LW(a, k, b) = the linear product's workspace for an (a x k)(b x k)^T product and its
//   backward (kd_linear_workspace: packed operands), the largest of (a' + b'' + 4) k,
//   (a' + 36) b and (b' + 36) a floats plus 64, x' = x rounded up to 8, x'' to 32:
//     AT   8 [n + T M (Cs + Ct + max(Cs, Ct) + 3)]                               (no GEMM)
//     SP   12 n^2 + 16 n^2 + 16 n + 4 LW(n, max D, n)                 (~ 8 n max(Ds, Dt))
//     NST  8 n + T [12 (Cs + Ct) M + 8 (Cs + Ct) + 4 (Cs^2 + Ct^2 + Cs Ct) + 4 max LW(C, M, C')
//                   + (with a gradient) 8 (Cs + Ct) M + 8 max(Cs, Ct) M]
//          C, C' over Cs, Ct: per sample, not the references' n x C x C x HW broadcast
//          (n = 128, C = 256, 8x8, 2 threads: 3.8 MB against 2.1 GB)
//     RKD  8 (6 n^2 + n + kd_get_num_threads() max(Ds, Dt))    (O(n^2): no n^3, no n^2 d)
//     PKT  4 n (Ds + Dt) + 36 n^2 + 32 n + 4 LW(n, max D, n) + (with a gradient) 4 n max D
//     FSP  8 n + T [4 (C1 + C2)(Ms + Mt) + 12 C1 C2 + 8 max(C1, C2) Mm + 4 max LW(C1, M, C2)
//                   + (with a gradient) 4 (C1 + C2) Mm],  Mm = max(Ms, Mt), M over Ms, Mt
//   plus, for each map that is pooled, 16 (OH + OW) + 8 (h + w) of index tables (bytes, each
//   piece rounded up to 64).
//
// FitNet's hint loss is kd_loss_mse over the flattened maps (N = n, V = c*h*w): mean of
// (s - t)^2, F.mse_loss as RepDistiller/mdistiller write it; its teacher gradient is exactly
// -ds, so it needs no dt-capable variant.

struct kd_fmap { const float * x; int n, c, h, w; };

// Bytes of scratch the last kd_loss_{at,sp,nst,rkd,pkt,fsp} call on this thread allocated.
KD_API size_t kd_loss_feat_scratch(void);

// AT (attention transfer, Zagoruyko & Komodakis 2017). Attention map of a sample:
// q = k * sum_c |f_c|^p over the (pooled) h*w positions, a = q / max(||q||, 1e-12).
// - KD_AT_CODE (default; RepDistiller/mdistiller `Attention`/`at_loss`, torchdistill's
//   ATLoss mode "code", the authors' code): k = 1/c (channel mean); loss = mean over
//   n * h * w of (a_s - a_t)^2.
// - KD_AT_PAPER (the paper's eq. 2, torchdistill's mode "paper"): k = 1 (channel sum; equal
//   after normalisation up to the epsilon); loss = (1/n) sum_i ||a_s,i - a_t,i||_2 (not
//   squared; its gradient at a_s = a_t is taken as 0). The paper's beta/2 is the caller's
//   weight.
// p >= 1 (default 2). The references compute f^p (f.pow(p)), kdcore |f|^p as the paper writes
// it: equal for p = 2, for any even p and for non-negative (post-ReLU) maps, which are what
// the references tap; for signed maps and other p, f^p is signed (odd p) or NaN (fractional
// p). At f = 0, d|f|^p/df = 0 (torch's f.pow(1) gives 1 there; a ReLU before the tap makes
// the two equal).
enum kd_at_form { KD_AT_CODE = 0, KD_AT_PAPER = 1 };
KD_API enum kd_status kd_loss_at(float * loss, float * ds, float * dt, struct kd_fmap s, struct kd_fmap t,
                                 float p, enum kd_at_form form, float weight, bool accumulate);

// SP (similarity preserving, Tung & Mori 2019; RepDistiller/mdistiller `Similarity`):
// F = the maps flattened per sample (n x c*h*w), G = F F^T (n x n), rows L2-normalised
// (max(., 1e-12)); loss = ||G_t - G_s||_F^2 / n^2. Student and teacher may differ in c, h, w. n = 1: G
// normalises to [1] on both sides (0 for an all-zero map), so the loss is 0 (or 1) and the
// gradient 0.
KD_API enum kd_status kd_loss_sp(float * loss, float * ds, float * dt, struct kd_fmap s, struct kd_fmap t,
                                 float weight, bool accumulate);

// NST (neuron selectivity transfer, Huang & Wang 2017; RepDistiller `NSTLoss`, mdistiller
// `nst_loss`): the larger map pooled to the smaller (the references' rule, above), each
// channel's spatial vector L2-normalised (max(., 1e-12)); with k(u, v) = (u . v)^2 over
// channel pairs of one sample, loss = mean k(t,t) + mean k(s,s) - 2 mean k(s,t), means over
// n * Ct * Ct, n * Cs * Cs, n * Cs * Ct (MMD^2 with the homogeneous poly-2 kernel; the
// paper's lambda/2 is the caller's weight). Cs and Ct may differ. Per sample three GEMMs
// (C x hw)(hw x C), not the references' broadcast.
KD_API enum kd_status kd_loss_nst(float * loss, float * ds, float * dt, struct kd_fmap s, struct kd_fmap t,
                                  float weight, bool accumulate);

// RKD (relational KD, Park et al. 2019; RepDistiller `RKDLoss`, mdistiller `rkd_loss`) on the
// flattened features (any c*h*w, student and teacher may differ):
// - distance: D_ij = sqrt(max(||x_i - x_j||^2, 1e-12)) off the diagonal, 0 on it, divided
//   by its mean over the n(n-1) off-diagonal entries; L_dist = smooth-L1 (beta 1) of
//   D_s - D_t, mean over the n^2 entries;
// - angle: for each anchor a, e_ab = (x_b - x_a) / max(||x_b - x_a||, 1e-12) and
//   A_abc = e_ab . e_ac (n^3 values, 0 where b or c is a); L_angle = smooth-L1 mean over n^3.
// loss = w_dist * L_dist + w_angle * L_angle (the references' 25 and 50 are the Python
// defaults); parts (or NULL) receives {L_dist, L_angle} unweighted. Squared distances are
// computed directly in double (the references' |x|^2 + |y|^2 - 2 x.y loses near pairs to
// cancellation) and the angles from them (A_abc = (q_ab + q_ac - q_bc) / (2 m_ab m_ac), the
// same function, epsilons included), so memory is O(n^2), time O(n^2 d + n^3). The paper's
// distance normaliser (mean over the pairs) and Huber loss are these; its sums are the means
// times n^2 and n^3. n = 1: no pairs, loss 0 and zero gradients (the references' mean over
// no distances is NaN). Exactly coincident rows (b != a, x_b = x_a) give e_ab = 0 with the
// clamp's 1/eps gradient, as in the references.
KD_API enum kd_status kd_loss_rkd(float * loss, float * ds, float * dt, struct kd_fmap s, struct kd_fmap t,
                                  float w_dist, float w_angle, float parts[2], float weight, bool accumulate);

// PKT (probabilistic knowledge transfer, Passalis & Tefas 2018; RepDistiller `PKT`,
// mdistiller `pkt_loss`, from the authors' code) on the flattened features: rows
// x / (||x|| + 1e-7), cosine matrix S, M = (S + 1)/2, P = M row-normalised (diagonal kept);
// loss = mean over the n^2 entries of P_t log((P_t + 1e-7) / (P_s + 1e-7)). The paper's sum
// over j != i of the KL divergence is n^2 times this, up to the diagonal and the epsilon;
// the epsilon also means that s = t gives loss 0 but a gradient of order 1e-7 / n^2, not
// exactly 0. n = 1: P = [1], loss 0, gradient 0. An all-zero row normalises to 0; its
// gradient is the exact derivative (I / 1e-7 times the upstream gradient), where torch's
// autograd of the reference gives NaN (d sqrt at 0).
KD_API enum kd_status kd_loss_pkt(float * loss, float * ds, float * dt, struct kd_fmap s, struct kd_fmap t,
                                  float weight, bool accumulate);

// FSP (flow of solution procedure, Yim et al. 2017; RepDistiller `FSP`) for one pair of layers
// per network: per sample G = (1/hw) F1 F2^T (C1 x C2) with the larger of the two maps pooled
// (avg, as RepDistiller; torchdistill uses max pooling) to the common size;
// loss = mean over n * C1 * C2 of (G_s - G_t)^2 (RepDistiller; the paper's sum and
// torchdistill's per-sample norm differ by the reduction). Student and teacher must have the
// same channel counts (t1.c = s1.c, t2.c = s2.c); their spatial sizes may differ. Gradients
// w.r.t. each of the four maps (each may be NULL).
KD_API enum kd_status kd_loss_fsp(float * loss, float * ds1, float * ds2, float * dt1, float * dt2,
                                  struct kd_fmap s1, struct kd_fmap s2, struct kd_fmap t1, struct kd_fmap t2,
                                  float weight, bool accumulate);

// DeepInversion (Yin et al. 2020, "Dreaming to distill"; the authors' code) optimises images
// so that a frozen teacher's BN layers see the statistics they were trained on, under image
// priors. Sums in double; OpenMP over channels or image planes, partial sums added in a
// fixed order (results independent of the thread count).
//
// BN-statistics loss on the map x (n, c, h, w) entering a BN layer with running statistics
// rmean, rvar (c each): mu_c, var_c = mean and biased variance of channel c over n, h, w;
//   loss = ||var - rvar||_2 + ||mu - rmean||_2   (norms over the channels, not squared).
// A zero norm gets gradient 0 (torch.norm's). n * h * w must be >= 2: with one value per
// channel the batch variance is identically 0 (PyTorch's BatchNorm refuses such a batch).
KD_API enum kd_status kd_loss_bnstat(float * loss, float * dx, struct kd_fmap x, const float * rmean,
                                     const float * rvar, float weight, bool accumulate);
// Total-variation prior on images x (n, c, h, w), h, w >= 2, over the four neighbour
// differences of each pixel: right x[i][j] - x[i][j+1], down x[i][j] - x[i+1][j], and the
// diagonals x[i+1][j] - x[i][j+1], x[i][j] - x[i+1][j+1], each over the whole batch:
//   l2 form (l1 = false; the authors' CIFAR script): sum of the four Frobenius norms;
//   l1 form (l1 = true; their ImageNet variant): sum of the four mean absolute differences.
// d|d|/dd at 0 and the gradient of a zero norm are 0.
KD_API enum kd_status kd_loss_tv(float * loss, float * dx, struct kd_fmap x, bool l1, float weight, bool accumulate);
// l2 prior: ||x||_2 over all n values of the batch (the authors' CIFAR script; not squared).
KD_API enum kd_status kd_loss_l2prior(float * loss, float * dx, const float * x, size_t n, float weight,
                                      bool accumulate);
// Losses with connectors or state: OFD, AB, FT, VID, CC, ReviewKD's HCL and CRD.
//
// The connectors (1x1 conv + BN, linear, RepDistiller's ConvReg, VID's 1x1-conv regressor,
// FT's paraphraser/translator, CRD's Linear + L2-norm embeddings, ReviewKD's ABF) are
// ordinary kdcore nets fed from a tap; these functions take the connectors' OUTPUTS (and
// the loss's own parameters) and return the loss and its gradients. Common rules:
// - *loss (may be NULL) is the loss as the method defines it, weight NOT applied; each
//   gradient output (may be NULL) receives the gradient of weight * loss with respect to
//   that input, overwritten or, with accumulate, added.
// - Sums are in double; OpenMP runs only over independent outputs (samples, channels,
//   anchors) and partial sums are added in a fixed order, so the results do not depend on
//   the thread count, deterministic mode or not.
// - Returns KD_ERR_VALUE / KD_ERR_SHAPE naming the argument, KD_ERR_NOMEM when scratch
//   cannot be allocated, KD_ERR_NONFINITE when the loss is not finite (inputs must be).
// - Reference forms: RepDistiller (HobbitLong/RepDistiller: distiller_zoo/, crd/) and
//   mdistiller (megvii-research/mdistiller: distillers/). Each entry says which one and how
//   the paper differs. Per-stage and per-method weights are the caller's.

// A batch of feature maps: x is float32 (n, c, h, w), C-contiguous; a flat feature vector is
// (n, d) passed as c = d, h = w = 1.

// OFD (Heo et al. 2019, "A comprehensive overhaul of feature distillation"), mdistiller's
// OFD.py. Margin of channel k from the teacher's BN before that ReLU, x ~ N(b, |w|^2):
//   margin = E[x | x < 0] = b - |w| phi(b/|w|) / Phi(-b/|w|)   if Phi(-b/|w|) > 0.001,
//   margin = -3 |w|                                             otherwise (mdistiller's cut-off
// for a vanishing negative tail), computed in double and rounded to float. |w| = 0 (which
// mdistiller divides by) gives the limits: b if b < 0, else 0.
KD_API enum kd_status kd_ofd_margin(float * margin, const float * bn_weight, const float * bn_bias, int c);
// Partial L2 between the connector output s (n, c, h, w) (student pre-ReLU map through
// conv1x1 + BN) and the teacher's pre-ReLU map t (n, c, H, W), adaptive-average-pooled to
// (h, w) when the sizes differ (as mdistiller; no gradient to t), with margin m (c):
//   e = (s - m)^2 [s > m, t <= m] + (s - t)^2 [s > t, m < t <= 0] + (s - t)^2 [t > 0]
// i.e. (s - max(t, m))^2 except 0 where s <= max(t, m) <= 0; loss = sum(e) / n (mdistiller's
// .mean(dim=0).sum()). mdistiller sums the stages with weights 1/2^(stages-1-i) and scales
// by FEAT_WEIGHT (1e-3 on CIFAR): the caller's.
KD_API enum kd_status kd_loss_ofd(float * loss, float * ds, struct kd_fmap s, struct kd_fmap t,
                                  const float * margin, float weight, bool accumulate);

// AB (Heo et al. 2019, activation boundaries), RepDistiller's ABLoss, one stage: s is the
// connector output (student pre-ReLU map through ConvReg without ReLU), t the teacher's
// pre-ReLU map, same shape; margin mu (RepDistiller 1.0):
//   loss = sum((s + mu)^2 [s > -mu, t <= 0] + (s - mu)^2 [s <= mu, t > 0]) / n.
// RepDistiller's init stage sums the stages i = 0..S-1 with weights 2^(i-S+1) and multiplies
// by 3/1000 (and beta = 1): those factors are the caller's. The paper's squared hinge is the
// same expression.
KD_API enum kd_status kd_loss_ab(float * loss, float * ds, struct kd_fmap s, struct kd_fmap t,
                                 float margin, float weight, bool accumulate);

// FT (Kim et al. 2018, factor transfer), RepDistiller's FactorTransfer: s is the translator's
// output (student factor map), t the paraphraser encoder's output (teacher factor map); the
// channel counts may differ. If the spatial sizes differ, the map with the larger h is
// adaptive-average-pooled to the other's (h, w) first (RepDistiller, which assumes square
// maps). Factor F(x) = L2-normalise over h*w of the channel mean of x^p1 (F.normalize,
// eps 1e-12); loss = mean over n*h*w of |F(s) - F(t)|^p2. RepDistiller: p1 = 2, p2 = 1.
// The paper normalises the whole flattened factor (all channels, no channel mean of x^2)
// and takes the p-norm of the difference per sample (a sum, not a mean). For p2 != 1
// RepDistiller takes (F(s) - F(t))^p2 without the absolute value: the same for even p2.
// p1 >= 1 (integer), p2 >= 1. ds (shape of s) and dt (shape of t) may be NULL. The
// paraphraser's init stage is a plain reconstruction MSE (kd_loss_mse).
KD_API enum kd_status kd_loss_ft(float * loss, float * ds, float * dt, struct kd_fmap s,
                                 struct kd_fmap t, int p1, float p2, float weight, bool accumulate);

// VID (Ahn et al. 2019), RepDistiller's VIDLoss: mu is the regressor's output (three 1x1
// convs on the student map, pooled beforehand to the teacher's size by the caller as
// RepDistiller pools the regressor's input), t the teacher map, same shape; per-channel
// variance var_c = softplus(log_scale_c) + eps (eps 1e-5);
//   loss = mean over n*c*h*w of 0.5 * ((mu - t)^2 / var_c + log var_c).
// The paper's sum over c, h, w of log sigma_c + (t - mu)^2 / (2 sigma_c^2) is c*h*w times this
// (per sample). softplus is computed stably (RepDistiller's log(1 + exp(a)) overflows for
// a > 88). dmu (shape of mu) and dlog_scale (c entries) may be NULL.
KD_API enum kd_status kd_loss_vid(float * loss, float * dmu, float * dlog_scale, struct kd_fmap mu,
                                  struct kd_fmap t, const float * log_scale, float eps, float weight,
                                  bool accumulate);
// Initial log_scale for a starting variance init_var (RepDistiller: 5.0): log(exp(init_var - eps) - 1).
KD_API float kd_vid_log_scale_init(float init_var, float eps);

// CC (Peng et al. 2019, correlation congruence), RepDistiller's Correlation (the authors'
// code): es, et (n, d) are the embeddings after each side's trainable Linear (no
// normalisation); delta = |es - et|; loss = mean over i < n-1 of sum_d delta_i,d delta_i+1,d
// (consecutive samples of the batch). n >= 2. The paper's Gaussian-RBF correlation matrices
// (1/n^2 ||psi_t - psi_s||_F^2) are a different loss. des and det may be NULL.
KD_API enum kd_status kd_loss_cc(float * loss, float * des, float * det, const float * es, const float * et,
                                 int n, int d, float weight, bool accumulate);

// ReviewKD's hierarchical context loss (Chen et al. 2021), mdistiller's hcl_loss for one
// pair of maps of the same shape (s = the ABF-fused student map, t = the teacher map):
//   loss = (mse(s, t) + sum_l w_l mse(pool_l(s), pool_l(t))) / (1 + sum_l w_l)
// over the levels l in (4, 2, 1) with l < h, pool_l = adaptive average pool to (l, l),
// w_l = 1/2, 1/4, 1/8 for the first, second, third level used; mse = mean of squares. The
// sum over stages, REVIEWKD_WEIGHT and the warm-up are the caller's. ds may be NULL.
KD_API enum kd_status kd_loss_hcl(float * loss, float * ds, struct kd_fmap s, struct kd_fmap t,
                                  float weight, bool accumulate);

// CRD (Tian et al. 2020, contrastive representation distillation), RepDistiller's crd/
// (criterion.py ContrastLoss, memory.py ContrastMemory). es, et (n, dim) are the
// L2-normalised embeddings of student and teacher (Linear + L2 norm: the connectors); idx
// their data-set indices in [0, n_data).
// - Two memory banks of n_data x dim floats, one allocation of exactly 2 * n_data * dim:
//   bank 0 = student bank (RepDistiller's memory_v1, rows updated from es; the teacher
//   anchors are scored against it), bank 1 = teacher bank (memory_v2, from et; scored
//   against the student anchors), initialised uniform in [-1/sqrt(dim/3), 1/sqrt(dim/3)).
// - Per sample K + 1 bank rows r_0 = idx (positive), r_1..r_K negatives. Score
//   P_j = exp(<bank[r_j], anchor> / T) / Z; Z (one per side) is fixed on the first loss call
//   as mean(exp(score/T)) * n_data over that batch's scores (RepDistiller), then constant.
// - NCE with noise probability Pn = 1/n_data, c = K Pn + 1e-7 (RepDistiller's eps):
//   L_anchor = -log(P_0 / (P_0 + c)) - sum_j>0 log(K Pn / (P_j + c)), computed in log space;
//   loss = (sum over the student anchors against bank 1 + sum over the teacher anchors
//   against bank 0) / n. Gradients flow to the anchors only (the banks are constants).
// - Negatives (kd_crd_loss): K draws per sample from a counter-based RNG keyed by (seed, step
//   counter, idx[i]), independent of threads and batch order; without replacement when K
//   does not exceed the pool, with replacement otherwise (RepDistiller's data set sampling:
//   np.random.choice(replace = K > pool)). Pool: with labels == NULL every other sample
//   (index != idx[i]); with labels, every sample of another class (RepDistiller's "exact"
//   mode, its default), which needs the data set's labels (kd_crd_set_labels). RepDistiller's
//   other path (AliasMethod draws over all n_data, own index included, with replacement) is
//   unused by its CRD training and not reproduced.
// - In-batch mode (kd_crd_new_in_batch: no banks, for data sets too large for them): the
//   candidates for the student anchor es_i are the teacher embeddings of the batch (et_i
//   positive, et_j negatives), and conversely, with K = n - 1 (or, with labels, the samples
//   of other classes), Pn = 1/n_data and Z as above. The candidates are inputs here, so the
//   gradients are the loss's full gradients (through anchors and candidates; a symmetric
//   InfoNCE-like form), whereas the banks of the banked mode are state and get none.
// RepDistiller's recipe: dim 128, K 16384, T 0.07, momentum 0.5, beta 0.8.
struct kd_crd;
// NULL on failure (kd_last_error). n_data >= 2, dim >= 1, n_neg >= 1, T > 0, momentum in [0, 1).
KD_API struct kd_crd * kd_crd_new(int64_t n_data, int dim, int n_neg, float T, float momentum, uint64_t seed);
KD_API struct kd_crd * kd_crd_new_in_batch(int64_t n_data, int dim, float T);
KD_API void kd_crd_free(struct kd_crd * crd);
// The data set's labels (n_data values >= 0), copied: enables drawing negatives from other
// classes (kd_crd_loss with labels). Banked mode only.
KD_API enum kd_status kd_crd_set_labels(struct kd_crd * crd, const int64_t * labels, int64_t n_data);
// Loss and gradients (des, det (n, dim), may be NULL) with negatives drawn at the current
// step; on success the step counter advances by one. labels (n) or NULL: with banks, the
// labels of the samples (checked against kd_crd_set_labels); in-batch, same-class samples
// are not negatives.
KD_API enum kd_status kd_crd_loss(struct kd_crd * crd, float * loss, float * des, float * det, const float * es,
                                  const float * et, const int64_t * idx, const int64_t * labels, int n,
                                  float weight, bool accumulate);
// The rows kd_crd_loss would use at the current step: sample_idx (n, K+1), column 0 = idx.
KD_API enum kd_status kd_crd_sample(struct kd_crd * crd, int64_t * sample_idx, const int64_t * idx,
                                    const int64_t * labels, int n);
// Loss with the caller's rows (RepDistiller's contrast_idx): sample_idx (n, K+1) in
// [0, n_data), column 0 the positive. No draw, the step counter is unchanged. Banked mode.
KD_API enum kd_status kd_crd_loss_idx(struct kd_crd * crd, float * loss, float * des, float * det,
                                      const float * es, const float * et, const int64_t * sample_idx, int n,
                                      float weight, bool accumulate);
// After a successful step: bank0[idx_i] = normalise(momentum bank0[idx_i] + (1 - momentum) es_i),
// bank1 likewise from et (rows computed from the old banks, then written in batch order: a
// repeated index keeps its last sample, as index_copy_). No-op in in-batch mode.
KD_API enum kd_status kd_crd_update(struct kd_crd * crd, const float * es, const float * et, const int64_t * idx,
                                    int n);
// State for checkpoints (writable): bank `which` (0 student, 1 teacher; NULL in in-batch
// mode) with its rows and dim; Z (2 floats: student anchors' = RepDistiller's Z_v1, teacher
// anchors' = Z_v2; < 0 means not set yet); the draw counter.
KD_API float *   kd_crd_bank(struct kd_crd * crd, int which, int64_t * rows, int * dim);
KD_API float *   kd_crd_z(struct kd_crd * crd);
KD_API int64_t * kd_crd_steps(struct kd_crd * crd);
KD_API int       kd_crd_n_neg(const struct kd_crd * crd);   // K; 0 in in-batch mode
KD_API int       kd_crd_dim(const struct kd_crd * crd);
KD_API int64_t   kd_crd_n_data(const struct kd_crd * crd);

// ---------------------------------------------------------------------------------------
// Optimisers over a net's parameter block, PyTorch semantics (torch.optim.SGD/Adam/AdamW).

enum kd_optim_kind { KD_OPTIM_SGD, KD_OPTIM_ADAM, KD_OPTIM_ADAMW };

struct kd_optim_cfg {
    enum kd_optim_kind kind;
    float lr;
    float momentum;           // SGD
    float dampening;          // SGD
    bool  nesterov;           // SGD
    float weight_decay;       // SGD/Adam: L2 added to the gradient; AdamW: decoupled
    float beta1, beta2, eps;  // Adam/AdamW (0 means the default 0.9, 0.999, 1e-8)
    bool  no_decay_bn_and_bias;  // true: no weight decay on BN params and biases (false = PyTorch)
};

struct kd_optim;
KD_API struct kd_optim * kd_optim_new(struct kd_net * net, const struct kd_optim_cfg * cfg);
KD_API void  kd_optim_free(struct kd_optim * opt);
// One update with lr (the schedule's current value), using the net's accumulated grads.
KD_API enum kd_status kd_optim_step(struct kd_optim * opt, float lr);
KD_API void  kd_optim_reset(struct kd_optim * opt);   // zero state, step count 0
// State for checkpoints: momentum / first moment, second moment (NULL for SGD), steps.
KD_API float *   kd_optim_state(struct kd_optim * opt, int which);   // which = 0 or 1
KD_API int64_t * kd_optim_steps(struct kd_optim * opt);
KD_API const struct kd_optim_cfg * kd_optim_config(const struct kd_optim * opt);

// Learning-rate schedules, evaluated per step from (epoch, step within the epoch).
enum kd_sched_kind { KD_SCHED_CONSTANT, KD_SCHED_MULTISTEP, KD_SCHED_COSINE, KD_SCHED_CYCLIC };
#define KD_MAX_MILESTONES 16
struct kd_schedule {
    enum kd_sched_kind kind;
    float base_lr;
    float gamma;                          // MULTISTEP factor (0.1)
    int   milestones[KD_MAX_MILESTONES];  // MULTISTEP: epochs (0-based) at which lr *= gamma
    int   n_milestones;
    int   total_epochs;                   // COSINE: period (T_max), in epochs
    float min_lr;                         // COSINE: eta_min
    int   warmup_epochs;                  // linear warm-up from lr/steps to lr, per step
};
KD_API float kd_schedule_lr(const struct kd_schedule * s, int epoch, int step, int steps_per_epoch);

// ---------------------------------------------------------------------------------------
// Data: batches over caller-owned arrays.

enum kd_dtype { KD_F32, KD_U8 };

struct kd_dataset {
    const void * x;           // (n, c, h, w) uint8 or float32, C-contiguous
    enum kd_dtype x_dtype;
    const int64_t * y;        // (n,) labels in [0, num_classes), may be NULL for predict
    int n, c, h, w;
    int num_classes;          // for label checks; 0 = unchecked
    float scale;              // applied first: x * scale (1/255 for uint8 images, else 1)
    float mean[4], std[4];    // per channel after scaling (c <= 4); std 0 means 1
    bool normalize;
};

struct kd_augment {
    int  crop_padding;        // random crop of the original size after zero padding (0 = off)
    bool hflip;               // random horizontal flip with probability 1/2
    float noise_std;          // Gaussian input noise (after normalisation), 0 = off
    int  randaugment;         // after crop and flip: this many operations drawn with replacement
                              // from the first KD_RA_RANDOM of enum kd_ra_op, each at a uniform
                              // magnitude of its range, then KD_RA_CUTOUT of a uniform size in
                              // [0, 1/2) of the width (MLKD's strong view: 2); 0 = off
};

// RandAugment's operations as MLKD's loader applies them to PIL uint8 images, on kdcore's
// float images: on the scaled pixel values (x * scale, [0, 1] for uint8 data) before
// normalisation, without rounding to 256 levels except where the operation is a
// quantisation (equalize, posterize). Magnitude ranges (kd_ra_range): the loader's.
enum kd_ra_op {
    KD_RA_AUTOCONTRAST,   // per channel (v - min) / (max - min); unchanged when max == min
    KD_RA_BRIGHTNESS,     // clamp(m v, 0, 1), m in [0.05, 0.95]
    KD_RA_COLOR,          // clamp(g + m (v - g), 0, 1), g the luma .299 R + .587 G + .114 B (3
                          // channels; identity otherwise), m in [0.05, 0.95]
    KD_RA_CONTRAST,       // clamp(mu + m (v - mu), 0, 1), mu the mean luma (3 channels) or the mean
                          // of all values, m in [0.05, 0.95]
    KD_RA_EQUALIZE,       // PIL's histogram equalisation per channel on round(255 v)
    KD_RA_IDENTITY,
    KD_RA_POSTERIZE,      // keep the top max(1, int(m)) bits of round(255 v), m in [4, 8]
    KD_RA_ROTATE,         // m degrees counter-clockwise about the centre, m in [-30, 30]
    KD_RA_SHARPNESS,      // clamp(s + m (v - s), 0, 1), s PIL's SMOOTH filter (3x3, centre 5,
                          // border pixels unfiltered), m in [0.05, 0.95]
    KD_RA_SHEAR_X,        // output (x, y) reads (x + m y, y), m in [-0.3, 0.3]
    KD_RA_SHEAR_Y,        // output (x, y) reads (x, y + m x), m in [-0.3, 0.3]
    KD_RA_SOLARIZE,       // 1 - v where 255 v >= m, m in [0, 256]
    KD_RA_TRANSLATE_X,    // output (x, y) reads (x + m w, y), m in [-0.3, 0.3]
    KD_RA_TRANSLATE_Y,    // output (x, y) reads (x, y + m h), m in [-0.3, 0.3]
    KD_RA_RANDOM,         // (the operations RandAugment draws from end here)
    KD_RA_CUTOUT = KD_RA_RANDOM,   // a square of side m w (m in [0, 1/2]) about (cx, cy), clipped to
                          // the image, filled with (125, 123, 114) / 255 (channel c: entry c % 3)
    KD_RA_COUNT
};
// The geometric operations (rotate, shear, translate) map pixel centres through PIL's affine
// transform with nearest sampling: output (x, y) reads the input pixel floor of the mapped
// (x + 1/2, y + 1/2), 0 outside the image. Cutout's corner is (int(max(0, cx - s/2)),
// int(max(0, cy - s/2))) and it covers up to int(min(w, x0 + s)) inclusive (PIL's rectangle).
// Applies one operation at magnitude m to one image (c, h, w) in place; cx, cy: Cutout's
// centre (RandAugment draws it in (1, w] and (1, h], the loader's np.random.uniform(w)).
// tmp: c*h*w floats of scratch. KD_ERR_VALUE names a bad op or shape.
KD_API enum kd_status kd_ra_apply(float * img, int c, int h, int w, int op, float m, float cx, float cy, float * tmp);
// The magnitude range [lo, hi] RandAugment draws op's magnitude from (KD_ERR_VALUE for a bad op).
KD_API enum kd_status kd_ra_range(int op, float * lo, float * hi);

// Gathers samples idx[0..N) into out (N,c,h,w) float32: scale, augment, normalise (noise
// after). Augmentation randomness comes from (seed, sample position in the epoch), so it does
// not depend on the thread count. KD_ERR_NOMEM when randaugment's scratch cannot be allocated.
KD_API enum kd_status kd_data_batch(float * out, const struct kd_dataset * ds, const int64_t * idx, int N,
                                    const struct kd_augment * aug, uint64_t seed);
// A seeded permutation of 0..n-1 (Fisher-Yates on splitmix64).
KD_API void kd_data_shuffle(int64_t * perm, int64_t n, uint64_t seed);
// Validates a dataset (shape limits, labels in range, finite floats). Names the problem.
KD_API enum kd_status kd_dataset_check(const struct kd_dataset * ds);

// IDX files (MNIST format), plain or gzip-compressed. On success *data is malloc'd
// (caller frees with kd_free), dims[0..*ndim) filled, *dtype is KD_U8 (only ubyte files
// are accepted: the MNIST family).
KD_API enum kd_status kd_idx_read(const char * path, uint8_t ** data, int * ndim, int64_t dims[4]);
KD_API void kd_free(void * p);

// ---------------------------------------------------------------------------------------
// Training and evaluation loops (the hot path stays in C).

// Progress callback, called every `callback_every` steps and at the end of the epoch.
// Return nonzero to stop: the loop returns KD_ERR_INTERRUPTED after the current step.
struct kd_progress {
    int epoch, step, steps_total;
    double loss_sum;          // sum of per-sample loss so far this epoch
    int64_t correct, seen;
    float lr;
};
typedef int (*kd_progress_fn)(void * ctx, const struct kd_progress * p);

// What a training loop does when a loss term or a gradient is NaN/Inf (checked every step,
// gradients after backward and before the optimizer step).
enum kd_nonfinite {
    KD_NONFINITE_RAISE,   // fail with KD_ERR_NONFINITE naming the epoch, step, term and network
    KD_NONFINITE_SKIP,    // drop the step: parameters, optimizer state (moments, step counts),
                          // BN running statistics and learned gates stay bitwise as before it;
                          // the epoch's statistics count it in skipped_steps (and leave its
                          // samples out of the loss and accuracy means)
};

struct kd_train_cfg {
    int batch_size;
    int64_t max_steps;        // stop after this many steps in the epoch (0 = whole epoch)
    bool shuffle;
    bool drop_last;
    uint64_t seed;            // shuffling, augmentation and dropout derive from (seed, epoch)
    float label_smoothing;
    struct kd_augment aug;
    struct kd_schedule sched;
    kd_progress_fn callback;
    void * callback_ctx;
    int callback_every;       // steps; 0 = only at the end
    enum kd_nonfinite nonfinite;   // default KD_NONFINITE_RAISE
};
KD_API struct kd_train_cfg kd_train_cfg_default(void);

struct kd_epoch_stats {
    double loss;              // mean per-sample training loss over the epoch
    double accuracy;          // training accuracy (on augmented batches, train mode)
    int64_t samples;
    int64_t steps;            // steps run, skipped ones included
    int64_t skipped_steps;    // steps dropped for non-finite values (KD_NONFINITE_SKIP)
    float lr;                 // lr of the last step
};

// One epoch of supervised training with softmax cross-entropy.
KD_API enum kd_status kd_train_epoch(struct kd_net * net, struct kd_optim * opt,
                                     const struct kd_dataset * ds, const struct kd_train_cfg * cfg,
                                     int epoch, struct kd_epoch_stats * out);

// ---------------------------------------------------------------------------------------
// The step engine: every training and distillation loop below is a configuration of it.
//
// A step is data. `nets` take part in it, in order: each runs a forward on the batch (or on
// a tap of an earlier net: a connector), or reads cached logits by sample index; those with
// an optimizer are trained. `terms` are losses, each of a kind with its inputs given as
// references to a net's output or tap: `a` is the side that learns, `src` the target (one
// reference, or several combined). One step: the batch -> every forward -> every term (its
// value and its gradient w.r.t. each trainable input, added at the nodes it read) -> the
// backward of every trained net (connectors first, their input gradient joining the net
// they read) -> the non-finite checks -> the updates. Nothing is updated before every check
// of the step has passed (see kd_nonfinite).

#define KD_STEP_MAX_NETS  80
#define KD_STEP_MAX_TERMS 64
#define KD_SOURCE_MAX     64
#define KD_STEP_MAX_INPUTS 8   // extra inputs of one connector

#define KD_STEP_MAX_VIEWS 2
struct kd_ref { int net, node, view; };   // node -1: the net's output; view: which view of the
                                          // batch the net ran on (0, or 1: kd_step_cfg.view_aug)

struct kd_step_net {
    struct kd_net * net;       // NULL when `logits` is given
    const float * logits;      // cached outputs (ds->n, V), indexed by sample (frozen)
    struct kd_optim * opt;     // NULL: frozen (no backward, no update)
    unsigned mode;             // kd_mode of its forward (trained: KD_MODE_TRAIN; frozen:
                               // KD_MODE_EVAL, run as an inference forward)
    int input_net;             // -1: the batch; else an earlier net of the step whose node
    int input_node;            //   input_node (-1: its output) feeds this one (a connector)
    float input_noise;         // std of Gaussian noise added to its batch input (eq. 7)
    float lr_scale;            // its updates use lr * lr_scale (0 means 1)
    uint64_t salt;             // mixed into its dropout seed
    const char * role;         // "student", "teacher", "peer", ... (messages)
    bool params_only;          // no forward: it holds a term's own parameters (VID's variances);
                               // its gradient is cleared each step, the term adds to it, its
                               // optimizer updates it
    struct kd_ref inputs[KD_STEP_MAX_INPUTS];   // a connector's extra inputs (earlier nets'
    int n_inputs;              //   nodes, or node -1 of cached rows: `logits` as wide as the
                               //   logits), fed to its KD_LAYER_INPUT nodes in node order; the
                               //   input gradients go back to those nets like input_node's
    bool grad_input;           // frozen connector whose input needs the gradient of the terms
                               // that read it (a teacher between a generator and its losses):
                               // a forward that backward can follow, a backward that only
                               // passes the gradient on; its parameters are left unchanged
    bool detach_input;         // connector: no gradient goes back to the net it reads (a
                               // student learning from generated samples)
    unsigned phases;           // trained net: bit p, its optimizer steps in phase p of the step
                               // cycle; 0: every step (see kd_step_cfg.cycle)
    float clip_norm;           // trained net: before its update, its gradient scaled by
                               // min(1, clip_norm / (||g||_2 + 1e-6)) over all its parameters
                               // (torch.nn.utils.clip_grad_norm_); 0: no clipping
    int shares;                // k > 0: a twin of net k - 1 (an earlier trained net built alike,
                               // without BN buffers): one model applied to a second input (a
                               // discriminator reading the teacher's and the student's outputs).
                               // No optimizer of its own: it takes net k - 1's parameters before
                               // each forward, runs its backward in that net's update phases (and
                               // as a connector passing a gradient on), and its parameter
                               // gradient is added to net k - 1's before the update. 0: none
    unsigned views;            // bit v: it runs on view v of the batch (kd_step_cfg.view_aug),
                               // a forward (and backward) per view, its parameter gradients
                               // summed before the one update; 0: view 0 only
};


// How a source with several references combines them, with weights w (normalised per step).
enum kd_mix {
    KD_MIX_LOSSES,   // the term is sum_j w_j term(a, ref_j)
    KD_MIX_PROBS,    // one term against sum_j w_j softmax(ref_j / T) (KD only)
    KD_MIX_LOGITS,   // one term against sum_j w_j ref_j
};

struct kd_source {
    int n;                     // 0: none (CE, tolerant), 1: one reference, up to KD_SOURCE_MAX
    struct kd_ref ref[KD_SOURCE_MAX];
    float w[KD_SOURCE_MAX];    // weights >= 0 (all 0: uniform); normalised to sum 1
    enum kd_mix mix;
    bool grad;                 // the gradient reaches the source's trained nets too (else detached)
    float drop;                // each reference dropped with this probability per step, one kept
    float * gates;             // learned weights softmax(gates), updated in place by SGD with
    float gate_lr;             //   gate_lr on the term (KD with KD_MIX_PROBS); NULL: fixed w
};

enum kd_term_kind {
    KD_TERM_CE,          // kd_cross_entropy(a, labels), the train cfg's label smoothing
    KD_TERM_KD,          // kd_loss_kd(a, src) (kd_loss_soft for KD_MIX_PROBS)
    KD_TERM_DKD,         // kd_loss_dkd(a, src, labels): alpha TCKD + beta NCKD
    KD_TERM_MSE,         // kd_loss_mse(a, src): logits, or maps of equal size (hints)
    KD_TERM_TOLERANT,    // kd_loss_tolerant(a), top-k
    // Feature and relation terms: a and src are taps (maps or flat features) of any shapes
    // the loss takes; the term's options are in its union member of the same name.
    KD_TERM_AT,          // kd_loss_at (at.p, at.form)
    KD_TERM_SP,          // kd_loss_sp
    KD_TERM_NST,         // kd_loss_nst
    KD_TERM_RKD,         // kd_loss_rkd (rkd.w_dist, rkd.w_angle); parts: distance, angle
    KD_TERM_PKT,         // kd_loss_pkt
    KD_TERM_FSP,         // kd_loss_fsp between (a, fsp.a2) and (src.ref[0], src.ref[1])
    // Terms on connector outputs (a is usually a connector's output; see kd_step_net).
    KD_TERM_OFD,         // kd_loss_ofd (ofd.margin: one per channel of src, kd_ofd_margin)
    KD_TERM_AB,          // kd_loss_ab (ab.margin)
    KD_TERM_FT,          // kd_loss_ft (ft.p1, ft.p2)
    KD_TERM_VID,         // kd_loss_vid; log_scale is the parameter block of net `params` (a
                         // parameter holder), eps vid.eps
    KD_TERM_CC,          // kd_loss_cc on flat embeddings
    KD_TERM_CRD,         // kd_crd_loss on the rows of a and src, L2-normalised here (the
                         // embedding's Normalize), negatives from crd.bank; after a completed
                         // step the banks take the step's embeddings (kd_crd_update)
    KD_TERM_HCL,         // kd_loss_hcl: a is one level of ReviewKD's fusion connector, src the
                         // teacher map of the same shape
    KD_TERM_DIST,        // kd_loss_dist(a, src) with beta (inter) and dist.gamma (intra); parts: inter,
                         // intra (each without T^2 and weight)
    // Data-free distillation (DAFL, Chen et al. 2019): terms on a teacher's outputs for
    // generated images, whose gradient reaches the generator through a grad_input teacher.
    KD_TERM_ONEHOT,      // cross-entropy of a (logits) against the argmax of its source's logits
    KD_TERM_ACTIVATION,  // -mean |a| over samples and values (a feature tap)
    KD_TERM_ENTROPY,     // sum_c pbar_c log10 pbar_c, pbar = batch mean of softmax(a): minus the
                         // entropy (in decimal digits, DAFL's code) of the mean prediction
    KD_TERM_NORMKD,      // kd_loss_normkd(a, src) with normkd.t_norm and normkd.detach_std
    KD_TERM_WTTM,        // kd_loss_wttm(a, src) with wttm.gamma
    KD_TERM_CTKD,        // kd_loss_ctkd(a, src) at T = kd_ctkd_temperature(p) with p the one value
                         // of net `params` (a parameter holder); p's gradient is reversed and
                         // scaled: -kd_ctkd_lambda(epoch) dL/dp (the temperature ascends the loss).
                         // ctkd.instance: kd_loss_ctkd_rows, row i at kd_ctkd_temperature(m_i) with m
                         // the values at ctkd.temp, whose gradient is reversed the same way
    // DeepInversion (Yin et al. 2020): terms on optimised images (a net's output) and on a
    // grad_input teacher's taps, whose gradient reaches the images.
    KD_TERM_BNSTAT,      // kd_loss_bnstat(a) against the running statistics of BN node bnstat.node of
                         // a's net; a is that node's input
    KD_TERM_TV,          // kd_loss_tv(a) (tv.l1)
    KD_TERM_L2PRIOR,     // kd_loss_l2prior(a)
    KD_TERM_ADI,         // kd_loss_adi(a, src) at temperature T: a the teacher's logits, src the
                         // student's (src.grad: the gradient reaches both)
    // Adversarial data-free distillation (DFAD, ZSKT): the discrepancy a generator ascends
    // (a term with `reverse`) and the student descends, in alternating phases (cycle below).
    KD_TERM_L1,          // kd_loss_l1(a, src): mean |a - src| over samples and logits
    // MLKD (Jin, Wang & Lin 2023), the multi-level loss of one view (its strong view adds KD and CE terms).
    KD_TERM_MLKD,        // kd_loss_mlkd(a, src) at mlkd.temps[0..mlkd.n_temps) with mlkd.percentile;
                         // parts: instance, class + batch
    // Adversarial KD: a discriminator's single logit against a constant label (bce.target:
    // 1 for the teacher's outputs, 0 for the student's; the student's generator loss is the
    // student side with target 1).
    KD_TERM_BCE,         // kd_loss_bce(a, bce.target); its accuracy: sign of a vs the target
    KD_TERM_COUNT
};
KD_API const char * kd_term_kind_name(enum kd_term_kind kind);   // "ce", "kd", ... (NULL if unknown)

struct kd_term {
    enum kd_term_kind kind;
    const char * name;         // in messages ("<name> of the <role> is not finite"); NULL: the kind's
    struct kd_ref a;
    struct kd_source src;
    float weight;
    int warmup_epochs;         // weight ramps as min((epoch+1)/warmup_epochs, 1); 0 = off
    int stop_epoch;            // from this epoch on the term is off (ESKD); 0 = never
    float T, alpha, beta;      // KD, DKD: temperature; DKD: alpha, beta
    int k;                     // TOLERANT: top-k
    int params;                // the step net holding the term's own parameters (a parameter
                               // holder: VID's log_scale, CTKD's temperature); -1: none. Only
                               // the kinds with parameters take one (and need it)
    bool conditional;          // KD: per sample, the term where the source predicts the label,
                               // else cross-entropy with the label at the term's weight
    bool reverse;              // the gradient of -weight * term reaches its inputs (gradient
                               // reversal: a generator ascends what the student descends); the
                               // value is reported unweighted, its net loss contribution negated
    unsigned phases;           // bit p: the term runs in phase p of the step cycle; 0: every step
    bool standardize;          // KD, DKD, DIST, MSE: z-score each row of logits of `a` and of the
                               // source before the loss, (z - mean) / (std + 1e-7) with the
                               // unbiased std (logit standardisation, Sun et al. 2024); one
                               // detached source reference
    union {                    // the options of the feature kinds (kd_term_default sets them)
        struct { float p; enum kd_at_form form; } at;
        struct { float w_dist, w_angle; } rkd;
        struct { struct kd_ref a2; } fsp;
        struct { const float * margin; } ofd;
        struct { float margin; } ab;
        struct { int p1; float p2; } ft;
        struct { float eps; } vid;
        struct { float gamma; } dist;
        struct { float t_norm; bool detach_std; } normkd;
        struct { float gamma; } wttm;
        struct { int node; } bnstat;
        struct { bool l1; } tv;
        struct { float target; } bce;
        struct {
            float t_start, t_range, lambda_min, lambda_max;
            int decay_epochs;
            bool instance;     // instance-wise: row i at T_i = t_start + t_range sigmoid(m_i), m_i the
            struct kd_ref temp; //   one value per sample at `temp` (the temperature net's output; its
                                //   gradient reversed as p's); `params` is then -1
        } ctkd;
        struct { float temps[KD_MLKD_MAX_TEMPS]; int n_temps; float percentile; } mlkd;
        struct { struct kd_crd * bank; bool class_negatives; } crd;   // negatives from other
                                                                     // classes (kd_crd_set_labels)
    };
};
// Defaults: weight 1, T 4, DKD alpha 1 and beta 8, top-k 5, AT p 2 in the code form, RKD
// weights 25 and 50, AB margin 1, FT p1 2 and p2 1, VID eps 1e-5 (RepDistiller / mdistiller),
// DIST beta 2 and gamma 2 (its CIFAR recipe), NormKD t_norm 2 (the authors' CIFAR-100
// setting; ImageNet 1), WTTM gamma 0.2 (the authors' CIFAR-100 command), CTKD t_start 1,
// t_range 20, lambda 0 -> 1 over 10 epochs (the authors' CIFAR-100 script), ADI T 3 and TV in
// the l2 form (DeepInversion's code), MLKD temperatures 4, 3, 5, 2, 6 and percentile 50 (the
// authors' code), BCE target 1 (a generator's non-saturating loss). The Python binding
// exports them per kind name as kdcore._kdcore.TERM_DEFAULTS.
KD_API struct kd_term kd_term_default(enum kd_term_kind kind);

struct kd_step_cfg {
    const struct kd_step_net * nets;
    int n_nets;                // 1 .. KD_STEP_MAX_NETS; net 0 drives the progress callback
    const struct kd_term * terms;
    int n_terms;               // 0 .. KD_STEP_MAX_TERMS
    struct kd_source monitor;  // a source whose training accuracy is reported (n = 0: none)
    int logits_net;            // the net whose output width is the number of classes (0: net 0,
                               // the student; a generator-first step names the student)
    // Alternating steps (adversarial games): step s of an epoch runs phase s % cycle (cycle
    // 0 or 1: every step is phase 0). In a phase, the terms whose `phases` have its bit run;
    // a trained net is updated when its `phases` have the bit (0: always); a net runs its
    // backward when it is updated, or when it is a connector (trained or grad_input, not
    // detach_input) whose input net runs its backward in that phase: it then only passes the
    // gradient on, its parameters left unchanged. Every other net runs an inference forward.
    int cycle;                 // 0 .. KD_STEP_MAX_PHASES
    bool cycle_batch;          // every step of a cycle reads the cycle's batch (same samples,
                               // augmentation and input noise; ZSKT's repeated z): an epoch has
                               // cycle x as many steps as batches
    // Views (MLKD's weak and strong augmentations): view 0 is the batch under the train cfg's
    // aug, view 1 the same samples under view_aug, with draws of their own. The views run one
    // after the other: view v's forwards (the nets whose `views` have bit v, each with its own
    // BN batch statistics), its terms (every reference of a term names the same view) and its
    // backwards, each net's gradient cleared only before its first backward of the step; then
    // the checks and the updates. A net's and the monitor's accuracy are counted on the first
    // view they run on.
    struct kd_augment view_aug;
};
#define KD_STEP_MAX_PHASES 32

struct kd_step_stats {
    double net_loss[KD_STEP_MAX_NETS];       // per net: sum of its terms' weighted values (the
                                             // terms whose `a` it is), per-sample mean
    double net_accuracy[KD_STEP_MAX_NETS];   // per net whose output has V values: training accuracy
    double term_value[KD_STEP_MAX_TERMS];    // per term: the unweighted loss, per-sample mean
                                             // over the steps of its phases
    double term_part[KD_STEP_MAX_TERMS][2];  // DKD: TCKD, NCKD
    double term_accuracy[KD_STEP_MAX_TERMS]; // accuracy of the term's input `a` (logit terms)
    float term_weight[KD_STEP_MAX_TERMS];    // effective weight this epoch
    double monitor_accuracy;
    int64_t samples, steps, skipped_steps;
    float lr;
};

KD_API enum kd_status kd_step_epoch(const struct kd_step_cfg * step, const struct kd_dataset * ds,
                                    const struct kd_train_cfg * cfg, int epoch, struct kd_step_stats * out);
// The inputs kd_step_epoch builds for batch `batch` of `epoch` (a step cycle's cycle_batch
// aside): its sample indices (idx, cfg->batch_size entries of room), view 0 (x0) and, with
// view_aug (the step's view_aug; NULL: none), view 1 (x1); *nb the batch's size. To check a
// step against another implementation on the same inputs.
KD_API enum kd_status kd_step_batch(const struct kd_dataset * ds, const struct kd_train_cfg * cfg,
                                    const struct kd_augment * view_aug, int epoch, int64_t batch, int64_t * idx,
                                    float * x0, float * x1, int * nb);

// ---------------------------------------------------------------------------------------
// Distillation loops. A step: batch (augmented) -> teacher logits (cached by sample index, or
// teacher forwards on the same clean batch) -> student forward (its input optionally with
// Gaussian noise) -> ce_weight * CE + kd_weight(epoch) * distillation term (+ tolerant
// term) -> backward -> optimizer step.

enum kd_distill_kind {
    KD_DISTILL_NONE,   // cross-entropy only (plain training)
    KD_DISTILL_KD,     // Hinton KD (kd_loss_kd; several teachers: see kd_multi)
    KD_DISTILL_DKD,    // decoupled KD: dkd_alpha * TCKD + dkd_beta * NCKD
    KD_DISTILL_MSE,    // logit regression
};

enum kd_multi {
    KD_MULTI_AVG_PROB,   // one KD term against sum_i g_i softmax(t_i/T) (eqs. 23-24); KD only:
                         // DKD and MSE, which have no mixture form, always use AVG_LOSS
    KD_MULTI_AVG_LOSS,   // sum_i g_i * term(t_i) over the kept teachers (DGKD)
};

struct kd_distill_cfg {
    enum kd_distill_kind kind;
    float T;
    float ce_weight;          // weight of CE with the labels
    float kd_weight;          // weight of the distillation term (as the loss functions define it)
    float dkd_alpha, dkd_beta;
    int   warmup_epochs;      // kd_weight ramps as min((epoch+1)/warmup_epochs, 1); 0 = off
    int   kd_stop_epoch;      // from this epoch on the distillation term is off (ESKD); 0 = never
    bool  conditional;        // per sample: teacher right -> CE + KD; wrong -> CE with weight
                              // ce_weight + the epoch's effective kd_weight (warm-up and stop
                              // applied) and no KD term (Meng et al. 2019); KD only
    enum kd_multi multi;
    const float * teacher_weights;   // n_teachers gates/weights summing to 1; NULL = uniform
    float * gate_logits;      // learned gates (eq. 24): n_teachers logits w, weights softmax(w),
                              // updated in place by SGD with gate_lr on the KD loss (AVG_PROB);
                              // NULL = fixed teacher_weights
    float gate_lr;
    float teacher_drop;       // each teacher dropped with this probability per step; >= 1 of
                              // positive weight kept
    unsigned teacher_mode;    // kd_mode for teacher forwards (KD_MODE_EVAL; KD_MODE_DROPOUT:
                              // a "fickle" teacher with dropout on and BN frozen)
    float student_noise;      // std of Gaussian noise on the student's input only (eq. 7)
    float tolerant_weight;    // weight of kd_loss_tolerant on the student's logits (0 = off)
    int   tolerant_k;
};
KD_API struct kd_distill_cfg kd_distill_cfg_default(void);   // KD, T=4, CE 0.1, KD 0.9

struct kd_distill_stats {
    double loss, ce, kd, tckd, nckd, tolerant;   // per-sample means over the epoch, unweighted terms
    double accuracy;          // student, on the training batches
    double teacher_accuracy;  // first teacher (or the mixture), on the same batches
    int64_t samples, steps;
    int64_t skipped_steps;    // see kd_nonfinite
    float lr, kd_weight;      // last lr; effective kd_weight this epoch
};

// One distillation epoch. teachers (n_teachers nets, run in teacher_mode) or teacher_logits
// (n_teachers arrays of (ds->n, V) logits, indexed by sample) -- pass one of the two; with
// augmentation active cached logits would not match the augmented inputs, so the loop
// refuses them. n_teachers = 0 with kind NONE is plain training.
KD_API enum kd_status kd_distill_epoch(struct kd_net * student, struct kd_optim * opt,
                                       struct kd_net * const * teachers, const float * const * teacher_logits,
                                       int n_teachers, const struct kd_dataset * ds,
                                       const struct kd_train_cfg * cfg, const struct kd_distill_cfg * dcfg,
                                       int epoch, struct kd_distill_stats * out);

// Deep mutual learning (eq. 27) with k >= 2 peers trained together: peer a minimises
// ce_weight * CE + kd_weight * mean_{b != a} T^2 KL(sg(p_b^T) || p_a^T); with ensemble, the
// target is instead the detached mean of all peers' logits (an online ensemble, eq. 28
// without the gate). Peers take the same batch. out: k entries.
struct kd_mutual_cfg { float T, ce_weight, kd_weight; bool ensemble; };
KD_API enum kd_status kd_mutual_epoch(struct kd_net * const * nets, struct kd_optim * const * opts, int k,
                                      const struct kd_dataset * ds, const struct kd_train_cfg * cfg,
                                      const struct kd_mutual_cfg * mcfg, int epoch,
                                      struct kd_distill_stats * out);

// SLKD (Liu, Li, Cheng 2023, eqs. 1-7). Each step, with a frozen teacher T and self-learning teachers
// SL_j (the teacher's architecture, trained from scratch):
//   L_SLj  = alpha CE(y, z_j) + (1-alpha) KD(z_T -> z_j)                       (eqs. 4-5)
//   z_SL   = rho z_1 + (1-rho) z_2   (fuse_probs: p_SL = rho p_1^T + (1-rho) p_2^T)  (eq. 6)
//   L_TS   = alpha CE(y, z_S) + (1-alpha) KD(z_T -> z_S)                       (eq. 1)
//   L_SLTS = alpha CE(y, z_S) + (1-alpha) KD(sg(z_SL) -> z_S)                  (eq. 3)
//   student: lambda L_TS + eta L_SLTS                                          (eq. 7)
// KD is T^2-scaled KL. sl_grad lets L_SLTS's gradient reach the SL-teachers too (not
// detached). sl_frozen runs the SL-teachers in eval mode without updating them (phase 2
// of the sequential SLKD*). slts_plain_kl makes L_SLTS's KD the plain KL of eq. 3 as the
// paper writes it (no T^2); L_TS and the SL-teachers' eqs. 4-5 keep T^2. n_sl is 1 or 2.
struct kd_slkd_cfg {
    float T, alpha, lambda, eta, rho;
    int n_sl;
    bool fuse_probs, sl_grad, sl_frozen, slts_plain_kl;
    float sl_lr_scale;        // SL-teachers step with lr * sl_lr_scale (0 means 1)
};
struct kd_slkd_stats {
    double loss, loss_ts, loss_slts, loss_sl[2];
    double accuracy, sl_accuracy[2], teacher_accuracy;
    int64_t samples, steps;
    int64_t skipped_steps;    // see kd_nonfinite
    float lr;
};
KD_API enum kd_status kd_slkd_epoch(struct kd_net * student, struct kd_optim * opt,
                                    struct kd_net * const * sl, struct kd_optim * const * sl_opts,
                                    struct kd_net * teacher, const float * teacher_logits,
                                    const struct kd_dataset * ds, const struct kd_train_cfg * cfg,
                                    const struct kd_slkd_cfg * scfg, int epoch, struct kd_slkd_stats * out);

// Multi-exit networks: exits are nodes with (N, V) outputs (heads on intermediate taps);
// the net's output node is the deepest exit. Per step, with p_k = softmax(z_k/T):
//  - self-distillation (teacher NULL and no logits; BYOT-style deep supervision): each
//    shallow exit k minimises ce_weight * CE(y, z_k) + kd_weight * T^2 KL(sg(p_out) || p_k),
//    the output exit minimises CE; the terms are summed.
//  - with a teacher (Wang & Yoon's review, eq. 9): every exit, output included, minimises
//    ce_weight * CE(y, z_k) + kd_weight * T^2 KL(p_t || p_k), averaged over the K exits.
// Gradients are injected at the exit nodes and one backward pass runs. out: stats of the
// output exit; exit_accuracy (n_exits) the training accuracy of each listed exit.
struct kd_exits_cfg { float T, ce_weight, kd_weight; };
KD_API enum kd_status kd_exits_epoch(struct kd_net * net, struct kd_optim * opt, const int * exits, int n_exits,
                                     struct kd_net * teacher, const float * teacher_logits,
                                     const struct kd_dataset * ds, const struct kd_train_cfg * cfg,
                                     const struct kd_exits_cfg * ecfg, int epoch, struct kd_distill_stats * out,
                                     double * exit_accuracy);

// Eval-mode forward over a dataset in batches. logits (n, V) may be NULL; loss and
// accuracy need labels (pass NULL pointers to skip them).
KD_API enum kd_status kd_evaluate(struct kd_net * net, const struct kd_dataset * ds, int batch_size,
                                  float * logits, double * loss, double * accuracy);

// ---------------------------------------------------------------------------------------
// Explaining distillation: how much of each input value a node discards (Cheng et al. 2020,
// "Explaining knowledge distillation by quantifying the knowledge", after Guan et al. 2019).
// For an image x and a node f, Gaussian noise of per-value scale sigma_i = exp(s_i) is fitted
// so that f moves little while the noise is as large as possible:
//   J(s) = E_eps ||f(x + sigma * eps) - f(x)||^2 / delta2  -  lambda * mean_i s_i
// (a Monte-Carlo mean over `samples` draws of eps ~ N(0, I)). The fitted s gives the
// entropy of the noisy value i, H_i = s_i + 0.5 log(2 pi e): large where the node ignores
// pixel i. The mean over i (not the paper's sum) keeps lambda independent of the image size.
// The net runs in eval mode (BN running statistics, no dropout); its parameter gradients
// are left zeroed.

// J and dJ/ds for N images at the current s (N x C*H*W values): f* = f(x) from a clean
// forward, then `samples` noisy copies per image. eps (N x samples x C*H*W) gives the noise;
// NULL draws it from seed (kd_explain_sigma's draws). value (N) and grad (N x C*H*W) may be
// NULL.
KD_API enum kd_status kd_sigma_objective(struct kd_net * net, int node, const float * x, int N, int C, int H, int W,
                                         const float * s, const float * eps, int samples, uint64_t seed,
                                         float lambda, float delta2, double * value, float * grad);

struct kd_sigma_cfg {
    int steps;                 // Adam steps (300)
    int samples;               // noise draws per image and step (16)
    float lr;                  // Adam's learning rate on s (0.05; betas 0.9, 0.999, eps 1e-8)
    float lambda;              // weight of the entropy term (1)
    float delta2;              // normaliser of the squared feature distance (> 0; the caller's
                               // choice: kdcore.explain uses the feature spread over images)
    float init_sigma;          // sigma before the first step (0.01)
    uint64_t seed;             // the noise of step t is drawn from kd_hash(seed, t)
};
KD_API struct kd_sigma_cfg kd_sigma_cfg_default(void);
// Fits s for N images (each independently: the images share nothing but the net). s (N x
// C*H*W) receives the fit; objective (steps values, or NULL) the mean over images of J at
// each step, before its update. Deterministic for a given seed and thread count.
KD_API enum kd_status kd_explain_sigma(struct kd_net * net, int node, const float * x, int N, int C, int H, int W,
                                       const struct kd_sigma_cfg * cfg, float * s, double * objective);

// ---------------------------------------------------------------------------------------
// Checkpoints: safetensors files (https://github.com/huggingface/safetensors), so the
// `safetensors` package and PyTorch tooling read what kdcore writes and the reverse.
// Layout: 8-byte little-endian header length N, N bytes of JSON {"name": {"dtype": "F32",
// "shape": [...], "data_offsets": [begin, end]}, ..., "__metadata__": {string: string}},
// then the data section (offsets are relative to it).

enum kd_ckpt_dtype {
    KD_CKPT_F32, KD_CKPT_I64, KD_CKPT_U8,      // what kdcore stores (params, counters, bytes)
    KD_CKPT_F64, KD_CKPT_F16, KD_CKPT_I32, KD_CKPT_I16, KD_CKPT_I8,
    KD_CKPT_U64, KD_CKPT_U32, KD_CKPT_U16,     // accepted too (files from other writers)
    KD_CKPT_DTYPE_COUNT
};
#define KD_CKPT_MAX_DIMS   32
#define KD_CKPT_MAX_HEADER 100000000           // bytes of JSON header (safetensors' limit)

KD_API const char * kd_ckpt_dtype_name(enum kd_ckpt_dtype dtype);   // "F32", ...; NULL if unknown
KD_API size_t kd_ckpt_dtype_size(enum kd_ckpt_dtype dtype);         // bytes per element; 0 if unknown

struct kd_ckpt_tensor {
    const char * name;        // unique, valid UTF-8, not "__metadata__"
    enum kd_ckpt_dtype dtype;
    int ndim;                 // 0 (a scalar) .. KD_CKPT_MAX_DIMS
    const int64_t * shape;    // ndim entries >= 0
    const void * data;        // numel * itemsize bytes, C order (may be NULL when empty)
};

// Writes n tensors and optional metadata (NULL, or a JSON object of string values such as
// {"epoch": "3"}) to path, replacing any file there atomically: the bytes go to a temporary
// file in the same directory (unnamed where the OS allows, so a killed process leaves
// nothing), which is fsynced, renamed over path, and the directory fsynced. A crash at any
// point leaves the old file or the new one, never a mix. Tensor data is laid out by
// decreasing item size, so each tensor is aligned to its item size. KD_ERR_VALUE for bad
// arguments (names the tensor); KD_ERR_IO naming the path, the stage and the system error,
// with the temporary file removed and the old file untouched.
KD_API enum kd_status kd_ckpt_write(const char * path, const struct kd_ckpt_tensor * tensors, int n,
                                    const char * metadata_json);

// Reads and validates a whole file; nothing is trusted before it is checked. Refused with
// KD_ERR_IO, each naming the file and the rule:
//  - the file is shorter than 8 bytes; the header length exceeds KD_CKPT_MAX_HEADER or runs
//    beyond the end of the file;
//  - the header is not valid JSON of the subset safetensors uses (objects, arrays, UTF-8
//    strings with escapes, non-negative integers; nesting deeper than 8 levels, other
//    numbers, true/false/null or "\u0000" are refused) or is not an object;
//  - duplicate tensor names; an entry other than exactly {dtype, shape, data_offsets};
//    a dtype not in the allow-list (enum kd_ckpt_dtype);
//  - shape entries that are not non-negative integers, more than KD_CKPT_MAX_DIMS of them,
//    or an element count / byte size overflowing size_t;
//  - data_offsets not [begin, end] with begin <= end, end beyond the data section, or
//    end - begin != numel * itemsize;
//  - tensors overlapping, or bytes of the data section not covered by any tensor;
//  - __metadata__ not an object of strings (with unique keys).
// *out is NULL on failure; free with kd_ckpt_close. Opening (like kd_ckpt_write) removes
// "<path>.tmp.<pid>.<n>" files left by a writer killed between naming its complete
// temporary file and renaming it, when that pid is not a live process on this machine.
struct kd_ckpt;
KD_API enum kd_status kd_ckpt_open(const char * path, struct kd_ckpt ** out);
KD_API void kd_ckpt_close(struct kd_ckpt * ck);   // NULL is a no-op
KD_API int  kd_ckpt_count(const struct kd_ckpt * ck);                    // tensors, in header order
KD_API int  kd_ckpt_find(const struct kd_ckpt * ck, const char * name);   // index, or -1
KD_API const char * kd_ckpt_name(const struct kd_ckpt * ck, int i);      // NULL if i is out of range
KD_API enum kd_ckpt_dtype kd_ckpt_dtype_of(const struct kd_ckpt * ck, int i);   // KD_CKPT_DTYPE_COUNT if out of range
KD_API const int64_t * kd_ckpt_shape(const struct kd_ckpt * ck, int i, int * ndim);
// A tensor's bytes (little-endian, C order) and their count, valid until kd_ckpt_close. The
// data section starts 64-byte aligned, so tensors of files laid out as kd_ckpt_write does
// are aligned; files from other writers may place them anywhere: copy with memcpy.
KD_API const void * kd_ckpt_data(const struct kd_ckpt * ck, int i, size_t * nbytes);
KD_API int  kd_ckpt_meta_count(const struct kd_ckpt * ck);
KD_API const char * kd_ckpt_meta_key(const struct kd_ckpt * ck, int i);
KD_API const char * kd_ckpt_meta_value(const struct kd_ckpt * ck, int i);
KD_API const char * kd_ckpt_meta(const struct kd_ckpt * ck, const char * key);   // value, or NULL

#ifdef __cplusplus
}
#endif
#endif // KDCORE_H
