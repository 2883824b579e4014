// CPython + NumPy binding for kdcore. Binding only: parse, validate (naming the argument),
// release the GIL around the C core, map kd_status to Python exceptions. All numerics live
// in kdcore/src.
//
// Recipe for each entry point (bottleneck's): convert arguments -> validate -> acquire the
// object's busy flag -> Py_BEGIN_ALLOW_THREADS -> core call -> Py_END_ALLOW_THREADS ->
// release -> map status. One `fail:` label releases references on every path.
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <string.h>
#include <strings.h>

#include "kdcore.h"

// ---------------------------------------------------------------------------------------
// Errors

static PyObject * kd_raise(enum kd_status st) {
    if (PyErr_Occurred()) return NULL;   // e.g. KeyboardInterrupt raised inside a callback
    const char * msg = kd_last_error();
    switch (st) {
    case KD_ERR_NOMEM:       PyErr_SetString(PyExc_MemoryError, msg); break;
    case KD_ERR_SHAPE:
    case KD_ERR_VALUE:       PyErr_SetString(PyExc_ValueError, msg); break;
    case KD_ERR_IO:          PyErr_SetString(PyExc_OSError, msg); break;
    case KD_ERR_INTERRUPTED: PyErr_SetString(PyExc_KeyboardInterrupt, msg); break;
    case KD_ERR_STATE:
    case KD_ERR_NONFINITE:
    case KD_OK:
    default:                 PyErr_SetString(PyExc_RuntimeError, msg); break;
    }
    return NULL;
}

// ---------------------------------------------------------------------------------------
// Array arguments. Strict dtypes (no silent casts); non-contiguous input is copied.

// PyErr_Format has no %g: messages with floating-point values go through vsnprintf.
static PyObject * err_printf(PyObject * type, const char * fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    PyErr_SetString(type, buf);
    return NULL;
}

static const char * dtype_name(PyArrayObject * a) {
    static _Thread_local char buf[64];
    PyObject * s = PyObject_Str((PyObject *)PyArray_DESCR(a));
    if (!s) { PyErr_Clear(); return "?"; }
    const char * u = PyUnicode_AsUTF8(s);
    snprintf(buf, sizeof buf, "%s", u ? u : "?");
    Py_DECREF(s);
    return buf;
}

// Returns a new reference to a C-contiguous, native-byte-order array of `type`, or NULL
// with TypeError. A byte-swapped array of the right type (dtype '>f4' on this machine) is
// copied to native order (lossless), never read as it lies.
static PyArrayObject * get_array(PyObject * obj, int type, const char * name) {
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy.ndarray, got %s", name, Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyArrayObject * a = (PyArrayObject *)obj;
    if (PyArray_TYPE(a) != type) {
        PyArray_Descr * want = PyArray_DescrFromType(type);
        PyObject * ws = want ? PyObject_Str((PyObject *)want) : NULL;
        PyErr_Format(PyExc_TypeError, "%s must have dtype %s, got %s", name,
                     ws ? PyUnicode_AsUTF8(ws) : "?", dtype_name(a));
        Py_XDECREF(ws);
        Py_XDECREF(want);
        return NULL;
    }
    PyArray_Descr * native = PyArray_DescrFromType(type);   // stolen by PyArray_FromArray
    if (!native) return NULL;
    return (PyArrayObject *)PyArray_FromArray(a, native, NPY_ARRAY_IN_ARRAY);
}

static int check_finite(PyArrayObject * a, const char * name) {
    const float * p = PyArray_DATA(a);
    npy_intp n = PyArray_SIZE(a);
    for (npy_intp i = 0; i < n; i++) {
        if (!isfinite(p[i])) {
            PyErr_Format(PyExc_ValueError, "%s contains %s at flat index %zd", name,
                         isnan(p[i]) ? "NaN" : "Inf", (Py_ssize_t)i);
            return -1;
        }
    }
    return 0;
}

static int check_int(npy_intp v, const char * name) {
    if (v > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "%s has a dimension of %zd, above the supported %d", name, (Py_ssize_t)v, INT_MAX);
        return -1;
    }
    return 0;
}

// ---------------------------------------------------------------------------------------
// Argument parsing that names the argument. CPython's messages for a bad "f"/"i"/"p" unit
// ("must be real number, not str") or an "O!" unit ("argument 1 must be ...") do not say
// which argument; after a failed PyArg_Parse* this rewrites the error so that it does.
// names: one per format unit (the kwlist, or a list for positional-only functions).

static void name_parse_error(PyObject * args, PyObject * kwds, const char * fmt, char ** names, const char * prefix) {
    if (!PyErr_Occurred() || !(PyErr_ExceptionMatches(PyExc_TypeError) || PyErr_ExceptionMatches(PyExc_OverflowError) ||
                               PyErr_ExceptionMatches(PyExc_ValueError)))
        return;
    PyObject * et, * ev, * tb;
    PyErr_Fetch(&et, &ev, &tb);
    PyErr_NormalizeException(&et, &ev, &tb);
    PyObject * es = ev ? PyObject_Str(ev) : NULL;
    const char * orig = es ? PyUnicode_AsUTF8(es) : NULL;
    if (!orig) { PyErr_Clear(); orig = "invalid argument"; }
    Py_ssize_t nargs = args && PyTuple_Check(args) ? PyTuple_GET_SIZE(args) : 0;
    int argno = 0;
    if (strncmp(orig, "argument ", 9) == 0) argno = atoi(orig + 9);   // "argument 2 must be X, not Y" ("O!")
    int i = 0, done = 0;
    for (const char * f = fmt; *f && *f != ':' && *f != ';' && !done; f++) {
        char u = *f;
        if (u == '|' || u == '$') continue;
        if (u == 'O' && (f[1] == '!' || f[1] == '&')) f++;
        const char * name = names[i];
        if (!name) break;
        PyObject * v = i < nargs ? PyTuple_GET_ITEM(args, i) : (kwds && PyDict_Check(kwds) ? PyDict_GetItemString(kwds, name) : NULL);
        i++;
        if (!v) continue;
        const char * want = NULL;
        int range = 0;
        switch (u) {
        case 'f': case 'd':
            if (PyFloat_AsDouble(v) == -1.0 && PyErr_Occurred()) want = "a real number";
            break;
        case 'i': case 'L': case 'n': {
            int overflow = 0;
            long long x = PyLong_Check(v) || PyIndex_Check(v) ? PyLong_AsLongLongAndOverflow(v, &overflow) : 0;
            if (!(PyLong_Check(v) || PyIndex_Check(v)) || (x == -1 && PyErr_Occurred())) want = "an int";
            else if (overflow || (u == 'i' && (x < INT_MIN || x > INT_MAX))) { want = "an int"; range = 1; }
            break;
        }
        case 'K':
            if (!PyLong_Check(v)) want = "an int";
            break;
        case 'p':
            if (PyObject_IsTrue(v) < 0) want = "true or false";
            break;
        case 's':
            if (!PyUnicode_Check(v)) want = "a str";
            break;
        case 'O':
            if (argno == i && *f == '!') {
                PyErr_Clear();
                PyErr_Format(PyExc_TypeError, "%s%s %s", prefix, name, orig + 9 + strspn(orig + 9, "0123456789 "));
                done = 2;
            }
            break;
        default:
            break;
        }
        if (want && !done) {
            PyErr_Clear();
            if (range) PyErr_Format(PyExc_ValueError, "%s%s = %R is out of range for a C int", prefix, name, v);
            else PyErr_Format(PyExc_TypeError, "%s%s must be %s, got %s", prefix, name, want, Py_TYPE(v)->tp_name);
            done = 1;
        }
    }
    if (done) { Py_XDECREF(et); Py_XDECREF(ev); Py_XDECREF(tb); }
    else PyErr_Restore(et, ev, tb);
    Py_XDECREF(es);
}

#define PARSE_KW(a, k, fmt, kwl, ...) \
    (PyArg_ParseTupleAndKeywords(a, k, fmt, kwl, __VA_ARGS__) || (name_parse_error(a, k, fmt, kwl, ""), 0))
#define PARSE_POS(a, fmt, nms, ...) \
    (PyArg_ParseTuple(a, fmt, __VA_ARGS__) || (name_parse_error(a, NULL, fmt, nms, ""), 0))

// ---------------------------------------------------------------------------------------
// Net

typedef struct {
    PyObject_HEAD
    struct kd_net * net;
    int busy;        // set under the GIL while a call runs with the GIL released
    int training;
    PyObject * ext;  // extra inputs: dict node -> (x array or None, dx array or None), held
                     // while the C net borrows them (kd_net_set_input)
} NetObject;

static PyTypeObject NetType;

static int net_acquire(NetObject * self) {
    if (!self->net) { PyErr_SetString(PyExc_RuntimeError, "the model was not built"); return -1; }
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError,
                        "this model is in use by another thread; kdcore models are not shared between threads");
        return -1;
    }
    self->busy = 1;
    return 0;
}
static void net_release(NetObject * self) { self->busy = 0; }

