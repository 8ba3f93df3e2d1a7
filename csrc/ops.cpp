// The op schemas of fastclr, declared once. Each backend registers its kernels in its own
// file with TORCH_LIBRARY_IMPL(fastclr, <Backend>, m); Python adds the fake (meta) kernels and
// the autograd formulas in fastclr/ops.py.
#include <torch/library.h>

// The namespace: fastclr, or the one the CPU harness of the CUDA kernels (tests/cuda_on_cpu/)
// declares these same schemas in, beside fastclr's own. TORCH_LIBRARY pastes its argument
// unexpanded, hence the indirection.
#ifndef FASTCLR_OPS_LIB
#define FASTCLR_OPS_LIB fastclr
#endif
#define FASTCLR_LIBRARY_(lib, m) TORCH_LIBRARY(lib, m)

FASTCLR_LIBRARY_(FASTCLR_OPS_LIB, m) {
  // Forward of NT-Xent and its label-defined family (SupCon, multi-view SimCLR) on the rows
  // z = [z1; z2] (M rows), normalisation fused. Positives of row i: without labels (paired
  // mode: z1, z2 of one shape (N, D), M = 2N), p(i) = (i + N) mod M; with labels (M,) integers,
  // every j != i of equal label (z2 may then be None: all rows in z1). The denominator runs
  // over every j != i. The tensors come positionally (labels too: torch's autograd registration
  // takes no keyword-only tensors), every option by keyword; the kernels'
  // own invariants are checked in csrc/nt_xent_common.h, shared by the CPU and CUDA kernels.
  // Returns (row_loss[M], stats[4, M], norm[M], rank[2, M] or rank[0]), float32 (float64 for
  // float64 input) but rank:
  //   row_loss_i = logsumexp_{j != i} s_ij - mean_{p in P(i)} s_ip (mean_positives) or
  //                - logsumexp_{p in P(i)} s_ip; 0 for a row without a positive;
  //   stats      = (lse_i over j != i, lse_pos_i over P(i), Q_i = the negatives' share of the
  //                 softmax mass, |P(i)|), saved for the backward;
  //   norm_i     = max(||z_i||, 1e-12), saved for the backward (u_i = z_i / norm_i);
  //   rank       = (#negatives above the best positive, the same among the other view's rows
  //                 alone (paired mode; labels mode repeats row 0)), int32, if compute_accuracy.
  // temperature is a 0-dim tensor of the accumulation dtype.
  // Local rows (a rank's share of a gathered batch): only the rows i with (i mod S) in
  // [row_lo, row_lo + row_count) get a loss, S = N in paired mode (so a rank's rows of both
  // views), M with labels; row_count = -1: every row. The other rows are written as rows
  // without a positive (loss 0, |P| = 0, Q = 1, lse = lse_pos = +inf), which the backward
  // weighs 0.
  m.def(
      "nt_xent_forward(Tensor z1, Tensor? z2, Tensor temperature, Tensor? labels=None, *, "
      "bool mean_positives=False, bool compute_accuracy=False, int row_lo=0, int row_count=-1) "
      "-> (Tensor row_loss, Tensor stats, Tensor norm, Tensor rank)");
  // Backward from the per-row upstream gradient grad_rows[M] (any reduction reduces to it).
  // Recomputes the similarity tiles from z, norm and stats; never holds anything M x M. With
  // local rows, only the tiles that meet them; the gradient is still for all M rows: the local
  // rows' own terms and every row's terms as a column of the local rows (a reduce-scatter
  // over ranks completes it). Returns (grad_z1, grad_z2 ((0, D) when z2 is None),
  // grad_temperature).
  m.def(
      "nt_xent_backward(Tensor grad_rows, Tensor z1, Tensor? z2, Tensor temperature, Tensor norm, "
      "Tensor stats, Tensor? labels=None, *, bool mean_positives=False, int row_lo=0, "
      "int row_count=-1) -> (Tensor grad_z1, Tensor grad_z2, Tensor grad_temperature)");
  // The CPU kernels' work for m rows (n of z1) and those local rows: [forward tiles, backward
  // diagonal tiles, backward off-diagonal tiles, forward row block, backward block].
  m.def("nt_xent_tile_counts(int m, int n, *, bool labels, int row_lo=0, int row_count=-1) -> int[]");
  // Cosine similarities s_ij = a_i . b_j / (max(||a_i||, eps) max(||b_j||, eps)), (M, K), in
  // float32 (float64 for float64 input); the normalisation is fused, no normalised copies.
  m.def("normalized_similarity(Tensor a, Tensor b) -> Tensor");
  // Its gradient (composite: two matrix products), given the forward's output.
  m.def(
      "normalized_similarity_backward(Tensor grad, Tensor a, Tensor b, Tensor out) "
      "-> (Tensor, Tensor)");
  // The k largest s_ij per query i over the bank, streamed over tiles of `chunk` bank rows:
  // (values[M, k] best first, indices[M, k] int64), ties to the lower bank index.
  m.def("knn_topk(Tensor queries, Tensor bank, *, int k, int chunk) -> (Tensor values, Tensor indices)");
  // One LARS step (fastclr/optim.py has the equations) for a list of parameters, in place on
  // params and momentum_buffers (float32); grads are read only. found_inf (a one-element float32
  // tensor on the params' device, as GradScaler's): when it holds a nonzero value the step
  // changes nothing -- read by the kernels themselves, so the host never waits for it.
  m.def(
      "lars_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, *, "
      "float lr, float momentum, float weight_decay, float trust_coefficient, bool nesterov, "
      "bool exclude, Tensor? found_inf=None) -> ()");
}
