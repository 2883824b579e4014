// Errors (thread-local message), thread control and build description.
#include "kd_internal.h"

#include <stdarg.h>
#include <stdio.h>

#include <cblas.h>

static _Thread_local char last_error[512];

enum kd_status kd_set_error_(enum kd_status st, const char * func, const char * fmt, ...) {
    int n = snprintf(last_error, sizeof last_error, "%s: ", func);
    if (n < 0 || (size_t)n >= sizeof last_error) n = 0;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_error + n, sizeof last_error - (size_t)n, fmt, ap);
    va_end(ap);
    return st;
}

const char * kd_last_error(void) { return last_error; }

const char * kd_status_str(enum kd_status st) {
    switch (st) {
    case KD_OK:              return "ok";
    case KD_ERR_NOMEM:       return "out of memory";
    case KD_ERR_SHAPE:       return "shape mismatch";
    case KD_ERR_VALUE:       return "invalid value";
    case KD_ERR_STATE:       return "invalid state";
    case KD_ERR_NONFINITE:   return "non-finite value";
    case KD_ERR_IO:          return "i/o error";
    case KD_ERR_INTERRUPTED: return "interrupted";
    }
    return "unknown status";
}

void kd_set_num_threads(int n) {
    if (n < 1) n = 1;
#ifdef _OPENMP
    omp_set_num_threads(n);
#endif
    // The OpenMP build of OpenBLAS follows omp_set_num_threads; set it explicitly too so
    // a pthreads build (not recommended) does not keep its own count.
    openblas_set_num_threads(n);
}

int kd_get_num_threads(void) { return kd_omp_threads(); }

// Read by the kernels on every call (relaxed atomics: a flag, no ordering needed).
static bool deterministic;

void kd_set_deterministic(bool on) { __atomic_store_n(&deterministic, on, __ATOMIC_RELAXED); }
bool kd_get_deterministic(void) { return __atomic_load_n(&deterministic, __ATOMIC_RELAXED); }

void kd_free(void * p) { free(p); }
