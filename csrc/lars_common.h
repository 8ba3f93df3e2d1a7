// Input checks shared by the CPU and CUDA kernels of fastclr::lars_step_.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace fastclr {

// Checks one call's lists and returns the gradients laid out like their parameters (a
// gradient with other strides is read through a copy that has them; p.grad is never written).
// The kernels work elementwise in memory order, so any dense layout (channels_last too) works
// as long as the momentum buffer shares the parameter's strides (torch.zeros_like(p) does).
inline std::vector<at::Tensor> lars_checked_grads(at::TensorList params, at::TensorList grads,
                                                  at::TensorList bufs) {
  const size_t count = params.size();
  TORCH_CHECK(grads.size() == count && bufs.size() == count,
              "fastclr: lars_step_ needs as many grads and momentum buffers as params");
  std::vector<at::Tensor> g(count);
  for (size_t i = 0; i < count; ++i) {
    TORCH_CHECK(params[i].scalar_type() == params[0].scalar_type() &&
                    grads[i].scalar_type() == params[0].scalar_type(),
                "fastclr: lars_step_ needs params and grads of one dtype per call");
    TORCH_CHECK(bufs[i].scalar_type() == at::kFloat, "fastclr: momentum buffers must be float32");
    TORCH_CHECK(params[i].sizes() == grads[i].sizes() && params[i].sizes() == bufs[i].sizes(),
                "fastclr: lars_step_: param ", i, " has shape ", params[i].sizes(),
                " but its grad ", grads[i].sizes(), " and buffer ", bufs[i].sizes());
    TORCH_CHECK(!grads[i].is_sparse(), "fastclr: LARS does not support sparse gradients");
    TORCH_CHECK(params[i].is_non_overlapping_and_dense() && bufs[i].strides() == params[i].strides(),
                "fastclr: lars_step_ needs dense params with momentum buffers of the same strides "
                "(param ", i, ")");
    g[i] = grads[i].strides() == params[i].strides() ? grads[i]
                                                      : at::empty_like(params[i]).copy_(grads[i]);
  }
  return g;
}

// The optional skip flag of a step: one float32 element on the parameters' device.
inline void lars_check_found_inf(const c10::optional<at::Tensor>& found_inf, const at::Tensor& p0) {
  if (!found_inf.has_value()) return;
  TORCH_CHECK(found_inf->numel() == 1 && found_inf->scalar_type() == at::kFloat &&
                  found_inf->device() == p0.device(),
              "fastclr: lars_step_'s found_inf must be one float32 element on the params' device "
              "(", p0.device(), "), got ", found_inf->scalar_type(), " of ", found_inf->numel(),
              " elements on ", found_inf->device());
}

}  // namespace fastclr
