/* Greedy decoding's argmax over bf16 logits: x (rows, n) bf16 -> out (rows) int64, the index
 * of each row's largest value (the first of equals). Scalar code the compiler vectorises.
 */
#include "simd.h"

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
