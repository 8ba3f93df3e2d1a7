#!/usr/bin/env bash
# Downloads the peers the GPU suite compares against (lightly, inf-cl, pytorch-metric-learning,
# faiss-cpu) as wheels for a GPU machine's Python (PYVER, default 3.12) into .whl/ (git-ignored),
# for a GPU machine without internet: copy the folder there and run
# `bash benchmarks/gpu_suite.sh --wheels .whl`. The machine is expected to have torch, triton,
# timm, pytest, tqdm, scikit-learn, tensorboard, matplotlib and PyYAML already. NVIDIA DALI is
# not fetched (a large wheel); without it the suite's augmentation runs the torch path and
# DALI's columns read "missing".
#
#   bash benchmarks/fetch_gpu_wheels.sh        # then: du -sh .whl
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
# name==version, one version each (two versions of one package would conflict at install)
WHEELS=(
  # lightly alone (--no-deps): lightly.loss and lightly.utils.lars, all the suite uses, import
  # neither hydra-core nor pytorch_lightning
  lightly==1.6.0
  inf-cl==1.2.1
  pytorch-metric-learning==2.9.0
  faiss-cpu==1.15.1
)
PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done
rm -rf .whl && mkdir -p .whl
for spec in "${WHEELS[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${PYVER:-3.12}" --implementation cp \
    "${PLATFORMS[@]}" -d .whl "$spec"
done
echo "wheels: $(ls .whl | wc -l) files, $(du -sh .whl | cut -f1) in .whl/"
