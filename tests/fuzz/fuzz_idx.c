// libFuzzer harness for kd_idx_read (IDX files, plain or gzip).
//
// Each input is read as given (so gzip streams in the corpus exercise zlib's decoder and
// the reader's error paths on corrupt ones). An input that is not gzip is also read after
// compressing it with gzip, and both reads must agree exactly: same status, same ndim,
// dims and bytes. On success the invariants of the API are checked and every byte touched
// (so ASan sees any overrun of the returned buffer).
#include "fuzz_common.h"

#include <zlib.h>

#include "kdcore.h"

struct idx_result {
    enum kd_status st;
    uint8_t * data;
    int ndim;
    int64_t dims[4];
    size_t total;
};

static void read_one(int slot, const uint8_t * bytes, size_t n, struct idx_result * r) {
    char path[64];
    fuzz_memfile(slot, bytes, n, path);
    memset(r, 0, sizeof *r);
    r->st = kd_idx_read(path, &r->data, &r->ndim, r->dims);
    if (r->st != KD_OK) {
        FUZZ_CHECK(r->data == NULL);
        FUZZ_CHECK(*kd_last_error() != '\0');
        return;
    }
    FUZZ_CHECK(r->data != NULL);
    FUZZ_CHECK(r->ndim >= 1 && r->ndim <= 4);
    size_t total = 1;
    for (int d = 0; d < 4; d++) {
        if (d < r->ndim) {
            FUZZ_CHECK(r->dims[d] >= 1);
            total *= (size_t)r->dims[d];
        } else {
            FUZZ_CHECK(r->dims[d] == 0);
        }
    }
    // The payload ends the file, so a plain file is exactly header + payload.
    FUZZ_CHECK(total <= n * 1100 + 64);   // gzip expands at most ~1032:1
    unsigned sum = 0;
    for (size_t i = 0; i < total; i++) sum += r->data[i];
    (void)sum;
    r->total = total;
}

// gzip-compress src into a malloc'd buffer.
static uint8_t * gzip_bytes(const uint8_t * src, size_t n, size_t * out_n) {
    z_stream z;
    memset(&z, 0, sizeof z);
    FUZZ_CHECK(deflateInit2(&z, 6, Z_DEFLATED, 15 + 16, 8, Z_DEFAULT_STRATEGY) == Z_OK);
    size_t cap = deflateBound(&z, (uLong)n) + 32;
    uint8_t * out = malloc(cap);
    FUZZ_CHECK(out != NULL);
    z.next_in = (Bytef *)src;
    z.avail_in = (uInt)n;
    z.next_out = out;
    z.avail_out = (uInt)cap;
    FUZZ_CHECK(deflate(&z, Z_FINISH) == Z_STREAM_END);
    *out_n = cap - z.avail_out;
    deflateEnd(&z);
    return out;
}

int LLVMFuzzerTestOneInput(const uint8_t * data, size_t size) {
    struct idx_result a;
    read_one(0, data, size, &a);
    if (a.st == KD_OK) FUZZ_CHECK(a.total + 4 + 4 * (size_t)a.ndim <= size || (size >= 2 && data[0] == 0x1f && data[1] == 0x8b));
    if (!(size >= 2 && data[0] == 0x1f && data[1] == 0x8b)) {
        size_t zn;
        uint8_t * z = gzip_bytes(data, size, &zn);
        struct idx_result b;
        read_one(1, z, zn, &b);
        free(z);
        // zlib reads a plain file as is, so the gzip'd copy must give the same answer.
        FUZZ_CHECK(a.st == b.st);
        if (a.st == KD_OK) {
            FUZZ_CHECK(a.ndim == b.ndim);
            FUZZ_CHECK(!memcmp(a.dims, b.dims, sizeof a.dims));
            FUZZ_CHECK(a.total == b.total && !memcmp(a.data, b.data, a.total));
            FUZZ_CHECK(a.total + 4 + 4 * (size_t)a.ndim == size);
        }
        kd_free(b.data);
    }
    kd_free(a.data);
    return 0;
}
