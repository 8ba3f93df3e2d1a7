// CUDA kernels of fastclr::nt_xent_forward / nt_xent_backward (sm_80 and newer).
//
// The same algorithm as the Triton kernels (fastclr/triton/nt_xent.py), written by hand:
//   norm:     norm_i = max(||z_i||, 1e-12), fp32.                                 O(M)
//   forward:  per 64-row block (never straddling row N), column tiles of 64 in the rotated
//             order that starts at the block's positives; S tile = Z_I Z_J^T on tensor cores
//             (WMMA) from the raw input-dtype rows, 1/||z|| and 1/tau applied to the fp32
//             tile; online base-2 logsumexp over the negatives, positive logit and ranks
//             (all others, the other view alone) from the same tile; loss = log(1 +
//             exp(lse_neg - s_ip)), lse = s_ip + loss (no cancellation at low loss).
//   backward: one CTA per tile pair I <= J (symmetry: one tile gives P_IJ and P_JI):
//             A = w_i P_ij + w_j P_ji over the negatives (j != i, p(i)), then G_I += (A rn_J)
//             Z_J and G_J += (A rn_I)^T Z_I on tensor cores, accumulated with fp32 atomics;
//             the negatives' mass Q_i = sum_j P_ij and the tile's sum A s for dL/dtau.
//   finish:   grad_u = (G - (w_i Q_i + w_p Q_p) u_p) / tau, normalisation Jacobian, input dtype
//             out. Q = 1 - P_{i,p(i)} is summed, never subtracted (no cancellation at P ~ 1).
// Memory: O(M D) (the fp32 accumulator G). Nothing M x M. Every launch is on the current
// stream and checked. fp32 inputs use 3xTF32 products (~fp32 accuracy on tensor cores).
//
// One kernel body per stage, templated over the input type through MmaTraits.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "cuda_utils.cuh"
#include "mma_tiles.cuh"

namespace fastclr {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNormEps = 1e-12f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

__device__ __forceinline__ float pair_sum(float v) {
  return v + __shfl_xor_sync(0xffffffffu, v, 1);
}
__device__ __forceinline__ float pair_max(float v) {
  return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
}

template <typename scalar_t>
__global__ void __launch_bounds__(256) nt_xent_norm_kernel(const scalar_t* __restrict__ z1,
                                                           const scalar_t* __restrict__ z2,
                                                           float* __restrict__ norm, int64_t n,
                                                           int64_t d) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 8 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= 2 * n) return;
  const scalar_t* src = row_ptr(z1, z2, row, n, d);
  float sq = 0.f;
  for (int64_t k = lane; k < d; k += 32) {
    const float v = to_float(src[k]);
    sq += v * v;
  }
  for (int o = 16; o > 0; o /= 2) sq += __shfl_xor_sync(0xffffffffu, sq, o);
  if (lane == 0) norm[row] = fmaxf(sqrtf(sq), kNormEps);
}

