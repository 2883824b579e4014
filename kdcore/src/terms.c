// Loss terms of the step engine: per kind, the adapter from a term's inputs (struct pair_io)
// to its loss in losses*.c, and one row of facts (kd_term_kinds); the kinds' defaults
// (kd_term_default). Adding a method means a loss, a KD_TERM_* kind, its adapter and row here.
#include "kd_internal.h"

// Kinds without a source read `a` (and the labels) only.
static enum kd_status pair_ce(const struct kd_term * t, struct pair_io * p) {
    return kd_cross_entropy(&p->value, p->da, p->a, p->y, NULL, p->nb, p->ac, p->smooth, p->w, true);
}
static enum kd_status pair_tolerant(const struct kd_term * t, struct pair_io * p) {
    return kd_loss_tolerant(&p->value, p->da, p->a, p->nb, p->ac, t->k, p->w, true);
}
static enum kd_status pair_activation(const struct kd_term * t, struct pair_io * p) {
    return kd_loss_activation(&p->value, p->da, p->a, (size_t)p->nb * p->ac * p->ah * p->aw, p->w, true);
}
static enum kd_status pair_entropy(const struct kd_term * t, struct pair_io * p) {
    return kd_loss_entropy(&p->value, p->da, p->a, p->nb, p->ac, p->w, true);
}
static enum kd_status pair_l2prior(const struct kd_term * t, struct pair_io * p) {
    return kd_loss_l2prior(&p->value, p->da, p->a, (size_t)p->nb * p->ac * p->ah * p->aw, p->w, true);
}

static enum kd_status pair_kd(const struct kd_term * t, struct pair_io * p) {
    return kd_loss_kd(&p->value, p->da, p->db, p->a, p->b, p->mask, p->nb, p->ac, t->T, p->w, true);
}
static enum kd_status pair_dkd(const struct kd_term * t, struct pair_io * p) {
    enum kd_status st = kd_loss_dkd(&p->part[0], &p->part[1], p->da, p->a, p->b, p->y, p->nb, p->ac, t->T, t->alpha,
                                    t->beta, p->w, true);
    p->value = t->alpha * p->part[0] + t->beta * p->part[1];
    return st;
}
static enum kd_status pair_mse(const struct kd_term * t, struct pair_io * p) {
    return kd_loss_mse(&p->value, p->da, p->a, p->b, p->nb, p->ac * p->ah * p->aw, p->w, true);
}

static struct kd_fmap fmap(const float * x, int n, int c, int h, int w) { return (struct kd_fmap){ x, n, c, h, w }; }
#define FM_A(p) fmap((p)->a, (p)->nb, (p)->ac, (p)->ah, (p)->aw)
#define FM_B(p) fmap((p)->b, (p)->nb, (p)->bc, (p)->bh, (p)->bw)

static enum kd_status pair_at(const struct kd_term * t, struct pair_io * p) {
    return kd_loss_at(&p->value, p->da, p->db, FM_A(p), FM_B(p), t->at.p, t->at.form, p->w, true);
}
static enum kd_status pair_sp(const struct kd_term * t, struct pair_io * p) {
    return kd_loss_sp(&p->value, p->da, p->db, FM_A(p), FM_B(p), p->w, true);
}
static enum kd_status pair_nst(const struct kd_term * t, struct pair_io * p) {
    return kd_loss_nst(&p->value, p->da, p->db, FM_A(p), FM_B(p), p->w, true);
}
static enum kd_status pair_rkd(const struct kd_term * t, struct pair_io * p) {
    return kd_loss_rkd(&p->value, p->da, p->db, FM_A(p), FM_B(p), t->rkd.w_dist, t->rkd.w_angle, p->part, p->w, true);
}
static enum kd_status pair_pkt(const struct kd_term * t, struct pair_io * p) {
    return kd_loss_pkt(&p->value, p->da, p->db, FM_A(p), FM_B(p), p->w, true);
}
// FSP reads two maps per side: (a, a2) and (b, b2); see term_run.
static enum kd_status pair_fsp(const struct kd_term * t, struct pair_io * p) {
    return kd_loss_fsp(&p->value, p->da, p->da2, p->db, p->db2, FM_A(p), fmap(p->a2, p->nb, p->a2c, p->a2h, p->a2w),
                       FM_B(p), fmap(p->b2, p->nb, p->b2c, p->b2h, p->b2w), p->w, true);
}

