// CUDA kernels of fastclr::nt_xent_forward / nt_xent_backward (sm_80 and newer): NT-Xent and its
// label-defined family (SupCon, multi-view SimCLR), one body per stage for both.
//
// The same algorithm as the Triton kernels (fastclr/triton/nt_xent.py), written by hand. Rows
// z = [z1; z2] (M); positives: paired mode (labels null, M = 2N), p(i) = (i + N) mod M; labels
// mode, every j != i of equal label (kLabels template parameter).
//   norm:     norm_i = max(||z_i||, 1e-12), fp32.                                 O(M)
//   forward:  per 64-row block (paired: never straddling row N), column tiles of 64 (paired:
//             in the rotated order that starts at the block's positives); S tile = Z_I Z_J^T
//             on tensor cores (WMMA) from the raw input-dtype rows, 1/||z|| and 1/tau applied
//             to the fp32 tile; online base-2 logsumexps of the negatives and of the positives,
//             the positives' sum and count; loss = log(1 + exp(lse_neg - lse_pos)) [+ lse_pos -
//             mean_pos] (no cancellation at low loss); ranks (#negatives above the best
//             positive) in the same sweep (paired) or a second one (labels).
//   backward: one CTA per tile pair I <= J (symmetry: one tile gives both rows' and columns'
//             coefficients): A = w_i c_ij + w_j c_ji, c = P = exp(s - lse) for a negative and
//             -Q R [+ R - 1/|P|] for a positive (R = exp(s - lse_pos); Q, the negatives' mass,
//             saved by the forward), then G_I += (A rn_J) Z_J and G_J += (A rn_I)^T Z_I on
//             tensor cores, accumulated with fp32 atomics; the tile's sum A s for dL/dtau.
//   finish:   grad_u = G / tau, normalisation Jacobian, input dtype out.
// Memory: O(M D) (the fp32 accumulator G). Nothing M x M. Every launch is on the current
// stream and checked. fp32 inputs use 3xTF32 products (~fp32 accuracy on tensor cores).
//
// One kernel body per stage, templated over the input type through MmaTraits.
#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <utility>
#include <type_traits>

#include "../csrc/nt_xent_common.h"
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

// The row kernels (norm, finish): one warp per row, 8 rows per block.
constexpr int kRowsPerBlock = 8;
constexpr int kRowThreads = kRowsPerBlock * 32;
inline unsigned row_blocks(int64_t m) {
  return static_cast<unsigned>((m + kRowsPerBlock - 1) / kRowsPerBlock);
}

template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads) nt_xent_norm_kernel(
    const scalar_t* __restrict__ z1, const scalar_t* __restrict__ z2, float* __restrict__ norm,
    int64_t n, int64_t m, int64_t d) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= m) return;
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


// A row's loss and statistics from its final state (base-2 logsumexps): x = lse_neg - lse_pos,
// loss = log(1 + 2^x) [+ lse_pos - mean_pos], lse = lse_pos + log(1 + 2^x), Q = sigmoid(x).
// A row without a positive: loss 0, Q 1; without negatives x = -inf: loss 0 (sum form), Q 0.
__device__ __forceinline__ void store_row(float* loss, float* stats, int64_t m, int64_t i,
                                          float m_n, float l_n, float m_p, float l_p,
                                          float sum_p, float cnt, bool mean) {
  const float lse2_n = m_n == kNegInf ? kNegInf : m_n + log2f(l_n);
  const bool has = cnt > 0.f;
  const float lse2_p = has ? m_p + log2f(l_p) : 0.f;
  const float x2 = lse2_n - lse2_p;
  const float e = exp2f(-fabsf(x2));
  const float softplus = fmaxf(x2, 0.f) * kLn2 + log1pf(e);
  const float l = softplus + (mean ? (lse2_p - sum_p / fmaxf(cnt, 1.f)) * kLn2 : 0.f);
  loss[i] = has ? l : 0.f;
  stats[kLse * m + i] = has ? lse2_p * kLn2 + softplus : lse2_n * kLn2;
  stats[kLsePos * m + i] = has ? lse2_p * kLn2 : kNegInf;
  stats[kQ * m + i] = has ? (x2 >= 0.f ? 1.f / (1.f + e) : e / (1.f + e)) : 1.f;
  stats[kCount * m + i] = cnt;
}

