# source in device call 2+ (carry .gpu/a, .gpu/b, .whl; data for sweeps): Ray's dependencies and the rest of
# the stack, then the environment.
if [ ! -d /tmp/site/ray ]; then echo "no /tmp/site/ray: the machine went cold; run install_a.sh again" >&2; exit 3; fi
if [ ! -d /tmp/site/optuna ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/a/*.whl .gpu/b/*.whl .whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1 PATH=/tmp/site/bin:$PATH
export ULSWEEP_CACHE=/tmp/ulsweep-cache
ulsweep() { python3 -m ulsweep.cli "$@"; }
