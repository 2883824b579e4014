// Checkpoints in the safetensors format: an atomic writer and a strict reader.
//
// Layout (https://github.com/huggingface/safetensors): an 8-byte little-endian header length
// N, N bytes of JSON, then the data section. The JSON maps each tensor name to
// {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]} (offsets relative to the
// data section) and may hold "__metadata__": {string: string}.
//
// The reader treats every file as hostile: each size is checked before it is used, the
// header goes through a small strict JSON parser (objects, arrays, strings, non-negative
// integers; nothing else), and the tensors must tile the data section exactly, as
// safetensors' own validation demands (no overlap, full coverage, offsets matching shape x
// dtype). The writer never leaves a half-written file under the target's name.
#include "kd_internal.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "checkpoint.c copies tensor bytes as they are in memory, and safetensors is little-endian"
#endif

// Offsets and shapes are uint64 in the format; size_t holds them all only on 64-bit targets.
_Static_assert(sizeof(size_t) == 8, "checkpoint.c assumes a 64-bit size_t");

#define JSON_MAX_DEPTH  8            // safetensors needs 3: file object, entry object, shape array
#define JSON_MAX_VALUES (1 << 22)    // bounds the parser's memory (~128 MB) whatever a header holds

static const struct { const char * name; size_t size; } dtype_info_[KD_CKPT_DTYPE_COUNT] = {
    [KD_CKPT_F32] = { "F32", 4 }, [KD_CKPT_I64] = { "I64", 8 }, [KD_CKPT_U8] = { "U8", 1 },
    [KD_CKPT_F64] = { "F64", 8 }, [KD_CKPT_F16] = { "F16", 2 }, [KD_CKPT_I32] = { "I32", 4 },
    [KD_CKPT_I16] = { "I16", 2 }, [KD_CKPT_I8] = { "I8", 1 },  [KD_CKPT_U64] = { "U64", 8 },
    [KD_CKPT_U32] = { "U32", 4 }, [KD_CKPT_U16] = { "U16", 2 },
};
#define ALLOW_LIST "F32, I64, U8, F64, F16, I32, I16, I8, U64, U32, U16"

const char * kd_ckpt_dtype_name(enum kd_ckpt_dtype dtype) {
    return (unsigned)dtype < KD_CKPT_DTYPE_COUNT ? dtype_info_[dtype].name : NULL;
}

size_t kd_ckpt_dtype_size(enum kd_ckpt_dtype dtype) {
    return (unsigned)dtype < KD_CKPT_DTYPE_COUNT ? dtype_info_[dtype].size : 0;
}

static int cmp_str_(const void * a, const void * b) {
    return strcmp(*(const char * const *)a, *(const char * const *)b);
}

