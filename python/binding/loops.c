// CPython binding of kdcore: Training loops: option dictionaries, the per-scheme entry points and the step engine.
#include "binding.h"

// ---------------------------------------------------------------------------------------
// Loops

struct callback_ctx {
    PyObject * fn;    // called as fn(epoch, step, steps_total, loss_sum, correct, seen, lr); may be None
};

// Runs with the GIL released around it: take it, check for Ctrl-C, report progress.
static int progress_cb(void * vctx, const struct kd_progress * p) {
    struct callback_ctx * ctx = vctx;
    PyGILState_STATE g = PyGILState_Ensure();
    int stop = 0;
    if (PyErr_CheckSignals() < 0) stop = 1;
    else if (ctx->fn && ctx->fn != Py_None) {
        PyObject * r = PyObject_CallFunction(ctx->fn, "iiidLLf", p->epoch, p->step, p->steps_total, p->loss_sum,
                                             (long long)p->correct, (long long)p->seen, (double)p->lr);
        if (!r) stop = 1;
        else { stop = PyObject_IsTrue(r) == 1; Py_DECREF(r); }
    }
    PyGILState_Release(g);
    return stop;
}

int parse_schedule(PyObject * o, struct kd_schedule * s) {
    PyObject * ms = NULL;
    memset(s, 0, sizeof *s);
    int kind;
    static char * names[] = { "kind", "base_lr", "milestones", "total_epochs", "min_lr", "warmup_epochs", NULL };
    if (!PyTuple_Check(o) || PyTuple_GET_SIZE(o) != 6) {
        PyErr_Format(PyExc_TypeError, "schedule must be a tuple (kind, base_lr, milestones, total_epochs, min_lr, "
                     "warmup_epochs), got %s", Py_TYPE(o)->tp_name);
        return -1;
    }
    if (!PyArg_ParseTuple(o, "ifOifi;schedule", &kind, &s->base_lr, &ms, &s->total_epochs, &s->min_lr, &s->warmup_epochs)) {
        name_parse_error(o, NULL, "ifOifi", names, "schedule ");
        return -1;
    }
    if (kind < KD_SCHED_CONSTANT || kind > KD_SCHED_CYCLIC) { PyErr_Format(PyExc_ValueError, "unknown schedule kind %d", kind); return -1; }
    s->kind = (enum kd_sched_kind)kind;
    s->gamma = 0.1f;
    PyObject * seq = PySequence_Fast(ms, "milestones must be a sequence of ints");
    if (!seq) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > KD_MAX_MILESTONES) { Py_DECREF(seq); PyErr_Format(PyExc_ValueError, "at most %d milestones", KD_MAX_MILESTONES); return -1; }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject * it = PySequence_Fast_GET_ITEM(seq, i);
        long v = PyBool_Check(it) || !PyLong_Check(it) ? -1 : PyLong_AsLong(it);
        if (PyErr_Occurred() || v < 0 || v > INT_MAX) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "schedule milestones[%zd] must be an int in [0, %d], got %R", i, INT_MAX, it);
            Py_DECREF(seq);
            return -1;
        }
        s->milestones[i] = (int)v;
    }
    s->n_milestones = (int)n;
    Py_DECREF(seq);
    if (!isfinite(s->base_lr) || s->base_lr < 0)
        return err_printf(PyExc_ValueError, "schedule base_lr must be finite and >= 0, got %g", (double)s->base_lr), -1;
    if (!isfinite(s->min_lr) || s->min_lr < 0)
        return err_printf(PyExc_ValueError, "schedule min_lr must be finite and >= 0, got %g", (double)s->min_lr), -1;
    if (s->total_epochs < 0)
        return PyErr_Format(PyExc_ValueError, "schedule total_epochs must be >= 0, got %d", s->total_epochs), -1;
    if (s->warmup_epochs < 0)
        return PyErr_Format(PyExc_ValueError, "schedule warmup_epochs must be >= 0, got %d", s->warmup_epochs), -1;
    return 0;
}

int check_gamma(float gamma) {
    if (!(gamma > 0) || !isfinite(gamma)) { err_printf(PyExc_ValueError, "gamma must be finite and > 0, got %g", (double)gamma); return -1; }
    return 0;
}

static int check_data(DatasetObject * data) {
    if (!data->x) { PyErr_SetString(PyExc_TypeError, "data must be an initialised Dataset"); return -1; }
    return 0;
}

static int check_epoch(int epoch) {
    if (epoch < 0) { PyErr_Format(PyExc_ValueError, "epoch must be >= 0, got %d", epoch); return -1; }
    return 0;
}

// ---- option dictionaries: every key is known (unknown keys raise), every value checked.

#define MAX_OPTS 32
#define KD_MAX_CROP_PADDING 65536
#define KD_MAX_RANDAUGMENT 64
struct opt_reader { PyObject * dict; const char * what; Py_ssize_t used; const char * known[MAX_OPTS]; int n_known; };

static PyObject * opt_get(struct opt_reader * r, const char * key) {
    if (r->n_known < MAX_OPTS) r->known[r->n_known++] = key;
    if (!r->dict) return NULL;
    PyObject * v = PyDict_GetItemString(r->dict, key);   // borrowed
    if (v) r->used++;
    return v;
}
static int opt_float(struct opt_reader * r, const char * key, float * out) {
    PyObject * v = opt_get(r, key);
    if (!v) return 0;
    double d = PyFloat_AsDouble(v);
    if (d == -1.0 && PyErr_Occurred()) {
        PyErr_Format(PyExc_TypeError, "%s option '%s' must be a number", r->what, key);
        return -1;
    }
    *out = (float)d;
    return 0;
}
static int opt_int(struct opt_reader * r, const char * key, long long * out) {
    PyObject * v = opt_get(r, key);
    if (!v) return 0;
    if (PyBool_Check(v) || !PyLong_Check(v)) {
        PyErr_Format(PyExc_TypeError, "%s option '%s' must be an int", r->what, key);
        return -1;
    }
    *out = PyLong_AsLongLong(v);
    return (*out == -1 && PyErr_Occurred()) ? -1 : 0;
}
static int opt_i32(struct opt_reader * r, const char * key, int * out) {
    long long v = *out;
    if (opt_int(r, key, &v) < 0) return -1;
    if (v < INT_MIN || v > INT_MAX) { PyErr_Format(PyExc_ValueError, "%s option '%s' is out of range", r->what, key); return -1; }
    *out = (int)v;
    return 0;
}
static int opt_bool(struct opt_reader * r, const char * key, bool * out) {
    PyObject * v = opt_get(r, key);
    if (!v) return 0;
    int t = PyObject_IsTrue(v);
    if (t < 0) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s option '%s' must be true or false, got %s", r->what, key, Py_TYPE(v)->tp_name);
        return -1;
    }
    *out = t;
    return 0;
}
// MLKD's temperatures: a sequence of 1..KD_MLKD_MAX_TEMPS numbers (values checked by the engine).
static int parse_mlkd_temps(PyObject * v, float * temps, int * n) {
    PyObject * seq = PySequence_Fast(v, "term option 'temperatures' must be a sequence of numbers");
    if (!seq) return -1;
    const Py_ssize_t k = PySequence_Fast_GET_SIZE(seq);
    if (k < 1 || k > KD_MLKD_MAX_TEMPS) {
        PyErr_Format(PyExc_ValueError, "term option 'temperatures': between 1 and %d values, got %zd", KD_MLKD_MAX_TEMPS, k);
        Py_DECREF(seq);
        return -1;
    }
    for (Py_ssize_t j = 0; j < k; j++) {
        const double d = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(seq, j));
        if (d == -1.0 && PyErr_Occurred()) {
            PyErr_Format(PyExc_TypeError, "term option 'temperatures'[%zd] must be a number", j);
            Py_DECREF(seq);
            return -1;
        }
        temps[j] = (float)d;
    }
    *n = (int)k;
    Py_DECREF(seq);
    return 0;
}
static int opt_done(struct opt_reader * r) {
    if (!r->dict || PyDict_Size(r->dict) == r->used) return 0;
    Py_ssize_t pos = 0;
    PyObject * k, * v;
    while (PyDict_Next(r->dict, &pos, &k, &v)) {
        const char * u = PyUnicode_Check(k) ? PyUnicode_AsUTF8(k) : NULL;
        if (!u) PyErr_Clear();
        int found = 0;
        for (int i = 0; u && i < r->n_known && !found; i++) found = strcmp(u, r->known[i]) == 0;
        if (!found) {
            PyObject * names = PyUnicode_FromString("");
            for (int i = 0; names && i < r->n_known; i++)
                Py_SETREF(names, PyUnicode_FromFormat("%U%s%s", names, i ? ", " : "", r->known[i]));
            if (names) PyErr_Format(PyExc_ValueError, "unknown %s options: %R (known: %U)", r->what, k, names);
            Py_XDECREF(names);
            return -1;
        }
    }
    PyErr_Format(PyExc_ValueError, "unknown %s options in %R", r->what, r->dict);
    return -1;
}