static void Net_dealloc(NetObject * self) {
    kd_net_free(self->net);
    Py_XDECREF(self->ext);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

// Net(nodes, seed): nodes is a sequence of tuples
// (type, name, inp0, inp1, in_ch, out_ch, kernel, stride, padding, groups, bias, eps, momentum, p, init)
static int Net_init(NetObject * self, PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "nodes", "seed", NULL };
    PyObject * nodes;
    unsigned long long seed = 0;
    if (!PARSE_KW(args, kwds, "O|K", kwlist, &nodes, &seed)) return -1;
    PyObject * seq = PySequence_Fast(nodes, "nodes must be a sequence of node tuples");
    if (!seq) return -1;
    struct kd_net * net = kd_net_new();
    if (!net) { Py_DECREF(seq); kd_raise(KD_ERR_NOMEM); return -1; }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n == 0) { PyErr_SetString(PyExc_ValueError, "nodes must not be empty"); goto fail; }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject * t = PySequence_Fast_GET_ITEM(seq, i);
        int type, inp0, inp1, in_ch, out_ch, kernel, stride, padding, groups, bias, init, size_h = 0, size_w = 0;
        float slope = 0.01f;
        const char * name;
        float eps, momentum, p;
        static char * node_fields[] = { "type", "name", "inp0", "inp1", "in_ch", "out_ch", "kernel", "stride", "padding",
                                        "groups", "bias", "eps", "momentum", "p", "init", "size_h", "size_w", "slope", NULL };
        char prefix[48];
        snprintf(prefix, sizeof prefix, "node %zd: ", i);
        if (!PyTuple_Check(t)) { PyErr_Format(PyExc_TypeError, "node %zd must be a tuple, got %s", i, Py_TYPE(t)->tp_name); goto fail; }
        if (!PyArg_ParseTuple(t, "isiiiiiiiipfffi|iif;node", &type, &name, &inp0, &inp1, &in_ch, &out_ch,
                              &kernel, &stride, &padding, &groups, &bias, &eps, &momentum, &p, &init, &size_h, &size_w,
                              &slope)) {
            name_parse_error(t, NULL, "isiiiiiiiipfffi|iif", node_fields, prefix);
            goto fail;
        }
        if (init < 0 || init > KD_INIT_KAIMING_IN) {
            PyErr_Format(PyExc_ValueError, "node %zd ('%s'): unknown init %d", i, name, init);
            goto fail;
        }
        if (type < 0 || type >= KD_LAYER_COUNT) {
            PyErr_Format(PyExc_ValueError, "node %zd ('%s'): unknown layer type %d", i, name, type);
            goto fail;
        }
        struct kd_layer_spec s = kd_layer_default((enum kd_layer_type)type);
        s.name = name; s.inp[0] = inp0; s.inp[1] = inp1; s.in_ch = in_ch; s.out_ch = out_ch;
        s.kernel = kernel; s.stride = stride; s.padding = padding; s.groups = groups; s.bias = bias;
        s.eps = eps; s.momentum = momentum; s.p = p; s.init = (enum kd_init)init;
        s.size[0] = size_h; s.size[1] = size_w; s.slope = slope;
        if (kd_net_add(net, &s) < 0) { PyErr_SetString(PyExc_ValueError, kd_last_error()); goto fail; }
    }
    Py_DECREF(seq);
    enum kd_status st = kd_net_finalize(net, seed);
    if (st != KD_OK) { kd_net_free(net); kd_raise(st); return -1; }
    kd_net_free(self->net);
    self->net = net;
    Py_CLEAR(self->ext);
    return 0;
fail:
    Py_DECREF(seq);
    kd_net_free(net);
    return -1;
}

// x as (N, C, H, W): 2-D arrays are (N, D) flat features.
static int input_dims(PyArrayObject * x, const char * name, int dims[4]) {
    int nd = PyArray_NDIM(x);
    if (nd != 2 && nd != 4) {
        PyErr_Format(PyExc_ValueError, "%s must be 2-D (N, features) or 4-D (N, C, H, W), got %d-D", name, nd);
        return -1;
    }
    npy_intp * sh = PyArray_DIMS(x);
    for (int i = 0; i < nd; i++) {
        if (sh[i] == 0) { PyErr_Format(PyExc_ValueError, "%s is empty (dimension %d is 0)", name, i); return -1; }
        if (check_int(sh[i], name) < 0) return -1;
    }
    dims[0] = (int)sh[0];
    dims[1] = (int)sh[1];
    dims[2] = nd == 4 ? (int)sh[2] : 1;
    dims[3] = nd == 4 ? (int)sh[3] : 1;
    return 0;
}

// A copy of a node's output: (N, C) when the node is flat, else (N, C, H, W).
static PyObject * node_array(struct kd_net * net, int node) {
    int c, h, w;
    kd_net_node_shape(net, node, &c, &h, &w);
    npy_intp dims[4] = { kd_net_batch(net), c, h, w };
    int nd = (h == 1 && w == 1) ? 2 : 4;
    PyObject * out = PyArray_SimpleNew(nd, dims, NPY_FLOAT32);
    if (!out) return NULL;
    memcpy(PyArray_DATA((PyArrayObject *)out), kd_net_output(net, node), (size_t)dims[0] * c * h * w * sizeof(float));
    return out;
}

static PyObject * Net_forward(NetObject * self, PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "x", "mode", "seed", NULL };
    PyObject * xo;
    int mode = KD_MODE_EVAL;
    unsigned long long seed = 0;
    if (!PARSE_KW(args, kwds, "O|iK", kwlist, &xo, &mode, &seed)) return NULL;
    if (mode < KD_MODE_EVAL || mode > (KD_MODE_TRAIN | KD_MODE_NO_GRAD))
        return PyErr_Format(PyExc_ValueError, "mode must be in 0..7 (kd_mode flags), got %d", mode);
    PyArrayObject * x = get_array(xo, NPY_FLOAT32, "x");
    PyObject * out = NULL;
    if (!x) return NULL;
    int d[4];
    if (input_dims(x, "x", d) < 0 || check_finite(x, "x") < 0) goto fail;
    if (self->ext) {   // every extra input holds data for this batch
        PyObject * key, * val;
        Py_ssize_t pos = 0;
        while (PyDict_Next(self->ext, &pos, &key, &val)) {
            PyObject * xe = PyTuple_GET_ITEM(val, 0);
            const int nd = (int)PyLong_AsLong(key);
            if (xe == Py_None || PyArray_DIM((PyArrayObject *)xe, 0) != d[0]) {
                PyErr_Format(PyExc_ValueError, "input '%s' %s", kd_net_node_spec(self->net, nd)->name,
                             xe == Py_None ? "has no data: give it with set_input(node, x)" : "has a different batch size than x");
                goto fail;
            }
        }
    }
    if (net_acquire(self) < 0) goto fail;
    enum kd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = kd_net_forward(self->net, PyArray_DATA(x), d[0], d[1], d[2], d[3], (unsigned)mode, seed);
    Py_END_ALLOW_THREADS
    net_release(self);
    if (st != KD_OK) { kd_raise(st); goto fail; }
    out = node_array(self->net, -1);
fail:
    Py_DECREF(x);
    return out;
}

static int node_index(NetObject * self, PyObject * arg, int * node) {
    if (!self->net) { PyErr_SetString(PyExc_RuntimeError, "the model was not built"); return -1; }
    if (PyLong_Check(arg)) {
        long v = PyLong_AsLong(arg);
        if (v == -1 && PyErr_Occurred()) return -1;
        int n = kd_net_num_nodes(self->net);
        if (v < -n || v >= n) { PyErr_Format(PyExc_IndexError, "node index %ld out of range for %d nodes", v, n); return -1; }
        *node = v < 0 ? (int)(n + v) : (int)v;
        return 0;
    }
    if (PyUnicode_Check(arg)) {
        int v = kd_net_find(self->net, PyUnicode_AsUTF8(arg));
        if (v < 0) { PyErr_Format(PyExc_KeyError, "no tap named %R", arg); return -1; }
        *node = v;
        return 0;
    }
    PyErr_Format(PyExc_TypeError, "tap must be a name (str) or index (int), got %s", Py_TYPE(arg)->tp_name);
    return -1;
}

static PyObject * Net_tap(NetObject * self, PyObject * arg) {
    int node;
    if (node_index(self, arg, &node) < 0) return NULL;
    if (!kd_net_output(self->net, node)) {
        PyErr_SetString(PyExc_RuntimeError, kd_net_last_chunk(self->net) > 0
                        ? "the last forward ran without gradients (grad=False, predict, evaluate): only the output "
                          "is kept; run a plain forward to read taps"
                        : "no forward pass has run yet (taps are read after forward)");
        return NULL;
    }
    if (self->busy) return PyErr_Format(PyExc_RuntimeError, "this model is in use by another thread");
    return node_array(self->net, node);
}

