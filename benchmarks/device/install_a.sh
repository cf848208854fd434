#!/usr/bin/env bash
# device call 1 (carry .gpu/ray): the Ray wheel alone into /tmp/site (survives while the machine is warm).
# gpu-stack's folder `a` holds Ray and its dependencies; with the repository at ~17 MiB (published dashboards)
# Ray's 45-MiB wheel only fits a call on its own, so it lives in .gpu/ray and the rest of `a` goes with call 2:
#   mkdir -p .gpu/ray && mv .gpu/a/ray-*.whl .gpu/ray/
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/ray/*.whl
ls -d /tmp/site/ray
