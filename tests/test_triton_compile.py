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
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent('''
    import json, sys, torch
    from benchmarks.triton_resources import compile_for, jobs
    arch, dtype, d = int(sys.argv[1]), getattr(torch, sys.argv[2]), int(sys.argv[3])
    print(json.dumps([{"kernel": fn.__name__, "shared": compile_for(arch, fn, sig, cex, opts).metadata.shared}
                      for fn, sig, cex, opts in jobs(dtype, d)]))
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
                         capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-5000:]
    for k in json.loads(out.stdout.strip().splitlines()[-1]):
        assert k["shared"] <= SMEM_LIMIT[arch], f"{k['kernel']} needs {k['shared']} B of shared memory on sm_{arch}"