static PyObject * Net_grad_add(NetObject * self, PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "tap", "grad", "scale", NULL };
    PyObject * tap, * go;
    float scale = 1.0f;
    if (!PARSE_KW(args, kwds, "OO|f", kwlist, &tap, &go, &scale)) return NULL;
    int node;
    if (node_index(self, tap, &node) < 0) return NULL;
    if (!kd_net_output(self->net, node) || kd_net_last_chunk(self->net) > 0) {
        PyErr_SetString(PyExc_RuntimeError, kd_net_last_chunk(self->net) > 0
                        ? "the last forward ran without gradients (grad=False, predict, evaluate): no gradient can be added"
                        : "no forward pass has run yet (gradients are added between forward and backward)");
        return NULL;
    }
    PyArrayObject * g = get_array(go, NPY_FLOAT32, "grad");
    if (!g) return NULL;
    PyObject * ret = NULL;
    int c, h, w;
    kd_net_node_shape(self->net, node, &c, &h, &w);
    npy_intp want = (npy_intp)kd_net_batch(self->net) * c * h * w;
    if (PyArray_NDIM(g) < 1 || PyArray_SIZE(g) != want || PyArray_DIM(g, 0) != kd_net_batch(self->net)) {
        PyErr_Format(PyExc_ValueError, "grad must have the tap's shape (%d, %d, %d, %d) (%zd values), got %zd values",
                     kd_net_batch(self->net), c, h, w, (Py_ssize_t)want, (Py_ssize_t)PyArray_SIZE(g));
        goto fail;
    }
    if (!isfinite(scale)) { err_printf(PyExc_ValueError, "scale must be finite, got %g", (double)scale); goto fail; }
    if (check_finite(g, "grad") < 0 || net_acquire(self) < 0) goto fail;
    enum kd_status st = kd_net_grad_add(self->net, node, PyArray_DATA(g), scale);
    net_release(self);
    if (st != KD_OK) { kd_raise(st); goto fail; }
    ret = Py_NewRef(Py_None);
fail:
    Py_DECREF(g);
    return ret;
}

static PyObject * Net_backward(NetObject * self, PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "dout", "input_grad", NULL };
    PyObject * dobj = Py_None;
    int want_dinp = 1;
    if (!PARSE_KW(args, kwds, "|Op", kwlist, &dobj, &want_dinp)) return NULL;
    if (!self->net) return PyErr_Format(PyExc_RuntimeError, "the model was not built");
    if (!kd_net_output(self->net, -1))
        return PyErr_Format(PyExc_RuntimeError, "backward needs a forward pass first");
    if (kd_net_last_chunk(self->net) > 0)
        return PyErr_Format(PyExc_RuntimeError, "the last forward ran without gradients (grad=False, predict, "
                            "evaluate): backward needs a forward with gradients");
    PyArrayObject * d = NULL;
    PyObject * dinp = NULL;
    int c, h, w, N = kd_net_batch(self->net);
    if (dobj != Py_None) {
        d = get_array(dobj, NPY_FLOAT32, "dout");
        if (!d) return NULL;
        kd_net_node_shape(self->net, -1, &c, &h, &w);
        if (PyArray_NDIM(d) < 1 || PyArray_DIM(d, 0) != N || PyArray_SIZE(d) != (npy_intp)N * c * h * w) {
            PyErr_Format(PyExc_ValueError, "dout must have the output's shape (%d, %d), got %zd values",
                         N, c * h * w, (Py_ssize_t)PyArray_SIZE(d));
            goto fail;
        }
        if (check_finite(d, "dout") < 0) goto fail;
    }
    int C0, H0, W0;
    kd_net_input_shape(self->net, &C0, &H0, &W0);
    if (want_dinp) {
        npy_intp dims[4] = { N, C0, H0, W0 };
        int nd = (H0 == 1 && W0 == 1) ? 2 : 4;
        dinp = PyArray_SimpleNew(nd, dims, NPY_FLOAT32);
        if (!dinp) goto fail;
    }
    if (net_acquire(self) < 0) goto fail;
    enum kd_status st;
    const float * dp = d ? PyArray_DATA(d) : NULL;
    float * ip = dinp ? PyArray_DATA((PyArrayObject *)dinp) : NULL;
    Py_BEGIN_ALLOW_THREADS
    st = kd_net_backward(self->net, dp, ip);
    Py_END_ALLOW_THREADS
    net_release(self);
    if (st != KD_OK) { kd_raise(st); goto fail; }
    Py_XDECREF(d);
    if (!dinp) Py_RETURN_NONE;
    return dinp;
fail:
    Py_XDECREF(d);
    Py_XDECREF(dinp);
    return NULL;
}

static PyObject * Net_zero_grad(NetObject * self, PyObject * Py_UNUSED(ignored)) {
    if (net_acquire(self) < 0) return NULL;
    kd_net_zero_grad(self->net);
    net_release(self);
    Py_RETURN_NONE;
}

static PyObject * Net_memory(NetObject * self, PyObject * Py_UNUSED(ignored)) {
    if (!self->net) return PyErr_Format(PyExc_RuntimeError, "the model was not built");
    struct kd_net_memory m;
    kd_net_memory(self->net, &m);
    return Py_BuildValue("{sn,sn,sn,sn,sn,sn,sn}", "params", (Py_ssize_t)m.params, "grads", (Py_ssize_t)m.grads,
                         "activations", (Py_ssize_t)m.activations, "gradients", (Py_ssize_t)m.gradients,
                         "cache", (Py_ssize_t)m.cache, "inference", (Py_ssize_t)m.inference, "work", (Py_ssize_t)m.work);
}

static PyObject * Net_set_chunk(NetObject * self, PyObject * args) {
    long long n;
    static char * names[] = { "images", NULL };
    if (!PARSE_POS(args, "L", names, &n)) return NULL;
    if (n < 0 || n > INT32_MAX) return PyErr_Format(PyExc_ValueError, "images must be in 0..2^31-1 (0 = automatic), got %lld", n);
    if (!self->net) return PyErr_Format(PyExc_RuntimeError, "the model was not built");
    if (net_acquire(self) < 0) return NULL;
    kd_net_set_chunk(self->net, (int)n);
    net_release(self);
    Py_RETURN_NONE;
}

static PyObject * Net_last_chunk(NetObject * self, PyObject * Py_UNUSED(ignored)) {
    return PyLong_FromLong(self->net ? kd_net_last_chunk(self->net) : 0);
}

static PyObject * Net_init_params(NetObject * self, PyObject * args) {
    unsigned long long seed;
    static char * names[] = { "seed", NULL };
    if (!PARSE_POS(args, "K", names, &seed)) return NULL;
    if (net_acquire(self) < 0) return NULL;
    kd_net_init_params(self->net, seed);
    net_release(self);
    Py_RETURN_NONE;
}

// A 1-D float32 view of a block, kept alive by the Net.
static PyObject * block_view(NetObject * self, float * p, size_t n) {
    npy_intp dims[1] = { (npy_intp)n };
    PyObject * a = PyArray_SimpleNewFromData(1, dims, NPY_FLOAT32, p);
    if (!a) return NULL;
    if (PyArray_SetBaseObject((PyArrayObject *)a, Py_NewRef((PyObject *)self)) < 0) { Py_DECREF(a); return NULL; }
    return a;
}

static PyObject * Net_params(NetObject * self, PyObject * Py_UNUSED(i)) {
    if (!self->net) return PyErr_Format(PyExc_RuntimeError, "the model was not built");
    return block_view(self, kd_net_params(self->net), kd_net_num_params(self->net));
}
static PyObject * Net_grads(NetObject * self, PyObject * Py_UNUSED(i)) {
    if (!self->net) return PyErr_Format(PyExc_RuntimeError, "the model was not built");
    return block_view(self, kd_net_grads(self->net), kd_net_num_params(self->net));
}
static PyObject * Net_buffers(NetObject * self, PyObject * Py_UNUSED(i)) {
    if (!self->net) return PyErr_Format(PyExc_RuntimeError, "the model was not built");
    return block_view(self, kd_net_buffers(self->net), kd_net_num_buffers(self->net));
}

// tensors() -> [(name, shape, is_buffer, offset)]
static PyObject * Net_tensors(NetObject * self, PyObject * Py_UNUSED(i)) {
    if (!self->net) return PyErr_Format(PyExc_RuntimeError, "the model was not built");
    int n = kd_net_num_tensors(self->net);
    PyObject * list = PyList_New(n);
    if (!list) return NULL;
    for (int i = 0; i < n; i++) {
        const struct kd_tensor_info * t = kd_net_tensor(self->net, i);
        PyObject * shape = PyTuple_New(t->ndim);
        if (!shape) { Py_DECREF(list); return NULL; }
        for (int k = 0; k < t->ndim; k++) PyTuple_SET_ITEM(shape, k, PyLong_FromLong(t->shape[k]));
        PyObject * item = Py_BuildValue("(sNOn)", t->name, shape, t->is_buffer ? Py_True : Py_False, (Py_ssize_t)t->offset);
        if (!item) { Py_DECREF(list); return NULL; }
        PyList_SET_ITEM(list, i, item);
    }
    return list;
}

static PyObject * Net_bn_batches(NetObject * self, PyObject * args) {
    int node;
    PyObject * value = Py_None;
    static char * names[] = { "node", "value", NULL };
    if (!PARSE_POS(args, "i|O", names, &node, &value)) return NULL;
    if (!self->net) return PyErr_Format(PyExc_RuntimeError, "the model was not built");
    int64_t * p = kd_net_bn_batches(self->net, node);
    if (!p) return PyErr_Format(PyExc_ValueError, "node %d is not a batchnorm", node);
    if (value != Py_None) {
        if (PyBool_Check(value) || !PyLong_Check(value))
            return PyErr_Format(PyExc_TypeError, "value must be an int, got %s", Py_TYPE(value)->tp_name);
        long long v = PyLong_AsLongLong(value);
        if (v == -1 && PyErr_Occurred()) return NULL;
        if (v < 0) return PyErr_Format(PyExc_ValueError, "value (num_batches_tracked) must be >= 0, got %lld", v);
        *p = v;
    }
    return PyLong_FromLongLong(*p);
}

