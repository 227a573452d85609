/* Quantised decode kernels on int8-quantised activations (moekit.nn.kernels.native.qdot).
 *
 * decode.c converts every int8/int4 weight to fp32/bf16 before multiplying, so a decode step is bound by that
 * arithmetic, not by reading the weights. Here the activation vector is quantised once per call to int8 in
 * blocks of QBLOCK = 32 (symmetric, a fp32 scale per block: d = max|x| / 127, xq = round-half-even(x * (1/d)),
 * the Q8_0 idea), and weights and activations meet in the CPU's integer dot instruction (vpdpbusd: u8 x s8 into
 * int32, exact). The products are then exact integers; only the per-lane scaling and the sums are fp32.
 *
 * Weights are read in moekit.nn.quantized's stored form, no repacked copy (see decode.c):
 * - int4: unsigned nibbles q (0..15, even column in the low nibble) are the u8 operand; W = (q - 8) s + z per
 *   group of G columns. A row's 64 packed bytes hold 128 columns: their low nibbles are the even columns and the
 *   high ones the odd, so x's even and odd columns are kept apart (x.even, x.odd) and one load feeds two dots.
 *   Lane l of a dot sums columns 8l..8l+7, inside one activation block and one group, so
 *   sum W x = sum_lanes s_g d_b sum(q xq) + sum_g (z_g - 8 s_g) xsum_g, xsum_g the group's sum of the
 *   dequantised x (d_b xq): the algebra is exact for the dequantised activations.
 * - int8 (signed, W = q s per row): xq + 128 is the u8 operand (x.biased); a second dot of 128s against q takes
 *   the offset back out in int32, exactly.
 * So each result is the dot of the dequantised weight with the dequantised activations (d_b xq), up to the
 * order of fp32 sums: the reference (moekit.nn.kernels.native.qdot) computes exactly that. Outputs are rounded
 * to bf16 where decode.c rounds them.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#include "kernels.h"

#define QBLOCK 32

int moekit_qdot_ok(void) { return 1; }

static inline float round_bf16(float f) { return bf16_to_f32(f32_to_bf16(f)); } /* to the nearest bf16 */

static inline __mmask64 bytes_mask(int64_t left) { return left >= 64 ? ~0ULL : (1ULL << left) - 1ULL; }

static inline __mmask16 lanes_mask(int64_t left) { return left >= 16 ? 0xffffu : (__mmask16)((1u << left) - 1u); }

/* One activation vector of n columns, quantised. Arrays are padded with zeros to whole 128-column chunks, so
 * full-width loads past n read zeros (the weight loads are masked there). */
typedef struct {
    int8_t *even, *odd;   /* xq of the even / odd columns: an int4 row's low / high nibbles */
    uint8_t *biased;      /* xq + 128: the u8 operand against int8 rows */
    float *lane8, *lane4; /* the block scale d of columns 8l..8l+7 (int4 dots) / 4l..4l+3 (int8 dots) */
    float *gsum;          /* per weight group of G columns: sum of d xq */
} qx_t;

static int64_t padded(int64_t n) { return (n + 127) / 128 * 128; }

static size_t qx_bytes(int64_t n, int64_t group) {
    int64_t p = padded(n);
    return (size_t)(p / 2 * 2 + p + (p / 8 + p / 4 + p / group + 16) * 4);
}

static void qx_carve(qx_t *v, char *mem, int64_t n, int64_t group) {
    int64_t p = padded(n);
    v->even = (int8_t *)mem;
    v->odd = v->even + p / 2;
    v->biased = (uint8_t *)(v->odd + p / 2);
    v->lane8 = (float *)(v->biased + p);
    v->lane4 = v->lane8 + p / 8;
    v->gsum = v->lane4 + p / 4;
    memset(mem, 0, qx_bytes(n, group));
}

/* x [n] (fp32) -> v, per block of QBLOCK: d = max|x| / 127 (0 for a block of zeros or all but zeros: max below
 * 1e-30), xq = round-half-even(x * (1 / d)) clamped to +-127. `group` (a multiple of QBLOCK) sizes gsum. */
static void quantize(const float *x, int64_t n, int64_t group, qx_t *v) {
    for (int64_t b = 0; b < n; b += QBLOCK) {
        int64_t len = n - b < QBLOCK ? n - b : QBLOCK;
        float amax = 0.0f;
        for (int64_t i = 0; i < len; i++) amax = fmaxf(amax, fabsf(x[b + i]));
        float d = amax >= 1e-30f ? amax / 127.0f : 0.0f, inv = d != 0.0f ? 1.0f / d : 0.0f;
        int32_t sum = 0;
        for (int64_t i = 0; i < len; i++) {
            float r = fminf(fmaxf(nearbyintf(x[b + i] * inv), -127.0f), 127.0f);
            int8_t q = (int8_t)r;
            int64_t c = b + i;
            if (c & 1) v->odd[c >> 1] = q;
            else v->even[c >> 1] = q;
            v->biased[c] = (uint8_t)(q + 128);
            sum += q;
        }
        for (int64_t c = b; c < b + len; c += 4) v->lane4[c / 4] = d;
        for (int64_t c = b; c < b + len; c += 8) v->lane8[c / 8] = d;
        v->gsum[b / group] += d * (float)sum;
    }
}

