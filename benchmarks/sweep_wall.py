"""Wall time of a whole `ulsweep run`, where it went, and how busy the GPU was (issue 23).

Each variant runs the experiment through the real CLI in a fresh run directory, one after another in this one
call, so that their numbers compare side by side. Per variant it records:

    wall_s              the `ulsweep run` process, Ray start-up and report included
    gpu_busy_fraction   mean of NVML's utilization.gpu (the share of each sample period in which a kernel ran)
                        over the wall, sampled every --sample-s seconds on every visible GPU; null without NVML
    phases              trial-seconds per kind and phase, from each trial's MLflow timeline
                        (ulsweep/sweep/timeline.py): start, setup, first step (compile), train, evaluate, finish
    ready_s             per trial, seconds from its start to the end of its first optimizer step
    ready_after_first_max_s   the largest ready_s of the trials after the first of their architecture (the
                        issue's 15-s target). Architecture: kind and model shapes. Its first trial: of the trials
                        that started before any trial of the architecture was ready, the one slowest to be ready
                        (the one that compiled, where the others trained uncompiled meanwhile: gate_compile eager)
    process_trial       per trial, the how-manieth trial of its process it was (1: fresh; above: a reused one)
    precompile          what the sweep compiled ahead (resources.precompile: the sweep run's tag), if anything
    driver_phases_s     the driver's own steps, seconds each (the sweep run's tag `ulsweep.driver_phases`,
                        ulsweep/sweep/clock.py): the command's imports and checks, Ray, the groups, the
                        precompile tasks and the Tuner before the first trial; Tune's fit; Ray's shutdown, the
                        outcome, the MLflow runs closed, the summary and the dashboard after the last
    training_share      share of the trials' span during which at least one trial was training
    gpu_busy_by_phase   per kind and phase, the mean utilization of the GPU samples taken while at least one
                        trial of that kind was in that phase (a sample may count for several), and of those taken
                        while no trial was in any (the sweep's start and end): where the idle GPU time sits
    results             per trial its final metrics (bits/pixel, PSNR, rFD/rFID, gFD/gFID), to check that a lever
                        leaves them unchanged

A variant is NAME=SPEC, SPEC a comma-separated list of `KEY=VALUE` overrides (as `--set`) and `env:NAME=VALUE`
environment variables of the sweep process, e.g. the shared Inductor caches off against on:

    python benchmarks/sweep_wall.py experiments/lf_sweep.yaml --set 'search.space={...b = 0 slice...}' \\
        --variant 'cold=env:TORCHINDUCTOR_FORCE_DISABLE_CACHES=1' --variant warm= \\
        --out benchmarks/results/h200-lf-sweep-wall.json

Prints a table and writes JSON (top level: the first variant's wall_s, gpu_busy_fraction, trials and the
commit; every variant under "variants").
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from provenance import commit  # noqa: E402

STOP_GRACE_S = 90  # after --limit-s, how long the sweep gets to stop on SIGINT before it is killed
RESULT_METRICS = ("bpp", "bpp_se", "psnr", "rfid", "gfid", "base_bpp")  # and every rfd_*/gfd_*


class GpuSampler:
    """NVML utilization.gpu and memory of every visible GPU every `every_s` seconds in a thread; inactive
    (samples stay empty) without NVML or an NVIDIA driver."""

    def __init__(self, every_s: float):
        self.every_s, self.samples, self.error = every_s, [], None
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            self.names = [str(pynvml.nvmlDeviceGetName(h)) for h in self._handles]
        except Exception as e:  # noqa: BLE001 - no driver, no library: no GPU numbers
            self._nvml, self._handles, self.names, self.error = None, [], [], f"{type(e).__name__}: {e}"
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        if self._handles:
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self):
        while not self._stop.is_set():
            t = time.time()
            for i, h in enumerate(self._handles):
                u = self._nvml.nvmlDeviceGetUtilizationRates(h)
                m = self._nvml.nvmlDeviceGetMemoryInfo(h)
                self.samples.append((round(t, 2), i, int(u.gpu), round(m.used / 2**30, 3)))
            self._stop.wait(self.every_s)

    def busy_fraction(self, until: float | None = None) -> float | None:
        """Mean utilization over the samples taken up to `until` (epoch s; all of them by default)."""
        samples = [s for s in self.samples if until is None or s[0] <= until]
        return sum(s[2] for s in samples) / (100 * len(samples)) if samples else None


def nvidia_smi_samples(path: str, t0: float | None = None, t1: float | None = None) -> list[tuple[float, float]]:
    """(epoch s, utilization.gpu %) of an `nvidia-smi --query-gpu=timestamp,utilization.gpu,... --format=csv -l N`
    log (fig8_start.sh's gpu_util.csv; its timestamps are the machine's UTC) within [t0, t1] (all without them)."""
    from datetime import datetime, timezone

    out = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            cells = [c.strip() for c in line.split(",")]
            if n == 1 or len(cells) < 2 or not cells[1].endswith("%"):  # the header, a cut-off last line
                continue
            try:
                t = datetime.strptime(cells[0], "%Y/%m/%d %H:%M:%S.%f").replace(tzinfo=timezone.utc).timestamp()
                u = float(cells[1].rstrip("%").strip())
            except ValueError as e:
                raise SystemExit(f"{path}: line {n} is not an nvidia-smi sample ({e}): {line.strip()!r}") from None
            if (t0 is None or t >= t0) and (t1 is None or t <= t1):
                out.append((t, u))
    return out


def nvidia_smi_busy(path: str, t0: float | None = None, t1: float | None = None) -> tuple[float | None, int]:
    """Mean utilization.gpu (as a fraction) of an nvidia-smi log (`nvidia_smi_samples`) over the samples within
    [t0, t1], and how many samples that was."""
    utils = [u for _, u in nvidia_smi_samples(path, t0, t1)]
    return (sum(utils) / (100 * len(utils)) if utils else None), len(utils)


def busy_by_phase(timeline, samples: list[tuple[float, float]]) -> list[dict]:
    """Per kind and phase of `timeline` (ulsweep.report.timeline's frame: kind, phase, start, end per trial), the
    GPU samples (epoch s, utilization %) taken while at least one trial of that kind was in that phase: how many,
    and their mean utilization as a fraction; last, those taken while no trial was in any phase (kind "-", phase
    "outside")."""
    from ulsweep.sweep.timeline import PHASES

    spans = list(timeline[["kind", "phase", "start", "end"]].itertuples(index=False, name=None))
    seen: dict[tuple[str, str], list[float]] = {}
    for t, u in samples:
        pairs = {(kind, phase) for kind, phase, a, b in spans if a <= t <= b} or {("-", "outside")}
        for pair in pairs:
            seen.setdefault(pair, []).append(u)
    order = {p: i for i, p in enumerate(PHASES)}
    keys = sorted(seen, key=lambda kp: (kp[0] == "-", kp[0], order.get(kp[1], len(order))))
    return [{"kind": k, "phase": p, "samples": len(seen[k, p]),
             "gpu_busy": round(sum(seen[k, p]) / (100 * len(seen[k, p])), 3)} for k, p in keys]


def parse_variant(text: str) -> tuple[str, list[str], dict[str, str]]:
    name, _, spec = text.partition("=")
    if not name:
        raise SystemExit(f"--variant {text!r}: expected NAME=SPEC")
    sets, env = [], {}
    for item in filter(None, (x.strip() for x in spec.split(","))):
        if item.startswith("env:"):
            k, eq, v = item[4:].partition("=")
            if not eq:
                raise SystemExit(f"--variant {text!r}: {item!r} is not env:NAME=VALUE")
            env[k] = v
        elif "=" in item:
            sets.append(item)
        else:
            raise SystemExit(f"--variant {text!r}: {item!r} is neither KEY=VALUE nor env:NAME=VALUE")
    return name, sets, env


def run_limited(cmd: list[str], limit_s: float | None, grace_s: float = STOP_GRACE_S,
                **popen) -> tuple[int, float, bool]:
    """Run `cmd`; past `limit_s` seconds send it SIGINT (a user's Ctrl-C: ulsweep marks the runs KILLED and
    writes summary.json) and kill it if it is still there `grace_s` later. Returns (exit code, seconds until it
    exited or until the limit, whether the limit stopped it)."""
    t0 = time.time()
    proc = subprocess.Popen(cmd, **popen)
    try:
        return proc.wait(timeout=limit_s), time.time() - t0, False
    except subprocess.TimeoutExpired:
        wall = time.time() - t0
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        return rc, wall, True


def run_variant(experiment: str, name: str, sets: list[str], env_extra: dict[str, str], workdir: Path,
                sample_s: float, limit_s: float | None = None) -> dict:
    storage = workdir / f"runs-{name}"
    cmd = [sys.executable, "-m", "ulsweep.cli", "run", experiment, "--storage", str(storage)]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, **env_extra}
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.pop("MLFLOW_TRACKING_URI", None)
    log = workdir / f"log-{name}.txt"
    t0 = time.time()
    with GpuSampler(sample_s) as gpu, open(log, "w") as f:
        rc, wall, stopped = run_limited(cmd, limit_s, cwd=workdir, env=env, stdout=f, stderr=subprocess.STDOUT)
    run_dirs = [d for d in storage.iterdir() if (d / "sweep.json").exists()] if storage.exists() else []
    out = {"variant": name, "sets": sets, "env": env_extra, "rc": rc, "wall_s": round(wall, 1),
           "stopped_at_limit": stopped,
           "gpu_busy_fraction": gpu.busy_fraction(until=t0 + wall), "gpus": gpu.names, "gpu_error": gpu.error,
           "gpu_samples": len(gpu.samples), "log": str(log)}
    if gpu.samples:
        (workdir / f"gpu-{name}.csv").write_text("t,gpu,util_percent,mem_used_gib\n"
                                                 + "".join(",".join(map(str, s)) + "\n" for s in gpu.samples))
        out["gpu_mem_peak_gib"] = max(s[3] for s in gpu.samples)
    if not run_dirs:
        out["error"] = f"no run directory under {storage}; see {log}"
        return out
    out.update(sweep_numbers(str(run_dirs[0]), samples=[(t, u) for t, _, u, _ in gpu.samples]))
    return out


def sweep_numbers(sweep: str, tracking_uri: str | None = None,
                  samples: list[tuple[float, float]] | None = None) -> dict:
    """Trials, phases, readiness and final metrics of a finished (or stopped) sweep, from its MLflow store, and
    with the GPU's `samples` (epoch s, utilization %) how busy it was in each phase (`busy_by_phase`).
    `sweep`: its run directory, or its name or run id with `tracking_uri` (as `ulsweep report` takes it)."""
    import pandas as pd

    from ulsweep.report import timeline as tl
    from ulsweep.report.dashboard import resolve_sweep
    from ulsweep.report.sweepdata import load_sweep

    data = load_sweep(resolve_sweep(sweep, tracking_uri))
    runs = data.runs
    out: dict = {"sweep": sweep, "trials": int(len(runs)),
                 "finished": int((runs["status"] == "FINISHED").sum()) if len(runs) else 0}
    summary = Path(data.ref.run_dir or sweep) / "summary.json"
    if summary.exists():
        s = json.loads(summary.read_text())
        out["sweep_wall_s"] = s.get("wall_seconds")
    driver = data.parent.get("tags", {}).get("ulsweep.driver_phases")  # the driver's own steps (sweep/clock.py)
    if driver:
        out["driver_phases_s"] = json.loads(driver)
    if data.timeline is not None and not data.timeline.empty:
        out.update({k: round(v, 3) for k, v in tl.summary(data.timeline).items()})
        out["phases"] = tl.phase_table(data.timeline).round(3).to_dict("records")
        ready = tl.ready_seconds(data.timeline)
        out["ready_s"] = {r.key: round(r.ready_s, 2) for r in ready.itertuples()}
        out["process_trial"] = {r.key: int(r.process_trial) for r in ready.itertuples()
                                if not pd.isna(r.process_trial)}
        later = after_first_of_architecture(ready, runs)
        out["ready_after_first_max_s"] = round(float(later["ready_s"].max()), 2) if len(later) else None
        if samples:
            out["gpu_busy_by_phase"] = busy_by_phase(data.timeline, samples)
    precompiled = data.parent.get("tags", {}).get("ulsweep.precompile")  # resources.precompile's tasks
    if precompiled:
        out["precompile"] = json.loads(precompiled)
    cols = [c for c in runs.columns if c in RESULT_METRICS or c.startswith(("rfd_", "gfd_"))]
    out["results"] = {r["key"]: {c: r[c] for c in cols if r[c] == r[c]} for _, r in runs.iterrows()}
    return out


def architecture(row) -> tuple:
    """What fixes a trial's shapes, hence its compiled graphs: kind, image size and the model settings (the
    autoencoder's, and a base trial's own)."""
    cols = sorted(c for c in row.index if c == "data.image_size" or c.startswith("ae.model.")
                  or (row.get("kind") == "base" and c.startswith("base.model.")))
    return (row.get("kind"), *((c, row[c]) for c in cols if row[c] == row[c]))


def after_first_of_architecture(ready, runs):
    """The rows of `ready` (report.timeline.ready_seconds: key, start, ready_s) but the first trial of each
    architecture: of the trials that started before any trial of theirs was ready, the slowest to be ready."""
    arch = {r["key"]: architecture(r) for _, r in runs.iterrows()}
    group = ready["key"].map(lambda k: arch.get(k, (k,)))
    first = set()
    for _, g in ready.groupby(group, sort=False):
        early = g[g["start"] < (g["start"] + g["ready_s"]).min()]
        first.add(early.loc[early["ready_s"].idxmax(), "key"])
    return ready[~ready["key"].isin(first)]


def table(rows: list[dict]) -> str:
    from ulsweep.tracking import render_table

    flat = []
    for r in rows:
        ready = list((r.get("ready_s") or {}).values())
        flat.append({**r, "ready_median_s": sorted(ready)[len(ready) // 2] if ready else None,
                     "ready_max_s": max(ready) if ready else None})
    cols = ["variant", "rc", "trials", "finished", "wall_s", "gpu_busy_fraction", "training_share", "ready_median_s",
            "ready_max_s", "ready_after_first_max_s"]
    return render_table(flat, cols, floatfmt=".3g")


def phase_busy_table(row: dict) -> str:
    """A variant's `gpu_busy_by_phase` as a table (empty without GPU samples)."""
    from ulsweep.tracking import render_table

    phases = row.get("gpu_busy_by_phase") or []
    if not phases:
        return ""
    return f"GPU busy by phase ({row['variant']}):\n" + render_table(phases, ["kind", "phase", "samples", "gpu_busy"],
                                                                     floatfmt=".3g")