// An augmentation (a dict {crop_padding, hflip, noise_std, randaugment}), validated.
static int parse_augment(PyObject * d, struct kd_augment * a, const char * what) {
    if (!PyDict_Check(d)) { PyErr_Format(PyExc_TypeError, "%s must be a dict", what); return -1; }
    struct opt_reader r = { d, what, 0 };
    memset(a, 0, sizeof *a);
    if (opt_i32(&r, "crop_padding", &a->crop_padding) < 0 || opt_bool(&r, "hflip", &a->hflip) < 0 ||
        opt_float(&r, "noise_std", &a->noise_std) < 0 || opt_i32(&r, "randaugment", &a->randaugment) < 0 ||
        opt_done(&r) < 0)
        return -1;
    const char * bad = a->crop_padding < 0 || a->crop_padding > KD_MAX_CROP_PADDING ? "crop_padding must be in [0, 65536]"
                     : !(a->noise_std >= 0) || !isfinite(a->noise_std) ? "noise_std must be finite and >= 0"
                     : a->randaugment < 0 || a->randaugment > KD_MAX_RANDAUGMENT ? "randaugment must be in [0, 64]" : NULL;
    if (bad) { PyErr_Format(PyExc_ValueError, "%s: %s", what, bad); return -1; }
    return 0;
}

// Training options (a dict): batch_size, schedule (tuple), gamma, seed, shuffle, drop_last,
// max_steps, label_smoothing, crop_padding, hflip, noise_std, callback, callback_every,
// nonfinite ("raise" or "skip").
static int parse_train_cfg(PyObject * d, struct kd_train_cfg * cfg, struct callback_ctx * ctx) {
    if (!PyDict_Check(d)) { PyErr_SetString(PyExc_TypeError, "train options must be a dict"); return -1; }
    *cfg = kd_train_cfg_default();
    struct opt_reader r = { d, "training", 0 };
    long long seed = 0, max_steps = 0;
    PyObject * sched = opt_get(&r, "schedule");
    PyObject * nonfinite = opt_get(&r, "nonfinite");
    ctx->fn = opt_get(&r, "callback");
    float gamma = 0.1f;
    if (opt_i32(&r, "batch_size", &cfg->batch_size) < 0 || opt_float(&r, "gamma", &gamma) < 0 ||
        opt_int(&r, "seed", &seed) < 0 || opt_bool(&r, "shuffle", &cfg->shuffle) < 0 ||
        opt_bool(&r, "drop_last", &cfg->drop_last) < 0 || opt_int(&r, "max_steps", &max_steps) < 0 ||
        opt_float(&r, "label_smoothing", &cfg->label_smoothing) < 0 ||
        opt_i32(&r, "crop_padding", &cfg->aug.crop_padding) < 0 || opt_bool(&r, "hflip", &cfg->aug.hflip) < 0 ||
        opt_float(&r, "noise_std", &cfg->aug.noise_std) < 0 || opt_i32(&r, "randaugment", &cfg->aug.randaugment) < 0 ||
        opt_i32(&r, "callback_every", &cfg->callback_every) < 0 ||
        opt_done(&r) < 0)
        return -1;
    if (!sched) { PyErr_SetString(PyExc_ValueError, "training options need a schedule"); return -1; }
    if (nonfinite) {
        if (PyUnicode_Check(nonfinite) && PyUnicode_CompareWithASCIIString(nonfinite, "raise") == 0)
            cfg->nonfinite = KD_NONFINITE_RAISE;
        else if (PyUnicode_Check(nonfinite) && PyUnicode_CompareWithASCIIString(nonfinite, "skip") == 0)
            cfg->nonfinite = KD_NONFINITE_SKIP;
        else {
            PyErr_Format(PyExc_ValueError, "nonfinite must be 'raise' or 'skip', got %R", nonfinite);
            return -1;
        }
    }
    if (parse_schedule(sched, &cfg->sched) < 0 || check_gamma(gamma) < 0) return -1;
    cfg->sched.gamma = gamma;
    if (seed < 0) { PyErr_SetString(PyExc_ValueError, "training option 'seed' must be >= 0"); return -1; }
    const char * bad = cfg->batch_size < 1 ? "batch_size must be >= 1"
                     : max_steps < 0 ? "max_steps must be >= 0"
                     : !(cfg->label_smoothing >= 0 && cfg->label_smoothing <= 1) ? "label_smoothing must be in [0, 1]"
                     : cfg->aug.crop_padding < 0 || cfg->aug.crop_padding > KD_MAX_CROP_PADDING ? "crop_padding must be in [0, 65536]"
                     : !(cfg->aug.noise_std >= 0) || !isfinite(cfg->aug.noise_std) ? "noise_std must be finite and >= 0"
                     : cfg->aug.randaugment < 0 || cfg->aug.randaugment > KD_MAX_RANDAUGMENT ? "randaugment must be in [0, 64]"
                     : cfg->callback_every < 0 ? "callback_every must be >= 0" : NULL;
    if (bad) { PyErr_Format(PyExc_ValueError, "training option %s", bad); return -1; }
    if (ctx->fn && ctx->fn != Py_None && !PyCallable_Check(ctx->fn)) {
        PyErr_Format(PyExc_TypeError, "training option callback must be callable or None, got %s", Py_TYPE(ctx->fn)->tp_name);
        return -1;
    }
    cfg->seed = (uint64_t)seed;
    cfg->max_steps = max_steps;
    cfg->callback = progress_cb;
    cfg->callback_ctx = ctx;
    return 0;
}

// Busy flags for several nets at once; the same net may not appear twice.
static int acquire_all(NetObject ** nets, int n) {
    for (int i = 0; i < n; i++) {
        for (int j = 0; j < i; j++)
            if (nets[i] == nets[j]) {
                for (int k = 0; k < i; k++) net_release(nets[k]);
                PyErr_SetString(PyExc_ValueError, "the same model appears twice (e.g. as student and teacher)");
                return -1;
            }
        if (net_acquire(nets[i]) < 0) { for (int k = 0; k < i; k++) net_release(nets[k]); return -1; }
    }
    return 0;
}
static void release_all(NetObject ** nets, int n) { for (int i = 0; i < n; i++) net_release(nets[i]); }

static int check_opt_for(OptimObject * opt, NetObject * net, const char * name) {
    if (!PyObject_TypeCheck((PyObject *)opt, &OptimType) || !opt->opt) {
        PyErr_Format(PyExc_TypeError, "%s must be an Optimizer", name);
        return -1;
    }
    if (opt->net != net) { PyErr_Format(PyExc_ValueError, "%s was created for a different model", name); return -1; }
    return 0;
}

#define MAXNETS 66

// Sequence of Net objects -> array (borrowed from *keep, a new reference the caller releases:
// an iterator's items would otherwise die with the temporary list). Returns count or -1.
static int get_nets(PyObject * seq_o, NetObject ** out, int max, const char * name, PyObject ** keep) {
    *keep = NULL;
    if (!PyList_Check(seq_o) && !PyTuple_Check(seq_o)) {
        PyErr_Format(PyExc_TypeError, "%s must be a list of models, got %s", name, Py_TYPE(seq_o)->tp_name);
        return -1;
    }
    PyObject * seq = PySequence_Tuple(seq_o);   // owns the items while the GIL is released
    if (!seq) return -1;
    Py_ssize_t n = PyTuple_GET_SIZE(seq);
    if (n > max) { Py_DECREF(seq); PyErr_Format(PyExc_ValueError, "%s: at most %d models", name, max); return -1; }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject * o = PyTuple_GET_ITEM(seq, i);
        if (!PyObject_TypeCheck(o, &NetType) || !((NetObject *)o)->net) {
            Py_DECREF(seq);
            PyErr_Format(PyExc_TypeError, "%s[%zd] must be a built model, got %s", name, i, Py_TYPE(o)->tp_name);
            return -1;
        }
        out[i] = (NetObject *)o;
    }
    *keep = seq;
    return (int)n;
}