// Forward: one CTA per 64-row block of one half; thread t owns half (32 columns) of row t/2.
// Dynamic shared memory: the tiles outgrow the 48 KiB of static shared memory for fp32.
template <typename scalar_t>
struct SmemLayout {
  using storage = typename MmaTraits<scalar_t>::storage;
  static constexpr int kStage = kTile * (kKc + kPad);  // one staged K chunk, elements
  static constexpr int kOp = kTile * (kTile + kPad);    // one 64 x 64 operand tile, elements
  // Region 0: the two staged K chunks of the score product, later the staged Z chunk of a
  // gradient product (kOp <= 2 * kStage). Then the fp32 scores, then two operand tiles.
  static constexpr size_t kRegion0 = sizeof(storage) * 2 * kStage;
  static constexpr size_t kScores = sizeof(float) * kTile * kScoreLd;
  static constexpr size_t kForward = kRegion0 + kScores;
  static constexpr size_t kBackward = kRegion0 + kScores + 2 * sizeof(storage) * kOp;
  static_assert(kOp <= 2 * kStage, "the Z staging must fit in region 0");
  static_assert(kRegion0 % 128 == 0 && kScores % 128 == 0, "keep WMMA pointers aligned");
};

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) nt_xent_fwd_kernel(
    const scalar_t* __restrict__ z1, const scalar_t* __restrict__ z2,
    const float* __restrict__ norm, const float* __restrict__ temperature,
    float* __restrict__ loss, float* __restrict__ lse, int32_t* __restrict__ rank,
    int64_t n, int64_t d) {
  using L = SmemLayout<scalar_t>;
  using storage = typename L::storage;
  extern __shared__ __align__(128) unsigned char smem[];
  storage* a_s = reinterpret_cast<storage*>(smem);
  storage* b_s = a_s + L::kStage;
  float* scores = reinterpret_cast<float*>(smem + L::kRegion0);
  __shared__ int64_t rows_i[kTile], cols_j[kTile];
  __shared__ float rn_j[kTile];

  const int64_t m = 2 * n;
  const int64_t blocks_per_half = (n + kTile - 1) / kTile;
  const int64_t half = blockIdx.x / blocks_per_half;
  const int64_t i0 = half * n + (blockIdx.x % blocks_per_half) * kTile;
  const int64_t row_end = (half + 1) * n;
  const int64_t p0 = (i0 + n) % m;
  const float scale = kLog2e / *temperature;

  if (threadIdx.x < kTile) {
    const int64_t r = i0 + threadIdx.x;
    rows_i[threadIdx.x] = r < row_end ? r : -1;
  }
  const int my_row = threadIdx.x / 2, my_half = threadIdx.x % 2;
  const int64_t gi = i0 + my_row;
  const bool row_ok = gi < row_end;
  const float scale_i = row_ok ? scale / norm[gi] : 0.f;

  float run_max = kNegInf, run_sum = 0.f, pos = 0.f;
  int32_t above = 0, above_cross = 0;  // over all other columns / the other view's alone
  const int64_t n_tiles = (m + kTile - 1) / kTile;
  for (int64_t t = 0; t < n_tiles; ++t) {
    if (threadIdx.x < kTile) {
      const int64_t lin = t * kTile + threadIdx.x;
      const int64_t j = (p0 + lin) % m;
      cols_j[threadIdx.x] = lin < m ? j : -1;
      rn_j[threadIdx.x] = lin < m ? 1.f / norm[j] : 0.f;
    }
    __syncthreads();
    score_tile<scalar_t>(scores, a_s, b_s, z1, z2, rows_i, cols_j, n, d);
    float x[32];
    float tile_max = kNegInf;
    for (int c = 0; c < 32; ++c) {
      const int col = my_half * 32 + c;
      const int64_t j = cols_j[col];
      const bool ok = row_ok && j >= 0 && j != gi;
      x[c] = ok ? scores[my_row * kScoreLd + col] * scale_i * rn_j[col] : kNegInf;
      tile_max = fmaxf(tile_max, x[c]);
    }
    if (t == 0) {  // the block's positives sit on its own local columns of the first tile
      float mine = 0.f;
      for (int c = 0; c < 32; ++c) mine += (my_half * 32 + c == my_row) ? x[c] : 0.f;
      pos = pair_sum(mine);
      // the logsumexp runs over the negatives alone: mask the positive
      tile_max = kNegInf;
      for (int c = 0; c < 32; ++c) {
        if (my_half * 32 + c == my_row) x[c] = kNegInf;
        tile_max = fmaxf(tile_max, x[c]);
      }
    }
    tile_max = pair_max(tile_max);
    const float m_new = fmaxf(run_max, tile_max);
    const float m_safe = m_new == kNegInf ? 0.f : m_new;
    float s = 0.f;
    int32_t cnt = 0, cnt_cross = 0;
    for (int c = 0; c < 32; ++c) {
      s += exp2f(x[c] - m_safe);
      const int32_t hit = x[c] > pos ? 1 : 0;
      cnt += hit;
      cnt_cross += ((cols_j[my_half * 32 + c] >= n) == (half == 0)) ? hit : 0;
    }
    run_sum = run_sum * exp2f(run_max - m_safe) + pair_sum(s);
    run_max = m_new;
    above += cnt + __shfl_xor_sync(0xffffffffu, cnt, 1);
    above_cross += cnt_cross + __shfl_xor_sync(0xffffffffu, cnt_cross, 1);
    __syncthreads();  // scores and the column lists are rewritten next tile
  }
  if (row_ok && my_half == 0) {
    // loss = log(1 + 2^(lse2_neg - pos)), lse = pos + loss: no cancellation of lse - pos when
    // the positive dominates (low loss); exactly 0 without negatives (N = 1).
    const float x2 = (run_max == kNegInf ? kNegInf : run_max + log2f(run_sum)) - pos;
    const float l = fmaxf(x2, 0.f) * kLn2 + log1pf(exp2f(-fabsf(x2)));
    lse[gi] = pos * kLn2 + l;
    loss[gi] = l;
    if (rank != nullptr) {
      rank[gi] = above;
      rank[m + gi] = above_cross;
    }
  }
}

