#!/usr/bin/env bash
# Every GPU check and benchmark of fastclr in one call that fits a device lease (benchmarks/gpu_suite.py
# says what runs, in which order and within which budget):
#
#   bash benchmarks/gpu_suite.sh            # on a GPU machine; results to $OUT (else benchmarks/results/gpu-<date>)
#   bash benchmarks/gpu_suite.sh --plan     # anywhere: stages, estimates, budget, returned files
#   GPU_SUITE_BUDGET_S=300 bash benchmarks/gpu_suite.sh   # a smaller total budget (default 550 s)
#
# Then, here: bash benchmarks/import_gpu_results.sh FILES_AT  (commits the files, refreshes the README).
set -uo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" benchmarks/gpu_suite.py "$@"