static enum kd_status pair_ofd(const struct kd_term * t, struct pair_io * p) {
    return kd_loss_ofd(&p->value, p->da, FM_A(p), FM_B(p), t->ofd.margin, p->w, true);
}
static enum kd_status pair_ab(const struct kd_term * t, struct pair_io * p) {
    return kd_loss_ab(&p->value, p->da, FM_A(p), FM_B(p), t->ab.margin, p->w, true);
}
static enum kd_status pair_ft(const struct kd_term * t, struct pair_io * p) {
    return kd_loss_ft(&p->value, p->da, p->db, FM_A(p), FM_B(p), t->ft.p1, t->ft.p2, p->w, true);
}
static enum kd_status pair_vid(const struct kd_term * t, struct pair_io * p) {
    return kd_loss_vid(&p->value, p->da, p->dparams, FM_A(p), FM_B(p), p->params, t->vid.eps, p->w, true);
}
static enum kd_status pair_hcl(const struct kd_term * t, struct pair_io * p) {
    return kd_loss_hcl(&p->value, p->da, FM_A(p), FM_B(p), p->w, true);
}
static enum kd_status pair_dist(const struct kd_term * t, struct pair_io * p) {
    enum kd_status st = kd_loss_dist(&p->part[0], &p->part[1], p->da, p->a, p->b, p->nb, p->ac, t->T, t->beta,
                                     t->dist.gamma, p->w, true);
    p->value = t->T * t->T * (t->beta * p->part[0] + t->dist.gamma * p->part[1]);
    return st;
}
static enum kd_status pair_normkd(const struct kd_term * t, struct pair_io * p) {
    return kd_loss_normkd(&p->value, p->da, p->a, p->b, p->nb, p->ac, t->normkd.t_norm, t->normkd.detach_std, p->w,
                          true);
}
static enum kd_status pair_wttm(const struct kd_term * t, struct pair_io * p) {
    return kd_loss_wttm(&p->value, p->da, p->a, p->b, p->nb, p->ac, t->wttm.gamma, p->w, true);
}
// CTKD: the temperature's gradient passes a gradient-reversal layer scaled by the curriculum,
// so the temperature ascends the loss the student descends.
static enum kd_status pair_ctkd(const struct kd_term * t, struct pair_io * p) {
    const double lam = kd_ctkd_lambda(p->epoch, t->ctkd.lambda_min, t->ctkd.lambda_max, t->ctkd.decay_epochs);
    if (t->ctkd.instance) {
        // a2: the temperature net's output m (one value per row); da2 receives -lambda dL/dm.
        float * T = calloc(2 * (size_t)p->nb, sizeof *T);   // dT starts at 0: the loss accumulates
        if (!T) return kd_set_error_(KD_ERR_NOMEM, "kd_step_epoch", "cannot allocate CTKD's temperatures");
        float * dT = T + p->nb;
        for (int i = 0; i < p->nb; i++) {
            if (!isfinite(p->a2[i])) {   // a diverged temperature net: the non-finite policy's case
                free(T);
                return kd_set_error_(KD_ERR_NONFINITE, "kd_step_epoch", "CTKD's temperature net output is not finite");
            }
            T[i] = (float)kd_ctkd_temperature(p->a2[i], t->ctkd.t_start, t->ctkd.t_range, NULL);
        }
        enum kd_status st = kd_loss_ctkd_rows(&p->value, p->da, dT, p->a, p->b, p->nb, p->ac, T, p->w, true);
        for (int i = 0; p->da2 && st == KD_OK && i < p->nb; i++) {
            double dT_dm;
            kd_ctkd_temperature(p->a2[i], t->ctkd.t_start, t->ctkd.t_range, &dT_dm);
            p->da2[i] += (float)(-lam * (double)dT[i] * dT_dm);
        }
        free(T);
        return st;
    }
    double dT_dp;
    const double T = kd_ctkd_temperature(p->params[0], t->ctkd.t_start, t->ctkd.t_range, &dT_dp);
    float dT = 0;
    enum kd_status st = kd_loss_ctkd(&p->value, p->da, &dT, p->a, p->b, p->nb, p->ac, (float)T, p->w, true);
    p->dparams[0] += (float)(-lam * (double)dT * dT_dp);
    return st;
}
static enum kd_status pair_mlkd(const struct kd_term * t, struct pair_io * p) {
    enum kd_status st = kd_loss_mlkd(&p->value, p->part, p->da, p->a, p->b, p->nb, p->ac, t->mlkd.temps, t->mlkd.n_temps,
                                     t->mlkd.percentile, p->w, true);
    return st;
}
// DAFL's one-hot loss: cross-entropy against the source's own argmax (pseudo-labels).
static enum kd_status pair_onehot(const struct kd_term * t, struct pair_io * p) {
    int64_t * lab = malloc((size_t)p->nb * sizeof *lab);
    if (!lab) return kd_set_error_(KD_ERR_NOMEM, "kd_step_epoch", "cannot allocate pseudo-labels");
    for (int i = 0; i < p->nb; i++) lab[i] = kd_argmax_row(p->b + (size_t)i * p->bc, p->bc);
    enum kd_status st = kd_cross_entropy(&p->value, p->da, p->a, lab, NULL, p->nb, p->ac, 0.0f, p->w, true);
    free(lab);
    return st;
}
static enum kd_status pair_bnstat(const struct kd_term * t, struct pair_io * p) {
    return kd_loss_bnstat(&p->value, p->da, FM_A(p), p->rmean, p->rvar, p->w, true);
}
static enum kd_status pair_tv(const struct kd_term * t, struct pair_io * p) {
    return kd_loss_tv(&p->value, p->da, FM_A(p), t->tv.l1, p->w, true);
}
static enum kd_status pair_adi(const struct kd_term * t, struct pair_io * p) {
    return kd_loss_adi(&p->value, p->da, p->db, p->a, p->b, p->nb, p->ac, t->T, p->w, true);
}
static enum kd_status pair_l1(const struct kd_term * t, struct pair_io * p) {
    return kd_loss_l1(&p->value, p->da, p->db, p->a, p->b, p->nb, p->ac, p->w, true);
}
static enum kd_status pair_bce(const struct kd_term * t, struct pair_io * p) {
    return kd_loss_bce(&p->value, p->da, p->a, t->bce.target, p->nb, p->ac * p->ah * p->aw, p->w, true);
}
static enum kd_status pair_cc(const struct kd_term * t, struct pair_io * p) {
    return kd_loss_cc(&p->value, p->da, p->db, p->a, p->b, p->nb, p->ac * p->ah * p->aw, p->w, true);
}

