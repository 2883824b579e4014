// CPython binding of kdcore: Loss functions for custom loops: logit, feature/relation and connector losses.
#include "binding.h"

// ---- loss functions for custom loops

// Two logits arrays of the same 2-D shape, finite. New references in *a, *b.
static int get_logit_pair(PyObject * ao, PyObject * bo, const char * an, const char * bn, PyArrayObject ** a,
                          PyArrayObject ** b) {
    *a = get_array(ao, NPY_FLOAT32, an);
    *b = NULL;
    if (!*a) return -1;
    if (PyArray_NDIM(*a) != 2 || PyArray_SIZE(*a) == 0) {
        PyErr_Format(PyExc_ValueError, "%s must be a non-empty 2-D array (N, classes), got %d-D", an, PyArray_NDIM(*a));
        goto fail;
    }
    if (check_int(PyArray_DIM(*a, 0), an) < 0 || check_int(PyArray_DIM(*a, 1), an) < 0 || check_finite(*a, an) < 0) goto fail;
    if (!bo) return 0;
    *b = get_array(bo, NPY_FLOAT32, bn);
    if (!*b) goto fail;
    if (PyArray_NDIM(*b) != 2 || PyArray_DIM(*b, 0) != PyArray_DIM(*a, 0) || PyArray_DIM(*b, 1) != PyArray_DIM(*a, 1)) {
        PyErr_Format(PyExc_ValueError, "%s must have the shape of %s (%zd, %zd)", bn, an, (Py_ssize_t)PyArray_DIM(*a, 0),
                     (Py_ssize_t)PyArray_DIM(*a, 1));
        goto fail;
    }
    if (check_finite(*b, bn) < 0) goto fail;
    return 0;
fail:
    Py_CLEAR(*a);
    Py_CLEAR(*b);
    return -1;
}

static int get_labels(PyObject * o, int N, int V, PyArrayObject ** out) {
    *out = get_array(o, NPY_INT64, "target");
    if (!*out) return -1;
    if (PyArray_NDIM(*out) != 1 || PyArray_DIM(*out, 0) != N) {
        PyErr_Format(PyExc_ValueError, "target must be 1-D with %d labels (one per row of the logits), got %zd values", N, (Py_ssize_t)PyArray_SIZE(*out));
        Py_CLEAR(*out);
        return -1;
    }
    const int64_t * t = PyArray_DATA(*out);
    for (int i = 0; i < N; i++)
        if (t[i] < 0 || t[i] >= V) {
            PyErr_Format(PyExc_ValueError, "target[%d] = %lld is outside [0, %d)", i, (long long)t[i], V);
            Py_CLEAR(*out);
            return -1;
        }
    return 0;
}

static int check_T(float T) {
    if (!(T > 0) || !isfinite(T)) { err_printf(PyExc_ValueError, "T must be > 0 and finite, got %g", (double)T); return -1; }
    return 0;
}

// kd_loss(student, teacher, T, teacher_grad=False) -> (loss, dstudent[, dteacher])
PyObject * py_kd_loss(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "student", "teacher", "T", "teacher_grad", NULL };
    PyObject * so, * to;
    float T = 4.0f;
    int tg = 0;
    if (!PARSE_KW(args, kwds, "OO|fp", kwlist, &so, &to, &T, &tg)) return NULL;
    if (check_T(T) < 0) return NULL;
    PyArrayObject * s, * t;
    if (get_logit_pair(so, to, "student_logits", "teacher_logits", &s, &t) < 0) return NULL;
    int N = (int)PyArray_DIM(s, 0), V = (int)PyArray_DIM(s, 1);
    PyObject * ds = PyArray_SimpleNew(2, PyArray_DIMS(s), NPY_FLOAT32);
    PyObject * dt = tg ? PyArray_SimpleNew(2, PyArray_DIMS(s), NPY_FLOAT32) : NULL;
    PyObject * ret = NULL;
    if (!ds || (tg && !dt)) goto fail;
    float loss;
    enum kd_status st = kd_loss_kd(&loss, PyArray_DATA((PyArrayObject *)ds), dt ? PyArray_DATA((PyArrayObject *)dt) : NULL,
                                   PyArray_DATA(s), PyArray_DATA(t), NULL, N, V, T, 1.0f, false);
    if (st != KD_OK) { kd_raise(st); goto fail; }
    ret = tg ? Py_BuildValue("(fOO)", loss, ds, dt) : Py_BuildValue("(fO)", loss, ds);
fail:
    Py_XDECREF(ds); Py_XDECREF(dt); Py_DECREF(s); Py_DECREF(t);
    return ret;
}

// soft_loss(student, q, T) -> (loss, dstudent); q: target probabilities (rows sum to 1)
PyObject * py_soft_loss(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "student", "q", "T", NULL };
    PyObject * so, * qo;
    float T = 4.0f;
    if (!PARSE_KW(args, kwds, "OO|f", kwlist, &so, &qo, &T)) return NULL;
    if (check_T(T) < 0) return NULL;
    PyArrayObject * s, * q;
    if (get_logit_pair(so, qo, "student_logits", "q", &s, &q) < 0) return NULL;
    int N = (int)PyArray_DIM(s, 0), V = (int)PyArray_DIM(s, 1);
    const float * qp = PyArray_DATA(q);
    PyObject * ret = NULL, * ds = NULL;
    for (int i = 0; i < N; i++) {
        double sum = 0;
        for (int k = 0; k < V; k++) {
            if (qp[(size_t)i * V + k] < 0) { PyErr_Format(PyExc_ValueError, "q[%d, %d] is negative", i, k); goto fail; }
            sum += qp[(size_t)i * V + k];
        }
        if (fabs(sum - 1.0) > 1e-3) { err_printf(PyExc_ValueError, "q row %d sums to %g, not 1", i, sum); goto fail; }
    }
    ds = PyArray_SimpleNew(2, PyArray_DIMS(s), NPY_FLOAT32);
    if (!ds) goto fail;
    float loss;
    enum kd_status st = kd_loss_soft(&loss, PyArray_DATA((PyArrayObject *)ds), PyArray_DATA(s), qp, NULL, N, V, T, 1.0f, false);
    if (st != KD_OK) { kd_raise(st); goto fail; }
    ret = Py_BuildValue("(fO)", loss, ds);
fail:
    Py_XDECREF(ds); Py_DECREF(s); Py_DECREF(q);
    return ret;
}

