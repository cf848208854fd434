#!/usr/bin/env bash
# Issue 20 on one H200 (call 2, after install_a.sh; carry .gpu/a and .gpu/b): benchmarks/data_pipeline.py.
# Session 10 ran the decode sweep (256^2 and 512^2 JPEG/PNG shards, Ray CPUs 1..16) and ran out of time before
# the step rows. `data.sh step [sizes]` runs the paper preset's stage-1 step fed by the stream (the library as
# it is, `after`, then the settings of 4102f05, `before`) vs by synthetic tensors, at 256^2 (latent 16x16x32)
# then 512^2 (32x32x32), each side by side in one process (280 s each; rows printed as measured, none started
# after 250 s); `data.sh consumer` the CPU imitation of that step (no GPU used) on the machine's 16 cores;
# `data.sh decode` the decode sweep. JSON and logs under $OUT.
set -uo pipefail
. benchmarks/device/env_b.sh
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
common="--device cuda --preset paper --downsample 16 --latent-channels 32 --batch 16 --compile default --images 512 --shard-rows 32"
common="$common --configs after before --step-images 1024 --steps 20 --repeats 2 --time-limit 250"
case "${1:-step}" in
  step)
    for s in ${2:-256 512}; do
      timeout 280 python3 benchmarks/data_pipeline.py --sizes $s --encodings jpeg --cpus 16 --image-size $s $common \
        --out "$OUT/h200-data-pipeline-step-$s.json" > "$OUT/step-$s.log" 2>&1
      echo "$s: rc $?"; grep -E "^(decode|step|stream)" "$OUT/step-$s.log"
    done ;;
  consumer)
    timeout 280 python3 benchmarks/data_pipeline.py --sizes 256 --encodings jpeg --cpus 16 --images 512 --shard-rows 32 \
      --stream-batch 16 --configs before inproc after --consumer-ms 75 --consumer-work hold torch --image-size 256 \
      --step-images 3072 --steps 30 --repeats 2 --time-limit 250 --out "$OUT/h200-data-pipeline-consumer.json" \
      > "$OUT/consumer.log" 2>&1
    echo "rc $?"; grep -E "^(decode|consumer)" "$OUT/consumer.log" ;;
  decode)
    timeout 500 python3 benchmarks/data_pipeline.py --sizes 256 512 --cpus 1 2 4 8 16 --images 1024 --shard-rows 32 \
      --out "$OUT/h200-data-pipeline-decode.json" > "$OUT/decode.log" 2>&1
    echo "rc $?"; grep -E "^decode" "$OUT/decode.log" ;;
esac
