// Winograd F(2x2, 3x3) for the stride-1, ungrouped 3x3 convolutions (padding 0 or 1): the
// forward product, the input gradient (a 3x3 convolution of dout, padded by 2 - P, with
// the flipped, transposed kernel) and the weight gradient (kd_wino_dweight, at the end).
// conv.c decides when it runs (conv_plan_make).
//
// Per 4x4 input tile d (2x2 output tile, tile origin 2*t - pad; positions outside the input
// read zero): V = B^T d B, U = G g G^T per (output, input) channel pair, then for each of the
// 16 positions xi of the transformed tile an independent product M_xi (Co x tiles) =
// U_xi (Co x Ci) V_xi (Ci x tiles) on the forward micro-kernel (fwd_ukr, panels of 8 rows x
// 32 tiles), and Y = A^T M A, which keeps the valid 2x2 outputs. Each element of a product is
// one fma chain over the input channels in order, and the transforms are plain C compiled once
// (only additions, subtractions and exact multiplications by 0.5, so -ffp-contract cannot
// fuse anything): the result does not depend on the instruction set, the thread count, or
// where a tile lands in a block.
//
// Work: each thread takes a contiguous share of the batch (as conv.c) and runs its tiles,
// across image boundaries, in blocks of nb tiles (a multiple of the micro-kernel's 32), so
// that the block's transformed input and products stay near L2. Each image is first copied
// into a zero-padded buffer, so that the input transform reads whole vectors without edge
// cases; the transforms run 8 tiles per vector.
//
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1]
//   G   = [1 0 0; 1/2 1/2 1/2; 1/2 -1/2 1/2; 0 0 1]
//   A^T = [1 1 1 0; 0 1 -1 -1]

#include "kernels.h"

// KDCORE_WINOGRAD: unset, empty, "1" or "on" enable it (where the shape rule picks it), "0" or
// "off" disable it. Read once.
static pthread_once_t wino_once = PTHREAD_ONCE_INIT;
static int wino_on = 1, wino_env_bad = 0;
static char wino_env[40];

static void wino_read_env_once(void) {
    const char * e = getenv("KDCORE_WINOGRAD");
    if (e == NULL) { return; }
    snprintf(wino_env, sizeof wino_env, "%s", e);
    if (strcmp(e, "0") == 0 || strcasecmp(e, "off") == 0) { wino_on = 0; }
    else if (!(e[0] == '\0' || strcmp(e, "1") == 0 || strcasecmp(e, "on") == 0)) { wino_env_bad = 1; }
}

static int wino_read_env(void) {
    pthread_once(&wino_once, wino_read_env_once);
    return wino_on;
}

int kd_wino_enabled(void) { return wino_read_env(); }

const char * kd_winograd_config(void) {
    static _Thread_local char buf[200];
    int on = wino_read_env();
    if (wino_env_bad) {
        snprintf(buf, sizeof buf, "on (KDCORE_WINOGRAD=%s not understood: 0/off or 1/on; taken as on)", wino_env);
    } else if (wino_env[0] != '\0') {
        snprintf(buf, sizeof buf, "%s (KDCORE_WINOGRAD=%s)", on ? "on" : "off", wino_env);
    } else {
        snprintf(buf, sizeof buf, "on (KDCORE_WINOGRAD unset)");
    }
    if (on) {
        size_t n = strlen(buf);
        snprintf(buf + n, sizeof buf - n, "; F(2x2,3x3) for stride-1 3x3 convs with %s", KD_WINO_RULE_TEXT);
    }
    return buf;
}

int kd_wino_eligible(const struct kd_conv_shape * s) {
    return s->K == 3 && s->S == 1 && s->G == 1 && s->P >= 0 && s->P <= 1 && s->OH >= 1 && s->OW >= 1;
}

// Floats of a row buffer for n tiles: the vector loops below run in whole groups of 8 tiles
// and read 2 columns past them (2*round_up(n, 8) + 2 <= this, a multiple of 8).
static inline size_t wino_rowlen(size_t n) { return 2 * round_up(n, 8) + 8; }

// Tiles per block for a product of up to ci input and co output channels: the block's
// transformed input (16 ci nb) and products (16 co nb) within about 2 x CV_L2_FLOATS.
static size_t wino_block(size_t ci, size_t co) {
    size_t nb = 2 * CV_L2_FLOATS / (16 * zmax(ci + co, 1)) / CV_NR * CV_NR;
    return zmin(zmax(nb, CV_NR), 8 * CV_NR);
}

