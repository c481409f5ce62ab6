/* Decode attention straight from the paged KV cache, for CPUs.
 *
 * One query per sequence. Each (sequence, KV head) pair is one task: it walks the sequence's
 * blocks once, scores the block's keys against the G query heads that share this KV head, and
 * folds the block into a running softmax (max, sum, weighted values). K/V are read once, in
 * place: no gathered copy, which is what bounds decode attention on CPUs.
 *
 * Plain C with no PyTorch headers so that it builds in about a second; called through ctypes.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_G 32
#define MAX_D 256
#define MAX_BS 256

#include "simd.h"

static inline __attribute__((always_inline)) void task(int64_t b, int64_t h, float *out, const float *q, const void *k_cache,
                 const void *v_cache, int is_bf16, const int64_t *tables, const int64_t *lens,
                 int64_t Hq, int64_t Hkv, int64_t NB, int64_t BS, int64_t D, int64_t MB,
                 float scale) {
  const int64_t G = Hq / Hkv;
  float qf[MAX_G * MAX_D], acc[MAX_G * MAX_D], s[MAX_G * MAX_BS], m[MAX_G], l[MAX_G];
  float kf[MAX_BS * MAX_D];
  const int64_t len = lens[b];
  for (int64_t g = 0; g < G; ++g) {
    const float *qs = q + (b * Hq + h * G + g) * D;
    for (int64_t d = 0; d < D; ++d) qf[g * D + d] = qs[d] * scale;
    m[g] = -1e30f;
    l[g] = 0.f;
  }
  memset(acc, 0, sizeof(float) * G * D);
  const int64_t nblocks = (len + BS - 1) / BS;
  for (int64_t j = 0; j < nblocks; ++j) {
    const int64_t blk = tables[b * MB + j];
    const int64_t ntok = len - j * BS < BS ? len - j * BS : BS;
    const int64_t base = ((h * NB + blk) * BS) * D;
    if (j + 1 < nblocks) {
      /* Blocks are scattered: start fetching the next one while this one is computed. */
      const int64_t next = ((h * NB + tables[b * MB + j + 1]) * BS) * D;
      const int64_t elem = is_bf16 ? 2 : 4;
      const char *nk = (const char *)k_cache + next * elem, *nv = (const char *)v_cache + next * elem;
      for (int64_t off = 0; off < BS * D * elem; off += 64) {
        __builtin_prefetch(nk + off);
        __builtin_prefetch(nv + off);
      }
    }
    const float *kb, *vb;
    float vf[MAX_BS * MAX_D];
    if (is_bf16) {
      const uint16_t *k16 = (const uint16_t *)k_cache + base, *v16 = (const uint16_t *)v_cache + base;
      for (int64_t i = 0; i < ntok * D; ++i) kf[i] = bf16_to_f(k16[i]);
      for (int64_t i = 0; i < ntok * D; ++i) vf[i] = bf16_to_f(v16[i]);
      kb = kf;
      vb = vf;
    } else {
      kb = (const float *)k_cache + base;
      vb = (const float *)v_cache + base;
    }
    for (int64_t g = 0; g < G; ++g) {
      const float *qg = qf + g * D;
      float *sg = s + g * BS;
      float bmax = -1e30f;
      for (int64_t t = 0; t < ntok; ++t) {
        const float *kt = kb + t * D;
        float dot = 0.f;
        for (int64_t d = 0; d < D; ++d) dot += qg[d] * kt[d];
        sg[t] = dot;
        bmax = dot > bmax ? dot : bmax;
      }
      const float m_new = m[g] > bmax ? m[g] : bmax;
      const float corr = expf(m[g] - m_new);
      float sum = 0.f;
      for (int64_t t = 0; t < ntok; ++t) {
        sg[t] = expf(sg[t] - m_new);
        sum += sg[t];
      }
      l[g] = l[g] * corr + sum;
      m[g] = m_new;
      float *ag = acc + g * D;
      for (int64_t d = 0; d < D; ++d) ag[d] *= corr;
      for (int64_t t = 0; t < ntok; ++t) {
        const float p = sg[t];
        const float *vt = vb + t * D;
        for (int64_t d = 0; d < D; ++d) ag[d] += p * vt[d];
      }
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float *o = out + (b * Hq + h * G + g) * D;
    const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
    for (int64_t d = 0; d < D; ++d) o[d] = acc[g * D + d] * inv;
  }
}


