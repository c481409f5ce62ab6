/* bf16 linear layer for a few rows (decode steps), y = x W (+ b), for CPUs.
 *
 * With one to a few dozen rows a linear layer is a stream over its weights: its time is the
 * weight bytes over the memory bandwidth. The weights are prepacked (see `pack` in
 * kernels/__init__.py) in column blocks of 32 outputs, each block contiguous, pairs of inputs
 * interleaved: W[k, n] is at ((n / 32) * Kp/2 + k / 2) * 64 + (n % 32) * 2 + k % 2 (Kp: K
 * rounded up to even, padding zero). A thread walks whole blocks front to back; each pair of
 * inputs is one AVX512-BF16 dot-product instruction per 16 outputs per row. Accumulation is
 * float32, the result rounded to bf16 (nearest even), as torch's bf16 matmul does.
 * No software prefetch: the stream is sequential and the hardware prefetcher keeps up with it;
 * one L1 prefetch per two lines read, 1 KB ahead, cut the stream from 43 to 28 GB/s on an AMD
 * EPYC (benchmarks/results/linear-prefetch-20261205.md).
 *
 * Without AVX512-BF16 the same layout is computed by portable C (slower, same results up to
 * the order of float32 additions).
 */
#include <stdint.h>
#include <string.h>
#include <omp.h>

#define BLOCK 32
#define MAX_ROWS 8

#include "simd.h"

/* The pair of inputs (x[2p], x[2p+1]) of row r as one 32-bit word, zero past K. */
static inline uint32_t x_pair(const uint16_t *x, int64_t p, int64_t K) {
  uint32_t lo = x[2 * p], hi = 2 * p + 1 < K ? x[2 * p + 1] : 0;
  return lo | (hi << 16);
}

#if defined(__AVX512BF16__)
#include <immintrin.h>

static inline __attribute__((always_inline)) void block_rows(
    uint16_t *y, const uint16_t *x, const uint16_t *wb, const uint16_t *bias, int64_t rows,
    int64_t K, int64_t N, int64_t xs, int64_t n0, const int R) {
  __m512 acc[MAX_ROWS][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const int64_t P = K / 2; /* whole pairs; an odd K's last input is done after the loop */
  for (int64_t p = 0; p < P; ++p) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wb + p * 64);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(wb + p * 64 + 32);
    for (int r = 0; r < R; ++r) {
      int32_t xp;
      memcpy(&xp, x + r * xs + 2 * p, 4);
      const __m512bh xb = (__m512bh)_mm512_set1_epi32(xp);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xb, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xb, w1);
    }
  }
  if (K & 1) {
    const __m512bh w0 = (__m512bh)_mm512_loadu_si512(wb + P * 64);
    const __m512bh w1 = (__m512bh)_mm512_loadu_si512(wb + P * 64 + 32);
    for (int r = 0; r < R; ++r) {
      const __m512bh xb = (__m512bh)_mm512_set1_epi32((int)x_pair(x + r * xs, P, K));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], xb, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], xb, w1);
    }
  }
  const int64_t n = N - n0 < BLOCK ? N - n0 : BLOCK;
  const __mmask16 m0 = n >= 16 ? 0xffff : (__mmask16)((1u << n) - 1);
  const __mmask16 m1 = n <= 16 ? 0 : (n >= 32 ? 0xffff : (__mmask16)((1u << (n - 16)) - 1));
  __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
  if (bias) {
    b0 = _mm512_cvtpbh_ps((__m256bh)_mm256_maskz_loadu_epi16(m0, bias + n0));
    b1 = _mm512_cvtpbh_ps((__m256bh)_mm256_maskz_loadu_epi16(m1, bias + n0 + 16));
  }
  for (int r = 0; r < R; ++r) {
    uint16_t *yr = y + r * N + n0;
    _mm256_mask_storeu_epi16(yr, m0, (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[r][0], b0)));
    _mm256_mask_storeu_epi16(yr + 16, m1,
                             (__m256i)_mm512_cvtneps_pbh(_mm512_add_ps(acc[r][1], b1)));
  }
}

