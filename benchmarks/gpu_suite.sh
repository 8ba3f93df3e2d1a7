#!/usr/bin/env bash
# Every GPU check and benchmark of fastclr, in one command, on a GPU machine with torch
# preinstalled and no internet:
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]        # default: $OUT, else benchmarks/results/gpu-<date>
#
# 1. records the machine (nvidia-smi, versions), 2. builds the extension in place (CUDA sources
# too), 3. runs every test marked `cuda` (plus one autotuned run, FASTCLR_AUTOTUNE=1),
# 4. runs compute-sanitizer memcheck and racecheck on a small case of the CUDA kernels,
# 5. runs the benchmark suite's GPU half (`python -m benchmarks --device cuda`: the loss with
# Triton "fused" and the CUDA kernel beside naive, lightly, pml and inf-cl, plus the largest
# batch in a 16 GiB budget; LARS; augmentation; the end-to-end step with one component swapped;
# kNN against torch and faiss), 6. runs the training loop on the GPU (the digits default, a
# synthetic ResNet-50). Logs and result files go to OUT_DIR; the benchmark's markdown table is
# printed last. Commit the result files to benchmarks/results/.
#
# Peers missing on the machine (lightly, inf-cl, ...) can be carried as wheels in .whl/ at the
# repository root (see the device tool's README); they are installed into /tmp/site first.
# Without them those columns read "missing". Exit status: non-zero if the build or a test failed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${1:-${OUT:-benchmarks/results/gpu-$(date -u +%Y%m%d-%H%M%S)}}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}"
status=0
# Stages to run (default all). The device machines allow 10 minutes a command: split the suite
# over calls, e.g. GPU_SUITE_STAGES="build tests", then "sanitize bench", then "train" (the build
# is kept between calls on a warm machine).
STAGES=" ${GPU_SUITE_STAGES:-build tests sanitize bench train} "
want() { [[ "$STAGES" == *" $1 "* ]]; }

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

{
  date -u
  nvidia-smi || true
  "$PY" - <<'PYEOF'
import importlib.metadata as md, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda)
for name in ("triton", "lightly", "inf-cl", "pytest"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "missing")
if torch.cuda.is_available():
    print("gpu", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
PYEOF
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "no CUDA GPU visible to torch: this suite needs one"; exit 2
fi

if want build; then
echo "== build"
if ! "$PY" setup.py build_ext --inplace > "$OUT_DIR/build.log" 2>&1; then
  echo "build failed: see $OUT_DIR/build.log"; tail -30 "$OUT_DIR/build.log"; status=1
fi

fi

if want tests; then
echo "== tests marked cuda"
"$PY" -m pytest tests -m cuda -q -rs -p no:cacheprovider 2>&1 | tee "$OUT_DIR/tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "== one autotuned run (FASTCLR_AUTOTUNE=1)" | tee -a "$OUT_DIR/tests.log"
FASTCLR_AUTOTUNE=1 "$PY" -m pytest tests/test_loss.py -m cuda -q -p no:cacheprovider \
  -k "test_float32_matches_reference and triton_cuda-1000x130 and 0.1" 2>&1 | tee -a "$OUT_DIR/tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

fi

if want sanitize; then
echo "== compute-sanitizer on the CUDA kernels (small case)"
for tool in memcheck racecheck; do
  if command -v compute-sanitizer >/dev/null; then
    compute-sanitizer --tool "$tool" --error-exitcode 9 "$PY" benchmarks/sanitize_case.py \
      > "$OUT_DIR/sanitizer-$tool.log" 2>&1 || { echo "compute-sanitizer $tool: FAILED"; status=1; }
    tail -3 "$OUT_DIR/sanitizer-$tool.log"
  else
    echo "compute-sanitizer not found" | tee "$OUT_DIR/sanitizer-$tool.log"
  fi
done

fi

if want bench; then
echo "== the benchmark suite's GPU half: loss, LARS, augmentation, training step, kNN"
# The same settings as `python -m benchmarks --device cuda` (benchmarks/__main__.py); each part
# writes its results file to OUT_DIR and prints its table.
"$PY" -m benchmarks --device cuda --out-dir "$OUT_DIR" --no-report 2>&1 | tr '\r' '\n' \
  | grep -v -E '^(bench_loss|largest batch|bench_train):' | tee "$OUT_DIR/benchmarks.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

fi

if want train; then
echo "== training loop on the GPU (digits default run; then synthetic ResNet-50 throughput, bf16)"
# The GPU path of python -m fastclr.train (bf16 autocast, channels_last, Triton loss, CUDA LARS,
# DALI when installed) has not run anywhere else; its JSON line is its result.
"$PY" -m fastclr.train --no-progress --eval-random-init --out "$OUT_DIR/train-digits" \
  2>&1 | tail -5 | tee "$OUT_DIR/train-digits.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
"$PY" -m fastclr.train --no-progress --dataset synthetic --synthetic-size 20480 --image-size 64 \
  --backbone resnet50 --batch-size 1024 --epochs 2 --probe-epochs 1 --augment torch \
  --out "$OUT_DIR/train-synthetic" 2>&1 | tail -5 | tee "$OUT_DIR/train-synthetic.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

fi

echo "== results in $OUT_DIR (exit $status)"
exit $status
