/* y = x @ W.T with W in NF4 (lorakit.nf4's layout), read straight from its 4-bit codes; and
 * y = x @ W.T with W in bf16, for the output head. Then the rest of a bf16 decoding step that
 * PyTorch spends many small operations on: RMSNorm, the rotary embedding with the KV cache
 * write, one query's attention, greedy argmax. And the training loss's softmax cross-entropy.
 *
 * Decoding reads every weight once per new token: from the 4-bit codes that is a quarter of the
 * bytes a bf16 weight would be. Compiled at first use by lorakit/kernels/_build.py with
 * -march=native; without AVX2 it reports width 0 and lorakit keeps its PyTorch path.
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
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

typedef struct { /* one NF4 weight, prepared once by nf4_matmul.KernelWeight */
    const uint8_t* packed;
    const float* code;   /* the 16 NF4 values */
    const float* scales; /* one per block, row-major */
    int64_t n_out, n_in, bs;
} nf4_weight;

#if defined(__AVX512F__)
#define LANES 16
typedef __m512 vec;
#define vzero() _mm512_setzero_ps()
#define vload(p) _mm512_loadu_ps(p)
#define vstore(p, v) _mm512_storeu_ps(p, v)
#define vfma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define vset1(s) _mm512_set1_ps(s)
#define vsum(v) _mm512_reduce_add_ps(v)
#define VOPS(op) _mm512_##op##_ps /* any other float32 operation */
/* LANES bytes -> the values of their high and low nibbles */
static inline void decode(const uint8_t* p, const float* code, vec* hi, vec* lo) {
    __m512 lut = _mm512_loadu_ps(code);
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
    *hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut);
    *lo = _mm512_permutexvar_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)), lut);
}
/* 2 * LANES bf16 -> float32: the first LANES and the next LANES */
static inline void widen(const uint16_t* p, vec* a, vec* b) {
    __m512i v = _mm512_loadu_si512((const void*)p);
    *a = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(v)), 16));
    *b = _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(v, 1)), 16));
}
#elif defined(__AVX2__) && defined(__FMA__)
#define LANES 8
typedef __m256 vec;
#define vzero() _mm256_setzero_ps()
#define vload(p) _mm256_loadu_ps(p)
#define vstore(p, v) _mm256_storeu_ps(p, v)
#define vfma(a, b, c) _mm256_fmadd_ps(a, b, c)
#define vset1(s) _mm256_set1_ps(s)
#define VOPS(op) _mm256_##op##_ps
static inline float vsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
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
static inline void widen(const uint16_t* p, vec* a, vec* b) {
    __m256i v = _mm256_loadu_si256((const __m256i*)p);
    *a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(v)), 16));
    *b = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(v, 1)), 16));
}
#else
#define LANES 0
#endif

int lk_nf4_lanes(void) { return LANES; }

#if LANES
#define CHUNK (2 * LANES) /* elements decoded at once from LANES bytes (float32 products) */
#define CHUNK16 64        /* elements per step of the bf16 products: 32 bytes of codes */
#define MAX_ROWS 8
#define OUT_TILE 64
#define IN_TILE 512
#define L1_BYTES 32768 /* x that fits in this is not tiled */
#if defined(__AVX512BF16__)
#define HAVE_BF16 1
#else
#define HAVE_BF16 0
#endif
int lk_nf4_bf16(void) { return HAVE_BF16; }

#define ROW_CASES(CALL)            \
    case 1: CALL(1); break;        \
    case 2: CALL(2); break;        \
    case 3: CALL(3); break;        \
    case 4: CALL(4); break;        \
    case 5: CALL(5); break;        \
    case 6: CALL(6); break;        \
    case 7: CALL(7); break;        \
    default: CALL(8); break;

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) { /* round to nearest even, as torch does */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffff) > 0x7f800000) return (uint16_t)((bits >> 16) | 0x40); /* NaN */
    return (uint16_t)((bits + 0x7fff + ((bits >> 16) & 1)) >> 16);
}

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
 * so that its products run along the outputs. Small next to the layer: one thread. */
