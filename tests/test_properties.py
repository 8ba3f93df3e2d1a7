"""Property-based tests of the public API: random inputs as a user's data comes -- shapes from one
row and one column, every dtype, temperatures, reductions, label patterns, zero / duplicate /
scaled rows, heavy ties, micro-batch sizes, LARS hyper-parameters -- against float64
formulations written here, independently of fastclr.reference (hypothesis draws them).

``make test`` runs a bounded, derandomized set (FASTCLR_FUZZ_EXAMPLES examples per property,
default 25); ``make fuzz`` runs many more, freshly random (a failure prints its reproducer).

Tolerances: float32 and float64 results within a small multiple of their precision of the
exact (float64) result on the same inputs, relative to the quantity's natural scale (a gradient
that is exactly 0, as at D = 1, is judged against the size a gradient of that loss has);
bfloat16 / float16 results within a few roundings of the exact result *rounded to that dtype*.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import fastclr  # noqa: E402
from fastclr import reference  # noqa: E402
from nt_xent_checks import BACKENDS  # noqa: E402

FUZZ = os.environ.get("FASTCLR_FUZZ") == "1"
settings.register_profile("bounded", max_examples=int(os.environ.get("FASTCLR_FUZZ_EXAMPLES", 25)),
                          deadline=None, derandomize=True, print_blob=True,
                          suppress_health_check=list(HealthCheck))
settings.register_profile("fuzz", max_examples=int(os.environ.get("FASTCLR_FUZZ_EXAMPLES", 400)),
                          deadline=None, print_blob=True, suppress_health_check=list(HealthCheck))
settings.load_profile("fuzz" if FUZZ else "bounded")

HALF = (torch.bfloat16, torch.float16)
EPS = {torch.float64: 2.0 ** -52, torch.float32: 2.0 ** -23, torch.bfloat16: 2.0 ** -7,
       torch.float16: 2.0 ** -10}
# backend -> (impl, dtypes it is checked in here, largest rows x columns it gets)
LOSS_BACKENDS = {
    "cpu": (torch.float64, torch.float32, torch.bfloat16, torch.float16),
    "triton_interp": (torch.float32, torch.float16),  # the interpreter's tl.dot: no bfloat16
    "cuda_on_cpu": (torch.float32, torch.bfloat16, torch.float16),
}
# the interpreted backends run a thread (or a numpy program) per GPU thread: small inputs
SIZE = {"cpu": (300, 96), "triton_interp": (12, 20), "cuda_on_cpu": (20, 20)}
# the examples per property of the bounded run (make test); make fuzz: FASTCLR_FUZZ_EXAMPLES each


def backend_params(names=tuple(LOSS_BACKENDS)):
    return [pytest.param(name, marks=BACKENDS[name][2], id=name) for name in names]


# --- inputs ------------------------------------------------------------------------------------

@st.composite
def rows(draw, max_n, max_d, dtypes, min_n=1):
    """(float64 master tensor (n, d), dtype): Gaussian, tie-heavy integers, or Gaussian with
    special rows (zero, duplicate, scaled copy), at a random scale."""
    n = draw(st.integers(min_n, max_n))
    d = draw(st.integers(1, max_d))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["gaussian", "ties", "special"]))
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":
        x = torch.randint(-2, 3, (n, d), generator=g).double()
    else:
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
    if kind == "special" and n > 1:
        for i in torch.randperm(n, generator=g)[: max(1, n // 4)].tolist():
            j = int(torch.randint(n, (1,), generator=g))
            x[i] = [0.0 * x[j], x[j], 2.0 * x[j], -x[j]][int(torch.randint(4, (1,), generator=g))]
    scale = 10.0 ** draw(st.integers(-2, 2))
    return (x * scale).to(dtype).double(), dtype  # the values the dtype can hold, in float64


def natural_scale(z, temperature, rows_in_mean):
    """The size a loss gradient has: 1 / (tau ||z_i||) per row, over the rows the mean takes."""
    return 1.0 / (temperature * z.norm(dim=1).clamp_min(1e-12)[:, None] * rows_in_mean)


def assert_close_to_exact(got, exact, dtype, scale, what, factor=8.0):
    """|got - exact| within ``factor`` roundings of the dtype: relative to |exact| and to the
    quantity's natural ``scale``. Half precision: against the exact value rounded to the dtype."""
    got, exact = got.double(), exact.double()
    eps = EPS[dtype]
    if dtype in HALF:
        rounded = exact.to(dtype).double()
        bound = (rounded - exact).abs() + factor * eps * (exact.abs() + scale)
    else:
        bound = factor * eps * (exact.abs() + scale) * 64  # accumulations over the batch
    bad = (got - exact).abs() > bound
    assert not bad.any(), (what, dtype, (got - exact).abs().max().item(), bound.min().item())


