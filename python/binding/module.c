// CPython + NumPy binding for kdcore. Binding only: parse, validate (naming the argument),
// release the GIL around the C core, map kd_status to Python exceptions. All numerics live
// in kdcore/src.
//
// Recipe for each entry point (bottleneck's): convert arguments -> validate -> acquire the
// object's busy flag -> Py_BEGIN_ALLOW_THREADS -> core call -> Py_END_ALLOW_THREADS ->
// release -> map status. One `fail:` label releases references on every path.
//
// This file: Module-level functions (evaluation, explain fit, configuration, ISA, threads), the
// exported enums, the method table and module initialisation.
#define KD_BINDING_MODULE
#include "binding.h"

static PyObject * py_evaluate(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "net", "data", "batch_size", "logits", NULL };
    NetObject * net;
    DatasetObject * data;
    int batch = 256, want_logits = 0;
    if (!PARSE_KW(args, kwds, "O!O!|ip", kwlist, &NetType, &net, &DatasetType, &data, &batch, &want_logits))
        return NULL;
    if (!data->x) return PyErr_Format(PyExc_RuntimeError, "dataset not initialised");
    if (batch < 1) return PyErr_Format(PyExc_ValueError, "batch_size (%d) must be >= 1", batch);
    PyObject * logits = NULL;
    if (want_logits) {
        if (!net->net) return PyErr_Format(PyExc_RuntimeError, "the model was not built");
        if (net_acquire(net) < 0) return NULL;
        enum kd_status st = kd_net_plan(net->net, 1, data->ds.c, data->ds.h, data->ds.w);
        net_release(net);
        if (st != KD_OK) return kd_raise(st);
        int c, h, w;
        kd_net_node_shape(net->net, -1, &c, &h, &w);
        npy_intp dims[2] = { data->ds.n, (npy_intp)c * h * w };
        logits = PyArray_SimpleNew(2, dims, NPY_FLOAT32);
        if (!logits) return NULL;
    }
    int labels = data->y != NULL;
    double loss = 0, acc = 0;
    if (net_acquire(net) < 0) { Py_XDECREF(logits); return NULL; }
    enum kd_status st;
    float * lp = logits ? PyArray_DATA((PyArrayObject *)logits) : NULL;
    Py_BEGIN_ALLOW_THREADS
    st = kd_evaluate(net->net, &data->ds, batch, lp, labels ? &loss : NULL, labels ? &acc : NULL);
    Py_END_ALLOW_THREADS
    net_release(net);
    if (st != KD_OK) { Py_XDECREF(logits); return kd_raise(st); }
    if (!logits) logits = Py_NewRef(Py_None);
    if (!labels) return Py_BuildValue("(NOO)", logits, Py_None, Py_None);
    return Py_BuildValue("(Ndd)", logits, loss, acc);
}

// x for the sigma fit: float32 (N, C, H, W) or (N, D), finite; dims filled as input_dims.
static PyArrayObject * sigma_input(PyObject * xo, int d[4]) {
    PyArrayObject * x = get_array(xo, NPY_FLOAT32, "x");
    if (!x) return NULL;
    if (input_dims(x, "x", d) < 0 || check_finite(x, "x") < 0) { Py_DECREF(x); return NULL; }
    return x;
}