static PyObject * stats_dict(const struct kd_distill_stats * s) {
    return Py_BuildValue("{s:d,s:d,s:d,s:d,s:d,s:d,s:d,s:d,s:L,s:L,s:L,s:f,s:f}", "loss", s->loss, "ce", s->ce,
                         "kd", s->kd, "tckd", s->tckd, "nckd", s->nckd, "tolerant", s->tolerant, "accuracy",
                         s->accuracy, "teacher_accuracy", s->teacher_accuracy, "samples", (long long)s->samples,
                         "steps", (long long)s->steps, "skipped_steps", (long long)s->skipped_steps, "lr",
                         (double)s->lr, "kd_weight", (double)s->kd_weight);
}

// train_epoch(net, opt, data, epoch, train_options) -> dict
PyObject * py_train_epoch(PyObject * Py_UNUSED(m), PyObject * args) {
    NetObject * net;
    OptimObject * opt;
    DatasetObject * data;
    int epoch;
    PyObject * topts;
    static char * names[] = { "net", "opt", "data", "epoch", "train", NULL };
    if (!PARSE_POS(args, "O!O!O!iO", names, &NetType, &net, &OptimType, &opt, &DatasetType, &data, &epoch, &topts))
        return NULL;
    struct kd_train_cfg cfg;
    struct callback_ctx ctx = { NULL };
    if (parse_train_cfg(topts, &cfg, &ctx) < 0 || check_epoch(epoch) < 0 || check_data(data) < 0 || check_opt_for(opt, net, "opt") < 0) return NULL;
    if (!data->x) return PyErr_Format(PyExc_RuntimeError, "dataset not initialised");
    struct kd_epoch_stats es;
    memset(&es, 0, sizeof es);
    if (net_acquire(net) < 0) return NULL;
    enum kd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = kd_train_epoch(net->net, opt->opt, &data->ds, &cfg, epoch, &es);
    Py_END_ALLOW_THREADS
    net_release(net);
    if (st != KD_OK) return kd_raise(st);
    return Py_BuildValue("{s:d,s:d,s:L,s:L,s:L,s:f}", "loss", es.loss, "accuracy", es.accuracy, "samples",
                         (long long)es.samples, "steps", (long long)es.steps, "skipped_steps",
                         (long long)es.skipped_steps, "lr", (double)es.lr);
}

// Teacher logits: a list of float32 (n, V) arrays; references kept in `hold`.
static int get_logits(PyObject * seq_o, PyArrayObject ** hold, const float ** ptrs, int max, int n_rows,
                      const char * name) {
    PyObject * seq = PySequence_Fast(seq_o, "teacher_logits must be a list of arrays");
    if (!seq) return -1;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n > max) { Py_DECREF(seq); PyErr_Format(PyExc_ValueError, "at most %d teachers", max); return -1; }
    int V = -1;
    for (Py_ssize_t i = 0; i < n; i++) {
        char nm[48];
        snprintf(nm, sizeof nm, "%s[%zd]", name, i);
        hold[i] = get_array(PySequence_Fast_GET_ITEM(seq, i), NPY_FLOAT32, nm);
        if (!hold[i]) { for (Py_ssize_t k = 0; k < i; k++) Py_DECREF(hold[k]); Py_DECREF(seq); return -1; }
        PyArrayObject * a = hold[i];
        if (PyArray_NDIM(a) != 2 || PyArray_DIM(a, 0) != n_rows || (V >= 0 && PyArray_DIM(a, 1) != V) ||
            check_finite(a, nm) < 0) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_ValueError, "%s must be (%d samples, classes) like the dataset and the other teachers", nm, n_rows);
            for (Py_ssize_t k = 0; k <= i; k++) Py_DECREF(hold[k]);
            Py_DECREF(seq);
            return -1;
        }
        V = (int)PyArray_DIM(a, 1);
        ptrs[i] = PyArray_DATA(a);
    }
    Py_DECREF(seq);
    return (int)n;
}

// distill_epoch(student, opt, data, epoch, train_options, distill_options, teachers=None,
//               teacher_logits=None, teacher_weights=None) -> dict
PyObject * py_distill_epoch(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "student", "opt", "data", "epoch", "train", "distill", "teachers", "teacher_logits",
                               "teacher_weights", "gates", NULL };
    NetObject * net;
    OptimObject * opt;
    DatasetObject * data;
    int epoch;
    PyObject * topts, * dopts, * teachers_o = Py_None, * logits_o = Py_None, * weights_o = Py_None, * gates_o = Py_None;
    if (!PARSE_KW(args, kwds, "O!O!O!iOO|OOOO", kwlist, &NetType, &net, &OptimType, &opt, &DatasetType,
                                     &data, &epoch, &topts, &dopts, &teachers_o, &logits_o, &weights_o, &gates_o))
        return NULL;
    struct kd_train_cfg cfg;
    struct callback_ctx ctx = { NULL };
    if (parse_train_cfg(topts, &cfg, &ctx) < 0 || check_epoch(epoch) < 0 || check_data(data) < 0 || check_opt_for(opt, net, "opt") < 0) return NULL;
    if (!data->x) return PyErr_Format(PyExc_RuntimeError, "dataset not initialised");
    if (!PyDict_Check(dopts)) return PyErr_Format(PyExc_TypeError, "distill options must be a dict");
    struct kd_distill_cfg d = kd_distill_cfg_default();
    struct opt_reader r = { dopts, "distillation", 0 };
    int kind = d.kind, multi = d.multi, mode = (int)d.teacher_mode;
    if (opt_i32(&r, "kind", &kind) < 0 || opt_float(&r, "T", &d.T) < 0 || opt_float(&r, "ce_weight", &d.ce_weight) < 0 ||
        opt_float(&r, "kd_weight", &d.kd_weight) < 0 || opt_float(&r, "dkd_alpha", &d.dkd_alpha) < 0 ||
        opt_float(&r, "dkd_beta", &d.dkd_beta) < 0 || opt_i32(&r, "warmup_epochs", &d.warmup_epochs) < 0 ||
        opt_i32(&r, "kd_stop_epoch", &d.kd_stop_epoch) < 0 || opt_bool(&r, "conditional", &d.conditional) < 0 ||
        opt_i32(&r, "multi", &multi) < 0 || opt_float(&r, "teacher_drop", &d.teacher_drop) < 0 ||
        opt_i32(&r, "teacher_mode", &mode) < 0 || opt_float(&r, "student_noise", &d.student_noise) < 0 ||
        opt_float(&r, "gate_lr", &d.gate_lr) < 0 ||
        opt_float(&r, "tolerant_weight", &d.tolerant_weight) < 0 || opt_i32(&r, "tolerant_k", &d.tolerant_k) < 0 ||
        opt_done(&r) < 0)
        return NULL;
    if (kind < KD_DISTILL_NONE || kind > KD_DISTILL_MSE) return PyErr_Format(PyExc_ValueError, "unknown distillation kind %d", kind);
    if (multi < KD_MULTI_AVG_PROB || multi > KD_MULTI_AVG_LOSS) return PyErr_Format(PyExc_ValueError, "unknown multi-teacher mode %d", multi);
    if (mode < 0 || mode > KD_MODE_TRAIN) return PyErr_Format(PyExc_ValueError, "teacher_mode must be in 0..3");
    d.kind = (enum kd_distill_kind)kind;
    d.multi = (enum kd_multi)multi;
    d.teacher_mode = (unsigned)mode;

    NetObject * nets[MAXNETS];
    PyArrayObject * hold[64] = { NULL };
    const float * lptr[64];
    struct kd_net * tnets[64];
    int nt = 0, nl = 0, nn = 1;
    nets[0] = net;
    float tw[64];
    PyObject * ret = NULL, * keep = NULL;
    if (teachers_o != Py_None) {
        nt = get_nets(teachers_o, nets + 1, 64, "teachers", &keep);
        if (nt < 0) return NULL;
        for (int i = 0; i < nt; i++) tnets[i] = nets[1 + i]->net;
        nn += nt;
    }
    if (logits_o != Py_None) {
        nl = get_logits(logits_o, hold, lptr, 64, data->ds.n, "teacher_logits");
        if (nl < 0) { Py_XDECREF(keep); return NULL; }
    }
    int n_teachers = nt > 0 ? nt : nl;
    if (weights_o != Py_None) {
        PyArrayObject * w = get_array(weights_o, NPY_FLOAT32, "teacher_weights");
        if (!w) goto fail;
        if (PyArray_NDIM(w) != 1 || PyArray_DIM(w, 0) != n_teachers) {
            PyErr_Format(PyExc_ValueError, "teacher_weights must have one value per teacher (%d)", n_teachers);
            Py_DECREF(w);
            goto fail;
        }
        memcpy(tw, PyArray_DATA(w), (size_t)n_teachers * sizeof(float));
        Py_DECREF(w);
        d.teacher_weights = tw;
    }
    if (gates_o != Py_None) {
        // Learned gates are updated in place: the array must be exactly float32, contiguous,
        // writeable (never a silent copy).
        if (!PyArray_Check(gates_o) || PyArray_TYPE((PyArrayObject *)gates_o) != NPY_FLOAT32 ||
            !PyArray_IS_C_CONTIGUOUS((PyArrayObject *)gates_o) || !PyArray_ISWRITEABLE((PyArrayObject *)gates_o) ||
            !PyArray_ISNOTSWAPPED((PyArrayObject *)gates_o) ||
            PyArray_NDIM((PyArrayObject *)gates_o) != 1 || PyArray_DIM((PyArrayObject *)gates_o, 0) != n_teachers) {
            PyErr_Format(PyExc_TypeError, "gates must be a writeable, contiguous float32 array (native byte order) of %d values",
                         n_teachers);
            goto fail;
        }
        d.gate_logits = PyArray_DATA((PyArrayObject *)gates_o);
    }
    if (acquire_all(nets, nn) < 0) goto fail;
    struct kd_distill_stats s;
    memset(&s, 0, sizeof s);
    enum kd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = kd_distill_epoch(net->net, opt->opt, nt ? tnets : NULL, nl ? lptr : NULL, n_teachers, &data->ds, &cfg, &d,
                          epoch, &s);
    Py_END_ALLOW_THREADS
    release_all(nets, nn);
    if (st != KD_OK) { kd_raise(st); goto fail; }
    ret = stats_dict(&s);
