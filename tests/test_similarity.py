"""normalized_similarity and knn_topk: every backend against the float64 reference.

Backends: the C++ kernel ("cpu"), Triton on CPU tensors through the interpreter
("triton_interp", CI) and on a GPU ("triton_cuda", gpu_suite.sh), and the CUDA kernel on CPU
tensors through its CPU harness ("cuda_on_cpu", CI) and on a GPU ("cuda", gpu_suite.sh).
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import fastclr
from fastclr import ops, reference
from nt_xent_checks import needs_cuda_kernel as needs_cuda_kernels
from nt_xent_checks import needs_cuda_on_cpu, needs_ext, needs_interp, needs_triton_cuda

BACKENDS = {
    "cpu": ("cpu", "cpu", [needs_ext]),
    # the C++ kNN kernel with its float32 screen forced (the default on CPUs without bf16 dot
    # instructions; "cpu" uses bf16 where the CPU has it)
    "cpu_fp32screen": ("cpu", "cpu", [needs_ext]),
    "triton_interp": ("triton", "cpu", [needs_interp]),
    "cuda_on_cpu": ("cuda", "cpu", needs_cuda_on_cpu),  # kernels/similarity.cu, CPU harness
    "triton_cuda": ("triton", "cuda", needs_triton_cuda),
    "cuda": ("cuda", "cuda", needs_cuda_kernels),  # kernels/similarity.cu
}
# (M, K, D): odd sizes, not multiples of any tile
SHAPES = {
    "cpu": [(1, 1, 1), (3, 7, 5), (37, 300, 19), (130, 1000, 64), (600, 5000, 130)],
    "cpu_fp32screen": [(3, 7, 5), (130, 1000, 64), (600, 5000, 130)],
    "triton_interp": [(1, 1, 3), (3, 7, 5), (37, 100, 19), (70, 130, 64)],
    "cuda_on_cpu": [(1, 1, 3), (3, 7, 5), (37, 100, 19), (70, 130, 64), (65, 200, 100)],
    "triton_cuda": [(1, 1, 3), (37, 300, 19), (1000, 4097, 128), (3000, 20000, 256)],
    "cuda": [(1, 1, 3), (37, 300, 19), (1000, 4097, 128), (3000, 20000, 256)],
}


@pytest.fixture(autouse=True)
def knn_screen(request, monkeypatch):
    """Cases of the "cpu_fp32screen" backend run with FASTCLR_KNN_SCREEN=fp32, the others with
    the kernel's own choice."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.id.startswith("cpu_fp32screen"):
        monkeypatch.setenv("FASTCLR_KNN_SCREEN", "fp32")
    else:
        monkeypatch.delenv("FASTCLR_KNN_SCREEN", raising=False)


def cases(with_shapes=True):
    out = []
    for name, (impl, device, marks) in BACKENDS.items():
        if with_shapes:
            out += [pytest.param(impl, device, *s, marks=marks, id=f"{name}-{'x'.join(map(str, s))}")
                    for s in SHAPES[name]]
        else:
            out.append(pytest.param(impl, device, marks=marks, id=name))
    return out


def _inputs(m, k, d, device, dtype=torch.float32, scale=True):
    a = torch.randn(m, d, dtype=torch.float64)
    b = torch.randn(k, d, dtype=torch.float64)
    if scale:  # large and tiny norms
        a *= torch.logspace(-3, 3, m, dtype=torch.float64)[torch.randperm(m)][:, None]
        b *= torch.logspace(-3, 3, k, dtype=torch.float64)[torch.randperm(k)][:, None]
    return a.to(device, dtype), b.to(device, dtype)


@pytest.mark.parametrize("impl,device,m,k,d", cases())
def test_similarity_forward_backward(seed, impl, device, m, k, d):
    a, b = _inputs(m, k, d, device)
    a.requires_grad_(True)
    b.requires_grad_(True)
    s = fastclr.normalized_similarity(a, b, impl=impl)
    assert s.shape == (m, k) and s.dtype == torch.float32
    a64 = a.detach().cpu().double().requires_grad_(True)
    b64 = b.detach().cpu().double().requires_grad_(True)
    ref = reference.normalized_similarity(a64, b64)
    torch.testing.assert_close(s.detach().cpu().double(), ref.detach(), rtol=0, atol=1e-5)
    g = torch.randn(m, k, dtype=torch.float64)
    s.backward(g.to(device, torch.float32))
    ref.backward(g)
    for x, x64 in ((a, a64), (b, b64)):
        # rows scaled by their norm (a gradient scales as 1/||x_i||), so tiny- and huge-norm rows
        # count alike; floor: D = 1 has an exactly-zero gradient, seen through rounding
        n = x64.detach().norm(dim=1, keepdim=True)
        num = ((x.grad.cpu().double() - x64.grad) * n).norm()
        den = max((x64.grad * n).norm().item(), 1e-2 * g.norm().item())
        assert num / den < 1e-4, num / den


