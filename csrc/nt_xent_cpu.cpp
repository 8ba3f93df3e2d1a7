// CPU kernels of fastclr::nt_xent_forward / nt_xent_backward: NT-Xent and its label-defined
// family (SupCon, multi-view SimCLR), one body for both.
//
// Rows z = [z1; z2] (M rows). Positives of row i: paired mode (labels undefined, NT-Xent),
// p(i) = (i + N) mod M; labels mode, every j != i with labels_j = labels_i. The kernels keep
// the online logsumexp of the negatives and that of the positives apart (plus the positives'
// sum and count), so that the loss of either form is formed without cancellation:
//   x_i = lse_neg_i - lse_pos_i,  loss_sum_i = log(1 + e^x_i),
//   loss_mean_i = loss_sum_i + (lse_pos_i - mean_pos_i),  Q_i = sigmoid(x_i) (negatives' mass).
// In paired mode lse_pos_i = s_{i,p(i)} exactly and both forms are NT-Xent.
//
// Memory: O(M*D). The rows are normalised once into a float32 (float64 for float64 input)
// workspace U; the similarity matrix is only ever seen as tiles (a few hundred KiB per
// thread) produced by BLAS (at::mm on tile views) and consumed at once by fused,
// vectorised loops: online logsumexps in the forward, the gradient coefficients in the backward.
//
// Backward: S is symmetric, so one tile S_IJ gives the coefficients of both rows and columns:
// A_ij = w_i c_ij + w_j c_ji with c_ij = P_ij = exp(s_ij - lse_i) for a negative and, for a
// positive, c_ij = -Q_i R_ij [+ (R_ij - 1/|P(i)|) for "mean"], R_ij = exp(s_ij - lse_pos_i):
// that is P_ij - dT_i/ds_ij rewritten so that nothing cancels when the positives dominate
// (Q_i ~ 0). Only the tiles with I <= J are computed. Their two gradient updates (rows of I and
// rows of J) are scheduled round-robin: in each round every row block appears in at most one
// tile, so the tiles of a round run in parallel without locks and the result is bitwise
// independent of the thread count.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <initializer_list>
#include <limits>
#include <optional>
#include <utility>
#include <vector>

#include "cpu_utils.h"
#include "nt_xent_common.h"


