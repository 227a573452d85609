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
 * int8 experts (moekit.nn.quantized: W = q * scale, a bf16 scale per row) are read in their stored form;
 * activations are bf16 values held in fp32, as ATen's int8 kernel takes them, and each output is rounded to
 * bf16 as its are. (int4 stays on ATen's kernel: its repacked layout, 64 rows per block, runs ~2x faster
 * than a row-wise kernel on the stored nibbles, measured while writing this.)
 */
#include <math.h>
#include <stdint.h>

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>

int moekit_native_ok(void) { return 1; }

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

/* Row `row` of an int8 matrix (q [rows, n] int8, scales [rows] bf16) times x, rounded to bf16 as ATen's. */
static inline float int8_row(const int64_t *m, int64_t row, int64_t n, const float *x) {
    float v = dot_q8((const int8_t *)m[0] + row * n, x, n) * bf16_to_f32(((const uint16_t *)m[1])[row]);
    return bf16_to_f32(f32_to_bf16(v));
}

/* int8 SwiGLU experts on one token, as moekit_swiglu_experts_bf16. table[e] holds four pointers for expert
 * e: w_in's q and scales, then w_out's. x is [D] (bf16 values) in fp32; scratch: h n*2H and a n*H floats. */
void moekit_swiglu_experts_int8(const float *x, const int64_t *table, int64_t D, int64_t H, int64_t n,
                                const int64_t *experts, const float *weights, float *y, float *h, float *a,
                                int threads) {
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n * 2 * H; r++) h[r] = int8_row(table + experts[r / (2 * H)] * 4, r % (2 * H), D, x);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < n * H; r++) {
            int64_t k = r / H, j = r % H;
            float g = h[k * 2 * H + j], u = h[k * 2 * H + H + j];
            float s = bf16_to_f32(f32_to_bf16(g / (1.0f + expf(-g))));
            a[r] = bf16_to_f32(f32_to_bf16(s * u));
        }
#pragma omp for schedule(static)
        for (int64_t d = 0; d < D; d++) {
            float acc = y[d];
            for (int64_t k = 0; k < n; k++) acc += weights[k] * int8_row(table + experts[k] * 4 + 2, d, H, a + k * H);
            y[d] = acc;
        }
    }
}

#else
int moekit_native_ok(void) { return 0; } /* built for a CPU without AVX512-BF16: callers use ATen */
#endif
