/* Fused gather + low-rank expansion (+ RoPE) of cache rows, the CPU fast path's hot loop in the low-rank modes.

   For t in [t0, t1):   l = lk[lk_tok[t], :]   (row t itself without an index), times P [r, q] when given
                        x = sum_j l[j] * Q[j, :]                                       (one row, W = H_kv * D)
                        out[t, :] = src[tok[t], :] + RoPE_t(x)      (cos != 0)
                        out[t, :] = src[tok[t], :] + x              (cos == 0)
   RoPE_t per head, HF rotate_half layout (halves x1 | x2):
                        [x1 * cos[:D/2] - x2 * sin[:D/2] | x2 * cos[ch:ch+D/2] + x1 * sin[ch:ch+D/2]]
   with cos/sin the row t of a table of row stride cs_stride: ch = D/2 for full rows (the first D entries are used),
   ch = 0 for rows of D/2 entries where both halves share their angles (HF RoPE), half the bytes. With qv (H = H_kv * gq
   query heads of D), the decode scores of the new key row come along while it is in L1:
                        sc[hq * s_stride + t] = scale * qv[hq] . out[t, head hq / gq]

   x is never stored: each pair of column blocks (i, i + D/2) of a head is accumulated in registers over the q rank
   columns and written once, so a row costs one read of the cache row and of its low-rank row, r*q + q*W
   multiply-adds and one write (no gathered copy of the low-rank rows, no separate l P pass). Where D/2 is a multiple
   of 16, rows go in blocks of NR: each Q vector is loaded once for the block's rows; with AVX-512, D = 64 and 4
   query heads per KV head (rows4_scored), each finished K' row is scored and stored straight from registers. out
   NULL: the scores only, the rows never stored. nt != 0: the rows are streamed to out by non-temporal stores where
   out's alignment allows (from registers, or from an L1 row buffer where the rows are scored after the block);
   for rows nothing reads before they would leave the cache anyway
   (a decode step's workspace rows: the next step reads them after the whole model's weights), this skips the
   read of each destination line that a cached store costs. Built by cpu_native.py with the machine's compiler
   (-O3, -march=native where it works), called through ctypes (which releases the GIL, so row ranges can run on
   several threads). */
#include "cpu_vec.h"

#define PF 8                                           /* rows prefetched ahead by the row loop */
#define NV 4                                           /* vectors per half-block: 32 columns of each half */
#define QMAX 256                                       /* the most rank columns l P may have (cpu_native.py) */


/* columns c1 + [0, m) and c2 + [0, m) (c2 = c1 + D/2; i = c1's offset in its head) of one row, m = 8 * NV */
static inline void block_v(const float *restrict s, const float *restrict l, int64_t q, const float *restrict Q,
                           int64_t w, const float *restrict cr, const float *restrict sr, int64_t c1, int64_t c2,
                           int64_t i, int64_t ch, float *restrict o)
{
    v8 a[NV], b[NV];
    for (int v = 0; v < NV; v++) { a[v] = (v8){0}; b[v] = (v8){0}; }
    for (int64_t j = 0; j < q; j++) {
        const v8 lj = bc(l[j]);
        const float *q1 = Q + j * w + c1, *q2 = Q + j * w + c2;
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) { a[v] += lj * ld(q1 + 8 * v); b[v] += lj * ld(q2 + 8 * v); }
    }
#pragma GCC unroll 4
    for (int v = 0; v < NV; v++) {
        const int64_t k = 8 * v;
        if (cr) {
            st(o + c1 + k, ld(s + c1 + k) + a[v] * ld(cr + i + k) - b[v] * ld(sr + i + k));
            st(o + c2 + k, ld(s + c2 + k) + b[v] * ld(cr + ch + i + k) + a[v] * ld(sr + ch + i + k));
        } else {
            st(o + c1 + k, ld(s + c1 + k) + a[v]);
            st(o + c2 + k, ld(s + c2 + k) + b[v]);
        }
    }
}

