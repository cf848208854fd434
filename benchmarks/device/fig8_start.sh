#!/usr/bin/env bash
# A GPU sweep, detached (it outlives this device call): trains the Fashion-MNIST domain extractor once, then
# `ulsweep run experiments/$FIG8_EXP.yaml` (default lf_sweep: the Fig. 8 sweep; base_size, bias_pairs: issue 22;
# extra arguments, e.g. `--set k=v`, are passed on), logging to /tmp/fig8/sweep.log, with nvidia-smi's
# utilization every 5 s in /tmp/fig8/gpu_util.csv. $FIG8_DATA: the Fashion-MNIST dataset (default ./data/fmnist).
set -euo pipefail
. benchmarks/device/env_b.sh
mkdir -p /tmp/fig8
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > /tmp/fig8/gpus.txt
rm -rf /tmp/fig8/src && cp -r "$PWD" /tmp/fig8/src  # the sweep reads its code from here even after this call's tree is gone
cd /tmp/fig8/src
echo "${FIG8_EXP:-lf_sweep}" > /tmp/fig8/exp
setsid nohup nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv -l 5 > /tmp/fig8/gpu_util.csv 2>&1 < /dev/null &
extra=""; if [ $# -gt 0 ]; then extra=$(printf '%q ' "$@"); fi  # each argument quoted for the inner shell
setsid nohup bash -c "
  . benchmarks/device/env_b.sh
  python3 -c 'from ulsweep.config import load_experiment; from ulsweep.train.evaluation import ensure_domain_extractor;
exp = load_experiment(\"experiments/${FIG8_EXP:-lf_sweep}.yaml\", {\"data.path\": \"${FIG8_DATA:-$PWD/data/fmnist}\"}); print(ensure_domain_extractor(exp, \"cuda\"))'
  date +%s > /tmp/fig8/t_start
  python3 -m ulsweep.cli run experiments/${FIG8_EXP:-lf_sweep}.yaml --storage /tmp/fig8/runs \
      --set data.path=${FIG8_DATA:-$PWD/data/fmnist} $extra
  echo \$? > /tmp/fig8/rc; date +%s > /tmp/fig8/t_end
" > /tmp/fig8/sweep.log 2>&1 < /dev/null &
sleep 45
tail -5 /tmp/fig8/sweep.log