// dkd_loss(student, teacher, target, alpha=1, beta=8, T=4) -> (loss, dstudent, tckd, nckd)
PyObject * py_dkd_loss(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "student", "teacher", "target", "alpha", "beta", "T", NULL };
    PyObject * so, * to, * yo;
    float alpha = 1.0f, beta = 8.0f, T = 4.0f;
    if (!PARSE_KW(args, kwds, "OOO|fff", kwlist, &so, &to, &yo, &alpha, &beta, &T)) return NULL;
    if (check_T(T) < 0) return NULL;
    if (!isfinite(alpha) || !isfinite(beta)) return PyErr_Format(PyExc_ValueError, "alpha and beta must be finite");
    PyArrayObject * s, * t, * y = NULL;
    if (get_logit_pair(so, to, "student_logits", "teacher_logits", &s, &t) < 0) return NULL;
    int N = (int)PyArray_DIM(s, 0), V = (int)PyArray_DIM(s, 1);
    PyObject * ret = NULL, * ds = NULL;
    if (get_labels(yo, N, V, &y) < 0) goto fail;
    ds = PyArray_SimpleNew(2, PyArray_DIMS(s), NPY_FLOAT32);
    if (!ds) goto fail;
    float tc, nc;
    enum kd_status st = kd_loss_dkd(&tc, &nc, PyArray_DATA((PyArrayObject *)ds), PyArray_DATA(s), PyArray_DATA(t),
                                    PyArray_DATA(y), N, V, T, alpha, beta, 1.0f, false);
    if (st != KD_OK) { kd_raise(st); goto fail; }
    ret = Py_BuildValue("(dOff)", (double)alpha * tc + (double)beta * nc, ds, tc, nc);
fail:
    Py_XDECREF(ds); Py_XDECREF(y); Py_DECREF(s); Py_DECREF(t);
    return ret;
}

// dist_loss(student, teacher, beta=2, gamma=2, T=4) -> (loss, dstudent, inter, intra)
PyObject * py_dist_loss(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "student", "teacher", "beta", "gamma", "T", NULL };
    PyObject * so, * to;
    float beta = 2.0f, gamma = 2.0f, T = 4.0f;
    if (!PARSE_KW(args, kwds, "OO|fff", kwlist, &so, &to, &beta, &gamma, &T)) return NULL;
    if (check_T(T) < 0) return NULL;
    PyArrayObject * s, * t;
    if (get_logit_pair(so, to, "student_logits", "teacher_logits", &s, &t) < 0) return NULL;
    int N = (int)PyArray_DIM(s, 0), V = (int)PyArray_DIM(s, 1);
    PyObject * ret = NULL, * ds = PyArray_SimpleNew(2, PyArray_DIMS(s), NPY_FLOAT32);
    float inter, intra;
    if (ds) {
        enum kd_status st = kd_loss_dist(&inter, &intra, PyArray_DATA((PyArrayObject *)ds), PyArray_DATA(s),
                                         PyArray_DATA(t), N, V, T, beta, gamma, 1.0f, false);
        if (st != KD_OK) kd_raise(st);
        else ret = Py_BuildValue("(dOff)", (double)T * T * ((double)beta * inter + (double)gamma * intra), ds, inter, intra);
    }
    Py_XDECREF(ds); Py_DECREF(s); Py_DECREF(t);
    return ret;
}

// normkd_loss(student, teacher, t_norm=2, detach_std=False) -> (loss, dstudent)
PyObject * py_normkd_loss(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "student", "teacher", "t_norm", "detach_std", NULL };
    PyObject * so, * to;
    float t_norm = 2.0f;
    int detach = 0;
    if (!PARSE_KW(args, kwds, "OO|fp", kwlist, &so, &to, &t_norm, &detach)) return NULL;
    if (!(t_norm > 0) || !isfinite(t_norm)) return PyErr_Format(PyExc_ValueError, "t_norm must be > 0 and finite");
    PyArrayObject * s, * t;
    if (get_logit_pair(so, to, "student_logits", "teacher_logits", &s, &t) < 0) return NULL;
    int N = (int)PyArray_DIM(s, 0), V = (int)PyArray_DIM(s, 1);
    PyObject * ret = NULL, * ds = NULL;
    if (V < 2) { PyErr_Format(PyExc_ValueError, "student_logits must have at least 2 classes, got %d", V); goto fail; }
    ds = PyArray_SimpleNew(2, PyArray_DIMS(s), NPY_FLOAT32);
    if (!ds) goto fail;
    float loss;
    enum kd_status st = kd_loss_normkd(&loss, PyArray_DATA((PyArrayObject *)ds), PyArray_DATA(s), PyArray_DATA(t), N, V,
                                       t_norm, detach != 0, 1.0f, false);
    if (st != KD_OK) { kd_raise(st); goto fail; }
    ret = Py_BuildValue("(fO)", loss, ds);
fail:
    Py_XDECREF(ds); Py_DECREF(s); Py_XDECREF(t);
    return ret;
}

// mlkd_loss(student, teacher, temperatures, percentile) -> (loss, dstudent, instance, class_batch);
// the temperatures and the percentile are checked by kdcore.functional.mlkd_loss and again in C.
PyObject * py_mlkd_loss(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "student", "teacher", "temperatures", "percentile", NULL };
    PyObject * so, * to, * tv;
    float percentile;
    if (!PARSE_KW(args, kwds, "OOOf", kwlist, &so, &to, &tv, &percentile)) return NULL;
    float temps[KD_MLKD_MAX_TEMPS];
    PyObject * seq = PySequence_Fast(tv, "temperatures must be a sequence of numbers");
    if (!seq) return NULL;
    const Py_ssize_t nt = PySequence_Fast_GET_SIZE(seq);
    if (nt < 1 || nt > KD_MLKD_MAX_TEMPS) {
        Py_DECREF(seq);
        return PyErr_Format(PyExc_ValueError, "temperatures: between 1 and %d values, got %zd", KD_MLKD_MAX_TEMPS, nt);
    }
    for (Py_ssize_t j = 0; j < nt; j++) {
        const double d = PyFloat_AsDouble(PySequence_Fast_GET_ITEM(seq, j));
        if (d == -1.0 && PyErr_Occurred()) { Py_DECREF(seq); return NULL; }
        temps[j] = (float)d;
    }
    Py_DECREF(seq);
    PyArrayObject * s, * t;
    if (get_logit_pair(so, to, "student_logits", "teacher_logits", &s, &t) < 0) return NULL;
    int N = (int)PyArray_DIM(s, 0), V = (int)PyArray_DIM(s, 1);
    PyObject * ret = NULL, * ds = PyArray_SimpleNew(2, PyArray_DIMS(s), NPY_FLOAT32);
    if (ds) {
        float loss, parts[2];
        enum kd_status st;
        Py_BEGIN_ALLOW_THREADS
        st = kd_loss_mlkd(&loss, parts, PyArray_DATA((PyArrayObject *)ds), PyArray_DATA(s), PyArray_DATA(t), N, V, temps,
                          (int)nt, percentile, 1.0f, false);
        Py_END_ALLOW_THREADS
        if (st != KD_OK) kd_raise(st);
        else ret = Py_BuildValue("(fOff)", loss, ds, parts[0], parts[1]);
    }
    Py_XDECREF(ds); Py_DECREF(s); Py_DECREF(t);
    return ret;
}

