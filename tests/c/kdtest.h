// Minimal C test harness: CHECK counts, check_close prints the first mismatches and the
// max difference (llm.c's check_tensor), and a closing "N passed, N failed" line.
#ifndef KDTEST_H
#define KDTEST_H

#include <math.h>
#include <stdio.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static int kdt_passed = 0, kdt_failed = 0;

#define CHECK(cond, ...) do {                                                   \
    if (cond) { kdt_passed++; }                                                 \
    else { kdt_failed++; printf("FAIL %s:%d: ", __FILE__, __LINE__);            \
           printf(__VA_ARGS__); printf("\n"); }                                 \
} while (0)

// |a-b| <= atol + rtol*|b| elementwise; prints up to 5 offenders.
static int check_close(const char * what, const float * a, const float * b, size_t n,
                       double atol, double rtol) {
    double maxdiff = 0; size_t bad = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (d > maxdiff || isnan(d)) maxdiff = isnan(d) ? INFINITY : d;
        if (!(d <= atol + rtol * fabs((double)b[i]))) {
            if (bad < 5) printf("  %s[%zu]: got %.7g want %.7g\n", what, i, a[i], b[i]);
            bad++;
        }
    }
    if (bad) { kdt_failed++; printf("FAIL %s: %zu/%zu mismatches, maxdiff %.3g\n", what, bad, n, maxdiff); }
    else kdt_passed++;
    return bad == 0;
}

// KDTEST_QUICK=1 (set by `make valgrind`): timing loops inside tests run their code once
// instead of repeating it for a measurement. Every check still runs.
static inline int kdt_quick(void) {
    const char * e = getenv("KDTEST_QUICK");
    return e && *e && strcmp(e, "0") != 0;
}

// Runs one test function and reports its wall time (slow ones under valgrind stand out).
#define KDT_RUN(fn) kdt_run_(#fn, fn)
static inline void kdt_run_(const char * name, void (*fn)(void)) {
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    fn();
    clock_gettime(CLOCK_MONOTONIC, &t1);
    printf("-- %s: %.1f s\n", name, (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec));
    fflush(stdout);
}

static int kdt_finish(void) {
    printf("%d passed, %d failed\n", kdt_passed, kdt_failed);
    return kdt_failed ? 1 : 0;
}

// Deterministic test data in [-1, 1).
static void kdt_fill(float * x, size_t n, uint64_t seed) {
    uint64_t s = seed * 0x9E3779B97F4A7C15ull + 1;
    for (size_t i = 0; i < n; i++) {
        s ^= s << 13; s ^= s >> 7; s ^= s << 17;
        x[i] = (float)((double)(s >> 11) / 9007199254740992.0 * 2.0 - 1.0);
    }
}

#endif