// Rows x (n, d) -> y = x / ||x|| (RepDistiller's Normalize: no epsilon; a zero row stays 0).
static void rows_normalize(float * y, double * inv, const float * x, int n, int d) {
    for (int i = 0; i < n; i++) {
        double q = 0;
        for (int k = 0; k < d; k++) q += (double)x[(size_t)i * d + k] * x[(size_t)i * d + k];
        inv[i] = q > 0 ? 1.0 / sqrt(q) : 0.0;
        for (int k = 0; k < d; k++) y[(size_t)i * d + k] = (float)(x[(size_t)i * d + k] * inv[i]);
    }
}
// dx += (dy - y (y . dy)) / ||x||, the gradient through rows_normalize.
static void rows_normalize_backward(float * dx, const float * dy, const float * y, const double * inv, int n, int d) {
    for (int i = 0; i < n; i++) {
        double dot = 0;
        for (int k = 0; k < d; k++) dot += (double)y[(size_t)i * d + k] * dy[(size_t)i * d + k];
        for (int k = 0; k < d; k++) {
            size_t j = (size_t)i * d + k;
            dx[j] += (float)(inv[i] * (dy[j] - y[j] * dot));
        }
    }
}

// CRD: the embeddings' rows are normalised here, the loss and its gradients computed on them,
// the gradients taken back through the normalisation. The normalised rows stay in the term's
// scratch for the bank update after the step (crd_update_after).
static enum kd_status pair_crd(const struct kd_term * t, struct pair_io * p) {
    const int n = p->nb, d = p->ac * p->ah * p->aw;
    const size_t nd = (size_t)n * d;
    float * es = p->scratch, * et = es + nd, * des = et + nd, * det = des + nd;
    double * inv = (double *)(det + nd);
    rows_normalize(es, inv, p->a, n, d);
    rows_normalize(et, inv + n, p->b, n, d);
    memset(des, 0, 2 * nd * sizeof(float));
    enum kd_status st = kd_crd_loss(t->crd.bank, &p->value, p->da ? des : NULL, p->db ? det : NULL, es, et, p->idx,
                                    t->crd.class_negatives ? p->y : NULL, n, p->w, false);
    if (st != KD_OK) return st;
    if (p->da) rows_normalize_backward(p->da, des, es, inv, n, d);
    if (p->db) rows_normalize_backward(p->db, det, et, inv + n, n, d);
    return KD_OK;
}

