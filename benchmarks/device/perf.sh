#!/usr/bin/env bash
# Training-step benchmarks on the lent GPU machines (what each run found: benchmarks/README.md; the calls
# made: benchmarks/device/README.md). `perf.sh single`: small-preset step (eager vs CUDA graphs) and packing on GPU 0,
# paper-preset steps (prior, base, full stage 1; eager vs compile; profiler breakdown) on the last GPU, in
# parallel when there are two. `perf.sh layout`: full stage 1 with the trials' weight layout vs channels_last.
# `perf.sh tune`: the base model with max-autotune and a larger batch beside `layout` (2 GPUs, ~9 min);
# `perf.sh next`: stage 1 with channels_last activations, the base model at batch 256 (2 GPUs, ~5 min).
# `perf.sh dropout` (1 GPU, ~10 min, carry .gpu/b for pytest): ulsweep's dropout mask on the GPU (tests,
# micro-benchmark), the base model with it vs Inductor's dropout at batch 128; at 256 with it and without
# dropout. `perf.sh dropout base` skips the tests and the micro-benchmark.
# `perf.sh base` (1 GPU, ~10 min): SDPA backends on the latent models' shapes, the base model's kernel list at
# batch 128, and at batch 256 with Inductor's coordinate-descent tuning.
# `perf.sh autotune` then `perf.sh autotune again` (1 GPU, two back-to-back calls): the base model at batch 256
# with Inductor's GEMM autotuning; the first call's autotuning and Triton caches under /tmp let the second
# finish the compile, which then runs the default compile beside it.
# `perf.sh block` (1 GPU, ~9 min): one base-model block with parts switched off or rewritten (`block.py`), the
# base model at batch 256 compiled with and without CUDA graphs, every kernel in the JSON.
# `perf.sh final` (1 GPU, ~9 min): the base model at batch 256 with and without CUDA graphs, full stage 1.
# `perf.sh heads [block|rows|ae]` (1 GPU): heads of 64 vs 128 channels (SDPA, base model, prior; one block with
# the QK norm rewritten; the one-pass heuristic of ulsweep/train/accel.py; full stage 1). `perf.sh s8`: the
# one-pass GPU test, the base model and stage 1 as the library builds them (heads of 128, one-pass rows).
# `perf.sh ddp [stage ...]`: stage-1 / stage-2 on 1 vs 2 GPUs through Ray Train; `perf.sh ddp-base`: the
# compiled base model's scaling with and without Dynamo's DDP graph splitting. `perf.sh gputests` (carry
# .gpu/b): the train and accel tests that only run on CUDA.
set -uo pipefail
case "${1:-single}" in  # train_step.py alone needs no Ray: `tune` and `layout` run in the call that installs it
  tune|layout|next|dropout|base|autotune|block|final|gputests|heads|s8) export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 ;;
  *) . benchmarks/device/env_b.sh ;;
