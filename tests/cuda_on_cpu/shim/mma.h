// mma.h for the CPU harness: nvcuda::wmma on the host, found before the CUDA toolkit's mma.h.
//
// Every lane of a warp holds the WHOLE fragment (x[] in this file's own order, element (r, c)
// at x[r * cols + c]). That is valid for kernels that treat x[] elementwise and never depend on
// which element a lane holds -- in fastclr the only use of x[] is the 3xTF32 split, which does
// the same to every element. mma_sync: float32 products of the operands (tf32 operands
// truncated to their 10 mantissa bits, as tensor cores read them), accumulated in float32 in k
// order. store_matrix_sync: each lane writes only its 1/32 of the tile, so a lane that reads
// another lane's part without a __syncwarp / __syncthreads in between reads poison or stale
// values, as it could on a GPU. The documented preconditions are checked: 256-bit aligned
// pointers and a leading dimension that is a multiple of 16 bytes.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "cuda_on_cpu.h"

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };
namespace precision {
struct tf32 {};
}  // namespace precision

namespace detail {
template <class T> struct storage { using type = T; };
template <> struct storage<precision::tf32> { using type = float; };
template <class Use, int M, int N, int K> struct shape;
template <int M, int N, int K> struct shape<matrix_a, M, N, K> { static constexpr int rows = M, cols = K; };
template <int M, int N, int K> struct shape<matrix_b, M, N, K> { static constexpr int rows = K, cols = N; };
template <int M, int N, int K> struct shape<accumulator, M, N, K> { static constexpr int rows = M, cols = N; };

inline float tf32_truncate(float x) {  // what the tensor core reads of a tf32 operand
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u &= 0xffffe000u;
  std::memcpy(&x, &u, 4);
  return x;
}
template <class T> float value(T x, bool tf32) {
  if constexpr (std::is_same_v<T, __half>) return __half2float(x);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __bfloat162float(x);
  else return tf32 ? tf32_truncate(static_cast<float>(x)) : static_cast<float>(x);
}
template <class T> T from_float(float v) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(v);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(v);
  else return static_cast<T>(v);
}
inline void check_pointer(const void* p, unsigned ldm, size_t element_bytes) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0) cuemu::fail("a wmma pointer not 256-bit aligned");
  if ((ldm * element_bytes) % 16 != 0) cuemu::fail("a wmma leading dimension not a multiple of 16 bytes");
}
}  // namespace detail

template <class Use, int M, int N, int K, class T, class Layout = void>
class fragment {
 public:
  using element_type = typename detail::storage<T>::type;
  static constexpr int kRows = detail::shape<Use, M, N, K>::rows;
  static constexpr int kCols = detail::shape<Use, M, N, K>::cols;
  enum { num_elements = kRows * kCols };
  element_type x[num_elements];
};

// cvt.rna.tf32.f32: to nearest, ties away from zero.
inline float __float_to_tf32(float x) {
  if (!std::isfinite(x)) return x;
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u = (u + 0x1000u) & 0xffffe000u;
  std::memcpy(&x, &u, 4);
  return x;
}

template <class Use, int M, int N, int K, class T, class L, class V>
void fill_fragment(fragment<Use, M, N, K, T, L>& f, const V& v) {
  using E = typename fragment<Use, M, N, K, T, L>::element_type;
  for (auto& e : f.x) e = detail::from_float<E>(static_cast<float>(v));
}

template <class Use, int M, int N, int K, class T, class L, class P>
void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const P* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, L>;
  detail::check_pointer(p, ldm, sizeof(P));
  constexpr bool row = std::is_same_v<L, row_major>;
  for (int r = 0; r < F::kRows; ++r)
    for (int c = 0; c < F::kCols; ++c) f.x[r * F::kCols + c] = p[row ? r * ldm + c : c * ldm + r];
}

template <int M, int N, int K, class TA, class LA, class TB, class LB>
void mma_sync(fragment<accumulator, M, N, K, float>& d, const fragment<matrix_a, M, N, K, TA, LA>& a,
              const fragment<matrix_b, M, N, K, TB, LB>& b, const fragment<accumulator, M, N, K, float>& c) {
  constexpr bool tf32 = std::is_same_v<TA, precision::tf32>;
  float out[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      float acc = c.x[i * N + j];
      for (int k = 0; k < K; ++k) acc += detail::value(a.x[i * K + k], tf32) * detail::value(b.x[k * N + j], tf32);
      out[i * N + j] = acc;
    }
  std::memcpy(d.x, out, sizeof(out));
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  detail::check_pointer(p, ldm, sizeof(float));
  for (int e = cuemu::t_lane; e < M * N; e += 32) {  // this lane's share of the tile
    const int r = e / N, c = e % N;
    p[layout == mem_row_major ? r * ldm + c : c * ldm + r] = f.x[e];
  }
}
}  // namespace wmma
}  // namespace nvcuda
