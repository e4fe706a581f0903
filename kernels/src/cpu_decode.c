/* Decode attention of one query position straight from cache rows, the CPU fast path's few-query loop.

   One sequence, H = H_kv * G query heads (head hq reads KV head hq / G), n key positions whose K and V rows are
   k[k_tok[t]] and v[v_tok[t]] (rows of H_kv * D floats, any row stride; a NULL index means row t itself):

     lragent_decode_scores:  s[hq, t] = scale * q[hq] . K_t[hq / G]        (s: H rows of stride s_stride)
     (the caller takes the softmax of each row of s: P)
     lragent_decode_values:  o[hq]    = sum_t P[hq, t] * V_t[hq / G]                  (o is [H, D])
                             pl[hq]   = sum_t P[hq, t] * L_t            (optional: the value term's P L_v, with
                                                                        L_t = lv[lv_tok[t], :r])
                             o[hq]   += pl[hq] @ B_v[hq / G]           (optional, with pl: the value term itself,
                                                                        B_v[h] rows of D at bv + h * bv_hs)

   Both walk the positions in order and read each cache row once, for the KV heads [k0, k1) (threads split the
   heads), so the rows are never gathered into a copy first. Built by cpu_native.py with cpu_expand.c. */

#include <string.h>

#include "cpu_vec.h"

#define PF 16                                          /* rows prefetched ahead by the score pass */

/* prefetch heads [k0, k1) of a row into L2: the rows are scattered (paged) reads the hardware prefetcher misses, and
   a prefetch into L1 this far ahead evicts what the loop is using (about 2x slower at 4K rows) */
static inline void prefetch_heads(const float *row, int64_t k0, int64_t k1, int64_t d)
{
    const char *p = (const char *)(row + k0 * d), *e = (const char *)(row + k1 * d);
    for (; p < e; p += 64)
        __builtin_prefetch(p, 0, 2);
}

void lragent_decode_scores(const float *q, int64_t g, int64_t d, const float *k, int64_t k_stride,
                           const int64_t *k_tok, int64_t n, float scale, float *s, int64_t s_stride, int64_t k0,
                           int64_t k1)
{
    int64_t t = 0;
    for (; t + 4 <= n; t += 4) {                      /* blocks of 4 rows: see group_scores4 */
        const float *row[4];
        for (int i = 0; i < 4; i++) {
            row[i] = k + (k_tok ? k_tok[t + i] : t + i) * k_stride;
            if (t + PF + i < n)
                prefetch_heads(k + (k_tok ? k_tok[t + PF + i] : t + PF + i) * k_stride, k0, k1, d);
        }
        for (int64_t h = k0; h < k1; h++) {
            const float *kb[4] = {row[0] + h * d, row[1] + h * d, row[2] + h * d, row[3] + h * d};
            group_scores4(q, h, g, d, kb, scale, s + t, s_stride);
        }
    }
    for (; t < n; t++) {
        const float *row = k + (k_tok ? k_tok[t] : t) * k_stride;
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
            const v8 w = bc(p[(hq + j) * n + ts[i]]);
            a[j][0] += w * v0;
            a[j][1] += w * v1;
        }
    }
    for (int64_t j = 0; j < m; j++) { st(o + (hq + j) * d, a[j][0]); st(o + (hq + j) * d + 8, a[j][1]); }
}

/* the same for the 4 query heads from hq over 64 columns from off (4 vectors each), and with nl > 0 also
   pl[hq + j, 0:16 nl] += sum of P[hq + j, t] * L_t[0:16 nl] (the value term's P L_v) from the same broadcasts of P:
   16 + 4 nl accumulators in registers over the block */
static inline __attribute__((always_inline)) void values_block4(const float *p, int64_t n, const float *const *rows,
                                                                const float *const *lrows, int64_t t0, int64_t nb,
                                                                int64_t hq, int64_t off, float *o, int64_t d,
                                                                float *pl, int64_t r, const int nl)
{
    v16 a[4][4], b[4][2];
    for (int j = 0; j < 4; j++) {
        for (int v = 0; v < 4; v++)
            a[j][v] = ld16(o + (hq + j) * d + 16 * v);
        for (int v = 0; v < nl; v++)
            b[j][v] = ld16(pl + (hq + j) * r + 16 * v);
    }
    for (int64_t i = 0; i < nb; i++) {
        v16 x[4], y[2];
        for (int v = 0; v < 4; v++)
            x[v] = ld16(rows[i] + off + 16 * v);
        for (int v = 0; v < nl; v++)
            y[v] = ld16(lrows[i] + 16 * v);
        for (int j = 0; j < 4; j++) {
            const v16 w = bc16(p[(hq + j) * n + t0 + i]);
            for (int v = 0; v < 4; v++)
                a[j][v] += w * x[v];
            for (int v = 0; v < nl; v++)
                b[j][v] += w * y[v];
        }
    }
    for (int j = 0; j < 4; j++) {
        for (int v = 0; v < 4; v++)
            st16(o + (hq + j) * d + 16 * v, a[j][v]);
        for (int v = 0; v < nl; v++)
            st16(pl + (hq + j) * r + 16 * v, b[j][v]);
    }
}

