/* y = x @ W.T with W in NF4 (lorakit.nf4's layout), read straight from its 4-bit codes.
 *
 * Decoding reads a quarter of the bytes a bf16 weight would: the point for generation, where
 * every new token reads every weight once. Compiled at first use by lorakit/nf4_kernel.py with
 * -march=native; without AVX2 it reports width 0 and lorakit keeps its PyTorch path.
 *
 * packed: two codes per byte, the first element in the high nibble; rows of n_in elements;
 * blocks of bs elements along a row (n_in % bs == 0, bs % 32 == 0), each with one scale:
 * absmax[g] or, double-quantized, abscode[qabs[g]] * absscale[g / bs2] + offset.
 * x: (batch, n_in) float32; y: (batch, n_out) float32. With lora_a (rank, n_in) and lora_b
 * (n_out, rank), float32, it adds a LoRA adapter in the same call: y += s * (x @ A.T) @ B.T.
 * bf16 != 0 says x holds bf16 values: where the CPU has AVX512-BF16 the products then run in
 * bf16 with float32 sums (the codes rounded to bf16 too).
 */
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>

#if defined(__AVX512F__)
#define LANES 16
typedef __m512 vec;
#define vzero() _mm512_setzero_ps()
#define vload(p) _mm512_loadu_ps(p)
#define vfma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define vset1(s) _mm512_set1_ps(s)
#define vsum(v) _mm512_reduce_add_ps(v)
/* LANES bytes -> the values of their high and low nibbles */
static inline void decode(const uint8_t* p, const float* code, vec* hi, vec* lo) {
    __m512 lut = _mm512_loadu_ps(code);
    __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i*)p));
    *hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), lut);
    *lo = _mm512_permutexvar_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)), lut);
}
#elif defined(__AVX2__) && defined(__FMA__)
#define LANES 8
typedef __m256 vec;
#define vzero() _mm256_setzero_ps()
#define vload(p) _mm256_loadu_ps(p)
#define vfma(a, b, c) _mm256_fmadd_ps(a, b, c)
#define vset1(s) _mm256_set1_ps(s)
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
#else
#define LANES 0
#endif

int lk_nf4_lanes(void) { return LANES; }

#if LANES
#define CHUNK (2 * LANES) /* elements decoded at once: LANES bytes */
#define MAX_ROWS 8
#define OUT_TILE 64
#define IN_TILE 512
#define L1_BYTES 32768 /* x that fits in this is not tiled */
#if defined(__AVX512BF16__)
#define HAVE_BF16 1
#else
#define HAVE_BF16 0
#endif
#define DOT(n, bf16) dot_rows(n, bf16, row, code, k0, k1, bs, row_scales, xb, xhb, st, yb, n_out)
#define ROW_CASES(bf16)                  \
    case 1: DOT(1, bf16); break;         \
    case 2: DOT(2, bf16); break;         \
    case 3: DOT(3, bf16); break;         \
    case 4: DOT(4, bf16); break;         \
    case 5: DOT(5, bf16); break;         \
    case 6: DOT(6, bf16); break;         \
    case 7: DOT(7, bf16); break;         \
    default: DOT(8, bf16); break;

/* One output feature over inputs [k0, k1) for `rows` rows of the permuted x (xp, or its bf16
 * copy xh when `bf16`; both compile-time after inlining), whose chunks are `stride` elements
 * apart, the rows' copies of a chunk side by side; added into y. In bf16, the decoded codes
 * are rounded to bf16 too and one vdpbf16ps per chunk and row does 32 multiply-adds instead
 * of two FMAs' 16 each (float32 sums either way). */
