"""The sweep driver's state at unit level, without Ray (the end-to-end checks of the same faults run on the
shared sweep of test_driver_kill.py):

- sweep.json exists before the sweep's MLflow run is created, and the first step of `--resume` adopts a run
  that a driver killed during its start created but never recorded;
- Ray Tune's swallowed restore error (logged, then the experiment restarted from a half-restored state: the
  hang of issue 24) is turned into an error naming the Tune directory and what to do.
"""
from __future__ import annotations

import io

import pytest

from faultlib import fake_experiment
from ulsweep import tracking
from ulsweep.config import experiment_from_dict
from ulsweep.sweep import lineage
from ulsweep.sweep.state import DamagedStateError, identity, read_state


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
    monkeypatch.setattr(driver, "_init_ray", lambda address, verbose, env=None: False)
    with pytest.raises(Killed):
        driver.run_sweep(exp, stream=io.StringIO())
    monkeypatch.undo()
    assert seen["state_before"], "the sweep's MLflow run was created before sweep.json"
    state = read_state(str(run_dir), pending_ok=True)
    with pytest.raises(DamagedStateError, match="start was cut short.*--resume"):
        read_state(str(run_dir))  # what `ulsweep report` sees
    run = lineage.open_sweep_run(exp, str(run_dir), state["tracking_uri"], state, identity(exp), io.StringIO())
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
            with pytest.raises(DamagedStateError, match=r"^/r/x/tune: Tune could not restore its state \(ValueError: "
                                                        r"invalid load key\); delete /r/x/tune and run --resume"):
                tune_log.exception("Failed to restore the run state.")
    assert not tune_log.filters
