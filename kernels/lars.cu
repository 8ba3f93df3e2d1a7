// CUDA kernel of fastclr::lars_step_: LARS for a whole parameter list in a handful of launches
// and no host synchronisation.
//
// The host lays the tensors out as chunks (tensor, begin, end) and their pointers in one int64
// table, copied to the device asynchronously from pinned memory. Launch 1 (weights only):
// one block per chunk sums w^2 and (g + wd w)^2 and adds them to the tensor's two fp32 slots
// (atomics). Launch 2: one block per chunk reads its tensor's norms, forms the trust ratio on
// the device (zero-norm guard included) and updates v and w. float32 math and float32
// momentum buffers whatever the parameter dtype (float32, bfloat16, float16).
#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "../csrc/lars_common.h"
#include "cuda_utils.cuh"

namespace fastclr {
namespace {

constexpr int64_t kLarsChunk = 1 << 16;
constexpr int kLarsThreads = 256;

// Per chunk c: table[3c .. 3c+2] = (tensor, begin, end). Per tensor i (after all chunks, at
// offset 3 * n_chunks): (w pointer, g pointer, v pointer).
struct Table {
  const int64_t* data;
  int64_t n_chunks;
  __device__ int64_t tensor(int64_t c) const { return data[3 * c]; }
  __device__ int64_t begin(int64_t c) const { return data[3 * c + 1]; }
  __device__ int64_t end(int64_t c) const { return data[3 * c + 2]; }
  template <typename T>
  __device__ T* ptr(int64_t i, int which) const {
    return reinterpret_cast<T*>(data[3 * n_chunks + 3 * i + which]);
  }
};

template <typename scalar_t>
__global__ void __launch_bounds__(kLarsThreads) lars_sums_kernel(Table table, float wd,
                                                                 float* __restrict__ sums,
                                                                 const float* __restrict__ skip) {
  if (skip != nullptr && *skip != 0.f) return;
  const int64_t c = blockIdx.x;
  const int64_t i = table.tensor(c);
  const scalar_t* w = table.ptr<const scalar_t>(i, 0);
  const scalar_t* g = table.ptr<const scalar_t>(i, 1);
  float ws = 0.f, ds = 0.f;
  for (int64_t k = table.begin(c) + threadIdx.x; k < table.end(c); k += kLarsThreads) {
    const float wv = static_cast<float>(w[k]);
    const float dv = static_cast<float>(g[k]) + wd * wv;
    ws += wv * wv;
    ds += dv * dv;
  }
  __shared__ float red[2][kLarsThreads / 32];
  for (int o = 16; o > 0; o /= 2) {
    ws += __shfl_xor_sync(0xffffffffu, ws, o);
    ds += __shfl_xor_sync(0xffffffffu, ds, o);
  }
  if (threadIdx.x % 32 == 0) {
    red[0][threadIdx.x / 32] = ws;
    red[1][threadIdx.x / 32] = ds;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float a = 0.f, b = 0.f;
    for (int k = 0; k < kLarsThreads / 32; ++k) {
      a += red[0][k];
      b += red[1][k];
    }
    atomicAdd(sums + 2 * i, a);
    atomicAdd(sums + 2 * i + 1, b);
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kLarsThreads) lars_update_kernel(
    Table table, const float* __restrict__ sums, float lr, float momentum, float wd,
    float trust_coefficient, bool nesterov, const float* __restrict__ skip) {
  if (skip != nullptr && *skip != 0.f) return;  // a skipped step: found_inf set on the device
  const int64_t c = blockIdx.x;
  const int64_t i = table.tensor(c);
  scalar_t* w = table.ptr<scalar_t>(i, 0);
  const scalar_t* g = table.ptr<const scalar_t>(i, 1);
  float* v = table.ptr<float>(i, 2);
  float scaled_lr = lr;
  if (sums != nullptr) {  // not an excluded group: the trust ratio, decided here on the device
    const float wn = sqrtf(sums[2 * i]), dn = sqrtf(sums[2 * i + 1]);
    scaled_lr = (wn > 0.f && dn > 0.f) ? lr * trust_coefficient * wn / dn : lr;
  }
  for (int64_t k = table.begin(c) + threadIdx.x; k < table.end(c); k += kLarsThreads) {
    const float wv = static_cast<float>(w[k]);
    const float step = scaled_lr * (static_cast<float>(g[k]) + wd * wv);
    const float vn = momentum * v[k] + step;
    v[k] = vn;
    w[k] = static_cast<scalar_t>(wv - (nesterov ? momentum * vn + step : vn));
  }
}

void lars_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList bufs, double lr,
                    double momentum, double weight_decay, double trust_coefficient, bool nesterov,
                    bool exclude, const c10::optional<at::Tensor>& found_inf) {
  const std::vector<at::Tensor> g = lars_checked_grads(params, grads, bufs);
  const int64_t count = static_cast<int64_t>(params.size());
  if (count == 0) return;
  lars_check_found_inf(found_inf, params[0]);
  const auto dtype = params[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "fastclr: the CUDA LARS step takes float32, bfloat16 or float16 parameters, got ",
              dtype);
  for (int64_t i = 0; i < count; ++i) {
    TORCH_CHECK(params[i].device() == params[0].device(),
                "fastclr: lars_step_ (CUDA) needs all params on one CUDA device");
  }
  const DeviceGuard guard(params[0].device());

  std::vector<int64_t> host;
  for (int64_t i = 0; i < count; ++i) {
    const int64_t n = params[i].numel();
    for (int64_t b = 0; b < n; b += kLarsChunk) {
      host.insert(host.end(), {i, b, std::min(n, b + kLarsChunk)});
    }
  }
  const int64_t n_chunks = static_cast<int64_t>(host.size()) / 3;
  for (int64_t i = 0; i < count; ++i) {
    host.push_back(reinterpret_cast<int64_t>(params[i].data_ptr()));
    host.push_back(reinterpret_cast<int64_t>(g[i].data_ptr()));
    host.push_back(reinterpret_cast<int64_t>(bufs[i].data_ptr()));
  }
  if (n_chunks == 0) return;
  TORCH_CHECK(n_chunks <= 2147483647, "fastclr: too many LARS chunks");
  const at::Tensor table_t = device_table(host, params[0].device());
  const Table table{table_t.const_data_ptr<int64_t>(), n_chunks};
  const float wd = exclude ? 0.f : static_cast<float>(weight_decay);
  at::Tensor sums;
  if (!exclude) sums = at::zeros({2 * count}, params[0].options().dtype(at::kFloat));

  const float* skip = found_inf.has_value() ? found_inf->const_data_ptr<float>() : nullptr;

  FASTCLR_DISPATCH_FLOAT_HALF_TYPES(dtype, "lars_step_cuda", [&] {
    float* norms = exclude ? nullptr : sums.data_ptr<float>();
    const dim3 grid(static_cast<unsigned>(n_chunks)), block(kLarsThreads);
    if (!exclude) launch_kernel(lars_sums_kernel<scalar_t>, grid, block, 0, table, wd, norms, skip);
    launch_kernel(lars_update_kernel<scalar_t>, grid, block, 0, table, norms,
                  static_cast<float>(lr), static_cast<float>(momentum), wd,
                  static_cast<float>(trust_coefficient), nesterov, skip);
  });
}

}  // namespace

FASTCLR_KERNEL_IMPL(m) {
  m.impl("lars_step_", &lars_step_cuda);
}

}  // namespace fastclr
