// CPython binding of kdcore: Errors, array arguments and argument parsing shared by every entry point.
#include "binding.h"

// ---------------------------------------------------------------------------------------
// Errors

PyObject * kd_raise(enum kd_status st) {
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
PyObject * err_printf(PyObject * type, const char * fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    PyErr_SetString(type, buf);
    return NULL;
}

const char * dtype_name(PyArrayObject * a) {
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
PyArrayObject * get_array(PyObject * obj, int type, const char * name) {
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

int check_finite(PyArrayObject * a, const char * name) {
    const float * p = PyArray_DATA(a);
    size_t i = kd_first_nonfinite(p, (size_t)PyArray_SIZE(a));
    if (i == SIZE_MAX) return 0;
    PyErr_Format(PyExc_ValueError, "%s contains %s at flat index %zd", name, isnan(p[i]) ? "NaN" : "Inf", (Py_ssize_t)i);
    return -1;
}

int check_int(npy_intp v, const char * name) {
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

void name_parse_error(PyObject * args, PyObject * kwds, const char * fmt, char ** names, const char * prefix) {
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


