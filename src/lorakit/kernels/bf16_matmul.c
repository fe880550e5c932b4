/* y = x @ W.T for a bf16 W (n_out, n_in), n_in % (2 * LANES) == 0, float32 sums: the output
 * head while decoding, a few rows against a large vocabulary, W's rows fetched ahead.
 *
 * x: (batch, n_in) float32 or bf16 (x_bf16); y: (batch, n_out) float32 or bf16 (y_bf16). The
 * products run in bf16 where the CPU has AVX512-BF16 (x rounded to bf16 first if it is
 * float32), in float32 elsewhere.
 */
#include "simd.h"

#if LANES
#define HEAD_AHEAD 32 /* outputs: how far ahead of the products W's rows are fetched */
/* `outs` outputs of a bf16 W (rows n_in apart) for `rows` rows of x (bf16 xh where the CPU
 * has AVX512-BF16, float32 xf elsewhere): each load of x serves every output. W's rows
 * HEAD_AHEAD outputs on are fetched into L2 meanwhile: with the hardware's prefetching alone
 * the head waited on memory (measured 1.3x faster at 1 row, 2x at 8). */
static inline __attribute__((always_inline)) void head_rows(
    const int rows, const int outs, const uint16_t* w, int64_t n_in, const float* xf,
    const uint16_t* xh, float* y, int64_t y_stride) {
    vec acc[2][MAX_ROWS];
    for (int j = 0; j < outs; j++)
        for (int r = 0; r < rows; r++) acc[j][r] = vzero();
    for (int64_t c = 0; c < n_in; c += CHUNK) {
        for (int j = 0; j < outs; j++)
            _mm_prefetch((const char*)(w + (j + HEAD_AHEAD) * n_in + c), _MM_HINT_T1);
#if HAVE_BF16
        __m512bh wv[2];
        for (int j = 0; j < outs; j++) wv[j] = (__m512bh)_mm512_loadu_si512(w + j * n_in + c);
        for (int r = 0; r < rows; r++) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512(xh + r * n_in + c);
            for (int j = 0; j < outs; j++) acc[j][r] = _mm512_dpbf16_ps(acc[j][r], wv[j], xv);
        }
#else
        vec w0[2], w1[2];
        for (int j = 0; j < outs; j++) widen(w + j * n_in + c, &w0[j], &w1[j]);
        for (int r = 0; r < rows; r++) {
            const vec xa = vload(xf + r * n_in + c), xb = vload(xf + r * n_in + c + LANES);
            for (int j = 0; j < outs; j++) {
                acc[j][r] = vfma(w0[j], xa, acc[j][r]);
                acc[j][r] = vfma(w1[j], xb, acc[j][r]);
            }
        }
#endif
    }
    for (int j = 0; j < outs; j++)
        for (int r = 0; r < rows; r++) y[r * y_stride + j] = vsum(acc[j][r]);
}
#endif

/* y = x @ W.T for a bf16 W (n_out, n_in), n_in % (2 * LANES) == 0: the output head while
 * decoding, a few rows against a large vocabulary. */
int lk_bf16_matmul(const uint16_t* w, int64_t n_out, int64_t n_in, const void* x, int x_bf16,
                   int64_t batch, void* out, int y_bf16, int threads) {
#if LANES
    if (n_in % CHUNK || batch < 1) return -1;
    /* the products take bf16 x where the CPU has AVX512-BF16, float32 x elsewhere */
    const int need_xf = !HAVE_BF16, need_xh = HAVE_BF16 && !x_bf16;
    float* xf = need_xf || need_xh ? as_float(x, x_bf16, batch * n_in) : NULL;
    uint16_t* xh = need_xh ? malloc(sizeof(uint16_t) * batch * n_in) : (uint16_t*)x;
    float* y = y_bf16 ? malloc(sizeof(float) * batch * n_out) : out;
    if (((need_xf || need_xh) && !xf) || !xh || !y) {
        free(xf);
        if (need_xh) free(xh);
        if (y != out) free(y);
        return -1;
    }
    if (need_xh)
        for (int64_t i = 0; i < batch * n_in; i++) xh[i] = float_to_bf16(xf[i]);
    /* two outputs at a time for 4 rows or more (AVX2's 16 registers hold one output's 8 rows);
     * one for fewer (measured faster there) */
    const int outs = LANES == 16 && batch >= 4 ? 2 : 1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < n_out; o += outs) {
        const uint16_t* wo = w + o * n_in;
        for (int64_t b = 0; b < batch; b += MAX_ROWS) {
            const int rows = batch - b < MAX_ROWS ? batch - b : MAX_ROWS;
            const float* xfb = xf ? xf + b * n_in : NULL;
            const uint16_t* xhb = xh + b * n_in;
            float* yb = y + b * n_out + o;
#define HEAD(n)                                                         \
    (outs == 2 && o + 1 < n_out ? head_rows(n, 2, wo, n_in, xfb, xhb, yb, n_out) \
                                : head_rows(n, 1, wo, n_in, xfb, xhb, yb, n_out))
            switch (rows) { ROW_CASES(HEAD) }
        }
    }
    store(y, out, y_bf16, batch * n_out);
    free(xf);
    if (need_xh) free(xh);
    if (y != out) free(y);
    return 0;
#else
    return -1;
#endif
}
