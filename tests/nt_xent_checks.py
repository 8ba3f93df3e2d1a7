"""Checks every NT-Xent backend runs: one body per check, ``impl`` and device as arguments; and
the table of backends (impl, device, marks) the loss tests run them on."""
import numpy as np
import pytest
import torch

import cuda_on_cpu
import fastclr
from fastclr import ops, reference

needs_ext = pytest.mark.skipif(not fastclr.extension_available(),
                               reason=f"extension not built: {fastclr.extension_error()}")
needs_interp = pytest.mark.skipif(not ops.triton_interpreting(),
                                  reason="Triton interpreter not active (a GPU is present, or no triton)")
needs_triton_cuda = [pytest.mark.cuda, pytest.mark.skipif(
    not (ops.triton_available() and not ops.triton_interpreting()), reason="needs triton on a GPU")]

needs_cuda_kernel = [pytest.mark.cuda, pytest.mark.skipif(
    not ops.compiled_with_cuda(), reason="fastclr._C was built without its CUDA kernels")]
# The CUDA kernels executed on the CPU (tests/cuda_on_cpu/, loaded by conftest's fixture for the
# tests this mark names): impl="cuda" on CPU tensors.
needs_cuda_on_cpu = [pytest.mark.cuda_on_cpu, pytest.mark.skipif(
    bool(cuda_on_cpu.unavailable()), reason=f"CUDA kernels' CPU harness: {cuda_on_cpu.unavailable()}")]

# Which backend runs a check: (impl, device, marks). A newcomer's table of who ran what:
#   cpu            the C++ kernels (csrc/), natively                          CI
#   triton_interp  the Triton kernels on CPU tensors, triton's interpreter    CI
#   cuda_on_cpu    the CUDA kernels (kernels/*.cu) on CPU tensors, executed
#                  by the CPU harness (one thread per CUDA thread)            CI
#   triton_cuda    the Triton kernels on a GPU                                GPU suite
#   cuda           the CUDA kernels on a GPU                                  GPU suite
BACKENDS = {
    "cpu": ("cpu", "cpu", [needs_ext]),
    "triton_interp": ("triton", "cpu", [needs_interp]),
    "cuda_on_cpu": ("cuda", "cpu", needs_cuda_on_cpu),
    "triton_cuda": ("triton", "cuda", needs_triton_cuda),
    "cuda": ("cuda", "cuda", needs_cuda_kernel),
}


def backends(*names):
    """pytest params (impl, device) of the named backends (all by default)."""
    names = names or tuple(BACKENDS)
    return [pytest.param(*BACKENDS[k][:2], marks=BACKENDS[k][2], id=k) for k in names]


def make_inputs(n, d, dtype=torch.float32, device="cpu", scale=1.0, correlated=False):
    """Fresh random (z1, z2) in float64 first, so low-precision copies round the same values."""
    z1 = torch.randn(n, d, dtype=torch.float64) * scale
    z2 = torch.randn(n, d, dtype=torch.float64) * scale
    if correlated:  # views of the same image: positives rank high, accuracy is informative
        z2 = z1 + 0.5 * z2
    return z1.to(device=device, dtype=dtype), z2.to(device=device, dtype=dtype)


def run(fn, z1, z2, temperature, grad_weights=None, **kwargs):
    """Loss and gradients (z1, z2, temperature) of ``fn``; the temperature is a leaf tensor."""
    z1 = z1.detach().clone().requires_grad_(True)
    z2 = z2.detach().clone().requires_grad_(True)
    t = torch.tensor(temperature, dtype=reference.accumulation_dtype(z1.dtype),
                     device=z1.device, requires_grad=True)
    loss = fn(z1, z2, t, **kwargs)
    out = loss[0] if isinstance(loss, tuple) else loss
    weighted = out if grad_weights is None else (out * grad_weights.to(out)).sum()
    g1, g2, gt = torch.autograd.grad(weighted, (z1, z2, t))
    return loss, g1, g2, gt


def fused(impl):
    return lambda z1, z2, t, **kw: fastclr.nt_xent_fused(z1, z2, t, impl=impl, **kw)


def ref64(z1, z2, t, **kw):
    return reference.nt_xent(z1.double(), z2.double(), t.double(), **kw)


