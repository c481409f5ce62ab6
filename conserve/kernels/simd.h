/* Helpers shared by the compiled kernels: bf16 <-> float32, and a vector e^x. */
#ifndef CONSERVE_SIMD_H
#define CONSERVE_SIMD_H
#include <stdint.h>

static inline float bf16_to_f(uint16_t x) {
  union { uint32_t u; float f; } v;
  v.u = ((uint32_t)x) << 16;
  return v.f;
}

/* Round to nearest even; a NaN stays a NaN. */
static inline uint16_t f_to_bf16(float f) {
  union { uint32_t u; float f; } v;
  v.f = f;
  const uint32_t nan = (v.u & 0x7fffffffu) > 0x7f800000u;
  const uint32_t r = (v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16;
  return (uint16_t)(nan ? (v.u >> 16) | 0x40 : r);
}

#if defined(__AVX512F__)
#include <immintrin.h>

/* e^x for 16 lanes: 2^(x log2 e) split into 2^n 2^f, 2^f by a degree-6 polynomial on
 * [-0.5, 0.5] (relative error about 2e-7); below -87 it gives about 0, above 88 infinity. */
static inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
  const __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.69314718055994531f));
  __m512 p = _mm512_set1_ps(1.f / 720);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

/* 16 bf16 -> float32 */
static inline __m512 load_bf16x16(const uint16_t *p) {
  const __m256i h = _mm256_loadu_si256((const __m256i *)p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* float32 -> 16 bf16, rounded to nearest even (NaN kept a NaN), as f_to_bf16. */
static inline __m256i to_bf16x16(__m512 f) {
  const __m512i u = _mm512_castps_si512(f);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                _mm512_set1_epi32(0x7f800000));
  r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(r);
}

/* round a float32 vector to bf16 precision, staying float32 */
static inline __m512 round_bf16(__m512 f) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16x16(f)), 16));
}
#endif

#endif