// sigma_objective(net, node, x, s, eps=None, samples=16, seed=0, lam=1, delta2=1) -> (value (N,), grad like x)
static PyObject * py_sigma_objective(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "net", "node", "x", "s", "eps", "samples", "seed", "lam", "delta2", NULL };
    NetObject * net;
    int node, samples = 16;
    unsigned long long seed = 0;
    float lam = 1.0f, delta2 = 1.0f;
    PyObject * xo, * so, * eo = Py_None;
    if (!PARSE_KW(args, kwds, "O!iOO|OiKff", kwlist, &NetType, &net, &node, &xo, &so, &eo, &samples, &seed, &lam, &delta2))
        return NULL;
    int d[4];
    PyArrayObject * x = sigma_input(xo, d), * sa = NULL, * ea = NULL;
    PyObject * val = NULL, * grad = NULL, * ret = NULL;
    if (!x) return NULL;
    const npy_intp n = PyArray_SIZE(x);
    if (!(sa = get_array(so, NPY_FLOAT32, "s"))) goto done;
    if (PyArray_SIZE(sa) != n) { PyErr_Format(PyExc_ValueError, "s must have x's %zd values, got %zd", (Py_ssize_t)n, (Py_ssize_t)PyArray_SIZE(sa)); goto done; }
    if (check_finite(sa, "s") < 0) goto done;
    if (eo != Py_None) {
        if (!(ea = get_array(eo, NPY_FLOAT32, "eps"))) goto done;
        if (samples < 1 || PyArray_SIZE(ea) != n * samples) {
            PyErr_Format(PyExc_ValueError, "eps must hold samples x x.size = %zd values (N, samples, ...), got %zd",
                         (Py_ssize_t)(n * (samples > 0 ? samples : 0)), (Py_ssize_t)PyArray_SIZE(ea));
            goto done;
        }
        if (check_finite(ea, "eps") < 0) goto done;
    }
    npy_intp vd[1] = { d[0] };
    if (!(val = PyArray_SimpleNew(1, vd, NPY_FLOAT64)) ||
        !(grad = PyArray_SimpleNew(PyArray_NDIM(x), PyArray_DIMS(x), NPY_FLOAT32)))
        goto done;
    if (net_acquire(net) < 0) goto done;
    enum kd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = kd_sigma_objective(net->net, node, PyArray_DATA(x), d[0], d[1], d[2], d[3], PyArray_DATA(sa),
                            ea ? PyArray_DATA(ea) : NULL, samples, seed, lam, delta2,
                            PyArray_DATA((PyArrayObject *)val), PyArray_DATA((PyArrayObject *)grad));
    Py_END_ALLOW_THREADS
    net_release(net);
    if (st != KD_OK) { kd_raise(st); goto done; }
    ret = Py_BuildValue("(OO)", val, grad);
done:
    Py_XDECREF(x); Py_XDECREF(sa); Py_XDECREF(ea); Py_XDECREF(val); Py_XDECREF(grad);
    return ret;
}

// explain_sigma(net, node, x, steps=300, samples=16, lr=0.05, lam=1, delta2=1, init_sigma=0.01, seed=0)
//   -> (s like x, objective (steps,))
static PyObject * py_explain_sigma(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "net", "node", "x", "steps", "samples", "lr", "lam", "delta2", "init_sigma", "seed", NULL };
    NetObject * net;
    int node;
    PyObject * xo;
    struct kd_sigma_cfg cfg = kd_sigma_cfg_default();
    unsigned long long seed = 0;
    if (!PARSE_KW(args, kwds, "O!iO|iiffffK", kwlist, &NetType, &net, &node, &xo, &cfg.steps, &cfg.samples, &cfg.lr,
                  &cfg.lambda, &cfg.delta2, &cfg.init_sigma, &seed))
        return NULL;
    cfg.seed = seed;
    int d[4];
    PyArrayObject * x = sigma_input(xo, d);
    if (!x) return NULL;
    PyObject * s = NULL, * obj = NULL, * ret = NULL;
    npy_intp od[1] = { cfg.steps > 0 ? cfg.steps : 0 };
    if (!(s = PyArray_SimpleNew(PyArray_NDIM(x), PyArray_DIMS(x), NPY_FLOAT32)) || !(obj = PyArray_SimpleNew(1, od, NPY_FLOAT64)))
        goto done;
    if (net_acquire(net) < 0) goto done;
    enum kd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = kd_explain_sigma(net->net, node, PyArray_DATA(x), d[0], d[1], d[2], d[3], &cfg, PyArray_DATA((PyArrayObject *)s),
                          PyArray_DATA((PyArrayObject *)obj));
    Py_END_ALLOW_THREADS
    net_release(net);
    if (st != KD_OK) { kd_raise(st); goto done; }
    ret = Py_BuildValue("(OO)", s, obj);
done:
    Py_XDECREF(x); Py_XDECREF(s); Py_XDECREF(obj);
    return ret;
}