def max_rel(a, b, floor=1e-300):
    """max |a - b| / max(max |b|, floor): error relative to the tensor's scale; ``floor`` keeps
    a value that is ~0 in exact arithmetic from dividing by its rounding."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(floor)).item()


def check_against_reference(impl, n, d, temperature, dtype=torch.float32, device="cpu",
                            scale=1.0, reduction="mean", loss_tol=1e-5, grad_tol=1e-4):
    """Forward within loss_tol and gradients (z1, z2, temperature) within grad_tol, relative,
    of the float64 reference on the same inputs."""
    z1, z2 = make_inputs(n, d, dtype, device, scale)
    w = torch.rand(2 * n, dtype=torch.float64) if reduction == "none" else None
    loss, g1, g2, gt = run(fused(impl), z1, z2, temperature, w, reduction=reduction)
    rloss, r1, r2, rt = run(ref64, z1, z2, temperature, w, reduction=reduction)
    assert loss.dtype == reference.accumulation_dtype(dtype)
    assert g1.dtype == dtype and g2.dtype == dtype and g1.shape == z1.shape
    # The loss is a difference of logits of size 1/tau: where it is itself ~0 (N = 1, D = 1,
    # near-identical views), its error is judged against a tenth of that size.
    floor = 0.1 / temperature
    assert max_rel(loss, rloss, floor) <= loss_tol, (max_rel(loss, rloss, floor), loss, rloss)
    # Gradients: within grad_tol of the reference's scale, or, where the exact gradient is ~0
    # (N = 1, D = 1: rounding is all there is), no worse than 4x a float32 PyTorch computation
    # or than a tenth of grad_tol of the gradient's natural scale (a float32 PyTorch
    # computation can cancel exactly where a tiled one leaves rounding).
    _, f1, f2, ft = run(lambda a, b, t, **kw: reference.nt_xent(a.float(), b.float(), t.float(), **kw),
                        z1, z2, temperature, w, reduction=reduction)
    norm = torch.cat([z1, z2]).double().norm(dim=1).mean().item()
    natural = {"z": 1 / (temperature * norm), "t": 1 / temperature**2}
    if reduction == "mean":
        natural = {k: v / (2 * n) for k, v in natural.items()}
    for g, r, f, kind in ((g1, r1, f1, "z"), (g2, r2, f2, "z"), (gt, rt, ft, "t")):
        err, err32 = (g.double() - r).abs().max().item(), (f.double() - r).abs().max().item()
        bound = max(grad_tol * r.abs().max().item(), 4 * err32, 0.1 * grad_tol * natural[kind])
        assert err <= bound, (kind, err, bound, r.abs().max().item())


def check_half(impl, n, d, temperature, dtype, device="cpu"):
    """Half inputs: loss in float32, gradients in the input dtype, errors bounded by a small
    multiple of those of the same computation done in PyTorch in that dtype."""
    z1, z2 = make_inputs(n, d, dtype, device, correlated=True)
    loss, g1, g2, _ = run(fused(impl), z1, z2, temperature)
    rloss, r1, r2, _ = run(ref64, z1, z2, temperature)
    assert loss.dtype == torch.float32 and g1.dtype == dtype and g2.dtype == dtype

    def naive_same_dtype(a, b, t):
        z = torch.nn.functional.normalize(torch.cat([a, b]), dim=1)
        s = (z @ z.T) / t.to(dtype)
        m = s.shape[0]
        s = s.masked_fill(torch.eye(m, dtype=torch.bool, device=s.device), float("-inf"))
        return torch.nn.functional.cross_entropy(s, (torch.arange(m, device=s.device) + m // 2) % m)

    hloss, h1, h2, _ = run(naive_same_dtype, z1, z2, temperature)
    # The kernel's own arithmetic is float32, so at least float32-like on the loss.
    assert max_rel(loss, rloss) <= max(2 * max_rel(hloss, rloss), 1e-5)
    assert max_rel(g1, r1) <= max(2 * max_rel(h1, r1), 1e-2)
    assert max_rel(g2, r2) <= max(2 * max_rel(h2, r2), 1e-2)


def _min_margin(z1, z2, temperature):
    """Smallest |s_ij - s_{i,p(i)}| over negatives, in float64: how near a tie the data is."""
    s = reference.similarity_logits(z1.double(), z2.double(), temperature)
    m = s.shape[0]
    p = reference.positive_index(m)
    pos = s[torch.arange(m), p]
    mask = torch.eye(m, dtype=torch.bool) | torch.nn.functional.one_hot(p, m).bool()
    return (s - pos[:, None]).abs().masked_fill(mask, float("inf")).min().item()


def google_contrast_acc(z1, z2, tau):
    """google-research/simclr's contrast_acc, transcribed (tf2/objective.py add_contrastive_loss
    + tf2/metrics.py): l2-normalised hidden1, hidden2; logits_ab = hidden1 hidden2^T / tau (N x N);
    labels = one_hot(arange(N), 2N); the mean of argmax(labels) == argmax(logits_ab), where
    argmax takes the first of equal values. In float64, with numpy."""
    h1 = z1.double().numpy()
    h2 = z2.double().numpy()
    h1 = h1 / np.maximum(np.sqrt((h1 * h1).sum(1, keepdims=True)), 1e-12)
    h2 = h2 / np.maximum(np.sqrt((h2 * h2).sum(1, keepdims=True)), 1e-12)
    logits_ab = h1 @ h2.T / tau
    n = len(h1)
    labels = np.eye(n, 2 * n)
    return float(np.mean(np.argmax(labels, 1) == np.argmax(logits_ab, 1)))


def check_accuracy(impl, n, d, device="cpu"):
    """top-1/top-5 equal the float64 reference's exactly, on data with no near-ties (where
    float32 rounding could legitimately flip a comparison), plus two known answers."""
    for _ in range(20):
        z1, z2 = make_inputs(n, d, torch.float32, device, correlated=True)
        if _min_margin(z1.cpu(), z2.cpu(), 0.1) > 1e-4:
            break
    loss, acc = fastclr.nt_xent_fused(z1, z2, 0.1, impl=impl, return_accuracy=True)
    rloss, racc = reference.nt_xent(z1.double(), z2.double(), 0.1, return_accuracy=True)
    assert set(acc) == {"top1", "top5", "contrast_acc"}
    for k in acc:
        assert acc[k].dtype == torch.float32
        assert acc[k].item() == racc[k].item(), (k, acc[k], racc[k])
    assert round(acc["contrast_acc"].item() * n) == round(google_contrast_acc(z1.cpu(), z2.cpu(), 0.1) * n)
    assert max_rel(loss, rloss, 0.1 / 0.1) <= 1e-5  # floor as in check_against_reference
    # Identical views: each positive is the best match. Opposite views: the worst.
    _, same = fastclr.nt_xent_fused(z1, z1, 0.5, impl=impl, return_accuracy=True)
    assert same["top1"].item() == 1.0 and same["top5"].item() == 1.0
    _, opposite = fastclr.nt_xent_fused(z1, -z1, 0.5, impl=impl, return_accuracy=True)
    expected_top5 = 1.0 if 2 * n - 2 < 5 else 0.0
    assert opposite["top1"].item() == (1.0 if n == 1 else 0.0)
    assert opposite["top5"].item() == expected_top5
    assert same["contrast_acc"].item() == 1.0
    assert opposite["contrast_acc"].item() == (1.0 if n == 1 else 0.0)


def chunked_reference64(z1, z2, temperature, w, chunk=2048):
    """Per-row losses and the gradients (z1, z2, temperature) of sum_i w_i loss_i in float64,
    from docs/math.md's closed forms, in row chunks (never M x M): the oracle for batches too large
    for the reference's autograd. Uses the symmetry of s for the column term."""
    z = torch.cat([z1, z2]).double()
    m, n = z.shape[0], z.shape[0] // 2
    w = w.double().to(z.device)
    norm = z.norm(dim=1).clamp_min(1e-12)
    u = z / norm[:, None]
    p = (torch.arange(m, device=z.device) + n) % m
    pos = (u * u[p]).sum(1) / temperature
    lse = torch.empty(m, dtype=torch.float64, device=z.device)
    for i0 in range(0, m, chunk):
        s = u[i0:i0 + chunk] @ u.T / temperature
        s[torch.arange(s.shape[0]), torch.arange(i0, i0 + s.shape[0])] = float("-inf")
        lse[i0:i0 + chunk] = torch.logsumexp(s, dim=1)
    grad_u = torch.empty_like(u)
    t_sum = 0.0
    for i0 in range(0, m, chunk):
        s = u[i0:i0 + chunk] @ u.T / temperature
        r = torch.arange(s.shape[0])
        s[r, torch.arange(i0, i0 + s.shape[0])] = float("-inf")
        wi, li = w[i0:i0 + chunk, None], lse[i0:i0 + chunk, None]
        a = wi * torch.exp(s - li) + w[None, :] * torch.exp(s - lse[None, :])
        grad_u[i0:i0 + chunk] = a @ u
        t_sum += (wi * torch.exp(s - li) * s.nan_to_num(neginf=0.0)).sum().item()
    grad_u = (grad_u - (w + w[p])[:, None] * u[p]) / temperature
    grad_z = (grad_u - (grad_u * u).sum(1, keepdim=True) * u) / norm[:, None]
    grad_z = torch.where((norm <= 1e-12)[:, None], grad_u / norm[:, None], grad_z)
    grad_t = -(t_sum - (w * pos).sum().item()) / temperature
    return (lse - pos), grad_z[:n], grad_z[n:], torch.tensor(grad_t, dtype=torch.float64)