// ctkd_loss(student, teacher, T) -> (loss, dstudent, dT)
PyObject * py_ctkd_loss(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "student", "teacher", "T", NULL };
    PyObject * so, * to;
    float T;
    if (!PARSE_KW(args, kwds, "OOf", kwlist, &so, &to, &T)) return NULL;
    if (!(T > 0) || !isfinite(T)) return PyErr_Format(PyExc_ValueError, "T must be > 0 and finite, got %g", (double)T);
    PyArrayObject * s, * t;
    if (get_logit_pair(so, to, "student_logits", "teacher_logits", &s, &t) < 0) return NULL;
    int N = (int)PyArray_DIM(s, 0), V = (int)PyArray_DIM(s, 1);
    PyObject * ret = NULL, * ds = PyArray_SimpleNew(2, PyArray_DIMS(s), NPY_FLOAT32);
    if (ds) {
        float loss, dT;
        enum kd_status st = kd_loss_ctkd(&loss, PyArray_DATA((PyArrayObject *)ds), &dT, PyArray_DATA(s), PyArray_DATA(t),
                                         N, V, T, 1.0f, false);
        if (st != KD_OK) kd_raise(st);
        else ret = Py_BuildValue("(fOf)", loss, ds, dT);
    }
    Py_XDECREF(ds); Py_DECREF(s); Py_DECREF(t);
    return ret;
}

// ctkd_loss_rows(student, teacher, T) -> (loss, dstudent, dT): T and dT one value per row
PyObject * py_ctkd_loss_rows(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "student", "teacher", "T", NULL };
    PyObject * so, * to, * To;
    if (!PARSE_KW(args, kwds, "OOO", kwlist, &so, &to, &To)) return NULL;
    PyArrayObject * s, * t, * Ta = get_array(To, NPY_FLOAT32, "T");
    if (!Ta) return NULL;
    if (get_logit_pair(so, to, "student_logits", "teacher_logits", &s, &t) < 0) { Py_DECREF(Ta); return NULL; }
    int N = (int)PyArray_DIM(s, 0), V = (int)PyArray_DIM(s, 1);
    PyObject * ret = NULL, * ds = NULL, * dT = NULL;
    if (PyArray_NDIM(Ta) != 1 || PyArray_DIM(Ta, 0) != N) {
        PyErr_Format(PyExc_ValueError, "T must be 1-D with one temperature per row of the logits (%d), got %d "
                     "dimensions of %zd values", N, PyArray_NDIM(Ta), (Py_ssize_t)PyArray_SIZE(Ta));
        goto done;
    }
    npy_intp nT = N;
    if (!(ds = PyArray_SimpleNew(2, PyArray_DIMS(s), NPY_FLOAT32)) || !(dT = PyArray_SimpleNew(1, &nT, NPY_FLOAT32)))
        goto done;
    float loss;
    enum kd_status st = kd_loss_ctkd_rows(&loss, PyArray_DATA((PyArrayObject *)ds), PyArray_DATA((PyArrayObject *)dT),
                                          PyArray_DATA(s), PyArray_DATA(t), N, V, PyArray_DATA(Ta), 1.0f, false);
    if (st != KD_OK) kd_raise(st);
    else ret = Py_BuildValue("(fOO)", loss, ds, dT);
done:
    Py_XDECREF(ds); Py_XDECREF(dT); Py_DECREF(s); Py_DECREF(t); Py_DECREF(Ta);
    return ret;
}

// ctkd_temperature(p, t_start, t_range) -> (T, dT/dp)
PyObject * py_ctkd_temperature(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "p", "t_start", "t_range", NULL };
    float p, t0, tr;
    if (!PARSE_KW(args, kwds, "fff", kwlist, &p, &t0, &tr)) return NULL;
    // finite as float32: a double beyond FLT_MAX arrives here as inf
    if (!isfinite(p) || !isfinite(t0) || !isfinite(tr))
        return err_printf(PyExc_ValueError, "p, t_start and t_range must be finite float32 values, got %g, %g, %g",
                          (double)p, (double)t0, (double)tr);
    double d;
    const double T = kd_ctkd_temperature(p, t0, tr, &d);
    return Py_BuildValue("(dd)", T, d);
}

// ctkd_lambda(epoch, lambda_min, lambda_max, decay_epochs) -> float
PyObject * py_ctkd_lambda(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "epoch", "lambda_min", "lambda_max", "decay_epochs", NULL };
    int epoch, n;
    float lo, hi;
    if (!PARSE_KW(args, kwds, "iffi", kwlist, &epoch, &lo, &hi, &n)) return NULL;
    if (n < 1) return PyErr_Format(PyExc_ValueError, "decay_epochs must be >= 1, got %d", n);
    if (!isfinite(lo) || !isfinite(hi))
        return err_printf(PyExc_ValueError, "lambda_min and lambda_max must be finite float32 values, got %g, %g",
                          (double)lo, (double)hi);
    return PyFloat_FromDouble(kd_ctkd_lambda(epoch, lo, hi, n));
}

// wttm_loss(student, teacher, gamma=0.2) -> (loss, dstudent)
PyObject * py_wttm_loss(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "student", "teacher", "gamma", NULL };
    PyObject * so, * to;
    float gamma = 0.2f;
    if (!PARSE_KW(args, kwds, "OO|f", kwlist, &so, &to, &gamma)) return NULL;
    if (!(gamma > 0) || !isfinite(gamma)) return PyErr_Format(PyExc_ValueError, "gamma must be > 0 and finite");
    PyArrayObject * s, * t;
    if (get_logit_pair(so, to, "student_logits", "teacher_logits", &s, &t) < 0) return NULL;
    int N = (int)PyArray_DIM(s, 0), V = (int)PyArray_DIM(s, 1);
    PyObject * ret = NULL, * ds = PyArray_SimpleNew(2, PyArray_DIMS(s), NPY_FLOAT32);
    if (ds) {
        float loss;
        enum kd_status st = kd_loss_wttm(&loss, PyArray_DATA((PyArrayObject *)ds), PyArray_DATA(s), PyArray_DATA(t), N, V,
                                         gamma, 1.0f, false);
        if (st != KD_OK) kd_raise(st);
        else ret = Py_BuildValue("(fO)", loss, ds);
    }
    Py_XDECREF(ds); Py_DECREF(s); Py_DECREF(t);
    return ret;
}

