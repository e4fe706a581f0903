/* Decode attention of one query position straight from cache rows, the CPU fast path's few-query loop.

   One sequence, H = H_kv * G query heads (head hq reads KV head hq / G), n key positions whose K and V rows are
   k[k_tok[t]] and v[v_tok[t]] (rows of H_kv * D floats, any row stride; a NULL index means row t itself):

     lragent_decode_scores:  s[hq, t] = scale * q[hq] . K_t[hq / G]        (s: H rows of stride s_stride)
     (the caller takes the softmax of each row of s in place: P)
     lragent_decode_values:  o[hq]    = sum_t P[hq, t] * V_t[hq / G]                  (o is [H, D])
                             pl[hq]   = sum_t P[hq, t] * L_t            (optional: the value term's P L_v, with
                                                                        L_t = lv[lv_tok[t], :r])

   Both walk the positions in order and read each cache row once, for the KV heads [k0, k1) (threads split the
   heads), so the rows are never gathered into a copy first. Built by cpu_native.py with cpu_expand.c. */

#include <string.h>

#include "cpu_vec.h"

#define PF 4                                           /* rows prefetched ahead */

static inline void prefetch_heads(const float *row, int64_t k0, int64_t k1, int64_t d)
{
    const char *p = (const char *)(row + k0 * d), *e = (const char *)(row + k1 * d);
    for (; p < e; p += 64)
        __builtin_prefetch(p, 0, 3);
}

void lragent_decode_scores(const float *q, int64_t g, int64_t d, const float *k, int64_t k_stride,
                           const int64_t *k_tok, int64_t n, float scale, float *s, int64_t s_stride, int64_t k0,
                           int64_t k1)
{
    for (int64_t t = 0; t < n; t++) {
        const float *row = k + (k_tok ? k_tok[t] : t) * k_stride;
        if (t + PF < n)
            prefetch_heads(k + (k_tok ? k_tok[t + PF] : t + PF) * k_stride, k0, k1, d);
        for (int64_t h = k0; h < k1; h++)
            group_scores(q, h, g, d, row + h * d, scale, s + t, s_stride);
    }
}

/* o[hq, c:c+16] += sum over the block's rows of P[hq, t] * V_t[h, c:c+16] for the m (<= 4) query heads from hq:
   the 2 x m accumulators stay in registers over the block */
static inline void values_block(const float *p, int64_t n, const float *const *rows, const int64_t *ts, int64_t nb,
                                int64_t hq, int64_t m, int64_t off, float *o, int64_t d)
{
    v8 a[4][2];
    for (int64_t j = 0; j < m; j++) { a[j][0] = ld(o + (hq + j) * d); a[j][1] = ld(o + (hq + j) * d + 8); }
    for (int64_t i = 0; i < nb; i++) {
        const v8 v0 = ld(rows[i] + off), v1 = ld(rows[i] + off + 8);
        for (int64_t j = 0; j < m; j++) {
            const v8 w = (v8){0} + p[(hq + j) * n + ts[i]];
            a[j][0] += w * v0;
            a[j][1] += w * v1;
        }
    }
    for (int64_t j = 0; j < m; j++) { st(o + (hq + j) * d, a[j][0]); st(o + (hq + j) * d + 8, a[j][1]); }
}

#define TB 16                                          /* positions per block of the value pass */

void lragent_decode_values(const float *p, int64_t g, int64_t d, const float *v, int64_t v_stride,
                           const int64_t *v_tok, int64_t n, float *o, const float *lv, int64_t lv_stride,
                           const int64_t *lv_tok, int64_t r, float *pl, int64_t k0, int64_t k1)
{
    const int64_t h0 = k0 * g, h1 = k1 * g;
    const int vec = d % 16 == 0;
    memset(o + h0 * d, 0, (size_t)((h1 - h0) * d) * sizeof(float));
    if (lv)
        memset(pl + h0 * r, 0, (size_t)((h1 - h0) * r) * sizeof(float));
    for (int64_t t0 = 0; t0 < n; t0 += TB) {
        const int64_t nb = n - t0 < TB ? n - t0 : TB;
        const float *rows[TB];
        int64_t ts[TB];
        for (int64_t i = 0; i < nb; i++) {
            ts[i] = t0 + i;
            rows[i] = v + (v_tok ? v_tok[t0 + i] : t0 + i) * v_stride;
        }
        if (t0 + TB < n)          /* the next block's rows */
            for (int64_t i = 0; i < TB && t0 + TB + i < n; i++)
                prefetch_heads(v + (v_tok ? v_tok[t0 + TB + i] : t0 + TB + i) * v_stride, k0, k1, d);
        for (int64_t h = k0; h < k1; h++) {
            for (int64_t gi = 0; gi < g; gi += 4) {
                const int64_t m = g - gi < 4 ? g - gi : 4, hq = h * g + gi;
                if (vec) {
                    for (int64_t c = 0; c < d; c += 16)
                        values_block(p, n, rows, ts, nb, hq, m, h * d + c, o + c, d);
                } else {
                    for (int64_t i = 0; i < nb; i++)
                        for (int64_t j = 0; j < m; j++)
                            for (int64_t c = 0; c < d; c++)
                                o[(hq + j) * d + c] += p[(hq + j) * n + ts[i]] * rows[i][h * d + c];
                }
            }
        }
        if (lv && r % 16 == 0) {    /* P L like P V: every query head reads the same L row */
            const float *lrows[TB];
            for (int64_t i = 0; i < nb; i++)
                lrows[i] = lv + (lv_tok ? lv_tok[t0 + i] : t0 + i) * lv_stride;
            for (int64_t hq = h0; hq < h1; hq += 4)
                for (int64_t c = 0; c < r; c += 16)
                    values_block(p, n, lrows, ts, nb, hq, h1 - hq < 4 ? h1 - hq : 4, c, pl + c, r);
        } else if (lv) {
            for (int64_t i = 0; i < nb; i++) {
                const float *lr = lv + (lv_tok ? lv_tok[t0 + i] : t0 + i) * lv_stride;
                for (int64_t hq = h0; hq < h1; hq++) {
                    const float w = p[hq * n + t0 + i];
                    for (int64_t c = 0; c < r; c++)
                        pl[hq * r + c] += w * lr[c];
                }
            }
        }
    }
}
