#!/usr/bin/env bash
# Issue 23: where the stacked groups' training step spends its GPU time (no Ray needed, nothing staged): lf_sweep's
# 18 autoencoders as one stacked program (batch 128 each), then its 18 base models (batch 256 each), compiled in
# mode `default` (CUDA graphs would hide the kernels from the profiler; the kernels are the same), each with
# benchmarks/batched_trials.py --profile (GPU time by kernel kind, the largest kernels); then the stacked
# convolution's variants (--conv channels-last unfold) against the library's grouped one. JSON and logs under $OUT.
#   bash benchmarks/device/profile.sh
set -uo pipefail
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
common=(--preset small --image-size 32 --channels 1 --downsample 4 --latent-channels 8 --trials 18 --modes default
        --programs stacked --no-baseline --profile --seconds 6 --warmup 3 --check-steps 0)
run() {  # name, then batched_trials arguments
  local name=$1; shift
  timeout "${PROFILE_LIMIT:-200}" python3 benchmarks/batched_trials.py "${common[@]}" "$@" --out "$OUT/profile-$name.json" \
    2>&1 | grep -v -e USDT -e BatchedFallback | tee "$OUT/profile-$name.log"
}
run ae --stage ae --batch 128
run base --stage base --batch 256
run ae-conv --stage ae --batch 128 --conv channels-last unfold