// cross_entropy(logits (N, V) float32, target (N,) int64, label_smoothing=0) -> (loss, dlogits)
static PyObject * py_cross_entropy(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "logits", "target", "label_smoothing", NULL };
    PyObject * lo, * to;
    float ls = 0.0f;
    if (!PARSE_KW(args, kwds, "OO|f", kwlist, &lo, &to, &ls)) return NULL;
    PyArrayObject * z = get_array(lo, NPY_FLOAT32, "logits");
    if (!z) return NULL;
    PyArrayObject * t = NULL;
    PyObject * d = NULL;
    if (PyArray_NDIM(z) != 2 || PyArray_SIZE(z) == 0) {
        PyErr_Format(PyExc_ValueError, "logits must be a non-empty 2-D array (N, classes), got %d-D", PyArray_NDIM(z));
        goto fail;
    }
    if (check_int(PyArray_DIM(z, 0), "logits") < 0 || check_int(PyArray_DIM(z, 1), "logits") < 0) goto fail;
    if (check_finite(z, "logits") < 0) goto fail;
    t = get_array(to, NPY_INT64, "target");
    if (!t) goto fail;
    if (PyArray_NDIM(t) != 1 || PyArray_DIM(t, 0) != PyArray_DIM(z, 0)) {
        PyErr_Format(PyExc_ValueError, "target must be 1-D with %zd labels (one per row of the logits), got %zd values",
                     (Py_ssize_t)PyArray_DIM(z, 0), (Py_ssize_t)PyArray_SIZE(t));
        goto fail;
    }
    int N = (int)PyArray_DIM(z, 0), V = (int)PyArray_DIM(z, 1);
    const int64_t * tp = PyArray_DATA(t);
    for (int i = 0; i < N; i++)
        if (tp[i] < 0 || tp[i] >= V) {
            PyErr_Format(PyExc_ValueError, "target[%d] = %lld is outside [0, %d)", i, (long long)tp[i], V);
            goto fail;
        }
    d = PyArray_SimpleNew(2, PyArray_DIMS(z), NPY_FLOAT32);
    if (!d) goto fail;
    float loss;
    enum kd_status st = kd_cross_entropy(&loss, PyArray_DATA((PyArrayObject *)d), PyArray_DATA(z), tp, NULL, N, V, ls, 1.0f, false);
    if (st != KD_OK) { kd_raise(st); Py_CLEAR(d); goto fail; }
    Py_DECREF(z);
    Py_DECREF(t);
    return Py_BuildValue("(fN)", loss, d);
fail:
    Py_XDECREF(z);
    Py_XDECREF(t);
    Py_XDECREF(d);
    return NULL;
}

static PyObject * py_idx_read(PyObject * Py_UNUSED(m), PyObject * arg) {
    PyObject * bytes = NULL;
    if (!PyUnicode_FSConverter(arg, &bytes)) return NULL;
    uint8_t * data = NULL;
    int ndim = 0;
    int64_t dims[4];
    enum kd_status st;
    const char * path = PyBytes_AS_STRING(bytes);
    Py_BEGIN_ALLOW_THREADS
    st = kd_idx_read(path, &data, &ndim, dims);
    Py_END_ALLOW_THREADS
    Py_DECREF(bytes);
    if (st != KD_OK) return kd_raise(st);
    npy_intp nd[4];
    for (int i = 0; i < ndim; i++) nd[i] = (npy_intp)dims[i];
    PyObject * a = PyArray_SimpleNew(ndim, nd, NPY_UINT8);
    if (a) memcpy(PyArray_DATA((PyArrayObject *)a), data, (size_t)PyArray_NBYTES((PyArrayObject *)a));
    kd_free(data);
    return a;
}

static PyObject * py_schedule_lr(PyObject * Py_UNUSED(m), PyObject * args) {
    PyObject * so;
    float gamma;
    int epoch, step, steps_per_epoch;
    static char * names[] = { "schedule", "gamma", "epoch", "step", "steps_per_epoch", NULL };
    if (!PARSE_POS(args, "Ofiii", names, &so, &gamma, &epoch, &step, &steps_per_epoch)) return NULL;
    struct kd_schedule s;
    if (parse_schedule(so, &s) < 0 || check_gamma(gamma) < 0) return NULL;
    if (epoch < 0 || step < 0 || steps_per_epoch < 1)
        return PyErr_Format(PyExc_ValueError, "epoch (%d) and step (%d) must be >= 0 and steps_per_epoch (%d) >= 1",
                            epoch, step, steps_per_epoch);
    s.gamma = gamma;
    return PyFloat_FromDouble(kd_schedule_lr(&s, epoch, step, steps_per_epoch));
}

static PyObject * py_set_num_threads(PyObject * Py_UNUSED(m), PyObject * arg) {
    long n = PyLong_AsLong(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n < 1 || n > 1024) return PyErr_Format(PyExc_ValueError, "n must be in [1, 1024], got %ld", n);
    kd_set_num_threads((int)n);
    Py_RETURN_NONE;
}

static PyObject * py_get_num_threads(PyObject * Py_UNUSED(m), PyObject * Py_UNUSED(a)) {
    return PyLong_FromLong(kd_get_num_threads());
}

