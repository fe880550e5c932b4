/* LlamaRMSNorm over rows of n bf16 values, forward and backward (the weight frozen), in
 * float32 inside with transformers' roundings to bf16: the forward is theirs bit for bit.
 *
 * x, dy, out, dx: (rows, n) bf16, row-major; w: (n) bf16.
 */
#include "simd.h"

/* out = w * bf16(x * rsqrt(mean(x^2) + eps)), rows of n bf16 values (LlamaRMSNorm: float32
 * inside, rounded back to bf16, times the bf16 weight and rounded again). Rows in parallel
 * when there are many (training); a decoding step's few stay on one thread. */
int lk_rms_norm(const uint16_t* x, int64_t rows, int64_t n, const uint16_t* w, float eps,
                uint16_t* out, int threads) {
#if LANES
    const int64_t whole = n / CHUNK * CHUNK;
#pragma omp parallel for num_threads(threads) schedule(static) if (rows >= 64)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t* xr = x + r * n;
        uint16_t* yr = out + r * n;
        vec s0 = vzero(), s1 = vzero(), a, b, wa, wb;
        for (int64_t i = 0; i < whole; i += CHUNK) {
            widen(xr + i, &a, &b);
            s0 = vfma(a, a, s0);
            s1 = vfma(b, b, s1);
        }
        float sum = vsum(VOPS(add)(s0, s1));
        for (int64_t i = whole; i < n; i++) sum += bf16_to_float(xr[i]) * bf16_to_float(xr[i]);
        const float scale = 1.0f / sqrtf(sum / (float)n + eps);
        for (int64_t i = 0; i < whole; i += CHUNK) {
            widen(xr + i, &a, &b);
            widen(w + i, &wa, &wb);
            store_bf16(yr + i, bf16_value(VOPS(mul)(wa, bf16_value(VOPS(mul)(a, vset1(scale))))));
            store_bf16(yr + i + LANES, bf16_value(VOPS(mul)(wb, bf16_value(VOPS(mul)(b, vset1(scale))))));
        }
        for (int64_t i = whole; i < n; i++) {
            const float normed = bf16_to_float(float_to_bf16(bf16_to_float(xr[i]) * scale));
            yr[i] = float_to_bf16(bf16_to_float(w[i]) * normed);
        }
    }
    return 0;
#else
    return -1;
#endif
}

/* lk_rms_norm's gradient with respect to x, the weight frozen (LoRA training): dy, x (rows of n
 * bf16) -> dx (bf16). In float32 as autograd's pass over LlamaRMSNorm's operations: with
 * g = bf16(dy * w) and r = 1 / sqrt(mean(x^2) + eps), dx = g r - x r^3 mean(g x). */
int lk_rms_norm_backward(const uint16_t* dy, const uint16_t* x, int64_t rows, int64_t n,
                         const uint16_t* w, float eps, uint16_t* dx, int threads) {
#if LANES
    const int64_t whole = n / CHUNK * CHUNK;
#pragma omp parallel for num_threads(threads) schedule(static) if (rows >= 64)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *xr = x + r * n, *dyr = dy + r * n;
        uint16_t* dxr = dx + r * n;
        vec sq = vzero(), gx = vzero(), xa, xb, da, db, wa, wb;
        for (int64_t i = 0; i < whole; i += CHUNK) {
            widen(xr + i, &xa, &xb);
            widen(dyr + i, &da, &db);
            widen(w + i, &wa, &wb);
            sq = vfma(xb, xb, vfma(xa, xa, sq));
            gx = vfma(bf16_value(VOPS(mul)(db, wb)), xb, vfma(bf16_value(VOPS(mul)(da, wa)), xa, gx));
        }
        float squares = vsum(sq), dot = vsum(gx);
        for (int64_t i = whole; i < n; i++) {
            const float xi = bf16_to_float(xr[i]);
            squares += xi * xi;
            dot += bf16_to_float(float_to_bf16(bf16_to_float(dyr[i]) * bf16_to_float(w[i]))) * xi;
        }
        const float rs = 1.0f / sqrtf(squares / (float)n + eps);
        const float c = rs * rs * rs * (dot / (float)n);
        for (int64_t i = 0; i < whole; i += CHUNK) {
            widen(xr + i, &xa, &xb);
            widen(dyr + i, &da, &db);
            widen(w + i, &wa, &wb);
            const vec ga = bf16_value(VOPS(mul)(da, wa)), gb = bf16_value(VOPS(mul)(db, wb));
            store_bf16(dxr + i, bf16_value(VOPS(sub)(VOPS(mul)(ga, vset1(rs)), VOPS(mul)(xa, vset1(c)))));
            store_bf16(dxr + i + LANES,
                       bf16_value(VOPS(sub)(VOPS(mul)(gb, vset1(rs)), VOPS(mul)(xb, vset1(c)))));
        }
        for (int64_t i = whole; i < n; i++) {
            const float g = bf16_to_float(float_to_bf16(bf16_to_float(dyr[i]) * bf16_to_float(w[i])));
            dxr[i] = float_to_bf16(g * rs - bf16_to_float(xr[i]) * c);
        }
    }
    return 0;
#else
    return -1;
#endif
}