// Folds a tile's (max, sum of 2^(x - max) over the pair of threads) into a running logsumexp.
__device__ __forceinline__ void fold(float* run_max, float* run_sum, float m_new, float m_safe,
                                     float sum) {
  *run_sum = *run_sum * exp2f(*run_max - m_safe) + sum;
  *run_max = m_new;
}

template <typename scalar_t, bool kLabels>
__global__ void __launch_bounds__(kThreads) nt_xent_fwd_kernel(
    const scalar_t* __restrict__ z1, const scalar_t* __restrict__ z2,
    const int64_t* __restrict__ labels, const float* __restrict__ norm,
    const float* __restrict__ temperature, float* __restrict__ loss, float* __restrict__ stats,
    int32_t* __restrict__ rank, int64_t n, int64_t m, int64_t d, bool mean, int64_t lo,
    int64_t count) {
  using L = SmemLayout<scalar_t>;
  using storage = typename L::storage;
  FASTCLR_DYNAMIC_SMEM(smem);
  storage* a_s = reinterpret_cast<storage*>(smem);
  storage* b_s = a_s + L::kStage;
  float* scores = reinterpret_cast<float*>(smem + L::kRegion0);
  __shared__ int64_t rows_i[kTile], cols_j[kTile], lab_j[kTile];
  __shared__ float rn_j[kTile];

  // row blocks over the local rows (i mod span in [lo, lo + count)): labels mode one range of
  // the M rows; paired mode one per view (never straddling row N)
  const int64_t span = kLabels ? m : n;
  const int64_t blocks_per_span = (count + kTile - 1) / kTile;
  const int64_t part = blockIdx.x / blocks_per_span;
  const int64_t first = part * span + lo;
  const int64_t i0 = first + (blockIdx.x % blocks_per_span) * kTile;
  const int64_t row_end = first + count;
  const int64_t p0 = kLabels ? 0 : (i0 + n) % m;
  const float scale = kLog2e / *temperature;

  if (threadIdx.x < kTile) {
    const int64_t r = i0 + threadIdx.x;
    rows_i[threadIdx.x] = r < row_end ? r : -1;
  }
  const int my_row = threadIdx.x / 2, my_half = threadIdx.x % 2;
  const int64_t gi = i0 + my_row;
  const bool row_ok = gi < row_end;
  const float scale_i = row_ok ? scale / norm[gi] : 0.f;
  const int64_t lab_i = (kLabels && row_ok) ? labels[gi] : 0;

  float m_n = kNegInf, l_n = 0.f, m_p = kNegInf, l_p = 0.f, sum_p = 0.f, cnt = 0.f;
  int32_t above = 0, above_cross = 0;  // over all other columns / the other view's alone
  const int64_t n_tiles = (m + kTile - 1) / kTile;
  // labels mode: the best positive, the ranks' threshold, is known after a first sweep only
  const int sweeps = (kLabels && rank != nullptr) ? 2 : 1;
  for (int sweep = 0; sweep < sweeps; ++sweep) {
    for (int64_t t = 0; t < n_tiles; ++t) {
      if (threadIdx.x < kTile) {
        const int64_t lin = t * kTile + threadIdx.x;
        const int64_t j = (p0 + lin) % m;
        cols_j[threadIdx.x] = lin < m ? j : -1;
        rn_j[threadIdx.x] = lin < m ? 1.f / norm[j] : 0.f;
        if (kLabels) lab_j[threadIdx.x] = lin < m ? labels[j] : 0;
      }
      __syncthreads();
      score_tile<scalar_t>(scores, a_s, b_s, z1, z2, rows_i, cols_j, n, d);
      float x[32];
      uint32_t pos_bits = 0;  // labels mode: the positives among my 32 columns
      float max_n = kNegInf, max_p = kNegInf;
      for (int c = 0; c < 32; ++c) {
        const int col = my_half * 32 + c;
        const int64_t j = cols_j[col];
        const bool ok = row_ok && j >= 0 && j != gi;
        x[c] = ok ? scores[my_row * kScoreLd + col] * scale_i * rn_j[col] : kNegInf;
        const bool pos = kLabels && ok && lab_j[col] == lab_i;
        pos_bits |= pos ? (1u << c) : 0u;
        max_p = pos ? fmaxf(max_p, x[c]) : max_p;
        max_n = pos ? max_n : fmaxf(max_n, x[c]);
      }
      if (!kLabels && t == 0) {  // the block's positives sit on its own local columns of tile 0
        float mine = 0.f;
        for (int c = 0; c < 32; ++c) mine += (my_half * 32 + c == my_row) ? x[c] : 0.f;
        m_p = sum_p = pair_sum(mine);
        l_p = cnt = 1.f;
        // the negatives' logsumexp leaves the positive out
        max_n = kNegInf;
        for (int c = 0; c < 32; ++c) {
          if (my_half * 32 + c == my_row) x[c] = kNegInf;
          max_n = fmaxf(max_n, x[c]);
        }
      }
      if (sweep == 0) {
        const float mn_new = fmaxf(m_n, pair_max(max_n));
        const float mn_safe = mn_new == kNegInf ? 0.f : mn_new;
        float s_n = 0.f;
        if constexpr (kLabels) {
          const float mp_new = fmaxf(m_p, pair_max(max_p));
          const float mp_safe = mp_new == kNegInf ? 0.f : mp_new;
          float s_p = 0.f, sp = 0.f, cp = 0.f;
          for (int c = 0; c < 32; ++c) {
            const bool pos = (pos_bits >> c) & 1u;
            const float e = exp2f(x[c] - (pos ? mp_safe : mn_safe));
            s_n += pos ? 0.f : e;
            s_p += pos ? e : 0.f;
            sp += pos ? x[c] : 0.f;
            cp += pos ? 1.f : 0.f;
          }
          fold(&m_p, &l_p, mp_new, mp_safe, pair_sum(s_p));
          sum_p += pair_sum(sp);
          cnt += pair_sum(cp);
        } else {
          for (int c = 0; c < 32; ++c) s_n += exp2f(x[c] - mn_safe);
        }
        fold(&m_n, &l_n, mn_new, mn_safe, pair_sum(s_n));
      }
      if (rank != nullptr && (!kLabels || sweep == 1)) {
        int32_t hits = 0, hits_cross = 0;
        for (int c = 0; c < 32; ++c) {
          const int32_t hit = (!((pos_bits >> c) & 1u) && x[c] > m_p) ? 1 : 0;
          hits += hit;
          hits_cross += (kLabels || (cols_j[my_half * 32 + c] >= n) == (part == 0)) ? hit : 0;
        }
        above += hits + __shfl_xor_sync(0xffffffffu, hits, 1);
        above_cross += hits_cross + __shfl_xor_sync(0xffffffffu, hits_cross, 1);
      }
      __syncthreads();  // scores and the column lists are rewritten next tile
    }
  }
  if (row_ok && my_half == 0) {
    store_row(loss, stats, m, gi, m_n, l_n, m_p, l_p, sum_p, cnt, mean);
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

// dloss_i/ds_ij (base-2 logit s2, base-2 lse / lse_pos): P = 2^(s2 - lse2) for a negative; for
// a positive -Q R [+ R - 1/|P| for "mean"], R = 2^(s2 - lse_pos2) (1 in paired mode: |P| = 1).
template <bool kLabels>
__device__ __forceinline__ float coef(float s2, bool pos, float lse2, float lpos2, float q,
                                      float inv_cnt, bool mean) {
  if (!pos) return exp2f(s2 - lse2);
  const float r = kLabels ? exp2f(s2 - lpos2) : 1.f;
  return (mean ? r - inv_cnt : 0.f) - q * r;
}

template <typename scalar_t, bool kLabels>
__global__ void __launch_bounds__(kThreads) nt_xent_bwd_kernel(
    const scalar_t* __restrict__ z1, const scalar_t* __restrict__ z2,
    const int64_t* __restrict__ labels, const float* __restrict__ norm,
    const float* __restrict__ temperature, const float* __restrict__ stats,
    const float* __restrict__ w, float* __restrict__ g, float* __restrict__ tpart, int64_t n,
    int64_t m, int64_t d, bool mean, int64_t lo, int64_t count) {
  using T = MmaTraits<scalar_t>;
  using L = SmemLayout<scalar_t>;
  using storage = typename L::storage;
  constexpr int ld = kTile + kPad;
  const int64_t bi = blockIdx.x, bj = blockIdx.y;
  if (bi > bj) return;
  // a tile that meets no local row has A = 0 (both rows' weights are 0): nothing to do
  auto meets = [&](int64_t b) {
    auto hits = [&](int64_t r0) { return b * kTile < r0 + count && r0 < (b + 1) * kTile; };
    return count > 0 && (hits(lo) || (!kLabels && hits(n + lo)));
  };
  if (!meets(bi) && !meets(bj)) return;
  FASTCLR_DYNAMIC_SMEM(smem);
  storage* a_s = reinterpret_cast<storage*>(smem);
  storage* b_s = a_s + L::kStage;
  storage* zb = a_s;  // region 0 again, once the score product is done
  float* scores = reinterpret_cast<float*>(smem + L::kRegion0);
  storage* a_op_j = reinterpret_cast<storage*>(smem + L::kRegion0 + L::kScores);
  storage* a_op_i = a_op_j + L::kOp;
  __shared__ int64_t rows_i[kTile], rows_j[kTile];
  // the columns' backward constants: base-2 lse and lse_pos, Q, 1/|P|, weight (0 without a positive)
  __shared__ float lse_j[kTile], lpos_j[kTile], q_j[kTile], inv_j[kTile], w_j[kTile];
  __shared__ int64_t lab_j[kTile];
  __shared__ float red[kWarps];

  const float* lse = stats + kLse * m;
  const float* lpos = stats + kLsePos * m;
  const float* qs = stats + kQ * m;
  const float* cnt = stats + kCount * m;
  if (threadIdx.x < kTile) {
    const int64_t ri = bi * kTile + threadIdx.x, rj = bj * kTile + threadIdx.x;
    rows_i[threadIdx.x] = ri < m ? ri : -1;
    rows_j[threadIdx.x] = rj < m ? rj : -1;
    const bool ok = rj < m;
    lse_j[threadIdx.x] = ok ? lse[rj] * kLog2e : 0.f;
    lpos_j[threadIdx.x] = ok ? lpos[rj] * kLog2e : 0.f;
    q_j[threadIdx.x] = ok ? qs[rj] : 0.f;
    inv_j[threadIdx.x] = ok ? 1.f / fmaxf(cnt[rj], 1.f) : 0.f;
    w_j[threadIdx.x] = (ok && cnt[rj] > 0.f) ? w[rj] : 0.f;
    lab_j[threadIdx.x] = (kLabels && ok) ? labels[rj] : 0;
  }
  __syncthreads();
  score_tile<scalar_t>(scores, a_s, b_s, z1, z2, rows_i, rows_j, n, d);

  // A_ij = w_i c_ij + w_j c_ji; thread t: row t/2, columns (t%2)*32 .. +32. Self entries and
  // padding are 0 and never go through exp (s_ii = 1/tau would overflow it).
  const float inv_tau = 1.f / *temperature;
  const int r = threadIdx.x / 2, c0 = (threadIdx.x % 2) * 32;
  const int64_t gi = rows_i[r];
  const bool row_ok = gi >= 0;
  const int64_t pi = row_ok ? (gi + n) % m : -1;
  const float rn_i = row_ok ? 1.f / norm[gi] : 0.f;
  const float lse_i = row_ok ? lse[gi] * kLog2e : 0.f, lpos_i = row_ok ? lpos[gi] * kLog2e : 0.f;
  const float q_i = row_ok ? qs[gi] : 0.f, inv_i = row_ok ? 1.f / fmaxf(cnt[gi], 1.f) : 0.f;
  const float w_i = (row_ok && cnt[gi] > 0.f) ? w[gi] : 0.f;
  const int64_t lab_i = (kLabels && row_ok) ? labels[gi] : 0;
  float tsum = 0.f, absmax_j = 0.f, absmax_i = 0.f;
  // float16 holds no nonzero row of norm <= eps (its smallest subnormal is 6e-8): a row whose
  // norm was clamped is zero, and its products are 0 whatever its coefficient. Its coefficient,
  // a / eps, must not set the tile's power-of-two scale: that made the scale ~2^-37 and flushed
  // every other float16 coefficient to 0 (all gradients 0). bfloat16 has float32's range.
  constexpr bool kClampedIsZero = std::is_same_v<scalar_t, at::Half>;
  const bool dead_i = kClampedIsZero && row_ok && norm[gi] <= kNormEps;
  for (int c = c0; c < c0 + 32; ++c) {
    const int64_t gj = rows_j[c];
    float a = 0.f, rn = 0.f;
    if (row_ok && gj >= 0 && gi != gj) {
      rn = 1.f / norm[gj];
      const float s = scores[r * kScoreLd + c] * rn_i * inv_tau * rn;
      const float s2 = s * kLog2e;
      const bool pos = kLabels ? lab_j[c] == lab_i : gj == pi;
      // a row of weight 0 (no positive, or not a local row: its lse_pos may be -inf) adds
      // nothing, and its coefficient is not even computed
      a = (w_i != 0.f ? w_i * coef<kLabels>(s2, pos, lse_i, lpos_i, q_i, inv_i, mean) : 0.f) +
          (w_j[c] != 0.f ? w_j[c] * coef<kLabels>(s2, pos, lse_j[c], lpos_j[c], q_j[c], inv_j[c], mean)
                         : 0.f);
      tsum += a * s;
    }
    scores[r * kScoreLd + c] = a * rn;  // A rn_j: the operand of G_I += (A rn_j) Z_J
    const bool dead_j = kClampedIsZero && gj >= 0 && norm[gj] <= kNormEps;
    if (!dead_j) absmax_j = fmaxf(absmax_j, fabsf(a * rn));
    if (!dead_i) absmax_i = fmaxf(absmax_i, fabsf(a * rn_i));
  }
  for (int o = 16; o > 0; o /= 2) tsum += __shfl_xor_sync(0xffffffffu, tsum, o);
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = tsum;
  __syncthreads();
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
    const bool dead_j = kClampedIsZero && gj >= 0 && norm[gj] <= kNormEps;
    a_op_j[r * ld + c] = T::from_float(dead_j ? 0.f : a_rn * c_j);
    // A rn_i = (A rn_j) * norm_j * rn_i
    a_op_i[r * ld + c] = T::from_float(gj >= 0 && !dead_i ? a_rn * norm[gj] * rn_i * c_i : 0.f);
  }
  __syncthreads();
  // G_I += (A rn_j) Z_J; then (off the diagonal, whose A holds (i, j) and (j, i) already)
  // G_J += (A rn_i)^T Z_I. The scores' smem is free now: it stages the products' output.
  grad_product<scalar_t, wmma::row_major>(g, a_op_j, zb, scores, z1, z2, rows_j, rows_i, c_j, n, d);
  if (bi != bj) {
    grad_product<scalar_t, wmma::col_major>(g, a_op_i, zb, scores, z1, z2, rows_i, rows_j, c_i, n, d);
  }
}

// One warp per row: grad_u = G / tau; grad_z = (grad_u - (u . grad_u) u) / norm (grad_u / eps
// where the norm was clamped).
template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads) nt_xent_finish_kernel(
    const scalar_t* __restrict__ z1, const scalar_t* __restrict__ z2,
    const float* __restrict__ norm, const float* __restrict__ temperature,
    const float* __restrict__ g, scalar_t* __restrict__ gz1, scalar_t* __restrict__ gz2,
    int64_t n, int64_t m, int64_t d) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= m) return;
  const float inv_tau = 1.f / *temperature;
  const float ni = norm[row], rn_i = 1.f / ni;
  const scalar_t* zi = row_ptr(z1, z2, row, n, d);
  const float* gi = g + row * d;
  float dot_gu = 0.f;
  for (int64_t k = lane; k < d; k += 32) dot_gu += to_float(zi[k]) * rn_i * (inv_tau * gi[k]);
  for (int o = 16; o > 0; o /= 2) dot_gu += __shfl_xor_sync(0xffffffffu, dot_gu, o);
  const float radial = ni <= kNormEps ? 0.f : dot_gu;
  scalar_t* dst = row < n ? gz1 + row * d : gz2 + (row - n) * d;
  for (int64_t k = lane; k < d; k += 32) {
    const float u = to_float(zi[k]) * rn_i, gu = inv_tau * gi[k];
    dst[k] = static_cast<scalar_t>((gu - radial * u) * rn_i);
  }
}