static int add_lora(const float* a, const float* bt, int64_t rank, float s, const float* x,
                    int64_t batch, int64_t n_in, float* y, int64_t n_out) {
    float* t = malloc(sizeof(float) * batch * rank);
    if (!t) return -1;
    for (int64_t r = 0; r < batch; r++) { /* n_in % LANES == 0 (whole NF4 blocks) */
        const float* xr = x + r * n_in;
        int64_t k = 0;
        for (; k + 8 <= rank; k += 8) { /* eight sums side by side: one alone waits on its fmas */
            vec acc[8];
            for (int j = 0; j < 8; j++) acc[j] = vzero();
            for (int64_t i = 0; i < n_in; i += LANES) {
                const vec xv = vload(xr + i);
                for (int j = 0; j < 8; j++) acc[j] = vfma(vload(a + (k + j) * n_in + i), xv, acc[j]);
            }
            for (int j = 0; j < 8; j++) t[r * rank + k + j] = s * vsum(acc[j]);
        }
        for (; k < rank; k++) t[r * rank + k] = s * dot(a + k * n_in, xr, n_in);
    }
    for (int64_t r = 0; r < batch; r++) {
        const float* tr = t + r * rank;
        float* yr = y + r * n_out;
        int64_t o = 0;
        for (; o + LANES <= n_out; o += LANES) {
            vec acc = vload(yr + o);
            for (int64_t k = 0; k < rank; k++) acc = vfma(vset1(tr[k]), vload(bt + k * n_out + o), acc);
            vstore(yr + o, acc);
        }
        for (; o < n_out; o++)
            for (int64_t k = 0; k < rank; k++) yr[o] += tr[k] * bt[k * n_out + o];
    }
    free(t);
    return 0;
}

/* x (batch, n) of either dtype -> float32 */
static float* as_float(const void* x, int x_bf16, int64_t n) {
    float* out = malloc(sizeof(float) * n);
    if (out && x_bf16)
        for (int64_t i = 0; i < n; i++) out[i] = bf16_to_float(((const uint16_t*)x)[i]);
    else if (out)
        memcpy(out, x, sizeof(float) * n);
    return out;
}

static void store(const float* y, void* out, int y_bf16, int64_t n) {
    if (y_bf16)
        for (int64_t i = 0; i < n; i++) ((uint16_t*)out)[i] = float_to_bf16(y[i]);
    else if ((const void*)y != out)
        memcpy(out, y, sizeof(float) * n);
}
#else
int lk_nf4_bf16(void) { return 0; }
#endif

/* Returns 0 on success, -1 if this build cannot run it (no SIMD, bad shape, no memory). */
int lk_nf4_matmul(const nf4_weight* w, const void* x, int x_bf16, int64_t batch, void* out,
                  int y_bf16, int threads, const float* lora_a, const float* lora_bt,
                  int64_t rank, float lora_scale, int bf16_products) {
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
        status = add_lora(lora_a, lora_bt, rank, lora_scale, xf, batch, n_in, y, n_out);
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
                    const float* lora_scales, int bf16_products) {
    for (int64_t i = 0; i < n; i++) {
        const int status = lk_nf4_matmul(ws[i], x, x_bf16, batch, outs[i], y_bf16, threads,
                                         lora_a[i], lora_bt[i], ranks[i], lora_scales[i],
                                         bf16_products);
        if (status) return status;
    }
    return 0;
}

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

/* ---- the rest of a decoding step, for bf16 models: RMSNorm and one query's attention ---- */

#if LANES
/* float32 values rounded to the nearest even bf16 (float_to_bf16 without its NaN case), kept
 * as float32; and such values stored as bf16 */
#if LANES == 16
static inline vec bf16_value(vec v) {
    const __m512i bits = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i up = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
    return _mm512_castsi512_ps(_mm512_and_si512(up, _mm512_set1_epi32((int)0xffff0000u)));
}
static inline void store_bf16(uint16_t* p, vec v) { /* v already rounded */
    _mm256_storeu_si256((__m256i*)p, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16)));
}
#else
static inline vec bf16_value(vec v) {
    const __m256i bits = _mm256_castps_si256(v);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
    const __m256i up = _mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7fff)));
    return _mm256_castsi256_ps(_mm256_and_si256(up, _mm256_set1_epi32((int)0xffff0000u)));
}
static inline void store_bf16(uint16_t* p, vec v) {
    uint32_t bits[LANES];
    _mm256_storeu_si256((__m256i*)bits, _mm256_castps_si256(v));
    for (int k = 0; k < LANES; k++) p[k] = (uint16_t)(bits[k] >> 16);
}
#endif
#endif

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

/* For each of `rows` rows of n bf16 values, the index of the largest (the first of equals;
 * NaN is not handled): greedy decoding's choice, without a float32 copy of the logits. The
 * values are mapped to unsigned keys in the same order (negative: bits flipped; else the sign
 * bit set) so that the maximum is an integer reduction the compiler vectorises. */
