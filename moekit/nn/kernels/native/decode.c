/* Decode-step kernels for bf16 weights on x86-64 CPUs with AVX512-BF16 (moekit.nn.kernels.native).
 *
 * A decode step multiplies one token row by every weight it uses, so it is bound by reading the weights.
 * ATen runs each expert's matrix-vector product as its own parallel call (~1-3 MB each: the fork/join and
 * the cold start of each stream cost about a third of the time). Here one call runs all chosen experts of
 * a layer in one OpenMP region, and the dot products use the CPU's bf16 dot instruction (vdpbf16ps: bf16
 * products are exact in fp32, sums in fp32, as ATen's bf16 GEMV).
 *
 * Roundings follow ATen's bf16 ops one for one so results match them up to the order of the fp32 sums:
 * each GEMV output, silu(gate) and silu(gate) * up are rounded to bf16; the weighted sum over experts is
 * fp32, in the order given.
 *
 * Quantised experts (moekit.nn.quantized) are read in their stored form, no repacked copy: int8 rows with a
 * bf16 scale per row (W = q * scale), int4 rows of packed nibbles (even column low) with a bf16 scale and
 * zero per group of G columns (W = (q - 8) * scale + zero). Activations are bf16 values, as ATen's int8/int4
 * kernels take them; each output is rounded to bf16 as theirs is.
 */
#include <math.h>
#include <stdint.h>

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>

#include "kernels.h"

int moekit_native_ok(void) { return 1; }

/* y[O] = bf16(W[O, I] @ x[I]); W rows `row_stride` elements apart. */
void moekit_gemv_bf16(const uint16_t *w, int64_t row_stride, const uint16_t *x, int64_t O, int64_t I, uint16_t *y,
                      int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t o = 0; o < O; o++) y[o] = f32_to_bf16(dot_bf16(w + o * row_stride, x, I));
}

/* SwiGLU experts on one token: y[D] (fp32) += sum over k of weights[k] * expert_{experts[k]}(x), where
 * expert_e(x) = bf16(w_out[e] @ bf16(bf16(silu(g)) * u)) and g, u are the halves of bf16(w_in[e] @ x).
 * w_in[e] is [2H, D] (gate rows, then up rows), w_out[e] is [D, H], both row-major with the given strides
 * (in elements). h (n * 2H) and a (n * H) are scratch. */
void moekit_swiglu_experts_bf16(const uint16_t *x, const uint16_t *w_in, int64_t in_expert, int64_t in_row,
                                const uint16_t *w_out, int64_t out_expert, int64_t out_row, int64_t D, int64_t H,
                                int64_t n, const int64_t *experts, const float *weights, float *y, uint16_t *h,
                                uint16_t *a, int threads) {
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n * 2 * H; r++) {
            int64_t k = r / (2 * H), j = r % (2 * H);
            h[r] = f32_to_bf16(dot_bf16(w_in + experts[k] * in_expert + j * in_row, x, D));
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n * H; r++) {
            int64_t k = r / H, j = r % H;
            float g = bf16_to_f32(h[k * 2 * H + j]), u = bf16_to_f32(h[k * 2 * H + H + j]);
            float s = bf16_to_f32(f32_to_bf16(g / (1.0f + expf(-g))));
            a[r] = f32_to_bf16(s * u);
        }
#pragma omp for schedule(static)
        for (int64_t d = 0; d < D; d++) {
            float acc = y[d];
            for (int64_t k = 0; k < n; k++) {
                float out = dot_bf16(w_out + experts[k] * out_expert + d * out_row, a + k * H, H);
                acc += weights[k] * bf16_to_f32(f32_to_bf16(out));
            }
            y[d] = acc;
        }
    }
}

/* Row `row` of one quantised matrix (m: q, scales, zeros pointers; bits 8 or 4) times x, rounded to bf16 as
 * ATen's kernels round. int8 reads x (fp32), int4 xs and xsum (split_mod4, group_sums). */
static inline float quant_row(const int64_t *m, int bits, int64_t row, int64_t n, int64_t group, const float *x,
                              const uint16_t *xs, const float *xsum) {
    const uint16_t *scales = (const uint16_t *)m[1];
    float v;
    if (bits == 8) {
        v = dot_q8((const int8_t *)m[0] + row * n, x, n) * bf16_to_f32(scales[row]);
    } else {
        int64_t groups = n / group;
        v = dot_q4((const uint8_t *)m[0] + row * (n / 2), scales + row * groups, (const uint16_t *)m[2] + row * groups,
                   xs, xsum, n, group);
    }
    return bf16_to_f32(f32_to_bf16(v));
}

/* y[O] = bf16(scales[o] * (q[o] . x)) for an int8 matrix q [O, I] and x [I] (bf16 values) in fp32. */
void moekit_gemv_int8(const int8_t *q, const uint16_t *scales, const float *x, int64_t O, int64_t I, uint16_t *y,
                      int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t o = 0; o < O; o++) y[o] = f32_to_bf16(dot_q8(q + o * I, x, I) * bf16_to_f32(scales[o]));
}

