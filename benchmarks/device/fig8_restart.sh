#!/usr/bin/env bash
# Restart of the Fig. 8 sweep after its first invocation lost every base trial to a bug (CUDA-graph trees in a
# reused Tune actor's new thread; fixed in ulsweep/sweep/driver.py). Keeps the trials' run directories: the
# finished AE loops return their stored result.json at once, unfinished ones resume from their checkpoints.
# A fresh sweep state: Tune's experiment folder, the sweep state file and the MLflow store start anew.
set -uo pipefail
pkill -9 -f "ulsweep.cli run" ; ray_pids=$(pgrep -f "ray::|raylet|gcs_server" || true); [ -n "$ray_pids" ] && kill -9 $ray_pids
sleep 3
cp ulsweep/sweep/driver.py /tmp/fig8/src/ulsweep/sweep/driver.py
cp /tmp/fig8/sweep.log /tmp/fig8/sweep-first.log
cd /tmp/fig8/runs/lf_sweep && ls && rm -rf sweep.json tune mlflow.db mlartifacts && ls trials | head -40
find /tmp/fig8/runs/lf_sweep/trials -name result.json | wc -l
cd /tmp/fig8/src
setsid nohup bash -c "
  . benchmarks/device/env_b.sh
  date +%s > /tmp/fig8/t_restart
  python3 -m ulsweep.cli run experiments/lf_sweep.yaml --storage /tmp/fig8/runs --set data.path=$PWD/data/fmnist
  echo \$? > /tmp/fig8/rc; date +%s > /tmp/fig8/t_end
" > /tmp/fig8/sweep.log 2>&1 < /dev/null &
sleep 40
tail -8 /tmp/fig8/sweep.log