static inline uint16_t order_key(uint16_t h) {
    return (h & 0x8000) ? (uint16_t)~h : (uint16_t)(h | 0x8000);
}

int lk_argmax_bf16(const uint16_t* x, int64_t rows, int64_t n, int64_t* out) {
    if (n < 1) return -1;
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t* row = x + r * n;
        uint16_t top = 0;
        for (int64_t i = 0; i < n; i++) {
            const uint16_t key = order_key(row[i]);
            top = key > top ? key : top;
        }
        int64_t i = 0;
        while (order_key(row[i]) != top) i++;
        out[r] = i;
    }
    return 0;
}

#if LANES
/* e^x for LANES floats: Cephes' expf, ~1 ulp; +inf where expf overflows (x > 88.72), e^-87
 * for x below -87. */
#define EXP_POLY(mul, fmadd, set1, r)                                                   \
    fmadd(fmadd(fmadd(fmadd(fmadd(set1(1.9875691500e-4f), r, set1(1.3981999507e-3f)), r, \
                            set1(8.3334519073e-3f)),                                    \
                      r, set1(4.1665795894e-2f)),                                       \
                r, set1(1.6666665459e-1f)),                                             \
          r, set1(5.0000001201e-1f))
#define EXP_MAX 88.72283f /* the largest x whose expf is finite */
#if LANES == 16
#define VROUND(x) _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define VPOW2(n) /* 2^n for integral n in float32 range */ \
    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23))
#define VSEEN(x, e) /* e where x is not -inf, else 0 */ \
    _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, vset1(-INFINITY), _CMP_NEQ_OQ), e)
#define VOVERFLOW(x, e) /* +inf where e^x overflows float32, else e */ \
    _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, vset1(EXP_MAX), _CMP_GT_OQ), e, vset1(INFINITY))
#else
#define VROUND(x) _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define VPOW2(n) \
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23))
#define VSEEN(x, e) _mm256_and_ps(_mm256_cmp_ps(x, vset1(-INFINITY), _CMP_NEQ_OQ), e)
#define VOVERFLOW(x, e) \
    _mm256_blendv_ps(e, vset1(INFINITY), _mm256_cmp_ps(x, vset1(EXP_MAX), _CMP_GT_OQ))
#endif
static inline vec vexp(vec x) {
    const vec clamped = VOPS(max)(VOPS(min)(x, vset1(EXP_MAX)), vset1(-87.0f));
    vec n = VROUND(VOPS(mul)(clamped, vset1(1.44269504088896341f)));
    vec r = VOPS(fnmadd)(n, vset1(0.693359375f), clamped);
    r = VOPS(fnmadd)(n, vset1(-2.12194440e-4f), r);
    vec p = EXP_POLY(VOPS(mul), vfma, vset1, r);
    p = vfma(p, VOPS(mul)(r, r), VOPS(add)(r, vset1(1.0f)));
    /* 2^n in two exact halves: n reaches 128 near the top, past float32's largest power */
    const vec half = VROUND(VOPS(mul)(n, vset1(0.5f)));
    return VOVERFLOW(x, VOPS(mul)(VOPS(mul)(p, VPOW2(half)), VPOW2(VOPS(sub)(n, half))));
}
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
    const int team = batch * heads * t * d >= (1 << 18) ? threads : 1;
#pragma omp parallel for num_threads(team) schedule(static)
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

/* ---- the training loss ---- */

#if LANES == 16
#define vmax_all(v) _mm512_reduce_max_ps(v)
#elif LANES
static inline float vmax_all(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}
#endif

/* Softmax cross-entropy over rows of n bf16 logits (the chunked loss's, lorakit/loss.py):
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

/* The rotary embedding for training, bf16: x (batch, t, heads, d) as a projection wrote it,
 * cos and sin (batch or 1, t, d). Forward: out = bf16(bf16(x cos) + bf16(rotate_half(x) sin)),
 * rotate_half(x) = (-x2, x1) for halves x1, x2, each product and the sum rounded as PyTorch's
 * bf16 q * cos + rotate_half(q) * sin are. Backward (out being dx for dy = x): with
 * r = bf16(dy sin), dx = bf16(bf16(dy cos) + (r2, -r1)), autograd's arithmetic. */
static inline vec rope_term(vec a, vec c, vec b, vec s, int negate) { /* bf16(ac -+ bf16(bs)) */
    const vec own = bf16_value(VOPS(mul)(a, c)), other = bf16_value(VOPS(mul)(b, s));
    return bf16_value(negate ? VOPS(sub)(own, other) : VOPS(add)(own, other));
}

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
