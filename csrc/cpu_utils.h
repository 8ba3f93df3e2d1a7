// Helpers shared by the CPU kernels.
#pragma once

// Hot loops get AVX-512 / AVX2 clones picked at load time; the default build targets plain
// x86-64 so the wheel runs anywhere.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FASTCLR_MULTIVERSION __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#else
#define FASTCLR_MULTIVERSION
#endif

#if defined(__GNUC__)
#define FASTCLR_INLINE inline __attribute__((always_inline))
#else
#define FASTCLR_INLINE inline
#endif
