"""A process killed while MLflow creates and migrates a new sqlite store (the first seconds of `ulsweep run`)
must not leave a half-migrated `mlflow.db` behind: pysqlite commits each DDL statement of a migration as it
comes, so such a file held a migration's tables without its alembic version, and every later open (so every
`--resume`) failed with `table datasets already exists`. Found by benchmarks/faults/campaign.py (a driver
SIGKILLed 8.7 s into its sweep); ulsweep.tracking.runs.create_sqlite_store migrates a temporary file and links
it into place."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ulsweep import tracking

REPO = Path(__file__).resolve().parents[2]


def _child(uri: str) -> subprocess.Popen:
    code = "import sys; from ulsweep import tracking; tracking.client(sys.argv[1])"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", code, uri], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


@pytest.mark.parametrize("into_s", [0.4, 1.5])
def test_kill_during_store_creation_leaves_a_store_the_next_run_opens(tmp_path, into_s):
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    p = _child(uri)
    try:
        deadline = time.time() + 120
        # the migrations have begun once the database file exists (before the fix: mlflow.db itself)
        while not (db.exists() or list(tmp_path.glob("mlflow.db.creating-*"))):
            assert p.poll() is None and time.time() < deadline, "the store was never created"
            time.sleep(0.02)
        time.sleep(into_s)
        if p.poll() is not None:
            pytest.skip(f"the migrations ended within {into_s} s: nothing to interrupt")
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.wait()
    assert not db.exists() or db.stat().st_size > 0
    c = tracking.client(uri)  # a new run (or a --resume) opens the store
    eid = tracking.get_or_create_experiment(c, "after-kill")
    run = c.create_run(eid)
    c.log_metric(run.info.run_id, "loss", 1.0, step=1)
    assert [m.step for m in c.get_metric_history(run.info.run_id, "loss")] == [1]


def test_failed_store_creation_leaves_nothing(tmp_path, monkeypatch):
    from mlflow.store.db import utils as dbu

    def dies(engine):
        raise RuntimeError("killed mid-migration")

    monkeypatch.setattr(dbu, "_upgrade_db", dies)
    db = tmp_path / "sub" / "mlflow.db"
    with pytest.raises(RuntimeError, match="mid-migration"):
        tracking.runs.create_sqlite_store(f"sqlite:///{db}")
    assert sorted(p.name for p in db.parent.iterdir()) == []  # no mlflow.db, no temporary file
    monkeypatch.undo()
    c = tracking.client(f"sqlite:///{db}")
    assert c.get_experiment("0").name == "Default"
    assert sorted(p.name for p in db.parent.iterdir()) == ["mlflow.db"]


def test_without_mlflows_store_helpers_the_store_is_created_in_place_with_a_warning(tmp_path, monkeypatch):
    from ulsweep.tracking import runs

    monkeypatch.setattr(runs, "_store_helpers", lambda: (None, None))  # an MLflow without them
    db = tmp_path / "mlflow.db"
    with pytest.warns(RuntimeWarning, match="creates it in place"):
        c = tracking.client(f"sqlite:///{db}")
    assert db.exists() and c.search_experiments()  # MLflow's own creation: the Default experiment
    assert not list(tmp_path.glob("mlflow.db.creating-*"))
