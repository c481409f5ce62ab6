/* The decoder layers of a bf16 decode step (up to a few hundred sequences), in one call.
 *
 * At one or two rows a layer's own work is small (the weight stream aside) and a layer run as
 * ~30 torch calls from Python spends more time dispatching than computing. This does the same
 * math as `DecoderLayer` (model/llama.py) with the bf16 layer path's compiled parts: RMSNorm,
 * q/k/v projection, RoPE (ops_bf16.c, linear_bf16.c), K/V written at the step's slots, paged
 * decode attention (paged_attention.c), output projection and residual, RMSNorm, gate/up
 * projection, SiLU(gate) * up, down projection and residual, rounding to bf16 where the torch
 * layer does. It checks a stop flag between layers, so that a step still stops there.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>

/* linear_bf16.c, paged_attention.c, ops_bf16.c: each thread of the layer's team calls these
 * for its own share of the work */
void linear_bf16_share(uint16_t *y, const uint16_t *x, const uint16_t *wp, const uint16_t *bias,
                       int64_t M, int64_t K, int64_t N, int64_t xs, int t, int team);
int paged_decode_attention_supported(int64_t Hq, int64_t Hkv, int64_t BS, int64_t D);
int paged_decode_attention_team(float *out, uint16_t *out16, const float *q, const void *k_cache,
                                const void *v_cache, int is_bf16, const int64_t *tables,
                                const int64_t *lens, int64_t B, int64_t Hq, int64_t Hkv,
                                int64_t NB, int64_t BS, int64_t D, int64_t MB, float scale);
void rms_norm_bf16_rows(uint16_t *out, const uint16_t *x, const uint16_t *w, int64_t r0, int64_t r1,
                        int64_t n, int64_t xs, float eps);
void silu_mul_bf16_share(uint16_t *out, const uint16_t *gu, int64_t rows, int64_t I, int t, int team);
void rope_bf16_rows(uint16_t *x, const uint16_t *cos, const uint16_t *sin, int64_t r0, int64_t r1,
                    int64_t heads, int64_t D, int64_t xs);

#include "simd.h"

#define bf bf16_to_f
#define to_bf f_to_bf16

static void add_into(uint16_t *h, const uint16_t *a, int64_t lo, int64_t hi) {
  for (int64_t i = lo; i < hi; ++i) h[i] = to_bf(bf(h[i]) + bf(a[i]));
}

struct layer_dims {
  int64_t hidden, heads, kv_heads, head_dim, inter, num_blocks, block_size, max_blocks;
  float eps, scale;
};

/* A layer's weights (packed for linear_bf16; qkv_b may be NULL) and its K/V cache
 * ([Hkv, NB, BS, D] bf16). */
struct layer_weights {
  const uint16_t *in_norm, *post_norm, *qkv, *qkv_b, *o, *gate_up, *down;
  uint16_t *k_cache, *v_cache;
};

/* The arguments of the entry points below. h: [M, hidden] bf16, updated in place. cos, sin:
 * [M, head_dim] bf16. slots: [M] where each row's K/V goes; tables [M, max_blocks], lens [M]:
 * attention after the write. work: bf16 scratch of M * (2 * hidden + q + 2 kv + q + 3 * inter)
 * elements; fwork: float32 scratch of 2 * M * q. times (or NULL): seconds added to [linear,
 * attention, other], thread 0's, barriers included.
 *
 * A layer's threads go through its parts together, each taking its share of every part (output
 * blocks of a linear layer, rows, attention tasks) and waiting for the others at a barrier
 * between parts. */
/* One layer's work for thread t of a team of T (every thread of the region calls it). The
 * times (thread 0's, barriers included) are added to lin and attn. */