fail:
    for (int i = 0; i < nl; i++) Py_XDECREF(hold[i]);
    Py_XDECREF(keep);
    return ret;
}

// mutual_epoch(nets, opts, data, epoch, train_options, T=1, ce_weight=1, kd_weight=1, ensemble=False) -> [dict]
PyObject * py_mutual_epoch(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "nets", "opts", "data", "epoch", "train", "T", "ce_weight", "kd_weight", "ensemble", NULL };
    PyObject * nets_o, * opts_o, * topts;
    DatasetObject * data;
    int epoch, ensemble = 0;
    struct kd_mutual_cfg mc = { 1.0f, 1.0f, 1.0f, false };
    if (!PARSE_KW(args, kwds, "OOO!iO|fffp", kwlist, &nets_o, &opts_o, &DatasetType, &data, &epoch,
                                     &topts, &mc.T, &mc.ce_weight, &mc.kd_weight, &ensemble))
        return NULL;
    mc.ensemble = ensemble;
    struct kd_train_cfg cfg;
    struct callback_ctx ctx = { NULL };
    if (parse_train_cfg(topts, &cfg, &ctx) < 0 || check_epoch(epoch) < 0 || check_data(data) < 0) return NULL;
    NetObject * nets[16];
    PyObject * keep;
    int k = get_nets(nets_o, nets, 16, "nets", &keep);
    if (k < 0) return NULL;
    if (k < 1) { Py_DECREF(keep); return PyErr_Format(PyExc_ValueError, "nets must list at least one model"); }
    if (!PyList_Check(opts_o) && !PyTuple_Check(opts_o)) {
        Py_DECREF(keep);
        return PyErr_Format(PyExc_TypeError, "opts must be a list of optimizers, got %s", Py_TYPE(opts_o)->tp_name);
    }
    PyObject * oseq = PySequence_Tuple(opts_o);   // owns the optimizers while the GIL is released
    if (!oseq) { Py_DECREF(keep); return NULL; }
    if (PyTuple_GET_SIZE(oseq) != k) {
        Py_DECREF(oseq); Py_DECREF(keep);
        return PyErr_Format(PyExc_ValueError, "opts must hold one optimizer per model of nets (%d), got %zd", k, PyTuple_GET_SIZE(oseq));
    }
    struct kd_net * cn[16];
    struct kd_optim * co[16];
    for (int i = 0; i < k; i++) {
        OptimObject * o = (OptimObject *)PyTuple_GET_ITEM(oseq, i);
        if (check_opt_for(o, nets[i], "opts[i]") < 0) { Py_DECREF(oseq); Py_DECREF(keep); return NULL; }
        cn[i] = nets[i]->net;
        co[i] = o->opt;
    }
    if (acquire_all(nets, k) < 0) { Py_DECREF(oseq); Py_DECREF(keep); return NULL; }
    struct kd_distill_stats s[16];
    enum kd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = kd_mutual_epoch(cn, co, k, &data->ds, &cfg, &mc, epoch, s);
    Py_END_ALLOW_THREADS
    release_all(nets, k);
    Py_DECREF(oseq);
    Py_DECREF(keep);
    if (st != KD_OK) return kd_raise(st);
    PyObject * list = PyList_New(k);
    if (!list) return NULL;
    for (int i = 0; i < k; i++) {
        PyObject * dct = stats_dict(&s[i]);
        if (!dct) { Py_DECREF(list); return NULL; }
        PyList_SET_ITEM(list, i, dct);
    }
    return list;
}

