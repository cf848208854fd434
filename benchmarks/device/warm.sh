#!/usr/bin/env bash
# Issue 23: warm trial processes with CUDA graphs (resources.reuse_processes, session 19) on one H200, after the
# stage.sh put calls (~4 min, no Ray): the GPU tests of CUDA-graph training in a second thread and of three
# trainings in one trial thread, then benchmarks/warm_process.py on lf_sweep's autoencoder (reduce-overhead):
# later runs in fresh processes with a warm disk cache against the same runs in one warm process.
#   bash benchmarks/device/warm.sh        # results under $OUT
set -uo pipefail
. benchmarks/device/env_b.sh
python3 -m pytest -q -p no:cacheprovider -o addopts="" tests/test_train.py -k "one_trial_thread or second_thread" \
  > "$OUT/pytest-warm.log" 2>&1
echo "pytest rc $?"; tail -5 "$OUT/pytest-warm.log"
python3 benchmarks/warm_process.py experiments/lf_sweep.yaml --runs 3 --steps 50 \
  --set data.path=/tmp/stage/data/fmnist --out "$OUT/h200-warm-process.json" 2>&1 | tail -9
