"""A process killed while MLflow creates and migrates a new sqlite store (the first seconds of `ulsweep run`)
must not leave a half-migrated `mlflow.db` behind: pysqlite commits each DDL statement of a migration as it
comes, so such a file held a migration's tables without its alembic version, and every later open (so every
`--resume`) failed with `table datasets already exists`. Found by benchmarks/faults/campaign.py (a driver
SIGKILLed 8.7 s into its sweep); ulsweep.tracking.runs.create_sqlite_store migrates a temporary file and links
it into place. A new store is otherwise a copy of a migrated empty one kept in ulsweep's cache
(`runs.empty_store_template`): each test here has a cache of its own, so the migrations run where they test
them."""
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


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """No store template yet: the store is migrated (and then kept as the template)."""
    monkeypatch.setenv("ULSWEEP_CACHE", str(tmp_path / "cache"))


def _child(uri: str) -> subprocess.Popen:
    code = "import sys; from ulsweep import tracking; tracking.client(sys.argv[1])"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", code, uri], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


@pytest.mark.parametrize("into_s", [0.4, 1.5])
def test_kill_during_store_creation_leaves_a_store_the_next_run_opens(tmp_path, into_s):
    db = tmp_path / "mlflow.db"
    uri = f"sqlite:///{db}"
    p = _child(uri)  # its environment names this test's empty cache (own_cache)
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

    upgrade = dbu._upgrade_db
    monkeypatch.setattr(dbu, "_upgrade_db", dies)
    db = tmp_path / "sub" / "mlflow.db"
    with pytest.raises(RuntimeError, match="mid-migration"):
        tracking.runs.create_sqlite_store(f"sqlite:///{db}")
    assert sorted(p.name for p in db.parent.iterdir()) == []  # no mlflow.db, no temporary file
    assert not os.path.exists(tracking.runs.empty_store_template())  # and no template of a failed store
    monkeypatch.setattr(dbu, "_upgrade_db", upgrade)
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


def _dump(path) -> list[str]:
    """The store's schema and rows as SQL, for comparing a store with a copy of it."""
    import sqlite3

    con = sqlite3.connect(path)
    try:
        return list(con.iterdump())
    finally:
        con.close()


def _migrated(path) -> tuple:
    """What two migrations of this MLflow give alike (the SQL of their tables can differ: the order of a table's
    constraints and of its indexes varies from one migration to another): its tables and indexes, alembic
    version and rows."""
    import sqlite3

    con = sqlite3.connect(path)
    try:
        names = sorted(con.execute("SELECT type, name FROM sqlite_master WHERE name NOT LIKE 'sqlite_%'"))
        rows = {t: sorted(con.execute(f'SELECT * FROM "{t}"').fetchall()) for k, t in names if k == "table"}
        return names, rows
    finally:
        con.close()


def test_the_next_new_store_is_a_copy_of_the_first_ones_migrated_tables(tmp_path, monkeypatch):
    """The first store is migrated and kept as the template; the next is copied from it without a migration,
    holds the same schema and rows, and MLflow opens it and logs to it."""
    from mlflow.store.db import utils as dbu

    from ulsweep.tracking import runs

    first, second = tmp_path / "a" / "mlflow.db", tmp_path / "b" / "mlflow.db"
    runs.create_sqlite_store(f"sqlite:///{first}")
    template = runs.empty_store_template()
    assert os.path.dirname(template) == str(tmp_path / "cache" / "stores") and _dump(template) == _dump(first)

    def migrates(engine):
        raise AssertionError("the second store was migrated, not copied")

    initialize = dbu._initialize_tables
    monkeypatch.setattr(dbu, "_initialize_tables", migrates)
    runs.create_sqlite_store(f"sqlite:///{second}")
    monkeypatch.setattr(dbu, "_initialize_tables", initialize)
    assert _dump(second) == _dump(first)
    assert not list(second.parent.glob("mlflow.db.creating-*"))
    c = tracking.client(f"sqlite:///{second}")
    run = c.create_run(tracking.get_or_create_experiment(c, "copied"))
    c.log_metric(run.info.run_id, "loss", 0.5, step=3)
    assert [(m.step, m.value) for m in c.get_metric_history(run.info.run_id, "loss")] == [(3, 0.5)]


def test_a_cache_that_cannot_be_written_only_costs_the_template(tmp_path, monkeypatch):
    from ulsweep.tracking import runs

    (tmp_path / "cache").write_text("a file where the cache folder would be")
    db = tmp_path / "mlflow.db"
    runs.create_sqlite_store(f"sqlite:///{db}")
    assert "alembic_version" in "".join(_dump(db))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "mlflow.db"]


@pytest.mark.parametrize("damage", ["cut", "empty"])
def test_a_damaged_template_is_migrated_anew_and_replaced(tmp_path, damage):
    """A template cut short (a crash after its rename, before the disk had it all) or left empty: the new store
    is migrated rather than copied from it, and the template replaced by a whole one."""
    from ulsweep.tracking import runs

    runs.create_sqlite_store(f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}")
    template = Path(runs.empty_store_template())
    whole = _migrated(template)
    template.write_bytes(template.read_bytes()[:4096] if damage == "cut" else b"")
    db = tmp_path / "b" / "mlflow.db"
    runs.create_sqlite_store(f"sqlite:///{db}")
    assert _migrated(db) == whole and _dump(template) == _dump(db)
    c = tracking.client(f"sqlite:///{db}")
    assert c.get_experiment("0").name == "Default"
