#!/usr/bin/env bash
# Every GPU check and benchmark of fastclr in one command, on any machine with a CUDA GPU
# (benchmarks/gpu_suite.py says what runs, in which order and within which budget):
#
#   bash benchmarks/gpu_suite.sh [OUT_DIR]          # results to OUT_DIR (default benchmarks/results/gpu-<date>)
#   bash benchmarks/gpu_suite.sh --budget 300       # a smaller total budget (default 550 s; or GPU_SUITE_BUDGET_S)
#   bash benchmarks/gpu_suite.sh --wheels DIR       # install the peers from a folder of wheels first (offline machines)
#   bash benchmarks/gpu_suite.sh --plan             # anywhere: stages, estimates, budget, files
#
# Then, where the repository is: python -m benchmarks.import_results OUT_DIR
# (files the results under benchmarks/results/ and regenerates docs/benchmarks.md).
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_suite.py "$@"
