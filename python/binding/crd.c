// CPython binding of kdcore: CRD's memory banks and contrastive loss as a type.
#include "binding.h"

// ---------------------------------------------------------------------------------------
// CRD: memory banks and the contrastive loss (struct kd_crd)


int crd_acquire(CRDObject * self) {
    if (!self->crd) { PyErr_SetString(PyExc_RuntimeError, "the CRD state was not initialised"); return -1; }
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError, "this CRD state is in use by another thread");
        return -1;
    }
    self->busy = 1;
    return 0;
}

static void CRD_dealloc(CRDObject * self) {
    kd_crd_free(self->crd);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

// CRD(n_data, dim, n_neg, T, momentum, seed, in_batch)
static int CRD_init(CRDObject * self, PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "n_data", "dim", "n_neg", "T", "momentum", "seed", "in_batch", NULL };
    long long n_data;
    int dim, n_neg = 16384, in_batch = 0;
    float T = 0.07f, momentum = 0.5f;
    unsigned long long seed = 0;
    if (!PARSE_KW(args, kwds, "Li|iffKp", kwlist, &n_data, &dim, &n_neg, &T, &momentum, &seed, &in_batch)) return -1;
    if (self->busy) { PyErr_SetString(PyExc_RuntimeError, "this CRD state is in use by another thread"); return -1; }
    struct kd_crd * c;
    Py_BEGIN_ALLOW_THREADS
    c = in_batch ? kd_crd_new_in_batch(n_data, dim, T) : kd_crd_new(n_data, dim, n_neg, T, momentum, seed);
    Py_END_ALLOW_THREADS
    if (!c) {
        const char * msg = kd_last_error();
        PyErr_SetString(strstr(msg, "allocate") ? PyExc_MemoryError : PyExc_ValueError, msg);
        return -1;
    }
    kd_crd_free(self->crd);
    self->crd = c;
    return 0;
}

// An int64 1-D array of n entries (idx or labels; `per`: what n counts), range-checked.
// New reference.
static PyArrayObject * get_index(PyObject * o, const char * name, npy_intp n, int64_t lo, int64_t hi, const char * per) {
    PyArrayObject * a = get_array(o, NPY_INT64, name);
    if (!a) return NULL;
    if (PyArray_NDIM(a) != 1 || PyArray_DIM(a, 0) != n) {
        PyErr_Format(PyExc_ValueError, "%s must be 1-D with %zd entries (one per %s), got %zd values in %d-D", name,
                     (Py_ssize_t)n, per, (Py_ssize_t)PyArray_SIZE(a), PyArray_NDIM(a));
        Py_DECREF(a);
        return NULL;
    }
    const int64_t * p = PyArray_DATA(a);
    for (npy_intp i = 0; i < n; i++)
        if (p[i] < lo || p[i] >= hi) {
            PyErr_Format(PyExc_ValueError, "%s[%zd] = %lld is outside [%lld, %lld)", name, (Py_ssize_t)i, (long long)p[i],
                         (long long)lo, (long long)hi);
            Py_DECREF(a);
            return NULL;
        }
    return a;
}

static int64_t crd_rows_(CRDObject * self) {
    int64_t rows = 0;
    int dim = 0;
    kd_crd_bank(self->crd, 0, &rows, &dim);
    return rows;
}

// Shared by loss and update: embeddings (N, dim), idx (N) in [0, n_data), labels (N) or None.
static int crd_batch_args(CRDObject * self, PyObject * so, PyObject * to, PyObject * io, PyObject * yo, int need_idx,
                          PyArrayObject ** s, PyArrayObject ** t, PyArrayObject ** idx, PyArrayObject ** y,
                          int64_t n_data, int dim) {
    *idx = *y = NULL;
    if (get_embed_pair(so, to, "student_embed", "teacher_embed", s, t) < 0) return -1;
    npy_intp n = PyArray_DIM(*s, 0);
    if (PyArray_DIM(*s, 1) != dim) {
        PyErr_Format(PyExc_ValueError, "student_embed must have %d columns (the CRD dim), got %zd", dim,
                     (Py_ssize_t)PyArray_DIM(*s, 1));
        goto fail;
    }
    if (io && io != Py_None) {
        if (!(*idx = get_index(io, "idx", n, 0, n_data, "row of student_embed"))) goto fail;
    } else if (need_idx) {
        PyErr_SetString(PyExc_TypeError, "idx (the samples' data-set indices) is required with memory banks");
        goto fail;
    }
    if (yo && yo != Py_None && !(*y = get_index(yo, "labels", n, INT64_MIN, INT64_MAX, "row of student_embed"))) goto fail;
    return 0;
fail:
    Py_CLEAR(*s); Py_CLEAR(*t); Py_CLEAR(*idx); Py_CLEAR(*y);
    return -1;
}