// Columns (struct term_kind_info, kd_internal.h): name, what, logits, src, src_grad, same_shape,
// params, adapter.
const struct term_kind_info kd_term_kinds[KD_TERM_COUNT] = {
    [KD_TERM_CE]         = { "ce",         "cross-entropy",      true,  false, false, true,  false, pair_ce },
    [KD_TERM_KD]         = { "kd",         "distillation loss",  true,  true,  true,  true,  false, pair_kd },
    [KD_TERM_DKD]        = { "dkd",        "distillation loss",  true,  true,  false, true,  false, pair_dkd },
    [KD_TERM_MSE]        = { "mse",        "distillation loss",  false, true,  false, true,  false, pair_mse },
    [KD_TERM_TOLERANT]   = { "tolerant",   "tolerant loss",      true,  false, false, true,  false, pair_tolerant },
    [KD_TERM_AT]         = { "at",         "AT loss",            false, true,  true,  false, false, pair_at },
    [KD_TERM_SP]         = { "sp",         "SP loss",            false, true,  true,  false, false, pair_sp },
    [KD_TERM_NST]        = { "nst",        "NST loss",           false, true,  true,  false, false, pair_nst },
    [KD_TERM_RKD]        = { "rkd",        "RKD loss",           false, true,  true,  false, false, pair_rkd },
    [KD_TERM_PKT]        = { "pkt",        "PKT loss",           false, true,  true,  false, false, pair_pkt },
    [KD_TERM_FSP]        = { "fsp",        "FSP loss",           false, true,  true,  false, false, pair_fsp },
    [KD_TERM_OFD]        = { "ofd",        "OFD loss",           false, true,  false, false, false, pair_ofd },
    [KD_TERM_AB]         = { "ab",         "AB loss",            false, true,  false, true,  false, pair_ab },
    [KD_TERM_FT]         = { "ft",         "FT loss",            false, true,  true,  false, false, pair_ft },
    [KD_TERM_VID]        = { "vid",        "VID loss",           false, true,  false, true,  true,  pair_vid },
    [KD_TERM_CC]         = { "cc",         "CC loss",            false, true,  true,  true,  false, pair_cc },
    [KD_TERM_CRD]        = { "crd",        "CRD loss",           false, true,  true,  true,  false, pair_crd },
    [KD_TERM_HCL]        = { "hcl",        "ReviewKD loss",      false, true,  false, true,  false, pair_hcl },
    [KD_TERM_DIST]       = { "dist",       "DIST loss",          true,  true,  false, true,  false, pair_dist },
    [KD_TERM_ONEHOT]     = { "onehot",     "one-hot loss",       true,  true,  false, true,  false, pair_onehot },
    [KD_TERM_ACTIVATION] = { "activation", "activation loss",    false, false, false, false, false, pair_activation },
    [KD_TERM_ENTROPY]    = { "entropy",    "entropy loss",       true,  false, false, false, false, pair_entropy },
    [KD_TERM_NORMKD]     = { "normkd",     "NormKD loss",        true,  true,  false, true,  false, pair_normkd },
    [KD_TERM_WTTM]       = { "wttm",       "WTTM loss",          true,  true,  false, true,  false, pair_wttm },
    [KD_TERM_CTKD]       = { "ctkd",       "CTKD loss",          true,  true,  false, true,  true,  pair_ctkd },
    [KD_TERM_BNSTAT]     = { "bnstat",     "BN-statistics loss", false, false, false, false, false, pair_bnstat },
    [KD_TERM_TV]         = { "tv",         "TV prior",           false, false, false, false, false, pair_tv },
    [KD_TERM_L2PRIOR]    = { "l2prior",    "l2 prior",           false, false, false, false, false, pair_l2prior },
    [KD_TERM_ADI]        = { "adi",        "competition loss",   true,  true,  true,  true,  false, pair_adi },
    [KD_TERM_L1]         = { "l1",         "L1 loss",            true,  true,  true,  true,  false, pair_l1 },
    [KD_TERM_MLKD]       = { "mlkd",       "MLKD loss",          true,  true,  false, true,  false, pair_mlkd },
    [KD_TERM_BCE]        = { "bce",        "BCE loss",           false, false, false, false, false, pair_bce },
};