// Sizes for both directions (forward: C -> OC over OH x OW; input gradient: OC -> C over H x W).
int kd_wino_plan(const struct kd_conv_shape * s, struct wino_plan * w) {
    int bad = 0;
    memset(w, 0, sizeof *w);
    size_t C = (size_t)s->C, OC = (size_t)s->OC;
    size_t cmax = zmax(C, OC), cpmax = round_up(cmax, CV_MR);
    w->nb = wino_block(cmax, cmax);
    size_t tw = ((size_t)zmax((size_t)s->W, (size_t)s->OW) + 1) / 2;   // tiles per row, both directions
    size_t top = 0;
    // shared: U packed for the larger direction, and the row offsets of V_xi
    size_t un = smul(&bad, 16, zmax(smul(&bad, round_up(OC, CV_MR), C), smul(&bad, round_up(C, CV_MR), OC)));
    w->u_off = sreserve(&bad, &top, un);
    w->o_off = sreserve(&bad, &top, smul(&bad, cmax, sizeof(ptrdiff_t) / sizeof(float)));
    w->shared = top;
    top = 0;
    w->v_off = sreserve(&bad, &top, smul(&bad, smul(&bad, 16, cmax), w->nb + 8));   // row stride nb + 8
    // the zero-padded input image: ci planes of (2*th + 2) rows of wino_rowlen(tw) floats
    size_t pf = smul(&bad, C, smul(&bad, (size_t)(s->OH + 1) / 2 * 2 + 2, wino_rowlen(((size_t)s->OW + 1) / 2)));
    size_t pb = smul(&bad, OC, smul(&bad, (size_t)(s->H + 1) / 2 * 2 + 2, wino_rowlen(((size_t)s->W + 1) / 2)));
    w->p_n = sadd(&bad, zmax(pf, pb), 16);   // the last row's groups of 8 tiles read up to 14 floats past it
    w->p_off = sreserve(&bad, &top, w->p_n);
    w->m_n = sadd(&bad, smul(&bad, smul(&bad, 16, cpmax), w->nb), 8);                 // + slack of output_tile8
    w->m_off = sreserve(&bad, &top, w->m_n);
    w->r_off = sreserve(&bad, &top, smul(&bad, 4, wino_rowlen(tw)));    // B^T d, 4 rows
    w->y_off = sreserve(&bad, &top, 16);                                // a partial output group
    w->per = top;
    // The weight gradient's own region (conv.c places it past the slot's other regions: a
    // unit's gradient partial lives there while the unit runs).
    w->ldb = round_up(C, CV_NR);
    w->ocp = round_up(OC, CV_MR);
    size_t nbw = CV_L2_FLOATS / (16 * zmax(w->ldb + w->ocp, 1)) / 16 * 16;
    w->nbw = (int)zmin(zmax(nbw, 16), 128);
    size_t th = ((size_t)s->OH + 1) / 2, tw2 = ((size_t)s->OW + 1) / 2;
    top = 0;
    w->du_off = sreserve(&bad, &top, smul(&bad, 16, smul(&bad, w->ocp, w->ldb)));
    w->dz_off = sreserve(&bad, &top, smul(&bad, 16, smul(&bad, w->ocp, (size_t)w->nbw)));
    w->dv_off = sreserve(&bad, &top, smul(&bad, 16, smul(&bad, (size_t)w->nbw, w->ldb)));
    w->xh_n = smul(&bad, smul(&bad, 2 * th + 2, 2 * tw2 + 2), w->ldb);
    w->xh_off = sreserve(&bad, &top, w->xh_n);
    w->yh_n = smul(&bad, smul(&bad, 2 * th, 2 * tw2), w->ocp);
    w->yh_off = sreserve(&bad, &top, w->yh_n);
    w->dk_off = sreserve(&bad, &top, smul(&bad, (size_t)w->nbw, sizeof(ptrdiff_t) / sizeof(float)));
    w->dw_per = top;
    return !bad;
}

// ---- transforms ----------------------------------------------------------------------------

// U = G g G^T for the 3x3 kernel g (row stride 3; flipped: g[2-kh][2-kw]).
static inline void kernel_transform(float u[16], const float * g, int flip) {
    float k[3][3], h[4][3];
    for (int a = 0; a < 3; a++) {
        for (int b = 0; b < 3; b++) { k[a][b] = flip ? g[(2 - a) * 3 + (2 - b)] : g[a * 3 + b]; }
    }
    for (int b = 0; b < 3; b++) {
        h[0][b] = k[0][b];
        h[1][b] = ((k[0][b] + k[1][b]) + k[2][b]) * 0.5f;
        h[2][b] = ((k[0][b] - k[1][b]) + k[2][b]) * 0.5f;
        h[3][b] = k[2][b];
    }
    for (int a = 0; a < 4; a++) {
        u[a * 4 + 0] = h[a][0];
        u[a * 4 + 1] = ((h[a][0] + h[a][1]) + h[a][2]) * 0.5f;
        u[a * 4 + 2] = ((h[a][0] - h[a][1]) + h[a][2]) * 0.5f;
        u[a * 4 + 3] = h[a][2];
    }
}

