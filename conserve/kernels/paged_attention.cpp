// Decode attention straight from the paged KV cache, for CPUs.
//
// One query per sequence. Each (sequence, KV head) pair is one task: it walks the sequence's
// blocks once, scores the block's keys against the G query heads that share this KV head, and
// folds the block into a running softmax (max, sum, weighted values). K/V are read once from
// memory, with no gathered copy, which is what bounds decode attention on CPUs.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace {

template <typename T>
inline float to_f(T x) { return static_cast<float>(x); }

template <typename T>
void decode_kernel(float* out, const float* q, const T* k_cache, const T* v_cache,
                   const int64_t* tables, const int64_t* lens, int64_t B, int64_t Hq,
                   int64_t Hkv, int64_t NB, int64_t BS, int64_t D, int64_t MB, float scale) {
  const int64_t G = Hq / Hkv;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * D), acc(G * D), s(G * BS), m(G), l(G), kf(BS * D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / Hkv, h = task % Hkv;
      const int64_t len = lens[b];
      for (int64_t g = 0; g < G; ++g) {
        const float* qs = q + (b * Hq + h * G + g) * D;
        for (int64_t d = 0; d < D; ++d) qf[g * D + d] = qs[d] * scale;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), -std::numeric_limits<float>::infinity());
      std::fill(l.begin(), l.end(), 0.f);
      const int64_t nblocks = (len + BS - 1) / BS;
      for (int64_t j = 0; j < nblocks; ++j) {
        const int64_t blk = tables[b * MB + j];
        const int64_t ntok = std::min(BS, len - j * BS);
        const T* kb = k_cache + ((h * NB + blk) * BS) * D;
        const T* vb = v_cache + ((h * NB + blk) * BS) * D;
        for (int64_t t = 0; t < ntok * D; ++t) kf[t] = to_f(kb[t]);
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = &qf[g * D];
          float bmax = -std::numeric_limits<float>::infinity();
          for (int64_t t = 0; t < ntok; ++t) {
            const float* kt = &kf[t * D];
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < D; ++d) dot += qg[d] * kt[d];
            s[g * BS + t] = dot;
            bmax = std::max(bmax, dot);
          }
          const float m_new = std::max(m[g], bmax);
          const float corr = std::exp(m[g] - m_new);
          float sum = l[g] * corr;
          float* ag = &acc[g * D];
          for (int64_t d = 0; d < D; ++d) ag[d] *= corr;
          for (int64_t t = 0; t < ntok; ++t) {
            const float p = std::exp(s[g * BS + t] - m_new);
            s[g * BS + t] = p;
            sum += p;
          }
          m[g] = m_new;
          l[g] = sum;
        }
        for (int64_t t = 0; t < ntok; ++t) {
          const T* vt = vb + t * D;
          for (int64_t d = 0; d < D; ++d) kf[d] = to_f(vt[d]);
          for (int64_t g = 0; g < G; ++g) {
            const float p = s[g * BS + t];
            float* ag = &acc[g * D];
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) ag[d] += p * kf[d];
          }
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* o = out + (b * Hq + h * G + g) * D;
        const float inv = l[g] > 0.f ? 1.f / l[g] : 0.f;
        for (int64_t d = 0; d < D; ++d) o[d] = acc[g * D + d] * inv;
      }
    }
  });
}

}  // namespace

// q, out: [B, Hq, D] float32 contiguous; k_cache, v_cache: [Hkv, NB, BS, D] (float32 or
// bfloat16) contiguous; block_tables: [B, MB] int64; context_lens: [B] int64.
void paged_decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor k_cache,
                            torch::Tensor v_cache, torch::Tensor block_tables,
                            torch::Tensor context_lens, double scale) {
  TORCH_CHECK(q.is_contiguous() && out.is_contiguous() && k_cache.is_contiguous() &&
              v_cache.is_contiguous() && block_tables.is_contiguous() &&
              context_lens.is_contiguous(), "paged_decode_attention: contiguous inputs only");
  TORCH_CHECK(q.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat,
              "paged_decode_attention: float32 queries");
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t Hkv = k_cache.size(0), NB = k_cache.size(1), BS = k_cache.size(2);
  const int64_t MB = block_tables.size(1);
  TORCH_CHECK(Hq % Hkv == 0 && k_cache.size(3) == D, "paged_decode_attention: bad shapes");
  const float sc = static_cast<float>(scale);
  if (k_cache.scalar_type() == at::kFloat) {
    decode_kernel<float>(out.data_ptr<float>(), q.data_ptr<float>(), k_cache.data_ptr<float>(),
                         v_cache.data_ptr<float>(), block_tables.data_ptr<int64_t>(),
                         context_lens.data_ptr<int64_t>(), B, Hq, Hkv, NB, BS, D, MB, sc);
  } else if (k_cache.scalar_type() == at::kBFloat16) {
    decode_kernel<at::BFloat16>(out.data_ptr<float>(), q.data_ptr<float>(),
                                k_cache.data_ptr<at::BFloat16>(), v_cache.data_ptr<at::BFloat16>(),
                                block_tables.data_ptr<int64_t>(), context_lens.data_ptr<int64_t>(),
                                B, Hq, Hkv, NB, BS, D, MB, sc);
  } else {
    TORCH_CHECK(false, "paged_decode_attention: KV cache must be float32 or bfloat16");
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention,
        "decode attention over a paged KV cache (CPU)");
}
