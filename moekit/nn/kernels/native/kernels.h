/* Inline helpers shared by the native kernels' sources (moekit.nn.kernels.native): bf16 conversions with
 * ATen's rounding, and the dot products the decode kernels are built from. Include inside an
 * AVX512-BF16 guard. */
#ifndef MOEKIT_KERNELS_H
#define MOEKIT_KERNELS_H
#include <immintrin.h>
#include <stdint.h>

static inline float bf16_to_f32(uint16_t v) {
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)v << 16;
    return c.f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even; NaN stays NaN */
    union { uint32_t u; float f; } c;
    c.f = f;
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((c.u >> 16) | 0x40);
    c.u += 0x7fffu + ((c.u >> 16) & 1u);
    return (uint16_t)(c.u >> 16);
}

static inline float dot_bf16(const uint16_t *a, const uint16_t *b, int64_t n) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 64 <= n; i += 64) {
        acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_loadu_si512(a + i), (__m512bh)_mm512_loadu_si512(b + i));
        acc1 = _mm512_dpbf16_ps(acc1, (__m512bh)_mm512_loadu_si512(a + i + 32),
                                (__m512bh)_mm512_loadu_si512(b + i + 32));
    }
    for (; i < n; i += 32) { /* tail: masked loads read zeros past n */
        __mmask32 m = (n - i) >= 32 ? 0xffffffffu : ((1u << (n - i)) - 1u);
        acc0 = _mm512_dpbf16_ps(acc0, (__m512bh)_mm512_maskz_loadu_epi16(m, a + i),
                                (__m512bh)_mm512_maskz_loadu_epi16(m, b + i));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

static inline float reduce(__m512 v) { return _mm512_reduce_add_ps(v); }

/* sum_k q[k] * x[k] for int8 q and fp32 x. */
static inline float dot_q8(const int8_t *q, const float *x, int64_t n) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + i))));
        __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + i + 16))));
        acc0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + i), acc0);
        acc1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + i + 16), acc1);
    }
    for (; i < n; i += 16) {
        __mmask16 m = (n - i) >= 16 ? 0xffffu : (__mmask16)((1u << (n - i)) - 1u);
        __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, q + i)));
        acc0 = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(m, x + i), acc0);
    }
    return reduce(_mm512_add_ps(acc0, acc1));
}

static inline __m512 load_bf16x16(const uint16_t *p, __mmask16 m) { /* 16 bf16 (masked) as fp32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

/* x [n] (bf16) rearranged per block of 128 as the four residues of the column mod 4: xs[b + 32 j + i] =
 * x[b + 4 i + j], the order an int4 row's 16-bit words give their nibbles in (see dot_q4). */
static inline void split_mod4(const uint16_t *x, uint16_t *xs, int64_t n) {
    for (int64_t b = 0; b + 128 <= n; b += 128)
        for (int64_t j = 0; j < 4; j++)
            for (int64_t i = 0; i < 32; i++) xs[b + 32 * j + i] = x[b + 4 * i + j];
}

static inline void group_sums(const float *x, int64_t n, int64_t group, float *out) {
    for (int64_t g = 0; g < n / group; g++) {
        float s = 0.0f;
        for (int64_t i = g * group; i < (g + 1) * group; i++) s += x[i];
        out[g] = s;
    }
}

/* One int4 row (n a multiple of 128) times x: W = (q - 8) scale + zero per group. Each 16-bit word of the row
 * holds columns 4i..4i+3 in its four nibbles; OR-ing a nibble v into bf16 0x4300 (128.0, whose last place is 1)
 * makes the bf16 value 128 + v exactly, so four shift-and-mask steps give 128 values as bf16 for the bf16 dot
 * instruction, against x rearranged by split_mod4. Lane l of the dot sums columns 8l..8l+7, one group's, so
 * the scales apply as a vector; the 128 + (and - 8) offsets are a per-group multiple of sum(x) (xsum):
 * sum W x = sum_g scale_g sum (128 + q) x + (zero_g - 136 scale_g) xsum_g. */
static inline float dot_q4(const uint8_t *q, const uint16_t *scale, const uint16_t *zero, const uint16_t *xs,
                           const float *xsum, int64_t n, int64_t group) {
    const __m512i nibble = _mm512_set1_epi16(0x000f), magic = _mm512_set1_epi16(0x4300);
    const __m512i lane_group = _mm512_srli_epi32(_mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9,
        10, 11, 12, 13, 14, 15), _mm512_set1_epi32(8)), __builtin_ctzll((unsigned long long)group));
    const __mmask16 block_groups = (__mmask16)((1u << (128 / group)) - 1u);
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (int64_t b = 0; b < n; b += 128) {
        __m512i w = _mm512_loadu_si512(q + b / 2);
        __m512i v0 = _mm512_ternarylogic_epi32(w, nibble, magic, 0xEA); /* (w & 0xf) | 0x4300 */
        __m512i v1 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 4), nibble, magic, 0xEA);
        __m512i v2 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 8), nibble, magic, 0xEA);
        __m512i v3 = _mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 12), nibble, magic, 0xEA);
        __m512 s0 = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)v0, (__m512bh)_mm512_loadu_si512(xs + b));
        __m512 s1 = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)v1, (__m512bh)_mm512_loadu_si512(xs + b + 32));
        s0 = _mm512_dpbf16_ps(s0, (__m512bh)v2, (__m512bh)_mm512_loadu_si512(xs + b + 64));
        s1 = _mm512_dpbf16_ps(s1, (__m512bh)v3, (__m512bh)_mm512_loadu_si512(xs + b + 96));
        __m512 scales = _mm512_permutexvar_ps(lane_group, load_bf16x16(scale + b / group, block_groups));
        acc0 = _mm512_fmadd_ps(s0, scales, acc0);
        acc1 = _mm512_fmadd_ps(s1, scales, acc1);
    }
    int64_t groups = n / group;
    __m512 offsets = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g += 16) {
        __mmask16 m = (groups - g) >= 16 ? 0xffffu : (__mmask16)((1u << (groups - g)) - 1u);
        __m512 sc = load_bf16x16(scale + g, m), ze = load_bf16x16(zero + g, m);
        __m512 off = _mm512_fnmadd_ps(_mm512_set1_ps(136.0f), sc, ze);
        offsets = _mm512_fmadd_ps(off, _mm512_maskz_loadu_ps(m, xsum + g), offsets);
    }
    return reduce(_mm512_add_ps(acc0, acc1)) + reduce(offsets);
}

#endif
