// Training, distillation and evaluation loops. One call runs a whole epoch (or max_steps
// steps) so that Python is entered only every `callback_every` steps, for progress and
// Ctrl-C. Every scheme shares the same batch pipeline (struct loop below): seeded shuffle,
// batch assembly with augmentation, the learning-rate schedule, the progress callback and
// the non-finite checks; the schemes differ only in how a step turns logits into gradients.
#include "kd_internal.h"

struct kd_train_cfg kd_train_cfg_default(void) {
    struct kd_train_cfg c;
    memset(&c, 0, sizeof c);
    c.batch_size = 128;
    c.shuffle = true;
    c.sched.kind = KD_SCHED_CONSTANT;
    c.sched.base_lr = 0.1f;
    c.sched.gamma = 0.1f;
    return c;
}

struct kd_distill_cfg kd_distill_cfg_default(void) {
    struct kd_distill_cfg d;
    memset(&d, 0, sizeof d);
    d.kind = KD_DISTILL_KD;
    d.T = 4.0f;
    d.ce_weight = 0.1f;
    d.kd_weight = 0.9f;
    d.dkd_alpha = 1.0f;
    d.dkd_beta = 8.0f;
    d.multi = KD_MULTI_AVG_PROB;
    d.teacher_mode = KD_MODE_EVAL;
    d.tolerant_k = 5;
    return d;
}

static int argmax_row(const float * z, int V) {
    int best = 0;
    for (int k = 1; k < V; k++) if (z[k] > z[best]) best = k;
    return best;
}

static int64_t count_correct(const float * z, const int64_t * y, int nb, int V) {
    int64_t c = 0;
    for (int i = 0; i < nb; i++) c += argmax_row(z + (size_t)i * V, V) == y[i];
    return c;
}

static int num_outputs(const struct kd_net * net) {
    int c, h, w;
    kd_net_node_shape(net, -1, &c, &h, &w);
    return c * h * w;
}

// ---------------------------------------------------------------------------------------
// Non-finite steps.
//
// Under KD_NONFINITE_SKIP a step whose loss or gradient is not finite is dropped and must
// leave no trace. Parameters, optimizer state and learned gates are only written after every
// check has passed, so they need nothing. BN running statistics are different: a
// training-mode forward updates them as it goes. Copying each trained net's buffer block
// (two floats per BN channel) and its per-layer batch counters before the forwards, and back
// on a skip, is the cheapest correct design: the copy is tiny next to one forward pass, only
// skip mode pays for it, and the kernels and the forward API stay as they are (deferring the
// update instead would need a second pass over the batch statistics or a new forward mode).
struct bn_saved {
    struct kd_net * net;
    float * buf;              // copy of kd_net_buffers
    int64_t * batches;        // num_batches_tracked per node (non-BN entries unused)
    size_t n_buf;
    int n_nodes;
};

static void bn_save(struct bn_saved * b) {
    memcpy(b->buf, kd_net_buffers(b->net), b->n_buf * sizeof(float));
    for (int i = 0; i < b->n_nodes; i++)
        if (kd_net_node_spec(b->net, i)->type == KD_LAYER_BATCHNORM) b->batches[i] = *kd_net_bn_batches(b->net, i);
}

static void bn_restore(const struct bn_saved * b) {
    memcpy(kd_net_buffers(b->net), b->buf, b->n_buf * sizeof(float));
    for (int i = 0; i < b->n_nodes; i++)
        if (kd_net_node_spec(b->net, i)->type == KD_LAYER_BATCHNORM) *kd_net_bn_batches(b->net, i) = b->batches[i];
}

// True when every float is finite. Tests the exponent bits, so fast-math compiler flags
// cannot fold it away, and the flag is an OR: the result does not depend on the threads.
static bool all_finite(const float * x, size_t n) {
    unsigned bad = 0;
    #pragma omp parallel for schedule(static) reduction(|:bad) if (n > 65536)
    for (size_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, &x[i], sizeof u);
        bad |= (u & 0x7F800000u) == 0x7F800000u;
    }
    return !bad;
}

// A finite loss can still give Inf gradients (a large activation times a finite upstream
// gradient), so the gradient block is checked before every optimizer step. So are the BN
// running statistics: batch statistics are computed in double and normalise huge
// activations back to a finite output, but the running variance stored in float can
// overflow, and would poison every later eval-mode forward.
static bool grads_and_stats_finite(struct kd_net * net) {
    return all_finite(kd_net_grads(net), kd_net_num_params(net)) &&
           all_finite(kd_net_buffers(net), kd_net_num_buffers(net));
}

// ---------------------------------------------------------------------------------------
// The shared batch pipeline.

struct loop {
    const char * fn;          // the public epoch function, for error messages
    const struct kd_dataset * ds;
    const struct kd_train_cfg * cfg;
    int epoch, B;
    int64_t steps, steps_per_epoch, step;
    uint64_t eseed, sseed;
    int64_t * perm;
    float * x;                // the batch, (B, c, h, w)
    float * xs;               // the student's copy when it gets input noise
    int64_t * y;
    const int64_t * idx;      // sample indices of the current batch
    int nb;
    float lr;
    struct kd_progress pr;
    int64_t skipped;          // steps dropped under KD_NONFINITE_SKIP
    struct bn_saved * saved;  // skip mode: BN state of the nets trained in BN_BATCH mode
    int n_saved;
};

static void loop_free(struct loop * L) {
    for (int i = 0; i < L->n_saved; i++) { free(L->saved[i].buf); free(L->saved[i].batches); }
    free(L->saved);
    free(L->perm); free(L->x); free(L->xs); free(L->y);
}

static enum kd_status loop_init(struct loop * L, const char * fn, const struct kd_dataset * ds,
                                const struct kd_train_cfg * cfg, int epoch, bool noisy_copy) {
    memset(L, 0, sizeof *L);
    L->fn = fn;
    if (!ds || !cfg) KD_FAIL(KD_ERR_VALUE, "dataset and config must not be NULL");
    if (cfg->batch_size < 1) KD_FAIL(KD_ERR_VALUE, "batch_size (%d) must be >= 1", cfg->batch_size);
    if (!ds->y) KD_FAIL(KD_ERR_VALUE, "training needs labels");
    if (cfg->aug.crop_padding < 0 || !(cfg->aug.noise_std >= 0))
        KD_FAIL(KD_ERR_VALUE, "augmentation crop_padding and noise_std must be >= 0");
    if (cfg->nonfinite != KD_NONFINITE_RAISE && cfg->nonfinite != KD_NONFINITE_SKIP)
        KD_FAIL(KD_ERR_VALUE, "nonfinite (%d) must be KD_NONFINITE_RAISE or KD_NONFINITE_SKIP", (int)cfg->nonfinite);
    KD_TRY(kd_dataset_check(ds));
    L->ds = ds;
    L->cfg = cfg;
    L->epoch = epoch;
    L->B = cfg->batch_size < ds->n ? cfg->batch_size : ds->n;
    const int B = cfg->batch_size;
    L->steps_per_epoch = cfg->drop_last ? ds->n / B : (ds->n + B - 1) / B;
    if (L->steps_per_epoch == 0)
        KD_FAIL(KD_ERR_VALUE, "dataset of %d samples has no full batch of %d (drop_last)", ds->n, B);
    L->steps = L->steps_per_epoch;
    if (cfg->max_steps > 0 && cfg->max_steps < L->steps) L->steps = cfg->max_steps;
    size_t per = (size_t)ds->c * ds->h * ds->w, nx;
    if (!kd_mul_ok(per, (size_t)L->B, &nx)) KD_FAIL(KD_ERR_VALUE, "batch_size %d is too large", B);
    L->x = malloc(nx * sizeof(float));
    L->xs = noisy_copy ? malloc(nx * sizeof(float)) : NULL;
    L->y = malloc((size_t)L->B * sizeof(int64_t));
    L->perm = malloc((size_t)ds->n * sizeof(int64_t));
    if (!L->x || !L->y || !L->perm || (noisy_copy && !L->xs)) {
        loop_free(L);
        KD_FAIL(KD_ERR_NOMEM, "cannot allocate a batch of %d", B);
    }
    L->eseed = kd_hash(cfg->seed, (uint64_t)epoch);
    if (cfg->shuffle) kd_data_shuffle(L->perm, ds->n, L->eseed);
    else for (int64_t i = 0; i < ds->n; i++) L->perm[i] = i;
    L->pr.epoch = epoch;
    L->pr.steps_total = (int)L->steps;
    return KD_OK;
}

