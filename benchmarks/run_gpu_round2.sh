#!/usr/bin/env bash
# The prepared device run for issues 16 and 17 (the session that wrote it had no GPU lent).
# From the repo root, with the wheels the GPU image lacks in .whl/ (as for
# benchmarks/run_gpu.sh): device.run(command="bash benchmarks/run_gpu_round2.sh",
# carry=[".whl"]). About 12 minutes on an H200; each part writes its results as it goes.
#   1. SD 1.5 at 768: fp16, fast (compiled), and each issue-17 change alone on top of fast
#      (CUDA graphs, pinned transfers) at batch 1 and 8;
#   2. the compile cache across processes: a cold start part by part with an empty cache,
#      then a second process from it (target: warm-up with the cache <= 15 s);
#   3. SDXL base architecture at 1024, 20 steps, kmax 0.5: fp16 and fast at batch 1 and 4.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/gpu-round2}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

python3 benchmarks/gpu.py --arch sd15 --sizes 768 --batches 1,8 \
  --configs fp16,fast,fastgraphs,fastpinned --budget-s 300 --out "$OUT/sd15" 2>&1 | tee "$OUT/sd15.log"

python3 -m magicmix build-random --arch sd15 /tmp/sd15 2>&1 | tail -1
for run in scratch cache; do
  SPAWNED_AT=$(date +%s.%N) MAGICMIX_MODEL=/tmp/sd15 MAGICMIX_DEVICE=cuda MAGICMIX_BATCH_SIZE=8 \
    MAGICMIX_CHANNELS_LAST=true MAGICMIX_COMPILE_CACHE_DIR=/tmp/compile-cache \
    MAGICMIX_COMPILE_WORK_DIR=/tmp/inductor-$run \
    python3 -m benchmarks.coldstart_child 768 | tee "$OUT/coldstart-$run.json"
done

python3 benchmarks/gpu.py --arch sdxl --sizes 1024 --batches 1,4 --configs fp16,fast \
  --budget-s 240 --out "$OUT/sdxl" 2>&1 | tee "$OUT/sdxl.log"
