// Tests for checkpoint.c: round trips of every dtype, the writer's argument checks and
// failure cleanup (no temporary file left, old file untouched), one hand-made hostile file
// per reader rule (KD_ERR_IO naming the file and the rule), every truncation of a valid
// file, and a bounded mutation fuzz (anything but a crash; run it under SANITIZE=1).
#include "kdtest.h"

#include "kdcore.h"

#include <dirent.h>
#include <stdbool.h>
#include <sys/stat.h>
#include <unistd.h>

static char dir_[64];

static const char * path_(const char * name) {
    static char buf[8][512];   // dir_ (< 64) + '/' + a file name (<= 255)
    static int k;
    char * b = buf[k++ % 8];
    snprintf(b, sizeof buf[0], "%s/%s", dir_, name);
    return b;
}

static bool contains_(const char * s, const char * sub) { return strstr(s, sub) != NULL; }

// Files in the test directory whose name contains ".tmp." (the writer's temporaries).
static int count_tmp_(void) {
    DIR * d = opendir(dir_);
    if (!d) return -1;
    int n = 0;
    struct dirent * e;
    while ((e = readdir(d)))
        if (strstr(e->d_name, ".tmp.")) n++;
    closedir(d);
    return n;
}

static void put_raw_(const char * path, const void * bytes, size_t n) {
    FILE * f = fopen(path, "wb");
    if (!f) { printf("cannot create %s\n", path); exit(2); }
    if (n) fwrite(bytes, 1, n, f);
    fclose(f);
}

// A file with an explicit header length field, the header text and data bytes.
static void put_file_(const char * path, uint64_t hlen_field, const char * header, const void * data, size_t dn) {
    size_t hl = strlen(header);
    unsigned char * b = malloc(8 + hl + dn + 1);
    for (int k = 0; k < 8; k++) b[k] = (unsigned char)(hlen_field >> (8 * k));
    memcpy(b + 8, header, hl);
    if (dn) memcpy(b + 8 + hl, data, dn);
    put_raw_(path, b, 8 + hl + dn);
    free(b);
}

static void put_(const char * path, const char * header, size_t data_bytes) {
    unsigned char * d = calloc(data_bytes + 1, 1);
    put_file_(path, strlen(header), header, d, data_bytes);
    free(d);
}

static unsigned char * slurp_(const char * path, size_t * n) {
    FILE * f = fopen(path, "rb");
    if (!f) return NULL;
    fseek(f, 0, SEEK_END);
    long sz = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char * b = malloc((size_t)sz + 1);
    *n = fread(b, 1, (size_t)sz, f);
    fclose(f);
    return b;
}

// Opening `path` must fail with KD_ERR_IO, a message naming the file and containing `rule`.
static void expect_refused_(const char * path, const char * rule, int line) {
    struct kd_ckpt * ck = (struct kd_ckpt *)1;
    enum kd_status st = kd_ckpt_open(path, &ck);
    const char * msg = kd_last_error();
    CHECK(st == KD_ERR_IO, "line %d: status %s, want i/o error (%s)", line, kd_status_str(st), msg);
    CHECK(ck == NULL, "line %d: *out not NULL on failure", line);
    CHECK(contains_(msg, path), "line %d: message does not name the file: %s", line, msg);
    CHECK(contains_(msg, rule), "line %d: message does not name the rule '%s': %s", line, rule, msg);
    if (st == KD_OK) kd_ckpt_close(ck);
}
#define REFUSED(path, rule) expect_refused_((path), (rule), __LINE__)

// ---------------------------------------------------------------------------------------

