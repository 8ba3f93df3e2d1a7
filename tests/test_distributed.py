"""Multi-process NT-Xent and SupCon: W gloo processes (2 and 4), each with 1/W of the global batch,
under DDP, give the single-process loss, parameter and temperature gradients and accuracies on
the same global batch (bars: 1e-10 in float64, 1e-5 in float32). Each rank computes the loss of
its own rows only (the kernels' local-rows mode) and the gather's backward is a reduce-scatter."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastclr
from fastclr import distributed

N = 24  # global batch: N pairs (NT-Xent) or 2N labelled rows (SupCon); divisible by 2 and 4


def _model(seed, dtype):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(19, 32), nn.Tanh(), nn.Linear(32, 11)).to(dtype)


def _data(seed, dtype):
    """Two views of N images, SupCon's 2N rows' labels (classes of a few rows, and rows without
    a positive all on rank 0, so the ranks' counts differ) and per-row weights for "none"."""
    g = torch.Generator().manual_seed(seed + 1)
    x1, x2 = (torch.randn(N, 19, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    labels = torch.randint(0, N // 3, (2 * N,), generator=g)
    labels[: N // 4] = torch.arange(1000, 1000 + N // 4)
    w = torch.rand(2 * N, generator=g, dtype=torch.float64).to(dtype)
    return x1, x2, labels, w


def _loss(kind, model, x1, x2, labels, t, impl, reduction, via, group=None):
    """The loss (weighted sum of rows for "none") and the accuracy, of whatever batch it gets."""
    if kind == "ntxent":
        if via == "module":  # lightly's spelling: NTXentLoss(gather_distributed=True)
            crit = fastclr.NTXentLoss(t, impl=impl, reduction=reduction, gather_distributed=group is not None)
            return crit(model(x1), model(x2), return_accuracy=True)
        return fastclr.nt_xent_fused(model(x1), model(x2), t, impl=impl, reduction=reduction,
                                     return_accuracy=True, process_group=group)
    z = model(torch.cat([x1, x2])) if group is None else model(x1)  # a rank's rows: x1 holds them
    crit = fastclr.SupConLoss(t, positives=via, impl=impl, reduction=reduction, process_group=group)
    return crit(z, labels, return_accuracy=True)


def _reduce(out, w):
    loss, acc = out
    return ((loss * w).sum() if loss.dim() else loss), acc


def _single(kind, seed, impl, tau, reduction, via, dtype):
    model = _model(seed, dtype)
    x1, x2, labels, w = _data(seed, dtype)
    t = torch.tensor(tau, dtype=dtype, requires_grad=True)
    loss, acc = _reduce(_loss(kind, model, x1, x2, labels, t, impl, reduction, via), w)
    loss.backward()
    return loss.detach(), acc, [p.grad for p in model.parameters()], t.grad


def _local(kind, rank, world, x1, x2, labels, w):
    """This rank's share of the global batch, and the weights of its rows in the loss's order."""
    b = N // world
    sl = slice(rank * b, (rank + 1) * b)
    if kind == "ntxent":  # rows: its z1 rows, then its z2 rows
        return x1[sl], x2[sl], None, torch.cat([w[:N][sl], w[N:][sl]])
    rows = torch.cat([x1, x2])
    sl2 = slice(rank * 2 * b, (rank + 1) * 2 * b)
    return rows[sl2], None, labels[sl2], w[sl2]


def _worker(rank, world, port, kind, seed, impl, tau, reduction, via, dtype, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = nn.parallel.DistributedDataParallel(_model(seed, dtype))
        a, b, labels, w = _local(kind, rank, world, *_data(seed, dtype))
        t = torch.tensor(tau, dtype=dtype, requires_grad=True)
        loss, acc = _reduce(_loss(kind, model, a, b, labels, t, impl, reduction, via,
                                  group=dist.group.WORLD), w)
        loss.backward()
        # the single-process loss: the mean of the ranks' "mean" losses, the sum of the others
        total = loss.detach().clone()
        dist.all_reduce(total)
        tgrad = t.grad.clone()
        dist.all_reduce(tgrad)
        scale = 1 / world if reduction == "mean" else 1.0
        # DDP averages parameter gradients; "sum"/"none" losses add up over ranks instead
        grads = [p.grad.clone() * (1 if reduction == "mean" else world) for p in model.parameters()]
        results[rank] = (total * scale, dict(acc), grads, tgrad * scale)
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CASES = [pytest.param(k, w, "cpu", r, via, torch.float64, id=f"{k}-W{w}-{r}-{via}")
         for k, via in (("ntxent", "function"), ("supcon", "mean"))
         for w in (2, 4) for r in ("mean", "sum", "none")]
CASES += [pytest.param("supcon", 2, "cpu", "mean", "sum", torch.float64, id="supcon-W2-mean-sum"),
          pytest.param("ntxent", 2, "cpu", "mean", "module", torch.float64, id="ntxent-W2-mean-module"),
          pytest.param("ntxent", 4, "cpu", "mean", "function", torch.float32, id="ntxent-W4-mean-fp32"),
          pytest.param("supcon", 4, "cpu", "mean", "mean", torch.float32, id="supcon-W4-mean-fp32"),
          pytest.param("ntxent", 2, "reference", "mean", "function", torch.float64, id="ntxent-W2-reference"),
          pytest.param("supcon", 2, "reference", "mean", "mean", torch.float64, id="supcon-W2-reference")]


@pytest.mark.parametrize("kind,world,impl,reduction,via,dtype", CASES)
def test_ddp_matches_single_process(kind, world, impl, reduction, via, dtype, seed):
    tau = 0.3
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(world, _free_port(), kind, seed, impl, tau, reduction, via, dtype, results),
             nprocs=world, join=True)
    loss, acc, grads, tgrad = _single(kind, seed, impl, tau, reduction, via, dtype)
    for rank in range(world):
        dl, dacc, dgrads, dt = results[rank]
        torch.testing.assert_close(dl, loss, **tol)
        torch.testing.assert_close(dt, tgrad, **tol)
        assert set(dacc) == set(acc)
        for key in acc:  # the global batch's accuracies (contrast_acc included)
            torch.testing.assert_close(dacc[key], acc[key])
        for g, dg in zip(grads, dgrads):
            torch.testing.assert_close(dg, g, **tol)


def test_single_process_ignores_group():
    z1, z2 = torch.randn(5, 7), torch.randn(5, 7)
    assert not distributed.is_distributed()
    # group.WORLD is None before init_process_group: the loss is then the single-process one
    torch.testing.assert_close(fastclr.nt_xent_fused(z1, z2, process_group=torch.distributed.group.WORLD),
                               fastclr.nt_xent_fused(z1, z2))
    with pytest.raises(TypeError, match="process_group"):  # not a group at all: never ignored
        fastclr.nt_xent_fused(z1, z2, process_group=object())
