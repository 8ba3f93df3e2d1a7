// CPU kernels of fastclr::normalized_similarity (+ backward) and fastclr::knn_topk.
//
// s_ij = (a_i . b_j) / (max(||a_i||, eps) max(||b_j||, eps)): the product runs on the raw rows
// (BLAS, at::mm on tiles) and the two inverse norms are applied in the epilogue, so no
// normalised copy of a or b is ever made.
//
// knn_topk is exact (the same k rows, same order, as the float64 reference) but does its heavy
// product in a cheap precision: per block of queries and tile of bank rows, one GEMM of the
// unit-scaled rows in the screening precision (bfloat16 on CPUs with bf16 dot instructions,
// else float32) gives every score up to a proven bound delta; a threshold test (one vector
// comparison per 16 scores) discards every row that provably cannot be among the k best, and
// the few that might are re-scored in float64 with a fixed summation order (identical rows tie
// exactly, ties go to the lower bank index). Memory: the scaled copies of the inputs in the
// screening precision, and per thread one score tile plus O(k) candidates and a 2 KiB
// histogram per query of its block -- never M x K.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <limits>
#include <type_traits>
#include <vector>

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#endif

#include "cpu_utils.h"

// The float64 re-scoring below must round exactly as fastclr.reference.knn_scores: one rounding
// per multiply and per add. No fused multiply-add may be formed in this file (GCC contracts
// a * b + c across statements by default when the target has FMA, as the haswell/avx512 clones
// do; clang within an expression): knn_topk's order is decided by these sums.
#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

