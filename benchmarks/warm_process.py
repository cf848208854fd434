"""What a warm trial process saves (issue 23): stage-1 runs of one architecture, as a sweep's trials, in fresh
processes against one reused process.

    fresh   each run in a new Python process (`resources.reuse_processes: off`); all runs of the variant share
            one Inductor cache folder on disk, so runs after the first load their compiled code from it
    warm    every run in one process, in its one trial thread (`reuse_processes: on`, ulsweep/sweep/trial_thread.py):
            runs after the first find Dynamo's compiled graphs, cuDNN's choices and (CUDA graphs) the per-thread
            graph trees of the process

Each variant starts from an Inductor cache folder of its own, cold. The runs differ in the loss factor only (as
lf_sweep's trials), each trains `--steps` steps and evaluates with `eval.extractor: none`. Per run:

    ready_s        from the run being asked for (a fresh process launched; a warm process handed the run) to the
                   end of its first optimizer step: the issue's "ready to train"
    imports_s      fresh processes: launch to torch and ulsweep imported (a warm run has nothing to import)
    setup_s        data, networks, optimizer (the loop's setup phase)
    first_step_s   the first optimizer step: compiling or loading compiled code, CUDA-graph capture
    graphs         Dynamo graphs this process has compiled by the end of the run
    rss_gib        the process's resident memory after the run; cuda_reserved_gib what its CUDA caching allocator
                   holds then (None without CUDA): whether a warm process keeps growing from trial to trial

    python benchmarks/warm_process.py --runs 3 --steps 20 --out benchmarks/results/cpu-warm-process.json
    python benchmarks/warm_process.py experiments/lf_sweep.yaml --runs 3 --steps 50 \\
        --out benchmarks/results/h200-warm-process.json          # on a GPU: lf_sweep's reduce-overhead

Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
LOSS_FACTORS = (1.5, 4.0, 2.0, 3.0, 1.75, 2.5)


def run_overrides(steps: int, i: int, sets: list[str]) -> dict:
    from ulsweep.config.loading import parse_overrides

    out = parse_overrides(sets)
    out.update({"ae.loss.loss_factor": LOSS_FACTORS[i % len(LOSS_FACTORS)], "ae.train.steps": steps,
                "ae.train.ckpt_every": steps, "ae.train.eval_every": 0, "eval.extractor": "none",
                "search.metrics": ["bpp"], "search.modes": ["min"], "base_models": []})
    return out


def child(a) -> list[dict]:
    """Runs `a.child_runs` in this process's trial thread; one record per run (seconds since the epoch)."""
    import torch
    from torch._dynamo.utils import counters

    from ulsweep.config import load_experiment
    from ulsweep.sweep import trial_thread
    from ulsweep.train.stage1 import train_autoencoder

    t_imported = time.time()
    out = []
    for i in a.child_runs:
        exp = load_experiment(a.experiment, run_overrides(a.steps, i, a.sets))
        t_asked = time.time()
        res = trial_thread.run(train_autoencoder, exp, os.path.join(a.workdir, f"run{i}"))
        m = res.extra.get("marks", {})
        out.append({"run": i, "t_asked": t_asked, "t_imported": t_imported, **{k: m.get(k) for k in (
            "t_setup_end", "t_first_step_end", "t_train_end")}, "t_done": time.time(),
            "graphs": int(counters["stats"].get("unique_graphs", 0)), "bpp": res.metrics.get("bpp"),
            "rss_gib": resident_gib(), "cuda_reserved_gib": torch.cuda.memory_reserved() / 2**30
            if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
            "device": "cuda" if torch.cuda.is_available() else "cpu"})
        t_imported = None  # the next run of this process imports nothing
    return out


def resident_gib() -> float | None:
    """This process's resident set (Linux /proc), GiB."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):
        return None


def spawn(a, runs: list[int], cache: str) -> list[dict]:
    """One child process for `runs`; the first run is asked for when the process is launched."""
    path = os.pathsep.join(p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "PYTHONPATH": path}
    t_launch = time.time()
    cmd = [sys.executable, os.path.abspath(__file__), a.experiment, "--steps", str(a.steps), "--workdir", a.workdir,
           "--child-runs", *map(str, runs), *[x for s in a.sets for x in ("--set", s)]]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if p.returncode != 0:
        raise SystemExit(f"warm_process child {runs} failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
    recs = json.loads(p.stdout.strip().splitlines()[-1])
    recs[0]["t_asked"] = t_launch  # a fresh process: asked for at its launch
    return recs


def row(variant: str, r: dict) -> dict:
    def span(a, b):
        return None if r.get(a) is None or r.get(b) is None else round(r[b] - r[a], 3)

    return {"variant": variant, "run": r["run"], "ready_s": span("t_asked", "t_first_step_end"),
            "imports_s": span("t_asked", "t_imported"),
            "setup_s": span("t_imported" if r.get("t_imported") else "t_asked", "t_setup_end"),
            "first_step_s": span("t_setup_end", "t_first_step_end"), "graphs": r["graphs"], "bpp": r["bpp"],
            "rss_gib": r["rss_gib"], "cuda_reserved_gib": r["cuda_reserved_gib"], "device": r["device"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("experiment", nargs="?", default=os.path.join(REPO, "experiments", "quickstart.yaml"))
    ap.add_argument("--runs", type=int, default=3, help="runs per variant (>= 2: the later ones are the point)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE override of every run")
    ap.add_argument("--variants", nargs="+", default=["fresh", "warm"], choices=["fresh", "warm"])
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--child-runs", type=int, nargs="+", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child_runs is not None:
        print(json.dumps(child(a)))
        return 0
    if a.runs < 2:
        ap.error("--runs must be >= 2: the runs after the first are what a warm process changes")
    sys.path.insert(0, REPO)
    from ulsweep.tracking import render_table

    root = a.workdir or tempfile.mkdtemp(prefix="warm-process-")
    rows = []
    for variant in a.variants:
        a.workdir = os.path.join(root, variant)
        cache = os.path.join(root, f"inductor-{variant}")  # cold at the variant's start
        runs = list(range(a.runs))
        recs = [r for i in runs for r in spawn(a, [i], cache)] if variant == "fresh" else spawn(a, runs, cache)
        rows += [row(variant, r) for r in recs]
        print(render_table(rows[-len(recs):], list(rows[0]), floatfmt=".3g"), flush=True)
    result = {"experiment": os.path.relpath(os.path.abspath(a.experiment), REPO), "steps": a.steps,
              "sets": a.sets, "rows": rows}
    out = a.out or os.path.join(root, "warm-process.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(render_table(rows, list(rows[0]), floatfmt=".3g"))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
