// CPython binding of kdcore: Checkpoints: the safetensors writer and reader.
#include "binding.h"

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
PyObject * py_ckpt_write(PyObject * Py_UNUSED(m), PyObject * args) {
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
PyObject * py_ckpt_read(PyObject * Py_UNUSED(m), PyObject * arg) {
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