static void test_round_trip(void) {
    enum { NT = KD_CKPT_DTYPE_COUNT };
    struct kd_ckpt_tensor t[NT + 2];
    int64_t shapes[NT + 2][3];
    unsigned char * bufs[NT + 2];
    char names[NT + 2][32];
    for (int i = 0; i < NT; i++) {
        size_t isz = kd_ckpt_dtype_size((enum kd_ckpt_dtype)i);
        shapes[i][0] = 2 + i % 3; shapes[i][1] = 3; shapes[i][2] = 1 + i % 2;
        size_t n = (size_t)(shapes[i][0] * shapes[i][1] * shapes[i][2]) * isz;
        bufs[i] = malloc(n);
        for (size_t k = 0; k < n; k++) bufs[i][k] = (unsigned char)(k * 31 + i * 7 + 1);
        snprintf(names[i], sizeof names[i], "layer%d.%s", i, kd_ckpt_dtype_name((enum kd_ckpt_dtype)i));
        t[i] = (struct kd_ckpt_tensor){ names[i], (enum kd_ckpt_dtype)i, 3, shapes[i], bufs[i] };
    }
    // a scalar and an empty tensor
    int64_t steps = 123456789012345LL;
    t[NT] = (struct kd_ckpt_tensor){ "bn.num_batches_tracked", KD_CKPT_I64, 0, NULL, &steps };
    shapes[NT + 1][0] = 0; shapes[NT + 1][1] = 5;
    t[NT + 1] = (struct kd_ckpt_tensor){ "empty \"quoted\" \\ \xc3\xa9", KD_CKPT_F32, 2, shapes[NT + 1], NULL };
    const char * meta = "{ \"epoch\": \"3\", \"history\": \"{\\\"a\\\": [1, 2]}\", \"unicode\": \"\\u00e9\\ud83d\\ude00\" }";
    const char * p = path_("rt.safetensors");
    enum kd_status st = kd_ckpt_write(p, t, NT + 2, meta);
    CHECK(st == KD_OK, "write: %s", kd_last_error());
    CHECK(count_tmp_() == 0, "temporary files left after a successful write");

    size_t fn;
    unsigned char * raw = slurp_(p, &fn);
    uint64_t hl = 0;
    for (int k = 7; k >= 0; k--) hl = hl << 8 | raw[k];
    CHECK(hl % 8 == 0, "header length %llu is not a multiple of 8", (unsigned long long)hl);
    free(raw);

    struct kd_ckpt * ck = NULL;
    st = kd_ckpt_open(p, &ck);
    CHECK(st == KD_OK && ck, "open: %s", kd_last_error());
    if (!ck) return;
    CHECK(kd_ckpt_count(ck) == NT + 2, "count %d", kd_ckpt_count(ck));
    for (int i = 0; i < NT + 2; i++) {
        CHECK(!strcmp(kd_ckpt_name(ck, i), t[i].name), "name %d: %s", i, kd_ckpt_name(ck, i));
        CHECK(kd_ckpt_find(ck, t[i].name) == i, "find %d", i);
        CHECK(kd_ckpt_dtype_of(ck, i) == t[i].dtype, "dtype %d", i);
        int nd;
        const int64_t * sh = kd_ckpt_shape(ck, i, &nd);
        CHECK(nd == t[i].ndim, "ndim %d: %d", i, nd);
        for (int k = 0; k < nd && k < t[i].ndim; k++) CHECK(sh[k] == t[i].shape[k], "shape %d[%d]", i, k);
        size_t nb;
        const void * d = kd_ckpt_data(ck, i, &nb);
        size_t want = kd_ckpt_dtype_size(t[i].dtype);
        for (int k = 0; k < t[i].ndim; k++) want *= (size_t)t[i].shape[k];
        CHECK(nb == want, "nbytes %d: %zu want %zu", i, nb, want);
        CHECK(nb == 0 || !memcmp(d, t[i].data, nb), "data %d differs", i);
        if (t[i].dtype == KD_CKPT_F32 && nb) check_close(t[i].name, d, t[i].data, nb / 4, 0, 0);
        CHECK((uintptr_t)d % kd_ckpt_dtype_size(t[i].dtype) == 0, "tensor %d is not aligned", i);
    }
    CHECK(kd_ckpt_find(ck, "nope") == -1, "find of an absent name");
    CHECK(kd_ckpt_name(ck, -1) == NULL && kd_ckpt_name(ck, NT + 2) == NULL, "name out of range");
    CHECK(kd_ckpt_meta_count(ck) == 3, "meta count %d", kd_ckpt_meta_count(ck));
    CHECK(kd_ckpt_meta(ck, "epoch") && !strcmp(kd_ckpt_meta(ck, "epoch"), "3"), "meta epoch");
    CHECK(kd_ckpt_meta(ck, "history") && !strcmp(kd_ckpt_meta(ck, "history"), "{\"a\": [1, 2]}"), "meta history");
    CHECK(kd_ckpt_meta(ck, "unicode") && !strcmp(kd_ckpt_meta(ck, "unicode"), "\xc3\xa9\xf0\x9f\x98\x80"),
          "meta unicode: %s", kd_ckpt_meta(ck, "unicode"));
    CHECK(kd_ckpt_meta(ck, "missing") == NULL, "absent meta key");
    kd_ckpt_close(ck);

    // Overwriting replaces the file; no tensors and no metadata is a valid (empty) file.
    st = kd_ckpt_write(p, NULL, 0, NULL);
    CHECK(st == KD_OK, "empty write: %s", kd_last_error());
    st = kd_ckpt_open(p, &ck);
    CHECK(st == KD_OK && kd_ckpt_count(ck) == 0 && kd_ckpt_meta_count(ck) == 0, "empty file: %s", kd_last_error());
    kd_ckpt_close(ck);
    kd_ckpt_close(NULL);
    for (int i = 0; i < NT; i++) free(bufs[i]);
}

