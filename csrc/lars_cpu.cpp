// CPU kernel of fastclr::lars_step_: one call for a whole parameter list.
//
// Two parallel passes over fixed-size chunks of all tensors (so one huge tensor and many
// small ones balance alike): pass 1 reads w and g once for ||w||^2 and ||g + wd w||^2 (float
// math, double accumulation per chunk, summed per tensor in a fixed order: deterministic);
// pass 2 reads w, g, v once more and writes v and w. That is the fewest reads the math allows:
// the trust ratio needs both norms before any element can be updated.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "cpu_utils.h"
#include "lars_common.h"

namespace fastclr {
namespace {

constexpr int64_t kChunk = 1 << 15;

struct Chunk {
  int64_t tensor, begin, end;
};

template <typename scalar_t>
FASTCLR_INLINE void sums_impl(const scalar_t* __restrict w, const scalar_t* __restrict g,
                              int64_t n, float wd, double* w_sq, double* d_sq) {
  float ws = 0.f, ds = 0.f;
#pragma omp simd reduction(+ : ws, ds)
  for (int64_t k = 0; k < n; ++k) {
    const float wv = static_cast<float>(w[k]);
    const float dv = static_cast<float>(g[k]) + wd * wv;
    ws += wv * wv;
    ds += dv * dv;
  }
  *w_sq = ws;
  *d_sq = ds;
}

template <typename scalar_t>
FASTCLR_INLINE void update_impl(scalar_t* __restrict w, const scalar_t* __restrict g,
                                float* __restrict v, int64_t n, float wd, float scaled_lr,
                                float momentum, bool nesterov) {
#pragma omp simd
  for (int64_t k = 0; k < n; ++k) {
    const float wv = static_cast<float>(w[k]);
    const float step = scaled_lr * (static_cast<float>(g[k]) + wd * wv);
    const float vn = momentum * v[k] + step;
    v[k] = vn;
    w[k] = static_cast<scalar_t>(wv - (nesterov ? momentum * vn + step : vn));
  }
}

// float32 parameters get AVX-512 / AVX2 clones; half types go through the generic code.
FASTCLR_MULTIVERSION void chunk_sums(const float* w, const float* g, int64_t n, float wd,
                                     double* w_sq, double* d_sq) {
  sums_impl(w, g, n, wd, w_sq, d_sq);
}
template <typename scalar_t>
void chunk_sums(const scalar_t* w, const scalar_t* g, int64_t n, float wd, double* w_sq,
                double* d_sq) {
  sums_impl(w, g, n, wd, w_sq, d_sq);
}
FASTCLR_MULTIVERSION void chunk_update(float* w, const float* g, float* v, int64_t n, float wd,
                                       float scaled_lr, float momentum, bool nesterov) {
  update_impl(w, g, v, n, wd, scaled_lr, momentum, nesterov);
}
template <typename scalar_t>
void chunk_update(scalar_t* w, const scalar_t* g, float* v, int64_t n, float wd,
                  float scaled_lr, float momentum, bool nesterov) {
  update_impl(w, g, v, n, wd, scaled_lr, momentum, nesterov);
}

void lars_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList bufs, double lr,
                   double momentum, double weight_decay, double trust_coefficient, bool nesterov,
                   bool exclude, const c10::optional<at::Tensor>& found_inf) {
  const std::vector<at::Tensor> g = lars_checked_grads(params, grads, bufs);
  const int64_t count = static_cast<int64_t>(params.size());
  if (count == 0) return;
  lars_check_found_inf(found_inf, params[0]);
  if (found_inf.has_value() && found_inf->data_ptr<float>()[0] != 0.f) return;  // a skipped step
  const auto dtype = params[0].scalar_type();

  std::vector<Chunk> chunks;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t n = params[i].numel();
    for (int64_t b = 0; b < n; b += kChunk) chunks.push_back({i, b, std::min(n, b + kChunk)});
  }
  const int64_t n_chunks = static_cast<int64_t>(chunks.size());
  const float wd = exclude ? 0.f : static_cast<float>(weight_decay);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "lars_step_cpu", [&] {
    std::vector<float> scaled_lr(count, static_cast<float>(lr));
    if (!exclude) {
      std::vector<double> w_sq(n_chunks), d_sq(n_chunks);
      at::parallel_for(0, n_chunks, 1, [&](int64_t c_begin, int64_t c_end) {
        for (int64_t c = c_begin; c < c_end; ++c) {
          const Chunk& ch = chunks[c];
          chunk_sums(params[ch.tensor].const_data_ptr<scalar_t>() + ch.begin,
                     g[ch.tensor].const_data_ptr<scalar_t>() + ch.begin, ch.end - ch.begin, wd,
                     &w_sq[c], &d_sq[c]);
        }
      });
      std::vector<double> w_norm(count, 0.0), d_norm(count, 0.0);
      for (int64_t c = 0; c < n_chunks; ++c) {
        w_norm[chunks[c].tensor] += w_sq[c];
        d_norm[chunks[c].tensor] += d_sq[c];
      }
      for (int64_t i = 0; i < count; ++i) {
        const float wn = std::sqrt(static_cast<float>(w_norm[i]));
        const float dn = std::sqrt(static_cast<float>(d_norm[i]));
        const float trust =
            (wn > 0.f && dn > 0.f) ? static_cast<float>(trust_coefficient) * wn / dn : 1.f;
        scaled_lr[i] = static_cast<float>(lr) * trust;
      }
    }
    at::parallel_for(0, n_chunks, 1, [&](int64_t c_begin, int64_t c_end) {
      for (int64_t c = c_begin; c < c_end; ++c) {
        const Chunk& ch = chunks[c];
        chunk_update(params[ch.tensor].data_ptr<scalar_t>() + ch.begin,
                     g[ch.tensor].const_data_ptr<scalar_t>() + ch.begin,
                     bufs[ch.tensor].data_ptr<float>() + ch.begin, ch.end - ch.begin, wd,
                     scaled_lr[ch.tensor], static_cast<float>(momentum), nesterov);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fastclr, CPU, m) {
  m.impl("lars_step_", &lars_step_cpu);
}

}  // namespace fastclr
