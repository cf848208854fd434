#!/usr/bin/env bash
# Issue 23's launch-bound lever, measured before anything is built: a sweep packs up to 10 small trials on one GPU
# as separate processes, whose kernels time-slice (one context at a time) unless NVIDIA's Multi-Process Service
# runs, which lets kernels of different processes share the SMs at once. benchmarks/packing.py (stage 1 of
# lf_sweep's trial: small preset, 32x32x1, latent 8x8x8, batch 128, CUDA graphs) at 1, 5 and 10 trials, without
# then with an MPS control daemon, in one call (after install_a.sh; carry .gpu/a and .gpu/b). JSON under $OUT.
#   bash benchmarks/device/mps.sh            # ~6 min: two compiles (the second from the cache) + 2 x 3 groups
set -uo pipefail
. benchmarks/device/env_b.sh
P="--preset small --image-size 32 --channels 1 --downsample 4 --latent-channels 8 --stage ae --batch 128"
P="$P --mode reduce-overhead --seconds 20 --trials 1 5 10 --cpus-per-trial 1"
nvidia-smi --query-gpu=name,memory.total,driver_version,compute_mode --format=csv,noheader | tee "$OUT/gpu.txt"
timeout 270 python3 benchmarks/packing.py $P --out "$OUT/h200-packing-nomps.json" 2>&1 | grep -vE "^\(|INFO|WARNING" | tail -8
if ! command -v nvidia-cuda-mps-control >/dev/null; then echo "no nvidia-cuda-mps-control on this image"; exit 0; fi
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps/pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps/log
mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
nvidia-cuda-mps-control -d && echo "MPS daemon started"
timeout 270 python3 benchmarks/packing.py $P --out "$OUT/h200-packing-mps.json" 2>&1 | grep -vE "^\(|INFO|WARNING" | tail -8
echo quit | nvidia-cuda-mps-control
tail -5 "$CUDA_MPS_LOG_DIRECTORY/control.log" 2>/dev/null
