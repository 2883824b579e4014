// Data: batch gathering with normalisation and augmentation, shuffling, dataset
// validation and IDX (MNIST-format) file reading.
//
// Augmentation follows torchvision's CIFAR recipe, applied to the raw image:
//   RandomCrop(size, padding=p) -> RandomHorizontalFlip() -> ToTensor/Normalize -> noise
//   https://pytorch.org/vision/stable/generated/torchvision.transforms.RandomCrop.html
//   https://pytorch.org/vision/stable/generated/torchvision.transforms.RandomHorizontalFlip.html
// then, with randaugment, the RandAugment of MLKD's strong view (kd_ra_op in kdcore.h) on the
// scaled pixel values, before normalisation.
// Every random draw for the sample at batch position i is kd_hash(seed, 8*i + k), a pure
// function, so batches are identical for any thread count. Callers mix the epoch and the
// batch start into seed.
#include "kd_internal.h"

#include <errno.h>
#include <limits.h>

#include <zlib.h>

// Draw slots per sample (kd_hash(seed, 8*i + k)).
// RandAugment's draws come from the stream kd_hash(kd_hash(seed, 8*i + DRAW_RA_), k).
enum { DRAW_DY_ = 0, DRAW_DX_ = 1, DRAW_FLIP_ = 2, DRAW_NOISE_ = 3, DRAW_RA_ = 4, DRAWS_PER_SAMPLE_ = 8 };

// Uniform integer in [0, m) from the high 32 bits of h (multiply-shift; bias < m / 2^32).
static inline int draw_int_(uint64_t h, int m) {
    return (int)(((h >> 32) * (uint64_t)m) >> 32);
}

// ---------------------------------------------------------------------------------------
// RandAugment (MLKD's loader, on float images; see enum kd_ra_op)

static const float ra_lo_[KD_RA_COUNT] = { 0, 0.05f, 0.05f, 0.05f, 0, 0, 4, -30, 0.05f, -0.3f, -0.3f, 0, -0.3f, -0.3f, 0 };
static const float ra_hi_[KD_RA_COUNT] = { 1, 0.95f, 0.95f, 0.95f, 1, 1, 8, 30, 0.95f, 0.3f, 0.3f, 256, 0.3f, 0.3f, 0.5f };

enum kd_status kd_ra_range(int op, float * lo, float * hi) {
    if (op < 0 || op >= KD_RA_COUNT) KD_FAIL(KD_ERR_VALUE, "op (%d) must be in [0, %d)", op, (int)KD_RA_COUNT);
    if (lo) *lo = ra_lo_[op];
    if (hi) *hi = ra_hi_[op];
    return KD_OK;
}

static inline float clamp01_(float v) { return v < 0.0f ? 0.0f : v > 1.0f ? 1.0f : v; }

// The 8-bit level of a scaled pixel value (PIL's images hold these).
static inline int level_(float v) {
    const float q = floorf(v * 255.0f + 0.5f);
    return q < 0.0f ? 0 : q > 255.0f ? 255 : (int)q;
}

// PIL's nearest-neighbour affine transform: output (x, y) reads the input pixel at
// floor(a (x + 1/2) + b (y + 1/2) + c, d (x + 1/2) + e (y + 1/2) + f), 0 outside.
static void ra_affine_(float * img, const float * src, int C, int H, int W, const double t[6]) {
    const size_t hw = (size_t)H * W;
    for (int y = 0; y < H; y++)
        for (int x = 0; x < W; x++) {
            const double xs = t[0] * (x + 0.5) + t[1] * (y + 0.5) + t[2];
            const double ys = t[3] * (x + 0.5) + t[4] * (y + 0.5) + t[5];
            const int xi = xs < 0 ? -1 : xs >= W ? W : (int)xs, yi = ys < 0 ? -1 : ys >= H ? H : (int)ys;
            const bool in = xi >= 0 && xi < W && yi >= 0 && yi < H;
            for (int c = 0; c < C; c++)
                img[c * hw + (size_t)y * W + x] = in ? src[c * hw + (size_t)yi * W + xi] : 0.0f;
        }
}

// The luma of pixel j of a 3-channel image (PIL's convert("L") weights).
static inline float luma_(const float * img, size_t hw, size_t j) {
    return 0.299f * img[j] + 0.587f * img[hw + j] + 0.114f * img[2 * hw + j];
}

