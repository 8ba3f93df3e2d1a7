// Tensor-core tile products shared by the CUDA kernels (nt_xent.cu, similarity.cu): 64 x 64
// fp32 score tiles S = A_I B_J^T of rows of the raw input-dtype matrices, staged in shared
// memory K-chunk by K-chunk, WMMA on tensor cores (fp32 inputs as 3xTF32: ~fp32 accuracy).
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cstdint>

namespace fastclr {
namespace {

namespace wmma = nvcuda::wmma;

// Tile shape: 64 x 64 score tiles, 4 warps of 16 rows each, K staged 32 at a time.
constexpr int kTile = 64;
constexpr int kWarps = 4;
constexpr int kThreads = kWarps * 32;
constexpr int kKc = 32;          // K chunk staged in shared memory
constexpr int kPad = 8;          // shared-memory row padding (bank conflicts)
constexpr int kScoreLd = kTile + 4;

// Per input type: the WMMA operand type, its K step, how a float becomes an operand, and
// whether the product is split into three (fp32 via TF32: hi*hi + hi*lo + lo*hi).
template <typename scalar_t>
struct MmaTraits;

template <>
struct MmaTraits<at::Half> {
  using storage = __half;  // what shared memory holds
  using operand = __half;  // WMMA fragment element type
  static constexpr int kK = 16;
  static constexpr bool kSplit = false;
  __device__ static storage from_float(float x) { return __float2half_rn(x); }
};

template <>
struct MmaTraits<at::BFloat16> {
  using storage = __nv_bfloat16;
  using operand = __nv_bfloat16;
  static constexpr int kK = 16;
  static constexpr bool kSplit = false;
  __device__ static storage from_float(float x) { return __float2bfloat16_rn(x); }
};

template <>
struct MmaTraits<float> {
  using storage = float;
  using operand = wmma::precision::tf32;
  static constexpr int kK = 8;
  static constexpr bool kSplit = true;
  __device__ static storage from_float(float x) { return x; }
};

template <typename scalar_t>
__device__ __forceinline__ float to_float(scalar_t x) {
  return static_cast<float>(x);
}

// Row r of z = [z1; z2].
template <typename scalar_t>
__device__ __forceinline__ const scalar_t* row_ptr(const scalar_t* z1, const scalar_t* z2,
                                                   int64_t r, int64_t n, int64_t d) {
  return r < n ? z1 + r * d : z2 + (r - n) * d;
}

// acc += A (16 x K, row-major at a, leading dim lda) * B (K x 16; `b_layout` at b, ldb), over
// k in [0, kdim), kdim a multiple of the traits' K step. For fp32 the operands are split
// into TF32 hi + lo parts and three products accumulated.
template <typename scalar_t, typename BLayout, typename ALayout = wmma::row_major>
__device__ __forceinline__ void mma_accumulate(
    wmma::fragment<wmma::accumulator, 16, 16, MmaTraits<scalar_t>::kK, float>& acc,
    const typename MmaTraits<scalar_t>::storage* a, int lda,
    const typename MmaTraits<scalar_t>::storage* b, int ldb, int kdim, int a_kstride,
    int b_kstride) {
  using T = MmaTraits<scalar_t>;
  using operand = typename T::operand;
  for (int k = 0; k < kdim; k += T::kK) {
    wmma::fragment<wmma::matrix_a, 16, 16, T::kK, operand, ALayout> fa;
    wmma::fragment<wmma::matrix_b, 16, 16, T::kK, operand, BLayout> fb;
    wmma::load_matrix_sync(fa, a + k * a_kstride, lda);
    wmma::load_matrix_sync(fb, b + k * b_kstride, ldb);
    if constexpr (T::kSplit) {
      wmma::fragment<wmma::matrix_a, 16, 16, T::kK, operand, ALayout> fa_lo;
      wmma::fragment<wmma::matrix_b, 16, 16, T::kK, operand, BLayout> fb_lo;
      for (int e = 0; e < fa.num_elements; ++e) {
        const float x = fa.x[e];
        fa.x[e] = wmma::__float_to_tf32(x);
        fa_lo.x[e] = wmma::__float_to_tf32(x - fa.x[e]);
      }
      for (int e = 0; e < fb.num_elements; ++e) {
        const float x = fb.x[e];
        fb.x[e] = wmma::__float_to_tf32(x);
        fb_lo.x[e] = wmma::__float_to_tf32(x - fb.x[e]);
      }
      wmma::mma_sync(acc, fa_lo, fb, acc);
      wmma::mma_sync(acc, fa, fb_lo, acc);
    }
    wmma::mma_sync(acc, fa, fb, acc);
  }
}

// Stages rows `rows[r]` (r < kTile; -1 = padding) x columns [k0, k0 + kKc) of z into smem
// (row-major, leading dim kKc + kPad), zero outside z.
template <typename scalar_t>
__device__ __forceinline__ void stage_rows(typename MmaTraits<scalar_t>::storage* dst,
                                           const scalar_t* z1, const scalar_t* z2,
                                           const int64_t* rows, int64_t n, int64_t d, int64_t k0) {
  using T = MmaTraits<scalar_t>;
  for (int e = threadIdx.x; e < kTile * kKc; e += kThreads) {
    const int r = e / kKc, c = e % kKc;
    const int64_t k = k0 + c;
    float v = 0.f;
    if (rows[r] >= 0 && k < d) v = to_float(row_ptr(z1, z2, rows[r], n, d)[k]);
    dst[r * (kKc + kPad) + c] = T::from_float(v);
  }
}

// Raw dot products S[r][c] = z_rows_i[r] . z_rows_j[c] (fp32, smem, leading dim kScoreLd).
// Each warp computes its 16 rows x 64 columns.
template <typename scalar_t>
__device__ void score_tile(float* scores, typename MmaTraits<scalar_t>::storage* a_s,
                           typename MmaTraits<scalar_t>::storage* b_s, const scalar_t* z1,
                           const scalar_t* z2, const int64_t* rows_i, const int64_t* rows_j,
                           int64_t n, int64_t d) {
  using T = MmaTraits<scalar_t>;
  const int warp = threadIdx.x / 32;
  wmma::fragment<wmma::accumulator, 16, 16, T::kK, float> acc[kTile / 16];
  for (auto& f : acc) wmma::fill_fragment(f, 0.f);
  for (int64_t k0 = 0; k0 < d; k0 += kKc) {
    stage_rows<scalar_t>(a_s, z1, z2, rows_i, n, d, k0);
    stage_rows<scalar_t>(b_s, z1, z2, rows_j, n, d, k0);
    __syncthreads();
    for (int f = 0; f < kTile / 16; ++f) {
      // B = Z_J^T: element (k, col) at b_s[col * ld + k], i.e. column-major.
      mma_accumulate<scalar_t, wmma::col_major>(acc[f], a_s + warp * 16 * (kKc + kPad),
                                                kKc + kPad, b_s + f * 16 * (kKc + kPad),
                                                kKc + kPad, kKc, 1, 1);
    }
    __syncthreads();
  }
  for (int f = 0; f < kTile / 16; ++f) {
    wmma::store_matrix_sync(scores + warp * 16 * kScoreLd + f * 16, acc[f], kScoreLd,
                            wmma::mem_row_major);
  }
  __syncthreads();
}

}  // namespace
}  // namespace fastclr
