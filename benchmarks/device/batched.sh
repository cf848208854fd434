#!/usr/bin/env bash
# Issue 23's batched-program lever on one H200 (after the stage.sh calls; needs no Ray): benchmarks/batched_trials.py
# with lf_sweep's autoencoder (small preset, 32x32x1, latent 8x8x8, batch 128 per trial) and then its base model
# (batch 256): $BATCHED_TRIALS trials as one program ($BATCHED_PROGRAMS: `stacked`, ulsweep/models/stacked.py, and/or
# `vmap`) against one trial's own library step, in the modes $BATCHED_MODES, side by side; the correctness checks
# first (2 trials, 3 steps, TF32 off). Compare its rows with packing.py's (N processes, with and without MPS:
# mps.sh). JSON and logs under $OUT; vmap's fallback warnings (one per call) are left out of the logs.
# $BATCHED_LIMIT caps each stage (default 280 s); $BATCHED_STAGES picks them (default "ae base"; one stage a call
# if both do not fit). Session 17 ran vmap eager and reduce-overhead at 1 4 8 16: the eager rows came back, the
# vmapped CUDA-graph rows were cut while compiling (on CPU too the vmapped program compiles slower than the
# stacked one). Defaults since session 20: the stacked program at 6 and 18 trials (18: all of lf_sweep's
# autoencoders in one program), eager and with CUDA graphs.
#   bash benchmarks/device/batched.sh [extra arguments of batched_trials.py]
set -uo pipefail
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
T=${BATCHED_TRIALS:-6 18}; M=${BATCHED_MODES:-eager reduce-overhead}; P=${BATCHED_PROGRAMS:-stacked}
for stage in ${BATCHED_STAGES:-ae base}; do
  if [ "$stage" = ae ]; then batch=128; else batch=256; fi
  timeout "${BATCHED_LIMIT:-280}" python3 benchmarks/batched_trials.py --stage "$stage" --preset small --image-size 32 \
    --channels 1 --downsample 4 --latent-channels 8 --batch $batch --trials $T --modes $M --programs $P --seconds 10 \
    --out "$OUT/h200-batched-trials-$stage.json" "$@" 2>&1 | grep -v BatchedFallback | tee "$OUT/batched-$stage.log" \
    | tail -12
done
