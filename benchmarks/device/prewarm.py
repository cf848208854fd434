"""Warm a node's compile caches for a sweep before it runs, to time the sweep warm (issue 23; session 34 did it by
running the whole sweep twice).

    . benchmarks/device/env_b.sh && python3 benchmarks/device/prewarm.py experiments/lf_sweep.yaml \
        --set data.path=/tmp/stage/data/fmnist

Each step the sweep's precompile tasks would compile (`ulsweep.sweep.precompile.jobs`: lf_sweep's stacked
autoencoders and its stacked base models, with their sampling) is compiled by the same function the task calls
(`compile_ae` / `compile_base`), each in a process of its own, all at once, with the node's own caches (Inductor's,
Triton's, the compile gate's marks and `$ULSWEEP_CACHE`): a sweep started after it finds every step compiled. One
line a job (`precompile.describe`), then the wall time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("experiment")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--job", type=int, default=None, help=argparse.SUPPRESS)  # a child: compile job N
    args = p.parse_args()
    from ulsweep.config import load_experiment, parse_overrides, to_dict
    from ulsweep.sweep import precompile

    exp = load_experiment(args.experiment, parse_overrides(args.set))
    jobs = precompile.jobs(exp)
    if args.job is not None:
        j, raw = jobs[args.job], to_dict(exp)
        members = j.get("members", 1)
        r = (precompile.compile_ae(raw, j["overrides"], members=members) if j["stage"] == "ae"
             else precompile.compile_base(raw, j["overrides"], j["base"], members=members))
        print("ROW " + json.dumps(r), flush=True)
        return
    if not jobs:
        raise SystemExit(f"{args.experiment}: no step to compile (train.compile off everywhere?)")
    t0 = time.time()
    sets = [a for s in args.set for a in ("--set", s)]
    procs = [subprocess.Popen([sys.executable, __file__, args.experiment, *sets, "--job", str(i)],
                              stdout=subprocess.PIPE, text=True) for i in range(len(jobs))]
    failed = 0
    for i, proc in enumerate(procs):
        out, _ = proc.communicate()
        rows = [json.loads(line[4:]) for line in out.splitlines() if line.startswith("ROW ")]
        if proc.returncode or not rows:
            failed += 1
            print(f"prewarm: job {i} ({jobs[i]['stage']}) failed, rc {proc.returncode}", flush=True)
        else:
            print(precompile.describe(rows[0]).replace("precompile:", "prewarm:", 1), flush=True)
    print(f"prewarm: {len(jobs) - failed} of {len(jobs)} step(s) compiled in {time.time() - t0:.0f} s", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
