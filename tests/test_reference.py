"""The reference against a direct float64 transcription of docs/math.md's formulas."""
import math

import pytest
import torch

from fastclr import reference


def direct_nt_xent(z1, z2, tau):
    """Loop-by-loop float64 NT-Xent and per-row ranks, with nothing shared with the reference."""
    z = [list(map(float, row)) for row in torch.cat([z1, z2]).double()]
    m, n = len(z), len(z) // 2
    u = []
    for row in z:
        norm = max(math.sqrt(sum(v * v for v in row)), 1e-12)
        u.append([v / norm for v in row])
    losses, ranks, cross = [], [], []
    for i in range(m):
        p = (i + n) % m
        s = {j: sum(a * b for a, b in zip(u[i], u[j])) / tau for j in range(m) if j != i}
        top = max(s.values())
        lse = top + math.log(sum(math.exp(v - top) for v in s.values()))
        losses.append(lse - s[p])
        ranks.append(sum(1 for j, v in s.items() if j != p and v > s[p]))
        cross.append(sum(1 for j, v in s.items() if j != p and (j < n) != (i < n) and v > s[p]))
    return losses, [ranks, cross]


@pytest.mark.parametrize("n,d", [(1, 4), (2, 3), (5, 7), (12, 19)])
@pytest.mark.parametrize("tau", [0.05, 0.5, 1.0])
def test_reference_matches_direct_formula(seed, n, d, tau):
    z1, z2 = torch.randn(n, d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)
    losses, ranks = direct_nt_xent(z1, z2, tau)
    rows = reference.nt_xent(z1, z2, tau, reduction="none")
    torch.testing.assert_close(rows, torch.tensor(losses, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(reference.nt_xent(z1, z2, tau), rows.mean())
    torch.testing.assert_close(reference.nt_xent(z1, z2, tau, reduction="sum"), rows.sum())
    s = reference.similarity_logits(z1, z2, tau)
    assert reference.positive_rank(s).tolist() == ranks
    _, acc = reference.nt_xent(z1, z2, tau, return_accuracy=True)
    assert acc["top1"].item() == pytest.approx(sum(r < 1 for r in ranks[0]) / (2 * n))
    assert acc["top5"].item() == pytest.approx(sum(r < 5 for r in ranks[0]) / (2 * n))
    assert acc["contrast_acc"].item() == pytest.approx(sum(r < 1 for r in ranks[1][:n]) / n)


def test_reference_gradient_matches_design_formula(seed):
    """The reference's autograd gradient equals docs/math.md's closed form for dL/du and dL/dtau."""
    n, d, tau = 6, 5, 0.3
    u = torch.nn.functional.normalize(torch.randn(2 * n, d, dtype=torch.float64), dim=1)
    u1, u2 = u[:n].clone().requires_grad_(), u[n:].clone().requires_grad_()
    t = torch.tensor(tau, dtype=torch.float64, requires_grad=True)
    loss = reference.nt_xent(u1, u2, t)
    g1, g2, gt = torch.autograd.grad(loss, (u1, u2, t))
    m = 2 * n
    c = u @ u.T
    s = (c / tau).masked_fill(torch.eye(m, dtype=torch.bool), float("-inf"))
    p = torch.softmax(s, dim=1)
    pos = (torch.arange(m) + n) % m
    grad_u = ((p + p.T) @ u - 2 * u[pos]) / (m * tau)
    # u has unit rows: the gradient w.r.t. the raw rows is the tangential part of grad_u.
    grad_u = grad_u - (grad_u * u).sum(1, keepdim=True) * u
    torch.testing.assert_close(torch.cat([g1, g2]), grad_u)
    expected_t = -((p * c).sum(1) - c[torch.arange(m), pos]).sum() / (m * tau**2)
    torch.testing.assert_close(gt, expected_t)