static PyObject * py_set_deterministic(PyObject * Py_UNUSED(m), PyObject * arg) {
    if (!PyBool_Check(arg)) return PyErr_Format(PyExc_TypeError, "on must be a bool, got %s", Py_TYPE(arg)->tp_name);
    kd_set_deterministic(arg == Py_True);
    Py_RETURN_NONE;
}

static PyObject * py_get_deterministic(PyObject * Py_UNUSED(m), PyObject * Py_UNUSED(a)) {
    return PyBool_FromLong(kd_get_deterministic());
}

static PyObject * py_blas_config(PyObject * Py_UNUSED(m), PyObject * Py_UNUSED(a)) {
    return PyUnicode_FromString(kd_blas_config());
}

// Instruction sets cross the binding as their names (kd_isa_name: "auto", "portable",
// "avx2", "avx512"), never as enum kd_isa values.
static PyObject * py_set_isa(PyObject * Py_UNUSED(m), PyObject * arg) {
    if (!PyUnicode_Check(arg)) return PyErr_Format(PyExc_TypeError, "isa must be a str, got %s", Py_TYPE(arg)->tp_name);
    const char * s = PyUnicode_AsUTF8(arg);
    if (!s) return NULL;
    for (int l = 0; l < KD_ISA_COUNT; l++) {
        if (strcasecmp(s, kd_isa_name((enum kd_isa)l)) == 0) {
            enum kd_status st = kd_set_isa((enum kd_isa)l);
            if (st != KD_OK) return kd_raise(st);
            Py_RETURN_NONE;
        }
    }
    return PyErr_Format(PyExc_ValueError, "isa must be one of 'auto', 'avx512', 'avx2', 'portable', got %R", arg);
}

static PyObject * py_get_isa(PyObject * Py_UNUSED(m), PyObject * Py_UNUSED(a)) {
    return PyUnicode_FromString(kd_isa_name(kd_get_isa()));
}

// The instruction sets this CPU supports, best first (auto not included).
static PyObject * py_supported_isas(PyObject * Py_UNUSED(m), PyObject * Py_UNUSED(a)) {
    PyObject * t = PyList_New(0);
    for (int l = KD_ISA_COUNT - 1; t && l > KD_ISA_AUTO; l--) {
        if (!kd_isa_supported((enum kd_isa)l)) continue;
        PyObject * name = PyUnicode_FromString(kd_isa_name((enum kd_isa)l));
        if (!name || PyList_Append(t, name) < 0) { Py_XDECREF(name); Py_CLEAR(t); break; }
        Py_DECREF(name);
    }
    if (!t) return NULL;
    PyObject * r = PyList_AsTuple(t);
    Py_DECREF(t);
    return r;
}

static PyObject * py_isa_config(PyObject * Py_UNUSED(m), PyObject * Py_UNUSED(a)) {
    return PyUnicode_FromString(kd_isa_config());
}

static PyObject * py_winograd_config(PyObject * Py_UNUSED(m), PyObject * Py_UNUSED(a)) {
    return PyUnicode_FromString(kd_winograd_config());
}

// RuntimeError if KDCORE_ISA was refused (kdcore/__init__.py calls it at import).
static PyObject * py_isa_init(PyObject * Py_UNUSED(m), PyObject * Py_UNUSED(a)) {
    if (kd_isa_init() != KD_OK) {
        PyErr_SetString(PyExc_RuntimeError, kd_last_error());
        return NULL;
    }
    Py_RETURN_NONE;
}