// loss(student_embed, teacher_embed, idx=None, labels=None) -> (loss, dstudent, dteacher)
static PyObject * CRD_loss(CRDObject * self, PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "student_embed", "teacher_embed", "idx", "labels", NULL };
    PyObject * so, * to, * io = Py_None, * yo = Py_None;
    if (!PARSE_KW(args, kwds, "OO|OO", kwlist, &so, &to, &io, &yo)) return NULL;
    if (!self->crd) return PyErr_Format(PyExc_RuntimeError, "the CRD state was not initialised");
    int64_t rows = kd_crd_n_data(self->crd);
    int banked = kd_crd_bank(self->crd, 0, NULL, NULL) != NULL;
    PyArrayObject * s, * t, * idx, * y;
    PyObject * ds = NULL, * dt = NULL, * ret = NULL;
    // in-batch mode: idx is optional (the loss does not use it)
    if (crd_batch_args(self, so, to, io, yo, banked, &s, &t, &idx, &y, rows, kd_crd_dim(self->crd)) < 0) return NULL;
    if (!banked) {
        if (PyArray_DIM(s, 0) < 2) {
            PyErr_SetString(PyExc_ValueError, "student_embed needs at least 2 rows for in-batch negatives");
            goto fail;
        }
    }
    if (!(ds = like(s)) || !(dt = like(t))) goto fail;
    if (crd_acquire(self) < 0) goto fail;
    float loss;
    enum kd_status st;
    int n = (int)PyArray_DIM(s, 0);
    const int64_t * ip = idx ? PyArray_DATA(idx) : NULL, * yp = y ? PyArray_DATA(y) : NULL;
    Py_BEGIN_ALLOW_THREADS
    st = kd_crd_loss(self->crd, &loss, FDATA(ds), FDATA(dt), PyArray_DATA(s), PyArray_DATA(t), ip, yp, n, 1.0f, false);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (st != KD_OK) { kd_raise(st); goto fail; }
    ret = Py_BuildValue("(fOO)", loss, ds, dt);
fail:
    Py_XDECREF(s); Py_XDECREF(t); Py_XDECREF(idx); Py_XDECREF(y); Py_XDECREF(ds); Py_XDECREF(dt);
    return ret;
}

// loss_idx(student_embed, teacher_embed, sample_idx) -> (loss, dstudent, dteacher)
static PyObject * CRD_loss_idx(CRDObject * self, PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "student_embed", "teacher_embed", "sample_idx", NULL };
    PyObject * so, * to, * io;
    if (!PARSE_KW(args, kwds, "OOO", kwlist, &so, &to, &io)) return NULL;
    if (!self->crd) return PyErr_Format(PyExc_RuntimeError, "the CRD state was not initialised");
    int64_t rows = 0;
    int dim = 0;
    if (!kd_crd_bank(self->crd, 0, &rows, &dim))
        return PyErr_Format(PyExc_RuntimeError, "loss_idx needs memory banks (this CRD state uses in-batch negatives)");
    PyArrayObject * s, * t, * idx = NULL, * y = NULL, * si = NULL;
    PyObject * ds = NULL, * dt = NULL, * ret = NULL;
    if (crd_batch_args(self, so, to, NULL, NULL, 0, &s, &t, &idx, &y, rows, dim) < 0) return NULL;
    int n = (int)PyArray_DIM(s, 0), K1 = kd_crd_n_neg(self->crd) + 1;
    if (!(si = get_array(io, NPY_INT64, "sample_idx"))) goto fail;
    if (PyArray_NDIM(si) != 2 || PyArray_DIM(si, 0) != n || PyArray_DIM(si, 1) != K1) {
        PyErr_Format(PyExc_ValueError, "sample_idx must be 2-D (%d, n_neg + 1 = %d), got %zd values in %d-D", n, K1,
                     (Py_ssize_t)PyArray_SIZE(si), PyArray_NDIM(si));
        goto fail;
    }
    const int64_t * sp = PyArray_DATA(si);
    for (npy_intp e = 0; e < PyArray_SIZE(si); e++)
        if (sp[e] < 0 || sp[e] >= rows) {
            PyErr_Format(PyExc_ValueError, "sample_idx[%zd, %zd] = %lld is outside [0, n_data = %lld)", (Py_ssize_t)(e / K1),
                         (Py_ssize_t)(e % K1), (long long)sp[e], (long long)rows);
            goto fail;
        }
    if (!(ds = like(s)) || !(dt = like(t))) goto fail;
    if (crd_acquire(self) < 0) goto fail;
    float loss;
    enum kd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = kd_crd_loss_idx(self->crd, &loss, FDATA(ds), FDATA(dt), PyArray_DATA(s), PyArray_DATA(t), sp, n, 1.0f, false);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (st != KD_OK) { kd_raise(st); goto fail; }
    ret = Py_BuildValue("(fOO)", loss, ds, dt);
