/* One decode step of a pre-norm block's attention half and its MoE router, batch 1, in one call
 * (moekit.models.decode_step drives it).
 *
 * A batch-1 decode step through PyTorch runs ~200 small ops per layer (norms, rotary, the cache write,
 * attention, routing): about 10 ms a step on the 1.72B shape, a third of it. Here one OpenMP region does
 * them all: RMSNorm, the q/k/v GEMVs, QK-norm, rotary, the KV-cache write, attention over the cache, the
 * output GEMV and residual add, the second RMSNorm, the router's logits and its top-k. The experts then run
 * on the kernels moekit.nn.experts already uses.
 *
 * Roundings follow the PyTorch path op for op (each bf16 op's result rounded to bf16, fp32 statistics and
 * router, and attention as SDPA's CPU kernel: fp32 scores and sums, the exps rounded to bf16 to weigh the
 * values), so results match it up to the order of fp32 sums. One place differs by design: top-k ranks the
 * logits, not their softmax (the same order, without the softmax's rounding ties).
 */
#include <math.h>
#include <stddef.h>
#include <stdint.h>

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include "kernels.h"

/* Slots of a layer's plan (int64). Projection weights are bf16 [out, in] with contiguous rows, or as moekit's
 * quantised matrices (dims[D_ATTN_BITS]): int8 [out, in] with a bf16 scale per row, or int4 [out, in/2] packed
 * nibbles with bf16 scales and zeros per group of dims[D_GROUP] columns. Unused pointers are 0; a dense
 * block's router is. */
enum {
    P_WQ, P_WK, P_WV, P_WO,    /* projection weights (or quantised q) */
    P_SQ, P_SK, P_SV, P_SO,    /* quantised scales */
    P_BQ, P_BK, P_BV, P_BO,    /* bf16 biases */
    P_LN1, P_LN2, P_QN, P_KN,  /* RMSNorm weights (bf16): input, post-attention, per-head q and k (optional) */
    P_ROUTER, P_ROUTER_BIAS,   /* router weight [E, D] (bf16, or fp32 with D_ROUTER_FP32), selection bias
                                  (fp32, or bf16 with D_BIAS_BF16) */
    P_ZQ, P_ZK, P_ZV, P_ZO,    /* int4 zeros */
    P_SLOTS
};

/* Model-wide sizes and flags (int64) and constants (fp32). */
enum { D_HIDDEN, D_HEADS, D_KV_HEADS, D_HEAD_DIM, D_EXPERTS, D_TOP_K, D_MAX_LEN, D_SIGMOID, D_NORM_TOPK,
       D_ATTN_BITS, D_ROUTER_FP32, D_BIAS_BF16, D_GROUP, D_QDOT };
enum { C_EPS, C_QK_EPS, C_ATTN_SCALE, C_ROUTED_SCALE };

/* A projection's input in the forms its kernel reads: bf16, fp32 (int8), split by column mod 4 with group
 * sums (int4). */
typedef struct {
    const uint16_t *x16;
    const float *x32, *sums;
    const uint16_t *split;
    char *quantised; /* with dims[D_QDOT]: x quantised to int8 blocks as qdot.c's kernels take it */
} Input;

/* qdot.c: quantised matrices on int8-quantised activations, what the experts' and QuantLinear's decode kernels
 * run where the CPU has AVX512-VNNI (dims[D_QDOT] set): the step computes the same products. */
size_t moekit_qx_bytes(int64_t n, int64_t group);
void moekit_qx_quantize(const float *x, int64_t n, int64_t group, char *mem);
float moekit_qx_row(const int64_t *m, int bits, int64_t row, int64_t n, int64_t group, char *mem);

/* y = bf16(w * bf16(x * rsqrt(mean(x^2) + eps))) over n values: HF Llama's RMSNorm in bf16. */
static void rms_norm(const uint16_t *x, const uint16_t *w, int64_t n, float eps, uint16_t *y) {
    float ss = 0.0f;
    for (int64_t i = 0; i < n; i++) {
        float v = bf16_to_f32(x[i]);
        ss += v * v;
    }
    float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) {
        float normed = bf16_to_f32(f32_to_bf16(bf16_to_f32(x[i]) * r));
        y[i] = f32_to_bf16(bf16_to_f32(w[i]) * normed);
    }
}

