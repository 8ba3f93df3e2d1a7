#!/usr/bin/env bash
# After a GPU suite run: files of the device call (its files_at folder) -> benchmarks/results/,
# the README's benchmark section regenerated, and one commit of it all.
#
#   bash benchmarks/import_gpu_results.sh FILES_AT [--no-commit]
#
# The results JSON files go to benchmarks/results/ (where python -m benchmarks.report reads
# them); summary.md and the unpacked logs of results.tar.gz go to benchmarks/results/gpu-<date>/.
# Then it prints the Triton-vs-CUDA comparison that OPS[op].cuda_faster (fastclr/_dispatch.py) is
# filled from.
set -euo pipefail
cd "$(dirname "$0")/.."
src="${1:?usage: bash benchmarks/import_gpu_results.sh FILES_AT [--no-commit]}"
[ -f "$src/summary.md" ] || { echo "$src/summary.md not found: not a GPU suite's files"; exit 1; }
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
stamp=$(date -u -r "$src/summary.md" +%Y%m%d-%H%M%S)
dest="benchmarks/results/gpu-$stamp"
mkdir -p "$dest"
cp "$src/summary.md" "$dest/"
if [ -f "$src/results.tar.gz" ]; then
  # logs and training outputs only: the results files come as their own files
  tar -xzf "$src/results.tar.gz" -C "$dest" --exclude='*-cuda-*.json'
fi
shopt -s nullglob
for f in "$src"/*-cuda-*.json; do cp "$f" benchmarks/results/; done
"$PY" -m benchmarks.report
"$PY" - <<'PYEOF'
import json, pathlib
files = sorted(pathlib.Path("benchmarks/results").glob("loss-cuda-*.json"))
if files:
    rows = [r for r in json.loads(files[-1].read_text())["rows"] if r.get("status") == "ok"]
    by = {(r["impl"], r["dtype"], r["M"], r["D"]): r["fwd_bwd_s"] for r in rows if "fwd_bwd_s" in r}
    print(f"\nTriton vs CUDA, forward+backward, {files[-1].name}:")
    for (impl, dtype, m, d), t in sorted(by.items()):
        if impl == "cuda" and ("triton", dtype, m, d) in by:
            tri = by[("triton", dtype, m, d)]
            print(f"  {dtype} M={m} D={d}: triton {tri:.4f} s, cuda {t:.4f} s -> "
                  f"{'cuda' if t < tri else 'triton'} faster ({tri / t:.2f}x)")
    print("fill OPS['nt_xent_fused'].cuda_faster in fastclr/_dispatch.py from these lines")
PYEOF
if [ "${2:-}" != "--no-commit" ]; then
  git add benchmarks/results README.md benchmarks/report
  git commit -q -m "GPU suite results of $stamp (benchmarks/import_gpu_results.sh)" && git log --oneline -1
fi