// kd_ckpt_write must fail with `want` and a message containing `phrase`.
static void expect_write_fails_(const char * path, const struct kd_ckpt_tensor * t, int n, const char * meta,
                                enum kd_status want, const char * phrase, int line) {
    enum kd_status st = kd_ckpt_write(path, t, n, meta);
    CHECK(st == want && contains_(kd_last_error(), phrase), "line %d: status %s, message '%s', want '%s'", line,
          kd_status_str(st), kd_last_error(), phrase);
}
#define WRITE_FAILS(path, t, n, meta, want, phrase) expect_write_fails_((path), (t), (n), (meta), (want), (phrase), __LINE__)

static void test_writer_errors(void) {
    float x[4] = { 1, 2, 3, 4 };
    int64_t sh[1] = { 4 }, neg[1] = { -1 };
    struct kd_ckpt_tensor a = { "a", KD_CKPT_F32, 1, sh, x };
    const char * p = path_("w.safetensors");
    CHECK(kd_ckpt_write(p, &a, 1, "{\"v\": \"1\"}") == KD_OK, "first write: %s", kd_last_error());

    struct kd_ckpt_tensor two[2] = { a, a };
    WRITE_FAILS(p, two, 2, NULL, KD_ERR_VALUE, "duplicate tensor name 'a'");
    struct kd_ckpt_tensor m = { "__metadata__", KD_CKPT_F32, 1, sh, x };
    WRITE_FAILS(p, &m, 1, NULL, KD_ERR_VALUE, "reserved");
    struct kd_ckpt_tensor bad_utf8 = { "\xff", KD_CKPT_F32, 1, sh, x };
    WRITE_FAILS(p, &bad_utf8, 1, NULL, KD_ERR_VALUE, "UTF-8");
    struct kd_ckpt_tensor n1 = { "n", KD_CKPT_F32, 1, neg, x };
    WRITE_FAILS(p, &n1, 1, NULL, KD_ERR_VALUE, "negative");
    struct kd_ckpt_tensor nul = { "d", KD_CKPT_F32, 1, sh, NULL };
    WRITE_FAILS(p, &nul, 1, NULL, KD_ERR_VALUE, "data is NULL");
    struct kd_ckpt_tensor bd = { "d", KD_CKPT_DTYPE_COUNT, 1, sh, x };
    WRITE_FAILS(p, &bd, 1, NULL, KD_ERR_VALUE, "dtype");
    int64_t big[3] = { INT64_MAX, INT64_MAX, 0 };
    struct kd_ckpt_tensor ov = { "o", KD_CKPT_F32, 3, big, x };
    WRITE_FAILS(p, &ov, 1, NULL, KD_ERR_VALUE, "overflows");
    const char * bad_meta[] = { "[]", "{\"a\": 1}", "{\"a\": \"x\", \"a\": \"y\"}", "{\"a\": \"x\"", "{\"a\": null}" };
    for (int i = 0; i < 5; i++) WRITE_FAILS(p, &a, 1, bad_meta[i], KD_ERR_VALUE, "metadata_json");
    CHECK(kd_ckpt_write(NULL, &a, 1, NULL) == KD_ERR_VALUE, "NULL path");
    CHECK(kd_ckpt_write(p, NULL, 1, NULL) == KD_ERR_VALUE, "NULL tensors");

    // I/O failures: a missing directory, and a target that is a directory (the rename
    // fails after the temporary file is complete, so its cleanup is exercised).
    const char * missing = path_("no/such/dir/x.safetensors");
    WRITE_FAILS(missing, &a, 1, NULL, KD_ERR_IO, "No such file or directory");
    CHECK(contains_(kd_last_error(), missing), "the message does not name the path: %s", kd_last_error());
    const char * d = path_("adir");
    mkdir(d, 0755);
    WRITE_FAILS(d, &a, 1, NULL, KD_ERR_IO, "(renaming the temporary file onto it): Is a directory");
    CHECK(contains_(kd_last_error(), d), "the message does not name the path: %s", kd_last_error());
    CHECK(count_tmp_() == 0, "temporary file left after a failed write");
    rmdir(d);

    // After all the refused writes the first file is intact.
    struct kd_ckpt * ck = NULL;
    CHECK(kd_ckpt_open(p, &ck) == KD_OK && kd_ckpt_count(ck) == 1 && kd_ckpt_meta(ck, "v") &&
          !strcmp(kd_ckpt_meta(ck, "v"), "1"), "original file damaged: %s", kd_last_error());
    kd_ckpt_close(ck);

    // A relative path (no directory part) writes in the current directory.
    char cwd[512];
    if (getcwd(cwd, sizeof cwd) && chdir(dir_) == 0) {
        CHECK(kd_ckpt_write("rel.safetensors", &a, 1, NULL) == KD_OK, "relative path: %s", kd_last_error());
        CHECK(access("rel.safetensors", R_OK) == 0, "relative file missing");
        unlink("rel.safetensors");
        CHECK(chdir(cwd) == 0, "chdir back");
    }
}

