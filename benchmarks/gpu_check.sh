#!/usr/bin/env bash
# fedtune's GPU check, for a CUDA machine lent for a few minutes with its own PyTorch,
# transformers and peft preinstalled and no network. Run from the repository root:
#   bash benchmarks/gpu_check.sh [OUT_DIR]
# It installs what the machine lacks from the wheels carried in benchmarks/gpu-wheels/
# (fetch them beforehand with `make gpu-wheels`), installs fedtune itself without touching
# the machine's torch, then runs the three checks of fedtune.benchmarks.gpu_check and
# writes OUT_DIR/gpu-check.json (default runs/gpu-check). Exit status 3: no CUDA here.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/gpu-check}"
PY="${PYTHON:-python3}"
WHEELS=benchmarks/gpu-wheels
if [ -d "$WHEELS" ]; then
  "$PY" -m pip install --quiet --no-index --find-links "$WHEELS" --no-deps "$WHEELS"/*.whl
fi
"$PY" -m pip install --quiet --no-index --no-deps --no-build-isolation -e .
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 FLWR_TELEMETRY_ENABLED=0
exec "$PY" -m fedtune.benchmarks.gpu_check --out "$OUT"
