/* Vector helpers shared by the native CPU kernels (cpu_expand.c, cpu_decode.c): 8- and 16-float vectors through
   GCC/Clang vector extensions (AVX2 and AVX-512 registers; pairs of AVX2 registers, or plain code, elsewhere) and
   dot products of query heads with key heads. */
#ifndef LRAGENT_CPU_VEC_H
#define LRAGENT_CPU_VEC_H
#include <stdint.h>
#ifdef __AVX__
#include <immintrin.h>
#endif

typedef float v8 __attribute__((vector_size(32)));

static inline v8 ld(const float *p) { v8 v; __builtin_memcpy(&v, p, sizeof v); return v; }
static inline void st(float *p, v8 v) { __builtin_memcpy(p, &v, sizeof v); }
/* x in every lane (x - 0 is x for every float, so no add is emitted; 0 + x is not: -0 + 0 is +0) */
static inline v8 bc(float x) { return x - (v8){0}; }
/* 16-float vectors (one AVX-512 register, two AVX2 ones) */
typedef float v16 __attribute__((vector_size(64)));
static inline v16 ld16(const float *p) { v16 v; __builtin_memcpy(&v, p, sizeof v); return v; }
static inline void st16(float *p, v16 v) { __builtin_memcpy(p, &v, sizeof v); }
static inline v16 bc16(float x) { return x - (v16){0}; }

/* keep a vector in a register where GCC would rather fold its load into every instruction that reads it */
#if defined(__x86_64__) && defined(__AVX512F__)
#define IN_REG(v) __asm__("" : "+v"(v))
#else
#define IN_REG(v) (void)0
#endif

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

/* acc[j] = q[j * d, (j + 1) * d) . kr[0, d) for the m <= 4 query heads at q (rows of d floats) */
static inline void head_dots(const float *q, int64_t m, int64_t d, const float *kr, float *acc)
{
    acc[0] = acc[1] = acc[2] = acc[3] = 0.f;
    if (d % 8 == 0 && m == 4) {
        v8 a[4] = {{0}, {0}, {0}, {0}};
        for (int64_t c = 0; c < d; c += 8) {
            const v8 kv = ld(kr + c);
            a[0] += ld(q + c) * kv;
            a[1] += ld(q + d + c) * kv;
            a[2] += ld(q + 2 * d + c) * kv;
            a[3] += ld(q + 3 * d + c) * kv;
        }
        hsum4(a, acc);
    } else if (d % 8 == 0) {
        v8 a[4] = {{0}, {0}, {0}, {0}};
        for (int64_t c = 0; c < d; c += 8) {
            const v8 kv = ld(kr + c);
            for (int64_t j = 0; j < m; j++)
                a[j] += ld(q + j * d + c) * kv;
        }
        hsum4(a, acc);
    } else {
        for (int64_t j = 0; j < m; j++)
            for (int64_t c = 0; c < d; c++)
                acc[j] += q[j * d + c] * kr[c];
    }
}

/* s[hq * s_stride] = scale * q[hq] . kr for the g query heads hq = h * g .. (h + 1) * g - 1 of key head row kr */
static inline void group_scores(const float *q, int64_t h, int64_t g, int64_t d, const float *kr, float scale,
                                float *s, int64_t s_stride)
{
    float acc[4];
    for (int64_t gi = 0; gi < g; gi += 4) {
        const int64_t m = g - gi < 4 ? g - gi : 4, hq = h * g + gi;
        head_dots(q + hq * d, m, d, kr, acc);
        for (int64_t j = 0; j < m; j++)
            s[(hq + j) * s_stride] = acc[j] * scale;
    }
}

#ifdef __AVX512F__
/* o[j * s_stride + r] = scale * (the sum of a[4 r + j]'s lanes) for r, j in [0, 4): sixteen dot products that
   accumulated side by side (a[4 r + j]: query head j against key row r), reduced by one transposing tree of 45
   shuffles and adds and stored as one 4-float vector per query head */
static inline void scores16_store(const __m512 *a, float scale, float *o, int64_t s_stride)
{
    __m512 b[8], c[4], e[2];
    for (int i = 0; i < 8; i++)     /* 256-bit halves: b[i] = a[2i] (lanes 0-7) | a[2i+1] (lanes 8-15) */
        b[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                             _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; i++)     /* 128-bit lanes: lane m of c[i] holds a[4i + m] */
        c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; i++) {   /* 64-bit pairs: lane m of e[i] holds a[8i + m], a[8i + 4 + m] */
        const __m512d x = _mm512_castps_pd(c[2 * i]), y = _mm512_castps_pd(c[2 * i + 1]);
        e[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
    }
    /* lane m, element j: the sum of a[4 j + m] = scores of query head m for rows 0..3 */
    const __m512 f = _mm512_mul_ps(_mm512_set1_ps(scale),
                                   _mm512_add_ps(_mm512_shuffle_ps(e[0], e[1], 0x88),
                                                 _mm512_shuffle_ps(e[0], e[1], 0xDD)));
    _mm_storeu_ps(o, _mm512_castps512_ps128(f));
    _mm_storeu_ps(o + s_stride, _mm512_extractf32x4_ps(f, 1));
    _mm_storeu_ps(o + 2 * s_stride, _mm512_extractf32x4_ps(f, 2));
    _mm_storeu_ps(o + 3 * s_stride, _mm512_extractf32x4_ps(f, 3));
}
#endif

/* s[hq * s_stride + i] = scale * q[hq] . kr[i] for the 4 rows kr[0..3] (each a key head of d floats) and the g query
   heads hq = h * g .. (h + 1) * g - 1: with AVX-512, g % 4 == 0 and d % 16 == 0, per 4 query heads 16 dot products
   accumulate side by side and scores16_store reduces and stores them (group_scores per row otherwise) */
static inline void group_scores4(const float *q, int64_t h, int64_t g, int64_t d, const float *const *kr,
                                 float scale, float *s, int64_t s_stride)
{
#ifdef __AVX512F__
    if (g % 4 == 0 && d % 16 == 0) {
        for (int64_t gi = 0; gi < g; gi += 4) {
            const float *qh = q + (h * g + gi) * d;
            __m512 a[16];
            for (int i = 0; i < 16; i++)
                a[i] = _mm512_setzero_ps();
            for (int64_t k = 0; k < d; k += 16) {           /* a[4 r + j] += q[j] . kr[r] over this 16-float part */
                const __m512 q0 = _mm512_loadu_ps(qh + k), q1 = _mm512_loadu_ps(qh + d + k);
                const __m512 q2 = _mm512_loadu_ps(qh + 2 * d + k), q3 = _mm512_loadu_ps(qh + 3 * d + k);
                for (int r = 0; r < 4; r++) {
                    const __m512 x = _mm512_loadu_ps(kr[r] + k);
                    a[4 * r] = _mm512_fmadd_ps(q0, x, a[4 * r]);
                    a[4 * r + 1] = _mm512_fmadd_ps(q1, x, a[4 * r + 1]);
                    a[4 * r + 2] = _mm512_fmadd_ps(q2, x, a[4 * r + 2]);
                    a[4 * r + 3] = _mm512_fmadd_ps(q3, x, a[4 * r + 3]);
                }
            }
            scores16_store(a, scale, s + (h * g + gi) * s_stride, s_stride);
        }
        return;
    }
#endif
    for (int r = 0; r < 4; r++)
        group_scores(q, h, g, d, kr[r], scale, s + r, s_stride);
}
#endif