// The CUDA kernels' own dtype rule (the rest of the invariants: nt_xent_common.h).
void check_cuda_dtype(const at::Tensor& z1) {
  TORCH_CHECK(z1.scalar_type() == at::kFloat || z1.scalar_type() == at::kHalf ||
                  z1.scalar_type() == at::kBFloat16,
              "fastclr: the CUDA kernel takes float32, bfloat16 or float16, got ",
              z1.scalar_type());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nt_xent_forward_cuda(
    const at::Tensor& z1_in, const std::optional<at::Tensor>& z2_in,
    const at::Tensor& temperature_in, const std::optional<at::Tensor>& labels_in,
    bool mean_positives, bool compute_accuracy, int64_t row_lo, int64_t row_count) {
  const at::Tensor z2_view = second_view(z1_in, z2_in);
  const int64_t m = check_nt_xent_inputs(z1_in, z2_view, labels_in, temperature_in);
  check_cuda_dtype(z1_in);
  const DeviceGuard guard(z1_in.device());
  const at::Tensor z1 = z1_in.contiguous(), z2 = z2_view.contiguous();
  const at::Tensor temperature = temperature_in.to(at::kFloat).contiguous();
  const bool with_labels = labels_in.has_value();
  const at::Tensor labels = with_labels ? labels_in->to(at::kLong).contiguous() : at::Tensor();
  const int64_t n = z1.size(0), d = z1.size(1);
  const auto fopts = z1.options().dtype(at::kFloat);
  at::Tensor norm = at::empty({m}, fopts), loss = at::empty({m}, fopts);
  at::Tensor stats = at::empty({4, m}, fopts);
  // rank: (2, M), #negatives above the best positive, among all / the other view's alone
  at::Tensor rank = compute_accuracy ? at::empty({2, m}, z1.options().dtype(at::kInt))
                                     : at::empty({0}, z1.options().dtype(at::kInt));
  const LocalRows own = local_rows(row_lo, row_count, m, n, !with_labels);
  const int64_t lo = own.lo, count = own.count;
  if (!own.all()) {  // the other rows: no loss, no positive (weighed 0 by the backward)
    loss.zero_();
    rank.zero_();
    // lse = lse_pos = +inf keep every coefficient the backward forms for them finite
    stats[kLse].fill_(std::numeric_limits<float>::infinity());
    stats[kLsePos].fill_(std::numeric_limits<float>::infinity());
    stats[kQ].fill_(1.0);
    stats[kCount].zero_();
  }
  const int64_t blocks = (with_labels ? 1 : 2) * ((count + kTile - 1) / kTile);
  FASTCLR_DISPATCH_FLOAT_HALF_TYPES(z1.scalar_type(), "nt_xent_forward_cuda", [&] {
    launch_kernel(nt_xent_norm_kernel<scalar_t>, dim3(row_blocks(m)), dim3(kRowThreads), 0,
                  z1.const_data_ptr<scalar_t>(), z2.const_data_ptr<scalar_t>(), norm.data_ptr<float>(),
                  n, m, d);
    auto launch = [&](auto kernel) {
      if (blocks == 0) return;
      launch_kernel(kernel, dim3(blocks), dim3(kThreads), SmemLayout<scalar_t>::kForward,
          z1.const_data_ptr<scalar_t>(), z2.const_data_ptr<scalar_t>(),
          with_labels ? labels.const_data_ptr<int64_t>() : nullptr, norm.const_data_ptr<float>(),
          temperature.const_data_ptr<float>(), loss.data_ptr<float>(), stats.data_ptr<float>(),
          compute_accuracy ? rank.data_ptr<int32_t>() : nullptr, n, m, d, mean_positives, lo,
          count);
    };
    if (with_labels) {
      launch(nt_xent_fwd_kernel<scalar_t, true>);
    } else {
      launch(nt_xent_fwd_kernel<scalar_t, false>);
    }
  });
  return {loss, stats, norm, rank};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> nt_xent_backward_cuda(
    const at::Tensor& grad_rows, const at::Tensor& z1_in, const std::optional<at::Tensor>& z2_in,
    const at::Tensor& temperature_in, const at::Tensor& norm_in, const at::Tensor& stats_in,
    const std::optional<at::Tensor>& labels_in, bool mean_positives, int64_t row_lo,
    int64_t row_count) {
  const at::Tensor z2_view = second_view(z1_in, z2_in);
  const int64_t m = check_nt_xent_inputs(z1_in, z2_view, labels_in, temperature_in);
  check_cuda_dtype(z1_in);
  const DeviceGuard guard(z1_in.device());
  const at::Tensor z1 = z1_in.contiguous(), z2 = z2_view.contiguous();
  const at::Tensor temperature = temperature_in.to(at::kFloat).contiguous();
  const bool with_labels = labels_in.has_value();
  const at::Tensor labels = with_labels ? labels_in->to(at::kLong).contiguous() : at::Tensor();
  const int64_t n = z1.size(0), d = z1.size(1);
  const LocalRows own = local_rows(row_lo, row_count, m, n, !with_labels);
  const int64_t lo = own.lo, count = own.count;
  check_nt_xent_saved(grad_rows, norm_in, stats_in, m);
  const at::Tensor w = grad_rows.to(at::kFloat).contiguous();
  const at::Tensor norm = norm_in.to(at::kFloat).contiguous();
  const at::Tensor stats = stats_in.to(at::kFloat).contiguous();
  const auto fopts = z1.options().dtype(at::kFloat);
  const int64_t nb = (m + kTile - 1) / kTile;
  at::Tensor g = at::zeros({m, d}, fopts);
  at::Tensor tpart = at::zeros({nb * nb}, fopts);
  at::Tensor grad_z1 = at::empty_like(z1), grad_z2 = at::empty_like(z2);
  TORCH_CHECK(nb <= 65535, "fastclr: the CUDA backward handles M <= ", 65535 * kTile, " rows");
  FASTCLR_DISPATCH_FLOAT_HALF_TYPES(z1.scalar_type(), "nt_xent_backward_cuda", [&] {
    auto launch = [&](auto kernel) {
      launch_kernel(kernel, dim3(nb, nb), dim3(kThreads), SmemLayout<scalar_t>::kBackward,
          z1.const_data_ptr<scalar_t>(), z2.const_data_ptr<scalar_t>(),
          with_labels ? labels.const_data_ptr<int64_t>() : nullptr, norm.const_data_ptr<float>(),
          temperature.const_data_ptr<float>(), stats.const_data_ptr<float>(),
          w.const_data_ptr<float>(), g.data_ptr<float>(), tpart.data_ptr<float>(), n, m, d,
          mean_positives, lo, count);
    };
    if (with_labels) {
      launch(nt_xent_bwd_kernel<scalar_t, true>);
    } else {
      launch(nt_xent_bwd_kernel<scalar_t, false>);
    }
    launch_kernel(nt_xent_finish_kernel<scalar_t>, dim3(row_blocks(m)), dim3(kRowThreads), 0,
                  z1.const_data_ptr<scalar_t>(), z2.const_data_ptr<scalar_t>(),
                  norm.const_data_ptr<float>(), temperature.const_data_ptr<float>(),
                  g.const_data_ptr<float>(), grad_z1.data_ptr<scalar_t>(),
                  grad_z2.data_ptr<scalar_t>(), n, m, d);
  });
  // dL/dtau = -(1/tau) sum_i w_i sum_{j != i} c_ij s_ij, on the device: no sync.
  at::Tensor grad_t = -tpart.sum() / temperature.reshape({});
  return {grad_z1, grad_z2, grad_t};
}

}  // namespace

FASTCLR_KERNEL_IMPL(m) {
  m.impl("nt_xent_forward", &nt_xent_forward_cuda);
  m.impl("nt_xent_backward", &nt_xent_backward_cuda);
}

}  // namespace fastclr
