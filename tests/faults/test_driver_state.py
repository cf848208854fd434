"""The sweep driver's own state under three faults (issue 24), on one small sweep (2 AE trials, 1 base model
each, fake training loops, real Ray Tune / MLflow code) driven like a user would, `ulsweep run`:

1. the driver is SIGKILLed right after creating the sweep's MLflow run, before that run's id reaches
   sweep.json: sweep.json (pending, holding the token the run is tagged with) was written first, and
   `--resume` adopts the run instead of leaving it RUNNING beside a second one;
2. the resumed driver gets SIGINT (Ctrl-C) once the first AE trial is done: Tune stops the trials, the runs
   still RUNNING are marked KILLED, exit code 130; the next `--resume` finishes the sweep, and the sweep
   run's best/<objective> and trials/* equal summary.json's after each of the two runs;
3. damaged state files of the finished sweep (sweep.json, Tune's trial table, Tuner settings, search
   generator and searcher state, mlflow.db): `--resume` stops with a one-line error naming the file and what
   to do, exit code 2, before Ray starts, and changes nothing.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from faultlib import cli, fake_experiment, mlflow_state, run_driver, sandbox, tail, write_yaml
from ulsweep import tracking
from ulsweep.cli import main
from ulsweep.config import experiment_from_dict
from ulsweep.sweep import lineage
from ulsweep.sweep.state import DamagedStateError, identity, read_state


SWEEP_RUN_KILL = "driver.sweep_run@1"


def interrupt_when(args: list[str], env: dict, cwd: Path, log: Path, line: str, timeout: float = 300):
    """Run `ulsweep run ...`, send it SIGINT once `line` shows in its output, and wait for it to end."""
    with open(log, "a") as f:
        f.write(f"\n===== {' '.join(map(str, args[2:]))}  SIGINT after {line!r}\n")
        f.flush()
        start = log.stat().st_size
        p = subprocess.Popen(args, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + timeout  # a guard against a hang, not a speed limit
            while line not in log.read_text()[start:]:
                assert p.poll() is None, f"the driver ended before {line!r}:\n{tail(log)}"
                assert time.time() < deadline, f"{line!r} never showed:\n{tail(log)}"
                time.sleep(0.1)
            os.kill(p.pid, signal.SIGINT)
            p.wait(timeout=timeout)
        finally:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
    return p


def sweep_metrics(c, run_dir: Path) -> tuple[dict, dict, object]:
    """(the sweep run's best/* and trials/* metrics, summary.json, the sweep run)."""
    state = json.loads((run_dir / "sweep.json").read_text())
    run = c.get_run(state["sweep_id"])
    ours = {k: v for k, v in run.data.metrics.items() if k.startswith(("best/", "trials/"))}
    return ours, json.loads((run_dir / "summary.json").read_text()), run


def assert_metrics_match_summary(c, run_dir: Path) -> dict:
    ours, summary, _ = sweep_metrics(c, run_dir)
    counts = {k[len("trials/"):]: v for k, v in ours.items() if k.startswith("trials/")}
    assert counts == {**{k: 0.0 for k in counts}, **{k: float(v) for k, v in summary["counts"].items()}}, \
        (ours, summary["counts"])
    objectives = [t["objective"][0] for t in summary["trials"] if t["objective"]]
    if objectives:
        assert ours["best/gfd_fake"] == min(objectives)
        best = next(t for t in summary["trials"] if t["key"] == summary["best"][0])
        assert ours["best/gfd_fake"] == best["objective"][0]
    return summary


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Runs the sweep through faults 1 and 2 and records what each stage left: {stage: facts}."""
    tmp_path = tmp_path_factory.mktemp("driver-state")
    f = write_yaml(tmp_path, fake_experiment("ds", n_ae=2))
    run_dir = tmp_path / "runs" / "ds"
    log = tmp_path / "driver.log"
    args = cli(f, "--storage", tmp_path / "runs")
    seen: dict = {}
    with sandbox(tmp_path, step_s=0.15) as (env, _):
        p = run_driver(args, env, tmp_path, log, fault=SWEEP_RUN_KILL)
        assert p.returncode == -signal.SIGKILL, f"never killed (rc {p.returncode}):\n{tail(log)}"
        state = json.loads((run_dir / "sweep.json").read_text())
        c = tracking.client(state["tracking_uri"])
        from mlflow.entities import ViewType

        exp = c.get_experiment_by_name("ds")
        killed_runs = c.search_runs([exp.experiment_id], run_view_type=ViewType.ALL)
        seen["killed"] = (state, [(r.info.run_id, r.info.status, dict(r.data.tags)) for r in killed_runs])

        p = interrupt_when(args + ["--resume"], env, tmp_path, log, "done   ae-0000 ")
        c, by_key = mlflow_state(run_dir)
        seen["interrupted"] = (p.returncode, {k: [r.info.status for r in rs] for k, rs in by_key.items()},
                               assert_metrics_match_summary(c, run_dir))

        p = run_driver(args + ["--resume"], env, tmp_path, log)
        assert p.returncode == 0, tail(log)
    return tmp_path, run_dir, f, log, seen


@pytest.mark.slow
def test_a_driver_killed_before_sweep_json_is_complete_leaves_a_run_resume_adopts(sweep):
    tmp_path, run_dir, _, log, seen = sweep
    state, runs = seen["killed"]
    assert state["sweep_id"] is None and state["sweep_token"]  # written before the run existed
    assert [(status, tags["ulsweep.sweep_token"]) for _, status, tags in runs] == [("RUNNING", state["sweep_token"])]
    adopted = runs[0][0]
    final = json.loads((run_dir / "sweep.json").read_text())
    assert final["sweep_id"] == adopted and final["sweep_token"] == state["sweep_token"]
    assert f"resume: adopted sweep run {adopted}" in log.read_text()
    c, by_key = mlflow_state(run_dir)
    assert [r.info.run_id for r in by_key["sweep"]] == [adopted]  # one sweep run, the killed driver's
    assert {k: [r.info.status for r in rs] for k, rs in by_key.items()} == \
        {k: ["FINISHED"] for k in ("sweep", "ae-0000", "ae-0001", "ae-0000-tiny", "ae-0001-tiny")}


@pytest.mark.slow
def test_ctrl_c_stops_cleanly_and_sweep_metrics_are_recomputed_at_every_end(sweep):
    tmp_path, run_dir, _, log, seen = sweep
    rc, statuses, summary = seen["interrupted"]
    assert rc == 130, tail(log)
    assert summary["finished"] is False and summary["counts"] != {"ae_done": 2, "base_done": 2}, \
        "the interrupt came after the end: this test tests nothing"
    assert statuses["sweep"] == ["KILLED"]
    assert not [k for k, s in statuses.items() if "RUNNING" in s], statuses
    assert "sweep stopped before its end; continue it with --resume" in log.read_text()
    c, _ = mlflow_state(run_dir)
    final = assert_metrics_match_summary(c, run_dir)
    assert final["finished"] is True and final["counts"] == {"ae_done": 2, "base_done": 2}
    ours, _, run = sweep_metrics(c, run_dir)
    assert run.info.status == "FINISHED" and ours["trials/ae_done"] == 2.0


DAMAGE = {  # file (glob under the run dir) -> (new bytes, what the error says)
    "sweep.json": (b'{"sweep_id": "x", "tracking', "damaged sweep state"),
    "tune/experiment_state-*.json": (b'{"trial_data": [["{\\"stub', "damaged Tune trial table"),
    "tune/tuner.pkl": (b"\x80\x04garbage", "damaged Tuner settings"),
    "tune/search_gen_state-*.json": (b"garbage", "damaged search generator state"),
    "tune/searcher-state-*.pkl": (b"garbage", "damaged searcher state"),
    "mlflow.db": (b"SQLite format 3\x00" + b"\xff" * 4000, "damaged MLflow store"),
}


@pytest.mark.slow
@pytest.mark.parametrize("pattern", list(DAMAGE))
def test_damaged_state_file_is_named_before_anything_starts(sweep, pattern, monkeypatch, capsys):
    tmp_path, run_dir, f, _, _ = sweep
    path = sorted(run_dir.glob(pattern))[-1]  # the newest: the one Tune reads
    keep = {p: p.read_bytes() for p in (path, run_dir / "summary.json", run_dir / "sweep.json")}
    data, says = DAMAGE[pattern]
    path.write_bytes(data)

    def no_ray(*a, **k):
        raise AssertionError("Ray started over a damaged state file")

    import ray

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.chdir(tmp_path)
    try:
        rc = main(["run", str(f), "--storage", str(tmp_path / "runs"), "--resume", "--train-impl", "fake"])
        err = capsys.readouterr().err
    finally:
        path.write_bytes(keep[path])
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: {path}: {says}"), lines[0]
    advice = "delete" if pattern.startswith("tune/") else "restore it from a backup"
    assert advice in lines[0], lines[0]
    assert all(p.read_bytes() == b for p, b in keep.items())  # nothing lost or rewritten


class Killed(BaseException):
    """Stands in for SIGKILL inside the test process."""


def test_sweep_json_exists_before_the_sweep_run_and_resume_adopts_that_run(tmp_path, monkeypatch):
    """Without Ray: the driver dies right after creating the sweep's MLflow run. sweep.json existed before that
    run did, and the first step of --resume adopts the run (one sweep run, now recorded in sweep.json)."""
    from ulsweep.sweep import driver

    exp = experiment_from_dict(fake_experiment("early"), {"storage": str(tmp_path / "runs"),  # a quick store
                                                          "tracking.uri": (tmp_path / "mlruns").as_uri()})
    run_dir = tmp_path / "runs" / "early"
    real, seen = tracking.create_sweep_run, {}

    def create_then_die(c, experiment_id, name, tags=None):
        seen["state_before"] = (run_dir / "sweep.json").exists()
        seen["run_id"] = real(c, experiment_id, name, tags)
        raise Killed

    monkeypatch.setattr(tracking, "create_sweep_run", create_then_die)
    monkeypatch.setattr(driver, "_configure_ray_environment", lambda: None)
    monkeypatch.setattr(driver, "_init_ray", lambda address, verbose: False)
    with pytest.raises(Killed):
        driver.run_sweep(exp, stream=open(os.devnull, "w"))
    monkeypatch.undo()
    assert seen["state_before"], "the sweep's MLflow run was created before sweep.json"
    state = read_state(str(run_dir), pending_ok=True)
    with pytest.raises(DamagedStateError, match="start was cut short.*--resume"):
        read_state(str(run_dir))  # what `ulsweep report` sees
    run = lineage.open_sweep_run(exp, str(run_dir), state["tracking_uri"], state, identity(exp), open(os.devnull, "w"))
    assert run.sweep_id == seen["run_id"] and read_state(str(run_dir))["sweep_id"] == run.sweep_id
    runs = tracking.sweep_runs(run.client, run.experiment_id, run.sweep_id)
    assert [(r.info.run_id, r.info.status) for r in runs] == [(run.sweep_id, "RUNNING")]


def test_tunes_swallowed_restore_error_becomes_an_error_naming_the_dir():
    """Tune catches any error restoring its state, logs this record and starts over (the hang of issue 24);
    the tripwire the driver holds during a fit raises there instead, and only there."""
    import inspect
    import logging

    from ray.tune.execution.tune_controller import TuneController

    from ulsweep.sweep.statecheck import RestoreTripwire

    assert "Failed to restore the run state." in inspect.getsource(TuneController.__init__)  # Ray still says it
    tune_log = logging.getLogger("ray.tune.execution.tune_controller")
    with RestoreTripwire("/r/x/tune", "grid"):
        tune_log.warning("some other record")
        try:
            raise ValueError("invalid load key")
        except ValueError:
            with pytest.raises(DamagedStateError, match=r"^/r/x/tune: Tune could not restore its state "
                                                        r"\(ValueError: invalid load key\); delete /r/x/tune and run --resume"):
                tune_log.exception("Failed to restore the run state.")
    assert not tune_log.filters