// slkd_epoch(student, opt, sl, sl_opts, data, epoch, train_options, slkd_options, teacher=None,
//            teacher_logits=None) -> dict
PyObject * py_slkd_epoch(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "student", "opt", "sl", "sl_opts", "data", "epoch", "train", "slkd", "teacher",
                               "teacher_logits", NULL };
    NetObject * net;
    OptimObject * opt;
    PyObject * sl_o, * slopt_o, * topts, * sopts, * teacher_o = Py_None, * logits_o = Py_None;
    DatasetObject * data;
    int epoch;
    if (!PARSE_KW(args, kwds, "O!O!OOO!iOO|OO", kwlist, &NetType, &net, &OptimType, &opt, &sl_o,
                                     &slopt_o, &DatasetType, &data, &epoch, &topts, &sopts, &teacher_o, &logits_o))
        return NULL;
    struct kd_train_cfg cfg;
    struct callback_ctx ctx = { NULL };
    if (parse_train_cfg(topts, &cfg, &ctx) < 0 || check_epoch(epoch) < 0 || check_data(data) < 0 || check_opt_for(opt, net, "opt") < 0) return NULL;
    if (!PyDict_Check(sopts)) return PyErr_Format(PyExc_TypeError, "slkd options must be a dict");
    struct kd_slkd_cfg c = { 4.0f, 0.1f, 1.0f, 3.0f, 0.5f, 2, false, false, false, false, 1.0f };
    struct opt_reader r = { sopts, "SLKD", 0 };
    if (opt_float(&r, "T", &c.T) < 0 || opt_float(&r, "alpha", &c.alpha) < 0 || opt_float(&r, "lambda", &c.lambda) < 0 ||
        opt_float(&r, "eta", &c.eta) < 0 || opt_float(&r, "rho", &c.rho) < 0 || opt_bool(&r, "fuse_probs", &c.fuse_probs) < 0 ||
        opt_bool(&r, "sl_grad", &c.sl_grad) < 0 || opt_bool(&r, "sl_frozen", &c.sl_frozen) < 0 ||
        opt_bool(&r, "slts_plain_kl", &c.slts_plain_kl) < 0 ||
        opt_float(&r, "sl_lr_scale", &c.sl_lr_scale) < 0 || opt_done(&r) < 0)
        return NULL;
    NetObject * nets[4];
    nets[0] = net;
    PyObject * keep = NULL, * oseq = NULL, * ret = NULL;
    PyArrayObject * hold[1] = { NULL };
    const float * lptr[1] = { NULL };
    int ns = get_nets(sl_o, nets + 1, 2, "sl", &keep);
    if (ns < 0) return NULL;
    if (ns < 1) { PyErr_SetString(PyExc_ValueError, "sl must list 1 or 2 SL-teacher models"); goto fail; }
    c.n_sl = ns;
    int nn = 1 + ns;
    struct kd_net * sln[2];
    struct kd_optim * slo[2] = { NULL, NULL };
    for (int j = 0; j < ns; j++) sln[j] = nets[1 + j]->net;
    if (slopt_o != Py_None) {
        if (!PyList_Check(slopt_o) && !PyTuple_Check(slopt_o)) {
            PyErr_Format(PyExc_TypeError, "sl_opts must be None or a list of optimizers, got %s", Py_TYPE(slopt_o)->tp_name);
            goto fail;
        }
        oseq = PySequence_Tuple(slopt_o);   // owns the optimizers while the GIL is released
        if (!oseq) goto fail;
        if (PyTuple_GET_SIZE(oseq) != ns) {
            PyErr_Format(PyExc_ValueError, "sl_opts must hold one optimizer per SL-teacher of sl (%d), got %zd", ns,
                         PyTuple_GET_SIZE(oseq));
            goto fail;
        }
        for (int j = 0; j < ns; j++) {
            OptimObject * o = (OptimObject *)PyTuple_GET_ITEM(oseq, j);
            if (check_opt_for(o, nets[1 + j], "sl_opts[j]") < 0) goto fail;
            slo[j] = o->opt;
        }
    }
    struct kd_net * tnet = NULL;
    if (teacher_o != Py_None) {
        if (!PyObject_TypeCheck(teacher_o, &NetType) || !((NetObject *)teacher_o)->net) {
            PyErr_Format(PyExc_TypeError, "teacher must be a built model, got %s", Py_TYPE(teacher_o)->tp_name);
            goto fail;
        }
        nets[nn++] = (NetObject *)teacher_o;
        tnet = ((NetObject *)teacher_o)->net;
    }
    if (logits_o != Py_None) {
        PyObject * lst = PyTuple_Pack(1, logits_o);
        if (!lst) goto fail;
        int nl = get_logits(lst, hold, lptr, 1, data->ds.n, "teacher_logits");
        Py_DECREF(lst);
        if (nl < 0) goto fail;
    }
    if (acquire_all(nets, nn) < 0) goto fail;
    struct kd_slkd_stats s;
    memset(&s, 0, sizeof s);
    enum kd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = kd_slkd_epoch(net->net, opt->opt, sln, slo, tnet, lptr[0], &data->ds, &cfg, &c, epoch, &s);
    Py_END_ALLOW_THREADS
    release_all(nets, nn);
    if (st != KD_OK) { kd_raise(st); goto fail; }
    ret = Py_BuildValue("{s:d,s:d,s:d,s:(dd),s:d,s:(dd),s:d,s:L,s:L,s:L,s:f}", "loss", s.loss, "loss_ts", s.loss_ts,
                        "loss_slts", s.loss_slts, "loss_sl", s.loss_sl[0], s.loss_sl[1], "accuracy", s.accuracy,
                        "sl_accuracy", s.sl_accuracy[0], s.sl_accuracy[1], "teacher_accuracy", s.teacher_accuracy,
                        "samples", (long long)s.samples, "steps", (long long)s.steps, "skipped_steps",
                        (long long)s.skipped_steps, "lr", (double)s.lr);
fail:
    Py_XDECREF(hold[0]);
    Py_XDECREF(oseq);
    Py_XDECREF(keep);
    return ret;
}

// exits_epoch(net, opt, exits, data, epoch, train_options, T=3, ce_weight=0.7, kd_weight=0.3,
//             teacher=None, teacher_logits=None) -> (dict, [exit accuracies])
PyObject * py_exits_epoch(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "net", "opt", "exits", "data", "epoch", "train", "T", "ce_weight", "kd_weight",
                               "teacher", "teacher_logits", NULL };
    NetObject * net;
    OptimObject * opt;
    PyObject * exits_o, * topts, * teacher_o = Py_None, * logits_o = Py_None;
    DatasetObject * data;
    int epoch;
    struct kd_exits_cfg e = { 3.0f, 0.7f, 0.3f };
    if (!PARSE_KW(args, kwds, "O!O!OO!iO|fffOO", kwlist, &NetType, &net, &OptimType, &opt, &exits_o,
                                     &DatasetType, &data, &epoch, &topts, &e.T, &e.ce_weight, &e.kd_weight, &teacher_o,
                                     &logits_o))
        return NULL;
    struct kd_train_cfg cfg;
    struct callback_ctx ctx = { NULL };
    if (parse_train_cfg(topts, &cfg, &ctx) < 0 || check_epoch(epoch) < 0 || check_data(data) < 0 || check_opt_for(opt, net, "opt") < 0) return NULL;
    PyObject * seq = PySequence_Fast(exits_o, "exits must be a list of node indices");
    if (!seq) return NULL;
    int ex[16], n = (int)PySequence_Fast_GET_SIZE(seq);
    if (n < 1 || n > 16) { Py_DECREF(seq); return PyErr_Format(PyExc_ValueError, "exits must list 1..16 nodes"); }
    int n_nodes = kd_net_num_nodes(net->net);
    for (int k = 0; k < n; k++) {
        PyObject * it = PySequence_Fast_GET_ITEM(seq, k);
        long v = PyBool_Check(it) || !PyLong_Check(it) ? LONG_MIN : PyLong_AsLong(it);
        if (PyErr_Occurred() || v < -n_nodes || v >= n_nodes) {
            PyErr_Clear();
            PyErr_Format(PyExc_ValueError, "exits[%d] must be a node index in [%d, %d), got %R", k, -n_nodes, n_nodes, it);
            Py_DECREF(seq);
            return NULL;
        }
        ex[k] = (int)v;
    }
    Py_DECREF(seq);
    NetObject * nets[2] = { net, NULL };
    int nn = 1;
    if (teacher_o != Py_None) {
        if (!PyObject_TypeCheck(teacher_o, &NetType) || !((NetObject *)teacher_o)->net)
            return PyErr_Format(PyExc_TypeError, "teacher must be a built model");
        nets[nn++] = (NetObject *)teacher_o;
    }
    PyArrayObject * hold[1] = { NULL };
    const float * lptr[1] = { NULL };
    if (logits_o != Py_None) {
        PyObject * lst = PyTuple_Pack(1, logits_o);
        if (!lst) return NULL;
        int nl = get_logits(lst, hold, lptr, 1, data->ds.n, "teacher_logits");
        Py_DECREF(lst);
        if (nl < 0) return NULL;
    }
    PyObject * ret = NULL;
    if (acquire_all(nets, nn) < 0) goto fail;
    struct kd_distill_stats s;
    double acc[16];
    enum kd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = kd_exits_epoch(net->net, opt->opt, ex, n, nn > 1 ? nets[1]->net : NULL, lptr[0], &data->ds, &cfg, &e, epoch,
                        &s, acc);
    Py_END_ALLOW_THREADS
    release_all(nets, nn);
    if (st != KD_OK) { kd_raise(st); goto fail; }
    PyObject * accs = PyList_New(n);
    if (!accs) goto fail;
    for (int k = 0; k < n; k++) PyList_SET_ITEM(accs, k, PyFloat_FromDouble(acc[k]));
    ret = Py_BuildValue("(NN)", stats_dict(&s), accs);
fail:
    Py_XDECREF(hold[0]);
    return ret;
}

// ---- the step engine: step_epoch(nets, terms, data, epoch, train_options, monitor=None)

// (net, node) pair; node -1 is the output.
// A reference: (net, node) on view 0, or (net, node, view).
static int parse_ref(PyObject * o, int n_nets, struct kd_ref * r, const char * what) {
    int net, node, view = 0;
    const Py_ssize_t n = PyTuple_Check(o) ? PyTuple_GET_SIZE(o) : 0;
    if ((n != 2 && n != 3) || !PyArg_ParseTuple(o, n == 2 ? "ii" : "iii", &net, &node, &view)) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s must be a tuple (net index, node index[, view]), got %R", what, o);
        return -1;
    }
    if (net < 0 || net >= n_nets) { PyErr_Format(PyExc_ValueError, "%s refers to net %d (the step has %d)", what, net, n_nets); return -1; }
    if (view < 0 || view >= KD_STEP_MAX_VIEWS) {
        PyErr_Format(PyExc_ValueError, "%s reads view %d; a step has views 0..%d", what, view, KD_STEP_MAX_VIEWS - 1);
        return -1;
    }
    r->net = net;
    r->node = node;
    r->view = view;
    return 0;
}