static void layer_share(uint16_t *h, int64_t M, const struct layer_dims *dm,
                        const struct layer_weights *w, const uint16_t *cos, const uint16_t *sin,
                        const int64_t *slots, const int64_t *tables, const int64_t *lens,
                        uint16_t *work, float *fwork, int t, int T, double *lin, double *attn) {
  const int64_t H = dm->hidden, D = dm->head_dim, Hq = dm->heads, Hkv = dm->kv_heads;
  const int64_t qn = Hq * D, kvn = Hkv * D, qkvn = qn + 2 * kvn, I = dm->inter;
  uint16_t *x = work, *qkv = x + M * H, *att = qkv + M * qkvn, *gu = att + M * qn;
  uint16_t *act = gu + M * 2 * I, *tmp = act + M * I;
  uint16_t *k_cache = w->k_cache, *v_cache = w->v_cache;
  float *qf = fwork, *of = fwork + M * qn;
  const int64_t r0 = M * t / T, r1 = M * (t + 1) / T;       /* this thread's rows */
  const int64_t e0 = M * H * t / T, e1 = M * H * (t + 1) / T; /* and elements of h */
  double s = 0;
#define MARK() (t == 0 ? (s = omp_get_wtime()) : 0)
#define ADD(v) (t == 0 ? (*(v) += omp_get_wtime() - s) : 0)
  rms_norm_bf16_rows(x, h, w->in_norm, r0, r1, H, H, dm->eps);
#pragma omp barrier
  MARK();
  linear_bf16_share(qkv, x, w->qkv, w->qkv_b, M, H, qkvn, H, t, T);
#pragma omp barrier
  ADD(lin);
  MARK();
  rope_bf16_rows(qkv, cos, sin, r0, r1, Hq + Hkv, D, qkvn); /* q and k heads adjacent */
  for (int64_t r = r0; r < r1; ++r) {
    uint16_t *row = qkv + r * qkvn;
    const int64_t blk = slots[r] / dm->block_size, off = slots[r] % dm->block_size;
    for (int64_t g = 0; g < Hkv; ++g) {
      const int64_t at = ((g * dm->num_blocks + blk) * dm->block_size + off) * D;
      memcpy(k_cache + at, row + qn + g * D, D * 2);
      memcpy(v_cache + at, row + qn + kvn + g * D, D * 2);
    }
    for (int64_t i = 0; i < qn; ++i) qf[r * qn + i] = bf(row[i]);
  }
#pragma omp barrier
  /* every task's output rounded to bf16 into att; the loop waits for the team at its end */
  paged_decode_attention_team(of, att, qf, k_cache, v_cache, 1, tables, lens, M, Hq, Hkv,
                              dm->num_blocks, dm->block_size, D, dm->max_blocks, dm->scale);
  ADD(attn);
  MARK();
  linear_bf16_share(tmp, att, w->o, NULL, M, qn, H, qn, t, T);
#pragma omp barrier
  ADD(lin);
  for (int64_t r = r0; r < r1; ++r) {
    add_into(h, tmp, r * H, (r + 1) * H);
    rms_norm_bf16_rows(x, h, w->post_norm, r, r + 1, H, H, dm->eps);
  }
#pragma omp barrier
  MARK();
  linear_bf16_share(gu, x, w->gate_up, NULL, M, H, 2 * I, H, t, T);
#pragma omp barrier
  ADD(lin);
  silu_mul_bf16_share(act, gu, M, I, t, T);
#pragma omp barrier
  MARK();
  linear_bf16_share(tmp, act, w->down, NULL, M, I, H, I, t, T);
#pragma omp barrier
  ADD(lin);
  add_into(h, tmp, e0, e1);
#undef MARK
#undef ADD
}

/* Layers [first, last) of a decode step in one parallel region (the `layers` array is indexed
 * by layer). Before layer l, one thread of the team stores l in *done and, when l is a
 * safepoint (a multiple of `every`, and not the first layer of a `fresh` call), reads *stop (set
 * from another thread while this runs): if it is set, the team stops there. stop and done may
 * be NULL (never stop; no progress kept). Returns the layer it stopped before,
 * `last` when all ran, or -1 on shapes the kernels do not take. h, work, fwork, cos, sin,
 * slots, tables, lens and times as above.
 *
 * One region for the layers, not one per part of a layer: started once per part, a team costs
 * a wake-up and a join each time, ten times a layer; one region per layer took 0.94-0.98x the
 * step time at 2-128 rows, 0.99x at one (benchmarks/results/decode-layer-team-20261205.md).
 * Asking each thread's next weight share into L2 before the barriers did not pay (0.98-1.06x). */
int64_t decode_layers_bf16(uint16_t *h, int64_t M, const struct layer_dims *dm,
                           const struct layer_weights *layers, int64_t first, int64_t last,
                           const uint16_t *cos, const uint16_t *sin, const int64_t *slots,
                           const int64_t *tables, const int64_t *lens, uint16_t *work,
                           float *fwork, int num_threads, double *times, const volatile int *stop,
                           volatile int64_t *done, int64_t every, int fresh) {
  if (!paged_decode_attention_supported(dm->heads, dm->kv_heads, dm->block_size, dm->head_dim))
    return -1;
  const double t0 = omp_get_wtime();
  double lin = 0, attn = 0;
  int64_t at = last; /* where the team stopped */
  int halt = 0;
#pragma omp parallel num_threads(num_threads)
  {
    const int t = omp_get_thread_num(), T = omp_get_num_threads();
    for (int64_t l = first; l < last; ++l) {
#pragma omp single
      {
        if (done) *done = l;
        halt = stop && !(fresh && l == first) && l % every == 0 && *stop;
        if (halt) at = l;
      } /* the single's barrier: every thread sees halt, and the last layer's h is whole */
      if (halt) break;
      layer_share(h, M, dm, &layers[l], cos, sin, slots, tables, lens, work, fwork, t, T,
                  &lin, &attn);
    }
  }
  if (times) {
    times[0] += lin;
    times[1] += attn;
    times[2] += omp_get_wtime() - t0 - lin - attn;
  }
  return at;
}
