/* The rotary embedding in bf16, rounded as transformers' bf16 x * cos + rotate_half(x) * sin.
 *
 * lk_rope_cache, a decoding step: q (batch, heads, d) rotated in place; k, v (batch, kv_heads,
 * d) written, k rotated, at position pos of the caches (batch, kv_heads, length, d); cos, sin
 * (batch, d), sin's first half negated.
 * lk_rope_bf16, training, either way: x, out (batch, t, heads, d); cos, sin (batch or 1, t, d).
 */
#include "simd.h"

/* Rotary embedding of one new position per row, and its keys and values into the cache.
 * q (batch, heads, d), k and v (batch, kv_heads, d) as the projections wrote them; cos, sin
 * (batch, d) with sin's first half negated, so that rotate_half(x) * sin is roll(x, d/2) * sin.
 * q is rotated in place; the rotated k and v go to position pos of kc, vc (batch, kv_heads,
 * length, d). Each product and the sum are rounded to bf16, as PyTorch's bf16
 * q * cos + rotate_half(q) * sin is. */
static inline uint16_t rotate(const uint16_t* x, int64_t i, int64_t d, const uint16_t* cos,
                              const uint16_t* sin) {
    const int64_t j = i < d / 2 ? i + d / 2 : i - d / 2;
    float a = bf16_to_float(float_to_bf16(bf16_to_float(x[i]) * bf16_to_float(cos[i])));
    float b = bf16_to_float(float_to_bf16(bf16_to_float(x[j]) * bf16_to_float(sin[i])));
    return float_to_bf16(a + b);
}

int lk_rope_cache(uint16_t* q, int64_t batch, int64_t heads, int64_t kv_heads, int64_t d,
                  const uint16_t* k, const uint16_t* v, const uint16_t* cos, const uint16_t* sin,
                  uint16_t* kc, uint16_t* vc, int64_t length, int64_t pos) {
    if (d % 2 || pos < 0 || pos >= length || d > 1024) return -1;
    uint16_t row[1024];
    for (int64_t b = 0; b < batch; b++) {
        const uint16_t *c = cos + b * d, *sn = sin + b * d;
        for (int64_t h = 0; h < heads; h++) {
            uint16_t* x = q + (b * heads + h) * d;
            for (int64_t i = 0; i < d; i++) row[i] = rotate(x, i, d, c, sn);
            memcpy(x, row, d * sizeof(uint16_t));
        }
        for (int64_t h = 0; h < kv_heads; h++) {
            const int64_t at = ((b * kv_heads + h) * length + pos) * d;
            const uint16_t* x = k + (b * kv_heads + h) * d;
            for (int64_t i = 0; i < d; i++) kc[at + i] = rotate(x, i, d, c, sn);
            memcpy(vc + at, v + (b * kv_heads + h) * d, d * sizeof(uint16_t));
        }
    }
    return 0;
}

/* The rotary embedding for training, bf16: x (batch, t, heads, d) as a projection wrote it,
 * cos and sin (batch or 1, t, d). Forward: out = bf16(bf16(x cos) + bf16(rotate_half(x) sin)),
 * rotate_half(x) = (-x2, x1) for halves x1, x2, each product and the sum rounded as PyTorch's
 * bf16 q * cos + rotate_half(q) * sin are. Backward (out being dx for dy = x): with
 * r = bf16(dy sin), dx = bf16(bf16(dy cos) + (r2, -r1)), autograd's arithmetic. */
#if LANES
static inline vec rope_term(vec a, vec c, vec b, vec s, int negate) { /* bf16(ac -+ bf16(bs)) */
    const vec own = bf16_value(VOPS(mul)(a, c)), other = bf16_value(VOPS(mul)(b, s));
    return bf16_value(negate ? VOPS(sub)(own, other) : VOPS(add)(own, other));
}
#endif

int lk_rope_bf16(const uint16_t* x, int64_t batch, int64_t t, int64_t heads, int64_t d,
                 const uint16_t* cos, const uint16_t* sin, int64_t cs_batch, uint16_t* out,
                 int backward, int threads) {
#if LANES
    if (d % 2) return -1;
    const int64_t half = d / 2, rows = batch * t * heads;
#pragma omp parallel for num_threads(threads) schedule(static) if (rows >= 64)
    for (int64_t r = 0; r < rows; r++) {
        const int64_t b = r / (t * heads), pos = r / heads % t;
        const uint16_t *xr = x + r * d, *c = cos + (b * cs_batch * t + pos) * d;
        const uint16_t* sn = sin + (b * cs_batch * t + pos) * d;
        uint16_t* o = out + r * d;
        int64_t i = 0;
        if (half % CHUNK == 0) {
            for (; i < half; i += CHUNK) {
                vec x1[2], x2[2], c1[2], c2[2], s1[2], s2[2];
                widen(xr + i, &x1[0], &x1[1]);
                widen(xr + half + i, &x2[0], &x2[1]);
                widen(c + i, &c1[0], &c1[1]);
                widen(c + half + i, &c2[0], &c2[1]);
                widen(sn + i, &s1[0], &s1[1]);
                widen(sn + half + i, &s2[0], &s2[1]);
                for (int k = 0; k < 2; k++) {
                    /* forward: o1 = x1 c1 - x2 s1, o2 = x2 c2 + x1 s2;
                     * backward: o1 = x1 c1 + x2 s2, o2 = x2 c2 - x1 s1 */
                    const vec lo = backward ? rope_term(x1[k], c1[k], x2[k], s2[k], 0)
                                            : rope_term(x1[k], c1[k], x2[k], s1[k], 1);
                    const vec hi = backward ? rope_term(x2[k], c2[k], x1[k], s1[k], 1)
                                            : rope_term(x2[k], c2[k], x1[k], s2[k], 0);
                    store_bf16(o + i + k * LANES, lo);
                    store_bf16(o + half + i + k * LANES, hi);
                }
            }
        }
        for (; i < half; i++) {
            const float x1 = bf16_to_float(xr[i]), x2 = bf16_to_float(xr[half + i]);
            const float c1 = bf16_to_float(c[i]), c2 = bf16_to_float(c[half + i]);
            const float s1 = bf16_to_float(sn[i]), s2 = bf16_to_float(sn[half + i]);
            const float own1 = bf16_to_float(float_to_bf16(x1 * c1));
            const float own2 = bf16_to_float(float_to_bf16(x2 * c2));
            if (backward) {
                o[i] = float_to_bf16(own1 + bf16_to_float(float_to_bf16(x2 * s2)));
                o[half + i] = float_to_bf16(own2 - bf16_to_float(float_to_bf16(x1 * s1)));
            } else {
                o[i] = float_to_bf16(own1 - bf16_to_float(float_to_bf16(x2 * s1)));
                o[half + i] = float_to_bf16(own2 + bf16_to_float(float_to_bf16(x1 * s2)));
            }
        }
    }
    return 0;
#else
    return -1;
#endif
}