/* Row `row` of a projection times its input, as the PyTorch path computes it (bf16 GEMV, or ATen's int8/int4
 * kernels' bf16 result), then its bias. */
static inline uint16_t project_row(const int64_t *plan, const int64_t *dims, int w_slot, int64_t row, int64_t in,
                                   const Input *x) {
    const uint16_t *scales = (const uint16_t *)plan[w_slot + 4];
    float v;
    if (dims[D_ATTN_BITS] && dims[D_QDOT]) {
        const int64_t m[3] = {plan[w_slot], plan[w_slot + 4], plan[w_slot + P_ZQ - P_WQ]};
        v = moekit_qx_row(m, (int)dims[D_ATTN_BITS], row, in, dims[D_GROUP], x->quantised);
    } else if (dims[D_ATTN_BITS] == 8) {
        v = dot_q8((const int8_t *)plan[w_slot] + row * in, x->x32, in) * bf16_to_f32(scales[row]);
    } else if (dims[D_ATTN_BITS] == 4) {
        int64_t groups = in / dims[D_GROUP];
        v = dot_q4((const uint8_t *)plan[w_slot] + row * (in / 2), scales + row * groups,
                   (const uint16_t *)plan[w_slot + P_ZQ - P_WQ] + row * groups, x->split, x->sums, in, dims[D_GROUP]);
    } else {
        v = dot_bf16((const uint16_t *)plan[w_slot] + row * in, x->x16, in);
    }
    uint16_t y = f32_to_bf16(v);
    const uint16_t *bias = (const uint16_t *)plan[w_slot + 8];
    return bias ? f32_to_bf16(bf16_to_f32(y) + bf16_to_f32(bias[row])) : y;
}

/* Fill the forms of x [n] that the projections' kernels read (x16 stays the caller's). */
static void prepare(const int64_t *dims, const uint16_t *x16, int64_t n, float *x32, uint16_t *split, float *sums,
                    char *quantised, Input *in) {
    in->x16 = x16, in->x32 = x32, in->split = split, in->sums = sums, in->quantised = quantised;
    if (dims[D_ATTN_BITS])
        for (int64_t i = 0; i < n; i++) x32[i] = bf16_to_f32(x16[i]);
    if (dims[D_ATTN_BITS] && dims[D_QDOT]) {
        moekit_qx_quantize(x32, n, dims[D_ATTN_BITS] == 8 ? 32 : dims[D_GROUP], quantised);
    } else if (dims[D_ATTN_BITS] == 4) {
        split_mod4(x16, split, n);
        group_sums(x32, n, dims[D_GROUP], sums);
    }
}

/* Rotate one head (bf16, hd values) in place by cos/sin, HF's rotate_half layout, each op rounded to bf16. */
static void rotate(uint16_t *v, const uint16_t *cos, const uint16_t *sin, int64_t hd) {
    uint16_t out[hd];
    int64_t half = hd / 2;
    for (int64_t i = 0; i < hd; i++) {
        float rot = i < half ? -bf16_to_f32(v[i + half]) : bf16_to_f32(v[i - half]);
        float a = bf16_to_f32(f32_to_bf16(bf16_to_f32(v[i]) * bf16_to_f32(cos[i])));
        float b = bf16_to_f32(f32_to_bf16(rot * bf16_to_f32(sin[i])));
        out[i] = f32_to_bf16(a + b);
    }
    for (int64_t i = 0; i < hd; i++) v[i] = out[i];
}

/* Softmax or sigmoid top-k routing of one token's fp32 logits: chosen experts (descending), their combine
 * weights rounded to bf16 (as moekit.nn.few_tokens rounds them), and the entropy of the normalised scores. */
