"""Coming from a peer's library: the peer's call and the fastclr call docs/api.md gives for it
compute the same values and gradients on random inputs; where the two differ by a convention,
the difference is pinned to what docs/api.md says. A peer's release that changes a convention
shows up here as a failing test, not as a silent difference in someone's training run.

The peers are those `make test` installs (lightly, pytorch-metric-learning, timm)."""
import pytest
import torch
from torch import nn

import fastclr
from fastclr.app import evaluate as ev

lightly_loss = pytest.importorskip("lightly.loss")
pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
timm_optim = pytest.importorskip("timm.optim")
from lightly.utils.lars import LARS as LightlyLARS  # noqa: E402


def _views(n=37, d=19, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z1, z2 = (torch.randn(n, d, generator=g, dtype=dtype).requires_grad_() for _ in range(2))
    return z1, z2


def _value_and_grads(loss, *leaves):
    grads = torch.autograd.grad(loss, leaves)
    return loss.detach(), grads


def _close(a, b, rtol=1e-6):
    (va, ga), (vb, gb) = a, b
    torch.testing.assert_close(va, vb, rtol=rtol, atol=0)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=rtol, atol=1e-9)


@pytest.mark.parametrize("t", [0.1, 0.5])
def test_lightly_ntxent(t):
    z1, z2 = _views()
    theirs = _value_and_grads(lightly_loss.NTXentLoss(temperature=t)(z1, z2), z1, z2)
    ours = _value_and_grads(fastclr.nt_xent_fused(z1, z2, t), z1, z2)
    _close(ours, theirs)


@pytest.mark.parametrize("t", [0.07, 0.5])
def test_pml_ntxent_with_pair_labels(t):
    z1, z2 = _views(seed=1)
    n = len(z1)
    labels = torch.cat([torch.arange(n), torch.arange(n)])
    theirs = _value_and_grads(pml_losses.NTXentLoss(temperature=t)(torch.cat([z1, z2]), labels), z1, z2)
    ours = _value_and_grads(fastclr.nt_xent_fused(z1, z2, t), z1, z2)
    _close(ours, theirs)


@pytest.mark.parametrize("t", [0.1, 0.3])
def test_pml_supcon(t):
    g = torch.Generator().manual_seed(2)
    z = torch.randn(41, 13, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 5, (41,), generator=g)
    theirs = _value_and_grads(pml_losses.SupConLoss(temperature=t)(z, labels), z)
    ours = _value_and_grads(fastclr.supcon_fused(z, labels, t), z)
    _close(ours, theirs)


def test_pml_supcon_without_negatives_is_zero_where_fastclr_gives_l_out():
    """Every row of one class: PML returns 0; fastclr returns SupCon's L_out, the mean over the
    positives of -log softmax, which is log(M - 1) when nothing but positives is in the batch
    and they are identical (docs/api.md, pytorch-metric-learning)."""
    z = torch.ones(6, 4, dtype=torch.float64)
    labels = torch.zeros(6, dtype=torch.long)
    assert float(pml_losses.SupConLoss(temperature=0.1)(z, labels)) == 0.0
    assert float(fastclr.supcon_fused(z, labels, 0.1)) == pytest.approx(float(torch.log(torch.tensor(5.0))))


def test_pml_returns_the_input_dtype_fastclr_float32_for_half():
    z = torch.randn(16, 8).to(torch.bfloat16)
    labels = torch.arange(16) % 4
    assert pml_losses.SupConLoss(temperature=0.1)(z, labels).dtype == torch.bfloat16
    ours = fastclr.supcon_fused(z, labels, 0.1)
    assert ours.dtype == torch.float32
    assert float(ours.to(torch.bfloat16)) == pytest.approx(float(fastclr.supcon_fused(z.float(), labels, 0.1)), rel=2e-2)


