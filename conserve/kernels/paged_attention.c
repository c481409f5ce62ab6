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

static inline float bf16_to_f(uint16_t x) {
  union { uint32_t u; float f; } v;
  v.u = ((uint32_t)x) << 16;
  return v.f;
}

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

/* q, out: [B, Hq, D] float32; k_cache, v_cache: [Hkv, NB, BS, D] float32 or bfloat16;
 * tables: [B, MB] int64; lens: [B] int64. All contiguous. Returns 0, or -1 on bad shapes. */
int paged_decode_attention(float *out, const float *q, const void *k_cache, const void *v_cache,
                           int is_bf16, const int64_t *tables, const int64_t *lens, int64_t B,
                           int64_t Hq, int64_t Hkv, int64_t NB, int64_t BS, int64_t D, int64_t MB,
                           float scale, int num_threads) {
  if (Hq % Hkv || Hq / Hkv > MAX_G || D > MAX_D || BS > MAX_BS) return -1;
  /* Constant head sizes let the compiler unroll the inner loops completely. */
#define RUN(DIM)                                                                            \
  _Pragma("omp parallel for schedule(static) num_threads(num_threads)")                     \
  for (int64_t t = 0; t < B * Hkv; ++t)                                                     \
    task(t / Hkv, t % Hkv, out, q, k_cache, v_cache, is_bf16, tables, lens, Hq, Hkv, NB, BS, \
         DIM, MB, scale);
  if (D == 64) {
    RUN(64)
  } else if (D == 128) {
    RUN(128)
  } else {
    RUN(D)
  }
#undef RUN
  return 0;
}