esac
gpus=$(nvidia-smi -L | wc -l); last=$((gpus - 1))
device_pytest() {  # LIMIT_S PYTEST_ARGS...: the image has no pytest; .gpu/b's wheels go into /tmp/site once
  [ -d /tmp/site/pytest ] || python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/b/*.whl
  local limit=$1; shift
  # addopts off: its -n (pytest-xdist) is not on the machine
  PYTHONPATH=$PYTHONPATH:/tmp/site timeout "$limit" python3 -m pytest -q -p no:cacheprovider -o addopts="" "$@"
}
paper="--preset paper --image-size 512 --channels 3 --downsample 16 --latent-channels 32"
small="--preset small --image-size 32 --channels 1"
case "${1:-single}" in
single)
  (CUDA_VISIBLE_DEVICES=$last python3 benchmarks/train_step.py $paper --stages prior base ae --batch 16 \
     --base-batch 64 --modes eager default --profile --warmup 3 --iters 10 --out "$OUT/paper.json" \
     > "$OUT/paper.log" 2>&1) &
  [ "$gpus" -gt 1 ] || wait
  CUDA_VISIBLE_DEVICES=0 python3 benchmarks/train_step.py $small --stages ae base --batch 128 --base-batch 256 \
     --modes eager reduce-overhead --profile --out "$OUT/small.json" > "$OUT/small.log" 2>&1
  CUDA_VISIBLE_DEVICES=0 python3 benchmarks/packing.py $small --batch 128 --trials 1 2 4 8 --seconds 20 \
     --out "$OUT/packing.json" > "$OUT/packing.log" 2>&1
  wait
  for f in small paper packing; do echo "== $f"; grep -vE "^\(|^\s*$|Warning|warn" "$OUT/$f.log" | tail -25; done
  ;;
layout)  # full stage 1: weights in the default layout (as the trials) vs channels_last, op-level profile
  (CUDA_VISIBLE_DEVICES=$last python3 benchmarks/train_step.py $paper --stages ae --batch 16 --modes default \
     --profile --channels-last --out "$OUT/ae_cl.json" > "$OUT/ae_cl.log" 2>&1) &
  CUDA_VISIBLE_DEVICES=0 python3 benchmarks/train_step.py $paper --stages ae --batch 16 --modes default \
     --profile --out "$OUT/ae.json" > "$OUT/ae.log" 2>&1
  wait
  for f in ae ae_cl; do echo "== $f"; grep -vE "^\s*$|[Ww]arn" "$OUT/$f.log" | tail -9; done
  ;;
tune)  # GPU 0: base model, compile default vs max-autotune at batch 128, default at 256; last GPU: `layout`
  (CUDA_VISIBLE_DEVICES=$last timeout 300 python3 benchmarks/train_step.py $paper --stages ae --batch 16 \
     --modes default --profile --out "$OUT/ae.json" > "$OUT/ae.log" 2>&1
   CUDA_VISIBLE_DEVICES=$last timeout 240 python3 benchmarks/train_step.py $paper --stages ae --batch 16 \
     --modes default --profile --channels-last --out "$OUT/ae_cl.json" > "$OUT/ae_cl.log" 2>&1) &
  CUDA_VISIBLE_DEVICES=0 timeout 150 python3 benchmarks/train_step.py $paper --stages base --base-batch 128 256 \
     --modes default --profile --out "$OUT/base.json" > "$OUT/base.log" 2>&1
  CUDA_VISIBLE_DEVICES=0 timeout 380 python3 benchmarks/train_step.py $paper --stages base --base-batch 128 \
     --modes max-autotune --profile --out "$OUT/base_mat.json" > "$OUT/base_mat.log" 2>&1
  wait
  for f in base base_mat ae ae_cl; do echo "== $f"; grep -vE "^\s*$|[Ww]arn" "$OUT/$f.log" | tail -12; done
  ;;
next)  # 2 GPUs, ~5 min: stage 1 with channels_last activations end to end on GPU 0; the base model at batch
       # 256 on the last GPU (H200: ~95 GiB)
  (CUDA_VISIBLE_DEVICES=$last timeout 300 python3 benchmarks/train_step.py $paper --stages base --base-batch 256 \
     --modes default --profile --out "$OUT/base256.json" > "$OUT/base256.log" 2>&1) &
  CUDA_VISIBLE_DEVICES=0 timeout 300 python3 benchmarks/train_step.py $paper --stages ae --batch 16 --modes default \
     --profile --channels-last all --out "$OUT/ae_cl_all.json" > "$OUT/ae_cl_all.log" 2>&1
  wait
  for f in ae_cl_all base256; do echo "== $f"; grep -vE "^\s*$|[Ww]arn" "$OUT/$f.log" | tail -9; done
  ;;
dropout)
  if [ "${2:-}" != base ]; then
  device_pytest 120 tests/test_dropout.py > "$OUT/pytest.log" 2>&1
  timeout 150 python3 benchmarks/dropout.py --out "$OUT/dropout.json" > "$OUT/dropout.log" 2>&1
  fi
  timeout 240 python3 benchmarks/train_step.py $paper --stages base --base-batch 128 --modes default \
     --dropout-kernel triton torch --profile --out "$OUT/base.json" > "$OUT/base.log" 2>&1
  timeout 200 python3 benchmarks/train_step.py $paper --stages base --base-batch 256 --modes default \
     --profile --out "$OUT/base256.json" > "$OUT/base256.log" 2>&1
  timeout 150 python3 benchmarks/train_step.py $paper --stages base --base-batch 256 --modes default \
     --dropout 0 --out "$OUT/base256_nodrop.json" > "$OUT/base256_nodrop.log" 2>&1
  for f in pytest dropout base base256 base256_nodrop; do echo "== $f"; grep -vE "^\s*$|[Ww]arn" "$OUT/$f.log" | grep -v "ms/step" | tail -8; done
  ;;
base)
  timeout 100 python3 benchmarks/attention.py --out "$OUT/attention.json" > "$OUT/attention.log" 2>&1
  timeout 170 python3 benchmarks/train_step.py $paper --stages base --base-batch 128 --modes default --profile \
     --out "$OUT/base128.json" > "$OUT/base128.log" 2>&1
  timeout 300 python3 benchmarks/train_step.py $paper --stages base --base-batch 256 --modes default --profile \
     --inductor coordinate_descent_tuning=True --out "$OUT/base256_cdt.json" > "$OUT/base256_cdt.log" 2>&1
  for f in attention base128 base256_cdt; do echo "== $f"; grep -vE "^\s*$|[Ww]arn" "$OUT/$f.log" | tail -12; done
  ;;
autotune)  # two back-to-back calls on one warm machine: `perf.sh autotune`, then `perf.sh autotune again`
  export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-cache TRITON_CACHE_DIR=/tmp/triton-cache
  # GEMM autotuning with epilogue/prologue fusion only (pointwise autotuning gained nothing: benchmarks/README.md);
  # Hopper's persistent TMA matmul templates where this torch has them
  tma=$(python3 -c "import torch._inductor.config as c; print('triton.enable_persistent_tma_matmul=True' \
        if hasattr(c.triton, 'enable_persistent_tma_matmul') else '')")
  limit=${3:-440}; [ "${2:-}" = again ] && limit=${3:-370}
  timeout "$limit" python3 benchmarks/train_step.py $paper --stages base --base-batch 256 --modes default \
     --inductor max_autotune_gemm=True max_autotune_gemm_backends=ATEN,TRITON $tma --profile \
     --out "$OUT/base_mat.json" > "$OUT/base_mat.log" 2>&1
  echo "rc=$? autotuned GEMMs: $(grep -c 'AUTOTUNE' "$OUT/base_mat.log")"
  du -sh /tmp/inductor-cache /tmp/triton-cache
  grep -vE "^\s*$|[Ww]arn" "$OUT/base_mat.log" | grep -v "ms/step" | tail -9
  if [ "${2:-}" = again ]; then  # the default compile beside it, same machine
    timeout 200 python3 benchmarks/train_step.py $paper --stages base --base-batch 256 --modes default \
       --out "$OUT/base.json" > "$OUT/base.log" 2>&1; grep -vE "^\s*$|[Ww]arn" "$OUT/base.log" | tail -3
  fi
  ;;
block)
  timeout 240 python3 benchmarks/block.py --out "$OUT/block.json" > "$OUT/block.log" 2>&1
  timeout 330 python3 benchmarks/train_step.py $paper --stages base --base-batch 256 --modes default reduce-overhead \
     --profile --out "$OUT/base256.json" > "$OUT/base256.log" 2>&1
  for f in block base256; do echo "== $f"; grep -vE "^\s*$|[Ww]arn" "$OUT/$f.log" | grep -v "ms/step" | tail -16; done
  ;;
final)  # the issue's rows on the final code: base model at batch 256 with and without CUDA graphs, full stage 1;
        # `perf.sh final large`: the base model with CUDA graphs at batch 256 and 384; `perf.sh final tiling`: the
        # prior, and the base model with Inductor's N-d tiling of pointwise kernels and reductions vs without
  if [ "${2:-}" = tiling ]; then  # the prior on the final code; the base model with Inductor's N-d tiling
    timeout 130 python3 benchmarks/train_step.py $paper --stages prior --base-batch 128 --modes default \
       --out "$OUT/prior.json" > "$OUT/prior.log" 2>&1
    timeout 200 python3 benchmarks/train_step.py $paper --stages base --base-batch 256 --modes default \
       --inductor triton.prefer_nd_tiling=True triton.tile_reductions=True --out "$OUT/base_nd.json" \
       > "$OUT/base_nd.log" 2>&1
    timeout 200 python3 benchmarks/train_step.py $paper --stages base --base-batch 256 --modes default \
       --out "$OUT/base.json" > "$OUT/base.log" 2>&1
    for f in prior base_nd base; do echo "== $f"; grep -vE "^\s*$|[Ww]arn" "$OUT/$f.log" | tail -3; done
    exit 0
  fi
  if [ "${2:-}" = large ]; then
    timeout 570 python3 benchmarks/train_step.py $paper --stages base --base-batch 256 384 --modes reduce-overhead \
       --profile --out "$OUT/base_large.json" > "$OUT/base_large.log" 2>&1
    grep -vE "^\s*$|[Ww]arn" "$OUT/base_large.log" | grep -v "ms/step" | tail -8
    exit 0
  fi
  timeout 330 python3 benchmarks/train_step.py $paper --stages base --base-batch 256 --modes default reduce-overhead \
     --profile --out "$OUT/base256.json" > "$OUT/base256.log" 2>&1
  timeout 220 python3 benchmarks/train_step.py $paper --stages ae --batch 16 --modes default --profile \
     --out "$OUT/ae.json" > "$OUT/ae.log" 2>&1
  for f in base256 ae; do echo "== $f"; grep -vE "^\s*$|[Ww]arn" "$OUT/$f.log" | grep -v "ms/step" | tail -8; done
  ;;
heads)  # `perf.sh heads` (1 GPU, ~9 min): SDPA at head sizes 64 and 128 on the latent models' shapes; the base
  # model at batch 256 and the prior at 128 with heads of 64 and 128 side by side.
  # `perf.sh heads ae`: full stage 1 (prior and decoder transformer) with either head size; `perf.sh heads
  # block`: one base-model block with the QK norms written three other ways, at either head size.
  if [ "${2:-}" = rows ]; then  # `perf.sh heads rows` (carry .gpu/b): one-pass short rows (ulsweep/train/accel.py)
    python3 -c "import inspect, torch._inductor.choices as c; \
      print(inspect.signature(c.InductorChoices.should_use_persistent_reduction))"
    device_pytest 90 tests/test_accel.py -k "one_pass or choices" -x 2>&1 | tail -3
    timeout 400 python3 benchmarks/train_step.py $paper --stages base --base-batch 256 --modes default \
       --head-dim 128 64 --one-pass-rows 128 0 --profile --out "$OUT/base_rows.json" > "$OUT/base_rows.log" 2>&1
    timeout 100 python3 benchmarks/train_step.py $paper --stages base --base-batch 256 --modes default \
       --head-dim 128 --one-pass-rows 128 --out "$OUT/base_rows2.json" > "$OUT/base_rows2.log" 2>&1
    for f in base_rows base_rows2; do grep -vE "^\s*$|[Ww]arn" "$OUT/$f.log" | grep -v "ms/step" | tail -8; done
  elif [ "${2:-}" = ae ]; then
    timeout 560 python3 benchmarks/train_step.py $paper --stages ae --batch 16 --modes default --head-dim 64 128 \
       --profile --out "$OUT/ae_heads.json" > "$OUT/ae_heads.log" 2>&1
    grep -vE "^\s*$|[Ww]arn" "$OUT/ae_heads.log" | grep -v "ms/step" | tail -6
  elif [ "${2:-}" = block ]; then  # `perf.sh heads block [VARIANTS [N]]`: the QK-norm rewrites at either head size
    timeout 560 python3 benchmarks/block.py --head-dims 64 128 --variants ${3:-library qk-v-split norm-all \
       multi-kernel} --kernels ${4:-0} --out "$OUT/block_heads.json" 2>&1 | grep -vE "^\s*$|[Ww]arn"
  else
    timeout 60 python3 benchmarks/attention.py --out "$OUT/attention_heads.json" > "$OUT/attention_heads.log" 2>&1
    cat "$OUT/attention_heads.log"
    timeout 330 python3 benchmarks/train_step.py $paper --stages base --base-batch 256 --modes default \
       --head-dim 64 128 --profile --out "$OUT/base_heads.json" > "$OUT/base_heads.log" 2>&1
    timeout 180 python3 benchmarks/train_step.py $paper --stages prior --base-batch 128 --modes default \
       --head-dim 64 128 --out "$OUT/prior_heads.json" > "$OUT/prior_heads.log" 2>&1
    for f in base_heads prior_heads; do grep -vE "^\s*$|[Ww]arn" "$OUT/$f.log" | grep -v "ms/step" | tail -6; done
  fi
  ;;
s8)  # (carry .gpu/b) the one-pass GPU test, the base model at batch 256 as the library builds it (heads of 128,
    # one-pass short rows; fresh Inductor cache), full stage 1
  export TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-s8
  device_pytest 60 tests/test_accel.py -k "one_pass or choices" 2>&1 | tail -2
  timeout 150 python3 benchmarks/train_step.py $paper --stages base --base-batch 256 --modes default --profile \
     --out "$OUT/base256.json" > "$OUT/base256.log" 2>&1
  timeout 200 python3 benchmarks/train_step.py $paper --stages ae --batch 16 --modes default --warmup 3 --iters 10 \
     --out "$OUT/ae.json" > "$OUT/ae.log" 2>&1
  for f in base256 ae; do echo "== $f"; grep -vE "^\s*$|[Ww]arn" "$OUT/$f.log" | grep -v "ms/step" | tail -3; done
  ;;
gputests)  # the tests that only run on CUDA (carry .gpu/b)
  device_pytest 150 tests/test_train.py tests/test_accel.py -k "clip or cuda_graph or gpu" \
     > "$OUT/pytest.log" 2>&1; tail -3 "$OUT/pytest.log"
  ;;
ddp)  # `perf.sh ddp [stage ...]`, stages ae and base by default (~9 min on 2 x H200 for both)
  stages=${*:2}
  python3 benchmarks/ddp.py $paper --workers 1 2 --stages ${stages:-ae base} --batch 16 --base-batch 64 \
     --mode default --out "$OUT/ddp.json" > "$OUT/ddp.log" 2>&1
  grep -vE "^\(|^\s*$" "$OUT/ddp.log" | tail -12
  ;;
ddp-base)  # the compiled base model's DDP scaling with both optimize_ddp settings (ddp.py --optimize-ddp), side by side
  python3 benchmarks/ddp.py $paper --workers 1 2 --stages base --base-batch 64 --mode default \
     --optimize-ddp no_optimization ddp_optimizer --out "$OUT/ddp-base.json" > "$OUT/ddp-base.log" 2>&1
  grep -vE "^\(|^\s*$" "$OUT/ddp-base.log" | tail -5
  ;;
esac
