"""The CPU execution harness of fastclr's CUDA kernels.

kernels/*.cu -- host wrappers, launch configurations and device code, exactly as on disk -- are
compiled by the host compiler against this folder's runtime (``cuda_on_cpu.h``: one thread per
CUDA thread, barriers, shuffles, atomics; ``shim/mma.h``: WMMA on the host) into a torch op
library whose ops (``torch.ops.fastclr_cuda_on_cpu.*``, csrc/ops.cpp's schemas) take CPU
tensors. ``load()`` builds it (ninja: only what changed is rebuilt) and hands it to fastclr, after
which ``impl="cuda"`` runs CPU tensors through the CUDA kernels; the tests' "cuda_on_cpu"
backend rows do exactly that.

``FASTCLR_SANITIZE=address`` (AddressSanitizer + UBSan) or ``=thread`` (ThreadSanitizer) builds
an instrumented copy; the process must then have the sanitizer's runtime preloaded: run as a
script, ``python tests/cuda_on_cpu/__init__.py address|thread PYTEST_ARGS...`` starts pytest so
(``make sanitize-address`` / ``sanitize-thread`` do). ``FASTCLR_CUDA_ON_CPU_SOURCE`` names
another tree to take kernels/ and csrc/ from (``mutate.py``'s seeded-bug copies), built in a
folder of its own.
"""
from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
SOURCES = ["ops.cpp", "nt_xent.cpp", "similarity.cpp", "lars.cpp"]  # one per kernels/*.cu
SANITIZERS = {
    "": [],
    "address": ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                "-fno-omit-frame-pointer"],
    "thread": ["-fsanitize=thread"],
}
# What a process running the instrumented harness needs: the sanitizer's runtime preloaded (python
# itself is not instrumented; libstdc++ beside libasan, or ASan's __cxa_throw interceptor finds
# no real one when triton's extension throws) and its options; one OpenMP thread for TSan.
PRELOAD = {"address": ["libasan.so", "libstdc++.so"], "thread": ["libtsan.so"]}
OPTIONS = {"address": {"ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1"},
           "thread": {"TSAN_OPTIONS": "halt_on_error=1", "OMP_NUM_THREADS": "1"}}


@functools.cache
def build_definition():
    """csrc/build_definition.py (the one build definition), loaded from the tree."""
    spec = importlib.util.spec_from_file_location("build_definition", ROOT / "csrc" / "build_definition.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@functools.cache
def cuda_include() -> Path | None:
    """The CUDA toolkit's include folder (cuda_fp16.h, vector_types.h), found as the build finds
    the toolkit. Only headers are used; nothing is compiled by nvcc."""
    toolkit = build_definition().cuda_toolkit()
    if toolkit is not None and (toolkit / "include" / "cuda_fp16.h").exists():
        return toolkit / "include"
    return None


def unavailable() -> str:
    """Why the harness cannot be built here ('' when it can)."""
    if cuda_include() is None:
        return "no CUDA toolkit headers (cuda_fp16.h) found: set CUDA_HOME or put nvcc on PATH"
    return ""


def sanitizer() -> str:
    name = os.environ.get("FASTCLR_SANITIZE", "")
    if name not in SANITIZERS:
        raise ValueError(f"FASTCLR_SANITIZE must be one of {sorted(SANITIZERS)}, got {name!r}")
    return name


def sanitizer_env(name: str) -> dict:
    """The environment variables a process needs to run the harness under sanitizer ``name``."""
    cxx = os.environ.get("CXX", "c++")
    libs = [subprocess.run([cxx, f"-print-file-name={lib}"], check=True, capture_output=True,
                           text=True).stdout.strip() for lib in PRELOAD[name]]
    return {"FASTCLR_SANITIZE": name, "LD_PRELOAD": " ".join(libs), **OPTIONS[name]}


@functools.cache
def load(verbose: bool = False) -> str:
    """Builds (if needed) and loads the harness; returns its library's path."""
    why = unavailable()
    if why:
        raise RuntimeError(f"the CUDA kernels' CPU harness cannot be built: {why}")
    from torch.utils import cpp_extension

    from fastclr import ops

    san = sanitizer()
    suffix = f"_{san}" if san else ""
    source = Path(os.environ.get("FASTCLR_CUDA_ON_CPU_SOURCE", ROOT)).resolve()
    build = source / "build" / f"cuda-on-cpu{suffix}"
    build.mkdir(parents=True, exist_ok=True)
    flags = ["-std=c++20", "-O1", "-g", "-include", "cuda_on_cpu.h", "-isystem", str(cuda_include()),
             "-Wall", "-Wno-unknown-pragmas", "-Wno-unused-function", *SANITIZERS[san]]
    preload = os.environ.pop("LD_PRELOAD", None)  # a sanitizer runtime is for this process only,
    try:                                           # not for the compilers it starts
        path = cpp_extension.load(
            name=f"fastclr_cuda_on_cpu{suffix}", sources=[str(HERE / s) for s in SOURCES],
            extra_include_paths=[str(HERE / "shim"), str(HERE), str(source)], extra_cflags=flags,
            extra_ldflags=["-pthread", *SANITIZERS[san]], build_directory=str(build),
            is_python_module=False, verbose=verbose)
    finally:
        if preload is not None:
            os.environ["LD_PRELOAD"] = preload
    ops.use_cuda_on_cpu(path)
    return path


if __name__ == "__main__":  # python tests/cuda_on_cpu/__init__.py address|thread PYTEST_ARGS...
    import sys
    env = dict(os.environ, **sanitizer_env(sys.argv[1]))
    os.execve(sys.executable, [sys.executable, "-m", "pytest", *sys.argv[2:]], env)
