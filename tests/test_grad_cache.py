"""fastclr.grad_cache_backward: the full-batch gradients from micro-batches (float64, 1e-10,
without BatchNorm), the same dropout masks in both passes, BatchNorm per micro-batch with its
running statistics updated once, DDP (gloo) equal to one process and synchronised once, autocast
and channels_last, and clear errors."""
import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fastclr
from fastclr import reference
from test_distributed import _free_port

N = 12  # images per batch; micro-batches of 4 divide it, 5 do not
TOL = dict(rtol=1e-10, atol=1e-12)


class Encoder(nn.Module):
    """A small conv encoder + projection head returning (features, embeddings), like SimCLRModel."""

    def __init__(self, norm="group", dropout=0.0, channels_last=False):
        super().__init__()
        norm_layer = {"group": lambda c: nn.GroupNorm(2, c), "batch": nn.BatchNorm2d}[norm]
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), norm_layer(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, stride=2, padding=1), norm_layer(8), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Dropout(dropout), nn.Linear(16, 6))
        self.channels_last = channels_last
        self.calls = []  # (rows, grad enabled) of every forward

    def forward(self, x):
        if self.channels_last:
            assert x.is_contiguous(memory_format=torch.channels_last)
        self.calls.append((x.shape[0], torch.is_grad_enabled()))
        h = self.body(x)
        return h, self.head(h)


def _views(dtype=torch.float64, n=N, v=2):
    return tuple(torch.randn(n, 3, 7, 7, dtype=dtype) for _ in range(v))


def _ntxent(z):
    z1, z2 = z.chunk(2)
    return fastclr.nt_xent_fused(z1, z2, 0.3, impl="cpu")


def _grads(model):
    return [p.grad.clone() for p in model.parameters()]


def _plain(model, views, loss_fn):
    """The spec: the whole batch's forward and backward."""
    out = loss_fn(model(torch.cat(views))[1])
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("micro", [1, 4, 5, 11], ids=lambda m: f"micro{m}")
def test_equals_full_batch_backward_float64(seed, micro):
    model = Encoder().double()
    twin = copy.deepcopy(model)
    views = _views()
    loss = fastclr.grad_cache_backward(model, views, _ntxent, micro)
    ref = _plain(twin, views, _ntxent)
    torch.testing.assert_close(loss, ref, **TOL)
    assert not loss.requires_grad
    for g, r in zip(_grads(model), _grads(twin)):
        torch.testing.assert_close(g, r, **TOL)
    # the first pass without autograd, the second with it, micro-batch by micro-batch
    sizes = [min(micro, N - s) * 2 for s in range(0, N, micro)]
    assert model.calls == [(m, False) for m in sizes] + [(m, True) for m in sizes]


def test_gradients_accumulate_and_extras_and_loss_parameters(seed):
    """Existing .grad is added to (as backward does); (loss, extras) comes back as such; the
    loss's own parameters (a learnable temperature) get their gradient; a single view works."""
    model = Encoder().double()
    twin = copy.deepcopy(model)
    x = torch.randn(N, 3, 7, 7, dtype=torch.float64)
    labels = torch.randint(0, 3, (N,))
    t1 = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    t2 = t1.detach().clone().requires_grad_(True)
    for p, q in zip(model.parameters(), twin.parameters()):
        p.grad = torch.ones_like(p)
        q.grad = torch.ones_like(q)

    def loss_fn(t):
        return lambda z: fastclr.supcon_fused(z, labels, t, impl="cpu", return_accuracy=True)
    loss, acc = fastclr.grad_cache_backward(model, x, loss_fn(t1), 5)
    ref, racc = loss_fn(t2)(twin(x)[1])
    ref.backward()
    torch.testing.assert_close(loss, ref.detach(), **TOL)
    assert acc.keys() == racc.keys() and all(torch.equal(acc[k], racc[k]) for k in acc)
    torch.testing.assert_close(t1.grad, t2.grad, **TOL)
    for g, r in zip(_grads(model), _grads(twin)):
        torch.testing.assert_close(g, r, **TOL)


@pytest.mark.parametrize("v", [3, 4])
def test_several_views_keep_view_major_order(seed, v):
    """V views: the loss sees view 0's N rows, then view 1's, ... as with the whole batch."""
    model = Encoder().double()
    twin = copy.deepcopy(model)
    views = _views(v=v)
    ids = torch.arange(N).repeat(v)

    def loss_fn(z):
        return reference.supcon(z, ids, 0.5)
    fastclr.grad_cache_backward(model, views, loss_fn, 5)
    _plain(twin, views, loss_fn)
    for g, r in zip(_grads(model), _grads(twin)):
        torch.testing.assert_close(g, r, **TOL)