enum kd_status kd_ra_apply(float * img, int C, int H, int W, int op, float m, float cx, float cy, float * tmp) {
    if (!img || !tmp) KD_FAIL(KD_ERR_VALUE, "img and tmp must not be NULL");
    if (C < 1 || H < 1 || W < 1) KD_FAIL(KD_ERR_VALUE, "image shape (%d, %d, %d) must be positive", C, H, W);
    if (op < 0 || op >= KD_RA_COUNT) KD_FAIL(KD_ERR_VALUE, "op (%d) must be in [0, %d)", op, (int)KD_RA_COUNT);
    if (!isfinite(m) || !isfinite(cx) || !isfinite(cy)) KD_FAIL(KD_ERR_VALUE, "magnitude and centre must be finite");
    const size_t hw = (size_t)H * W, n = (size_t)C * hw;
    switch ((enum kd_ra_op)op) {
    case KD_RA_AUTOCONTRAST:
        for (int c = 0; c < C; c++) {
            float * p = img + c * hw, lo = p[0], hi = p[0];
            for (size_t j = 1; j < hw; j++) { lo = fminf(lo, p[j]); hi = fmaxf(hi, p[j]); }
            if (hi <= lo) continue;
            for (size_t j = 0; j < hw; j++) p[j] = (p[j] - lo) / (hi - lo);
        }
        break;
    case KD_RA_BRIGHTNESS:
        for (size_t j = 0; j < n; j++) img[j] = clamp01_(m * img[j]);
        break;
    case KD_RA_COLOR:
        if (C != 3) break;   // the grey of a grey image is itself
        for (size_t j = 0; j < hw; j++) {
            const float g = luma_(img, hw, j);
            for (int c = 0; c < 3; c++) img[c * hw + j] = clamp01_(g + m * (img[c * hw + j] - g));
        }
        break;
    case KD_RA_CONTRAST: {
        double mu = 0;
        if (C == 3) for (size_t j = 0; j < hw; j++) mu += luma_(img, hw, j);
        else for (size_t j = 0; j < n; j++) mu += img[j];
        const float mf = (float)(mu / (double)(C == 3 ? hw : n));
        for (size_t j = 0; j < n; j++) img[j] = clamp01_(mf + m * (img[j] - mf));
        break;
    }
    case KD_RA_EQUALIZE:
        for (int c = 0; c < C; c++) {
            float * p = img + c * hw;
            int64_t hist[256] = {0};
            for (size_t j = 0; j < hw; j++) hist[level_(p[j])]++;
            int last = 255, used = 0;
            while (hist[last] == 0) last--;
            for (int i = 0; i < 256; i++) used += hist[i] > 0;
            const int64_t step = used <= 1 ? 0 : ((int64_t)hw - hist[last]) / 255;
            if (step == 0) continue;   // PIL's identity table: the image unchanged
            float lut[256];
            int64_t acc = step / 2;
            for (int i = 0; i < 256; i++) {
                const int64_t l = acc / step;
                lut[i] = (float)(l > 255 ? 255 : l) / 255.0f;
                acc += hist[i];
            }
            for (size_t j = 0; j < hw; j++) p[j] = lut[level_(p[j])];
        }
        break;
    case KD_RA_IDENTITY:
        break;
    case KD_RA_POSTERIZE: {
        const int bits = m < 1.0f ? 1 : m >= 8.0f ? 8 : (int)m;   // int(m), kept in range before the cast
        const int mask = ~((1 << (8 - bits)) - 1) & 0xFF;
        for (size_t j = 0; j < n; j++) img[j] = (float)(level_(img[j]) & mask) / 255.0f;
        break;
    }
    case KD_RA_ROTATE: {
        // PIL's Image.rotate: the inverse rotation about the centre (w/2, h/2).
        const double r = -(double)m * 3.14159265358979323846 / 180.0, a = cos(r), b = sin(r);
        const double ox = W / 2.0, oy = H / 2.0;
        const double t[6] = { a, b, a * -ox + b * -oy + ox, -b, a, -b * -ox + a * -oy + oy };
        memcpy(tmp, img, n * sizeof(float));
        ra_affine_(img, tmp, C, H, W, t);
        break;
    }
    case KD_RA_SHARPNESS:
        memcpy(tmp, img, n * sizeof(float));
        for (int c = 0; c < C; c++) {
            const float * s = tmp + c * hw;
            float * p = img + c * hw;
            for (int y = 1; y < H - 1; y++)
                for (int x = 1; x < W - 1; x++) {
                    const size_t j = (size_t)y * W + x;
                    float sum = 0;
                    for (int dy = -1; dy <= 1; dy++)
                        for (int dx = -1; dx <= 1; dx++) sum += s[j + (ptrdiff_t)dy * W + dx] * (dy == 0 && dx == 0 ? 5.0f : 1.0f);
                    const float sm = sum / 13.0f;
                    p[j] = clamp01_(sm + m * (s[j] - sm));
                }
        }
        break;
    case KD_RA_SHEAR_X: {
        const double t[6] = { 1, m, 0, 0, 1, 0 };
        memcpy(tmp, img, n * sizeof(float));
        ra_affine_(img, tmp, C, H, W, t);
        break;
    }
    case KD_RA_SHEAR_Y: {
        const double t[6] = { 1, 0, 0, m, 1, 0 };
        memcpy(tmp, img, n * sizeof(float));
        ra_affine_(img, tmp, C, H, W, t);
        break;
    }
    case KD_RA_SOLARIZE:
        for (size_t j = 0; j < n; j++) if (img[j] * 255.0f >= m) img[j] = 1.0f - img[j];
        break;
    case KD_RA_TRANSLATE_X: {
        const double t[6] = { 1, 0, (double)m * W, 0, 1, 0 };
        memcpy(tmp, img, n * sizeof(float));
        ra_affine_(img, tmp, C, H, W, t);
        break;
    }
    case KD_RA_TRANSLATE_Y: {
        const double t[6] = { 1, 0, 0, 0, 1, (double)m * H };
        memcpy(tmp, img, n * sizeof(float));
        ra_affine_(img, tmp, C, H, W, t);
        break;
    }
    case KD_RA_CUTOUT: {
        if (!(m > 0)) break;   // the loader returns the image for a size of 0
        static const float fill[3] = { 125.0f / 255.0f, 123.0f / 255.0f, 114.0f / 255.0f };
        const float s = m * W;
        // (corners past the image are clamped before the cast: any finite centre is accepted)
        const float fx0 = fmaxf(0.0f, cx - s / 2), fy0 = fmaxf(0.0f, cy - s / 2);
        const int x0 = fx0 >= W ? W : (int)fx0, y0 = fy0 >= H ? H : (int)fy0;
        int x1 = (int)fminf((float)W, x0 + s), y1 = (int)fminf((float)H, y0 + s);
        if (x1 > W - 1) x1 = W - 1;
        if (y1 > H - 1) y1 = H - 1;
        for (int c = 0; c < C; c++)
            for (int y = y0; y <= y1; y++)
                for (int x = x0; x <= x1; x++) img[c * hw + (size_t)y * W + x] = fill[c % 3];
        break;
    }
    case KD_RA_COUNT:
        break;
    }
    return KD_OK;
}

