/* Pure read bandwidth: zmm loads xor-ed into 8 accumulators, the buffer split between threads. */
#include <stdint.h>
#include <immintrin.h>
#include <omp.h>
#ifndef PF_DIST
#define PF_DIST 0
#endif
uint64_t read_all(const uint8_t *p, int64_t bytes, int threads) {
  uint64_t total = 0;
#pragma omp parallel num_threads(threads) reduction(^:total)
  {
    int t = omp_get_thread_num(), n = omp_get_num_threads();
    int64_t chunk = (bytes / n) & ~(int64_t)511;
    const uint8_t *s = p + t * chunk, *e = s + chunk;
    __m512i a[8];
    for (int i = 0; i < 8; ++i) a[i] = _mm512_setzero_si512();
    for (; s < e; s += 512) {
#if PF_DIST > 0
      for (int i = 0; i < 8; ++i) _mm_prefetch((const char *)s + PF_DIST + 64 * i, _MM_HINT_T1);
#endif
      for (int i = 0; i < 8; ++i) a[i] = _mm512_xor_si512(a[i], _mm512_load_si512(s + 64 * i));
    }
    for (int i = 1; i < 8; ++i) a[0] = _mm512_xor_si512(a[0], a[i]);
    total ^= (uint64_t)_mm512_reduce_add_epi64(a[0]);
  }
  return total;
}