// shapes(N, C, H, W) -> [(c, h, w) per node]; plans the net for that input.
static PyObject * Net_shapes(NetObject * self, PyObject * args) {
    int N, C, H, W;
    static char * names[] = { "N", "C", "H", "W", NULL };
    if (!PARSE_POS(args, "iiii", names, &N, &C, &H, &W)) return NULL;
    if (net_acquire(self) < 0) return NULL;
    enum kd_status st = kd_net_plan(self->net, N, C, H, W);
    net_release(self);
    if (st != KD_OK) return kd_raise(st);
    int n = kd_net_num_nodes(self->net);
    PyObject * list = PyList_New(n);
    if (!list) return NULL;
    for (int i = 0; i < n; i++) {
        int c, h, w;
        kd_net_node_shape(self->net, i, &c, &h, &w);
        PyList_SET_ITEM(list, i, Py_BuildValue("(iii)", c, h, w));
    }
    return list;
}

static PyObject * Net_set_output(NetObject * self, PyObject * arg) {
    int node;
    if (node_index(self, arg, &node) < 0) return NULL;
    if (net_acquire(self) < 0) return NULL;
    enum kd_status st = kd_net_set_output(self->net, node);
    net_release(self);
    if (st != KD_OK) return kd_raise(st);
    Py_RETURN_NONE;
}

// set_input(node, x): the data of an extra input (a KD_LAYER_INPUT node) for the next
// forwards, (N, C, H, W) or (N, C); or its per-sample shape (C, H, W) only, for shapes().
static PyObject * Net_set_input(NetObject * self, PyObject * args) {
    PyObject * tap, * xo;
    static char * names[] = { "node", "x", NULL };
    if (!PARSE_POS(args, "OO", names, &tap, &xo)) return NULL;
    int node;
    if (node_index(self, tap, &node) < 0) return NULL;
    if (kd_net_node_spec(self->net, node)->type != KD_LAYER_INPUT)
        return PyErr_Format(PyExc_ValueError, "node '%s' is not an input node", kd_net_node_spec(self->net, node)->name);
    if (!self->ext && !(self->ext = PyDict_New())) return NULL;
    PyArrayObject * x = NULL, * dx = NULL;
    int d[4];
    if (PyTuple_Check(xo)) {
        if (!PyArg_ParseTuple(xo, "iii;shape", &d[1], &d[2], &d[3])) return NULL;
    } else {
        if (!(x = get_array(xo, NPY_FLOAT32, "x"))) return NULL;
        if (input_dims(x, "x", d) < 0 || check_finite(x, "x") < 0) { Py_DECREF(x); return NULL; }
        if (!(dx = (PyArrayObject *)PyArray_ZEROS(PyArray_NDIM(x), PyArray_DIMS(x), NPY_FLOAT32, 0))) { Py_DECREF(x); return NULL; }
    }
    if (net_acquire(self) < 0) { Py_XDECREF(x); Py_XDECREF(dx); return NULL; }
    enum kd_status st = kd_net_set_input(self->net, node, x ? PyArray_DATA(x) : NULL, d[1], d[2], d[3],
                                         dx ? PyArray_DATA(dx) : NULL);
    net_release(self);
    if (st != KD_OK) { Py_XDECREF(x); Py_XDECREF(dx); return kd_raise(st); }
    PyObject * key = PyLong_FromLong(node);
    PyObject * val = Py_BuildValue("(NN)", x ? (PyObject *)x : Py_NewRef(Py_None), dx ? (PyObject *)dx : Py_NewRef(Py_None));
    int rc = key && val ? PyDict_SetItem(self->ext, key, val) : -1;
    Py_XDECREF(key); Py_XDECREF(val);
    if (rc < 0) return NULL;
    Py_RETURN_NONE;
}

// input_grad(node): a copy of the gradient w.r.t. an extra input from the last backward.
static PyObject * Net_input_grad(NetObject * self, PyObject * tap) {
    int node;
    if (node_index(self, tap, &node) < 0) return NULL;
    PyObject * key = PyLong_FromLong(node);
    if (!key) return NULL;
    PyObject * val = self->ext ? PyDict_GetItemWithError(self->ext, key) : NULL;
    Py_DECREF(key);
    if (!val || PyTuple_GET_ITEM(val, 1) == Py_None) {
        if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "node '%s' is not an input given data by set_input",
                                            kd_net_node_spec(self->net, node)->name);
        return NULL;
    }
    return PyArray_NewCopy((PyArrayObject *)PyTuple_GET_ITEM(val, 1), NPY_CORDER);
}

static PyMethodDef Net_methods[] = {
    { "set_input", (PyCFunction)Net_set_input, METH_VARARGS, "set_input(node, x): data (or (C, H, W) shape) of an extra input" },
    { "input_grad", (PyCFunction)Net_input_grad, METH_O, "input_grad(node): gradient w.r.t. an extra input (last backward)" },
    { "set_output", (PyCFunction)Net_set_output, METH_O, "set_output(node): which node is the network output" },
    { "forward", (PyCFunction)(void (*)(void))Net_forward, METH_VARARGS | METH_KEYWORDS,
      "forward(x, mode=0, seed=0) -> output (copy); mode: kd_mode flags (1 BN batch stats, 2 dropout, 4 no grad)" },
    { "tap", (PyCFunction)Net_tap, METH_O, "tap(name_or_index) -> copy of that node's output" },
    { "grad_add", (PyCFunction)(void (*)(void))Net_grad_add, METH_VARARGS | METH_KEYWORDS,
      "grad_add(tap, grad, scale=1.0): add to the gradient at a tap before backward" },
    { "backward", (PyCFunction)(void (*)(void))Net_backward, METH_VARARGS | METH_KEYWORDS,
      "backward(dout=None, input_grad=True) -> gradient w.r.t. the input, or None" },
    { "zero_grad", (PyCFunction)Net_zero_grad, METH_NOARGS, "zero the parameter gradients" },
    { "init_params", (PyCFunction)Net_init_params, METH_VARARGS, "init_params(seed)" },
    { "params", (PyCFunction)Net_params, METH_NOARGS, "1-D float32 view of the parameter block" },
    { "grads", (PyCFunction)Net_grads, METH_NOARGS, "1-D float32 view of the gradient block" },
    { "buffers", (PyCFunction)Net_buffers, METH_NOARGS, "1-D float32 view of the buffer block" },
    { "tensors", (PyCFunction)Net_tensors, METH_NOARGS, "[(name, shape, is_buffer, offset)]" },
    { "bn_batches", (PyCFunction)Net_bn_batches, METH_VARARGS, "bn_batches(node[, value]) -> num_batches_tracked" },
    { "shapes", (PyCFunction)Net_shapes, METH_VARARGS, "shapes(N, C, H, W) -> per-node (c, h, w)" },
    { "memory", (PyCFunction)Net_memory, METH_NOARGS, "bytes allocated per block (kd_net_memory)" },
    { "set_chunk", (PyCFunction)Net_set_chunk, METH_VARARGS, "set_chunk(images): chunk of inference forwards (0 = automatic)" },
    { "last_chunk", (PyCFunction)Net_last_chunk, METH_NOARGS, "images per chunk of the last forward (0: not an inference forward)" },
    { NULL, NULL, 0, NULL },
};

static PyTypeObject NetType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kdcore._kdcore.Net",
    .tp_basicsize = sizeof(NetObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A kdcore network (C core). Use kdcore.nn / kdcore.models to build one.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Net_init,
    .tp_dealloc = (destructor)Net_dealloc,
    .tp_methods = Net_methods,
};

// ---------------------------------------------------------------------------------------
// Optimizer

typedef struct {
    PyObject_HEAD
    struct kd_optim * opt;
    NetObject * net;
} OptimObject;

static void Optim_dealloc(OptimObject * self) {
    kd_optim_free(self->opt);
    Py_XDECREF(self->net);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int Optim_init(OptimObject * self, PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "net", "kind", "lr", "momentum", "dampening", "nesterov", "weight_decay",
                               "beta1", "beta2", "eps", "decay_bn_and_bias", NULL };
    PyObject * net;
    struct kd_optim_cfg c;
    memset(&c, 0, sizeof c);
    int kind = 0, nesterov = 0, decay_all = 1;
    if (!PARSE_KW(args, kwds, "O!if|ffpffffp", kwlist, &NetType, &net, &kind, &c.lr,
                                     &c.momentum, &c.dampening, &nesterov, &c.weight_decay, &c.beta1,
                                     &c.beta2, &c.eps, &decay_all))
        return -1;
    if (kind < KD_OPTIM_SGD || kind > KD_OPTIM_ADAMW) { PyErr_Format(PyExc_ValueError, "unknown optimizer kind %d", kind); return -1; }
    if (!((NetObject *)net)->net) { PyErr_SetString(PyExc_RuntimeError, "the model was not built"); return -1; }
    c.kind = (enum kd_optim_kind)kind;
    c.nesterov = nesterov;
    c.no_decay_bn_and_bias = !decay_all;
    struct kd_optim * o = kd_optim_new(((NetObject *)net)->net, &c);
    if (!o) { PyErr_SetString(PyExc_ValueError, kd_last_error()); return -1; }
    kd_optim_free(self->opt);
    Py_XDECREF(self->net);
    self->opt = o;
    self->net = (NetObject *)Py_NewRef(net);
    return 0;
}

