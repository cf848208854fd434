"""Orchestration overhead of `ulsweep run`: how much of a sweep's wall time is not spent in training loops.

    overhead = (sweep wall - time inside training loops) / sweep wall          (max_concurrent = 1)
    overhead = 1 - (sum of time inside training loops) / (slots x sweep wall)  (slots = max_concurrent)

"Time inside training loops" is measured around each train_autoencoder / train_base call in the Ray Train
worker (data loading, model build, steps, final evaluation, checkpoints); "steps" is the loops' own
train_seconds (optimizer steps only). Sweep wall is the `ulsweep run` process, Ray start-up included
("cli wall"), and run_sweep's own wall ("sweep wall", what the formula uses). Each configuration runs in a
fresh run directory through the real CLI. Per-trial start-up (trial function start -> loop start) and
tear-down (loop end -> fit() returns) come from <run dir>/trials/<key>/timings.jsonl.

    python benchmarks/orchestration.py                         # quickstart: workers mode and local mode
    python benchmarks/orchestration.py --modes workers --concurrency 1
    python benchmarks/orchestration.py --label 2min --set ae.train.steps=1100 \\
        --set base_models.0.train.steps=2400 --set 'search.space={ae.loss.loss_factor: {values: [1.5, 4.0]}}'
    python benchmarks/orchestration.py --train-impl fake --fake-step-s 0.4   # pure orchestration, no compute

Writes a JSON report (--out, default <workdir>/orchestration-<label>.json) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODES = {"workers": 1, "local": 0}  # resources.num_workers: 1 = a Ray Train worker actor; 0 = local mode


def load_avg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def run_one(experiment: str, mode: str, concurrency: int | None, sets: list[str], train_impl: str,
            fake_step_s: float | None, workdir: Path) -> dict:
    storage = workdir / f"runs-{mode}-{concurrency or 'file'}"
    cmd = [sys.executable, "-m", "ulsweep.sweep.cli", "run", experiment, "--storage", str(storage),
           "--set", f"resources.num_workers={MODES[mode]}", "--train-impl", train_impl]
    if concurrency:
        cmd += ["--set", f"search.max_concurrent={concurrency}"]
    for s in sets:
        cmd += ["--set", s]
    env = dict(os.environ)
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.pop("MLFLOW_TRACKING_URI", None)
    if fake_step_s is not None:
        env["ULSWEEP_FAKE_STEP_S"] = str(fake_step_s)
    load0 = load_avg()
    t0 = time.time()
    p = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True)
    cli_wall = time.time() - t0
    (workdir / f"log-{mode}-{concurrency or 'file'}.txt").write_text(p.stdout + "\n--- stderr ---\n" + p.stderr)
    run_dirs = [d for d in storage.iterdir() if (d / "summary.json").exists()] if storage.exists() else []
    if not run_dirs:
        raise SystemExit(f"{mode}: sweep produced no summary (rc {p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    run_dir = run_dirs[0]
    summary = json.loads((run_dir / "summary.json").read_text())
    from ulsweep.config import load_experiment, parse_overrides

    exp = load_experiment(experiment, parse_overrides(
        [f"resources.num_workers={MODES[mode]}"] + ([f"search.max_concurrent={concurrency}"] if concurrency else [])
        + sets))
    slots = exp.search.max_concurrent
    trials = []
    for tdir in sorted((run_dir / "trials").iterdir()):
        f = tdir / "timings.jsonl"
        if not f.exists():
            continue
        for line in f.read_text().splitlines():
            r = json.loads(line)
            if r.get("error") or r.get("loop_seconds") is None:
                continue
            trials.append({"key": tdir.name, "loop_s": r["loop_seconds"], "steps_s": r["train_seconds"],
                           "startup_s": r["t_loop"] - r["t_trial"], "teardown_s": r["t_fit_end"] - r["t_loop_end"],
                           "trial_s": r["t_fit_end"] - r["t_trial"]})
    wall = summary["wall_seconds"]
    loop = sum(t["loop_s"] for t in trials)
    steps = sum(t["steps_s"] for t in trials)
    overhead = (wall - loop) / wall if slots == 1 else 1 - loop / (slots * wall)
    return {
        "mode": mode, "num_workers": MODES[mode], "slots": slots, "rc": p.returncode,
        "counts": summary["counts"], "n_trials": len(trials),
        "cli_wall_s": cli_wall, "sweep_wall_s": wall, "loop_s": loop, "steps_s": steps,
        "overhead": overhead, "overhead_vs_steps": (1 - steps / (slots * wall)) if slots > 1 else (wall - steps) / wall,
        "median_trial_s": statistics.median(t["trial_s"] for t in trials) if trials else None,
        "median_startup_s": statistics.median(t["startup_s"] for t in trials) if trials else None,
        "median_teardown_s": statistics.median(t["teardown_s"] for t in trials) if trials else None,
        "median_loop_s": statistics.median(t["loop_s"] for t in trials) if trials else None,
        "setup_s": (summary.get("phases") or {}).get("setup"), "tune_fit_s": (summary.get("phases") or {}).get("tune_fit"),
        "load_avg_before": load0, "load_avg_after": load_avg(), "trials": trials,
        "run_dir": str(run_dir),
    }


def table(rows: list[dict]) -> str:
    from ulsweep.tracking import render_table

    cols = ["mode", "slots", "n_trials", "cli_wall_s", "sweep_wall_s", "setup_s", "loop_s", "steps_s", "overhead",
            "overhead_vs_steps", "median_trial_s", "median_loop_s", "median_startup_s", "median_teardown_s",
            "load_avg_before"]
    return render_table(rows, cols, floatfmt=".3g")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--experiment", default=str(REPO / "experiments" / "quickstart.yaml"))
    ap.add_argument("--modes", default="workers,local", help="comma list of: workers (num_workers 1), local (0)")
    ap.add_argument("--concurrency", type=int, default=None, help="search.max_concurrent (default: the file's)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="extra KEY=VALUE overrides")
    ap.add_argument("--train-impl", default="ulsweep", choices=["ulsweep", "fake"])
    ap.add_argument("--fake-step-s", type=float, default=None, help="seconds per step of the fake loop")
    ap.add_argument("--label", default="quickstart")
    ap.add_argument("--workdir", default=None, help="where the sweeps run (default: a temp dir)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ulsweep-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for mode in args.modes.split(","):
        print(f"[{args.label}] running mode={mode} ...", flush=True)
        r = run_one(str(Path(args.experiment).absolute()), mode, args.concurrency, args.sets, args.train_impl,
                    args.fake_step_s, workdir)
        print(f"  {mode}: wall {r['sweep_wall_s']:.0f} s, overhead {r['overhead']:.1%}, {r['counts']}", flush=True)
        rows.append(r)
    print(table(rows))
    report = {"label": args.label, "experiment": args.experiment, "sets": args.sets, "train_impl": args.train_impl,
              "fake_step_s": args.fake_step_s, "cpus": os.cpu_count(), "time": time.time(), "results": rows}
    out = Path(args.out or workdir / f"orchestration-{args.label}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