// Assembles batch L->step: x (augmented), y, idx, nb, lr.
static void loop_batch(struct loop * L) {
    const int64_t start = L->step * L->cfg->batch_size;
    L->nb = (int)(L->ds->n - start < L->cfg->batch_size ? L->ds->n - start : L->cfg->batch_size);
    L->idx = L->perm + start;
    L->sseed = kd_hash(L->eseed, (uint64_t)L->step);
    kd_data_batch(L->x, L->ds, L->idx, L->nb, &L->cfg->aug, L->sseed);
    for (int i = 0; i < L->nb; i++) L->y[i] = L->ds->y[L->idx[i]];
    L->lr = kd_schedule_lr(&L->cfg->sched, L->epoch, (int)L->step, (int)L->steps_per_epoch);
}

// The student's input: the batch itself, or a copy with Gaussian noise (eq. 7's student
// perturbation; the teacher keeps the clean batch).
static const float * loop_student_input(struct loop * L, float noise) {
    if (!(noise > 0)) return L->x;
    size_t n = (size_t)L->nb * L->ds->c * L->ds->h * L->ds->w;
    uint64_t seed = L->sseed ^ 0x4E015Eull;
    #pragma omp parallel for schedule(static) if (n > 65536)
    for (size_t i = 0; i < n; i++) L->xs[i] = L->x[i] + noise * kd_normal(seed, i);
    return L->xs;
}

// After a completed step: progress callback (every callback_every steps and at the end).
static enum kd_status loop_after_step(struct loop * L, double loss_sum, int64_t correct, int64_t seen) {
    L->step++;
    const struct kd_train_cfg * cfg = L->cfg;
    if (!cfg->callback) return KD_OK;
    if (!((cfg->callback_every > 0 && L->step % cfg->callback_every == 0) || L->step == L->steps)) return KD_OK;
    L->pr.step = (int)L->step;
    L->pr.loss_sum = loss_sum;
    L->pr.correct = correct;
    L->pr.seen = seen;
    L->pr.lr = L->lr;
    if (cfg->callback(cfg->callback_ctx, &L->pr))
        KD_FAIL(KD_ERR_INTERRUPTED, "interrupted after step %lld of epoch %d", (long long)L->step, L->epoch);
    return KD_OK;
}

// Forwards that backward follows are lean (KD_MODE_LEAN): the loops read only outputs and
// exit heads, never an output a ReLU may overwrite.
static enum kd_status forward_train(struct kd_net * net, struct loop * L, const float * x, unsigned mode,
                                    uint64_t salt) {
    if (!(mode & KD_MODE_NO_GRAD)) mode |= KD_MODE_LEAN;
    return kd_net_forward(net, x, L->nb, L->ds->c, L->ds->h, L->ds->w, mode, L->sseed ^ salt);
}

// Under KD_NONFINITE_RAISE: the error, naming the term, the network, the epoch and the step.
// Under KD_NONFINITE_SKIP: KD_OK, and the caller drops the step (NONFINITE_STEP below).
static enum kd_status nonfinite(const char * what, const char * who, const struct loop * L) {
    if (L->cfg->nonfinite == KD_NONFINITE_SKIP) return KD_OK;
    return kd_set_error_(KD_ERR_NONFINITE, L->fn, "%s of the %s is not finite at epoch %d, step %lld", what, who,
                         L->epoch, (long long)L->step);
}

// Inside a loop body with `st`, `L`, and the labels `done` (return) and `skip` (drop the step).
#define NONFINITE_STEP(what, who) \
    do { if ((st = nonfinite((what), (who), &L)) != KD_OK) goto done; goto skip; } while (0)

// Skip mode: the nets whose BN statistics a step's forwards update (trained in BN_BATCH
// mode), saved before every step and restored when it is dropped. Nothing in raise mode.
static enum kd_status loop_guard_bn(struct loop * L, struct kd_net * const * nets, int n) {
    if (L->cfg->nonfinite != KD_NONFINITE_SKIP || n == 0) return KD_OK;
    L->saved = calloc((size_t)n, sizeof *L->saved);
    if (!L->saved) KD_FAIL(KD_ERR_NOMEM, "cannot allocate the BN snapshots");
    for (int i = 0; i < n; i++) {
        struct bn_saved * b = &L->saved[L->n_saved++];
        b->net = nets[i];
        b->n_buf = kd_net_num_buffers(nets[i]);
        b->n_nodes = kd_net_num_nodes(nets[i]);
        b->buf = malloc((b->n_buf + 1) * sizeof(float));
        b->batches = malloc(((size_t)b->n_nodes + 1) * sizeof(int64_t));
        if (!b->buf || !b->batches) KD_FAIL(KD_ERR_NOMEM, "cannot allocate the BN snapshots");
    }
    return KD_OK;
}

static void loop_save_bn(struct loop * L) { for (int i = 0; i < L->n_saved; i++) bn_save(&L->saved[i]); }

// A dropped step: BN statistics back as they were; nothing else was written.
static void loop_skip(struct loop * L) {
    for (int i = 0; i < L->n_saved; i++) bn_restore(&L->saved[i]);
    L->skipped++;
}

static enum kd_status backward(struct kd_net * net, const float * dlogits) {
    kd_net_zero_grad(net);
    return kd_net_backward(net, dlogits, NULL);
}

// Checks that every net outputs V values and the labels fit.
static enum kd_status check_outputs(struct kd_net * net, const char * who, const struct kd_dataset * ds,
                                    int B, int * V) {
    KD_TRY(kd_net_plan(net, B, ds->c, ds->h, ds->w));
    int v = num_outputs(net);
    if (*V == 0) *V = v;
    if (v != *V) KD_FAIL(KD_ERR_SHAPE, "the %s outputs %d values but the student outputs %d", who, v, *V);
    if (ds->num_classes > 0 && ds->num_classes != v)
        KD_FAIL(KD_ERR_SHAPE, "the dataset has %d classes but the %s outputs %d values", ds->num_classes, who, v);
    return KD_OK;
}

// ---------------------------------------------------------------------------------------
// Offline distillation (and plain training as its special case).

