/* What several kernels share: the float32 vector of this build (LANES floats: 16 with AVX-512,
 * 8 with AVX2 + FMA, 0 without: every kernel then returns -1 and lorakit keeps its PyTorch
 * path), bf16 <-> float32 conversions rounded as torch rounds, and e^x over a vector.
 *
 * bf16 values are uint16_t (the high half of a float32); float32 vectors are `vec`. Header-only
 * (static inline), so each kernel's file compiles on its own and no code is written twice.
 */
#ifndef LORAKIT_SIMD_H
#define LORAKIT_SIMD_H

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>

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
static inline void widen(const uint16_t* p, vec* a, vec* b) {
    __m256i v = _mm256_loadu_si256((const __m256i*)p);
    *a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(v)), 16));
    *b = _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(v, 1)), 16));
}
#else
#define LANES 0
#endif

/* float32 elements per step of the kernels' loops: two vectors, what widen() fills from one
 * load of 2 * LANES bf16 values */
#define CHUNK (2 * LANES)
#define MAX_ROWS 8 /* rows of x a matmul's inner loop holds in registers */
#if defined(__AVX512BF16__)
#define HAVE_BF16 1 /* bf16 dot products (vdpbf16ps): exact products, float32 sums */
#else
#define HAVE_BF16 0
#endif

/* a switch's cases calling CALL(rows) with a constant 1..MAX_ROWS, so that each inlined copy
 * of the inner loop keeps its rows' sums in registers */
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

/* x (batch, n) of either dtype -> float32 */
static inline float* as_float(const void* x, int x_bf16, int64_t n) {
    float* out = malloc(sizeof(float) * n);
    if (out && x_bf16)
        for (int64_t i = 0; i < n; i++) out[i] = bf16_to_float(((const uint16_t*)x)[i]);
    else if (out)
        memcpy(out, x, sizeof(float) * n);
    return out;
}

/* y (n float32) -> out as float32 or rounded to bf16 (y_bf16) */
static inline void store(const float* y, void* out, int y_bf16, int64_t n) {
    if (y_bf16)
        for (int64_t i = 0; i < n; i++) ((uint16_t*)out)[i] = float_to_bf16(y[i]);
    else if ((const void*)y != out)
        memcpy(out, y, sizeof(float) * n);
}

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
#endif

#endif /* LORAKIT_SIMD_H */