// One sample's RandAugment: n operations drawn with replacement, then Cutout (the loader's
// RandAugment.__call__), from the stream rs.
static void ra_sample_(float * img, int C, int H, int W, int n, uint64_t rs, float * tmp) {
    for (int j = 0; j < n; j++) {
        const int op = draw_int_(kd_hash(rs, 2 * (uint64_t)j), KD_RA_RANDOM);
        const float m = ra_lo_[op] + (ra_hi_[op] - ra_lo_[op]) * kd_uniform(kd_hash(rs, 2 * (uint64_t)j + 1));
        kd_ra_apply(img, C, H, W, op, m, 0, 0, tmp);
    }
    const uint64_t k = 2 * (uint64_t)n;
    const float m = 0.5f * kd_uniform(kd_hash(rs, k));
    // np.random.uniform(w) is uniform(low=w, high=1): a centre in (1, w].
    const float cx = W + (1.0f - W) * kd_uniform(kd_hash(rs, k + 1));
    const float cy = H + (1.0f - H) * kd_uniform(kd_hash(rs, k + 2));
    kd_ra_apply(img, C, H, W, KD_RA_CUTOUT, m, cx, cy, tmp);
}

// ---------------------------------------------------------------------------------------
// Batches

// The batch with RandAugment: crop and flip into the scaled pixel values, the sample's
// operations on them, then normalisation and noise (the loader's ToTensor/Normalize after
// RandAugment). Same draws for crop, flip and noise as kd_data_batch.
static enum kd_status batch_ra_(float * out, const struct kd_dataset * ds, const int64_t * idx, int N, int pad,
                                bool hflip, float noise, int ra_n, const float * mean, const float * stdv, uint64_t seed) {
    const int C = ds->c, H = ds->h, W = ds->w;
    const size_t hw = (size_t)H * (size_t)W, chw = (size_t)C * hw;
    const bool is_u8 = ds->x_dtype == KD_U8, norm = ds->normalize;
    size_t nt;
    if (!kd_mul_ok(chw, (size_t)kd_omp_threads(), &nt)) KD_FAIL(KD_ERR_NOMEM, "randaugment scratch too large");
    float * tmp = malloc(nt * sizeof(float));
    if (!tmp) KD_FAIL(KD_ERR_NOMEM, "cannot allocate randaugment's scratch of %zu floats", nt);
#ifdef _OPENMP
#pragma omp parallel for schedule(static)
#endif
    for (int i = 0; i < N; i++) {
        const size_t src0 = (size_t)idx[i] * chw;
        const uint8_t * xu = is_u8 ? (const uint8_t *)ds->x + src0 : NULL;
        const float * xf = is_u8 ? NULL : (const float *)ds->x + src0;
        float * o = out + (size_t)i * chw;
        const uint64_t si = (uint64_t)i * DRAWS_PER_SAMPLE_;
        const int dy = pad ? draw_int_(kd_hash(seed, si + DRAW_DY_), 2 * pad + 1) : 0;
        const int dx = pad ? draw_int_(kd_hash(seed, si + DRAW_DX_), 2 * pad + 1) : 0;
        const bool flip = hflip && (kd_hash(seed, si + DRAW_FLIP_) >> 63);
        for (int c = 0; c < C; c++)
            for (int y = 0; y < H; y++) {
                const int sy = y + dy - pad;
                for (int x = 0; x < W; x++) {
                    const int sx = (flip ? W - 1 - x : x) + dx - pad;
                    float v = 0.0f;
                    if (sy >= 0 && sy < H && sx >= 0 && sx < W) {
                        const size_t s = (size_t)c * hw + (size_t)sy * W + (size_t)sx;
                        v = (is_u8 ? (float)xu[s] : xf[s]) * ds->scale;
                    }
                    o[(size_t)c * hw + (size_t)y * W + x] = v;
                }
            }
        ra_sample_(o, C, H, W, ra_n, kd_hash(seed, si + DRAW_RA_), tmp + (size_t)kd_omp_tid() * chw);
        if (norm)
            for (int c = 0; c < C; c++)
                for (size_t j = 0; j < hw; j++) o[(size_t)c * hw + j] = (o[(size_t)c * hw + j] - mean[c]) / stdv[c];
        if (noise > 0) {
            const uint64_t nseed = kd_hash(seed, si + DRAW_NOISE_);
            for (size_t j = 0; j < chw; j++) o[j] += noise * kd_normal(nseed, j);
        }
    }
    free(tmp);
    return KD_OK;
}

