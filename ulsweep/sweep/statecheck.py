"""Checks of a run directory's state files before a sweep starts or resumes, so that a damaged one is named,
with what to do, before Ray starts (a `DamagedStateError`: one line, exit code 2).

Tune's own restore cannot be left to find the damage: `TuneController.__init__` catches any error from
restoring its experiment state (trial table, search-generator and searcher state), logs "Failed to restore
the run state" and starts the experiment over from what it had half restored. A sweep resumed over a
damaged searcher state then hangs (restored trials wait for a searcher that never learned of them) or ends
early and overwrites summary.json with a wrong table. `RestoreTripwire` turns that log record into an
error, for damage these checks do not foresee.

    <run dir>/sweep.json                       read_state (ulsweep.sweep.state)
    <run dir>/tune/tuner.pkl                   the Tuner's settings (cloudpickle)
    <run dir>/tune/experiment_state-*.json     Tune's trial table (newest file)
    <run dir>/tune/search_gen_state-*.json     the search generator's state (cloudpickle, newest)
    <run dir>/tune/searcher-state-*.pkl        SpawningSearcher.get_state() (pickle, newest)
    <run dir>/mlflow.db                        the default tracking store (any sqlite:/// URI is checked)
"""
from __future__ import annotations

import logging
import os
import sqlite3

from ulsweep import io as uio
from ulsweep.sweep.state import DamagedStateError

TUNER_FILE = "tuner.pkl"
EXPERIMENT_STATE = "experiment_state-*.json"
SEARCH_GEN_STATE = "search_gen_state-*.json"
SEARCHER_STATE = "searcher-state-*.pkl"
_TUNE_LOGGER = "ray.tune.execution.tune_controller"
_RESTORE_FAILED = "Failed to restore the run state"


def tune_advice(tune_dir: str, method: str) -> str:
    """What to do about a damaged Tune state in `tune_dir` of a sweep searching with `method`."""
    if method in ("grid", "none"):
        return (f"delete {tune_dir} and run --resume to start the search over (its trials are planned: those "
                f"that finished return their stored results at once)")
    run_dir = tune_dir.rstrip("/").rsplit("/", 1)[0]
    return (f"restore it from a backup, or move {tune_dir} and {run_dir}/trials away and run --resume to start "
            f"the search over ({method} samples new trials under the same keys)")


def restorable_tune_state(tune_dir: str, method: str) -> bool:
    """True when `tune_dir` holds a Tune experiment to restore; False when it holds none (no Tuner, or one
    killed before Tune recorded a trial: a new Tuner starts the search). DamagedStateError naming the first
    damaged (or missing) file otherwise."""
    from ray.tune.experiment.trial import Trial
    from ray.tune.utils.serialization import _loads_with_cloudpickle

    from ulsweep.sweep.searcher import check_state

    if not uio.exists(f"{tune_dir}/{TUNER_FILE}"):
        return False
    table_file = newest(tune_dir, EXPERIMENT_STATE)
    if table_file is None:
        return False
    advice = tune_advice(tune_dir, method)
    with _naming(table_file, "Tune trial table", advice):
        table = _loads_with_cloudpickle(uio.read_bytes(table_file))
        if not isinstance(table, dict) or not isinstance(table.get("trial_data"), list) \
                or not isinstance(table.get("runner_data"), dict):
            raise ValueError("not a Tune experiment state")
        for trial_json, _ in table["trial_data"]:
            Trial.from_json_state(trial_json, stub=True)
    if not table["trial_data"]:
        return False
    with _naming(f"{tune_dir}/{TUNER_FILE}", "Tuner settings", advice):
        if not isinstance(_cloudpickle_loads(uio.read_bytes(f"{tune_dir}/{TUNER_FILE}")), dict):
            raise ValueError("not a Tuner's state")
    for pattern, what in ((SEARCH_GEN_STATE, "search generator state"), (SEARCHER_STATE, "searcher state")):
        path = newest(tune_dir, pattern)
        if path is None:
            raise DamagedStateError(f"{tune_dir}/{pattern}: {what} missing beside {table_file}; {advice}")
        with _naming(path, what, advice):
            state = _cloudpickle_loads(uio.read_bytes(path))
            if pattern == SEARCHER_STATE:
                check_state(state)
            elif not isinstance(state, dict):
                raise ValueError(f"expected a dict, got {type(state).__name__}")
    return True


