// cuda_on_cpu.h -- the runtime that executes fastclr's CUDA kernels (kernels/*.cu) on a CPU, for
// the tests. Included before anything else by every translation unit of the harness (-include).
//
// Model: a launch runs its blocks one after another (so a function-local `static` is a valid
// __shared__ variable: one copy per kernel instantiation, used by one block at a time), and a
// block as one std::thread per CUDA thread. __syncthreads / __syncwarp / warp shuffles are
// std::barrier phases over the block or the warp; atomics are std::atomic_ref. Host code sees
// the CUDA toolkit's headers as a host compiler does (__device__, __global__ empty; dim3, uint3,
// __half, __nv_bfloat16 with their host conversions).
//
// What it checks, aborting with a message that names the block and thread: a barrier reached
// while another thread of the block (or lane of the warp) has returned (a divergent barrier,
// undefined on a GPU); a shuffle or __syncwarp with a partial mask; a block of more than 1024
// threads or an empty or oversized grid; dynamic shared memory over 48 KiB without the
// per-kernel opt-in, or an opt-in over the arch's limit; a block that hangs. Dynamic shared
// memory is poisoned (0xff: NaN floats, -1 integers) before every block, so a read of a value
// no thread wrote shows. Races between threads of a block are ThreadSanitizer's to find (the
// threads are real); out-of-bounds accesses are AddressSanitizer's.
//
// What it cannot see: races between blocks (they never overlap), a stale read of a static
// __shared__ array left by the previous block (not re-poisoned), tensor-core rounding order,
// codegen, timing.
#pragma once
#define FASTCLR_CUDA_ON_CPU 1
#define FASTCLR_CUDA_ON_CPU_RUNTIME 1

#include <cuda_bf16.h>  // with a host compiler: host_defines.h (__device__ etc. empty), dim3
#include <cuda_fp16.h>
#include <dlfcn.h>

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace cuemu {
constexpr unsigned kFullMask = 0xffffffffu;
constexpr size_t kStaticSmemLimit = 48 * 1024;

// The arch whose opt-in limit of dynamic shared memory applies (CUEMU_ARCH at build time).
#ifndef CUEMU_ARCH
#define CUEMU_ARCH 80
#endif
constexpr size_t max_optin_smem() { return CUEMU_ARCH >= 90 ? 232448 : 166912; }

inline double timeout_s() {
  const char* s = std::getenv("FASTCLR_CUDA_ON_CPU_TIMEOUT");
  return s ? std::atof(s) : 300.0;
}

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda_on_cpu: %s [block (%u,%u,%u) thread (%u,%u,%u)]\n", what, blockIdx.x,
               blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
  std::fflush(stderr);
  std::abort();
}

[[noreturn]] inline void fail_launch(const char* what, size_t a = 0, size_t b = 0) {
  std::fprintf(stderr, "cuda_on_cpu: bad launch: ");
  std::fprintf(stderr, what, a, b);
  std::fprintf(stderr, "\n");
  std::fflush(stderr);
  std::abort();
}

// A barrier over a block or a warp. A phase in which some thread waited while another had
// already returned from the kernel is a divergent barrier: reported by the waiting threads.
struct Group;
struct PhaseEnd {
  Group* group;
  void operator()() noexcept;
};
struct Group {
  Group(std::ptrdiff_t n, const char* divergence) : bar(n, PhaseEnd{this}), divergence(divergence) {}
  std::barrier<PhaseEnd> bar;
  std::atomic<int> exited{0}, waiting{0};
  std::atomic<bool> diverged{false};
  const char* divergence;
  void sync() {
    waiting.fetch_add(1);
    bar.arrive_and_wait();
    if (diverged.load()) fail(divergence);
  }
  void leave() {
    exited.fetch_add(1);
    bar.arrive_and_drop();
  }
};
inline void PhaseEnd::operator()() noexcept {
  if (group->waiting.load() > 0 && group->exited.load() > 0) group->diverged.store(true);
  group->waiting.store(0);
}

