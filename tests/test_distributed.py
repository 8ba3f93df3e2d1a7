"""Multi-process NT-Xent: 2 gloo processes, each with half of the global batch, under DDP, give the
single-process loss and parameter gradients on the same global batch (bar: 1e-5)."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastclr
from fastclr import distributed

WORLD = 2


def _model(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(19, 32), nn.Tanh(), nn.Linear(32, 11)).double()


def _batch(seed, n):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(n, 19, generator=g, dtype=torch.float64), torch.randn(n, 19, generator=g, dtype=torch.float64)


def _single(seed, n, impl, tau):
    model = _model(seed)
    x1, x2 = _batch(seed, n)
    loss, acc = fastclr.nt_xent_fused(model(x1), model(x2), tau, impl=impl, return_accuracy=True)
    loss.backward()
    return loss.detach(), acc, [p.grad for p in model.parameters()]


def _worker(rank, port, seed, n, impl, tau, via, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = nn.parallel.DistributedDataParallel(_model(seed))
        x1, x2 = _batch(seed, n)
        b = n // WORLD
        sl = slice(rank * b, (rank + 1) * b)
        if via == "module":  # lightly's spelling: NTXentLoss(gather_distributed=True)
            criterion = fastclr.NTXentLoss(tau, impl=impl, gather_distributed=True)
            loss, acc = criterion(model(x1[sl]), model(x2[sl]), return_accuracy=True)
        else:
            loss, acc = fastclr.nt_xent_fused(model(x1[sl]), model(x2[sl]), tau, impl=impl,
                                              return_accuracy=True, process_group=dist.group.WORLD)
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        results[rank] = (mean_loss / WORLD, dict(acc), [p.grad.clone() for p in model.parameters()])
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("impl,via", [("cpu", "function"), ("reference", "function"), ("cpu", "module")])
def test_ddp_two_processes_match_single_process(impl, via, seed):
    n, tau = 26, 0.3
    results = mp.Manager().dict()
    mp.spawn(_worker, args=(_free_port(), seed, n, impl, tau, via, results), nprocs=WORLD, join=True)
    loss, acc, grads = _single(seed, n, impl, tau)
    for rank in range(WORLD):
        dl, dacc, dgrads = results[rank]
        torch.testing.assert_close(dl, loss, rtol=1e-5, atol=1e-7)
        assert set(dacc) == set(acc)
        for key in acc:  # the global batch's accuracies, contrast_acc included
            torch.testing.assert_close(dacc[key], acc[key])
        for g, dg in zip(grads, dgrads):
            torch.testing.assert_close(dg, g, rtol=1e-5, atol=1e-7)


def test_single_process_ignores_group():
    z1, z2 = torch.randn(5, 7), torch.randn(5, 7)
    assert not distributed.is_distributed()
    # group.WORLD is None before init_process_group: the loss is then the single-process one
    torch.testing.assert_close(fastclr.nt_xent_fused(z1, z2, process_group=torch.distributed.group.WORLD),
                               fastclr.nt_xent_fused(z1, z2))
    with pytest.raises(TypeError, match="process_group"):  # not a group at all: never ignored
        fastclr.nt_xent_fused(z1, z2, process_group=object())


def _labels(seed, n):
    """Labels of a global batch of n rows: classes of a few rows and some singletons (rows
    without a positive, unevenly spread over the ranks, so each rank's count differs)."""
    g = torch.Generator().manual_seed(seed + 2)
    labels = torch.randint(0, n // 4, (n,), generator=g)
    labels[: n // 5] = torch.arange(1000, 1000 + n // 5)  # singletons, all on rank 0
    return labels


def _supcon_single(seed, n, impl, tau, positives):
    model = _model(seed)
    x, _ = _batch(seed, n)
    loss, acc = fastclr.supcon_fused(model(x), _labels(seed, n), tau, positives=positives,
                                     impl=impl, return_accuracy=True)
    loss.backward()
    return loss.detach(), acc, [p.grad for p in model.parameters()]


def _supcon_worker(rank, port, seed, n, impl, tau, positives, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        model = nn.parallel.DistributedDataParallel(_model(seed))
        x, _ = _batch(seed, n)
        labels = _labels(seed, n)
        b = n // WORLD
        sl = slice(rank * b, (rank + 1) * b)
        criterion = fastclr.SupConLoss(tau, positives=positives, impl=impl,
                                       process_group=dist.group.WORLD)
        loss, acc = criterion(model(x[sl]), labels[sl], return_accuracy=True)
        loss.backward()
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        results[rank] = (mean_loss / WORLD, dict(acc), [p.grad.clone() for p in model.parameters()])
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("impl,positives", [("cpu", "mean"), ("cpu", "sum"), ("reference", "mean")])
def test_supcon_ddp_two_processes_match_single_process(impl, positives, seed):
    """SupCon with process_group: rows and labels gathered; rank 0 holds all the rows without a
    positive, so the ranks' counts differ -- the mean is still the single-process one."""
    n, tau = 40, 0.2
    results = mp.Manager().dict()
    mp.spawn(_supcon_worker, args=(_free_port(), seed, n, impl, tau, positives, results),
             nprocs=WORLD, join=True)
    loss, acc, grads = _supcon_single(seed, n, impl, tau, positives)
    for rank in range(WORLD):
        dl, dacc, dgrads = results[rank]
        torch.testing.assert_close(dl, loss, rtol=1e-5, atol=1e-7)
        assert set(dacc) == set(acc) == {"top1", "top5"}
        for key in acc:
            torch.testing.assert_close(dacc[key], acc[key])
        for g, dg in zip(grads, dgrads):
            torch.testing.assert_close(dg, g, rtol=1e-5, atol=1e-7)
