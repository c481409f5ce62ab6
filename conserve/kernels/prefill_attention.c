/* Causal attention of a prefill chunk over its sequence's paged K/V, bf16, for CPUs with
 * AVX512-BF16.
 *
 * The chunk's T queries sit at positions L - T .. L - 1 of a sequence of L tokens whose K/V
 * (the chunk's own included) are already in the paged cache. Two phases:
 *   1. pack: each KV head's keys and values are copied once, 32 keys at a time, into the
 *      pair-interleaved layouts the bf16 dot-product instruction reads (keys: for each pair of
 *      head dimensions, the 32 keys' pairs side by side; values: for each pair of keys, their
 *      values at every head dimension side by side);
 *   2. attend: a task is (KV head, tile of query tokens); its rows are the tile's tokens times
 *      the query heads that share the KV head. For each 32-key block, in groups of 4 rows:
 *      scores by bf16 dot products with float32 sums, an online softmax in float32, and the
 *      probabilities, rounded to bf16 as torch's CPU flash attention does for bf16 inputs,
 *      times the values by bf16 dot products again. The block stays in L1 while every row of
 *      the tile uses it.
 * Without AVX512-BF16 `prefill_attention_supported` says no and the caller keeps torch's
 * attention.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "simd.h"

#define KB 32     /* keys per packed block */
#define RG 4      /* rows per register group */
#define TILE 16   /* query tokens per task, at most */
#define PA_MAX_D 256
#define MAX_ROWS 64 /* rows per task (tokens x query heads per KV head), at most */

#if defined(__AVX512BF16__)

/* Keys [kb*32, kb*32 + 32) of KV head h, packed: kp[p][j] = (k[j][2p], k[j][2p+1]) and
 * vp[jp][d] = (v[2jp][d], v[2jp+1][d]); keys at or past L are zeros. */
static void pack_block(uint32_t *kp, uint32_t *vp, const uint16_t *k_cache,
                       const uint16_t *v_cache, const int64_t *block_ids, int64_t h, int64_t kb,
                       int64_t L, int64_t NB, int64_t BS, int64_t D) {
  const int64_t P = D / 2;
  uint16_t *v16 = (uint16_t *)vp;
  for (int64_t j = 0; j < KB; ++j) {
    const int64_t i = kb * KB + j;
    if (i >= L) {
      for (int64_t p = 0; p < P; ++p) kp[p * KB + j] = 0;
      for (int64_t d = 0; d < D; ++d) v16[((j / 2) * D + d) * 2 + (j & 1)] = 0;
      continue;
    }
    const int64_t off = ((h * NB + block_ids[i / BS]) * BS + i % BS) * D;
    const uint32_t *kr = (const uint32_t *)(k_cache + off);
    const uint16_t *vr = v_cache + off;
    for (int64_t p = 0; p < P; ++p) kp[p * KB + j] = kr[p];
    for (int64_t d = 0; d < D; ++d) v16[((j / 2) * D + d) * 2 + (j & 1)] = vr[d];
  }
}

