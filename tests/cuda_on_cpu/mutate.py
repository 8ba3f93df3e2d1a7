"""Evidence that the CUDA kernels' CPU harness catches bugs: seeds one bug at a time into a copy
of kernels/ and csrc/, builds the harness from the copy and runs a quick selection of the
"cuda_on_cpu" checks on it. Every mutant must be caught (a check fails, or the harness aborts
naming the defect); a mutant that survives is a hole in the tests. Not part of CI (about a
minute a mutant on two cores):

    .venv/bin/python tests/cuda_on_cpu/mutate.py [NAME ...]     # default: every mutant

A mutant marked for a sanitizer runs its checks under it (a race shows there first).
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
# every kernel, both positive modes, local rows, all dtypes, more than one tile and K chunk
CHECKS = ("-m cuda_on_cpu -x -q -s -p no:cacheprovider -k "
          "'(test_float32_matches_reference and (37x130 or 100x64) and 0.1) or "
          "(test_half_inputs and 37-19) or (test_supcon and test_matches_reference and 130x64) or "
          "test_local_rows or test_accuracy or (test_similarity_forward_backward and 65x200x100) or "
          "test_similarity_half or test_matches_the_equations or test_found_inf'")


@dataclass
class Mutant:
    name: str
    kind: str  # the kind of bug, as the issue lists them
    path: str
    old: str
    new: str
    sanitizer: str = ""


MUTANTS = [
    Mutant("no-barrier-after-staging", "a dropped barrier", "kernels/mma_tiles.cuh",
           "    stage_rows<scalar_t>(b_s, z1, z2, rows_j, n, d, k0);\n    __syncthreads();\n",
           "    stage_rows<scalar_t>(b_s, z1, z2, rows_j, n, d, k0);\n"),
    Mutant("no-barrier-after-staging-tsan", "a dropped barrier (ThreadSanitizer)", "kernels/mma_tiles.cuh",
           "    stage_rows<scalar_t>(b_s, z1, z2, rows_j, n, d, k0);\n    __syncthreads();\n",
           "    stage_rows<scalar_t>(b_s, z1, z2, rows_j, n, d, k0);\n", sanitizer="thread"),
    Mutant("k-bound-off-by-one", "an off-by-one bound", "kernels/mma_tiles.cuh",
           "if (rows[r] >= 0 && k < d)", "if (rows[r] >= 0 && k <= d)"),
    # stages one row past the block's last (its scores unused): an out-of-bounds read at the end
    # of z2, which only AddressSanitizer sees
    Mutant("row-end-off-by-one", "an off-by-one bound", "kernels/nt_xent.cu",
           "rows_i[threadIdx.x] = r < row_end ? r : -1;", "rows_i[threadIdx.x] = r <= row_end ? r : -1;",
           sanitizer="address"),
    Mutant("pair-shuffle-offset", "a wrong shuffle offset", "kernels/nt_xent.cu",
           "return v + __shfl_xor_sync(0xffffffffu, v, 1);", "return v + __shfl_xor_sync(0xffffffffu, v, 2);"),
    Mutant("reduction-shuffle-offset", "a wrong shuffle offset", "kernels/lars.cu",
           "ws += __shfl_xor_sync(0xffffffffu, ws, o);", "ws += __shfl_xor_sync(0xffffffffu, ws, 2 * o);"),
    Mutant("smem-padding", "a wrong shared-memory padding", "kernels/mma_tiles.cuh",
           "constexpr int kPad = 8;", "constexpr int kPad = 4;"),
    Mutant("diagonal-tile-twice", "a tile pair visited twice", "kernels/nt_xent.cu",
           "  if (bi != bj) {\n    grad_product", "  if (true) {\n    grad_product"),
    Mutant("tile-pairs-below-diagonal", "a tile pair visited twice", "kernels/nt_xent.cu",
           "  if (bi > bj) return;", "  if (bi > bj + 1) return;"),
    Mutant("tf32-split-lost", "a wrong operand split", "kernels/mma_tiles.cuh",
           "fa_lo.x[e] = wmma::__float_to_tf32(x - fa.x[e]);", "fa_lo.x[e] = 0.f;"),
    Mutant("tf32-split-sign", "a wrong operand split", "kernels/mma_tiles.cuh",
           "fb_lo.x[e] = wmma::__float_to_tf32(x - fb.x[e]);", "fb_lo.x[e] = wmma::__float_to_tf32(fb.x[e] - x);"),
    Mutant("epilogue-write-out-of-bounds", "an out-of-bounds write", "kernels/similarity.cu",
           "if (i < m && j < k) out[i * k + j]", "if (i < m && j <= k) out[i * k + j]", sanitizer="address"),
    Mutant("forward-grid-drops-partial-tile", "a wrong launch configuration", "kernels/nt_xent.cu",
           "const int64_t blocks = (with_labels ? 1 : 2) * ((count + kTile - 1) / kTile);",
           "const int64_t blocks = (with_labels ? 1 : 2) * (count / kTile);"),
    Mutant("lars-chunk-table-overrun", "a wrong launch table", "kernels/lars.cu",
           "host.insert(host.end(), {i, b, std::min(n, b + kLarsChunk)});",
           "host.insert(host.end(), {i, b, b + kLarsChunk});", sanitizer="address"),
    Mutant("early-return-before-barrier", "a divergent barrier", "kernels/nt_xent.cu",
           "  const bool row_ok = gi < row_end;\n", "  const bool row_ok = gi < row_end;\n  if (!row_ok) return;\n"),
]

def seed(mutant: Mutant, tree: Path) -> None:
    for folder in ("kernels", "csrc"):
        shutil.copytree(ROOT / folder, tree / folder)
    path = tree / mutant.path
    text = path.read_text()
    if text.count(mutant.old) != 1:
        raise SystemExit(f"{mutant.name}: the pattern occurs {text.count(mutant.old)} times in {mutant.path}, not once")
    path.write_text(text.replace(mutant.old, mutant.new))


def run(mutant: Mutant, tree: Path) -> tuple[bool, str]:
    env = dict(os.environ, FASTCLR_CUDA_ON_CPU_SOURCE=str(tree), FASTCLR_CUDA_ON_CPU_TIMEOUT="60")
    if mutant.sanitizer:
        sys.path.insert(0, str(HERE.parent))
        import cuda_on_cpu
        env.update(cuda_on_cpu.sanitizer_env(mutant.sanitizer))
    out = subprocess.run([sys.executable, "-m", "pytest", "tests", *shlex.split(CHECKS)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=3600)
    text = out.stdout + out.stderr
    if "Error building extension" in text:
        return False, "the mutant does not compile (pick another mutation)"
    lines = text.splitlines()
    said = [ln for ln in lines if ln.startswith(("cuda_on_cpu:", "FAILED", "WARNING: ThreadSanitizer",
                                                  "SUMMARY: AddressSanitizer", "SUMMARY: UndefinedBehavior"))]
    return out.returncode != 0, (said[0] if said else lines[-1] if lines else "")[:150]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="*", help="mutants to run (default: all)")
    args = parser.parse_args()
    chosen = [m for m in MUTANTS if not args.names or m.name in args.names]
    survived = 0
    print(f"{'mutant':32} {'kind':34} {'caught':7} {'s':>5}  by")
    for mutant in chosen:
        start = time.time()
        with tempfile.TemporaryDirectory(prefix=f"mutant-{mutant.name}-") as tmp:
            seed(mutant, Path(tmp))
            caught, how = run(mutant, Path(tmp))
        survived += not caught
        print(f"{mutant.name:32} {mutant.kind:34} {'yes' if caught else 'NO':7} {time.time() - start:5.0f}  {how}",
              flush=True)
    print(f"{len(chosen) - survived} of {len(chosen)} mutants caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
