#!/usr/bin/env bash
# Downloads the peers the GPU suite compares against, for the device's Python 3.12, into .whl/
# (git-ignored; name it in the device call's `carry`). Only what the device machine lacks:
# its image already has torch, triton, timm, pytest(-timeout, -benchmark), tqdm, scikit-learn,
# tensorboard, matplotlib, PyYAML and pytorch-lightning (the device tool's KINDS.md).
# NVIDIA DALI is not carried (its wheel is larger than the 64 MiB a call may carry): on the
# device the suite's augmentation is the torch path and DALI's columns read "missing".
#
#   bash benchmarks/fetch_gpu_wheels.sh        # then: du -sh .whl, and carry [".whl"]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
# name==version, one version each (two of one package stop the device's install)
WHEELS=(
  # lightly alone: of what it declares, the device lacks hydra-core, but lightly.loss and
  # lightly.utils.lars (all the suite uses) import neither it nor pytorch_lightning
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
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d .whl "$spec"
done
tree_kib=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | awk '{print int($1/1024) + 1}')
whl_kib=$(du -sk .whl | awk '{print $1}')
echo "wheels: $(ls .whl | wc -l) files, $((whl_kib / 1024)) MiB; tracked tree: $((tree_kib / 1024)) MiB;" \
     "together $(((whl_kib + tree_kib) / 1024)) MiB of the 64 MiB a device call may carry"
[ $((whl_kib + tree_kib)) -lt $((64 * 1024)) ] || { echo "too large to carry"; exit 1; }
