#!/usr/bin/env bash
# The device image lacks Ray, Optuna, MLflow, pytest, the FID Inception file and the data, and one call carries
# 64 MiB with the working tree (tracked files: ~34 MiB with the published dashboards). Everything goes over as one
# tar cut in chunks that each fit a call beside the tree; the machine keeps /tmp while it stays warm.
#   here:    bash benchmarks/device/stage.sh pack        # .gpu/chunk1 .. .gpu/chunkN from .gpu/{ray,a,b,inc1,inc2} + data
#   device:  bash benchmarks/device/stage.sh put         # one call per chunk, carry [".gpu/chunkK"]; the call
#            that brings the last one unpacks: Ray into /tmp/site, the other wheels into /tmp/stage/whl (env_b.sh
#            installs them), the Inception parts into /tmp/stage/inc, data into /tmp/stage/data (fid.sh's layout),
#            and a .gpu/compile/compile.tgz (an earlier sweep's saved compiles) into /tmp/ulsweep-cache.
set -euo pipefail
case "${1:?pack|put}" in
  pack)
    rm -rf .gpu/chunk* && tmp=$(mktemp -d)
    # .gpu/compile/compile.tgz, where a sweep's fig8_collect.sh brought one back: its compiles, for a warm run
    tar cf "$tmp/stack.tar" .gpu/ray .gpu/a .gpu/b .gpu/inc1 .gpu/inc2 data $(ls -d .gpu/compile 2>/dev/null)
    tree=$(git ls-files -z | xargs -0 stat -c %s | awk '{s += $1} END {print s}')
    chunk=$(( 64 * 1024 * 1024 - tree - 2 * 1024 * 1024 ))  # 2 MiB to spare for untracked files
    n=$(( ($(stat -c %s "$tmp/stack.tar") + chunk - 1) / chunk ))
    split -b "$chunk" -d -a 2 "$tmp/stack.tar" "$tmp/part."
    k=0; for p in "$tmp"/part.*; do k=$((k + 1)); mkdir -p ".gpu/chunk$k"; mv "$p" ".gpu/chunk$k/"; echo "$n" > ".gpu/chunk$k/of"; done
    sha256sum "$tmp/stack.tar" | cut -d' ' -f1 > .gpu/chunk1/sha256
    rm -rf "$tmp"; du -sh .gpu/chunk*
    ;;
  put)
    mkdir -p /tmp/stage/parts
    for d in .gpu/chunk*; do cp "$d"/* /tmp/stage/parts/; done
    have=$(ls /tmp/stage/parts/part.* | wc -l); of=$(cat /tmp/stage/parts/of)
    echo "chunks here: $have of $of"
    if [ "$have" -lt "$of" ]; then exit 0; fi
    if [ ! -d /tmp/site/ray ]; then
      cat /tmp/stage/parts/part.* > /tmp/stage/stack.tar
      echo "$(cat /tmp/stage/parts/sha256)  /tmp/stage/stack.tar" | sha256sum -c -
      mkdir -p /tmp/stage/raw /tmp/stage/whl /tmp/stage/inc && tar xf /tmp/stage/stack.tar -C /tmp/stage/raw
      python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/stage/raw/.gpu/ray/*.whl
      cp /tmp/stage/raw/.gpu/a/*.whl /tmp/stage/raw/.gpu/b/*.whl /tmp/stage/whl/
      cp /tmp/stage/raw/.gpu/inc*/incpart.* /tmp/stage/inc/
      rm -rf /tmp/stage/data && mv /tmp/stage/raw/data /tmp/stage/data
      if [ -f /tmp/stage/raw/.gpu/compile/compile.tgz ]; then  # into $ULSWEEP_CACHE (env_b.sh): compile_artifacts.py loads it
        mkdir -p /tmp/ulsweep-cache && tar xzf /tmp/stage/raw/.gpu/compile/compile.tgz -C /tmp/ulsweep-cache
        du -sh /tmp/ulsweep-cache/compile
      fi
      rm -rf /tmp/stage/raw /tmp/stage/stack.tar
      # the rest of the stack, and its bytecode, as a pip install that compiles would leave it: without it every
      # sweep's driver and its first wave of trial processes compiled Ray's and MLflow's modules themselves, all at
      # once (session 21: 33 s from the sweep's start to its trials' imports, imports 13 s in each of 18 trials)
      ( . benchmarks/device/env_b.sh && python3 -m compileall -q -j 0 /tmp/site > /dev/null 2>&1 || true )
    fi
    ls -d /tmp/site/ray; ls /tmp/stage/whl | wc -l; ls /tmp/stage/inc /tmp/stage/data
    ;;
esac