// One channel plane of a batch image without augmentation: x * scale, normalised as
// (x * scale - mean) / std with the product and the subtraction rounded once (fmaf). Each
// case is its own plain loop so that the compiler vectorises it (a branch per element kept
// the gather scalar); the arithmetic per element is fixed whatever it does.
static void copy_plane_u8_(float * restrict o, const uint8_t * restrict x, size_t n, float scale, bool norm,
                           float mu, float sd) {
    if (norm) {
        for (size_t j = 0; j < n; j++) { o[j] = fmaf((float)x[j], scale, -mu) / sd; }
    } else {
        for (size_t j = 0; j < n; j++) { o[j] = (float)x[j] * scale; }
    }
}

static void copy_plane_f32_(float * restrict o, const float * restrict x, size_t n, float scale, bool norm,
                            float mu, float sd) {
    if (norm) {
        for (size_t j = 0; j < n; j++) { o[j] = fmaf(x[j], scale, -mu) / sd; }
    } else {
        for (size_t j = 0; j < n; j++) { o[j] = x[j] * scale; }
    }
}

// Assumes kd_dataset_check(ds) passed and every idx[i] is in [0, ds->n).
enum kd_status kd_data_batch(float * out, const struct kd_dataset * ds, const int64_t * idx, int N,
                             const struct kd_augment * aug, uint64_t seed) {
    if (!out || !ds || !ds->x || !idx || N <= 0) return KD_OK;
    const int C = ds->c, H = ds->h, W = ds->w;
    const size_t hw = (size_t)H * (size_t)W, chw = (size_t)C * hw;
    const float scale = ds->scale;
    const bool is_u8 = ds->x_dtype == KD_U8;
    const int pad = aug && aug->crop_padding > 0 ? aug->crop_padding : 0;
    const bool hflip = aug && aug->hflip;
    const float noise = aug && aug->noise_std > 0 ? aug->noise_std : 0.0f;
    const bool augment = pad > 0 || hflip;
    // Per-channel (mean, std); identity when not normalising. Only 4 channels can carry
    // statistics (kd_dataset_check rejects normalize with c > 4).
    float mean[4] = {0, 0, 0, 0}, stdv[4] = {1, 1, 1, 1};
    const bool norm = ds->normalize;
    if (norm) {
        for (int c = 0; c < 4; c++) {
            mean[c] = ds->mean[c];
            stdv[c] = ds->std[c] == 0 ? 1.0f : ds->std[c];
        }
    }
    KD_ASSERT(!norm || C <= 4);
    const int ra_n = aug && aug->randaugment > 0 ? aug->randaugment : 0;
    if (ra_n > 0) return batch_ra_(out, ds, idx, N, pad, hflip, noise, ra_n, mean, stdv, seed);
    const size_t row_bytes = chw * (is_u8 ? 1 : sizeof(float));

#ifdef _OPENMP
#pragma omp parallel for schedule(static)
#endif
    for (int i = 0; i < N; i++) {
        KD_ASSERT(idx[i] >= 0 && idx[i] < ds->n);
        const size_t src0 = (size_t)idx[i] * chw;
        if (i + 2 < N) {
            // Shuffled rows are far apart in a data set larger than the caches and too short
            // for the hardware prefetcher to catch on: ask for the one after next now.
            const char * nx = (const char *)ds->x + (size_t)idx[i + 2] * row_bytes;
            for (size_t b = 0; b < row_bytes; b += 64) { __builtin_prefetch(nx + b); }
        }
        const uint8_t * xu = is_u8 ? (const uint8_t *)ds->x + src0 : NULL;
        const float * xf = is_u8 ? NULL : (const float *)ds->x + src0;
        float * o = out + (size_t)i * chw;
        const uint64_t si = (uint64_t)i * DRAWS_PER_SAMPLE_;
        // Crop offset in the padded image, [0, 2p] per axis, as RandomCrop.get_params.
        const int dy = pad ? draw_int_(kd_hash(seed, si + DRAW_DY_), 2 * pad + 1) : 0;
        const int dx = pad ? draw_int_(kd_hash(seed, si + DRAW_DX_), 2 * pad + 1) : 0;
        const bool flip = hflip && (kd_hash(seed, si + DRAW_FLIP_) >> 63);
        for (int c = 0; c < C; c++) {
            const float mu = norm && c < 4 ? mean[c] : 0.0f, sd = norm && c < 4 ? stdv[c] : 1.0f;
            const size_t cb = (size_t)c * hw;
            if (!augment) {
                if (is_u8) { copy_plane_u8_(o + cb, xu + cb, hw, scale, norm, mu, sd); }
                else { copy_plane_f32_(o + cb, xf + cb, hw, scale, norm, mu, sd); }
                continue;
            }
            for (int y = 0; y < H; y++) {
                const int sy = y + dy - pad;   // source row in the unpadded image
                for (int x = 0; x < W; x++) {
                    // Flip acts on the cropped image: output column x reads crop column W-1-x.
                    const int sx = (flip ? W - 1 - x : x) + dx - pad;
                    float v = 0.0f;            // zero padding of the raw image (0 * scale)
                    if (sy >= 0 && sy < H && sx >= 0 && sx < W) {
                        const size_t s = cb + (size_t)sy * W + (size_t)sx;
                        v = (is_u8 ? (float)xu[s] : xf[s]) * scale;
                    }
                    o[cb + (size_t)y * W + x] = norm ? (v - mu) / sd : v;
                }
            }
        }
        if (noise > 0) {
            const uint64_t nseed = kd_hash(seed, si + DRAW_NOISE_);
            for (size_t j = 0; j < chw; j++) o[j] += noise * kd_normal(nseed, j);
        }
    }
    return KD_OK;
}

