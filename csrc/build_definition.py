"""Reads csrc/build.txt, the one build definition (sources, flags, defines, arch default) that
setup.py and tests/test_cuda_build.py share; CMakeLists.txt parses the same file itself."""
from __future__ import annotations

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
