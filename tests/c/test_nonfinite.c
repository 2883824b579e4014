// The non-finite policy of the training loops. Two honest ways to break a step, both from a
// dataset with one poisoned sample (finite values, so the dataset check accepts them):
//  - a non-finite LOSS: the sample's features are huge and the first layer adds them up,
//    so the forward overflows to Inf (and NaN after BN);
//  - a non-finite GRADIENT with a finite loss: the huge feature meets a zero weight, so the
//    logits stay finite, but its weight gradient (upstream gradient x feature) overflows.
// raise names the epoch, step, term and network; skip leaves parameters, optimizer state (both
// moments and the step count) and BN statistics bitwise as they were before the dropped
// step, counts it, and training goes on.
#include "kdtest.h"
#include "kdcore.h"

enum { NS = 32, B = 4, F = 2, POISON = 13 };   // 8 steps; the poisoned sample is in step 3

static int add(struct kd_net * net, struct kd_layer_spec s) {
    int i = kd_net_add(net, &s);
    if (i < 0) printf("kd_net_add(%s): %s\n", s.name, kd_last_error());
    return i;
}

// fc1 (F -> 3, no bias) [-> bn (3)] -> fc2 (3 -> 2, no bias)
static struct kd_net * build(bool bn) {
    struct kd_net * net = kd_net_new();
    struct kd_layer_spec s = kd_layer_default(KD_LAYER_LINEAR);
    s.name = "fc1"; s.inp[0] = KD_INPUT; s.in_ch = F; s.out_ch = 3; s.bias = false;
    int h = add(net, s);
    if (bn) {
        s = kd_layer_default(KD_LAYER_BATCHNORM);
        s.name = "bn"; s.inp[0] = h; s.in_ch = 3;
        h = add(net, s);
    }
    s = kd_layer_default(KD_LAYER_LINEAR);
    s.name = "fc2"; s.inp[0] = h; s.in_ch = 3; s.out_ch = 2; s.bias = false;
    add(net, s);
    CHECK(kd_net_finalize(net, 7) == KD_OK, "finalize: %s", kd_last_error());
    return net;
}

enum craft { CRAFT_SUM, CRAFT_GRAD };

// CRAFT_SUM, for the loss case: fc1 adds the features up (weights near 1), so two features of
// 3e38 overflow to Inf.
// CRAFT_GRAD, for the gradient case: fc1 ignores feature 0 (zero column) and barely uses feature 1, fc2
// maps the hidden units to opposite, large logits. p stays near 1/2, so the upstream
// gradient at fc1's output is ~25 per sample, and times 3e38 it overflows; the logits (and
// so the loss) stay finite.
static void craft_weights(struct kd_net * net, enum craft how) {
    float * p = kd_net_params(net);
    for (int t = 0; t < kd_net_num_tensors(net); t++) {
        const struct kd_tensor_info * ti = kd_net_tensor(net, t);
        if (how == CRAFT_SUM) {
            if (strcmp(ti->name, "fc1.weight") == 0)
                for (int j = 0; j < 6; j++) p[ti->offset + j] = 1.0f + 0.1f * (float)j;
            continue;
        }
        if (strcmp(ti->name, "fc1.weight") == 0)
            for (int j = 0; j < 3; j++) { p[ti->offset + 2 * j] = 0.0f; p[ti->offset + 2 * j + 1] = 0.001f; }
        if (strcmp(ti->name, "fc2.weight") == 0)
            for (int j = 0; j < 3; j++) { p[ti->offset + j] = 100.0f; p[ti->offset + 3 + j] = -100.0f; }
    }
}

struct state {   // everything a dropped step must leave unchanged
    float * params, * buffers, * m, * v;
    int64_t steps, bn_batches;
    size_t np, nb;
};