fail:
    Py_XDECREF(s); Py_XDECREF(t); Py_XDECREF(si); Py_XDECREF(ds); Py_XDECREF(dt);
    return ret;
}

// sample(idx, labels=None) -> int64 (N, n_neg + 1)
static PyObject * CRD_sample(CRDObject * self, PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "idx", "labels", NULL };
    PyObject * io, * yo = Py_None;
    if (!PARSE_KW(args, kwds, "O|O", kwlist, &io, &yo)) return NULL;
    if (!self->crd) return PyErr_Format(PyExc_RuntimeError, "the CRD state was not initialised");
    int64_t rows = crd_rows_(self);
    if (!rows) return PyErr_Format(PyExc_RuntimeError, "sample needs memory banks (this CRD state uses in-batch negatives)");
    PyArrayObject * a = get_array(io, NPY_INT64, "idx"), * idx = NULL, * y = NULL;
    PyObject * out = NULL;
    if (!a) return NULL;
    if (PyArray_NDIM(a) != 1 || PyArray_SIZE(a) == 0) {
        PyErr_Format(PyExc_ValueError, "idx must be a non-empty 1-D array, got %d-D", PyArray_NDIM(a));
        goto fail;
    }
    if (check_int(PyArray_DIM(a, 0), "idx") < 0) goto fail;
    npy_intp n = PyArray_DIM(a, 0);
    if (!(idx = get_index(io, "idx", n, 0, rows, "sample"))) goto fail;
    if (yo != Py_None && !(y = get_index(yo, "labels", n, INT64_MIN, INT64_MAX, "entry of idx"))) goto fail;
    npy_intp dims[2] = { n, kd_crd_n_neg(self->crd) + 1 };
    if (!(out = PyArray_SimpleNew(2, dims, NPY_INT64))) goto fail;
    if (crd_acquire(self) < 0) { Py_CLEAR(out); goto fail; }
    enum kd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = kd_crd_sample(self->crd, PyArray_DATA((PyArrayObject *)out), PyArray_DATA(idx), y ? PyArray_DATA(y) : NULL, (int)n);
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (st != KD_OK) { kd_raise(st); Py_CLEAR(out); }
fail:
    Py_XDECREF(a); Py_XDECREF(idx); Py_XDECREF(y);
    return out;
}

// update(student_embed, teacher_embed, idx)
static PyObject * CRD_update(CRDObject * self, PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "student_embed", "teacher_embed", "idx", NULL };
    PyObject * so, * to, * io = Py_None;
    if (!PARSE_KW(args, kwds, "OO|O", kwlist, &so, &to, &io)) return NULL;
    if (!self->crd) return PyErr_Format(PyExc_RuntimeError, "the CRD state was not initialised");
    int64_t rows = crd_rows_(self);
    if (!rows) Py_RETURN_NONE;   // in-batch mode: nothing to update
    int dim = 0;
    kd_crd_bank(self->crd, 0, NULL, &dim);
    PyArrayObject * s, * t, * idx, * y;
    if (crd_batch_args(self, so, to, io, NULL, 1, &s, &t, &idx, &y, rows, dim) < 0) return NULL;
    PyObject * ret = NULL;
    if (crd_acquire(self) < 0) goto fail;
    enum kd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = kd_crd_update(self->crd, PyArray_DATA(s), PyArray_DATA(t), PyArray_DATA(idx), (int)PyArray_DIM(s, 0));
    Py_END_ALLOW_THREADS
    self->busy = 0;
    if (st != KD_OK) { kd_raise(st); goto fail; }
    ret = Py_NewRef(Py_None);
