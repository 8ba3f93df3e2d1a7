// C++-level tests of the fastclr ops through the dispatcher, against libtorch's own autograd
// on the direct float64 formulation. Prints "N passed, N failed" and exits non-zero on failure.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/torch.h>

#include <cstdio>
#include <functional>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace {

using Opt = std::optional<at::Tensor>;
// The schemas' order (csrc/ops.cpp): the tensors, then the keyword-only options (labels,
// mean_positives, [compute_accuracy,] row_lo, row_count; 0, -1: the whole batch).
using Fwd = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const Opt&, const at::Tensor&, const Opt&, bool, bool, int64_t, int64_t);
using Bwd = std::tuple<at::Tensor, at::Tensor, at::Tensor>(
    const at::Tensor&, const at::Tensor&, const Opt&, const at::Tensor&, const at::Tensor&,
    const at::Tensor&, const Opt&, bool, int64_t, int64_t);

auto forward_op() {
  return c10::Dispatcher::singleton().findSchemaOrThrow("fastclr::nt_xent_forward", "").typed<Fwd>();
}
auto backward_op() {
  return c10::Dispatcher::singleton().findSchemaOrThrow("fastclr::nt_xent_backward", "").typed<Bwd>();
}

// Per-row losses of docs/math.md, float64, differentiable by libtorch autograd.
at::Tensor direct_rows(const at::Tensor& z1, const at::Tensor& z2, const at::Tensor& t) {
  auto z = torch::cat({z1, z2});
  auto u = torch::nn::functional::normalize(z, torch::nn::functional::NormalizeFuncOptions().dim(1));
  auto s = torch::mm(u, u.t()) / t;
  const int64_t m = s.size(0);
  s = s.masked_fill(torch::eye(m, torch::kBool), -std::numeric_limits<double>::infinity());
  auto p = (torch::arange(m) + m / 2) % m;
  return torch::logsumexp(s, 1) - s.gather(1, p.unsqueeze(1)).squeeze(1);
}

// SupCon's L_out per row (every row has a positive here), float64, by libtorch autograd.
at::Tensor direct_supcon_rows(const at::Tensor& z, const at::Tensor& labels, const at::Tensor& t) {
  auto u = torch::nn::functional::normalize(z, torch::nn::functional::NormalizeFuncOptions().dim(1));
  auto s = torch::mm(u, u.t()) / t;
  const int64_t m = s.size(0);
  auto eye = torch::eye(m, torch::kBool);
  auto same = labels.unsqueeze(1).eq(labels.unsqueeze(0)).logical_and(eye.logical_not());
  auto lse = torch::logsumexp(s.masked_fill(eye, -std::numeric_limits<double>::infinity()), 1);
  return lse - s.masked_fill(same.logical_not(), 0).sum(1) / same.sum(1).to(torch::kDouble);
}

double max_rel(const at::Tensor& a, const at::Tensor& b) {
  return ((a.to(torch::kDouble) - b).abs().max() / b.abs().max().clamp_min(1e-30)).item<double>();
}

bool check_case(int64_t n, int64_t d, double tau, at::ScalarType dtype, double loss_tol,
                double grad_tol) {
  auto z1 = torch::randn({n, d}, torch::kDouble), z2 = torch::randn({n, d}, torch::kDouble);
  auto t = torch::tensor(tau, torch::kDouble).requires_grad_(true);
  auto a = z1.clone().requires_grad_(true), b = z2.clone().requires_grad_(true);
  auto ref = direct_rows(a, b, t);
  auto w = torch::rand({2 * n}, torch::kDouble);
  auto grads = torch::autograd::grad({(ref * w).sum()}, {a, b, t});

  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  auto tt = torch::tensor(tau, acc);
  auto [rows, stats, norm, rank] = forward_op().call(z1.to(dtype), z2.to(dtype), tt, std::nullopt,
                                                      false, true, 0, -1);
  auto [g1, g2, gt] = backward_op().call(w.to(acc), z1.to(dtype), z2.to(dtype), tt, norm, stats,
                                         std::nullopt, false, 0, -1);
  const double e_loss = max_rel(rows, ref.detach()), e1 = max_rel(g1, grads[0]),
               e2 = max_rel(g2, grads[1]), et = max_rel(gt, grads[2]);
  const bool ok = e_loss <= loss_tol && e1 <= grad_tol && e2 <= grad_tol && et <= 100 * grad_tol &&
                  rank.size(0) == 2 && rank.size(1) == 2 * n && rows.scalar_type() == acc && g1.scalar_type() == dtype;
  std::printf("%s n=%ld d=%ld tau=%.2f %s: loss %.2e, grad_z1 %.2e, grad_z2 %.2e, grad_t %.2e\n",
              ok ? "PASS" : "FAIL", (long)n, (long)d, tau, c10::toString(dtype), e_loss, e1, e2, et);
  return ok;
}

