"""Issue 23: how soon a stacked group's actor (or a precompile task) runs after the driver asks for it, placed as
`precompile.gpu_node_options` places it: with a runtime_env of its own that keeps the GPUs visible (`runtime_env`,
up to session 41: Ray starts a new process for it) or with none, its worker seeing the GPUs through
`precompile.KEEP_GPUS_ENV` in the environment of the Ray the driver starts (`kept`: a worker Ray started ahead).
Each row starts a fresh local Ray through `driver._init_ray` on a node that has one GPU on paper (`num_gpus=1`,
CUDA_VISIBLE_DEVICES=0: no GPU is used), asks for the probe actor and then `--procs` trial-like actors that import
torch at once (a sweep's first wave, which competes with the group's start for the CPUs), and records the seconds
from the ask to the probe's `__init__`, whether its process was there before the ask, and what it sees as
CUDA_VISIBLE_DEVICES. Variants alternate. Prints a table and writes JSON.

    python benchmarks/actor_start.py --procs 4 --repeats 3 --out benchmarks/results/cpu-actor-start.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from timing import write_results  # noqa: E402  (benchmarks/timing.py, beside this script; no torch here)


def one_row(variant: str, procs: int, cpus: int) -> dict:
    import ray

    from ulsweep.config import experiment_from_dict
    from ulsweep.sweep import driver, precompile

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ["CUDA_VISIBLE_DEVICES"] = "0"
    real_init = ray.init
    ray.init = lambda **kw: real_init(num_cpus=cpus, num_gpus=1, **kw)  # noqa: E731 - a GPU node, on paper
    try:
        if not driver._init_ray(None, False):
            raise SystemExit("Ray was running already")
    finally:
        ray.init = real_init
    try:
        time.sleep(2.0)  # the workers Ray starts ahead, up (as by the time a sweep's driver has opened its run)
        exp = experiment_from_dict({"name": "probe", "data": {"path": "builtin:digits"},
                                    "resources": {"gpus_per_worker": 0.5}})
        placed = precompile.gpu_node_options(exp, workers_keep_gpus=variant == "kept")

        @ray.remote
        class Probe:
            def __init__(self):
                from ulsweep.sweep.clock import process_start_time

                self.t_init, self.started = time.time(), process_start_time()

            def seen(self):
                return self.t_init, self.started, os.environ.get("CUDA_VISIBLE_DEVICES")

        @ray.remote(num_cpus=0)
        class Trial:
            def __init__(self):
                import torch  # noqa: F401 - what a trial's process imports as it starts

            def ready(self):
                return True

        asked = time.time()
        probe = Probe.options(num_cpus=0, num_gpus=0, **placed).remote()
        trials = [Trial.remote() for _ in range(procs)]
        t_init, started, visible = ray.get(probe.seen.remote(), timeout=300)
        ray.get([t.ready.remote() for t in trials], timeout=300)
        wave_s = time.time() - asked
    finally:
        ray.shutdown()
    return {"variant": variant, "runtime_env": "runtime_env" in placed, "ask_to_init_s": t_init - asked,
            "process_before_ask": started is not None and started < asked, "visible": visible, "wave_s": wave_s}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--procs", type=int, default=4, help="trial-like actors importing torch beside the probe")
    p.add_argument("--cpus", type=int, default=2, help="the local Ray's CPUs (workers it starts ahead)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--one", choices=["runtime_env", "kept"], help=argparse.SUPPRESS)  # a row, in a process
    p.add_argument("--out", default=None, help="JSON file for the rows")
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(one_row(a.one, a.procs, a.cpus)))
        return 0
    import subprocess

    from ulsweep.sweep import precompile

    if not precompile.keep_gpus_env():
        print("this Ray does not read RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO: nothing to compare", file=sys.stderr)
        return 1
    rows = []
    for r in range(a.repeats):
        for variant in ("runtime_env", "kept"):  # each in a fresh process, alternating
            out = subprocess.run([sys.executable, __file__, "--one", variant, "--procs", str(a.procs),
                                  "--cpus", str(a.cpus)], capture_output=True, text=True, cwd=ROOT)
            if out.returncode != 0:
                print(f"{variant}: rc {out.returncode}\n{out.stderr[-2000:]}", file=sys.stderr)
                return 1
            rows.append({"repeat": r, **json.loads(out.stdout.strip().splitlines()[-1])})
    print(f"{'placed':>12} {'ask->init s':>12} {'worker ahead':>13} {'sees':>6} {'wave s':>8}   (medians, "
          f"{a.repeats} runs, {a.procs} trial-like actors importing torch beside it, {a.cpus} CPUs)")
    for variant in ("runtime_env", "kept"):
        mine = [x for x in rows if x["variant"] == variant]
        print(f"{variant:>12} {statistics.median(x['ask_to_init_s'] for x in mine):>12.2f} "
              f"{sum(x['process_before_ask'] for x in mine):>9}/{len(mine):<3} {mine[0]['visible']!r:>6} "
              f"{statistics.median(x['wave_s'] for x in mine):>8.2f}")
    write_results(a.out, {"procs": a.procs, "cpus": a.cpus}, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
