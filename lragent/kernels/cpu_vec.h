/* Vector helpers shared by the native CPU kernels (cpu_expand.c, cpu_decode.c): 8-float vectors through GCC/Clang
   vector extensions (AVX2 registers, halves of AVX-512 ones; plain code elsewhere) and dot products of query
   heads with one key head. */
#ifndef LRAGENT_CPU_VEC_H
#define LRAGENT_CPU_VEC_H
#include <stdint.h>
#ifdef __AVX__
#include <immintrin.h>
#endif

typedef float v8 __attribute__((vector_size(32)));

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
#endif