// A source: refs (list of pairs), optional weights w, mix, grad, drop, gates (writeable
// float32, updated in place), gate_lr. Keys are read from the term's dict.
static int parse_source(struct opt_reader * r, int n_nets, struct kd_source * s, const char * what) {
    PyObject * src = opt_get(r, "src"), * w = opt_get(r, "w"), * gates = opt_get(r, "gates");
    int mix = (int)s->mix;
    if (opt_i32(r, "mix", &mix) < 0 || opt_bool(r, "grad", &s->grad) < 0 || opt_float(r, "drop", &s->drop) < 0 ||
        opt_float(r, "gate_lr", &s->gate_lr) < 0)
        return -1;
    if (mix < KD_MIX_LOSSES || mix > KD_MIX_LOGITS) { PyErr_Format(PyExc_ValueError, "%s: unknown mix %d", what, mix); return -1; }
    s->mix = (enum kd_mix)mix;
    if (src && src != Py_None) {
        PyObject * seq = PySequence_Fast(src, "src must be a list of (net, node) pairs");
        if (!seq) return -1;
        Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
        if (n > KD_SOURCE_MAX) { Py_DECREF(seq); PyErr_Format(PyExc_ValueError, "%s: at most %d sources", what, KD_SOURCE_MAX); return -1; }
        for (Py_ssize_t i = 0; i < n; i++)
            if (parse_ref(PySequence_Fast_GET_ITEM(seq, i), n_nets, &s->ref[i], "src[i]") < 0) { Py_DECREF(seq); return -1; }
        s->n = (int)n;
        Py_DECREF(seq);
    }
    if (w && w != Py_None) {
        PyObject * seq = PySequence_Fast(w, "w must be a list of numbers");
        if (!seq) return -1;
        Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
        if (n != s->n) { Py_DECREF(seq); PyErr_Format(PyExc_ValueError, "%s: w needs one value per source (%d)", what, s->n); return -1; }
        for (Py_ssize_t i = 0; i < n; i++) {
            double d = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(seq, i));
            if (d == -1.0 && PyErr_Occurred()) { Py_DECREF(seq); return -1; }
            s->w[i] = (float)d;
        }
        Py_DECREF(seq);
    }
    if (gates && gates != Py_None) {
        PyArrayObject * g = (PyArrayObject *)gates;
        if (!PyArray_Check(gates) || PyArray_TYPE(g) != NPY_FLOAT32 || !PyArray_IS_C_CONTIGUOUS(g) ||
            !PyArray_ISWRITEABLE(g) || PyArray_NDIM(g) != 1 || PyArray_DIM(g, 0) != s->n) {
            PyErr_Format(PyExc_TypeError, "%s: gates must be a writeable, contiguous float32 array of %d values", what, s->n);
            return -1;
        }
        s->gates = PyArray_DATA(g);
    }
    return 0;
}

static PyObject * step_stats_dict(const struct kd_step_stats * s, int n_nets, int n_terms) {
    PyObject * nl = PyList_New(n_nets), * na = PyList_New(n_nets), * tv = PyList_New(n_terms), * tp = PyList_New(n_terms),
             * ta = PyList_New(n_terms), * tw = PyList_New(n_terms);
    PyObject * d = NULL;
    if (!nl || !na || !tv || !tp || !ta || !tw) goto done;
    for (int i = 0; i < n_nets; i++) {
        PyList_SET_ITEM(nl, i, PyFloat_FromDouble(s->net_loss[i]));
        PyList_SET_ITEM(na, i, PyFloat_FromDouble(s->net_accuracy[i]));
    }
    for (int t = 0; t < n_terms; t++) {
        PyList_SET_ITEM(tv, t, PyFloat_FromDouble(s->term_value[t]));
        PyList_SET_ITEM(tp, t, Py_BuildValue("(dd)", s->term_part[t][0], s->term_part[t][1]));
        PyList_SET_ITEM(ta, t, PyFloat_FromDouble(s->term_accuracy[t]));
        PyList_SET_ITEM(tw, t, PyFloat_FromDouble(s->term_weight[t]));
    }
    d = Py_BuildValue("{s:O,s:O,s:O,s:O,s:O,s:O,s:d,s:L,s:L,s:L,s:f}", "net_loss", nl, "net_accuracy", na,
                      "term_value", tv, "term_part", tp, "term_accuracy", ta, "term_weight", tw,
                      "monitor_accuracy", s->monitor_accuracy, "samples", (long long)s->samples,
                      "steps", (long long)s->steps, "skipped_steps", (long long)s->skipped_steps, "lr", (double)s->lr);
done:
    Py_XDECREF(nl); Py_XDECREF(na); Py_XDECREF(tv); Py_XDECREF(tp); Py_XDECREF(ta); Py_XDECREF(tw);
    return d;
}