@pytest.mark.parametrize("impl,device", cases(with_shapes=False))
def test_similarity_zero_rows_and_float64(seed, impl, device):
    a, b = _inputs(5, 6, 9, device, scale=False)
    a[2] = 0
    b[4] = 0
    a.requires_grad_(True)
    s = fastclr.normalized_similarity(a, b, impl=impl)
    assert (s[2] == 0).all() and (s[:, 4] == 0).all()
    s.sum().backward()
    a64 = a.detach().cpu().double().requires_grad_(True)
    reference.normalized_similarity(a64, b.detach().cpu().double()).sum().backward()
    torch.testing.assert_close(a.grad.cpu().double(), a64.grad, rtol=1e-4, atol=1e-6)  # g / eps rows too
    if impl == "cpu":
        a64, b64 = a.detach().double().requires_grad_(True), b.double().requires_grad_(True)
        assert torch.autograd.gradcheck(
            lambda x, y: fastclr.normalized_similarity(x, y, impl="cpu"), (a64 + 0.1, b64 + 0.1))
        assert fastclr.normalized_similarity(a64, b64, impl="cpu").dtype == torch.float64


def half_cases():
    """(impl, device, dtype) for fp16 and bf16 on every backend; bf16 under the Triton
    interpreter is skipped (its bf16 tl.dot is wrong; checked on a GPU)."""
    out = []
    for p in cases(with_shapes=False):
        impl, device = p.values
        for dtype in (torch.float16, torch.bfloat16):
            marks = list(p.marks)
            if impl == "triton" and device == "cpu" and dtype == torch.bfloat16:
                marks.append(pytest.mark.skip(reason="the interpreter's bf16 tl.dot is wrong (checked on a GPU)"))
            out.append(pytest.param(impl, device, dtype, marks=marks, id=f"{p.id}-{str(dtype)[6:]}"))
    return out


@pytest.mark.parametrize("impl,device,dtype", half_cases())
def test_similarity_half(seed, impl, device, dtype):
    a, b = _inputs(37, 50, 64, device, dtype, scale=False)
    s = fastclr.normalized_similarity(a, b, impl=impl)
    assert s.dtype == torch.float32
    ref = reference.normalized_similarity(a.cpu().double(), b.cpu().double())
    # the same computation in PyTorch in the half dtype, as the error budget
    torch_half = (F.normalize(a.cpu().float(), dim=1).to(dtype) @ F.normalize(b.cpu().float(), dim=1).to(dtype).T)
    budget = (torch_half.double() - ref).abs().max().item()
    assert (s.cpu().double() - ref).abs().max().item() <= 2 * budget + 1e-6


@pytest.mark.parametrize("impl,device,m,k,d", cases())
@pytest.mark.parametrize("topk", [1, 5, 200])
def test_knn_topk_matches_reference(seed, impl, device, m, k, d, topk):
    topk = min(topk, k)
    q, bank = _inputs(m, k, d, device)
    vals, idx = fastclr.knn_topk(q, bank, topk, impl=impl, chunk=97)
    rv, ri = reference.knn_topk(q.cpu().double(), bank.cpu().double(), topk)
    assert idx.dtype == torch.long and idx.shape == (m, topk)
    torch.testing.assert_close(vals.cpu().double(), rv, rtol=0, atol=1e-5)
    # exactly the float64 reference's indices: every backend re-scores its candidates in float64
    # and proves the rows it dropped are worse (random data: no float64 near-ties)
    assert torch.equal(idx.cpu(), ri)


@pytest.mark.parametrize("impl,device,dtype", half_cases())
def test_knn_topk_half_inputs(seed, impl, device, dtype):
    """Half inputs: float32 values, and the exact top-k of the half numbers themselves."""
    q, bank = _inputs(37, 300, 24, device, dtype, scale=False)
    vals, idx = fastclr.knn_topk(q, bank, 10, impl=impl, chunk=97)
    rv, ri = reference.knn_topk(q.cpu().double(), bank.cpu().double(), 10)
    assert vals.dtype == torch.float32 and torch.equal(idx.cpu(), ri)
    torch.testing.assert_close(vals.cpu().double(), rv, rtol=0, atol=1e-6)


