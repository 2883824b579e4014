// Net container tests: building and validation errors, planning, a whole-net finite-difference
// gradcheck through conv, BN (train and eval), ReLU, average pool (smooth; max pool is
// gradchecked alone in test_layers.c), a residual with a 1x1+BN
// shortcut, global pooling, flatten and linear, with a gradient injected at a tap; the
// cross-entropy gradient; and a short training run that must reduce the loss.
#include "kdtest.h"
#include "kdcore.h"

static int add(struct kd_net * net, struct kd_layer_spec s) {
    int i = kd_net_add(net, &s);
    if (i < 0) printf("kd_net_add(%s): %s\n", s.name, kd_last_error());
    return i;
}

static struct kd_layer_spec L(enum kd_layer_type t, const char * name, int inp) {
    struct kd_layer_spec s = kd_layer_default(t);
    s.name = name;
    s.inp[0] = inp;
    return s;
}

// x (N,2,6,6) -> conv3x3(2->4) -> bn -> relu -> [avgpool 2] -> conv3x3(4->6) -> bn
//                                        + shortcut conv1x1 s1 (4->6) -> bn  -> add -> relu
//               -> gap -> flatten -> linear(6->3)
static struct kd_net * build(bool relus) {
    struct kd_net * net = kd_net_new();
    struct kd_layer_spec s;
    s = L(KD_LAYER_CONV2D, "conv1", KD_INPUT); s.in_ch = 2; s.out_ch = 4; s.kernel = 3; s.padding = 1; s.bias = false;
    int h = add(net, s);
    s = L(KD_LAYER_BATCHNORM, "bn1", h); s.in_ch = 4; h = add(net, s);
    if (relus) h = add(net, L(KD_LAYER_RELU, "relu1", h));
    s = L(KD_LAYER_AVGPOOL2D, "pool", h); s.kernel = 2; int p = add(net, s);
    s = L(KD_LAYER_CONV2D, "conv2", p); s.in_ch = 4; s.out_ch = 6; s.kernel = 3; s.padding = 1; h = add(net, s);
    s = L(KD_LAYER_BATCHNORM, "bn2", h); s.in_ch = 6; int a = add(net, s);
    s = L(KD_LAYER_CONV2D, "down.0", p); s.in_ch = 4; s.out_ch = 6; s.kernel = 1; s.bias = false; h = add(net, s);
    s = L(KD_LAYER_BATCHNORM, "down.1", h); s.in_ch = 6; int b = add(net, s);
    s = L(KD_LAYER_ADD, "add", a); s.inp[1] = b; h = add(net, s);
    if (relus) h = add(net, L(KD_LAYER_RELU, "relu2", h));
    h = add(net, L(KD_LAYER_GLOBAL_AVGPOOL, "gap", h));
    h = add(net, L(KD_LAYER_FLATTEN, "flat", h));
    s = L(KD_LAYER_LINEAR, "fc", h); s.in_ch = 6; s.out_ch = 3; add(net, s);
    CHECK(kd_net_finalize(net, 42) == KD_OK, "finalize: %s", kd_last_error());
    return net;
}

enum { N = 3, CI = 2, HI = 6, WI = 6, V = 3 };

// Loss = sum(out * R) + sum(tap(add) * G): the gradient being checked.
static double loss_of(struct kd_net * net, const float * x, const float * R, const float * G, int tap, bool train) {
    // Training-mode BN must not drift between evaluations: restore running stats afterwards.
    kd_net_forward(net, x, N, CI, HI, WI, train ? KD_MODE_TRAIN : KD_MODE_EVAL, 0);
    const float * out = kd_net_output(net, -1);
    const float * t = kd_net_output(net, tap);
    double l = 0;
    for (int i = 0; i < N * V; i++) l += (double)out[i] * R[i];
    for (int i = 0; i < N * 6 * 3 * 3; i++) l += (double)t[i] * G[i];
    return l;
}