// ---------------------------------------------------------------------------------------
// Shuffling

void kd_data_shuffle(int64_t * perm, int64_t n, uint64_t seed) {
    if (!perm || n <= 0) return;
    for (int64_t i = 0; i < n; i++) perm[i] = i;
    // splitmix64 stream: kd_splitmix64 adds the increment before mixing, so advancing the
    // state by the golden gamma after each call yields the standard sequence.
    uint64_t state = seed;
    for (int64_t i = n - 1; i > 0; i--) {
        // Unbiased j in [0, i] (Lemire's multiply with rejection).
        const uint64_t range = (uint64_t)i + 1;
        unsigned __int128 mm;
        uint64_t lo;
        do {
            uint64_t r = kd_splitmix64(state);
            state += 0x9E3779B97F4A7C15ull;
            mm = (unsigned __int128)r * range;
            lo = (uint64_t)mm;
        } while (lo < (-range) % range);
        const int64_t j = (int64_t)(mm >> 64);
        const int64_t t = perm[i];
        perm[i] = perm[j];
        perm[j] = t;
    }
}

// ---------------------------------------------------------------------------------------
// Dataset validation

// Values are scanned in blocks in parallel; each block reports its first offender and the
// minimum over blocks is the first offender overall, whatever the thread count.
#define SCAN_BLOCK_ ((size_t)1 << 16)

