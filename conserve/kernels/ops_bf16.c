/* The small per-layer ops of the bf16 torch layer path, each one pass over its rows: RMSNorm,
 * SiLU(gate) * up, and RoPE in place. Each rounds to bf16 where the torch ops it replaces do
 * (model/llama.py), so the results are those ops' up to float32 summation order. Rows are split
 * over the threads when there are enough of them to pay for it.
 */
#include <math.h>
#include <stdint.h>
#include "simd.h"

#define bf bf16_to_f
#define to_bf f_to_bf16

#define PARALLEL_ELEMS 65536 /* fewer elements than this run on the calling thread */

static inline void rms_norm_row(uint16_t *o, const uint16_t *xr, const uint16_t *w, int64_t n,
                                float eps) {
  float ss = 0.f;
  for (int64_t i = 0; i < n; ++i) ss += bf(xr[i]) * bf(xr[i]);
  const float inv = 1.f / sqrtf(ss / (float)n + eps);
  for (int64_t i = 0; i < n; ++i) o[i] = to_bf(bf(w[i]) * bf(to_bf(bf(xr[i]) * inv)));
}

/* Rows [r0, r1) of rms_norm_bf16, on the calling thread. */
void rms_norm_bf16_rows(uint16_t *out, const uint16_t *x, const uint16_t *w, int64_t r0, int64_t r1,
                        int64_t n, int64_t xs, float eps) {
  for (int64_t r = r0; r < r1; ++r) rms_norm_row(out + r * n, x + r * xs, w, n, eps);
}

/* out[r] = w * bf16(x[r] * rsqrt(mean(x[r]^2) + eps)); x rows `xs` apart, out contiguous. */
void rms_norm_bf16(uint16_t *out, const uint16_t *x, const uint16_t *w, int64_t rows, int64_t n,
                   int64_t xs, float eps, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows * n >= PARALLEL_ELEMS)
  for (int64_t r = 0; r < rows; ++r) rms_norm_row(out + r * n, x + r * xs, w, n, eps);
}

/* out [rows, I] = bf16(bf16(silu(gate)) * up) for gu [rows, 2I] = (gate | up). With AVX-512,
 * 16 at a time with a vector exp (the last bit of silu may then differ from torch's now and
 * then: one bf16 rounding step). */
/* Elements [i0, i1) of row r of silu_mul_bf16 (i0, i1 multiples of 16 but for the row's end). */
static inline void silu_mul_part(uint16_t *out, const uint16_t *gu, int64_t r, int64_t I, int64_t i0,
                                 int64_t i1) {
  const uint16_t *g = gu + r * 2 * I, *u = g + I;
  uint16_t *o = out + r * I;
  int64_t i = i0;
#if defined(__AVX512F__)
  const __m512 one = _mm512_set1_ps(1.f);
  for (; i + 16 <= i1; i += 16) {
    const __m512 x = load_bf16x16(g + i);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), x));
    const __m512 s = round_bf16(_mm512_div_ps(x, _mm512_add_ps(one, e)));
    _mm256_storeu_si256((__m256i *)(o + i), to_bf16x16(_mm512_mul_ps(s, load_bf16x16(u + i))));
  }
#endif
  for (; i < i1; ++i) {
    const float x = bf(g[i]);
    o[i] = to_bf(bf(to_bf(x / (1.f + expf(-x)))) * bf(u[i]));
  }
}

void silu_mul_bf16(uint16_t *out, const uint16_t *gu, int64_t rows, int64_t I, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows * I >= PARALLEL_ELEMS)
  for (int64_t r = 0; r < rows; ++r) silu_mul_part(out, gu, r, I, 0, I);
}

/* Thread t's share of silu_mul_bf16 in a team of `team`: the rows x I elements split in pieces
 * of SILU_PIECE, so that one row is shared too. */
#define SILU_PIECE 256
void silu_mul_bf16_share(uint16_t *out, const uint16_t *gu, int64_t rows, int64_t I, int t, int team) {
  const int64_t per_row = (I + SILU_PIECE - 1) / SILU_PIECE, n = rows * per_row;
  for (int64_t k = n * t / team; k < n * (t + 1) / team; ++k) {
    const int64_t r = k / per_row, i0 = (k % per_row) * SILU_PIECE;
    silu_mul_part(out, gu, r, I, i0, i0 + SILU_PIECE < I ? i0 + SILU_PIECE : I);
  }
}

/* In place on `heads` heads of D at the start of each row (rows `xs` apart):
 * x = bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)); cos, sin [rows, D] bf16. */
static inline void rope_row(uint16_t *xr, const uint16_t *c, const uint16_t *s, int64_t heads,
                            int64_t D) {
  const int64_t half = D / 2;
  for (int64_t h = 0; h < heads; ++h) {
    uint16_t *xh = xr + h * D;
    for (int64_t d = 0; d < half; ++d) {
      const float a = bf(xh[d]), b = bf(xh[d + half]);
      const float lo = bf(to_bf(a * bf(c[d]))) + bf(to_bf(-b * bf(s[d])));
      const float hi = bf(to_bf(b * bf(c[d + half]))) + bf(to_bf(a * bf(s[d + half])));
      xh[d] = to_bf(lo);
      xh[d + half] = to_bf(hi);
    }
  }
}

void rope_bf16(uint16_t *x, const uint16_t *cos, const uint16_t *sin, int64_t rows,
               int64_t heads, int64_t D, int64_t xs, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (rows * heads * D >= PARALLEL_ELEMS)
  for (int64_t r = 0; r < rows; ++r) rope_row(x + r * xs, cos + r * D, sin + r * D, heads, D);
}

/* Rows [r0, r1) of rope_bf16, on the calling thread. */
void rope_bf16_rows(uint16_t *x, const uint16_t *cos, const uint16_t *sin, int64_t r0, int64_t r1,
                    int64_t heads, int64_t D, int64_t xs) {
  for (int64_t r = r0; r < r1; ++r) rope_row(x + r * xs, cos + r * D, sin + r * D, heads, D);
}
