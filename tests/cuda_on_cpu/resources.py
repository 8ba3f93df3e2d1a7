"""What the hardware will say of each CUDA kernel, without the hardware: registers, spills, stack,
static shared memory (ptxas's report of the shipped compile, per arch), the dynamic shared memory
and block size its launches ask for (the CPU harness's log of the host wrappers' real launches),
and the theoretical occupancy those give on an A100 (sm_80) and an H100 (sm_90).

    .venv/bin/python tests/cuda_on_cpu/resources.py            # print the table
    .venv/bin/python tests/cuda_on_cpu/resources.py --write    # and put it in kernels/README.md

tests/test_cuda_build.py checks the same report on every run: no spills, shared memory within
the arch's limits.
"""
from __future__ import annotations

import argparse
import ctypes
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))
from cuda_on_cpu import build_definition  # noqa: E402  (run as a script too)
README = ROOT / "kernels" / "README.md"
BEGIN, END = "<!-- resources:begin -->", "<!-- resources:end -->"


@dataclass(frozen=True)
class Arch:
    """An SM's limits (CUDA C Programming Guide, compute capabilities table)."""
    gpu: str
    smem_per_sm: int      # bytes of shared memory an SM can give its blocks
    smem_per_block: int   # the opt-in maximum of one block (static + dynamic)
    reserved: int = 1024  # shared memory the system reserves per block
    regs_per_sm: int = 65536
    reg_unit: int = 256   # registers are allocated per warp in units of 256
    max_warps: int = 64
    max_blocks: int = 32


ARCHS = {"80": Arch("A100", 167936, 166912), "90": Arch("H100", 233472, 232448)}
STATIC_SMEM_LIMIT = 48 * 1024


def plain_name(demangled: str) -> str:
    """A kernel's demangled name with its anonymous namespace spelled alike for g++ and nvcc."""
    name = re.sub(r"_GLOBAL__N__\w+::", "", demangled).replace("(anonymous namespace)::", "")
    return name.split("(", 1)[0].removeprefix("void ")


def demangle(names: list[str]) -> list[str]:
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


PTXAS_ENTRY = re.compile(r"Compiling entry function '(\w+)' for 'sm_(\d+)'")
PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
PTXAS_USED = re.compile(r"Used (\d+) registers(?:.*?, (\d+) bytes smem)?")


def parse_ptxas(text: str) -> dict:
    """{(kernel, arch): {regs, smem, stack, spill_stores, spill_loads}} from ptxas -v output."""
    out, key = {}, None
    for line in text.splitlines():
        if m := PTXAS_ENTRY.search(line):
            key = (m.group(1), m.group(2))
            out[key] = {"regs": 0, "smem": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0}
        elif key and (m := PTXAS_FRAME.search(line)):
            out[key].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif key and (m := PTXAS_USED.search(line)):
            out[key].update(regs=int(m.group(1)), smem=int(m.group(2) or 0))
    names = demangle([k for k, _ in out])
    return {(plain_name(n), arch): v for n, ((_, arch), v) in zip(names, out.items())}


def shipped_compile(source: Path, extra: tuple = ()) -> tuple[int, str]:
    """(return code, compiler output) of the shipped nvcc line for ``source`` (every arch) with
    ptxas's resource report and ``extra`` flags."""
    bd = build_definition()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = bd.nvcc_command(bd.read(), source, Path(tmp) / "k.o") + ["-Xptxas", "-v", *extra]
        out = subprocess.run(cmd, capture_output=True, text=True)
    return out.returncode, out.stdout + out.stderr


def ptxas_report(source: Path) -> dict:
    """ptxas's resource report of ``source`` as the shipped build compiles it (every arch)."""
    code, text = shipped_compile(source)
    if code != 0:
        raise RuntimeError(f"nvcc failed on {source}:\n{text[-4000:]}")
    return parse_ptxas(text)


def exercise_kernels() -> None:
    """Calls every op through the harness with inputs that reach every kernel instantiation."""
    import torch

    import fastclr
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        z1, z2 = (torch.randn(70, 40).to(dtype).requires_grad_() for _ in range(2))
        loss, _ = fastclr.nt_xent_fused(z1, z2, 0.2, impl="cuda", return_accuracy=True)
        loss.backward()
        z = torch.randn(70, 40).to(dtype).requires_grad_()
        loss, _ = fastclr.supcon_fused(z, torch.arange(70) % 5, 0.2, impl="cuda", return_accuracy=True)
        loss.backward()
        fastclr.normalized_similarity(torch.randn(5, 9).to(dtype), torch.randn(7, 9).to(dtype), impl="cuda")
        p = torch.nn.Parameter(torch.randn(100).to(dtype))
        p.grad = torch.randn_like(p)
        for exclude in (False, True):
            fastclr.LARS([{"params": [p], "exclude": exclude}], lr=0.1, impl="cuda").step()


