// Helpers shared by the CUDA kernels.
#pragma once

#include <ATen/Dispatch.h>

// float32, float16 and bfloat16: the dtypes the CUDA kernels take.
#define FASTCLR_DISPATCH_FLOAT_HALF_TYPES(TYPE, NAME, ...)     \
  AT_DISPATCH_SWITCH(TYPE, NAME,                               \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