@pytest.mark.parametrize("impl,device", cases(with_shapes=False))
def test_knn_topk_ties_and_zero_vectors(seed, impl, device):
    base = torch.randn(20, 16)
    # each distinct row 3 times at scattered positions, and scaled copies (same direction)
    bank = torch.cat([base, base * 2.0, base * 0.5])[torch.randperm(60)]
    bank[torch.randperm(60)[:4]] = 0  # zero vectors: similarity exactly 0
    q = torch.cat([base[:7], torch.zeros(1, 16)])
    bank, q = bank.to(device), q.to(device)
    for topk in (1, 3, 10, 60):
        vals, idx = fastclr.knn_topk(q, bank, topk, impl=impl, chunk=7)
        rv, ri = reference.knn_topk(q.cpu().double(), bank.cpu().double(), topk)
        # the zero query ties with everything at 0: it must get the bank in index order
        assert idx[-1].tolist() == list(range(topk))
        for row in range(q.shape[0] - 1):
            v = vals[row].cpu().double()
            # scaled copies give the same value up to rounding: among (near-)equal values the
            # indices must be ascending
            for t in range(topk - 1):
                if abs(v[t] - v[t + 1]) < 1e-6:
                    assert idx[row, t] < idx[row, t + 1], (row, t)
        torch.testing.assert_close(vals.cpu().double(), rv, rtol=0, atol=1e-5)


@pytest.mark.parametrize("impl,device", cases(with_shapes=False))
def test_knn_topk_rows_that_normalise_alike_tie_as_in_the_reference(seed, impl, device):
    """D = 1 (every row normalises to +-1) and 2-D scaled copies whose norms scale exactly
    ([3, 4], [4.5, 6], [6, 8] all normalise to [0.6, 0.8]): exact ties in the float64 reference,
    so the same indices, in index order."""
    q1, b1 = torch.randn(6, 1), torch.randn(90, 1)
    base = torch.tensor([[3.0, 4.0], [5.0, 12.0], [-8.0, 15.0]])
    b2 = torch.cat([base * c for c in (1.0, 1.5, 2.0, 0.5, 3.0)])[torch.randperm(15)]
    b2 = torch.cat([b2, torch.randn(20, 2)])
    q2 = torch.cat([base, torch.randn(3, 2)])
    for q, bank, k in ((q1, b1, 40), (q2, b2, 12)):
        vals, idx = fastclr.knn_topk(q.to(device), bank.to(device), k, impl=impl, chunk=16)
        rv, ri = reference.knn_topk(q.double(), bank.double(), k)
        assert torch.equal(idx.cpu(), ri)
        torch.testing.assert_close(vals.cpu().double(), rv, rtol=0, atol=1e-7)


@pytest.mark.parametrize("impl,device", cases(with_shapes=False))
def test_knn_topk_exact_duplicates_equal_reference(seed, impl, device):
    bank = torch.randn(50, 8).repeat(3, 1)  # rows j, j+50, j+100 identical
    q = torch.randn(9, 8)
    vals, idx = fastclr.knn_topk(q.to(device), bank.to(device), 12, impl=impl, chunk=33)
    _, ri = reference.knn_topk(q.double(), bank.double(), 12)
    assert torch.equal(idx.cpu(), ri)


@pytest.mark.parametrize("bad, match", [
    (lambda q, b: fastclr.knn_topk(q, b, 0), "k must be between 1 and the number of bank rows"),
    (lambda q, b: fastclr.knn_topk(q, b, 11), r"bank rows \(10\), got k=11"),
    (lambda q, b: fastclr.knn_topk(q, b, 2.0), "k must be an int"),
    (lambda q, b: fastclr.knn_topk(q, b, 2, chunk=0), "chunk must be a positive int"),
    (lambda q, b: fastclr.knn_topk(q, b[:, :3], 2), "same number of columns"),
    (lambda q, b: fastclr.knn_topk(q, b.double(), 2), "same dtype"),
    (lambda q, b: fastclr.normalized_similarity(q[0], b), "a must be 2-D"),
    (lambda q, b: fastclr.normalized_similarity(q.int(), b.int()), "must be float32"),
    (lambda q, b: fastclr.normalized_similarity(q, b, impl="gpu"), "impl must be one of"),
    (lambda q, b: fastclr.knn_topk(q, b, 2, impl="cuda"), "impl='cuda' needs CUDA tensors"),
])
def test_bad_inputs(bad, match, without_cuda_on_cpu):
    with pytest.raises((ValueError, TypeError), match=match):
        bad(torch.randn(4, 5), torch.randn(10, 5))


