#!/usr/bin/env bash
# device call 1 (carry .gpu/a): Ray and its dependencies into /tmp/site (survives while the machine is warm).
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/a/*.whl
python3 -c "import sys; sys.path.insert(0, '/tmp/site'); import ray; print('ray', ray.__version__)"
