/* y = x @ W.T with W in NF4 (lorakit.quant.nf4's layout), read straight from its 4-bit codes;
 * n weights over one x in one call; and W dequantized to float32 or bf16.
 *
 * Decoding reads every weight once per new token: from the 4-bit codes that is a quarter of the
 * bytes a bf16 weight would be. lk_nf4_lanes() says the build's vector width (0: no AVX2, and
 * lorakit keeps its PyTorch path); lk_nf4_bf16() whether products may run in bf16 here.
 *
 * NF4: packed holds two codes per byte, the first element in the high nibble; rows of n_in
 * elements; blocks of bs elements along a row (n_in % bs == 0, bs % 32 == 0), each with one
 * float32 scale (double quantization already undone by the caller). x: (batch, n_in), float32
 * or bf16 (x_bf16); y: (batch, n_out), float32 or bf16 (y_bf16, rounded to nearest even).
 * With lora_a (rank, n_in) and lora_bt (rank, n_out: B transposed), float32, an adapter is added
 * in the same call: y += s * (x @ A.T) @ B.T. bf16_products says the caller computes in bf16:
 * where the CPU has AVX512-BF16 and x is bf16 the products then run in bf16 with float32 sums,
 * the weight being its bf16 dequantized copy's values (code * scale rounded once).
 */
#include "simd.h"

typedef struct { /* one NF4 weight, prepared once by nf4_matmul.KernelWeight */
    const uint8_t* packed;
    const float* code;   /* the 16 NF4 values */
    const float* scales; /* one per block, row-major */
    int64_t n_out, n_in, bs;
} nf4_weight;

#if LANES == 16
/* LANES bytes -> the values of their high and low nibbles */
static inline void decode(const uint8_t* p, const float* code, vec* hi, vec* lo) {
    __m512 lut = _mm512_loadu_ps(code);
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
    *hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut);
    *lo = _mm512_permutexvar_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)), lut);
}
#elif LANES
static inline __m256 lookup(__m256i idx, const float* code) {
    __m256 low = _mm256_permutevar8x32_ps(_mm256_loadu_ps(code), idx);
    __m256 high = _mm256_permutevar8x32_ps(_mm256_loadu_ps(code + 8), idx);
    return _mm256_blendv_ps(low, high, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}
static inline void decode(const uint8_t* p, const float* code, vec* hi, vec* lo) {
    __m256i v = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p));
    *hi = lookup(_mm256_srli_epi32(v, 4), code);
    *lo = lookup(_mm256_and_si256(v, _mm256_set1_epi32(15)), code);
}
#endif

int lk_nf4_lanes(void) { return LANES; }
int lk_nf4_bf16(void) { return LANES && HAVE_BF16; }

#if LANES
#define CHUNK16 64        /* elements per step of the bf16 products: 32 bytes of codes */
#define OUT_TILE 64
#define IN_TILE 512
#define L1_BYTES 32768 /* x that fits in this is not tiled */

/* One output feature over inputs [k0, k1) for `rows` rows of x permuted for decode() (xp), its
 * chunks `stride` elements apart, the rows' copies of a chunk side by side; added into y. */
static inline __attribute__((always_inline)) void dot_rows(
    const int rows, const uint8_t* packed, const float* code, int64_t k0, int64_t k1,
    int64_t bs, const float* scales, const float* xp, int64_t stride, float* y,
    int64_t y_stride) {
    vec acc[MAX_ROWS];
    for (int r = 0; r < rows; r++) acc[r] = vzero();
    for (int64_t start = k0; start < k1; start += bs) {
        vec part[MAX_ROWS];
        for (int r = 0; r < rows; r++) part[r] = vzero();
        for (int64_t c = start; c < start + bs; c += CHUNK) {
            vec hi, lo;
            decode(packed + c / 2, code, &hi, &lo);
            const float* xc = xp + c / CHUNK * stride;
            for (int r = 0; r < rows; r++) {
                part[r] = vfma(hi, vload(xc + r * CHUNK), part[r]);
                part[r] = vfma(lo, vload(xc + r * CHUNK + LANES), part[r]);
            }
        }
        vec s = vset1(scales[start / bs]);
        for (int r = 0; r < rows; r++) acc[r] = vfma(part[r], s, acc[r]);
    }
    for (int r = 0; r < rows; r++) y[r * y_stride] += vsum(acc[r]);
}

#if HAVE_BF16
/* The same in bf16 products, for `outs` (1 or 2) output features at once, their packed rows
 * `row_bytes` apart and their scales `scale_stride` apart: each block's 16 NF4 values times its
 * scale, rounded to bf16 (the bf16 dequantized weight, bit for bit), become the lookup table of
 * one vpermw per nibble of 64 codes; then one vdpbf16ps per nibble, row and output. Lane i of
 * the high nibbles pairs elements 4i and 4i+2, of the low ones 4i+1 and 4i+3: xh holds each
 * row's chunk in that order (see lk_nf4_matmul). Two outputs share each load of x. */
