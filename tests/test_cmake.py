"""CMakeLists.txt builds the same sources against libtorch, and the C++ tests pass."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import cuda_on_cpu

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_cmake_build_and_cpp_tests(tmp_path):
    if shutil.which("cmake") is None:
        pytest.skip("cmake not installed")
    # The C++ tests exercise the CPU kernels; a CUDA build through libtorch's CMake config
    # needs a full toolkit (nvrtc, cuDNN, ...), and kernels/*.cu compile in test_cuda_build.py.
    args = ["cmake", "-S", str(ROOT), "-B", str(tmp_path), "-G", "Unix Makefiles",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}", "-DFASTCLR_CUDA=OFF"]
    env = dict(os.environ)
    if torch.version.cuda:  # a CUDA build of libtorch: its CMake config wants the toolkit
        toolkit = cuda_on_cpu.build_definition().cuda_toolkit()
        if toolkit is None:
            pytest.skip("this torch is a CUDA build and no CUDA toolkit was found for its CMake config")
        args.append(f"-DCUDA_TOOLKIT_ROOT_DIR={toolkit}")
        env.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    for cmd in (args, ["cmake", "--build", str(tmp_path), "-j2"],
                ["ctest", "--test-dir", str(tmp_path), "--output-on-failure"]):
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}"
    report = subprocess.run([str(tmp_path / "fastclr_cpp_tests")], capture_output=True, text=True)
    assert report.returncode == 0 and " 0 failed" in report.stdout, report.stdout
