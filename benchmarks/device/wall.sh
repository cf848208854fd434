#!/usr/bin/env bash
# Issue 23 on one H200, after install_a.sh and three `fid.sh stage` calls (.gpu/a + data, .gpu/inc1, .gpu/inc2);
# carry .gpu/b. benchmarks/sweep_wall.py over the b = 0 slice of experiments/lf_sweep.yaml (5 AE + 5 base trials,
# 10k-sample gFD and gFID), the library as it is (compile gate and shared Inductor caches on). The Fashion-MNIST
# domain extractor is trained first, outside the timed sweep (a one-time cache, like the Inception weights).
# Extra arguments go to sweep_wall.py (e.g. --variant). A sweep still running after $WALL_LIMIT s (default 480) is
# stopped with SIGINT and reported as far as it got. JSON, log, GPU samples and the MLflow DB under $OUT.
# Session 13 ran it under `timeout`, which killed sweep_wall itself at 505 s (no JSON, no GPU samples): the
# numbers were read back from the store with `sweep_wall.py --from-store` (benchmarks/results/*-s13*).
#   ULSWEEP_COMMIT=$(git rev-parse HEAD) bash benchmarks/device/wall.sh
# The compile gate waiting vs training uncompiled meanwhile (train.gate_compile true vs eager), side by side in one
# call: the five autoencoders alone at half their steps, each variant with a cold Inductor cache of its own:
#   WALL_LIMIT=270 bash benchmarks/device/wall.sh --set ae.train.steps=1700 --set 'base_models=[]' \
#     --variant 'wait=ae.train.gate_compile=true,env:TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-wait' \
#     --variant 'eager=ae.train.gate_compile=eager,env:TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-eager'
# MPS off against on (resources.mps: the daemon ulsweep starts for the run; session 17 built it), the same
# autoencoders, each variant with a cold cache of its own (~8 min):
#   WALL_LIMIT=270 bash benchmarks/device/wall.sh --set ae.train.steps=1700 --set 'base_models=[]' \
#     --variant 'timesliced=env:TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-ts' \
#     --variant 'mps=resources.mps=on,env:TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-mps'
# (session 18: 250 s time-sliced, 202 s under MPS). cuDNN's autotuner on against off (train.cudnn_benchmark; the
# first eager step up to 5.0 s against 1.5 s in first_step.py, the compiled steps not measured without it), under MPS:
#   WALL_LIMIT=260 bash benchmarks/device/wall.sh --set ae.train.steps=1700 --set 'base_models=[]' \
#     --set resources.mps=on --variant 'search=env:TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-s' \
#     --variant 'heuristic=ae.train.cudnn_benchmark=false,env:TORCHINDUCTOR_CACHE_DIR=/tmp/inductor-h'
# Fresh against warm trial processes (resources.reuse_processes off / on; on = every trial of a process in its one
# trial thread, so CUDA graphs stay in the thread that first captured), under MPS, the five autoencoders and their
# base models at half their steps, each variant with a cold cache of its own (benchmarks/warm_process.py and the
# GPU test tests/test_train.py -k one_trial_thread check reuse with CUDA graphs first):
#   WALL_LIMIT=280 bash benchmarks/device/wall.sh --set ae.train.steps=1700 --set base_models.0.train.steps=1250 \
#     --set resources.mps=on --variant 'fresh=resources.reuse_processes=off,env:TORCHINDUCTOR_CACHE_DIR=/tmp/ind-f' \
#     --variant 'reuse=resources.reuse_processes=on,env:TORCHINDUCTOR_CACHE_DIR=/tmp/ind-r'
# Base models compiled ahead off against on (resources.precompile; session 20: CPU only), under MPS with warm
# processes, the five autoencoders at half their steps and their base models, each variant with a cold cache of its
# own; look at the first base trial's ready_s and the base trials' first_step phase:
#   WALL_LIMIT=280 bash benchmarks/device/wall.sh --set ae.train.steps=1700 --set base_models.0.train.steps=1250 \
#     --set resources.mps=on --set resources.reuse_processes=on \
#     --variant 'late=resources.precompile=off,env:TORCHINDUCTOR_CACHE_DIR=/tmp/ind-l' \
#     --variant 'ahead=resources.precompile=on,env:TORCHINDUCTOR_CACHE_DIR=/tmp/ind-a'
set -uo pipefail
bash benchmarks/device/fid.sh stage > /dev/null
. benchmarks/device/env_b.sh
[ -f /tmp/stage/default_1.pt ] || cat /tmp/stage/inc/incpart.* > /tmp/stage/default_1.pt
export ULSWEEP_INCEPTION_WEIGHTS=/tmp/stage/default_1.pt
DATA=/tmp/stage/data/fmnist
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "from ulsweep.config import load_experiment; from ulsweep.train.evaluation import ensure_domain_extractor
print(ensure_domain_extractor(load_experiment('experiments/lf_sweep.yaml', {'data.path': '$DATA'}), 'cuda'))"
python3 benchmarks/sweep_wall.py experiments/lf_sweep.yaml --workdir /tmp/wall --limit-s "${WALL_LIMIT:-480}" \
  --set "data.path=$DATA" --set 'search.points=[]' \
  --set 'search.space={ae.loss.sigmoid_bias: {values: [0.0]}, ae.loss.loss_factor: {values: [1.5, 1.75, 2.0, 3.0, 4.0]}}' \
  --out "$OUT/h200-lf-sweep-wall.json" "$@" 2>&1 | tail -15
echo "sweep_wall rc ${PIPESTATUS[0]}"
cd /tmp/wall && cp log-*.txt gpu-*.csv "$OUT/" 2>/dev/null
tar czf "$OUT/wall-runs.tgz" $(find . -name mlflow.db -o -name summary.json | grep -v step_) 2>/dev/null
ls -la "$OUT"