// Packed U for the product of direction dir (0: forward, rows oc, columns c; 1: input
// gradient, rows c, columns oc, kernel flipped): position xi at Ap + xi*cop*ci, in panels of 8
// rows [panel][column][8], zero rows past co. Called inside a parallel region (omp for; its
// closing barrier publishes the panels).
static void pack_u(float * Ap, const float * weight, int C, int OC, int dir) {
    int co = dir ? C : OC, ci = dir ? OC : C;
    size_t cop = round_up((size_t)co, CV_MR), npan = cop / CV_MR;
    #pragma omp for schedule(static)
    for (long t = 0; t < (long)npan; t++) {
        for (int c = 0; c < ci; c++) {
            for (int i = 0; i < CV_MR; i++) {
                int r = (int)t * CV_MR + i;
                float u[16] = {0};
                if (r < co) {
                    const float * g = dir ? weight + ((size_t)c * C + r) * 9 : weight + ((size_t)r * C + c) * 9;
                    kernel_transform(u, g, dir);
                }
                float * dst = Ap + (size_t)t * CV_MR * ci + (size_t)c * CV_MR + i;
                for (int xi = 0; xi < 16; xi++) { dst[(size_t)xi * cop * ci] = u[xi]; }
            }
        }
    }
}

struct wino_dims { int ci, hi, wi, co, ho, wo, pad, th, tw; };

#ifdef __AVX2__
typedef __m256 v8f;
static inline v8f v8_load(const float * p) { return _mm256_loadu_ps(p); }
static inline void v8_store(float * p, v8f a) { _mm256_storeu_ps(p, a); }
static inline v8f v8_add(v8f a, v8f b) { return _mm256_add_ps(a, b); }
static inline v8f v8_sub(v8f a, v8f b) { return _mm256_sub_ps(a, b); }
static inline v8f v8_set1(float a) { return _mm256_set1_ps(a); }
// Even and odd elements of p[0..15]: the tiles' columns 0 and 1 (from p) or 2 and 3 (p + 2).
static inline void deinterleave(const float * p, v8f * ev, v8f * od) {
    __m256 a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + 8);
    *ev = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0x88)), 0xD8));
    *od = _mm256_castpd_ps(_mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, 0xDD)), 0xD8));
}
// a[0] b[0] a[1] b[1] ... a[7] b[7] as two vectors
static inline void interleave(v8f a, v8f b, v8f * lo, v8f * hi) {
    __m256 l = _mm256_unpacklo_ps(a, b), h = _mm256_unpackhi_ps(a, b);
    *lo = _mm256_permute2f128_ps(l, h, 0x20);
    *hi = _mm256_permute2f128_ps(l, h, 0x31);
}
#else
// The same operations on plain arrays, for builds without AVX2.
typedef struct { float f[8]; } v8f;
static inline v8f v8_load(const float * p) { v8f r; memcpy(r.f, p, sizeof r.f); return r; }
static inline void v8_store(float * p, v8f a) { memcpy(p, a.f, sizeof a.f); }
static inline v8f v8_add(v8f a, v8f b) { for (int i = 0; i < 8; i++) { a.f[i] += b.f[i]; } return a; }
static inline v8f v8_sub(v8f a, v8f b) { for (int i = 0; i < 8; i++) { a.f[i] -= b.f[i]; } return a; }
static inline v8f v8_set1(float x) { v8f r; for (int i = 0; i < 8; i++) { r.f[i] = x; } return r; }
static inline void deinterleave(const float * p, v8f * ev, v8f * od) {
    for (int i = 0; i < 8; i++) { ev->f[i] = p[2 * i]; od->f[i] = p[2 * i + 1]; }
}
static inline void interleave(v8f a, v8f b, v8f * lo, v8f * hi) {
    for (int i = 0; i < 4; i++) {
        lo->f[2 * i] = a.f[i]; lo->f[2 * i + 1] = b.f[i];
        hi->f[2 * i] = a.f[4 + i]; hi->f[2 * i + 1] = b.f[4 + i];
    }
}
#endif