def launch_report() -> dict:
    """{kernel: (threads, dynamic smem)} of the launches the host wrappers made in the harness."""
    import cuda_on_cpu
    path = cuda_on_cpu.load()
    exercise_kernels()
    lib = ctypes.CDLL(path)
    size = lib.fastclr_cuda_on_cpu_launches(None, 0)
    buf = ctypes.create_string_buffer(size)
    lib.fastclr_cuda_on_cpu_launches(buf, size)
    rows = [tuple(int(x) for x in line.split()) for line in buf.value.decode().splitlines()]
    symbols = {}
    table = subprocess.run(["nm", "--defined-only", path], capture_output=True, text=True, check=True).stdout
    for line in table.splitlines():
        address, _, name = line.split(maxsplit=2)
        symbols.setdefault(int(address, 16), name)
    names = demangle([symbols[offset] for offset, _, _ in rows])
    return {plain_name(n): (threads, smem) for n, (_, threads, smem) in zip(names, rows)}


def occupancy(arch: Arch, regs: int, static_smem: int, dynamic_smem: int, threads: int) -> tuple[float, str]:
    """Theoretical occupancy (resident warps / max warps) and what limits it."""
    warps = -(-threads // 32)
    regs_per_warp = -(-regs * 32 // arch.reg_unit) * arch.reg_unit
    by = {"warps": arch.max_warps // warps, "blocks": arch.max_blocks,
          "registers": (arch.regs_per_sm // regs_per_warp) // warps if regs_per_warp else arch.max_blocks}
    smem = static_smem + dynamic_smem + arch.reserved
    by["shared memory"] = arch.smem_per_sm // (-(-smem // 128) * 128)
    limit = min(by, key=by.get)
    return by[limit] * warps / arch.max_warps, limit


def rows_of(source: str, kernels: dict, launches: dict) -> list[dict]:
    """The table's rows of one source: its ptxas report joined with the harness's launches."""
    rows = []
    for (kernel, arch), r in sorted(kernels.items()):
        threads, dyn = launches.get(kernel, (0, 0))
        occ, limit = occupancy(ARCHS[arch], r["regs"], r["smem"], dyn, threads) if threads else (0.0, "not launched")
        rows.append(dict(source=source, kernel=kernel.replace("fastclr::", ""), arch=arch, threads=threads,
                         dynamic_smem=dyn, occupancy=occ, limit=limit, **r))
    return rows


def report() -> list[dict]:
    launches = launch_report()
    sources = build_definition().read()["cuda"]
    return [row for s in sources for row in rows_of(s, ptxas_report(ROOT / s), launches)]


def check(rows: list[dict]) -> list[str]:
    """What the hardware would refuse or pay for: spills, shared memory over a limit, a kernel
    the harness never launched (its launch configuration unknown)."""
    bad = []
    for r in rows:
        arch = ARCHS[r["arch"]]
        where = f"{r['kernel']} (sm_{r['arch']})"
        if r["spill_stores"] or r["spill_loads"]:
            bad.append(f"{where} spills registers: {r['spill_stores']} B stores, {r['spill_loads']} B loads")
        if r["smem"] > STATIC_SMEM_LIMIT:
            bad.append(f"{where} has {r['smem']} B of static shared memory, over {STATIC_SMEM_LIMIT}")
        if r["smem"] + r["dynamic_smem"] > arch.smem_per_block:
            bad.append(f"{where} needs {r['smem'] + r['dynamic_smem']} B of shared memory, over {arch.gpu}'s "
                       f"{arch.smem_per_block} a block")
        if not r["threads"]:
            bad.append(f"{where} was never launched by the harness")
    return bad


def nvcc_version() -> str:
    out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+)", out)
    return m.group(1) if m else "?"


def table(rows: list[dict]) -> str:
    head = (f"Generated by `tests/cuda_on_cpu/resources.py` (nvcc {nvcc_version()}, the shipped flags).\n\n"
            "| kernel | sm | threads | registers | spills (B st/ld) | stack B | static smem B | "
            "dynamic smem B | occupancy | limited by |\n|---|---|---|---|---|---|---|---|---|---|\n")
    body = "".join(
        f"| `{r['kernel']}` | {r['arch']} ({ARCHS[r['arch']].gpu}) | {r['threads']} | {r['regs']} | "
        f"{r['spill_stores']}/{r['spill_loads']} | {r['stack']} | {r['smem']} | {r['dynamic_smem']} | "
        f"{r['occupancy']:.0%} | {r['limit']} |\n" for r in rows)
    return head + body


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", action="store_true", help=f"replace the table in {README.relative_to(ROOT)}")
    args = parser.parse_args()
    rows = report()
    text = table(rows)
    print(text)
    if args.write:
        readme = README.read_text()
        before, rest = readme.split(BEGIN, 1)
        README.write_text(before + BEGIN + "\n" + text + END + rest.split(END, 1)[1])
    bad = check(rows)
    for line in bad:
        print("PROBLEM:", line)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