static void route(const int64_t *dims, const float *consts, const void *bias, const float *logits, int64_t *chosen,
                  float *weights, float *entropy) {
    int64_t E = dims[D_EXPERTS], K = dims[D_TOP_K];
    float scores[E], rank[E];
    float total = 0.0f;
    if (dims[D_SIGMOID]) {
        for (int64_t e = 0; e < E; e++) {
            scores[e] = 1.0f / (1.0f + expf(-logits[e]));
            float b = !bias ? 0.0f
                      : dims[D_BIAS_BF16] ? bf16_to_f32(((const uint16_t *)bias)[e]) : ((const float *)bias)[e];
            rank[e] = scores[e] + b;
            total += scores[e];
        }
    } else {
        float top = -INFINITY;
        for (int64_t e = 0; e < E; e++) top = logits[e] > top ? logits[e] : top;
        for (int64_t e = 0; e < E; e++) total += (scores[e] = expf(logits[e] - top));
        for (int64_t e = 0; e < E; e++) {
            scores[e] /= total;
            rank[e] = logits[e];
        }
        total = 1.0f;
    }
    float h = 0.0f;
    for (int64_t e = 0; e < E; e++) {
        float p = scores[e] / total;
        h -= p * logf(p > 1e-30f ? p : 1e-30f);
    }
    *entropy = h;
    float sum = 0.0f;
    for (int64_t k = 0; k < K; k++) { /* k passes of a max: K and E are small */
        int64_t best = -1;
        for (int64_t e = 0; e < E; e++) {
            int taken = 0;
            for (int64_t j = 0; j < k; j++) taken |= chosen[j] == e;
            if (!taken && (best < 0 || rank[e] > rank[best])) best = e;
        }
        chosen[k] = best;
        sum += (weights[k] = scores[best]);
    }
    for (int64_t k = 0; k < K; k++) {
        float w = weights[k];
        if (dims[D_NORM_TOPK]) w = w / (dims[D_SIGMOID] ? sum + 1e-20f : sum);
        weights[k] = bf16_to_f32(f32_to_bf16(w * consts[C_ROUTED_SCALE]));
    }
}

/* The step: x (bf16 [D], the residual stream; first made x + bf16(y_prev) when y_prev, the previous layer's
 * fp32 MoE output, is given) -> x + attention (in place), hn = post-attention RMSNorm of it, and (for an MoE
 * block) the router's logits [E] and choices. kv holds this layer's key and value caches ([G, max_len, hd]
 * bf16); the new key and value go to position pos. cos/sin [hd] bf16 are the position's rotary tables.
 * Scratch: work16 of (2H + 2G) hd bf16, work32 of H * max_len floats.
 *
 * Five barriers a layer (one per parallel loop): on a machine shared with other busy processes each is a
 * chance to wait for a descheduled thread, so the small serial parts (the norms, the router) are done
 * redundantly by every thread or by one thread without a barrier after it. */
