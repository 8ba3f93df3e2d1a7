"""Registers, spills and shared memory of the Triton NT-Xent / SupCon kernels, without a GPU.

    TRITON_INTERPRET=0 python -m benchmarks.triton_resources [--arch 90] [--dim 128]

Compiles each kernel ahead of time (triton.compile with an explicit GPUTarget) with the launch
configuration fastclr picks for M = 65536, runs the ptxas bundled with triton with -v on its PTX,
and prints one line per (dtype, kernel). A first look at a configuration's cost before a GPU is
at hand; the timings themselves come from gpu_suite.sh.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastclr.triton import nt_xent as K
from fastclr.triton.common import dot_precision, pow2_at_least

_TY = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def jobs(dtype: torch.dtype, d: int):
    """(kernel, signature, constexprs, options) for every kernel as fastclr launches it; the
    forward and backward in both modes (paired NT-Xent, labels SupCon)."""
    cfg = K._config(65536, d, dtype, interpret=False)
    prec, ty = dot_precision(dtype), _TY[dtype]
    z = dict(z1_ptr="*" + ty, z2_ptr="*" + ty)
    i32 = dict(N="i32", M="i32", D="i32", stride1="i32", stride2="i32")
    local = dict(LO="i32", COUNT="i32")  # the local rows (a rank's share)
    f = lambda *n: {k: "*fp32" for k in n}  # noqa: E731
    c = lambda *n: {k: "constexpr" for k in n}  # noqa: E731
    opts = {"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]}
    bwd = K._nt_xent_bwd_rows_kernel if cfg["ROWS_BWD"] else K._nt_xent_bwd_pairs_kernel
    out = [(K._nt_xent_norm_kernel, {**z, **f("norm_ptr"), **i32, **c("BLOCK_R", "BLOCK_D")},
            dict(BLOCK_R=64, BLOCK_D=min(128, pow2_at_least(d))), {"num_warps": 4, "num_stages": 3})]
    for labels in (False, True):
        lab = {"labels_ptr": "*i64" if labels else "*" + ty}
        out += [
            (K._nt_xent_fwd_kernel, {**z, **lab, **f("norm_ptr", "temp_ptr", "loss_ptr", "stats_ptr"),
                                     "rank_ptr": "*i32", **i32, **local,
                                     **c("LABELS", "MEAN", "COMPUTE_RANK", "BLOCK_M", "BLOCK_N", "BLOCK_D",
                                         "PRECISION")},
             dict(LABELS=labels, MEAN=labels, COMPUTE_RANK=True, BLOCK_M=cfg["BLOCK_M"],
                  BLOCK_N=cfg["BLOCK_N"], BLOCK_D=cfg["BLOCK_D"], PRECISION=prec), opts),
            (bwd, {**z, **lab, **f("norm_ptr", "temp_ptr", "stats_ptr", "w_ptr", "g_ptr", "tpart_ptr"),
                   **i32, **local, **c("LABELS", "MEAN", "BLOCK", "BLOCK_D", "PRECISION")},
             dict(LABELS=labels, MEAN=labels, BLOCK=cfg["BLOCK_BWD"], BLOCK_D=cfg["BLOCK_D_BWD"],
                  PRECISION=prec), opts),
        ]
    out.append((K._nt_xent_finish_kernel, {**z, **f("norm_ptr", "temp_ptr", "g_ptr"), "gz1_ptr": "*" + ty,
                                           "gz2_ptr": "*" + ty, **i32, "gstride1": "i32",
                                           "gstride2": "i32", **c("BLOCK_R", "BLOCK_D")},
                dict(BLOCK_R=32, BLOCK_D=min(64, pow2_at_least(d))), {"num_warps": 4, "num_stages": 3}))
    return out


def compile_for(arch: int, fn, sig, cex, opts):
    return triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cex),
                          target=GPUTarget("cuda", arch, 32), options=opts)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.triton_resources", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--dim", type=int, default=128)
    args = p.parse_args(argv)
    if K.INTERPRETED:
        p.error("run with TRITON_INTERPRET=0 (the kernels must be JIT functions, not interpreted)")
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    arch = f"sm_{args.arch}a" if args.arch >= 90 else f"sm_{args.arch}"
    print(f"| dtype | kernel | registers | spill stores (B) | shared memory (B) |  (sm_{args.arch}, D = {args.dim})")
    print("|---|---|---:|---:|---:|")
    for dtype in _TY:
        for fn, sig, cex, opts in jobs(dtype, args.dim):
            k = compile_for(args.arch, fn, sig, cex, opts)
            with tempfile.TemporaryDirectory() as tmp:
                src = os.path.join(tmp, "k.ptx")
                with open(src, "w") as fh:
                    fh.write(k.asm["ptx"])
                err = subprocess.run([ptxas, "-v", f"-arch={arch}", src, "-o", os.path.join(tmp, "k.cubin")],
                                     capture_output=True, text=True).stderr
            regs = re.search(r"Used (\d+) registers", err)
            spill = re.search(r"(\d+) bytes spill stores", err)
            mode = "" if "LABELS" not in cex else (" (labels)" if cex["LABELS"] else " (paired)")
            print(f"| {_TY[dtype]} | {fn.__name__}{mode} | {regs.group(1) if regs else '?'} | "
                  f"{spill.group(1) if spill else '?'} | {k.metadata.shared} |")


if __name__ == "__main__":
    main()