static PyObject * Optim_step(OptimObject * self, PyObject * args) {
    float lr;
    static char * names[] = { "lr", NULL };
    if (!PARSE_POS(args, "f", names, &lr)) return NULL;
    if (!self->opt) return PyErr_Format(PyExc_RuntimeError, "optimizer not initialised");
    if (net_acquire(self->net) < 0) return NULL;
    enum kd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = kd_optim_step(self->opt, lr);
    Py_END_ALLOW_THREADS
    net_release(self->net);
    if (st != KD_OK) return kd_raise(st);
    Py_RETURN_NONE;
}

static PyObject * Optim_reset(OptimObject * self, PyObject * Py_UNUSED(i)) {
    if (!self->opt) return PyErr_Format(PyExc_RuntimeError, "optimizer not initialised");
    kd_optim_reset(self->opt);
    Py_RETURN_NONE;
}

static PyObject * Optim_state(OptimObject * self, PyObject * args) {
    int which;
    static char * names[] = { "which", NULL };
    if (!PARSE_POS(args, "i", names, &which)) return NULL;
    if (!self->opt) return PyErr_Format(PyExc_RuntimeError, "optimizer not initialised");
    if (which < 0 || which > 1) return PyErr_Format(PyExc_ValueError, "which must be 0 or 1");
    float * p = kd_optim_state(self->opt, which);
    if (!p) Py_RETURN_NONE;
    npy_intp dims[1] = { (npy_intp)kd_net_num_params(self->net->net) };
    PyObject * a = PyArray_SimpleNewFromData(1, dims, NPY_FLOAT32, p);
    if (!a) return NULL;
    if (PyArray_SetBaseObject((PyArrayObject *)a, Py_NewRef((PyObject *)self)) < 0) { Py_DECREF(a); return NULL; }
    return a;
}

static PyObject * Optim_steps(OptimObject * self, PyObject * args) {
    PyObject * value = Py_None;
    if (!PyArg_ParseTuple(args, "|O", &value)) return NULL;
    if (!self->opt) return PyErr_Format(PyExc_RuntimeError, "optimizer not initialised");
    int64_t * p = kd_optim_steps(self->opt);
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

static PyMethodDef Optim_methods[] = {
    { "step", (PyCFunction)Optim_step, METH_VARARGS, "step(lr): one update from the accumulated gradients" },
    { "reset", (PyCFunction)Optim_reset, METH_NOARGS, "zero the optimizer state" },
    { "state", (PyCFunction)Optim_state, METH_VARARGS, "state(which) -> view of momentum/m (0) or v (1), or None" },
    { "steps", (PyCFunction)Optim_steps, METH_VARARGS, "steps([value]) -> step count" },
    { NULL, NULL, 0, NULL },
};

static PyTypeObject OptimType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kdcore._kdcore.Optimizer",
    .tp_basicsize = sizeof(OptimObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Optimizer state over a Net's parameter block (C core).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Optim_init,
    .tp_dealloc = (destructor)Optim_dealloc,
    .tp_methods = Optim_methods,
};

// ---------------------------------------------------------------------------------------
// Dataset: holds references to the caller's arrays for as long as it lives.

typedef struct {
    PyObject_HEAD
    PyArrayObject * x;
    PyArrayObject * y;
    struct kd_dataset ds;
} DatasetObject;

static void Dataset_dealloc(DatasetObject * self) {
    Py_XDECREF(self->x);
    Py_XDECREF(self->y);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

// Dataset(x, y=None, scale=1.0, mean=(), std=(), num_classes=0)
static int Dataset_init(DatasetObject * self, PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "x", "y", "scale", "mean", "std", "num_classes", NULL };
    PyObject * xo, * yo = Py_None, * mo = NULL, * so = NULL;
    float scale = 1.0f;
    int num_classes = 0;
    if (!PARSE_KW(args, kwds, "O|OfOOi", kwlist, &xo, &yo, &scale, &mo, &so, &num_classes))
        return -1;
    if (!PyArray_Check(xo)) { PyErr_Format(PyExc_TypeError, "x must be a numpy.ndarray, got %s", Py_TYPE(xo)->tp_name); return -1; }
    int xt = PyArray_TYPE((PyArrayObject *)xo);
    if (xt != NPY_UINT8 && xt != NPY_FLOAT32) {
        PyErr_Format(PyExc_TypeError, "x must have dtype uint8 or float32, got %s", dtype_name((PyArrayObject *)xo));
        return -1;
    }
    PyArrayObject * x = get_array(xo, xt, "x");
    PyArrayObject * y = NULL;
    if (!x) return -1;
    int d[4];
    if (input_dims(x, "x", d) < 0) goto fail;
    if (num_classes < 0) { PyErr_Format(PyExc_ValueError, "num_classes must be >= 0, got %d", num_classes); goto fail; }
    if ((!mo || mo == Py_None) != (!so || so == Py_None)) {
        PyErr_SetString(PyExc_ValueError, "mean and std must be given together");
        goto fail;
    }
    if (yo != Py_None) {
        y = get_array(yo, NPY_INT64, "y");
        if (!y) goto fail;
        // A private copy: the labels are range-checked once, so the caller must not change them later.
        Py_SETREF(y, (PyArrayObject *)PyArray_NewCopy(y, NPY_CORDER));
        if (!y) goto fail;
        if (PyArray_NDIM(y) != 1 || PyArray_DIM(y, 0) != d[0]) {
            PyErr_Format(PyExc_ValueError, "y must be 1-D with %d labels (one per sample of x), got shape of %d dims and %zd values",
                         d[0], PyArray_NDIM(y), (Py_ssize_t)PyArray_SIZE(y));
            goto fail;
        }
    }
    struct kd_dataset ds;
    memset(&ds, 0, sizeof ds);
    ds.x = PyArray_DATA(x);
    ds.x_dtype = xt == NPY_UINT8 ? KD_U8 : KD_F32;
    ds.y = y ? PyArray_DATA(y) : NULL;
    ds.n = d[0]; ds.c = d[1]; ds.h = d[2]; ds.w = d[3];
    ds.num_classes = num_classes;
    ds.scale = scale;
    Py_ssize_t nm = 0;
    if (mo && mo != Py_None) {
        PyObject * ms = PySequence_Fast(mo, "mean must be a sequence of floats");
        PyObject * ss = so && so != Py_None ? PySequence_Fast(so, "std must be a sequence of floats") : NULL;
        if (!ms || !ss) {
            Py_XDECREF(ms); Py_XDECREF(ss);
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "mean and std must be given together");
            goto fail;
        }
        nm = PySequence_Fast_GET_SIZE(ms);
        if (nm != d[1] || PySequence_Fast_GET_SIZE(ss) != nm || nm > 4) {
            PyErr_Format(PyExc_ValueError, "mean and std must each have one value per channel (%d, at most 4), got %zd and %zd",
                         d[1], nm, PySequence_Fast_GET_SIZE(ss));
            Py_DECREF(ms); Py_DECREF(ss);
            goto fail;
        }
        for (Py_ssize_t i = 0; i < nm; i++) {
            ds.mean[i] = (float)PyFloat_AsDouble(PySequence_Fast_GET_ITEM(ms, i));
            ds.std[i] = (float)PyFloat_AsDouble(PySequence_Fast_GET_ITEM(ss, i));
        }
        Py_DECREF(ms); Py_DECREF(ss);
        if (PyErr_Occurred()) goto fail;
        ds.normalize = true;
    }
    enum kd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = kd_dataset_check(&ds);
    Py_END_ALLOW_THREADS
    if (st != KD_OK) { kd_raise(st); goto fail; }
    Py_XDECREF(self->x);
    Py_XDECREF(self->y);
    self->x = x;
    self->y = y;
    self->ds = ds;
    return 0;
fail:
    Py_XDECREF(x);
    Py_XDECREF(y);
    return -1;
}

static Py_ssize_t Dataset_sq_len(DatasetObject * self) { return self->ds.n; }
static PySequenceMethods Dataset_as_sequence = { .sq_length = (lenfunc)Dataset_sq_len };