// mse_loss(student, teacher) -> (loss, dstudent)
PyObject * py_mse_loss(PyObject * Py_UNUSED(m), PyObject * args) {
    PyObject * so, * to;
    static char * names[] = { "student", "teacher", NULL };
    if (!PARSE_POS(args, "OO", names, &so, &to)) return NULL;
    PyArrayObject * s, * t;
    if (get_logit_pair(so, to, "student_logits", "teacher_logits", &s, &t) < 0) return NULL;
    int N = (int)PyArray_DIM(s, 0), V = (int)PyArray_DIM(s, 1);
    PyObject * ret = NULL, * ds = PyArray_SimpleNew(2, PyArray_DIMS(s), NPY_FLOAT32);
    float loss;
    if (ds) {
        enum kd_status st = kd_loss_mse(&loss, PyArray_DATA((PyArrayObject *)ds), PyArray_DATA(s), PyArray_DATA(t), N, V, 1.0f, false);
        if (st != KD_OK) kd_raise(st);
        else ret = Py_BuildValue("(fO)", loss, ds);
    }
    Py_XDECREF(ds); Py_DECREF(s); Py_DECREF(t);
    return ret;
}

// l1_loss(student, teacher) -> (loss, dstudent); the teacher's gradient is -dstudent
PyObject * py_l1_loss(PyObject * Py_UNUSED(m), PyObject * args) {
    PyObject * so, * to;
    static char * names[] = { "student", "teacher", NULL };
    if (!PARSE_POS(args, "OO", names, &so, &to)) return NULL;
    PyArrayObject * s, * t;
    if (get_logit_pair(so, to, "student_logits", "teacher_logits", &s, &t) < 0) return NULL;
    int N = (int)PyArray_DIM(s, 0), V = (int)PyArray_DIM(s, 1);
    PyObject * ret = NULL, * ds = PyArray_SimpleNew(2, PyArray_DIMS(s), NPY_FLOAT32);
    float loss;
    if (ds) {
        enum kd_status st = kd_loss_l1(&loss, PyArray_DATA((PyArrayObject *)ds), NULL, PyArray_DATA(s), PyArray_DATA(t),
                                       N, V, 1.0f, false);
        if (st != KD_OK) kd_raise(st);
        else ret = Py_BuildValue("(fO)", loss, ds);
    }
    Py_XDECREF(ds); Py_DECREF(s); Py_DECREF(t);
    return ret;
}

// bce_loss(logits, target) -> (loss, dlogits)
PyObject * py_bce_loss(PyObject * Py_UNUSED(m), PyObject * args) {
    PyObject * zo;
    float target;
    static char * names[] = { "logits", "target", NULL };
    if (!PARSE_POS(args, "Of", names, &zo, &target)) return NULL;
    if (!(target >= 0 && target <= 1)) {
        PyErr_Format(PyExc_ValueError, "target must be in [0, 1], got %g", (double)target);
        return NULL;
    }
    PyArrayObject * z, * unused;
    if (get_logit_pair(zo, NULL, "logits", NULL, &z, &unused) < 0) return NULL;
    int N = (int)PyArray_DIM(z, 0), V = (int)PyArray_DIM(z, 1);
    PyObject * ret = NULL, * d = PyArray_SimpleNew(2, PyArray_DIMS(z), NPY_FLOAT32);
    float loss;
    if (d) {
        enum kd_status st = kd_loss_bce(&loss, PyArray_DATA((PyArrayObject *)d), PyArray_DATA(z), target, N, V, 1.0f, false);
        if (st != KD_OK) kd_raise(st);
        else ret = Py_BuildValue("(fO)", loss, d);
    }
    Py_XDECREF(d); Py_DECREF(z);
    return ret;
}

// tolerant_loss(logits, K) -> (loss, dlogits)
PyObject * py_tolerant_loss(PyObject * Py_UNUSED(m), PyObject * args) {
    PyObject * zo;
    int K;
    static char * names[] = { "logits", "K", NULL };
    if (!PARSE_POS(args, "Oi", names, &zo, &K)) return NULL;
    PyArrayObject * z, * unused;
    if (get_logit_pair(zo, NULL, "logits", NULL, &z, &unused) < 0) return NULL;
    int N = (int)PyArray_DIM(z, 0), V = (int)PyArray_DIM(z, 1);
    PyObject * ret = NULL, * d = PyArray_SimpleNew(2, PyArray_DIMS(z), NPY_FLOAT32);
    float loss;
    if (d) {
        enum kd_status st = kd_loss_tolerant(&loss, PyArray_DATA((PyArrayObject *)d), PyArray_DATA(z), N, V, K, 1.0f, false);
        if (st != KD_OK) kd_raise(st);
        else ret = Py_BuildValue("(fO)", loss, d);
    }
    Py_XDECREF(d); Py_DECREF(z);
    return ret;
}

// softmax(logits, T=1) -> probabilities
PyObject * py_softmax(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "logits", "T", NULL };
    PyObject * zo;
    float T = 1.0f;
    if (!PARSE_KW(args, kwds, "O|f", kwlist, &zo, &T)) return NULL;
    if (check_T(T) < 0) return NULL;
    PyArrayObject * z, * unused;
    if (get_logit_pair(zo, NULL, "logits", NULL, &z, &unused) < 0) return NULL;
    PyObject * p = PyArray_SimpleNew(2, PyArray_DIMS(z), NPY_FLOAT32);
    if (p) kd_softmax_t(PyArray_DATA((PyArrayObject *)p), PyArray_DATA(z), (int)PyArray_DIM(z, 0), (int)PyArray_DIM(z, 1), T);
    Py_DECREF(z);
    return p;
}

// ---- feature and relation losses (kdcore.h, "Feature and relation losses")

// A feature-map argument: float32, 2-D (n, d) or 4-D (n, c, h, w), non-empty, finite. A new
// reference in *a; *m describes it (a 2-D array as c = d, h = w = 1).
static int get_fmap(PyObject * o, const char * name, PyArrayObject ** a, struct kd_fmap * m) {
    *a = get_array(o, NPY_FLOAT32, name);
    if (!*a) return -1;
    const int nd = PyArray_NDIM(*a);
    if ((nd != 2 && nd != 4) || PyArray_SIZE(*a) == 0) {
        PyErr_Format(PyExc_ValueError, "%s must be a non-empty 2-D (n, d) or 4-D (n, c, h, w) array, got %s%d-D", name,
                     PyArray_SIZE(*a) == 0 ? "an empty " : "", nd);
        goto fail;
    }
    for (int k = 0; k < nd; k++)
        if (check_int(PyArray_DIM(*a, k), name) < 0) goto fail;
    if (check_finite(*a, name) < 0) goto fail;
    m->x = PyArray_DATA(*a);
    m->n = (int)PyArray_DIM(*a, 0);
    m->c = (int)PyArray_DIM(*a, 1);
    m->h = nd == 4 ? (int)PyArray_DIM(*a, 2) : 1;
    m->w = nd == 4 ? (int)PyArray_DIM(*a, 3) : 1;
    return 0;
fail:
    Py_CLEAR(*a);
    return -1;
}