/* One task: rows [0, nrows) of the tile (row r: token t0 + r / G, query head h*G + r % G). */
static inline __attribute__((always_inline)) void attend_tile(
    uint16_t *out, int64_t out_stride, const uint16_t *q, int64_t q_stride, const uint32_t *kp,
    const uint32_t *vp, int64_t h, int64_t t0, int64_t ntok, int64_t T, int64_t L, int64_t G,
    const int64_t D, float scale) {
  const int64_t P = D / 2, DF = D / 16, past = L - T;
  const int64_t DC = DF < 4 ? DF : 4; /* value vectors per row held in registers */
  const int64_t nrows = ntok * G, ngroups = (nrows + RG - 1) / RG;
  uint32_t qbuf[MAX_ROWS * PA_MAX_D / 2] __attribute__((aligned(64)));
  float abuf[MAX_ROWS * PA_MAX_D] __attribute__((aligned(64)));
#define qb(r) (qbuf + (r) * P)
#define acc(r) (abuf + (r) * D)
  float m[MAX_ROWS], l[MAX_ROWS];
  int64_t last[MAX_ROWS]; /* the last key each row sees */
  for (int64_t r = 0; r < ngroups * RG; ++r) {
    if (r < nrows) {
      const int64_t t = t0 + r / G, hq = h * G + r % G;
      memcpy(qb(r), q + t * q_stride + hq * D, D * sizeof(uint16_t));
      last[r] = past + t;
    } else { /* a padding row: its output is dropped */
      memset(qb(r), 0, D * sizeof(uint16_t));
      last[r] = past + t0 + ntok - 1;
    }
    memset(acc(r), 0, D * sizeof(float));
    m[r] = -1e30f;
    l[r] = 0.f;
  }
  const int64_t nkb = (past + t0 + ntok - 1) / KB + 1;
  const __m512 vscale = _mm512_set1_ps(scale);
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  for (int64_t kb = 0; kb < nkb; ++kb) {
    const uint32_t *kblk = kp + kb * P * KB, *vblk = vp + kb * (KB / 2) * D;
    const int64_t first = kb * KB;
    for (int64_t g0 = 0; g0 < ngroups * RG; g0 += RG) {
      if (first > last[g0 + RG - 1]) continue; /* every key in the rows' future */
      __m512 s[RG][2];
      for (int r = 0; r < RG; ++r) s[r][0] = s[r][1] = _mm512_setzero_ps();
      for (int64_t p = 0; p < P; ++p) {
        const __m512bh k0 = (__m512bh)_mm512_load_si512(kblk + p * KB);
        const __m512bh k1 = (__m512bh)_mm512_load_si512(kblk + p * KB + 16);
        for (int r = 0; r < RG; ++r) {
          const __m512bh b = (__m512bh)_mm512_set1_epi32((int)qb(g0 + r)[p]);
          s[r][0] = _mm512_dpbf16_ps(s[r][0], b, k0);
          s[r][1] = _mm512_dpbf16_ps(s[r][1], b, k1);
        }
      }
      /* the softmax of each row's 32 scores: its probabilities as bf16 pairs, and how much
       * its sums so far shrink */
      uint32_t pp[RG][16] __attribute__((aligned(64)));
      float corr[RG];
      int64_t npairs = 0;
      for (int r = 0; r < RG; ++r) {
        const int64_t row = g0 + r;
        /* keys first + j visible to this row: j <= last - first */
        const int64_t see = last[row] - first;
        const __m512i lim = _mm512_set1_epi32((int)(see < 64 ? see : 64));
        const __mmask16 live0 = _mm512_cmple_epi32_mask(lane, lim);
        const __mmask16 live1 = _mm512_cmple_epi32_mask(_mm512_add_epi32(lane, _mm512_set1_epi32(16)), lim);
        corr[r] = 1.f;
        if (!live0) { /* this row sees none of these keys */
          _mm512_store_si512(pp[r], _mm512_setzero_si512());
          continue;
        }
        const int64_t np = see >= 31 ? 16 : see / 2 + 1;
        npairs = np > npairs ? np : npairs;
        const __m512 ninf = _mm512_set1_ps(-INFINITY);
        const __m512 s0 = _mm512_mask_mul_ps(ninf, live0, s[r][0], vscale);
        const __m512 s1 = _mm512_mask_mul_ps(ninf, live1, s[r][1], vscale);
        const float bmax = _mm512_reduce_max_ps(_mm512_max_ps(s0, s1));
        const float m_new = m[row] > bmax ? m[row] : bmax;
        const __m512 mv = _mm512_set1_ps(m_new);
        const __m512 p0 = _mm512_maskz_mov_ps(live0, exp512(_mm512_sub_ps(s0, mv)));
        const __m512 p1 = _mm512_maskz_mov_ps(live1, exp512(_mm512_sub_ps(s1, mv)));
        if (m_new > m[row]) {
          corr[r] = expf(m[row] - m_new);
          l[row] *= corr[r];
          m[row] = m_new;
        }
        l[row] += _mm512_reduce_add_ps(_mm512_add_ps(p0, p1));
        _mm512_store_si512(pp[r], (__m512i)_mm512_cvtne2ps_pbh(p1, p0));
      }
      /* the values, 64 head dimensions of the 4 rows at a time: each value vector loaded
       * once serves the 4 rows */
      for (int64_t d0 = 0; d0 < DF; d0 += DC) {
        __m512 ov[RG][4];
        for (int r = 0; r < RG; ++r) {
          const __m512 c = _mm512_set1_ps(corr[r]);
          for (int64_t i = 0; i < DC; ++i)
            ov[r][i] = _mm512_mul_ps(_mm512_load_ps(acc(g0 + r) + 16 * (d0 + i)), c);
        }
        for (int64_t jp = 0; jp < npairs; ++jp) {
          const uint32_t *vr = vblk + jp * D + 16 * d0;
          __m512bh v[4];
          for (int64_t i = 0; i < DC; ++i) v[i] = (__m512bh)_mm512_load_si512(vr + 16 * i);
          for (int r = 0; r < RG; ++r) {
            const __m512bh b = (__m512bh)_mm512_set1_epi32((int)pp[r][jp]);
            for (int64_t i = 0; i < DC; ++i) ov[r][i] = _mm512_dpbf16_ps(ov[r][i], b, v[i]);
          }
        }
        for (int r = 0; r < RG; ++r)
          for (int64_t i = 0; i < DC; ++i) _mm512_store_ps(acc(g0 + r) + 16 * (d0 + i), ov[r][i]);
      }
    }
  }
  for (int64_t r = 0; r < nrows; ++r) {
    const int64_t t = t0 + r / G, hq = h * G + r % G;
    uint16_t *dst = out + t * out_stride + hq * D;
    const __m512 inv = _mm512_set1_ps(l[r] > 0.f ? 1.f / l[r] : 0.f);
    for (int64_t i = 0; i < DF; ++i)
      _mm256_storeu_si256((__m256i *)(dst + 16 * i), to_bf16x16(_mm512_mul_ps(_mm512_load_ps(acc(r) + 16 * i), inv)));
  }
#undef qb
#undef acc
}
#endif

