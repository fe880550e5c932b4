/* Softmax cross-entropy over bf16 logits and its gradient in one compiled pass per row, for
 * the training loss: x (rows, n) bf16, labels (rows) int64 -> loss (rows) float32 and, where
 * asked, grad (rows, n) bf16 (may be x itself).
 */
#include "simd.h"

#if LANES == 16
#define vmax_all(v) _mm512_reduce_max_ps(v)
#elif LANES
static inline float vmax_all(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
#endif

/* Softmax cross-entropy over rows of n bf16 logits (the chunked loss of lorakit/training/loss.py):
 * loss[r] = log(sum(e^x)) - x[labels[r]] in float32, and where grad is not NULL,
 * grad = softmax(x) - onehot(labels[r]) rounded to bf16, the gradient of the summed loss with
 * respect to the logits. Three passes over each row (its max, the sum, the gradient) where
 * PyTorch makes a float32 copy of the chunk and five passes over it. -1 for a label out of
 * range (the caller's PyTorch path then says so), before anything is written. grad may be x:
 * each row is read in full before its gradient is written, element by element. */
int lk_cross_entropy_bf16(const uint16_t* x, int64_t rows, int64_t n, const int64_t* labels,
                          float* loss, uint16_t* grad, int threads) {
#if LANES
    for (int64_t r = 0; r < rows; r++)
        if (labels[r] < 0 || labels[r] >= n) return -1;
    const int64_t whole = n / CHUNK * CHUNK;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t* xr = x + r * n;
        vec top = vset1(-INFINITY), sum = vzero(), a, b;
        for (int64_t i = 0; i < whole; i += CHUNK) {
            widen(xr + i, &a, &b);
            top = VOPS(max)(top, VOPS(max)(a, b));
        }
        float m = vmax_all(top);
        for (int64_t i = whole; i < n; i++) m = fmaxf(m, bf16_to_float(xr[i]));
        for (int64_t i = 0; i < whole; i += CHUNK) {
            widen(xr + i, &a, &b);
            sum = VOPS(add)(sum, VOPS(add)(vexp(VOPS(sub)(a, vset1(m))), vexp(VOPS(sub)(b, vset1(m)))));
        }
        float total = vsum(sum);
        for (int64_t i = whole; i < n; i++) total += expf(bf16_to_float(xr[i]) - m);
        const float lse = m + logf(total);
        const int64_t label = labels[r];
        loss[r] = lse - bf16_to_float(xr[label]);
        if (!grad) continue;
        uint16_t* gr = grad + r * n;
        float p[CHUNK];
        for (int64_t i = 0; i < whole; i += CHUNK) {
            widen(xr + i, &a, &b);
            a = vexp(VOPS(sub)(a, vset1(lse)));
            b = vexp(VOPS(sub)(b, vset1(lse)));
            if (label >= i && label < i + CHUNK) { /* minus the one-hot */
                VOPS(storeu)(p, a);
                VOPS(storeu)(p + LANES, b);
                p[label - i] -= 1.0f;
                a = vload(p);
                b = vload(p + LANES);
            }
            store_bf16(gr + i, bf16_value(a));
            store_bf16(gr + i + LANES, bf16_value(b));
        }
        for (int64_t i = whole; i < n; i++)
            gr[i] = float_to_bf16(expf(bf16_to_float(xr[i]) - lse) - (i == label ? 1.0f : 0.0f));
    }
    return 0;
#else
    return -1;
#endif
}