size_t kd_first_nonfinite(const float * x, size_t n) {
    const size_t nb = (n + SCAN_BLOCK_ - 1) / SCAN_BLOCK_;
    size_t first = SIZE_MAX;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) reduction(min:first) if (nb > 1)
#endif
    for (size_t b = 0; b < nb; b++) {
        const size_t lo = b * SCAN_BLOCK_, hi = lo + SCAN_BLOCK_ < n ? lo + SCAN_BLOCK_ : n;
        // Branch-free exponent test first (vectorises), then locate within a bad block.
        uint32_t bad = 0;
        for (size_t i = lo; i < hi; i++) {
            uint32_t u;
            memcpy(&u, x + i, sizeof u);
            bad |= (u & 0x7f800000u) == 0x7f800000u;
        }
        if (!bad) continue;
        for (size_t i = lo; i < hi; i++) {
            if (!isfinite(x[i])) {
                if (i < first) first = i;
                break;
            }
        }
    }
    return first;
}

static size_t first_bad_label_(const int64_t * y, size_t n, int64_t k) {
    const size_t nb = (n + SCAN_BLOCK_ - 1) / SCAN_BLOCK_;
    size_t first = SIZE_MAX;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) reduction(min:first) if (nb > 1)
#endif
    for (size_t b = 0; b < nb; b++) {
        const size_t lo = b * SCAN_BLOCK_, hi = lo + SCAN_BLOCK_ < n ? lo + SCAN_BLOCK_ : n;
        uint64_t bad = 0;   // unsigned compare also catches negative labels
        for (size_t i = lo; i < hi; i++) bad |= (uint64_t)y[i] >= (uint64_t)k;
        if (!bad) continue;
        for (size_t i = lo; i < hi; i++) {
            if ((uint64_t)y[i] >= (uint64_t)k) {
                if (i < first) first = i;
                break;
            }
        }
    }
    return first;
}