// Without ReLUs the loss is smooth, so float central differences are reliable; ReLU (and
// max pool) kinks are covered by their own gradchecks in test_layers.c and by the PyTorch
// parity tests of whole models.
static void gradcheck(bool train) {
    struct kd_net * net = build(false);
    int tap = kd_net_find(net, "add");
    CHECK(tap >= 0, "tap 'add' found");
    float x[N * CI * HI * WI], R[N * V], G[N * 6 * 9];
    kdt_fill(x, sizeof x / sizeof *x, 1);
    kdt_fill(R, N * V, 2);
    kdt_fill(G, N * 6 * 9, 3);
    for (size_t i = 0; i < sizeof x / sizeof *x; i++) x[i] *= 2.0f;
    // Non-trivial running statistics for eval mode.
    float * buf = kd_net_buffers(net);
    for (int t = 0; t < kd_net_num_tensors(net); t++) {
        const struct kd_tensor_info * ti = kd_net_tensor(net, t);
        if (!ti->is_buffer) continue;
        bool var = strstr(ti->name, "running_var") != NULL;
        for (size_t i = 0; i < ti->numel; i++)
            buf[ti->offset + i] = var ? 0.5f + 0.1f * (float)(i % 5) : 0.1f * (float)(i % 7) - 0.3f;
    }
    size_t nb = kd_net_num_buffers(net);
    float saved[64];
    memcpy(saved, buf, nb * sizeof(float));

    kd_net_zero_grad(net);
    kd_net_forward(net, x, N, CI, HI, WI, train ? KD_MODE_TRAIN : KD_MODE_EVAL, 0);
    CHECK(kd_net_grad_add(net, tap, G, 1.0f) == KD_OK, "grad_add: %s", kd_last_error());
    float dx[N * CI * HI * WI];
    CHECK(kd_net_backward(net, R, dx) == KD_OK, "backward: %s", kd_last_error());
    memcpy(buf, saved, nb * sizeof(float));

    // Central differences in float on every parameter and input, at eps and eps/2; a
    // coordinate whose two estimates disagree is float noise, skipped, and must stay rare.
    size_t np = kd_net_num_params(net);
    float * p = kd_net_params(net), * g = kd_net_grads(net);
    size_t nx = sizeof x / sizeof *x;
    float * num = malloc((np + nx) * sizeof(float)), * ana = malloc((np + nx) * sizeof(float));
    size_t kept = 0, skipped = 0;
    for (size_t i = 0; i < np + nx; i++) {
        float * v = i < np ? &p[i] : &x[i - np];
        float o = *v, est[2];
        for (int k = 0; k < 2; k++) {
            float eps = k == 0 ? 4e-3f : 2e-3f;
            *v = o + eps; double lp = loss_of(net, x, R, G, tap, train); memcpy(buf, saved, nb * sizeof(float));
            *v = o - eps; double lm = loss_of(net, x, R, G, tap, train); memcpy(buf, saved, nb * sizeof(float));
            *v = o;
            est[k] = (float)((lp - lm) / (2.0 * eps));
        }
        if (fabsf(est[0] - est[1]) > 2e-3f + 2e-2f * fabsf(est[1])) { skipped++; continue; }
        num[kept] = est[1];
        ana[kept] = i < np ? g[i] : dx[i - np];
        kept++;
    }
    check_close(train ? "grads (train)" : "grads (eval)", ana, num, kept, 2e-3, 2e-2);
    CHECK(skipped * 20 < np + nx, "%zu of %zu coordinates have unstable estimates", skipped, np + nx);
    free(num);
    free(ana);
    kd_net_free(net);
}