static int add_enums(PyObject * m) {
    PyObject * kinds = PyDict_New(), * defaults = PyDict_New();
    if (!kinds || !defaults) goto fail;
    for (int k = 0; k < KD_TERM_COUNT; k++) {
        struct kd_term t = kd_term_default((enum kd_term_kind)k);
        PyObject * v = PyLong_FromLong(k);
        PyObject * d = Py_BuildValue("{s:f,s:f,s:f,s:f,s:i}", "weight", (double)t.weight, "T", (double)t.T,
                                     "alpha", (double)t.alpha, "beta", (double)t.beta, "k", t.k);
        // The kind-specific options, one line per kind.
        PyObject * x = NULL;
        switch (k) {
        case KD_TERM_AT: x = Py_BuildValue("{s:f,s:i}", "p", (double)t.at.p, "form", (int)t.at.form); break;
        case KD_TERM_DIST: x = Py_BuildValue("{s:f}", "gamma", (double)t.dist.gamma); break;
        case KD_TERM_NORMKD:
            x = Py_BuildValue("{s:f,s:O}", "t_norm", (double)t.normkd.t_norm, "detach_std",
                              t.normkd.detach_std ? Py_True : Py_False);
            break;
        case KD_TERM_WTTM: x = Py_BuildValue("{s:f}", "gamma", (double)t.wttm.gamma); break;
        case KD_TERM_MLKD: {
            PyObject * tt = PyTuple_New(t.mlkd.n_temps);
            for (int j = 0; tt && j < t.mlkd.n_temps; j++) {
                PyObject * f = PyFloat_FromDouble((double)t.mlkd.temps[j]);
                if (!f) { Py_CLEAR(tt); break; }
                PyTuple_SET_ITEM(tt, j, f);
            }
            if (tt) x = Py_BuildValue("{s:N,s:f}", "temperatures", tt, "percentile", (double)t.mlkd.percentile);
            break;
        }
        case KD_TERM_TV: x = Py_BuildValue("{s:O}", "l1", t.tv.l1 ? Py_True : Py_False); break;
        case KD_TERM_BCE: x = Py_BuildValue("{s:f}", "target", (double)t.bce.target); break;
        case KD_TERM_CTKD:
            x = Py_BuildValue("{s:f,s:f,s:f,s:f,s:i}", "t_start", (double)t.ctkd.t_start, "t_range",
                              (double)t.ctkd.t_range, "lambda_min", (double)t.ctkd.lambda_min, "lambda_max",
                              (double)t.ctkd.lambda_max, "decay_epochs", t.ctkd.decay_epochs);
            break;
        case KD_TERM_AB: x = Py_BuildValue("{s:f}", "margin", (double)t.ab.margin); break;
        case KD_TERM_FT: x = Py_BuildValue("{s:i,s:f}", "p1", t.ft.p1, "p2", (double)t.ft.p2); break;
        case KD_TERM_VID: x = Py_BuildValue("{s:f}", "eps", (double)t.vid.eps); break;
        case KD_TERM_RKD:
            x = Py_BuildValue("{s:f,s:f}", "w_dist", (double)t.rkd.w_dist, "w_angle", (double)t.rkd.w_angle);
            break;
        default: break;
        }
        if (d && x && PyDict_Update(d, x) < 0) Py_CLEAR(d);
        if (d && !x && PyErr_Occurred()) Py_CLEAR(d);
        Py_XDECREF(x);
        int bad = !v || !d || PyDict_SetItemString(kinds, kd_term_kind_name((enum kd_term_kind)k), v) < 0 ||
                  PyDict_SetItemString(defaults, kd_term_kind_name((enum kd_term_kind)k), d) < 0;
        Py_XDECREF(v);
        Py_XDECREF(d);
        if (bad) goto fail;
    }
    PyObject * layers = PyDict_New();   // enum kd_layer_type by name: what nn.py builds nets from
    for (int k = 0; layers && k < KD_LAYER_COUNT; k++) {
        PyObject * v = PyLong_FromLong(k);
        if (!v || PyDict_SetItemString(layers, kd_layer_type_name((enum kd_layer_type)k), v) < 0) Py_CLEAR(layers);
        Py_XDECREF(v);
    }
    if (!layers || PyModule_AddObject(m, "LAYER_TYPES", layers) < 0) { Py_XDECREF(layers); goto fail; }
    if (PyModule_AddIntConstant(m, "STEP_MAX_PHASES", KD_STEP_MAX_PHASES) < 0) goto fail;
    if (PyModule_AddIntConstant(m, "STEP_MAX_VIEWS", KD_STEP_MAX_VIEWS) < 0) goto fail;
    {
        static const char * ra_names[KD_RA_COUNT] = { "autocontrast", "brightness", "color", "contrast", "equalize",
                                                      "identity", "posterize", "rotate", "sharpness", "shear_x",
                                                      "shear_y", "solarize", "translate_x", "translate_y", "cutout" };
        PyObject * ops = PyDict_New();
        if (!ops) goto fail;
        for (int k = 0; k < KD_RA_COUNT; k++) {
            PyObject * v = PyLong_FromLong(k);
            if (!v || PyDict_SetItemString(ops, ra_names[k], v) < 0) { Py_XDECREF(v); Py_DECREF(ops); goto fail; }
            Py_DECREF(v);
        }
        if (PyModule_AddObject(m, "RA_OPS", ops) < 0) { Py_DECREF(ops); goto fail; }
    }
    PyObject * forms = Py_BuildValue("{s:i,s:i}", "code", KD_AT_CODE, "paper", KD_AT_PAPER);
    if (!forms || PyModule_AddObject(m, "AT_FORMS", forms) < 0) { Py_XDECREF(forms); goto fail; }
    PyObject * mixes = Py_BuildValue("{s:i,s:i,s:i}", "losses", KD_MIX_LOSSES, "probs", KD_MIX_PROBS, "logits", KD_MIX_LOGITS);
    PyObject * modes = Py_BuildValue("{s:i,s:i,s:i,s:i,s:i}", "eval", KD_MODE_EVAL, "bn_batch", KD_MODE_BN_BATCH,
                                     "dropout", KD_MODE_DROPOUT, "train", KD_MODE_TRAIN, "no_grad", KD_MODE_NO_GRAD);
    if (!mixes || !modes || PyModule_AddObject(m, "TERM_KINDS", kinds) < 0) { Py_XDECREF(mixes); Py_XDECREF(modes); goto fail; }
    kinds = NULL;
    if (PyModule_AddObject(m, "TERM_DEFAULTS", defaults) < 0) { Py_DECREF(mixes); Py_DECREF(modes); goto fail; }
    defaults = NULL;
    if (PyModule_AddObject(m, "MIX", mixes) < 0) { Py_DECREF(mixes); Py_DECREF(modes); return -1; }
    if (PyModule_AddObject(m, "MODES", modes) < 0) { Py_DECREF(modes); return -1; }
    return 0;
fail:
    Py_XDECREF(kinds);
    Py_XDECREF(defaults);
    return -1;
}

