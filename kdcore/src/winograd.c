// Winograd F(2x2, 3x3) for the stride-1, ungrouped 3x3 convolutions (padding 0 or 1): the
// forward product and the input gradient (a 3x3 convolution of dout, padded by 2 - P, with
// the flipped, transposed kernel). conv.c decides when it runs (conv_plan_make); the weight
// gradient stays on conv.c's paths.
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