static void test_errors(void) {
    struct kd_net * net = kd_net_new();
    struct kd_layer_spec s = L(KD_LAYER_LINEAR, "fc", KD_INPUT);
    s.in_ch = 4; s.out_ch = 2;
    CHECK(kd_net_add(net, &s) == 0, "first node is 0");
    CHECK(kd_net_add(net, &s) == -1 && strstr(kd_last_error(), "used twice"), "duplicate name: %s", kd_last_error());
    s.name = "x"; s.inp[0] = 5;
    CHECK(kd_net_add(net, &s) == -1 && strstr(kd_last_error(), "refers to node 5"), "bad input: %s", kd_last_error());
    s = L(KD_LAYER_CONV2D, "c", 0); s.in_ch = 3; s.out_ch = 4; s.kernel = 3; s.groups = 2;
    CHECK(kd_net_add(net, &s) == -1 && strstr(kd_last_error(), "groups"), "groups: %s", kd_last_error());
    s = L(KD_LAYER_DROPOUT, "d", 0); s.p = 1.0f;
    CHECK(kd_net_add(net, &s) == -1 && strstr(kd_last_error(), "dropout p"), "p: %s", kd_last_error());
    CHECK(kd_net_forward(net, (float[4]){0}, 1, 4, 1, 1, KD_MODE_EVAL, 0) == KD_ERR_STATE, "forward before finalize");
    CHECK(kd_net_finalize(net, 0) == KD_OK, "finalize");
    CHECK(kd_net_add(net, &s) == -1, "no add after finalize");
    float x[8] = {0};
    CHECK(kd_net_forward(net, x, 1, 8, 1, 1, KD_MODE_EVAL, 0) == KD_ERR_SHAPE && strstr(kd_last_error(), "expects 4 input features, got 8"),
          "feature mismatch: %s", kd_last_error());
    CHECK(kd_net_forward(net, x, 2, 1, 2, 2, KD_MODE_EVAL, 0) == KD_ERR_SHAPE && strstr(kd_last_error(), "Flatten"),
          "non-flat: %s", kd_last_error());
    CHECK(kd_net_backward(net, NULL, NULL) == KD_ERR_STATE, "backward without forward");
    CHECK(kd_net_forward(net, x, 2, 4, 1, 1, KD_MODE_EVAL, 0) == KD_OK, "forward ok after errors");
    kd_net_free(net);
    kd_net_free(NULL);
}

static void test_cross_entropy(void) {
    // Against hand-computed values: logits (0, ln 2, ln 3) -> p = (1, 2, 3)/6.
    float z[3] = { 0.0f, logf(2.0f), logf(3.0f) }, d[3];
    int64_t y[1] = { 2 };
    float loss;
    CHECK(kd_cross_entropy(&loss, d, z, y, NULL, 1, 3, 0.0f, 1.0f, false) == KD_OK, "ce");
    CHECK(fabsf(loss - logf(2.0f)) < 1e-6f, "ce value %g", loss);
    float want[3] = { 1.0f / 6, 2.0f / 6, 3.0f / 6 - 1.0f };
    check_close("ce grad", d, want, 3, 1e-6, 1e-5);
    // label smoothing 0.3: q = (0.1, 0.1, 0.8)
    CHECK(kd_cross_entropy(&loss, d, z, y, NULL, 1, 3, 0.3f, 1.0f, false) == KD_OK, "ce ls");
    double l = -(0.1 * log(1.0 / 6) + 0.1 * log(2.0 / 6) + 0.8 * log(3.0 / 6));
    CHECK(fabs(loss - l) < 1e-6, "ce ls value %g vs %g", loss, l);
    // extreme logits stay finite
    float zx[3] = { 1e4f, -1e4f, 0.0f };
    CHECK(kd_cross_entropy(&loss, d, zx, y, NULL, 1, 3, 0.0f, 1.0f, false) == KD_OK && fabsf(loss - 1e4f) < 1e-2f, "ce extreme %g", loss);
    y[0] = 3;
    CHECK(kd_cross_entropy(&loss, d, z, y, NULL, 1, 3, 0.0f, 1.0f, false) == KD_ERR_VALUE, "label out of range");
}

