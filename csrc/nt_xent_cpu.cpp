// CPU kernels of fastclr::nt_xent_forward / nt_xent_backward.
//
// Memory: O(M*D). The rows are normalised once into a float32 (float64 for float64 input)
// workspace U; the similarity matrix is only ever seen as tiles (a few hundred KiB per
// thread) produced by BLAS (at::mm on tile views) and consumed at once by fused,
// vectorised loops: online logsumexp in the forward, P_ij / P_ji in the backward.
//
// Backward: S is symmetric, so one tile S_IJ gives both P_IJ = exp(S_IJ - lse_I) and
// P_JI^T = exp(S_IJ - lse_J). The positive pairs are left out of the tiles: their weight
// -(1 - P_ip) is formed as -Q_i, the sum of the negatives' P (no cancellation when P_ip ~ 1). Only the tiles with I <= J are computed. Their two gradient
// updates (rows of I and rows of J) are scheduled round-robin: in each round every row block
// appears in at most one tile, so the tiles of a round run in parallel without locks and the
// result is bitwise independent of the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <cstdint>
#include <limits>
#include <utility>
#include <vector>

#include "cpu_utils.h"


namespace fastclr {
namespace {

constexpr double kNormEps = 1e-12;  // as F.normalize
constexpr int64_t kFwdRowBlock = 128;
constexpr int64_t kFwdColBlock = 1024;
constexpr int64_t kBwdBlock = 256;

// exp(x) without branches or calls, so the loops around it vectorise: x = n ln2 + r,
// |r| <= ln2/2, a degree-6 polynomial for e^r (Cephes' expf coefficients, ~1 ulp), and 2^n
// built in the exponent bits. x below -87.3 gives 0 (exp(-inf) = 0 masks the diagonal); NaN
// stays NaN, so a non-finite input can never turn into a finite loss.
FASTCLR_INLINE float vexp(float x) {
  // Ternaries rather than std::fmin/fmax: those are libm calls in some clones.
  const float xl = x < -87.3f ? -87.3f : x;
  const float xc = xl > 88.3f ? 88.3f : xl;
  const float kMagic = 12582912.0f;  // 1.5 * 2^23: adding it rounds to the nearest integer
  const float n = (xc * 1.44269504088896341f + kMagic) - kMagic;
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  // A bit cast, not memcpy: under `omp simd` a memcpy'd local defeats vectorisation.
  const float scale = __builtin_bit_cast(float, (static_cast<int32_t>(n) + 127) << 23);
  const float y = x < -87.3f ? 0.0f : p * scale;
  return x != x ? x : y;
}
FASTCLR_INLINE double vexp(double x) { return std::exp(x); }

// One column chunk of the forward's online logsumexp over the negatives of one row: s (length
// c) holds raw dot products u_i . u_j; it is scaled by 1/tau in place, the self column and the
// positive's (when in the chunk) masked, and the running max / sum / rank of the row updated.
// The positive logit is read from the tile itself (pos_col >= 0), so the loss and the rank
// compare the very same numbers; the caller puts the positive's column in a row's first chunk. The rank counts the
// columns above the positive twice: all of them (rank[0]) and those of the other view alone,
// chunk columns [cross_lo, cross_hi) (rank[1], google-research/simclr's contrast_acc).
template <typename acc_t>
FASTCLR_INLINE void fwd_row_chunk_impl(acc_t* __restrict s, int64_t c, acc_t inv_tau,
                                       int64_t self_col, int64_t pos_col, acc_t* pos_logit,
                                       bool count_rank, int64_t cross_lo, int64_t cross_hi,
                                       acc_t* run_max, acc_t* run_sum, int32_t* rank) {
  const acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  acc_t cmax = kNegInf;
#pragma omp simd reduction(max : cmax)
  for (int64_t k = 0; k < c; ++k) {
    s[k] *= inv_tau;
    cmax = s[k] > cmax ? s[k] : cmax;
  }
  if (pos_col >= 0) *pos_logit = s[pos_col];
  if (self_col >= 0 || pos_col >= 0) {
    if (self_col >= 0) s[self_col] = kNegInf;
    if (pos_col >= 0) s[pos_col] = kNegInf;
    cmax = kNegInf;
#pragma omp simd reduction(max : cmax)
    for (int64_t k = 0; k < c; ++k) cmax = s[k] > cmax ? s[k] : cmax;
  }
  const acc_t m_new = std::fmax(*run_max, cmax);
  if (m_new == kNegInf) return;  // a chunk holding no negative (only self / positive)
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < c; ++k) sum += vexp(s[k] - m_new);
  *run_sum = *run_sum * vexp(*run_max - m_new) + sum;
  *run_max = m_new;
  if (count_rank) {
    const acc_t pos = *pos_logit;  // the positive and the self are -inf here: they never count
    int32_t above = 0, above_cross = 0;
#pragma omp simd reduction(+ : above, above_cross)
    for (int64_t k = 0; k < c; ++k) {
      const int32_t hit = s[k] > pos ? 1 : 0;
      above += hit;
      above_cross += (k >= cross_lo && k < cross_hi) ? hit : 0;
    }
    rank[0] += above;
    rank[1] += above_cross;
  }
}

FASTCLR_MULTIVERSION void fwd_row_chunk(float* s, int64_t c, float inv_tau, int64_t self_col,
                                        int64_t pos_col, float* pos_logit, bool count_rank,
                                        int64_t cross_lo, int64_t cross_hi, float* run_max,
                                        float* run_sum, int32_t* rank) {
  fwd_row_chunk_impl<float>(s, c, inv_tau, self_col, pos_col, pos_logit, count_rank, cross_lo,
                            cross_hi, run_max, run_sum, rank);
}
void fwd_row_chunk(double* s, int64_t c, double inv_tau, int64_t self_col, int64_t pos_col,
                   double* pos_logit, bool count_rank, int64_t cross_lo, int64_t cross_hi,
                   double* run_max, double* run_sum, int32_t* rank) {
  fwd_row_chunk_impl<double>(s, c, inv_tau, self_col, pos_col, pos_logit, count_rank, cross_lo,
                             cross_hi, run_max, run_sum, rank);
}

// A_ij = w_i P_ij + w_j P_ji for the columns [b0, b1) of one row of a backward tile, in
// place over the raw dot products; returns the row's sum of A_ij s_ij. Also accumulates the
// negatives' probability mass: *q_i += sum_b P_ij (this row's), q_col[b] += P_ji (the columns').
template <typename acc_t>
FASTCLR_INLINE acc_t bwd_row_span_impl(acc_t* __restrict row, int64_t b0, int64_t b1,
                                       acc_t inv_tau, acc_t lse_i, acc_t w_i,
                                       const acc_t* __restrict lse_j,
                                       const acc_t* __restrict w_j, acc_t* q_i,
                                       acc_t* __restrict q_col) {
  acc_t t = 0, q = 0;
#pragma omp simd reduction(+ : t, q)
  for (int64_t b = b0; b < b1; ++b) {
    const acc_t x = row[b] * inv_tau;
    const acc_t p_ij = vexp(x - lse_i), p_ji = vexp(x - lse_j[b]);
    const acc_t v = w_i * p_ij + w_j[b] * p_ji;
    t += v * x;
    q += p_ij;
    q_col[b] += p_ji;
    row[b] = v;
  }
  *q_i += q;
  return t;
}

// Multiversioned per row span rather than per tile: inlined into the tile's branches, GCC
// left the off-diagonal loop scalar.
FASTCLR_MULTIVERSION float bwd_row_span(float* row, int64_t b0, int64_t b1, float inv_tau,
                                        float lse_i, float w_i, const float* lse_j,
                                        const float* w_j, float* q_i, float* q_col) {
  return bwd_row_span_impl<float>(row, b0, b1, inv_tau, lse_i, w_i, lse_j, w_j, q_i, q_col);
}
double bwd_row_span(double* row, int64_t b0, int64_t b1, double inv_tau, double lse_i,
                    double w_i, const double* lse_j, const double* w_j, double* q_i,
                    double* q_col) {
  return bwd_row_span_impl<double>(row, b0, b1, inv_tau, lse_i, w_i, lse_j, w_j, q_i, q_col);
}

// One backward tile, in place: s (r x c, raw dot products of row block i0 with column block
// j0) becomes A_ij = w_i P_ij + w_j P_ji with P_ij = exp(s_ij / tau - lse_i), over the
// negatives only: the self entries (their exp would be huge: s_ii = 1/tau) and the positive
// pairs (j = p(i)) are skipped and set to 0. The positives' weight is formed from q, the
// negatives' mass Q_i = sum_{j != i, p(i)} P_ij = 1 - P_{i,p(i)}, without the cancellation of
// 1 - P when P ~ 1 (a saturated batch). q[i] gets this tile's part of Q_i for its rows and, off
// the diagonal, for its columns (q_col: c scratch values). Returns sum_ij A_ij s_ij / tau over
// the tile, halved on a diagonal tile, where A already holds both (i, j) and (j, i).
template <typename acc_t>
double bwd_tile(acc_t* s, int64_t r, int64_t c, int64_t i0, int64_t j0, int64_t n,
                acc_t inv_tau, const acc_t* lse, const acc_t* w, acc_t* q, acc_t* q_col) {
  const bool diag = i0 == j0;
  const int64_t m = 2 * n;
  std::fill(q_col, q_col + c, acc_t(0));
  double total = 0;
  for (int64_t a = 0; a < r; ++a) {
    acc_t* row = s + a * c;
    const int64_t i = i0 + a;
    const acc_t lse_i = lse[i], w_i = w[i];
    // the (at most two) excluded columns of this row, in order; c marks "none"
    int64_t skip0 = diag ? a : c, skip1 = (i + n) % m - j0;
    if (skip1 < 0 || skip1 >= c) skip1 = c;
    if (skip1 < skip0) std::swap(skip0, skip1);
    acc_t q_i = 0;
    int64_t b0 = 0;
    for (const int64_t skip : {skip0, skip1}) {
      if (skip > b0) total += bwd_row_span(row, b0, skip, inv_tau, lse_i, w_i, lse + j0, w + j0,
                                           &q_i, q_col);
      if (skip < c) row[skip] = 0;
      b0 = std::max(b0, skip + 1);
    }
    if (b0 < c) total += bwd_row_span(row, b0, c, inv_tau, lse_i, w_i, lse + j0, w + j0, &q_i, q_col);
    q[i] += q_i;
  }
  if (!diag) {  // on a diagonal tile the column sums repeat the row sums
    for (int64_t b = 0; b < c; ++b) q[j0 + b] += q_col[b];
  }
  return diag ? 0.5 * total : total;
}

void check_pair(const at::Tensor& z1, const at::Tensor& z2) {
  TORCH_CHECK(z1.dim() == 2 && z2.dim() == 2, "fastclr: z1 and z2 must be 2-D (N, D), got ",
              z1.sizes(), " and ", z2.sizes());
  TORCH_CHECK(z1.sizes() == z2.sizes(), "fastclr: z1 and z2 must have the same shape, got ",
              z1.sizes(), " and ", z2.sizes());
  TORCH_CHECK(z1.scalar_type() == z2.scalar_type(), "fastclr: z1 and z2 must share a dtype");
  TORCH_CHECK(z1.size(0) >= 1 && z1.size(1) >= 1, "fastclr: need N >= 1 and D >= 1");
}

at::ScalarType acc_type_of(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// U = [z1; z2] / max(||z||, eps) in acc_t, and the clamped norms. Norms accumulate in double
// so that large or tiny rows neither overflow nor underflow; U divides by the norm rounded to
// acc_t, so the backward, which gets that norm back, recomputes bitwise the same U (and a
// 1-D row normalises to exactly +-1).
template <typename scalar_t, typename acc_t>
void normalize_rows(const at::Tensor& z1, const at::Tensor& z2, acc_t* u, acc_t* norm,
                    bool have_norm) {
  const int64_t n = z1.size(0), d = z1.size(1);
  const scalar_t* p1 = z1.const_data_ptr<scalar_t>();
  const scalar_t* p2 = z2.const_data_ptr<scalar_t>();
  at::parallel_for(0, 2 * n, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* src = i < n ? p1 + i * d : p2 + (i - n) * d;
      if (!have_norm) {
        double sq = 0;
        for (int64_t k = 0; k < d; ++k) {
          const double v = static_cast<double>(src[k]);
          sq += v * v;
        }
        norm[i] = static_cast<acc_t>(std::max(std::sqrt(sq), kNormEps));
      }
      const double den = static_cast<double>(norm[i]);
      acc_t* dst = u + i * d;
      for (int64_t k = 0; k < d; ++k) dst[k] = static_cast<acc_t>(static_cast<double>(src[k]) / den);
    }
  });
}