static enum kd_status check_distill_cfg(const struct kd_distill_cfg * d, int n_teachers) {
    if ((unsigned)d->kind > KD_DISTILL_MSE) KD_FAIL(KD_ERR_VALUE, "unknown distillation kind %d", (int)d->kind);
    if (!(d->T > 0) || !isfinite(d->T)) KD_FAIL(KD_ERR_VALUE, "T (%g) must be > 0", d->T);
    if (!(d->ce_weight >= 0) || !(d->kd_weight >= 0) || !isfinite(d->ce_weight) || !isfinite(d->kd_weight))
        KD_FAIL(KD_ERR_VALUE, "ce_weight (%g) and kd_weight (%g) must be finite and >= 0", d->ce_weight, d->kd_weight);
    if (!isfinite(d->dkd_alpha) || !isfinite(d->dkd_beta) || d->dkd_alpha < 0 || d->dkd_beta < 0)
        KD_FAIL(KD_ERR_VALUE, "dkd_alpha and dkd_beta must be finite and >= 0");
    if (!(d->teacher_drop >= 0 && d->teacher_drop < 1)) KD_FAIL(KD_ERR_VALUE, "teacher_drop (%g) must be in [0, 1)", d->teacher_drop);
    if (!(d->student_noise >= 0) || !isfinite(d->student_noise)) KD_FAIL(KD_ERR_VALUE, "student_noise must be >= 0");
    if (d->teacher_mode > KD_MODE_TRAIN) KD_FAIL(KD_ERR_VALUE, "teacher_mode must be a kd_mode");
    if (d->warmup_epochs < 0 || d->kd_stop_epoch < 0) KD_FAIL(KD_ERR_VALUE, "warmup_epochs and kd_stop_epoch must be >= 0");
    if (d->tolerant_weight != 0 && (d->tolerant_k < 2 || !isfinite(d->tolerant_weight)))
        KD_FAIL(KD_ERR_VALUE, "tolerant_k (%d) must be >= 2", d->tolerant_k);
    if (d->kind != KD_DISTILL_NONE && n_teachers < 1) KD_FAIL(KD_ERR_VALUE, "distillation needs at least one teacher");
    if (d->kind == KD_DISTILL_NONE && d->conditional) KD_FAIL(KD_ERR_VALUE, "conditional needs a distillation kind");
    if (d->gate_logits) {
        if (!(d->gate_lr >= 0) || !isfinite(d->gate_lr)) KD_FAIL(KD_ERR_VALUE, "gate_lr (%g) must be >= 0", d->gate_lr);
        if (d->multi != KD_MULTI_AVG_PROB || d->kind != KD_DISTILL_KD)
            KD_FAIL(KD_ERR_VALUE, "learned gates need KD with multi = AVG_PROB");
        for (int t = 0; t < n_teachers; t++)
            if (!isfinite(d->gate_logits[t])) KD_FAIL(KD_ERR_VALUE, "gate_logits[%d] is not finite", t);
    }
    if (d->teacher_weights) {
        for (int t = 0; t < n_teachers; t++)
            if (!(d->teacher_weights[t] >= 0) || !isfinite(d->teacher_weights[t]))
                KD_FAIL(KD_ERR_VALUE, "teacher_weights[%d] (%g) must be finite and >= 0", t, d->teacher_weights[t]);
    }
    return KD_OK;
}

// Learned gates of eq. 24: with q = sum_t g_t P_t (P_t = softmax(z_t/T)) and the loss
// L = kdw T^2 mean_i w_i KL(q_i || p_s,i), dL/dq = kdw T^2 w_i (log q - log p_s + 1) / N,
// dL/dg_t = <dL/dq, P_t>, and through g = softmax(gates): dL/dgate_t = g_t (G_t - sum_s g_s G_s).
// One plain SGD step per training step. Dropped teachers (g_t = 0) get no update.
static void update_gates(float * gates, const float * g, int n, const float * tz, size_t BV, const float * q,
                         const float * zs, const float * wk, int nb, int V, float T, float kdw, float lr,
                         float * P, float * lps) {
    kd_softmax_t(lps, zs, nb, V, T);
    double G[64], gsum = 0;
    for (int t = 0; t < n; t++) {
        G[t] = 0;
        if (g[t] == 0) continue;
        kd_softmax_t(P, tz + (size_t)t * BV, nb, V, T);
        for (int i = 0; i < nb; i++) {
            double wi = wk ? wk[i] : 1.0;
            for (int k = 0; k < V; k++) {
                size_t j = (size_t)i * V + k;
                if (q[j] <= 0 || lps[j] <= 0) continue;
                G[t] += wi * (log((double)q[j]) - log((double)lps[j]) + 1.0) * P[j];
            }
        }
        G[t] *= (double)kdw * T * T / nb;
    }
    for (int t = 0; t < n; t++) gsum += g[t] * G[t];
    for (int t = 0; t < n; t++)
        if (g[t] > 0) gates[t] -= (float)(lr * g[t] * (G[t] - gsum));
}