def test_k_equal_bank_sorts_everything():
    q, bank = torch.randn(3, 4), torch.randn(9, 4)
    vals, idx = fastclr.knn_topk(q, bank, 9)
    assert sorted(idx[0].tolist()) == list(range(9))
    assert (vals[:, :-1] >= vals[:, 1:]).all()


@needs_ext
def test_opcheck_cpu_ops():
    a, b = torch.randn(7, 5, requires_grad=True), torch.randn(11, 5, requires_grad=True)
    torch.library.opcheck(torch.ops.fastclr.normalized_similarity, (a, b))
    torch.library.opcheck(torch.ops.fastclr.knn_topk, (a.detach(), b.detach()), {"k": 3, "chunk": 4})


@pytest.mark.cuda
def test_opcheck_triton_op_cuda():
    a = torch.randn(70, 33, device="cuda", requires_grad=True)
    b = torch.randn(130, 33, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.fastclr.normalized_similarity_triton, (a, b))
    f = torch.compile(lambda x, y: fastclr.normalized_similarity(x, y), fullgraph=True)
    torch.testing.assert_close(f(a, b), fastclr.normalized_similarity(a, b))


@pytest.mark.cuda
@pytest.mark.skipif(not ops.compiled_with_cuda(), reason="extension built without the CUDA kernels")
def test_opcheck_cuda_kernel():
    """kernels/similarity.cu under opcheck (fake, autograd registration) and torch.compile."""
    a = torch.randn(70, 33, device="cuda", requires_grad=True)
    b = torch.randn(130, 33, device="cuda", requires_grad=True)
    torch.library.opcheck(torch.ops.fastclr.normalized_similarity, (a, b))
    f = torch.compile(lambda x, y: fastclr.normalized_similarity(x, y, impl="cuda"), fullgraph=True)
    torch.testing.assert_close(f(a, b), fastclr.normalized_similarity(a, b, impl="cuda"))


@pytest.mark.parametrize("impl,device", cases(with_shapes=False))
@pytest.mark.parametrize("nbank, chunk", [(40, 9), (200, None)])  # the second: one tile
def test_knn_topk_nan_ranks_like_the_reference(impl, device, nbank, chunk):
    """A NaN score ranks highest, as in torch.sort (the reference): a NaN query gets the first k
    bank rows with NaN values; a NaN bank row is every query's first neighbour."""
    q, bank = torch.randn(6, 8), torch.randn(nbank, 8)
    q[1, 3] = float("nan")
    bank[17, 0] = float("nan")
    vals, idx = fastclr.knn_topk(q.to(device), bank.to(device), 5, impl=impl, chunk=chunk)
    rv, ri = reference.knn_topk(q.double(), bank.double(), 5)
    assert torch.equal(idx.cpu(), ri)
    assert torch.equal(vals.cpu().isnan(), rv.isnan())
    assert idx[1].tolist() == [0, 1, 2, 3, 4] and (idx[[0, 2, 3, 4, 5], 0] == 17).all()


CROWDED = {  # backend -> (near-duplicate rows, other rows, ks, chunk)
    "cpu": (3000, 1000, (1, 7, 300), 513),
    "cpu_fp32screen": (3000, 1000, (1, 7, 300), 513),
    "triton_interp": (150, 40, (1, 7), 64),
    "cuda_on_cpu": (150, 40, (1, 7), 64),
    "triton_cuda": (30000, 10000, (1, 7, 300), 4096),
    "cuda": (30000, 10000, (1, 7, 300), 4096),
}


