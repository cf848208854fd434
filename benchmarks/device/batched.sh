#!/usr/bin/env bash
# Issue 23's batched-program lever on one H200 (after the stage.sh calls; needs no Ray): benchmarks/batched_trials.py
# with lf_sweep's autoencoder (small preset, 32x32x1, latent 8x8x8, batch 128 per trial) and then its base model
# (batch 256), eager and with CUDA graphs, 1 / 4 / 8 / 16 trials as one program against one trial's own library
# step, side by side; the correctness check first (2 trials, 3 steps). Compare its rows with packing.py's (N
# processes, with and without MPS: mps.sh). JSON and logs under $OUT. ~8 min (the compilations are the long part;
# $BATCHED_LIMIT caps each stage, default 280 s: lower it, or drop a mode, to fit the call).
#   bash benchmarks/device/batched.sh [extra arguments of batched_trials.py]
set -uo pipefail
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
timeout "${BATCHED_LIMIT:-280}" python3 benchmarks/batched_trials.py --preset small --image-size 32 --channels 1 \
  --downsample 4 --latent-channels 8 --batch 128 --trials 1 4 8 16 --modes eager reduce-overhead --seconds 10 \
  --out "$OUT/h200-batched-trials-ae.json" "$@" 2>&1 | tee "$OUT/batched-ae.log" | tail -12
timeout "${BATCHED_LIMIT:-280}" python3 benchmarks/batched_trials.py --stage base --preset small --image-size 32 \
  --channels 1 --downsample 4 --latent-channels 8 --batch 256 --trials 1 4 8 16 --modes eager reduce-overhead \
  --seconds 10 --out "$OUT/h200-batched-trials-base.json" "$@" 2>&1 | tee "$OUT/batched-base.log" | tail -12