static int same_batch(const struct kd_fmap * a, const char * an, const struct kd_fmap * b, const char * bn) {
    if (a->n == b->n) return 0;
    PyErr_Format(PyExc_ValueError, "%s has %d samples and %s has %d: the batch sizes must match", bn, b->n, an, a->n);
    return -1;
}

PyObject * like(PyArrayObject * a) { return PyArray_SimpleNew(PyArray_NDIM(a), PyArray_DIMS(a), NPY_FLOAT32); }
static float * data_or_null(PyObject * a) { return a ? PyArray_DATA((PyArrayObject *)a) : NULL; }

enum feat_kind { FEAT_AT, FEAT_SP, FEAT_NST, FEAT_RKD, FEAT_PKT };

// (loss, ds[, dt]) for the two-map losses; RKD appends (L_dist, L_angle).
static PyObject * feat_run(enum feat_kind kind, PyObject * so, PyObject * to, int tg, float p, int form, float wd,
                           float wa) {
    PyArrayObject * s = NULL, * t = NULL;
    PyObject * ds = NULL, * dt = NULL, * ret = NULL;
    struct kd_fmap fs, ft;
    if (get_fmap(so, "s", &s, &fs) < 0) return NULL;
    if (get_fmap(to, "t", &t, &ft) < 0 || same_batch(&fs, "s", &ft, "t") < 0) goto fail;
    ds = like(s);
    dt = tg ? like(t) : NULL;
    if (!ds || (tg && !dt)) goto fail;
    float loss = 0, parts[2] = { 0, 0 };
    float * dsp = data_or_null(ds), * dtp = data_or_null(dt);
    enum kd_status st = KD_OK;
    Py_BEGIN_ALLOW_THREADS
    switch (kind) {
    case FEAT_AT:  st = kd_loss_at(&loss, dsp, dtp, fs, ft, p, (enum kd_at_form)form, 1.0f, false); break;
    case FEAT_SP:  st = kd_loss_sp(&loss, dsp, dtp, fs, ft, 1.0f, false); break;
    case FEAT_NST: st = kd_loss_nst(&loss, dsp, dtp, fs, ft, 1.0f, false); break;
    case FEAT_RKD: st = kd_loss_rkd(&loss, dsp, dtp, fs, ft, wd, wa, parts, 1.0f, false); break;
    case FEAT_PKT: st = kd_loss_pkt(&loss, dsp, dtp, fs, ft, 1.0f, false); break;
    }
    Py_END_ALLOW_THREADS
    if (st != KD_OK) { kd_raise(st); goto fail; }
    if (kind == FEAT_RKD)
        ret = tg ? Py_BuildValue("(fOO(ff))", loss, ds, dt, parts[0], parts[1]) : Py_BuildValue("(fO(ff))", loss, ds, parts[0], parts[1]);
    else
        ret = tg ? Py_BuildValue("(fOO)", loss, ds, dt) : Py_BuildValue("(fO)", loss, ds);
fail:
    Py_XDECREF(ds); Py_XDECREF(dt); Py_XDECREF(s); Py_XDECREF(t);
    return ret;
}

// at_loss(s, t, p=2, form=0, grad_teacher=False) -> (loss, ds[, dt]); form 0 code, 1 paper
PyObject * py_at_loss(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "s", "t", "p", "form", "grad_teacher", NULL };
    PyObject * so, * to;
    float p = 2.0f;
    int form = 0, tg = 0;
    if (!PARSE_KW(args, kwds, "OO|fip", kwlist, &so, &to, &p, &form, &tg)) return NULL;
    return feat_run(FEAT_AT, so, to, tg, p, form, 0, 0);
}

// sp_loss / nst_loss / pkt_loss(s, t, grad_teacher=False) -> (loss, ds[, dt])
static PyObject * feat_plain(enum feat_kind kind, PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "s", "t", "grad_teacher", NULL };
    PyObject * so, * to;
    int tg = 0;
    if (!PARSE_KW(args, kwds, "OO|p", kwlist, &so, &to, &tg)) return NULL;
    return feat_run(kind, so, to, tg, 0, 0, 0, 0);
}
PyObject * py_sp_loss(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) { return feat_plain(FEAT_SP, args, kwds); }
PyObject * py_nst_loss(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) { return feat_plain(FEAT_NST, args, kwds); }
PyObject * py_pkt_loss(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) { return feat_plain(FEAT_PKT, args, kwds); }

// rkd_loss(s, t, w_dist=25, w_angle=50, grad_teacher=False) -> (loss, ds[, dt], (L_dist, L_angle))
PyObject * py_rkd_loss(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "s", "t", "w_dist", "w_angle", "grad_teacher", NULL };
    PyObject * so, * to;
    float wd = 25.0f, wa = 50.0f;
    int tg = 0;
    if (!PARSE_KW(args, kwds, "OO|ffp", kwlist, &so, &to, &wd, &wa, &tg)) return NULL;
    return feat_run(FEAT_RKD, so, to, tg, 0, 0, wd, wa);
}

// fsp_loss(s1, s2, t1, t2, grad_teacher=False) -> (loss, ds1, ds2[, dt1, dt2])
PyObject * py_fsp_loss(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "s1", "s2", "t1", "t2", "grad_teacher", NULL };
    PyObject * o[4];
    int tg = 0;
    if (!PARSE_KW(args, kwds, "OOOO|p", kwlist, &o[0], &o[1], &o[2], &o[3], &tg)) return NULL;
    PyArrayObject * a[4] = { NULL, NULL, NULL, NULL };
    PyObject * g[4] = { NULL, NULL, NULL, NULL }, * ret = NULL;
    struct kd_fmap f[4];
    for (int k = 0; k < 4; k++) {
        if (get_fmap(o[k], kwlist[k], &a[k], &f[k]) < 0) goto fail;
        if (k > 0 && same_batch(&f[0], kwlist[0], &f[k], kwlist[k]) < 0) goto fail;
    }
    for (int k = 0; k < (tg ? 4 : 2); k++)
        if (!(g[k] = like(a[k]))) goto fail;
    float loss = 0;
    enum kd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = kd_loss_fsp(&loss, data_or_null(g[0]), data_or_null(g[1]), data_or_null(g[2]), data_or_null(g[3]), f[0], f[1],
                     f[2], f[3], 1.0f, false);
    Py_END_ALLOW_THREADS
    if (st != KD_OK) { kd_raise(st); goto fail; }
    ret = tg ? Py_BuildValue("(fOOOO)", loss, g[0], g[1], g[2], g[3]) : Py_BuildValue("(fOO)", loss, g[0], g[1]);
fail:
    for (int k = 0; k < 4; k++) { Py_XDECREF(a[k]); Py_XDECREF(g[k]); }
    return ret;
}