enum kd_status kd_dataset_check(const struct kd_dataset * ds) {
    if (!ds) KD_FAIL(KD_ERR_VALUE, "ds is NULL");
    if (ds->n < 1) KD_FAIL(KD_ERR_SHAPE, "n = %d must be >= 1", ds->n);
    if (ds->c < 1) KD_FAIL(KD_ERR_SHAPE, "c = %d must be >= 1", ds->c);
    if (ds->h < 1) KD_FAIL(KD_ERR_SHAPE, "h = %d must be >= 1", ds->h);
    if (ds->w < 1) KD_FAIL(KD_ERR_SHAPE, "w = %d must be >= 1", ds->w);
    if (ds->normalize && ds->c > 4)
        KD_FAIL(KD_ERR_SHAPE, "c = %d: normalize supports at most 4 channels (mean[4], std[4])", ds->c);
    if (!ds->x) KD_FAIL(KD_ERR_VALUE, "x is NULL");
    size_t esize;
    switch (ds->x_dtype) {
    case KD_F32: esize = sizeof(float); break;
    case KD_U8:  esize = 1; break;
    default: KD_FAIL(KD_ERR_VALUE, "x_dtype = %d is not KD_F32 or KD_U8", (int)ds->x_dtype);
    }
    // Per-sample size must fit an int (net shapes are ints); the whole array a size_t.
    size_t hw, chw, total, bytes;
    if (!kd_mul_ok((size_t)ds->h, (size_t)ds->w, &hw) || !kd_mul_ok(hw, (size_t)ds->c, &chw) || chw > INT_MAX)
        KD_FAIL(KD_ERR_SHAPE, "c*h*w = %d*%d*%d is too large", ds->c, ds->h, ds->w);
    if (!kd_mul_ok(chw, (size_t)ds->n, &total) || !kd_mul_ok(total, esize, &bytes))
        KD_FAIL(KD_ERR_SHAPE, "n*c*h*w = %d*%d*%d*%d overflows size_t", ds->n, ds->c, ds->h, ds->w);
    if (!(isfinite(ds->scale) && ds->scale > 0))
        KD_FAIL(KD_ERR_VALUE, "scale = %g must be finite and > 0", (double)ds->scale);
    if (ds->normalize) {
        for (int c = 0; c < ds->c; c++) {
            if (!isfinite(ds->mean[c]))
                KD_FAIL(KD_ERR_VALUE, "mean[%d] = %g must be finite", c, (double)ds->mean[c]);
            if (!(isfinite(ds->std[c]) && ds->std[c] >= 0))
                KD_FAIL(KD_ERR_VALUE, "std[%d] = %g must be finite and >= 0", c, (double)ds->std[c]);
        }
    }
    if (ds->num_classes < 0) KD_FAIL(KD_ERR_VALUE, "num_classes = %d must be >= 0", ds->num_classes);
    if (ds->x_dtype == KD_F32) {
        const float * x = ds->x;
        size_t i = kd_first_nonfinite(x, total);
        if (i != SIZE_MAX)
            KD_FAIL(KD_ERR_VALUE, "x[%zu] is %s", i, isnan(x[i]) ? "nan" : x[i] > 0 ? "inf" : "-inf");
    }
    if (ds->y && ds->num_classes > 0) {
        size_t i = first_bad_label_(ds->y, (size_t)ds->n, ds->num_classes);
        if (i != SIZE_MAX)
            KD_FAIL(KD_ERR_VALUE, "y[%zu] = %lld is outside [0, %d)", i, (long long)ds->y[i], ds->num_classes);
    }
    return KD_OK;
}

// ---------------------------------------------------------------------------------------
// IDX files: http://yann.lecun.com/exdb/mnist/ (section "FILE FORMATS FOR THE MNIST
// DATABASE"). Header: 0x00 0x00, type byte, ndim byte, then ndim big-endian uint32 dims.
// zlib's gz* functions read gzip and plain files alike.

#define IDX_MAX_BYTES_ ((size_t)1 << 31)
#define IDX_CHUNK_     ((size_t)1 << 20)   // first allocation for the payload

// Reads up to len bytes; *got is the count read. Returns false on a zlib/system error.
static bool gz_read_all_(gzFile f, void * buf, size_t len, size_t * got) {
    unsigned char * p = buf;
    *got = 0;
    while (*got < len) {
        size_t want = len - *got;
        if (want > ((size_t)1 << 30)) want = (size_t)1 << 30;
        int r = gzread(f, p + *got, (unsigned)want);
        if (r < 0) return false;
        if (r == 0) break;
        *got += (size_t)r;
    }
    return true;
}

static const char * gz_msg_(gzFile f) {
    int errnum = Z_OK;
    const char * m = gzerror(f, &errnum);
    if (errnum == Z_ERRNO) return strerror(errno);
    return (m && *m) ? m : "unknown error";
}

// Failure inside kd_idx_read: record, then clean up at `fail`.
#define IDX_FAIL_(stc, ...) do { st = kd_set_error_((stc), "kd_idx_read", __VA_ARGS__); goto fail; } while (0)

enum kd_status kd_idx_read(const char * path, uint8_t ** data, int * ndim, int64_t dims[4]) {
    if (data) *data = NULL;
    if (!path) KD_FAIL(KD_ERR_VALUE, "path is NULL");
    if (!data || !ndim || !dims) KD_FAIL(KD_ERR_VALUE, "data, ndim and dims must not be NULL");
    *ndim = 0;
    for (int d = 0; d < 4; d++) dims[d] = 0;