int prefill_attention_supported(int64_t Hq, int64_t Hkv, int64_t D) {
#if defined(__AVX512BF16__)
  return Hq % Hkv == 0 && Hq / Hkv <= MAX_ROWS && D % 32 == 0 && D <= PA_MAX_D;
#else
  (void)Hq, (void)Hkv, (void)D;
  return 0;
#endif
}

/* Bytes of scratch `paged_prefill_attention_bf16` needs for a context of L tokens. */
int64_t prefill_attention_scratch(int64_t Hkv, int64_t L, int64_t D) {
  const int64_t lp = (L + KB - 1) / KB * KB;
  return 2 * Hkv * lp * D * (int64_t)sizeof(uint16_t) + 64;
}

/* out: rows t at out + t * out_stride, query head hq at + hq * D (bf16); q likewise with
 * q_stride; k_cache, v_cache: [Hkv, NB, BS, D] bf16; block_ids: the sequence's blocks, covering
 * L tokens; scratch: `prefill_attention_scratch` bytes. Returns 0, or -1 when unsupported. */
int paged_prefill_attention_bf16(uint16_t *out, int64_t out_stride, const uint16_t *q,
                                 int64_t q_stride, const uint16_t *k_cache,
                                 const uint16_t *v_cache, const int64_t *block_ids, int64_t T,
                                 int64_t L, int64_t Hq, int64_t Hkv, int64_t NB, int64_t BS,
                                 int64_t D, float scale, void *scratch, int num_threads) {
  if (!prefill_attention_supported(Hq, Hkv, D) || T < 1 || L < T) return -1;
#if defined(__AVX512BF16__)
  const int64_t G = Hq / Hkv, nkb = (L + KB - 1) / KB, P = D / 2;
  uint32_t *base = (uint32_t *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
  uint32_t *kp = base, *vp = base + Hkv * nkb * P * KB;
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int64_t t = 0; t < Hkv * nkb; ++t) {
    const int64_t h = t / nkb, kb = t % nkb;
    pack_block(kp + (h * nkb + kb) * P * KB, vp + (h * nkb + kb) * (KB / 2) * D, k_cache,
               v_cache, block_ids, h, kb, L, NB, BS, D);
  }
  /* Tiles small enough to give each thread a few tasks, at most TILE tokens. */
  int64_t tile = (T * Hkv + 4 * num_threads - 1) / (4 * num_threads);
  tile = tile < 1 ? 1 : tile > TILE ? TILE : tile;
  if (tile * G > MAX_ROWS) tile = MAX_ROWS / G;
  const int64_t ntiles = (T + tile - 1) / tile;
  /* Later tiles see more keys: hand the tasks out from the longest. */
#define ATTEND(DIM)                                                                          \
  _Pragma("omp parallel for schedule(dynamic, 1) num_threads(num_threads)")                 \
  for (int64_t i = 0; i < Hkv * ntiles; ++i) {                                              \
    const int64_t h = i % Hkv, ti = ntiles - 1 - i / Hkv, t0 = ti * tile;                   \
    const int64_t n = T - t0 < tile ? T - t0 : tile;                                        \
    attend_tile(out, out_stride, q, q_stride, kp + h * nkb * P * KB,                        \
                vp + h * nkb * (KB / 2) * D, h, t0, n, T, L, G, DIM, scale);                 \
  }
  if (D == 64) {
    ATTEND(64)
  } else if (D == 128) {
    ATTEND(128)
  } else {
    ATTEND(D)
  }
#undef ATTEND
  return 0;
#else
  (void)out, (void)out_stride, (void)q, (void)q_stride, (void)k_cache, (void)v_cache;
  (void)block_ids, (void)NB, (void)BS, (void)scale, (void)scratch, (void)num_threads;
  return -1;
#endif
}