// feat_scratch_bytes() -> bytes of scratch the last feature/relation loss on this thread allocated
PyObject * py_feat_scratch_bytes(PyObject * Py_UNUSED(m), PyObject * Py_UNUSED(a)) {
    return PyLong_FromSize_t(kd_loss_feat_scratch());
}

// ---- losses with connectors or state (kdcore.h, "Losses with connectors or state")

static int same_fmap_shape(PyArrayObject * a, PyArrayObject * b, const char * an, const char * bn) {
    if (PyArray_NDIM(a) == PyArray_NDIM(b)) {
        int same = 1;
        for (int i = 0; i < PyArray_NDIM(a); i++) same &= PyArray_DIM(a, i) == PyArray_DIM(b, i);
        if (same) return 0;
    }
    PyErr_Format(PyExc_ValueError, "%s must have the shape of %s", bn, an);
    return -1;
}

// A 1-D float32 vector of length c, finite. New reference.
static PyArrayObject * get_vector(PyObject * o, const char * name, npy_intp c, const char * what) {
    PyArrayObject * v = get_array(o, NPY_FLOAT32, name);
    if (!v) return NULL;
    if (PyArray_NDIM(v) != 1 || PyArray_DIM(v, 0) != c) {
        PyErr_Format(PyExc_ValueError, "%s must be 1-D with %zd entries (%s), got shape of %zd values in %d-D", name,
                     (Py_ssize_t)c, what, (Py_ssize_t)PyArray_SIZE(v), PyArray_NDIM(v));
        Py_DECREF(v);
        return NULL;
    }
    if (check_finite(v, name) < 0) { Py_DECREF(v); return NULL; }
    return v;
}


// ofd_margin(bn_weight, bn_bias) -> margin (C,)
PyObject * py_ofd_margin(PyObject * Py_UNUSED(m), PyObject * args) {
    PyObject * wo, * bo;
    static char * names[] = { "bn_weight", "bn_bias", NULL };
    if (!PARSE_POS(args, "OO", names, &wo, &bo)) return NULL;
    PyArrayObject * w = get_array(wo, NPY_FLOAT32, "bn_weight"), * b = NULL;
    PyObject * out = NULL;
    if (!w) return NULL;
    if (PyArray_NDIM(w) != 1 || PyArray_SIZE(w) == 0) {
        PyErr_Format(PyExc_ValueError, "bn_weight must be a non-empty 1-D array (channels,), got %d-D", PyArray_NDIM(w));
        goto fail;
    }
    if (check_int(PyArray_DIM(w, 0), "bn_weight") < 0 || check_finite(w, "bn_weight") < 0) goto fail;
    if (!(b = get_vector(bo, "bn_bias", PyArray_DIM(w, 0), "the channels of bn_weight"))) goto fail;
    if (!(out = like(w))) goto fail;
    enum kd_status st = kd_ofd_margin(FDATA(out), PyArray_DATA(w), PyArray_DATA(b), (int)PyArray_DIM(w, 0));
    if (st != KD_OK) { kd_raise(st); Py_CLEAR(out); }
fail:
    Py_XDECREF(w); Py_XDECREF(b);
    return out;
}

// ofd_loss(student, teacher, margin) -> (loss, dstudent)
PyObject * py_ofd_loss(PyObject * Py_UNUSED(m), PyObject * args) {
    PyObject * so, * to, * mo;
    static char * names[] = { "student", "teacher", "margin", NULL };
    if (!PARSE_POS(args, "OOO", names, &so, &to, &mo)) return NULL;
    PyArrayObject * s = NULL, * t = NULL, * mg = NULL;
    PyObject * ds = NULL, * ret = NULL;
    struct kd_fmap fs, ft;
    if (get_fmap(so, "student", &s, &fs) < 0 || get_fmap(to, "teacher", &t, &ft) < 0) goto fail;
    if (PyArray_NDIM(t) != PyArray_NDIM(s) || ft.n != fs.n || ft.c != fs.c) {
        PyErr_Format(PyExc_ValueError, "teacher (%d, %d, %d, %d) must have the dimensions, batch size and channels of "
                     "student (%d, %d, %d, %d)", ft.n, ft.c, ft.h, ft.w, fs.n, fs.c, fs.h, fs.w);
        goto fail;
    }
    if (!(mg = get_vector(mo, "margin", fs.c, "one per channel"))) goto fail;
    if (!(ds = like(s))) goto fail;
    float loss;
    enum kd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = kd_loss_ofd(&loss, FDATA(ds), fs, ft, PyArray_DATA(mg), 1.0f, false);
    Py_END_ALLOW_THREADS
    if (st != KD_OK) { kd_raise(st); goto fail; }
    ret = Py_BuildValue("(fO)", loss, ds);
fail:
    Py_XDECREF(s); Py_XDECREF(t); Py_XDECREF(mg); Py_XDECREF(ds);
    return ret;
}

// ab_loss(student, teacher, margin) -> (loss, dstudent)
PyObject * py_ab_loss(PyObject * Py_UNUSED(m), PyObject * args) {
    PyObject * so, * to;
    float margin;
    static char * names[] = { "student", "teacher", "margin", NULL };
    if (!PARSE_POS(args, "OOf", names, &so, &to, &margin)) return NULL;
    if (!(margin >= 0) || !isfinite(margin)) return err_printf(PyExc_ValueError, "margin must be >= 0 and finite, got %g", (double)margin);
    PyArrayObject * s = NULL, * t = NULL;
    PyObject * ds = NULL, * ret = NULL;
    struct kd_fmap fs, ft;
    if (get_fmap(so, "student", &s, &fs) < 0 || get_fmap(to, "teacher", &t, &ft) < 0) goto fail;
    if (same_fmap_shape(s, t, "student", "teacher") < 0) goto fail;
    if (!(ds = like(s))) goto fail;
    float loss;
    enum kd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = kd_loss_ab(&loss, FDATA(ds), fs, ft, margin, 1.0f, false);
    Py_END_ALLOW_THREADS
    if (st != KD_OK) { kd_raise(st); goto fail; }
    ret = Py_BuildValue("(fO)", loss, ds);
fail:
    Py_XDECREF(s); Py_XDECREF(t); Py_XDECREF(ds);
    return ret;
}