#define TB 16                                          /* positions per block of the value pass */

/* o[hq] += pl[hq] @ B[hq / g] for the query heads of KV heads [k0, k1): B[h] is r rows of d floats at b + h * hs */
static void add_value_term(const float *pl, int64_t r, const float *b, int64_t hs, int64_t g, int64_t d, float *o,
                           int64_t k0, int64_t k1)
{
    for (int64_t h = k0; h < k1; h++)
        for (int64_t hq = h * g; hq < (h + 1) * g; hq++) {
            float *restrict oh = o + hq * d;
            for (int64_t j = 0; j < r; j++) {
                const float w = pl[hq * r + j], *restrict bj = b + h * hs + j * d;
                for (int64_t c = 0; c < d; c++)
                    oh[c] += w * bj[c];
            }
        }
}

void lragent_decode_values(const float *p, int64_t g, int64_t d, const float *v, int64_t v_stride,
                           const int64_t *v_tok, int64_t n, float *o, const float *lv, int64_t lv_stride,
                           const int64_t *lv_tok, int64_t r, float *pl, const float *bv, int64_t bv_hs, int64_t k0,
                           int64_t k1)
{
    const int64_t h0 = k0 * g, h1 = k1 * g;
    const int vec = d % 16 == 0;
    /* P L in the P V loop: whole groups of 4 query heads, a first 64-column chunk, 16 or 32 columns of L */
    const int fused = lv && g % 4 == 0 && d >= 64 && (r == 16 || r == 32);
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
        if (t0 + TB < n)          /* the next block's rows (low-rank rows too: single lines the prefetcher misses) */
            for (int64_t i = 0; i < TB && t0 + TB + i < n; i++) {
                const int64_t u = t0 + TB + i;
                prefetch_heads(v + (v_tok ? v_tok[u] : u) * v_stride, k0, k1, d);
                if (lv)
                    prefetch_heads(lv + (lv_tok ? lv_tok[u] : u) * lv_stride, 0, 1, r);
            }
        const float *lrows[TB];
        if (lv)
            for (int64_t i = 0; i < nb; i++)
                lrows[i] = lv + (lv_tok ? lv_tok[t0 + i] : t0 + i) * lv_stride;
        for (int64_t h = k0; h < k1; h++) {
            for (int64_t gi = 0; gi < g; gi += 4) {
                const int64_t m = g - gi < 4 ? g - gi : 4, hq = h * g + gi;
                int64_t c = 0;
                if (m == 4)         /* 64 columns at a time; the first 64 take P L along when it fits (fused) */
                    for (; c + 64 <= d; c += 64) {
                        const int nl = c == 0 && fused ? (int)(r / 16) : 0;
                        if (nl == 1)
                            values_block4(p, n, rows, lrows, t0, nb, hq, h * d + c, o + c, d, pl, r, 1);
                        else if (nl == 2)
                            values_block4(p, n, rows, lrows, t0, nb, hq, h * d + c, o + c, d, pl, r, 2);
                        else
                            values_block4(p, n, rows, lrows, t0, nb, hq, h * d + c, o + c, d, pl, r, 0);
                    }
                if (vec) {
                    for (; c < d; c += 16)
                        values_block(p, n, rows, ts, nb, hq, m, h * d + c, o + c, d);
                } else {
                    for (int64_t i = 0; i < nb; i++)
                        for (int64_t j = 0; j < m; j++)
                            for (int64_t cc = c; cc < d; cc++)
                                o[(hq + j) * d + cc] += p[(hq + j) * n + ts[i]] * rows[i][h * d + cc];
                }
            }
        }
        if (fused)
            continue;
        if (lv && r % 16 == 0) {    /* P L like P V: every query head reads the same L row */
            for (int64_t hq = h0; hq < h1; hq += 4)
                for (int64_t c = 0; c < r; c += 16)
                    values_block(p, n, lrows, ts, nb, hq, h1 - hq < 4 ? h1 - hq : 4, c, pl + c, r);
        } else if (lv) {
            for (int64_t i = 0; i < nb; i++)
                for (int64_t hq = h0; hq < h1; hq++) {
                    const float w = p[hq * n + t0 + i];
                    for (int64_t c = 0; c < r; c++)
                        pl[hq * r + c] += w * lrows[i][c];
                }
        }
    }
    if (lv && bv)
        add_value_term(pl, r, bv, bv_hs, g, d, o, k0, k1);
}