static inline __attribute__((always_inline)) void dot_rows(
    const int rows, const int bf16, const uint8_t* packed, const float* code, int64_t k0,
    int64_t k1, int64_t bs, const float* scales, const float* xp, const uint16_t* xh,
    int64_t stride, float* y, int64_t y_stride) {
    vec acc[MAX_ROWS];
    for (int r = 0; r < rows; r++) acc[r] = vzero();
    for (int64_t start = k0; start < k1; start += bs) {
        vec part[MAX_ROWS];
        for (int r = 0; r < rows; r++) part[r] = vzero();
        for (int64_t c = start; c < start + bs; c += CHUNK) {
            vec hi, lo;
            decode(packed + c / 2, code, &hi, &lo);
#if HAVE_BF16
            if (bf16) {
                __m512bh w = _mm512_cvtne2ps_pbh(lo, hi); /* evens in the low half, as in xh */
                const uint16_t* xc = xh + c / CHUNK * stride;
                for (int r = 0; r < rows; r++) {
                    __m512bh xr = (__m512bh)_mm512_loadu_si512((const void*)(xc + r * CHUNK));
                    part[r] = _mm512_dpbf16_ps(part[r], w, xr);
                }
                continue;
            }
#endif
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
#endif

#if LANES
/* y += s * (x @ A.T) @ B.T: a rank-r adapter, small enough for plain loops. */
static int add_lora(const float* a, const float* b, int64_t rank, float s, const float* x,
                    int64_t batch, int64_t n_in, float* y, int64_t n_out, int threads) {
    float* t = malloc(sizeof(float) * batch * rank);
    if (!t) return -1;
    for (int64_t r = 0; r < batch; r++)
        for (int64_t k = 0; k < rank; k++) {
            float sum = 0.0f;
            for (int64_t i = 0; i < n_in; i++) sum += a[k * n_in + i] * x[r * n_in + i];
            t[r * rank + k] = s * sum;
        }
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t o = 0; o < n_out; o++)
        for (int64_t r = 0; r < batch; r++) {
            float sum = 0.0f;
            for (int64_t k = 0; k < rank; k++) sum += t[r * rank + k] * b[o * rank + k];
            y[r * n_out + o] += sum;
        }
    free(t);
    return 0;
}
#endif

/* Returns 0 on success, -1 if this build cannot run it (no SIMD, bad shape, no memory). */
int lk_nf4_matmul(const uint8_t* packed, const float* code, int64_t n_out, int64_t n_in,
                  int64_t bs, const float* absmax, const uint8_t* qabs, const float* abscode,
                  const float* absscale, int64_t bs2, float offset, const float* x,
                  int64_t batch, float* y, int threads, const float* lora_a,
                  const float* lora_b, int64_t rank, float lora_scale, int bf16) {
#if LANES
    if (bs % CHUNK || n_in % bs || batch < 1) return -1;
    int64_t n_blocks = n_out * (n_in / bs);
    /* x chunk by chunk, every row's copy of a chunk side by side (rows' loads then stay close
     * together), each with its even elements first, then its odd ones: decode()'s order. */
    float* xp = malloc(sizeof(float) * batch * n_in);
    float* scales = absmax ? NULL : malloc(sizeof(float) * n_blocks);
    if (!xp || (!absmax && !scales)) {
        free(xp);
        free(scales);
        return -1;
    }
    for (int64_t r = 0; r < batch; r++)
        for (int64_t c = 0; c < n_in; c += CHUNK) {
            float* dst = xp + c / CHUNK * batch * CHUNK + r * CHUNK;
            const float* src = x + r * n_in + c;
            for (int k = 0; k < LANES; k++) {
                dst[k] = src[2 * k];
                dst[LANES + k] = src[2 * k + 1];
            }
        }
    uint16_t* xh = NULL; /* x in bf16, same order as xp */
#if HAVE_BF16
    if (bf16) {
        xh = malloc(sizeof(uint16_t) * batch * n_in);
        if (!xh) {
            free(xp);
            free(scales);
            return -1;
        }
        for (int64_t i = 0; i < batch * n_in; i += CHUNK) {
            __m512 even = _mm512_loadu_ps(xp + i), odd = _mm512_loadu_ps(xp + i + LANES);
            __m512bh v = _mm512_cvtne2ps_pbh(odd, even);
            _mm512_storeu_si512((void*)(xh + i), (__m512i)v);
        }
    }
#endif
    if (!absmax) {
#pragma omp parallel for num_threads(threads) schedule(static)
        for (int64_t g = 0; g < n_blocks; g++)
            scales[g] = abscode[qabs[g]] * absscale[g / bs2] + offset;
    }
    const float* s = absmax ? absmax : scales;
    /* Tiles: OUT_TILE outputs at a time over IN_TILE inputs, so that the rows' x of a tile
     * (8 x IN_TILE floats) stays in L1 across the outputs instead of streaming from L2. */
    const int64_t in_tile = batch * n_in * 4 <= L1_BYTES ? n_in : (IN_TILE + bs - 1) / bs * bs;
    const int64_t n_tiles = (n_out + OUT_TILE - 1) / OUT_TILE;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t tile = 0; tile < n_tiles; tile++) {
        const int64_t o0 = tile * OUT_TILE;
        const int64_t o1 = o0 + OUT_TILE < n_out ? o0 + OUT_TILE : n_out;
        for (int64_t r = 0; r < batch; r++)
            for (int64_t o = o0; o < o1; o++) y[r * n_out + o] = 0.0f;
        for (int64_t k0 = 0; k0 < n_in; k0 += in_tile) {
            const int64_t k1 = k0 + in_tile < n_in ? k0 + in_tile : n_in;
            for (int64_t o = o0; o < o1; o++) {
                const uint8_t* row = packed + o * n_in / 2;
                const float* row_scales = s + o * (n_in / bs);
                for (int64_t b = 0; b < batch; b += MAX_ROWS) {
                    const float* xb = xp + b * CHUNK;
                    const uint16_t* xhb = xh ? xh + b * CHUNK : NULL;
                    float* yb = y + b * n_out + o;
                    const int64_t st = batch * CHUNK;
                    const int n = batch - b < MAX_ROWS ? batch - b : MAX_ROWS;
                    if (xh) {
                        switch (n) { ROW_CASES(1) }
                    } else {
                        switch (n) { ROW_CASES(0) }
                    }
                }
            }
        }
    }
    free(xp);
    free(xh);
    free(scales);
    if (lora_a) return add_lora(lora_a, lora_b, rank, lora_scale, x, batch, n_in, y, n_out, threads);
    return 0;
#else
    return -1;
#endif
}