static inline __attribute__((always_inline)) void dot_rows_bf16(
    const int rows, const int outs, const uint8_t* packed, int64_t row_bytes, __m512 code,
    int64_t k0, int64_t k1, int64_t bs, const float* scales, int64_t scale_stride,
    const uint16_t* xh, int64_t stride, float* y, int64_t y_stride) {
    __m512 acc[2][MAX_ROWS];
    for (int j = 0; j < outs; j++)
        for (int r = 0; r < rows; r++) acc[j][r] = _mm512_setzero_ps();
    for (int64_t c = k0; c < k1; c += CHUNK16) {
        __m512bh hi[2], lo[2];
        for (int j = 0; j < outs; j++) {
            const __m512 scaled = _mm512_mul_ps(code, _mm512_set1_ps(scales[j * scale_stride + c / bs]));
            const __m512i lut = _mm512_castsi256_si512((__m256i)_mm512_cvtneps_pbh(scaled));
            const __m512i v = _mm512_cvtepu8_epi16(
                _mm256_loadu_si256((const __m256i*)(packed + j * row_bytes + c / 2)));
            hi[j] = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), lut);
            lo[j] = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(v, _mm512_set1_epi16(15)), lut);
        }
        const uint16_t* xc = xh + c / CHUNK16 * stride;
        for (int r = 0; r < rows; r++) {
            const __m512bh xa = (__m512bh)_mm512_loadu_si512(xc + r * CHUNK16);
            const __m512bh xb = (__m512bh)_mm512_loadu_si512(xc + r * CHUNK16 + 32);
            for (int j = 0; j < outs; j++) {
                acc[j][r] = _mm512_dpbf16_ps(acc[j][r], hi[j], xa);
                acc[j][r] = _mm512_dpbf16_ps(acc[j][r], lo[j], xb);
            }
        }
    }
    for (int j = 0; j < outs; j++)
        for (int r = 0; r < rows; r++) y[r * y_stride + j] += _mm512_reduce_add_ps(acc[j][r]);
}
#endif

/* sum of a[i] * b[i], float32 */
static inline float dot(const float* a, const float* b, int64_t n) {
    vec acc = vzero();
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES) acc = vfma(vload(a + i), vload(b + i), acc);
    float sum = vsum(acc);
    for (; i < n; i++) sum += a[i] * b[i];
    return sum;
}

/* y += s * (x @ A.T) @ B.T: a rank-r adapter, A (rank, n_in), B given transposed (rank, n_out)
 * so that its products run along the outputs. Small next to the layer: one thread.
 * With `spans` (two per row), a batch mixing adapters (SGMV): A and B hold the batch's adapters
 * side by side, row r takes only their rows spans[2r] .. spans[2r+1] (its adapter; none when
 * equal) at its own scale row_scales[r]. */
static int add_lora(const float* a, const float* bt, int64_t rank, float s, const int64_t* spans,
                    const float* row_scales, const float* x, int64_t batch, int64_t n_in,
                    float* y, int64_t n_out) {
    float* t = malloc(sizeof(float) * batch * rank);
    if (!t) return -1;
    for (int64_t r = 0; r < batch; r++) { /* n_in % LANES == 0 (whole NF4 blocks) */
        const float* xr = x + r * n_in;
        const int64_t end = spans ? spans[2 * r + 1] : rank;
        const float sr = spans ? row_scales[r] : s;
        int64_t k = spans ? spans[2 * r] : 0;
        for (; k + 8 <= end; k += 8) { /* eight sums side by side: one alone waits on its fmas */
            vec acc[8];
            for (int j = 0; j < 8; j++) acc[j] = vzero();
            for (int64_t i = 0; i < n_in; i += LANES) {
                const vec xv = vload(xr + i);
                for (int j = 0; j < 8; j++) acc[j] = vfma(vload(a + (k + j) * n_in + i), xv, acc[j]);
            }
            for (int j = 0; j < 8; j++) t[r * rank + k + j] = sr * vsum(acc[j]);
        }
        for (; k < end; k++) t[r * rank + k] = sr * dot(a + k * n_in, xr, n_in);
    }
    for (int64_t r = 0; r < batch; r++) {
        const int64_t k0 = spans ? spans[2 * r] : 0, k1 = spans ? spans[2 * r + 1] : rank;
        const float* tr = t + r * rank;
        float* yr = y + r * n_out;
        int64_t o = 0;
        for (; o + LANES <= n_out; o += LANES) {
            vec acc = vload(yr + o);
            for (int64_t k = k0; k < k1; k++) acc = vfma(vset1(tr[k]), vload(bt + k * n_out + o), acc);
            vstore(yr + o, acc);
        }
        for (; o < n_out; o++)
            for (int64_t k = k0; k < k1; k++) yr[o] += tr[k] * bt[k * n_out + o];
    }
    free(t);
    return 0;
}
#endif