#if defined(__AVX512BF16__)
/* Lane t of the result: the sum of the 16 lanes of v[t]. Pairs of vectors are added with
 * their lanes interleaved, halving the vectors at each of four levels (within 128-bit
 * chunks by unpacking 32- then 64-bit lanes, then across chunks), 45 instructions in all
 * against 16 separate horizontal sums of about 8 each. */
static inline __m512 sum16(const __m512 v[16]) {
  __m512 a[8], b[4], c[2];
  for (int i = 0; i < 8; ++i) /* per chunk: v[2i] at lanes 0 and 2, v[2i+1] at 1 and 3 */
    a[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]),
                         _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  for (int i = 0; i < 4; ++i) { /* per chunk: lane j holds a partial sum of v[4i + j] */
    const __m512d x = _mm512_castps_pd(a[2 * i]), y = _mm512_castps_pd(a[2 * i + 1]);
    b[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int i = 0; i < 2; ++i) /* chunks 0, 2 plus chunks 1, 3 of b[2i] then of b[2i+1] */
    c[i] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * i], b[2 * i + 1], 0xDD));
  /* chunk j: the whole sums of v[4j .. 4j + 3] */
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88), _mm512_shuffle_f32x4(c[0], c[1], 0xDD));
}

/* The task for a bf16 cache and D a multiple of 32, with AVX512-BF16: scores of 16 tokens at
 * a time by bf16 dot products (float32 sums), their softmax terms by a vector exp (the sum
 * kept per lane, rescaled only when the running max moves), then the values by bf16 dot
 * products over pairs of tokens, the probabilities rounded to bf16 as torch's attention does
 * for bf16 inputs (float32 sums). */
