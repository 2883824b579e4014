// The training schemes of kdcore.h as configurations of the step engine (train.c): each
// function validates its scheme's options, lists the nets and loss terms of one step, runs
// the engine and reports the scheme's statistics. No scheme has a loop of its own.
#include "kd_internal.h"

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

// The teacher forwards' and trained nets' dropout salts, fixed so that masks do not depend on
// how a scheme orders its nets.
enum { SALT_STUDENT = 0x57D0, SALT_TEACHER = 0x7EAC0, SALT_SL = 0x5100, SALT_PEER = 0x9EE0 };

static struct kd_step_net trained_net(struct kd_net * net, struct kd_optim * opt, uint64_t salt, const char * role) {
    return (struct kd_step_net){ .net = net, .opt = opt, .mode = KD_MODE_TRAIN, .input_net = -1, .input_node = -1,
                                 .salt = salt, .role = role };
}

static struct kd_step_net frozen_net(struct kd_net * net, const float * logits, unsigned mode, uint64_t salt,
                                     const char * role) {
    return (struct kd_step_net){ .net = net, .logits = logits, .mode = mode, .input_net = -1, .input_node = -1,
                                 .salt = salt, .role = role };
}

static struct kd_term logit_term(enum kd_term_kind kind, int net, int node, float weight, float T, const char * name) {
    struct kd_term t = kd_term_default(kind);
    t.a = (struct kd_ref){ net, node, 0 };
    t.weight = weight;
    t.T = T;
    t.name = name;
    return t;
}

// A source over nets [first, first + n) (their outputs).
static struct kd_source nets_source(int first, int n, enum kd_mix mix) {
    struct kd_source s;
    memset(&s, 0, sizeof s);
    s.n = n;
    s.mix = mix;
    for (int j = 0; j < n; j++) s.ref[j] = (struct kd_ref){ first + j, -1, 0 };
    return s;
}

