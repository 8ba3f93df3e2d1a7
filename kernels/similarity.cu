// CUDA kernel of fastclr::normalized_similarity (sm_80 and newer).
//
// s_ij = (a_i . b_j) / (max(||a_i||, eps) max(||b_j||, eps)): one CTA per 64 x 64 output tile;
// the raw product of the tile's rows runs on tensor cores (mma_tiles.cuh's score_tile: WMMA
// from the input-dtype rows, fp32 accumulation, 3xTF32 for fp32 inputs), and the two inverse
// norms scale the fp32 tile in the epilogue before it is written -- no normalised copy of a or b
// is made. Memory: the output and M + K floats of inverse norms. The gradient is the composite
// fastclr::normalized_similarity_backward (csrc/similarity_cpu.cpp), the same on every device.
// knn_topk on CUDA streams bank tiles of this kernel from Python (fastclr/similarity.py).
#include <ATen/ATen.h>

#include <cstdint>

#include "cuda_utils.cuh"
#include "mma_tiles.cuh"

namespace fastclr {
namespace {

constexpr double kSimNormEps = 1e-12;  // as F.normalize

// Grid: (row tiles of a, column tiles of b). Rows of a are rows [0, m) of the stacked [a; b]
// that score_tile reads, rows of b are rows m + j.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) normalized_similarity_kernel(
    const scalar_t* __restrict__ a, const scalar_t* __restrict__ b, const float* __restrict__ ra,
    const float* __restrict__ rb, float* __restrict__ out, int64_t m, int64_t k, int64_t d) {
  using storage = typename MmaTraits<scalar_t>::storage;
  constexpr int kStage = kTile * (kKc + kPad);
  FASTCLR_DYNAMIC_SMEM(smem);
  storage* a_s = reinterpret_cast<storage*>(smem);
  storage* b_s = a_s + kStage;
  float* scores = reinterpret_cast<float*>(smem + sizeof(storage) * 2 * kStage);
  __shared__ int64_t rows_i[kTile], rows_j[kTile];

  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int64_t j0 = static_cast<int64_t>(blockIdx.y) * kTile;
  if (threadIdx.x < kTile) {
    rows_i[threadIdx.x] = i0 + threadIdx.x < m ? i0 + threadIdx.x : -1;
    rows_j[threadIdx.x] = j0 + threadIdx.x < k ? m + j0 + threadIdx.x : -1;
  }
  __syncthreads();
  score_tile<scalar_t>(scores, a_s, b_s, a, b, rows_i, rows_j, m, d);
  // Epilogue: consecutive threads write consecutive columns of a row (coalesced).
  for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
    const int r = e / kTile, c = e % kTile;
    const int64_t i = i0 + r, j = j0 + c;
    if (i < m && j < k) out[i * k + j] = scores[r * kScoreLd + c] * ra[i] * rb[j];
  }
}

at::Tensor inv_norms(const at::Tensor& x) {
  return at::linalg_vector_norm(x, 2, {1}, false, at::kFloat).clamp_min(kSimNormEps).reciprocal();
}

at::Tensor normalized_similarity_cuda(const at::Tensor& a_in, const at::Tensor& b_in) {
  TORCH_CHECK(a_in.dim() == 2 && b_in.dim() == 2, "normalized_similarity: expected 2-D inputs");
  TORCH_CHECK(a_in.size(1) == b_in.size(1),
              "normalized_similarity: inputs must have the same number of columns");
  TORCH_CHECK(a_in.scalar_type() == b_in.scalar_type(), "normalized_similarity: inputs must have the same dtype");
  TORCH_CHECK(a_in.device() == b_in.device(), "normalized_similarity: inputs must be on the same device");
  TORCH_CHECK(a_in.scalar_type() == at::kFloat || a_in.scalar_type() == at::kHalf ||
                  a_in.scalar_type() == at::kBFloat16,
              "normalized_similarity: the CUDA kernel takes float32, bfloat16 or float16, got ",
              a_in.scalar_type());
  const DeviceGuard guard(a_in.device());
  const at::Tensor a = a_in.contiguous(), b = b_in.contiguous();
  const int64_t m = a.size(0), k = b.size(0), d = a.size(1);
  at::Tensor out = at::empty({m, k}, a.options().dtype(at::kFloat));
  if (out.numel() == 0) return out;
  if (d == 0) return out.zero_();
  const int64_t grid_y = (k + kTile - 1) / kTile;
  TORCH_CHECK(grid_y <= 65535, "normalized_similarity: the CUDA kernel takes at most ",
              65535 * kTile, " rows in b (split b), got ", k);
  const at::Tensor ra = inv_norms(a), rb = inv_norms(b);
  FASTCLR_DISPATCH_FLOAT_HALF_TYPES(a.scalar_type(), "normalized_similarity_cuda", [&] {
    using storage = typename MmaTraits<scalar_t>::storage;
    constexpr size_t smem = sizeof(storage) * 2 * kTile * (kKc + kPad) + sizeof(float) * kTile * kScoreLd;
    const dim3 grid(static_cast<unsigned>((m + kTile - 1) / kTile), static_cast<unsigned>(grid_y));
    launch_kernel(normalized_similarity_kernel<scalar_t>, grid, dim3(kThreads), smem,
                  a.const_data_ptr<scalar_t>(), b.const_data_ptr<scalar_t>(),
                  ra.const_data_ptr<float>(), rb.const_data_ptr<float>(), out.data_ptr<float>(),
                  m, k, d);
  });
  return out;
}

}  // namespace

FASTCLR_KERNEL_IMPL(m) {
  m.impl("normalized_similarity", &normalized_similarity_cuda);
}

}  // namespace fastclr