static PyMethodDef module_methods[] = {
    { "step_epoch", (PyCFunction)(void (*)(void))py_step_epoch, METH_VARARGS | METH_KEYWORDS, "one epoch of the step engine" },
    { "ra_apply", (PyCFunction)(void (*)(void))py_ra_apply, METH_VARARGS | METH_KEYWORDS,
      "ra_apply(image, op, magnitude, cx=0, cy=0) -> one RandAugment operation on a copy of a (C, H, W) image" },
    { "ra_range", (PyCFunction)py_ra_range, METH_VARARGS, "ra_range(op) -> (lo, hi) of op's magnitude" },
    { "step_batch", (PyCFunction)(void (*)(void))py_step_batch, METH_VARARGS | METH_KEYWORDS,
      "step_batch(data, epoch, train, batch, view_aug=None) -> (indices, view 0, view 1 or None) as step_epoch builds them" },
    { "train_epoch", (PyCFunction)py_train_epoch, METH_VARARGS, "train_epoch(net, opt, data, epoch, train_options)" },
    { "distill_epoch", (PyCFunction)(void (*)(void))py_distill_epoch, METH_VARARGS | METH_KEYWORDS, "one distillation epoch in C" },
    { "mutual_epoch", (PyCFunction)(void (*)(void))py_mutual_epoch, METH_VARARGS | METH_KEYWORDS, "one deep-mutual-learning epoch in C" },
    { "exits_epoch", (PyCFunction)(void (*)(void))py_exits_epoch, METH_VARARGS | METH_KEYWORDS, "one multi-exit epoch in C" },
    { "slkd_epoch", (PyCFunction)(void (*)(void))py_slkd_epoch, METH_VARARGS | METH_KEYWORDS, "one SLKD epoch in C" },
    { "kd_loss", (PyCFunction)(void (*)(void))py_kd_loss, METH_VARARGS | METH_KEYWORDS, "(loss, dstudent[, dteacher])" },
    { "soft_loss", (PyCFunction)(void (*)(void))py_soft_loss, METH_VARARGS | METH_KEYWORDS, "(loss, dstudent)" },
    { "dkd_loss", (PyCFunction)(void (*)(void))py_dkd_loss, METH_VARARGS | METH_KEYWORDS, "(loss, dstudent, tckd, nckd)" },
    { "mse_loss", (PyCFunction)py_mse_loss, METH_VARARGS, "(loss, dstudent)" },
    { "l1_loss", (PyCFunction)py_l1_loss, METH_VARARGS, "(loss, dstudent)" },
    { "bce_loss", (PyCFunction)py_bce_loss, METH_VARARGS, "(loss, dlogits)" },
    { "tolerant_loss", (PyCFunction)py_tolerant_loss, METH_VARARGS, "(loss, dlogits)" },
    { "softmax", (PyCFunction)(void (*)(void))py_softmax, METH_VARARGS | METH_KEYWORDS, "softmax(logits, T)" },
    { "at_loss", (PyCFunction)(void (*)(void))py_at_loss, METH_VARARGS | METH_KEYWORDS, "(loss, ds[, dt])" },
    { "sp_loss", (PyCFunction)(void (*)(void))py_sp_loss, METH_VARARGS | METH_KEYWORDS, "(loss, ds[, dt])" },
    { "nst_loss", (PyCFunction)(void (*)(void))py_nst_loss, METH_VARARGS | METH_KEYWORDS, "(loss, ds[, dt])" },
    { "rkd_loss", (PyCFunction)(void (*)(void))py_rkd_loss, METH_VARARGS | METH_KEYWORDS, "(loss, ds[, dt], (L_dist, L_angle))" },
    { "pkt_loss", (PyCFunction)(void (*)(void))py_pkt_loss, METH_VARARGS | METH_KEYWORDS, "(loss, ds[, dt])" },
    { "fsp_loss", (PyCFunction)(void (*)(void))py_fsp_loss, METH_VARARGS | METH_KEYWORDS, "(loss, ds1, ds2[, dt1, dt2])" },
    { "feat_scratch_bytes", (PyCFunction)py_feat_scratch_bytes, METH_NOARGS, "scratch bytes of the last feature loss call" },
    { "ofd_margin", (PyCFunction)py_ofd_margin, METH_VARARGS, "ofd_margin(bn_weight, bn_bias) -> margin" },
    { "ofd_loss", (PyCFunction)py_ofd_loss, METH_VARARGS, "(loss, dstudent)" },
    { "ab_loss", (PyCFunction)py_ab_loss, METH_VARARGS, "(loss, dstudent)" },
    { "ft_loss", (PyCFunction)py_ft_loss, METH_VARARGS, "(loss, dstudent, dteacher)" },
    { "vid_loss", (PyCFunction)py_vid_loss, METH_VARARGS, "(loss, dmu, dlog_scale)" },
    { "bnstat_loss", (PyCFunction)py_bnstat_loss, METH_VARARGS, "DeepInversion BN-statistics loss (kd_loss_bnstat): (loss, dx)" },
    { "tv_loss", (PyCFunction)py_tv_loss, METH_VARARGS, "total-variation prior (kd_loss_tv): (loss, dx)" },
    { "l2prior_loss", (PyCFunction)py_l2prior_loss, METH_VARARGS, "l2 image prior (kd_loss_l2prior): (loss, dx)" },
    { "adi_loss", (PyCFunction)(void (*)(void))py_adi_loss, METH_VARARGS | METH_KEYWORDS, "ADI competition loss (kd_loss_adi): (loss, dteacher, dstudent)" },
    { "vid_log_scale_init", (PyCFunction)py_vid_log_scale_init, METH_VARARGS, "log(exp(init_var - eps) - 1)" },
    { "cc_loss", (PyCFunction)py_cc_loss, METH_VARARGS, "(loss, dstudent, dteacher)" },
    { "hcl_loss", (PyCFunction)py_hcl_loss, METH_VARARGS, "(loss, dstudent)" },
    { "evaluate", (PyCFunction)(void (*)(void))py_evaluate, METH_VARARGS | METH_KEYWORDS, "batched eval-mode forward" },
    { "dist_loss", (PyCFunction)(void (*)(void))py_dist_loss, METH_VARARGS | METH_KEYWORDS, "DIST loss (kd_loss_dist)" },
    { "normkd_loss", (PyCFunction)(void (*)(void))py_normkd_loss, METH_VARARGS | METH_KEYWORDS, "NormKD loss (kd_loss_normkd)" },
    { "wttm_loss", (PyCFunction)(void (*)(void))py_wttm_loss, METH_VARARGS | METH_KEYWORDS, "WTTM loss (kd_loss_wttm)" },
    { "mlkd_loss", (PyCFunction)(void (*)(void))py_mlkd_loss, METH_VARARGS | METH_KEYWORDS, "MLKD loss (kd_loss_mlkd)" },
    { "ctkd_loss", (PyCFunction)(void (*)(void))py_ctkd_loss, METH_VARARGS | METH_KEYWORDS, "CTKD loss (kd_loss_ctkd)" },
    { "ctkd_loss_rows", (PyCFunction)(void (*)(void))py_ctkd_loss_rows, METH_VARARGS | METH_KEYWORDS,
      "CTKD loss with one temperature per row (kd_loss_ctkd_rows)" },
    { "ctkd_temperature", (PyCFunction)(void (*)(void))py_ctkd_temperature, METH_VARARGS | METH_KEYWORDS,
      "CTKD's temperature from its parameter (kd_ctkd_temperature)" },
    { "ctkd_lambda", (PyCFunction)(void (*)(void))py_ctkd_lambda, METH_VARARGS | METH_KEYWORDS,
      "CTKD's curriculum (kd_ctkd_lambda)" },
    { "sigma_objective", (PyCFunction)(void (*)(void))py_sigma_objective, METH_VARARGS | METH_KEYWORDS,
      "information-discarding objective and its gradient w.r.t. log sigma (kd_sigma_objective)" },
    { "explain_sigma", (PyCFunction)(void (*)(void))py_explain_sigma, METH_VARARGS | METH_KEYWORDS,
      "fit of log sigma per input value (kd_explain_sigma)" },
    { "cross_entropy", (PyCFunction)(void (*)(void))py_cross_entropy, METH_VARARGS | METH_KEYWORDS, "(loss, dlogits)" },
    { "idx_read", (PyCFunction)py_idx_read, METH_O, "read an IDX (optionally gzipped) file" },
    { "schedule_lr", (PyCFunction)py_schedule_lr, METH_VARARGS, "lr of a schedule at (epoch, step)" },
    { "set_num_threads", (PyCFunction)py_set_num_threads, METH_O, "set OpenMP/OpenBLAS threads" },
    { "get_num_threads", (PyCFunction)py_get_num_threads, METH_NOARGS, "OpenMP threads" },
    { "set_deterministic", (PyCFunction)py_set_deterministic, METH_O, "thread-count-independent results on/off" },
    { "get_deterministic", (PyCFunction)py_get_deterministic, METH_NOARGS, "deterministic mode on?" },
    { "blas_config", (PyCFunction)py_blas_config, METH_NOARGS, "BLAS build description" },
    { "set_isa", (PyCFunction)py_set_isa, METH_O, "set_isa(name): instruction set of the kernels" },
    { "get_isa", (PyCFunction)py_get_isa, METH_NOARGS, "instruction set of the kernels now" },
    { "supported_isas", (PyCFunction)py_supported_isas, METH_NOARGS, "instruction sets this CPU supports, best first" },
    { "isa_config", (PyCFunction)py_isa_config, METH_NOARGS, "instruction set in use and how it was chosen" },
    { "winograd_config", (PyCFunction)py_winograd_config, METH_NOARGS,
      "whether Winograd F(2x2,3x3) runs the stride-1 3x3 convs (KDCORE_WINOGRAD), and for which shapes" },
    { "isa_init", (PyCFunction)py_isa_init, METH_NOARGS, "read KDCORE_ISA now; RuntimeError if refused" },
    { "ckpt_write", (PyCFunction)py_ckpt_write, METH_VARARGS,
      "ckpt_write(path, [(name, array)], metadata=None): atomic safetensors write" },
    { "ckpt_read", (PyCFunction)py_ckpt_read, METH_O, "ckpt_read(path) -> ({name: array}, {key: value}), strict" },
    { NULL, NULL, 0, NULL },
};

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "_kdcore", "kdcore C core binding", -1, module_methods,
    NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__kdcore(void) {
    import_array();
    if (PyType_Ready(&NetType) < 0 || PyType_Ready(&OptimType) < 0 || PyType_Ready(&DatasetType) < 0 ||
        PyType_Ready(&CRDType) < 0)
        return NULL;
    PyObject * m = PyModule_Create(&moduledef);
    if (!m) return NULL;
    if (PyModule_AddObjectRef(m, "Net", (PyObject *)&NetType) < 0 ||
        PyModule_AddObjectRef(m, "Optimizer", (PyObject *)&OptimType) < 0 ||
        PyModule_AddObjectRef(m, "Dataset", (PyObject *)&DatasetType) < 0 ||
        PyModule_AddObjectRef(m, "CRD", (PyObject *)&CRDType) < 0 ||
        PyModule_AddStringConstant(m, "version", KDCORE_VERSION) < 0 || add_enums(m) < 0 ||
        PyModule_AddIntConstant(m, "MLKD_MAX_TEMPS", KD_MLKD_MAX_TEMPS) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}