namespace fastclr {
namespace {

constexpr double kNormEps = 1e-12;  // as F.normalize
// queries per GEMM: a block per thread (single-threaded GEMMs measured fastest at 512 x 1024)
constexpr int64_t kQueryTile = 512;

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

// A candidate neighbour: a score (see key()) and its bank row.
struct Entry {
  double v;
  int64_t j;
};

// Scores are ranked by key(v): NaN counts as the highest score, as torch.sort ranks it (so the
// reference's stable descending sort and this kernel agree on NaN rows too).
template <typename T>
FASTCLR_INLINE T key(T v) {
  return v != v ? std::numeric_limits<T>::infinity() : v;
}

// "x is a better neighbour than y": a higher score, or the same score and a lower index (the
// order of the output). Entries hold keys, never NaN, so this is a strict weak order.
struct Better {
  FASTCLR_INLINE bool operator()(const Entry& x, const Entry& y) const {
    return x.v > y.v || (x.v == y.v && x.j < y.j);
  }
};

// sum_d term(d) in float64, always in the same order (four partial sums, then a fixed tree), so
// identical inputs give identical sums wherever they sit.
template <typename Term>
FASTCLR_INLINE double fixed_order_sum(int64_t d, Term term) {
  double acc[4] = {0, 0, 0, 0};
  int64_t t = 0;
  for (; t + 4 <= d; t += 4)
    for (int u = 0; u < 4; ++u) acc[u] += term(t + u);
  for (; t < d; ++t) acc[0] += term(t);
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

// max(||x||, eps) in float64.
template <typename T>
FASTCLR_MULTIVERSION double exact_norm(const T* x, int64_t d) {
  const double n = std::sqrt(fixed_order_sum(d, [x](int64_t t) {
    const double v = static_cast<double>(x[t]);
    return v * v;
  }));
  return n > kNormEps ? n : kNormEps;
}

// sum_d qn[d] * (y[d] / ny) in float64, with qn the query divided by its norm: the float64
// reference's arithmetic (F.normalize divides), so rows that normalise to the same vector --
// duplicates, and scaled copies whose norms scale exactly, every row when D = 1 -- score
// identically and tie exactly, as they do in the reference.
template <typename T>
FASTCLR_MULTIVERSION double normalized_dot(const double* qn, const T* y, double ny, int64_t d) {
  return fixed_order_sum(d, [qn, y, ny](int64_t t) { return qn[t] * (static_cast<double>(y[t]) / ny); });
}

// The product pass of knn_topk runs in a screening precision G: bfloat16 where the CPU has
// native bfloat16 dot products (AVX512-BF16 / AMX: twice float32's throughput), float32
// elsewhere, float64 for float64 inputs. FASTCLR_KNN_SCREEN=bf16|fp32 forces one (tests, A/B).
enum class Screen { kBFloat16, kFloat, kDouble };

bool cpu_has_native_bf16() {
#if defined(__GNUC__) && defined(__x86_64__)
  return __builtin_cpu_supports("avx512bf16") || __builtin_cpu_supports("amx-bf16");
#else
  return false;
#endif
}

Screen pick_screen(at::ScalarType acc) {
  if (acc == at::kDouble) return Screen::kDouble;
  const char* env = std::getenv("FASTCLR_KNN_SCREEN");
  const std::string want = env == nullptr || *env == '\0' ? "auto" : env;
  TORCH_CHECK(want == "auto" || want == "bf16" || want == "fp32",
              "knn_topk: FASTCLR_KNN_SCREEN must be auto, bf16 or fp32, got '", want, "'");
  if (want == "bf16") return Screen::kBFloat16;
  if (want == "fp32") return Screen::kFloat;
  return cpu_has_native_bf16() && at::hasMKLDNN() ? Screen::kBFloat16 : Screen::kFloat;
}

// delta: a bound on |screened score - exact score| for any pair. Each side is scaled by its
// inverse norm (r rounded to T, x * r rounded in T: 2 u_T) and stored in G (u_G), so a product
// carries a relative error <= 2 (u_G + 2 u_T); the sum of D products accumulates in float32
// (float64 for G = double) with error <= D u_acc sum |a_i b_i|, and the output is stored in G
// (u_G). With unit rows sum |a_i b_i| <= 1 (Cauchy-Schwarz) and |s| <= 1, so these add up to
// delta, padded by 2% and by the float64 re-scoring's own rounding. A zero or tiny row is scaled
// to norm < 1, which only shrinks its errors; subnormals flushed by bf16 dot instructions change
// a sum by less than the 1e-30 added.
double screen_margin(Screen screen, at::ScalarType acc, int64_t dim) {
  const double u_g = screen == Screen::kBFloat16 ? 0x1p-9 : screen == Screen::kFloat ? 0x1p-24 : 0x1p-53;
  const double u_acc = screen == Screen::kDouble ? 0x1p-53 : 0x1p-24;
  const double u_t = acc == at::kDouble ? 0x1p-53 : 0x1p-24;
  const double d = static_cast<double>(dim);
  return 1.02 * (2 * (u_g + 2 * u_t) + u_g + (d + 2) * u_acc) + 4 * (d + 4) * 0x1p-53 + 1e-30;
}

// The screened scores are compared in S: float for bfloat16 and float32, double for float64.
template <typename G>
struct ScreenOf { using S = G; };
template <>
struct ScreenOf<c10::BFloat16> { using S = float; };

template <typename G>
FASTCLR_INLINE typename ScreenOf<G>::S load_score(const G* p) { return *p; }
template <>
FASTCLR_INLINE float load_score(const c10::BFloat16* p) {
  const uint32_t bits = static_cast<uint32_t>(p->x) << 16;  // bfloat16 = the top half of a float
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// The largest S not above x (the screen's thresholds must never round up).
template <typename S>
FASTCLR_INLINE S round_down(double x) {
  S s = static_cast<S>(x);
  if (static_cast<double>(s) > x) s = std::nextafter(s, -std::numeric_limits<S>::infinity());
  return s;
}

template <typename T>
struct ExactScorer {
  const T* q;        // the query's row
  double nq;         // its exact norm (clamped)
  const T* bank;
  const double* nb;  // the bank's exact norms (clamped)
  int64_t dim;
  // Appends the exact entries of bank rows j[0..n) to out, the rows of later ones prefetched
  // (they are mostly cold by now).
  void score(const int32_t* j, int64_t n, std::vector<Entry>& out) const {
    if (n == 0) return;
    thread_local std::vector<double> qn;
    qn.resize(dim);
    for (int64_t t = 0; t < dim; ++t) qn[t] = static_cast<double>(q[t]) / nq;
    constexpr int64_t kAhead = 6;
    const int64_t bytes = dim * static_cast<int64_t>(sizeof(T));
    for (int64_t t = 0; t < n; ++t) {
      if (t + kAhead < n) {
        const char* row = reinterpret_cast<const char*>(bank + j[t + kAhead] * dim);
        for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(row + b);
        __builtin_prefetch(nb + j[t + kAhead]);
      }
      out.push_back({key(normalized_dot(qn.data(), bank + j[t] * dim, nb[j[t]], dim)), j[t]});
    }
  }
};

// The candidates of one query. Screened candidates (score, bank row) wait in v[0..n), j[0..n)
// (capacity cap + kSlack, cap >= 2k + 64), appended by the scan when they pass the threshold
// lim. Screening mode: lim <= t~ - 2 delta where k candidates have screened scores >= t~ (from
// the histogram below, or the exact k-th best screened score at a compaction); those k rows have
// exact scores >= t~ - delta, so a row with s~ < lim (exact < t~ - delta) is strictly worse than
// k others and is dropped -- never appended, or filtered out when the buffer is full. If
// near-ties leave more than cap / 2 rows within the band (a zero query, a bank of duplicates),
// the query switches to exact mode for good: each compaction scores the waiting rows in
// float64, `exact` keeps the k best, and lim <= e_k - delta with e_k the k-th best exact key.
// Memory is O(cap) per query whatever the data. Rows arrive in index order, and a later row
// equal to the k-th best is worse than it, so dropping rows strictly below is exact.
constexpr int64_t kSlack = 16;  // one vector of appends past cap

// The threshold between compactions comes from a histogram of the candidates' screened scores:
// bins of width 1/256 over [-1.0625, 1.0625] (screened scores of unit rows lie within 1 + delta),
// the top bin also taking NaN. hb is the highest bin such that `above`, the candidates counted
// in bins >= hb, is at least k: k rows then have screened scores >= edge(hb), so edge(hb) - 2
// delta is a valid threshold -- kept up to date at every append instead of once per compaction.
// Bin 0 (edge -inf in effect) never sets the threshold. The bin of x is computed in float64,
// where x + 1.0625 is exact for |x| >= 2^-29 (below, its rounding is far inside delta's slack).
constexpr int64_t kBins = 545;
constexpr double kBinLo = -1.0625, kBinScale = 256;

FASTCLR_INLINE int64_t bin_of(double x) {
  if (!(x >= kBinLo)) return x != x ? kBins - 1 : 0;
  const double f = (x - kBinLo) * kBinScale;
  return f >= static_cast<double>(kBins - 1) ? kBins - 1 : static_cast<int64_t>(f);
}

template <typename S>
struct Candidates {
  S* v;
  int32_t* j;
  int32_t* hist;  // kBins counts
  int64_t n = 0;
  S lim = -std::numeric_limits<S>::infinity();
  int64_t hb = 0, above = 0;
  bool exact_mode = false;
  std::vector<Entry> exact;

  // Counts the candidates appended since `from` and raises lim from the histogram.
  FASTCLR_INLINE void count(int64_t from, int64_t k, double delta) {
    if (exact_mode) return;
    for (int64_t t = from; t < n; ++t) {
      const int64_t b = bin_of(static_cast<double>(v[t]));
      if (b >= hb) {
        ++hist[b];
        ++above;
      }
    }
    if (above < k) return;
    const int64_t hb0 = hb;
    while (above - hist[hb] >= k) above -= hist[hb++];
    if (hb != hb0 && hb > 0) lim = std::max(lim, round_down<S>(kBinLo + hb / kBinScale - 2 * delta));
  }

  // lim from the exact k-th best screened score of the candidates (finer than the histogram's
  // bins; n >= k).
  void tighten(int64_t k, double delta, std::vector<S>& scratch) {
    scratch.resize(n);
    for (int64_t t = 0; t < n; ++t) scratch[t] = key(v[t]);
    std::nth_element(scratch.begin(), scratch.begin() + (k - 1), scratch.end(), std::greater<S>());
    lim = std::max(lim, round_down<S>(static_cast<double>(scratch[k - 1]) - 2 * delta));
  }

  // Drops the candidates below lim; false if more than cap / 2 remain.
  FASTCLR_INLINE bool filter(int64_t cap) {
    int64_t kept = 0;
    for (int64_t t = 0; t < n; ++t) {  // NaN stays (it ranks highest)
      v[kept] = v[t];
      j[kept] = j[t];
      kept += !(v[t] < lim);
    }
    n = kept;
    return n <= cap / 2;
  }

  template <typename T>
  void compact(const ExactScorer<T>& scorer, int64_t k, int64_t cap, double delta, std::vector<S>& scratch) {
    if (!exact_mode) {
      if (filter(cap)) return;
      tighten(k, delta, scratch);  // still crowded: the finer threshold
      if (filter(cap)) return;
      exact_mode = true;  // the band is too crowded to keep waiting: score it now
    }
    scorer.score(j, n, exact);
    n = 0;
    std::nth_element(exact.begin(), exact.begin() + (k - 1), exact.end(), Better());
    exact.resize(k);
    lim = std::max(lim, round_down<S>(exact[k - 1].v - delta));
  }

  // The k best, best first, all exact, in exact[0..k).
  template <typename T>
  void finish(const ExactScorer<T>& scorer, int64_t k, int64_t cap, double delta, std::vector<S>& scratch) {
    if (!exact_mode && n > k) {  // drop the band's tail
      tighten(k, delta, scratch);
      filter(n);
    }
    scorer.score(j, n, exact);
    n = 0;
    std::nth_element(exact.begin(), exact.begin() + (k - 1), exact.end(), Better());
    std::sort(exact.begin(), exact.begin() + k, Better());
  }
};

// One query against one tile of screened scores d[0..kn) (bank rows j0..): blocks of 16 are
// tested against lim as one vector comparison (NaN passes: !(x < lim)); a block with a passing
// score appends its passing rows (branch-free), then the candidates are compacted if full.
template <typename G, typename T>
FASTCLR_MULTIVERSION void scan_tile(const G* d, int64_t j0, int64_t kn,
                                    Candidates<typename ScreenOf<G>::S>& c, const ExactScorer<T>& scorer,
                                    int64_t k, int64_t cap, double delta,
                                    std::vector<typename ScreenOf<G>::S>& scratch) {
  using S = typename ScreenOf<G>::S;
  for (int64_t t = 0; t < kn; t += kSlack) {
    const int64_t len = std::min(kSlack, kn - t);
    const S lim = c.lim;
    int any = 0;
#pragma omp simd reduction(| : any)
    for (int64_t u = 0; u < len; ++u) any |= !(load_score(d + t + u) < lim);
    if (!any) continue;
    const int64_t from = c.n;
    for (int64_t u = 0; u < len; ++u) {
      const S x = load_score(d + t + u);
      c.v[c.n] = x;
      c.j[c.n] = static_cast<int32_t>(j0 + t + u);
      c.n += !(x < lim);
    }
    c.count(from, k, delta);
    if (c.n >= cap) c.compact(scorer, k, cap, delta, scratch);
  }
}

#if defined(__GNUC__) && defined(__x86_64__)
#define FASTCLR_HAVE_AVX512_SCAN 1
// The AVX-512 scan of bfloat16 / float32 scores: 16 scores compared with lim into a bit mask
// (!(x < lim): _CMP_NLT_UQ, NaN passes); the passing scores and their rows are compressed into
// the candidates with full-vector stores (compress to memory is slow on some CPUs; kSlack
// leaves room for the unused lanes).
template <typename G>
__attribute__((target("avx512f"))) FASTCLR_INLINE __m512 load16(const G* p);
template <>
__attribute__((target("avx512f"))) FASTCLR_INLINE __m512 load16(const float* p) {
  return _mm512_loadu_ps(p);
}
template <>
__attribute__((target("avx512f"))) FASTCLR_INLINE __m512 load16(const c10::BFloat16* p) {
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  // the maskz forms: GCC 12's unmasked ones trip -Wmaybe-uninitialized (GCC bug 105593)
  return _mm512_castsi512_ps(_mm512_maskz_slli_epi32(0xFFFF, _mm512_maskz_cvtepu16_epi32(0xFFFF, h), 16));
}

template <typename G, typename T>
__attribute__((target("avx512f"))) void scan_tile_avx512(const G* d, int64_t j0, int64_t kn,
                                                         Candidates<float>& c, const ExactScorer<T>& scorer,
                                                         int64_t k, int64_t cap, double delta,
                                                         std::vector<float>& scratch) {
  const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t t = 0;
  for (; t + 16 <= kn; t += 16) {
    const __m512 x = load16(d + t);
    const __mmask16 pass = _mm512_cmp_ps_mask(x, _mm512_set1_ps(c.lim), _CMP_NLT_UQ);
    if (pass == 0) continue;
    _mm512_storeu_ps(c.v + c.n, _mm512_maskz_compress_ps(pass, x));
    const __m512i rows = _mm512_add_epi32(lanes, _mm512_set1_epi32(static_cast<int32_t>(j0 + t)));
    _mm512_storeu_si512(c.j + c.n, _mm512_maskz_compress_epi32(pass, rows));
    const int64_t from = c.n;
    c.n += __builtin_popcount(pass);
    c.count(from, k, delta);
    if (c.n >= cap) c.compact(scorer, k, cap, delta, scratch);
  }
  if (t < kn) scan_tile<G, T>(d + t, j0 + t, kn - t, c, scorer, k, cap, delta, scratch);
}
#endif

template <typename G, typename T>
void scan(const G* d, int64_t j0, int64_t kn, Candidates<typename ScreenOf<G>::S>& c,
          const ExactScorer<T>& scorer, int64_t k, int64_t cap, double delta,
          std::vector<typename ScreenOf<G>::S>& scratch) {
#ifdef FASTCLR_HAVE_AVX512_SCAN
  if constexpr (!std::is_same_v<G, double>) {
    static const bool avx512 = __builtin_cpu_supports("avx512f");
    if (avx512) return scan_tile_avx512<G, T>(d, j0, kn, c, scorer, k, cap, delta, scratch);
  }
#endif
  scan_tile<G, T>(d, j0, kn, c, scorer, k, cap, delta, scratch);
}

// x / norm per row (as x * (1 / norm)), stored in G: the screen's operands, unit rows.
template <typename G, typename T>
at::Tensor scaled_rows(const at::Tensor& x, const std::vector<double>& norm, at::ScalarType g_type) {
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(g_type));
  const int64_t rows = x.size(0), dim = x.size(1);
  const T* x_p = x.data_ptr<T>();
  G* o_p = out.data_ptr<G>();
  at::parallel_for(0, rows, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const T ri = static_cast<T>(1.0 / norm[i]);
      for (int64_t c = 0; c < dim; ++c) o_p[i * dim + c] = static_cast<G>(x_p[i * dim + c] * ri);
    }
  });
  return out;
}

template <typename G, typename T>
void knn_topk_impl(const at::Tensor& q, const at::Tensor& bank, int64_t k, int64_t chunk,
                   double delta, at::ScalarType g_type, T* val_p, int64_t* idx_p) {
  using S = typename ScreenOf<G>::S;
  const int64_t m = q.size(0), nb = bank.size(0), dim = q.size(1);
  const T* q_p = q.data_ptr<T>();
  const T* bank_p = bank.data_ptr<T>();
  // exact (float64) norms: the re-scoring's, and the screen's scale factors
  std::vector<double> nq(m), nbn(nb);
  at::parallel_for(0, m, 1024, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) nq[i] = exact_norm(q_p + i * dim, dim);
  });
  at::parallel_for(0, nb, 1024, [&](int64_t lo, int64_t hi) {
    for (int64_t j = lo; j < hi; ++j) nbn[j] = exact_norm(bank_p + j * dim, dim);
  });
  const at::Tensor qg = scaled_rows<G, T>(q, nq, g_type);
  const at::Tensor bg = scaled_rows<G, T>(bank, nbn, g_type);
  const int64_t tk = std::min(chunk, nb);
  const int64_t cap = 3 * k + 256;
  // Query blocks, one per thread at a time: each thread multiplies its block by a bank tile
  // (a single-threaded GEMM inside the parallel region) and screens the tile while it is in its
  // own cache. Blocks of at most kQueryTile, at least one per thread when there are enough.
  const int64_t threads = std::max<int64_t>(at::get_num_threads(), 1);
  const int64_t qb = std::max<int64_t>(1, std::min(kQueryTile, (m + threads - 1) / threads));
  const int64_t nblocks = (m + qb - 1) / qb;
  at::parallel_for(0, nblocks, 1, [&](int64_t blo, int64_t bhi) {
    at::Tensor buf = at::empty({qb * tk}, qg.options());
    std::vector<S> v_store(static_cast<size_t>(qb * (cap + kSlack)));
    std::vector<int32_t> j_store(static_cast<size_t>(qb * (cap + kSlack)));
    std::vector<int32_t> hist_store(static_cast<size_t>(qb * kBins));
    std::vector<Candidates<S>> cands(qb);
    std::vector<S> scratch;
    for (int64_t blk = blo; blk < bhi; ++blk) {
      const int64_t q0 = blk * qb, qm = std::min(qb, m - q0);
      std::fill(hist_store.begin(), hist_store.end(), 0);
      for (int64_t i = 0; i < qm; ++i)
        cands[i] = Candidates<S>{v_store.data() + i * (cap + kSlack), j_store.data() + i * (cap + kSlack),
                                 hist_store.data() + i * kBins};
      const at::Tensor qs = qg.narrow(0, q0, qm);
      auto scorer = [&](int64_t i) {
        return ExactScorer<T>{q_p + (q0 + i) * dim, nq[q0 + i], bank_p, nbn.data(), dim};
      };
      for (int64_t j0 = 0; j0 < nb; j0 += tk) {
        const int64_t kn = std::min(tk, nb - j0);
        at::Tensor d = buf.narrow(0, 0, qm * kn).view({qm, kn});
        at::mm_out(d, qs, bg.narrow(0, j0, kn).t());
        const G* d_p = d.data_ptr<G>();
        for (int64_t i = 0; i < qm; ++i)
          scan<G, T>(d_p + i * kn, j0, kn, cands[i], scorer(i), k, cap, delta, scratch);
      }
      for (int64_t i = 0; i < qm; ++i) {
        Candidates<S>& c = cands[i];
        c.finish(scorer(i), k, cap, delta, scratch);
        TORCH_INTERNAL_ASSERT(static_cast<int64_t>(c.exact.size()) >= k, "knn_topk: fewer than k candidates survived");
        for (int64_t t = 0; t < k; ++t) {
          const double v = c.exact[t].v;  // a NaN score was ranked as +inf; give it back as NaN
          val_p[(q0 + i) * k + t] = static_cast<T>(std::isinf(v) ? std::numeric_limits<double>::quiet_NaN() : v);
          idx_p[(q0 + i) * k + t] = c.exact[t].j;
        }
        c.exact = std::vector<Entry>();
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> knn_topk_cpu(const at::Tensor& q_in, const at::Tensor& bank_in,
                                                int64_t k, int64_t chunk) {
  check_pair(q_in, bank_in, "knn_topk");
  const int64_t m = q_in.size(0), nb = bank_in.size(0), dim = q_in.size(1);
  TORCH_CHECK(k >= 1 && k <= nb, "knn_topk: need 1 <= k <= bank rows, got k=", k, ", ", nb, " rows");
  TORCH_CHECK(chunk >= 1, "knn_topk: chunk must be >= 1");
  TORCH_CHECK(nb <= std::numeric_limits<int32_t>::max(), "knn_topk: at most 2^31 - 1 bank rows, got ", nb);
  const auto acc = acc_type(q_in.scalar_type());
  const at::Tensor q = q_in.to(acc).contiguous();
  const at::Tensor bank = bank_in.to(acc).contiguous();
  at::Tensor values = at::empty({m, k}, q.options());
  at::Tensor indices = at::empty({m, k}, q.options().dtype(at::kLong));
  if (m == 0) return {values, indices};
  const Screen screen = pick_screen(acc);
  const double delta = screen_margin(screen, acc, dim);
  AT_DISPATCH_FLOATING_TYPES(acc, "knn_topk_cpu", [&] {
    using T = scalar_t;
    T* val_p = values.data_ptr<T>();
    int64_t* idx_p = indices.data_ptr<int64_t>();
    if (screen == Screen::kBFloat16)
      knn_topk_impl<c10::BFloat16, T>(q, bank, k, chunk, delta, at::kBFloat16, val_p, idx_p);
    else if (screen == Screen::kFloat)
      knn_topk_impl<float, T>(q, bank, k, chunk, delta, at::kFloat, val_p, idx_p);
    else
      knn_topk_impl<double, T>(q, bank, k, chunk, delta, at::kDouble, val_p, idx_p);
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