enum kd_status kd_distill_epoch(struct kd_net * student, struct kd_optim * opt,
                                struct kd_net * const * teachers, const float * const * teacher_logits,
                                int n_teachers, const struct kd_dataset * ds,
                                const struct kd_train_cfg * cfg, const struct kd_distill_cfg * dcfg,
                                int epoch, struct kd_distill_stats * out) {
    if (!student || !opt || !dcfg) KD_FAIL(KD_ERR_VALUE, "student, optimizer and distillation config must not be NULL");
    if (n_teachers < 0 || n_teachers > 64) KD_FAIL(KD_ERR_VALUE, "n_teachers (%d) must be in [0, 64]", n_teachers);
    KD_TRY(check_distill_cfg(dcfg, n_teachers));
    if (n_teachers > 0 && !teachers == !teacher_logits)
        KD_FAIL(KD_ERR_VALUE, "pass either teacher nets or cached teacher logits");
    if (teacher_logits && cfg && (cfg->aug.crop_padding > 0 || cfg->aug.hflip || cfg->aug.noise_std > 0))
        KD_FAIL(KD_ERR_VALUE, "cached teacher logits cannot follow augmented inputs; pass the teacher nets");
    struct loop L;
    KD_TRY(loop_init(&L, __func__, ds, cfg, epoch, dcfg->student_noise > 0));
    enum kd_status st = KD_OK;
    int V = 0;
    float * buf = NULL;
    double s_loss = 0, s_ce = 0, s_kd = 0, s_tc = 0, s_nc = 0, s_tol = 0;
    int64_t correct = 0, t_correct = 0, seen = 0;
    const char * who = n_teachers ? "student" : "model";   // plain training has no student
    if ((st = check_outputs(student, who, ds, L.B, &V)) != KD_OK) goto done;
    for (int t = 0; t < n_teachers && teachers; t++)
        if ((st = check_outputs(teachers[t], "teacher", ds, L.B, &V)) != KD_OK) goto done;
    // Scratch: student gradient, per-teacher logits, mixture targets, per-sample weights.
    const size_t BV = (size_t)L.B * V;
    buf = malloc((BV * (size_t)(4 + n_teachers) + 3 * (size_t)L.B) * sizeof(float));
    if (!buf) { st = kd_set_error_(KD_ERR_NOMEM, __func__, "cannot allocate distillation buffers"); goto done; }
    float * dlogits = buf, * tz = buf + BV, * q = tz + BV * (size_t)n_teachers, * tmp = q + BV;
    float * tmp2 = tmp + BV, * w_kd = tmp2 + BV, * w_ce = w_kd + L.B;
    {
        // Teachers forwarded with BN_BATCH update their statistics too.
        struct kd_net * trained[65] = { student };
        int n_trained = 1;
        for (int t = 0; t < n_teachers && teachers && (dcfg->teacher_mode & KD_MODE_BN_BATCH); t++)
            trained[n_trained++] = teachers[t];
        if ((st = loop_guard_bn(&L, trained, n_trained)) != KD_OK) goto done;
    }

    // Effective distillation weight this epoch: DKD-style linear warm-up, ESKD-style stop.
    float kdw = dcfg->kd_weight;
    if (dcfg->warmup_epochs > 0 && epoch + 1 < dcfg->warmup_epochs) kdw *= (float)(epoch + 1) / dcfg->warmup_epochs;
    if (dcfg->kd_stop_epoch > 0 && epoch >= dcfg->kd_stop_epoch) kdw = 0.0f;
    const bool distill = dcfg->kind != KD_DISTILL_NONE && n_teachers > 0;

    float gw[64];
    while (L.step < L.steps) {
        loop_batch(&L);
        loop_save_bn(&L);
        const int nb = L.nb;
        const size_t nbv = (size_t)nb * V;
        int64_t step_t_correct = 0;
        bool gate_step = false;
        // Teacher logits for this batch (clean inputs).
        for (int t = 0; t < n_teachers && distill; t++) {
            float * zt = tz + (size_t)t * BV;
            if (teacher_logits) {
                for (int i = 0; i < nb; i++)
                    memcpy(zt + (size_t)i * V, teacher_logits[t] + (size_t)L.idx[i] * V, (size_t)V * sizeof(float));
            } else {
                if ((st = forward_train(teachers[t], &L, L.x, dcfg->teacher_mode | KD_MODE_NO_GRAD, 0x7EAC0ull + (uint64_t)t)) != KD_OK) goto done;
                memcpy(zt, kd_net_output(teachers[t], -1), nbv * sizeof(float));
            }
        }
        // Teacher weights for this step: learned (softmax of the gates), given or uniform, with
        // DGKD's random drop.
        float base_w[64];
        if (dcfg->gate_logits) {
            double mx = -INFINITY, sum = 0;
            for (int t = 0; t < n_teachers; t++) mx = fmax(mx, dcfg->gate_logits[t]);
            for (int t = 0; t < n_teachers; t++) sum += exp(dcfg->gate_logits[t] - mx);
            for (int t = 0; t < n_teachers; t++) base_w[t] = (float)(exp(dcfg->gate_logits[t] - mx) / sum);
        } else {
            for (int t = 0; t < n_teachers; t++) base_w[t] = dcfg->teacher_weights ? dcfg->teacher_weights[t] : 1.0f;
        }
        int kept = 0;
        for (int t = 0; t < n_teachers; t++) {
            bool drop = dcfg->teacher_drop > 0 && kd_uniform(kd_hash(L.sseed ^ 0xD509ull, (uint64_t)t)) < dcfg->teacher_drop;
            gw[t] = drop ? 0.0f : base_w[t];
            kept += !drop;
        }
        if (n_teachers > 0 && kept == 0) {   // keep one, chosen from the step's seed
            int t = (int)(kd_hash(L.sseed, 0xD50ull) % (uint64_t)n_teachers);
            gw[t] = base_w[t];
        }
        double gsum = 0;
        for (int t = 0; t < n_teachers; t++) gsum += gw[t];
        for (int t = 0; t < n_teachers; t++) gw[t] = gsum > 0 ? (float)(gw[t] / gsum) : 0.0f;

        // The "teacher" for accuracy and conditional learning: the first teacher, or for
        // several the gw-weighted mixture of their softmax outputs (T = 1).
        const float * zref = NULL;
        if (distill) {
            if (n_teachers == 1) zref = tz;
            else {
                memset(q, 0, nbv * sizeof(float));
                for (int t = 0; t < n_teachers; t++) {
                    if (gw[t] == 0) continue;
                    kd_softmax_t(tmp, tz + (size_t)t * BV, nb, V, 1.0f);
                    for (size_t j = 0; j < nbv; j++) q[j] += gw[t] * tmp[j];
                }
                zref = q;
            }
            step_t_correct = count_correct(zref, L.y, nb, V);
        }
        // Per-sample weights of the two terms.
        // Conditional learning: where the teacher is wrong, the KD term's weight moves to CE.
        const bool cond = distill && dcfg->conditional;
        for (int i = 0; cond && i < nb; i++) {
            bool right = argmax_row(zref + (size_t)i * V, V) == L.y[i];
            w_kd[i] = right ? 1.0f : 0.0f;
            w_ce[i] = right ? dcfg->ce_weight : dcfg->ce_weight + kdw;
        }

        const float * xs = loop_student_input(&L, dcfg->student_noise);
        if ((st = forward_train(student, &L, xs, KD_MODE_TRAIN, 0x57D0ull)) != KD_OK) goto done;
        const float * zs = kd_net_output(student, -1);
        float ce = 0, kd = 0, tc = 0, nc = 0, tol = 0;
        // ce_term: the CE contribution to the loss, weights included.
        st = kd_cross_entropy(&ce, dlogits, zs, L.y, cond ? w_ce : NULL, nb, V, cfg->label_smoothing,
                              cond ? 1.0f : dcfg->ce_weight, false);
        const double ce_term = cond ? (double)ce : (double)dcfg->ce_weight * ce;
        if (st == KD_ERR_NONFINITE || !isfinite(ce)) NONFINITE_STEP("cross-entropy", who);
        if (st != KD_OK) goto done;
        // The logged CE is the plain batch mean, whatever the per-sample weights.
        if (cond && (st = kd_cross_entropy(&ce, NULL, zs, L.y, NULL, nb, V, cfg->label_smoothing, 1.0f, false)) != KD_OK) goto done;
        if (distill && kdw > 0) {
            const float * wk = cond ? w_kd : NULL;
            if (dcfg->kind == KD_DISTILL_KD && n_teachers > 1 && dcfg->multi == KD_MULTI_AVG_PROB) {
                // One KD term against the mixture of softened teacher distributions.
                memset(q, 0, nbv * sizeof(float));
                for (int t = 0; t < n_teachers; t++) {
                    if (gw[t] == 0) continue;
                    kd_softmax_t(tmp, tz + (size_t)t * BV, nb, V, dcfg->T);
                    for (size_t j = 0; j < nbv; j++) q[j] += gw[t] * tmp[j];
                }
                st = kd_loss_soft(&kd, dlogits, zs, q, wk, nb, V, dcfg->T, kdw, true);
                // The gates move after every check of the step has passed (a dropped step
                // leaves them as they were); they are first read again by the next step.
                gate_step = dcfg->gate_logits && dcfg->gate_lr > 0;
            } else {
                for (int t = 0; t < n_teachers && st == KD_OK; t++) {
                    if (gw[t] == 0) continue;
                    const float * zt = tz + (size_t)t * BV;
                    float l = 0, a = 0, b = 0;
                    switch (dcfg->kind) {
                    case KD_DISTILL_KD:
                        st = kd_loss_kd(&l, dlogits, NULL, zs, zt, wk, nb, V, dcfg->T, kdw * gw[t], true);
                        break;
                    case KD_DISTILL_DKD:
                        st = kd_loss_dkd(&a, &b, dlogits, zs, zt, L.y, nb, V, dcfg->T, dcfg->dkd_alpha,
                                         dcfg->dkd_beta, kdw * gw[t], true);
                        l = dcfg->dkd_alpha * a + dcfg->dkd_beta * b;
                        tc += gw[t] * a;
                        nc += gw[t] * b;
                        break;
                    case KD_DISTILL_MSE:
                        st = kd_loss_mse(&l, dlogits, zs, zt, nb, V, kdw * gw[t], true);
                        break;
                    case KD_DISTILL_NONE:
                        break;
                    }
                    kd += gw[t] * l;
                }
            }
            if (st == KD_ERR_NONFINITE || !isfinite(kd)) NONFINITE_STEP("distillation loss", who);
            if (st != KD_OK) goto done;
        }
        if (dcfg->tolerant_weight > 0) {
            st = kd_loss_tolerant(&tol, dlogits, zs, nb, V, dcfg->tolerant_k, dcfg->tolerant_weight, true);
            if (st == KD_ERR_NONFINITE || !isfinite(tol)) NONFINITE_STEP("tolerant loss", who);
            if (st != KD_OK) goto done;
        }
        if ((st = backward(student, dlogits)) != KD_OK) goto done;
        if (!grads_and_stats_finite(student)) NONFINITE_STEP("gradient or BN statistics", who);
        if (gate_step)
            update_gates(dcfg->gate_logits, gw, n_teachers, tz, BV, q, zs, cond ? w_kd : NULL, nb, V, dcfg->T, kdw,
                         dcfg->gate_lr, tmp, tmp2);
        if ((st = kd_optim_step(opt, L.lr)) != KD_OK) goto done;
        correct += count_correct(zs, L.y, nb, V);
        t_correct += step_t_correct;
        double total = ce_term + (double)kdw * kd + dcfg->tolerant_weight * (double)tol;
        s_loss += total * nb; s_ce += (double)ce * nb; s_kd += (double)kd * nb;
        s_tc += (double)tc * nb; s_nc += (double)nc * nb; s_tol += (double)tol * nb;
        seen += nb;
        goto stepped;
skip:
        loop_skip(&L);
stepped:
        if ((st = loop_after_step(&L, s_loss, correct, seen)) != KD_OK) goto done;
    }
done:
    if (out) {
        memset(out, 0, sizeof *out);
        double n = seen ? (double)seen : 1.0;
        out->loss = s_loss / n; out->ce = s_ce / n; out->kd = s_kd / n;
        out->tckd = s_tc / n; out->nckd = s_nc / n; out->tolerant = s_tol / n;
        out->accuracy = correct / n;
        out->teacher_accuracy = t_correct / n;
        out->samples = seen;
        out->steps = L.step;
        out->skipped_steps = L.skipped;
        out->lr = L.lr;
        out->kd_weight = dcfg->kd_weight;
        if (dcfg->warmup_epochs > 0 && epoch + 1 < dcfg->warmup_epochs) out->kd_weight *= (float)(epoch + 1) / dcfg->warmup_epochs;
        if (dcfg->kd_stop_epoch > 0 && epoch >= dcfg->kd_stop_epoch) out->kd_weight = 0;
    }
    free(buf);
    loop_free(&L);
    return st;
}

