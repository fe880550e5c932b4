/* Attention pieces in bf16 with a float32 softmax.
 *
 * lk_decode_attention, decoding: q (batch, heads, d), one new position per row, over the first
 * t positions of the caches k, v (batch, kv_heads, length, d); mask (batch, mask_stride) bytes
 * or NULL; out (batch, heads, d).
 * lk_causal_softmax_bf16, training's per-example attention (models/packed_attention.py):
 * scores (rows, n) in place, row r being query position r % n.
 */
#include "simd.h"

#if LANES
/* e^(s - top) in place over n scores, 0 for -inf (a key the row does not see); their sum */
static float softmax_exp(float* s, int64_t n, float top) {
    vec sum = vzero();
    int64_t j = 0;
    for (; j + LANES <= n; j += LANES) {
        vec x = vload(s + j);
        vec e = VSEEN(x, vexp(VOPS(sub)(x, vset1(top))));
        VOPS(storeu)(s + j, e);
        sum = VOPS(add)(sum, e);
    }
    float total = vsum(sum);
    for (; j < n; j++) {
        s[j] = s[j] == -INFINITY ? 0.0f : expf(s[j] - top);
        total += s[j];
    }
    return total;
}
#endif

/* Attention of one new position per row: q (batch, heads, d) over the first t positions of
 * the cache k, v (batch, kv_heads, length, d), query head h reading key/value head
 * h / (heads / kv_heads); mask (batch, mask_stride) says which positions a row sees (NULL:
 * all). Scores, softmax and sums in float32; out (batch, heads, d) in bf16. d % (2 * LANES)
 * == 0. */
int lk_decode_attention(const uint16_t* q, int64_t batch, int64_t heads, int64_t kv_heads,
                        int64_t d, const uint16_t* k, const uint16_t* v, int64_t length,
                        int64_t t, const uint8_t* mask, int64_t mask_stride, float scale,
                        uint16_t* out, int threads) {
#if LANES
    if (d % CHUNK || d > 512 || heads % kv_heads || t < 1 || t > length) return -1;
    const int64_t groups = heads / kv_heads;
    float* scores = malloc(sizeof(float) * batch * heads * t);
    if (!scores) return -1;
    /* Threads only where there is work enough to pay for waking them. */
#pragma omp parallel for num_threads(threads) schedule(static) \
    if (batch * heads * t * d >= (1 << 18))
    for (int64_t bh = 0; bh < batch * heads; bh++) {
        const int64_t b = bh / heads, h = bh % heads;
        const uint16_t* qr = q + bh * d;
        const int64_t cache = (b * kv_heads + h / groups) * length * d;
        const uint8_t* seen = mask ? mask + b * mask_stride : NULL;
        float* s = scores + bh * t;
        float top = -INFINITY;
#if HAVE_BF16 /* bf16 dot products: exact products, float32 sums, 32 elements an instruction */
        __m512bh qb[512 / 32];
        for (int64_t c = 0; c < d; c += 32) qb[c / 32] = (__m512bh)_mm512_loadu_si512(qr + c);
#else
        vec qw[512 / LANES]; /* the query in float32, once */
        for (int64_t c = 0; c < d; c += CHUNK) widen(qr + c, &qw[c / LANES], &qw[c / LANES + 1]);
#endif
        for (int64_t j = 0; j < t; j++) {
            if (seen && !seen[j]) {
                s[j] = -INFINITY;
                continue;
            }
            const uint16_t* kr = k + cache + j * d;
            vec acc = vzero();
#if HAVE_BF16
            for (int64_t c = 0; c < d; c += 32)
                acc = _mm512_dpbf16_ps(acc, qb[c / 32], (__m512bh)_mm512_loadu_si512(kr + c));
#else
            for (int64_t c = 0; c < d; c += CHUNK) {
                vec k0, k1;
                widen(kr + c, &k0, &k1);
                acc = vfma(qw[c / LANES], k0, acc);
                acc = vfma(qw[c / LANES + 1], k1, acc);
            }
#endif
            s[j] = vsum(acc) * scale;
            if (s[j] > top) top = s[j];
        }
        const float total = softmax_exp(s, t, top);
        vec o[64 / LANES * 2]; /* up to d = 128 in registers; wider heads go in steps below */
        for (int64_t c0 = 0; c0 < d; c0 += 128) {
            const int64_t width = d - c0 < 128 ? d - c0 : 128;
            for (int64_t c = 0; c < width; c += LANES) o[c / LANES] = vzero();
            for (int64_t j = 0; j < t; j++) {
                if (s[j] == 0.0f) continue;
                const uint16_t* vr = v + cache + j * d + c0;
                vec p = vset1(s[j]);
                for (int64_t c = 0; c < width; c += CHUNK) {
                    vec v0, v1;
                    widen(vr + c, &v0, &v1);
                    o[c / LANES] = vfma(p, v0, o[c / LANES]);
                    o[c / LANES + 1] = vfma(p, v1, o[c / LANES + 1]);
                }
            }
            float buf[128];
            for (int64_t c = 0; c < width; c += LANES) {
#if LANES == 16
                _mm512_storeu_ps(buf + c, o[c / LANES]);
#else
                _mm256_storeu_ps(buf + c, o[c / LANES]);
#endif
            }
            for (int64_t c = 0; c < width; c++) out[bh * d + c0 + c] = float_to_bf16(buf[c] / total);
        }
    }
    free(scores);
    return 0;
#else
    return -1;
#endif
}

/* Causal softmax in place over rows of n bf16 attention scores, row r being query position
 * r % n of a segment (SegmentAttention's grouped heads): keys past the query, and with
 * window > 0 keys window or more positions back, get 0 and cost nothing; the rest softmax in
 * float32 (max, e^(s - max), times 1 / sum), rounded to bf16. n up to 4096, else -1. */
#define SOFTMAX_MAX 4096
int lk_causal_softmax_bf16(uint16_t* s, int64_t rows, int64_t n, int64_t window,
                           int threads) {
#if LANES
    if (n > SOFTMAX_MAX) return -1;
#pragma omp parallel for num_threads(threads) schedule(static) if (rows >= 64)
    for (int64_t r = 0; r < rows; r++) {
        float buf[SOFTMAX_MAX];
        uint16_t* row = s + r * n;
        const int64_t i = r % n;
        const int64_t lo = window > 0 && i - window + 1 > 0 ? i - window + 1 : 0;
        const int64_t len = i + 1 - lo;
        float top = -INFINITY;
        for (int64_t j = 0; j < len; j++) {
            buf[j] = bf16_to_float(row[lo + j]);
            top = buf[j] > top ? buf[j] : top;
        }
        const float inv = 1.0f / softmax_exp(buf, len, top);
        memset(row, 0, (size_t)n * sizeof(uint16_t));
        for (int64_t j = 0; j < len; j++) row[lo + j] = float_to_bf16(buf[j] * inv);
    }
    return 0;
#else
    return -1;
#endif
}
