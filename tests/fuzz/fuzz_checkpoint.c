// libFuzzer harness for the safetensors reader (kd_ckpt_open and its accessors).
//
// Every input is opened as a file. When the reader accepts it, the API's promises are
// checked: names unique and findable, shapes x dtype == byte counts, tensors tile the data
// section, metadata keys unique; every data byte is touched (ASan sees overruns). Then the
// file is written back with kd_ckpt_write and re-read: the round trip must give the same
// tensors and metadata (the writer's output must pass the strict reader).
#include "fuzz_common.h"

#include <fcntl.h>

#include "kdcore.h"

// A growing string.
struct sb { char * p; size_t n, cap; };

static void sb_reserve(struct sb * b, size_t more) {
    if (b->n + more + 1 <= b->cap) return;
    while (b->cap < b->n + more + 1) b->cap = b->cap ? 2 * b->cap : 256;
    b->p = realloc(b->p, b->cap);
    FUZZ_CHECK(b->p != NULL);
}

static void sb_char(struct sb * b, char c) {
    sb_reserve(b, 1);
    b->p[b->n++] = c;
    b->p[b->n] = '\0';
}

// A JSON string literal for s (valid UTF-8 without NUL: the reader guarantees both).
static void sb_jstr(struct sb * b, const char * s) {
    sb_reserve(b, 6 * strlen(s) + 2);
    sb_char(b, '"');
    for (const unsigned char * q = (const unsigned char *)s; *q; q++) {
        if (*q == '"' || *q == '\\') { sb_char(b, '\\'); sb_char(b, (char)*q); }
        else if (*q < 0x20) { b->n += (size_t)sprintf(b->p + b->n, "\\u%04x", *q); }
        else sb_char(b, (char)*q);
    }
    sb_char(b, '"');
}

// The reader's metadata as the JSON object kd_ckpt_write takes.
static char * metadata_json(const struct kd_ckpt * ck) {
    struct sb b = { 0 };
    sb_char(&b, '{');
    for (int i = 0; i < kd_ckpt_meta_count(ck); i++) {
        if (i) sb_char(&b, ',');
        sb_jstr(&b, kd_ckpt_meta_key(ck, i));
        sb_char(&b, ':');
        sb_jstr(&b, kd_ckpt_meta_value(ck, i));
    }
    sb_char(&b, '}');
    return b.p;
}

static size_t check_reader(const struct kd_ckpt * ck) {
    int n = kd_ckpt_count(ck);
    FUZZ_CHECK(n >= 0);
    size_t total = 0;
    for (int i = 0; i < n; i++) {
        const char * name = kd_ckpt_name(ck, i);
        FUZZ_CHECK(name != NULL && strcmp(name, "__metadata__") != 0);
        FUZZ_CHECK(kd_ckpt_find(ck, name) == i);   // names are unique
        enum kd_ckpt_dtype dt = kd_ckpt_dtype_of(ck, i);
        FUZZ_CHECK((unsigned)dt < KD_CKPT_DTYPE_COUNT);
        int ndim = -1;
        const int64_t * shape = kd_ckpt_shape(ck, i, &ndim);
        FUZZ_CHECK(shape != NULL && ndim >= 0 && ndim <= KD_CKPT_MAX_DIMS);
        size_t numel = 1;
        for (int d = 0; d < ndim; d++) {
            FUZZ_CHECK(shape[d] >= 0);
            FUZZ_CHECK(!__builtin_mul_overflow(numel, (size_t)shape[d], &numel));
        }
        size_t nbytes = (size_t)-1;
        const unsigned char * b = kd_ckpt_data(ck, i, &nbytes);
        FUZZ_CHECK(b != NULL);
        FUZZ_CHECK(nbytes == numel * kd_ckpt_dtype_size(dt));
        unsigned sum = 0;
        for (size_t k = 0; k < nbytes; k++) sum += b[k];
        (void)sum;
        total += nbytes;
    }
    FUZZ_CHECK(kd_ckpt_name(ck, n) == NULL && kd_ckpt_name(ck, -1) == NULL);
    FUZZ_CHECK(kd_ckpt_data(ck, n, NULL) == NULL);
    for (int i = 0; i < kd_ckpt_meta_count(ck); i++) {
        const char * k = kd_ckpt_meta_key(ck, i), * v = kd_ckpt_meta_value(ck, i);
        FUZZ_CHECK(k && v);
        FUZZ_CHECK(kd_ckpt_meta(ck, k) == v);      // keys are unique
    }
    return total;
}