@pytest.mark.parametrize("micro", [N, N + 1, 10**6])
def test_one_micro_batch_is_the_plain_backward(seed, micro):
    model = Encoder().double()
    twin = copy.deepcopy(model)
    views = _views()
    fastclr.grad_cache_backward(model, views, _ntxent, micro)
    _plain(twin, views, _ntxent)
    assert model.calls == [(2 * N, True)]  # one forward, with autograd
    for g, r in zip(_grads(model), _grads(twin)):
        assert torch.equal(g, r)


def test_dropout_sees_the_same_masks_in_both_passes(seed):
    """Each micro-batch's re-forward reproduces its cached embeddings bit for bit, the gradients
    are those of the same micro-batch forwards kept in one graph, and the random state after the
    call is the one after the first pass."""
    model = Encoder(dropout=0.5).double()
    twin = copy.deepcopy(model)
    views = _views()
    outputs = []
    model.head.register_forward_hook(lambda m, i, o: outputs.append(o.detach().clone()))
    torch.manual_seed(seed + 7)
    fastclr.grad_cache_backward(model, views, _ntxent, 5)
    after = torch.rand(3)
    first, second = outputs[:3], outputs[3:]
    assert len(second) == 3 and all(torch.equal(a, b) for a, b in zip(first, second))
    assert not torch.equal(first[0], twin.eval()(torch.cat([v[:5] for v in views]))[1])  # masks on
    twin.train()
    torch.manual_seed(seed + 7)  # by hand: the same micro-batch forwards, in one graph
    parts = [twin(torch.cat([v[s:s + 5] for v in views]))[1] for s in (0, 5, 10)]
    z = torch.cat([p.chunk(2)[k] for k in range(2) for p in parts])
    _ntxent(z).backward()
    assert torch.equal(torch.rand(3), after)
    for g, r in zip(_grads(model), _grads(twin)):
        torch.testing.assert_close(g, r, **TOL)


def test_batchnorm_per_micro_batch_running_stats_once(seed):
    model = Encoder(norm="batch").double()
    twin = copy.deepcopy(model)
    views = _views()
    fastclr.grad_cache_backward(model, views, _ntxent, 4)
    # by hand: each micro-batch normalised by its own statistics, once
    parts = [twin(torch.cat([v[s:s + 4] for v in views]))[1] for s in (0, 4, 8)]
    _ntxent(torch.cat([p.chunk(2)[k] for k in range(2) for p in parts])).backward()
    for g, r in zip(_grads(model), _grads(twin)):
        torch.testing.assert_close(g, r, **TOL)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for bn, ref in zip(bns, [m for m in twin.modules() if isinstance(m, nn.BatchNorm2d)]):
        assert bn.num_batches_tracked.item() == 3 and bn.track_running_stats
        torch.testing.assert_close(bn.running_mean, ref.running_mean, **TOL)
        torch.testing.assert_close(bn.running_var, ref.running_var, **TOL)
    # and the whole batch's statistics would have given something else
    plain = copy.deepcopy(twin)
    plain.zero_grad()
    _plain(plain, views, _ntxent)
    assert not torch.allclose(_grads(plain)[0], _grads(model)[0])


def test_autocast_bf16_and_channels_last(seed):
    """Under autocast the encoder runs in bf16 in both passes (the embeddings the loss gets are
    bf16, like the plain step's), the backward outside it; channels_last inputs stay so."""
    model = Encoder(channels_last=True).to(memory_format=torch.channels_last)
    twin = copy.deepcopy(model)
    views = tuple(v.float().contiguous(memory_format=torch.channels_last) for v in _views())
    dtypes = []

    def loss_fn(z):
        dtypes.append(z.dtype)
        return _ntxent(z.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fastclr.grad_cache_backward(model, views, loss_fn, 5)
        ref = _plain(twin, views, loss_fn)
    assert dtypes == [torch.bfloat16, torch.bfloat16]
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=2e-2)
    for g, r in zip(_grads(model), _grads(twin)):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=5e-2, atol=5e-2 * r.abs().max().item())


@pytest.mark.parametrize("micro,error,message", [
    (0, ValueError, "micro_batch must be >= 1"), (-3, ValueError, "micro_batch must be >= 1"),
    (2.5, TypeError, "positive integer"), (True, TypeError, "positive integer"),
    ("4", TypeError, "positive integer"), (None, TypeError, "positive integer")])
def test_bad_micro_batch_is_refused_clearly(micro, error, message):
    model = Encoder().double()
    with pytest.raises(error, match=message):
        fastclr.grad_cache_backward(model, _views(), _ntxent, micro)
    assert model.calls == [] and all(p.grad is None for p in model.parameters())