static inline __attribute__((always_inline)) void task_bf16(
    int64_t b, int64_t h, float *out, const float *q, const uint16_t *k_cache,
    const uint16_t *v_cache, const int64_t *tables, const int64_t *lens, int64_t Hq,
    int64_t Hkv, int64_t NB, int64_t BS, const int64_t D, int64_t MB, float scale,
    const int64_t G) {
  const int64_t DV = D / 32, DF = D / 16;
  __m512bh qv[MAX_G][MAX_D / 32];
  __m512 acc[MAX_G][MAX_D / 16];
  float m[MAX_G];
  __m512 lv[MAX_G];
  for (int64_t g = 0; g < G; ++g) {
    const float *qs = q + (b * Hq + h * G + g) * D;
    for (int64_t i = 0; i < DV; ++i)
      qv[g][i] = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(qs + 32 * i + 16), _mm512_loadu_ps(qs + 32 * i));
    for (int64_t i = 0; i < DF; ++i) acc[g][i] = _mm512_setzero_ps();
    m[g] = -1e30f;
    lv[g] = _mm512_setzero_ps();
  }
  const int64_t len = lens[b];
  const int64_t nblocks = (len + BS - 1) / BS;
  for (int64_t j = 0; j < nblocks; ++j) {
    const int64_t blk = tables[b * MB + j];
    const int64_t base = ((h * NB + blk) * BS) * D;
    /* Blocks are scattered: ask for the next three into L2 while this one is computed, each
     * of them again at every block (a prefetch the full miss queue drops is asked for again).
     * At 256 sequences x 384 tokens, whose K/V do not fit the caches, this took a layer's
     * attention from 4.2 to 2.7 ms against the next block alone into L1
     * (benchmarks/results/decode-attn-prefetch-20261204.md). */
    for (int64_t a = 1; a <= 3 && j + a < nblocks; ++a) {
      const int64_t next = ((h * NB + tables[b * MB + j + a]) * BS) * D;
      for (int64_t off = 0; off < BS * D; off += 32) {
        _mm_prefetch((const char *)(k_cache + next + off), _MM_HINT_T1);
        _mm_prefetch((const char *)(v_cache + next + off), _MM_HINT_T1);
      }
    }
    for (int64_t t0 = 0; t0 < BS && j * BS + t0 < len; t0 += 16) {
      const int64_t rest = len - j * BS - t0, cap = BS - t0;
      const int64_t ntok = rest < 16 ? (rest < cap ? rest : cap) : (cap < 16 ? cap : 16);
      const uint16_t *kb = k_cache + base + t0 * D, *vb = v_cache + base + t0 * D;
      uint32_t pw[MAX_G][8];
      const __mmask16 live = ntok >= 16 ? 0xffff : (__mmask16)((1u << ntok) - 1);
      __m512 p[MAX_G];
      for (int64_t g = 0; g < G; ++g) {
        /* the 16 tokens' dot products as 16 vectors of partial sums, then summed across
         * lanes all at once (sum16): one vector whose lane t is token t's score */
        __m512 dots[16];
        for (int64_t t = 0; t < 16; ++t) {
          dots[t] = _mm512_setzero_ps();
          if (t < ntok)
            for (int64_t i = 0; i < DV; ++i)
              dots[t] = _mm512_dpbf16_ps(dots[t], qv[g][i], (__m512bh)_mm512_loadu_si512(kb + t * D + 32 * i));
        }
        const __m512 s = _mm512_mask_mul_ps(_mm512_set1_ps(-1e30f), live, sum16(dots), _mm512_set1_ps(scale));
        const float bmax = _mm512_reduce_max_ps(s);
        if (bmax > m[g]) { /* a new running max: rescale what was summed so far */
          const __m512 c = _mm512_set1_ps(expf(m[g] - bmax));
          lv[g] = _mm512_mul_ps(lv[g], c);
          for (int64_t i = 0; i < DF; ++i) acc[g][i] = _mm512_mul_ps(acc[g][i], c);
          m[g] = bmax;
        }
        p[g] = _mm512_maskz_mov_ps(live, exp512(_mm512_sub_ps(s, _mm512_set1_ps(m[g]))));
        lv[g] = _mm512_add_ps(lv[g], p[g]);
        /* probabilities rounded to bf16, a pair of tokens per 32-bit word */
        _mm256_storeu_si256((__m256i *)pw[g], (__m256i)_mm512_cvtneps_pbh(p[g]));
      }
      /* values of two tokens interleaved per head dimension (unpack within 128-bit lanes:
       * acc[g][2c] holds dims 32c + 8k + j at lane 4k + j, acc[g][2c + 1] dims 32c + 8k + 4 + j),
       * times the pair's probabilities by one bf16 dot product */
      for (int64_t t = 0; t < ntok; t += 2) {
        const uint16_t *v0 = vb + t * D;
        for (int64_t c = 0; c < DV; ++c) {
          const __m512i a = _mm512_loadu_si512(v0 + 32 * c);
          const __m512i z = t + 1 < ntok ? _mm512_loadu_si512(v0 + D + 32 * c) : _mm512_setzero_si512();
          const __m512bh lo = (__m512bh)_mm512_unpacklo_epi16(a, z), hi = (__m512bh)_mm512_unpackhi_epi16(a, z);
          for (int64_t g = 0; g < G; ++g) {
            const __m512bh w = (__m512bh)_mm512_set1_epi32((int)pw[g][t / 2]);
            acc[g][2 * c] = _mm512_dpbf16_ps(acc[g][2 * c], w, lo);
            acc[g][2 * c + 1] = _mm512_dpbf16_ps(acc[g][2 * c + 1], w, hi);
          }
        }
      }
    }
  }
  for (int64_t g = 0; g < G; ++g) {
    float *o = out + (b * Hq + h * G + g) * D;
    const float l = _mm512_reduce_add_ps(lv[g]);
    const __m512 inv = _mm512_set1_ps(l > 0.f ? 1.f / l : 0.f);
    const __m512i lo_idx = _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23);
    const __m512i hi_idx = _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31);
    for (int64_t c = 0; c < DV; ++c) {
      const __m512 lo = acc[g][2 * c], hi = acc[g][2 * c + 1];
      _mm512_storeu_ps(o + 32 * c, _mm512_mul_ps(_mm512_permutex2var_ps(lo, lo_idx, hi), inv));
      _mm512_storeu_ps(o + 32 * c + 16, _mm512_mul_ps(_mm512_permutex2var_ps(lo, hi_idx, hi), inv));
    }
  }
}
#define HAVE_TASK_BF16 1
#endif

/* Task t's output (its G query heads) rounded to bf16 into out16 at the same place. */
static inline void task_to_bf16(uint16_t *out16, const float *out, int64_t t, int64_t Hkv,
                                int64_t Hq, int64_t D) {
  const int64_t G = Hq / Hkv, at = ((t / Hkv) * Hq + (t % Hkv) * G) * D;
  for (int64_t i = at; i < at + G * D; ++i) out16[i] = f_to_bf16(out[i]);
}

