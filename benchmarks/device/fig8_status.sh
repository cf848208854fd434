#!/usr/bin/env bash
# Progress of the detached sweep of fig8_start.sh.
cat /tmp/fig8/rc 2>/dev/null && echo "(sweep exited with that code)"
grep -c "] done " /tmp/fig8/sweep.log | sed "s/^/trials done: /"
grep -E "^\[(ae|base)" /tmp/fig8/sweep.log | tail -4
grep -vE "^\[(ae|base)" /tmp/fig8/sweep.log | tail -12
nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader
# what is done so far comes back with every call (the machine, and the sweep with it, can go away): the trials'
# results, the store, and the stacked groups' actor logs (their start, rates and compile lines), with the start time
( cd /tmp/fig8 && { find runs -name result.json | grep -v step_; find runs -maxdepth 2 -name mlflow.db;
    find runs -name actor.log; } | tar czf "$OUT/partial.tgz" sweep.log gpu_util.csv t_start -T - ) 2>/dev/null || true