// nets: list of dicts {net, opt, logits, mode, input: (net, node) or None, noise, lr_scale,
// salt, role, phases, clip_norm, shares}; terms: list of dicts {kind, name, a: (net, node), src: [(net, node)], w, mix,
// grad, drop, gates, gate_lr, weight, warmup_epochs, stop_epoch, T, alpha, beta, k,
// conditional, reverse, phases}; monitor: a dict {src, w, mix} or None; cycle, cycle_batch:
// the step cycle (kd_step_cfg). Returns the kd_step_stats as a dict.
PyObject * py_step_epoch(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "nets", "terms", "data", "epoch", "train", "monitor", "logits_net", "cycle",
                               "cycle_batch", "view_aug", NULL };
    PyObject * nets_o, * terms_o, * topts, * mon_o = Py_None, * vaug_o = Py_None;
    DatasetObject * data;
    int epoch, logits_net = 0, cycle = 0, cycle_batch = 0;
    if (!PARSE_KW(args, kwds, "OOO!iO|OiipO", kwlist, &nets_o, &terms_o, &DatasetType, &data, &epoch, &topts, &mon_o,
                  &logits_net, &cycle, &cycle_batch, &vaug_o))
        return NULL;
    struct kd_augment view_aug = { 0 };
    if (vaug_o != Py_None && parse_augment(vaug_o, &view_aug, "view_aug") < 0) return NULL;
    struct kd_train_cfg cfg;
    struct callback_ctx ctx = { NULL };
    if (parse_train_cfg(topts, &cfg, &ctx) < 0 || check_epoch(epoch) < 0 || check_data(data) < 0) return NULL;
    PyObject * nseq = PySequence_Fast(nets_o, "nets must be a list of dicts");
    if (!nseq) return NULL;
    PyObject * tseq = PySequence_Fast(terms_o, "terms must be a list of dicts");
    if (!tseq) { Py_DECREF(nseq); return NULL; }
    const Py_ssize_t nn = PySequence_Fast_GET_SIZE(nseq), nt = PySequence_Fast_GET_SIZE(tseq);
    PyObject * ret = NULL;
    struct kd_step_net sn[KD_STEP_MAX_NETS];
    struct kd_term * terms = NULL;
    NetObject * busy[KD_STEP_MAX_NETS];
    PyArrayObject * hold[KD_STEP_MAX_NETS] = { NULL }, * thold[KD_STEP_MAX_TERMS] = { NULL };
    CRDObject * banks[KD_STEP_MAX_TERMS];
    int n_busy = 0, n_banks = 0, banks_held = 0;
    if (nn < 1 || nn > KD_STEP_MAX_NETS || nt > KD_STEP_MAX_TERMS) {
        PyErr_Format(PyExc_ValueError, "a step has 1..%d nets and at most %d terms, got %zd and %zd", KD_STEP_MAX_NETS,
                     KD_STEP_MAX_TERMS, nn, nt);
        goto done;
    }
    terms = calloc((size_t)(nt ? nt : 1), sizeof *terms);
    if (!terms) { PyErr_NoMemory(); goto done; }
    for (Py_ssize_t i = 0; i < nn; i++) {
        PyObject * d = PySequence_Fast_GET_ITEM(nseq, i);
        if (!PyDict_Check(d)) { PyErr_Format(PyExc_TypeError, "nets[%zd] must be a dict", i); goto done; }
        struct kd_step_net * c = &sn[i];
        memset(c, 0, sizeof *c);
        c->input_net = c->input_node = -1;
        struct opt_reader r = { d, "step net", 0 };
        PyObject * net = opt_get(&r, "net"), * opt = opt_get(&r, "opt"), * lg = opt_get(&r, "logits"),
                 * input = opt_get(&r, "input"), * role = opt_get(&r, "role"), * inputs = opt_get(&r, "inputs");
        int mode = 0;
        long long salt = 0, nphases = 0, nviews = 0;
        if (opt_i32(&r, "mode", &mode) < 0 || opt_bool(&r, "params_only", &c->params_only) < 0 ||
            opt_int(&r, "phases", &nphases) < 0 ||
            opt_bool(&r, "grad_input", &c->grad_input) < 0 || opt_bool(&r, "detach_input", &c->detach_input) < 0 ||
            opt_float(&r, "noise", &c->input_noise) < 0 ||
            opt_float(&r, "lr_scale", &c->lr_scale) < 0 || opt_float(&r, "clip_norm", &c->clip_norm) < 0 ||
            opt_int(&r, "salt", &salt) < 0 || opt_i32(&r, "shares", &c->shares) < 0 || opt_int(&r, "views", &nviews) < 0 ||
            opt_done(&r) < 0)
            goto done;
        if (nviews < 0 || nviews >= (1ll << KD_STEP_MAX_VIEWS)) {
            PyErr_Format(PyExc_ValueError, "nets[%zd]: views must be a bit mask of views 0..%d, got %lld", i,
                         KD_STEP_MAX_VIEWS - 1, nviews);
            goto done;
        }
        c->views = (unsigned)nviews;
        if (mode < 0 || mode > (KD_MODE_TRAIN | KD_MODE_NO_GRAD)) { PyErr_Format(PyExc_ValueError, "nets[%zd]: mode %d is not a kd_mode", i, mode); goto done; }
        c->mode = (unsigned)mode;
        c->salt = (uint64_t)salt;
        if (nphases < 0 || nphases > 0xFFFFFFFFll) { PyErr_Format(PyExc_ValueError, "nets[%zd]: phases must be a 32-bit mask", i); goto done; }
        c->phases = (unsigned)nphases;
        if (role && role != Py_None) {
            if (!PyUnicode_Check(role) || !(c->role = PyUnicode_AsUTF8(role))) {
                if (!PyErr_Occurred()) PyErr_Format(PyExc_TypeError, "nets[%zd]: role must be a str", i);
                goto done;
            }
        }
        if (net && net != Py_None) {
            if (!PyObject_TypeCheck(net, &NetType) || !((NetObject *)net)->net) {
                PyErr_Format(PyExc_TypeError, "nets[%zd]: net must be a built model", i);
                goto done;
            }
            for (int j = 0; j < n_busy; j++)
                if (busy[j] == (NetObject *)net) { PyErr_SetString(PyExc_ValueError, "the same model appears twice in the step"); goto done; }
            c->net = ((NetObject *)net)->net;
            busy[n_busy++] = (NetObject *)net;
        }
        if (opt && opt != Py_None) {
            if (!c->net) { PyErr_Format(PyExc_ValueError, "nets[%zd]: an optimizer needs a net", i); goto done; }
            if (check_opt_for((OptimObject *)opt, (NetObject *)net, "opt") < 0) goto done;
            c->opt = ((OptimObject *)opt)->opt;
        }
        if (lg && lg != Py_None) {
            char nm[40];
            snprintf(nm, sizeof nm, "nets[%zd] logits", i);
            if (!(hold[i] = get_array(lg, NPY_FLOAT32, nm))) goto done;
            if (PyArray_NDIM(hold[i]) != 2 || PyArray_DIM(hold[i], 0) != data->ds.n || check_finite(hold[i], nm) < 0) {
                if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "%s must be (%d samples, classes)", nm, data->ds.n);
                goto done;
            }
            c->logits = PyArray_DATA(hold[i]);
        }
        if (input && input != Py_None) {
            struct kd_ref in;
            if (parse_ref(input, (int)nn, &in, "input") < 0) goto done;
            c->input_net = in.net;
            c->input_node = in.node;
        }
        if (inputs && inputs != Py_None) {
            PyObject * iseq = PySequence_Fast(inputs, "inputs must be a list of (net, node) references");
            if (!iseq) goto done;
            const Py_ssize_t ni = PySequence_Fast_GET_SIZE(iseq);
            if (ni > KD_STEP_MAX_INPUTS) {
                PyErr_Format(PyExc_ValueError, "nets[%zd]: at most %d extra inputs, got %zd", i, KD_STEP_MAX_INPUTS, ni);
                Py_DECREF(iseq);
                goto done;
            }
            for (Py_ssize_t k = 0; k < ni; k++)
                if (parse_ref(PySequence_Fast_GET_ITEM(iseq, k), (int)nn, &c->inputs[k], "inputs") < 0) { Py_DECREF(iseq); goto done; }
            c->n_inputs = (int)ni;
            Py_DECREF(iseq);
        }
    }
    for (Py_ssize_t t = 0; t < nt; t++) {
        PyObject * d = PySequence_Fast_GET_ITEM(tseq, t);
        if (!PyDict_Check(d)) { PyErr_Format(PyExc_TypeError, "terms[%zd] must be a dict", t); goto done; }
        struct opt_reader r = { d, "term", 0 };
        int kind = 0;
        if (!PyDict_GetItemString(d, "kind") || opt_i32(&r, "kind", &kind) < 0) { if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "terms[%zd] needs a kind", t); goto done; }
        if (kind < 0 || kind >= KD_TERM_COUNT) { PyErr_Format(PyExc_ValueError, "terms[%zd]: unknown kind %d", t, kind); goto done; }
        struct kd_term * tm = &terms[t];
        *tm = kd_term_default((enum kd_term_kind)kind);
        PyObject * a = opt_get(&r, "a"), * name = opt_get(&r, "name"), * a2 = opt_get(&r, "a2");
        PyObject * temp = opt_get(&r, "temp");
        int form = 0;
        long long tphases = 0;
        if (opt_int(&r, "phases", &tphases) < 0 || opt_bool(&r, "reverse", &tm->reverse) < 0) goto done;
        if (tphases < 0 || tphases > 0xFFFFFFFFll) { PyErr_Format(PyExc_ValueError, "terms[%zd]: phases must be a 32-bit mask", t); goto done; }
        tm->phases = (unsigned)tphases;
        if (opt_i32(&r, "params", &tm->params) < 0) goto done;
        if (tm->kind == KD_TERM_AT && (opt_float(&r, "p", &tm->at.p) < 0 || opt_i32(&r, "form", &form) < 0)) goto done;
        if (tm->kind == KD_TERM_AT) {
            if (form != KD_AT_CODE && form != KD_AT_PAPER) { PyErr_Format(PyExc_ValueError, "terms[%zd]: unknown AT form %d", t, form); goto done; }
            tm->at.form = (enum kd_at_form)form;
        }
        if (tm->kind == KD_TERM_DIST && opt_float(&r, "gamma", &tm->dist.gamma) < 0) goto done;
        if (tm->kind == KD_TERM_NORMKD &&
            (opt_float(&r, "t_norm", &tm->normkd.t_norm) < 0 || opt_bool(&r, "detach_std", &tm->normkd.detach_std) < 0))
            goto done;
        if (tm->kind == KD_TERM_WTTM && opt_float(&r, "gamma", &tm->wttm.gamma) < 0) goto done;
        if (tm->kind == KD_TERM_MLKD) {
            PyObject * tv = opt_get(&r, "temperatures");
            if (tv && parse_mlkd_temps(tv, tm->mlkd.temps, &tm->mlkd.n_temps) < 0) goto done;
            if (opt_float(&r, "percentile", &tm->mlkd.percentile) < 0) goto done;
        }
        if (tm->kind == KD_TERM_BNSTAT && opt_i32(&r, "node", &tm->bnstat.node) < 0) goto done;
        if (tm->kind == KD_TERM_TV && opt_bool(&r, "l1", &tm->tv.l1) < 0) goto done;
        if (tm->kind == KD_TERM_BCE && opt_float(&r, "target", &tm->bce.target) < 0) goto done;
        if (tm->kind == KD_TERM_CTKD &&
            (opt_float(&r, "t_start", &tm->ctkd.t_start) < 0 ||
             opt_float(&r, "t_range", &tm->ctkd.t_range) < 0 || opt_float(&r, "lambda_min", &tm->ctkd.lambda_min) < 0 ||
             opt_float(&r, "lambda_max", &tm->ctkd.lambda_max) < 0 ||
             opt_i32(&r, "decay_epochs", &tm->ctkd.decay_epochs) < 0))
            goto done;
        if (tm->kind == KD_TERM_RKD && (opt_float(&r, "w_dist", &tm->rkd.w_dist) < 0 || opt_float(&r, "w_angle", &tm->rkd.w_angle) < 0))
            goto done;
        if (tm->kind == KD_TERM_OFD) {
            PyObject * mo = opt_get(&r, "margin");
            if (!mo || !(thold[t] = get_array(mo, NPY_FLOAT32, "margin")) || PyArray_NDIM(thold[t]) != 1 ||
                check_finite(thold[t], "margin") < 0) {
                if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "terms[%zd] (ofd): margin must be a 1-D float32 array", t);
                goto done;
            }
            tm->ofd.margin = PyArray_DATA(thold[t]);
        }
        if (tm->kind == KD_TERM_AB && opt_float(&r, "margin", &tm->ab.margin) < 0) goto done;
        if (tm->kind == KD_TERM_FT && (opt_i32(&r, "p1", &tm->ft.p1) < 0 || opt_float(&r, "p2", &tm->ft.p2) < 0)) goto done;
        if (tm->kind == KD_TERM_VID && opt_float(&r, "eps", &tm->vid.eps) < 0) goto done;
        if (tm->kind == KD_TERM_CRD) {
            PyObject * bo = opt_get(&r, "bank");
            if (!bo || !PyObject_TypeCheck(bo, &CRDType) || !((CRDObject *)bo)->crd) {
                PyErr_Format(PyExc_TypeError, "terms[%zd] (crd): bank must be a CRD state (kdcore.functional.CRDBank)", t);
                goto done;
            }
            if (opt_bool(&r, "class_negatives", &tm->crd.class_negatives) < 0) goto done;
            for (int j = 0; j < n_banks; j++)
                if (banks[j] == (CRDObject *)bo) { PyErr_SetString(PyExc_ValueError, "a CRD bank appears in two terms"); goto done; }
            tm->crd.bank = ((CRDObject *)bo)->crd;
            banks[n_banks++] = (CRDObject *)bo;
        }
        // CTKD's instance-wise temperature: the net output it reads (one value per sample)
        if (temp && (tm->kind != KD_TERM_CTKD || parse_ref(temp, (int)nn, &tm->ctkd.temp, "temp") < 0)) {
            if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "terms[%zd]: temp is a CTKD option", t);
            goto done;
        }
        tm->ctkd.instance = tm->kind == KD_TERM_CTKD && temp;
        if (a2 && (tm->kind != KD_TERM_FSP || parse_ref(a2, (int)nn, &tm->fsp.a2, "a2") < 0)) {
            if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "terms[%zd]: a2 is an FSP option", t);
            goto done;
        }
        if (opt_float(&r, "weight", &tm->weight) < 0 || opt_i32(&r, "warmup_epochs", &tm->warmup_epochs) < 0 ||
            opt_i32(&r, "stop_epoch", &tm->stop_epoch) < 0 || opt_float(&r, "T", &tm->T) < 0 ||
            opt_float(&r, "alpha", &tm->alpha) < 0 || opt_float(&r, "beta", &tm->beta) < 0 ||
            opt_i32(&r, "k", &tm->k) < 0 || opt_bool(&r, "conditional", &tm->conditional) < 0 ||
            opt_bool(&r, "standardize", &tm->standardize) < 0 ||
            parse_source(&r, (int)nn, &tm->src, "term") < 0 || opt_done(&r) < 0)
            goto done;
        if (a && parse_ref(a, (int)nn, &tm->a, "a") < 0) goto done;
        if (name && name != Py_None && (!PyUnicode_Check(name) || !(tm->name = PyUnicode_AsUTF8(name)))) {
            if (!PyErr_Occurred()) PyErr_Format(PyExc_TypeError, "terms[%zd]: name must be a str", t);
            goto done;
        }
    }
    struct kd_step_cfg step = { .nets = sn, .n_nets = (int)nn, .terms = terms, .n_terms = (int)nt,
                                .logits_net = logits_net, .cycle = cycle, .cycle_batch = cycle_batch != 0,
                                .view_aug = view_aug };
    if (mon_o != Py_None) {
        if (!PyDict_Check(mon_o)) { PyErr_SetString(PyExc_TypeError, "monitor must be a dict or None"); goto done; }
        struct opt_reader r = { mon_o, "monitor", 0 };
        if (parse_source(&r, (int)nn, &step.monitor, "monitor") < 0 || opt_done(&r) < 0) goto done;
    }
    for (; banks_held < n_banks; banks_held++)
        if (crd_acquire(banks[banks_held]) < 0) goto done;
    if (acquire_all(busy, n_busy) < 0) goto done;
    struct kd_step_stats s;
    enum kd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = kd_step_epoch(&step, &data->ds, &cfg, epoch, &s);
    Py_END_ALLOW_THREADS
    release_all(busy, n_busy);
    if (st != KD_OK) { kd_raise(st); goto done; }
    ret = step_stats_dict(&s, (int)nn, (int)nt);