# --- NT-Xent and SupCon ----------------------------------------------------------------------------

def contrastive_loss64(z, positive_mask, temperature, positives, reduction):
    """Per the paper: l_i = logsumexp_{j != i} s_ij - mean_{p} s_ip (mean) or - logsumexp_p s_ip
    (sum), with s the cosine / tau; rows without a positive contribute nothing."""
    u = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
    s = u @ u.T / temperature
    m = s.shape[0]
    off = ~torch.eye(m, dtype=torch.bool)
    lse = torch.logsumexp(s.masked_fill(~off, -math.inf), dim=1)
    has = positive_mask.any(1)
    count = positive_mask.sum(1).clamp_min(1)
    if positives == "mean":
        pos = (s * positive_mask).sum(1) / count
    else:
        pos = torch.logsumexp(s.masked_fill(~positive_mask, -math.inf), dim=1)
    per_row = torch.where(has, lse - pos, torch.zeros_like(lse))
    if reduction == "none":
        return per_row
    total = per_row.sum()
    return total / has.sum().clamp_min(1) if reduction == "mean" else total


def loss_and_grads(fn, z, temperature, weights):
    z = z.detach().clone().requires_grad_(True)
    t = torch.tensor(temperature, dtype=torch.float64, requires_grad=True)
    out = fn(z, t)
    total = out if out.dim() == 0 else (out * weights.to(out)).sum()
    gz, gt = torch.autograd.grad(total, (z, t))
    return out.detach(), gz, gt


def check_loss(backend, z64, dtype, mask, temperature, positives, reduction, api):
    impl = BACKENDS[backend][0]
    m = z64.shape[0]
    weights = torch.rand(m, dtype=torch.float64) if reduction == "none" else None
    exact, gz64, gt64 = loss_and_grads(
        lambda z, t: contrastive_loss64(z, mask, t, positives, reduction), z64, temperature, weights)
    zin = z64.to(dtype).detach().requires_grad_(True)
    tin = torch.tensor(temperature, dtype=reference.accumulation_dtype(dtype), requires_grad=True)
    out = api(zin, tin, impl)
    total = out if out.dim() == 0 else (out * weights.to(out)).sum()
    gz, gt = torch.autograd.grad(total, (zin, tin))
    assert gz.dtype == dtype and out.dtype == reference.accumulation_dtype(dtype)
    rows_in_mean = max(int(mask.any(1).sum()), 1) if reduction == "mean" else 1
    loss_scale = 1.0 / temperature
    assert_close_to_exact(out, exact, torch.float32 if dtype in HALF else dtype, loss_scale, "loss")
    assert_close_to_exact(gz, gz64, dtype, natural_scale(z64, temperature, rows_in_mean), "grad z")
    assert_close_to_exact(gt, gt64, torch.float32 if dtype in HALF else dtype,
                          m / temperature ** 2 / rows_in_mean, "grad temperature")


