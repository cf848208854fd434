"""The sweep driver SIGKILLed at three named points, resumed each time with `ulsweep run --resume`.

One sweep (3 AE trials, 1 base model each, fake training loops, real Ray Tune / Train / MLflow code) is
killed during an AE trial, then (resumed) between a finished AE trial and its base trials, then (resumed
again) during a base trial; the fourth run completes it. Afterwards every trial finished exactly once:
one MLflow run per trial key, none RUNNING, one point per logged step, objectives told once, every
spawned base trial present once.
"""
from __future__ import annotations

import json
import signal

import pytest

from faultlib import STEPS, LOG_EVERY, cli, curve_steps, fake_experiment, mlflow_state, run_driver, sandbox, tail, \
    write_yaml

pytestmark = pytest.mark.slow

KILLS = ["driver.ae_result@2", "driver.ae_complete@1", "driver.base_result@1"]


def test_driver_sigkill_at_three_points_then_resume_loses_and_doubles_nothing(tmp_path):
    d = fake_experiment("dk", n_ae=3)
    f = write_yaml(tmp_path, d)
    run_dir = tmp_path / "runs" / "dk"
    log = tmp_path / "driver.log"
    with sandbox(tmp_path) as (env, _):
        for i, fault in enumerate(KILLS):
            args = cli(f, "--storage", tmp_path / "runs", *(["--resume"] if i else []))
            p = run_driver(args, env, tmp_path, log, fault=fault)
            assert p.returncode == -signal.SIGKILL, f"{fault} never fired (rc {p.returncode}):\n{tail(log)}"
            point, n = fault.split("@")
            assert (tmp_path / "faults" / f"{point}-None@{n}").exists(), fault  # it fired where intended
            _, by_key = mlflow_state(run_dir)
            assert any(r.info.status == "RUNNING" for rs in by_key.values() for r in rs), \
                "the kill should leave runs RUNNING (else this test tests nothing)"
        p = run_driver(cli(f, "--storage", tmp_path / "runs", "--resume"), env, tmp_path, log)
        assert p.returncode == 0, tail(log)

    c, by_key = mlflow_state(run_dir)
    ae_keys = ["ae-0000", "ae-0001", "ae-0002"]
    expected = {"sweep", *ae_keys, *(f"{k}-tiny" for k in ae_keys)}
    assert sorted(by_key) == sorted(expected)
    doubles = {k: len(rs) for k, rs in by_key.items() if len(rs) != 1}
    assert not doubles, f"duplicate MLflow runs: {doubles}"
    runs = {k: rs[0] for k, rs in by_key.items()}
    assert {k: r.info.status for k, r in runs.items()} == {k: "FINISHED" for k in expected}

    want = list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    for key in expected - {"sweep"}:
        assert curve_steps(c, runs[key].info.run_id) == want, key  # no gap, no duplicate point
    for key in ae_keys:
        assert len(c.get_metric_history(runs[key].info.run_id, "objective/gfd_fake")) == 1, key  # told once
        assert runs[f"{key}-tiny"].data.tags["mlflow.parentRunId"] == runs[key].info.run_id

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["counts"] == {"ae_done": 3, "base_done": 3}
    assert [t["key"] for t in summary["trials"]] == ae_keys
    assert all(t["bases"]["tiny"]["status"] == "done" and t["objective"] for t in summary["trials"])
    for key in expected - {"sweep"}:
        assert (run_dir / "trials" / key / "checkpoints" / f"step_{STEPS:08d}.json").exists(), key
    assert "resume: marked" in log.read_text()  # each resume closed the killed driver's RUNNING runs
