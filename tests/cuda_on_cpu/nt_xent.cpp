// kernels/nt_xent.cu, host wrappers and kernels alike, built for the CPU harness.
#include "kernels/nt_xent.cu"