// V_xi[c][col + j] (row stride ldv, position xi at v + xi*ci*ldv) for the n tiles (row th,
// columns tw0 .. tw0+n-1) of the zero-padded image xp (ci planes of plane floats, row stride
// wp; tile (th, tw) at row 2*th, column 2*tw). Stores run in whole groups of 8 tiles: the
// columns past the n tiles (at most 7, within the row's slack of 8) are overwritten by the
// next segment or are past the block's last tile (read by the product and dropped).
static void input_transform(float * v, size_t ldv, size_t col, const float * xp, size_t plane, size_t wp, int ci,
                            int th, int tw0, int n, float * rows) {
    size_t vs = (size_t)ci * ldv, rl = wino_rowlen((size_t)n);
    float * e0 = rows, * e1 = rows + rl, * e2 = rows + 2 * rl, * e3 = rows + 3 * rl;
    for (int c = 0; c < ci; c++) {
        const float * r0 = xp + (size_t)c * plane + (size_t)(2 * th) * wp + 2 * (size_t)tw0;
        const float * r1 = r0 + wp, * r2 = r1 + wp, * r3 = r2 + wp;
        // B^T d: the rows
        for (size_t k = 0; k < rl; k += 8) {
            v8f d0 = v8_load(r0 + k), d1 = v8_load(r1 + k), d2 = v8_load(r2 + k), d3 = v8_load(r3 + k);
            v8_store(e0 + k, v8_sub(d0, d2));
            v8_store(e1 + k, v8_add(d1, d2));
            v8_store(e2 + k, v8_sub(d2, d1));
            v8_store(e3 + k, v8_sub(d1, d3));
        }
        // (B^T d) B: the columns of each tile
        float * vc = v + (size_t)c * ldv + col;
        for (int a = 0; a < 4; a++) {
            const float * q = rows + (size_t)a * rl;
            float * v0 = vc + (size_t)(4 * a) * vs, * v1 = v0 + vs, * v2 = v1 + vs, * v3 = v2 + vs;
            for (int j = 0; j < n; j += 8) {
                v8f q0, q1, q2, q3;
                deinterleave(q + 2 * j, &q0, &q1);
                deinterleave(q + 2 * j + 2, &q2, &q3);
                v8_store(v0 + j, v8_sub(q0, q2));
                v8_store(v1 + j, v8_add(q1, q2));
                v8_store(v2 + j, v8_sub(q2, q1));
                v8_store(v3 + j, v8_sub(q1, q3));
            }
        }
    }
}

// Y = A^T M A for tiles j0 .. j0+7 of output channel row mo (M_xi at mo + xi*ms): y[0], y[1]
// the output row 2*th of the 8 tiles (tile j's two columns at 2j, 2j+1), y[2], y[3] row 2*th+1.
static inline void output_tile8(v8f y[4], const float * mo, size_t ms, int j0) {
    v8f u0[4], u1[4];
    for (int a = 0; a < 4; a++) {
        const float * q = mo + (size_t)(4 * a) * ms + j0;
        v8f q0 = v8_load(q), q1 = v8_load(q + ms), q2 = v8_load(q + 2 * ms), q3 = v8_load(q + 3 * ms);
        u0[a] = v8_add(v8_add(q0, q1), q2);
        u1[a] = v8_sub(v8_sub(q1, q2), q3);
    }
    v8f a0 = v8_add(v8_add(u0[0], u0[1]), u0[2]);
    v8f a1 = v8_add(v8_add(u1[0], u1[1]), u1[2]);
    v8f b0 = v8_sub(v8_sub(u0[1], u0[2]), u0[3]);
    v8f b1 = v8_sub(v8_sub(u1[1], u1[2]), u1[3]);
    interleave(a0, a1, &y[0], &y[1]);
    interleave(b0, b1, &y[2], &y[3]);
}

// dst[0..15] = y (+ bias) or += y
static inline void store16(float * dst, v8f lo, v8f hi, int acc, int has_bias, v8f bv) {
    if (acc) { lo = v8_add(v8_load(dst), lo); hi = v8_add(v8_load(dst + 8), hi); }
    else if (has_bias) { lo = v8_add(lo, bv); hi = v8_add(hi, bv); }
    v8_store(dst, lo);
    v8_store(dst + 8, hi);
}

