// Small kernels that break CUDA's rules, one per case (argv[1]), for tests/test_cuda_on_cpu.py:
// the runtime must abort naming each; "ok" must run and print the right sums.
#include "cuda_on_cpu.h"

#include <cstring>
#include <string>

__global__ void block_sum(const int* in, int* out) {
  __shared__ int part[4];
  int v = in[blockIdx.x * blockDim.x + threadIdx.x];
  for (int o = 16; o > 0; o /= 2) v += __shfl_xor_sync(0xffffffffu, v, o);
  if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = v;
  __syncthreads();
  if (threadIdx.x == 0) atomicAdd(out, part[0] + part[1] + part[2] + part[3]);
}

__global__ void divergent_barrier(int* out) {
  if (threadIdx.x == 5) return;  // thread 5 leaves, the others wait at the barrier
  __syncthreads();
  out[threadIdx.x] = 1;
}

__global__ void partial_mask(int* out) { out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1, 1); }

__global__ void waits_for_a_later_block(int* flag) {
  if (blockIdx.x == 1) atomicAdd(flag, 1);
  while (blockIdx.x == 0 && atomicAdd(flag, 0) == 0) {
  }  // block 0 spins on block 1, which runs only after it
}

__global__ void uses_smem(int* out) { out[0] = ::cuemu::dynamic_smem()[0]; }

int main(int argc, char** argv) {
  const std::string which = argc > 1 ? argv[1] : "ok";
  std::vector<int> in(256 * 3), out(256, 0);
  for (size_t i = 0; i < in.size(); ++i) in[i] = static_cast<int>(i);
  if (which == "ok") {
    cuemu::launch(dim3(3), dim3(128), 0, block_sum, in.data(), out.data());
    std::printf("sum %d\n", out[0]);  // 0 + 1 + ... + 383
  } else if (which == "divergent") {
    cuemu::launch(dim3(1), dim3(64), 0, divergent_barrier, out.data());
  } else if (which == "partial-mask") {
    cuemu::launch(dim3(1), dim3(32), 0, partial_mask, out.data());
  } else if (which == "deadlock") {
    cuemu::launch(dim3(2), dim3(32), 0, waits_for_a_later_block, out.data());
  } else if (which == "smem-no-optin") {
    cuemu::launch(dim3(1), dim3(32), 64 * 1024, uses_smem, out.data());
  } else if (which == "smem-over-arch") {
    cuemu::set_max_dynamic_smem(uses_smem, 200 * 1024);
  } else if (which == "block-too-big") {
    cuemu::launch(dim3(1), dim3(2048), 0, uses_smem, out.data());
  } else if (which == "smem-poisoned") {
    cuemu::launch(dim3(1), dim3(32), 16, uses_smem, out.data());
    std::printf("first byte %d\n", out[0]);
  }
  return 0;
}