static bool augmented(const struct kd_train_cfg * cfg) {
    return cfg && (cfg->aug.crop_padding > 0 || cfg->aug.hflip || cfg->aug.noise_std > 0);
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
    if (!(d->tolerant_weight >= 0)) KD_FAIL(KD_ERR_VALUE, "tolerant_weight (%g) must be >= 0", d->tolerant_weight);
    if (d->kind != KD_DISTILL_NONE && n_teachers < 1) KD_FAIL(KD_ERR_VALUE, "distillation needs at least one teacher");
    if (d->kind == KD_DISTILL_NONE && d->conditional) KD_FAIL(KD_ERR_VALUE, "conditional needs a distillation kind");
    if (d->conditional && d->kind != KD_DISTILL_KD)
        KD_FAIL(KD_ERR_VALUE, "conditional learning is defined for KD (its per-sample mask has no DKD or MSE form)");
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

enum kd_status kd_distill_epoch(struct kd_net * student, struct kd_optim * opt,
                                struct kd_net * const * teachers, const float * const * teacher_logits,
                                int n_teachers, const struct kd_dataset * ds,
                                const struct kd_train_cfg * cfg, const struct kd_distill_cfg * dcfg,
                                int epoch, struct kd_distill_stats * out) {
    if (!student || !opt || !dcfg) KD_FAIL(KD_ERR_VALUE, "student, optimizer and distillation config must not be NULL");
    if (n_teachers < 0 || n_teachers > KD_SOURCE_MAX)
        KD_FAIL(KD_ERR_VALUE, "n_teachers (%d) must be in [0, %d]", n_teachers, KD_SOURCE_MAX);
    KD_TRY(check_distill_cfg(dcfg, n_teachers));
    if (n_teachers > 0 && !teachers == !teacher_logits)
        KD_FAIL(KD_ERR_VALUE, "pass either teacher nets or cached teacher logits");
    if (teacher_logits && augmented(cfg))
        KD_FAIL(KD_ERR_VALUE, "cached teacher logits cannot follow augmented inputs; pass the teacher nets");
    const bool distill = dcfg->kind != KD_DISTILL_NONE && n_teachers > 0;
    const char * who = n_teachers ? "student" : "model";   // plain training has no student
    struct kd_step_net nets[1 + KD_SOURCE_MAX];
    nets[0] = trained_net(student, opt, SALT_STUDENT, who);
    nets[0].input_noise = dcfg->student_noise;
    const int nt = distill ? n_teachers : 0;
    for (int t = 0; t < nt; t++)
        nets[1 + t] = frozen_net(teachers ? teachers[t] : NULL, teacher_logits ? teacher_logits[t] : NULL,
                                 dcfg->teacher_mode, SALT_TEACHER + (uint64_t)t, "teacher");
    struct kd_term terms[3];
    int n_terms = 0, i_kd = -1, i_tol = -1;
    terms[n_terms++] = logit_term(KD_TERM_CE, 0, -1, dcfg->ce_weight, dcfg->T, "cross-entropy");
    struct kd_step_cfg step = { .nets = nets, .n_nets = 1 + nt, .terms = terms };
    if (distill) {
        static const enum kd_term_kind kinds[] = { [KD_DISTILL_KD] = KD_TERM_KD, [KD_DISTILL_DKD] = KD_TERM_DKD,
                                                   [KD_DISTILL_MSE] = KD_TERM_MSE };
        struct kd_term t = logit_term(kinds[dcfg->kind], 0, -1, dcfg->kd_weight, dcfg->T, "distillation loss");
        // Several teachers: one KD term against their mixture of softened outputs (eqs.
        // 23-24), or the weighted sum of per-teacher terms (DGKD, DKD, MSE).
        const bool probs = dcfg->kind == KD_DISTILL_KD && dcfg->multi == KD_MULTI_AVG_PROB;
        t.src = nets_source(1, nt, probs ? KD_MIX_PROBS : KD_MIX_LOSSES);
        for (int j = 0; j < nt && dcfg->teacher_weights; j++) t.src.w[j] = dcfg->teacher_weights[j];
        t.src.drop = dcfg->teacher_drop;
        t.src.gates = dcfg->gate_logits;
        t.src.gate_lr = dcfg->gate_lr;
        t.alpha = dcfg->dkd_alpha;
        t.beta = dcfg->dkd_beta;
        t.warmup_epochs = dcfg->warmup_epochs;
        t.stop_epoch = dcfg->kd_stop_epoch;
        t.conditional = dcfg->conditional;
        i_kd = n_terms;
        terms[n_terms++] = t;
        // The teachers' accuracy: the first teacher, or for several the same weighted
        // mixture (with the same drops) of their probabilities at T = 1.
        step.monitor = t.src;
        step.monitor.mix = KD_MIX_PROBS;
        step.monitor.gate_lr = 0;
    }
    if (dcfg->tolerant_weight > 0) {
        struct kd_term t = logit_term(KD_TERM_TOLERANT, 0, -1, dcfg->tolerant_weight, dcfg->T, "tolerant loss");
        t.k = dcfg->tolerant_k;
        i_tol = n_terms;
        terms[n_terms++] = t;
    }
    step.n_terms = n_terms;
    struct kd_step_stats s;
    enum kd_status st = kd_step_run_(&step, ds, cfg, epoch, &s, __func__);
    if (out) {
        memset(out, 0, sizeof *out);
        out->loss = s.net_loss[0];
        out->ce = s.term_value[0];
        if (i_kd >= 0) {
            out->kd = s.term_value[i_kd];
            out->tckd = s.term_part[i_kd][0];
            out->nckd = s.term_part[i_kd][1];
        }
        if (i_tol >= 0) out->tolerant = s.term_value[i_tol];
        out->accuracy = s.net_accuracy[0];
        out->teacher_accuracy = s.monitor_accuracy;
        out->samples = s.samples;
        out->steps = s.steps;
        out->skipped_steps = s.skipped_steps;
        out->lr = s.lr;
        out->kd_weight = i_kd >= 0 ? s.term_weight[i_kd] : kd_term_weight_(&(struct kd_term){
            .weight = dcfg->kd_weight, .warmup_epochs = dcfg->warmup_epochs, .stop_epoch = dcfg->kd_stop_epoch }, epoch);
    }
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
// Deep mutual learning / online ensemble: every peer is trained; peer a's terms are CE and
// KD against the other peers (their mean term) or against the detached mean of all peers'
// logits (ensemble).

enum kd_status kd_mutual_epoch(struct kd_net * const * nets, struct kd_optim * const * opts, int k,
                               const struct kd_dataset * ds, const struct kd_train_cfg * cfg,
                               const struct kd_mutual_cfg * m, int epoch, struct kd_distill_stats * out) {
    if (!nets || !opts || !m) KD_FAIL(KD_ERR_VALUE, "nets, optimizers and config must not be NULL");
    if (k < 2 || k > 16) KD_FAIL(KD_ERR_VALUE, "mutual learning needs 2..16 peers, got %d", k);
    if (!(m->T > 0) || !isfinite(m->T)) KD_FAIL(KD_ERR_VALUE, "T (%g) must be > 0", m->T);
    if (!(m->ce_weight >= 0) || !(m->kd_weight >= 0)) KD_FAIL(KD_ERR_VALUE, "ce_weight and kd_weight must be >= 0");
    struct kd_step_net sn[16];
    struct kd_term terms[32];
    for (int a = 0; a < k; a++) {
        sn[a] = trained_net(nets[a], opts[a], SALT_PEER + (uint64_t)a, "peer");
        terms[2 * a] = logit_term(KD_TERM_CE, a, -1, m->ce_weight, m->T, "loss");
        struct kd_term t = logit_term(KD_TERM_KD, a, -1, m->kd_weight, m->T, "loss");
        if (m->ensemble) {
            t.src = nets_source(0, k, KD_MIX_LOGITS);
        } else {
            t.src.n = 0;
            t.src.mix = KD_MIX_LOSSES;
            for (int b = 0; b < k; b++) if (b != a) t.src.ref[t.src.n++] = (struct kd_ref){ b, -1, 0 };
        }
        terms[2 * a + 1] = t;
    }
    struct kd_step_cfg step = { .nets = sn, .n_nets = k, .terms = terms, .n_terms = 2 * k,
                                .monitor = nets_source(0, k, KD_MIX_LOGITS) };   // the peers' logit average
    struct kd_step_stats s;
    enum kd_status st = kd_step_run_(&step, ds, cfg, epoch, &s, __func__);
    for (int a = 0; out && a < k; a++) {
        memset(&out[a], 0, sizeof out[a]);
        out[a].loss = s.net_loss[a];
        out[a].ce = s.term_value[2 * a];
        out[a].kd = s.term_value[2 * a + 1];
        out[a].accuracy = s.net_accuracy[a];
        out[a].teacher_accuracy = s.monitor_accuracy;
        out[a].samples = s.samples; out[a].steps = s.steps; out[a].lr = s.lr; out[a].kd_weight = m->kd_weight;
        out[a].skipped_steps = s.skipped_steps;
    }
    return st;
}

// ---------------------------------------------------------------------------------------
// SLKD: nets student, teacher, SL-teachers; the student's terms are eq. 7 expanded (the CE
// of L_TS and L_SLTS add up to (lambda + eta) alpha CE), each SL-teacher's eqs. 4-5.

enum kd_status kd_slkd_epoch(struct kd_net * student, struct kd_optim * opt,
                             struct kd_net * const * sl, struct kd_optim * const * sl_opts,
                             struct kd_net * teacher, const float * teacher_logits,
                             const struct kd_dataset * ds, const struct kd_train_cfg * cfg,
                             const struct kd_slkd_cfg * c, int epoch, struct kd_slkd_stats * out) {
    if (!student || !opt || !sl || !c) KD_FAIL(KD_ERR_VALUE, "student, optimizer, SL-teachers and config must not be NULL");
    if (c->n_sl < 1 || c->n_sl > 2) KD_FAIL(KD_ERR_VALUE, "n_sl (%d) must be 1 or 2", c->n_sl);
    if (!c->sl_frozen && !sl_opts) KD_FAIL(KD_ERR_VALUE, "trainable SL-teachers need optimizers");
    if (!teacher == !teacher_logits) KD_FAIL(KD_ERR_VALUE, "pass either the teacher net or cached teacher logits");
    if (teacher_logits && augmented(cfg))
        KD_FAIL(KD_ERR_VALUE, "cached teacher logits cannot follow augmented inputs; pass the teacher net");
    if (!(c->T > 0) || !isfinite(c->T)) KD_FAIL(KD_ERR_VALUE, "T (%g) must be > 0", c->T);
    if (!(c->alpha >= 0 && c->alpha <= 1)) KD_FAIL(KD_ERR_VALUE, "alpha (%g) must be in [0, 1]", c->alpha);
    if (!(c->rho >= 0 && c->rho <= 1)) KD_FAIL(KD_ERR_VALUE, "rho (%g) must be in [0, 1]", c->rho);
    if (!(c->sl_lr_scale >= 0) || !isfinite(c->sl_lr_scale)) KD_FAIL(KD_ERR_VALUE, "sl_lr_scale must be >= 0");
    if (c->sl_grad && c->fuse_probs) KD_FAIL(KD_ERR_VALUE, "sl_grad is supported with logit fusion only");
    if (!(c->lambda >= 0) || !(c->eta >= 0) || !isfinite(c->lambda) || !isfinite(c->eta))
        KD_FAIL(KD_ERR_VALUE, "lambda (%g) and eta (%g) must be finite and >= 0", c->lambda, c->eta);
    const int ns = c->n_sl;
    const float a = c->alpha;
    struct kd_step_net nets[4];
    nets[0] = trained_net(student, opt, SALT_STUDENT, "student");
    nets[1] = frozen_net(teacher, teacher_logits, KD_MODE_EVAL, SALT_TEACHER, "teacher");
    for (int j = 0; j < ns; j++) {
        // Frozen (SLKD* phase 2): eval mode, never updated.
        nets[2 + j] = c->sl_frozen ? frozen_net(sl[j], NULL, KD_MODE_EVAL, SALT_SL + (uint64_t)j, "SL-teacher")
                                   : trained_net(sl[j], sl_opts[j], SALT_SL + (uint64_t)j, "SL-teacher");
        nets[2 + j].lr_scale = c->sl_lr_scale;
    }
    struct kd_term terms[3 + 4];
    int n = 0;
    terms[n++] = logit_term(KD_TERM_CE, 0, -1, (c->lambda + c->eta) * a, c->T, "loss");
    terms[n] = logit_term(KD_TERM_KD, 0, -1, c->lambda * (1 - a), c->T, "loss");   // L_TS
    terms[n++].src = nets_source(1, 1, KD_MIX_LOGITS);
    // The KD term is T^2 KL: its weight over T^2 makes L_SLTS's KD the plain KL of eq. 3.
    const float slts_scale = c->slts_plain_kl ? 1.0f / (c->T * c->T) : 1.0f;
    struct kd_term slts = logit_term(KD_TERM_KD, 0, -1, c->eta * (1 - a) * slts_scale, c->T, "loss");   // L_SLTS, eq. 6 fusion
    slts.src = nets_source(2, ns, c->fuse_probs ? KD_MIX_PROBS : KD_MIX_LOGITS);
    if (ns == 2) { slts.src.w[0] = c->rho; slts.src.w[1] = 1 - c->rho; }
    slts.src.grad = c->sl_grad && !c->sl_frozen;
    terms[n++] = slts;
    for (int j = 0; j < ns && !c->sl_frozen; j++) {   // eqs. 4-5: the SL-teachers learn from the teacher only
        terms[n++] = logit_term(KD_TERM_CE, 2 + j, -1, a, c->T, "loss");
        terms[n] = logit_term(KD_TERM_KD, 2 + j, -1, 1 - a, c->T, "loss");
        terms[n++].src = nets_source(1, 1, KD_MIX_LOGITS);
    }
    struct kd_step_cfg step = { .nets = nets, .n_nets = 2 + ns, .terms = terms, .n_terms = n,
                                .monitor = nets_source(1, 1, KD_MIX_LOGITS) };
    struct kd_step_stats s;
    enum kd_status st = kd_step_run_(&step, ds, cfg, epoch, &s, __func__);
    if (out) {
        memset(out, 0, sizeof *out);
        const double ce = s.term_value[0];
        out->loss = s.net_loss[0];
        out->loss_ts = a * ce + (1 - a) * s.term_value[1];
        out->loss_slts = a * ce + (1 - a) * slts_scale * s.term_value[2];   // term values are unweighted
        out->accuracy = s.net_accuracy[0];
        for (int j = 0; j < ns; j++) {
            out->loss_sl[j] = s.net_loss[2 + j];
            out->sl_accuracy[j] = s.net_accuracy[2 + j];
        }
        out->teacher_accuracy = s.monitor_accuracy;
        out->samples = s.samples; out->steps = s.steps; out->lr = s.lr;
        out->skipped_steps = s.skipped_steps;
    }
    return st;
}

// ---------------------------------------------------------------------------------------
// Multi-exit networks: per exit a CE term and a KD term at the exit's node, against the
// teacher or (self-distillation) the net's own detached output.

enum kd_status kd_exits_epoch(struct kd_net * net, struct kd_optim * opt, const int * exits, int n_exits,
                              struct kd_net * teacher, const float * teacher_logits,
                              const struct kd_dataset * ds, const struct kd_train_cfg * cfg,
                              const struct kd_exits_cfg * e, int epoch, struct kd_distill_stats * out,
                              double * exit_accuracy) {
    if (!net || !opt || !e || !exits) KD_FAIL(KD_ERR_VALUE, "net, optimizer, exits and config must not be NULL");
    if (n_exits < 1 || n_exits > 16) KD_FAIL(KD_ERR_VALUE, "n_exits (%d) must be in [1, 16]", n_exits);
    if (teacher && teacher_logits) KD_FAIL(KD_ERR_VALUE, "pass the teacher net or its cached logits, not both");
    if (teacher_logits && augmented(cfg))
        KD_FAIL(KD_ERR_VALUE, "cached teacher logits cannot follow augmented inputs; pass the teacher net");
    if (!(e->T > 0) || !isfinite(e->T)) KD_FAIL(KD_ERR_VALUE, "T (%g) must be > 0", e->T);
    if (!(e->ce_weight >= 0) || !(e->kd_weight >= 0) || !isfinite(e->ce_weight) || !isfinite(e->kd_weight))
        KD_FAIL(KD_ERR_VALUE, "ce_weight and kd_weight must be finite and >= 0");
    const int outn = kd_net_output_node(net);
    bool out_listed = false;
    for (int k = 0; k < n_exits; k++) {
        if (exits[k] < 0 || exits[k] >= kd_net_num_nodes(net)) KD_FAIL(KD_ERR_VALUE, "exit %d: node %d does not exist", k, exits[k]);
        for (int j = 0; j < k; j++) if (exits[j] == exits[k]) KD_FAIL(KD_ERR_VALUE, "exit node %d is listed twice", exits[k]);
        out_listed |= exits[k] == outn;
    }
    if (!out_listed) KD_FAIL(KD_ERR_VALUE, "the output node must be one of the exits");
    if (ds && ds->n > 0) {
        // Every exit is a head with the output's width (checked here to name the exit).
        KD_TRY(kd_net_plan(net, 1, ds->c, ds->h, ds->w));
        int c, h, w, V;
        kd_net_node_shape(net, -1, &c, &h, &w);
        V = c * h * w;
        for (int k = 0; k < n_exits; k++) {
            kd_net_node_shape(net, exits[k], &c, &h, &w);
            if (c * h * w != V) KD_FAIL(KD_ERR_SHAPE, "exit %d (node %d) outputs %d values, the output exit %d", k, exits[k], c * h * w, V);
        }
    }
    const bool self = !teacher && !teacher_logits;
    struct kd_step_net nets[2] = { trained_net(net, opt, SALT_STUDENT, "model") };
    if (!self) nets[1] = frozen_net(teacher, teacher_logits, KD_MODE_EVAL, SALT_TEACHER, "teacher");
    // Self: the shallow exits' terms are summed, the output exit learns from the labels only;
    // with a teacher every exit has both terms, averaged over the exits (eq. 9).
    const float scale = self ? 1.0f : 1.0f / n_exits;
    struct kd_term terms[32];
    int n = 0, ce_of[16], kd_of_out = -1, ce_of_out = -1;
    for (int k = 0; k < n_exits; k++) {
        const bool is_out = exits[k] == outn;
        const float cw = self && is_out ? 1.0f : e->ce_weight;
        ce_of[k] = n;
        if (is_out) ce_of_out = n;
        terms[n++] = logit_term(KD_TERM_CE, 0, exits[k], cw * scale, e->T, "loss");
        if (self && is_out) continue;
        struct kd_term t = logit_term(KD_TERM_KD, 0, exits[k], e->kd_weight * scale, e->T, "loss");
        t.src.n = 1;
        t.src.ref[0] = self ? (struct kd_ref){ 0, -1, 0 } : (struct kd_ref){ 1, -1, 0 };
        if (is_out) kd_of_out = n;
        terms[n++] = t;
    }
    struct kd_step_cfg step = { .nets = nets, .n_nets = self ? 1 : 2, .terms = terms, .n_terms = n };
    struct kd_step_stats s;
    enum kd_status st = kd_step_run_(&step, ds, cfg, epoch, &s, __func__);
    if (out) {
        memset(out, 0, sizeof *out);
        out->loss = s.net_loss[0];
        out->ce = s.term_value[ce_of_out];
        out->kd = kd_of_out >= 0 ? s.term_value[kd_of_out] : 0;
        out->accuracy = s.net_accuracy[0];
        out->samples = s.samples; out->steps = s.steps; out->lr = s.lr; out->kd_weight = e->kd_weight;
        out->skipped_steps = s.skipped_steps;
    }
    for (int k = 0; exit_accuracy && k < n_exits; k++) exit_accuracy[k] = s.term_accuracy[ce_of[k]];
    return st;
}
