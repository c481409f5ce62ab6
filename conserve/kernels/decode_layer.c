/* One whole decoder layer for a decode step of a few sequences (bf16), in one call.
 *
 * At one or two rows a layer's own work is small (the weight stream aside) and a layer run as
 * ~30 torch calls from Python spends more time dispatching than computing. This does the same
 * math as `DecoderLayer` (model/llama.py) with the bf16 layer path's compiled parts: RMSNorm,
 * q/k/v projection, RoPE (ops_bf16.c, linear_bf16.c), K/V written at the step's slots, paged
 * decode attention (paged_attention.c), output projection and residual, RMSNorm, gate/up
 * projection, SiLU(gate) * up, down projection and residual, rounding to bf16 where the torch
 * layer does. The runner calls it once per layer, so that a step still stops between layers.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>

void linear_bf16(uint16_t *y, const uint16_t *x, const uint16_t *wp, const uint16_t *bias,
                 int64_t M, int64_t K, int64_t N, int64_t xs, int num_threads);
int paged_decode_attention(float *out, const float *q, const void *k_cache, const void *v_cache,
                           int is_bf16, const int64_t *tables, const int64_t *lens, int64_t B,
                           int64_t Hq, int64_t Hkv, int64_t NB, int64_t BS, int64_t D, int64_t MB,
                           float scale, int num_threads);

#include "simd.h"

#define bf bf16_to_f
#define to_bf f_to_bf16

/* ops_bf16.c: the same small ops as the bf16 torch layer path */
void rms_norm_bf16(uint16_t *out, const uint16_t *x, const uint16_t *w, int64_t rows, int64_t n,
                   int64_t xs, float eps, int num_threads);
void silu_mul_bf16(uint16_t *out, const uint16_t *gu, int64_t rows, int64_t I, int num_threads);
void rope_bf16(uint16_t *x, const uint16_t *cos, const uint16_t *sin, int64_t rows,
               int64_t heads, int64_t D, int64_t xs, int num_threads);

static void add_into(uint16_t *h, const uint16_t *a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) h[i] = to_bf(bf(h[i]) + bf(a[i]));
}

struct layer_dims {
  int64_t hidden, heads, kv_heads, head_dim, inter, num_blocks, block_size, max_blocks;
  float eps, scale;
};

/* h: [M, hidden] bf16, updated in place. Weights: packed for linear_bf16 (qkv_b may be NULL).
 * cos, sin: [M, head_dim] bf16. k_cache, v_cache: this layer's [Hkv, NB, BS, D] bf16. slots:
 * [M] where each row's K/V goes; tables [M, max_blocks], lens [M]: attention after the write.
 * work: bf16 scratch of M * (2 * hidden + q + 2 kv + q + 3 * inter) elements; fwork: float32
 * scratch of 2 * M * q. times (or NULL): seconds added to [linear, attention, other]. */
int decode_layer_bf16(uint16_t *h, int64_t M, const struct layer_dims *dm,
                      const uint16_t *in_norm, const uint16_t *post_norm, const uint16_t *qkv_w,
                      const uint16_t *qkv_b, const uint16_t *o_w, const uint16_t *gu_w,
                      const uint16_t *down_w, const uint16_t *cos, const uint16_t *sin,
                      uint16_t *k_cache, uint16_t *v_cache, const int64_t *slots,
                      const int64_t *tables, const int64_t *lens, uint16_t *work, float *fwork,
                      int num_threads, double *times) {
  const int64_t H = dm->hidden, D = dm->head_dim, Hq = dm->heads, Hkv = dm->kv_heads;
  const int64_t qn = Hq * D, kvn = Hkv * D, qkvn = qn + 2 * kvn, I = dm->inter;
  uint16_t *x = work, *qkv = x + M * H, *att = qkv + M * qkvn, *gu = att + M * qn;
  uint16_t *act = gu + M * 2 * I, *tmp = act + M * I;
  float *qf = fwork, *of = fwork + M * qn;
  double t0 = omp_get_wtime(), t;
  double lin = 0, attn = 0;
#define LIN(call) (t = omp_get_wtime(), call, lin += omp_get_wtime() - t)
  rms_norm_bf16(x, h, in_norm, M, H, H, dm->eps, num_threads);
  LIN(linear_bf16(qkv, x, qkv_w, qkv_b, M, H, qkvn, H, num_threads));
  t = omp_get_wtime();
  rope_bf16(qkv, cos, sin, M, Hq + Hkv, D, qkvn, num_threads); /* q and k heads adjacent */
  for (int64_t r = 0; r < M; ++r) {
    uint16_t *row = qkv + r * qkvn;
    const int64_t blk = slots[r] / dm->block_size, off = slots[r] % dm->block_size;
    for (int64_t g = 0; g < Hkv; ++g) {
      const int64_t at = ((g * dm->num_blocks + blk) * dm->block_size + off) * D;
      memcpy(k_cache + at, row + qn + g * D, D * 2);
      memcpy(v_cache + at, row + qn + kvn + g * D, D * 2);
    }
    for (int64_t i = 0; i < qn; ++i) qf[r * qn + i] = bf(row[i]);
  }
  if (paged_decode_attention(of, qf, k_cache, v_cache, 1, tables, lens, M, Hq, Hkv,
                             dm->num_blocks, dm->block_size, D, dm->max_blocks, dm->scale,
                             num_threads))
    return -1;
  for (int64_t i = 0; i < M * qn; ++i) att[i] = to_bf(of[i]);
  attn += omp_get_wtime() - t;
  LIN(linear_bf16(tmp, att, o_w, NULL, M, qn, H, qn, num_threads));
  add_into(h, tmp, M * H);
  rms_norm_bf16(x, h, post_norm, M, H, H, dm->eps, num_threads);
  LIN(linear_bf16(gu, x, gu_w, NULL, M, H, 2 * I, H, num_threads));
  silu_mul_bf16(act, gu, M, I, num_threads);
  LIN(linear_bf16(tmp, act, down_w, NULL, M, I, H, I, num_threads));
  add_into(h, tmp, M * H);
#undef LIN
  if (times) {
    times[0] += lin;
    times[1] += attn;
    times[2] += omp_get_wtime() - t0 - lin - attn;
  }
  return 0;
}