void moekit_block_step(const int64_t *plan, const int64_t *dims, const float *consts, const int64_t *kv, uint16_t *x,
                       const float *y_prev, const uint16_t *cos, const uint16_t *sin, int64_t pos, uint16_t *hn,
                       int64_t *chosen, float *weights, float *logits, float *entropy, uint16_t *work16,
                       float *work32, int threads) {
    const int64_t D = dims[D_HIDDEN], H = dims[D_HEADS], G = dims[D_KV_HEADS], hd = dims[D_HEAD_DIM];
    const int64_t E = dims[D_EXPERTS], max_len = dims[D_MAX_LEN], keys = pos + 1;
    uint16_t *qkv = work16, *att = qkv + (H + 2 * G) * hd;
    float *scores = work32;
    uint16_t *k_cache = (uint16_t *)kv[0], *v_cache = (uint16_t *)kv[1];
#pragma omp parallel num_threads(threads)
    {
        /* every thread: the residual, its norm and the forms the projections read, in its own copies */
        const int64_t widest = D > H * hd ? D : H * hd;
        uint16_t xr[D], xn[D], split[widest];
        float x32[widest], sums[widest / 32 + 1];
        char quantised[dims[D_QDOT] ? moekit_qx_bytes(widest, 32) : 1];
        Input in;
        for (int64_t d = 0; d < D; d++)
            xr[d] = y_prev ? f32_to_bf16(bf16_to_f32(x[d]) + bf16_to_f32(f32_to_bf16(y_prev[d]))) : x[d];
        rms_norm(xr, (const uint16_t *)plan[P_LN1], D, consts[C_EPS], xn);
        prepare(dims, xn, D, x32, split, sums, quantised, &in);
#pragma omp for schedule(static)
        for (int64_t r = 0; r < (H + 2 * G) * hd; r++) {
            int slot = r < H * hd ? P_WQ : r < (H + G) * hd ? P_WK : P_WV;
            int64_t row = slot == P_WQ ? r : slot == P_WK ? r - H * hd : r - (H + G) * hd;
            qkv[r] = project_row(plan, dims, slot, row, D, &in);
        }
#pragma omp for schedule(static)
        for (int64_t head = 0; head < H + 2 * G; head++) { /* q heads, k heads: norm and rotate; k, v to the cache */
            uint16_t *v = qkv + head * hd;
            if (head < H + G) {
                const uint16_t *norm = (const uint16_t *)plan[head < H ? P_QN : P_KN];
                if (norm) rms_norm(v, norm, hd, consts[C_QK_EPS], v);
                rotate(v, cos, sin, hd);
            }
            if (head >= H) {
                int64_t g = head < H + G ? head - H : head - H - G;
                uint16_t *dst = (head < H + G ? k_cache : v_cache) + (g * max_len + pos) * hd;
                for (int64_t i = 0; i < hd; i++) dst[i] = v[i];
            }
        }
#pragma omp for schedule(static)
        for (int64_t head = 0; head < H; head++) {
            const uint16_t *q = qkv + head * hd;
            int64_t g = head / (H / G);
            float *s = scores + head * max_len, top = -INFINITY, total = 0.0f;
            for (int64_t j = 0; j < keys; j++) {
                s[j] = dot_bf16(q, k_cache + (g * max_len + j) * hd, hd) * consts[C_ATTN_SCALE];
                top = s[j] > top ? s[j] : top;
            }
            for (int64_t j = 0; j < keys; j++) total += (s[j] = expf(s[j] - top));
            float out[hd];
            for (int64_t i = 0; i < hd; i++) out[i] = 0.0f;
            for (int64_t j = 0; j < keys; j++) { /* as SDPA: the exps weigh the values rounded to bf16 */
                const uint16_t *v = v_cache + (g * max_len + j) * hd;
                float p = bf16_to_f32(f32_to_bf16(s[j]));
                for (int64_t i = 0; i < hd; i++) out[i] += p * bf16_to_f32(v[i]);
            }
            for (int64_t i = 0; i < hd; i++) att[head * hd + i] = f32_to_bf16(out[i] / total);
        }
        prepare(dims, att, H * hd, x32, split, sums, quantised, &in);
#pragma omp for schedule(static)
        for (int64_t d = 0; d < D; d++)
            x[d] = f32_to_bf16(bf16_to_f32(xr[d]) + bf16_to_f32(project_row(plan, dims, P_WO, d, H * hd, &in)));
#pragma omp single nowait
        {
            rms_norm(x, (const uint16_t *)plan[P_LN2], D, consts[C_EPS], hn);
            for (int64_t e = 0; e < (plan[P_ROUTER] ? E : 0); e++) {
                if (dims[D_ROUTER_FP32]) {
                    const float *w = (const float *)plan[P_ROUTER] + e * D;
                    float v = 0.0f;
                    for (int64_t d = 0; d < D; d++) v += w[d] * bf16_to_f32(hn[d]);
                    logits[e] = v;
                } else {
                    logits[e] = dot_bf16((const uint16_t *)plan[P_ROUTER] + e * D, hn, D);
                }
            }
            if (plan[P_ROUTER]) route(dims, consts, (const void *)plan[P_ROUTER_BIAS], logits, chosen, weights, entropy);
        }
    }
}

/* x = bf16(x + bf16(y)) over n values: the last block's residual add. */
void moekit_residual_add(uint16_t *x, const float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] = f32_to_bf16(bf16_to_f32(x[i]) + bf16_to_f32(f32_to_bf16(y[i])));
}

#endif
