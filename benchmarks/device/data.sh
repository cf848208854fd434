#!/usr/bin/env bash
# Issue 20 on one H200 (call 2, after install_a.sh; carry .gpu/a and .gpu/b): benchmarks/data_pipeline.py.
# Decode throughput of 256^2 and 512^2 JPEG/PNG shards against Ray CPUs (1..16), then the paper preset's
# stage-1 step fed by the stream vs by synthetic tensors at 512^2 (latent 32x32x32) and at 256^2
# (latent 16x16x32), each side by side in one process. JSON and logs under $OUT.
set -uo pipefail
. benchmarks/device/env_b.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
common="--device cuda --preset paper --downsample 16 --latent-channels 32 --batch 16 --compile default"
timeout 330 python3 benchmarks/data_pipeline.py --sizes 256 512 --cpus 1 2 4 8 16 --images 1024 --shard-rows 32 \
  --image-size 512 $common --out "$OUT/h200-data-pipeline-512.json" > "$OUT/data-512.log" 2>&1
echo "512: rc $?"; grep -E "^(decode|step|stream)" "$OUT/data-512.log"
timeout 200 python3 benchmarks/data_pipeline.py --sizes 256 --encodings jpeg --cpus 16 --images 1024 --shard-rows 32 \
  --image-size 256 $common --out "$OUT/h200-data-pipeline-256.json" > "$OUT/data-256.log" 2>&1
echo "256: rc $?"; grep -E "^(decode|step|stream)" "$OUT/data-256.log"
