"""LARS: every implementation against a per-parameter float64 transcription of the equations."""
import copy
import math
import warnings

import pytest
import torch
from torch import nn

import fastclr
from fastclr import ops
from fastclr.optim import LARS, lars_param_groups
from nt_xent_checks import needs_cuda_on_cpu

IMPLS = [
    pytest.param("foreach", "cpu", id="foreach-cpu"),
    pytest.param("cpp", "cpu", id="cpp", marks=pytest.mark.skipif(
        not fastclr.extension_available(), reason="extension not built")),
    # kernels/lars.cu on CPU tensors, through the CUDA kernels' CPU harness
    pytest.param("cuda", "cpu", id="cuda_on_cpu", marks=needs_cuda_on_cpu),
    pytest.param("cuda", "cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not ops.compiled_with_cuda(), reason="built without the CUDA kernels")]),
    pytest.param("foreach", "cuda", id="foreach-cuda", marks=pytest.mark.cuda),
]
LRS = [0.05, 0.2, 0.8, 1.2, 0.9, 0.3]  # warm-up, then a cosine-like decay


def reference_step(w, g, v, lr, momentum, wd, tc, nesterov, exclude):
    """The issue's equations, one parameter, float64; returns (w, v)."""
    w, g = w.double(), g.double()
    if not exclude:
        g = g + wd * w
        wn, gn = w.norm().item(), g.norm().item()
        t = tc * wn / gn if wn > 0 and gn > 0 else 1.0
    else:
        t = 1.0
    v = momentum * v + lr * t * g
    w = w - (momentum * v + lr * t * g if nesterov else v)
    return w, v


def make_params(device, dtype=torch.float32):
    # (351, 400): over two of the CUDA kernel's 65536-element chunks, the last one partial
    shapes = [(64, 32), (32,), (10, 3, 3, 3), (5, 5), (7,), (351, 400)]
    params = [torch.randn(s, device=device).to(dtype) for s in shapes]
    params[3].zero_()  # zero-norm weight: trust ratio 1
    return [nn.Parameter(p) for p in params]


def grads_for(params, step):
    out = [torch.randn_like(p) for p in params]
    out[4].zero_()  # zero gradient (excluded group), and below a zero grad with a nonzero weight
    if step % 2 == 0:
        out[5].zero_()
    return out


def run_lars(impl, device, nesterov, dtype=torch.float32, steps=6, seed=0):
    torch.manual_seed(seed)
    params = make_params(device, dtype)
    groups = [{"params": [params[0], params[2], params[3], params[5]]},
              {"params": [params[1], params[4]], "exclude": True, "weight_decay": 0.0}]
    opt = LARS(groups, lr=LRS[0], momentum=0.9, weight_decay=1e-4, trust_coefficient=0.001,
               nesterov=nesterov, impl=impl)
    history = []
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = LRS[step]
        grads = grads_for(params, step)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for p, g in zip(params, grads):
            assert torch.equal(p.grad, g), "LARS must leave p.grad untouched"
        history.append(grads)
    return params, history


@pytest.mark.parametrize("impl,device", IMPLS)
@pytest.mark.parametrize("nesterov", [False, True])
def test_matches_the_equations(impl, device, nesterov):
    params, history = run_lars(impl, device, nesterov)
    torch.manual_seed(0)
    ref = [p.detach().double() for p in make_params(device)]
    bufs = [torch.zeros_like(r) for r in ref]
    excluded = {1, 4}
    for step, grads in enumerate(history):
        for i in range(len(ref)):
            wd = 0.0 if i in excluded else 1e-4
            ref[i], bufs[i] = reference_step(ref[i], grads[i], bufs[i], LRS[step], 0.9, wd, 0.001,
                                             nesterov, i in excluded)
    for i, (p, r) in enumerate(zip(params, ref)):
        err = ((p.detach().double() - r).abs().max() / r.abs().max().clamp_min(1e-30)).item()
        assert err <= 1e-6, (i, err)


@pytest.mark.parametrize("impl,device", IMPLS)
def test_bfloat16_params_use_float32_math(impl, device):
    """bf16 parameters: each step in float32 from the bf16 values, rounded back once."""
    params, history = run_lars(impl, device, False, dtype=torch.bfloat16, steps=3)
    torch.manual_seed(0)
    ref = [p.detach() for p in make_params(device, torch.bfloat16)]
    bufs = [torch.zeros_like(r, dtype=torch.float64) for r in ref]
    for step, grads in enumerate(history):
        for i in range(len(ref)):
            excl = i in (1, 4)
            w, bufs[i] = reference_step(ref[i], grads[i], bufs[i], LRS[step], 0.9,
                                        0.0 if excl else 1e-4, 0.001, False, excl)
            ref[i] = w.to(torch.bfloat16)
    for p, r in zip(params, ref):
        assert p.dtype == torch.bfloat16
        diff = (p.detach().float() - r.float()).abs().max().item()
        assert diff <= 2 ** -7 * r.float().abs().max().item()  # at most ~1 bf16 ulp apart


@pytest.mark.parametrize("impl,device", IMPLS)
def test_state_dict_round_trip_continues_identically(impl, device):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(20, 30), nn.BatchNorm1d(30), nn.ReLU(), nn.Linear(30, 5)).to(device)
    data = [torch.randn(16, 20, device=device) for _ in range(6)]

    def train(m, opt, batches):
        for x in batches:
            opt.zero_grad()
            m(x).pow(2).mean().backward()
            opt.step()

    straight = copy.deepcopy(model)
    opt = LARS(lars_param_groups(straight, 1e-4), lr=0.5, impl=impl)
    train(straight, opt, data)

    first = copy.deepcopy(model)
    opt1 = LARS(lars_param_groups(first, 1e-4), lr=0.5, impl=impl)
    train(first, opt1, data[:3])
    saved_model, saved_opt = copy.deepcopy(first.state_dict()), copy.deepcopy(opt1.state_dict())
    resumed = copy.deepcopy(model)
    resumed.load_state_dict(saved_model)
    opt2 = LARS(lars_param_groups(resumed, 1e-4), lr=0.5, impl=impl)
    opt2.load_state_dict(saved_opt)
    train(resumed, opt2, data[3:])
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("impl,device", IMPLS)
def test_found_inf_skips_the_step_on_the_device(impl, device):
    """step(found_inf=flag): a nonzero flag leaves weights and momentum untouched (NaN gradients
    included), a zero one is the ordinary step; the flag is a device tensor, never read on the host."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(12, 9), nn.BatchNorm1d(9), nn.Linear(9, 3)).to(device)
    twin = copy.deepcopy(model)
    opt = LARS(lars_param_groups(model, 1e-4), lr=0.3, impl=impl)
    ref = LARS(lars_param_groups(twin, 1e-4), lr=0.3, impl=impl)
    x = torch.randn(8, 12, device=device)
    for m, o in ((model, opt), (twin, ref)):
        m(x).pow(2).mean().backward()
        o.step()
    state = [(p.detach().clone(), opt.state[p]["momentum_buffer"].clone()) for p in model.parameters()]
    for p in model.parameters():
        p.grad.fill_(float("nan"))
    opt.step(found_inf=torch.ones(1, device=device))
    for p, (w, v) in zip(model.parameters(), state):
        assert torch.equal(p, w) and torch.equal(opt.state[p]["momentum_buffer"], v)
    for m, o in ((model, opt), (twin, ref)):
        o.zero_grad()
        m(x).pow(2).mean().backward()
    opt.step(found_inf=torch.zeros(1, device=device))
    ref.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="one-element"):
        opt.step(found_inf=torch.zeros(2, device=device))


def test_grad_scaler_skips_non_finite_steps():
    torch.manual_seed(0)
    model = nn.Linear(8, 4)
    opt = LARS(lars_param_groups(model), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    x = torch.randn(5, 8)
    scaler.scale(model(x).sum()).backward()
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(opt)
    scaler.update()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    opt.zero_grad()
    scaler.scale(model(x).sum() * float("inf")).backward()
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(opt)  # inf gradients: the step is skipped
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert scaler.get_scale() < 2.0 ** 8


def test_param_groups_exclude_biases_and_norm_layers():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Flatten(), nn.LayerNorm(8 * 4),
                          nn.Linear(8 * 4, 2, bias=True))
    groups = lars_param_groups(model, weight_decay=1e-5)
    regular, excluded = groups
    assert {id(p) for p in regular["params"]} == {id(model[0].weight), id(model[4].weight)}
    assert regular["weight_decay"] == 1e-5 and not regular["exclude"]
    assert excluded["exclude"] and excluded["weight_decay"] == 0.0
    assert len(excluded["params"]) == 6  # conv bias, BN weight+bias, LN weight+bias, linear bias


@pytest.mark.parametrize("name", ["lr", "momentum", "weight_decay", "trust_coefficient"])
def test_negative_hyperparameters_raise(name):
    kwargs = dict(lr=0.1)
    kwargs[name] = -0.5
    with pytest.raises(ValueError, match=name):
        LARS([nn.Parameter(torch.ones(2))], **kwargs)
    with pytest.raises(ValueError, match=name):
        LARS([nn.Parameter(torch.ones(2))], **{**kwargs, name: math.nan})


def test_bad_impl_and_sparse_gradients():
    with pytest.raises(ValueError, match="impl"):
        LARS([nn.Parameter(torch.ones(2))], lr=0.1, impl="fast")
    emb = nn.Embedding(10, 3, sparse=True)
    opt = LARS(emb.parameters(), lr=0.1)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_cpp_step_handles_channels_last_weights():
    if not fastclr.extension_available():
        pytest.skip("extension not built")
    conv = nn.Conv2d(4, 6, 3).to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 8, 8).to(memory_format=torch.channels_last)
    ref = copy.deepcopy(conv)
    for m, impl in ((conv, "cpp"), (ref, "foreach")):
        opt = LARS(lars_param_groups(m), lr=0.3, impl=impl)
        for _ in range(3):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for a, b in zip(conv.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


# --- coming from lightly and timm ---------------------------------------------------------------

def test_lars_warns_once_about_lightly_exclusion_rule():
    a, b = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(3))
    with pytest.warns(UserWarning, match="exclude") as record:
        fastclr.LARS([{"params": [a], "weight_decay": 0.0}, {"params": [b], "weight_decay": 0.0}], lr=0.1)
    assert sum("exclude" in str(w.message) for w in record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastclr.LARS([{"params": [a], "weight_decay": 0.0, "exclude": True}], lr=0.1)
        fastclr.LARS(fastclr.lars_param_groups(torch.nn.Linear(3, 2), 0.0), lr=0.1)
        fastclr.LARS([a], lr=0.1)  # default weight decay 1e-6


def test_lars_takes_tensor_learning_rates():
    torch.manual_seed(0)
    p1, p2 = torch.nn.Parameter(torch.randn(4, 3)), None
    p2 = torch.nn.Parameter(p1.detach().clone())
    for p in (p1, p2):
        p.grad = torch.ones_like(p)
    fastclr.LARS([p1], lr=torch.tensor(0.1)).step()
    fastclr.LARS([p2], lr=0.1).step()
    torch.testing.assert_close(p1, p2)
    with pytest.raises(ValueError, match="lr"):
        fastclr.LARS([p1], lr=torch.tensor(-0.1))


def _layouts(device):
    """Parameters torch's optimizers step, in one group: a strided view (timm's optimizer tests),
    a transpose, a channels-last weight, a 0-dim tensor, a tensor with a gap between rows, and
    float64 / float16 / bfloat16 ones beside float32."""
    g = torch.Generator().manual_seed(3)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(device, dtype)
    return [r(10, 5, 2)[..., 0], r(3, 4).t(), r(4, 3, 5, 5).contiguous(memory_format=torch.channels_last),
            r(()), r(6, 9)[:, 1:8], r(11, dtype=torch.float64), r(5, 3, dtype=torch.float16),
            r(4, 6, dtype=torch.bfloat16), r(33)]


@pytest.mark.parametrize("impl,device", IMPLS)
@pytest.mark.parametrize("nesterov", [False, True])
def test_every_parameter_torch_steps(impl, device, nesterov):
    """A strided view once failed the compiled step ('needs dense params'); every layout and dtype
    is stepped, in the compiled call or the foreach one, as the float64 equations say."""
    params = [nn.Parameter(p) for p in _layouts(device)]
    start = [p.detach().double().clone() for p in params]
    opt = LARS(params, lr=0.3, momentum=0.9, weight_decay=1e-4, trust_coefficient=0.01,
               nesterov=nesterov, impl=impl)
    gen = torch.Generator().manual_seed(4)
    grads = [[torch.randn(p.shape, generator=gen).to(device, p.dtype) for p in params] for _ in range(3)]
    for step in grads:
        for p, gr in zip(params, step):
            p.grad = gr
        opt.step()
    for i, p in enumerate(params):
        w, v = start[i], torch.zeros_like(start[i])
        for step in grads:
            w, v = reference_step(w, step[i], v, 0.3, 0.9, 1e-4, 0.01, nesterov, False)
            if p.dtype in (torch.float16, torch.bfloat16):
                w = w.to(p.dtype).double()  # the parameter is rounded after each step
        tol = {torch.float16: 2e-3, torch.bfloat16: 1e-2}.get(p.dtype, 1e-6)
        assert p.shape == start[i].shape and p.stride() == params[i].stride()
        err = ((p.detach().double() - w).abs().max() / w.abs().max().clamp_min(1e-30)).item()
        assert err <= tol, (i, p.dtype, err)