#else

static inline __attribute__((always_inline)) void block_rows(
    uint16_t *y, const uint16_t *x, const uint16_t *wb, const uint16_t *bias, int64_t rows,
    int64_t K, int64_t N, int64_t xs, int64_t n0, const int R) {
  float acc[MAX_ROWS][BLOCK];
  memset(acc, 0, sizeof(acc));
  const int64_t P = (K + 1) / 2;
  for (int64_t p = 0; p < P; ++p) {
    const uint16_t *w = wb + p * 64;
    for (int r = 0; r < R; ++r) {
      const uint32_t xp = x_pair(x + r * xs, p, K);
      const float x0 = bf16_to_f((uint16_t)xp), x1 = bf16_to_f((uint16_t)(xp >> 16));
      for (int o = 0; o < BLOCK; ++o)
        acc[r][o] += x0 * bf16_to_f(w[2 * o]) + x1 * bf16_to_f(w[2 * o + 1]);
    }
  }
  const int64_t n = N - n0 < BLOCK ? N - n0 : BLOCK;
  for (int r = 0; r < R; ++r)
    for (int64_t o = 0; o < n; ++o)
      y[r * N + n0 + o] = f_to_bf16(acc[r][o] + (bias ? bf16_to_f(bias[n0 + o]) : 0.f));
}

#endif

/* This thread's share [lo, hi) of n items when `team` threads split them in order. */
static inline void share(int64_t n, int t, int team, int64_t *lo, int64_t *hi) {
  *lo = n * t / team;
  *hi = n * (t + 1) / team;
}

/* Blocks [b0, b1) of the product (see linear_bf16). */
static void linear_blocks(uint16_t *y, const uint16_t *x, const uint16_t *wp, const uint16_t *bias,
                          int64_t M, int64_t K, int64_t N, int64_t xs, int64_t b0, int64_t b1) {
  const int64_t block_elems = ((K + 1) / 2) * 64;
  for (int64_t b = b0; b < b1; ++b) {
    const uint16_t *wb = wp + b * block_elems;
    for (int64_t m = 0; m < M; m += MAX_ROWS) {
      const int64_t R = M - m < MAX_ROWS ? M - m : MAX_ROWS;
      uint16_t *ym = y + m * N;
      const uint16_t *xm = x + m * xs;
      switch (R) {
#define CASE(r) \
  case r:       \
    block_rows(ym, xm, wb, bias, M, K, N, xs, b * BLOCK, r); break;
        CASE(1) CASE(2) CASE(3) CASE(4) CASE(5) CASE(6) CASE(7) CASE(8)
#undef CASE
      }
    }
  }
}

/* Thread t of a team of `team` threads computes its share of the output blocks (no barrier:
 * the caller waits for the team). decode_layer.c calls this inside its own parallel region. */
void linear_bf16_share(uint16_t *y, const uint16_t *x, const uint16_t *wp, const uint16_t *bias,
                       int64_t M, int64_t K, int64_t N, int64_t xs, int t, int team) {
  int64_t lo, hi;
  share((N + BLOCK - 1) / BLOCK, t, team, &lo, &hi);
  linear_blocks(y, x, wp, bias, M, K, N, xs, lo, hi);
}

/* y: [M, N] bf16 (contiguous); x: [M, K] bf16 with row stride xs; wp: the packed weight;
 * bias: [N] bf16 or NULL. */
void linear_bf16(uint16_t *y, const uint16_t *x, const uint16_t *wp, const uint16_t *bias,
                 int64_t M, int64_t K, int64_t N, int64_t xs, int num_threads) {
#pragma omp parallel num_threads(num_threads)
  linear_bf16_share(y, x, wp, bias, M, K, N, xs, omp_get_thread_num(), omp_get_num_threads());
}