def test_lightly_knn_takes_the_bank_transposed():
    """lightly's knn_predict(feature, feature_bank (D, N), labels, classes, k, t) and fastclr's
    knn_predict(bank (N, D), labels, queries, classes, k=, temperature=) give the same scores'
    ranking; lightly's expects normalised features, fastclr normalises."""
    from lightly.utils.benchmarking import knn_predict as lightly_knn
    g = torch.Generator().manual_seed(5)
    bank, queries = torch.randn(300, 16, generator=g), torch.randn(40, 16, generator=g)
    labels = torch.randint(0, 7, (300,), generator=g)
    unit = nn.functional.normalize
    theirs = lightly_knn(unit(queries), unit(bank).T.contiguous(), labels, 7, 20, 0.1)
    scores = ev.knn_predict(bank, labels, queries, 7, k=20, temperature=0.1)
    assert torch.equal(theirs[:, 0], scores.argmax(1))


def _lars_pair(make_theirs, ours_kw, *, steps=4, lr=0.2, wd=0.0):
    g = torch.Generator().manual_seed(6)
    start = [torch.randn(7, 5, generator=g), torch.randn(11, generator=g)]
    grads = [[torch.randn(p.shape, generator=g) for p in start] for _ in range(steps)]
    a = [nn.Parameter(p.clone()) for p in start]
    b = [nn.Parameter(p.clone()) for p in start]
    theirs = make_theirs(a, lr)
    ours = fastclr.LARS([{"params": b, **ours_kw}], lr, momentum=0.9, weight_decay=wd, trust_coefficient=0.001)
    for step in grads:
        for p, q, gr in zip(a, b, step):
            p.grad, q.grad = gr.clone(), gr.clone()
        theirs.step()
        ours.step()
    return a, b


def test_lightly_lars_zero_weight_decay_group_is_fastclr_exclude():
    """lightly's LARS skips the trust ratio for a weight_decay=0 group; fastclr skips it for
    exclude=True (google-research/simclr's rule). At a constant lr the steps are equal."""
    a, b = _lars_pair(lambda ps, lr: LightlyLARS(ps, lr=lr, momentum=0.9, weight_decay=0.0), {"exclude": True})
    for p, q in zip(a, b):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


@pytest.mark.filterwarnings("ignore:LARS. a param group has weight_decay=0")  # the difference it warns of is the point
def test_timm_lars_always_adapt_is_fastclr_at_zero_weight_decay():
    """timm's Lars(always_adapt=True, weight_decay=0): trust tc·|w|/(|g| + eps), fastclr's
    tc·|w|/|g| -- equal but for eps."""
    a, b = _lars_pair(lambda ps, lr: timm_optim.Lars(ps, lr=lr, momentum=0.9, weight_decay=0.0, always_adapt=True,
                                                     trust_coeff=0.001), {})
    for p, q in zip(a, b):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-7)


def test_lightly_and_timm_trust_ratio_with_weight_decay_is_larcs():
    """With weight decay their trust ratio's denominator is |g| + wd|w| + eps (NVIDIA's LARC),
    fastclr's |g + wd w| (google-research/simclr's): one step of each from the same state
    differs by exactly that ratio."""
    wd, lr = 0.1, 0.2
    a, b = _lars_pair(lambda ps, lr: LightlyLARS(ps, lr=lr, momentum=0.9, weight_decay=wd), {}, steps=1, lr=lr, wd=wd)
    g = torch.Generator().manual_seed(6)
    w0 = torch.randn(7, 5, generator=g)
    torch.randn(11, generator=g)
    g0 = torch.randn(7, 5, generator=g)
    d = g0 + wd * w0
    larc = 0.001 * w0.norm() / (g0.norm() + wd * w0.norm() + 1e-8)
    google = 0.001 * w0.norm() / d.norm()
    torch.testing.assert_close(a[0].detach(), w0 - lr * larc * d, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b[0].detach(), w0 - lr * google * d, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(a[0], b[0])


def test_pml_supcon_with_a_row_without_positives():
    """A label seen once: neither library counts that row in the mean."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(9, 5, generator=g, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3])
    _close(_value_and_grads(fastclr.supcon_fused(z, labels, 0.1), z),
           _value_and_grads(pml_losses.SupConLoss(temperature=0.1)(z, labels), z))
