"""Where a cold torch.compile of a sweep's training step goes, by phase (issue 23).

    python benchmarks/compile_phases.py experiments/lf_sweep.yaml --members 1 18 --set data.path=data/fmnist \
        --out benchmarks/results/cpu-compile-phases.json

Each row compiles the step the sweep's precompile task compiles (`ulsweep.sweep.precompile.compile_ae` or
`compile_base`: the trial's own objective through the library's loop, three steps on random inputs; with --members K
above 1 the stacked program of a group of K) in a fresh process with an empty Inductor cache of its own, and reports
the wall time to the step's end, that time by part (`step_parts_s`: build, setup, first step, steps) and Dynamo's
`compile_times` by phase (`accel.compile_phase_seconds`: the phases nest; on a CPU `compile_file` is the C++ compiler,
on a GPU `async_compile.wait` the wait for Triton's parallel kernel compiles). Prints a table and writes JSON.
Sampling is not compiled here. `--warm` adds, after each row, the same compile in a second fresh process that finds
the first one's caches (as a sweep's group finds its precompile task's): what a warm first step still costs (session
31, one H100: the base group's first compiled step 8.6 s after its precompile task had compiled it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from timing import write_results  # noqa: E402  (benchmarks/timing.py, beside this script)

# the phases the table shows (the JSON keeps every phase of at least 0.5 s)
SHOWN = ["bytecode_tracing", "aot_trace_joint_graph", "min_cut_rematerialization_partition", "GraphLowering.run",
         "Scheduler.__init__", "Scheduler.codegen", "async_compile.wait", "compile_file"]


def child(args: argparse.Namespace) -> None:
    """One row, in this (fresh) process: compile, then print the result as one JSON line."""
    from ulsweep.config import load_experiment, parse_overrides, to_dict
    from ulsweep.sweep import precompile

    overrides = parse_overrides(args.set or []) | {"eval.sample_compile": False}
    exp = load_experiment(args.experiment, overrides)
    job = next((j for j in precompile.jobs(exp) if j["stage"] == args.stage), None)
    if job is None:
        raise SystemExit(f"{args.experiment}: no {args.stage} step to compile (train.compile off?)")
    raw = to_dict(exp)
    if args.stage == "ae":
        r = precompile.compile_ae(raw, job["overrides"], members=args.child)
    else:
        r = precompile.compile_base(raw, job["overrides"], job["base"], members=args.child)
    from ulsweep.train.accel import compile_phase_seconds

    r["phases_s"] = compile_phase_seconds(top=1000, least=0.5)
    print("ROW " + json.dumps(r), flush=True)


PARTS = ["build", "setup", "first_step", "steps"]  # the step's seconds by part (precompile.step_parts)


def table(rows: list[dict]) -> str:
    """One line a row: its members and caches, seconds to its step's end, those seconds by part, then the SHOWN
    phases."""
    lines = [f"{'members':>7}{'caches':>7}{'step s':>9}" + "".join(f"{p:>12}" for p in PARTS)
             + "".join(f"{name[:18]:>20}" for name in SHOWN)]
    for r in rows:
        ph, parts = r.get("phases_s") or {}, r.get("step_parts_s") or {}
        lines.append(f"{r['members']:>7}{r.get('caches', 'cold'):>7}{r['step_s']:>9.1f}"
                     + "".join(f"{parts.get(p, 0.0):>12.1f}" for p in PARTS)
                     + "".join(f"{ph.get(name, 0.0):>20.1f}" for name in SHOWN))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment")
    p.add_argument("--stage", default="ae", choices=["ae", "base"])
    p.add_argument("--members", type=int, nargs="+", default=[1, 18], help="rows: trials compiled as one program")
    p.add_argument("--set", action="append", help="KEY=VALUE override of the experiment")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--warm", action="store_true", help="each row again in a fresh process with its caches warm")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        child(args)
        return 0
    rows = []
    for k in args.members:
        with tempfile.TemporaryDirectory(prefix="ulsweep-compile-phases-") as cache:
            env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TRITON_CACHE_DIR=os.path.join(cache, "triton"),
                       ULSWEEP_CACHE=os.path.join(cache, "ulsweep"))
            cmd = [sys.executable, os.path.abspath(__file__), args.experiment, "--stage", args.stage,
                   "--child", str(k)] + sum((["--set", s] for s in args.set or []), [])
            for caches in ["cold", "warm"] if args.warm else ["cold"]:
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                line = next((ln for ln in done.stdout.splitlines() if ln.startswith("ROW ")), None)
                if done.returncode or line is None:
                    print(done.stdout[-2000:] + done.stderr[-4000:], file=sys.stderr)
                    raise SystemExit(f"row members={k} ({caches}): the compile failed (exit {done.returncode})")
                row = json.loads(line[4:]) | {"members": k, "caches": caches}
                rows.append(row)
                print(f"  done: members {k} ({caches}), {row['step_s']:.1f} s", file=sys.stderr, flush=True)
    print(table(rows))
    import torch

    env = {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count(),
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
           "experiment": args.experiment, "stage": args.stage, "set": args.set or []}
    write_results(args.out, env, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