/* the same for columns c1 + [0, m), c2 + [0, m), any m, one at a time */
static void block_s(const float *s, const float *l, int64_t q, const float *Q, int64_t w, const float *cr,
                    const float *sr, int64_t c1, int64_t c2, int64_t i, int64_t ch, int64_t m, float *o)
{
    for (int64_t k = 0; k < m; k++) {
        float a = 0.f, b = 0.f;
        for (int64_t j = 0; j < q; j++) { a += l[j] * Q[j * w + c1 + k]; b += l[j] * Q[j * w + c2 + k]; }
        if (cr) {
            o[c1 + k] = s[c1 + k] + a * cr[i + k] - b * sr[i + k];
            o[c2 + k] = s[c2 + k] + b * cr[ch + i + k] + a * sr[ch + i + k];
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
            a0 += bc(l[j]) * ld(P + j * q + c);
            a1 += bc(l[j + 1]) * ld(P + (j + 1) * q + c);
            a2 += bc(l[j + 2]) * ld(P + (j + 2) * q + c);
            a3 += bc(l[j + 3]) * ld(P + (j + 3) * q + c);
        }
        for (; j < r; j++)
            a0 += bc(l[j]) * ld(P + j * q + c);
        st(lp + c, (a0 + a1) + (a2 + a3));
    }
    for (; c < q; c++) {
        float a = 0.f;
        for (int64_t j = 0; j < r; j++)
            a += l[j] * P[j * q + c];
        lp[c] = a;
    }
}

#define NR 4                                           /* rows of a block */
#define PFB 32                                         /* rows prefetched ahead by the blocked loop */

/* a[r][c], b[r][c] = sum_j l[r][j] * Q[j, c1 + 16 c + [0, 16)], ... c2 ...: the rank sums of NR rows' columns
   c1 + [0, 16 cp) and c2 + [0, 16 cp) of one head, cp in {1, 2}; each Q vector loaded once per rank column serves
   the NR rows (16 x cp x NR accumulators) */
static inline __attribute__((always_inline)) void rank4(const float *const *l, int64_t q, const float *restrict Q,
                                                        int64_t w, int64_t c1, int64_t c2, v16 a[NR][2],
                                                        v16 b[NR][2], const int cp)
{
    for (int r = 0; r < NR; r++)
        for (int c = 0; c < cp; c++) { a[r][c] = (v16){0}; b[r][c] = (v16){0}; }
    for (int64_t j = 0; j < q; j++) {
        v16 q1[2], q2[2];
        for (int c = 0; c < cp; c++) {
            q1[c] = ld16(Q + j * w + c1 + 16 * c);
            q2[c] = ld16(Q + j * w + c2 + 16 * c);
            IN_REG(q1[c]);        /* else GCC folds each Q load into every row's multiply-add: 4 loads per FMA */
            IN_REG(q2[c]);
        }
#pragma GCC unroll 4
        for (int r = 0; r < NR; r++) {
            const v16 lj = bc16(l[r][j]);
            for (int c = 0; c < cp; c++) { a[r][c] += lj * q1[c]; b[r][c] += lj * q2[c]; }
        }
    }
}

/* *y1, *y2 = columns c1 + k + [0, 16) and c2 + k + [0, 16) of one K' row: s + RoPE of the rank sums x1, x2 with the
   cos/sin row cr/sr (i = c1's offset in its head; ch == 0: half-width rows, both halves rotate by the same
   cos/sin), or s + x when cr is NULL */
static inline __attribute__((always_inline)) void rope16(const float *s, const float *cr, const float *sr, int64_t c1,
                                                         int64_t c2, int64_t i, int64_t k, int64_t ch, v16 x1, v16 x2,
                                                         v16 *y1, v16 *y2)
{
    if (cr) {
        const v16 co = ld16(cr + i + k), si = ld16(sr + i + k);
        const v16 co2 = ch ? ld16(cr + ch + i + k) : co, si2 = ch ? ld16(sr + ch + i + k) : si;
        *y1 = ld16(s + c1 + k) + x1 * co - x2 * si;
        *y2 = ld16(s + c2 + k) + x2 * co2 + x1 * si2;
    } else {
        *y1 = ld16(s + c1 + k) + x1;
        *y2 = ld16(s + c2 + k) + x2;
    }
}

/* rows4: the NR rows' columns c1 + [0, 16 cp), c2 + [0, 16 cp) of one head (c2 = c1 + D/2, i = c1's offset in its
   head), cp in {1, 2}, stored to o[r] */
static inline void rows4(const float *const *s, const float *const *l, int64_t q, const float *restrict Q,
                         int64_t w, const float *const *cr, const float *const *sr, int64_t c1, int64_t c2, int64_t i,
                         int64_t ch, float *const *o, const int cp)
{
    v16 a[NR][2], b[NR][2];
    rank4(l, q, Q, w, c1, c2, a, b, cp);
#pragma GCC unroll 4
    for (int r = 0; r < NR; r++)               /* every load of the block before its first store */
        for (int c = 0; c < cp; c++)
            rope16(s[r], cr[r], sr[r], c1, c2, i, 16 * c, ch, a[r][c], b[r][c], &a[r][c], &b[r][c]);
#pragma GCC unroll 4
    for (int r = 0; r < NR; r++)
        for (int c = 0; c < cp; c++) { st16(o[r] + c1 + 16 * c, a[r][c]); st16(o[r] + c2 + 16 * c, b[r][c]); }
}