@pytest.mark.parametrize("backend", backend_params(("triton_interp", "cuda_on_cpu")))
def test_half_gradients_with_a_zero_row(backend):
    """Found by the properties below: the float16 backwards of the Triton and CUDA kernels
    scaled each tile's coefficient operands by a power of two from the tile's largest
    |a_ij / ||z_j|||, and a zero (norm-clamped) row's 1/eps made it ~2^-37: every other
    coefficient flushed to 0, so every gradient came back 0. The zero row's own gradient is
    +-inf in float16 (its exact value, 1/eps-sized, rounded), the others exact-rounded."""
    torch.manual_seed(0)
    z1, z2 = torch.randn(4, 8).half(), torch.randn(4, 8).half()
    z1[1] = 0
    grads = []
    for impl in ("cpu", BACKENDS[backend][0]):
        a, b = z1.clone().requires_grad_(True), z2.clone().requires_grad_(True)
        grads.append(torch.autograd.grad(fastclr.nt_xent_fused(a, b, 0.5, impl=impl), (a, b)))
    rows = [0, 2, 3]  # the rows with a finite gradient
    torch.testing.assert_close(grads[1][0][rows], grads[0][0][rows], rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(grads[1][1], grads[0][1], rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("backend", backend_params())
@given(data=st.data())
def test_nt_xent_any_input(backend, data):
    max_n, max_d = SIZE[backend]
    z64, dtype = data.draw(rows(max_n // 2, max_d, LOSS_BACKENDS[backend]))
    z2, _ = data.draw(rows(z64.shape[0], z64.shape[1], (dtype,), min_n=z64.shape[0]))
    z2 = z2[: z64.shape[0], : z64.shape[1]] if z2.shape[1] >= z64.shape[1] else z64.flip(0)
    z = torch.cat([z64, z2[: z64.shape[0]]])
    n = z64.shape[0]
    temperature = data.draw(st.sampled_from([0.05, 0.1, 0.5, 1.0, 2.0]))
    reduction = data.draw(st.sampled_from(["mean", "sum", "none"]))
    mask = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
    idx = torch.arange(2 * n)
    mask[idx, (idx + n) % (2 * n)] = True
    module = data.draw(st.booleans())

    def api(z, t, impl):
        z1, z2 = z[:n], z[n:]
        if module:
            return fastclr.NTXentLoss(temperature=t, impl=impl, reduction=reduction)(z1, z2)
        return fastclr.nt_xent_fused(z1, z2, t, impl=impl, reduction=reduction)
    check_loss(backend, z, dtype, mask, temperature, "mean", reduction, api)


@st.composite
def label_patterns(draw, m):
    kind = draw(st.sampled_from(["distinct", "one_class", "singletons", "multiview", "random"]))
    if kind == "distinct":
        return torch.arange(m)
    if kind == "one_class":
        return torch.zeros(m, dtype=torch.long)
    if kind == "singletons":  # a few pairs, the rest without a positive
        labels = torch.arange(m) + 1000
        labels[: (m // 2) * 0 + min(2, m)] = 7
        return labels
    if kind == "multiview":
        views = draw(st.integers(1, min(4, m)))
        return torch.arange(m) // views
    classes = draw(st.integers(1, max(1, m // 2)))
    seed = draw(st.integers(0, 2**31 - 1))
    return torch.randint(classes, (m,), generator=torch.Generator().manual_seed(seed)) * 3 - 5


@pytest.mark.parametrize("backend", backend_params())
@given(data=st.data())
def test_supcon_any_labels(backend, data):
    max_n, max_d = SIZE[backend]
    z, dtype = data.draw(rows(max_n, max_d, LOSS_BACKENDS[backend]))
    labels = data.draw(label_patterns(z.shape[0]))
    temperature = data.draw(st.sampled_from([0.05, 0.1, 0.5, 1.0]))
    positives = data.draw(st.sampled_from(["mean", "sum"]))
    reduction = data.draw(st.sampled_from(["mean", "sum", "none"]))
    module = data.draw(st.booleans())
    m = z.shape[0]
    mask = (labels[:, None] == labels[None, :]) & ~torch.eye(m, dtype=torch.bool)

    def api(zz, t, impl):
        if module:
            return fastclr.SupConLoss(temperature=t, positives=positives, impl=impl,
                                      reduction=reduction)(zz, labels)
        return fastclr.supcon_fused(zz, labels, t, positives=positives, impl=impl, reduction=reduction)
    check_loss(backend, z, dtype, mask, temperature, positives, reduction, api)


# --- similarity and kNN ---------------------------------------------------------------------------

SIM_BACKENDS = {"cpu": LOSS_BACKENDS["cpu"], "triton_interp": (torch.float32, torch.float16),
                "cuda_on_cpu": LOSS_BACKENDS["cuda_on_cpu"]}


@pytest.mark.parametrize("backend", backend_params(tuple(SIM_BACKENDS)))
@given(data=st.data())
def test_normalized_similarity_any_input(backend, data):
    max_n, max_d = SIZE[backend]
    a, dtype = data.draw(rows(max_n, max_d, SIM_BACKENDS[backend]))
    b, _ = data.draw(rows(max_n, a.shape[1], (dtype,)))
    b = F.pad(b, (0, a.shape[1] - b.shape[1])) if b.shape[1] < a.shape[1] else b
    impl = BACKENDS[backend][0]
    ain, bin_ = a.to(dtype).requires_grad_(True), b.to(dtype).requires_grad_(True)
    s = fastclr.normalized_similarity(ain, bin_, impl=impl)
    w = torch.randn(s.shape, dtype=torch.float64)
    ga, gb = torch.autograd.grad((s * w.to(s)).sum(), (ain, bin_))
    a64, b64 = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    s64 = (a64 / a64.norm(dim=1, keepdim=True).clamp_min(1e-12)) @ (b64 / b64.norm(dim=1, keepdim=True).clamp_min(1e-12)).T
    ga64, gb64 = torch.autograd.grad((s64 * w).sum(), (a64, b64))
    acc = torch.float32 if dtype in HALF else dtype
    assert_close_to_exact(s, s64, dtype if dtype in HALF else acc, 1.0, "similarity")
    k = max(s.shape)
    assert_close_to_exact(ga, ga64, dtype, k / a.norm(dim=1, keepdim=True).clamp_min(1e-12), "grad a")
    assert_close_to_exact(gb, gb64, dtype, k / b.norm(dim=1, keepdim=True).clamp_min(1e-12), "grad b")


@pytest.mark.parametrize("backend", backend_params(tuple(SIM_BACKENDS)))
@given(data=st.data())
def test_knn_topk_is_the_reference_bit_for_bit(backend, data):
    """Every backend's values and indices equal reference.knn_topk's exactly, heavy ties
    included; and the reference's order is the contract: scores (reference.knn_scores) not
    increasing, equal scores in increasing bank index, no better row left out."""
    max_n, max_d = SIZE[backend]
    max_d = max(max_d, 64)  # the re-scoring's summation order shows on long rows: no smaller here
    q, dtype = data.draw(rows(max_n, max_d, SIM_BACKENDS[backend]))
    bank, _ = data.draw(rows(max(max_n, 8), q.shape[1], (dtype,)))
    bank = F.pad(bank, (0, q.shape[1] - bank.shape[1])) if bank.shape[1] < q.shape[1] else bank
    k = data.draw(st.integers(1, bank.shape[0]))
    chunk = data.draw(st.integers(1, bank.shape[0] + 3))
    q, bank = q.to(dtype), bank.to(dtype)
    v, i = fastclr.knn_topk(q, bank, k, impl=BACKENDS[backend][0], chunk=chunk)
    rv, ri = reference.knn_topk(q, bank, k)
    assert torch.equal(i, ri) and torch.equal(v, rv)
    s = reference.knn_scores(q, bank)
    key = torch.where(s.isnan(), math.inf, s)
    got = key.gather(1, ri)
    assert (got[:, :-1] >= got[:, 1:]).all()
    tie = got[:, :-1] == got[:, 1:]
    assert (ri[:, :-1][tie] < ri[:, 1:][tie]).all()
    kth = got[:, -1:]
    left_out = torch.ones_like(key, dtype=torch.bool).scatter_(1, ri, False)
    better = (key > kth) | ((key == kth) & (torch.arange(bank.shape[0]) < ri[:, -1:]))
    assert not (left_out & better).any()


# --- LARS ---------------------------------------------------------------------------------------

LARS_BACKENDS = {"cpu": "cpu", "foreach": "foreach", "cuda_on_cpu": "cuda"}


def lars_step64(w, g, v, lr, momentum, wd, tc, nesterov, exclude):
    """google-research/simclr's LARS, one step, in float64."""
    if not exclude:
        g = g + wd * w
        wn, gn = w.norm(), g.norm()
        trust = torch.where((wn > 0) & (gn > 0), tc * wn / gn, torch.ones_like(wn))
    else:
        trust = torch.ones((), dtype=w.dtype)
    v = momentum * v + lr * trust * g
    return w - (momentum * v + lr * trust * g if nesterov else v), v


@pytest.mark.parametrize("backend", [pytest.param(k, marks=BACKENDS[k][2] if k in BACKENDS else [], id=k)
                                     for k in LARS_BACKENDS])
@given(data=st.data())
def test_lars_any_hyper_parameters(backend, data):
    seed = data.draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    shapes = data.draw(st.lists(st.sampled_from([(1,), (7,), (3, 5), (2, 3, 4), (70001,), ()]),
                                min_size=1, max_size=4))
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64] if backend != "cuda_on_cpu"
                                      else [torch.float32]))
    hyper = dict(lr=data.draw(st.sampled_from([1e-3, 0.1, 4.8])),
                 momentum=data.draw(st.sampled_from([0.0, 0.9])),
                 weight_decay=data.draw(st.sampled_from([0.0, 1e-6, 1e-2])),
                 trust_coefficient=data.draw(st.sampled_from([1e-3, 0.02, 1.0])),
                 nesterov=data.draw(st.booleans()))
    exclude = [data.draw(st.booleans()) for _ in shapes]
    zero_grad = [data.draw(st.sampled_from([False, False, True])) for _ in shapes]
    params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64).to(dtype)) for s in shapes]
    groups = [{"params": [p], "exclude": ex} for p, ex in zip(params, exclude)]
    opt = fastclr.LARS(groups, impl=LARS_BACKENDS[backend], **hyper)
    w64 = [p.detach().double().clone() for p in params]
    v64 = [torch.zeros_like(w) for w in w64]
    for step in range(3):
        skip = data.draw(st.booleans()) and step == 1
        for p, z in zip(params, zero_grad):
            p.grad = torch.zeros_like(p) if z else torch.randn(p.shape, generator=g, dtype=torch.float64).to(dtype)
        before = [p.detach().clone() for p in params]
        opt.step(found_inf=torch.ones(1) if skip else torch.zeros(1))
        if skip:
            assert all(torch.equal(b, p) for b, p in zip(before, params))
            continue
        for i, (p, ex) in enumerate(zip(params, exclude)):
            prev = w64[i]
            w64[i], v64[i] = lars_step64(prev, p.grad.double(), v64[i], hyper["lr"], hyper["momentum"],
                                         hyper["weight_decay"], hyper["trust_coefficient"],
                                         hyper["nesterov"], ex)
            # LARS computes in float32 for every parameter dtype (docs/api.md): one float32
            # rounding of the new weight, plus float32 arithmetic on the step and the norms
            bound = EPS[torch.float32] * (2 * w64[i].abs() + 64 * (w64[i] - prev).abs().max())
            err = (p.detach().double() - w64[i]).abs()
            assert (err <= bound).all(), (i, err.max().item(), bound.max().item())
            w64[i] = p.detach().double().clone()  # follow the rounded weights
            v64[i] = opt.state[p]["momentum_buffer"].double().clone() if "momentum_buffer" in opt.state[p] else v64[i]


# --- gradient caching ---------------------------------------------------------------------------

@given(data=st.data())
def test_grad_cache_any_micro_batch(data):
    n = data.draw(st.integers(1, 40))
    d = data.draw(st.integers(1, 12))
    micro = data.draw(st.integers(1, n + 2))
    views = data.draw(st.integers(1, 3))
    seed = data.draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(d, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8)).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    xs = tuple(torch.randn(n, d, generator=g, dtype=torch.float64) for _ in range(views))
    labels = torch.arange(n).repeat(views)

    def loss_fn(z):
        return fastclr.supcon_fused(z, labels, 0.3, impl="reference") if views != 2 else \
            fastclr.nt_xent_fused(*z.chunk(2), 0.3, impl="reference")
    loss_fn(model(torch.cat(xs))).backward()
    full = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss = fastclr.grad_cache_backward(model, xs if views > 1 else xs[0], loss_fn, micro)
    for a, b in zip(full, (p.grad for p in model.parameters())):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)
    assert loss.requires_grad is False