// 2^-ceil(log2(max |x|)) over a block's values (1 for all zeros): brings A tiles (~w P,
// often ~1e-6) near 1 before the cast to fp16/bf16, which would flush them to subnormals.
__device__ float block_pow2_scale(float local_absmax, float* red) {
  for (int o = 16; o > 0; o /= 2) local_absmax = fmaxf(local_absmax, __shfl_xor_sync(0xffffffffu, local_absmax, o));
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = local_absmax;
  __syncthreads();
  float amax = 0.f;
  for (int w = 0; w < kWarps; ++w) amax = fmaxf(amax, red[w]);
  __syncthreads();
  return amax > 0.f ? exp2f(-ceilf(log2f(amax))) : 1.f;
}

// G[rows_out] += op(A) (64 x 64, smem) @ Z[rows_in] (64 x D), chunked over D by 64; op is A
// (row-major) or A^T (ALayout = col_major). The fp32 product is divided by `scale` and
// added to G with atomics.
template <typename scalar_t, typename ALayout>
__device__ void grad_product(float* __restrict__ g, const typename MmaTraits<scalar_t>::storage* a_op,
                             typename MmaTraits<scalar_t>::storage* zb, float* out_s,
                             const scalar_t* z1, const scalar_t* z2, const int64_t* rows_in,
                             const int64_t* rows_out, float scale, int64_t n, int64_t d) {
  using T = MmaTraits<scalar_t>;
  constexpr int ld = kTile + kPad;
  const int warp = threadIdx.x / 32;
  for (int64_t d0 = 0; d0 < d; d0 += kTile) {
    for (int e = threadIdx.x; e < kTile * kTile; e += kThreads) {
      const int r = e / kTile, c = e % kTile;
      const int64_t k = d0 + c;
      float v = 0.f;
      if (rows_in[r] >= 0 && k < d) v = to_float(row_ptr(z1, z2, rows_in[r], n, d)[k]);
      zb[r * ld + c] = T::from_float(v);
    }
    __syncthreads();
    for (int f = 0; f < kTile / 16; ++f) {
      wmma::fragment<wmma::accumulator, 16, 16, T::kK, float> acc;
      wmma::fill_fragment(acc, 0.f);
      // A rows of this warp: row-major at a_op[warp*16*ld], k stride 1; A^T (col-major):
      // element (r, k) at a_op[k * ld + r], so the warp's rows start at a_op + warp*16 and k
      // advances by ld.
      const bool transposed = std::is_same_v<ALayout, wmma::col_major>;
      const auto* a_base = transposed ? a_op + warp * 16 : a_op + warp * 16 * ld;
      mma_accumulate<scalar_t, wmma::row_major, ALayout>(acc, a_base, ld, zb + f * 16, ld, kTile,
                                                          transposed ? ld : 1, ld);
      wmma::store_matrix_sync(out_s + warp * 16 * kScoreLd + f * 16, acc, kScoreLd,
                              wmma::mem_row_major);
    }
    __syncwarp();
    for (int e = threadIdx.x % 32; e < 16 * kTile; e += 32) {
      const int r = warp * 16 + e / kTile, c = e % kTile;
      const int64_t k = d0 + c;
      if (rows_out[r] >= 0 && k < d) {
        atomicAdd(g + rows_out[r] * d + k, out_s[r * kScoreLd + c] / scale);
      }
    }
    __syncthreads();
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) nt_xent_bwd_kernel(
    const scalar_t* __restrict__ z1, const scalar_t* __restrict__ z2,
    const float* __restrict__ norm, const float* __restrict__ temperature,
    const float* __restrict__ lse, const float* __restrict__ w, float* __restrict__ g,
    float* __restrict__ q, float* __restrict__ tpart, int64_t n, int64_t d) {
  using T = MmaTraits<scalar_t>;
  using L = SmemLayout<scalar_t>;
  using storage = typename L::storage;
  constexpr int ld = kTile + kPad;
  const int64_t bi = blockIdx.x, bj = blockIdx.y;
  if (bi > bj) return;
  extern __shared__ __align__(128) unsigned char smem[];
  storage* a_s = reinterpret_cast<storage*>(smem);
  storage* b_s = a_s + L::kStage;
  storage* zb = a_s;  // region 0 again, once the score product is done
  float* scores = reinterpret_cast<float*>(smem + L::kRegion0);
  storage* a_op_j = reinterpret_cast<storage*>(smem + L::kRegion0 + L::kScores);
  storage* a_op_i = a_op_j + L::kOp;
  __shared__ int64_t rows_i[kTile], rows_j[kTile];
  __shared__ float red[kWarps], q_col[kTile];

  const int64_t m = 2 * n;
  if (threadIdx.x < kTile) {
    const int64_t ri = bi * kTile + threadIdx.x, rj = bj * kTile + threadIdx.x;
    rows_i[threadIdx.x] = ri < m ? ri : -1;
    rows_j[threadIdx.x] = rj < m ? rj : -1;
    q_col[threadIdx.x] = 0.f;
  }
  __syncthreads();
  score_tile<scalar_t>(scores, a_s, b_s, z1, z2, rows_i, rows_j, n, d);

  // A_ij = w_i P_ij + w_j P_ji over the negatives; thread t: row t/2, columns (t%2)*32 .. +32,
  // visited in an order rotated by the row, so that the threads of a warp add to different
  // q_col entries at each step. Self entries, positive pairs and padding are 0 and never go
  // through exp (s_ii = 1/tau would overflow it).
  const float inv_tau = 1.f / *temperature;
  const int r = threadIdx.x / 2, c0 = (threadIdx.x % 2) * 32;
  const int64_t gi = rows_i[r];
  const int64_t pi = gi >= 0 ? (gi + n) % m : -1;
  const float rn_i = gi >= 0 ? 1.f / norm[gi] : 0.f;
  const float lse_i = gi >= 0 ? lse[gi] * kLog2e : 0.f, w_i = gi >= 0 ? w[gi] : 0.f;
  float tsum = 0.f, qsum = 0.f, absmax_j = 0.f, absmax_i = 0.f;
  for (int k = 0; k < 32; ++k) {
    const int c = c0 + (k + r) % 32;
    const int64_t gj = rows_j[c];
    float a = 0.f, rn = 0.f;
    if (gi >= 0 && gj >= 0 && gi != gj && gj != pi) {
      rn = 1.f / norm[gj];
      const float s = scores[r * kScoreLd + c] * rn_i * inv_tau * rn;
      const float s2 = s * kLog2e;
      const float p_ij = exp2f(s2 - lse_i), p_ji = exp2f(s2 - lse[gj] * kLog2e);
      a = w_i * p_ij + w[gj] * p_ji;
      tsum += a * s;
      qsum += p_ij;
      if (bi != bj) atomicAdd(&q_col[c], p_ji);  // on the diagonal the row sums cover it
    }
    scores[r * kScoreLd + c] = a * rn;  // A rn_j: the operand of G_I += (A rn_j) Z_J
    absmax_j = fmaxf(absmax_j, fabsf(a * rn));
    absmax_i = fmaxf(absmax_i, fabsf(a * rn_i));
  }
  qsum = pair_sum(qsum);
  if (gi >= 0 && threadIdx.x % 2 == 0) atomicAdd(q + gi, qsum);
  for (int o = 16; o > 0; o /= 2) tsum += __shfl_xor_sync(0xffffffffu, tsum, o);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = tsum;
  __syncthreads();
  if (bi != bj && threadIdx.x < kTile && rows_j[threadIdx.x] >= 0) {
    atomicAdd(q + rows_j[threadIdx.x], q_col[threadIdx.x]);
  }
  if (threadIdx.x == 0) {
    float total = 0.f;
    for (int k = 0; k < kWarps; ++k) total += red[k];
    tpart[bi * gridDim.y + bj] = bi == bj ? 0.5f * total : total;
  }
  __syncthreads();
  const float c_j = block_pow2_scale(absmax_j, red);
  const float c_i = block_pow2_scale(absmax_i, red);
  for (int c = c0; c < c0 + 32; ++c) {
    const int64_t gj = rows_j[c];
    const float a_rn = scores[r * kScoreLd + c];
    a_op_j[r * ld + c] = T::from_float(a_rn * c_j);
    // A rn_i = (A rn_j) * norm_j * rn_i
    a_op_i[r * ld + c] = T::from_float(gj >= 0 ? a_rn * norm[gj] * rn_i * c_i : 0.f);
  }
  __syncthreads();
  // G_I += (A rn_j) Z_J; then (off the diagonal, whose A holds (i, j) and (j, i) already)
  // G_J += (A rn_i)^T Z_I. The scores' smem is free now: it stages the products' output.
  grad_product<scalar_t, wmma::row_major>(g, a_op_j, zb, scores, z1, z2, rows_j, rows_i, c_j, n, d);
  if (bi != bj) {
    grad_product<scalar_t, wmma::col_major>(g, a_op_i, zb, scores, z1, z2, rows_i, rows_j, c_i, n, d);
  }
}

// One warp per row: grad_u = (G - (w_i Q_i + w_p Q_p) u_p) / tau; grad_z = (grad_u - (u .
// grad_u) u) / norm (grad_u / eps where the norm was clamped); ppart[row] = w_i Q_i s_{i,p(i)}.
template <typename scalar_t>
__global__ void __launch_bounds__(256) nt_xent_finish_kernel(
    const scalar_t* __restrict__ z1, const scalar_t* __restrict__ z2,
    const float* __restrict__ norm, const float* __restrict__ temperature,
    const float* __restrict__ w, const float* __restrict__ g, const float* __restrict__ q,
    scalar_t* __restrict__ gz1,
    scalar_t* __restrict__ gz2, float* __restrict__ ppart, int64_t n, int64_t d) {
  const int64_t m = 2 * n;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * 8 + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= m) return;
  const int64_t prow = (row + n) % m;
  const float inv_tau = 1.f / *temperature;
  const float ni = norm[row], rn_i = 1.f / ni, rn_p = 1.f / norm[prow];
  const float wq = w[row] * q[row], wpos = wq + w[prow] * q[prow];
  const scalar_t* zi = row_ptr(z1, z2, row, n, d);
  const scalar_t* zp = row_ptr(z1, z2, prow, n, d);
  const float* gi = g + row * d;
  float dot_gu = 0.f, dot_up = 0.f;
  for (int64_t k = lane; k < d; k += 32) {
    const float u = to_float(zi[k]) * rn_i, up = to_float(zp[k]) * rn_p;
    const float gu = inv_tau * (gi[k] - wpos * up);
    dot_gu += u * gu;
    dot_up += u * up;
  }
  for (int o = 16; o > 0; o /= 2) {
    dot_gu += __shfl_xor_sync(0xffffffffu, dot_gu, o);
    dot_up += __shfl_xor_sync(0xffffffffu, dot_up, o);
  }
  const float radial = ni <= kNormEps ? 0.f : dot_gu;
  scalar_t* dst = row < n ? gz1 + row * d : gz2 + (row - n) * d;
  for (int64_t k = lane; k < d; k += 32) {
    const float u = to_float(zi[k]) * rn_i, up = to_float(zp[k]) * rn_p;
    const float gu = inv_tau * (gi[k] - wpos * up);
    dst[k] = static_cast<scalar_t>((gu - radial * u) * rn_i);
  }
  if (lane == 0) ppart[row] = wq * dot_up * inv_tau;
}

