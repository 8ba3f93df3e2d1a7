// The Python module fastclr._C. Importing it runs the TORCH_LIBRARY registrations of the
// other translation units; the functions here only report how the extension was built.
#include <torch/extension.h>

namespace {
bool compiled_with_cuda() {
#ifdef FASTCLR_WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "fastclr compiled ops (registered under torch.ops.fastclr)";
  m.def("compiled_with_cuda", &compiled_with_cuda,
        "True when the CUDA kernels (kernels/*.cu) were compiled into this build");
}
