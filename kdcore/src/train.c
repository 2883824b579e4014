// Training and evaluation loops. One call runs a whole epoch (or max_steps steps) so that
// Python is entered only every `callback_every` steps, for progress and Ctrl-C.
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

static int argmax_row(const float * z, int V) {
    int best = 0;
    for (int k = 1; k < V; k++) if (z[k] > z[best]) best = k;
    return best;
}

// Batch scratch shared by the loops: one allocation, freed on every path.
struct batch_buf {
    float * x;
    int64_t * y;
    int64_t * perm;
};

static void batch_buf_free(struct batch_buf * b) { free(b->x); free(b->y); free(b->perm); }

static enum kd_status batch_buf_init(struct batch_buf * b, const struct kd_dataset * ds, int B, bool perm) {
    memset(b, 0, sizeof *b);
    size_t per = (size_t)ds->c * ds->h * ds->w, nx;
    if (!kd_mul_ok(per, (size_t)B, &nx)) KD_FAIL(KD_ERR_VALUE, "batch_size %d is too large", B);
    b->x = malloc(nx * sizeof(float));
    b->y = malloc((size_t)B * sizeof(int64_t));
    b->perm = malloc((size_t)ds->n * sizeof(int64_t));
    if (!b->x || !b->y || !b->perm) { batch_buf_free(b); KD_FAIL(KD_ERR_NOMEM, "cannot allocate a batch of %d", B); }
    if (!perm) for (int64_t i = 0; i < ds->n; i++) b->perm[i] = i;
    return KD_OK;
}

static int num_outputs(const struct kd_net * net) {
    int c, h, w;
    kd_net_node_shape(net, -1, &c, &h, &w);
    return c * h * w;
}

