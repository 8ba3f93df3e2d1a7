// Helpers shared by the CUDA kernels: the dtype dispatch, and how their host code launches,
// guards and registers, in one place for the two builds of kernels/*.cu:
//   - nvcc (the shipped extension): a kernel<<<grid, block, smem, stream>>> on the current
//     stream, checked; the op registered for CUDA tensors in the `fastclr` namespace.
//   - the CPU execution harness (tests/cuda_on_cpu/, FASTCLR_CUDA_ON_CPU defined, its runtime
//     included first): the same host wrappers -- the same grids, block sizes, dynamic
//     shared-memory sizes, tile schedules and tables -- and the same kernel bodies, executed on
//     CPU threads (one per CUDA thread); the op registered for CPU tensors in the
//     `fastclr_cuda_on_cpu` namespace, so it can sit beside the C++ kernels in one process.
// Every kernel launch of kernels/ goes through launch_kernel.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <cstddef>
#include <cstdint>
#include <utility>
#include <vector>

#ifdef FASTCLR_CUDA_ON_CPU
#ifndef FASTCLR_CUDA_ON_CPU_RUNTIME
#error "the CPU harness build includes its runtime (tests/cuda_on_cpu/cuda_on_cpu.h) first"
#endif
// Dynamic shared memory: the harness's per-block buffer (poisoned before every block).
#define FASTCLR_DYNAMIC_SMEM(name) unsigned char* name = ::cuemu::dynamic_smem()
#define FASTCLR_KERNEL_LIB fastclr_cuda_on_cpu
#define FASTCLR_KERNEL_KEY CPU
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#define FASTCLR_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#define FASTCLR_KERNEL_LIB fastclr
#define FASTCLR_KERNEL_KEY CUDA
#endif

// float32, float16 and bfloat16: the dtypes the CUDA kernels take.
#define FASTCLR_DISPATCH_FLOAT_HALF_TYPES(TYPE, NAME, ...)     \
  AT_DISPATCH_SWITCH(TYPE, NAME,                               \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// TORCH_LIBRARY_IMPL pastes its namespace argument unexpanded: expand the macros first.
#define FASTCLR_KERNEL_IMPL_(lib, key, m) TORCH_LIBRARY_IMPL(lib, key, m)
#define FASTCLR_KERNEL_IMPL(m) FASTCLR_KERNEL_IMPL_(FASTCLR_KERNEL_LIB, FASTCLR_KERNEL_KEY, m)

namespace fastclr {
namespace {

// The dynamic shared memory a kernel may use without the per-kernel opt-in.
constexpr size_t kDefaultDynamicSmem = 48 * 1024;

// Launches `kernel` on a grid of `grid` blocks of `block` threads with `smem` bytes of dynamic
// shared memory (opting in above 48 KiB), on the current stream, and checks the launch.
template <typename... Params, typename... Args>
void launch_kernel(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, Args&&... args) {
#ifdef FASTCLR_CUDA_ON_CPU
  if (smem > kDefaultDynamicSmem) cuemu::set_max_dynamic_smem(kernel, smem);
  cuemu::launch(grid, block, smem, kernel, std::forward<Args>(args)...);
#else
  if (smem > kDefaultDynamicSmem) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem)));
  }
  kernel<<<grid, block, smem, c10::cuda::getCurrentCUDAStream()>>>(std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
#endif
}

// Makes the tensors' device current for the wrapper's scope (the harness has one device).
struct DeviceGuard {
#ifdef FASTCLR_CUDA_ON_CPU
  explicit DeviceGuard(const at::Device& device) {
    TORCH_CHECK(device.is_cpu(), "fastclr (CUDA kernels on the CPU harness): CPU tensors expected, got ",
                device);
  }
#else
  explicit DeviceGuard(const at::Device& device) : guard(device) {}
  c10::cuda::CUDAGuard guard;
#endif
};

// A host table of int64 copied to `device` without blocking the host (from pinned memory on a
// GPU); the harness reads it where it is.
inline at::Tensor device_table(const std::vector<int64_t>& host, const at::Device& device) {
  const auto size = static_cast<int64_t>(host.size());
#ifdef FASTCLR_CUDA_ON_CPU
  at::Tensor table = at::empty({size}, at::TensorOptions().dtype(at::kLong).device(device));
  std::copy(host.begin(), host.end(), table.data_ptr<int64_t>());
  return table;
#else
  at::Tensor pinned = at::empty({size}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  std::copy(host.begin(), host.end(), pinned.data_ptr<int64_t>());
  return pinned.to(device, /*non_blocking=*/true);
#endif
}

}  // namespace
}  // namespace fastclr