static void test_training_reduces_loss(void) {
    // Toy problem: class = which of 3 quadrant-means is largest.
    enum { NS = 192 };
    static float x[NS * CI * HI * WI];
    static int64_t y[NS];
    kdt_fill(x, sizeof x / sizeof *x, 9);
    for (int n = 0; n < NS; n++) {
        y[n] = n % 3;
        for (int i = 0; i < HI * WI / 3; i++) x[(size_t)n * CI * HI * WI + (size_t)y[n] * HI * WI / 3 + i] += 1.5f;
    }
    struct kd_net * net = build(true);
    struct kd_optim * opt = kd_optim_new(net, &(struct kd_optim_cfg){ .kind = KD_OPTIM_SGD, .lr = 0.1f, .momentum = 0.9f });
    CHECK(opt != NULL, "optim: %s", kd_last_error());
    struct kd_dataset ds = { .x = x, .x_dtype = KD_F32, .y = y, .n = NS, .c = CI, .h = HI, .w = WI,
                             .num_classes = 3, .scale = 1.0f };
    struct kd_train_cfg cfg = kd_train_cfg_default();
    cfg.batch_size = 16;
    cfg.sched.base_lr = 0.1f;
    struct kd_epoch_stats first = {0}, st = {0};
    for (int e = 0; e < 8; e++) {
        CHECK(kd_train_epoch(net, opt, &ds, &cfg, e, &st) == KD_OK, "epoch: %s", kd_last_error());
        if (e == 0) first = st;
    }
    double acc;
    CHECK(kd_evaluate(net, &ds, 50, NULL, NULL, &acc) == KD_OK, "evaluate: %s", kd_last_error());
    CHECK(st.loss < 0.5 * first.loss, "loss %g -> %g", first.loss, st.loss);
    CHECK(acc > 0.9, "accuracy %g", acc);
    kd_optim_free(opt);
    kd_net_free(net);
}

// Inference forwards (KD_MODE_NO_GRAD): a mid-size residual net on 1x28x28 (shift- and
// col-path convs, stride 2, max pool, dropout, an exit head nobody keeps). Whatever the
// chunking, everything up to the classifier's input must be the same bits as a plain eval
// forward (convs, BN, pools, adds are per image); the linear layer goes through OpenBLAS
// sgemm, whose summation order can depend on the number of rows (measured: 2e-8 apart
// with 7 vs 50 rows), so logits agree to float rounding. Kept taps survive; nothing
// backward-related is allocated; backward is refused.
static struct kd_net * build_mid(int * tap, int * exit_head) {
    struct kd_net * net = kd_net_new();
    struct kd_layer_spec s;
    s = L(KD_LAYER_CONV2D, "conv1", KD_INPUT); s.in_ch = 1; s.out_ch = 32; s.kernel = 3; s.padding = 1; s.bias = false;
    int h = add(net, s);
    s = L(KD_LAYER_BATCHNORM, "bn1", h); s.in_ch = 32; h = add(net, s);
    int x0 = add(net, L(KD_LAYER_RELU, "relu1", h));
    s = L(KD_LAYER_CONV2D, "b.conv1", x0); s.in_ch = 32; s.out_ch = 64; s.kernel = 3; s.padding = 1; s.stride = 2; s.bias = false;
    h = add(net, s);
    s = L(KD_LAYER_BATCHNORM, "b.bn1", h); s.in_ch = 64; h = add(net, s);
    h = add(net, L(KD_LAYER_RELU, "b.relu", h));
    s = L(KD_LAYER_CONV2D, "b.conv2", h); s.in_ch = 64; s.out_ch = 64; s.kernel = 3; s.padding = 1; s.bias = false;
    h = add(net, s);
    s = L(KD_LAYER_BATCHNORM, "b.bn2", h); s.in_ch = 64; int a = add(net, s);
    s = L(KD_LAYER_CONV2D, "b.down", x0); s.in_ch = 32; s.out_ch = 64; s.kernel = 1; s.stride = 2; s.bias = false;
    h = add(net, s);
    s = L(KD_LAYER_BATCHNORM, "b.downbn", h); s.in_ch = 64; int b = add(net, s);
    s = L(KD_LAYER_ADD, "b.add", a); s.inp[1] = b; h = add(net, s);
    *tap = h = add(net, L(KD_LAYER_RELU, "b.out", h));
    s = L(KD_LAYER_MAXPOOL2D, "pool", h); s.kernel = 2; h = add(net, s);
    s = L(KD_LAYER_CONV2D, "conv3", h); s.in_ch = 64; s.out_ch = 128; s.kernel = 3; s.padding = 1; h = add(net, s);
    h = add(net, L(KD_LAYER_RELU, "relu3", h));
    h = add(net, L(KD_LAYER_GLOBAL_AVGPOOL, "gap", h));
    h = add(net, L(KD_LAYER_FLATTEN, "flat", h));
    s = L(KD_LAYER_DROPOUT, "drop", h); s.p = 0.3f; h = add(net, s);
    s = L(KD_LAYER_LINEAR, "fc", h); s.in_ch = 128; s.out_ch = 10; int out = add(net, s);
    // exit head on the tap, after the output (multi-exit layout)
    int e = add(net, L(KD_LAYER_GLOBAL_AVGPOOL, "exit.gap", *tap));
    e = add(net, L(KD_LAYER_FLATTEN, "exit.flat", e));
    s = L(KD_LAYER_LINEAR, "exit.fc", e); s.in_ch = 64; s.out_ch = 10; *exit_head = add(net, s);
    CHECK(kd_net_finalize(net, 7) == KD_OK, "finalize: %s", kd_last_error());
    CHECK(kd_net_set_output(net, out) == KD_OK, "set_output");
    // Non-trivial running statistics, so that eval-mode BN is not the identity.
    float * buf = kd_net_buffers(net);
    for (size_t i = 0; i < kd_net_num_buffers(net); i++) buf[i] = 0.1f * (float)(i % 7) + (i % 2 ? 0.5f : -0.2f);
    for (int t = 0; t < kd_net_num_tensors(net); t++) {
        const struct kd_tensor_info * ti = kd_net_tensor(net, t);
        if (strstr(ti->name, "running_var"))
            for (size_t i = 0; i < ti->numel; i++) buf[ti->offset + i] = 0.5f + 0.05f * (float)(i % 11);
    }
    return net;
}