#ifdef __AVX512F__
/* rows4_scored: one whole head of D = 64 (c1 = its first column, c2 = c1 + 32) for the NR rows, each K' row written
   straight from registers (non-temporal stores with nt, the rows 64-byte aligned) and scored there against the 4
   query heads at qh (rows of 64 floats): s[m * s_stride + r] = scale * qh[m] . K'[r]. Row by row, so the rank sums
   of the rows not yet finished and the score sums of those finished share the 32 registers; no row buffer, no
   reload of K' */
static inline __attribute__((always_inline)) void rows4_scored(const float *const *s, const float *const *l,
                                                               int64_t q, const float *restrict Q, int64_t w,
                                                               const float *const *cr, const float *const *sr,
                                                               int64_t c1, int64_t c2, int64_t ch, float *const *o,
                                                               int nt, const float *qh, float scale, float *sc,
                                                               int64_t s_stride)
{
    v16 a[NR][2], b[NR][2];
    __m512 acc[16];
    rank4(l, q, Q, w, c1, c2, a, b, 2);
#pragma GCC unroll 4
    for (int r = 0; r < NR; r++) {
        v16 y[4];                                 /* K' row r: columns [0, 16), [16, 32) | [32, 48), [48, 64) */
        for (int c = 0; c < 2; c++)
            rope16(s[r], cr[r], sr[r], c1, c2, 0, 16 * c, ch, a[r][c], b[r][c], &y[c], &y[2 + c]);
        for (int c = 0; o && c < 4; c++) {       /* o NULL: the scores only */
            float *dst = o[r] + c1 + 16 * c;      /* c1 + 16 c = c2 + 16 (c - 2) for c >= 2 */
            if (nt)
                _mm512_stream_ps(dst, (__m512)y[c]);
            else
                st16(dst, y[c]);
        }
        for (int m = 0; m < 4; m++) {
            __m512 t = _mm512_mul_ps((__m512)y[0], _mm512_loadu_ps(qh + 64 * m));
            for (int c = 1; c < 4; c++)
                t = _mm512_fmadd_ps((__m512)y[c], _mm512_loadu_ps(qh + 64 * m + 16 * c), t);
            acc[4 * r + m] = t;
        }
    }
    scores16_store(acc, scale, sc, s_stride);
}
#endif

/* whether rows of w floats at out (row stride `stride`) can take aligned non-temporal vector stores */
static int streamable(const float *out, int64_t stride, int64_t w)
{
#if defined(__AVX512F__)
    return (uintptr_t)out % 64 == 0 && stride % 16 == 0 && w % 16 == 0;
#elif defined(__AVX__)
    return (uintptr_t)out % 32 == 0 && stride % 8 == 0 && w % 8 == 0;
#else
    (void)out, (void)stride, (void)w;
    return 0;
#endif
}

/* dst[0, w) = src[0, w) by non-temporal stores (straight to memory: no read of the destination line first, and the
   cache keeps what the rest of the step reads); only where streamable() said so */
static inline void stream_row(float *dst, const float *src, int64_t w)
{
#if defined(__AVX512F__)
    for (int64_t c = 0; c < w; c += 16)
        _mm512_stream_ps(dst + c, _mm512_loadu_ps(src + c));
#elif defined(__AVX__)
    for (int64_t c = 0; c < w; c += 8)
        _mm256_stream_ps(dst + c, _mm256_loadu_ps(src + c));
#else
    __builtin_memcpy(dst, src, (size_t)w * sizeof(float));
#endif
}

static inline void stream_fence(void)
{
#if defined(__AVX__)
    _mm_sfence();
#endif
}

/* prefetch one row of `bytes` into L2 (a prefetch into L1 this far ahead only evicts what the loop is using) */
static inline void prefetch_row(const void *row, int64_t bytes)
{
    for (int64_t c = 0; c < bytes; c += 64)
        __builtin_prefetch((const char *)row + c, 0, 2);
}

