"""The suite's comparisons through pytest-benchmark: ``pytest benchmarks --benchmark-only``.

Each group holds fastclr and its peers on the same input, so pytest-benchmark's table compares
them side by side (``--benchmark-group-by=group``, the default). Sizes are small enough for a
laptop CPU; on a GPU the loss and augmentation groups run on the GPU. The scripted suite
(``python -m benchmarks``) covers the large sizes, memory and the end-to-end step.
"""
import numpy as np
import pytest
import torch

from benchmarks import bench_lars, bench_loss

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


FASTCLR = "triton" if DEVICE == "cuda" else "cpu"  # the device's own fused backend


@pytest.mark.parametrize("impl, m", [(i, 512) for i in (FASTCLR, "naive", "lightly", "pml")]
                         + [(i, 4096) for i in (FASTCLR, "naive", "lightly")])
def test_loss_forward_backward(benchmark, impl, m):
    # pytorch-metric-learning's NTXentLoss needs 17 GiB at M = 1024 on a CPU: it joins at 512 only
    d = 128
    benchmark.group = f"loss fwd+bwd, M={m}, D={d} ({DEVICE})"
    pytest.importorskip({"lightly": "lightly", "pml": "pytorch_metric_learning"}.get(impl, "torch"))
    torch.manual_seed(0)
    z1 = torch.randn(m // 2, d, device=DEVICE, requires_grad=True)
    z2 = torch.randn(m // 2, d, device=DEVICE, requires_grad=True)
    loss_fn = bench_loss.make_loss(impl, 0.5, DEVICE)

    def step():
        z1.grad = z2.grad = None
        loss_fn(z1, z2).backward()
        _sync()
    benchmark.pedantic(step, rounds=3 if impl == "pml" else 10, warmup_rounds=1)


@pytest.mark.parametrize("impl", [FASTCLR, "naive", "pml"])
@pytest.mark.parametrize("labels", ["classes:100", "views:4"])
def test_supcon_forward_backward(benchmark, impl, labels):
    m, d = 2048, 128
    benchmark.group = f"SupCon fwd+bwd, M={m}, D={d}, labels {labels} ({DEVICE})"
    pytest.importorskip({"pml": "pytorch_metric_learning"}.get(impl, "torch"))
    torch.manual_seed(0)
    z = torch.randn(m, d, device=DEVICE, requires_grad=True)
    y = bench_loss.make_labels(labels, m, DEVICE)
    loss_fn = bench_loss.make_supcon(impl, 0.1)

    def step():
        z.grad = None
        loss_fn(z, y).backward()
        _sync()
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)


@pytest.mark.parametrize("name", ["fastclr-cpu", "fastclr-cuda", "fastclr-foreach", "lightly", "timm",
                                  "sgd-fused"])
def test_lars_step(benchmark, name):
    if (name == "fastclr-cuda") != (DEVICE == "cuda") and name != "fastclr-foreach" and name.startswith("fastclr"):
        pytest.skip(f"{name} is for the other device")
    pytest.importorskip({"lightly": "lightly", "timm": "timm"}.get(name, "torch"))
    import torchvision
    benchmark.group = f"LARS step, ResNet-18 ({DEVICE})"
    torch.manual_seed(0)
    model = torchvision.models.resnet18().to(DEVICE)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt = bench_lars.make_optimizer(name, model)

    def step():
        opt.step()
        _sync()
    benchmark.pedantic(step, rounds=20, warmup_rounds=2)


@pytest.mark.parametrize("pipeline", ["fastclr-torch", "fastclr-dali", "torchvision"])
def test_augment_two_views(benchmark, pipeline):
    benchmark.group = f"two-view augmentation, 1024 images at 32 px ({DEVICE})"
    data = np.random.default_rng(0).integers(0, 256, (1024, 32, 32, 3), dtype=np.uint8)
    if pipeline == "fastclr-torch":
        from fastclr.app.augment import TorchSimCLRAugment
        aug = TorchSimCLRAugment(32)
        x = torch.from_numpy(data).to(DEVICE)

        def run():
            for i in range(0, 1024, 256):
                aug(x[i:i + 256])
            _sync()
    elif pipeline == "fastclr-dali":
        from fastclr.app.dali import dali_available, dali_loader
        if not dali_available():
            pytest.skip("nvidia-dali not installed")
        loader = dali_loader(data, 256, 32, device="gpu" if DEVICE == "cuda" else "cpu")

        def run():
            for _ in loader:
                pass
    else:
        from benchmarks.bench_augment import _TwoViews, torchvision_transform
        loader = torch.utils.data.DataLoader(_TwoViews(data, torchvision_transform(32)),
                                             batch_size=256, num_workers=0)

        def run():
            for _ in loader:
                pass
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