/* sum_k q[k] xq[k] d[k] over 64 int8 weights at column c (m: the weights that exist), lane-wise into acc. */
static inline __m512 chunk_q8(__m512 acc, const int8_t *q, const qx_t *v, int64_t c, __mmask64 m) {
    const __m512i bias = _mm512_set1_epi8((char)0x80), zero = _mm512_setzero_si512();
    __m512i w = _mm512_maskz_loadu_epi8(m, q + c);
    __m512i s = _mm512_dpbusd_epi32(zero, _mm512_loadu_si512(v->biased + c), w); /* sum (xq + 128) q */
    __m512i o = _mm512_dpbusd_epi32(zero, bias, w);                              /* sum 128 q */
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(s, o)), _mm512_loadu_ps(v->lane4 + c / 4), acc);
}

/* An int8 row of n weights times the dequantised x, without the row's scale. */
static inline float row_q8(const int8_t *q, const qx_t *v, int64_t n) {
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 128 <= n; c += 128) {
        acc0 = chunk_q8(acc0, q, v, c, ~0ULL);
        acc1 = chunk_q8(acc1, q, v, c + 64, ~0ULL);
    }
    for (; c < n; c += 64) acc0 = chunk_q8(acc0, q, v, c, bytes_mask(n - c));
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}

/* 64 packed bytes of an int4 row at byte p (128 columns from 2p; m: the bytes that exist), lane-wise into acc:
 * s_g d_b sum(q xq) per lane. lane_group maps lane l to its group among those from column 2p. */
static inline __m512 chunk_q4(__m512 acc, const uint8_t *q, const uint16_t *scale, const qx_t *v, int64_t p,
                              __mmask64 m, int64_t group, int64_t groups, __m512i lane_group) {
    const __m512i nibble = _mm512_set1_epi8(0x0f), zero = _mm512_setzero_si512();
    __m512i w = _mm512_maskz_loadu_epi8(m, q + p);
    __m512i lo = _mm512_and_si512(w, nibble), hi = _mm512_and_si512(_mm512_srli_epi16(w, 4), nibble);
    __m512i s = _mm512_dpbusd_epi32(zero, lo, _mm512_loadu_si512(v->even + p));
    s = _mm512_dpbusd_epi32(s, hi, _mm512_loadu_si512(v->odd + p));
    int64_t g0 = 2 * p / group;
    __m512 scales = _mm512_permutexvar_ps(lane_group, load_bf16x16(scale + g0, lanes_mask(groups - g0)));
    __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_loadu_ps(v->lane8 + p / 4));
    return _mm512_fmadd_ps(f, scales, acc);
}

/* An int4 row of n weights (n/2 packed bytes; scales and zeros of n/group groups) times the dequantised x. */
static inline float row_q4(const uint8_t *q, const uint16_t *scale, const uint16_t *zero, const qx_t *v, int64_t n,
                           int64_t group) {
    const __m512i lane_group = _mm512_srli_epi32(_mm512_setr_epi32(0, 8, 16, 24, 32, 40, 48, 56, 64, 72, 80, 88, 96,
                                                                   104, 112, 120), __builtin_ctzll((unsigned long long)group));
    int64_t half = n / 2, groups = n / group, p = 0;
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    for (; p + 128 <= half; p += 128) {
        acc0 = chunk_q4(acc0, q, scale, v, p, ~0ULL, group, groups, lane_group);
        acc1 = chunk_q4(acc1, q, scale, v, p + 64, ~0ULL, group, groups, lane_group);
    }
    for (; p < half; p += 64) acc0 = chunk_q4(acc0, q, scale, v, p, bytes_mask(half - p), group, groups, lane_group);
    __m512 offsets = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g += 16) {
        __mmask16 m = lanes_mask(groups - g);
        __m512 sc = load_bf16x16(scale + g, m), ze = load_bf16x16(zero + g, m);
        __m512 off = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), sc, ze); /* z - 8 s */
        offsets = _mm512_fmadd_ps(off, _mm512_maskz_loadu_ps(m, v->gsum + g), offsets);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) + _mm512_reduce_add_ps(offsets);
}

