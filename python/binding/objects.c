// CPython binding of kdcore: The Net, Optimizer and Dataset types.
#include "binding.h"

// ---------------------------------------------------------------------------------------
// Net



int net_acquire(NetObject * self) {
    if (!self->net) { PyErr_SetString(PyExc_RuntimeError, "the model was not built"); return -1; }
    if (self->busy) {
        PyErr_SetString(PyExc_RuntimeError,
                        "this model is in use by another thread; kdcore models are not shared between threads");
        return -1;
    }
    self->busy = 1;
    return 0;
}
void net_release(NetObject * self) { self->busy = 0; }

static void Net_dealloc(NetObject * self) {
    kd_net_free(self->net);
    Py_XDECREF(self->ext);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

// Net(nodes, seed): nodes is a sequence of tuples
// (type, name, inp0, inp1, in_ch, out_ch, kernel, stride, padding, groups, bias, eps, momentum, p, init
//  [, size_h, size_w, slope, affine])
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
        int type, inp0, inp1, in_ch, out_ch, kernel, stride, padding, groups, bias, init, size_h = 0, size_w = 0, affine = 1;
        float slope = 0.01f;
        const char * name;
        float eps, momentum, p;
        static char * node_fields[] = { "type", "name", "inp0", "inp1", "in_ch", "out_ch", "kernel", "stride", "padding",
                                        "groups", "bias", "eps", "momentum", "p", "init", "size_h", "size_w", "slope", "affine",
                                        NULL };
        char prefix[48];
        snprintf(prefix, sizeof prefix, "node %zd: ", i);
        if (!PyTuple_Check(t)) { PyErr_Format(PyExc_TypeError, "node %zd must be a tuple, got %s", i, Py_TYPE(t)->tp_name); goto fail; }
        if (!PyArg_ParseTuple(t, "isiiiiiiiipfffi|iifp;node", &type, &name, &inp0, &inp1, &in_ch, &out_ch,
                              &kernel, &stride, &padding, &groups, &bias, &eps, &momentum, &p, &init, &size_h, &size_w,
                              &slope, &affine)) {
            name_parse_error(t, NULL, "isiiiiiiiipfffi|iifp", node_fields, prefix);
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
        s.size[0] = size_h; s.size[1] = size_w; s.slope = slope; s.affine = affine;
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
int input_dims(PyArrayObject * x, const char * name, int dims[4]) {
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

PyTypeObject NetType = {
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

PyTypeObject OptimType = {
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

// batch(indices, crop_padding=0, hflip=False, noise_std=0, seed=0, randaugment=0) -> float32 (N, C, H, W)
static PyObject * Dataset_batch(DatasetObject * self, PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "indices", "crop_padding", "hflip", "noise_std", "seed", "randaugment", NULL };
    PyObject * io;
    struct kd_augment aug = { 0, false, 0.0f, 0 };
    int hflip = 0;
    unsigned long long seed = 0;
    if (!PARSE_KW(args, kwds, "O|ipfKi", kwlist, &io, &aug.crop_padding, &hflip, &aug.noise_std, &seed, &aug.randaugment))
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
    if (aug.randaugment < 0 || aug.randaugment > 64) {
        err_printf(PyExc_ValueError, "randaugment (%d) must be in [0, 64]", aug.randaugment);
        goto fail;
    }
    npy_intp dims[4] = { n, self->ds.c, self->ds.h, self->ds.w };
    out = PyArray_SimpleNew(4, dims, NPY_FLOAT32);
    if (!out) goto fail;
    enum kd_status st;
    Py_BEGIN_ALLOW_THREADS
    st = kd_data_batch(PyArray_DATA((PyArrayObject *)out), &self->ds, ip, (int)n, &aug, seed);
    Py_END_ALLOW_THREADS
    if (st != KD_OK) { Py_CLEAR(out); kd_raise(st); }
fail:
    Py_DECREF(idx);
    return out;
}

static PyMethodDef Dataset_methods[] = {
    { "batch", (PyCFunction)(void (*)(void))Dataset_batch, METH_VARARGS | METH_KEYWORDS,
      "batch(indices, crop_padding=0, hflip=False, noise_std=0.0, seed=0, randaugment=0) -> normalised float32 batch" },
    { NULL, NULL, 0, NULL },
};

PyTypeObject DatasetType = {
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


// ra_apply(image, op, magnitude, cx=0, cy=0) -> a new float32 (C, H, W) image: one RandAugment
// operation (kd_ra_apply) on a copy of image.
PyObject * py_ra_apply(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds) {
    static char * kwlist[] = { "image", "op", "magnitude", "cx", "cy", NULL };
    PyObject * io;
    int op;
    float mag, cx = 0.0f, cy = 0.0f;
    if (!PARSE_KW(args, kwds, "Oif|ff", kwlist, &io, &op, &mag, &cx, &cy)) return NULL;
    PyArrayObject * img = get_array(io, NPY_FLOAT32, "image");
    if (!img) return NULL;
    PyObject * out = NULL;
    float * tmp = NULL;
    if (PyArray_NDIM(img) != 3 || PyArray_SIZE(img) == 0) {
        PyErr_SetString(PyExc_ValueError, "image must be a non-empty (C, H, W) float32 array");
        goto fail;
    }
    if (check_finite(img, "image") < 0) goto fail;
    if (op < 0 || op >= KD_RA_COUNT) { PyErr_Format(PyExc_ValueError, "op (%d) must be in [0, %d)", op, (int)KD_RA_COUNT); goto fail; }
    if (!isfinite(mag) || !isfinite(cx) || !isfinite(cy)) { PyErr_SetString(PyExc_ValueError, "magnitude, cx and cy must be finite"); goto fail; }
    const npy_intp * d = PyArray_DIMS(img);
    if (check_int(d[0], "image channels") < 0 || check_int(d[1], "image height") < 0 || check_int(d[2], "image width") < 0)
        goto fail;
    out = PyArray_NewCopy(img, NPY_CORDER);
    tmp = malloc((size_t)PyArray_SIZE(img) * sizeof(float));
    if (!out || !tmp) { if (!PyErr_Occurred()) PyErr_NoMemory(); Py_CLEAR(out); goto fail; }
    enum kd_status st = kd_ra_apply(PyArray_DATA((PyArrayObject *)out), (int)d[0], (int)d[1], (int)d[2], op, mag, cx, cy, tmp);
    if (st != KD_OK) { Py_CLEAR(out); kd_raise(st); }
fail:
    free(tmp);
    Py_DECREF(img);
    return out;
}

// ra_range(op) -> (lo, hi): the magnitude range RandAugment draws op's magnitude from.
PyObject * py_ra_range(PyObject * Py_UNUSED(m), PyObject * args) {
    int op;
    if (!PyArg_ParseTuple(args, "i", &op)) return NULL;
    float lo, hi;
    if (kd_ra_range(op, &lo, &hi) != KD_OK) return PyErr_Format(PyExc_ValueError, "op (%d) must be in [0, %d)", op, (int)KD_RA_COUNT);
    return Py_BuildValue("(dd)", (double)lo, (double)hi);
}
