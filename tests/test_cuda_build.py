"""Every kernels/*.cu compiles for the default archs with the shipped flags (csrc/build.txt,
after torch's own nvcc defaults) and every warning an error: the only flags this adds are the
warnings-as-errors ones. No GPU needed."""
import importlib.util
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("build_definition", ROOT / "csrc" / "build_definition.py")
build_definition = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_definition)
BUILD = build_definition.read()
WERROR = ["-Werror", "all-warnings", "-Xcompiler", "-Wall,-Werror"]


def shipped_nvcc_command(source: Path, out: Path) -> list:
    """The nvcc line setup.py's build runs for ``source`` (torch's BuildExtension: its -std and
    COMMON_NVCC_FLAGS, then build.txt's nvcc flags, defines and archs)."""
    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    archs = [f"-gencode=arch=compute_{a.replace('.', '')},code=sm_{a.replace('.', '')}"
             for a in BUILD["cuda-archs"]]
    return [shutil.which("nvcc"), "-c", str(source), "-o", str(out), "-std=c++20", "-Xcompiler", "-fPIC",
            *cpp_extension.COMMON_NVCC_FLAGS, *BUILD["nvcc-flags"],
            *(f"-D{d}" for d in BUILD["cuda-defines"]), *archs, *includes]


def test_every_cuda_source_is_in_the_build_definition():
    assert sorted(BUILD["cuda"]) == sorted(str(p.relative_to(ROOT)) for p in (ROOT / "kernels").glob("*.cu"))


@pytest.mark.slow
@pytest.mark.parametrize("source", BUILD["cuda"])
def test_cuda_source_compiles_without_warnings(source, tmp_path):
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc on this machine")
    out = subprocess.run(shipped_nvcc_command(ROOT / source, tmp_path / "k.o") + WERROR,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-6000:]