static void test_reader_rules(void) {
    const char * p = path_("bad.safetensors");
    const char * ok = "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}";

    // the baseline is valid
    put_(p, ok, 8);
    struct kd_ckpt * ck = NULL;
    CHECK(kd_ckpt_open(p, &ck) == KD_OK, "baseline: %s", kd_last_error());
    kd_ckpt_close(ck);

    REFUSED(path_("missing.safetensors"), "No such file");
    put_raw_(p, "\x10\0\0\0", 4);
    REFUSED(p, "shorter than 8 bytes");
    put_file_(p, 100000001ull, ok, NULL, 0);
    REFUSED(p, "exceeds the limit");
    put_file_(p, UINT64_MAX, ok, NULL, 0);
    REFUSED(p, "exceeds the limit");
    put_file_(p, strlen(ok) + 9, ok, "12345678", 8);
    REFUSED(p, "runs beyond the end of the file");

    // JSON
    const char * not_json[][2] = {
        { "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}", "unexpected end" },
        { "{\"a\":{\"dtype\":\"F32\",\"shape\":[2.0],\"data_offsets\":[0,8]}}", "fraction or exponent" },
        { "{\"a\":{\"dtype\":\"F32\",\"shape\":[-2],\"data_offsets\":[0,8]}}", "negative number" },
        { "{\"a\":{\"dtype\":\"F32\",\"shape\":[02],\"data_offsets\":[0,8]}}", "leading zero" },
        { "{\"a\":{\"dtype\":\"F32\",\"shape\":[18446744073709551616],\"data_offsets\":[0,8]}}", "64 bits" },
        { "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},}", "expected a string key" },
        { "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}} x", "trailing characters" },
        { "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"__metadata__\":null}", "null" },
        { "{\"a\\q\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", "invalid escape" },
        { "{\"a\\u00\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", "invalid \\u escape" },
        { "{\"a\\ud800\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", "lone surrogate" },
        { "{\"a\\u0000\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", "\\u0000" },
        { "{\"a\xc0\x80\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", "invalid UTF-8" },
        { "{\"a\n\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", "control character" },
        { "{'a':{}}", "expected a string key" },
    };
    for (size_t i = 0; i < sizeof not_json / sizeof not_json[0]; i++) {
        put_(p, not_json[i][0], 8);
        REFUSED(p, "not valid JSON");
        REFUSED(p, not_json[i][1]);
    }
    char deep[4096] = "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},\"__metadata__\":{\"x\":";
    for (int k = 0; k < 200; k++) strcat(deep, "[");
    for (int k = 0; k < 200; k++) strcat(deep, "]");
    strcat(deep, "}}");
    put_(p, deep, 8);
    REFUSED(p, "nesting deeper than 8");
    put_(p, "[1, 2]", 0);
    REFUSED(p, "not a JSON object");

    // structure
    put_(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
            "\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[4,8]}}", 8);
    REFUSED(p, "duplicate tensor name 'a'");
    put_(p, "{\"a\":{\"dtype\":\"BF16\",\"shape\":[4],\"data_offsets\":[0,8]}}", 8);
    REFUSED(p, "not in the allow-list");
    put_(p, "{\"a\":{\"dtype\":4,\"shape\":[2],\"data_offsets\":[0,8]}}", 8);
    REFUSED(p, "allow-list");
    put_(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8],\"extra\":1}}", 8);
    REFUSED(p, "exactly dtype, shape and data_offsets");
    put_(p, "{\"a\":{\"dtype\":\"F32\",\"data_offsets\":[0,8]}}", 8);
    REFUSED(p, "exactly dtype, shape and data_offsets");
    put_(p, "{\"a\":[1]}", 8);
    REFUSED(p, "exactly dtype, shape and data_offsets");

    // shapes
    put_(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[\"2\"],\"data_offsets\":[0,8]}}", 8);
    REFUSED(p, "shape must be an array of non-negative integers");
    put_(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":2,\"data_offsets\":[0,8]}}", 8);
    REFUSED(p, "shape must be an array of non-negative integers");
    put_(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[4294967296,4294967296,0],\"data_offsets\":[0,0]}}", 0);
    REFUSED(p, "overflows size_t");
    put_(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[9223372036854775807,2],\"data_offsets\":[0,8]}}", 8);
    REFUSED(p, "overflows size_t");
    put_(p, "{\"a\":{\"dtype\":\"F64\",\"shape\":[2305843009213693952],\"data_offsets\":[0,8]}}", 8);
    REFUSED(p, "overflows size_t");
    put_(p, "{\"a\":{\"dtype\":\"U8\",\"shape\":[1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1,1],"
            "\"data_offsets\":[0,1]}}", 1);
    REFUSED(p, "more than 32");

    // offsets
    put_(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[8,0]}}", 8);
    REFUSED(p, "begin <= end");
    put_(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0]}}", 8);
    REFUSED(p, "begin <= end");
    put_(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8,8]}}", 8);
    REFUSED(p, "begin <= end");
    put_(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 4);
    REFUSED(p, "beyond the data section");
    put_(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[18446744073709551608,18446744073709551615]}}", 8);
    REFUSED(p, "beyond the data section");
    put_(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[3],\"data_offsets\":[0,8]}}", 8);
    REFUSED(p, "span 8 bytes");

    // tiling
    put_(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
            "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12);
    REFUSED(p, "overlap");
    put_(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]},"
            "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8);
    REFUSED(p, "overlap");
    put_(p, "{\"a\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[4,4]},"
            "\"b\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8);
    REFUSED(p, "overlap");
    put_(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 12);
    REFUSED(p, "bytes [8, 12) of the data section are not covered");
    put_(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]}}", 12);
    REFUSED(p, "bytes [0, 4) of the data section are not covered");
    put_(p, "{\"a\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
            "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[8,12]}}", 12);
    REFUSED(p, "bytes [4, 8) of the data section are not covered");
    put_(p, "{}", 4);
    REFUSED(p, "not covered");

    // metadata
    put_(p, "{\"__metadata__\":{\"a\":1},\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8);
    REFUSED(p, "__metadata__ must be an object of strings");
    put_(p, "{\"__metadata__\":[\"a\"],\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,8]}}", 8);
    REFUSED(p, "__metadata__ must be an object of strings");
    put_(p, "{\"__metadata__\":{\"a\":\"1\",\"a\":\"2\"}}", 0);
    REFUSED(p, "duplicate key 'a'");
    put_(p, "{\"__metadata__\":{\"a\":\"1\"},\"__metadata__\":{}}", 0);
    REFUSED(p, "duplicate tensor name '__metadata__'");

    // accepted edge cases: whitespace, escapes, zero-size tensors at the boundary, the
    // metadata alone
    put_(p, " \t\r\n{ \"z\" : { \"dtype\" : \"U8\" , \"shape\" : [ 0 ] , \"data_offsets\" : [ 8 , 8 ] } ,"
            "\"a\\/\\u00e9\" : {\"shape\":[2],\"data_offsets\":[0,8],\"dtype\":\"F32\"} }   ", 8);
    ck = NULL;
    CHECK(kd_ckpt_open(p, &ck) == KD_OK && kd_ckpt_find(ck, "a/\xc3\xa9") == 1, "edge cases: %s", kd_last_error());
    kd_ckpt_close(ck);

    // a directory is not a checkpoint
    REFUSED(dir_, "not a regular file");
}