def unfinished_trials(tune_dir: str) -> set[str]:
    """Ids of the trials that Tune's newest trial table holds unfinished (neither TERMINATED nor ERROR): a
    restore runs them again. A trial whose last attempt ended with its process killed is among them, even
    when Tune gave it up (Ray 2.5x records it RUNNING, one failure short, not ERROR). Call after
    restorable_tune_state."""
    import json

    table = json.loads(uio.read_bytes(newest(tune_dir, EXPERIMENT_STATE)))
    trials = [json.loads(trial_json) for trial_json, _ in table["trial_data"]]
    return {t["trial_id"] for t in trials if t.get("status") not in ("TERMINATED", "ERROR")}


def check_sqlite_store(uri: str) -> None:
    """DamagedStateError naming the database file when a sqlite:/// tracking store exists but is not an intact
    SQLite database with MLflow's tables. A missing file is fine (MLflow creates it); so is a locked one
    (another process writes it: MLflow retries)."""
    if not uri.startswith("sqlite:///"):
        return
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    if not os.path.isfile(path):
        return
    advice = (f"restore it from a backup, or salvage what is readable with `sqlite3 {path} .recover | sqlite3 "
              f"recovered.db` and put recovered.db in its place, then run the same command again")
    try:
        con = sqlite3.connect(path, timeout=30)
        try:
            problems = [r[0] for r in con.execute("PRAGMA quick_check").fetchall()]
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            con.close()
    except sqlite3.OperationalError as e:
        if "locked" in str(e):
            return
        raise DamagedStateError(f"{path}: damaged MLflow store ({e}); {advice}") from None
    except sqlite3.DatabaseError as e:
        raise DamagedStateError(f"{path}: damaged MLflow store ({e}); {advice}") from None
    if problems != ["ok"]:
        raise DamagedStateError(f"{path}: damaged MLflow store (sqlite quick_check: {problems[0][:200]}); {advice}")
    if tables and not {"experiments", "runs"} <= tables:
        raise DamagedStateError(f"{path}: not an MLflow store (tables: {', '.join(sorted(tables))[:200]}); {advice}")


class RestoreTripwire(logging.Filter):
    """Raises DamagedStateError where Tune would log that it failed to restore its state and carry on (see the
    module docstring). Installed on Tune's controller logger for the duration of a restored fit."""

    def __init__(self, tune_dir: str, method: str):
        super().__init__()
        self.tune_dir, self.method = tune_dir, method

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage().startswith(_RESTORE_FAILED):
            err = record.exc_info[1] if record.exc_info else None
            raise DamagedStateError(f"{self.tune_dir}: Tune could not restore its state ({type(err).__name__}: "
                                    f"{str(err)[:200]}); {tune_advice(self.tune_dir, self.method)}")
        return True

    def __enter__(self):
        logging.getLogger(_TUNE_LOGGER).addFilter(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger(_TUNE_LOGGER).removeFilter(self)
        return False


# ----------------------------------------------------------------------------------------------


def newest(tune_dir: str, pattern: str) -> str | None:
    """The file Tune would take: the greatest name matching `pattern` (names hold the session's time)."""
    fs, p = uio.filesystem(tune_dir)
    found = sorted(fs.glob(f"{p.rstrip('/')}/{pattern}"))
    if not found:
        return None
    return f"{tune_dir.rstrip('/')}/{found[-1].rsplit('/', 1)[-1]}"


def _cloudpickle_loads(data: bytes):
    import ray.cloudpickle as cloudpickle

    return cloudpickle.loads(data)


class _naming:
    """Turns any error reading a state file into a DamagedStateError naming it."""

    def __init__(self, path: str, what: str, advice: str):
        self.path, self.what, self.advice = path, what, advice

    def __enter__(self):
        return self

    def __exit__(self, typ, err, tb):
        if typ is None or not issubclass(typ, Exception) or isinstance(err, DamagedStateError):
            return False
        raise DamagedStateError(f"{self.path}: damaged {self.what} ({typ.__name__}: {str(err)[:200]}); "
                                f"{self.advice}") from None