/* Returns 0 on success, -1 if this build cannot run it (no SIMD, bad shape, no memory). */
int lk_nf4_matmul(const nf4_weight* w, const void* x, int x_bf16, int64_t batch, void* out,
                  int y_bf16, int threads, const float* lora_a, const float* lora_bt,
                  int64_t rank, float lora_scale, const int64_t* lora_spans,
                  const float* lora_row_scales, int bf16_products) {
#if LANES
    const int64_t n_out = w->n_out, n_in = w->n_in, bs = w->bs;
    if (bs % CHUNK || n_in % bs || batch < 1) return -1;
    const int bf16 = HAVE_BF16 && bf16_products && x_bf16 && bs % CHUNK16 == 0;
    const int64_t chunk = bf16 ? CHUNK16 : CHUNK;
    const int need_xf = !bf16 || lora_a; /* float32 x: for float32 products, for the adapter */
    float* xf = need_xf ? as_float(x, x_bf16, batch * n_in) : NULL;
    float* y = y_bf16 ? malloc(sizeof(float) * batch * n_out) : out;
    /* x chunk by chunk, every row's copy of a chunk side by side (rows' loads then stay close
     * together), in the order the products take it */
    void* xp = malloc((bf16 ? 2 : 4) * batch * n_in);
    if ((need_xf && !xf) || !y || !xp) {
        free(xf);
        free(xp);
        if (y != out) free(y);
        return -1;
    }
#if HAVE_BF16
    /* bf16: the high nibbles' pairs (4i, 4i+2), then the low ones' (4i+1, 4i+3); order16[k] is
     * the element of the chunk that goes to place k */
    uint16_t order16[CHUNK16];
    for (int i = 0; i < 16; i++) {
        order16[2 * i] = 4 * i, order16[2 * i + 1] = 4 * i + 2;
        order16[32 + 2 * i] = 4 * i + 1, order16[33 + 2 * i] = 4 * i + 3;
    }
    const __m512i high = _mm512_loadu_si512(order16), low = _mm512_loadu_si512(order16 + 32);
#endif
    for (int64_t r = 0; r < batch; r++)
        for (int64_t c = 0; c < n_in; c += chunk) {
#if HAVE_BF16
            if (bf16) {
                const uint16_t* src = (const uint16_t*)x + r * n_in + c;
                uint16_t* dst = (uint16_t*)xp + c / chunk * batch * chunk + r * chunk;
                const __m512i a = _mm512_loadu_si512(src), b = _mm512_loadu_si512(src + 32);
                _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(a, high, b));
                _mm512_storeu_si512(dst + 32, _mm512_permutex2var_epi16(a, low, b));
                continue;
            }
#endif
            /* float32: decode()'s order, even elements, then odd ones */
            const float* src = xf + r * n_in + c;
            float* dst = (float*)xp + c / chunk * batch * chunk + r * chunk;
            for (int k = 0; k < LANES; k++) {
                dst[k] = src[2 * k];
                dst[LANES + k] = src[2 * k + 1];
            }
        }
#if HAVE_BF16
    const __m512 code = _mm512_loadu_ps(w->code);
