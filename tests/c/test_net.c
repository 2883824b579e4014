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

int main(void) {
    test_errors();
    gradcheck(true);
    gradcheck(false);
    test_cross_entropy();
    test_training_reduces_loss();
    return kdt_finish();
}
