#!/usr/bin/env bash
# Issue 23's batched-program lever on one H200 (after the stage.sh calls; needs no Ray): benchmarks/batched_trials.py
# with lf_sweep's autoencoder (small preset, 32x32x1, latent 8x8x8, batch 128 per trial) and then its base model
# (batch 256), $BATCHED_TRIALS trials as one program against one trial's own library step, in the modes
# $BATCHED_MODES, side by side; the correctness check first (2 trials, 3 steps, TF32 off). Compare its rows with
# packing.py's (N processes, with and without MPS: mps.sh). JSON and logs under $OUT; vmap's fallback warnings
# (one per call) are left out of the logs. $BATCHED_LIMIT caps each stage (default 280 s). Session 17 ran eager
# and reduce-overhead at 1 4 8 16: the eager rows came back, the CUDA-graph rows were cut while compiling, hence
# the defaults now: CUDA graphs only, at 4 and 16 trials.
#   bash benchmarks/device/batched.sh [extra arguments of batched_trials.py]
set -uo pipefail
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
T=${BATCHED_TRIALS:-4 16}; M=${BATCHED_MODES:-reduce-overhead}
timeout "${BATCHED_LIMIT:-280}" python3 benchmarks/batched_trials.py --preset small --image-size 32 --channels 1 \
  --downsample 4 --latent-channels 8 --batch 128 --trials $T --modes $M --seconds 10 \
  --out "$OUT/h200-batched-trials-ae.json" "$@" 2>&1 | grep -v BatchedFallback | tee "$OUT/batched-ae.log" | tail -12
timeout "${BATCHED_LIMIT:-280}" python3 benchmarks/batched_trials.py --stage base --preset small --image-size 32 \
  --channels 1 --downsample 4 --latent-channels 8 --batch 256 --trials $T --modes $M \
  --seconds 10 --out "$OUT/h200-batched-trials-base.json" "$@" 2>&1 | grep -v BatchedFallback | tee "$OUT/batched-base.log" | tail -12
