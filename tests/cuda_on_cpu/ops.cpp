// The op schemas (csrc/ops.cpp), declared for the harness in its own namespace, and the
// harness's launch log for resources.py (ctypes).
#define FASTCLR_OPS_LIB fastclr_cuda_on_cpu
#include "csrc/ops.cpp"

extern "C" int fastclr_cuda_on_cpu_launches(char* buf, int size) {
  return cuemu::write_launch_log(buf, size);
}