static void test_inference(void) {
    // KDTEST_QUICK (valgrind, which runs every fma through a slow helper: ~1000x slower
    // here): 160 images of 4x4 instead of 1000 of 28x28 still make several automatic chunks.
    enum { NB = 50 };
    const bool quick = kdt_quick();
    const int NBIG = quick ? 160 : 1000, HW = quick ? 4 : 28;
    int tap, exit_head;
    struct kd_net * net = build_mid(&tap, &exit_head);
    const int feat = kd_net_find(net, "flat");   // the classifier's input: (N, 128)
    float * x = malloc((size_t)NBIG * HW * HW * sizeof(float));
    kdt_fill(x, (size_t)NBIG * HW * HW, 11);
    int c, h, w;
    // Reference: plain eval forward (everything kept).
    CHECK(kd_net_forward(net, x, NB, 1, HW, HW, KD_MODE_EVAL, 0) == KD_OK, "eval forward: %s", kd_last_error());
    kd_net_node_shape(net, tap, &c, &h, &w);
    const size_t ntap = (size_t)NB * c * h * w;
    float * ref = malloc(NB * 10 * sizeof(float)), * ref_tap = malloc(ntap * sizeof(float));
    memcpy(ref, kd_net_output(net, -1), NB * 10 * sizeof(float));
    memcpy(ref_tap, kd_net_output(net, tap), ntap * sizeof(float));
    float * ref_feat = malloc(NB * 128 * sizeof(float));
    memcpy(ref_feat, kd_net_output(net, feat), NB * 128 * sizeof(float));
    CHECK(kd_net_keep(net, feat, true) == KD_OK, "keep");
    CHECK(kd_net_last_chunk(net) == 0, "plain forward reports no chunk");
    const int chunks[] = { 0, 1, 7, 16, 49, 50, 1000 };
    for (size_t k = 0; k < sizeof chunks / sizeof chunks[0]; k++) {
        kd_net_set_chunk(net, chunks[k]);
        CHECK(kd_net_forward(net, x, NB, 1, HW, HW, KD_MODE_EVAL | KD_MODE_NO_GRAD, 0) == KD_OK,
              "no-grad forward (chunk %d): %s", chunks[k], kd_last_error());
        CHECK(memcmp(kd_net_output(net, feat), ref_feat, NB * 128 * sizeof(float)) == 0,
              "chunk %d (ran %d): features differ from the unchunked eval forward", chunks[k], kd_net_last_chunk(net));
        check_close("chunked logits", kd_net_output(net, -1), ref, NB * 10, 1e-6, 1e-5);
        CHECK(kd_net_output(net, tap) == NULL, "chunk %d: a tap that is not kept is not readable", chunks[k]);
        CHECK(kd_net_output(net, exit_head) == NULL, "unkept exit head not readable");
    }
    kd_net_set_chunk(net, 7);
    kd_net_forward(net, x, NB, 1, HW, HW, KD_MODE_EVAL | KD_MODE_NO_GRAD, 0);
    CHECK(kd_net_last_chunk(net) == 7, "50 images in chunks of at most 7: 8 chunks of 7 (got %d)", kd_net_last_chunk(net));
    // Kept taps survive, same bits.
    CHECK(kd_net_keep(net, tap, true) == KD_OK, "keep");
    CHECK(kd_net_keep(net, 99, true) == KD_ERR_VALUE, "keep of a missing node");
    CHECK(kd_net_forward(net, x, NB, 1, HW, HW, KD_MODE_EVAL | KD_MODE_NO_GRAD, 0) == KD_OK, "forward with a kept tap");
    CHECK(kd_net_output(net, tap) && memcmp(kd_net_output(net, tap), ref_tap, ntap * sizeof(float)) == 0,
          "kept tap equals the eval forward's");
    check_close("logits with a kept tap", kd_net_output(net, -1), ref, NB * 10, 1e-6, 1e-5);
    // No backward after an inference forward.
    CHECK(kd_net_backward(net, ref, NULL) == KD_ERR_STATE && strstr(kd_last_error(), "NO_GRAD"), "backward refused");
    CHECK(kd_net_grad_add(net, -1, ref, 1.0f) == KD_ERR_STATE, "grad_add refused");
    // A plain forward afterwards makes every tap readable again and backward works.
    CHECK(kd_net_forward(net, x, NB, 1, HW, HW, KD_MODE_EVAL, 0) == KD_OK, "eval forward again");
    CHECK(kd_net_output(net, exit_head) != NULL && memcmp(kd_net_output(net, -1), ref, NB * 10 * sizeof(float)) == 0,
          "plain forward after inference");
    kd_net_keep(net, feat, false);
    CHECK(kd_net_backward(net, ref, NULL) == KD_OK, "backward after a plain forward: %s", kd_last_error());
    kd_net_keep(net, tap, false);
    kd_net_set_chunk(net, 0);
    // Dropout masks and batch statistics need the whole batch: one chunk, same bits as plain.
    CHECK(kd_net_forward(net, x, NB, 1, HW, HW, KD_MODE_DROPOUT, 5) == KD_OK, "fickle forward");
    memcpy(ref, kd_net_output(net, -1), NB * 10 * sizeof(float));
    kd_net_set_chunk(net, 7);
    CHECK(kd_net_forward(net, x, NB, 1, HW, HW, KD_MODE_DROPOUT | KD_MODE_NO_GRAD, 5) == KD_OK, "fickle no-grad forward");
    CHECK(kd_net_last_chunk(net) == NB, "dropout: one chunk (got %d)", kd_net_last_chunk(net));
    CHECK(memcmp(kd_net_output(net, -1), ref, NB * 10 * sizeof(float)) == 0, "dropout no-grad output equals plain");
    kd_net_free(net);

    // Memory: a fresh net running inference at batch 1000 allocates no activation, gradient
    // or backward-cache arena, and its inference arena is a small fraction of what a plain
    // forward would hold.
    net = build_mid(&tap, &exit_head);
    CHECK(kd_net_forward(net, x, NBIG, 1, HW, HW, KD_MODE_EVAL | KD_MODE_NO_GRAD, 0) == KD_OK, "forward N=1000: %s", kd_last_error());
    struct kd_net_memory m;
    kd_net_memory(net, &m);
    size_t all_acts = 0;   // floats of every node output at N=1000
    for (int i = 0; i < kd_net_num_nodes(net); i++) { kd_net_node_shape(net, i, &c, &h, &w); all_acts += (size_t)NBIG * c * h * w; }
    CHECK(m.activations == 0 && m.gradients == 0 && m.cache == 0,
          "inference allocated acts %zu, gradients %zu, cache %zu bytes", m.activations, m.gradients, m.cache);
    // Liveness: the arena holds less than one chunk's activations would; at batch 1000 (many
    // chunks) it is a small fraction of the whole batch's.
    const int chunk = kd_net_last_chunk(net);
    CHECK(m.inference > 0 && m.inference < all_acts * sizeof(float) / (size_t)NBIG * (size_t)chunk,
          "inference arena %zu bytes vs %zu for one chunk's activations", m.inference,
          all_acts * sizeof(float) / (size_t)NBIG * (size_t)chunk);
    CHECK(quick || m.inference < all_acts * sizeof(float) / 10,
          "inference arena %zu bytes vs %zu for all activations", m.inference, all_acts * sizeof(float));
    // 64..128 images (the L2 budget decides), balanced over the chunks: 1000 = 16 x 63 or
    // 8 x 125, 160 = 3 x 54 or 2 x 80.
    CHECK(chunk >= NBIG / ((NBIG + 63) / 64) && chunk <= 128 && chunk < NBIG, "automatic chunk %d", chunk);
    float * big = malloc((size_t)NBIG * 10 * sizeof(float));
    memcpy(big, kd_net_output(net, -1), (size_t)NBIG * 10 * sizeof(float));
    // kd_evaluate uses inference forwards: its logits equal the chunked forward's.
    float * lg = malloc((size_t)NBIG * 10 * sizeof(float));
    struct kd_dataset ds = { .x = x, .x_dtype = KD_F32, .n = NBIG, .c = 1, .h = HW, .w = HW, .scale = 1.0f };
    CHECK(kd_evaluate(net, &ds, NBIG, lg, NULL, NULL) == KD_OK, "evaluate: %s", kd_last_error());
    CHECK(memcmp(lg, big, (size_t)NBIG * 10 * sizeof(float)) == 0, "kd_evaluate logits (same chunks: same bits)");
    kd_net_memory(net, &m);
    CHECK(m.activations == 0 && m.gradients == 0, "kd_evaluate allocated no training arenas");
    // ... and equal the plain (unchunked, everything kept) eval forward.
    CHECK(kd_net_forward(net, x, NBIG, 1, HW, HW, KD_MODE_EVAL, 0) == KD_OK, "plain forward N=1000");
    check_close("N=1000 chunked vs plain logits", kd_net_output(net, -1), big, (size_t)NBIG * 10, 1e-6, 1e-5);
    kd_net_memory(net, &m);
    CHECK(m.activations > 0 && m.gradients == 0, "a plain forward allocates activations but no gradients yet");
    CHECK(kd_net_backward(net, big, NULL) == KD_OK, "backward");
    kd_net_memory(net, &m);
    CHECK(m.gradients > 0, "backward allocated the gradients");
    // Liveness-planned gradient slots: a few layers' worth, not a second copy of the
    // activations (the output's injected gradient is N x 10 on top).
    CHECK(m.gradients < m.activations / 2, "gradients %zu bytes vs activations %zu", m.gradients, m.activations);
    free(lg); free(big); free(ref); free(ref_tap); free(ref_feat); free(x);
    kd_net_free(net);
}

