"""The Triton kernels compile ahead of time for sm_80 and sm_90 with the launch configurations
`_config` picks, and fit the architecture's shared memory: GPU compile errors (which triton's
interpreter never sees) fail CI on a machine without a GPU."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

triton = pytest.importorskip("triton")

SCRIPT = textwrap.dedent('''
    import json, sys, torch
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    import triton
    import fastclr.triton.nt_xent as K

    arch, dtype_name, d = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    dtype = getattr(torch, dtype_name)
    ty = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}[dtype_name]
    cfg = K._config(65536, d, dtype, interpret=False)
    prec = K._precision(dtype)
    z = dict(z1_ptr="*" + ty, z2_ptr="*" + ty)
    i32 = dict(N="i32", D="i32", stride1="i32", stride2="i32")
    f = lambda *names: {n: "*fp32" for n in names}
    c = lambda *names: {n: "constexpr" for n in names}
    jobs = [
        (K._nt_xent_norm_kernel, {**z, **f("norm_ptr"), **i32, **c("BLOCK_R", "BLOCK_D")},
         dict(BLOCK_R=64, BLOCK_D=min(128, K._pow2_at_least(d))), 4, 3),
        (K._nt_xent_fwd_kernel, {**z, **f("norm_ptr", "temp_ptr", "loss_ptr", "lse_ptr"),
                                 "rank_ptr": "*i32", **i32,
                                 **c("COMPUTE_RANK", "BLOCK_M", "BLOCK_N", "BLOCK_D", "PRECISION")},
         dict(COMPUTE_RANK=True, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
              BLOCK_D=cfg["BLOCK_D"], PRECISION=prec), cfg["num_warps"], cfg["num_stages"]),
        (K._nt_xent_bwd_rows_kernel if cfg["ROWS_BWD"] else K._nt_xent_bwd_pairs_kernel,
         {**z, **f("norm_ptr", "temp_ptr", "lse_ptr", "w_ptr", "g_ptr", "tpart_ptr"), **i32,
          **c("BLOCK", "BLOCK_D", "PRECISION")},
         dict(BLOCK=cfg["BLOCK_BWD"], BLOCK_D=cfg["BLOCK_D_BWD"], PRECISION=prec),
         cfg["num_warps"], cfg["num_stages"]),
        (K._nt_xent_finish_kernel, {**z, **f("norm_ptr", "temp_ptr", "w_ptr", "g_ptr"),
                                    "gz1_ptr": "*" + ty, "gz2_ptr": "*" + ty, **f("ppart_ptr"),
                                    **i32, "gstride1": "i32", "gstride2": "i32",
                                    **c("BLOCK_R", "BLOCK_D")},
         dict(BLOCK_R=32, BLOCK_D=min(64, K._pow2_at_least(d))), 4, 3),
    ]
    out = []
    for fn, sig, cex, warps, stages in jobs:
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=cex),
                           target=GPUTarget("cuda", arch, 32),
                           options={"num_warps": warps, "num_stages": stages})
        out.append({"kernel": fn.__name__, "shared": k.metadata.shared})
    print(json.dumps(out))
''')

# Shared memory per block, opt-in maximum: A100 (sm_80) 163 KiB, H100 (sm_90) 227 KiB.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@pytest.mark.slow
@pytest.mark.parametrize("arch,dtype,d", [
    (90, "bfloat16", 128), (90, "float16", 128), (90, "float32", 128),
    (90, "bfloat16", 2048), (90, "float32", 2048), (90, "bfloat16", 19),
    (80, "bfloat16", 128), (80, "float32", 128),
])
def test_triton_kernels_compile_for_gpu(arch, dtype, d):
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, str(arch), dtype, str(d)],
                         capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-5000:]
    for k in json.loads(out.stdout.strip().splitlines()[-1]):
        assert k["shared"] <= SMEM_LIMIT[arch], f"{k['kernel']} needs {k['shared']} B of shared memory on sm_{arch}"
