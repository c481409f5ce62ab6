/* A memory-bandwidth probe for `conserve bench roofline`: read a buffer once, split between the
 * threads, with as little work per byte as a load (wrapping 64-bit sums, vectorized by the
 * compiler), the way a small decode step streams its weights. The roofline takes the best of
 * this, torch's sum and torch's copy, each measured three times in a run.
 */
#include <stdint.h>
#include <string.h>

/* The wrapping sum of the 64-bit words of p[0 .. bytes), bytes a multiple of 64. */
uint64_t stream_read_u64(const uint8_t *p, int64_t bytes, int num_threads) {
  const int64_t lines = bytes / 64;
  uint64_t total = 0;
#pragma omp parallel for schedule(static) num_threads(num_threads) reduction(+ : total)
  for (int64_t l = 0; l < lines; ++l) {
    uint64_t w[8];
    memcpy(w, p + l * 64, 64);
    total += w[0] + w[1] + w[2] + w[3] + w[4] + w[5] + w[6] + w[7];
  }
  return total;
}