// Length of the valid UTF-8 sequence at s (n bytes available), or 0 if it is invalid:
// truncated, overlong, a surrogate or above U+10FFFF (RFC 3629), as serde_json refuses them.
static size_t utf8_len_(const unsigned char * s, size_t n) {
    unsigned c = s[0];
    if (c < 0x80) return 1;
    size_t len;
    uint32_t cp, min;
    if ((c & 0xE0) == 0xC0)      { len = 2; cp = c & 0x1F; min = 0x80; }
    else if ((c & 0xF0) == 0xE0) { len = 3; cp = c & 0x0F; min = 0x800; }
    else if ((c & 0xF8) == 0xF0) { len = 4; cp = c & 0x07; min = 0x10000; }
    else return 0;
    if (len > n) return 0;
    for (size_t k = 1; k < len; k++) {
        if ((s[k] & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (s[k] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
    return len;
}

static bool utf8_valid_(const char * s) {
    const unsigned char * u = (const unsigned char *)s;
    size_t n = strlen(s);
    for (size_t i = 0; i < n;) {
        size_t len = utf8_len_(u + i, n - i);
        if (!len) return false;
        i += len;
    }
    return true;
}

// ---------------------------------------------------------------------------------------
// A strict JSON parser for the subset safetensors uses. Values become nodes in one array
// (indices, not pointers, so growing it is safe); strings are decoded into one pool, which
// never needs more than the text's length + 1 bytes (a decoded string plus its NUL is
// shorter than its quoted source).

enum jkind { J_OBJ, J_ARR, J_STR, J_INT };

struct jnode {
    uint64_t num;            // J_INT: the value; J_STR: offset of the string in the pool
    uint32_t key;            // members of objects: offset of the member name in the pool
    uint32_t pos;            // byte offset in the text (messages)
    int32_t  first, next;    // children of objects/arrays as a list; -1 ends it
    int32_t  count;
    uint8_t  kind;
};

struct jparser {
    const unsigned char * s;
    size_t n, i;
    struct jnode * nodes;
    int32_t nn, cap;
    char * pool;
    size_t pool_len;
    const char * err;        // first failure (a static string) and where it happened
    size_t err_pos;
    bool nomem;
};

static int jfail_(struct jparser * p, const char * why) {
    if (!p->err) { p->err = why; p->err_pos = p->i; }
    return -1;
}

static void jws_(struct jparser * p) {
    while (p->i < p->n && (p->s[p->i] == ' ' || p->s[p->i] == '\t' || p->s[p->i] == '\n' || p->s[p->i] == '\r'))
        p->i++;
}

static int32_t jnew_(struct jparser * p, enum jkind kind) {
    if (p->nn >= JSON_MAX_VALUES) return jfail_(p, "more than 4194304 JSON values");
    if (p->nn == p->cap) {
        int32_t cap = p->cap ? (p->cap > JSON_MAX_VALUES / 2 ? JSON_MAX_VALUES : 2 * p->cap) : 64;
        struct jnode * nodes = realloc(p->nodes, (size_t)cap * sizeof *nodes);
        if (!nodes) { p->nomem = true; return jfail_(p, "out of memory"); }
        p->nodes = nodes;
        p->cap = cap;
    }
    struct jnode * nd = &p->nodes[p->nn];
    memset(nd, 0, sizeof *nd);
    nd->kind = (uint8_t)kind;
    nd->first = nd->next = -1;
    nd->key = UINT32_MAX;
    nd->pos = (uint32_t)p->i;
    return p->nn++;
}

static int hex4_(const unsigned char * s, uint32_t * out) {
    uint32_t v = 0;
    for (int k = 0; k < 4; k++) {
        unsigned c = s[k];
        unsigned d = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10
                   : c >= 'A' && c <= 'F' ? c - 'A' + 10 : 16;
        if (d == 16) return -1;
        v = v << 4 | d;
    }
    *out = v;
    return 0;
}

static void put_utf8_(struct jparser * p, uint32_t cp) {
    char * o = p->pool + p->pool_len;
    if (cp < 0x80) { o[0] = (char)cp; p->pool_len += 1; }
    else if (cp < 0x800) { o[0] = (char)(0xC0 | cp >> 6); o[1] = (char)(0x80 | (cp & 0x3F)); p->pool_len += 2; }
    else if (cp < 0x10000) {
        o[0] = (char)(0xE0 | cp >> 12); o[1] = (char)(0x80 | (cp >> 6 & 0x3F)); o[2] = (char)(0x80 | (cp & 0x3F));
        p->pool_len += 3;
    } else {
        o[0] = (char)(0xF0 | cp >> 18); o[1] = (char)(0x80 | (cp >> 12 & 0x3F));
        o[2] = (char)(0x80 | (cp >> 6 & 0x3F)); o[3] = (char)(0x80 | (cp & 0x3F));
        p->pool_len += 4;
    }
}

// The string starting at p->i (a '"'), decoded into the pool; returns its offset or -1.
static int64_t jstring_(struct jparser * p) {
    p->i++;
    size_t start = p->pool_len;
    for (;;) {
        if (p->i >= p->n) return jfail_(p, "unterminated string");
        unsigned char c = p->s[p->i];
        if (c == '"') { p->i++; break; }
        if (c < 0x20) return jfail_(p, "control character in a string");
        if (c >= 0x80) {
            size_t len = utf8_len_(p->s + p->i, p->n - p->i);
            if (!len) return jfail_(p, "invalid UTF-8 in a string");
            memcpy(p->pool + p->pool_len, p->s + p->i, len);
            p->pool_len += len;
            p->i += len;
            continue;
        }
        if (c != '\\') { p->pool[p->pool_len++] = (char)c; p->i++; continue; }
        if (p->i + 1 >= p->n) return jfail_(p, "unterminated string");
        char out;
        switch (p->s[p->i + 1]) {
        case '"':  out = '"'; break;
        case '\\': out = '\\'; break;
        case '/':  out = '/'; break;
        case 'b':  out = '\b'; break;
        case 'f':  out = '\f'; break;
        case 'n':  out = '\n'; break;
        case 'r':  out = '\r'; break;
        case 't':  out = '\t'; break;
        case 'u': {
            uint32_t cp, lo;
            if (p->n - p->i < 6 || hex4_(p->s + p->i + 2, &cp) < 0) return jfail_(p, "invalid \\u escape");
            size_t used = 6;
            if (cp >= 0xDC00 && cp <= 0xDFFF) return jfail_(p, "lone surrogate in a \\u escape");
            if (cp >= 0xD800 && cp <= 0xDBFF) {
                if (p->n - p->i < 12 || p->s[p->i + 6] != '\\' || p->s[p->i + 7] != 'u' ||
                    hex4_(p->s + p->i + 8, &lo) < 0 || lo < 0xDC00 || lo > 0xDFFF)
                    return jfail_(p, "lone surrogate in a \\u escape");
                cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                used = 12;
            }
            // Strings are handed out as C strings, so an embedded NUL would silently cut them.
            if (cp == 0) return jfail_(p, "\\u0000 in a string");
            put_utf8_(p, cp);
            p->i += used;
            continue;
        }
        default: return jfail_(p, "invalid escape in a string");
        }
        p->pool[p->pool_len++] = out;
        p->i += 2;
    }
    p->pool[p->pool_len++] = '\0';
    return (int64_t)start;
}

static int jnumber_(struct jparser * p, uint64_t * out) {
    if (p->s[p->i] == '-') return jfail_(p, "negative number (only non-negative integers are accepted)");
    if (p->s[p->i] == '0' && p->i + 1 < p->n && p->s[p->i + 1] >= '0' && p->s[p->i + 1] <= '9')
        return jfail_(p, "integer with a leading zero");
    uint64_t v = 0;
    while (p->i < p->n && p->s[p->i] >= '0' && p->s[p->i] <= '9') {
        unsigned d = p->s[p->i] - '0';
        if (v > (UINT64_MAX - d) / 10) return jfail_(p, "integer does not fit in 64 bits");
        v = v * 10 + d;
        p->i++;
    }
    if (p->i < p->n && (p->s[p->i] == '.' || p->s[p->i] == 'e' || p->s[p->i] == 'E'))
        return jfail_(p, "fraction or exponent (only integers are accepted)");
    *out = v;
    return 0;
}

static int32_t jvalue_(struct jparser * p, int depth) {
    jws_(p);
    if (p->i >= p->n) return jfail_(p, "unexpected end of the header");
    unsigned char c = p->s[p->i];
    if (c == '{' || c == '[') {
        if (depth >= JSON_MAX_DEPTH) return jfail_(p, "nesting deeper than 8 levels");
        bool obj = c == '{';
        unsigned char close = obj ? '}' : ']';
        int32_t me = jnew_(p, obj ? J_OBJ : J_ARR);
        if (me < 0) return -1;
        p->i++;
        jws_(p);
        if (p->i < p->n && p->s[p->i] == close) { p->i++; return me; }
        int32_t last = -1;
        for (;;) {
            uint32_t key = UINT32_MAX;
            if (obj) {
                jws_(p);
                if (p->i >= p->n || p->s[p->i] != '"') return jfail_(p, "expected a string key");
                int64_t k = jstring_(p);
                if (k < 0) return -1;
                key = (uint32_t)k;
                jws_(p);
                if (p->i >= p->n || p->s[p->i] != ':') return jfail_(p, "expected ':'");
                p->i++;
            }
            int32_t child = jvalue_(p, depth + 1);
            if (child < 0) return -1;
            p->nodes[child].key = key;
            if (last < 0) p->nodes[me].first = child;
            else p->nodes[last].next = child;
            last = child;
            p->nodes[me].count++;
            jws_(p);
            if (p->i >= p->n) return jfail_(p, "unexpected end of the header");
            if (p->s[p->i] == ',') { p->i++; continue; }
            if (p->s[p->i] == close) { p->i++; return me; }
            return jfail_(p, obj ? "expected ',' or '}'" : "expected ',' or ']'");
        }
    }
    if (c == '"') {
        int32_t me = jnew_(p, J_STR);
        if (me < 0) return -1;
        int64_t off = jstring_(p);
        if (off < 0) return -1;
        p->nodes[me].num = (uint64_t)off;
        return me;
    }
    if (c == '-' || (c >= '0' && c <= '9')) {
        int32_t me = jnew_(p, J_INT);
        if (me < 0) return -1;
        uint64_t v;
        if (jnumber_(p, &v) < 0) return -1;
        p->nodes[me].num = v;
        return me;
    }
    if (c == 't' || c == 'f' || c == 'n') return jfail_(p, "true, false and null are not used by safetensors");
    return jfail_(p, "unexpected character");
}

// Parses text[0..n); the root is node 0. Returns 0, or -1 with p->err (p->nomem if it was
// an allocation). jfree_ in both cases.
static int jparse_(struct jparser * p, const char * text, size_t n) {
    memset(p, 0, sizeof *p);
    p->s = (const unsigned char *)text;
    p->n = n;
    p->pool = malloc(n + 1);
    if (!p->pool) { p->nomem = true; return jfail_(p, "out of memory"); }
    if (jvalue_(p, 0) < 0) return -1;
    jws_(p);
    if (p->i != p->n) return jfail_(p, "trailing characters after the JSON value");
    return 0;
}

static void jfree_(struct jparser * p) {
    free(p->nodes);
    free(p->pool);
    p->nodes = NULL;
    p->pool = NULL;
}

static const char * jstr_(const struct jparser * p, int32_t node) { return p->pool + p->nodes[node].num; }
static const char * jkey_(const struct jparser * p, int32_t node) { return p->pool + p->nodes[node].key; }

// ---------------------------------------------------------------------------------------
// Reader

struct ckpt_entry {
    const char * name;       // in the pool
    enum kd_ckpt_dtype dtype;
    int ndim;
    size_t shape_at;         // first dimension in kd_ckpt.shapes
    size_t begin, end;       // bytes of the data section
};

struct kd_ckpt {
    char * pool;             // the parser's string pool: names, metadata keys and values
    struct ckpt_entry * t;
    int n;
    int64_t * shapes;
    const char ** meta;      // key, value, key, value, ...
    int n_meta;
    unsigned char * data;    // the data section, 64-byte aligned
    size_t data_size;
};

#define OPEN_FAIL_(...) return kd_set_error_(KD_ERR_IO, "kd_ckpt_open", __VA_ARGS__)
#define ENTRY_RULE "must be an object with exactly dtype, shape and data_offsets"

static enum kd_status parse_entry_(struct kd_ckpt * ck, struct ckpt_entry * e, const struct jparser * p,
                                   int32_t node, const char * path) {
    const char * name = e->name;
    const struct jnode * en = &p->nodes[node];
    if (en->kind != J_OBJ) OPEN_FAIL_("'%s': tensor '%s': the entry " ENTRY_RULE, path, name);
    int32_t jd = -1, js = -1, jo = -1;
    for (int32_t c = en->first; c >= 0; c = p->nodes[c].next) {
        const char * k = jkey_(p, c);
        int32_t * slot = !strcmp(k, "dtype") ? &jd : !strcmp(k, "shape") ? &js : !strcmp(k, "data_offsets") ? &jo : NULL;
        if (!slot) OPEN_FAIL_("'%s': tensor '%s': unknown key '%s' (the entry " ENTRY_RULE ")", path, name, k);
        if (*slot >= 0) OPEN_FAIL_("'%s': tensor '%s': key '%s' given twice (the entry " ENTRY_RULE ")", path, name, k);
        *slot = c;
    }
    if (jd < 0 || js < 0 || jo < 0)
        OPEN_FAIL_("'%s': tensor '%s': no '%s' (the entry " ENTRY_RULE ")", path, name,
                   jd < 0 ? "dtype" : js < 0 ? "shape" : "data_offsets");

    if (p->nodes[jd].kind != J_STR)
        OPEN_FAIL_("'%s': tensor '%s': dtype is not a string from the allow-list (" ALLOW_LIST ")", path, name);
    const char * dt = jstr_(p, jd);
    int d = 0;
    while (d < KD_CKPT_DTYPE_COUNT && strcmp(dtype_info_[d].name, dt) != 0) d++;
    if (d == KD_CKPT_DTYPE_COUNT)
        OPEN_FAIL_("'%s': tensor '%s': dtype '%.32s' is not in the allow-list (" ALLOW_LIST ")", path, name, dt);
    e->dtype = (enum kd_ckpt_dtype)d;

    const struct jnode * sh = &p->nodes[js];
    if (sh->kind != J_ARR) OPEN_FAIL_("'%s': tensor '%s': shape must be an array of non-negative integers", path, name);
    if (sh->count > KD_CKPT_MAX_DIMS)
        OPEN_FAIL_("'%s': tensor '%s': shape has %d dimensions, more than %d", path, name, (int)sh->count,
                   KD_CKPT_MAX_DIMS);
    e->ndim = sh->count;
    size_t numel = 1, k = 0;
    bool overflow = false;
    for (int32_t c = sh->first; c >= 0; c = p->nodes[c].next, k++) {
        if (p->nodes[c].kind != J_INT)
            OPEN_FAIL_("'%s': tensor '%s': shape must be an array of non-negative integers", path, name);
        uint64_t v = p->nodes[c].num;
        if (v > INT64_MAX || !kd_mul_ok(numel, (size_t)v, &numel)) overflow = true;
        ck->shapes[e->shape_at + k] = v > INT64_MAX ? INT64_MAX : (int64_t)v;
    }
    size_t nbytes = 0;
    // Checked after the loop: a zero dimension does not make an overflowing product valid
    // (safetensors checks the running product too).
    if (overflow || !kd_mul_ok(numel, dtype_info_[d].size, &nbytes))
        OPEN_FAIL_("'%s': tensor '%s': the shape's element count overflows size_t", path, name);

    const struct jnode * of = &p->nodes[jo];
    if (of->kind != J_ARR || of->count != 2 || p->nodes[of->first].kind != J_INT ||
        p->nodes[p->nodes[of->first].next].kind != J_INT ||
        p->nodes[of->first].num > p->nodes[p->nodes[of->first].next].num)
        OPEN_FAIL_("'%s': tensor '%s': data_offsets must be [begin, end] with begin <= end", path, name);
    uint64_t b = p->nodes[of->first].num, end = p->nodes[p->nodes[of->first].next].num;
    if (end > (uint64_t)ck->data_size)
        OPEN_FAIL_("'%s': tensor '%s': data_offsets end %llu is beyond the data section (%zu bytes)", path, name,
                   (unsigned long long)end, ck->data_size);
    if (end - b != (uint64_t)nbytes)
        OPEN_FAIL_("'%s': tensor '%s': data_offsets span %llu bytes, but shape x dtype needs %zu", path, name,
                   (unsigned long long)(end - b), nbytes);
    e->begin = (size_t)b;
    e->end = (size_t)end;
    return KD_OK;
}

static enum kd_status parse_metadata_(struct kd_ckpt * ck, const struct jparser * p, int32_t node, const char * path) {
    const struct jnode * m = &p->nodes[node];
    if (m->kind != J_OBJ) OPEN_FAIL_("'%s': __metadata__ must be an object of strings", path);
    ck->meta = malloc((size_t)(m->count > 0 ? m->count : 1) * 2 * sizeof *ck->meta);
    if (!ck->meta) return kd_set_error_(KD_ERR_NOMEM, "kd_ckpt_open", "'%s': out of memory for the metadata", path);
    int k = 0;
    for (int32_t c = m->first; c >= 0; c = p->nodes[c].next, k++) {
        if (p->nodes[c].kind != J_STR)
            OPEN_FAIL_("'%s': __metadata__ must be an object of strings ('%s' is not a string)", path, jkey_(p, c));
        ck->meta[2 * k] = jkey_(p, c);
        ck->meta[2 * k + 1] = jstr_(p, c);
    }
    ck->n_meta = k;
    // Duplicate keys would make lookups ambiguous: sort a copy of the keys.
    const char ** keys = malloc((size_t)(k > 0 ? k : 1) * sizeof *keys);
    if (!keys) return kd_set_error_(KD_ERR_NOMEM, "kd_ckpt_open", "'%s': out of memory for the metadata", path);
    for (int i = 0; i < k; i++) keys[i] = ck->meta[2 * i];
    qsort(keys, (size_t)k, sizeof *keys, cmp_str_);
    for (int i = 1; i < k; i++)
        if (!strcmp(keys[i - 1], keys[i])) {
            kd_set_error_(KD_ERR_IO, "kd_ckpt_open", "'%s': __metadata__ must be an object of strings with unique keys "
                          "(duplicate key '%s')", path, keys[i]);
            free(keys);
            return KD_ERR_IO;
        }
    free(keys);
    return KD_OK;
}

struct span_ { size_t begin, end; int idx; };

static int cmp_span_(const void * a, const void * b) {
    const struct span_ * x = a, * y = b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    if (x->end != y->end) return x->end < y->end ? -1 : 1;
    return x->idx - y->idx;
}

// Every byte of the data section belongs to exactly one tensor.
static enum kd_status check_tiling_(const struct kd_ckpt * ck, const char * path) {
    struct span_ * s = malloc((size_t)(ck->n > 0 ? ck->n : 1) * sizeof *s);
    if (!s) return kd_set_error_(KD_ERR_NOMEM, "kd_ckpt_open", "'%s': out of memory", path);
    for (int i = 0; i < ck->n; i++) s[i] = (struct span_){ ck->t[i].begin, ck->t[i].end, i };
    qsort(s, (size_t)ck->n, sizeof *s, cmp_span_);
    size_t pos = 0;
    enum kd_status st = KD_OK;
    for (int k = 0; k < ck->n && st == KD_OK; k++) {
        if (s[k].begin < pos)
            st = kd_set_error_(KD_ERR_IO, "kd_ckpt_open", "'%s': tensors '%s' and '%s' overlap in the data section",
                               path, ck->t[s[k - 1].idx].name, ck->t[s[k].idx].name);
        else if (s[k].begin > pos)
            st = kd_set_error_(KD_ERR_IO, "kd_ckpt_open", "'%s': bytes [%zu, %zu) of the data section are not "
                               "covered by any tensor", path, pos, s[k].begin);
        pos = s[k].end;
    }
    if (st == KD_OK && pos != ck->data_size)
        st = kd_set_error_(KD_ERR_IO, "kd_ckpt_open", "'%s': bytes [%zu, %zu) of the data section are not covered "
                           "by any tensor", path, pos, ck->data_size);
    free(s);
    return st;
}

// Fills ck's tables from the parsed header. ck->data_size is already set.
static enum kd_status build_(struct kd_ckpt * ck, const struct jparser * p, const char * path) {
    const struct jnode * root = &p->nodes[0];
    if (root->kind != J_OBJ) OPEN_FAIL_("'%s': the header is not a JSON object", path);
    int nm = root->count;
    const char ** names = malloc((size_t)(nm > 0 ? nm : 1) * sizeof *names);
    if (!names) return kd_set_error_(KD_ERR_NOMEM, "kd_ckpt_open", "'%s': out of memory", path);
    int i = 0, nt = 0;
    size_t ndims = 0;
    int32_t meta = -1;
    for (int32_t c = root->first; c >= 0; c = p->nodes[c].next) {
        names[i++] = jkey_(p, c);
        if (!strcmp(jkey_(p, c), "__metadata__")) meta = c;
        else {
            nt++;
            if (p->nodes[c].kind == J_OBJ)   // shape sizes for the table; checked in parse_entry_
                for (int32_t k = p->nodes[c].first; k >= 0; k = p->nodes[k].next)
                    if (!strcmp(jkey_(p, k), "shape") && p->nodes[k].kind == J_ARR) ndims += (size_t)p->nodes[k].count;
        }
    }
    qsort(names, (size_t)nm, sizeof *names, cmp_str_);
    for (i = 1; i < nm; i++)
        if (!strcmp(names[i - 1], names[i])) {
            kd_set_error_(KD_ERR_IO, "kd_ckpt_open", "'%s': duplicate tensor name '%s'", path, names[i]);
            free(names);
            return KD_ERR_IO;
        }
    free(names);

    ck->t = calloc((size_t)(nt > 0 ? nt : 1), sizeof *ck->t);
    ck->shapes = calloc(ndims > 0 ? ndims : 1, sizeof *ck->shapes);
    if (!ck->t || !ck->shapes) return kd_set_error_(KD_ERR_NOMEM, "kd_ckpt_open", "'%s': out of memory", path);
    size_t at = 0;
    for (int32_t c = root->first; c >= 0; c = p->nodes[c].next) {
        if (c == meta) continue;
        struct ckpt_entry * e = &ck->t[ck->n];
        e->name = jkey_(p, c);
        e->shape_at = at;
        KD_TRY(parse_entry_(ck, e, p, c, path));
        at += (size_t)e->ndim;
        ck->n++;
    }
    if (meta >= 0) KD_TRY(parse_metadata_(ck, p, meta, path));
    return check_tiling_(ck, path);
}

// Reads exactly n bytes (short reads and EINTR retried). Returns the count read: < n at EOF.
static size_t read_full_(int fd, void * buf, size_t n, int * err) {
    char * b = buf;
    size_t got = 0;
    *err = 0;
    while (got < n) {
        size_t want = n - got > (1u << 30) ? (1u << 30) : n - got;
        ssize_t r = read(fd, b + got, want);
        if (r < 0) {
            if (errno == EINTR) continue;
            *err = errno;
            break;
        }
        if (r == 0) break;
        got += (size_t)r;
    }
    return got;
}

static const char * errtext_(int e, char * buf, size_t cap) {
    // GNU strerror_r (we build with _GNU_SOURCE): thread-safe, returns the message pointer.
    return strerror_r(e, buf, cap);
}

// The directory part of path ("." when there is none), malloc'd; NULL when out of memory.
static char * dir_of_(const char * path) {
    const char * slash = strrchr(path, '/');
    size_t dl = slash ? (slash == path ? 1 : (size_t)(slash - path)) : 1;
    char * dir = malloc(dl + 1);
    if (!dir) return NULL;
    if (slash) memcpy(dir, path, dl);
    else dir[0] = '.';
    dir[dl] = '\0';
    return dir;
}

// A writer killed in the instant between naming its complete, synced temporary file
// (linkat) and renaming it onto the target leaves "<path>.tmp.<pid>.<n>" behind (SIGKILL
// cannot be caught). The next open or write of the same path removes such names when their
// pid is not a live process here; names of any other form, and those of live writers
// (including this process), are left alone.
static void remove_stale_tmp_(const char * path, const char * dir) {
    const char * slash = strrchr(path, '/');
    const char * base = slash ? slash + 1 : path;
    size_t bl = strlen(base);
    if (bl == 0) return;
    DIR * d = opendir(dir);
    if (!d) return;
    int saved = errno;
    struct dirent * e;
    while ((e = readdir(d)) != NULL) {
        const char * nm = e->d_name;
        if (strncmp(nm, base, bl) != 0 || strncmp(nm + bl, ".tmp.", 5) != 0) continue;
        const char * p = nm + bl + 5, * q = p;
        while (*q >= '0' && *q <= '9') q++;
        if (q == p || q - p > 9 || *q != '.') continue;
        const char * r = q + 1, * t = r;
        while (*t >= '0' && *t <= '9') t++;
        if (t == r || *t != '\0') continue;
        long pid = strtol(p, NULL, 10);
        if (pid <= 0 || pid == (long)getpid()) continue;
        if (kill((pid_t)pid, 0) == 0 || errno != ESRCH) continue;   // alive, or not ours to judge
        unlinkat(dirfd(d), nm, 0);
    }
    closedir(d);
    errno = saved;
}

enum kd_status kd_ckpt_open(const char * path, struct kd_ckpt ** out) {
    if (!out) KD_FAIL(KD_ERR_VALUE, "out is NULL");
    *out = NULL;
    if (!path) KD_FAIL(KD_ERR_VALUE, "path is NULL");
    char eb[128];
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) KD_FAIL(KD_ERR_IO, "cannot open '%s': %s", path, errtext_(errno, eb, sizeof eb));
    char * dir = dir_of_(path);
    if (dir) remove_stale_tmp_(path, dir);   // best effort: without memory, skip the cleanup
    free(dir);
    enum kd_status st = KD_OK;
    char * header = NULL;
    struct jparser P;
    memset(&P, 0, sizeof P);
    struct kd_ckpt * ck = calloc(1, sizeof *ck);
    struct stat sb;
    int err = 0;
    unsigned char len8[8];
    if (!ck) { st = kd_set_error_(KD_ERR_NOMEM, __func__, "'%s': out of memory", path); goto done; }
    if (fstat(fd, &sb) < 0) {
        st = kd_set_error_(KD_ERR_IO, __func__, "cannot stat '%s': %s", path, errtext_(errno, eb, sizeof eb));
        goto done;
    }
    if (!S_ISREG(sb.st_mode)) { st = kd_set_error_(KD_ERR_IO, __func__, "'%s' is not a regular file", path); goto done; }
    size_t size = (size_t)sb.st_size;
    if (size < 8) {
        st = kd_set_error_(KD_ERR_IO, __func__, "'%s': the file is %zu bytes, shorter than 8 bytes (the header "
                           "length field)", path, size);
        goto done;
    }
    if (read_full_(fd, len8, 8, &err) != 8) goto short_read;
    uint64_t hlen = 0;
    for (int k = 7; k >= 0; k--) hlen = hlen << 8 | len8[k];
    if (hlen > KD_CKPT_MAX_HEADER) {
        st = kd_set_error_(KD_ERR_IO, __func__, "'%s': header length %llu exceeds the limit of %d bytes", path,
                           (unsigned long long)hlen, KD_CKPT_MAX_HEADER);
        goto done;
    }
    if (hlen > size - 8) {
        st = kd_set_error_(KD_ERR_IO, __func__, "'%s': header length %llu runs beyond the end of the file "
                           "(%zu bytes follow the length field)", path, (unsigned long long)hlen, size - 8);
        goto done;
    }
    header = malloc((size_t)hlen + 1);
    if (!header) { st = kd_set_error_(KD_ERR_NOMEM, __func__, "'%s': out of memory for the header", path); goto done; }
    if (read_full_(fd, header, (size_t)hlen, &err) != hlen) goto short_read;
    if (jparse_(&P, header, (size_t)hlen) < 0) {
        if (P.nomem) st = kd_set_error_(KD_ERR_NOMEM, __func__, "'%s': out of memory parsing the header", path);
        else st = kd_set_error_(KD_ERR_IO, __func__, "'%s': the header is not valid JSON (of the subset safetensors "
                                "uses): %s at byte %zu", path, P.err, P.err_pos);
        goto done;
    }
    ck->data_size = size - 8 - (size_t)hlen;
    if ((st = build_(ck, &P, path)) != KD_OK) goto done;
    // Only now, with every offset checked against the file size, read the data. Rounded up
    // to the alignment, as aligned_alloc requires; 64 bytes so any dtype is aligned at 0.
    ck->data = aligned_alloc(64, (ck->data_size + 63) / 64 * 64 + 64);
    if (!ck->data) {
        st = kd_set_error_(KD_ERR_NOMEM, __func__, "'%s': out of memory for %zu bytes of tensor data", path, ck->data_size);
        goto done;
    }
    if (read_full_(fd, ck->data, ck->data_size, &err) != ck->data_size) goto short_read;
    ck->pool = P.pool;   // names and metadata point into it
    P.pool = NULL;
    goto done;
short_read:
    if (err) st = kd_set_error_(KD_ERR_IO, __func__, "cannot read '%s': %s", path, errtext_(err, eb, sizeof eb));
    else st = kd_set_error_(KD_ERR_IO, __func__, "'%s': the file ended early (it changed while being read)", path);
done:
    close(fd);
    free(header);
    jfree_(&P);
    if (st != KD_OK) {
        if (ck) ck->pool = NULL;
        kd_ckpt_close(ck);
        return st;
    }
    *out = ck;
    return KD_OK;
}

void kd_ckpt_close(struct kd_ckpt * ck) {
    if (!ck) return;
    free(ck->pool);
    free(ck->t);
    free(ck->shapes);
    free(ck->meta);
    free(ck->data);
    free(ck);
}

int kd_ckpt_count(const struct kd_ckpt * ck) { return ck ? ck->n : 0; }

int kd_ckpt_find(const struct kd_ckpt * ck, const char * name) {
    if (!ck || !name) return -1;
    for (int i = 0; i < ck->n; i++)
        if (!strcmp(ck->t[i].name, name)) return i;
    return -1;
}

const char * kd_ckpt_name(const struct kd_ckpt * ck, int i) {
    return ck && i >= 0 && i < ck->n ? ck->t[i].name : NULL;
}

enum kd_ckpt_dtype kd_ckpt_dtype_of(const struct kd_ckpt * ck, int i) {
    return ck && i >= 0 && i < ck->n ? ck->t[i].dtype : KD_CKPT_DTYPE_COUNT;
}

const int64_t * kd_ckpt_shape(const struct kd_ckpt * ck, int i, int * ndim) {
    if (!ck || i < 0 || i >= ck->n) { if (ndim) *ndim = 0; return NULL; }
    if (ndim) *ndim = ck->t[i].ndim;
    return ck->shapes + ck->t[i].shape_at;
}

const void * kd_ckpt_data(const struct kd_ckpt * ck, int i, size_t * nbytes) {
    if (!ck || i < 0 || i >= ck->n) { if (nbytes) *nbytes = 0; return NULL; }
    if (nbytes) *nbytes = ck->t[i].end - ck->t[i].begin;
    return ck->data + ck->t[i].begin;
}

int kd_ckpt_meta_count(const struct kd_ckpt * ck) { return ck ? ck->n_meta : 0; }

const char * kd_ckpt_meta_key(const struct kd_ckpt * ck, int i) {
    return ck && i >= 0 && i < ck->n_meta ? ck->meta[2 * i] : NULL;
}

const char * kd_ckpt_meta_value(const struct kd_ckpt * ck, int i) {
    return ck && i >= 0 && i < ck->n_meta ? ck->meta[2 * i + 1] : NULL;
}

const char * kd_ckpt_meta(const struct kd_ckpt * ck, const char * key) {
    if (!ck || !key) return NULL;
    for (int i = 0; i < ck->n_meta; i++)
        if (!strcmp(ck->meta[2 * i], key)) return ck->meta[2 * i + 1];
    return NULL;
}

// ---------------------------------------------------------------------------------------
// Writer

struct sbuf { char * p; size_t n, cap; bool nomem; };

static void sb_put_(struct sbuf * b, const char * s, size_t n) {
    if (b->nomem) return;
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 256;
        while (cap < b->n + n + 1) cap *= 2;
        char * q = realloc(b->p, cap);
        if (!q) { b->nomem = true; return; }
        b->p = q;
        b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = '\0';
}

static void sb_puts_(struct sbuf * b, const char * s) { sb_put_(b, s, strlen(s)); }

static void sb_u64_(struct sbuf * b, uint64_t v) {
    char t[24];
    int k = snprintf(t, sizeof t, "%llu", (unsigned long long)v);
    sb_put_(b, t, (size_t)k);
}

// A JSON string literal; s is valid UTF-8 (checked by the caller), so only '"', '\' and
// control characters need escaping.
static void sb_jstr_(struct sbuf * b, const char * s) {
    sb_put_(b, "\"", 1);
    for (const char * q = s; *q; q++) {
        unsigned char c = (unsigned char)*q;
        if (c == '"' || c == '\\') { char e[2] = { '\\', (char)c }; sb_put_(b, e, 2); }
        else if (c < 0x20) { char e[8]; snprintf(e, sizeof e, "\\u%04x", c); sb_put_(b, e, 6); }
        else sb_put_(b, (const char *)&c, 1);
    }
    sb_put_(b, "\"", 1);
}

static int write_full_(int fd, const void * buf, size_t n) {
    const char * p = buf;
    while (n) {
        ssize_t w = write(fd, p, n > (1u << 30) ? (1u << 30) : n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (w == 0) { errno = EIO; return -1; }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

struct wplan {
    const struct kd_ckpt_tensor * t;
    const size_t * nbytes;
    const int * order;       // data layout order
    int n;
    const struct sbuf * header;
};

// The whole file through fd: length, header, data. Plain write(2): there is no stdio
// buffer to flush, so fsync alone makes it durable. Returns 0 or -1 with errno.
static int write_file_(int fd, const struct wplan * w) {
    unsigned char len8[8];
    uint64_t h = w->header->n;
    for (int k = 0; k < 8; k++) len8[k] = (unsigned char)(h >> (8 * k));
    if (write_full_(fd, len8, 8) < 0 || write_full_(fd, w->header->p, w->header->n) < 0) return -1;
    for (int k = 0; k < w->n; k++) {
        int i = w->order[k];
        if (w->nbytes[i] && write_full_(fd, w->t[i].data, w->nbytes[i]) < 0) return -1;
    }
    return fsync(fd);
}

// "<path>.tmp.<pid>.<counter>": unique within the process by the counter, across processes
// by the pid; a name left by a dead process with a reused pid is skipped (O_EXCL / EEXIST).
static void tmp_name_(char * out, size_t cap, const char * path) {
    static atomic_uint counter;
    snprintf(out, cap, "%s.tmp.%ld.%u", path, (long)getpid(), atomic_fetch_add(&counter, 1u));
}

// Writes the file atomically. On failure: KD_ERR_IO naming the path, the stage and errno's
// text; the temporary file is gone and the target untouched.
static enum kd_status write_atomic_(const char * path, const char * dir, const struct wplan * w) {
    size_t cap = strlen(path) + 64;
    char * tmp = malloc(cap);
    if (!tmp) KD_FAIL(KD_ERR_NOMEM, "'%s': out of memory", path);
    int fd = -1;
    bool named = false;
    const char * stage = "creating a temporary file";
#ifdef O_TMPFILE
    // An unnamed file first: if the process dies while writing, nothing is left behind. It
    // gets a name (linkat through /proc, which needs no privilege) only once it is complete
    // and synced, and that name exists only until the rename a few microseconds later.
    fd = open(dir, O_TMPFILE | O_WRONLY | O_CLOEXEC, 0666);
    if (fd >= 0) {
        stage = "writing";
        if (write_file_(fd, w) < 0) goto fail;
        char proc[48];
        snprintf(proc, sizeof proc, "/proc/self/fd/%d", fd);
        int r;
        do {
            tmp_name_(tmp, cap, path);
            r = linkat(AT_FDCWD, proc, AT_FDCWD, tmp, AT_SYMLINK_FOLLOW);
        } while (r < 0 && errno == EEXIST);
        if (r == 0) named = true;
        else { close(fd); fd = -1; }   // no /proc or no links here: write a named file instead
    }
#endif
    if (!named) {
        // Fallback: a named temporary file, created exclusively, removed on failure.
        stage = "creating a temporary file";
        do {
            tmp_name_(tmp, cap, path);
            fd = open(tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
        } while (fd < 0 && errno == EEXIST);
        if (fd < 0) goto fail;
        named = true;
        stage = "writing";
        if (write_file_(fd, w) < 0) goto fail;
    }
    stage = "closing";
    int r = close(fd);   // NFS reports deferred write errors here
    fd = -1;
    if (r < 0) goto fail;
    stage = "renaming the temporary file onto it";
    if (rename(tmp, path) < 0) goto fail;
    named = false;
    // The rename is only durable once the directory entry is: sync the directory.
    // Filesystems that cannot sync directories say EINVAL; there is nothing more to do.
    stage = "syncing its directory";
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd < 0) goto fail;
    if (fsync(dfd) < 0 && errno != EINVAL) {
        int e = errno;
        close(dfd);
        errno = e;
        goto fail;
    }
    close(dfd);
    free(tmp);
    return KD_OK;
fail:;
    int e = errno;
    char eb[128];
    if (fd >= 0) close(fd);
    if (named) unlink(tmp);
    free(tmp);
    return kd_set_error_(KD_ERR_IO, "kd_ckpt_write", "cannot write '%s' (%s): %s", path, stage,
                         errtext_(e, eb, sizeof eb));
}

enum kd_status kd_ckpt_write(const char * path, const struct kd_ckpt_tensor * tensors, int n,
                             const char * metadata_json) {
    if (!path || !*path) KD_FAIL(KD_ERR_VALUE, "path is NULL or empty");
    if (n < 0) KD_FAIL(KD_ERR_VALUE, "n = %d must be >= 0", n);
    if (n > 0 && !tensors) KD_FAIL(KD_ERR_VALUE, "tensors is NULL");
    for (int i = 0; i < n; i++) {
        const struct kd_ckpt_tensor * t = &tensors[i];
        if (!t->name) KD_FAIL(KD_ERR_VALUE, "tensors[%d].name is NULL", i);
        if (!strcmp(t->name, "__metadata__"))
            KD_FAIL(KD_ERR_VALUE, "tensors[%d]: the name '__metadata__' is reserved", i);
        if (!utf8_valid_(t->name)) KD_FAIL(KD_ERR_VALUE, "tensors[%d]: the name is not valid UTF-8", i);
        if ((unsigned)t->dtype >= KD_CKPT_DTYPE_COUNT)
            KD_FAIL(KD_ERR_VALUE, "tensor '%s': unknown dtype %d", t->name, (int)t->dtype);
        if (t->ndim < 0 || t->ndim > KD_CKPT_MAX_DIMS)
            KD_FAIL(KD_ERR_VALUE, "tensor '%s': ndim = %d must be in [0, %d]", t->name, t->ndim, KD_CKPT_MAX_DIMS);
        if (t->ndim > 0 && !t->shape) KD_FAIL(KD_ERR_VALUE, "tensor '%s': shape is NULL", t->name);
    }

    enum kd_status st = KD_OK;
    struct sbuf hdr = { 0 };
    struct jparser P;
    memset(&P, 0, sizeof P);
    size_t * nbytes = calloc((size_t)(n > 0 ? n : 1), sizeof *nbytes);
    int * order = calloc((size_t)(n > 0 ? n : 1), sizeof *order);
    const char ** names = calloc((size_t)(n > 0 ? n : 1), sizeof *names);
    char * dir = NULL;
    if (!nbytes || !order || !names) { st = kd_set_error_(KD_ERR_NOMEM, __func__, "out of memory"); goto done; }

    for (int i = 0; i < n; i++) {
        const struct kd_ckpt_tensor * t = &tensors[i];
        size_t numel = 1;
        bool overflow = false;
        for (int k = 0; k < t->ndim; k++) {
            if (t->shape[k] < 0) {
                st = kd_set_error_(KD_ERR_VALUE, __func__, "tensor '%s': shape[%d] = %lld is negative", t->name, k,
                                   (long long)t->shape[k]);
                goto done;
            }
            if (!kd_mul_ok(numel, (size_t)t->shape[k], &numel)) overflow = true;
        }
        if (overflow || !kd_mul_ok(numel, dtype_info_[t->dtype].size, &nbytes[i])) {
            st = kd_set_error_(KD_ERR_VALUE, __func__, "tensor '%s': the shape's byte size overflows size_t", t->name);
            goto done;
        }
        if (nbytes[i] && !t->data) {
            st = kd_set_error_(KD_ERR_VALUE, __func__, "tensor '%s': data is NULL", t->name);
            goto done;
        }
        names[i] = t->name;
    }
    qsort(names, (size_t)n, sizeof *names, cmp_str_);
    for (int i = 1; i < n; i++)
        if (!strcmp(names[i - 1], names[i])) {
            st = kd_set_error_(KD_ERR_VALUE, __func__, "duplicate tensor name '%s'", names[i]);
            goto done;
        }

    // Data layout: by decreasing item size (stable), so with the 8-byte-aligned data
    // section every tensor starts at a multiple of its item size. The header keeps the
    // caller's order.
    int k = 0;
    for (size_t sz = 8; sz >= 1; sz /= 2)
        for (int i = 0; i < n; i++)
            if (dtype_info_[tensors[i].dtype].size == sz) order[k++] = i;
    size_t * begin = calloc((size_t)(n > 0 ? n : 1), sizeof *begin);
    if (!begin) { st = kd_set_error_(KD_ERR_NOMEM, __func__, "out of memory"); goto done; }
    size_t off = 0;
    for (k = 0; k < n; k++) {
        begin[order[k]] = off;
        if (__builtin_add_overflow(off, nbytes[order[k]], &off)) {
            free(begin);
            st = kd_set_error_(KD_ERR_VALUE, __func__, "the tensors' total size overflows size_t");
            goto done;
        }
    }

    sb_puts_(&hdr, "{");
    bool first = true;
    if (metadata_json && *metadata_json) {
        size_t ml = strlen(metadata_json);
        if (ml > KD_CKPT_MAX_HEADER) {
            free(begin);
            st = kd_set_error_(KD_ERR_VALUE, __func__, "metadata_json is %zu bytes, above the header limit", ml);
            goto done;
        }
        const char * bad = NULL;
        if (jparse_(&P, metadata_json, ml) < 0) bad = P.nomem ? NULL : P.err;
        else if (P.nodes[0].kind != J_OBJ) bad = "not a JSON object";
        else
            for (int32_t c = P.nodes[0].first; c >= 0 && !bad; c = P.nodes[c].next)
                if (P.nodes[c].kind != J_STR) bad = "a value is not a string";
        if (P.nomem) { free(begin); st = kd_set_error_(KD_ERR_NOMEM, __func__, "out of memory"); goto done; }
        if (bad) {
            free(begin);
            st = kd_set_error_(KD_ERR_VALUE, __func__, "metadata_json must be a JSON object of strings: %s", bad);
            goto done;
        }
        // Re-serialised from the parse, so the stored header is canonical whatever the
        // caller's spacing; duplicate keys are refused as the reader would.
        int nk = P.nodes[0].count, j = 0;
        const char ** keys = malloc((size_t)(nk > 0 ? nk : 1) * sizeof *keys);
        if (!keys) { free(begin); st = kd_set_error_(KD_ERR_NOMEM, __func__, "out of memory"); goto done; }
        for (int32_t c = P.nodes[0].first; c >= 0; c = P.nodes[c].next) keys[j++] = jkey_(&P, c);
        qsort(keys, (size_t)nk, sizeof *keys, cmp_str_);
        for (j = 1; j < nk; j++)
            if (!strcmp(keys[j - 1], keys[j])) break;
        if (nk > 1 && j < nk) {
            st = kd_set_error_(KD_ERR_VALUE, __func__, "metadata_json has the key '%s' twice", keys[j]);
            free(keys);
            free(begin);
            goto done;
        }
        free(keys);
        sb_puts_(&hdr, "\"__metadata__\":{");
        for (int32_t c = P.nodes[0].first; c >= 0; c = P.nodes[c].next) {
            if (c != P.nodes[0].first) sb_puts_(&hdr, ",");
            sb_jstr_(&hdr, jkey_(&P, c));
            sb_puts_(&hdr, ":");
            sb_jstr_(&hdr, jstr_(&P, c));
        }
        sb_puts_(&hdr, "}");
        first = false;
    }
    for (int i = 0; i < n; i++) {
        const struct kd_ckpt_tensor * t = &tensors[i];
        if (!first) sb_puts_(&hdr, ",");
        first = false;
        sb_jstr_(&hdr, t->name);
        sb_puts_(&hdr, ":{\"dtype\":\"");
        sb_puts_(&hdr, dtype_info_[t->dtype].name);
        sb_puts_(&hdr, "\",\"shape\":[");
        for (int d = 0; d < t->ndim; d++) {
            if (d) sb_puts_(&hdr, ",");
            sb_u64_(&hdr, (uint64_t)t->shape[d]);
        }
        sb_puts_(&hdr, "],\"data_offsets\":[");
        sb_u64_(&hdr, begin[i]);
        sb_puts_(&hdr, ",");
        sb_u64_(&hdr, begin[i] + nbytes[i]);
        sb_puts_(&hdr, "]}");
    }
    free(begin);
    sb_puts_(&hdr, "}");
    while (!hdr.nomem && hdr.n % 8) sb_puts_(&hdr, " ");   // data section 8-byte aligned
    if (hdr.nomem) { st = kd_set_error_(KD_ERR_NOMEM, __func__, "out of memory for the header"); goto done; }
    if (hdr.n > KD_CKPT_MAX_HEADER) {
        st = kd_set_error_(KD_ERR_VALUE, __func__, "the header would be %zu bytes, above the limit of %d", hdr.n,
                           KD_CKPT_MAX_HEADER);
        goto done;
    }

    // The temporary file must be in the target's directory: rename is only atomic within
    // one filesystem.
    dir = dir_of_(path);
    if (!dir) { st = kd_set_error_(KD_ERR_NOMEM, __func__, "out of memory"); goto done; }
    struct wplan w = { tensors, nbytes, order, n, &hdr };
    remove_stale_tmp_(path, dir);
    st = write_atomic_(path, dir, &w);
done:
    jfree_(&P);
    free(hdr.p);
    free(nbytes);
    free(order);
    free(names);
    free(dir);
    return st;
}
