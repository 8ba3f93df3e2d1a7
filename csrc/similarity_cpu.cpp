// CPU kernels of fastclr::normalized_similarity (+ backward) and fastclr::knn_topk.
//
// s_ij = (a_i . b_j) / (max(||a_i||, eps) max(||b_j||, eps)): the product runs on the raw rows
// (BLAS, at::mm on tiles) and the two inverse norms are applied in the epilogue, so no
// normalised copy of a or b is ever made.
//
// knn_topk streams over tiles of TQ queries x TK bank rows: one BLAS product per tile into a
// reused TQ x TK buffer, then, per query (in parallel), one pass over the tile that keeps the
// k + kExtra best (Candidates: a buffer pruned by nth_element; a threshold, the worst kept
// value, rejects almost every score with one vector comparison per 16). The survivors are re-scored in float64 and the best k kept, best first, ties
// to the lower bank index. Memory: O(TQ*TK + M*(k + kExtra)) beyond the inputs, never M x K.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu_utils.h"

namespace fastclr {
namespace {

constexpr double kNormEps = 1e-12;  // as F.normalize
constexpr int64_t kQueryTile = 1024;
// The BLAS pass keeps k + kExtra candidates per query; they are then re-scored exactly (float64,
// a fixed summation order) and the best k kept. BLAS rounds a product differently depending on
// where its rows sit in a tile, so identical bank rows can get float32 scores one ulp apart; the
// re-scoring makes exact ties exact again (ties then go to the lower index, deterministically)
// and orders near-ties as float64 does.
constexpr int64_t kExtra = 32;

at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// 1 / max(||x_i||, eps) in the accumulation dtype.
at::Tensor inv_norms(const at::Tensor& x) {
  return at::linalg_vector_norm(x, 2, {1}, false, acc_type(x.scalar_type()))
      .clamp_min(kNormEps)
      .reciprocal();
}

void check_pair(const at::Tensor& a, const at::Tensor& b, const char* op) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, op, ": expected 2-D inputs");
  TORCH_CHECK(a.size(1) == b.size(1), op, ": inputs must have the same number of columns");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), op, ": inputs must have the same dtype");
}

// out[i][j] *= ra[i] * rb[j], in place.
template <typename T>
void scale_rows_cols(T* out, const T* ra, const T* rb, int64_t m, int64_t k) {
  at::parallel_for(0, m, 16, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      T* row = out + i * k;
      const T r = ra[i];
#pragma omp simd
      for (int64_t j = 0; j < k; ++j) row[j] = row[j] * (r * rb[j]);
    }
  });
}

at::Tensor normalized_similarity_cpu(const at::Tensor& a_in, const at::Tensor& b_in) {
  check_pair(a_in, b_in, "normalized_similarity");
  const auto acc = acc_type(a_in.scalar_type());
  const at::Tensor a = a_in.to(acc).contiguous();
  const at::Tensor b = b_in.to(acc).contiguous();
  at::Tensor out = at::mm(a, b.t());
  if (out.numel() == 0) return out;
  const at::Tensor ra = inv_norms(a), rb = inv_norms(b);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "normalized_similarity_cpu", [&] {
    scale_rows_cols<scalar_t>(out.data_ptr<scalar_t>(), ra.data_ptr<scalar_t>(),
                              rb.data_ptr<scalar_t>(), out.size(0), out.size(1));
  });
  return out;
}

// d/da_i of sum_j g_ij s_ij = r_i (G' b)_i - (sum_j g_ij s_ij) r_i^2 a_i with G' = G diag(rb),
// the second term only where ||a_i|| > eps (below it the normalisation is the constant 1/eps).
// Symmetrically for b. Composite ATen code: the same formula serves every device.
std::tuple<at::Tensor, at::Tensor> normalized_similarity_backward(const at::Tensor& grad,
                                                                  const at::Tensor& a_in,
                                                                  const at::Tensor& b_in,
                                                                  const at::Tensor& out) {
  const auto acc = acc_type(a_in.scalar_type());
  const at::Tensor a = a_in.to(acc), b = b_in.to(acc), g = grad.to(acc), s = out.to(acc);
  const at::Tensor na = at::linalg_vector_norm(a, 2, {1}, false, acc);
  const at::Tensor nb = at::linalg_vector_norm(b, 2, {1}, false, acc);
  const at::Tensor ra = na.clamp_min(kNormEps).reciprocal();
  const at::Tensor rb = nb.clamp_min(kNormEps).reciprocal();
  const at::Tensor gs = g * s;
  const at::Tensor row_dot = at::where(na > kNormEps, gs.sum(1), at::zeros_like(na));
  const at::Tensor col_dot = at::where(nb > kNormEps, gs.sum(0), at::zeros_like(nb));
  at::Tensor ga = ra.unsqueeze(1) * at::mm(g * rb.unsqueeze(0), b) -
                  (row_dot * ra * ra).unsqueeze(1) * a;
  at::Tensor gb = rb.unsqueeze(1) * at::mm((g * ra.unsqueeze(1)).t(), a) -
                  (col_dot * rb * rb).unsqueeze(1) * b;
  return {ga.to(a_in.scalar_type()), gb.to(b_in.scalar_type())};
}

