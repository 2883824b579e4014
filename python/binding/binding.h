// Internal header of the CPython + NumPy binding (python/binding/*.c, one extension module,
// kdcore._kdcore): what the binding's files share. Not part of any interface.
#ifndef KD_BINDING_H
#define KD_BINDING_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
// One NumPy C-API table for the whole module: module.c imports it, the other files use it.
#define PY_ARRAY_UNIQUE_SYMBOL kdcore_ARRAY_API
#ifndef KD_BINDING_MODULE
#define NO_IMPORT_ARRAY
#endif
#include <numpy/arrayobject.h>

#include <float.h>
#include <math.h>
#include <stdarg.h>
#include <string.h>
#include <strings.h>

#include "kdcore.h"

#define PARSE_KW(a, k, fmt, kwl, ...) \
    (PyArg_ParseTupleAndKeywords(a, k, fmt, kwl, __VA_ARGS__) || (name_parse_error(a, k, fmt, kwl, ""), 0))
#define PARSE_POS(a, fmt, nms, ...) \
    (PyArg_ParseTuple(a, fmt, __VA_ARGS__) || (name_parse_error(a, NULL, fmt, nms, ""), 0))

typedef struct {
    PyObject_HEAD
    struct kd_net * net;
    int busy;        // set under the GIL while a call runs with the GIL released
    int training;
    PyObject * ext;  // extra inputs: dict node -> (x array or None, dx array or None), held
                     // while the C net borrows them (kd_net_set_input)
} NetObject;

typedef struct {
    PyObject_HEAD
    struct kd_optim * opt;
    NetObject * net;
} OptimObject;

typedef struct {
    PyObject_HEAD
    PyArrayObject * x;
    PyArrayObject * y;
    struct kd_dataset ds;
} DatasetObject;

typedef struct {
    PyObject_HEAD
    struct kd_crd * crd;
    int busy;
} CRDObject;


// The data of a float32 array object.
#define FDATA(o) ((float *)PyArray_DATA((PyArrayObject *)(o)))

// common.c
PyObject * kd_raise(enum kd_status st);
PyObject * err_printf(PyObject * type, const char * fmt, ...);
const char * dtype_name(PyArrayObject * a);
PyArrayObject * get_array(PyObject * obj, int type, const char * name);
int check_finite(PyArrayObject * a, const char * name);
int check_int(npy_intp v, const char * name);
void name_parse_error(PyObject * args, PyObject * kwds, const char * fmt, char ** names, const char * prefix);

// objects.c
int net_acquire(NetObject * self);
void net_release(NetObject * self);
int input_dims(PyArrayObject * x, const char * name, int dims[4]);
extern PyTypeObject NetType;
extern PyTypeObject OptimType;
extern PyTypeObject DatasetType;

// objects.c: augmentation helpers
PyObject * py_ra_apply(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds);
PyObject * py_ra_range(PyObject * Py_UNUSED(m), PyObject * args);

// loops.c
int parse_schedule(PyObject * o, struct kd_schedule * s);
int check_gamma(float gamma);
PyObject * py_train_epoch(PyObject * Py_UNUSED(m), PyObject * args);
PyObject * py_distill_epoch(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds);
PyObject * py_mutual_epoch(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds);
PyObject * py_slkd_epoch(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds);
PyObject * py_exits_epoch(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds);
PyObject * py_step_epoch(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds);
PyObject * py_step_batch(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds);

// loss_fns.c
PyObject * py_kd_loss(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds);
PyObject * py_soft_loss(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds);
PyObject * py_dkd_loss(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds);
PyObject * py_dist_loss(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds);
PyObject * py_normkd_loss(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds);
PyObject * py_wttm_loss(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds);
PyObject * py_mlkd_loss(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds);
PyObject * py_ctkd_loss(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds);
PyObject * py_ctkd_loss_rows(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds);
PyObject * py_ctkd_temperature(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds);
PyObject * py_ctkd_lambda(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds);
PyObject * py_mse_loss(PyObject * Py_UNUSED(m), PyObject * args);
PyObject * py_l1_loss(PyObject * Py_UNUSED(m), PyObject * args);
PyObject * py_bce_loss(PyObject * Py_UNUSED(m), PyObject * args);
PyObject * py_tolerant_loss(PyObject * Py_UNUSED(m), PyObject * args);
PyObject * py_softmax(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds);
PyObject * like(PyArrayObject * a);
PyObject * py_at_loss(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds);
PyObject * py_sp_loss(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds);
PyObject * py_nst_loss(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds);
PyObject * py_pkt_loss(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds);
PyObject * py_rkd_loss(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds);
PyObject * py_fsp_loss(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds);
PyObject * py_feat_scratch_bytes(PyObject * Py_UNUSED(m), PyObject * Py_UNUSED(a));
PyObject * py_ofd_margin(PyObject * Py_UNUSED(m), PyObject * args);
PyObject * py_ofd_loss(PyObject * Py_UNUSED(m), PyObject * args);
PyObject * py_ab_loss(PyObject * Py_UNUSED(m), PyObject * args);
PyObject * py_ft_loss(PyObject * Py_UNUSED(m), PyObject * args);
PyObject * py_vid_loss(PyObject * Py_UNUSED(m), PyObject * args);
PyObject * py_bnstat_loss(PyObject * Py_UNUSED(m), PyObject * args);
PyObject * py_tv_loss(PyObject * Py_UNUSED(m), PyObject * args);
PyObject * py_l2prior_loss(PyObject * Py_UNUSED(m), PyObject * args);
PyObject * py_adi_loss(PyObject * Py_UNUSED(m), PyObject * args, PyObject * kwds);
PyObject * py_vid_log_scale_init(PyObject * Py_UNUSED(m), PyObject * args);
int get_embed_pair(PyObject * ao, PyObject * bo, const char * an, const char * bn, PyArrayObject ** a, PyArrayObject ** b);
PyObject * py_cc_loss(PyObject * Py_UNUSED(m), PyObject * args);
PyObject * py_hcl_loss(PyObject * Py_UNUSED(m), PyObject * args);

// crd.c
int crd_acquire(CRDObject * self);
extern PyTypeObject CRDType;

// ckpt.c
PyObject * py_ckpt_write(PyObject * Py_UNUSED(m), PyObject * args);
PyObject * py_ckpt_read(PyObject * Py_UNUSED(m), PyObject * arg);

#endif