def test_bad_inputs_and_outputs_are_refused_clearly():
    model = Encoder().double()
    with pytest.raises(ValueError, match="same number"):
        fastclr.grad_cache_backward(model, (_views()[0], _views(n=5)[0]), _ntxent, 4)
    with pytest.raises(TypeError, match="tensor or a non-empty tuple"):
        fastclr.grad_cache_backward(model, (), _ntxent, 4)
    with pytest.raises(ValueError, match="one embedding per input row"):
        fastclr.grad_cache_backward(lambda x: x[:1], _views(), _ntxent, 4)
    with pytest.raises(RuntimeError, match="does not depend on the embeddings"):
        fastclr.grad_cache_backward(model, _views(), lambda z: torch.ones((), requires_grad=True), 4)


# --- DDP -----------------------------------------------------------------------------------------

def _ddp_worker(rank, world, port, seed, micro, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(seed)
        model = nn.parallel.DistributedDataParallel(Encoder().double())
        calls = []

        def hook(state, bucket):  # counts the gradient all-reduces
            calls.append(bucket.index())
            fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
            return fut.then(lambda f: f.value()[0] / world)
        model.register_comm_hook(None, hook)
        torch.manual_seed(seed + 1)
        views = _views()
        b = N // world
        mine = tuple(v[rank * b:(rank + 1) * b] for v in views)

        def loss_fn(z):
            z1, z2 = z.chunk(2)
            return fastclr.nt_xent_fused(z1, z2, 0.3, impl="cpu", process_group=dist.group.WORLD)
        loss = fastclr.grad_cache_backward(model, mine, loss_fn, micro)
        dist.all_reduce(loss)  # each rank's "mean" is its share: their mean is the batch's loss
        results[rank] = (loss / world, [p.grad.clone() for p in model.parameters()], len(calls),
                         len(model.module.calls))
    finally:
        dist.destroy_process_group()


def test_ddp_two_processes_equal_one(seed):
    world, micro = 2, 4  # 6 images per rank: micro-batches of 4 and 2
    results = mp.Manager().dict()
    mp.spawn(_ddp_worker, args=(world, _free_port(), seed, micro, results), nprocs=world, join=True)
    torch.manual_seed(seed)
    model = Encoder().double()
    torch.manual_seed(seed + 1)
    views = _views()
    loss = _plain(model, views, _ntxent)
    for rank in range(world):
        dloss, dgrads, allreduces, forwards = results[rank]
        torch.testing.assert_close(dloss, loss, **TOL)
        for g, r in zip(dgrads, _grads(model)):
            torch.testing.assert_close(g, r, **TOL)
        assert allreduces == 1  # one bucket, synchronised on the last micro-batch only
        assert forwards == 4  # two micro-batches, two passes


@pytest.mark.cuda
def test_on_a_gpu_dropout_masks_bf16_channels_last(seed):
    """On a GPU: the CUDA generator is replayed (dropout masks equal in both passes, the state
    afterwards the first pass's) under bf16 autocast with channels_last inputs, and the gradients
    are those of the same micro-batch forwards kept in one graph."""
    fmt = torch.channels_last
    model = Encoder(dropout=0.5, channels_last=True).cuda().to(memory_format=fmt)
    twin = copy.deepcopy(model)
    views = tuple(v.float().cuda().contiguous(memory_format=fmt) for v in _views())
    outputs = []
    model.head.register_forward_hook(lambda m, i, o: outputs.append(o.detach().clone()))

    def loss_fn(z):
        with torch.autocast("cuda", enabled=False):
            return fastclr.nt_xent_fused(*z.float().chunk(2), 0.3)
    torch.cuda.manual_seed(seed)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fastclr.grad_cache_backward(model, views, loss_fn, 5)
    after = torch.rand(3, device="cuda")
    assert len(outputs) == 6 and all(torch.equal(a, b) for a, b in zip(outputs[:3], outputs[3:]))
    torch.cuda.manual_seed(seed)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        parts = [twin(torch.cat([v[s:s + 5] for v in views]))[1] for s in (0, 5, 10)]
    loss_fn(torch.cat([p.chunk(2)[k] for k in range(2) for p in parts])).backward()
    assert torch.equal(torch.rand(3, device="cuda"), after)
    for g, r in zip(_grads(model), _grads(twin)):
        torch.testing.assert_close(g, r, rtol=1e-2, atol=1e-2 * r.abs().max().item())


def test_bench_grad_cache_runs(capsys):
    """The benchmark's smoke test (tiny sizes): every configuration and the largest-batch search."""
    from benchmarks import bench_grad_cache
    bench_grad_cache.main(["--batch", "32", "--micro-batch", "8", "--image-size", "8", "--repeats", "1",
                           "--largest", "--largest-cap", "64", "--no-save"])
    out = capsys.readouterr().out
    assert "| resnet18 | 8 | 32 | 8 |" in out and "| resnet18 | 8 | 32 | plain |" in out
    assert "| resnet18 | 8 | plain | none |" in out  # the plain search starts at 512, over the cap
    assert "cached, micro-batch 8 | 64 |" in out and "| search cap |" in out