// ft_loss(student_factor, teacher_factor, p1, p2) -> (loss, dstudent, dteacher)
PyObject * py_ft_loss(PyObject * Py_UNUSED(m), PyObject * args) {
    PyObject * so, * to;
    int p1;
    float p2;
    static char * names[] = { "student_factor", "teacher_factor", "p1", "p2", NULL };
    if (!PARSE_POS(args, "OOif", names, &so, &to, &p1, &p2)) return NULL;
    if (p1 < 1 || p1 > 8) return PyErr_Format(PyExc_ValueError, "p1 must be an int in [1, 8], got %d", p1);
    if (!(p2 >= 1) || !isfinite(p2)) return err_printf(PyExc_ValueError, "p2 must be >= 1 and finite, got %g", (double)p2);
    PyArrayObject * s = NULL, * t = NULL;
    PyObject * ds = NULL, * dt = NULL, * ret = NULL;
    struct kd_fmap fs, ft;
    if (get_fmap(so, "student_factor", &s, &fs) < 0 || get_fmap(to, "teacher_factor", &t, &ft) < 0) goto fail;
    if (PyArray_NDIM(s) != 4 || PyArray_NDIM(t) != 4) {
        PyErr_SetString(PyExc_ValueError, "student_factor and teacher_factor must be 4-D (N, C, H, W) factor maps");
        goto fail;
    }
    if (ft.n != fs.n) {
        PyErr_Format(PyExc_ValueError, "teacher_factor has %d samples, student_factor %d", ft.n, fs.n);
        goto fail;
    }
    if ((fs.h < ft.h && fs.w > ft.w) || (fs.h > ft.h && fs.w < ft.w) || (fs.h == ft.h && fs.w != ft.w)) {
        PyErr_Format(PyExc_ValueError, "student_factor (%d x %d) and teacher_factor (%d x %d): the spatial sizes must be "
                     "equal or one map at least as large as the other in both dimensions", fs.h, fs.w, ft.h, ft.w);
        goto fail;
    }
    if (!(ds = like(s)) || !(dt = like(t))) goto fail;
    float loss;
    enum kd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = kd_loss_ft(&loss, FDATA(ds), FDATA(dt), fs, ft, p1, p2, 1.0f, false);
    Py_END_ALLOW_THREADS
    if (st != KD_OK) { kd_raise(st); goto fail; }
    ret = Py_BuildValue("(fOO)", loss, ds, dt);
fail:
    Py_XDECREF(s); Py_XDECREF(t); Py_XDECREF(ds); Py_XDECREF(dt);
    return ret;
}

// vid_loss(mu, teacher, log_scale, eps) -> (loss, dmu, dlog_scale)
PyObject * py_vid_loss(PyObject * Py_UNUSED(m), PyObject * args) {
    PyObject * mo, * to, * lo;
    float eps;
    static char * names[] = { "mu", "teacher", "log_scale", "eps", NULL };
    if (!PARSE_POS(args, "OOOf", names, &mo, &to, &lo, &eps)) return NULL;
    if (!(eps >= 0) || !isfinite(eps)) return err_printf(PyExc_ValueError, "eps must be >= 0 and finite, got %g", (double)eps);
    PyArrayObject * mu = NULL, * t = NULL, * ls = NULL;
    PyObject * dmu = NULL, * dls = NULL, * ret = NULL;
    struct kd_fmap fm, ft;
    if (get_fmap(mo, "mu", &mu, &fm) < 0 || get_fmap(to, "teacher", &t, &ft) < 0) goto fail;
    if (same_fmap_shape(mu, t, "mu", "teacher") < 0) goto fail;
    if (!(ls = get_vector(lo, "log_scale", fm.c, "one per channel of mu"))) goto fail;
    if (!(dmu = like(mu)) || !(dls = like(ls))) goto fail;
    float loss;
    enum kd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = kd_loss_vid(&loss, FDATA(dmu), FDATA(dls), fm, ft, PyArray_DATA(ls), eps, 1.0f, false);
    Py_END_ALLOW_THREADS
    if (st != KD_OK) { kd_raise(st); goto fail; }
    ret = Py_BuildValue("(fOO)", loss, dmu, dls);
fail:
    Py_XDECREF(mu); Py_XDECREF(t); Py_XDECREF(ls); Py_XDECREF(dmu); Py_XDECREF(dls);
    return ret;
}

// vid_log_scale_init(init_var, eps) -> float
PyObject * py_vid_log_scale_init(PyObject * Py_UNUSED(m), PyObject * args) {
    float v, eps;
    static char * names[] = { "init_var", "eps", NULL };
    if (!PARSE_POS(args, "ff", names, &v, &eps)) return NULL;
    if (!(eps >= 0) || !isfinite(eps)) return err_printf(PyExc_ValueError, "eps must be >= 0 and finite, got %g", (double)eps);
    if (!(v > eps) || !isfinite(v)) return err_printf(PyExc_ValueError, "init_var must be finite and > eps (%g), got %g", (double)eps, (double)v);
    float r = kd_vid_log_scale_init(v, eps);
    if (!isfinite(r)) return err_printf(PyExc_ValueError, "init_var %g gives a non-finite log_scale", (double)v);
    return PyFloat_FromDouble(r);
}

// Two (N, D) float32 embeddings of the same shape, finite. New references.
int get_embed_pair(PyObject * ao, PyObject * bo, const char * an, const char * bn, PyArrayObject ** a,
                          PyArrayObject ** b) {
    *b = NULL;
    *a = get_array(ao, NPY_FLOAT32, an);
    if (!*a) return -1;
    if (PyArray_NDIM(*a) != 2 || PyArray_SIZE(*a) == 0) {
        PyErr_Format(PyExc_ValueError, "%s must be a non-empty 2-D array (N, dim), got %d-D", an, PyArray_NDIM(*a));
        goto fail;
    }
    if (check_int(PyArray_DIM(*a, 0), an) < 0 || check_int(PyArray_DIM(*a, 1), an) < 0 || check_finite(*a, an) < 0) goto fail;
    *b = get_array(bo, NPY_FLOAT32, bn);
    if (!*b) goto fail;
    if (PyArray_NDIM(*b) != 2 || PyArray_DIM(*b, 0) != PyArray_DIM(*a, 0) || PyArray_DIM(*b, 1) != PyArray_DIM(*a, 1)) {
        PyErr_Format(PyExc_ValueError, "%s must have the shape of %s (%zd, %zd)", bn, an, (Py_ssize_t)PyArray_DIM(*a, 0),
                     (Py_ssize_t)PyArray_DIM(*a, 1));
        goto fail;
    }
    if (check_finite(*b, bn) < 0) goto fail;
    return 0;
fail:
    Py_CLEAR(*a);
    Py_CLEAR(*b);
    return -1;
}