done:
    for (int i = 0; i < banks_held; i++) banks[i]->busy = 0;
    for (int i = 0; i < KD_STEP_MAX_NETS; i++) Py_XDECREF(hold[i]);
    for (int i = 0; i < KD_STEP_MAX_TERMS; i++) Py_XDECREF(thold[i]);
    free(terms);
    Py_DECREF(nseq);
    Py_DECREF(tseq);
    return ret;
}

// The term kinds and mixes of kdcore.h, by name (Python reads them; no integer is mirrored),
// and each kind's defaults (kd_term_default).

// step_batch(data, epoch, train, batch, view_aug=None) -> (indices, view 0, view 1 or None):
// the inputs step_epoch builds for that batch (kd_step_batch).
PyObject * py_step_batch(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "data", "epoch", "train", "batch", "view_aug", NULL };
    DatasetObject * data;
    PyObject * topts, * vaug_o = Py_None;
    int epoch;
    long long batch;
    if (!PARSE_KW(args, kwds, "O!iOL|O", kwlist, &DatasetType, &data, &epoch, &topts, &batch, &vaug_o)) return NULL;
    struct kd_train_cfg cfg;
    struct callback_ctx ctx = { NULL };
    struct kd_augment va;
    if (parse_train_cfg(topts, &cfg, &ctx) < 0 || check_epoch(epoch) < 0 || check_data(data) < 0) return NULL;
    if (vaug_o != Py_None && parse_augment(vaug_o, &va, "view_aug") < 0) return NULL;
    cfg.callback = NULL;
    const int B = cfg.batch_size < data->ds.n ? cfg.batch_size : data->ds.n;
    npy_intp di[1] = { B }, dx[4] = { B, data->ds.c, data->ds.h, data->ds.w };
    PyObject * idx = PyArray_SimpleNew(1, di, NPY_INT64), * x0 = PyArray_SimpleNew(4, dx, NPY_FLOAT32);
    PyObject * x1 = vaug_o != Py_None ? PyArray_SimpleNew(4, dx, NPY_FLOAT32) : (Py_INCREF(Py_None), Py_None);
    PyObject * ret = NULL;
    if (!idx || !x0 || !x1) goto done;
    int nb = 0;
    enum kd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = kd_step_batch(&data->ds, &cfg, vaug_o != Py_None ? &va : NULL, epoch, batch, PyArray_DATA((PyArrayObject *)idx),
                       PyArray_DATA((PyArrayObject *)x0), vaug_o != Py_None ? PyArray_DATA((PyArrayObject *)x1) : NULL, &nb);
    Py_END_ALLOW_THREADS
    if (st != KD_OK) { kd_raise(st); goto done; }
    if (nb < B) {   // a last batch shorter than batch_size: its nb samples
        Py_SETREF(idx, PySequence_GetSlice(idx, 0, nb));
        Py_SETREF(x0, PySequence_GetSlice(x0, 0, nb));
        if (x1 != Py_None) Py_SETREF(x1, PySequence_GetSlice(x1, 0, nb));
        if (!idx || !x0 || !x1) goto done;
    }
    ret = Py_BuildValue("(OOO)", idx, x0, x1);
done:
    Py_XDECREF(idx); Py_XDECREF(x0); Py_XDECREF(x1);
    return ret;
}
