"""The kernels' local-rows mode (issue 18): W simulated ranks, each computing only its rows' loss
against every row, add up to the whole batch's loss and gradients -- rows, z and temperature
gradients, ranks -- for NT-Xent's pairs and for labels, on every backend; a rank's backward skips
the tiles that meet none of its rows."""
import pytest
import torch

from fastclr import ops
from fastclr._boundary import local_row_mask
from nt_xent_checks import backends, max_rel


def forward_op(impl):
    ops.load_triton()
    return torch.ops.fastclr.nt_xent_triton_forward if impl == "triton" else torch.ops.fastclr.nt_xent_forward


def inputs(labels_mode, m, d, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    if labels_mode:
        z1 = torch.randn(m, d, generator=g).to(device).requires_grad_()
        labels = torch.randint(0, max(1, m // 5), (m,), generator=g)
        labels[:3] = torch.tensor([10**9, 10**9 + 1, -5])  # rows without a positive
        return z1, None, labels.to(device), m
    z1, z2 = (torch.randn(m // 2, d, generator=g).to(device).requires_grad_() for _ in range(2))
    return z1, z2, None, m // 2


@pytest.mark.parametrize("impl,device", backends())
@pytest.mark.parametrize("labels_mode", [False, True], ids=["paired", "labels"])
@pytest.mark.parametrize("world", [2, 4])
def test_ranks_add_up_to_the_whole_batch(impl, device, labels_mode, world):
    m = 296 if device == "cpu" else 2400  # spans not a multiple of any tile size
    z1, z2, labels, span = inputs(labels_mode, m, 24, device)
    t = torch.tensor(0.2, device=device, requires_grad=True)
    w = torch.rand(m, device=device)
    fwd = forward_op(impl)
    leaves = (z1, t) if labels_mode else (z1, z2, t)
    full = fwd(z1, z2, t, labels=labels, mean_positives=True, compute_accuracy=True)
    g_full = torch.autograd.grad((full[0] * w).sum(), leaves)
    b = span // world
    rows = torch.zeros(m, device=device)
    grads = [torch.zeros_like(x) for x in leaves]
    for r in range(world):
        lo, count = r * b, (span - r * b if r == world - 1 else b)
        out = fwd(z1, z2, t, labels=labels, mean_positives=True, compute_accuracy=True, row_lo=lo,
                  row_count=count)
        mine = local_row_mask(m, z1.shape[0], not labels_mode, lo, count, device)
        assert (out[0][~mine] == 0).all() and (out[1][3][~mine] == 0).all()  # no loss, no positive
        assert torch.equal(out[3][:, mine], full[3][:, mine])  # the same ranks
        rows += out[0].detach()
        for acc, g in zip(grads, torch.autograd.grad((out[0] * w).sum(), leaves)):
            acc += g
    assert max_rel(rows, full[0].detach()) <= 1e-6
    for g, ref in zip(grads, g_full):
        assert max_rel(g, ref) <= 1e-5


@pytest.mark.parametrize("impl,device", backends())
def test_empty_and_bad_local_rows(impl, device):
    z1, z2, labels, span = inputs(True, 40, 8, device)
    t = torch.tensor(0.2, device=device)
    fwd = forward_op(impl)
    rows, stats, _, _ = fwd(z1, z2, t, labels=labels, mean_positives=True, row_lo=5, row_count=0)  # no rows
    assert (rows == 0).all() and (stats[3] == 0).all()
    with pytest.raises((RuntimeError, ValueError), match="local rows"):
        fwd(z1, z2, t, labels=labels, mean_positives=True, row_lo=30, row_count=20)
