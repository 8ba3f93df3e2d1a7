// kernels/lars.cu, host wrappers and kernels alike, built for the CPU harness.
#include "kernels/lars.cu"