void check_cuda_inputs(const at::Tensor& z1, const at::Tensor& z2, const at::Tensor& temperature) {
  TORCH_CHECK(z1.dim() == 2 && z1.sizes() == z2.sizes(),
              "fastclr: z1 and z2 must have the same (N, D) shape, got ", z1.sizes(), " and ",
              z2.sizes());
  TORCH_CHECK(z1.scalar_type() == z2.scalar_type(), "fastclr: z1 and z2 must share a dtype");
  TORCH_CHECK(z1.size(0) >= 1 && z1.size(1) >= 1, "fastclr: need N >= 1 and D >= 1");
  TORCH_CHECK(z1.scalar_type() == at::kFloat || z1.scalar_type() == at::kHalf ||
                  z1.scalar_type() == at::kBFloat16,
              "fastclr: the CUDA kernel takes float32, bfloat16 or float16, got ",
              z1.scalar_type());
  TORCH_CHECK(z2.device() == z1.device() && temperature.device() == z1.device(),
              "fastclr: z1, z2 and temperature must be on the same device");
  TORCH_CHECK(temperature.numel() == 1, "fastclr: temperature must be a 0-dim tensor");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nt_xent_forward_cuda(
    const at::Tensor& z1_in, const at::Tensor& z2_in, const at::Tensor& temperature_in,
    bool compute_accuracy) {
  check_cuda_inputs(z1_in, z2_in, temperature_in);
  const c10::cuda::CUDAGuard guard(z1_in.device());
  const at::Tensor z1 = z1_in.contiguous(), z2 = z2_in.contiguous();
  const at::Tensor temperature = temperature_in.to(at::kFloat).contiguous();
  const int64_t n = z1.size(0), d = z1.size(1), m = 2 * n;
  const auto fopts = z1.options().dtype(at::kFloat);
  at::Tensor norm = at::empty({m}, fopts), lse = at::empty({m}, fopts), loss = at::empty({m}, fopts);
  // rank: (2, M), #columns above the positive among all others / the other view's alone
  at::Tensor rank = compute_accuracy ? at::empty({2, m}, z1.options().dtype(at::kInt))
                                     : at::empty({0}, z1.options().dtype(at::kInt));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  FASTCLR_DISPATCH_FLOAT_HALF_TYPES(z1.scalar_type(), "nt_xent_forward_cuda", [&] {
    nt_xent_norm_kernel<scalar_t><<<(m + 7) / 8, 256, 0, stream>>>(
        z1.const_data_ptr<scalar_t>(), z2.const_data_ptr<scalar_t>(), norm.data_ptr<float>(), n, d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const int64_t blocks = 2 * ((n + kTile - 1) / kTile);
    constexpr size_t smem = SmemLayout<scalar_t>::kForward;
    allow_dynamic_smem(nt_xent_fwd_kernel<scalar_t>, smem);
    nt_xent_fwd_kernel<scalar_t><<<blocks, kThreads, smem, stream>>>(
        z1.const_data_ptr<scalar_t>(), z2.const_data_ptr<scalar_t>(), norm.const_data_ptr<float>(),
        temperature.const_data_ptr<float>(), loss.data_ptr<float>(), lse.data_ptr<float>(),
        compute_accuracy ? rank.data_ptr<int32_t>() : nullptr, n, d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, lse, norm, rank};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> nt_xent_backward_cuda(
    const at::Tensor& grad_rows, const at::Tensor& z1_in, const at::Tensor& z2_in,
    const at::Tensor& temperature_in, const at::Tensor& norm_in, const at::Tensor& lse_in) {
  check_cuda_inputs(z1_in, z2_in, temperature_in);
  const c10::cuda::CUDAGuard guard(z1_in.device());
  const at::Tensor z1 = z1_in.contiguous(), z2 = z2_in.contiguous();
  const at::Tensor temperature = temperature_in.to(at::kFloat).contiguous();
  const int64_t n = z1.size(0), d = z1.size(1), m = 2 * n;
  TORCH_CHECK(grad_rows.numel() == m && norm_in.numel() == m && lse_in.numel() == m,
              "fastclr: nt_xent_backward expects grad_rows, norm and lse of ", m, " elements");
  const at::Tensor w = grad_rows.to(at::kFloat).contiguous();
  const at::Tensor norm = norm_in.to(at::kFloat).contiguous();
  const at::Tensor lse = lse_in.to(at::kFloat).contiguous();
  const auto fopts = z1.options().dtype(at::kFloat);
  const int64_t nb = (m + kTile - 1) / kTile;
  at::Tensor g = at::zeros({m, d}, fopts);
  at::Tensor q = at::zeros({m}, fopts);
  at::Tensor tpart = at::zeros({nb * nb}, fopts);
  at::Tensor ppart = at::empty({m}, fopts);
  at::Tensor grad_z1 = at::empty_like(z1), grad_z2 = at::empty_like(z2);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  TORCH_CHECK(nb <= 65535, "fastclr: the CUDA backward handles M <= ", 65535 * kTile, " rows");
  FASTCLR_DISPATCH_FLOAT_HALF_TYPES(z1.scalar_type(), "nt_xent_backward_cuda", [&] {
    constexpr size_t smem = SmemLayout<scalar_t>::kBackward;
    allow_dynamic_smem(nt_xent_bwd_kernel<scalar_t>, smem);
    nt_xent_bwd_kernel<scalar_t><<<dim3(nb, nb), kThreads, smem, stream>>>(
        z1.const_data_ptr<scalar_t>(), z2.const_data_ptr<scalar_t>(), norm.const_data_ptr<float>(),
        temperature.const_data_ptr<float>(), lse.const_data_ptr<float>(), w.const_data_ptr<float>(),
        g.data_ptr<float>(), q.data_ptr<float>(), tpart.data_ptr<float>(), n, d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    nt_xent_finish_kernel<scalar_t><<<(m + 7) / 8, 256, 0, stream>>>(
        z1.const_data_ptr<scalar_t>(), z2.const_data_ptr<scalar_t>(), norm.const_data_ptr<float>(),
        temperature.const_data_ptr<float>(), w.const_data_ptr<float>(), g.const_data_ptr<float>(),
        q.const_data_ptr<float>(), grad_z1.data_ptr<scalar_t>(), grad_z2.data_ptr<scalar_t>(), ppart.data_ptr<float>(), n, d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // dL/dtau = -(1/tau) sum_i w_i (sum_{j != i, p(i)} P_ij s_ij - Q_i s_{i,p(i)}), on the
  // device: no sync.
  at::Tensor grad_t = -(tpart.sum() - ppart.sum()) / temperature.reshape({});
  return {grad_z1, grad_z2, grad_t};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastclr, CUDA, m) {
  m.impl("nt_xent_forward", &nt_xent_forward_cuda);
  m.impl("nt_xent_backward", &nt_xent_backward_cuda);
}

}  // namespace fastclr