// Labels mode, "mean" positives (SupCon): m rows in k classes of at least two.
bool check_supcon_case(int64_t m, int64_t d, int64_t k, double tau, at::ScalarType dtype,
                       double loss_tol, double grad_tol) {
  auto z = torch::randn({m, d}, torch::kDouble);
  auto labels = torch::arange(m) % k;
  auto t = torch::tensor(tau, torch::kDouble).requires_grad_(true);
  auto a = z.clone().requires_grad_(true);
  auto ref = direct_supcon_rows(a, labels, t);
  auto w = torch::rand({m}, torch::kDouble);
  auto grads = torch::autograd::grad({(ref * w).sum()}, {a, t});
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  auto tt = torch::tensor(tau, acc);
  auto zd = z.to(dtype);  // every row in z1, no second view
  auto [rows, stats, norm, rank] = forward_op().call(zd, std::nullopt, tt, labels, true, false, 0, -1);
  auto [g1, g2, gt] = backward_op().call(w.to(acc), zd, std::nullopt, tt, norm, stats, labels, true, 0, -1);
  const double e_loss = max_rel(rows, ref.detach()), e1 = max_rel(g1, grads[0]),
               et = max_rel(gt, grads[1]);
  const bool ok = e_loss <= loss_tol && e1 <= grad_tol && et <= 100 * grad_tol && g2.size(0) == 0;
  std::printf("%s supcon m=%ld d=%ld k=%ld tau=%.2f %s: loss %.2e, grad_z %.2e, grad_t %.2e\n",
              ok ? "PASS" : "FAIL", (long)m, (long)d, (long)k, tau, c10::toString(dtype), e_loss,
              e1, et);
  return ok;
}

}  // namespace

int main() {
  torch::manual_seed(0);
  int passed = 0, failed = 0;
  struct Case { int64_t n, d; double tau; at::ScalarType dtype; double loss_tol, grad_tol; };
  const std::vector<Case> cases = {
      {3, 7, 0.5, at::kDouble, 1e-12, 1e-10}, {37, 19, 0.1, at::kDouble, 1e-12, 1e-10},
      {300, 130, 0.2, at::kDouble, 1e-12, 1e-10}, {37, 19, 0.1, at::kFloat, 1e-5, 1e-4},
      {300, 130, 0.5, at::kFloat, 1e-5, 1e-4}};
  for (const auto& c : cases) {
    (check_case(c.n, c.d, c.tau, c.dtype, c.loss_tol, c.grad_tol) ? passed : failed) += 1;
  }
  (check_supcon_case(40, 9, 7, 0.2, at::kDouble, 1e-12, 1e-10) ? passed : failed) += 1;
  (check_supcon_case(300, 33, 10, 0.1, at::kFloat, 1e-5, 1e-4) ? passed : failed) += 1;
  // Bad input reaches the kernel's own checks as a c10::Error.
  try {
    forward_op().call(torch::randn({4, 3}), torch::randn({5, 3}), torch::tensor(0.5f), std::nullopt,
                      false, false, 0, -1);
    std::printf("FAIL mismatched shapes were accepted\n");
    ++failed;
  } catch (const c10::Error& e) {
    const bool ok = std::string(e.what()).find("same shape") != std::string::npos;
    std::printf("%s mismatched shapes raise\n", ok ? "PASS" : "FAIL");
    (ok ? passed : failed) += 1;
  }
  std::printf("%d passed, %d failed\n", passed, failed);
  return failed == 0 ? 0 : 1;
}