template <typename T>
struct Entry {
  T v;
  int64_t j;
};

// Scores are ranked by key(v): NaN counts as the highest score, as torch.sort ranks it (so the
// reference's stable descending sort and this kernel agree on NaN rows too).
template <typename T>
FASTCLR_INLINE T key(T v) {
  return v != v ? std::numeric_limits<T>::infinity() : v;
}

// "x is a worse neighbour than y": a lower value, or the same value and a higher index. Entries
// hold keys (see key()), never NaN, so this is a strict weak order.
template <typename T>
FASTCLR_INLINE bool worse(const Entry<T>& x, const Entry<T>& y) {
  return x.v < y.v || (x.v == y.v && x.j > y.j);
}

// "x is a better neighbour than y", the order of the output.
template <typename T>
FASTCLR_INLINE bool better(const Entry<T>& x, const Entry<T>& y) {
  return worse(y, x);
}

// The running candidates of one query: an unordered buffer of up to 2 kk entries; when it fills,
// nth_element keeps the best kk and the worst kept value becomes the threshold a new score must
// beat. Cheaper than a heap (an append per candidate, a linear partition every kk candidates).
template <typename T>
struct Candidates {
  Entry<T>* buf;
  int64_t n = 0;
  T thr = -std::numeric_limits<T>::infinity();

  void compact(int64_t kk) {
    std::nth_element(buf, buf + (kk - 1), buf + n, better<T>);
    n = kk;
    thr = buf[kk - 1].v;
  }
};

// One query against one tile: d[0..kn) = q . b_j / ||b_j|| (the bank tile is pre-scaled) for
// bank rows j0..; the query's inverse norm rq turns them into similarities. Blocks of 16 are
// first tested as one vector comparison with the threshold (in d's units: thr / rq); only a
// block with a score above it is walked element by element. Bank indices only grow, so a score
// equal to the threshold never beats a kept entry: strict '>'. A NaN score enters as key()
// +inf, and the block test lets it through (!(d <= lim)).
template <typename T>
FASTCLR_MULTIVERSION void scan_tile(const T* d, T rq, int64_t j0, int64_t kn, Candidates<T>& c,
                                    int64_t kk, std::vector<Entry<T>>& scratch) {
  constexpr int64_t kBlock = 16;
  if (c.n == 0 && kn >= 2 * kk) {
    // The first tile: one selection over all of it sets a high threshold at once.
    scratch.resize(kn);
    for (int64_t t = 0; t < kn; ++t) scratch[t] = {key(d[t] * rq), j0 + t};
    std::nth_element(scratch.begin(), scratch.begin() + (kk - 1), scratch.end(), better<T>);
    std::copy(scratch.begin(), scratch.begin() + kk, c.buf);
    c.n = kk;
    c.thr = c.buf[kk - 1].v;
    return;
  }
  auto walk = [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const T v = key(d[t] * rq);
      if (v > c.thr) {
        c.buf[c.n++] = {v, j0 + t};
        if (c.n == 2 * kk) c.compact(kk);
      }
    }
  };
  int64_t j = 0;
  for (; j + kBlock <= kn; j += kBlock) {
    // rq > 0, so d > thr / rq <=> d * rq > thr up to one rounding: the walk decides exactly
    const T lim = c.thr / rq * (T(1) - T(4) * std::numeric_limits<T>::epsilon());
    int any = 0;
#pragma omp simd reduction(| : any)
    for (int64_t u = 0; u < kBlock; ++u) any |= !(d[j + u] <= lim);  // NaN passes too
    if (any) walk(j, j + kBlock);
  }
  walk(j, kn);
}

