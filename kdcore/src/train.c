// The step engine (kd_step_epoch) and evaluation. One call runs a whole epoch (or max_steps
// steps) so that Python is entered only every `callback_every` steps, for progress and
// Ctrl-C. The batch pipeline (struct loop): seeded shuffle, batch assembly with
// augmentation, the learning-rate schedule, the progress callback and the non-finite policy.
// The engine: forwards of the step's nets, loss terms, backwards, checks, updates. Every
// scheme (schemes.c) is a configuration of it.
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

static int64_t count_correct(const float * z, const int64_t * y, int nb, int V) {
    int64_t c = 0;
    for (int i = 0; i < nb; i++) c += kd_argmax_row(z + (size_t)i * V, V) == y[i];
    return c;
}

// A discriminator's accuracy: samples whose first logit is on the target's side of 0.
static int64_t count_sign(const float * z, size_t per, float target, int nb) {
    int64_t c = 0;
    for (int i = 0; i < nb; i++) c += (z[(size_t)i * per] > 0) == (target > 0.5f);
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

// torch.nn.utils.clip_grad_norm_ over a net's whole gradient block: the L2 norm in double, in
// index order (the same bits at any thread count), then g *= max_norm / (norm + 1e-6) when
// that is below 1. The gradient is finite here: the checks ran before any update.
static void clip_grad_norm(struct kd_net * net, float max_norm) {
    float * g = kd_net_grads(net);
    const size_t n = kd_net_num_params(net);
    double ss = 0;
    for (size_t i = 0; i < n; i++) ss += (double)g[i] * g[i];
    const double coef = (double)max_norm / (sqrt(ss) + 1e-6);
    if (coef < 1.0) for (size_t i = 0; i < n; i++) g[i] = (float)(g[i] * coef);
}

// ---------------------------------------------------------------------------------------
// The shared batch pipeline.

struct loop {
    const char * fn;          // the public epoch function, for error messages
    const struct kd_dataset * ds;
    const struct kd_train_cfg * cfg;
    int epoch, B;
    int64_t steps, steps_per_epoch, step;
    int per_batch;            // steps that read one batch (a step cycle's cycle_batch; else 1)
    uint64_t eseed, sseed;
    int64_t * perm;
    float * x;                // the batch, (B, c, h, w)
    float * x2;               // its second view (kd_step_cfg.view_aug); NULL: one view
    const struct kd_augment * aug2;
    uint64_t sseed2;          // the second view's batch seed
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
    free(L->perm); free(L->x); free(L->x2); free(L->y);
}

static enum kd_status loop_init(struct loop * L, const char * fn, const struct kd_dataset * ds,
                                const struct kd_train_cfg * cfg, int epoch) {
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
    L->y = malloc((size_t)L->B * sizeof(int64_t));
    L->perm = malloc((size_t)ds->n * sizeof(int64_t));
    if (!L->x || !L->y || !L->perm) {
        loop_free(L);
        KD_FAIL(KD_ERR_NOMEM, "cannot allocate a batch of %d", B);
    }
    L->eseed = kd_hash(cfg->seed, (uint64_t)epoch);
    if (cfg->shuffle) kd_data_shuffle(L->perm, ds->n, L->eseed);
    else for (int64_t i = 0; i < ds->n; i++) L->perm[i] = i;
    L->per_batch = 1;
    L->pr.epoch = epoch;
    L->pr.steps_total = (int)L->steps;
    return KD_OK;
}

// View 1's seed is drawn from view 0's, so its crop, flip and operations are its own.
#define VIEW1_SALT_ 0x5EC0DDu

// Assembles batch L->step: x (augmented), x2 (its second view), y, idx, nb, lr.
static enum kd_status loop_batch(struct loop * L) {
    const int64_t batch = L->step / L->per_batch, start = batch * L->cfg->batch_size;
    L->nb = (int)(L->ds->n - start < L->cfg->batch_size ? L->ds->n - start : L->cfg->batch_size);
    L->idx = L->perm + start;
    L->sseed = kd_hash(L->eseed, (uint64_t)batch);
    KD_TRY(kd_data_batch(L->x, L->ds, L->idx, L->nb, &L->cfg->aug, L->sseed));
    if (L->x2) {
        L->sseed2 = kd_hash(L->sseed, VIEW1_SALT_);
        KD_TRY(kd_data_batch(L->x2, L->ds, L->idx, L->nb, L->aug2, L->sseed2));
    }
    for (int i = 0; i < L->nb; i++) L->y[i] = L->ds->y[L->idx[i]];
    L->lr = kd_schedule_lr(&L->cfg->sched, L->epoch, (int)L->step, (int)L->steps_per_epoch);
    return KD_OK;
}

// A net's input with Gaussian noise (eq. 7's student perturbation; the other nets keep the
// clean batch), written to buf. The noise follows the step's seed only.
static const float * loop_noisy_input(struct loop * L, const float * x, uint64_t vseed, float noise, float * buf) {
    size_t n = (size_t)L->nb * L->ds->c * L->ds->h * L->ds->w;
    uint64_t seed = vseed ^ 0x4E015Eull;
    #pragma omp parallel for schedule(static) if (n > 65536)
    for (size_t i = 0; i < n; i++) buf[i] = x[i] + noise * kd_normal(seed, i);
    return buf;
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


// ---------------------------------------------------------------------------------------
// The step engine (kd_step_epoch).

// Failures inside the engine name the public function that was called.
#define E_FAIL(st, ...) return kd_set_error_((st), E->L->fn, __VA_ARGS__)

// A step net at run time.
struct snet {
    const struct kd_step_net * c;
    bool trained, connector;
    bool backprop;            // a backward runs in some phase of the cycle
    unsigned bp_phases;       // the phases in which its backward runs (see kd_step_cfg.cycle)
    unsigned upd_phases;      //   and in which it is updated (trained nets)
    bool bp, upd;             // this step's
    unsigned views;           // the views it runs on (bit v; at least view 0)
    int first_view;           // the lowest of them: its gradient is cleared before that backward
    int V;                    // values per sample of its output (0 when it has no output shape yet)
    float * cached;           // this batch's rows of c->logits
    float * noisy;            // its noisy copy of the batch
    float * dinp;             // connector: gradient w.r.t. its input
    int ext_node[KD_STEP_MAX_INPUTS];      // connector: its KD_LAYER_INPUT nodes, in order
    float * ext_grad[KD_STEP_MAX_INPUTS];  //   and the gradients w.r.t. them (trained sources)
    bool * kept_before;       // kd_net_kept before the epoch, restored after
};

// A gradient slot: the gradient of the step's loss w.r.t. one node of a trained net.
struct gslot { int net, node; size_t per; float * g; bool touched; };

struct engine {
    const struct kd_step_cfg * s;
    struct loop * L;
    struct snet n[KD_STEP_MAX_NETS];
    struct gslot * slots;
    int n_slots;
    int V;                    // logits width (labels' classes)
    size_t BV;
    float * scratch;          // per term: 4 BV floats + 2 B (mixtures, masks)
    float * dsrc;             // gradient w.r.t. a mixed source
    float * mix;              // a mixed source (B x its values per sample)
    float * tmp;              // BV
    float * term_scratch[KD_STEP_MAX_TERMS];   // kinds that need their own (CRD)
    unsigned views;           // the views some net runs on
    int first_view, last_view;
};

static int ref_node(const struct engine * E, struct kd_ref r) {
    const struct kd_step_net * c = E->n[r.net].c;
    return r.node < 0 && c->net ? kd_net_output_node(c->net) : r.node;
}

static size_t ref_per(const struct engine * E, struct kd_ref r) {
    const struct snet * sn = &E->n[r.net];
    if (!sn->c->net) return (size_t)sn->V;
    int c, h, w;
    kd_net_node_shape(sn->c->net, ref_node(E, r), &c, &h, &w);
    return (size_t)c * h * w;
}

static void ref_shape(const struct engine * E, struct kd_ref r, int * c, int * h, int * w) {
    const struct snet * sn = &E->n[r.net];
    if (!sn->c->net) { *c = sn->V; *h = *w = 1; return; }
    kd_net_node_shape(sn->c->net, ref_node(E, r), c, h, w);
}

static const float * ref_data(const struct engine * E, struct kd_ref r) {
    const struct snet * sn = &E->n[r.net];
    return sn->cached ? sn->cached : kd_net_output(sn->c->net, ref_node(E, r));
}

// The slot of a reference, NULL when no backward runs through its net.
static float * ref_grad(struct engine * E, struct kd_ref r) {
    if (!E->n[r.net].bp) return NULL;
    const int node = ref_node(E, r);
    for (int i = 0; i < E->n_slots; i++) {
        struct gslot * g = &E->slots[i];
        if (g->net != r.net || g->node != node) continue;
        if (!g->touched) { memset(g->g, 0, (size_t)E->L->nb * g->per * sizeof(float)); g->touched = true; }
        return g->g;
    }
    return NULL;   // not reached: every trained reference got a slot at setup
}

// Weights of a source's references this step: learned (softmax of the gates), given or
// uniform; each dropped with probability `drop` from the step's seed, one kept (chosen from
// the seed too); normalised to sum 1. Pure in (source, step seed): two sources listing the
// same references (a term and the monitor) drop the same ones.
static void source_weights(const struct kd_source * s, uint64_t sseed, float * gw) {
    const int n = s->n;
    float base[KD_SOURCE_MAX];
    bool uniform = true;
    for (int t = 0; t < n; t++) uniform &= s->w[t] == 0;
    if (s->gates) {
        double mx = -INFINITY, sum = 0;
        for (int t = 0; t < n; t++) mx = fmax(mx, s->gates[t]);
        for (int t = 0; t < n; t++) sum += exp(s->gates[t] - mx);
        for (int t = 0; t < n; t++) base[t] = (float)(exp(s->gates[t] - mx) / sum);
    } else {
        for (int t = 0; t < n; t++) base[t] = uniform ? 1.0f : s->w[t];
    }
    // A reference of weight 0 does not count as kept: when every weighted one is dropped, one
    // of them (chosen from the seed) comes back, so a step always has a guide.
    int kept = 0, weighted = 0;
    for (int t = 0; t < n; t++) {
        bool drop = s->drop > 0 && kd_uniform(kd_hash(sseed ^ 0xD509ull, (uint64_t)t)) < s->drop;
        gw[t] = drop ? 0.0f : base[t];
        kept += !drop && base[t] > 0;
        weighted += base[t] > 0;
    }
    if (weighted > 0 && kept == 0) {
        int pick = (int)(kd_hash(sseed, 0xD50ull) % (uint64_t)weighted);
        for (int t = 0; t < n; t++)
            if (base[t] > 0 && pick-- == 0) { gw[t] = base[t]; break; }
    }
    double gsum = 0;
    for (int t = 0; t < n; t++) gsum += gw[t];
    for (int t = 0; t < n; t++) gw[t] = gsum > 0 ? (float)(gw[t] / gsum) : 0.0f;
}

// A source's prediction (nb, V), for the monitor and conditional terms: one reference's
// logits; for several, the weighted logits (KD_MIX_LOGITS) or the weighted probabilities at
// T = 1.
static const float * source_pred(struct engine * E, const struct kd_source * s, const float * gw, float * out) {
    const int nb = E->L->nb, V = E->V;
    const size_t nbv = (size_t)nb * (s->mix == KD_MIX_LOGITS ? ref_per(E, s->ref[0]) : (size_t)V);
    if (s->n == 1) return ref_data(E, s->ref[0]);
    memset(out, 0, nbv * sizeof(float));
    for (int t = 0; t < s->n; t++) {
        if (gw[t] == 0) continue;
        const float * z = ref_data(E, s->ref[t]);
        if (s->mix == KD_MIX_LOGITS) {
            for (size_t j = 0; j < nbv; j++) out[j] += gw[t] * z[j];
        } else {
            kd_softmax_t(E->tmp, z, nb, V, 1.0f);
            for (size_t j = 0; j < nbv; j++) out[j] += gw[t] * E->tmp[j];
        }
    }
    return out;
}

float kd_term_weight_(const struct kd_term * t, int epoch) {
    float w = t->weight;
    if (t->warmup_epochs > 0 && epoch + 1 < t->warmup_epochs) w *= (float)(epoch + 1) / t->warmup_epochs;
    if (t->stop_epoch > 0 && epoch >= t->stop_epoch) w = 0.0f;
    return w;
}

// What one term computed in a step.
struct term_out { float value, part[2]; double contrib; };

// Learned gates of eq. 24: with q = sum_t g_t P_t (P_t = softmax(z_t/T)) and the loss
// L = w T^2 mean_i m_i KL(q_i || p_s,i), dL/dq = w T^2 m_i (log q - log p_s + 1) / N,
// dL/dg_t = <dL/dq, P_t>, and through g = softmax(gates): dL/dgate_t = g_t (G_t - sum_s g_s G_s).
// One plain SGD step per training step. Dropped teachers (g_t = 0) get no update.
static void update_gates(struct engine * E, const struct kd_term * t, const float * g, const float * q,
                         const float * zs, const float * mask, float w, float * P, float * lps) {
    const int nb = E->L->nb, V = E->V, n = t->src.n;
    const float T = t->T;
    kd_softmax_t(lps, zs, nb, V, T);
    double G[KD_SOURCE_MAX], gsum = 0;
    for (int s = 0; s < n; s++) {
        G[s] = 0;
        if (g[s] == 0) continue;
        kd_softmax_t(P, ref_data(E, t->src.ref[s]), nb, V, T);
        for (int i = 0; i < nb; i++) {
            double wi = mask ? mask[i] : 1.0;
            for (int k = 0; k < V; k++) {
                size_t j = (size_t)i * V + k;
                if (q[j] <= 0 || lps[j] <= 0) continue;
                G[s] += wi * (log((double)q[j]) - log((double)lps[j]) + 1.0) * P[j];
            }
        }
        G[s] *= (double)w * T * T / nb;
    }
    for (int s = 0; s < n; s++) gsum += g[s] * G[s];
    for (int s = 0; s < n; s++)
        if (g[s] > 0) t->src.gates[s] -= (float)(t->src.gate_lr * g[s] * (G[s] - gsum));
}

// Logit standardisation: y = (z - mean) / (std + 1e-7) per row, std unbiased (torch.std).
#define LS_EPS 1e-7
static void standardize_rows(float * y, const float * z, int n, int V) {
    for (int i = 0; i < n; i++) {
        const float * zi = z + (size_t)i * V;
        double m = 0, ss = 0;
        for (int c = 0; c < V; c++) m += zi[c];
        m /= V;
        for (int c = 0; c < V; c++) ss += (zi[c] - m) * (zi[c] - m);
        const double sd = sqrt(ss / (V - 1)) + LS_EPS;
        for (int c = 0; c < V; c++) y[(size_t)i * V + c] = (float)((zi[c] - m) / sd);
    }
}

// dz += the gradient through standardize_rows given g = dL/dy:
// (g - mean g) / (s + e) - (z - mean) * sum_j g_j (z_j - mean) / ((V - 1) s (s + e)^2).
static void standardize_rows_backward(float * dz, const float * g, const float * z, int n, int V) {
    for (int i = 0; i < n; i++) {
        const float * zi = z + (size_t)i * V, * gi = g + (size_t)i * V;
        double m = 0, gm = 0, ss = 0, gc = 0;
        for (int c = 0; c < V; c++) { m += zi[c]; gm += gi[c]; }
        m /= V; gm /= V;
        for (int c = 0; c < V; c++) { ss += (zi[c] - m) * (zi[c] - m); gc += gi[c] * (zi[c] - m); }
        const double s = sqrt(ss / (V - 1)), se = s + LS_EPS;
        const double k = s > 0 ? gc / ((V - 1) * s * se * se) : 0.0;
        for (int c = 0; c < V; c++) dz[(size_t)i * V + c] += (float)((gi[c] - gm) / se - (zi[c] - m) * k);
    }
}

// One term of one step: its value, and the gradient of w * term added at its inputs' slots.
// scratch: 4 BV + 2 B floats of its own (the learned gates read them after the checks).
static enum kd_status term_run(struct engine * E, const struct kd_term * t, float w, float * scratch,
                               struct term_out * o) {
    struct loop * L = E->L;
    const int nb = L->nb, V = E->V;
    const size_t nbv = (size_t)nb * V;
    memset(o, 0, sizeof *o);
    if (t->reverse) w = -w;   // gradient reversal: the inputs receive -w dL
    const float * a = ref_data(E, t->a);
    float * da = ref_grad(E, t->a);
    float * q = scratch, * pred = scratch + E->BV, * mask = scratch + 4 * E->BV, * wrong = mask + L->B;
    const float smooth = L->cfg->label_smoothing;
    enum kd_status st = KD_OK;
    struct pair_io p = { .a = a, .da = da, .nb = nb, .y = L->y, .idx = L->idx, .w = w, .smooth = smooth, .epoch = L->epoch,
                         .scratch = E->term_scratch[t - E->s->terms] };
    ref_shape(E, t->a, &p.ac, &p.ah, &p.aw);
    if (!kd_term_kinds[t->kind].src) {   // CE, tolerant, activation, entropy, the DeepInversion priors: `a` alone
        if (t->kind == KD_TERM_BNSTAT) kd_net_bn_running_(E->s->nets[t->a.net].net, t->bnstat.node, &p.rmean, &p.rvar);
        st = kd_term_kinds[t->kind].pair(t, &p);
        o->value = p.value;
        o->contrib = (double)w * o->value;
        return st;
    }
    const struct kd_source * s = &t->src;
    float gw[KD_SOURCE_MAX];
    source_weights(s, L->sseed, gw);
    if (t->kind == KD_TERM_CTKD && t->ctkd.instance) {
        p.a2 = ref_data(E, t->ctkd.temp);
        p.da2 = ref_grad(E, t->ctkd.temp);
    } else if (kd_term_kinds[t->kind].params) {
        struct kd_net * h = E->s->nets[t->params].net;
        p.params = kd_net_params(h);
        p.dparams = kd_net_grads(h);
    }
    ref_shape(E, s->ref[0], &p.bc, &p.bh, &p.bw);
    // Conditional learning: where the source's prediction is wrong, the label replaces it.
    double extra = 0;
    if (t->conditional) {
        const float * zr = source_pred(E, s, gw, pred);
        for (int i = 0; i < nb; i++) {
            bool right = kd_argmax_row(zr + (size_t)i * V, V) == L->y[i];
            mask[i] = right ? 1.0f : 0.0f;
            wrong[i] = right ? 0.0f : 1.0f;
        }
        p.mask = mask;
        float ce = 0;
        if ((st = kd_cross_entropy(&ce, da, a, L->y, wrong, nb, V, smooth, w, true)) != KD_OK) return st;
        extra = ce;
    }
    const size_t bper = (size_t)p.bc * p.bh * p.bw;
    if (t->kind == KD_TERM_FSP) {
        // Two maps per side, no mixing: (a, a2) against (src 0, src 1).
        p.a2 = ref_data(E, t->fsp.a2);
        p.da2 = ref_grad(E, t->fsp.a2);
        ref_shape(E, t->fsp.a2, &p.a2c, &p.a2h, &p.a2w);
        p.b = ref_data(E, s->ref[0]);
        p.b2 = ref_data(E, s->ref[1]);
        ref_shape(E, s->ref[1], &p.b2c, &p.b2h, &p.b2w);
        if (s->grad) { p.db = ref_grad(E, s->ref[0]); p.db2 = ref_grad(E, s->ref[1]); }
        st = kd_term_kinds[KD_TERM_FSP].pair(t, &p);
        o->value = p.value;
        o->contrib = (double)w * o->value;
        return st;
    }
    if (s->n > 1 && s->mix == KD_MIX_PROBS) {
        // One KD term against the mixture of softened distributions (checked: KD only).
        memset(q, 0, nbv * sizeof(float));
        for (int j = 0; j < s->n; j++) {
            if (gw[j] == 0) continue;
            kd_softmax_t(E->tmp, ref_data(E, s->ref[j]), nb, V, t->T);
            for (size_t i = 0; i < nbv; i++) q[i] += gw[j] * E->tmp[i];
        }
        st = kd_loss_soft(&o->value, da, a, q, p.mask, nb, V, t->T, w, true);
    } else if (s->n > 1 && s->mix == KD_MIX_LOSSES) {
        for (int j = 0; j < s->n && st == KD_OK; j++) {
            if (gw[j] == 0) continue;
            p.b = ref_data(E, s->ref[j]);
            p.db = s->grad ? ref_grad(E, s->ref[j]) : NULL;
            ref_shape(E, s->ref[j], &p.bc, &p.bh, &p.bw);
            p.w = w * gw[j];
            p.value = p.part[0] = p.part[1] = 0;
            st = kd_term_kinds[t->kind].pair(t, &p);
            o->value += gw[j] * p.value;
            o->part[0] += gw[j] * p.part[0];
            o->part[1] += gw[j] * p.part[1];
        }
    } else if (t->standardize) {
        // Logit standardisation (checked at setup: one detached reference): the loss on the
        // z-scored logits, its gradient taken back through the z-score.
        float * ys = scratch + 2 * E->BV, * yt = scratch + 3 * E->BV, * gy = q;
        standardize_rows(ys, a, nb, V);
        standardize_rows(yt, ref_data(E, s->ref[0]), nb, V);
        if (da) memset(gy, 0, nbv * sizeof(float));
        p.a = ys;
        p.da = da ? gy : NULL;
        p.b = yt;
        st = kd_term_kinds[t->kind].pair(t, &p);
        o->value = p.value;
        o->part[0] = p.part[0];
        o->part[1] = p.part[1];
        if (da && st == KD_OK) standardize_rows_backward(da, gy, a, nb, V);
    } else {
        // One target: a reference, or the weighted sum of several references (same shapes).
        p.b = s->n == 1 ? ref_data(E, s->ref[0]) : source_pred(E, s, gw, E->mix);
        if (s->grad) {
            p.db = s->n == 1 ? ref_grad(E, s->ref[0]) : E->dsrc;
            if (s->n > 1) memset(E->dsrc, 0, (size_t)nb * bper * sizeof(float));
        }
        st = kd_term_kinds[t->kind].pair(t, &p);
        o->value = p.value;
        o->part[0] = p.part[0];
        o->part[1] = p.part[1];
        // A mixed target's gradient is shared among its references by their weights.
        for (int j = 0; s->n > 1 && p.db && j < s->n; j++) {
            float * dj = ref_grad(E, s->ref[j]);
            if (!dj || gw[j] == 0) continue;
            const size_t n = (size_t)nb * bper;
            for (size_t i = 0; i < n; i++) dj[i] += gw[j] * E->dsrc[i];
        }
    }
    o->contrib = (double)w * ((double)o->value + extra);
    return st;
}

static bool same_ref(const struct engine * E, struct kd_ref a, struct kd_ref b) {
    return a.net == b.net && ref_node(E, a) == ref_node(E, b) && a.view == b.view;
}

// A reference is valid: an earlier-or-any net of the step, and a node of it, on a view it runs on.
static enum kd_status check_ref(const struct engine * E, struct kd_ref r, const char * what, int i, const char * kn) {
    const struct kd_step_cfg * s = E->s;
    if (r.net < 0 || r.net >= s->n_nets)
        E_FAIL(KD_ERR_VALUE, "term %d (%s): %s refers to net %d (the step has %d)", i, kn, what, r.net, s->n_nets);
    if (r.view < 0 || r.view >= KD_STEP_MAX_VIEWS || !(E->n[r.net].views >> r.view & 1))
        E_FAIL(KD_ERR_VALUE, "term %d (%s): %s reads view %d of net %d, which runs on views 0x%x", i, kn, what, r.view,
               r.net, E->n[r.net].views);
    const struct kd_step_net * c = &s->nets[r.net];
    if (!c->net && r.node >= 0) E_FAIL(KD_ERR_VALUE, "term %d (%s): %s reads node %d of cached logits", i, kn, what, r.node);
    if (c->net && r.node >= kd_net_num_nodes(c->net))
        E_FAIL(KD_ERR_VALUE, "term %d (%s): %s reads node %d of net %d, which has %d", i, kn, what, r.node, r.net,
                kd_net_num_nodes(c->net));
    return KD_OK;
}

static enum kd_status add_slot(struct engine * E, int net, int node, size_t per) {
    for (int i = 0; i < E->n_slots; i++)
        if (E->slots[i].net == net && E->slots[i].node == node) return KD_OK;
    struct gslot * g = realloc(E->slots, (size_t)(E->n_slots + 1) * sizeof *g);
    if (!g) E_FAIL(KD_ERR_NOMEM, "cannot allocate gradient slots");
    E->slots = g;
    size_t n;
    if (!kd_mul_ok(per, (size_t)E->L->B, &n)) E_FAIL(KD_ERR_NOMEM, "gradient slot too large");
    float * buf = malloc((n ? n : 1) * sizeof(float));
    if (!buf) E_FAIL(KD_ERR_NOMEM, "cannot allocate a gradient slot of %zu floats", n);
    E->slots[E->n_slots++] = (struct gslot){ .net = net, .node = node, .per = per, .g = buf };
    return KD_OK;
}

// Validates the configuration and plans every net for the batch size.
static enum kd_status engine_setup(struct engine * E) {
    const struct kd_step_cfg * s = E->s;
    struct loop * L = E->L;
    const struct kd_dataset * ds = L->ds;
    if (s->n_nets < 1 || s->n_nets > KD_STEP_MAX_NETS)
        E_FAIL(KD_ERR_VALUE, "n_nets (%d) must be in [1, %d]", s->n_nets, KD_STEP_MAX_NETS);
    if (s->n_terms < 0 || s->n_terms > KD_STEP_MAX_TERMS)
        E_FAIL(KD_ERR_VALUE, "n_terms (%d) must be in [0, %d]", s->n_terms, KD_STEP_MAX_TERMS);
    if (!s->nets || (s->n_terms > 0 && !s->terms)) E_FAIL(KD_ERR_VALUE, "nets and terms must not be NULL");
    const struct kd_augment * va = &s->view_aug;
    if (va->crop_padding < 0 || va->crop_padding > 65536 || !(va->noise_std >= 0) || !isfinite(va->noise_std) ||
        va->randaugment < 0 || L->cfg->aug.randaugment < 0)
        E_FAIL(KD_ERR_VALUE, "view_aug: crop_padding must be in [0, 65536], noise_std finite and >= 0 and randaugment >= 0");
    const struct kd_augment * a0 = &L->cfg->aug;
    const bool augmented0 = a0->crop_padding > 0 || a0->hflip || a0->noise_std > 0 || a0->randaugment > 0;
    const bool augmented1 = va->crop_padding > 0 || va->hflip || va->noise_std > 0 || va->randaugment > 0;
    for (int i = 0; i < s->n_nets; i++) {
        const struct kd_step_net * c = &s->nets[i];
        struct snet * sn = &E->n[i];
        sn->c = c;
        const char * role = c->role ? c->role : "net";
        if (c->views & ~((1u << KD_STEP_MAX_VIEWS) - 1))
            E_FAIL(KD_ERR_VALUE, "net %d (%s): views (0x%x) name a view past the %d a step has", i, role, c->views,
                   KD_STEP_MAX_VIEWS);
        if (c->views & ~1u && c->params_only)
            E_FAIL(KD_ERR_VALUE, "net %d (%s): a parameter holder runs no forward; its views must be 0", i, role);
        sn->views = c->views ? c->views : 1u;
        sn->first_view = __builtin_ctz(sn->views);
        if (!c->params_only) E->views |= sn->views;
        const bool augmented = ((sn->views & 1) && augmented0) || ((sn->views & 2) && augmented1);
        if (!c->net == !c->logits) E_FAIL(KD_ERR_VALUE, "net %d (%s): give a net or cached logits", i, role);
        if (c->logits && c->opt) E_FAIL(KD_ERR_VALUE, "net %d (%s): cached logits cannot be trained", i, role);
        if (c->logits && augmented)
            E_FAIL(KD_ERR_VALUE, "cached %s logits cannot follow augmented inputs; pass the %s net", role, role);
        if (c->mode > (KD_MODE_TRAIN | KD_MODE_NO_GRAD)) E_FAIL(KD_ERR_VALUE, "net %d: mode must be a kd_mode", i);
        if (!(c->input_noise >= 0) || !isfinite(c->input_noise)) E_FAIL(KD_ERR_VALUE, "net %d: input_noise must be >= 0", i);
        if (!(c->lr_scale >= 0) || !isfinite(c->lr_scale)) E_FAIL(KD_ERR_VALUE, "net %d: lr_scale must be >= 0", i);
        if (!(c->clip_norm >= 0) || !isfinite(c->clip_norm))
            E_FAIL(KD_ERR_VALUE, "net %d (%s): clip_norm (%g) must be >= 0 and finite", i, c->role ? c->role : "net",
                   c->clip_norm);
        if (c->clip_norm > 0 && !c->opt)
            E_FAIL(KD_ERR_VALUE, "net %d (%s): clip_norm is for a trained net", i, c->role ? c->role : "net");
        for (int j = 0; j < i && c->net; j++)
            if (s->nets[j].net == c->net) E_FAIL(KD_ERR_VALUE, "net %d (%s) is also net %d of the step", i, role, j);
        sn->trained = c->opt != NULL;
        sn->connector = c->input_net >= 0;
        if (c->shares) {
            const int o = c->shares - 1;
            if (o < 0 || o >= i || !s->nets[o].net || !s->nets[o].opt || s->nets[o].params_only || s->nets[o].shares)
                E_FAIL(KD_ERR_VALUE, "net %d (%s): shares (%d) must name an earlier trained net (its index + 1)", i, role,
                       c->shares);
            if (!c->net || c->opt || c->params_only || c->grad_input)
                E_FAIL(KD_ERR_VALUE, "net %d (%s): a twin needs a net and no optimizer, grad_input or parameter holding",
                       i, role);
            if (kd_net_num_params(c->net) != kd_net_num_params(s->nets[o].net) || kd_net_num_buffers(c->net) ||
                kd_net_num_buffers(s->nets[o].net))
                E_FAIL(KD_ERR_SHAPE, "net %d (%s): a twin must be built as net %d (%zu and %zu parameters) and have no "
                       "BN buffers", i, role, o, kd_net_num_params(c->net), kd_net_num_params(s->nets[o].net));
        }
        sn->backprop = sn->trained || c->grad_input;
        if (c->grad_input && (!c->net || c->opt || !sn->connector))
            E_FAIL(KD_ERR_VALUE, "net %d (%s): grad_input is for a frozen connector (a net, no optimizer, an input net)",
                   i, role);
        if (c->detach_input && !sn->connector) E_FAIL(KD_ERR_VALUE, "net %d (%s): detach_input needs an input net", i, role);
        if (c->params_only) {
            if (!c->net || !c->opt || sn->connector)
                E_FAIL(KD_ERR_VALUE, "net %d (%s): a parameter holder needs a net and an optimizer, and no input", i, role);
            continue;
        }
        if (sn->connector) {
            if (c->input_net >= i || !s->nets[c->input_net].net)
                E_FAIL(KD_ERR_VALUE, "net %d (%s): input_net %d must be an earlier net of the step", i, role, c->input_net);
            if (c->input_node >= kd_net_num_nodes(s->nets[c->input_net].net))
                E_FAIL(KD_ERR_VALUE, "net %d (%s): input_node %d does not exist", i, role, c->input_node);
            // A connector reads its inputs on the view it runs on.
            unsigned in_views = E->n[c->input_net].views;
            for (int k = 0; k < c->n_inputs && k < KD_STEP_MAX_INPUTS; k++) {
                if (c->inputs[k].view != 0)
                    E_FAIL(KD_ERR_VALUE, "net %d (%s): extra input %d names view %d; a connector reads the view it "
                           "runs on (leave 0)", i, role, k, c->inputs[k].view);
                if (c->inputs[k].net >= 0 && c->inputs[k].net < i) in_views &= E->n[c->inputs[k].net].views;
            }
            if (sn->views & ~in_views)
                E_FAIL(KD_ERR_VALUE, "net %d (%s): it runs on views 0x%x, but its inputs only on 0x%x", i, role, sn->views,
                       in_views);
        }
        // Extra inputs: one reference per KD_LAYER_INPUT node of the net, in node order.
        int n_ext = 0;
        for (int k = 0; c->net && k < kd_net_num_nodes(c->net); k++) {
            if (kd_net_node_spec(c->net, k)->type != KD_LAYER_INPUT) continue;
            if (n_ext < KD_STEP_MAX_INPUTS) sn->ext_node[n_ext] = k;
            n_ext++;
        }
        if (c->n_inputs < 0 || c->n_inputs > KD_STEP_MAX_INPUTS || n_ext != c->n_inputs || (n_ext && !sn->connector))
            E_FAIL(KD_ERR_VALUE, "net %d (%s): %d extra inputs given for %d input nodes%s", i, role, c->n_inputs, n_ext,
                   n_ext && !sn->connector ? " (only a connector can have extra inputs)" : "");
        for (int k = 0; k < n_ext; k++) {
            const struct kd_ref r = c->inputs[k];
            const bool cached = r.net >= 0 && r.net < i && s->nets[r.net].logits;
            if (r.net < 0 || r.net >= i || (cached && r.node != -1) ||
                (!cached && (!s->nets[r.net].net || r.node >= kd_net_num_nodes(s->nets[r.net].net))))
                E_FAIL(KD_ERR_VALUE, "net %d (%s): extra input %d must be a node of an earlier net of the step (the "
                       "output of cached rows)", i, role, k);
            int ec, eh, ew;
            if (cached) {
                // cached rows (a conditional discriminator's one-hot labels) are as wide as the
                // logits, known here once logits_net is planned
                const int ln = s->logits_net;
                if (ln < 0 || ln >= i || !s->nets[ln].net)
                    E_FAIL(KD_ERR_VALUE, "net %d (%s): extra input %d reads cached rows, which need logits_net (%d) "
                           "to be an earlier net", i, role, k, ln);
                ec = E->n[ln].V;
                eh = ew = 1;
            } else {
                ref_shape(E, r, &ec, &eh, &ew);
            }
            KD_TRY(kd_net_set_input(c->net, sn->ext_node[k], NULL, ec, eh, ew, NULL));
        }
        if (c->logits) {
            sn->V = E->V;   // set below from the first net with a shape
            continue;
        }
        int C = ds->c, H = ds->h, W = ds->w;
        if (sn->connector) ref_shape(E, (struct kd_ref){ c->input_net, c->input_node, 0 }, &C, &H, &W);
        KD_TRY(kd_net_plan(c->net, L->B, C, H, W));
        int oc, oh, ow;
        kd_net_node_shape(c->net, -1, &oc, &oh, &ow);
        sn->V = oc * oh * ow;
    }
    // The step cycle: per phase, which nets are updated and which run a backward (an updated
    // net, or a connector passing the gradient on to a net that runs one).
    if (s->cycle < 0 || s->cycle > KD_STEP_MAX_PHASES)
        E_FAIL(KD_ERR_VALUE, "cycle (%d) must be in [0, %d]", s->cycle, KD_STEP_MAX_PHASES);
    const int np = s->cycle > 1 ? s->cycle : 1;
    const unsigned all = np == 32 ? ~0u : (1u << np) - 1;
    for (int i = 0; i < s->n_nets; i++) {
        const struct kd_step_net * c = &s->nets[i];
        struct snet * sn = &E->n[i];
        const char * role = c->role ? c->role : "net";
        if (c->phases && !c->opt) E_FAIL(KD_ERR_VALUE, "net %d (%s): phases are for a trained net", i, role);
        if (c->phases & ~all)
            E_FAIL(KD_ERR_VALUE, "net %d (%s): phases (0x%x) name a phase past the cycle of %d", i, role, c->phases, np);
        sn->upd_phases = sn->trained ? (c->phases ? c->phases : all) : 0;
        sn->bp_phases = 0;
        for (int p = 0; p < np; p++) {
            bool on = sn->upd_phases >> p & 1;
            if (c->shares) on |= E->n[c->shares - 1].upd_phases >> p & 1;
            if (sn->connector && !c->detach_input && (sn->trained || c->grad_input || c->shares)) {
                on |= E->n[c->input_net].bp_phases >> p & 1;
                for (int k = 0; k < c->n_inputs; k++) on |= E->n[c->inputs[k].net].bp_phases >> p & 1;
            }
            if (on) sn->bp_phases |= 1u << p;
        }
        sn->backprop = sn->bp_phases != 0;
    }
    if (s->cycle_batch && np < 2) E_FAIL(KD_ERR_VALUE, "cycle_batch needs a cycle of 2 or more phases");
    // The logits width: the output of logits_net (net 0 by default: the student, the model,
    // peer 0).
    if (s->logits_net < 0 || s->logits_net >= s->n_nets || !s->nets[s->logits_net].net)
        E_FAIL(KD_ERR_VALUE, "logits_net (%d) must be a net of the step", s->logits_net);
    E->V = E->n[s->logits_net].V;
    for (int i = 0; i < s->n_nets; i++) if (s->nets[i].logits) E->n[i].V = E->V;
    E->BV = (size_t)L->B * E->V;
    if (!E->views) E->views = 1u;
    E->first_view = __builtin_ctz(E->views);
    E->last_view = 31 - __builtin_clz(E->views);
    if (ds->num_classes > 0 && ds->num_classes != E->V)
        E_FAIL(KD_ERR_SHAPE, "the dataset has %d classes but the %s outputs %d values", ds->num_classes,
                s->nets[s->logits_net].role ? s->nets[s->logits_net].role : "net", E->V);
    for (int i = 0; i < s->n_terms; i++) {
        const struct kd_term * t = &s->terms[i];
        if ((unsigned)t->kind >= KD_TERM_COUNT) E_FAIL(KD_ERR_VALUE, "term %d: unknown kind %d", i, (int)t->kind);
        const struct term_kind_info * k = &kd_term_kinds[t->kind];
        const char * kn = k->name;
        if (!(t->weight >= 0) || !isfinite(t->weight)) E_FAIL(KD_ERR_VALUE, "term %d (%s): weight (%g) must be finite and >= 0", i, kn, t->weight);
        if (!(t->T > 0) || !isfinite(t->T)) E_FAIL(KD_ERR_VALUE, "term %d (%s): T (%g) must be > 0", i, kn, t->T);
        if (t->warmup_epochs < 0 || t->stop_epoch < 0) E_FAIL(KD_ERR_VALUE, "term %d (%s): warmup_epochs and stop_epoch must be >= 0", i, kn);
        KD_TRY(check_ref(E, t->a, "a", i, kn));
        const int ns = t->src.n;
        // A term runs within its view: every reference reads the view of `a`.
        for (int j = 0; j < ns && j < KD_SOURCE_MAX; j++)
            if (t->src.ref[j].view != t->a.view)
                E_FAIL(KD_ERR_VALUE, "term %d (%s): src %d reads view %d, a view %d; a term reads one view", i, kn, j,
                       t->src.ref[j].view, t->a.view);
        if (t->kind == KD_TERM_FSP && t->fsp.a2.view != t->a.view)
            E_FAIL(KD_ERR_VALUE, "term %d (%s): fsp.a2 reads view %d, a view %d; a term reads one view", i, kn,
                   t->fsp.a2.view, t->a.view);
        if (t->src.gates && t->a.view != E->last_view)
            E_FAIL(KD_ERR_VALUE, "term %d (%s): learned gates are updated after the step from its last view's "
                   "outputs; the term must read view %d", i, kn, E->last_view);
        if (k->src && (ns < 1 || ns > KD_SOURCE_MAX)) E_FAIL(KD_ERR_VALUE, "term %d (%s): src.n (%d) must be in [1, %d]", i, kn, ns, KD_SOURCE_MAX);
        if (!k->src && ns != 0) E_FAIL(KD_ERR_VALUE, "term %d (%s) takes no source", i, kn);
        if (!(t->src.drop >= 0 && t->src.drop < 1)) E_FAIL(KD_ERR_VALUE, "term %d (%s): drop (%g) must be in [0, 1)", i, kn, t->src.drop);
        if ((unsigned)t->src.mix > KD_MIX_LOGITS) E_FAIL(KD_ERR_VALUE, "term %d (%s): unknown mix %d", i, kn, (int)t->src.mix);
        if (ns > 1 && t->src.mix == KD_MIX_PROBS && t->kind != KD_TERM_KD)
            E_FAIL(KD_ERR_VALUE, "term %d (%s): KD_MIX_PROBS is for KD terms", i, kn);
        if (t->src.gates && (t->kind != KD_TERM_KD || t->src.mix != KD_MIX_PROBS || ns < 2 || t->src.grad))
            E_FAIL(KD_ERR_VALUE, "term %d (%s): learned gates need KD with KD_MIX_PROBS over several references", i, kn);
        if (t->src.gates && (!(t->src.gate_lr >= 0) || !isfinite(t->src.gate_lr)))
            E_FAIL(KD_ERR_VALUE, "term %d (%s): gate_lr (%g) must be >= 0", i, kn, t->src.gate_lr);
        if (t->src.grad && ns > 1 && t->src.mix == KD_MIX_PROBS)
            E_FAIL(KD_ERR_VALUE, "term %d (%s): a gradient to the source needs logit mixing", i, kn);
        if (t->src.grad && !k->src_grad) E_FAIL(KD_ERR_VALUE, "term %d (%s) gives no gradient to its source", i, kn);
        if (t->phases & ~all)
            E_FAIL(KD_ERR_VALUE, "term %d (%s): phases (0x%x) name a phase past the cycle of %d", i, kn, t->phases, np);
        if (t->reverse && (t->src.gates || t->conditional))
            E_FAIL(KD_ERR_VALUE, "term %d (%s): reverse is not defined with learned gates or conditional", i, kn);
        if (t->conditional && t->kind != KD_TERM_KD)
            E_FAIL(KD_ERR_VALUE, "term %d (%s): conditional is defined for KD terms", i, kn);
        if (t->standardize && !(t->kind == KD_TERM_KD || t->kind == KD_TERM_DKD || t->kind == KD_TERM_DIST ||
                                t->kind == KD_TERM_MSE))
            E_FAIL(KD_ERR_VALUE, "term %d (%s): standardize is defined for KD, DKD, DIST and MSE terms", i, kn);
        if (t->standardize && (ns != 1 || t->src.grad))
            E_FAIL(KD_ERR_VALUE, "term %d (%s): standardize needs one detached source (several or trained "
                   "references are not supported)", i, kn);
        if (t->kind == KD_TERM_TOLERANT && t->k < 2) E_FAIL(KD_ERR_VALUE, "tolerant_k (%d) must be >= 2", t->k);
        for (int j = 0; j < ns; j++) {
            if (!(t->src.w[j] >= 0) || !isfinite(t->src.w[j]))
                E_FAIL(KD_ERR_VALUE, "term %d (%s): source weight %d (%g) must be finite and >= 0", i, kn, j, t->src.w[j]);
            if (t->src.gates && !isfinite(t->src.gates[j])) E_FAIL(KD_ERR_VALUE, "gate_logits[%d] is not finite", j);
            KD_TRY(check_ref(E, t->src.ref[j], "src", i, kn));
            if (same_ref(E, t->a, t->src.ref[j]) && t->src.grad)
                E_FAIL(KD_ERR_VALUE, "term %d (%s): a and its source are the same node", i, kn);
        }
        const size_t per = ref_per(E, t->a);
        if (k->logits && per != (size_t)E->V)
            E_FAIL(KD_ERR_SHAPE, "term %d (%s): its input has %zu values per sample, the logits %d", i, kn, per, E->V);
        for (int j = 0; j < ns; j++) {
            const size_t pj = ref_per(E, t->src.ref[j]);
            if (k->same_shape && pj != per) {
                const char * rs = s->nets[t->src.ref[j].net].role, * ra = s->nets[t->a.net].role;
                E_FAIL(KD_ERR_SHAPE, "the %s outputs %zu values but the %s outputs %zu", rs ? rs : "source", pj,
                       ra ? ra : "net", per);
            }
            if (!k->same_shape && ns > 1 && t->src.mix == KD_MIX_LOGITS && t->kind != KD_TERM_FSP &&
                pj != ref_per(E, t->src.ref[0]))
                E_FAIL(KD_ERR_SHAPE, "term %d (%s): mixed sources differ in size (%zu and %zu values per sample)", i, kn,
                       ref_per(E, t->src.ref[0]), pj);
        }
        if (k->params && !(t->kind == KD_TERM_CTKD && t->ctkd.instance)) {
            if (t->params < 0 || t->params >= s->n_nets || !s->nets[t->params].params_only)
                E_FAIL(KD_ERR_VALUE, "term %d (%s): params (%d) must be a parameter-holder net of the step", i, kn,
                       t->params);
        } else if (t->params != -1) {
            E_FAIL(KD_ERR_VALUE, "term %d (%s): params is %d, but a %s term has no parameters of its own (-1)", i, kn,
                   t->params, k->name);
        }
        if (t->kind == KD_TERM_VID) {
            const int h = t->params;
            int c, hh, ww;
            ref_shape(E, t->a, &c, &hh, &ww);
            if (kd_net_num_params(s->nets[h].net) != (size_t)c)
                E_FAIL(KD_ERR_SHAPE, "term %d (vid): the parameter holder has %zu values, the map %d channels", i,
                       kd_net_num_params(s->nets[h].net), c);
            if (!(t->vid.eps > 0)) E_FAIL(KD_ERR_VALUE, "term %d (vid): eps (%g) must be > 0", i, t->vid.eps);
        }
        if (t->kind == KD_TERM_CTKD && t->ctkd.instance) {
            // The temperature net's output: one value per sample, its gradient slot when it learns.
            KD_TRY(check_ref(E, t->ctkd.temp, "ctkd.temp", i, kn));
            if (ref_per(E, t->ctkd.temp) != 1)
                E_FAIL(KD_ERR_SHAPE, "term %d (ctkd): ctkd.temp has %zu values per sample, the temperature needs 1", i,
                       ref_per(E, t->ctkd.temp));
            if (E->n[t->ctkd.temp.net].backprop)
                KD_TRY(add_slot(E, t->ctkd.temp.net, ref_node(E, t->ctkd.temp), 1));
        } else if (t->kind == KD_TERM_CTKD) {
            const int h = t->params;
            if (kd_net_num_params(s->nets[h].net) != 1)
                E_FAIL(KD_ERR_SHAPE, "term %d (ctkd): the parameter holder has %zu values, the temperature needs 1", i,
                       kd_net_num_params(s->nets[h].net));
        }
        if (t->kind == KD_TERM_CTKD) {
            const struct kd_term * c = t;
            if (!(c->ctkd.t_start > 0) || !isfinite(c->ctkd.t_start))
                E_FAIL(KD_ERR_VALUE, "term %d (ctkd): t_start (%g) must be > 0 and finite", i, c->ctkd.t_start);
            if (!(c->ctkd.t_range >= 0) || !isfinite(c->ctkd.t_range))
                E_FAIL(KD_ERR_VALUE, "term %d (ctkd): t_range (%g) must be >= 0 and finite", i, c->ctkd.t_range);
            if (!isfinite(c->ctkd.lambda_min) || !isfinite(c->ctkd.lambda_max))
                E_FAIL(KD_ERR_VALUE, "term %d (ctkd): lambda_min (%g) and lambda_max (%g) must be finite", i,
                       c->ctkd.lambda_min, c->ctkd.lambda_max);
            if (c->ctkd.decay_epochs < 1)
                E_FAIL(KD_ERR_VALUE, "term %d (ctkd): decay_epochs (%d) must be >= 1", i, c->ctkd.decay_epochs);
        }
        if (t->kind == KD_TERM_BNSTAT) {
            // a is the input of a BN node of the same net, whose running statistics it is held to
            struct kd_net * net = s->nets[t->a.net].net;
            const int bn = t->bnstat.node;
            const float * rm, * rv;
            if (!net || !kd_net_bn_running_(net, bn, &rm, &rv))
                E_FAIL(KD_ERR_VALUE, "term %d (bnstat): bnstat.node (%d) must be a BatchNorm node of net %d", i, bn,
                       t->a.net);
            const int in = kd_net_node_spec(net, bn)->inp[0];
            if (in != ref_node(E, t->a))
                E_FAIL(KD_ERR_VALUE, "term %d (bnstat): a reads node %d of net %d, but BN node %d reads %s %d", i,
                       ref_node(E, t->a), t->a.net, bn, in < 0 ? "the net input" : "node", in);
            int c, hh, ww;
            ref_shape(E, t->a, &c, &hh, &ww);
            if ((size_t)L->B * hh * ww < 2)
                E_FAIL(KD_ERR_VALUE, "term %d (bnstat): a batch of %d with %dx%d maps has one value per channel; "
                       "the batch variance needs at least 2", i, L->B, hh, ww);
        }
        if (t->kind == KD_TERM_TV) {
            int c, hh, ww;
            ref_shape(E, t->a, &c, &hh, &ww);
            if (hh < 2 || ww < 2) E_FAIL(KD_ERR_SHAPE, "term %d (tv): a has %dx%d pixels; TV needs at least 2x2", i, hh, ww);
        }
        if (t->kind == KD_TERM_NORMKD && (!(t->normkd.t_norm > 0) || !isfinite(t->normkd.t_norm)))
            E_FAIL(KD_ERR_VALUE, "term %d (normkd): t_norm (%g) must be > 0 and finite", i, t->normkd.t_norm);
        if (t->kind == KD_TERM_BCE && !(t->bce.target >= 0 && t->bce.target <= 1))
            E_FAIL(KD_ERR_VALUE, "term %d (bce): target (%g) must be in [0, 1]", i, t->bce.target);
        if (t->kind == KD_TERM_WTTM && (!(t->wttm.gamma > 0) || !isfinite(t->wttm.gamma)))
            E_FAIL(KD_ERR_VALUE, "term %d (wttm): gamma (%g) must be > 0 and finite", i, t->wttm.gamma);
        if (t->kind == KD_TERM_MLKD) {
            if (t->mlkd.n_temps < 1 || t->mlkd.n_temps > KD_MLKD_MAX_TEMPS)
                E_FAIL(KD_ERR_VALUE, "term %d (mlkd): between 1 and %d temperatures needed, got %d", i, KD_MLKD_MAX_TEMPS,
                       t->mlkd.n_temps);
            for (int j = 0; j < t->mlkd.n_temps; j++)
                if (!(t->mlkd.temps[j] > 0) || !isfinite(t->mlkd.temps[j]))
                    E_FAIL(KD_ERR_VALUE, "term %d (mlkd): temperatures[%d] (%g) must be > 0 and finite", i, j,
                           t->mlkd.temps[j]);
            if (!(t->mlkd.percentile >= 0 && t->mlkd.percentile <= 100))
                E_FAIL(KD_ERR_VALUE, "term %d (mlkd): percentile (%g) must be in [0, 100]", i, t->mlkd.percentile);
        }
        if (t->kind == KD_TERM_OFD && !t->ofd.margin) E_FAIL(KD_ERR_VALUE, "term %d (ofd): ofd.margin is NULL", i);
        if (t->kind == KD_TERM_CRD) {
            if (!t->crd.bank) E_FAIL(KD_ERR_VALUE, "term %d (crd): crd.bank is NULL", i);
            if (kd_crd_n_data(t->crd.bank) != L->ds->n)
                E_FAIL(KD_ERR_SHAPE, "term %d (crd): the bank has %lld rows, the data set %d samples", i,
                       (long long)kd_crd_n_data(t->crd.bank), L->ds->n);
            if (ref_per(E, t->a) != (size_t)kd_crd_dim(t->crd.bank))
                E_FAIL(KD_ERR_SHAPE, "term %d (crd): embeddings of %zu values, the bank's rows %d", i, ref_per(E, t->a),
                       kd_crd_dim(t->crd.bank));
        }
        if (t->kind == KD_TERM_FSP) {
            if (ns != 2) E_FAIL(KD_ERR_VALUE, "term %d (fsp): the source lists the teacher's two maps, got %d", i, ns);
            KD_TRY(check_ref(E, t->fsp.a2, "fsp.a2", i, kn));
            if (E->n[t->fsp.a2.net].backprop)
                KD_TRY(add_slot(E, t->fsp.a2.net, ref_node(E, t->fsp.a2), ref_per(E, t->fsp.a2)));
        }
        // Gradient slots for every trained input the term writes to.
        if (E->n[t->a.net].backprop) KD_TRY(add_slot(E, t->a.net, ref_node(E, t->a), per));
        for (int j = 0; j < ns && t->src.grad; j++)
            if (E->n[t->src.ref[j].net].backprop)
                KD_TRY(add_slot(E, t->src.ref[j].net, ref_node(E, t->src.ref[j]), ref_per(E, t->src.ref[j])));
    }
    if (s->monitor.n < 0 || s->monitor.n > KD_SOURCE_MAX) E_FAIL(KD_ERR_VALUE, "monitor.n must be in [0, %d]", KD_SOURCE_MAX);
    for (int j = 0; j < s->monitor.n; j++) {
        KD_TRY(check_ref(E, s->monitor.ref[j], "monitor", -1, "monitor"));
        if (s->monitor.ref[j].view != s->monitor.ref[0].view) E_FAIL(KD_ERR_VALUE, "the monitor reads one view");
        if (ref_per(E, s->monitor.ref[j]) != (size_t)E->V) E_FAIL(KD_ERR_SHAPE, "the monitor reads %zu values per sample, not logits",
                                                                    ref_per(E, s->monitor.ref[j]));
    }
    return KD_OK;
}

static void engine_free(struct engine * E) {
    for (int i = 0; i < E->n_slots; i++) free(E->slots[i].g);
    free(E->slots);
    for (int i = 0; i < KD_STEP_MAX_NETS; i++) {
        struct snet * sn = &E->n[i];
        if (sn->kept_before && sn->c && sn->c->net)
            for (int k = 0; k < kd_net_num_nodes(sn->c->net); k++) kd_net_keep(sn->c->net, k, sn->kept_before[k]);
        free(sn->kept_before); free(sn->cached); free(sn->noisy); free(sn->dinp);
        // The net must not keep pointers into the step's buffers past the epoch.
        for (int k = 0; sn->c && k < sn->c->n_inputs && k < KD_STEP_MAX_INPUTS; k++) {
            struct kd_net * net = sn->c->net;
            const int nd = sn->ext_node[k];
            int ec, eh, ew;
            kd_net_node_shape(net, nd, &ec, &eh, &ew);
            if (ec > 0 && kd_net_node_spec(net, nd)->type == KD_LAYER_INPUT) kd_net_set_input(net, nd, NULL, ec, eh, ew, NULL);
            free(sn->ext_grad[k]);
        }
    }
    free(E->scratch); free(E->dsrc); free(E->mix); free(E->tmp);
    for (int t = 0; t < KD_STEP_MAX_TERMS; t++) free(E->term_scratch[t]);
}

// Every node a term, the monitor or a connector reads stays readable after the forwards:
// kept (inference forwards keep only kept nodes; lean forwards do not overwrite them).
static enum kd_status keep_read_nodes(struct engine * E) {
    const struct kd_step_cfg * s = E->s;
    for (int i = 0; i < s->n_nets; i++) {
        struct kd_net * net = s->nets[i].net;
        if (!net) continue;
        const int nn = kd_net_num_nodes(net);
        E->n[i].kept_before = malloc((size_t)nn * sizeof(bool));
        if (!E->n[i].kept_before) E_FAIL(KD_ERR_NOMEM, "cannot allocate");
        for (int k = 0; k < nn; k++) E->n[i].kept_before[k] = kd_net_kept(net, k);
    }
#define KEEP(r) do { struct kd_ref r_ = (r); if (s->nets[r_.net].net) kd_net_keep(s->nets[r_.net].net, ref_node(E, r_), true); } while (0)
    for (int t = 0; t < s->n_terms; t++) {
        KEEP(s->terms[t].a);
        if (s->terms[t].kind == KD_TERM_FSP) KEEP(s->terms[t].fsp.a2);
        if (s->terms[t].kind == KD_TERM_CTKD && s->terms[t].ctkd.instance) KEEP(s->terms[t].ctkd.temp);
        for (int j = 0; j < s->terms[t].src.n; j++) KEEP(s->terms[t].src.ref[j]);
    }
    for (int j = 0; j < s->monitor.n; j++) KEEP(s->monitor.ref[j]);
    for (int i = 0; i < s->n_nets; i++) {
        if (s->nets[i].input_net >= 0) KEEP(((struct kd_ref){ s->nets[i].input_net, s->nets[i].input_node, 0 }));
        for (int k = 0; k < s->nets[i].n_inputs; k++) KEEP(s->nets[i].inputs[k]);
    }
#undef KEEP
    return KD_OK;
}

static enum kd_status engine_alloc(struct engine * E) {
    const struct kd_step_cfg * s = E->s;
    struct loop * L = E->L;
    const size_t B = (size_t)L->B, px = (size_t)L->ds->c * L->ds->h * L->ds->w;
    size_t per_term = 4 * E->BV + 2 * B, maxper = E->BV;
    for (int t = 0; t < s->n_terms; t++) {
        size_t p = ref_per(E, s->terms[t].a);
        if (p > maxper) maxper = p;
        for (int j = 0; j < s->terms[t].src.n; j++)
            if ((p = ref_per(E, s->terms[t].src.ref[j])) > maxper) maxper = p;
    }
    E->scratch = malloc(((size_t)(s->n_terms ? s->n_terms : 1) * per_term) * sizeof(float));
    E->dsrc = malloc(maxper * B * sizeof(float));
    E->mix = malloc(maxper * B * sizeof(float));
    E->tmp = malloc(E->BV * sizeof(float));
    if (!E->scratch || !E->dsrc || !E->mix || !E->tmp) E_FAIL(KD_ERR_NOMEM, "cannot allocate the step's buffers");
    if (E->views & 2u) {
        L->aug2 = &s->view_aug;
        if (!(L->x2 = malloc(px * B * sizeof(float)))) E_FAIL(KD_ERR_NOMEM, "cannot allocate the second view");
    }
    for (int t = 0; t < s->n_terms; t++) {
        if (s->terms[t].kind != KD_TERM_CRD) continue;
        // normalised rows of both sides and their gradients (4 B d floats), 2 B inverse norms
        const size_t nd = B * ref_per(E, s->terms[t].a);
        if (!(E->term_scratch[t] = malloc(4 * nd * sizeof(float) + 2 * B * sizeof(double))))
            E_FAIL(KD_ERR_NOMEM, "cannot allocate the CRD term's buffers");
    }
    for (int i = 0; i < s->n_nets; i++) {
        struct snet * sn = &E->n[i];
        const struct kd_step_net * c = sn->c;
        if (c->logits && !(sn->cached = malloc(E->BV * sizeof(float)))) E_FAIL(KD_ERR_NOMEM, "cannot allocate");
        if (c->input_noise > 0 && c->input_net < 0 && !(sn->noisy = malloc(px * B * sizeof(float))))
            E_FAIL(KD_ERR_NOMEM, "cannot allocate");
        if (sn->connector && E->n[c->input_net].backprop && !c->detach_input) {
            size_t p = ref_per(E, (struct kd_ref){ c->input_net, c->input_node, 0 });
            if (!(sn->dinp = malloc(p * B * sizeof(float)))) E_FAIL(KD_ERR_NOMEM, "cannot allocate");
        }
        for (int k = 0; k < c->n_inputs; k++)
            if (E->n[c->inputs[k].net].backprop && !c->detach_input && !(sn->ext_grad[k] = malloc(ref_per(E, c->inputs[k]) * B * sizeof(float))))
                E_FAIL(KD_ERR_NOMEM, "cannot allocate");
    }
    return KD_OK;
}

enum kd_status kd_step_run_(const struct kd_step_cfg * s, const struct kd_dataset * ds, const struct kd_train_cfg * cfg,
                            int epoch, struct kd_step_stats * out, const char * fn) {
    if (!s) return kd_set_error_(KD_ERR_VALUE, fn, "step config must not be NULL");
    struct loop L;
    KD_TRY(loop_init(&L, fn, ds, cfg, epoch));
    struct engine E;
    memset(&E, 0, sizeof E);
    E.s = s;
    E.L = &L;
    enum kd_status st = KD_OK;
    double s_net[KD_STEP_MAX_NETS] = {0}, s_term[KD_STEP_MAX_TERMS] = {0}, s_part[KD_STEP_MAX_TERMS][2] = {{0}};
    int64_t net_correct[KD_STEP_MAX_NETS] = {0}, term_correct[KD_STEP_MAX_TERMS] = {0}, mon_correct = 0, seen = 0;
    int64_t term_seen[KD_STEP_MAX_TERMS] = {0};   // samples of the steps in which each term ran
    bool on[KD_STEP_MAX_TERMS] = {0};             // the terms of this step's phase
    float tw[KD_STEP_MAX_TERMS] = {0};
    struct term_out to[KD_STEP_MAX_TERMS];
    struct { int64_t steps; float z[2]; } crd_saved[KD_STEP_MAX_TERMS];
    if ((st = engine_setup(&E)) != KD_OK || (st = keep_read_nodes(&E)) != KD_OK || (st = engine_alloc(&E)) != KD_OK) {
        goto done;
    }
    const int n_phases = s->cycle > 1 ? s->cycle : 1;
    if (s->cycle_batch) {
        L.per_batch = n_phases;
        L.steps_per_epoch *= n_phases;
        L.steps = cfg->max_steps > 0 && cfg->max_steps < L.steps_per_epoch ? cfg->max_steps : L.steps_per_epoch;
        L.pr.steps_total = (int)L.steps;
    }
    {
        // Skip mode: nets whose forwards update BN statistics are saved before every step.
        struct kd_net * bn_nets[KD_STEP_MAX_NETS];
        int n_bn = 0;
        for (int i = 0; i < s->n_nets; i++)
            if (s->nets[i].net && (s->nets[i].mode & KD_MODE_BN_BATCH)) bn_nets[n_bn++] = s->nets[i].net;
        if ((st = loop_guard_bn(&L, bn_nets, n_bn)) != KD_OK) goto done;
    }
    for (int t = 0; t < s->n_terms; t++) tw[t] = kd_term_weight_(&s->terms[t], epoch);
    const int V = E.V;
    while (L.step < L.steps) {
        if ((st = loop_batch(&L)) != KD_OK) goto done;
        loop_save_bn(&L);
        const int nb = L.nb, phase = (int)(L.step % n_phases);
        for (int i = 0; i < s->n_nets; i++) {
            E.n[i].bp = E.n[i].bp_phases >> phase & 1;
            E.n[i].upd = E.n[i].upd_phases >> phase & 1;
        }
        for (int t = 0; t < s->n_terms; t++) on[t] = !s->terms[t].phases || (s->terms[t].phases >> phase & 1);
        // A CRD bank's draw counter and Z (set by its first batch) are saved first: a dropped
        // step puts them back.
        for (int t = 0; t < s->n_terms; t++) {
            if (s->terms[t].kind != KD_TERM_CRD) continue;
            crd_saved[t].steps = *kd_crd_steps(s->terms[t].crd.bank);
            memcpy(crd_saved[t].z, kd_crd_z(s->terms[t].crd.bank), sizeof crd_saved[t].z);
        }
        // This step's accuracy counts, committed when it completes: each on the view it reads.
        int64_t step_net_correct[KD_STEP_MAX_NETS] = {0}, step_term_correct[KD_STEP_MAX_TERMS] = {0}, step_mon = 0;
        for (int v = E.first_view; v <= E.last_view; v++) {
            if (!(E.views >> v & 1)) continue;
            const float * xv = v ? L.x2 : L.x;
            const uint64_t vseed = v ? L.sseed2 : L.sseed;
            // Forwards, in the step's order (a connector after the net it reads).
            for (int i = 0; i < s->n_nets; i++) {
                struct snet * sn = &E.n[i];
                const struct kd_step_net * c = sn->c;
                if (c->params_only) {
                    if (v == E.first_view) kd_net_zero_grad(c->net);   // the terms add their parameters' gradients
                    continue;
                }
                if (!(sn->views >> v & 1)) continue;
                if (c->logits) {
                    for (int r = 0; r < nb; r++)
                        memcpy(sn->cached + (size_t)r * V, c->logits + (size_t)L.idx[r] * V, (size_t)V * sizeof(float));
                    continue;
                }
                const float * x = xv;
                int C = ds->c, H = ds->h, W = ds->w;
                if (sn->connector) {
                    struct kd_ref in = { c->input_net, c->input_node, v };
                    x = ref_data(&E, in);
                    ref_shape(&E, in, &C, &H, &W);
                    for (int k = 0; k < c->n_inputs; k++) {
                        int ec, eh, ew;
                        ref_shape(&E, c->inputs[k], &ec, &eh, &ew);
                        st = kd_net_set_input(c->net, sn->ext_node[k], ref_data(&E, c->inputs[k]), ec, eh, ew, sn->ext_grad[k]);
                        if (st != KD_OK) goto done;
                    }
                } else if (c->input_noise > 0) {
                    x = loop_noisy_input(&L, xv, vseed, c->input_noise, sn->noisy);
                }
                if (c->shares) {
                    struct kd_net * o = s->nets[c->shares - 1].net;
                    memcpy(kd_net_params(c->net), kd_net_params(o), kd_net_num_params(o) * sizeof(float));
                }
                // Frozen nets run inference forwards; trained ones lean forwards (every node a
                // term reads is kept, so the lean layout leaves it readable).
                unsigned mode = c->mode | (sn->bp ? KD_MODE_LEAN : KD_MODE_NO_GRAD);
                if ((st = kd_net_forward(c->net, x, nb, C, H, W, mode, vseed ^ c->salt)) != KD_OK) goto done;
            }
            // Terms: values and gradients at the slots.
            for (int g = 0; g < E.n_slots; g++) E.slots[g].touched = false;
            for (int t = 0; t < s->n_terms; t++) {
                const struct kd_term * term = &s->terms[t];
                if (term->a.view != v) continue;
                if (tw[t] == 0 || !on[t]) { memset(&to[t], 0, sizeof to[t]); continue; }
                st = term_run(&E, term, tw[t], E.scratch + (size_t)t * (4 * E.BV + 2 * (size_t)L.B), &to[t]);
                if (st == KD_ERR_NONFINITE || !isfinite(to[t].value) || !isfinite(to[t].contrib)) {
                    const char * role = s->nets[term->a.net].role;
                    NONFINITE_STEP(term->name ? term->name : kd_term_kinds[term->kind].what, role ? role : "net");
                }
                if (st != KD_OK) goto done;
            }
            // Backwards, last net first: a connector's input gradient joins the net it reads
            // before that net's own backward. Every check runs before any update, so that a
            // dropped step leaves every net as it was.
            for (int i = s->n_nets - 1; i >= 0; i--) {
                struct snet * sn = &E.n[i];
                if (!sn->bp || (!sn->c->params_only && !(sn->views >> v & 1))) continue;
                struct kd_net * net = sn->c->net;
                if (sn->c->params_only) {
                    if (!all_finite(kd_net_grads(net), kd_net_num_params(net)))
                        NONFINITE_STEP("gradient", sn->c->role ? sn->c->role : "parameters");
                    continue;
                }
                const int outn = kd_net_output_node(net);
                const float * dout = NULL;
                for (int g = 0; g < E.n_slots; g++) {
                    const struct gslot * gs = &E.slots[g];
                    if (gs->net != i || !gs->touched) continue;
                    if (gs->node == outn) dout = gs->g;
                    else if ((st = kd_net_grad_add(net, gs->node, gs->g, 1.0f)) != KD_OK) goto done;
                }
                if (v == sn->first_view) kd_net_zero_grad(net);   // later views add to the first's gradient
                // The input gradient only when the net it reads runs its backward in this phase.
                float * dinp = sn->dinp && E.n[sn->c->input_net].bp ? sn->dinp : NULL;
                if ((st = kd_net_backward(net, dout, dinp)) != KD_OK) goto done;
                const char * role = sn->c->role ? sn->c->role : "net";
                if (!grads_and_stats_finite(net)) NONFINITE_STEP("gradient or BN statistics", role);
                if (dinp) {
                    struct kd_ref in = { sn->c->input_net, sn->c->input_node, v };
                    if (!all_finite(sn->dinp, (size_t)nb * ref_per(&E, in))) NONFINITE_STEP("input gradient", role);
                    if ((st = kd_net_grad_add(s->nets[in.net].net, ref_node(&E, in), sn->dinp, 1.0f)) != KD_OK) goto done;
                }
                for (int k = 0; k < sn->c->n_inputs; k++) {
                    const struct kd_ref in = sn->c->inputs[k];
                    if (!sn->ext_grad[k] || !E.n[in.net].bp) continue;
                    if (!all_finite(sn->ext_grad[k], (size_t)nb * ref_per(&E, in))) NONFINITE_STEP("input gradient", role);
                    if ((st = kd_net_grad_add(s->nets[in.net].net, ref_node(&E, in), sn->ext_grad[k], 1.0f)) != KD_OK) goto done;
                }
                // passing on: only the input gradient was wanted (a twin's gradient waits for the
                // backward of the net it shares, which clears that net's gradient first)
                if (!sn->upd && !(sn->c->shares && E.n[sn->c->shares - 1].upd)) kd_net_zero_grad(net);
            }
            // Accuracies of this view (its outputs are overwritten by the next view's forwards).
            for (int t = 0; t < s->n_terms; t++) {
                const struct kd_term * term = &s->terms[t];
                if (!on[t] || term->a.view != v) continue;
                if (kd_term_kinds[term->kind].logits) step_term_correct[t] += count_correct(ref_data(&E, term->a), L.y, nb, V);
                if (term->kind == KD_TERM_BCE)
                    step_term_correct[t] += count_sign(ref_data(&E, term->a), ref_per(&E, term->a), term->bce.target, nb);
            }
            for (int i = 0; i < s->n_nets; i++)
                if (!E.n[i].connector && !s->nets[i].params_only && E.n[i].V == V && E.n[i].first_view == v)
                    step_net_correct[i] += count_correct(ref_data(&E, (struct kd_ref){ i, -1, v }), L.y, nb, V);
            // (into E.mix, not a term's scratch: the learned gates read theirs after the views)
            if (s->monitor.n > 0 && s->monitor.ref[0].view == v) {
                float gw[KD_SOURCE_MAX];
                source_weights(&s->monitor, L.sseed, gw);
                step_mon += count_correct(source_pred(&E, &s->monitor, gw, E.mix), L.y, nb, V);
            }
        }
        for (int i = 0; i < s->n_nets; i++) {
            const struct kd_step_net * c = &s->nets[i];
            if (!c->shares || !E.n[i].bp || !E.n[c->shares - 1].upd) continue;
            struct kd_net * o = s->nets[c->shares - 1].net;
            float * go = kd_net_grads(o);
            const float * gt = kd_net_grads(c->net);
            for (size_t k = 0; k < kd_net_num_params(o); k++) go[k] += gt[k];
            kd_net_zero_grad(c->net);
        }
        // State moves once every check has passed: CRD's banks take the step's embeddings,
        // learned gates their SGD step (the next step reads them again).
        for (int t = 0; t < s->n_terms; t++) {
            const struct kd_term * term = &s->terms[t];
            if (term->kind == KD_TERM_CRD && tw[t] != 0 && on[t]) {
                const size_t nd = (size_t)nb * ref_per(&E, term->a);
                const float * es = E.term_scratch[t];
                if ((st = kd_crd_update(term->crd.bank, es, es + nd, L.idx, nb)) != KD_OK) goto done;
            }
        }
        for (int t = 0; t < s->n_terms; t++) {
            const struct kd_term * term = &s->terms[t];
            if (!term->src.gates || !(term->src.gate_lr > 0) || tw[t] == 0 || !on[t]) continue;
            float gw[KD_SOURCE_MAX];
            source_weights(&term->src, L.sseed, gw);
            float * sc = E.scratch + (size_t)t * (4 * E.BV + 2 * (size_t)L.B);
            update_gates(&E, term, gw, sc, ref_data(&E, term->a), term->conditional ? sc + 4 * E.BV : NULL, tw[t],
                         sc + 2 * E.BV, sc + 3 * E.BV);
        }
        for (int i = 0; i < s->n_nets; i++) {
            const struct kd_step_net * c = &s->nets[i];
            if (!c->opt || !E.n[i].upd) continue;
            if (c->clip_norm > 0) clip_grad_norm(c->net, c->clip_norm);
            if ((st = kd_optim_step(c->opt, L.lr * (c->lr_scale > 0 ? c->lr_scale : 1.0f))) != KD_OK) goto done;
        }
        // Statistics of the completed step.
        for (int t = 0; t < s->n_terms; t++) {
            const struct kd_term * term = &s->terms[t];
            if (!on[t]) continue;
            term_seen[t] += nb;
            s_term[t] += (double)to[t].value * nb;
            s_part[t][0] += (double)to[t].part[0] * nb;
            s_part[t][1] += (double)to[t].part[1] * nb;
            s_net[term->a.net] += to[t].contrib * nb;
            term_correct[t] += step_term_correct[t];
        }
        for (int i = 0; i < s->n_nets; i++) net_correct[i] += step_net_correct[i];
        mon_correct += step_mon;
        seen += nb;
        goto stepped;
skip:
        loop_skip(&L);
        for (int t = 0; t < s->n_terms; t++) {
            if (s->terms[t].kind != KD_TERM_CRD) continue;
            *kd_crd_steps(s->terms[t].crd.bank) = crd_saved[t].steps;
            memcpy(kd_crd_z(s->terms[t].crd.bank), crd_saved[t].z, sizeof crd_saved[t].z);
        }
stepped:
        if ((st = loop_after_step(&L, s_net[s->logits_net], net_correct[s->logits_net], seen)) != KD_OK) goto done;
    }
done:
    if (out) {
        memset(out, 0, sizeof *out);
        const double n = seen ? (double)seen : 1.0;
        for (int i = 0; i < s->n_nets && i < KD_STEP_MAX_NETS; i++) {
            out->net_loss[i] = s_net[i] / n;
            out->net_accuracy[i] = net_correct[i] / n;
        }
        for (int t = 0; t < s->n_terms && t < KD_STEP_MAX_TERMS; t++) {
            const double nt = term_seen[t] ? (double)term_seen[t] : 1.0;
            out->term_value[t] = s_term[t] / nt;
            out->term_part[t][0] = s_part[t][0] / nt;
            out->term_part[t][1] = s_part[t][1] / nt;
            out->term_accuracy[t] = term_correct[t] / nt;
            out->term_weight[t] = tw[t];
        }
        out->monitor_accuracy = mon_correct / n;
        out->samples = seen;
        out->steps = L.step;
        out->skipped_steps = L.skipped;
        out->lr = L.lr;
    }
    engine_free(&E);
    loop_free(&L);
    return st;
}

enum kd_status kd_step_epoch(const struct kd_step_cfg * step, const struct kd_dataset * ds,
                             const struct kd_train_cfg * cfg, int epoch, struct kd_step_stats * out) {
    return kd_step_run_(step, ds, cfg, epoch, out, __func__);
}

enum kd_status kd_step_batch(const struct kd_dataset * ds, const struct kd_train_cfg * cfg,
                             const struct kd_augment * view_aug, int epoch, int64_t batch, int64_t * idx, float * x0,
                             float * x1, int * nb) {
    if (!idx || !x0 || (view_aug && !x1) || !nb) KD_FAIL(KD_ERR_VALUE, "idx, x0, nb (and x1 with view_aug) must not be NULL");
    struct loop L;
    KD_TRY(loop_init(&L, __func__, ds, cfg, epoch));
    enum kd_status st = KD_OK;
    if (batch < 0 || batch >= L.steps_per_epoch) {
        st = kd_set_error_(KD_ERR_VALUE, __func__, "batch (%lld) must be in [0, %lld)", (long long)batch,
                           (long long)L.steps_per_epoch);
        goto done;
    }
    if (view_aug) {
        L.aug2 = view_aug;
        if (!(L.x2 = malloc((size_t)L.B * ds->c * ds->h * ds->w * sizeof(float)))) {
            st = kd_set_error_(KD_ERR_NOMEM, __func__, "cannot allocate the second view");
            goto done;
        }
    }
    L.step = batch;
    if ((st = loop_batch(&L)) != KD_OK) goto done;
    const size_t n = (size_t)L.nb * ds->c * ds->h * ds->w;
    memcpy(idx, L.idx, (size_t)L.nb * sizeof(int64_t));
    memcpy(x0, L.x, n * sizeof(float));
    if (view_aug) memcpy(x1, L.x2, n * sizeof(float));
    *nb = L.nb;
done:
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

