# source in device call 2+: Ray's dependencies and the rest of the stack (carried in .gpu/a, .gpu/b and .whl,
# or staged in /tmp/stage/whl by fid.sh stage), then the environment.
if [ ! -d /tmp/site/ray ]; then echo "no /tmp/site/ray: the machine went cold; run install_a.sh again" >&2; exit 3; fi
if [ ! -d /tmp/site/optuna ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
    $(ls .gpu/a/*.whl .gpu/b/*.whl .whl/*.whl /tmp/stage/whl/*.whl 2>/dev/null | awk -F/ '!seen[$NF]++')
fi
export PYTHONPATH=/tmp/site:$PWD RAY_AUTH_MODE=disabled PYTHONUNBUFFERED=1 PATH=/tmp/site/bin:$PATH
export ULSWEEP_CACHE=/tmp/ulsweep-cache
ulsweep() { python3 -m ulsweep.cli "$@"; }
