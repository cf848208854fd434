#!/usr/bin/env bash
# Measurements before a sweep (issue 23; planned in session 35, not yet run), after `stage.sh put` has unpacked
# the stack; each part writes its JSON and log under $OUT, so a part cut off by the call's limit keeps what the
# others measured.
#   bash benchmarks/device/levers.sh fid    # ~4 min: Inception TF32, cuDNN's heuristics against its search,
#                                           # channels_last, at the evaluation's batch (256) and at 1,024; a fresh
#                                           # Inception's first calls; the 2048-d FD with the reference's factor
#                                           # kept; one member's scoring; six members 1, 2, 3 at a time
#   bash benchmarks/device/levers.sh conv   # ~6-9 min, a call of its own: the stacked autoencoder step (CUDA
#                                           # graphs, lf_sweep's train.compile: loop's K kernels a convolution
#                                           # replay without launch costs there, not in the default mode) with its
#                                           # convolutions grouped and one per trial (loop: resources.stack_conv;
#                                           # CONVS="grouped loop unfold" adds im2col), each with cuDNN's search
#                                           # and then its heuristics (the second row compiles from the first's)
#   bash benchmarks/device/levers.sh conv-eager # ~1-2 min: the stacked autoencoder step uncompiled with its
#                                           # convolutions grouped, one per trial (loop), on channels-last input and
#                                           # as nhwc, profiled (CONV_EAGER_LIMIT s, default 150): their kernels and
#                                           # layout conversions, without a compile
#   bash benchmarks/device/levers.sh inception # ~1 min: the FID Inception's calls profiled, by kernel kind
#   bash benchmarks/device/levers.sh writes # ~3 min: the 18 autoencoders' evaluation alone and beside their
#                                           # checkpoint writes (library, one thread, the writer before session 38)
#   bash benchmarks/device/levers.sh attention # ~4-5 min: the stacked base-model step (18 x 256, CUDA graphs) with
#                                           # SDPA as the library calls it (cuDNN's fused kernels on sequences of
#                                           # 16 and 64 tokens: 18% of the step in session 25's profile) and as
#                                           # SDPA's math backend (matmuls and a softmax that Inductor fuses), each
#                                           # in a process of its own (ATTN_LIMIT s each, default 240)
#   ULSWEEP_COMMIT=<sha> bash benchmarks/device/levers.sh conv-sweep [--set k=v ...]
#                                           # conv (CONV_LIMIT default 420), then the full sweep detached
#                                           # (fid.sh sweep) with the --set of the variant that saves the most
#                                           # (pick_conv.py: >= 3% more images/s than the sweep's own setting, and
#                                           # faster steps that outweigh a longer cold compile), in one call
set -euo pipefail
. benchmarks/device/env_b.sh
OUT=${OUT:?set by the device call}
# lf_sweep's 18 members as one stacked program with CUDA graphs, profiled (conv and attention rows)
stacked=(--preset small --image-size 32 --channels 1 --downsample 4 --latent-channels 8 --trials 18
         --modes reduce-overhead --programs stacked --no-baseline --profile --seconds 6 --warmup 3 --check-steps 0)
case "${1:?fid|conv|conv-eager|writes|inception|attention|conv-sweep}" in
  fid)
    [ -f /tmp/stage/default_1.pt ] || cat /tmp/stage/inc/incpart.* > /tmp/stage/default_1.pt
    python3 benchmarks/metrics.py --devices cuda --skip domain inception --inception-batch 256 \
      --member-fd --inception-weights /tmp/stage/default_1.pt --out "$OUT/h200-metrics-s36.json" \
      > "$OUT/metrics-256.log" 2>&1 || echo "metrics at 256: rc $?"
    tail -18 "$OUT/metrics-256.log"
    python3 benchmarks/metrics.py --devices cuda --skip domain inception inception_cl frechet --inception-batch 1024 \
      --inception-weights /tmp/stage/default_1.pt --out "$OUT/h200-metrics-1024-s36.json" \
      > "$OUT/metrics-1024.log" 2>&1 || echo "metrics at 1024: rc $?"
    tail -5 "$OUT/metrics-1024.log"
    ;;
  conv)
    # shellcheck disable=SC2086 # CONVS: the variants' words, split on purpose
    timeout "${CONV_LIMIT:-560}" python3 benchmarks/batched_trials.py "${stacked[@]}" --conv ${CONVS:-grouped loop} \
      --cudnn-search on off --stage ae --batch 128 --out "$OUT/profile-ae-conv.json" > "$OUT/profile-ae-conv.log" \
      2>&1 || echo "conv rows: rc $?"
    tail -12 "$OUT/profile-ae-conv.log"
    ;;
  conv-eager)  # ~1-2 min, nothing compiled: the stacked autoencoder step uncompiled with each convolution variant,
               # profiled (its cuDNN kernels and layout conversions are those the compiled step calls)
    timeout "${CONV_EAGER_LIMIT:-150}" python3 benchmarks/batched_trials.py "${stacked[@]}" --modes eager --seconds 4 \
      --warmup 2 --conv grouped loop channels-last nhwc --cudnn-search on --stage ae --batch 128 \
      --out "$OUT/profile-ae-conv-eager.json" > "$OUT/profile-ae-conv-eager.log" 2>&1 || echo "conv-eager rows: rc $?"
    grep -E "eager|GPU busy" "$OUT/profile-ae-conv-eager.log" | tail -12
    ;;
  inception)  # ~1 min: the FID Inception's calls at the evaluation's batch profiled (GPU time by kernel kind)
    [ -f /tmp/stage/default_1.pt ] || cat /tmp/stage/inc/incpart.* > /tmp/stage/default_1.pt
    python3 benchmarks/metrics.py --devices cuda --skip domain inception inception_cl frechet --profile-inception \
      --inception-batch 256 --inception-weights /tmp/stage/default_1.pt --out "$OUT/inception-profile.json" \
      > "$OUT/inception-profile.log" 2>&1 || echo "inception profile: rc $?"
    tail -14 "$OUT/inception-profile.log"
    ;;
  writes)  # ~3 min: a stacked group's evaluation alone and beside its members' checkpoint writes, the library's
           # writer, one thread, and the writer before session 38 (eval_beside_writes.py)
    python3 benchmarks/eval_beside_writes.py experiments/lf_sweep.yaml --members 18 \
      --out "$OUT/eval-beside-writes.json" > "$OUT/eval-beside-writes.log" 2>&1 || echo "writes rows: rc $?"
    tail -8 "$OUT/eval-beside-writes.log"
    ;;
  attention)
    for a in library math; do
      timeout "${ATTN_LIMIT:-240}" python3 benchmarks/batched_trials.py "${stacked[@]}" --attention "$a" \
        --stage base --batch 256 --out "$OUT/profile-base-attention-$a.json" \
        > "$OUT/profile-base-attention-$a.log" 2>&1 || echo "attention $a: rc $?"
      tail -6 "$OUT/profile-base-attention-$a.log"
    done
    ;;
  conv-sweep)
    CONV_LIMIT=${CONV_LIMIT:-420} bash "$0" conv
    picked=$(python3 benchmarks/device/pick_conv.py "$OUT/profile-ae-conv.json" 2> "$OUT/pick-conv.log")
    cat "$OUT/pick-conv.log"; echo "$picked" > "$OUT/sweep-sets.txt"
    # shellcheck disable=SC2086 # the picked --set words, split on purpose
    bash benchmarks/device/fid.sh sweep $picked "${@:2}"
    ;;
esac