enum kd_status kd_train_epoch(struct kd_net * net, struct kd_optim * opt, const struct kd_dataset * ds,
                              const struct kd_train_cfg * cfg, int epoch, struct kd_epoch_stats * out) {
    struct kd_distill_cfg d = kd_distill_cfg_default();
    d.kind = KD_DISTILL_NONE;
    d.ce_weight = 1.0f;
    d.kd_weight = 0.0f;
    struct kd_distill_stats s;
    enum kd_status st = kd_distill_epoch(net, opt, NULL, NULL, 0, ds, cfg, &d, epoch, &s);
    if (out) {
        out->loss = s.loss;
        out->accuracy = s.accuracy;
        out->samples = s.samples;
        out->steps = s.steps;
        out->skipped_steps = s.skipped_steps;
        out->lr = s.lr;
    }
    return st;
}

// ---------------------------------------------------------------------------------------
// Deep mutual learning / online ensemble.

enum kd_status kd_mutual_epoch(struct kd_net * const * nets, struct kd_optim * const * opts, int k,
                               const struct kd_dataset * ds, const struct kd_train_cfg * cfg,
                               const struct kd_mutual_cfg * m, int epoch, struct kd_distill_stats * out) {
    if (!nets || !opts || !m) KD_FAIL(KD_ERR_VALUE, "nets, optimizers and config must not be NULL");
    if (k < 2 || k > 16) KD_FAIL(KD_ERR_VALUE, "mutual learning needs 2..16 peers, got %d", k);
    if (!(m->T > 0) || !isfinite(m->T)) KD_FAIL(KD_ERR_VALUE, "T (%g) must be > 0", m->T);
    if (!(m->ce_weight >= 0) || !(m->kd_weight >= 0)) KD_FAIL(KD_ERR_VALUE, "ce_weight and kd_weight must be >= 0");
    struct loop L;
    KD_TRY(loop_init(&L, __func__, ds, cfg, epoch, false));
    enum kd_status st = KD_OK;
    int V = 0;
    float * buf = NULL;
    double s_loss[16] = {0}, s_ce[16] = {0}, s_kd[16] = {0};
    int64_t correct[16] = {0}, e_correct = 0, seen = 0;
    for (int a = 0; a < k; a++)
        if ((st = check_outputs(nets[a], "peer", ds, L.B, &V)) != KD_OK) goto done;
    const size_t BV = (size_t)L.B * V;
    buf = malloc(BV * (size_t)(2 * k + 1) * sizeof(float));
    if (!buf) { st = kd_set_error_(KD_ERR_NOMEM, __func__, "cannot allocate buffers"); goto done; }
    float * z = buf, * d = buf + BV * (size_t)k, * ens = d + BV * (size_t)k;
    if ((st = loop_guard_bn(&L, nets, k)) != KD_OK) goto done;
    while (L.step < L.steps) {
        loop_batch(&L);
        loop_save_bn(&L);
        const int nb = L.nb;
        const size_t nbv = (size_t)nb * V;
        double step_ce[16], step_kd[16];
        // All peers see the batch before any updates: the targets are this step's outputs.
        for (int a = 0; a < k; a++) {
            if ((st = forward_train(nets[a], &L, L.x, KD_MODE_TRAIN, 0x9EE0ull + (uint64_t)a)) != KD_OK) goto done;
            memcpy(z + (size_t)a * BV, kd_net_output(nets[a], -1), nbv * sizeof(float));
        }
        memset(ens, 0, nbv * sizeof(float));
        for (int a = 0; a < k; a++)
            for (size_t j = 0; j < nbv; j++) ens[j] += z[(size_t)a * BV + j] / (float)k;
        // The peers learn from each other's outputs, so a non-finite term of one peer drops
        // the step for all of them: losses, backwards and checks first, then the updates.
        for (int a = 0; a < k; a++) {
            float * za = z + (size_t)a * BV, * da = d + (size_t)a * BV;
            float ce = 0, kd = 0;
            st = kd_cross_entropy(&ce, da, za, L.y, NULL, nb, V, cfg->label_smoothing, m->ce_weight, false);
            if (st != KD_OK && st != KD_ERR_NONFINITE) goto done;
            if (m->ensemble) {
                st = kd_loss_kd(&kd, da, NULL, za, ens, NULL, nb, V, m->T, m->kd_weight, true);
            } else {
                for (int b = 0; b < k && (st == KD_OK || st == KD_ERR_NONFINITE); b++) {
                    if (b == a) continue;
                    float l;
                    st = kd_loss_kd(&l, da, NULL, za, z + (size_t)b * BV, NULL, nb, V, m->T,
                                    m->kd_weight / (k - 1), true);
                    kd += l / (k - 1);
                }
            }
            if (st == KD_ERR_NONFINITE || !isfinite(ce) || !isfinite(kd)) NONFINITE_STEP("loss", "peer");
            if (st != KD_OK) goto done;
            step_ce[a] = ce;
            step_kd[a] = kd;
        }
        for (int a = 0; a < k; a++) {
            if ((st = backward(nets[a], d + (size_t)a * BV)) != KD_OK) goto done;
            if (!grads_and_stats_finite(nets[a])) NONFINITE_STEP("gradient or BN statistics", "peer");
        }
        for (int a = 0; a < k; a++)
            if ((st = kd_optim_step(opts[a], L.lr)) != KD_OK) goto done;
        for (int a = 0; a < k; a++) {
            s_ce[a] += step_ce[a] * nb;
            s_kd[a] += step_kd[a] * nb;
            s_loss[a] += ((double)m->ce_weight * step_ce[a] + (double)m->kd_weight * step_kd[a]) * nb;
            correct[a] += count_correct(z + (size_t)a * BV, L.y, nb, V);
        }
        e_correct += count_correct(ens, L.y, nb, V);
        seen += nb;
        goto stepped;
skip:
        loop_skip(&L);
stepped:
        if ((st = loop_after_step(&L, s_loss[0], correct[0], seen)) != KD_OK) goto done;
    }
done:
    if (out) {
        double n = seen ? (double)seen : 1.0;
        for (int a = 0; a < k; a++) {
            memset(&out[a], 0, sizeof out[a]);
            out[a].loss = s_loss[a] / n; out[a].ce = s_ce[a] / n; out[a].kd = s_kd[a] / n;
            out[a].accuracy = correct[a] / n;
            out[a].teacher_accuracy = e_correct / n;   // the peers' logit average
            out[a].samples = seen; out[a].steps = L.step; out[a].lr = L.lr; out[a].kd_weight = m->kd_weight;
            out[a].skipped_steps = L.skipped;
        }
    }
    free(buf);
    loop_free(&L);
    return st;
}