struct Warp : Group {
  explicit Warp(int n)
      : Group(n, "a warp-synchronous op reached after a lane of the warp returned"), size(n) {}
  int size;
  alignas(64) unsigned char slot[32][8];  // one value per lane, for shuffles
};

struct Block : Group {
  explicit Block(int n) : Group(n, "__syncthreads reached after a thread of the block returned (divergent barrier)") {}
  std::vector<std::unique_ptr<Warp>> warps;
  unsigned char* smem = nullptr;
};

inline Block* g_block = nullptr;
inline thread_local int t_lane = 0;
inline thread_local Warp* t_warp = nullptr;

inline unsigned char* dynamic_smem() { return g_block->smem; }

// cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes).
inline std::map<const void*, size_t>& smem_optin() {
  static std::map<const void*, size_t> optin;
  return optin;
}
inline std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}
// Every kernel launched so far, by its address's offset in the library that holds it: the block
// size and the largest dynamic shared memory asked for (resources.py names them and joins them
// with ptxas's report).
struct LaunchShape {
  unsigned threads = 0;
  size_t smem = 0;
};
inline std::map<uintptr_t, LaunchShape>& launch_log() {
  static std::map<uintptr_t, LaunchShape> log;
  return log;
}
inline void record_launch(const void* kernel, unsigned threads, size_t smem) {
  Dl_info info{};
  const uintptr_t base = dladdr(kernel, &info) ? reinterpret_cast<uintptr_t>(info.dli_fbase) : 0;
  LaunchShape& shape = launch_log()[reinterpret_cast<uintptr_t>(kernel) - base];
  shape.threads = threads;
  shape.smem = std::max(shape.smem, smem);
}
// "offset threads smem" lines into buf (size bytes); returns the length the whole log needs.
inline int write_launch_log(char* buf, int size) {
  std::lock_guard<std::mutex> lock(launch_mutex());
  std::string text;
  for (const auto& [offset, shape] : launch_log())
    text += std::to_string(offset) + " " + std::to_string(shape.threads) + " " + std::to_string(shape.smem) + "\n";
  if (buf != nullptr && size > 0) std::snprintf(buf, static_cast<size_t>(size), "%s", text.c_str());
  return static_cast<int>(text.size()) + 1;
}

template <class Kernel>
void set_max_dynamic_smem(Kernel* kernel, size_t bytes) {
  if (bytes > max_optin_smem())
    fail_launch("an opt-in of %zu bytes of dynamic shared memory, over the arch's limit %zu", bytes,
                max_optin_smem());
  std::lock_guard<std::mutex> lock(launch_mutex());
  smem_optin()[reinterpret_cast<const void*>(kernel)] = bytes;
}

template <class T, class Source>
T warp_exchange(unsigned mask, T v, Source source) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>);
  if (mask != kFullMask) fail("a shuffle with a partial mask (only full warps are emulated)");
  Warp* w = t_warp;
  if (w->size != 32) fail("a full-mask shuffle in a partial warp");
  std::memcpy(w->slot[t_lane], &v, sizeof(T));
  w->sync();
  const int s = source(t_lane);
  T r = v;
  if (s >= 0) std::memcpy(&r, w->slot[s], sizeof(T));
  w->sync();  // no lane overwrites its slot before every lane has read
  return r;
}

inline void check_launch(const void* kernel, dim3 grid, dim3 block, size_t smem_bytes) {
  const size_t threads = size_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64)
    fail_launch("a block of %zu threads (1 to 1024, z <= 64)", threads);
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.x > 2147483647u || grid.y > 65535 || grid.z > 65535)
    fail_launch("a grid of %zu x %zu blocks (x < 2^31, y and z <= 65535; none 0)", grid.x, size_t(grid.y) * grid.z);
  size_t limit = kStaticSmemLimit;
  const auto it = smem_optin().find(kernel);
  if (it != smem_optin().end()) limit = it->second;
  if (smem_bytes > limit)
    fail_launch("%zu bytes of dynamic shared memory over the kernel's limit %zu (missing opt-in?)",
                smem_bytes, limit);
}