@pytest.mark.parametrize("impl,device", cases(with_shapes=False))
def test_knn_topk_crowded_band_switches_to_exact_mode(request, seed, impl, device):
    """Far more bank rows within the screen's error band of each other than the kernel keeps
    waiting (near-duplicates of one direction, and a zero query that ties with everything): the
    C++ kernel then scores them exactly as they come (bounded memory), the Triton path searches
    those queries again with more candidates. The result is still the reference's, ties to the
    lower index."""
    n_dup, n_other, ks, chunk = CROWDED[request.node.callspec.id]
    d = 24
    direction = torch.randn(d, dtype=torch.float64)
    bank = direction + 1e-5 * torch.randn(n_dup, d, dtype=torch.float64)
    bank[torch.randperm(n_dup)[:n_dup // 6]] = direction  # exact duplicates too
    bank = torch.cat([bank, torch.randn(n_other, d, dtype=torch.float64)]).float()
    q = torch.stack([direction + 1e-3 * torch.randn(d, dtype=torch.float64) for _ in range(5)] +
                    [torch.zeros(d, dtype=torch.float64), -direction]).float()
    for k in ks:
        vals, idx = fastclr.knn_topk(q.to(device), bank.to(device), k, impl=impl, chunk=chunk)
        rv, ri = reference.knn_topk(q.double(), bank.double(), k)
        assert torch.equal(idx.cpu(), ri), k
        torch.testing.assert_close(vals.cpu().double(), rv, rtol=0, atol=1e-6)
        assert idx[5].tolist() == list(range(k))  # the zero query: the bank in index order


@needs_ext
@pytest.mark.parametrize("screen", ["bf16", "fp32"])
def test_knn_topk_wide_rows_and_scaled_duplicates(seed, monkeypatch, screen):
    """D = 1500 (the screen's error bound grows with D) and many equal-similarity rows at
    different norms: indices identical to the float64 reference's."""
    monkeypatch.setenv("FASTCLR_KNN_SCREEN", screen)
    q, bank = _inputs(40, 2500, 1500, "cpu")
    bank[1000:1500] = bank[:500] * torch.logspace(-2, 2, 500)[:, None]  # same directions
    vals, idx = fastclr.knn_topk(q, bank, 50, chunk=700)
    rv, ri = reference.knn_topk(q.double(), bank.double(), 50)
    assert torch.equal(idx, ri)
    torch.testing.assert_close(vals.double(), rv, rtol=0, atol=1e-6)


@needs_ext
def test_knn_screen_env_is_checked(monkeypatch):
    monkeypatch.setenv("FASTCLR_KNN_SCREEN", "int8")
    with pytest.raises(RuntimeError, match="FASTCLR_KNN_SCREEN must be auto, bf16 or fp32"):
        fastclr.knn_topk(torch.randn(3, 4), torch.randn(9, 4), 2)


@needs_ext
def test_knn_topk_same_result_at_any_thread_count(seed):
    """Query blocks are split across threads, but each query's candidates and float64 re-scoring
    are its own: 1 and 2 threads give bitwise the same values and indices."""
    q, bank = _inputs(700, 3000, 40, "cpu")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        v1, i1 = fastclr.knn_topk(q, bank, 30, chunk=999)
        torch.set_num_threads(2)
        v2, i2 = fastclr.knn_topk(q, bank, 30, chunk=999)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(i1, i2) and torch.equal(v1, v2)


@pytest.mark.parametrize("impl,device", cases(with_shapes=False))
def test_knn_topk_tie_heavy_inputs_agree_bit_for_bit(impl, device):
    """Integer-valued features (quantised embeddings): many cosines equal in exact arithmetic,
    which float64 formulas round differently. Every backend ranks by reference.knn_scores, so
    values and indices equal reference.knn_topk's exactly (before, ~80% of such cases differed)."""
    g = torch.Generator().manual_seed(0)
    for case in range(12):
        d = int(torch.randint(8, 48, (1,), generator=g))
        q = torch.randint(-2, 3, (16, d), generator=g).float()
        bank = torch.randint(-2, 3, (150, d), generator=g).float()
        k = int(torch.randint(1, 150, (1,), generator=g))
        vals, idx = fastclr.knn_topk(q.to(device), bank.to(device), k, impl=impl, chunk=41)
        rv, ri = reference.knn_topk(q, bank, k)
        assert torch.equal(idx.cpu(), ri), case
        assert torch.equal(vals.cpu(), rv), case


def test_knn_topk_takes_integer_like_k():
    q, bank = torch.randn(5, 4), torch.randn(20, 4)
    v, i = fastclr.knn_topk(q, bank, np.int64(5), chunk=np.int32(7))
    v2, i2 = fastclr.knn_topk(q, bank, 5)
    assert torch.equal(i, i2) and torch.equal(v, v2)
    with pytest.raises(TypeError, match="k must be an int"):
        fastclr.knn_topk(q, bank, 5.0)
