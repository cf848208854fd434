#!/usr/bin/env bash
# issue 23: the sweep again on the machine a sweep just ran on (its compile caches warm: Inductor's under
# /tmp/torchinductor_<user>, the compile gate's markers and $ULSWEEP_CACHE/compile), waited for in this call and
# collected into $OUT/fig8.tgz. The sweep before moves to /tmp/fig8-before (collect it first: fig8_collect.sh).
# Arguments go to fid.sh sweep, e.g. shorter training (the steps enter no compiled graph):
#   AGAIN_LIMIT=480 bash benchmarks/device/again.sh --set resources.stack_trials=18 --set ae.train.steps=300 ...
set -uo pipefail
LIMIT=${AGAIN_LIMIT:-480}
{ du -sh /tmp/torchinductor_* /tmp/ulsweep-cache/compile /tmp/ulsweep-cache 2>&1; } | tee "$OUT/cache-du.txt"
rm -rf /tmp/fig8-before && mv /tmp/fig8 /tmp/fig8-before
bash benchmarks/device/fid.sh sweep "$@"
for _ in $(seq 1 "$LIMIT"); do [ -f /tmp/fig8/rc ] && break; sleep 1; done
echo "rc: $(cat /tmp/fig8/rc 2>/dev/null || echo 'none: still running, collected as it stands')"
tail -25 /tmp/fig8/sweep.log
bash benchmarks/device/fig8_collect.sh