namespace fastclr {
namespace {

constexpr double kNormEps = 1e-12;  // as F.normalize
constexpr int64_t kFwdRowBlock = 128;
constexpr int64_t kFwdColBlock = 1024;
constexpr int64_t kBwdBlock = 256;

// exp(x) without branches or calls, so the loops around it vectorise: x = n ln2 + r,
// |r| <= ln2/2, a degree-6 polynomial for e^r (Cephes' expf coefficients, ~1 ulp), and 2^n
// built in the exponent bits. x below -87.3 gives 0 (exp(-inf) = 0 masks the diagonal); NaN
// stays NaN, so a non-finite input can never turn into a finite loss. vexp(0) = 1 exactly.
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

// The running state of one row in the forward: the online logsumexps (max, sum of exp) of
// its negatives and of its positives, the positives' logit sum and count, and the ranks.
template <typename acc_t>
struct RowState {
  acc_t m_neg, l_neg, m_pos, l_pos, sum_pos, cnt;
  int32_t rank[2];
  void reset() {
    m_neg = m_pos = -std::numeric_limits<acc_t>::infinity();
    l_neg = l_pos = sum_pos = cnt = 0;
    rank[0] = rank[1] = 0;
  }
};

// Folds a chunk's (max, sum of exp(x - max)) into a running logsumexp; a chunk without
// entries of that kind (cmax = -inf) changes nothing.
template <typename acc_t>
FASTCLR_INLINE void fold(acc_t* run_max, acc_t* run_sum, acc_t m_new, acc_t sum) {
  if (m_new == -std::numeric_limits<acc_t>::infinity()) return;
  *run_sum = *run_sum * vexp(*run_max - m_new) + sum;
  *run_max = m_new;
}

// Paired mode, one column chunk of one row: s (length c) holds raw dot products u_i . u_j; it
// is scaled by 1/tau in place, the self column and the positive's (pos_col >= 0: it is in the
// row's first chunk) set to -inf, and the negatives' running logsumexp updated. The positive
// logit is read from the tile itself, so the loss and the rank compare the very same numbers.
template <typename acc_t>
FASTCLR_INLINE void fwd_paired_chunk_impl(acc_t* __restrict s, int64_t c, acc_t inv_tau,
                                          int64_t self_col, int64_t pos_col, RowState<acc_t>* st) {
  const acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  acc_t cmax = kNegInf;
#pragma omp simd reduction(max : cmax)
  for (int64_t k = 0; k < c; ++k) {
    s[k] *= inv_tau;
    cmax = s[k] > cmax ? s[k] : cmax;
  }
  if (pos_col >= 0) {
    st->m_pos = st->sum_pos = s[pos_col];
    st->l_pos = st->cnt = 1;
  }
  if (self_col >= 0 || pos_col >= 0) {
    if (self_col >= 0) s[self_col] = kNegInf;
    if (pos_col >= 0) s[pos_col] = kNegInf;
    cmax = kNegInf;
#pragma omp simd reduction(max : cmax)
    for (int64_t k = 0; k < c; ++k) cmax = s[k] > cmax ? s[k] : cmax;
  }
  const acc_t m_new = std::fmax(st->m_neg, cmax);
  if (m_new == kNegInf) return;  // a chunk holding no negative (only self / positive)
  acc_t sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t k = 0; k < c; ++k) sum += vexp(s[k] - m_new);
  fold(&st->m_neg, &st->l_neg, m_new, sum);
}

// Labels mode, one column chunk of one row: positives are the columns of equal label (the
// self column, set to -inf, is neither). Both running logsumexps, the positives' sum and count.
template <typename acc_t>
FASTCLR_INLINE void fwd_labels_chunk_impl(acc_t* __restrict s, int64_t c, acc_t inv_tau,
                                          int64_t self_col, int64_t lab_i,
                                          const int64_t* __restrict lab_j, RowState<acc_t>* st) {
  const acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  acc_t mneg = kNegInf, mpos = kNegInf;
#pragma omp simd reduction(max : mneg, mpos)
  for (int64_t k = 0; k < c; ++k) {
    const acc_t x = k == self_col ? kNegInf : s[k] * inv_tau;
    s[k] = x;
    const bool pos = lab_j[k] == lab_i && k != self_col;
    mneg = !pos && x > mneg ? x : mneg;
    mpos = pos && x > mpos ? x : mpos;
  }
  const acc_t mn = std::fmax(st->m_neg, mneg), mp = std::fmax(st->m_pos, mpos);
  const acc_t mn_s = mn == kNegInf ? acc_t(0) : mn, mp_s = mp == kNegInf ? acc_t(0) : mp;
  acc_t ln = 0, lp = 0, sp = 0, cp = 0;
#pragma omp simd reduction(+ : ln, lp, sp, cp)
  for (int64_t k = 0; k < c; ++k) {
    const bool pos = lab_j[k] == lab_i && k != self_col;
    const acc_t x = s[k];
    const acc_t e = vexp(x - (pos ? mp_s : mn_s));
    ln += pos ? acc_t(0) : e;
    lp += pos ? e : acc_t(0);
    sp += pos ? x : acc_t(0);
    cp += pos ? acc_t(1) : acc_t(0);
  }
  fold(&st->m_neg, &st->l_neg, mn, ln);
  fold(&st->m_pos, &st->l_pos, mp, lp);
  st->sum_pos += sp;
  st->cnt += cp;
}

// The negatives of a chunk scoring above `thresh` (the row's best positive): all of them and
// those in columns [cross_lo, cross_hi) (paired mode: the other view, google-research/simclr's
// contrast_acc). s holds raw products times `scale` = the logits (paired mode passes the chunk
// already scaled, self and positive at -inf, with scale 1 and no labels).
template <typename acc_t>
FASTCLR_INLINE void count_above_impl(const acc_t* __restrict s, int64_t c, acc_t scale,
                                     int64_t self_col, acc_t thresh, int64_t lab_i,
                                     const int64_t* __restrict lab_j, int64_t cross_lo,
                                     int64_t cross_hi, int32_t* rank) {
  int32_t above = 0, above_cross = 0;
  if (lab_j == nullptr) {
#pragma omp simd reduction(+ : above, above_cross)
    for (int64_t k = 0; k < c; ++k) {
      const int32_t hit = s[k] * scale > thresh ? 1 : 0;
      above += hit;
      above_cross += (k >= cross_lo && k < cross_hi) ? hit : 0;
    }
  } else {
#pragma omp simd reduction(+ : above, above_cross)
    for (int64_t k = 0; k < c; ++k) {
      const int32_t hit = (s[k] * scale > thresh && lab_j[k] != lab_i && k != self_col) ? 1 : 0;
      above += hit;
      above_cross += (k >= cross_lo && k < cross_hi) ? hit : 0;
    }
  }
  rank[0] += above;
  rank[1] += above_cross;
}

FASTCLR_MULTIVERSION void fwd_paired_chunk(float* s, int64_t c, float inv_tau, int64_t self_col,
                                           int64_t pos_col, RowState<float>* st) {
  fwd_paired_chunk_impl<float>(s, c, inv_tau, self_col, pos_col, st);
}
void fwd_paired_chunk(double* s, int64_t c, double inv_tau, int64_t self_col, int64_t pos_col,
                      RowState<double>* st) {
  fwd_paired_chunk_impl<double>(s, c, inv_tau, self_col, pos_col, st);
}
FASTCLR_MULTIVERSION void fwd_labels_chunk(float* s, int64_t c, float inv_tau, int64_t self_col,
                                           int64_t lab_i, const int64_t* lab_j,
                                           RowState<float>* st) {
  fwd_labels_chunk_impl<float>(s, c, inv_tau, self_col, lab_i, lab_j, st);
}
void fwd_labels_chunk(double* s, int64_t c, double inv_tau, int64_t self_col, int64_t lab_i,
                      const int64_t* lab_j, RowState<double>* st) {
  fwd_labels_chunk_impl<double>(s, c, inv_tau, self_col, lab_i, lab_j, st);
}
FASTCLR_MULTIVERSION void count_above(const float* s, int64_t c, float scale, int64_t self_col,
                                      float thresh, int64_t lab_i, const int64_t* lab_j,
                                      int64_t cross_lo, int64_t cross_hi, int32_t* rank) {
  count_above_impl<float>(s, c, scale, self_col, thresh, lab_i, lab_j, cross_lo, cross_hi, rank);
}
void count_above(const double* s, int64_t c, double scale, int64_t self_col, double thresh,
                 int64_t lab_i, const int64_t* lab_j, int64_t cross_lo, int64_t cross_hi,
                 int32_t* rank) {
  count_above_impl<double>(s, c, scale, self_col, thresh, lab_i, lab_j, cross_lo, cross_hi, rank);
}

// A row's loss and saved statistics from its final state: lse over j != i, lse_pos, the
// negatives' mass Q = sigmoid(lse_neg - lse_pos), |P(i)|. A row without a positive has loss 0.
template <typename acc_t>
acc_t finish_row(const RowState<acc_t>& st, bool mean, acc_t* stats, int64_t m, int64_t i) {
  const acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const acc_t lse_neg = st.m_neg == kNegInf ? kNegInf : st.m_neg + std::log(st.l_neg);
  stats[kCount * m + i] = st.cnt;
  if (st.cnt == 0) {
    stats[kLse * m + i] = lse_neg;
    stats[kLsePos * m + i] = kNegInf;
    stats[kQ * m + i] = 1;
    return 0;
  }
  const acc_t lse_pos = st.m_pos + std::log(st.l_pos);
  const acc_t x = lse_neg - lse_pos;  // -inf without negatives: loss log(1 + 0) = 0, Q = 0
  const acc_t ex = std::exp(-std::fabs(x));
  const acc_t softplus = std::max(x, acc_t(0)) + std::log1p(ex);
  stats[kLse * m + i] = lse_pos + softplus;
  stats[kLsePos * m + i] = lse_pos;
  stats[kQ * m + i] = x >= 0 ? 1 / (1 + ex) : ex / (1 + ex);
  return mean ? softplus + (lse_pos - st.sum_pos / st.cnt) : softplus;
}

// What the backward's coefficient loops read of rows: the saved statistics, 1/|P(i)| and
// the upstream weights (0 for a row without a positive: it contributes nothing).
template <typename acc_t>
struct RowCoefs {
  const acc_t *lse, *lse_pos, *q, *inv_cnt, *w;
};

// A positive entry's coefficient: -Q R + (R - 1/|P|) for "mean" (mean = 1) or -Q R for "sum".
template <typename acc_t>
FASTCLR_INLINE acc_t pos_coef(acc_t r, acc_t q, acc_t inv_cnt, acc_t mean) {
  return mean * (r - inv_cnt) - q * r;
}

// A_ij = w_i c_ij + w_j c_ji for the columns [b0, b1) of one row of a backward tile, in place
// over the raw dot products; returns the row's sum of A_ij s_ij. Without labels every column
// of the span is a negative (the caller leaves the positive out of the spans).
template <typename acc_t, bool kLabels>
FASTCLR_INLINE acc_t bwd_row_span_impl(acc_t* __restrict row, int64_t b0, int64_t b1,
                                       acc_t inv_tau, int64_t i, RowCoefs<acc_t> rc, int64_t j0,
                                       const int64_t* __restrict labels, acc_t mean) {
  const acc_t lse_i = rc.lse[i], lpos_i = rc.lse_pos[i], q_i = rc.q[i], inv_i = rc.inv_cnt[i];
  const acc_t w_i = rc.w[i];
  const acc_t* __restrict lse_j = rc.lse + j0;
  const acc_t* __restrict lpos_j = rc.lse_pos + j0;
  const acc_t* __restrict q_j = rc.q + j0;
  const acc_t* __restrict inv_j = rc.inv_cnt + j0;
  const acc_t* __restrict w_j = rc.w + j0;
  acc_t t = 0;
  if constexpr (kLabels) {
    const int64_t lab_i = labels[i];
    const int64_t* __restrict lab_j = labels + j0;
#pragma omp simd reduction(+ : t)
    for (int64_t b = b0; b < b1; ++b) {
      const acc_t x = row[b] * inv_tau;
      const bool pos = lab_j[b] == lab_i;
      const acc_t e_i = vexp(x - (pos ? lpos_i : lse_i)), e_j = vexp(x - (pos ? lpos_j[b] : lse_j[b]));
      const acc_t c_ij = pos ? pos_coef(e_i, q_i, inv_i, mean) : e_i;
      const acc_t c_ji = pos ? pos_coef(e_j, q_j[b], inv_j[b], mean) : e_j;
      const acc_t v = w_i * c_ij + w_j[b] * c_ji;
      t += v * x;
      row[b] = v;
    }
  } else {
#pragma omp simd reduction(+ : t)
    for (int64_t b = b0; b < b1; ++b) {
      const acc_t x = row[b] * inv_tau;
      const acc_t v = w_i * vexp(x - lse_i) + w_j[b] * vexp(x - lse_j[b]);
      t += v * x;
      row[b] = v;
    }
  }
  return t;
}

// Multiversioned per row span rather than per tile: inlined into the tile's branches, GCC
// left the off-diagonal loop scalar.
template <bool kLabels>
FASTCLR_MULTIVERSION float bwd_row_span(float* row, int64_t b0, int64_t b1, float inv_tau,
                                        int64_t i, RowCoefs<float> rc, int64_t j0,
                                        const int64_t* labels, float mean) {
  return bwd_row_span_impl<float, kLabels>(row, b0, b1, inv_tau, i, rc, j0, labels, mean);
}
template <bool kLabels>
double bwd_row_span(double* row, int64_t b0, int64_t b1, double inv_tau, int64_t i,
                    RowCoefs<double> rc, int64_t j0, const int64_t* labels, double mean) {
  return bwd_row_span_impl<double, kLabels>(row, b0, b1, inv_tau, i, rc, j0, labels, mean);
}

// One backward tile, in place: s (r x c, raw dot products of row block i0 with column block
// j0) becomes A_ij = w_i c_ij + w_j c_ji. The self entries (their exp would be huge: s_ii =
// 1/tau) are skipped and set to 0. In paired mode the positive pair (at most one column per
// row) is left out of the vectorised spans and done on its own: |P| = 1, so R = 1 and c = -Q.
// Returns sum_ij A_ij s_ij over the tile, halved on a diagonal tile, where A already holds
// both (i, j) and (j, i).
template <typename acc_t>
double bwd_tile(acc_t* s, int64_t r, int64_t c, int64_t i0, int64_t j0, int64_t n, int64_t m,
                acc_t inv_tau, RowCoefs<acc_t> rc, const int64_t* labels, acc_t mean) {
  const bool diag = i0 == j0;
  double total = 0;
  for (int64_t a = 0; a < r; ++a) {
    acc_t* row = s + a * c;
    const int64_t i = i0 + a;
    // the (at most two) excluded columns of this row, in order; c marks "none"
    int64_t skip0 = diag ? a : c, skip1 = c;
    if (labels == nullptr) {
      skip1 = (i + n) % m - j0;
      if (skip1 < 0 || skip1 >= c) skip1 = c;
      if (skip1 < skip0) std::swap(skip0, skip1);
    }
    int64_t b0 = 0;
    for (const int64_t skip : {skip0, skip1}) {
      if (skip > b0) {
        total += labels ? bwd_row_span<true>(row, b0, skip, inv_tau, i, rc, j0, labels, mean)
                        : bwd_row_span<false>(row, b0, skip, inv_tau, i, rc, j0, labels, mean);
      }
      if (skip < c) {
        const int64_t j = j0 + skip;
        acc_t v = 0;
        if (j != i) {  // the positive pair of paired mode
          const acc_t x = row[skip] * inv_tau;
          v = rc.w[i] * pos_coef(acc_t(1), rc.q[i], acc_t(1), mean) +
              rc.w[j] * pos_coef(acc_t(1), rc.q[j], acc_t(1), mean);
          total += v * x;
        }
        row[skip] = v;
      }
      b0 = std::max(b0, skip + 1);
    }
    if (b0 < c) {
      total += labels ? bwd_row_span<true>(row, b0, c, inv_tau, i, rc, j0, labels, mean)
                      : bwd_row_span<false>(row, b0, c, inv_tau, i, rc, j0, labels, mean);
    }
  }
  return diag ? 0.5 * total : total;
}

// Rows outside the local ones: no loss, no positive (the backward weighs them 0), and lse =
// lse_pos = +inf, so that every coefficient the backward forms for them is finite (exp(s - inf)
// = 0) and 0 times it stays 0.
template <typename acc_t>
void clear_rows(acc_t* loss, acc_t* stats, int64_t m) {
  const acc_t inf = std::numeric_limits<acc_t>::infinity();
  std::fill(loss, loss + m, acc_t(0));
  std::fill(stats + kLse * m, stats + kLse * m + m, inf);
  std::fill(stats + kLsePos * m, stats + kLsePos * m + m, inf);
  std::fill(stats + kQ * m, stats + kQ * m + m, acc_t(1));
  std::fill(stats + kCount * m, stats + kCount * m + m, acc_t(0));
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
  const int64_t n1 = z1.size(0), m = n1 + z2.size(0), d = z1.size(1);
  const scalar_t* p1 = z1.const_data_ptr<scalar_t>();
  const scalar_t* p2 = z2.const_data_ptr<scalar_t>();
  at::parallel_for(0, m, 64, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* src = i < n1 ? p1 + i * d : p2 + (i - n1) * d;
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

at::Tensor labels_int64(const std::optional<at::Tensor>& labels) {
  return labels.has_value() ? labels->to(at::kLong).contiguous() : at::Tensor();
}

// One row block's forward: every column chunk of the block (the product U_I U_J^T by BLAS),
// each row's state updated by the paired or the labels chunk loop. Paired mode: the block never
// straddles row N and walks the columns from its positives p(i0) on (wrapping round), which puts
// every positive in its row's first chunk, where its logit -- the rank's threshold -- is read.
// Labels mode: the best positive is known only after the sweep, so a second sweep counts ranks.
template <typename acc_t>
void forward_block(const at::Tensor& u, const int64_t* labels, int64_t i0, int64_t r, int64_t n,
                   int64_t m, acc_t inv_tau, bool compute_accuracy, at::Tensor& buf,
                   std::vector<RowState<acc_t>>& st) {
  const bool paired = labels == nullptr;
  const int64_t cols_per_chunk = std::min(kFwdColBlock, m);
  const int64_t start = paired ? (i0 + n) % m : 0;
  const int64_t other_lo = paired ? (i0 < n ? n : 0) : 0;  // the other view: [other_lo, +n)
  const int64_t other_len = paired ? n : m;
  for (int64_t a = 0; a < r; ++a) st[a].reset();
  const at::Tensor u_rows = u.narrow(0, i0, r);
  const int sweeps = (!paired && compute_accuracy) ? 2 : 1;
  for (int sweep = 0; sweep < sweeps; ++sweep) {
    for (int64_t done = 0; done < m;) {
      const int64_t j0 = (start + done) % m;
      const int64_t c = std::min({cols_per_chunk, m - done, m - j0});
      const int64_t cross_lo = std::clamp(other_lo - j0, int64_t(0), c);
      const int64_t cross_hi = std::clamp(other_lo + other_len - j0, int64_t(0), c);
      at::Tensor tile = tile_view(buf, r, c);
      at::mm_out(tile, u_rows, u.narrow(0, j0, c).t());
      acc_t* pt = tile.data_ptr<acc_t>();
      for (int64_t a = 0; a < r; ++a) {
        const int64_t i = i0 + a;
        const int64_t self_col = (i >= j0 && i < j0 + c) ? i - j0 : -1;
        acc_t* row = pt + a * c;
        if (paired) {
          fwd_paired_chunk(row, c, inv_tau, self_col, done == 0 ? a : -1, &st[a]);
          if (compute_accuracy) {
            count_above(row, c, acc_t(1), -1, st[a].m_pos, 0, nullptr, cross_lo, cross_hi,
                        st[a].rank);
          }
        } else if (sweep == 0) {
          fwd_labels_chunk(row, c, inv_tau, self_col, labels[i], labels + j0, &st[a]);
        } else {
          count_above(row, c, inv_tau, self_col, st[a].m_pos, labels[i], labels + j0, cross_lo,
                      cross_hi, st[a].rank);
        }
      }
      done += c;
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> nt_xent_forward_cpu(
    const at::Tensor& z1_in, const std::optional<at::Tensor>& z2_in, const at::Tensor& temperature,
    const std::optional<at::Tensor>& labels_in, bool mean_positives, bool compute_accuracy,
    int64_t row_lo, int64_t row_count) {
  const at::Tensor z1 = z1_in.contiguous(), z2 = second_view(z1_in, z2_in).contiguous();
  const int64_t m = check_nt_xent_inputs(z1, z2, labels_in, temperature);
  const at::Tensor labels = labels_int64(labels_in);
  const int64_t n = z1.size(0), d = z1.size(1);
  const LocalRows own = local_rows(row_lo, row_count, m, n, !labels.defined());
  const auto acc_type = acc_type_of(z1.scalar_type());
  const auto opts = z1.options().dtype(acc_type);

  at::Tensor u = at::empty({m, d}, opts);
  at::Tensor norm = at::empty({m}, opts);
  at::Tensor stats = at::empty({kNumStats, m}, opts);
  at::Tensor row_loss = at::empty({m}, opts);
  // rank: (2, M), #negatives above the best positive, among all / the other view's alone
  at::Tensor rank = compute_accuracy ? at::zeros({2, m}, z1.options().dtype(at::kInt))
                                     : at::empty({0}, z1.options().dtype(at::kInt));

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z1.scalar_type(), "nt_xent_forward_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const acc_t inv_tau = static_cast<acc_t>(1.0 / temperature.item<double>());
    normalize_rows<scalar_t, acc_t>(z1, z2, u.data_ptr<acc_t>(), norm.data_ptr<acc_t>(), false);
    acc_t* pstats = stats.data_ptr<acc_t>();
    acc_t* ploss = row_loss.data_ptr<acc_t>();
    int32_t* prank = compute_accuracy ? rank.data_ptr<int32_t>() : nullptr;
    const int64_t* plab = labels.defined() ? labels.const_data_ptr<int64_t>() : nullptr;
    if (!own.all()) clear_rows(ploss, pstats, m);
    // Row blocks over the local rows: paired mode, per view (never straddling row N); labels
    // mode, one range of the M rows.
    const int64_t span = own.span;
    const int64_t blocks_per_span = (own.count + kFwdRowBlock - 1) / kFwdRowBlock;
    const int64_t n_blocks = plab ? blocks_per_span : 2 * blocks_per_span;
    at::parallel_for(0, n_blocks, 1, [&](int64_t b_begin, int64_t b_end) {
      at::Tensor buf = at::empty({kFwdRowBlock * std::min(kFwdColBlock, m)}, opts);
      std::vector<RowState<acc_t>> st(kFwdRowBlock);
      for (int64_t blk = b_begin; blk < b_end; ++blk) {
        const int64_t part = blk / blocks_per_span;
        const int64_t first = part * span + own.lo;
        const int64_t i0 = first + (blk % blocks_per_span) * kFwdRowBlock;
        const int64_t r = std::min(kFwdRowBlock, first + own.count - i0);
        forward_block<acc_t>(u, plab, i0, r, n, m, inv_tau, compute_accuracy, buf, st);
        for (int64_t a = 0; a < r; ++a) {
          const int64_t i = i0 + a;
          ploss[i] = finish_row(st[a], mean_positives, pstats, m, i);
          if (prank) {
            prank[i] = st[a].rank[0];
            prank[m + i] = st[a].rank[1];
          }
        }
      }
    });
  });
  return {row_loss, stats, norm, rank};
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

// The backward's schedule: the tile pairs (I, J), I <= J, of kBwdBlock rows that meet the local
// rows (A vanishes on the others: both rows' weights are 0), in rounds where every block appears
// at most once (the off-diagonal pairs round-robin, then the diagonal).
std::vector<std::vector<std::pair<int64_t, int64_t>>> backward_rounds(int64_t m, const LocalRows& own) {
  const int64_t nb = (m + kBwdBlock - 1) / kBwdBlock;
  auto rounds = round_robin(nb);
  std::vector<std::pair<int64_t, int64_t>> diag_round;
  for (int64_t b = 0; b < nb; ++b) diag_round.emplace_back(b, b);
  rounds.push_back(std::move(diag_round));
  auto meets = [&](int64_t b) { return own.meets(b * kBwdBlock, std::min(m, (b + 1) * kBwdBlock)); };
  for (auto& pairs : rounds) {
    pairs.erase(std::remove_if(pairs.begin(), pairs.end(),
                               [&](const auto& p) { return !meets(p.first) && !meets(p.second); }),
                pairs.end());
  }
  return rounds;
}

// What the CPU kernels compute for M rows (N of z1) and the local rows: (forward row blocks,
// their column chunks, each summed over the blocks, as "tiles" of kFwdRowBlock x kFwdColBlock;
// backward diagonal and off-diagonal tiles of kBwdBlock^2; the two block sizes), for
// benchmarks/scale_model.py's test.
std::vector<int64_t> nt_xent_tile_counts(int64_t m, int64_t n, bool labels, int64_t row_lo,
                                         int64_t row_count) {
  const LocalRows own = local_rows(row_lo, row_count, m, n, !labels);
  const int64_t chunks = (m + std::min(kFwdColBlock, m) - 1) / std::min(kFwdColBlock, m);
  const int64_t row_blocks = (labels ? 1 : 2) * ((own.count + kFwdRowBlock - 1) / kFwdRowBlock);
  int64_t diag = 0, off = 0;
  for (const auto& pairs : backward_rounds(m, own)) {
    for (const auto& p : pairs) (p.first == p.second ? diag : off) += 1;
  }
  return {row_blocks * chunks, diag, off, kFwdRowBlock, kBwdBlock};
}

// G_i = sum_{j != i} A_ij u_j over the tiles I <= J that meet the local rows (A vanishes
// elsewhere: both rows' weights are 0), round by round; returns sum A s.
template <typename acc_t>
double accumulate_tiles(const at::Tensor& u, at::Tensor& g, int64_t n, int64_t m, acc_t inv_tau,
                        RowCoefs<acc_t> rc, const int64_t* labels, acc_t mean,
                        const LocalRows& own) {
  const int64_t bs = std::min(kBwdBlock, m);
  const auto rounds = backward_rounds(m, own);
  double tau_sum = 0;
  for (const auto& pairs : rounds) {
    std::vector<double> partial(pairs.size(), 0.0);
    at::parallel_for(0, static_cast<int64_t>(pairs.size()), 1, [&](int64_t p_begin, int64_t p_end) {
      at::Tensor buf = at::empty({bs * bs}, u.options());
      for (int64_t q = p_begin; q < p_end; ++q) {
        const int64_t i0 = pairs[q].first * kBwdBlock, j0 = pairs[q].second * kBwdBlock;
        const int64_t r = std::min(kBwdBlock, m - i0), c = std::min(kBwdBlock, m - j0);
        const at::Tensor u_i = u.narrow(0, i0, r), u_j = u.narrow(0, j0, c);
        at::Tensor tile = tile_view(buf, r, c);
        at::mm_out(tile, u_i, u_j.t());
        partial[q] = bwd_tile<acc_t>(tile.data_ptr<acc_t>(), r, c, i0, j0, n, m, inv_tau, rc,
                                     labels, mean);
        g.narrow(0, i0, r).addmm_(tile, u_j);
        if (i0 != j0) g.narrow(0, j0, c).addmm_(tile.t(), u_i);
      }
    });
    for (double v : partial) tau_sum += v;
  }
  return tau_sum;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> nt_xent_backward_cpu(
    const at::Tensor& grad_rows, const at::Tensor& z1_in, const std::optional<at::Tensor>& z2_in,
    const at::Tensor& temperature, const at::Tensor& norm_in, const at::Tensor& stats_in,
    const std::optional<at::Tensor>& labels_in, bool mean_positives, int64_t row_lo,
    int64_t row_count) {
  const at::Tensor z1 = z1_in.contiguous(), z2 = second_view(z1_in, z2_in).contiguous();
  const int64_t m = check_nt_xent_inputs(z1, z2, labels_in, temperature);
  const at::Tensor labels = labels_int64(labels_in);
  const int64_t n = z1.size(0), d = z1.size(1);
  const LocalRows own = local_rows(row_lo, row_count, m, n, !labels.defined());
  const auto acc_type = acc_type_of(z1.scalar_type());
  const auto opts = z1.options().dtype(acc_type);
  check_nt_xent_saved(grad_rows, norm_in, stats_in, m);
  const at::Tensor norm = norm_in.to(acc_type).contiguous();
  const at::Tensor stats = stats_in.to(acc_type).contiguous();
  const at::Tensor count = stats[kCount];
  // rows without a positive contribute nothing: their weight is 0
  const at::Tensor w = at::where(count > 0, grad_rows.to(acc_type), 0).contiguous();
  const at::Tensor inv_cnt = count.clamp_min(1).reciprocal().contiguous();

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
    const acc_t* pstats = stats.const_data_ptr<acc_t>();
    const RowCoefs<acc_t> rc{pstats + kLse * m, pstats + kLsePos * m, pstats + kQ * m,
                             inv_cnt.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>()};
    const int64_t* plab = labels.defined() ? labels.const_data_ptr<int64_t>() : nullptr;

    at::Tensor g = at::zeros({m, d}, opts);
    const double tau_sum = accumulate_tiles<acc_t>(u, g, n, m, inv_tau, rc, plab,
                                                   mean_positives ? acc_t(1) : acc_t(0), own);

    // grad_u = G / tau, then the normalisation's Jacobian (F.normalize's: a clamped norm is a
    // constant, so that row's gradient is simply grad_u / eps).
    const acc_t* pg = g.const_data_ptr<acc_t>();
    scalar_t* gz1 = grad_z1.data_ptr<scalar_t>();
    scalar_t* gz2 = grad_z2.data_ptr<scalar_t>();
    const acc_t eps = static_cast<acc_t>(kNormEps);
    at::parallel_for(0, m, 64, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const acc_t* ui = pu + i * d;
        const acc_t* gi = pg + i * d;
        acc_t dot_gu = 0;
        for (int64_t k = 0; k < d; ++k) dot_gu += ui[k] * (inv_tau * gi[k]);
        const acc_t den = pnorm[i];
        const bool clamped = den <= eps;
        scalar_t* dst = i < n ? gz1 + i * d : gz2 + (i - n) * d;
        for (int64_t k = 0; k < d; ++k) {
          const acc_t gu = inv_tau * gi[k];
          const acc_t v = clamped ? gu : gu - dot_gu * ui[k];
          dst[k] = static_cast<scalar_t>(v / den);
        }
      }
    });
    // dL/dtau = -(1/tau) * sum_i w_i sum_{j != i} c_ij s_ij
    grad_t.fill_(-static_cast<double>(inv_tau) * tau_sum);
  });
  return {grad_z1, grad_z2, grad_t};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastclr, CPU, m) {
  m.impl("nt_xent_forward", &nt_xent_forward_cpu);
  m.impl("nt_xent_backward", &nt_xent_backward_cpu);
}

// No tensor arguments: the CompositeExplicitAutograd kernel is the one that runs.
TORCH_LIBRARY_IMPL(fastclr, CompositeExplicitAutograd, m) {
  m.impl("nt_xent_tile_counts", &nt_xent_tile_counts);
}

}  // namespace fastclr