void lragent_expand_rows(const float *src, const int64_t *tok, int64_t t0, int64_t t1, int64_t w, int64_t d,
                         const float *lk, int64_t lk_stride, const int64_t *lk_tok, const float *P, int64_t r_,
                         int64_t q, const float *Q, const float *cos, const float *sin, int64_t cs_stride, int64_t ch,
                         float *out, int64_t out_stride, int64_t nt, const float *qv, int64_t gq, float scale,
                         float *sc, int64_t s_stride)
{
    const int64_t h2 = d / 2, m = 8 * NV;
    const int stream = out && nt && streamable(out, out_stride, w);
    float lp[QMAX], lpb[NR][QMAX];
    /* a block's rows before they are streamed out, or rows never stored */
    float buf[out && !stream ? 16 : NR * w] __attribute__((aligned(64)));
#ifdef __AVX512F__
    const int fused = qv && gq == 4 && d == 64;           /* rows4_scored: K' scored and stored from registers */
#else
    const int fused = 0;
#endif
    int64_t t = t0;
    if (h2 % 16 == 0)
        for (; t + NR <= t1; t += NR) {
            const float *sb[NR], *lb[NR], *crb[NR], *srb[NR];
            float *ob[NR];
            for (int r = 0; r < NR; r++) {
                sb[r] = src + tok[t + r] * w;
                lb[r] = lk + (lk_tok ? lk_tok[t + r] : t + r) * lk_stride;
                if (P) {
                    times_p(lb[r], P, r_, q, lpb[r]);
                    lb[r] = lpb[r];
                }
                crb[r] = cos ? cos + (t + r) * cs_stride : 0;
                srb[r] = sin ? sin + (t + r) * cs_stride : 0;
                ob[r] = out && (fused || !stream) ? out + (t + r) * out_stride : buf + r * w;
                if (t + PFB + r < t1) {     /* cache rows are scattered reads the hardware prefetcher misses */
                    prefetch_row(src + tok[t + PFB + r] * w, w * 4);
                    if (lk_tok)
                        prefetch_row(lk + lk_tok[t + PFB + r] * lk_stride, r_ * 4);
                }
            }
#ifdef __AVX512F__
            if (fused) {
                for (int64_t g = 0; g < w; g += d) {
                    const float *qh = qv + (g / d) * 4 * d;
                    float *sch = sc + t + (g / d) * 4 * s_stride;
                    if (ch)
                        rows4_scored(sb, lb, q, Q, w, crb, srb, g, g + 32, 32, out ? ob : 0, stream, qh, scale, sch,
                                     s_stride);
                    else
                        rows4_scored(sb, lb, q, Q, w, crb, srb, g, g + 32, 0, out ? ob : 0, stream, qh, scale, sch,
                                     s_stride);
                }
                continue;
            }
#endif
            for (int64_t g = 0; g < w; g += d) {
                int64_t i = 0;
                for (; i + 32 <= h2; i += 32)       /* ch 0 or D/2, a constant in each copy */
                    if (ch)
                        rows4(sb, lb, q, Q, w, crb, srb, g + i, g + h2 + i, i, h2, ob, 2);
                    else
                        rows4(sb, lb, q, Q, w, crb, srb, g + i, g + h2 + i, i, 0, ob, 2);
                for (; i < h2; i += 16)
                    rows4(sb, lb, q, Q, w, crb, srb, g + i, g + h2 + i, i, ch, ob, 1);
                if (qv) {
                    const float *kb[NR] = {ob[0] + g, ob[1] + g, ob[2] + g, ob[3] + g};
                    group_scores4(qv, g / d, gq, d, kb, scale, sc + t, s_stride);
                }
            }
            if (stream)
                for (int r = 0; r < NR; r++)
                    stream_row(out + (t + r) * out_stride, ob[r], w);
        }
    if (stream)
        stream_fence();
    for (; t < t1; t++) {
        const float *s = src + tok[t] * w, *l = lk + (lk_tok ? lk_tok[t] : t) * lk_stride;
        if (P) {
            times_p(l, P, r_, q, lp);
            l = lp;
        }
        const float *cr = cos ? cos + t * cs_stride : 0, *sr = sin ? sin + t * cs_stride : 0;
        float *o = out ? out + t * out_stride : buf;
        if (t + PF < t1) {
            prefetch_row(src + tok[t + PF] * w, w * 4);
            if (lk_tok)
                prefetch_row(lk + lk_tok[t + PF] * lk_stride, r_ * 4);
        }
        for (int64_t g = 0; g < w; g += d) {
            int64_t i = 0;
            for (; i + m <= h2; i += m)
                block_v(s, l, q, Q, w, cr, sr, g + i, g + h2 + i, i, ch, o);
            if (i < h2)
                block_s(s, l, q, Q, w, cr, sr, g + i, g + h2 + i, i, ch, h2 - i, o);
            if (qv)
                group_scores(qv, g / d, gq, d, o + g, scale, sc + t, s_stride);
        }
    }
}