/* Whether the kernel takes these head shapes and block size. */
int paged_decode_attention_supported(int64_t Hq, int64_t Hkv, int64_t BS, int64_t D) {
  return !(Hq % Hkv || Hq / Hkv > MAX_G || D > MAX_D || BS > MAX_BS);
}

/* The tasks of paged_decode_attention handed out among the threads of the calling parallel
 * region (every thread of it calls this; an orphaned worksharing loop, which waits for the team
 * at its end), or all run by a caller outside any parallel region. out16 (or NULL): each
 * task's output also rounded to bf16 there, [B, Hq, D]. */
int paged_decode_attention_team(float *out, uint16_t *out16, const float *q, const void *k_cache,
                                const void *v_cache, int is_bf16, const int64_t *tables,
                                const int64_t *lens, int64_t B, int64_t Hq, int64_t Hkv,
                                int64_t NB, int64_t BS, int64_t D, int64_t MB, float scale) {
  if (!paged_decode_attention_supported(Hq, Hkv, BS, D)) return -1;
  /* One task per (sequence, KV head), handed out one at a time: a task's cost grows with its
   * sequence's context, and a running batch is ordered by age, so its oldest (longest)
   * sequences come first. Split statically, the first thread got them all: 240 decodes of
   * 1200 down to 100 tokens took 1.4x as long as handed out dynamically
   * (benchmarks/results/attn-balance-20261203.txt), which also lets one thread take over the
   * tasks of another that the OS has descheduled.
   * Constant head sizes let the compiler unroll the inner loops completely. */
#define TASKS(CALL)                                      \
  _Pragma("omp for schedule(dynamic, 1)")                \
  for (int64_t t = 0; t < B * Hkv; ++t) {                \
    CALL;                                                \
    if (out16) task_to_bf16(out16, out, t, Hkv, Hq, D);  \
  }
#define RUN(DIM)                                                                                 \
  TASKS(task(t / Hkv, t % Hkv, out, q, k_cache, v_cache, is_bf16, tables, lens, Hq, Hkv, NB, BS, \
             DIM, MB, scale))
#ifdef HAVE_TASK_BF16
  if (is_bf16 && D % 32 == 0) {
#define RUN16(DIM, GG)                                                                       \
  TASKS(task_bf16(t / Hkv, t % Hkv, out, q, (const uint16_t *)k_cache, (const uint16_t *)v_cache, \
                  tables, lens, Hq, Hkv, NB, BS, DIM, MB, scale, GG))
    /* Constant head sizes and group sizes keep the accumulators in registers. */
    const int64_t G = Hq / Hkv;
    if (D == 64 && G == 3) {
      RUN16(64, 3)
    } else if (D == 64 && G == 4) {
      RUN16(64, 4)
    } else if (D == 64 && G == 1) {
      RUN16(64, 1)
    } else if (D == 128 && G == 4) {
      RUN16(128, 4)
    } else if (D == 128 && G == 2) {
      RUN16(128, 2)
    } else if (D == 64) {
      RUN16(64, G)
    } else if (D == 128) {
      RUN16(128, G)
    } else {
      RUN16(D, G)
    }
#undef RUN16
    return 0;
  }
#endif
  if (D == 64) {
    RUN(64)
  } else if (D == 128) {
    RUN(128)
  } else {
    RUN(D)
  }
#undef RUN
#undef TASKS
  return 0;
}

/* q, out: [B, Hq, D] float32; k_cache, v_cache: [Hkv, NB, BS, D] float32 or bfloat16;
 * tables: [B, MB] int64; lens: [B] int64. All contiguous. Returns 0, or -1 on bad shapes. */
int paged_decode_attention(float *out, const float *q, const void *k_cache, const void *v_cache,
                           int is_bf16, const int64_t *tables, const int64_t *lens, int64_t B,
                           int64_t Hq, int64_t Hkv, int64_t NB, int64_t BS, int64_t D, int64_t MB,
                           float scale, int num_threads) {
  if (!paged_decode_attention_supported(Hq, Hkv, BS, D)) return -1;
#pragma omp parallel num_threads(num_threads)
  paged_decode_attention_team(out, NULL, q, k_cache, v_cache, is_bf16, tables, lens, B, Hq, Hkv,
                              NB, BS, D, MB, scale);
  return 0;
}
