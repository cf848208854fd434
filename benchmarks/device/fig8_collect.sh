#!/usr/bin/env bash
# Everything the README section needs, in one file under $OUT: dashboard (with PNGs), CSVs, MLflow DB,
# per-trial result.json files, summary.json (the driver's steps), the sweep log and the GPU type; no checkpoints.
set -euo pipefail
. benchmarks/device/env_b.sh
EXP=$(cat /tmp/fig8/exp 2>/dev/null || echo lf_sweep)
DASH=${FIG8_DASH:-$([ "$EXP" = lf_sweep ] && echo fig8-fmnist || echo "${EXP//_/-}-fmnist")}  # base_size -> base-size-fmnist
# first what the analysis needs, in a file of its own, should the call's limit or the session's device time end the
# call during the report: the store, summary.json, the logs and the trials' result files
R=/tmp/fig8/runs/$EXP
mkdir -p /tmp/fig8/quick && cp $R/mlflow.db $R/summary.json /tmp/fig8/sweep.log /tmp/fig8/gpus.txt /tmp/fig8/gpu_util.csv \
  /tmp/fig8/t_* /tmp/fig8/rc /tmp/fig8/quick/ 2>/dev/null || true
( cd $R && find . -name result.json -o -name config.yaml -o -name timings.jsonl -o -name actor.log | grep -v step_ \
  | tar cf /tmp/fig8/quick/trials.tar -T - ) || true
tar czf "$OUT/quick.tgz" -C /tmp/fig8/quick .
cd /tmp/fig8/src
python3 -m ulsweep.cli report /tmp/fig8/runs/$EXP --out dashboards/$DASH > /tmp/fig8/report.log 2>&1 \
  || { echo "report failed:"; tail -20 /tmp/fig8/report.log; }
mkdir -p /tmp/fig8/pack/results
cp -r dashboards/$DASH /tmp/fig8/pack/ 2>/dev/null || true
# the quick files again, the store copied after the report
cp -r /tmp/fig8/quick/. /tmp/fig8/pack/ && mv /tmp/fig8/pack/trials.tar /tmp/fig8/pack/results/
cp $R/mlflow.db /tmp/fig8/pack/ 2>/dev/null || true
tar czf "$OUT/fig8.tgz" -C /tmp/fig8/pack .
# the compiles the sweep's first processes saved (ulsweep/train/compile_artifacts.py), for a later machine to carry
# in ($ULSWEEP_CACHE/compile): brought back when they fit in a call's return
if [ -d /tmp/ulsweep-cache/compile ]; then
  du -sh /tmp/ulsweep-cache/compile
  find /tmp/ulsweep-cache/compile -name '*.bin' -printf '%s %p\n' | sort -n  # each file holds its process's compiles so far
  tar czf /tmp/fig8/compile.tgz -C /tmp/ulsweep-cache compile
  [ "$(stat -c %s /tmp/fig8/compile.tgz)" -lt $((40 * 1024 * 1024)) ] && cp /tmp/fig8/compile.tgz "$OUT/" || true
fi
ls -la "$OUT"