static struct state snapshot(struct kd_net * net, struct kd_optim * opt) {
    struct state s;
    s.np = kd_net_num_params(net);
    s.nb = kd_net_num_buffers(net);
    s.params = malloc(s.np * sizeof(float));
    s.buffers = malloc((s.nb + 1) * sizeof(float));
    s.m = malloc(s.np * sizeof(float));
    s.v = malloc(s.np * sizeof(float));
    memcpy(s.params, kd_net_params(net), s.np * sizeof(float));
    memcpy(s.buffers, kd_net_buffers(net), s.nb * sizeof(float));
    memcpy(s.m, kd_optim_state(opt, 0), s.np * sizeof(float));
    if (kd_optim_state(opt, 1)) memcpy(s.v, kd_optim_state(opt, 1), s.np * sizeof(float));
    else memset(s.v, 0, s.np * sizeof(float));
    s.steps = *kd_optim_steps(opt);
    int bn = kd_net_find(net, "bn");
    s.bn_batches = bn >= 0 ? *kd_net_bn_batches(net, bn) : -1;
    return s;
}

static bool same_state(const struct state * a, const struct state * b) {
    return a->np == b->np && a->nb == b->nb && a->steps == b->steps && a->bn_batches == b->bn_batches &&
           memcmp(a->params, b->params, a->np * sizeof(float)) == 0 &&
           memcmp(a->buffers, b->buffers, a->nb * sizeof(float)) == 0 &&
           memcmp(a->m, b->m, a->np * sizeof(float)) == 0 && memcmp(a->v, b->v, a->np * sizeof(float)) == 0;
}

static void state_free(struct state * s) { free(s->params); free(s->buffers); free(s->m); free(s->v); }

static bool all_finite(const float * x, size_t n) {
    for (size_t i = 0; i < n; i++) if (!isfinite(x[i])) return false;
    return true;
}

struct run { enum kd_status st; struct kd_epoch_stats es; struct state s; char err[512]; };

// A fresh net and optimizer, one epoch (or max_steps steps) over the poisoned dataset.
static struct run train(bool bn, enum craft how, enum kd_optim_kind kind, enum kd_nonfinite policy, int max_steps,
                        const float * x, const int64_t * y) {
    struct kd_net * net = build(bn);
    craft_weights(net, how);
    struct kd_optim * opt = kd_optim_new(net, &(struct kd_optim_cfg){
        .kind = kind, .lr = kind == KD_OPTIM_SGD ? 0.1f : 0.01f, .momentum = 0.9f, .weight_decay = 1e-4f });
    struct kd_dataset ds = { .x = x, .x_dtype = KD_F32, .y = y, .n = NS, .c = F, .h = 1, .w = 1,
                             .num_classes = 2, .scale = 1.0f };
    struct kd_train_cfg cfg = kd_train_cfg_default();
    cfg.batch_size = B;
    cfg.shuffle = false;   // sample i is in step i / B
    cfg.max_steps = max_steps;
    cfg.nonfinite = policy;
    cfg.sched.base_lr = kind == KD_OPTIM_SGD ? 0.1f : 0.01f;
    struct run r;
    memset(&r, 0, sizeof r);
    r.st = kd_train_epoch(net, opt, &ds, &cfg, 0, &r.es);
    snprintf(r.err, sizeof r.err, "%s", kd_last_error());
    r.s = snapshot(net, opt);
    kd_optim_free(opt);
    kd_net_free(net);
    return r;
}

