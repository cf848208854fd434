"""What a sweep's first wave of trial processes pays to import its libraries, all at once (issue 23).

    python benchmarks/import_contention.py --procs 18 --out benchmarks/results/import-contention.json

lf_sweep's 18 autoencoder trials start together, each in a fresh Tune process that imports MLflow, torch and Ray
Train before its MLflow run opens (the timeline's `imports` phase: 8.8-15.2 s, median 12.5 s, on a 16-core H100
machine in session 30), while a stacked member's own process never touches the GPU: its group's actor trains it.
Each row starts `--procs` fresh interpreters at the same moment, each importing one set of modules and reporting
its own seconds; then one interpreter alone, as a reference. Sets: `tracking` (MLflow and Ray Tune/Train: what a
member needs), `+torch` (and torch with Ray Train's torch backend: what a member imports today). Prints a table
(median and max over the processes) and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SETS = {
    "tracking": ["mlflow", "ray.tune", "ray.train"],
    "+torch": ["mlflow", "ray.tune", "ray.train", "torch", "ray.train.torch"],
}

CHILD = ("import importlib, sys, time\n"
         "t = time.perf_counter()\n"
         "for m in sys.argv[1:]: importlib.import_module(m)\n"
         "print(time.perf_counter() - t)\n")


def wave(modules: list[str], procs: int) -> list[float]:
    """Seconds each of `procs` interpreters started together took to import `modules`."""
    ps = [subprocess.Popen([sys.executable, "-c", CHILD, *modules], stdout=subprocess.PIPE, text=True)
          for _ in range(procs)]
    out = []
    for p in ps:
        stdout, _ = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"importing {modules} failed (exit {p.returncode})")
        out.append(float(stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--procs", type=int, default=18, help="interpreters started together (lf_sweep: 18)")
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args()
    for modules in SETS.values():
        wave(modules, 1)  # page cache and bytecode warm for every set before anything is timed
    rows = []
    for name, modules in SETS.items():
        for procs in (1, args.procs):
            t0 = time.perf_counter()
            s = wave(modules, procs)
            rows.append({"set": name, "modules": modules, "procs": procs, "median_s": statistics.median(s),
                         "max_s": max(s), "wave_s": time.perf_counter() - t0})
    print(f"{'set':<10} {'procs':>5} {'median s':>9} {'max s':>7}")
    for r in rows:
        print(f"{r['set']:<10} {r['procs']:>5} {r['median_s']:>9.2f} {r['max_s']:>7.2f}")
    if args.out:
        result = {"cpus": os.cpu_count(), "python": sys.version.split()[0], "rows": rows}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        tmp = args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.out)


if __name__ == "__main__":
    main()