// A (rows x cols) view over the front of a flat buffer, contiguous whatever the shape.
at::Tensor tile_view(const at::Tensor& flat, int64_t rows, int64_t cols) {
  return flat.narrow(0, 0, rows * cols).view({rows, cols});
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nt_xent_forward_cpu(
    const at::Tensor& z1_in, const at::Tensor& z2_in, const at::Tensor& temperature,
    bool compute_accuracy) {
  check_pair(z1_in, z2_in);
  const at::Tensor z1 = z1_in.contiguous(), z2 = z2_in.contiguous();
  const int64_t n = z1.size(0), d = z1.size(1), m = 2 * n;
  const auto acc_type = acc_type_of(z1.scalar_type());
  const auto opts = z1.options().dtype(acc_type);

  at::Tensor u = at::empty({m, d}, opts);
  at::Tensor norm = at::empty({m}, opts);
  at::Tensor lse = at::empty({m}, opts);
  at::Tensor row_loss = at::empty({m}, opts);
  // rank: (2, M), #columns above the positive among all others / the other view's alone
  at::Tensor rank = compute_accuracy ? at::zeros({2, m}, z1.options().dtype(at::kInt))
                                     : at::empty({0}, z1.options().dtype(at::kInt));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z1.scalar_type(), "nt_xent_forward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const acc_t inv_tau = static_cast<acc_t>(1.0 / temperature.item<double>());
    acc_t* pu = u.data_ptr<acc_t>();
    normalize_rows<scalar_t, acc_t>(z1, z2, pu, norm.data_ptr<acc_t>(), false);
    acc_t* plse = lse.data_ptr<acc_t>();
    acc_t* ploss = row_loss.data_ptr<acc_t>();
    int32_t* prank = compute_accuracy ? rank.data_ptr<int32_t>() : nullptr;

    // Row blocks never straddle row N, so a block's positives form one contiguous range
    // p(i0) .. p(i0) + r - 1; each block walks the columns starting there (wrapping round),
    // which puts every positive in its row's first chunk.
    const int64_t blocks_per_half = (n + kFwdRowBlock - 1) / kFwdRowBlock;
    const int64_t cols_per_chunk = std::min(kFwdColBlock, m);
    at::parallel_for(0, 2 * blocks_per_half, 1, [&](int64_t b_begin, int64_t b_end) {
      at::Tensor buf = at::empty({kFwdRowBlock * cols_per_chunk}, opts);
      std::vector<acc_t> run_max(kFwdRowBlock), run_sum(kFwdRowBlock), pos(kFwdRowBlock);
      std::vector<int32_t> run_rank(2 * kFwdRowBlock);
      for (int64_t blk = b_begin; blk < b_end; ++blk) {
        const int64_t half = blk / blocks_per_half;
        const int64_t i0 = half * n + (blk % blocks_per_half) * kFwdRowBlock;
        const int64_t r = std::min(kFwdRowBlock, (half + 1) * n - i0);
        const int64_t start = (i0 + n) % m;
        const int64_t other_lo = half == 0 ? n : 0;  // the other view's rows: [other_lo, +n)
        std::fill(run_max.begin(), run_max.end(), -std::numeric_limits<acc_t>::infinity());
        std::fill(run_sum.begin(), run_sum.end(), acc_t(0));
        std::fill(run_rank.begin(), run_rank.end(), 0);
        const at::Tensor u_rows = u.narrow(0, i0, r);
        for (int64_t done = 0; done < m;) {
          const int64_t j0 = (start + done) % m;
          const int64_t c = std::min({cols_per_chunk, m - done, m - j0});
          const int64_t cross_lo = std::clamp(other_lo - j0, int64_t(0), c);
          const int64_t cross_hi = std::clamp(other_lo + n - j0, int64_t(0), c);
          at::Tensor tile = tile_view(buf, r, c);
          at::mm_out(tile, u_rows, u.narrow(0, j0, c).t());
          acc_t* pt = tile.data_ptr<acc_t>();
          for (int64_t a = 0; a < r; ++a) {
            const int64_t i = i0 + a;
            const int64_t self_col = (i >= j0 && i < j0 + c) ? i - j0 : -1;
            const int64_t pos_col = done == 0 ? a : -1;
            fwd_row_chunk(pt + a * c, c, inv_tau, self_col, pos_col, &pos[a], compute_accuracy,
                          cross_lo, cross_hi, &run_max[a], &run_sum[a], &run_rank[2 * a]);
          }
          done += c;
        }
        for (int64_t a = 0; a < r; ++a) {
          const int64_t i = i0 + a;
          // loss_i = log(1 + exp(lse_neg - s_ip)), lse_i = logaddexp(lse_neg, s_ip): no
          // cancellation of lse_i - s_ip when the positive dominates (low loss); exactly 0
          // without negatives (N = 1).
          const acc_t lse_neg = run_max[a] == -std::numeric_limits<acc_t>::infinity()
                                    ? run_max[a] : run_max[a] + std::log(run_sum[a]);
          const acc_t x = lse_neg - pos[a];
          ploss[i] = std::max(x, acc_t(0)) + std::log1p(std::exp(-std::fabs(x)));
          plse[i] = pos[a] + ploss[i];
          if (prank) {
            prank[i] = run_rank[2 * a];
            prank[m + i] = run_rank[2 * a + 1];
          }
        }
      }
    });
  });
  return {row_loss, lse, norm, rank};
}

