/* silu(g) * u of LLaMA-style MLPs, forward and backward, rounded as PyTorch's bf16 silu then
 * multiply (and autograd's pass over them) are, bit for bit: g, u, h, dh, dg, du are n bf16
 * values each, any shape flattened.
 */
#include "simd.h"

/* The SwiGLU of LLaMA-style MLPs for training, bf16 in and out: h = bf16(bf16(silu(g)) * u),
 * silu(g) = g / (1 + e^-g) in float32, as PyTorch's bf16 silu then multiply round it. n
 * elements of g and u; in parallel when many. */
#define SWIGLU_BLOCK 4096
static inline float silu_float(float g) { return g / (1.0f + expf(-g)); }

int lk_swiglu(const uint16_t* g, const uint16_t* u, int64_t n, uint16_t* h, int threads) {
#if LANES
    const int64_t blocks = (n + SWIGLU_BLOCK - 1) / SWIGLU_BLOCK;
#pragma omp parallel for num_threads(threads) schedule(static) if (n >= (1 << 16))
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t start = blk * SWIGLU_BLOCK;
        const int64_t end = start + SWIGLU_BLOCK < n ? start + SWIGLU_BLOCK : n;
        int64_t i = start;
        for (; i + CHUNK <= end; i += CHUNK) {
            vec g2[2], u2[2];
            widen(g + i, &g2[0], &g2[1]);
            widen(u + i, &u2[0], &u2[1]);
            for (int k = 0; k < 2; k++) {
                const vec e = vexp(VOPS(sub)(vzero(), g2[k]));
                const vec s = bf16_value(VOPS(div)(g2[k], VOPS(add)(vset1(1.0f), e)));
                store_bf16(h + i + k * LANES, bf16_value(VOPS(mul)(s, u2[k])));
            }
        }
        for (; i < end; i++) {
            const float s = bf16_to_float(float_to_bf16(silu_float(bf16_to_float(g[i]))));
            h[i] = float_to_bf16(s * bf16_to_float(u[i]));
        }
    }
    return 0;
#else
    return -1;
#endif
}

/* lk_swiglu's gradients for h's gradient dh, in autograd's order over PyTorch's operations:
 * du = bf16(dh * s) with s = bf16(silu(g)); dg = bf16(bf16(dh * u) * sig * (1 + g (1 - sig)))
 * with sig = 1 / (1 + e^-g), as silu_backward computes it in float32. */
int lk_swiglu_backward(const uint16_t* dh, const uint16_t* g, const uint16_t* u, int64_t n,
                       uint16_t* dg, uint16_t* du, int threads) {
#if LANES
    const int64_t blocks = (n + SWIGLU_BLOCK - 1) / SWIGLU_BLOCK;
#pragma omp parallel for num_threads(threads) schedule(static) if (n >= (1 << 16))
    for (int64_t blk = 0; blk < blocks; blk++) {
        const int64_t start = blk * SWIGLU_BLOCK;
        const int64_t end = start + SWIGLU_BLOCK < n ? start + SWIGLU_BLOCK : n;
        int64_t i = start;
        const vec one = vset1(1.0f);
        for (; i + CHUNK <= end; i += CHUNK) {
            vec g2[2], u2[2], d2[2];
            widen(g + i, &g2[0], &g2[1]);
            widen(u + i, &u2[0], &u2[1]);
            widen(dh + i, &d2[0], &d2[1]);
            for (int k = 0; k < 2; k++) {
                const vec e = VOPS(add)(one, vexp(VOPS(sub)(vzero(), g2[k])));
                const vec s = bf16_value(VOPS(div)(g2[k], e));
                const vec sig = VOPS(div)(one, e);
                const vec ds = bf16_value(VOPS(mul)(d2[k], u2[k]));
                const vec slope = VOPS(add)(one, VOPS(mul)(g2[k], VOPS(sub)(one, sig)));
                store_bf16(du + i + k * LANES, bf16_value(VOPS(mul)(d2[k], s)));
                store_bf16(dg + i + k * LANES, bf16_value(VOPS(mul)(VOPS(mul)(ds, sig), slope)));
            }
        }
        for (; i < end; i++) {
            const float gi = bf16_to_float(g[i]), di = bf16_to_float(dh[i]);
            const float sig = 1.0f / (1.0f + expf(-gi));
            const float s = bf16_to_float(float_to_bf16(silu_float(gi)));
            const float ds = bf16_to_float(float_to_bf16(di * bf16_to_float(u[i])));
            du[i] = float_to_bf16(di * s);
            dg[i] = float_to_bf16(ds * sig * (1.0f + gi * (1.0f - sig)));
        }
    }
    return 0;
#else
    return -1;
#endif
}