// batch(indices, crop_padding=0, hflip=False, noise_std=0, seed=0) -> float32 (N, C, H, W)
static PyObject * Dataset_batch(DatasetObject * self, PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "indices", "crop_padding", "hflip", "noise_std", "seed", NULL };
    PyObject * io;
    struct kd_augment aug = { 0, false, 0.0f };
    int hflip = 0;
    unsigned long long seed = 0;
    if (!PARSE_KW(args, kwds, "O|ipfK", kwlist, &io, &aug.crop_padding, &hflip, &aug.noise_std, &seed))
        return NULL;
    aug.hflip = hflip;
    if (!self->x) return PyErr_Format(PyExc_RuntimeError, "dataset not initialised");
    PyArrayObject * idx = get_array(io, NPY_INT64, "indices");
    if (!idx) return NULL;
    PyObject * out = NULL;
    npy_intp n = PyArray_SIZE(idx);
    const int64_t * ip = PyArray_DATA(idx);
    if (PyArray_NDIM(idx) != 1 || n == 0 || check_int(n, "indices") < 0) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "indices must be a non-empty 1-D int64 array");
        goto fail;
    }
    for (npy_intp i = 0; i < n; i++)
        if (ip[i] < 0 || ip[i] >= self->ds.n) {
            PyErr_Format(PyExc_ValueError, "indices[%zd] = %lld is outside [0, %d)", (Py_ssize_t)i, (long long)ip[i], self->ds.n);
            goto fail;
        }
    if (aug.crop_padding < 0 || aug.crop_padding > 65536 || !(aug.noise_std >= 0) || !isfinite(aug.noise_std)) {
        err_printf(PyExc_ValueError, "crop_padding (%d) must be in [0, 65536] and noise_std (%g) finite and >= 0",
                     aug.crop_padding, (double)aug.noise_std);
        goto fail;
    }
    npy_intp dims[4] = { n, self->ds.c, self->ds.h, self->ds.w };
    out = PyArray_SimpleNew(4, dims, NPY_FLOAT32);
    if (!out) goto fail;
    Py_BEGIN_ALLOW_THREADS
    kd_data_batch(PyArray_DATA((PyArrayObject *)out), &self->ds, ip, (int)n, &aug, seed);
    Py_END_ALLOW_THREADS
fail:
    Py_DECREF(idx);
    return out;
}

static PyMethodDef Dataset_methods[] = {
    { "batch", (PyCFunction)(void (*)(void))Dataset_batch, METH_VARARGS | METH_KEYWORDS,
      "batch(indices, crop_padding=0, hflip=False, noise_std=0.0, seed=0) -> normalised float32 batch" },
    { NULL, NULL, 0, NULL },
};

static PyTypeObject DatasetType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kdcore._kdcore.Dataset",
    .tp_basicsize = sizeof(DatasetObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Arrays (uint8 or float32 images / features, int64 labels) seen by the C loops.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Dataset_init,
    .tp_dealloc = (destructor)Dataset_dealloc,
    .tp_methods = Dataset_methods,
    .tp_as_sequence = &Dataset_as_sequence,
};

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

