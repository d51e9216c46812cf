#!/usr/bin/env bash
# The device tool's command for benchmarks/gpu.py (run from the repo root; carry: [".whl"]):
#   bash benchmarks/run_gpu.sh
# Installs the carried wheels (diffusers 0.42.1: the GPU image lacks it and cannot download)
# into /tmp/site, then runs the benchmark; the JSON, the table and the log land in $OUT.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu-bench-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 benchmarks/gpu.py --out "$OUT" "$@" 2>&1 | tee "$OUT/log.txt"