def precompile_lines(row: dict, phases: int = 4) -> str:
    """What a variant's sweep compiled ahead (its `precompile` entries, the sweep run's tag): per task the stage,
    how it got through the compile gate, seconds to its step's end and in all, those seconds by part
    (`step_parts_s`: build, setup, first_step, steps), and its step's `phases` longest compile phases
    (`step_phases_s`; the phases nest). Empty when nothing was compiled ahead."""
    lines = []
    for r in row.get("precompile") or []:
        what = f"base {r['base']}" if r.get("stage") == "base" else "ae"
        step = f", step {r['step_s']:.0f} s" if "step_s" in r else ""
        top = list((r.get("step_phases_s") or {}).items())[:phases]
        longest = ("; " + ", ".join(f"{n} {v:.0f} s" for n, v in top)) if top else ""
        parts = r.get("step_parts_s") or {}
        parts = (" (" + ", ".join(f"{n} {v:.1f}" for n, v in parts.items()) + ")") if parts else ""
        lines.append(f"  {what} x{r.get('members', 1)}: {r.get('compile_gate')}{step}{parts}, in all "
                     f"{r.get('seconds', 0):.0f} s{longest}")
    return f"Compiled ahead ({row['variant']}):\n" + "\n".join(lines) if lines else ""


def driver_line(row: dict) -> str:
    """The driver's own steps of a variant's sweep (`driver_phases_s`, the sweep run's tag: before its first trial
    and after its last), on one line; empty for a sweep from before they were recorded."""
    steps = row.get("driver_phases_s") or {}
    if not steps:
        return ""
    return f"Driver ({row['variant']}): " + ", ".join(f"{n} {v:.1f} s" for n, v in steps.items())