// Y = A^T M A for the n tiles at block column col (M_xi at m + xi*cop*nb, row stride nb) into
// the output plane rows 2*th, 2*th+1 of every output channel: y = result + bias[o] (acc 0) or
// y += result (acc 1). M is readable 8 columns past each row's last tile (its slack).
static void output_transform(float * y, const float * m, size_t nb, size_t cop, size_t col, const struct wino_dims * d,
                             int th, int tw0, int n, const float * bias, int acc, float * rows) {
    size_t HW = (size_t)d->ho * d->wo, ms = cop * nb;
    int c0 = 2 * tw0, nc = imin(2 * n, d->wo - c0);
    int h0 = 2 * th, nr = imin(2, d->ho - h0);
    for (int o = 0; o < d->co; o++) {
        const float * mo = m + (size_t)o * nb + col;
        float * dst = y + (size_t)o * HW + (size_t)h0 * d->wo + c0;
        float bf = bias != NULL ? bias[o] : 0.0f;
        v8f bv = v8_set1(bf);
        for (int j = 0; j < n; j += 8) {
            v8f t[4];
            output_tile8(t, mo, ms, j);
            for (int r = 0; r < nr; r++) {
                float * dr = dst + (size_t)r * d->wo + 2 * j;
                int cnt = nc - 2 * j;
                if (cnt >= 16) {
                    store16(dr, t[2 * r], t[2 * r + 1], acc, bias != NULL, bv);
                    continue;
                }
                // the last, partial group: 8 columns at once if there are, the rest through a
                // buffer, the same operation per element
                v8f rest = t[2 * r];
                if (cnt >= 8) {
                    v8f u = acc ? v8_add(v8_load(dr), rest) : bias != NULL ? v8_add(rest, bv) : rest;
                    v8_store(dr, u);
                    dr += 8; cnt -= 8; rest = t[2 * r + 1];
                }
                v8_store(rows, rest);
                if (acc) { for (int k = 0; k < cnt; k++) { dr[k] = dr[k] + rows[k]; } }
                else if (bias != NULL) { for (int k = 0; k < cnt; k++) { dr[k] = rows[k] + bf; } }
                else { for (int k = 0; k < cnt; k++) { dr[k] = rows[k]; } }
            }
        }
    }
}

// ---- the driver ----------------------------------------------------------------------------

// y (N, co, ho, wo) {=, +=} conv3x3(x (N, ci, hi, wi) padded by pad) with packed U at Ap.
// ws: the workspace's shared part at ws, thread t's at ws + shared + t*per.
static void wino_run(float * y, const float * x, int N, const struct wino_dims * d, const float * bias, int acc,
                     const struct wino_plan * w, float * ws, size_t per, size_t shared, const float * Ap,
                     const ptrdiff_t * off, fwd_ukr_fn ukr) {
    size_t nb = (size_t)w->nb, ci = (size_t)d->ci, cop = round_up((size_t)d->co, CV_MR), mpan = cop / CV_MR;
    size_t T = (size_t)d->th * d->tw, HWi = (size_t)d->hi * d->wi, HWo = (size_t)d->ho * d->wo;
    int kc = k_chunk(ci, cop, CV_L2_FLOATS);
    int n0, n1;
    batch_chunk(&n0, &n1, N, kd_omp_tid(), kd_omp_team());
    float * tw = ws + shared + (size_t)kd_omp_tid() * per;
    float * v = tw + w->v_off, * m = tw + w->m_off, * rows = tw + w->r_off, * yrow = tw + w->y_off;
    float * xp = tw + w->p_off;
    size_t ldv = nb + 8, wp = wino_rowlen((size_t)d->tw), hp = 2 * (size_t)d->th + 2, plane = hp * wp;
    if (n0 >= n1) { return; }
    // Zeroed once: the padded image's border (never written afterwards), the columns of V past
    // a short last block (read by the micro-kernel and dropped) and M's slack must be finite.
    memset(v, 0, 16 * ci * ldv * sizeof(float));
    memset(m, 0, w->m_n * sizeof(float));
    memset(xp, 0, w->p_n * sizeof(float));
    size_t cur = SIZE_MAX;     // the image in xp
    size_t total = (size_t)(n1 - n0) * T;
    for (size_t b0 = 0; b0 < total; b0 += nb) {
        size_t b1 = zmin(total, b0 + nb), npix = round_up(b1 - b0, CV_NR);
        for (size_t g = b0; g < b1;) {
            size_t img = (size_t)n0 + g / T, t = g % T;
            int th = (int)(t / (size_t)d->tw), tw0 = (int)(t % (size_t)d->tw);
            int n = (int)zmin((size_t)(d->tw - tw0), b1 - g);
            if (img != cur) {
                for (size_t c = 0; c < ci; c++) {
                    const float * src = x + (img * ci + c) * HWi;
                    float * dst = xp + c * plane + (size_t)d->pad * wp + (size_t)d->pad;
                    for (int h = 0; h < d->hi; h++) {
                        memcpy(dst + (size_t)h * wp, src + (size_t)h * d->wi, (size_t)d->wi * sizeof(float));
                    }
                }
                cur = img;
            }
            input_transform(v, ldv, g - b0, xp, plane, wp, d->ci, th, tw0, n, rows);
            g += (size_t)n;
        }
        for (int xi = 0; xi < 16; xi++) {
            const float * A = Ap + (size_t)xi * cop * ci, * B = v + (size_t)xi * ci * ldv;
            float * Cm = m + (size_t)xi * cop * nb;
            for (int k0 = 0; k0 < (int)ci; k0 += kc) {
                int kn = imin(kc, (int)ci - k0);
                for (size_t j = 0; j < npix; j += CV_NR) {
                    for (size_t mp = 0; mp < mpan; mp++) {
                        ukr(kn, A + mp * CV_MR * ci + (size_t)k0 * CV_MR, B + j, off + k0, Cm + mp * CV_MR * nb + j, nb,
                            k0 > 0);
                    }
                }
            }
        }
        for (size_t g = b0; g < b1;) {
            size_t img = (size_t)n0 + g / T, t = g % T;
            int th = (int)(t / (size_t)d->tw), tw0 = (int)(t % (size_t)d->tw);
            int n = (int)zmin((size_t)(d->tw - tw0), b1 - g);
            output_transform(y + img * (size_t)d->co * HWo, m, nb, cop, g - b0, d, th, tw0, n, bias, acc, yrow);
            g += (size_t)n;
        }
    }
}

