"""Builds fastclr._C: the C++ ops of csrc/ and, when a CUDA toolkit is present, kernels/*.cu.

Sources come from csrc/sources.txt, the list CMakeLists.txt reads too.
Environment: FASTCLR_CUDA=0 skips the CUDA sources; TORCH_CUDA_ARCH_LIST picks the archs
(default "8.0;9.0"); CUDA_HOME is found next to nvcc when unset; MAX_JOBS bounds ninja.
"""
import os
import shutil
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def read_sources():
    sources = {"cpu": [], "cuda": []}
    for raw in (ROOT / "csrc" / "sources.txt").read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        kind, _, path = line.partition(":")
        sources[kind.strip()].append(path.strip())
    return sources


def guess_cuda_home():
    """nvcc can sit outside its toolkit (/usr/local/bin/nvcc with /usr/local/cuda beside it);
    torch's own guess then misses libcudart, so look for the toolkit next to nvcc first."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return
    prefix = Path(nvcc).resolve().parent.parent
    for candidate in (prefix, prefix / "cuda", Path(nvcc).parent.parent / "cuda"):
        if (candidate / "include" / "cuda_runtime.h").exists():
            os.environ["CUDA_HOME"] = str(candidate)
            return


def extensions():
    guess_cuda_home()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    from torch.utils import cpp_extension

    sources = read_sources()
    want_cuda = os.environ.get("FASTCLR_CUDA", "1") != "0" and bool(sources["cuda"])
    with_cuda = want_cuda and cpp_extension.CUDA_HOME is not None
    cxx = ["-O3", "-fopenmp", "-Wall", "-Wno-unknown-pragmas"]
    kwargs = dict(
        name="fastclr._C",
        sources=sources["cpu"] + ["csrc/bindings.cpp"],
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )
    if with_cuda:
        kwargs["sources"] += sources["cuda"]
        kwargs["define_macros"] = [("FASTCLR_WITH_CUDA", None)]
        kwargs["extra_compile_args"]["cxx"].append("-DFASTCLR_WITH_CUDA")
        kwargs["extra_compile_args"]["nvcc"] = ["-O3", "--use_fast_math", "-lineinfo",
                                                "-DFASTCLR_WITH_CUDA"]
        return [cpp_extension.CUDAExtension(**kwargs)], cpp_extension.BuildExtension
    return [cpp_extension.CppExtension(**kwargs)], cpp_extension.BuildExtension


ext_modules, BuildExtension = extensions()


class BuildInTree(BuildExtension):
    """Objects always go to build/temp, also for `pip install -e` (which otherwise uses a fresh
    temporary folder): ninja then rebuilds only what changed, whoever asks for the build."""

    def finalize_options(self):
        super().finalize_options()
        self.build_temp = str(ROOT / "build" / "temp")


setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildInTree.with_options(use_ninja=True)})
