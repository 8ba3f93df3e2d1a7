"""A small forward+backward of the CUDA kernels for compute-sanitizer (gpu_suite.sh):
odd sizes so every tile has padding, all three dtypes, accuracy on; NT-Xent (paired positives)
and SupCon (labels, with rows that have no positive: both sweeps of the forward)."""
import torch

import fastclr


def main():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for n, d in ((37, 19), (70, 130)):
            z1 = torch.randn(n, d, device="cuda", dtype=dtype, requires_grad=True)
            z2 = torch.randn(n, d, device="cuda", dtype=dtype, requires_grad=True)
            loss, acc = fastclr.nt_xent_fused(z1, z2, 0.2, impl="cuda", return_accuracy=True)
            loss.backward()
            z = torch.randn(2 * n + 1, d, device="cuda", dtype=dtype, requires_grad=True)
            labels = torch.randint(0, n // 2, (2 * n + 1,), device="cuda")
            labels[:3] = torch.tensor([-7, 10**12, 99], device="cuda")  # (probably) alone
            for positives in ("mean", "sum"):
                loss, acc = fastclr.supcon_fused(z, labels, 0.2, positives=positives, impl="cuda",
                                                 return_accuracy=True)
                loss.backward()
    torch.cuda.synchronize()
    print("sanitize case done")


if __name__ == "__main__":
    main()
