/* Decode attention of one query position straight from cache rows, the CPU fast path's few-query loop.

   One sequence, H = H_kv * G query heads (head hq reads KV head hq / G), n key positions whose K and V rows are
   k[k_tok[t]] and v[v_tok[t]] (rows of H_kv * D floats, any row stride; a NULL index means row t itself):

     lragent_decode_scores:  s[hq, t] = scale * q[hq] . K_t[hq / G]                   (s is [H, n])
     (the caller takes the softmax of each row of s in place: P)
     lragent_decode_values:  o[hq]    = sum_t P[hq, t] * V_t[hq / G]                  (o is [H, D])
                             pl[hq]   = sum_t P[hq, t] * lv[t, :r]       (optional: the value term's P L_v)

   Both walk the positions in order and read each cache row once, for the KV heads [k0, k1) (threads split the
   heads), so the rows are never gathered into a copy first. Built by cpu_native.py with cpu_expand.c. */
#include <stdint.h>
#include <string.h>
#ifdef __AVX__
#include <immintrin.h>
#endif

typedef float v8 __attribute__((vector_size(32)));
#define PF 4                                           /* rows prefetched ahead */

static inline v8 ld(const float *p) { v8 v; __builtin_memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, v8 v) { __builtin_memcpy(p, &v, sizeof v); }
static inline float hsum(v8 a) { return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7])); }

/* the four sums of a[0..3]'s lanes, into r[0..3] */
static inline void hsum4(const v8 *a, float *r)
{
#ifdef __AVX__
    const __m256 s01 = _mm256_hadd_ps((__m256)a[0], (__m256)a[1]), s23 = _mm256_hadd_ps((__m256)a[2], (__m256)a[3]);
    const __m256 s = _mm256_hadd_ps(s01, s23);     /* per 128-bit lane: partial sums of a0, a1, a2, a3 */
    _mm_storeu_ps(r, _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)));
#else
    for (int j = 0; j < 4; j++)
        r[j] = hsum(a[j]);
#endif
}

static inline void prefetch_heads(const float *row, int64_t k0, int64_t k1, int64_t d)
{
    const char *p = (const char *)(row + k0 * d), *e = (const char *)(row + k1 * d);
    for (; p < e; p += 64)
        __builtin_prefetch(p, 0, 3);
}

void lragent_decode_scores(const float *q, int64_t g, int64_t d, const float *k, int64_t k_stride,
                           const int64_t *k_tok, int64_t n, float scale, float *s, int64_t k0, int64_t k1)
{
    const int vec = d % 8 == 0;
    for (int64_t t = 0; t < n; t++) {
        const float *row = k + (k_tok ? k_tok[t] : t) * k_stride;
        if (t + PF < n)
            prefetch_heads(k + (k_tok ? k_tok[t + PF] : t + PF) * k_stride, k0, k1, d);
        for (int64_t h = k0; h < k1; h++) {
            const float *kr = row + h * d;
            for (int64_t gi = 0; gi < g; gi += 4) {    /* up to 4 query heads share each load of the key */
                const int64_t m = g - gi < 4 ? g - gi : 4, hq = h * g + gi;
                float acc[4] = {0.f, 0.f, 0.f, 0.f};
                if (vec && m == 4) {
                    v8 a[4] = {{0}, {0}, {0}, {0}};
                    const float *q0 = q + hq * d;
                    for (int64_t c = 0; c < d; c += 8) {
                        const v8 kv = ld(kr + c);
                        a[0] += ld(q0 + c) * kv;
                        a[1] += ld(q0 + d + c) * kv;
                        a[2] += ld(q0 + 2 * d + c) * kv;
                        a[3] += ld(q0 + 3 * d + c) * kv;
                    }
                    hsum4(a, acc);
                } else if (vec) {
                    v8 a[4] = {{0}, {0}, {0}, {0}};
                    for (int64_t c = 0; c < d; c += 8) {
                        const v8 kv = ld(kr + c);
                        for (int64_t j = 0; j < m; j++)
                            a[j] += ld(q + (hq + j) * d + c) * kv;
                    }
                    hsum4(a, acc);
                } else {
                    for (int64_t j = 0; j < m; j++)
                        for (int64_t c = 0; c < d; c++)
                            acc[j] += q[(hq + j) * d + c] * kr[c];
                }
                for (int64_t j = 0; j < m; j++)
                    s[(hq + j) * n + t] = acc[j] * scale;
            }
        }
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
                           int64_t r, float *pl, int64_t k0, int64_t k1)
{
    const int64_t h0 = k0 * g, h1 = k1 * g;
    const int vec = d % 16 == 0, vec_r = r % 8 == 0;
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
        if (lv) {
            for (int64_t i = 0; i < nb; i++) {
                const float *lr = lv + (t0 + i) * lv_stride;
                for (int64_t hq = h0; hq < h1; hq++) {
                    const float w = p[hq * n + t0 + i];
                    float *ph = pl + hq * r;
                    if (vec_r) {
                        const v8 wv = (v8){0} + w;
                        for (int64_t c = 0; c < r; c += 8)
                            st(ph + c, ld(ph + c) + wv * ld(lr + c));
                    } else {
                        for (int64_t c = 0; c < r; c++)
                            ph[c] += w * lr[c];
                    }
                }
            }
        }
    }
}
