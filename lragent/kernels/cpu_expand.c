/* Fused gather + low-rank expansion (+ RoPE) of cache rows, the CPU fast path's hot loop in the low-rank modes.

   For t in [t0, t1):   l = lk[lk_tok[t], :]   (row t itself without an index), times P [r, q] when given
                        x = sum_j l[j] * Q[j, :]                                       (one row, W = H_kv * D)
                        out[t, :] = src[tok[t], :] + RoPE_t(x)      (cos != 0)
                        out[t, :] = src[tok[t], :] + x              (cos == 0)
   RoPE_t per head, HF rotate_half layout (halves x1 | x2):
                        [x1 * cos[:D/2] - x2 * sin[:D/2] | x2 * cos[D/2:] + x1 * sin[D/2:]]
   with cos/sin the row t of a table of row stride cs_stride (the first D entries are used). With qv (H = H_kv * gq
   query heads of D), the decode scores of the new key row come along while it is in L1:
                        sc[hq * s_stride + t] = scale * qv[hq] . out[t, head hq / gq]

   x is never stored: each pair of column blocks (i, i + D/2) of a head is accumulated in registers over the q rank
   columns and written once, so a row costs one read of the cache row and of its low-rank row, r*q + q*W
   multiply-adds and one write (no gathered copy of the low-rank rows, no separate l P pass). Built by
   cpu_native.py with the machine's compiler (-O3, -march=native where it works), called through ctypes (which
   releases the GIL, so row ranges can run on several threads). */
#include "cpu_vec.h"

#define PF 2                                           /* rows prefetched ahead */
#define NV 4                                           /* vectors per half-block: 32 columns of each half */
#define QMAX 256                                       /* the most rank columns l P may have (cpu_native.py) */


/* columns c1 + [0, m) and c2 + [0, m) (c2 = c1 + D/2; i = c1's offset in its head) of one row, m = 8 * NV */
static inline void block_v(const float *restrict s, const float *restrict l, int64_t q, const float *restrict Q,
                           int64_t w, const float *restrict cr, const float *restrict sr, int64_t c1, int64_t c2,
                           int64_t i, float *restrict o)
{
    v8 a[NV], b[NV];
    for (int v = 0; v < NV; v++) { a[v] = (v8){0}; b[v] = (v8){0}; }
    for (int64_t j = 0; j < q; j++) {
        const v8 lj = (v8){0} + l[j];
        const float *q1 = Q + j * w + c1, *q2 = Q + j * w + c2;
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) { a[v] += lj * ld(q1 + 8 * v); b[v] += lj * ld(q2 + 8 * v); }
    }
    const int64_t h2 = c2 - c1;
#pragma GCC unroll 4
    for (int v = 0; v < NV; v++) {
        const int64_t k = 8 * v;
        if (cr) {
            st(o + c1 + k, ld(s + c1 + k) + a[v] * ld(cr + i + k) - b[v] * ld(sr + i + k));
            st(o + c2 + k, ld(s + c2 + k) + b[v] * ld(cr + h2 + i + k) + a[v] * ld(sr + h2 + i + k));
        } else {
            st(o + c1 + k, ld(s + c1 + k) + a[v]);
            st(o + c2 + k, ld(s + c2 + k) + b[v]);
        }
    }
}

/* the same for columns c1 + [0, m), c2 + [0, m), any m, one at a time */
static void block_s(const float *s, const float *l, int64_t q, const float *Q, int64_t w, const float *cr,
                    const float *sr, int64_t c1, int64_t c2, int64_t i, int64_t m, float *o)
{
    const int64_t h2 = c2 - c1;
    for (int64_t k = 0; k < m; k++) {
        float a = 0.f, b = 0.f;
        for (int64_t j = 0; j < q; j++) { a += l[j] * Q[j * w + c1 + k]; b += l[j] * Q[j * w + c2 + k]; }
        if (cr) {
            o[c1 + k] = s[c1 + k] + a * cr[i + k] - b * sr[i + k];
            o[c2 + k] = s[c2 + k] + b * cr[h2 + i + k] + a * sr[h2 + i + k];
        } else {
            o[c1 + k] = s[c1 + k] + a;
            o[c2 + k] = s[c2 + k] + b;
        }
    }
}

/* lp[0, q) = l[0, r) @ P [r, q]: per 8 columns, four partial sums over j (independent FMA chains) */
static void times_p(const float *restrict l, const float *restrict P, int64_t r, int64_t q, float *restrict lp)
{
    int64_t c = 0;
    for (; c + 8 <= q; c += 8) {
        v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
        int64_t j = 0;
        for (; j + 4 <= r; j += 4) {
            a0 += ((v8){0} + l[j]) * ld(P + j * q + c);
            a1 += ((v8){0} + l[j + 1]) * ld(P + (j + 1) * q + c);
            a2 += ((v8){0} + l[j + 2]) * ld(P + (j + 2) * q + c);
            a3 += ((v8){0} + l[j + 3]) * ld(P + (j + 3) * q + c);
        }
        for (; j < r; j++)
            a0 += ((v8){0} + l[j]) * ld(P + j * q + c);
        st(lp + c, (a0 + a1) + (a2 + a3));
    }
    for (; c < q; c++) {
        float a = 0.f;
        for (int64_t j = 0; j < r; j++)
            a += l[j] * P[j * q + c];
        lp[c] = a;
    }
}

void lragent_expand_rows(const float *src, const int64_t *tok, int64_t t0, int64_t t1, int64_t w, int64_t d,
                         const float *lk, int64_t lk_stride, const int64_t *lk_tok, const float *P, int64_t r,
                         int64_t q, const float *Q, const float *cos, const float *sin, int64_t cs_stride,
                         float *out, int64_t out_stride, const float *qv, int64_t gq, float scale, float *sc,
                         int64_t s_stride)
{
    const int64_t h2 = d / 2, m = 8 * NV;
    float lp[QMAX];
    for (int64_t t = t0; t < t1; t++) {
        const float *s = src + tok[t] * w, *l = lk + (lk_tok ? lk_tok[t] : t) * lk_stride;
        if (P) {
            times_p(l, P, r, q, lp);
            l = lp;
        }
        const float *cr = cos ? cos + t * cs_stride : 0, *sr = sin ? sin + t * cs_stride : 0;
        float *o = out + t * out_stride;
        if (t + PF < t1) {           /* the row PF ahead: its cache row is a scattered read the prefetcher misses */
            const char *ps = (const char *)(src + tok[t + PF] * w), *po = (const char *)(out + (t + PF) * out_stride);
            for (int64_t c = 0; c < w * 4; c += 64) { __builtin_prefetch(ps + c, 0, 3); __builtin_prefetch(po + c, 1, 3); }
            if (lk_tok) {
                const char *pl = (const char *)(lk + lk_tok[t + PF] * lk_stride);
                for (int64_t c = 0; c < r * 4; c += 64)
                    __builtin_prefetch(pl + c, 0, 3);
            }
        }
        for (int64_t g = 0; g < w; g += d) {
            int64_t i = 0;
            for (; i + m <= h2; i += m)
                block_v(s, l, q, Q, w, cr, sr, g + i, g + h2 + i, i, o);
            if (i < h2)
                block_s(s, l, q, Q, w, cr, sr, g + i, g + h2 + i, i, h2 - i, o);
            if (qv)
                group_scores(qv, g / d, gq, d, o + g, scale, sc + t, s_stride);
        }
    }
}