fail:
    Py_XDECREF(s); Py_XDECREF(t); Py_XDECREF(idx);
    return ret;
}

// set_labels(labels): the data set's labels (n_data,)
static PyObject * CRD_set_labels(CRDObject * self, PyObject * arg) {
    if (!self->crd) return PyErr_Format(PyExc_RuntimeError, "the CRD state was not initialised");
    int64_t rows = crd_rows_(self);
    if (!rows) return PyErr_Format(PyExc_RuntimeError, "in-batch mode has no banks: pass the batch's labels to loss()");
    PyArrayObject * y = get_index(arg, "labels", (npy_intp)rows, 0, INT64_MAX, "sample of the data set, n_data");
    if (!y) return NULL;
    if (crd_acquire(self) < 0) { Py_DECREF(y); return NULL; }
    enum kd_status st = kd_crd_set_labels(self->crd, PyArray_DATA(y), rows);
    self->busy = 0;
    Py_DECREF(y);
    if (st != KD_OK) return kd_raise(st);
    Py_RETURN_NONE;
}

// bank(which) -> writable float32 view (n_data, dim), or None in in-batch mode
static PyObject * CRD_bank(CRDObject * self, PyObject * args) {
    int which;
    static char * names[] = { "which", NULL };
    if (!PARSE_POS(args, "i", names, &which)) return NULL;
    if (!self->crd) return PyErr_Format(PyExc_RuntimeError, "the CRD state was not initialised");
    if (which < 0 || which > 1) return PyErr_Format(PyExc_ValueError, "which must be 0 (student bank) or 1 (teacher bank), got %d", which);
    int64_t rows;
    int dim;
    float * p = kd_crd_bank(self->crd, which, &rows, &dim);
    if (!p) Py_RETURN_NONE;
    npy_intp dims[2] = { (npy_intp)rows, dim };
    PyObject * a = PyArray_SimpleNewFromData(2, dims, NPY_FLOAT32, p);
    if (!a) return NULL;
    if (PyArray_SetBaseObject((PyArrayObject *)a, Py_NewRef((PyObject *)self)) < 0) { Py_DECREF(a); return NULL; }
    return a;
}

// views() -> {name: writable view}: the banks (absent in in-batch mode), z (2,) and steps (1,),
// for checkpoints that save and restore state in place (training loops' extra state).
static PyObject * CRD_views(CRDObject * self, PyObject * Py_UNUSED(a)) {
    if (!self->crd) return PyErr_Format(PyExc_RuntimeError, "the CRD state was not initialised");
    PyObject * d = PyDict_New();
    if (!d) return NULL;
    struct view { const char * name; int nd; npy_intp dims[2]; int type; void * p; } v[4];
    int n = 0;
    for (int which = 0; which < 2; which++) {
        int64_t rows;
        int dim;
        float * b = kd_crd_bank(self->crd, which, &rows, &dim);
        if (b) v[n++] = (struct view){ which ? "teacher_bank" : "student_bank", 2, { (npy_intp)rows, dim }, NPY_FLOAT32, b };
    }
    v[n++] = (struct view){ "z", 1, { 2, 0 }, NPY_FLOAT32, kd_crd_z(self->crd) };
    v[n++] = (struct view){ "steps", 1, { 1, 0 }, NPY_INT64, kd_crd_steps(self->crd) };
    for (int i = 0; i < n; i++) {
        PyObject * a = PyArray_SimpleNewFromData(v[i].nd, v[i].dims, v[i].type, v[i].p);
        if (!a || PyArray_SetBaseObject((PyArrayObject *)a, Py_NewRef((PyObject *)self)) < 0 ||
            PyDict_SetItemString(d, v[i].name, a) < 0) {
            Py_XDECREF(a);
            Py_DECREF(d);
            return NULL;
        }
        Py_DECREF(a);
    }
    return d;
}

