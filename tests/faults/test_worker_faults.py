"""Faults inside trials, in one sweep of two AE trials that train in Ray Train's local mode (the loop in the
Tune trial process, quickstart's and lf_sweep's setting):

- ae-0000: the process training it is SIGKILLed mid-trial (after the step-10 checkpoint, at step 16). Tune
  starts the trial again (ulsweep/sweep/attempts.py: a death, retried up to resources.max_worker_failures
  times), the loop resumes from step 10, and the MLflow curve has exactly one point per logged step in step order: no gap, and the
  steps re-run after the checkpoint are not logged twice (points MLflow already holds are dropped).
- ae-0001: its loss turns NaN at step 15. The trial fails at once (no retry: a retry would diverge again)
  with a clear error on its MLflow run and its last good checkpoint (step 10) kept; ae-0000 goes on.

max_worker_failures is 1: one restart is all ae-0000 needs, and ae-0001's (refused before any setup: its
failure is recorded as deterministic) is all it takes to check that. A Ray Train worker actor killed the same
way (a new worker group, `FailureConfig(max_failures=...)`) is tests/faults/test_stream_sweep.py's fault; in
local mode this sweep saves each trial the start of a worker actor (~10 CPU-seconds on CI's 2 cores).
"""
from __future__ import annotations

import json

import pytest

from faultlib import LOG_EVERY, STEPS, cli, curve_steps, fake_experiment, mlflow_state, run_driver, sandbox, tail, \
    write_yaml

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("worker-faults")
    d = fake_experiment("wf", n_ae=2, bases=(), num_workers=0, max_worker_failures=1)
    f = write_yaml(tmp_path, d)
    log = tmp_path / "driver.log"
    with sandbox(tmp_path, step_s=0.1) as (env, _):
        env.update({"ULSWEEP_FAKE_NAN": "ae-0001:15", "ULSWEEP_MLFLOW_FLUSH_S": "0.2"})
        p = run_driver(cli(f, "--storage", tmp_path / "runs"), env, tmp_path, log, timeout=400,
                       fault="worker.log/ae-0000@8")
    assert p.returncode == 1, tail(log)  # one trial failed, the sweep finished
    return tmp_path, tmp_path / "runs" / "wf", log


def test_killed_worker_resumes_from_its_checkpoint_with_a_continuous_curve(sweep):
    tmp_path, run_dir, log = sweep
    marker = tmp_path / "faults" / "worker.log-ae-0000@8"
    assert marker.exists(), "the worker was never killed:\n" + tail(log)
    trial = run_dir / "trials" / "ae-0000"
    assert (trial / "fake-starts.txt").read_text().split() == ["0", "10"]  # restarted from step 10, once
    ck = trial / "checkpoints"
    assert ck.joinpath("step_00000010.json").stat().st_mtime < marker.stat().st_mtime  # not redone
    assert ck.joinpath(f"step_{STEPS:08d}.json").exists()
    c, by_key = mlflow_state(run_dir)
    run = by_key["ae-0000"]
    assert len(run) == 1 and run[0].info.status == "FINISHED"
    hist = sorted(c.get_metric_history(run[0].info.run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in hist] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    # points before the kill were sent then (ULSWEEP_MLFLOW_FLUSH_S=0.2) and kept; the ones re-run after
    # the restart were not logged again: timestamps never go back along the steps
    kill_ms = marker.stat().st_mtime * 1000
    assert any(m.timestamp < kill_ms and m.step > 10 for m in hist), "nothing re-run was already in MLflow"
    assert all(a.timestamp <= b.timestamp for a, b in zip(hist, hist[1:]))
    assert "bpp" in run[0].data.metrics


def test_nan_trial_fails_clearly_keeps_its_checkpoint_and_the_sweep_goes_on(sweep):
    tmp_path, run_dir, log = sweep
    trial = run_dir / "trials" / "ae-0001"
    assert (trial / "fake-starts.txt").read_text().split() == ["0"]  # a diverged trial is not retrained
    assert sorted(p.name for p in (trial / "checkpoints").iterdir()) == ["step_00000010.json"]
    failure = json.loads((trial / "failure.json").read_text())
    assert failure["error"].startswith("TrainingDiverged: fake ae-0001: non-finite loss by step 16")
    c, by_key = mlflow_state(run_dir)
    run = by_key["ae-0001"][0]
    assert run.info.status == "FAILED"
    assert run.data.tags["ulsweep.error"] == failure["error"]
    assert run.data.tags["ulsweep.last_good_checkpoint"].endswith("ae-0001/checkpoints/step_00000010.json")
    assert curve_steps(c, run.info.run_id) == list(range(LOG_EVERY, 15, LOG_EVERY))  # the curve up to it
    summary = json.loads((run_dir / "summary.json").read_text())
    assert {t["key"]: t["status"] for t in summary["trials"]} == {"ae-0000": "done", "ae-0001": "failed"}
    assert "failed trial ae-0001" in log.read_text()