// Pairs (I, J), I < J, of nb blocks in nb - 1 (nb even) or nb (nb odd) rounds, each block at
// most once per round (the circle method).
std::vector<std::vector<std::pair<int64_t, int64_t>>> round_robin(int64_t nb) {
  std::vector<std::vector<std::pair<int64_t, int64_t>>> rounds;
  if (nb < 2) return rounds;
  const int64_t n = nb % 2 == 0 ? nb : nb + 1;  // block n - 1 is a bye when nb is odd
  for (int64_t rd = 0; rd < n - 1; ++rd) {
    std::vector<std::pair<int64_t, int64_t>> pairs;
    auto add = [&](int64_t a, int64_t b) {
      if (a >= nb || b >= nb) return;
      pairs.emplace_back(std::min(a, b), std::max(a, b));
    };
    add(rd, n - 1);
    for (int64_t k = 1; k < n / 2; ++k) add((rd + k) % (n - 1), (rd - k + n - 1) % (n - 1));
    rounds.push_back(std::move(pairs));
  }
  return rounds;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> nt_xent_backward_cpu(
    const at::Tensor& grad_rows, const at::Tensor& z1_in, const at::Tensor& z2_in,
    const at::Tensor& temperature, const at::Tensor& norm_in, const at::Tensor& lse_in) {
  check_pair(z1_in, z2_in);
  const at::Tensor z1 = z1_in.contiguous(), z2 = z2_in.contiguous();
  const int64_t n = z1.size(0), d = z1.size(1), m = 2 * n;
  const auto acc_type = acc_type_of(z1.scalar_type());
  const auto opts = z1.options().dtype(acc_type);
  TORCH_CHECK(grad_rows.numel() == m && norm_in.numel() == m && lse_in.numel() == m,
              "fastclr: nt_xent_backward expects grad_rows, norm and lse of ", m,
              " elements");
  const at::Tensor w = grad_rows.to(acc_type).contiguous();
  const at::Tensor norm = norm_in.to(acc_type).contiguous();
  const at::Tensor lse = lse_in.to(acc_type).contiguous();

  at::Tensor grad_z1 = at::empty_like(z1);
  at::Tensor grad_z2 = at::empty_like(z2);
  at::Tensor grad_t = at::empty({}, temperature.options().dtype(acc_type));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z1.scalar_type(), "nt_xent_backward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const acc_t inv_tau = static_cast<acc_t>(1.0 / temperature.item<double>());
    at::Tensor u = at::empty({m, d}, opts);
    acc_t* pu = u.data_ptr<acc_t>();
    const acc_t* pnorm = norm.const_data_ptr<acc_t>();
    normalize_rows<scalar_t, acc_t>(z1, z2, pu, const_cast<acc_t*>(pnorm), true);
    const acc_t* pw = w.const_data_ptr<acc_t>();
    const acc_t* plse = lse.const_data_ptr<acc_t>();

    // G_i = sum_{j != i, p(i)} A_ij u_j, with A_ij = w_i P_ij + w_j P_ji; q_i = Q_i.
    at::Tensor g = at::zeros({m, d}, opts);
    at::Tensor q = at::zeros({m}, opts);
    acc_t* pq = q.data_ptr<acc_t>();
    const int64_t nb = (m + kBwdBlock - 1) / kBwdBlock;
    const int64_t bs = std::min(kBwdBlock, m);
    auto rounds = round_robin(nb);
    std::vector<std::pair<int64_t, int64_t>> diag_round;
    for (int64_t b = 0; b < nb; ++b) diag_round.emplace_back(b, b);
    rounds.push_back(std::move(diag_round));

    double tau_sum = 0;  // sum_i w_i sum_{j != i, p(i)} P_ij s_ij
    for (const auto& pairs : rounds) {
      std::vector<double> partial(pairs.size(), 0.0);
      at::parallel_for(0, static_cast<int64_t>(pairs.size()), 1, [&](int64_t p_begin, int64_t p_end) {
        at::Tensor buf = at::empty({bs * bs}, opts);
        std::vector<acc_t> q_col(bs);
        for (int64_t q = p_begin; q < p_end; ++q) {
          const int64_t i0 = pairs[q].first * kBwdBlock, j0 = pairs[q].second * kBwdBlock;
          const int64_t r = std::min(kBwdBlock, m - i0), c = std::min(kBwdBlock, m - j0);
          const at::Tensor u_i = u.narrow(0, i0, r), u_j = u.narrow(0, j0, c);
          at::Tensor tile = tile_view(buf, r, c);
          at::mm_out(tile, u_i, u_j.t());
          partial[q] = bwd_tile<acc_t>(tile.data_ptr<acc_t>(), r, c, i0, j0, n, inv_tau, plse, pw,
                                       pq, q_col.data());
          at::Tensor g_i = g.narrow(0, i0, r);
          g_i.addmm_(tile, u_j);
          if (i0 != j0) {
            at::Tensor g_j = g.narrow(0, j0, c);
            g_j.addmm_(tile.t(), u_i);
          }
        }
      });
      for (double v : partial) tau_sum += v;
    }

    // Positive terms -(w_i Q_i + w_p Q_p) u_p, the 1/tau factor, and the normalisation's
    // Jacobian (F.normalize's: a clamped norm is a constant, so that row's gradient is simply
    // g / eps).
    const acc_t* pg = g.const_data_ptr<acc_t>();
    scalar_t* gz1 = grad_z1.data_ptr<scalar_t>();
    scalar_t* gz2 = grad_z2.data_ptr<scalar_t>();
    const acc_t eps = static_cast<acc_t>(kNormEps);
    std::vector<double> pos_part(m);
    at::parallel_for(0, m, 64, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> gu(d);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t p = (i + n) % m;
        const acc_t* ui = pu + i * d;
        const acc_t* up = pu + p * d;
        const acc_t* gi = pg + i * d;
        const acc_t wpos = pw[i] * pq[i] + pw[p] * pq[p];
        acc_t dot_up = 0, dot_gu = 0;
        for (int64_t k = 0; k < d; ++k) {
          gu[k] = inv_tau * (gi[k] - wpos * up[k]);
          dot_up += ui[k] * up[k];
          dot_gu += ui[k] * gu[k];
        }
        pos_part[i] = static_cast<double>(pw[i] * pq[i]) * static_cast<double>(dot_up * inv_tau);
        const acc_t den = pnorm[i];
        const bool clamped = den <= eps;
        scalar_t* dst = i < n ? gz1 + i * d : gz2 + (i - n) * d;
        for (int64_t k = 0; k < d; ++k) {
          const acc_t v = clamped ? gu[k] : gu[k] - dot_gu * ui[k];
          dst[k] = static_cast<scalar_t>(v / den);
        }
      }
    });
    double pos_sum = 0;
    for (double v : pos_part) pos_sum += v;
    // dL/dtau = -(1/tau) * sum_i w_i (sum_{j != i, p(i)} P_ij s_ij - Q_i s_{i,p(i)})
    grad_t.fill_(-static_cast<double>(inv_tau) * (tau_sum - pos_sum));
  });
  return {grad_z1, grad_z2, grad_t};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastclr, CPU, m) {
  m.impl("nt_xent_forward", &nt_xent_forward_cpu);
  m.impl("nt_xent_backward", &nt_xent_backward_cpu);
}

}  // namespace fastclr