// ---------------------------------------------------------------------------------------
// SLKD

enum kd_status kd_slkd_epoch(struct kd_net * student, struct kd_optim * opt,
                             struct kd_net * const * sl, struct kd_optim * const * sl_opts,
                             struct kd_net * teacher, const float * teacher_logits,
                             const struct kd_dataset * ds, const struct kd_train_cfg * cfg,
                             const struct kd_slkd_cfg * c, int epoch, struct kd_slkd_stats * out) {
    if (!student || !opt || !sl || !c) KD_FAIL(KD_ERR_VALUE, "student, optimizer, SL-teachers and config must not be NULL");
    if (c->n_sl < 1 || c->n_sl > 2) KD_FAIL(KD_ERR_VALUE, "n_sl (%d) must be 1 or 2", c->n_sl);
    if (!c->sl_frozen && !sl_opts) KD_FAIL(KD_ERR_VALUE, "trainable SL-teachers need optimizers");
    if (!teacher == !teacher_logits) KD_FAIL(KD_ERR_VALUE, "pass either the teacher net or cached teacher logits");
    if (teacher_logits && cfg && (cfg->aug.crop_padding > 0 || cfg->aug.hflip || cfg->aug.noise_std > 0))
        KD_FAIL(KD_ERR_VALUE, "cached teacher logits cannot follow augmented inputs; pass the teacher net");
    if (!(c->T > 0) || !isfinite(c->T)) KD_FAIL(KD_ERR_VALUE, "T (%g) must be > 0", c->T);
    if (!(c->alpha >= 0 && c->alpha <= 1)) KD_FAIL(KD_ERR_VALUE, "alpha (%g) must be in [0, 1]", c->alpha);
    if (!(c->rho >= 0 && c->rho <= 1)) KD_FAIL(KD_ERR_VALUE, "rho (%g) must be in [0, 1]", c->rho);
    if (!(c->sl_lr_scale >= 0) || !isfinite(c->sl_lr_scale)) KD_FAIL(KD_ERR_VALUE, "sl_lr_scale must be >= 0");
    if (c->sl_grad && c->fuse_probs) KD_FAIL(KD_ERR_VALUE, "sl_grad is supported with logit fusion only");
    if (!(c->lambda >= 0) || !(c->eta >= 0) || !isfinite(c->lambda) || !isfinite(c->eta))
        KD_FAIL(KD_ERR_VALUE, "lambda (%g) and eta (%g) must be finite and >= 0", c->lambda, c->eta);
    struct loop L;
    KD_TRY(loop_init(&L, __func__, ds, cfg, epoch, false));
    enum kd_status st = KD_OK;
    int V = 0;
    float * buf = NULL;
    const int ns = c->n_sl;
    double s_loss = 0, s_ts = 0, s_slts = 0, s_sl[2] = {0};
    int64_t correct = 0, sl_correct[2] = {0}, t_correct = 0, seen = 0;
    if ((st = check_outputs(student, "student", ds, L.B, &V)) != KD_OK) goto done;
    if (teacher && (st = check_outputs(teacher, "teacher", ds, L.B, &V)) != KD_OK) goto done;
    for (int j = 0; j < ns; j++)
        if ((st = check_outputs(sl[j], "SL-teacher", ds, L.B, &V)) != KD_OK) goto done;
    const size_t BV = (size_t)L.B * V;
    buf = malloc(BV * 9 * sizeof(float));
    if (!buf) { st = kd_set_error_(KD_ERR_NOMEM, __func__, "cannot allocate buffers"); goto done; }
    float * zt = buf, * zsl = buf + BV, * q = buf + 2 * BV, * tmp = buf + 3 * BV, * ds_ = buf + 4 * BV;
    float * dsl_fused = buf + 5 * BV, * zj[2] = { buf + 6 * BV, buf + 7 * BV }, * dj = buf + 8 * BV;
    const float a = c->alpha;
    {
        struct kd_net * trained[3] = { student, sl[0], ns == 2 ? sl[1] : NULL };
        if ((st = loop_guard_bn(&L, trained, c->sl_frozen ? 1 : 1 + ns)) != KD_OK) goto done;
    }
    while (L.step < L.steps) {
        loop_batch(&L);
        loop_save_bn(&L);
        const int nb = L.nb;
        const size_t nbv = (size_t)nb * V;
        int64_t step_sl_correct[2] = {0};
        double step_sl[2] = {0};
        if (teacher_logits) {
            for (int i = 0; i < nb; i++)
                memcpy(zt + (size_t)i * V, teacher_logits + (size_t)L.idx[i] * V, (size_t)V * sizeof(float));
        } else {
            if ((st = forward_train(teacher, &L, L.x, KD_MODE_EVAL | KD_MODE_NO_GRAD, 0x7EAC0ull)) != KD_OK) goto done;
            memcpy(zt, kd_net_output(teacher, -1), nbv * sizeof(float));
        }
        const int64_t step_t_correct = count_correct(zt, L.y, nb, V);
        // SL-teachers: forward (this step's outputs feed the student before their update).
        unsigned slmode = c->sl_frozen ? KD_MODE_EVAL | KD_MODE_NO_GRAD : KD_MODE_TRAIN;   // frozen: never updated
        for (int j = 0; j < ns; j++) {
            if ((st = forward_train(sl[j], &L, L.x, slmode, 0x5100ull + (uint64_t)j)) != KD_OK) goto done;
            memcpy(zj[j], kd_net_output(sl[j], -1), nbv * sizeof(float));
            step_sl_correct[j] = count_correct(zj[j], L.y, nb, V);
        }
        // Fusion (eq. 6).
        const float rho = ns == 2 ? c->rho : 1.0f;
        if (!c->fuse_probs) {
            for (size_t i = 0; i < nbv; i++) zsl[i] = rho * zj[0][i] + (ns == 2 ? (1 - rho) * zj[1][i] : 0.0f);
        } else {
            kd_softmax_t(q, zj[0], nb, V, c->T);
            for (size_t i = 0; i < nbv; i++) q[i] *= rho;
            if (ns == 2) {
                kd_softmax_t(tmp, zj[1], nb, V, c->T);
                for (size_t i = 0; i < nbv; i++) q[i] += (1 - rho) * tmp[i];
            }
        }
        // Student (eqs. 1, 3, 7): the CE terms of L_TS and L_SLTS add up to (lambda + eta) alpha CE.
        if ((st = forward_train(student, &L, L.x, KD_MODE_TRAIN, 0x57D0ull)) != KD_OK) goto done;
        const float * zs = kd_net_output(student, -1);
        float ce = 0, kts = 0, kslts = 0;
        st = kd_cross_entropy(&ce, ds_, zs, L.y, NULL, nb, V, cfg->label_smoothing, (c->lambda + c->eta) * a, false);
        if (st == KD_OK)
            st = kd_loss_kd(&kts, ds_, NULL, zs, zt, NULL, nb, V, c->T, c->lambda * (1 - a), true);
        float * dfused = c->sl_grad && !c->sl_frozen && !c->fuse_probs ? dsl_fused : NULL;
        if (dfused) memset(dfused, 0, nbv * sizeof(float));   // kd_loss_kd accumulates into it
        if (st == KD_OK) {
            if (c->fuse_probs) st = kd_loss_soft(&kslts, ds_, zs, q, NULL, nb, V, c->T, c->eta * (1 - a), true);
            else st = kd_loss_kd(&kslts, ds_, dfused, zs, zsl, NULL, nb, V, c->T, c->eta * (1 - a), true);
        }
        if (st == KD_ERR_NONFINITE || !isfinite(ce) || !isfinite(kts) || !isfinite(kslts)) NONFINITE_STEP("loss", "student");
        if (st != KD_OK) goto done;
        // Every backward and check of the step before any update, so that a dropped step
        // leaves all the nets as they were (the nets are separate: the order of the updates
        // does not change their results).
        if ((st = backward(student, ds_)) != KD_OK) goto done;
        if (!grads_and_stats_finite(student)) NONFINITE_STEP("gradient or BN statistics", "student");
        // SL-teachers learn from the teacher only (eqs. 4-5), plus the student's pull when
        // sl_grad (the fused logits' gradient split by rho).
        for (int j = 0; j < ns && !c->sl_frozen; j++) {
            float cej = 0, kdj = 0;
            st = kd_cross_entropy(&cej, dj, zj[j], L.y, NULL, nb, V, cfg->label_smoothing, a, false);
            if (st == KD_OK) st = kd_loss_kd(&kdj, dj, NULL, zj[j], zt, NULL, nb, V, c->T, 1 - a, true);
            if (st == KD_ERR_NONFINITE || !isfinite(cej) || !isfinite(kdj)) NONFINITE_STEP("loss", "SL-teacher");
            if (st != KD_OK) goto done;
            if (dfused) {
                float share = j == 0 ? rho : 1 - rho;
                for (size_t i = 0; i < nbv; i++) dj[i] += share * dfused[i];
            }
            step_sl[j] = a * (double)cej + (1 - a) * (double)kdj;
            if ((st = backward(sl[j], dj)) != KD_OK) goto done;
            if (!grads_and_stats_finite(sl[j])) NONFINITE_STEP("gradient or BN statistics", "SL-teacher");
        }
        if ((st = kd_optim_step(opt, L.lr)) != KD_OK) goto done;
        for (int j = 0; j < ns && !c->sl_frozen; j++) {
            float lr_j = L.lr * (c->sl_lr_scale > 0 ? c->sl_lr_scale : 1.0f);
            if ((st = kd_optim_step(sl_opts[j], lr_j)) != KD_OK) goto done;
        }
        double l_ts = a * (double)ce + (1 - a) * (double)kts, l_slts = a * (double)ce + (1 - a) * (double)kslts;
        s_ts += l_ts * nb;
        s_slts += l_slts * nb;
        s_loss += (c->lambda * l_ts + c->eta * l_slts) * nb;
        correct += count_correct(zs, L.y, nb, V);
        t_correct += step_t_correct;
        for (int j = 0; j < ns; j++) {
            s_sl[j] += step_sl[j] * nb;
            sl_correct[j] += step_sl_correct[j];
        }
        seen += nb;
        goto stepped;
skip:
        loop_skip(&L);
stepped:
        if ((st = loop_after_step(&L, s_loss, correct, seen)) != KD_OK) goto done;
    }
done:
    if (out) {
        memset(out, 0, sizeof *out);
        double n = seen ? (double)seen : 1.0;
        out->loss = s_loss / n; out->loss_ts = s_ts / n; out->loss_slts = s_slts / n;
        out->loss_sl[0] = s_sl[0] / n; out->loss_sl[1] = s_sl[1] / n;
        out->accuracy = correct / n;
        out->sl_accuracy[0] = sl_correct[0] / n; out->sl_accuracy[1] = sl_correct[1] / n;
        out->teacher_accuracy = t_correct / n;
        out->samples = seen; out->steps = L.step; out->lr = L.lr;
        out->skipped_steps = L.skipped;
    }
    free(buf);
    loop_free(&L);
    return st;
}