static void wino_call(float * y, const float * x, const float * weight, const float * bias, int acc, int dir,
                      const struct kd_conv_shape * s, const struct wino_plan * w, float * ws, size_t shared,
                      size_t per) {
    struct wino_dims d;
    if (dir == 0) {
        d = (struct wino_dims){ s->C, s->H, s->W, s->OC, s->OH, s->OW, s->P, 0, 0 };
    } else {
        d = (struct wino_dims){ s->OC, s->OH, s->OW, s->C, s->H, s->W, 2 - s->P, 0, 0 };
    }
    d.th = (d.ho + 1) / 2;
    d.tw = (d.wo + 1) / 2;
    float * Ap = ws + w->u_off;
    ptrdiff_t * off = (ptrdiff_t *)(ws + w->o_off);
    for (int k = 0; k < d.ci; k++) { off[k] = (ptrdiff_t)((size_t)k * ((size_t)w->nb + 8)); }
    fwd_ukr_fn ukr = kd_conv_kernels().fwd;
    #pragma omp parallel
    {
        pack_u(Ap, weight, s->C, s->OC, dir);
        wino_run(y, x, s->N, &d, bias, acc, w, ws, per, shared, Ap, off, ukr);
    }
}

void kd_wino_forward(float * out, const float * inp, const float * weight, const float * bias,
                     const struct kd_conv_shape * s, const struct wino_plan * w, float * ws, size_t shared, size_t per) {
    wino_call(out, inp, weight, bias, 0, 0, s, w, ws, shared, per);
}

void kd_wino_dinp(float * dinp, const float * dout, const float * weight, const struct kd_conv_shape * s,
                  const struct wino_plan * w, float * ws, size_t shared, size_t per) {
    wino_call(dinp, dout, weight, NULL, 1, 1, s, w, ws, shared, per);
}

// ---- the weight gradient -------------------------------------------------------------------
//
// With U = G g G^T, V = B^T d B and y = A^T (U . V) A per tile, dL/dU = sum over tiles of
// (A dy A^T) . V, and dL/dg = G^T (dL/dU) G. So per position xi: dU_xi (Co x Ci) = Z_xi V_xi^T
// over all the tiles of the unit's images, with Z = A dy A^T (dy the tile's 2x2 output
// gradient; zero outside the output) -- 16 products of inner dimension "tiles" in place of the
// direct path's 9 of inner dimension "4 x tiles". They run on the forward micro-kernel: Z_xi in
// panels of 8 output channels ([tile][8]), V_xi^T row per tile with the input channels
// contiguous, so each element of dU is one fma chain over the tiles in order (continued across
// blocks through dU: a float store and reload is exact), as in the forward product: the result
// does not depend on the instruction set. The transforms work on 8 channels per vector, from
// the current image copied channel-last (HWC) into zero-padded buffers.

#ifdef __AVX2__
// p[0 .. n-1] (n < 8), zero in the other lanes, reading nothing past p + n
static inline v8f v8_load_first(const float * p, int n) {
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_maskload_ps(p, _mm256_cmpgt_epi32(_mm256_set1_epi32(n), idx));
}
// r[j][i] = a[i][j] for the 8x8 block in r[0..7]
static inline void transpose8(v8f r[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);
    }
    for (int i = 0; i < 4; i++) {
        r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}