static void check_policy(const char * tag, bool bn, enum craft how, enum kd_optim_kind kind, const char * term,
                         const float * x, const int64_t * y) {
    const int bad_step = POISON / B;
    // raise: the error names the term, the network and the step.
    struct run r = train(bn, how, kind, KD_NONFINITE_RAISE, 0, x, y);
    char want[128];
    snprintf(want, sizeof want, "%s of the model is not finite at epoch 0, step %d", term, bad_step);
    CHECK(r.st == KD_ERR_NONFINITE && strstr(r.err, want), "%s: raise gave status %d, message '%s' (want '%s')",
          tag, (int)r.st, r.err, want);
    state_free(&r.s);
    // skip: bad_step + 1 steps end exactly where bad_step steps do, bit for bit.
    struct run before = train(bn, how, kind, KD_NONFINITE_SKIP, bad_step, x, y);
    struct run over = train(bn, how, kind, KD_NONFINITE_SKIP, bad_step + 1, x, y);
    CHECK(before.st == KD_OK && over.st == KD_OK, "%s: skip runs failed: %s", tag, over.err);
    CHECK(before.es.skipped_steps == 0 && over.es.skipped_steps == 1 && over.es.steps == bad_step + 1,
          "%s: skipped %lld of %lld steps (want 1 of %d)", tag, (long long)over.es.skipped_steps,
          (long long)over.es.steps, bad_step + 1);
    CHECK(over.es.samples == (int64_t)bad_step * B, "%s: the dropped step's samples are not counted (%lld)", tag,
          (long long)over.es.samples);
    CHECK(same_state(&before.s, &over.s), "%s: the skipped step changed parameters, optimizer state or BN buffers", tag);
    CHECK(before.s.steps == bad_step, "%s: optimizer step count %lld", tag, (long long)before.s.steps);
    // ... and training continues after it: the whole epoch runs with one step dropped.
    struct run all = train(bn, how, kind, KD_NONFINITE_SKIP, 0, x, y);
    CHECK(all.st == KD_OK && all.es.skipped_steps == 1 && all.es.steps == NS / B && all.s.steps == NS / B - 1,
          "%s: full epoch: status %d, %lld skipped, %lld optimizer steps", tag, (int)all.st,
          (long long)all.es.skipped_steps, (long long)all.s.steps);
    CHECK(isfinite(all.es.loss) && all_finite(all.s.params, all.s.np) && all_finite(all.s.buffers, all.s.nb),
          "%s: state after the epoch is not finite", tag);
    CHECK(memcmp(all.s.params, over.s.params, all.s.np * sizeof(float)) != 0, "%s: no training after the skip", tag);
    state_free(&before.s); state_free(&over.s); state_free(&all.s);
}

int main(void) {
    (void)check_close;   // kdtest.h's tolerance check: every comparison here is bitwise
    float x[NS * F];
    int64_t y[NS];
    kdt_fill(x, NS * F, 5);
    for (int i = 0; i < NS; i++) y[i] = i % 2;

    // Non-finite loss: the poisoned sample's features add up past FLT_MAX in fc1.
    float xl[NS * F];
    memcpy(xl, x, sizeof x);
    xl[POISON * F] = 3e38f; xl[POISON * F + 1] = 3e38f;
    check_policy("loss, SGD + BN", true, CRAFT_SUM, KD_OPTIM_SGD, "cross-entropy", xl, y);

    // Non-finite gradient with a finite loss (see craft_weights); no BN, whose normalisation
    // would bound the upstream gradient.
    float xg[NS * F];
    memcpy(xg, x, sizeof x);
    for (int i = 0; i < NS; i++) xg[i * F] = 0.0f;   // feature 0 is zero except in the poisoned sample
    xg[POISON * F] = 3e38f;
    check_policy("gradient, Adam", false, CRAFT_GRAD, KD_OPTIM_ADAM, "gradient or BN statistics", xg, y);

    // The policy value is checked.
    struct kd_net * net = build(false);
    struct kd_optim * opt = kd_optim_new(net, &(struct kd_optim_cfg){ .kind = KD_OPTIM_SGD, .lr = 0.1f });
    struct kd_dataset ds = { .x = x, .x_dtype = KD_F32, .y = y, .n = NS, .c = F, .h = 1, .w = 1, .scale = 1.0f };
    struct kd_train_cfg cfg = kd_train_cfg_default();
    cfg.nonfinite = (enum kd_nonfinite)7;
    CHECK(kd_train_epoch(net, opt, &ds, &cfg, 0, NULL) == KD_ERR_VALUE && strstr(kd_last_error(), "nonfinite (7)"),
          "a bad nonfinite policy is refused: %s", kd_last_error());
    kd_optim_free(opt);
    kd_net_free(net);
    return kdt_finish();
}