// ---------------------------------------------------------------------------------------
// Evaluation

enum kd_status kd_evaluate(struct kd_net * net, const struct kd_dataset * ds, int batch_size,
                           float * logits, double * loss, double * accuracy) {
    if (!net || !ds) KD_FAIL(KD_ERR_VALUE, "net and dataset must not be NULL");
    if (batch_size < 1) KD_FAIL(KD_ERR_VALUE, "batch_size (%d) must be >= 1", batch_size);
    if ((loss || accuracy) && !ds->y) KD_FAIL(KD_ERR_VALUE, "loss and accuracy need labels");
    KD_TRY(kd_dataset_check(ds));
    const int B = batch_size < ds->n ? batch_size : ds->n;
    KD_TRY(kd_net_plan(net, B, ds->c, ds->h, ds->w));
    const int V = num_outputs(net);
    if (ds->y && ds->num_classes > 0 && ds->num_classes != V)
        KD_FAIL(KD_ERR_SHAPE, "the dataset has %d classes but the net outputs %d values", ds->num_classes, V);
    size_t per = (size_t)ds->c * ds->h * ds->w;
    float * x = malloc(per * (size_t)B * sizeof(float));
    int64_t * idx = malloc((size_t)B * sizeof(int64_t));
    if (!x || !idx) { free(x); free(idx); KD_FAIL(KD_ERR_NOMEM, "cannot allocate a batch of %d", B); }
    enum kd_status st = KD_OK;
    double loss_sum = 0;
    int64_t correct = 0;
    for (int64_t start = 0; start < ds->n; start += B) {
        const int nb = (int)(ds->n - start < B ? ds->n - start : B);
        for (int i = 0; i < nb; i++) idx[i] = start + i;
        kd_data_batch(x, ds, idx, nb, NULL, 0);
        st = kd_net_forward(net, x, nb, ds->c, ds->h, ds->w, KD_MODE_EVAL | KD_MODE_NO_GRAD, 0);
        if (st != KD_OK) break;
        const float * z = kd_net_output(net, -1);
        if (logits) memcpy(logits + (size_t)start * V, z, (size_t)nb * V * sizeof(float));
        if (ds->y && (loss || accuracy)) {
            float l;
            st = kd_cross_entropy(&l, NULL, z, ds->y + start, NULL, nb, V, 0.0f, 1.0f, false);
            if (st != KD_OK && st != KD_ERR_NONFINITE) break;
            st = KD_OK;   // a non-finite evaluation loss is reported as such, not as an error
            loss_sum += (double)l * nb;
            correct += count_correct(z, ds->y + start, nb, V);
        }
    }
    if (st == KD_OK) {
        if (loss) *loss = loss_sum / ds->n;
        if (accuracy) *accuracy = (double)correct / ds->n;
    }
    free(x);
    free(idx);
    return st;
}