def print_details(row: dict) -> None:
    """A variant's tables after the main one: GPU busy by phase, what was compiled ahead, the driver's steps."""
    for text in (phase_busy_table(row), precompile_lines(row), driver_line(row)):
        if text:
            print(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("experiment", nargs="?", help="experiment YAML (e.g. experiments/lf_sweep.yaml)")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE for every variant")
    ap.add_argument("--variant", action="append", default=[],
                    help="NAME=SPEC: overrides and env:NAME=VALUE, comma-separated (default: one variant 'as-is')")
    ap.add_argument("--sample-s", type=float, default=1.0, help="GPU sampling period (s)")
    ap.add_argument("--workdir", default=None, help="where the sweeps run (default: a new temp dir)")
    ap.add_argument("--out", default=None, help="JSON report (default: <workdir>/sweep-wall.json)")
    ap.add_argument("--limit-s", type=float, default=None,
                    help="stop a variant's sweep with SIGINT after this many seconds (as Ctrl-C: runs KILLED, "
                         "summary written) and report what it did until then")
    ap.add_argument("--from-store", metavar="SWEEP", default=None,
                    help="run nothing: the numbers of an existing sweep (run dir, or name/run id with "
                         "--tracking-uri), e.g. one whose machine went away before its report was written")
    ap.add_argument("--tracking-uri", default=None, help="with --from-store: the sweep's MLflow store")
    ap.add_argument("--gpu-csv", default=None,
                    help="with --from-store: nvidia-smi's samples of the sweep's machine (fig8_start.sh's "
                         "gpu_util.csv) for gpu_busy_fraction")
    ap.add_argument("--window", nargs=2, type=float, metavar=("T0", "T1"), default=None,
                    help="with --from-store: the sweep's start and end (epoch s, e.g. run.json's t_start_unix, "
                         "t_end_unix): wall_s, and the GPU samples averaged")
    ap.add_argument("--commit", default=None, help="with --from-store: the commit whose code ran the sweep")
    args = ap.parse_args(argv)
    if args.from_store:
        t0, t1 = args.window or (None, None)
        samples = nvidia_smi_samples(args.gpu_csv, t0, t1) if args.gpu_csv else None
        row = {"variant": "from-store", **sweep_numbers(args.from_store, args.tracking_uri, samples)}
        if args.window:
            row["wall_s"] = round(t1 - t0, 1)
        if args.gpu_csv:
            row["gpu_busy_fraction"], row["gpu_samples"] = nvidia_smi_busy(args.gpu_csv, t0, t1)
        report = {"from_store": args.from_store, "tracking_uri": args.tracking_uri, "commit": args.commit,
                  "analysed_at_commit": commit(), "wall_s": row.get("wall_s"),
                  "gpu_busy_fraction": row.get("gpu_busy_fraction"), "trials": row.get("trials"), "variants": [row]}
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=1, default=str))
        print(table([row]))
        print_details(row)
        return 0
    if not args.experiment:
        ap.error("an experiment file is needed (or --from-store)")
    experiment = str(Path(args.experiment).absolute())
    if not Path(experiment).exists():
        ap.error(f"experiment file {args.experiment} not found")
    variants = [parse_variant(v) for v in args.variant] or [("as-is", [], {})]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="ulsweep-wall-")).absolute()
    workdir.mkdir(parents=True, exist_ok=True)
    out = Path(args.out or workdir / "sweep-wall.json")
    rows = []
    for name, sets, env in variants:
        print(f"[sweep_wall] {name}: ulsweep run {args.experiment} {' '.join(args.sets + sets)} {env or ''}",
              flush=True)
        rows.append(run_variant(experiment, name, args.sets + sets, env, workdir, args.sample_s, args.limit_s))
        print(f"  wall {rows[-1]['wall_s']:.0f} s, rc {rows[-1]['rc']}, GPU busy {rows[-1]['gpu_busy_fraction']}",
              flush=True)
        first = rows[0]
        report = {"experiment": args.experiment, "sets": args.sets, "commit": commit(), "cpus": os.cpu_count(),
                  "wall_s": first["wall_s"], "gpu_busy_fraction": first["gpu_busy_fraction"],
                  "trials": first.get("trials"), "variants": rows}
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=1, default=str))
        os.replace(tmp, out)  # after every variant: a cut-off call keeps what it measured
    print(table(rows))
    for row in rows:
        print_details(row)
    print(f"wrote {out}")
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
