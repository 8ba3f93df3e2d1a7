"""Builds fastclr._C: the C++ ops of csrc/ and, when a CUDA toolkit is present, kernels/*.cu.

Sources, flags, defines and the default archs come from csrc/build.txt, the one build definition
that CMakeLists.txt and the CUDA compile test read too. Environment: FASTCLR_CUDA=0 skips the
CUDA sources; FASTCLR_EXT=0 skips the extension altogether (a pure-Python install: the reference
and the Triton kernels), and where it cannot be built (no C++ compiler) the install goes on
without it, saying why, unless FASTCLR_EXT=1 demands it; TORCH_CUDA_ARCH_LIST picks the archs
(default: build.txt's); CUDA_HOME is found next to nvcc when unset; MAX_JOBS bounds ninja.
Beside the extension, fastclr/_C.json records the torch it was built against (fastclr refuses
to load it under another torch) or why it was not built.
"""
import importlib.util
import json
import os
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent


def build_definition():
    spec = importlib.util.spec_from_file_location("build_definition", ROOT / "csrc" / "build_definition.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def extensions():
    if os.environ.get("FASTCLR_EXT") == "0":
        return [], None
    bd = build_definition()
    toolkit = bd.cuda_toolkit()  # before torch's cpp_extension reads CUDA_HOME
    if toolkit is not None:
        os.environ.setdefault("CUDA_HOME", str(toolkit))
    build = bd.read()
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", bd.arch_list(build))
    from torch.utils import cpp_extension

    want_cuda = os.environ.get("FASTCLR_CUDA", "1") != "0" and bool(build["cuda"])
    with_cuda = want_cuda and cpp_extension.CUDA_HOME is not None
    kwargs = dict(
        name="fastclr._C",
        sources=build["cpu"] + ["csrc/bindings.cpp"],
        extra_compile_args={"cxx": build["cxx-flags"]},
        extra_link_args=build["link-flags"],
    )
    if not with_cuda:
        return [cpp_extension.CppExtension(**kwargs)], cpp_extension.BuildExtension
    kwargs["sources"] += build["cuda"]
    kwargs["define_macros"] = [(name, None) for name in build["cuda-defines"]]  # .cpp and .cu alike
    kwargs["extra_compile_args"]["nvcc"] = build["nvcc-flags"]
    return [cpp_extension.CUDAExtension(**kwargs)], cpp_extension.BuildExtension


ext_modules, BuildExtension = extensions()
if BuildExtension is None:  # FASTCLR_EXT=0: pure Python
    setup()
else:
    class BuildInTree(BuildExtension):
        """Objects always go to build/temp, also for `pip install -e` (which otherwise uses a fresh
        temporary folder): ninja then rebuilds only what changed, whoever asks for the build. A
        build that fails installs fastclr without its extension, unless FASTCLR_EXT=1."""

        def finalize_options(self):
            super().finalize_options()
            self.build_temp = str(ROOT / "build" / "temp")

        def run(self):
            import torch
            status = {"torch": torch.__version__}
            try:
                super().run()
            except Exception as exc:  # no compiler, a failed compile
                if os.environ.get("FASTCLR_EXT") == "1":
                    raise
                status = {"error": f"the extension could not be built at install time ({type(exc).__name__}: {exc})"}
                print(f"fastclr: WARNING: installing without the compiled extension: {status['error']}")
            info = Path(self.get_ext_fullpath("fastclr._C")).parent / "_C.json"
            info.parent.mkdir(parents=True, exist_ok=True)
            info.write_text(json.dumps(status) + "\n")

    setup(ext_modules=ext_modules, cmdclass={"build_ext": BuildInTree.with_options(use_ninja=True)})