// ---------------------------------------------------------------------------------------
// Multi-exit networks: deep supervision (self-distillation) and multi-exit KD (eq. 9).

enum kd_status kd_exits_epoch(struct kd_net * net, struct kd_optim * opt, const int * exits, int n_exits,
                              struct kd_net * teacher, const float * teacher_logits,
                              const struct kd_dataset * ds, const struct kd_train_cfg * cfg,
                              const struct kd_exits_cfg * e, int epoch, struct kd_distill_stats * out,
                              double * exit_accuracy) {
    if (!net || !opt || !e || !exits) KD_FAIL(KD_ERR_VALUE, "net, optimizer, exits and config must not be NULL");
    if (n_exits < 1 || n_exits > 16) KD_FAIL(KD_ERR_VALUE, "n_exits (%d) must be in [1, 16]", n_exits);
    if (teacher && teacher_logits) KD_FAIL(KD_ERR_VALUE, "pass the teacher net or its cached logits, not both");
    if (teacher_logits && cfg && (cfg->aug.crop_padding > 0 || cfg->aug.hflip || cfg->aug.noise_std > 0))
        KD_FAIL(KD_ERR_VALUE, "cached teacher logits cannot follow augmented inputs; pass the teacher net");
    if (!(e->T > 0) || !isfinite(e->T)) KD_FAIL(KD_ERR_VALUE, "T (%g) must be > 0", e->T);
    if (!(e->ce_weight >= 0) || !(e->kd_weight >= 0) || !isfinite(e->ce_weight) || !isfinite(e->kd_weight))
        KD_FAIL(KD_ERR_VALUE, "ce_weight and kd_weight must be finite and >= 0");
    const int outn = kd_net_output_node(net);
    for (int k = 0; k < n_exits; k++) {
        if (exits[k] < 0 || exits[k] >= kd_net_num_nodes(net)) KD_FAIL(KD_ERR_VALUE, "exit %d: node %d does not exist", k, exits[k]);
        for (int j = 0; j < k; j++) if (exits[j] == exits[k]) KD_FAIL(KD_ERR_VALUE, "exit node %d is listed twice", exits[k]);
    }
    struct loop L;
    KD_TRY(loop_init(&L, __func__, ds, cfg, epoch, false));
    enum kd_status st = KD_OK;
    int V = 0;
    float * buf = NULL;
    double s_loss = 0, s_ce = 0, s_kd = 0, acc[16] = {0};
    int64_t correct = 0, seen = 0;
    if ((st = check_outputs(net, "model", ds, L.B, &V)) != KD_OK) goto done;
    if (teacher && (st = check_outputs(teacher, "teacher", ds, L.B, &V)) != KD_OK) goto done;
    for (int k = 0; k < n_exits; k++) {
        int c, h, w;
        kd_net_node_shape(net, exits[k], &c, &h, &w);
        if (c * h * w != V) {
            st = kd_set_error_(KD_ERR_SHAPE, __func__, "exit %d (node %d) outputs %d values, the output exit %d",
                               k, exits[k], c * h * w, V);
            goto done;
        }
    }
    const bool self = !teacher && !teacher_logits;
    const size_t BV = (size_t)L.B * V;
    buf = malloc(BV * 3 * sizeof(float));
    if (!buf) { st = kd_set_error_(KD_ERR_NOMEM, __func__, "cannot allocate buffers"); goto done; }
    float * zt = buf, * d = buf + BV, * dout = buf + 2 * BV;
    if ((st = loop_guard_bn(&L, &net, 1)) != KD_OK) goto done;
    while (L.step < L.steps) {
        loop_batch(&L);
        loop_save_bn(&L);
        const int nb = L.nb;
        const size_t nbv = (size_t)nb * V;
        double step_ce = 0, step_kd = 0, step_acc[16];
        if (teacher_logits) {
            for (int i = 0; i < nb; i++)
                memcpy(zt + (size_t)i * V, teacher_logits + (size_t)L.idx[i] * V, (size_t)V * sizeof(float));
        } else if (teacher) {
            if ((st = forward_train(teacher, &L, L.x, KD_MODE_EVAL | KD_MODE_NO_GRAD, 0x7EAC0ull)) != KD_OK) goto done;
            memcpy(zt, kd_net_output(teacher, -1), nbv * sizeof(float));
        }
        if ((st = forward_train(net, &L, L.x, KD_MODE_TRAIN, 0x57D0ull)) != KD_OK) goto done;
        const float * zout = kd_net_output(net, -1);
        if (self) memcpy(zt, zout, nbv * sizeof(float));   // the deepest exit teaches (detached copy)
        // The output exit's gradient goes in through backward's dout; the others by injection.
        double step_loss = 0;
        bool out_listed = false;
        const float scale = self ? 1.0f : 1.0f / n_exits;
        memset(dout, 0, nbv * sizeof(float));
        for (int k = 0; k < n_exits; k++) {
            const float * zk = kd_net_output(net, exits[k]);
            const bool is_out = exits[k] == outn;
            out_listed |= is_out;
            float ce = 0, kd = 0;
            const float cw = self && is_out ? 1.0f : e->ce_weight;
            st = kd_cross_entropy(&ce, d, zk, L.y, NULL, nb, V, cfg->label_smoothing, cw * scale, false);
            if (st == KD_OK && !(self && is_out))
                st = kd_loss_kd(&kd, d, NULL, zk, zt, NULL, nb, V, e->T, e->kd_weight * scale, true);
            if (st == KD_ERR_NONFINITE || !isfinite(ce) || !isfinite(kd)) NONFINITE_STEP("loss", "exit");
            if (st != KD_OK) goto done;
            double lk = scale * ((double)cw * ce + (self && is_out ? 0.0 : (double)e->kd_weight * kd));
            step_loss += lk;
            if (is_out) { step_ce = ce; step_kd = kd; memcpy(dout, d, nbv * sizeof(float)); }
            else if ((st = kd_net_grad_add(net, exits[k], d, 1.0f)) != KD_OK) goto done;
            step_acc[k] = (double)count_correct(zk, L.y, nb, V);
        }
        if (!out_listed) { st = kd_set_error_(KD_ERR_VALUE, __func__, "the output node must be one of the exits"); goto done; }
        if ((st = backward(net, dout)) != KD_OK) goto done;   // the exits' injected gradients join here
        if (!grads_and_stats_finite(net)) NONFINITE_STEP("gradient or BN statistics", "model");
        if ((st = kd_optim_step(opt, L.lr)) != KD_OK) goto done;
        correct += count_correct(zout, L.y, nb, V);
        s_ce += step_ce * nb;
        s_kd += step_kd * nb;
        for (int k = 0; k < n_exits; k++) acc[k] += step_acc[k];
        s_loss += step_loss * nb;
        seen += nb;
        goto stepped;
skip:
        loop_skip(&L);
stepped:
        if ((st = loop_after_step(&L, s_loss, correct, seen)) != KD_OK) goto done;
    }
done:
    if (out) {
        memset(out, 0, sizeof *out);
        double n = seen ? (double)seen : 1.0;
        out->loss = s_loss / n; out->ce = s_ce / n; out->kd = s_kd / n;
        out->accuracy = correct / n;
        out->samples = seen; out->steps = L.step; out->lr = L.lr; out->kd_weight = e->kd_weight;
        out->skipped_steps = L.skipped;
    }
    if (exit_accuracy) for (int k = 0; k < n_exits; k++) exit_accuracy[k] = acc[k] / (seen ? (double)seen : 1.0);
    free(buf);
    loop_free(&L);
    return st;
}