#else
static inline v8f v8_load_first(const float * p, int n) {
    v8f r = v8_set1(0.0f);
    memcpy(r.f, p, (size_t)n * sizeof(float));
    return r;
}
static inline void transpose8(v8f r[8]) {
    v8f t[8];
    for (int i = 0; i < 8; i++) {
        for (int j = 0; j < 8; j++) { t[j].f[i] = r[i].f[j]; }
    }
    memcpy(r, t, sizeof t);
}
#endif

// Image (ch, rows, cols) -> channel-last dst[((r0 + h) * wd + c0 + w) * ld + c] (the rest of
// dst, zeroed once, stays zero): 8 channels x 8 columns per transposed block, the edges one
// float at a time.
static void to_hwc(float * dst, size_t wd, size_t ld, int r0, int c0, const float * src, int ch, int rows, int cols) {
    size_t plane = (size_t)rows * cols;
    int ch8 = ch / 8 * 8, cols8 = cols / 8 * 8;
    for (int h = 0; h < rows; h++) {
        float * drow = dst + ((size_t)(r0 + h) * wd + (size_t)c0) * ld;
        const float * srow = src + (size_t)h * cols;
        for (int c = 0; c < ch8; c += 8) {
            for (int w = 0; w < cols8; w += 8) {
                v8f r[8];
                for (int i = 0; i < 8; i++) { r[i] = v8_load(srow + (size_t)(c + i) * plane + w); }
                transpose8(r);
                for (int j = 0; j < 8; j++) { v8_store(drow + (size_t)(w + j) * ld + c, r[j]); }
            }
            if (cols8 < cols) {
                // the last columns: a block read with a mask (it must not read past the plane)
                int rem = cols - cols8;
                v8f r[8];
                for (int i = 0; i < 8; i++) { r[i] = v8_load_first(srow + (size_t)(c + i) * plane + cols8, rem); }
                transpose8(r);
                for (int j = 0; j < rem; j++) { v8_store(drow + (size_t)(cols8 + j) * ld + c, r[j]); }
            }
        }
        for (int c = ch8; c < ch; c++) {
            for (int w = 0; w < cols; w++) { drow[(size_t)w * ld + c] = srow[(size_t)c * plane + w]; }
        }
    }
}

// V^T for one tile: the 4x4 input patch at xt (pixel (i, j) at xt + (i*wd + j)*ld, channels
// contiguous), channels 0 .. ld-1 in vectors of 8; position xi stored at v + xi*vs.
static void tile_v(float * v, size_t vs, const float * xt, size_t wd, size_t ld) {
    for (size_t c = 0; c < ld; c += 8) {
        v8f d[4][4], e[4][4];
        for (int i = 0; i < 4; i++) {
            for (int j = 0; j < 4; j++) { d[i][j] = v8_load(xt + ((size_t)i * wd + (size_t)j) * ld + c); }
        }
        for (int j = 0; j < 4; j++) {
            e[0][j] = v8_sub(d[0][j], d[2][j]);
            e[1][j] = v8_add(d[1][j], d[2][j]);
            e[2][j] = v8_sub(d[2][j], d[1][j]);
            e[3][j] = v8_sub(d[1][j], d[3][j]);
        }
        for (int a = 0; a < 4; a++) {
            float * p = v + (size_t)(4 * a) * vs + c;
            v8_store(p, v8_sub(e[a][0], e[a][2]));
            v8_store(p + vs, v8_add(e[a][1], e[a][2]));
            v8_store(p + 2 * vs, v8_sub(e[a][2], e[a][1]));
            v8_store(p + 3 * vs, v8_sub(e[a][1], e[a][3]));
        }
    }
}

// Z = A dy A^T for one tile: the 2x2 output gradient at yt (pixel (i, j) at yt + (i*wd + j)*ld),
// output channels in vectors of 8; channels o .. o+7 of position xi stored at
// z + xi*zs + (o/8)*pn, i.e. panel o/8 of the micro-kernel's layout [panel][tile][8] (pn = 8 x
// tiles per block).
static void tile_z(float * z, size_t zs, size_t pn, const float * yt, size_t wd, size_t ld) {
    const v8f zero = v8_set1(0.0f);
    for (size_t o = 0; o < ld; o += 8) {
        v8f y00 = v8_load(yt + o), y01 = v8_load(yt + ld + o);
        v8f y10 = v8_load(yt + wd * ld + o), y11 = v8_load(yt + (wd + 1) * ld + o);
        v8f e[4][2] = { { y00, y01 }, { v8_add(y00, y10), v8_add(y01, y11) },
                        { v8_sub(y00, y10), v8_sub(y01, y11) }, { v8_sub(zero, y10), v8_sub(zero, y11) } };
        float * p = z + (o / 8) * pn;
        for (int a = 0; a < 4; a++) {
            float * q = p + (size_t)(4 * a) * zs;
            v8_store(q, e[a][0]);
            v8_store(q + zs, v8_add(e[a][0], e[a][1]));
            v8_store(q + 2 * zs, v8_sub(e[a][0], e[a][1]));
            v8_store(q + 3 * zs, v8_sub(zero, e[a][1]));
        }
    }
}

