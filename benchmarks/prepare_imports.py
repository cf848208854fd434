"""Issue 23: a stacked autoencoder group's preparation (`group.prepare_autoencoders`: runtime, data, networks,
uncompiled warm-up) and then what its first compiled step imports before compiling (`accel.install_choices` and
torch.compile's wrapper: Dynamo's and Inductor's modules), with those modules imported beside the preparation
(`on`: `accel.preload_inductor`, the library's since session 40) or not (`off`: imported in the first step, as
before), each in a fresh process (a process imports a module once), alternating. The planned trials of the
experiment's sweep are the members (lf_sweep: 18). Prints a table and writes JSON.

    python benchmarks/prepare_imports.py experiments/lf_sweep.yaml --set ae.train.batch_size=16 --repeats 2 \\
        --out benchmarks/results/cpu-prepare-imports.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from timing import write_results  # benchmarks/timing.py, beside this script; no torch here

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")

ONE = """
import json, sys, time
import torch
from ulsweep.config import load_experiment, parse_overrides, to_dict
from ulsweep.sweep.space import planned_overrides, trial_experiment
from ulsweep.train import accel, group
variant, path, sets = sys.argv[1], sys.argv[2], sys.argv[3:]
if variant == "off":
    accel.preload_inductor = lambda: None  # prepare_autoencoders then imports nothing ahead
exp = load_experiment(path, parse_overrides(sets))
raw = to_dict(exp)
exps = [trial_experiment(raw, ov) for ov in planned_overrides(exp.search, exp.ae.train.seed)] or [exp]
t0 = time.perf_counter()
prepared = group.prepare_autoencoders(exps)
t1 = time.perf_counter()
accel.install_choices()
torch.compile(torch.nn.Linear(2, 2), mode="default", dynamic=False)
t2 = time.perf_counter()
print(json.dumps({"members": len(exps), "prepare_s": t1 - t0, "first_step_imports_s": t2 - t1, "total_s": t2 - t0,
                  "parts": prepared.parts}))
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", help="a sweep's YAML; its planned autoencoder trials are the members")
    p.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE override, e.g. "
                   "ae.train.batch_size=16 (the warm-up's batch)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=None, help="JSON file for the rows")
    a = p.parse_args(argv)
    env = os.environ | {"PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    rows = []
    for r in range(a.repeats):
        for variant in ("off", "on"):
            out = subprocess.run([sys.executable, "-c", ONE, variant, a.experiment, *a.sets], capture_output=True,
                                 text=True, env=env, cwd=ROOT)
            if out.returncode != 0:
                print(f"{variant}: rc {out.returncode}\n{out.stderr[-2000:]}", file=sys.stderr)
                return 1
            rows.append({"variant": variant, "repeat": r, **json.loads(out.stdout.strip().splitlines()[-1])})
    print(f"{'imports':>8} {'members':>8} {'prepare s':>10} {'then imports s':>15} {'total s':>8}   (medians)")
    for variant in ("off", "on"):
        mine = [x for x in rows if x["variant"] == variant]
        med = {k: statistics.median(x[k] for x in mine) for k in ("prepare_s", "first_step_imports_s", "total_s")}
        label = "ahead" if variant == "on" else "in step"
        print(f"{label:>8} {mine[0]['members']:>8} {med['prepare_s']:>10.2f} {med['first_step_imports_s']:>15.2f} "
              f"{med['total_s']:>8.2f}")
    write_results(a.out, {"experiment": a.experiment, "sets": a.sets}, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
