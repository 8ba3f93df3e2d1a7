"""Reads csrc/build.txt, the one build definition (sources, flags, defines, arch default) that
setup.py, tests/test_cuda_build.py and tests/cuda_on_cpu/resources.py share; CMakeLists.txt
parses the same file itself."""
from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path

PATH = Path(__file__).resolve().parent / "build.txt"
LIST_KEYS = ("cpu", "cuda")  # one path per line
WORD_KEYS = ("cxx-flags", "link-flags", "nvcc-flags", "cuda-defines", "cuda-archs")


def read(path: Path = PATH) -> dict:
    """{key: [values]} for every key of the file (sources as paths, the rest split on spaces)."""
    out = {key: [] for key in LIST_KEYS + WORD_KEYS}
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        key, sep, value = (part.strip() for part in line.partition(":"))
        if not sep or key not in out:
            raise ValueError(f"{path}:{number}: expected one of {', '.join(out)} then ':', got {raw!r}")
        out[key] += [value] if key in LIST_KEYS else value.split()
    return out


def arch_list(definition: dict) -> str:
    """TORCH_CUDA_ARCH_LIST's form of the default archs: "8.0;9.0"."""
    return ";".join(definition["cuda-archs"])


def cuda_toolkit() -> Path | None:
    """The CUDA toolkit's root: CUDA_HOME or CUDA_PATH when set, else found next to nvcc -- nvcc
    can sit outside its toolkit (/usr/local/bin/nvcc with /usr/local/cuda beside it), where
    torch's own guess misses libcudart. None without either."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return Path(os.environ[var])
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    prefix = Path(nvcc).resolve().parent.parent
    for candidate in (prefix, prefix / "cuda", Path(nvcc).parent.parent / "cuda"):
        if (candidate / "include" / "cuda_runtime.h").exists():
            return candidate
    return None


def nvcc_command(definition: dict, source: Path, out: Path) -> list:
    """The nvcc line setup.py's build runs for ``source`` (torch's BuildExtension: its -std and
    COMMON_NVCC_FLAGS, then build.txt's nvcc flags, defines and archs)."""
    from torch.utils import cpp_extension

    includes = [f"-I{p}" for p in cpp_extension.include_paths()] + [f"-I{sysconfig.get_paths()['include']}"]
    archs = [f"-gencode=arch=compute_{a.replace('.', '')},code=sm_{a.replace('.', '')}"
             for a in definition["cuda-archs"]]
    return [shutil.which("nvcc"), "-c", str(source), "-o", str(out), "-std=c++20", "-Xcompiler", "-fPIC",
            *cpp_extension.COMMON_NVCC_FLAGS, *definition["nvcc-flags"],
            *(f"-D{d}" for d in definition["cuda-defines"]), *archs, *includes]