// dw (OC, C, 3, 3) = the weight gradient of images n0 .. n1-1 (n0 < n1), by one thread, with
// its scratch (the plan's dW region) at sc.
void kd_wino_dweight(float * dw, const float * dout, const float * inp, int n0, int n1,
                     const struct kd_conv_shape * s, const struct wino_plan * w, float * sc) {
    size_t C = (size_t)s->C, OC = (size_t)s->OC, ldb = w->ldb, ocp = w->ocp, nbw = (size_t)w->nbw;
    size_t th = ((size_t)s->OH + 1) / 2, tw = ((size_t)s->OW + 1) / 2, T = th * tw;
    size_t wx = 2 * tw + 2, wy = 2 * tw;
    size_t HW = (size_t)s->H * s->W, OHW = (size_t)s->OH * s->OW;
    float * du = sc + w->du_off, * zb = sc + w->dz_off, * vt = sc + w->dv_off;
    float * xh = sc + w->xh_off, * yh = sc + w->yh_off;
    ptrdiff_t * off = (ptrdiff_t *)(sc + w->dk_off);
    size_t zs = ocp * nbw, vs = nbw * ldb, us = ocp * ldb;
    for (size_t k = 0; k < nbw; k++) { off[k] = (ptrdiff_t)(k * ldb); }
    memset(xh, 0, w->xh_n * sizeof(float));
    memset(yh, 0, w->yh_n * sizeof(float));
    fwd_ukr_fn ukr = kd_conv_kernels().fwd;
    size_t total = (size_t)(n1 - n0) * T, cur = SIZE_MAX;
    for (size_t b0 = 0; b0 < total; b0 += nbw) {
        size_t nt = zmin(nbw, total - b0);
        for (size_t k = 0; k < nt; k++) {
            size_t img = (size_t)n0 + (b0 + k) / T, t = (b0 + k) % T, ti = t / tw, tj = t % tw;
            if (img != cur) {
                to_hwc(xh, wx, ldb, s->P, s->P, inp + img * C * HW, s->C, s->H, s->W);
                to_hwc(yh, wy, ocp, 0, 0, dout + img * OC * OHW, s->OC, s->OH, s->OW);
                cur = img;
            }
            tile_v(vt + k * ldb, vs, xh + (2 * ti * wx + 2 * tj) * ldb, wx, ldb);
            tile_z(zb + k * CV_MR, zs, CV_MR * nbw, yh + (2 * ti * wy + 2 * tj) * ocp, wy, ocp);
        }
        for (int xi = 0; xi < 16; xi++) {
            const float * A = zb + (size_t)xi * zs, * B = vt + (size_t)xi * vs;
            float * U = du + (size_t)xi * us;
            for (size_t j = 0; j < ldb; j += CV_NR) {
                for (size_t p = 0; p < ocp; p += CV_MR) {
                    ukr((int)nt, A + p * nbw, B + j, off, U + p * ldb + j, ldb, b0 > 0);
                }
            }
        }
    }
    // dW = G^T dU G (additions and exact halvings only)
    for (size_t o = 0; o < OC; o++) {
        for (size_t c = 0; c < C; c++) {
            float u[4][4], h[3][4];
            for (int xi = 0; xi < 16; xi++) { u[xi / 4][xi % 4] = du[(size_t)xi * us + o * ldb + c]; }
            for (int b = 0; b < 4; b++) {
                float sp = (u[1][b] + u[2][b]) * 0.5f;
                h[0][b] = u[0][b] + sp;
                h[1][b] = (u[1][b] - u[2][b]) * 0.5f;
                h[2][b] = sp + u[3][b];
            }
            float * g = dw + (o * C + c) * 9;
            for (int i = 0; i < 3; i++) {
                float sp = (h[i][1] + h[i][2]) * 0.5f;
                g[3 * i + 0] = h[i][0] + sp;
                g[3 * i + 1] = (h[i][1] - h[i][2]) * 0.5f;
                g[3 * i + 2] = sp + h[i][3];
            }
        }
    }
}
