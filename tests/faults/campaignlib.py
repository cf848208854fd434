"""What the new fault tests and benchmarks/faults/campaign.py share, on top of faultlib: a driver run in the
background that a test acts on while it runs (SIGINT, SIGKILL of it or of one trial's training process, a
storage window), storage windows (ulsweep.testing.faults.storage), and the one checker that compares a
disturbed sweep's MLflow store and summary.json with an undisturbed run's.

The checker returns its findings as lines (the campaign counts them; a test asserts there are none). It is
built from faultlib's MLflow readers and test_driver_kill's check of the sweep run's best/* and trials/*
against summary.json."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

from faultlib import curve_steps, mlflow_state, tail
from ulsweep import tracking

# ----------------------------------------------------------------------------------------------
# a driver in the background


class Driver:
    """`ulsweep run ...` started in its own session, output appended to `log`."""

    def __init__(self, args: list[str], env: dict, cwd: Path, log: Path, note: str = ""):
        self.log = log
        with open(log, "a") as f:
            f.write(f"\n===== {' '.join(map(str, args[2:]))}  {note}\n")
            f.flush()
            self.start = log.stat().st_size
            self.p = subprocess.Popen(args, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT,
                                      start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[self.start:]

    def wait_for(self, ready, what: str, timeout: float = 300, poll: float = 0.1) -> None:
        """Until ready() is true; AssertionError when the driver ends first or `timeout` passes (a guard
        against a hang, not a speed limit)."""
        deadline = time.time() + timeout
        while not ready():
            assert self.p.poll() is None, f"the driver ended (rc {self.p.returncode}) before {what}:\n" \
                                          f"{tail(self.log)}"
            assert time.time() < deadline, f"{what} never happened:\n{tail(self.log)}"
            time.sleep(poll)

    def wait_for_line(self, text: str, timeout: float = 300) -> None:
        self.wait_for(lambda: text in self.output(), repr(text), timeout)

    def signal(self, sig: int) -> None:
        os.kill(self.p.pid, sig)

    def finish(self, timeout: float = 400) -> int:
        """Wait for the driver's end; whatever it leaves in its session is killed (faultlib.sandbox reaps the
        rest). Returns its exit code (-9 when it was SIGKILLed)."""
        try:
            self.p.wait(timeout=timeout)
        finally:
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.p.wait()
        return self.p.returncode


def training_pid(pid_dir: Path, key: str, ray_tmp: str) -> int | None:
    """The PID of the process training trial `key` now (ULSWEEP_FAULT_PIDS=pid_dir: ulsweep.testing.faults
    records it at the trial's metric points), if it is alive and one of this test's processes."""
    from faultlib import pids_of

    try:
        pid = int((Path(pid_dir) / f"{key}.pid").read_text())
    except (OSError, ValueError):
        return None
    return pid if pid in pids_of(ray_tmp) else None


# ----------------------------------------------------------------------------------------------
# storage windows (ULSWEEP_FAULT_STORAGE)


class StorageWindow:
    """While open, ulsweep's writes under `prefix` raise OSError(`code`): what a read-only remount (EROFS) or
    a full disk (ENOSPC) does to them. The control file is written atomically (renamed into place)."""

    def __init__(self, control_dir: Path, name: str, code: str, prefix: Path | str):
        self.path = Path(control_dir) / name
        self.code, self.prefix = code, str(prefix)
        self.opened = self.closed = None

    def open(self) -> "StorageWindow":
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(f"{self.code} {self.prefix}")
        os.replace(tmp, self.path)
        self.opened = time.time()
        return self

    def close(self) -> None:
        self.path.unlink(missing_ok=True)
        self.closed = time.time()


# ----------------------------------------------------------------------------------------------
# the checker


def sweep_snapshot(run_dir: Path) -> dict:
    """What the checker compares, read once: per trial key its MLflow runs (status, parent, tags), the
    steps of every metric key, the objective values; the sweep run's metrics; summary.json."""
    c, by_key = mlflow_state(run_dir)
    runs = {}
    for key, rs in by_key.items():
        runs[key] = []
        for r in rs:
            metrics = {k: sorted(m.step for m in c.get_metric_history(r.info.run_id, k)) for k in r.data.metrics}
            runs[key].append({"run_id": r.info.run_id, "status": r.info.status, "tags": dict(r.data.tags),
                              "metrics": metrics, "values": dict(r.data.metrics),
                              "loss_steps": curve_steps(c, r.info.run_id) if key != "sweep" else []})
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
    return {"runs": runs, "summary": summary, "client": c}


def check_sweep(run_dir: Path, reference: dict | None = None) -> list[str]:
    """Problems of the sweep in `run_dir`, compared with `reference` (sweep_snapshot of an undisturbed run
    of the same experiment) where given:

    - one MLflow run per trial key, every run FINISHED, the same keys as the reference;
    - lineage: every run tagged with the sweep, AE runs children of the sweep run, base runs of their AE run;
    - every metric key of every trial logged at the reference's steps (one point per step: no gap, no
      double; a final metric such as bpp, eval_* or gflops exactly once), objectives logged once each with
      the reference's values; wall-clock metrics (WALL_CLOCK_METRICS) are not compared, and time/* is
      logged at most once;
    - summary.json: finished, the reference's counts, statuses and objectives; the sweep run's best/* and
      trials/* equal to it (test_driver_kill.assert_metrics_match_summary)."""
    problems: list[str] = []
    try:
        snap = sweep_snapshot(run_dir)
    except Exception as e:  # noqa: BLE001 - an unreadable store is a finding, not a crash of the checker
        return [f"{run_dir}: cannot read the sweep ({type(e).__name__}: {e})"]
    runs, summary = snap["runs"], snap["summary"]
    for key, rs in sorted(runs.items()):
        if len(rs) != 1:
            problems.append(f"{key}: {len(rs)} MLflow runs ({[r['status'] for r in rs]})")
        problems += [f"{key}: run {r['run_id']} is {r['status']}" for r in rs if r["status"] != "FINISHED"]
    one = {k: rs[0] for k, rs in runs.items() if rs}
    sweep = one.get("sweep")
    if sweep is None:
        return problems + ["no sweep run"]
    for key, r in one.items():
        if r["tags"].get(tracking.TAG_SWEEP) != sweep["run_id"]:
            problems.append(f"{key}: not tagged with the sweep {sweep['run_id']}")
        if key == "sweep":
            continue
        ae = key if r["tags"].get(tracking.TAG_KIND) == "ae" else r["tags"].get("ulsweep.ae_key")
        want_parent = sweep["run_id"] if key == ae else one.get(ae, {}).get("run_id")
        if r["tags"].get(tracking.TAG_PARENT) != want_parent:
            problems.append(f"{key}: parent {r['tags'].get(tracking.TAG_PARENT)} is not {want_parent} "
                            f"({'the sweep run' if key == ae else ae})")
        steps = r["loss_steps"]
        if steps != sorted(set(steps)):
            problems.append(f"{key}: loss curve has doubled steps {steps}")
        for m, st in r["metrics"].items():
            if m.startswith("objective/") and len(st) != 1:
                problems.append(f"{key}: {m} logged {len(st)} times")
            if m.startswith("time/") and len(st) > 1:  # seconds per phase: once, by the first finished attempt
                problems.append(f"{key}: {m} logged {len(st)} times")
    if summary is None:
        problems.append("no summary.json")
    else:
        if not summary.get("finished"):
            problems.append("summary.json: the sweep did not finish")
        bad = {t["key"]: t["status"] for t in summary["trials"] if t["status"] != "done"}
        bad |= {f"{t['key']}-{b}": s["status"] for t in summary["trials"] for b, s in t["bases"].items()
                if s["status"] != "done"}
        if bad:
            problems.append(f"summary.json: trials not done: {bad}")
        try:
            from test_driver_kill import assert_metrics_match_summary

            assert_metrics_match_summary(snap["client"], run_dir)
        except AssertionError as e:
            problems.append(f"sweep run's best/* or trials/* differ from summary.json: {str(e)[:300]}")
        except KeyError as e:  # no best/<metric> on the sweep run
            problems.append(f"sweep run lacks {e}")
    if reference is not None:
        problems += _compare(snap, reference)
    return problems


_TIMING = ("loop_seconds", "train_seconds", "images_per_s", "t_")


# metrics of the wall clock, not of training: sampled every tracking.system_metrics_s seconds (system/), or the
# seconds of each phase of the attempt that finished (time/, which a re-run trial may split differently)
WALL_CLOCK_METRICS = ("system/", "time/")


def _compare(snap: dict, ref: dict) -> list[str]:
    problems = []
    keys, want = set(snap["runs"]), set(ref["runs"])
    if keys != want:
        problems.append(f"trial keys differ from the reference: missing {sorted(want - keys)}, extra "
                        f"{sorted(keys - want)}")
    for key in sorted(keys & want - {"sweep"}):
        got, exp = snap["runs"][key][0], ref["runs"][key][0]
        for m in sorted(set(got["metrics"]) | set(exp["metrics"])):
            if m.startswith(WALL_CLOCK_METRICS):
                continue
            if m not in exp["metrics"] or m not in got["metrics"]:
                problems.append(f"{key}: metric {m} {'missing' if m in exp['metrics'] else 'unexpected'}")
            elif got["metrics"][m] != exp["metrics"][m]:
                problems.append(f"{key}: {m} logged at steps {_short(got['metrics'][m])}, reference "
                                f"{_short(exp['metrics'][m])}")
            elif m.startswith("objective/") and not _close(got["values"][m], exp["values"][m]):
                problems.append(f"{key}: {m} = {got['values'][m]}, reference {exp['values'][m]}")
    s, r = snap["summary"], ref["summary"]
    if s is not None and r is not None:
        if s["counts"] != r["counts"]:
            problems.append(f"summary.json counts {s['counts']}, reference {r['counts']}")
        got = {t["key"]: t["objective"] for t in s["trials"]}
        exp = {t["key"]: t["objective"] for t in r["trials"]}
        if set(got) != set(exp) or any(not _close_list(got[k], exp[k]) for k in exp if k in got):
            problems.append(f"summary.json objectives {got}, reference {exp}")
    return problems


def _close(a, b, rel: float = 1e-6) -> bool:
    return a == b or (a is not None and b is not None and math.isclose(a, b, rel_tol=rel, abs_tol=1e-12))


def _close_list(a, b) -> bool:
    return (a is None) == (b is None) and (a is None or (len(a) == len(b) and all(map(_close, a, b))))


def _short(steps: list[int]) -> str:
    return str(steps) if len(steps) <= 12 else f"{steps[:5]}..{steps[-5:]} ({len(steps)} points)"