// Runs one block: a thread per CUDA thread, joined; aborts if it does not finish in time.
template <class Kernel, class Params>
void run_block(Kernel kernel, const Params& params, dim3 block, uint3 index, unsigned char* smem,
               size_t smem_alloc) {
  const unsigned nthreads = block.x * block.y * block.z;
  Block b(static_cast<int>(nthreads));
  for (unsigned w0 = 0; w0 < nthreads; w0 += 32)
    b.warps.push_back(std::make_unique<Warp>(static_cast<int>(std::min(32u, nthreads - w0))));
  std::memset(smem, 0xff, smem_alloc);
  b.smem = smem;
  g_block = &b;
  std::atomic<unsigned> done{0};
  std::vector<std::thread> threads;
  threads.reserve(nthreads);
  for (unsigned t = 0; t < nthreads; ++t) {
    threads.emplace_back([&, t] {
      threadIdx = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
      blockIdx = index;
      t_lane = static_cast<int>(t % 32);
      t_warp = b.warps[t / 32].get();
      std::apply(kernel, params);
      t_warp->leave();
      b.leave();
      done.fetch_add(1);
    });
  }
  const auto start = std::chrono::steady_clock::now();
  const double limit = timeout_s();
  while (done.load() < nthreads) {
    std::this_thread::sleep_for(std::chrono::microseconds(100));
    if (std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() > limit) {
      std::fprintf(stderr, "cuda_on_cpu: block (%u,%u,%u) still running after %.0f s (a deadlock: a barrier never completed, or a wait on another block?)\n",
                   index.x, index.y, index.z, limit);
      std::abort();
    }
  }
  for (auto& th : threads) th.join();
  g_block = nullptr;
}

// kernel<<<grid, block, smem_bytes>>>(args...), run to completion (launches are serialised).
template <class... P, class... A>
void launch(dim3 grid, dim3 block, size_t smem_bytes, void (*kernel)(P...), A&&... args) {
  std::lock_guard<std::mutex> lock(launch_mutex());
  check_launch(reinterpret_cast<const void*>(kernel), grid, block, smem_bytes);
  record_launch(reinterpret_cast<const void*>(kernel), block.x * block.y * block.z, smem_bytes);
  const std::tuple<std::decay_t<P>...> params(std::forward<A>(args)...);
  gridDim = grid;
  blockDim = block;
  const size_t smem_alloc = ((smem_bytes + 127) / 128) * 128 + 128;
  std::unique_ptr<unsigned char, decltype(&std::free)> smem(
      static_cast<unsigned char*>(std::aligned_alloc(128, smem_alloc)), &std::free);
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) run_block(kernel, params, block, uint3{x, y, z}, smem.get(), smem_alloc);
}
}  // namespace cuemu

// ---- device intrinsics ----
inline void __syncthreads() { cuemu::g_block->sync(); }
inline void __syncwarp(unsigned mask = cuemu::kFullMask) {
  if (mask != cuemu::kFullMask) cuemu::fail("__syncwarp with a partial mask (only full warps are emulated)");
  cuemu::t_warp->sync();
}
template <class T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  return cuemu::warp_exchange(mask, v, [&](int lane) {
    const int s = lane ^ lane_mask;
    return s >= (lane / width + 1) * width ? -1 : s;
  });
}
template <class T>
T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
  return cuemu::warp_exchange(mask, v, [&](int lane) { return (lane / width) * width + (src % width); });
}
template <class T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  return cuemu::warp_exchange(mask, v, [&](int lane) {
    const int s = lane + static_cast<int>(delta);
    return s >= (lane / width + 1) * width ? -1 : s;
  });
}
template <class T>
T atomicAdd(T* p, T v) {
  static_assert(std::is_arithmetic_v<T>);
  return std::atomic_ref<T>(*p).fetch_add(v);
}