const char * kd_term_kind_name(enum kd_term_kind kind) {
    return (unsigned)kind < KD_TERM_COUNT ? kd_term_kinds[kind].name : NULL;
}

struct kd_term kd_term_default(enum kd_term_kind kind) {
    struct kd_term t;
    memset(&t, 0, sizeof t);
    t.kind = kind;
    t.weight = 1.0f;
    t.T = 4.0f;
    t.alpha = 1.0f;
    t.beta = 8.0f;
    t.k = 5;
    t.a.node = -1;
    t.params = -1;
    if (kind == KD_TERM_AT) { t.at.p = 2.0f; t.at.form = KD_AT_CODE; }
    if (kind == KD_TERM_RKD) { t.rkd.w_dist = 25.0f; t.rkd.w_angle = 50.0f; }
    if (kind == KD_TERM_FSP) t.fsp.a2.node = -1;
    if (kind == KD_TERM_AB) t.ab.margin = 1.0f;
    if (kind == KD_TERM_DIST) { t.beta = 2.0f; t.dist.gamma = 2.0f; }
    if (kind == KD_TERM_NORMKD) t.normkd.t_norm = 2.0f;
    if (kind == KD_TERM_WTTM) t.wttm.gamma = 0.2f;
    if (kind == KD_TERM_MLKD) {
        static const float mlkd_temps[] = { 4.0f, 3.0f, 5.0f, 2.0f, 6.0f };
        t.mlkd.n_temps = 5;
        memcpy(t.mlkd.temps, mlkd_temps, sizeof mlkd_temps);
        t.mlkd.percentile = 50.0f;
    }
    if (kind == KD_TERM_CTKD) {
        t.ctkd.t_start = 1.0f;
        t.ctkd.t_range = 20.0f;
        t.ctkd.lambda_max = 1.0f;
        t.ctkd.decay_epochs = 10;
        t.ctkd.temp.node = -1;
    }
    if (kind == KD_TERM_ADI) t.T = 3.0f;
    if (kind == KD_TERM_BCE) t.bce.target = 1.0f;
    if (kind == KD_TERM_BNSTAT) t.bnstat.node = -1;
    if (kind == KD_TERM_FT) { t.ft.p1 = 2; t.ft.p2 = 1.0f; }
    if (kind == KD_TERM_VID) t.vid.eps = 1e-5f;
    return t;
}