// sum_d x[d] * y[d] in float64, always in the same order: identical rows give identical sums.
template <typename T>
FASTCLR_MULTIVERSION double exact_dot(const T* x, const T* y, int64_t d) {
  double acc[4] = {0, 0, 0, 0};  // independent partial sums in a fixed order
  int64_t t = 0;
  for (; t + 4 <= d; t += 4)
    for (int u = 0; u < 4; ++u) acc[u] += static_cast<double>(x[t + u]) * static_cast<double>(y[t + u]);
  for (; t < d; ++t) acc[0] += static_cast<double>(x[t]) * static_cast<double>(y[t]);
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

template <typename T>
double exact_inv_norm(const T* x, int64_t d) {
  const double n = std::sqrt(exact_dot(x, x, d));
  return 1.0 / (n > kNormEps ? n : kNormEps);
}

std::tuple<at::Tensor, at::Tensor> knn_topk_cpu(const at::Tensor& q_in, const at::Tensor& bank_in,
                                                int64_t k, int64_t chunk) {
  check_pair(q_in, bank_in, "knn_topk");
  const int64_t m = q_in.size(0), nb = bank_in.size(0), dim = q_in.size(1);
  TORCH_CHECK(k >= 1 && k <= nb, "knn_topk: need 1 <= k <= bank rows, got k=", k, ", ", nb, " rows");
  TORCH_CHECK(chunk >= 1, "knn_topk: chunk must be >= 1");
  const auto acc = acc_type(q_in.scalar_type());
  const at::Tensor q = q_in.to(acc).contiguous();
  const at::Tensor bank = bank_in.to(acc).contiguous();
  const at::Tensor rq = inv_norms(q), rb = inv_norms(bank);
  at::Tensor values = at::empty({m, k}, q.options());
  at::Tensor indices = at::empty({m, k}, q.options().dtype(at::kLong));
  const int64_t kk = std::min(k + kExtra, nb);  // candidates kept by the BLAS pass
  const int64_t tq = std::min<int64_t>(kQueryTile, std::max<int64_t>(m, 1));
  const int64_t tk = std::min<int64_t>(chunk, nb);
  at::Tensor buf = at::empty({tq * tk}, q.options());
  AT_DISPATCH_FLOATING_TYPES(acc, "knn_topk_cpu", [&] {
    using T = scalar_t;
    std::vector<Entry<T>> store(static_cast<size_t>(tq * 2 * kk));
    std::vector<Candidates<T>> cands(tq);
    const T* q_p = q.data_ptr<T>();
    const T* bank_p = bank.data_ptr<T>();
    const T* rq_p = rq.data_ptr<T>();
    T* val_p = values.data_ptr<T>();
    int64_t* idx_p = indices.data_ptr<int64_t>();
    // Exact (float64) inverse norms of the bank rows, for the re-scoring.
    std::vector<double> rb_exact(nb);
    at::parallel_for(0, nb, 1024, [&](int64_t lo, int64_t hi) {
      for (int64_t j = lo; j < hi; ++j) rb_exact[j] = exact_inv_norm(bank_p + j * dim, dim);
    });
    for (int64_t q0 = 0; q0 < m; q0 += tq) {
      const int64_t qm = std::min(tq, m - q0);
      for (int64_t i = 0; i < tq; ++i) cands[i] = Candidates<T>{store.data() + i * 2 * kk};
      const at::Tensor qs = q.narrow(0, q0, qm);
      for (int64_t j0 = 0; j0 < nb; j0 += tk) {
        const int64_t kn = std::min(tk, nb - j0);
        at::Tensor d = buf.narrow(0, 0, qm * kn).view({qm, kn});
        // the bank tile scaled by its inverse norms (a tile-sized scratch, reused across queries)
        at::Tensor bt = bank.narrow(0, j0, kn) * rb.narrow(0, j0, kn).unsqueeze(1);
        at::mm_out(d, qs, bt.t());
        const T* d_p = d.data_ptr<T>();
        at::parallel_for(0, qm, 8, [&](int64_t lo, int64_t hi) {
          std::vector<Entry<T>> scratch;
          for (int64_t i = lo; i < hi; ++i)
            scan_tile<T>(d_p + i * kn, rq_p[q0 + i], j0, kn, cands[i], kk, scratch);
        });
      }
      at::parallel_for(0, qm, 8, [&](int64_t lo, int64_t hi) {
        std::vector<Entry<double>> exact(kk);
        for (int64_t i = lo; i < hi; ++i) {
          Candidates<T>& c = cands[i];
          if (c.n > kk) c.compact(kk);
          const Entry<T>* h = c.buf;
          const T* qi = q_p + (q0 + i) * dim;
          const double rqi = exact_inv_norm(qi, dim);
          for (int64_t t = 0; t < kk; ++t) {
            const T* bj = bank_p + h[t].j * dim;
            exact[t] = {key(exact_dot(qi, bj, dim) * rqi * rb_exact[h[t].j]), h[t].j};
          }
          std::partial_sort(exact.begin(), exact.begin() + k, exact.end(), better<double>);
          for (int64_t t = 0; t < k; ++t) {
            const double v = exact[t].v;  // a NaN score was ranked as +inf; give it back as NaN
            val_p[(q0 + i) * k + t] = static_cast<T>(std::isinf(v) ? std::numeric_limits<double>::quiet_NaN() : v);
            idx_p[(q0 + i) * k + t] = exact[t].j;
          }
        }
      });
    }
  });
  return {values, indices};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastclr, CPU, m) {
  m.impl("normalized_similarity", &normalized_similarity_cpu);
  m.impl("knn_topk", &knn_topk_cpu);
}

TORCH_LIBRARY_IMPL(fastclr, CompositeExplicitAutograd, m) {
  m.impl("normalized_similarity_backward", &normalized_similarity_backward);
}

}  // namespace fastclr