// Every proper prefix of a valid file is refused (a write cut short).
static void test_truncation(void) {
    float x[6] = { 1, 2, 3, 4, 5, 6 };
    int64_t sh[2] = { 2, 3 };
    struct kd_ckpt_tensor a = { "w", KD_CKPT_F32, 2, sh, x };
    const char * p = path_("full.safetensors"), * q = path_("cut.safetensors");
    CHECK(kd_ckpt_write(p, &a, 1, "{\"epoch\":\"1\"}") == KD_OK, "write: %s", kd_last_error());
    size_t n;
    unsigned char * b = slurp_(p, &n);
    int refused = 0;
    for (size_t k = 0; k < n; k++) {
        put_raw_(q, b, k);
        struct kd_ckpt * ck = NULL;
        if (kd_ckpt_open(q, &ck) == KD_ERR_IO) refused++;
        kd_ckpt_close(ck);
    }
    CHECK(refused == (int)n, "%d of %zu truncations refused", refused, n);
    free(b);
}

// Random byte flips, insertions and truncations of a valid file: each open either succeeds
// (and every accessor works) or fails cleanly. Mostly useful under SANITIZE=1.
static void test_mutation_fuzz(void) {
    float x[8];
    int64_t i64[3] = { 7, 8, 9 };
    unsigned char u8[5] = { 1, 2, 3, 4, 5 };
    int64_t s1[2] = { 2, 4 }, s2[1] = { 3 }, s3[1] = { 5 };
    kdt_fill(x, 8, 3);
    struct kd_ckpt_tensor t[3] = { { "w", KD_CKPT_F32, 2, s1, x }, { "steps", KD_CKPT_I64, 1, s2, i64 },
                                   { "u", KD_CKPT_U8, 1, s3, u8 } };
    const char * p = path_("seed.safetensors"), * q = path_("mut.safetensors");
    CHECK(kd_ckpt_write(p, t, 3, "{\"k\":\"v\"}") == KD_OK, "write: %s", kd_last_error());
    size_t n;
    unsigned char * b = slurp_(p, &n);
    unsigned char * m = malloc(n + 16);
    uint64_t s = 0x9E3779B97F4A7C15ull;
    int ok = 0, io = 0, other = 0;
    for (int it = 0; it < 3000; it++) {
        memcpy(m, b, n);
        size_t len = n;
        int edits = 1 + (int)(s % 4);
        for (int e = 0; e < edits; e++) {
            s ^= s << 13; s ^= s >> 7; s ^= s << 17;
            size_t at = (size_t)(s >> 8) % len;
            switch ((s >> 3) % 4) {
            case 0: m[at] = (unsigned char)(s >> 40); break;                           // random byte
            case 1: m[at] = "{}[]\",:0123456789 -\\u"[(s >> 20) % 22]; break;         // JSON-ish byte
            case 2: m[at] ^= (unsigned char)(1u << ((s >> 30) % 8)); break;           // bit flip
            default: if (len > 9) len -= 1 + (size_t)(s >> 50) % 4; break;             // truncate
            }
        }
        put_raw_(q, m, len);
        struct kd_ckpt * ck = NULL;
        enum kd_status st = kd_ckpt_open(q, &ck);
        if (st == KD_OK) {
            ok++;
            for (int i = 0; i < kd_ckpt_count(ck); i++) {
                int nd;
                size_t nb;
                const int64_t * sh = kd_ckpt_shape(ck, i, &nd);
                const unsigned char * d = kd_ckpt_data(ck, i, &nb);
                volatile unsigned sum = 0;
                for (size_t k = 0; k < nb; k++) sum += d[k];
                for (int k = 0; k < nd; k++) sum += (unsigned)sh[k];
                (void)strlen(kd_ckpt_name(ck, i));
            }
            for (int i = 0; i < kd_ckpt_meta_count(ck); i++)
                (void)(strlen(kd_ckpt_meta_key(ck, i)) + strlen(kd_ckpt_meta_value(ck, i)));
        } else if (st == KD_ERR_IO) io++;
        else other++;
        kd_ckpt_close(ck);
    }
    CHECK(other == 0, "%d mutated files gave a status other than ok / i/o error", other);
    CHECK(io > 1500, "only %d of 3000 mutated files were refused", io);
    printf("  fuzz: %d accepted (data bytes changed), %d refused\n", ok, io);
    free(m);
    free(b);
}

int main(void) {
    snprintf(dir_, sizeof dir_, "/tmp/kdckpt.XXXXXX");
    if (!mkdtemp(dir_)) { printf("mkdtemp failed\n"); return 2; }
    test_round_trip();
    test_writer_errors();
    test_reader_rules();
    test_truncation();
    test_mutation_fuzz();
    CHECK(count_tmp_() == 0, "temporary files left in %s", dir_);
    // clean up the test directory
    DIR * d = opendir(dir_);
    struct dirent * e;
    while (d && (e = readdir(d)))
        if (e->d_name[0] != '.') unlink(path_(e->d_name));
    if (d) closedir(d);
    rmdir(dir_);
    return kdt_finish();
}