/* Row `row` of one quantised matrix (m: q, scales, zeros pointers; bits 8 or 4) times the dequantised x. */
static inline float quant_row(const int64_t *m, int bits, int64_t row, int64_t n, int64_t group, const qx_t *v) {
    const uint16_t *scales = (const uint16_t *)m[1];
    if (bits == 8) return row_q8((const int8_t *)m[0] + row * n, v, n) * bf16_to_f32(scales[row]);
    int64_t groups = n / group;
    return row_q4((const uint8_t *)m[0] + row * (n / 2), scales + row * groups, (const uint16_t *)m[2] + row * groups,
                  v, n, group);
}

/* For the other kernels (step.c's attention projections), the same products one row at a time: the bytes a
 * quantised activation of n columns takes, quantising x [n] into such memory, and one row's product. */
size_t moekit_qx_bytes(int64_t n, int64_t group) { return qx_bytes(n, group); }

void moekit_qx_quantize(const float *x, int64_t n, int64_t group, char *mem) {
    qx_t v;
    qx_carve(&v, mem, n, group);
    quantize(x, n, group, &v);
}

float moekit_qx_row(const int64_t *m, int bits, int64_t row, int64_t n, int64_t group, char *mem) {
    int64_t p = padded(n);
    qx_t v = {(int8_t *)mem, (int8_t *)mem + p / 2, (uint8_t *)mem + p, NULL, NULL, NULL};
    v.lane8 = (float *)(v.biased + p);
    v.lane4 = v.lane8 + p / 8;
    v.gsum = v.lane4 + p / 4;
    return quant_row(m, bits, row, n, bits == 8 ? QBLOCK : group, &v);
}

/* y[O] = bf16(W x) for one quantised matrix W [O, I] (m: q, scales, zeros; bits 8, or 4 in groups of `group`)
 * and x [I] in fp32. */
void moekit_qgemv(const int64_t *m, int32_t bits, int64_t group, const float *x, int64_t O, int64_t I, uint16_t *y,
                  int threads) {
    if (bits == 8) group = QBLOCK;
    char *mem = malloc(qx_bytes(I, group));
    qx_t v;
    qx_carve(&v, mem, I, group);
    quantize(x, I, group, &v);
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t o = 0; o < O; o++) y[o] = f32_to_bf16(quant_row(m, bits, o, I, group, &v));
    free(mem);
}

/* Quantised SwiGLU experts on one token, as decode.c's moekit_swiglu_experts_quant (same table: six pointers per
 * expert, w_in's q, scales, zeros then w_out's; bits[e] 8, or 4 in groups of `group`), on quantised activations:
 * y[D] += sum_k weights[k] * bf16(w_out @ a_k), a_k = bf16(bf16(silu(g)) u), g and u the halves of
 * bf16(w_in @ x), each product on the activations quantised as above. x is [D] in fp32. */
void moekit_swiglu_experts_q8act(const float *x, const int64_t *table, const int32_t *bits, int64_t group, int64_t D,
                                 int64_t H, int64_t n, const int64_t *experts, const float *weights, float *y,
                                 int threads) {
    size_t xb = qx_bytes(D, group), ab = qx_bytes(H, group);
    char *mem = malloc(xb + n * ab + sizeof(float) * 3 * n * H);
    float *h = (float *)(mem + xb + n * ab), *a = h + 2 * n * H;
    qx_t vx, va[n];
    qx_carve(&vx, mem, D, group);
    quantize(x, D, group, &vx);
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n * 2 * H; r++) {
            int64_t e = experts[r / (2 * H)];
            h[r] = round_bf16(quant_row(table + e * 6, bits[e], r % (2 * H), D, group, &vx));
        }
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n * H; r++) {
            int64_t k = r / H, j = r % H;
            float g = h[k * 2 * H + j], u = h[k * 2 * H + H + j];
            a[r] = round_bf16(round_bf16(g / (1.0f + expf(-g))) * u);
        }
#pragma omp for schedule(static)
        for (int64_t k = 0; k < n; k++) {
            qx_carve(&va[k], mem + xb + k * ab, H, group);
            quantize(a + k * H, H, group, &va[k]);
        }
#pragma omp for schedule(static)
        for (int64_t d = 0; d < D; d++) {
            float acc = y[d];
            for (int64_t k = 0; k < n; k++) {
                int64_t e = experts[k];
                acc += weights[k] * round_bf16(quant_row(table + e * 6 + 3, bits[e], d, H, group, &va[k]));
            }
            y[d] = acc;
        }
    }
    free(mem);
}

#else
int moekit_qdot_ok(void) { return 0; } /* built for a CPU without AVX512-VNNI: callers use decode.c's kernels */
size_t moekit_qx_bytes(int64_t n, int64_t group) { return 0; }
void moekit_qx_quantize(const float *x, int64_t n, int64_t group, char *mem) {}
float moekit_qx_row(const int64_t *m, int bits, int64_t row, int64_t n, int64_t group, char *mem) { return 0.0f; }
#endif
