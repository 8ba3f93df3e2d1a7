// What the CPU and CUDA kernels of fastclr::nt_xent_forward / _backward share: the kernels' own
// input invariants and the local rows. One copy, so the two backends cannot drift. (User-facing
// checks, with messages naming the public function and argument, are Python's: fastclr/loss.py.)
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>

namespace fastclr {

// The second view: z2, or no rows (labels mode: every row is in z1).
inline at::Tensor second_view(const at::Tensor& z1, const std::optional<at::Tensor>& z2) {
  return z2.has_value() ? *z2 : z1.narrow(0, 0, 0);
}

// M, the rows of [z1; z2]. Paired mode (no labels): z1, z2 of one shape (N >= 1, D >= 1).
// Labels mode: M >= 1 integer labels on the inputs' device. temperature: one element there.
inline int64_t check_nt_xent_inputs(const at::Tensor& z1, const at::Tensor& z2,
                                    const std::optional<at::Tensor>& labels,
                                    const at::Tensor& temperature) {
  TORCH_CHECK(z1.dim() == 2 && z2.dim() == 2, "fastclr: z1 and z2 must be 2-D (N, D), got ",
              z1.sizes(), " and ", z2.sizes());
  TORCH_CHECK(z1.scalar_type() == z2.scalar_type(), "fastclr: z1 and z2 must share a dtype");
  TORCH_CHECK(z1.size(1) == z2.size(1) && z1.size(1) >= 1,
              "fastclr: z1 and z2 need the same D >= 1, got ", z1.sizes(), " and ", z2.sizes());
  TORCH_CHECK(z2.device() == z1.device() && temperature.device() == z1.device(),
              "fastclr: z1, z2 and temperature must be on the same device");
  TORCH_CHECK(temperature.numel() == 1, "fastclr: temperature must be a 0-dim tensor");
  const int64_t m = z1.size(0) + z2.size(0);
  if (labels.has_value()) {
    TORCH_CHECK(m >= 1, "fastclr: need at least one row");
    TORCH_CHECK(labels->dim() == 1 && labels->numel() == m, "fastclr: labels must be (", m,
                ",), got ", labels->sizes());
    TORCH_CHECK(!at::isFloatingType(labels->scalar_type()) && labels->scalar_type() != at::kBool &&
                    !at::isComplexType(labels->scalar_type()),
                "fastclr: labels must be an integer tensor, got ", labels->scalar_type());
    TORCH_CHECK(labels->device() == z1.device(), "fastclr: labels must be on z1's device");
  } else {
    TORCH_CHECK(z1.sizes() == z2.sizes() && z1.size(0) >= 1,
                "fastclr: z1 and z2 must have the same shape (N >= 1), got ", z1.sizes(),
                " and ", z2.sizes());
  }
  return m;
}

// The per-row statistics the forward saves for the backward, the rows of its (kNumStats, M)
// `stats` output: lse over j != i, lse over the positives, the negatives' share Q of the
// softmax mass, |P(i)|.
enum Stat : int64_t { kLse = 0, kLsePos = 1, kQ = 2, kCount = 3, kNumStats = 4 };

// What the backward reads from the forward: the per-row upstream gradient and norms (M each)
// and the statistics.
inline void check_nt_xent_saved(const at::Tensor& grad_rows, const at::Tensor& norm,
                                const at::Tensor& stats, int64_t m) {
  TORCH_CHECK(grad_rows.numel() == m && norm.numel() == m,
              "fastclr: nt_xent_backward expects grad_rows and norm of ", m, " elements");
  TORCH_CHECK(stats.dim() == 2 && stats.size(0) == kNumStats && stats.size(1) == m,
              "fastclr: nt_xent_backward expects stats of shape (", kNumStats, ", ", m, ")");
}

// The rows that get a loss (a rank's share of a gathered batch): i with (i mod span) in
// [lo, lo + count), span = N (paired mode: a rank's rows of both views) or M (labels); a
// row_count of -1 reaches the end. The others are left as rows without a positive.
struct LocalRows {
  int64_t lo, count, span, n;
  bool paired;
  bool all() const { return lo == 0 && count == span; }
  // whether rows [b0, b1) meet the local rows
  bool meets(int64_t b0, int64_t b1) const {
    auto hits = [&](int64_t r0) { return b0 < r0 + count && r0 < b1; };
    return count > 0 && (hits(lo) || (paired && hits(n + lo)));
  }
};

inline LocalRows local_rows(int64_t row_lo, int64_t row_count, int64_t m, int64_t n, bool paired) {
  const int64_t span = paired ? n : m;
  const int64_t count = row_count < 0 ? span - row_lo : row_count;
  TORCH_CHECK(row_lo >= 0 && count >= 0 && row_lo + count <= span, "fastclr: local rows [",
              row_lo, ", ", row_lo, " + ", count, ") must lie within [0, ", span, ")");
  return {row_lo, count, span, n, paired};
}

}  // namespace fastclr
