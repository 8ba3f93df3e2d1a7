"""supcon_fused / SupConLoss: every fused backend against the float64 reference and against an
independent float64 formulation, forward and backward, both forms, all reductions; the label
patterns that break peers (singletons, one class, all distinct, V views); NT-Xent as the
two-view special case; pytorch-metric-learning's SupConLoss; bad labels."""
import math

import pytest
import torch
import torch.nn.functional as F

import fastclr
from fastclr import reference
from nt_xent_checks import backends, max_rel, needs_ext

POSITIVES = ("mean", "sum")


def labels_for(kind: str, m: int, seed: int = 0) -> torch.Tensor:
    """Label patterns of m rows. Values are spread over int64 (negative, beyond 2^32), so no
    kernel may narrow them."""
    g = torch.Generator().manual_seed(seed)
    if kind == "classes":  # a few rows per class
        base = torch.randint(0, max(1, m // 4), (m,), generator=g)
    elif kind == "singletons":  # classes, and a third of the rows alone (no positive)
        base = torch.randint(0, max(1, m // 6), (m,), generator=g)
        alone = torch.randperm(m, generator=g)[: m // 3]
        base[alone] = 10**6 + torch.arange(len(alone))
    elif kind == "one_class":
        base = torch.zeros(m, dtype=torch.long)
    elif kind == "distinct":  # no row has a positive
        base = torch.randperm(m, generator=g)
    elif kind.startswith("views"):  # V views of m / V images, stacked
        v = int(kind[5:])
        base = torch.arange(m // v).repeat(v)
    else:
        raise ValueError(kind)
    return base * 3_000_000_019 - 2**40


def direct64(z, labels, t, positives):
    """SupCon as the official SupContrast code writes it (log-softmax over j != i, then the
    positives' mean of log-probabilities, or the log of their summed probability), float64,
    rows without a positive set to 0 -- independent of reference.supcon's form."""
    u = F.normalize(z.double(), dim=1)
    s = u @ u.T / t
    m = s.shape[0]
    eye = torch.eye(m, dtype=torch.bool)
    log_prob = s.masked_fill(eye, float("-inf")).log_softmax(dim=1)
    same = (labels[:, None] == labels[None, :]) & ~eye
    count = same.sum(1)
    safe = torch.where(same, log_prob, 0.0)
    if positives == "mean":
        rows = -safe.sum(1) / count.clamp_min(1)
    else:
        rows = -torch.logsumexp(torch.where(same, log_prob, float("-inf")), dim=1)
    return torch.where(count > 0, rows, 0.0), count


def run(fn, z, t, w):
    """(loss, grad_z, grad_t) of fn(z, t) (weighted by w when it returns rows)."""
    z = z.detach().clone().requires_grad_(True)
    t = torch.tensor(t, dtype=reference.accumulation_dtype(z.dtype), device=z.device,
                     requires_grad=True)
    out = fn(z, t)
    total = out if out.dim() == 0 else (out * w.to(out)).sum()
    gz, gt = torch.autograd.grad(total, (z, t))
    return out.detach(), gz, gt


def check(impl, device, m, d, kind, positives, reduction, tau=0.2, dtype=torch.float32,
          loss_tol=1e-5, grad_tol=1e-4):
    torch.manual_seed(m * 31 + d)
    z = torch.randn(m, d, dtype=torch.float64)
    labels = labels_for(kind, m)
    w = torch.rand(m, dtype=torch.float64)
    fused = lambda z, t: fastclr.supcon_fused(z, labels.to(z.device), t, positives=positives,  # noqa: E731
                                              impl=impl, reduction=reduction)
    loss, gz, gt = run(fused, z.to(device=device, dtype=dtype), tau, w.to(device))
    ref = lambda z, t: reference.supcon(z, labels, t, positives, reduction)  # noqa: E731
    rloss, rz, rt = run(ref, z, tau, w)
    assert loss.dtype == reference.accumulation_dtype(dtype) and gz.dtype == dtype
    # the loss is judged against a tenth of the logits' size where it is itself ~0
    assert max_rel(loss.cpu(), rloss, 0.1 / tau) <= loss_tol, (loss, rloss)
    natural = 1 / (tau * m)  # the scale of one row's gradient
    for g, r, kind_ in ((gz, rz, "z"), (gt, rt, "t")):
        err = (g.cpu().double() - r).abs().max().item()
        assert err <= max(grad_tol * r.abs().max().item(), 0.1 * grad_tol * natural), (kind_, err)
    return loss, gz


SHAPES = {"cpu": [(2, 3), (7, 5), (37, 19), (300, 64), (1030, 33)],
          "triton_interp": [(2, 3), (37, 19), (130, 64), (70, 300)],
          "cuda_on_cpu": [(2, 3), (37, 19), (130, 64), (70, 300)],
          "triton_cuda": [(37, 19), (1000, 130), (4097, 64), (3000, 1024)],
          "cuda": [(37, 19), (1000, 130), (4097, 64), (3000, 1024)]}
KINDS = ("classes", "singletons", "one_class", "distinct", "views2", "views3", "views4")


def shape_cases():
    out = []
    for p in backends():
        name = p.id
        for m, d in SHAPES[name]:
            out.append(pytest.param(*p.values, m, d, marks=p.marks, id=f"{name}-{m}x{d}"))
    return out


@pytest.mark.parametrize("impl,device,m,d", shape_cases())
@pytest.mark.parametrize("positives", POSITIVES)
def test_matches_reference(impl, device, m, d, positives):
    for kind in ("classes", "singletons"):
        check(impl, device, m, d, kind, positives, "mean")


@pytest.mark.parametrize("impl,device", backends())
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("positives", POSITIVES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_label_patterns_and_reductions(impl, device, kind, positives, reduction):
    m = 60 if device == "cpu" else 600
    loss, gz = check(impl, device, m, 24, kind, positives, reduction)
    assert torch.isfinite(loss).all() and torch.isfinite(gz).all()
    if kind == "distinct":  # no positive anywhere: a 0 that back-propagates zeros
        assert (loss == 0).all() and (gz == 0).all()


@pytest.mark.parametrize("tau", [0.05, 0.5, 1.0])
@pytest.mark.parametrize("positives", POSITIVES)
def test_reference_matches_direct_formulation(tau, positives):
    """The spec itself against SupContrast's formulation, per row, and its autograd."""
    for kind in KINDS:
        z = torch.randn(48, 9, dtype=torch.float64)
        labels = labels_for(kind, 48)
        w = torch.rand(48, dtype=torch.float64)
        rows, rz, rt = run(lambda z, t: reference.supcon(z, labels, t, positives, "none"), z, tau, w)
        drows, dz, dt = run(lambda z, t: direct64(z, labels, t, positives)[0], z, tau, w)
        torch.testing.assert_close(rows, drows, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(rz, dz, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(rt, dt, rtol=1e-10, atol=1e-12)
        count = direct64(z, labels, tau, positives)[1]
        mean = reference.supcon(z, labels, tau, positives)
        torch.testing.assert_close(mean, drows.sum() / (count > 0).sum().clamp_min(1))


@pytest.mark.parametrize("impl,device", backends())
@pytest.mark.parametrize("positives", POSITIVES)
def test_fused_matches_direct_formulation(impl, device, positives):
    m = 90 if device == "cpu" else 900
    z = torch.randn(m, 20, dtype=torch.float64)
    labels = labels_for("singletons", m, seed=3)
    w = torch.rand(m, dtype=torch.float64)
    rows, gz, gt = run(lambda z, t: fastclr.supcon_fused(
        z, labels.to(z.device), t, positives=positives, impl=impl, reduction="none"),
        z.float().to(device), 0.1, w.to(device))
    drows, dz, dt = run(lambda z, t: direct64(z, labels, t, positives)[0], z, 0.1, w)
    assert max_rel(rows.cpu(), drows, 1.0) <= 1e-5
    assert max_rel(gz.cpu(), dz) <= 1e-4
    assert max_rel(gt.cpu(), dt) <= 1e-4


@pytest.mark.parametrize("impl,device", backends())
@pytest.mark.parametrize("positives", POSITIVES)
def test_two_views_equal_nt_xent(impl, device, positives):
    """labels = arange(N).repeat(2): both forms are NT-Xent, loss, gradients and accuracy."""
    n = 45 if device == "cpu" else 700
    z1, z2 = torch.randn(n, 16, device=device), torch.randn(n, 16, device=device)
    z2 = z1 + 0.7 * z2
    labels = torch.arange(n, device=device).repeat(2)
    a = torch.cat([z1, z2]).requires_grad_()
    loss, acc = fastclr.supcon_fused(a, labels, 0.3, positives=positives, impl=impl,
                                     return_accuracy=True)
    (ga,) = torch.autograd.grad(loss, a)
    b1, b2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    ref, racc = fastclr.nt_xent_fused(b1, b2, 0.3, impl=impl, return_accuracy=True)
    g1, g2 = torch.autograd.grad(ref, (b1, b2))
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ga, torch.cat([g1, g2]), rtol=1e-4, atol=1e-7)
    assert acc["top1"] == racc["top1"] and acc["top5"] == racc["top5"]


@pytest.mark.parametrize("impl,device", backends())
def test_accuracy_matches_reference(impl, device):
    m = 120 if device == "cpu" else 1200
    for kind in ("classes", "singletons", "views3"):
        base = torch.randn(m // 3 + 1, 12, dtype=torch.float64)
        labels = labels_for(kind, m)
        # rows near their class's centre: accuracies away from 0 and 1
        z = base[labels.remainder(m // 3 + 1)] + 0.8 * torch.randn(m, 12, dtype=torch.float64)
        _, acc = fastclr.supcon_fused(z.float().to(device), labels.to(device), 0.1, impl=impl,
                                      return_accuracy=True)
        _, racc = reference.supcon(z.float(), labels, 0.1, return_accuracy=True)
        assert set(acc) == {"top1", "top5"}
        for k in acc:
            assert acc[k].item() == racc[k].item(), (kind, k, acc[k], racc[k])
    _, none = fastclr.supcon_fused(z.float().to(device), labels_for("distinct", m).to(device),
                                   0.1, impl=impl, return_accuracy=True)
    assert none["top1"].item() == 0.0 and none["top5"].item() == 0.0


@pytest.mark.parametrize("impl,device", backends())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs(impl, device, dtype):
    """Loss in float32, gradients in the input dtype, no worse than PyTorch computing the same
    in that dtype (twice its error, or 1e-2 of the gradient's scale)."""
    if device == "cpu" and impl == "triton" and dtype == torch.bfloat16:
        pytest.skip("triton's interpreter gets tl.dot wrong on bfloat16 operands; the GPU suite checks bf16")
    m = 150 if device == "cpu" else 1500
    z = torch.randn(m, 32, dtype=torch.float64)
    labels = labels_for("classes", m)
    w = torch.ones(m, dtype=torch.float64)
    loss, gz, _ = run(lambda z, t: fastclr.supcon_fused(z, labels.to(z.device), t, impl=impl),
                      z.to(device=device, dtype=dtype), 0.2, w)
    rloss, rz, _ = run(lambda z, t: reference.supcon(z, labels, t), z, 0.2, w)

    def naive(z, t):  # the same loss in PyTorch, in the input dtype throughout
        u = F.normalize(z, dim=1)
        s = (u @ u.T / t.to(z.dtype)).masked_fill(torch.eye(m, dtype=torch.bool), float("-inf"))
        same = (labels[:, None] == labels[None, :]) & ~torch.eye(m, dtype=torch.bool)
        lp = s.log_softmax(1)
        return (-(torch.where(same, lp, 0).sum(1) / same.sum(1).clamp_min(1)))[same.any(1)].mean()

    hloss, hz, _ = run(naive, z.to(dtype), 0.2, w)
    assert loss.dtype == torch.float32 and gz.dtype == dtype
    assert max_rel(loss.cpu(), rloss) <= max(2 * max_rel(hloss, rloss), 1e-5)
    assert max_rel(gz.cpu(), rz) <= max(2 * max_rel(hz, rz), 1e-2)


@needs_ext
@pytest.mark.parametrize("positives", POSITIVES)
def test_cpu_float64_matches_reference_to_double_precision(positives):
    z = torch.randn(77, 13, dtype=torch.float64)
    labels = labels_for("singletons", 77)
    w = torch.rand(77, dtype=torch.float64)
    a = run(lambda z, t: fastclr.supcon_fused(z, labels, t, positives=positives, impl="cpu",
                                              reduction="none"), z, 0.15, w)
    b = run(lambda z, t: reference.supcon(z, labels, t, positives, "none"), z, 0.15, w)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-13)


@needs_ext
def test_cpu_gradcheck_float64():
    z = torch.randn(11, 4, dtype=torch.float64, requires_grad=True)
    t = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3, 0, 5, 1])
    for positives in POSITIVES:
        assert torch.autograd.gradcheck(
            lambda z, t: fastclr.supcon_fused(z, labels, t, positives=positives, impl="cpu",
                                              reduction="none"), (z, t))


@needs_ext
def test_double_backward_through_reference():
    """create_graph=True (a gradient penalty) differentiates the reference's formula."""
    z = torch.randn(20, 6, dtype=torch.float64, requires_grad=True)
    labels = labels_for("classes", 20)
    (g,) = torch.autograd.grad(fastclr.supcon_fused(z, labels, 0.3, impl="cpu"), z, create_graph=True)
    (gg,) = torch.autograd.grad(g.square().sum(), z)
    zr = z.detach().clone().requires_grad_()
    (gr,) = torch.autograd.grad(reference.supcon(zr, labels, 0.3), zr, create_graph=True)
    (ggr,) = torch.autograd.grad(gr.square().sum(), zr)
    torch.testing.assert_close(gg, ggr)


@needs_ext
@pytest.mark.parametrize("positives", POSITIVES)
def test_matches_pytorch_metric_learning(positives):
    """pytorch-metric-learning's SupConLoss (L_out, mean over rows with a positive) on the same
    inputs; its "sum" counterpart is the log of the summed positive probability."""
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    torch.manual_seed(0)
    z = torch.randn(200, 32, dtype=torch.float64)
    labels = labels_for("singletons", 200) // 3_000_000_019  # pml wants small labels
    ours = fastclr.supcon_fused(z.float(), labels, 0.1, positives="mean", impl="cpu")
    if positives == "mean":
        theirs = losses.SupConLoss(temperature=0.1)(z, labels)
        assert math.isclose(ours.item(), theirs.item(), rel_tol=1e-5)
    else:
        ours_sum = fastclr.supcon_fused(z.float(), labels, 0.1, positives="sum", impl="cpu")
        assert ours_sum.item() < ours.item()  # L_in <= L_out (Jensen), strictly here


@needs_ext
def test_torch_compile_fullgraph_cpu():
    z = torch.randn(150, 32, requires_grad=True)
    labels = labels_for("classes", 150)

    def step(a):
        loss, acc = fastclr.supcon_fused(a, labels, 0.2, impl="cpu", return_accuracy=True)
        return loss, acc["top1"]

    loss, top1 = torch.compile(step, fullgraph=True)(z)
    (g,) = torch.autograd.grad(loss, z)
    eloss, etop1 = step(z)
    (e,) = torch.autograd.grad(eloss, z)
    torch.testing.assert_close(loss, eloss)
    torch.testing.assert_close(top1, etop1)
    torch.testing.assert_close(g, e)


def test_module_and_learnable_temperature():
    z = torch.randn(40, 8)
    labels = labels_for("classes", 40)
    fixed = fastclr.SupConLoss(temperature=0.2, positives="sum")
    assert list(fixed.parameters()) == []
    torch.testing.assert_close(fixed(z, labels), fastclr.supcon_fused(z, labels, 0.2, positives="sum"))
    learn = fastclr.SupConLoss(temperature=0.2, learnable_temperature=True)
    (param,) = list(learn.parameters())
    learn(z, labels).backward()
    t = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    reference.supcon(z.double(), labels, t).backward()
    assert math.isclose(param.grad.item(), 0.2 * t.grad.item(), rel_tol=1e-4, abs_tol=1e-6)
    learn.temperature = 0.5
    assert math.isclose(learn.temperature.item(), 0.5, rel_tol=1e-6)
    _, acc = learn(z, labels, return_accuracy=True)
    assert set(acc) == {"top1", "top5"}
    assert "positives='sum'" in repr(fixed) and "learnable" in repr(learn)


@pytest.mark.parametrize("bad,err,match", [
    ([0, 1, 0], TypeError, "labels must be a torch.Tensor"),
    (torch.zeros(6), TypeError, "labels must be an integer tensor"),
    (torch.zeros(6, dtype=torch.bool), TypeError, "labels must be an integer tensor"),
    (torch.zeros(5, dtype=torch.long), ValueError, r"labels must be 1-D with one label per row of z \(6,\)"),
    (torch.zeros(6, 1, dtype=torch.long), ValueError, "labels must be 1-D"),
    (torch.zeros(6, dtype=torch.long, device="meta"), ValueError, "labels must be on z's device"),
])
def test_bad_labels_raise(bad, err, match):
    with pytest.raises(err, match=match):
        fastclr.supcon_fused(torch.randn(6, 4), bad)


@pytest.mark.parametrize("kwargs,match", [
    (dict(positives="max"), "positives must be one of"), (dict(reduction="avg"), "reduction"),
    (dict(temperature=0.0), "temperature"), (dict(impl="fast"), "impl must be one of")])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastclr.supcon_fused(torch.randn(6, 4), torch.zeros(6, dtype=torch.long), **kwargs)
    if "temperature" not in kwargs:
        with pytest.raises(ValueError, match=match):
            fastclr.SupConLoss(**kwargs)


def test_bad_embeddings_raise():
    with pytest.raises(ValueError, match="supcon_fused: z must be 2-D"):
        fastclr.supcon_fused(torch.randn(6), torch.zeros(6, dtype=torch.long))
    with pytest.raises(TypeError, match="supcon_fused: z must be float"):
        fastclr.supcon_fused(torch.zeros(6, 3, dtype=torch.long), torch.zeros(6, dtype=torch.long))


@needs_ext
def test_bench_loss_supcon_runs(capsys):
    from benchmarks import bench_loss
    bench_loss.main(["--loss", "supcon", "--labels", "views:4", "--sizes", "256", "--impls", "cpu",
                     "naive", "pml", "--repeats", "1", "--no-save"])
    out = capsys.readouterr().out
    assert "SupCon (mean positives, labels views:4)" in out
    assert "| 256 | 128 | cpu |" in out and "| 256 | 128 | naive |" in out and "| 256 | 128 | pml |" in out