static char out_path[64];

int LLVMFuzzerInitialize(int * argc, char *** argv) {
    // The round trip goes through kd_ckpt_write's atomic path: a real directory, in RAM.
    const char * dir = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
    snprintf(out_path, sizeof out_path, "%s/kdcore-fuzz-%ld.safetensors", dir, (long)getpid());
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    char path[64];
    fuzz_memfile(0, data, size, path);
    struct kd_ckpt * ck = (struct kd_ckpt *)1;
    enum kd_status st = kd_ckpt_open(path, &ck);
    if (st != KD_OK) {
        FUZZ_CHECK(ck == NULL);
        FUZZ_CHECK(*kd_last_error() != '\0');
        return 0;
    }
    size_t total = check_reader(ck);
    FUZZ_CHECK(total <= size);   // the tensors tile the data section

    int n = kd_ckpt_count(ck);
    struct kd_ckpt_tensor * t = calloc((size_t)(n > 0 ? n : 1), sizeof *t);
    FUZZ_CHECK(t != NULL);
    for (int i = 0; i < n; i++) {
        t[i].name = kd_ckpt_name(ck, i);
        t[i].dtype = kd_ckpt_dtype_of(ck, i);
        t[i].shape = kd_ckpt_shape(ck, i, &t[i].ndim);
        t[i].data = kd_ckpt_data(ck, i, NULL);
    }
    char * meta = metadata_json(ck);
    st = kd_ckpt_write(out_path, t, n, meta);
    if (st != KD_OK) {
        // Only a header above the limit may be refused (the reader's limit is the same).
        fprintf(stderr, "kd_ckpt_write refused a file kd_ckpt_open accepted: %s\n", kd_last_error());
        FUZZ_CHECK(0);
    }
    struct kd_ckpt * ck2 = NULL;
    st = kd_ckpt_open(out_path, &ck2);
    if (st != KD_OK) {
        fprintf(stderr, "kd_ckpt_open refused kd_ckpt_write's output: %s\n", kd_last_error());
        FUZZ_CHECK(0);
    }
    unlink(out_path);
    FUZZ_CHECK(check_reader(ck2) == total);
    FUZZ_CHECK(kd_ckpt_count(ck2) == n);
    for (int i = 0; i < n; i++) {
        FUZZ_CHECK(!strcmp(kd_ckpt_name(ck2, i), t[i].name));
        FUZZ_CHECK(kd_ckpt_dtype_of(ck2, i) == t[i].dtype);
        int nd;
        const int64_t * sh = kd_ckpt_shape(ck2, i, &nd);
        FUZZ_CHECK(nd == t[i].ndim && !memcmp(sh, t[i].shape, (size_t)nd * sizeof *sh));
        size_t nb1, nb2;
        const void * d1 = kd_ckpt_data(ck, i, &nb1), * d2 = kd_ckpt_data(ck2, i, &nb2);
        FUZZ_CHECK(nb1 == nb2 && !memcmp(d1, d2, nb1));
    }
    FUZZ_CHECK(kd_ckpt_meta_count(ck2) == kd_ckpt_meta_count(ck));
    for (int i = 0; i < kd_ckpt_meta_count(ck); i++) {
        const char * v = kd_ckpt_meta(ck2, kd_ckpt_meta_key(ck, i));
        FUZZ_CHECK(v && !strcmp(v, kd_ckpt_meta_value(ck, i)));
    }
    kd_ckpt_close(ck2);
    free(meta);
    free(t);
    kd_ckpt_close(ck);
    return 0;
}