    enum kd_status st = KD_OK;
    uint8_t * buf = NULL;
    errno = 0;
    gzFile f = gzopen(path, "rb");
    if (!f) KD_FAIL(KD_ERR_IO, "cannot open '%s': %s", path, strerror(errno ? errno : ENOMEM));
    gzbuffer(f, 1u << 17);

    unsigned char hdr[4 + 4 * 4];
    size_t got = 0;
    if (!gz_read_all_(f, hdr, 4, &got)) IDX_FAIL_(KD_ERR_IO, "'%s': %s", path, gz_msg_(f));
    if (got < 4) IDX_FAIL_(KD_ERR_IO, "'%s': truncated header (%zu of 4 bytes)", path, got);
    if (hdr[0] != 0 || hdr[1] != 0)
        IDX_FAIL_(KD_ERR_IO, "'%s': bad magic %02x %02x %02x %02x (not an IDX file)", path,
                  hdr[0], hdr[1], hdr[2], hdr[3]);
    if (hdr[2] != 0x08)
        IDX_FAIL_(KD_ERR_IO, "'%s': unsupported IDX type 0x%02x (only 0x08, unsigned byte)", path, hdr[2]);
    const int nd = hdr[3];
    if (nd < 1 || nd > 4) IDX_FAIL_(KD_ERR_IO, "'%s': ndim = %d is not in 1..4", path, nd);
    const size_t hlen = 4 * (size_t)nd;
    if (!gz_read_all_(f, hdr + 4, hlen, &got)) IDX_FAIL_(KD_ERR_IO, "'%s': %s", path, gz_msg_(f));
    if (got < hlen) IDX_FAIL_(KD_ERR_IO, "'%s': truncated header (%zu of %zu bytes)", path, 4 + got, 4 + hlen);

    int64_t dd[4] = {0, 0, 0, 0};
    size_t total = 1;
    for (int d = 0; d < nd; d++) {
        const unsigned char * b = hdr + 4 + 4 * d;
        uint32_t v = (uint32_t)b[0] << 24 | (uint32_t)b[1] << 16 | (uint32_t)b[2] << 8 | (uint32_t)b[3];
        if (v == 0) IDX_FAIL_(KD_ERR_IO, "'%s': dimension %d is 0", path, d);
        dd[d] = v;
        if (!kd_mul_ok(total, v, &total) || total > IDX_MAX_BYTES_)
            IDX_FAIL_(KD_ERR_IO, "'%s': payload of more than 2^31 bytes (dimension %d = %u)", path, d, v);
    }

    // The header is not trusted with memory: 20 bytes may claim 2 GiB. The buffer grows
    // (doubling from 1 MiB) only as payload bytes actually arrive, so a truncated or hostile
    // file costs at most twice its real (decompressed) size.
    size_t have = 0, cap = 0;
    while (have < total) {
        if (have == cap) {
            size_t ncap = cap ? (cap > total / 2 ? total : 2 * cap) : (total < IDX_CHUNK_ ? total : IDX_CHUNK_);
            uint8_t * nb = realloc(buf, ncap);
            if (!nb) IDX_FAIL_(KD_ERR_NOMEM, "'%s': cannot allocate %zu bytes", path, ncap);
            buf = nb;
            cap = ncap;
        }
        if (!gz_read_all_(f, buf + have, cap - have, &got))
            IDX_FAIL_(KD_ERR_IO, "'%s': read error after %zu of %zu payload bytes: %s", path, have + got, total,
                      gz_msg_(f));
        have += got;
        if (have < cap) IDX_FAIL_(KD_ERR_IO, "'%s': truncated: %zu of %zu payload bytes", path, have, total);
    }
    // The payload must end the file: trailing bytes mean the header does not describe it.
    unsigned char extra[64];
    if (!gz_read_all_(f, extra, sizeof extra, &got))
        IDX_FAIL_(KD_ERR_IO, "'%s': read error after the payload: %s", path, gz_msg_(f));
    if (got > 0)
        IDX_FAIL_(KD_ERR_IO, "'%s': trailing data after the %zu payload bytes", path, total);
    const int zc = gzclose(f);
    f = NULL;
    if (zc != Z_OK) IDX_FAIL_(KD_ERR_IO, "'%s': error closing (zlib %d)", path, zc);

    *data = buf;
    *ndim = nd;
    for (int d = 0; d < 4; d++) dims[d] = dd[d];
    return KD_OK;
fail:
    if (f) gzclose(f);
    free(buf);
    return st;
}