// z([(z_student, z_teacher)]) -> (z_student, z_teacher); negative = not set yet
static PyObject * CRD_z(CRDObject * self, PyObject * args) {
    PyObject * value = Py_None;
    if (!PyArg_ParseTuple(args, "|O", &value)) return NULL;
    if (!self->crd) return PyErr_Format(PyExc_RuntimeError, "the CRD state was not initialised");
    float * z = kd_crd_z(self->crd);
    if (value != Py_None) {
        double a, b;
        if (!PyArg_ParseTuple(value, "dd", &a, &b)) {
            PyErr_Clear();
            return PyErr_Format(PyExc_TypeError, "z must be a pair of floats (z_student, z_teacher)");
        }
        if (!isfinite(a) || !isfinite(b) || a == 0 || b == 0 || fabs(a) > FLT_MAX || fabs(b) > FLT_MAX)
            return err_printf(PyExc_ValueError, "z values must be finite non-zero floats (negative = unset), got (%g, %g)", a, b);
        z[0] = (float)a;
        z[1] = (float)b;
    }
    return Py_BuildValue("(ff)", z[0], z[1]);
}

// steps([value]) -> draws done
static PyObject * CRD_steps(CRDObject * self, PyObject * args) {
    PyObject * value = Py_None;
    if (!PyArg_ParseTuple(args, "|O", &value)) return NULL;
    if (!self->crd) return PyErr_Format(PyExc_RuntimeError, "the CRD state was not initialised");
    int64_t * p = kd_crd_steps(self->crd);
    if (value != Py_None) {
        if (PyBool_Check(value) || !PyLong_Check(value))
            return PyErr_Format(PyExc_TypeError, "steps value must be an int, got %s", Py_TYPE(value)->tp_name);
        long long v = PyLong_AsLongLong(value);
        if (v == -1 && PyErr_Occurred()) return NULL;
        if (v < 0) return PyErr_Format(PyExc_ValueError, "steps value must be >= 0, got %lld", v);
        *p = v;
    }
    return PyLong_FromLongLong(*p);
}

static PyObject * CRD_n_neg(CRDObject * self, PyObject * Py_UNUSED(i)) {
    if (!self->crd) return PyErr_Format(PyExc_RuntimeError, "the CRD state was not initialised");
    return PyLong_FromLong(kd_crd_n_neg(self->crd));
}

static PyMethodDef CRD_methods[] = {
    { "loss", (PyCFunction)(void (*)(void))CRD_loss, METH_VARARGS | METH_KEYWORDS,
      "loss(student_embed, teacher_embed, idx=None, labels=None) -> (loss, dstudent, dteacher)" },
    { "loss_idx", (PyCFunction)(void (*)(void))CRD_loss_idx, METH_VARARGS | METH_KEYWORDS,
      "loss_idx(student_embed, teacher_embed, sample_idx) -> (loss, dstudent, dteacher)" },
    { "sample", (PyCFunction)(void (*)(void))CRD_sample, METH_VARARGS | METH_KEYWORDS,
      "sample(idx, labels=None) -> the (N, n_neg + 1) rows loss() would use now" },
    { "update", (PyCFunction)(void (*)(void))CRD_update, METH_VARARGS | METH_KEYWORDS,
      "update(student_embed, teacher_embed, idx): momentum update of the banks' rows" },
    { "set_labels", (PyCFunction)CRD_set_labels, METH_O, "set_labels(labels): the data set's labels" },
    { "bank", (PyCFunction)CRD_bank, METH_VARARGS, "bank(which) -> writable view of bank 0 (student) or 1 (teacher)" },
    { "z", (PyCFunction)CRD_z, METH_VARARGS, "z([pair]) -> (z_student, z_teacher)" },
    { "views", (PyCFunction)CRD_views, METH_NOARGS, "views() -> {name: writable view of the state}" },
    { "steps", (PyCFunction)CRD_steps, METH_VARARGS, "steps([value]) -> draw counter" },
    { "n_neg", (PyCFunction)CRD_n_neg, METH_NOARGS, "negatives per sample (0: in-batch)" },
    { NULL, NULL, 0, NULL },
};

PyTypeObject CRDType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kdcore._kdcore.CRD",
    .tp_basicsize = sizeof(CRDObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "CRD memory banks and contrastive loss (struct kd_crd).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)CRD_init,
    .tp_dealloc = (destructor)CRD_dealloc,
    .tp_methods = CRD_methods,
};

// evaluate(net, data, batch_size=256, logits=False) -> (logits or None, loss or None, accuracy or None)
