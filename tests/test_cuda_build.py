"""Every kernels/*.cu compiles for the default archs with the shipped flags (csrc/build.txt,
after torch's own nvcc defaults) and every warning an error: the only flags this adds are the
warnings-as-errors ones and ptxas's resource report (-v), which must show no register spills
and shared memory within each arch's limits (the dynamic part from the CPU harness's log of the
host wrappers' own launches). No GPU needed."""
import functools
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

import cuda_on_cpu
from cuda_on_cpu import resources

ROOT = Path(__file__).resolve().parent.parent
build_definition = cuda_on_cpu.build_definition()
BUILD = build_definition.read()
WERROR = ["-Werror", "all-warnings", "-Xcompiler", "-Wall,-Werror"]
needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine")


@functools.cache
def _every_compile() -> dict:
    """{source: (returncode, output)} of the shipped nvcc line for every kernels/*.cu, warnings as
    errors, with ptxas's resource report: compiled once per test session, side by side (each nvcc
    is one process, mostly one core; three one after another took 3 of the suite's minutes)."""
    sources = BUILD["cuda"]
    with ThreadPoolExecutor(max_workers=max(1, min(len(sources), os.cpu_count() or 1))) as pool:
        results = pool.map(lambda source: resources.shipped_compile(ROOT / source, tuple(WERROR)), sources)
        return dict(zip(sources, results))


def shipped_compile(source: str):
    return _every_compile()[source]


def test_every_cuda_source_is_in_the_build_definition():
    assert sorted(BUILD["cuda"]) == sorted(str(p.relative_to(ROOT)) for p in (ROOT / "kernels").glob("*.cu"))


@pytest.mark.slow
@needs_nvcc
@pytest.mark.parametrize("source", BUILD["cuda"])
def test_cuda_source_compiles_without_warnings(source):
    code, text = shipped_compile(source)
    assert code == 0, text[-6000:]
    kernels = resources.parse_ptxas(text)
    assert kernels, "ptxas reported no kernel"
    assert {arch for _, arch in kernels} == {a.replace(".", "") for a in BUILD["cuda-archs"]}


@pytest.mark.slow
@needs_nvcc
@pytest.mark.skipif(bool(cuda_on_cpu.unavailable()), reason=cuda_on_cpu.unavailable())
def test_kernels_do_not_spill_and_fit_shared_memory():
    """kernels/README.md's resource table, checked: tests/cuda_on_cpu/resources.py's rows."""
    launches = resources.launch_report()
    rows = []
    for source in BUILD["cuda"]:
        code, text = shipped_compile(source)
        assert code == 0, text[-6000:]
        rows += resources.rows_of(source, resources.parse_ptxas(text), launches)
    assert len(rows) >= 2 * 19, [r["kernel"] for r in rows]  # every instantiation, both archs
    assert resources.check(rows) == []


def test_resource_check_flags_spills_and_oversized_shared_memory():
    row = dict(kernel="k", arch="80", threads=128, regs=64, smem=1024, dynamic_smem=1000, stack=0,
               spill_stores=0, spill_loads=0)
    assert resources.check([row]) == []
    assert "spills" in resources.check([{**row, "spill_stores": 8}])[0]
    assert "over A100's" in resources.check([{**row, "dynamic_smem": 166912}])[0]
    assert "static shared memory" in resources.check([{**row, "smem": 49 * 1024}])[0]
    assert "never launched" in resources.check([{**row, "threads": 0}])[0]
    assert resources.occupancy(resources.ARCHS["80"], 32, 0, 0, 128) == (1.0, "warps")
    assert resources.occupancy(resources.ARCHS["80"], 64, 0, 0, 128) == (0.5, "registers")
    occ, limit = resources.occupancy(resources.ARCHS["80"], 128, 1024, 100 * 1024, 128)
    assert (occ, limit) == (4 / 64, "shared memory")


def test_every_launch_goes_through_launch_kernel():
    """The two builds differ only in kernels/cuda_utils.cuh: no other file launches with <<<>>>,
    touches a CUDA stream, guard or attribute, or branches on the build."""
    for path in sorted((ROOT / "kernels").glob("*.cu*")):
        if path.name == "cuda_utils.cuh":
            continue
        text = path.read_text()
        for banned in ("<<<", "c10::cuda", "cudaFuncSetAttribute", "FASTCLR_CUDA_ON_CPU", "extern __shared__"):
            assert banned not in text, f"{path.name} uses {banned!r}: go through cuda_utils.cuh"