// cc_loss(student_embed, teacher_embed) -> (loss, dstudent, dteacher)
PyObject * py_cc_loss(PyObject * Py_UNUSED(m), PyObject * args) {
    PyObject * so, * to;
    static char * names[] = { "student_embed", "teacher_embed", NULL };
    if (!PARSE_POS(args, "OO", names, &so, &to)) return NULL;
    PyArrayObject * s, * t;
    if (get_embed_pair(so, to, "student_embed", "teacher_embed", &s, &t) < 0) return NULL;
    PyObject * ds = NULL, * dt = NULL, * ret = NULL;
    int n = (int)PyArray_DIM(s, 0), d = (int)PyArray_DIM(s, 1);
    if (n < 2) {
        PyErr_Format(PyExc_ValueError, "student_embed must have at least 2 rows (CC pairs consecutive samples), got %d", n);
        goto fail;
    }
    if (!(ds = like(s)) || !(dt = like(t))) goto fail;
    float loss;
    enum kd_status st = kd_loss_cc(&loss, FDATA(ds), FDATA(dt), PyArray_DATA(s), PyArray_DATA(t), n, d, 1.0f, false);
    if (st != KD_OK) { kd_raise(st); goto fail; }
    ret = Py_BuildValue("(fOO)", loss, ds, dt);
fail:
    Py_XDECREF(s); Py_XDECREF(t); Py_XDECREF(ds); Py_XDECREF(dt);
    return ret;
}

// hcl_loss(student, teacher) -> (loss, dstudent)
PyObject * py_hcl_loss(PyObject * Py_UNUSED(m), PyObject * args) {
    PyObject * so, * to;
    static char * names[] = { "student", "teacher", NULL };
    if (!PARSE_POS(args, "OO", names, &so, &to)) return NULL;
    PyArrayObject * s = NULL, * t = NULL;
    PyObject * ds = NULL, * ret = NULL;
    struct kd_fmap fs, ft;
    if (get_fmap(so, "student", &s, &fs) < 0 || get_fmap(to, "teacher", &t, &ft) < 0) goto fail;
    if (same_fmap_shape(s, t, "student", "teacher") < 0) goto fail;
    if (!(ds = like(s))) goto fail;
    float loss;
    enum kd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = kd_loss_hcl(&loss, FDATA(ds), fs, ft, 1.0f, false);
    Py_END_ALLOW_THREADS
    if (st != KD_OK) { kd_raise(st); goto fail; }
    ret = Py_BuildValue("(fO)", loss, ds);
fail:
    Py_XDECREF(s); Py_XDECREF(t); Py_XDECREF(ds);
    return ret;
}


// ---- DeepInversion (kdcore.h: kd_loss_bnstat, kd_loss_tv, kd_loss_l2prior, kd_loss_adi)

// bnstat_loss(x, running_mean, running_var) -> (loss, dx)
PyObject * py_bnstat_loss(PyObject * Py_UNUSED(m), PyObject * args) {
    PyObject * xo, * mo, * vo;
    static char * names[] = { "x", "running_mean", "running_var", NULL };
    if (!PARSE_POS(args, "OOO", names, &xo, &mo, &vo)) return NULL;
    PyArrayObject * x = NULL, * rm = NULL, * rv = NULL;
    PyObject * dx = NULL, * ret = NULL;
    struct kd_fmap fx;
    if (get_fmap(xo, "x", &x, &fx) < 0) return NULL;
    if (!(rm = get_vector(mo, "running_mean", fx.c, "one per channel of x")) ||
        !(rv = get_vector(vo, "running_var", fx.c, "one per channel of x")) || !(dx = like(x)))
        goto fail;
    float loss;
    enum kd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = kd_loss_bnstat(&loss, FDATA(dx), fx, PyArray_DATA(rm), PyArray_DATA(rv), 1.0f, false);
    Py_END_ALLOW_THREADS
    if (st != KD_OK) { kd_raise(st); goto fail; }
    ret = Py_BuildValue("(fO)", loss, dx);
fail:
    Py_XDECREF(x); Py_XDECREF(rm); Py_XDECREF(rv); Py_XDECREF(dx);
    return ret;
}

// tv_loss(x, l1) -> (loss, dx); x (n, c, h, w)
PyObject * py_tv_loss(PyObject * Py_UNUSED(m), PyObject * args) {
    PyObject * xo;
    int l1;
    static char * names[] = { "x", "l1", NULL };
    if (!PARSE_POS(args, "Op", names, &xo, &l1)) return NULL;
    PyArrayObject * x = NULL;
    PyObject * dx = NULL, * ret = NULL;
    struct kd_fmap fx;
    if (get_fmap(xo, "x", &x, &fx) < 0) return NULL;
    if (!(dx = like(x))) goto fail;
    float loss;
    enum kd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = kd_loss_tv(&loss, FDATA(dx), fx, l1 != 0, 1.0f, false);
    Py_END_ALLOW_THREADS
    if (st != KD_OK) { kd_raise(st); goto fail; }
    ret = Py_BuildValue("(fO)", loss, dx);
fail:
    Py_XDECREF(x); Py_XDECREF(dx);
    return ret;
}

// l2prior_loss(x) -> (loss, dx)
PyObject * py_l2prior_loss(PyObject * Py_UNUSED(m), PyObject * args) {
    PyObject * xo;
    static char * names[] = { "x", NULL };
    if (!PARSE_POS(args, "O", names, &xo)) return NULL;
    PyArrayObject * x = NULL;
    PyObject * dx = NULL, * ret = NULL;
    struct kd_fmap fx;
    if (get_fmap(xo, "x", &x, &fx) < 0) return NULL;
    if (!(dx = like(x))) goto fail;
    float loss;
    enum kd_status st = kd_loss_l2prior(&loss, FDATA(dx), fx.x, (size_t)PyArray_SIZE(x), 1.0f, false);
    if (st != KD_OK) { kd_raise(st); goto fail; }
    ret = Py_BuildValue("(fO)", loss, dx);
fail:
    Py_XDECREF(x); Py_XDECREF(dx);
    return ret;
}

// adi_loss(teacher, student, T=3) -> (loss, dteacher, dstudent)
PyObject * py_adi_loss(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "teacher", "student", "T", NULL };
    PyObject * to, * so;
    float T = 3.0f;
    if (!PARSE_KW(args, kwds, "OO|f", kwlist, &to, &so, &T)) return NULL;
    if (!(T > 0) || !isfinite(T)) return PyErr_Format(PyExc_ValueError, "T must be > 0 and finite, got %g", (double)T);
    PyArrayObject * t, * s;
    if (get_logit_pair(to, so, "teacher_logits", "student_logits", &t, &s) < 0) return NULL;
    int N = (int)PyArray_DIM(t, 0), V = (int)PyArray_DIM(t, 1);
    PyObject * ret = NULL, * dt = like(t), * ds = like(s);
    if (dt && ds) {
        float loss;
        enum kd_status st = kd_loss_adi(&loss, FDATA(dt), FDATA(ds), PyArray_DATA(t), PyArray_DATA(s), N, V, T, 1.0f,
                                        false);
        if (st != KD_OK) kd_raise(st);
        else ret = Py_BuildValue("(fOO)", loss, dt, ds);
    }
    Py_XDECREF(dt); Py_XDECREF(ds); Py_DECREF(t); Py_DECREF(s);
    return ret;
}