// Lean forwards (KD_MODE_LEAN): the same outputs, parameter and input gradients, bit for bit,
// as a plain training forward; outputs a ReLU overwrote read as NULL; a smaller arena.
static void test_lean(void) {
    enum { N = 6 };
    int tap, exit_head;
    struct kd_net * net = build_mid(&tap, &exit_head);
    const int bn1 = kd_net_find(net, "bn1"), badd = kd_net_find(net, "b.add"), conv1 = kd_net_find(net, "conv1");
    const int bbn2 = kd_net_find(net, "b.bn2"), downbn = kd_net_find(net, "b.downbn");
    float * x = malloc(N * 784 * sizeof(float)), * dout = malloc(N * 10 * sizeof(float));
    kdt_fill(x, N * 784, 21);
    kdt_fill(dout, N * 10, 22);
    const size_t np = kd_net_num_params(net);
    float * out[2], * grads[2], * dx[2];
    struct kd_net_memory m[2];
    for (int lean = 0; lean < 2; lean++) {
        unsigned mode = KD_MODE_DROPOUT | (lean ? KD_MODE_LEAN : 0);   // BN on running stats: same stats both times
        CHECK(kd_net_forward(net, x, N, 1, 28, 28, mode, 9) == KD_OK, "forward (lean %d): %s", lean, kd_last_error());
        out[lean] = malloc(N * 10 * sizeof(float));
        memcpy(out[lean], kd_net_output(net, -1), N * 10 * sizeof(float));
        CHECK((kd_net_output(net, bn1) == NULL) == (lean == 1), "bn1 (feeds only relu1) readable iff not lean");
        CHECK((kd_net_output(net, badd) == NULL) == (lean == 1), "b.add (feeds only b.out) readable iff not lean");
        CHECK((kd_net_output(net, bbn2) == NULL) == (lean == 1), "b.bn2 (b.add's first input) readable iff not lean");
        CHECK(kd_net_output(net, downbn) != NULL, "b.downbn (b.add's second input) stays readable");
        CHECK(kd_net_output(net, conv1) != NULL && kd_net_output(net, tap) != NULL, "conv1 and the tap stay readable");
        CHECK(kd_net_output(net, exit_head) != NULL, "exit head readable");
        kd_net_zero_grad(net);
        // a tap gradient too: gradient slots are independent of the activation layout
        float * g = calloc((size_t)N * 64 * 14 * 14, sizeof(float));
        kdt_fill(g, (size_t)N * 64 * 14 * 14, 23);
        CHECK(kd_net_grad_add(net, tap, g, 0.5f) == KD_OK, "grad_add");
        free(g);
        dx[lean] = malloc(N * 784 * sizeof(float));
        CHECK(kd_net_backward(net, dout, dx[lean]) == KD_OK, "backward (lean %d): %s", lean, kd_last_error());
        grads[lean] = malloc(np * sizeof(float));
        memcpy(grads[lean], kd_net_grads(net), np * sizeof(float));
        kd_net_memory(net, &m[lean]);
        kd_net_free(net);
        net = build_mid(&tap, &exit_head);   // fresh arenas for the memory comparison
    }
    CHECK(memcmp(out[0], out[1], N * 10 * sizeof(float)) == 0, "lean: same outputs");
    CHECK(memcmp(grads[0], grads[1], np * sizeof(float)) == 0, "lean: same parameter gradients");
    CHECK(memcmp(dx[0], dx[1], N * 784 * sizeof(float)) == 0, "lean: same input gradient");
    CHECK(m[1].activations < m[0].activations * 4 / 5, "lean arena %zu bytes vs %zu", m[1].activations, m[0].activations);
    CHECK(kd_net_forward(net, x, N, 1, 28, 28, KD_MODE_LEAN | KD_MODE_NO_GRAD, 0) == KD_ERR_VALUE, "lean + no-grad refused");
    for (int i = 0; i < 2; i++) { free(out[i]); free(grads[i]); free(dx[i]); }
    free(x); free(dout);
    kd_net_free(net);
}

static void gradcheck_train(void) { gradcheck(true); }
static void gradcheck_eval(void) { gradcheck(false); }

int main(void) {
    // Runs on the instruction set KDCORE_ISA chooses (`make test-c-isa` runs each one).
    CHECK(kd_isa_init() == KD_OK, "%s", kd_last_error());
    printf("kernels: %s\n", kd_isa_config());
    KDT_RUN(test_errors);
    KDT_RUN(gradcheck_train);
    KDT_RUN(gradcheck_eval);
    KDT_RUN(test_cross_entropy);
    KDT_RUN(test_training_reduces_loss);
    KDT_RUN(test_inference);
    KDT_RUN(test_lean);
    return kdt_finish();
}