/* Quantised SwiGLU experts on one token, as moekit_swiglu_experts_bf16. table[e] holds six pointers for
 * expert e (w_in's q, scales, zeros, then w_out's; zeros 0 for int8), bits[e] its width: 8, or 4 in groups
 * of `group` (D and H multiples of 128 then). x is [D] (bf16 values) in fp32, x16 the same in bf16.
 * Scratch: h n*2H and a n*H floats, xs D and as n*H bf16, sums (D + n*H) / group floats. */
void moekit_swiglu_experts_quant(const float *x, const uint16_t *x16, const int64_t *table, const int32_t *bits,
                                 int64_t group, int64_t D, int64_t H, int64_t n, const int64_t *experts,
                                 const float *weights, float *y, float *h, float *a, uint16_t *xs, uint16_t *as,
                                 float *sums, int threads) {
    float *xsum = sums, *asum = sums + D / group;
    group_sums(x, D, group, xsum);
    split_mod4(x16, xs, D);
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n * 2 * H; r++) {
            int64_t e = experts[r / (2 * H)];
            h[r] = quant_row(table + e * 6, bits[e], r % (2 * H), D, group, x, xs, xsum);
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n * H; r++) {
            int64_t k = r / H, j = r % H;
            float g = h[k * 2 * H + j], u = h[k * 2 * H + H + j];
            float s = bf16_to_f32(f32_to_bf16(g / (1.0f + expf(-g))));
            a[r] = bf16_to_f32(f32_to_bf16(s * u));
        }
#pragma omp for schedule(static)
        for (int64_t k = 0; k < n; k++) {
            uint16_t a16[H];
            for (int64_t j = 0; j < H; j++) a16[j] = f32_to_bf16(a[k * H + j]);
            split_mod4(a16, as + k * H, H);
            group_sums(a + k * H, H, group, asum + k * (H / group));
        }
#pragma omp for schedule(static)
        for (int64_t d = 0; d < D; d++) {
            float acc = y[d];
            for (int64_t k = 0; k < n; k++) {
                int64_t e = experts[k];
                acc += weights[k] * quant_row(table + e * 6 + 3, bits[e], d, H, group, a + k * H, as + k * H,
                                              asum + k * (H / group));
            }
            y[d] = acc;
        }
    }
}

/* out [O, I] = bf16(q * scale) for an int8 matrix q [O, I] with a bf16 scale per row (I a multiple of 16): moekit's
 * fp32 reference rounded to bf16, bit for bit (the product is exact in fp32). */
void moekit_dequant_int8_bf16(const int8_t *q, const uint16_t *scales, int64_t O, int64_t I, uint16_t *out,
                              int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t o = 0; o < O; o++) {
        __m512 s = _mm512_set1_ps(bf16_to_f32(scales[o]));
        for (int64_t c = 0; c < I; c += 16) {
            __m512 w = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + o * I + c))));
            _mm256_storeu_si256((__m256i *)(out + o * I + c), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(w, s)));
        }
    }
}

/* out [O, I] = bf16((q - 8) * scale + zero) for an int4 matrix (q [O, I/2] packed nibbles, even column low;
 * scales, zeros [O, I/group] bf16; group a multiple of 32): as moekit's fp32 reference rounded to bf16, bit for
 * bit ((q - 8) * scale is exact in fp32 and one fma rounds as the reference's add). For prompts: one GEMM on
 * the dequantised copy beats ATen's weight-only kernel past a few rows (moekit.nn.quantized). */
void moekit_dequant_int4_bf16(const uint8_t *q, const uint16_t *scales, const uint16_t *zeros, int64_t O, int64_t I,
                              int64_t group, uint16_t *out, int threads) {
    const __m128i nibble = _mm_set1_epi8(0x0f);
    const __m512i eight = _mm512_set1_epi32(8);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t o = 0; o < O; o++) {
        const uint8_t *row = q + o * (I / 2);
        for (int64_t c = 0; c < I; c += 32) {
            int64_t g = o * (I / group) + c / group;
            __m512 s = _mm512_set1_ps(bf16_to_f32(scales[g])), z = _mm512_set1_ps(bf16_to_f32(zeros[g]));
            __m128i b = _mm_loadu_si128((const __m128i *)(row + c / 2));
            __m128i lo = _mm_and_si128(b, nibble), hi = _mm_and_si128(_mm_srli_epi16(b, 4), nibble);
            __m512i v0 = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(lo, hi)), eight);
            __m512i v1 = _mm512_sub_epi32(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(lo, hi)), eight);
            __m512 w0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v0), s, z);
            __m512 w1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(v1), s, z);
            _mm512_storeu_si512((void *)(out + o * I + c), (__m512i)_mm512_cvtne2ps_pbh(w1, w0));
        }
    }
}

#else
int moekit_native_ok(void) { return 0; } /* built for a CPU without AVX512-BF16: callers use ATen */
#endif