#endif
    /* Tiles: up to OUT_TILE outputs (an even number: the bf16 products take two at a time), as
     * many tiles for each thread, over IN_TILE inputs unless the rows' x fits in L1, so that the
     * x of a tile stays in L1 across the outputs instead of streaming from L2. */
    const int64_t in_tile =
        batch * n_in * (bf16 ? 2 : 4) <= L1_BYTES ? n_in : (IN_TILE + bs - 1) / bs * bs;
    const int64_t per_thread = (n_out + threads * OUT_TILE - 1) / (threads * OUT_TILE);
    const int64_t out_tile = ((n_out + threads * per_thread - 1) / (threads * per_thread) + 1) / 2 * 2;
    const int64_t n_tiles = (n_out + out_tile - 1) / out_tile;
    const int64_t st = batch * chunk;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t tile = 0; tile < n_tiles; tile++) {
        const int64_t o0 = tile * out_tile;
        const int64_t o1 = o0 + out_tile < n_out ? o0 + out_tile : n_out;
        for (int64_t r = 0; r < batch; r++)
            for (int64_t o = o0; o < o1; o++) y[r * n_out + o] = 0.0f;
        for (int64_t k0 = 0; k0 < n_in; k0 += in_tile) {
            const int64_t k1 = k0 + in_tile < n_in ? k0 + in_tile : n_in;
            for (int64_t o = o0; o < o1; o += bf16 ? 2 : 1) { /* bf16: two outputs at a time */
                const uint8_t* row = w->packed + o * n_in / 2;
                const float* row_scales = w->scales + o * (n_in / bs);
                for (int64_t b = 0; b < batch; b += MAX_ROWS) {
                    float* yb = y + b * n_out + o;
                    const int n = batch - b < MAX_ROWS ? batch - b : MAX_ROWS;
#if HAVE_BF16
                    if (bf16) {
                        const uint16_t* xb = (const uint16_t*)xp + b * chunk;
#define DOT16_OUTS(n, outs) \
    dot_rows_bf16(n, outs, row, n_in / 2, code, k0, k1, bs, row_scales, n_in / bs, xb, st, yb, n_out)
#define DOT16(n) (o + 1 < o1 ? DOT16_OUTS(n, 2) : DOT16_OUTS(n, 1))
                        switch (n) { ROW_CASES(DOT16) }
                        continue;
                    }
#endif
                    const float* xb = (const float*)xp + b * chunk;
#define DOT(n) dot_rows(n, row, w->code, k0, k1, bs, row_scales, xb, st, yb, n_out)
                    switch (n) { ROW_CASES(DOT) }
                }
            }
        }
    }
    int status = 0;
    if (lora_a)
        status = add_lora(lora_a, lora_bt, rank, lora_scale, lora_spans, lora_row_scales, xf,
                          batch, n_in, y, n_out);
    store(y, out, y_bf16, batch * n_out);
    free(xf);
    free(xp);
    if (y != out) free(y);
    return status;
#else
    return -1;
#endif
}

/* n weights over the same x in one call (q, k and v; gate and up), each as lk_nf4_matmul with
 * its own output and adapter (NULL lora_a[i]: none): a decoding step's per-call cost is mostly
 * the caller's, in Python. */
int lk_nf4_matmul_n(int64_t n, const nf4_weight* const* ws, const void* x, int x_bf16,
                    int64_t batch, void* const* outs, int y_bf16, int threads,
                    const float* const* lora_a, const float* const* lora_bt, const int64_t* ranks,
                    const float* lora_scales, const int64_t* const* lora_spans,
                    const float* const* lora_row_scales, int bf16_products) {
    for (int64_t i = 0; i < n; i++) {
        const int status = lk_nf4_matmul(ws[i], x, x_bf16, batch, outs[i], y_bf16, threads,
                                         lora_a[i], lora_bt[i], ranks[i], lora_scales[i],
                                         lora_spans[i], lora_row_scales[i], bf16_products);
        if (status) return status;
    }
    return 0;
}
/* The whole weight, dequantized: code * scale in float32, stored as float32 or rounded to bf16
 * (out_bf16); the same values as lorakit.nf4.dequantize_nf4 and bitsandbytes. */
int lk_nf4_dequantize(const nf4_weight* w, void* out, int out_bf16, int threads) {
#if LANES
    const int64_t n_in = w->n_in, bs = w->bs;
    if (n_in % bs || bs % 2) return -1;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < w->n_out; o++) {
        const uint8_t* row = w->packed + o * n_in / 2;
        const float* scales = w->scales + o * (n_in / bs);
        int64_t i = 0;
#if LANES == 16
        /* 16 bytes at a time: decode, scale, back into element order, stored */
        const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
        for (; i + CHUNK <= n_in; i += CHUNK) {
            vec hi, lo, s = vset1(scales[i / bs]);
            decode(row + i / 2, w->code, &hi, &lo);
            hi = _mm512_mul_ps(hi, s);
            lo = _mm512_mul_ps(lo, s);
            __m512 e0 = _mm512_permutex2var_ps(hi, first, lo);  /* elements i .. i+15 */
            __m512 e1 = _mm512_permutex2var_ps(hi, second, lo); /* i+16 .. i+31 */
            if (out_bf16) {
                uint16_t* dst = (uint16_t*)out + o * n_in + i;
                store_bf16(dst, bf16_value(e0));
                store_bf16(dst + LANES, bf16_value(e1));
            } else {
                _mm512_storeu_ps((float*)out + o * n_in + i, e0);
                _mm512_storeu_ps((float*)out + o * n_in + i + LANES, e1);
            }
        }
#endif
        for (; i < n_in; i += 2) {
            const float s = scales[i / bs];
            const float hi = w->code[row[i / 2] >> 4] * s, lo = w->code[row[i / 2] & 15] * s;
            if (out_bf16) {
                ((uint16_t*)out)[o * n_in + i] = float_to_bf16(hi);
                ((uint16_t*)out)[o * n_in + i + 1] = float_to_bf16(lo);
            } else {
                ((float*)out)[o * n_in + i] = hi;
                ((float*)out)[o * n_in + i + 1] = lo;
            }
        }
    }
    return 0;
#else
    return -1;
#endif
}