static int parse_schedule(PyObject * o, struct kd_schedule * s) {
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

static int check_gamma(float gamma) {
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
        opt_float(&r, "noise_std", &cfg->aug.noise_std) < 0 || opt_i32(&r, "callback_every", &cfg->callback_every) < 0 ||
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
static PyObject * py_train_epoch(PyObject * Py_UNUSED(m), PyObject * args) {
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
static PyObject * py_distill_epoch(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) {
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
static PyObject * py_mutual_epoch(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) {
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
static PyObject * py_slkd_epoch(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) {
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
    struct kd_slkd_cfg c = { 4.0f, 0.1f, 1.0f, 3.0f, 0.5f, 2, false, false, false, 1.0f };
    struct opt_reader r = { sopts, "SLKD", 0 };
    if (opt_float(&r, "T", &c.T) < 0 || opt_float(&r, "alpha", &c.alpha) < 0 || opt_float(&r, "lambda", &c.lambda) < 0 ||
        opt_float(&r, "eta", &c.eta) < 0 || opt_float(&r, "rho", &c.rho) < 0 || opt_bool(&r, "fuse_probs", &c.fuse_probs) < 0 ||
        opt_bool(&r, "sl_grad", &c.sl_grad) < 0 || opt_bool(&r, "sl_frozen", &c.sl_frozen) < 0 ||
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
static PyObject * py_exits_epoch(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) {
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
static PyObject * py_kd_loss(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) {
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
static PyObject * py_soft_loss(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) {
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
static PyObject * py_dkd_loss(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) {
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
static PyObject * py_dist_loss(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) {
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

// mse_loss(student, teacher) -> (loss, dstudent)
static PyObject * py_mse_loss(PyObject * Py_UNUSED(m), PyObject * args) {
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

// tolerant_loss(logits, K) -> (loss, dlogits)
static PyObject * py_tolerant_loss(PyObject * Py_UNUSED(m), PyObject * args) {
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
static PyObject * py_softmax(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) {
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

static PyObject * like(PyArrayObject * a) { return PyArray_SimpleNew(PyArray_NDIM(a), PyArray_DIMS(a), NPY_FLOAT32); }
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
static PyObject * py_at_loss(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) {
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
static PyObject * py_sp_loss(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) { return feat_plain(FEAT_SP, args, kwds); }
static PyObject * py_nst_loss(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) { return feat_plain(FEAT_NST, args, kwds); }
static PyObject * py_pkt_loss(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) { return feat_plain(FEAT_PKT, args, kwds); }

// rkd_loss(s, t, w_dist=25, w_angle=50, grad_teacher=False) -> (loss, ds[, dt], (L_dist, L_angle))
static PyObject * py_rkd_loss(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "s", "t", "w_dist", "w_angle", "grad_teacher", NULL };
    PyObject * so, * to;
    float wd = 25.0f, wa = 50.0f;
    int tg = 0;
    if (!PARSE_KW(args, kwds, "OO|ffp", kwlist, &so, &to, &wd, &wa, &tg)) return NULL;
    return feat_run(FEAT_RKD, so, to, tg, 0, 0, wd, wa);
}

// fsp_loss(s1, s2, t1, t2, grad_teacher=False) -> (loss, ds1, ds2[, dt1, dt2])
static PyObject * py_fsp_loss(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) {
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
static PyObject * py_feat_scratch_bytes(PyObject * Py_UNUSED(m), PyObject * Py_UNUSED(a)) {
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

#define FDATA(o) ((float *)PyArray_DATA((PyArrayObject *)(o)))

// ofd_margin(bn_weight, bn_bias) -> margin (C,)
static PyObject * py_ofd_margin(PyObject * Py_UNUSED(m), PyObject * args) {
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
static PyObject * py_ofd_loss(PyObject * Py_UNUSED(m), PyObject * args) {
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
static PyObject * py_ab_loss(PyObject * Py_UNUSED(m), PyObject * args) {
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
static PyObject * py_ft_loss(PyObject * Py_UNUSED(m), PyObject * args) {
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
static PyObject * py_vid_loss(PyObject * Py_UNUSED(m), PyObject * args) {
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
static PyObject * py_vid_log_scale_init(PyObject * Py_UNUSED(m), PyObject * args) {
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
static int get_embed_pair(PyObject * ao, PyObject * bo, const char * an, const char * bn, PyArrayObject ** a,
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
static PyObject * py_cc_loss(PyObject * Py_UNUSED(m), PyObject * args) {
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
static PyObject * py_hcl_loss(PyObject * Py_UNUSED(m), PyObject * args) {
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

// ---------------------------------------------------------------------------------------
// CRD: memory banks and the contrastive loss (struct kd_crd)

typedef struct {
    PyObject_HEAD
    struct kd_crd * crd;
    int busy;
} CRDObject;

static int crd_acquire(CRDObject * self) {
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

static PyTypeObject CRDType = {
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

// RuntimeError if KDCORE_ISA was refused (kdcore/__init__.py calls it at import).
static PyObject * py_isa_init(PyObject * Py_UNUSED(m), PyObject * Py_UNUSED(a)) {
    if (kd_isa_init() != KD_OK) {
        PyErr_SetString(PyExc_RuntimeError, kd_last_error());
        return NULL;
    }
    Py_RETURN_NONE;
}

// ---------------------------------------------------------------------------------------
// Checkpoints: safetensors files through kdcore/src/checkpoint.c (atomic writer, strict
// reader). kdcore.save / kdcore.load (checkpoint.py) build on these two.

struct jbuf { char * p; size_t n, cap; };

static int jbuf_put(struct jbuf * b, const char * s, size_t n) {
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n + 1) cap *= 2;
        char * q = PyMem_Realloc(b->p, cap);
        if (!q) { PyErr_NoMemory(); return -1; }
        b->p = q;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = '\0';
    return 0;
}

// UTF-8 of a str with no NUL (C strings carry names and metadata). NULL with an exception.
static const char * utf8_no_nul(PyObject * s, const char * what, PyObject * key) {
    Py_ssize_t n;
    const char * u = PyUnicode_AsUTF8AndSize(s, &n);
    if (!u) return NULL;   // lone surrogates: UnicodeEncodeError
    if ((size_t)n != strlen(u)) {
        PyErr_Format(PyExc_ValueError, "%s %R contains a NUL character", what, key);
        return NULL;
    }
    return u;
}

// A JSON string literal: '"', '\' and control characters escaped, other bytes as UTF-8.
static int jbuf_str(struct jbuf * b, const char * u) {
    if (jbuf_put(b, "\"", 1) < 0) return -1;
    for (const char * q = u; *q; q++) {
        unsigned char c = (unsigned char)*q;
        char e[8];
        int r;
        if (c == '"' || c == '\\') { e[0] = '\\'; e[1] = (char)c; r = jbuf_put(b, e, 2); }
        else if (c < 0x20) { snprintf(e, sizeof e, "\\u%04x", c); r = jbuf_put(b, e, 6); }
        else r = jbuf_put(b, q, 1);
        if (r < 0) return -1;
    }
    return jbuf_put(b, "\"", 1);
}

// ckpt_write(path, tensors, metadata=None): tensors is a sequence of (name, ndarray) pairs,
// each array C-contiguous float32, int64 or uint8; metadata a dict str -> str. Atomic.
static PyObject * py_ckpt_write(PyObject * Py_UNUSED(m), PyObject * args) {
    PyObject * path_o, * list_o, * meta_o = Py_None;
    if (!PyArg_ParseTuple(args, "OO|O", &path_o, &list_o, &meta_o)) return NULL;
    PyObject * pathb = NULL, * seq = NULL, * ret = NULL;
    PyObject ** hold = NULL;   // names and arrays, alive while the GIL is released even if
    Py_ssize_t held = 0, n;    // another thread empties the caller's list meanwhile
    struct kd_ckpt_tensor * ts = NULL;
    int64_t * shapes = NULL;
    struct jbuf meta = { NULL, 0, 0 };
    if (!PyUnicode_FSConverter(path_o, &pathb)) return NULL;
    seq = PySequence_Fast(list_o, "tensors must be a sequence of (name, array) pairs");
    if (!seq) goto fail;
    n = PySequence_Fast_GET_SIZE(seq);
    if (n > INT_MAX) { PyErr_Format(PyExc_ValueError, "too many tensors (%zd)", n); goto fail; }
    hold = PyMem_Calloc((size_t)(2 * n + 1), sizeof *hold);
    ts = PyMem_Calloc((size_t)(n + 1), sizeof *ts);
    shapes = PyMem_Calloc((size_t)n * KD_CKPT_MAX_DIMS + 1, sizeof *shapes);
    if (!hold || !ts || !shapes) { PyErr_NoMemory(); goto fail; }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject * item = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            PyErr_Format(PyExc_TypeError, "tensors[%zd] must be a (name, array) pair, got %s", i, Py_TYPE(item)->tp_name);
            goto fail;
        }
        PyObject * name = PyTuple_GET_ITEM(item, 0), * arr = PyTuple_GET_ITEM(item, 1);
        if (!PyUnicode_Check(name)) {
            PyErr_Format(PyExc_TypeError, "tensors[%zd]: the name must be a str, got %s", i, Py_TYPE(name)->tp_name);
            goto fail;
        }
        const char * u = utf8_no_nul(name, "tensor name", name);
        if (!u) goto fail;
        hold[held++] = Py_NewRef(name);
        if (!PyArray_Check(arr)) {
            PyErr_Format(PyExc_TypeError, "tensor %R must be a numpy.ndarray, got %s", name, Py_TYPE(arr)->tp_name);
            goto fail;
        }
        PyArrayObject * a = (PyArrayObject *)arr;
        int type = PyArray_TYPE(a);
        enum kd_ckpt_dtype dt = PyArray_EquivTypenums(type, NPY_FLOAT32) ? KD_CKPT_F32
                              : PyArray_EquivTypenums(type, NPY_INT64) ? KD_CKPT_I64
                              : PyArray_EquivTypenums(type, NPY_UINT8) ? KD_CKPT_U8 : KD_CKPT_DTYPE_COUNT;
        if (dt == KD_CKPT_DTYPE_COUNT || !PyArray_ISNOTSWAPPED(a)) {
            PyErr_Format(PyExc_TypeError, "tensor %R must have dtype float32, int64 or uint8 (native byte order), got %s",
                         name, dtype_name(a));
            goto fail;
        }
        if (!PyArray_IS_C_CONTIGUOUS(a)) {
            PyErr_Format(PyExc_TypeError, "tensor %R must be C-contiguous (numpy.ascontiguousarray makes a copy)", name);
            goto fail;
        }
        if (PyArray_NDIM(a) > KD_CKPT_MAX_DIMS) {
            PyErr_Format(PyExc_ValueError, "tensor %R has %d dimensions, above %d", name, PyArray_NDIM(a), KD_CKPT_MAX_DIMS);
            goto fail;
        }
        hold[held++] = Py_NewRef(arr);
        int64_t * sh = shapes + (size_t)i * KD_CKPT_MAX_DIMS;
        for (int k = 0; k < PyArray_NDIM(a); k++) sh[k] = (int64_t)PyArray_DIM(a, k);
        ts[i] = (struct kd_ckpt_tensor){ u, dt, PyArray_NDIM(a), sh, PyArray_DATA(a) };
    }
    if (meta_o != Py_None) {
        if (!PyDict_Check(meta_o)) {
            PyErr_Format(PyExc_TypeError, "metadata must be a dict of str -> str, got %s", Py_TYPE(meta_o)->tp_name);
            goto fail;
        }
        if (jbuf_put(&meta, "{", 1) < 0) goto fail;
        Py_ssize_t pos = 0;
        PyObject * k, * v;
        while (PyDict_Next(meta_o, &pos, &k, &v)) {
            if (!PyUnicode_Check(k) || !PyUnicode_Check(v)) {
                PyErr_Format(PyExc_TypeError, "metadata must map str to str; %R -> %s", k, Py_TYPE(v)->tp_name);
                goto fail;
            }
            const char * ku = utf8_no_nul(k, "metadata key", k), * vu = ku ? utf8_no_nul(v, "metadata value of", k) : NULL;
            if (!vu || (meta.n > 1 && jbuf_put(&meta, ",", 1) < 0) || jbuf_str(&meta, ku) < 0 ||
                jbuf_put(&meta, ":", 1) < 0 || jbuf_str(&meta, vu) < 0)
                goto fail;
        }
        if (jbuf_put(&meta, "}", 1) < 0) goto fail;
    }
    const char * path = PyBytes_AS_STRING(pathb);
    const char * mj = meta.p;
    enum kd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = kd_ckpt_write(path, ts, (int)n, mj);
    Py_END_ALLOW_THREADS
    if (st != KD_OK) { kd_raise(st); goto fail; }
    ret = Py_NewRef(Py_None);
fail:
    for (Py_ssize_t i = 0; i < held; i++) Py_DECREF(hold[i]);
    PyMem_Free(hold);
    PyMem_Free(ts);
    PyMem_Free(shapes);
    PyMem_Free(meta.p);
    Py_XDECREF(seq);
    Py_XDECREF(pathb);
    return ret;
}

static int ckpt_npy_type(enum kd_ckpt_dtype dt) {
    switch (dt) {
    case KD_CKPT_F32: return NPY_FLOAT32;
    case KD_CKPT_I64: return NPY_INT64;
    case KD_CKPT_U8:  return NPY_UINT8;
    case KD_CKPT_F64: return NPY_FLOAT64;
    case KD_CKPT_F16: return NPY_FLOAT16;
    case KD_CKPT_I32: return NPY_INT32;
    case KD_CKPT_I16: return NPY_INT16;
    case KD_CKPT_I8:  return NPY_INT8;
    case KD_CKPT_U64: return NPY_UINT64;
    case KD_CKPT_U32: return NPY_UINT32;
    case KD_CKPT_U16: return NPY_UINT16;
    case KD_CKPT_DTYPE_COUNT:
    default:          return -1;
    }
}

// ckpt_read(path) -> ({name: ndarray (a copy)}, {key: value}); the file is validated first
// (OSError naming the file and the broken rule).
static PyObject * py_ckpt_read(PyObject * Py_UNUSED(m), PyObject * arg) {
    PyObject * pathb = NULL;
    if (!PyUnicode_FSConverter(arg, &pathb)) return NULL;
    struct kd_ckpt * ck = NULL;
    enum kd_status st;
    const char * path = PyBytes_AS_STRING(pathb);
    Py_BEGIN_ALLOW_THREADS
    st = kd_ckpt_open(path, &ck);
    Py_END_ALLOW_THREADS
    Py_DECREF(pathb);
    if (st != KD_OK) return kd_raise(st);
    int n = kd_ckpt_count(ck);
    PyObject * tensors = PyDict_New(), * meta = PyDict_New(), * ret = NULL;
    void ** dst = PyMem_Calloc((size_t)n + 1, sizeof *dst);
    const void ** src = PyMem_Calloc((size_t)n + 1, sizeof *src);
    size_t * nb = PyMem_Calloc((size_t)n + 1, sizeof *nb);
    if (!tensors || !meta) goto fail;
    if (!dst || !src || !nb) { PyErr_NoMemory(); goto fail; }
    for (int i = 0; i < n; i++) {
        int nd;
        const int64_t * sh = kd_ckpt_shape(ck, i, &nd);
        npy_intp dims[KD_CKPT_MAX_DIMS];
        for (int k = 0; k < nd; k++) dims[k] = (npy_intp)sh[k];
        PyObject * a = PyArray_SimpleNew(nd, dims, ckpt_npy_type(kd_ckpt_dtype_of(ck, i)));
        if (!a) goto fail;
        const char * nm = kd_ckpt_name(ck, i);
        PyObject * key = PyUnicode_DecodeUTF8(nm, (Py_ssize_t)strlen(nm), "strict");
        int r = key ? PyDict_SetItem(tensors, key, a) : -1;
        Py_XDECREF(key);
        Py_DECREF(a);   // the dict holds it
        if (r < 0) goto fail;
        dst[i] = PyArray_DATA((PyArrayObject *)a);
        src[i] = kd_ckpt_data(ck, i, &nb[i]);
    }
    // The arrays are not visible to any other thread yet: fill them without the GIL.
    Py_BEGIN_ALLOW_THREADS
    for (int i = 0; i < n; i++)
        if (nb[i]) memcpy(dst[i], src[i], nb[i]);
    Py_END_ALLOW_THREADS
    for (int i = 0; i < kd_ckpt_meta_count(ck); i++) {
        const char * k = kd_ckpt_meta_key(ck, i), * v = kd_ckpt_meta_value(ck, i);
        PyObject * ko = PyUnicode_DecodeUTF8(k, (Py_ssize_t)strlen(k), "strict");
        PyObject * vo = ko ? PyUnicode_DecodeUTF8(v, (Py_ssize_t)strlen(v), "strict") : NULL;
        int r = vo ? PyDict_SetItem(meta, ko, vo) : -1;
        Py_XDECREF(ko);
        Py_XDECREF(vo);
        if (r < 0) goto fail;
    }
    ret = PyTuple_Pack(2, tensors, meta);
fail:
    Py_XDECREF(tensors);
    Py_XDECREF(meta);
    PyMem_Free(dst);
    PyMem_Free(src);
    PyMem_Free(nb);
    kd_ckpt_close(ck);
    return ret;
}

// ---- the step engine: step_epoch(nets, terms, data, epoch, train_options, monitor=None)

// (net, node) pair; node -1 is the output.
static int parse_ref(PyObject * o, int n_nets, struct kd_ref * r, const char * what) {
    int net, node;
    if (!PyTuple_Check(o) || PyTuple_GET_SIZE(o) != 2 || !PyArg_ParseTuple(o, "ii", &net, &node)) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s must be a pair (net index, node index), got %R", what, o);
        return -1;
    }
    if (net < 0 || net >= n_nets) { PyErr_Format(PyExc_ValueError, "%s refers to net %d (the step has %d)", what, net, n_nets); return -1; }
    r->net = net;
    r->node = node;
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
// salt, role}; terms: list of dicts {kind, name, a: (net, node), src: [(net, node)], w, mix,
// grad, drop, gates, gate_lr, weight, warmup_epochs, stop_epoch, T, alpha, beta, k,
// conditional}; monitor: a dict {src, w, mix} or None. Returns the kd_step_stats as a dict.
static PyObject * py_step_epoch(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "nets", "terms", "data", "epoch", "train", "monitor", "logits_net", NULL };
    PyObject * nets_o, * terms_o, * topts, * mon_o = Py_None;
    DatasetObject * data;
    int epoch, logits_net = 0;
    if (!PARSE_KW(args, kwds, "OOO!iO|Oi", kwlist, &nets_o, &terms_o, &DatasetType, &data, &epoch, &topts, &mon_o,
                  &logits_net))
        return NULL;
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
        long long salt = 0;
        if (opt_i32(&r, "mode", &mode) < 0 || opt_bool(&r, "params_only", &c->params_only) < 0 ||
            opt_bool(&r, "grad_input", &c->grad_input) < 0 || opt_bool(&r, "detach_input", &c->detach_input) < 0 ||
            opt_float(&r, "noise", &c->input_noise) < 0 ||
            opt_float(&r, "lr_scale", &c->lr_scale) < 0 || opt_int(&r, "salt", &salt) < 0 || opt_done(&r) < 0)
            goto done;
        if (mode < 0 || mode > (KD_MODE_TRAIN | KD_MODE_NO_GRAD)) { PyErr_Format(PyExc_ValueError, "nets[%zd]: mode %d is not a kd_mode", i, mode); goto done; }
        c->mode = (unsigned)mode;
        c->salt = (uint64_t)salt;
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
        int form = 0;
        if (tm->kind == KD_TERM_AT && (opt_float(&r, "p", &tm->at.p) < 0 || opt_i32(&r, "form", &form) < 0)) goto done;
        if (tm->kind == KD_TERM_AT) {
            if (form != KD_AT_CODE && form != KD_AT_PAPER) { PyErr_Format(PyExc_ValueError, "terms[%zd]: unknown AT form %d", t, form); goto done; }
            tm->at.form = (enum kd_at_form)form;
        }
        if (tm->kind == KD_TERM_DIST && opt_float(&r, "gamma", &tm->dist.gamma) < 0) goto done;
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
        if (tm->kind == KD_TERM_VID && (opt_i32(&r, "params", &tm->vid.params) < 0 || opt_float(&r, "eps", &tm->vid.eps) < 0))
            goto done;
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
                                .logits_net = logits_net };
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
static int add_enums(PyObject * m) {
    PyObject * kinds = PyDict_New(), * defaults = PyDict_New();
    if (!kinds || !defaults) goto fail;
    for (int k = 0; k < KD_TERM_COUNT; k++) {
        struct kd_term t = kd_term_default((enum kd_term_kind)k);
        PyObject * v = PyLong_FromLong(k);
        PyObject * d = Py_BuildValue("{s:f,s:f,s:f,s:f,s:i}", "weight", (double)t.weight, "T", (double)t.T,
                                     "alpha", (double)t.alpha, "beta", (double)t.beta, "k", t.k);
        if (d && k == KD_TERM_AT) {
            PyObject * x = Py_BuildValue("{s:f,s:i}", "p", (double)t.at.p, "form", (int)t.at.form);
            if (!x || PyDict_Update(d, x) < 0) Py_CLEAR(d);
            Py_XDECREF(x);
        }
        if (d && k == KD_TERM_DIST) {
            PyObject * x = Py_BuildValue("{s:f}", "gamma", (double)t.dist.gamma);
            if (!x || PyDict_Update(d, x) < 0) Py_CLEAR(d);
            Py_XDECREF(x);
        }
        if (d && k == KD_TERM_AB) {
            PyObject * x = Py_BuildValue("{s:f}", "margin", (double)t.ab.margin);
            if (!x || PyDict_Update(d, x) < 0) Py_CLEAR(d);
            Py_XDECREF(x);
        }
        if (d && k == KD_TERM_FT) {
            PyObject * x = Py_BuildValue("{s:i,s:f}", "p1", t.ft.p1, "p2", (double)t.ft.p2);
            if (!x || PyDict_Update(d, x) < 0) Py_CLEAR(d);
            Py_XDECREF(x);
        }
        if (d && k == KD_TERM_VID) {
            PyObject * x = Py_BuildValue("{s:f}", "eps", (double)t.vid.eps);
            if (!x || PyDict_Update(d, x) < 0) Py_CLEAR(d);
            Py_XDECREF(x);
        }
        if (d && k == KD_TERM_RKD) {
            PyObject * x = Py_BuildValue("{s:f,s:f}", "w_dist", (double)t.rkd.w_dist, "w_angle", (double)t.rkd.w_angle);
            if (!x || PyDict_Update(d, x) < 0) Py_CLEAR(d);
            Py_XDECREF(x);
        }
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
    { "train_epoch", (PyCFunction)py_train_epoch, METH_VARARGS, "train_epoch(net, opt, data, epoch, train_options)" },
    { "distill_epoch", (PyCFunction)(void (*)(void))py_distill_epoch, METH_VARARGS | METH_KEYWORDS, "one distillation epoch in C" },
    { "mutual_epoch", (PyCFunction)(void (*)(void))py_mutual_epoch, METH_VARARGS | METH_KEYWORDS, "one deep-mutual-learning epoch in C" },
    { "exits_epoch", (PyCFunction)(void (*)(void))py_exits_epoch, METH_VARARGS | METH_KEYWORDS, "one multi-exit epoch in C" },
    { "slkd_epoch", (PyCFunction)(void (*)(void))py_slkd_epoch, METH_VARARGS | METH_KEYWORDS, "one SLKD epoch in C" },
    { "kd_loss", (PyCFunction)(void (*)(void))py_kd_loss, METH_VARARGS | METH_KEYWORDS, "(loss, dstudent[, dteacher])" },
    { "soft_loss", (PyCFunction)(void (*)(void))py_soft_loss, METH_VARARGS | METH_KEYWORDS, "(loss, dstudent)" },
    { "dkd_loss", (PyCFunction)(void (*)(void))py_dkd_loss, METH_VARARGS | METH_KEYWORDS, "(loss, dstudent, tckd, nckd)" },
    { "mse_loss", (PyCFunction)py_mse_loss, METH_VARARGS, "(loss, dstudent)" },
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
    { "vid_log_scale_init", (PyCFunction)py_vid_log_scale_init, METH_VARARGS, "log(exp(init_var - eps) - 1)" },
    { "cc_loss", (PyCFunction)py_cc_loss, METH_VARARGS, "(loss, dstudent, dteacher)" },
    { "hcl_loss", (PyCFunction)py_hcl_loss, METH_VARARGS, "(loss, dstudent)" },
    { "evaluate", (PyCFunction)(void (*)(void))py_evaluate, METH_VARARGS | METH_KEYWORDS, "batched eval-mode forward" },
    { "dist_loss", (PyCFunction)(void (*)(void))py_dist_loss, METH_VARARGS | METH_KEYWORDS, "DIST loss (kd_loss_dist)" },
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
        PyModule_AddStringConstant(m, "version", KDCORE_VERSION) < 0 || add_enums(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
