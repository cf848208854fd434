#!/usr/bin/env bash
# Issue 20 on one H200 (call 2, after install_a.sh; carry .gpu/a and .gpu/b): benchmarks/data_pipeline.py.
# Session 10 ran the decode sweep (256^2 and 512^2 JPEG/PNG shards, Ray CPUs 1..16) and ran out of time before
# the step rows: `data.sh step` runs the paper preset's stage-1 step fed by the stream vs by synthetic
# tensors first, at 512^2 (latent 32x32x32) and 256^2 (16x16x32), each side by side in one process;
# `data.sh decode` the decode sweep. JSON and logs under $OUT.
set -uo pipefail
. benchmarks/device/env_b.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
common="--device cuda --preset paper --downsample 16 --latent-channels 32 --batch 16 --compile default --images 512 --shard-rows 32"
case "${1:-step}" in
  step)
    for s in 512 256; do
      timeout 280 python3 benchmarks/data_pipeline.py --sizes $s --encodings jpeg --cpus 16 --image-size $s $common \
        --out "$OUT/h200-data-pipeline-step-$s.json" > "$OUT/step-$s.log" 2>&1
      echo "$s: rc $?"; grep -E "^(decode|step|stream)" "$OUT/step-$s.log"
    done ;;
  decode)
    timeout 500 python3 benchmarks/data_pipeline.py --sizes 256 512 --cpus 1 2 4 8 16 --images 1024 --shard-rows 32 \
      --out "$OUT/h200-data-pipeline-decode.json" > "$OUT/decode.log" 2>&1
    echo "rc $?"; grep -E "^decode" "$OUT/decode.log" ;;
esac