enum kd_status kd_train_epoch(struct kd_net * net, struct kd_optim * opt, const struct kd_dataset * ds,
                              const struct kd_train_cfg * cfg, int epoch, struct kd_epoch_stats * out) {
    if (!net || !opt || !ds || !cfg) KD_FAIL(KD_ERR_VALUE, "net, optimizer, dataset and config must not be NULL");
    if (cfg->batch_size < 1) KD_FAIL(KD_ERR_VALUE, "batch_size (%d) must be >= 1", cfg->batch_size);
    if (!ds->y) KD_FAIL(KD_ERR_VALUE, "training needs labels");
    KD_TRY(kd_dataset_check(ds));
    const int B = cfg->batch_size;
    int64_t steps = cfg->drop_last ? ds->n / B : (ds->n + B - 1) / B;
    if (steps == 0) KD_FAIL(KD_ERR_VALUE, "dataset of %d samples has no full batch of %d (drop_last)", ds->n, B);
    int64_t steps_per_epoch = steps;
    if (cfg->max_steps > 0 && cfg->max_steps < steps) steps = cfg->max_steps;
    KD_TRY(kd_net_plan(net, B < ds->n ? B : ds->n, ds->c, ds->h, ds->w));
    const int V = num_outputs(net);
    if (ds->num_classes > 0 && ds->num_classes != V)
        KD_FAIL(KD_ERR_SHAPE, "the dataset has %d classes but the net outputs %d values", ds->num_classes, V);

    struct batch_buf bb;
    KD_TRY(batch_buf_init(&bb, ds, B, cfg->shuffle));
    float * dlogits = malloc((size_t)B * V * sizeof(float));
    if (!dlogits) { batch_buf_free(&bb); KD_FAIL(KD_ERR_NOMEM, "cannot allocate logits gradients"); }
    const uint64_t eseed = kd_hash(cfg->seed, (uint64_t)epoch);
    if (cfg->shuffle) kd_data_shuffle(bb.perm, ds->n, eseed);

    enum kd_status st = KD_OK;
    double loss_sum = 0;
    int64_t correct = 0, seen = 0;
    float lr = 0;
    struct kd_progress pr = { .epoch = epoch, .steps_total = (int)steps };
    int64_t s;
    for (s = 0; s < steps; s++) {
        const int64_t start = s * B;
        const int nb = (int)(ds->n - start < B ? ds->n - start : B);
        const int64_t * idx = bb.perm + start;
        const uint64_t sseed = kd_hash(eseed, (uint64_t)s);
        kd_data_batch(bb.x, ds, idx, nb, &cfg->aug, sseed);
        for (int i = 0; i < nb; i++) bb.y[i] = ds->y[idx[i]];
        st = kd_net_forward(net, bb.x, nb, ds->c, ds->h, ds->w, true, sseed ^ 0xD50Full);
        if (st != KD_OK) break;
        const float * logits = kd_net_output(net, -1);
        float loss;
        st = kd_cross_entropy(&loss, dlogits, logits, bb.y, nb, V, cfg->label_smoothing, 1.0f, false);
        if (st == KD_ERR_NONFINITE) {
            st = kd_set_error_(KD_ERR_NONFINITE, __func__, "training loss is not finite at epoch %d, step %lld",
                               epoch, (long long)s);
        }
        if (st != KD_OK) break;
        for (int i = 0; i < nb; i++) correct += argmax_row(logits + (size_t)i * V, V) == bb.y[i];
        loss_sum += (double)loss * nb;
        seen += nb;
        kd_net_zero_grad(net);
        st = kd_net_backward(net, dlogits, NULL);
        if (st != KD_OK) break;
        lr = kd_schedule_lr(&cfg->sched, epoch, (int)s, (int)steps_per_epoch);
        st = kd_optim_step(opt, lr);
        if (st != KD_OK) break;
        if (cfg->callback && ((cfg->callback_every > 0 && (s + 1) % cfg->callback_every == 0) || s + 1 == steps)) {
            pr.step = (int)(s + 1); pr.loss_sum = loss_sum; pr.correct = correct; pr.seen = seen; pr.lr = lr;
            if (cfg->callback(cfg->callback_ctx, &pr)) {
                s++;
                st = kd_set_error_(KD_ERR_INTERRUPTED, __func__, "interrupted after step %lld of epoch %d",
                                   (long long)s, epoch);
                break;
            }
        }
    }
    if (out) {
        out->loss = seen ? loss_sum / seen : 0;
        out->accuracy = seen ? (double)correct / seen : 0;
        out->samples = seen;
        out->steps = s;
        out->lr = lr;
    }
    free(dlogits);
    batch_buf_free(&bb);
    return st;
}

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
    struct batch_buf bb;
    KD_TRY(batch_buf_init(&bb, ds, B, false));
    enum kd_status st = KD_OK;
    double loss_sum = 0;
    int64_t correct = 0;
    for (int64_t start = 0; start < ds->n; start += B) {
        const int nb = (int)(ds->n - start < B ? ds->n - start : B);
        kd_data_batch(bb.x, ds, bb.perm + start, nb, NULL, 0);
        st = kd_net_forward(net, bb.x, nb, ds->c, ds->h, ds->w, false, 0);
        if (st != KD_OK) break;
        const float * z = kd_net_output(net, -1);
        if (logits) memcpy(logits + (size_t)start * V, z, (size_t)nb * V * sizeof(float));
        if (ds->y && (loss || accuracy)) {
            for (int i = 0; i < nb; i++) bb.y[i] = ds->y[start + i];
            float l;
            st = kd_cross_entropy(&l, NULL, z, bb.y, nb, V, 0.0f, 1.0f, false);
            if (st != KD_OK && st != KD_ERR_NONFINITE) break;
            st = KD_OK;   // a non-finite evaluation loss is reported as such, not as an error
            loss_sum += (double)l * nb;
            for (int i = 0; i < nb; i++) correct += argmax_row(z + (size_t)i * V, V) == bb.y[i];
        }
    }
    if (st == KD_OK) {
        if (loss) *loss = loss_sum / ds->n;
        if (accuracy) *accuracy = (double)correct / ds->n;
    }
    batch_buf_free(&bb);
    return st;
}
