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

Tune writes its snapshot (the three tune/ files named by its session) in place, every few seconds: a driver
killed while Tune copies it into the run dir leaves it cut short. That is the kill, not damage, and a killed
sweep must resume: `set_aside_torn_snapshots` renames such a snapshot `*.torn` and lets Tune restore the
session before it, when the snapshot belongs to a session no driver closed (`tune_closed.json`, written when
Tuner.fit returns) and an older one exists. What it loses is re-run idempotently, as after any kill. A
snapshot that a driver closed and that reads no more is damage: named, with what to do.
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import time

from ulsweep import io as uio
from ulsweep.sweep.state import DamagedStateError

TUNE_NAME = "tune"  # the Tune experiment's name: its state lives in <run dir>/tune
TUNER_FILE = "tuner.pkl"
EXPERIMENT_STATE = "experiment_state-*.json"
SEARCH_GEN_STATE = "search_gen_state-*.json"
SEARCHER_STATE = "searcher-state-*.pkl"
SNAPSHOT = (EXPERIMENT_STATE, SEARCH_GEN_STATE, SEARCHER_STATE)  # what Tune saves together, per session
CLOSED_FILE = "tune_closed.json"  # in the run dir: the snapshot the last driver to end left
TORN_SUFFIX = ".torn"
_TUNE_LOGGER = "ray.tune.execution.tune_controller"
_RESTORE_FAILED = "Failed to restore the run state"


def tune_dir_of(run_dir: str) -> str:
    return f"{run_dir.rstrip('/')}/{TUNE_NAME}"


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
    if not uio.exists(f"{tune_dir}/{TUNER_FILE}"):
        return False
    table_file = newest(tune_dir, EXPERIMENT_STATE)
    if table_file is None:
        return False
    advice = tune_advice(tune_dir, method)
    with _naming(table_file, _WHAT[EXPERIMENT_STATE], advice):
        table = _read_table(table_file)
    if not table["trial_data"]:
        return False
    with _naming(f"{tune_dir}/{TUNER_FILE}", "Tuner settings", advice):
        if not isinstance(_cloudpickle_loads(uio.read_bytes(f"{tune_dir}/{TUNER_FILE}")), dict):
            raise ValueError("not a Tuner's state")
    for pattern in (SEARCH_GEN_STATE, SEARCHER_STATE):
        path = newest(tune_dir, pattern)
        if path is None:
            raise DamagedStateError(f"{tune_dir}/{pattern}: {_WHAT[pattern]} missing beside {table_file}; {advice}")
        with _naming(path, _WHAT[pattern], advice):
            _READ[pattern](path)
    return True


def record_closed_snapshot(run_dir: str) -> None:
    """Name, in <run dir>/tune_closed.json, the snapshot Tune left when Tuner.fit returned (at the sweep's end
    or after Ctrl-C: Tune saves and uploads its state before it returns)."""
    table = newest(tune_dir_of(run_dir), EXPERIMENT_STATE)
    if table is not None:
        uio.atomic_write_text(_closed_path(run_dir), json.dumps({"session": _session(table), "closed": time.time()}))


def set_aside_torn_snapshots(run_dir: str, out) -> list[str]:
    """Rename `*.torn` the newest Tune snapshot while it is cut short (a file of it does not read, or is
    missing: Tune copies the three one by one) and belongs to a session no driver closed, as long as an older
    session's snapshot is there for Tune to restore instead; say so on `out`. Returns the renamed files.
    Anything else is left for `restorable_tune_state` to judge (see the module docstring)."""
    tune_dir = tune_dir_of(run_dir)
    closed = _closed_session(run_dir)
    moved: list[str] = []
    while sessions := _sessions(tune_dir):
        session = sessions[-1]
        older = [s for s in _sessions(tune_dir, EXPERIMENT_STATE) if s < session]
        if session == closed or not older or (problem := _snapshot_problem(tune_dir, session)) is None:
            break
        for pattern in SNAPSHOT:
            path = _snapshot_file(tune_dir, pattern, session)
            if uio.exists(path):
                fs, p = uio.filesystem(path)
                fs.mv(p, p + TORN_SUFFIX)
                moved.append(path + TORN_SUFFIX)
        print(f"resume: Tune's last snapshot, of session {session}, was cut short by the killed driver "
              f"({problem}); set aside as {tune_dir}/*-{session}.*{TORN_SUFFIX}, restoring session {older[-1]} "
              f"(its unfinished trials run again from their own checkpoints)", file=out, flush=True)
    return moved


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


def _session(path: str) -> str:
    """The Tune session a snapshot file belongs to: experiment_state-<session>.json -> <session>."""
    name = path.rsplit("/", 1)[-1]
    for pattern in SNAPSHOT:
        head, tail = pattern.split("*")
        if name.startswith(head) and name.endswith(tail):
            return name[len(head):len(name) - len(tail)]
    raise ValueError(f"{path}: not a Tune snapshot file")


def _snapshot_file(tune_dir: str, pattern: str, session: str) -> str:
    """The file of `pattern` that Tune's `session` writes (experiment_state-<session>.json, ...)."""
    return f"{tune_dir}/{pattern.replace('*', session)}"


def _sessions(tune_dir: str, *patterns: str) -> list[str]:
    """The sessions with a file of `patterns` (default: any snapshot file) in `tune_dir`, oldest first."""
    fs, p = uio.filesystem(tune_dir)
    return sorted({_session(f) for pattern in patterns or SNAPSHOT for f in fs.glob(f"{p.rstrip('/')}/{pattern}")})


def _closed_path(run_dir: str) -> str:
    return f"{run_dir.rstrip('/')}/{CLOSED_FILE}"


def _closed_session(run_dir: str) -> str | None:
    """The session of the snapshot the last driver to end left (None when none ended or the record is gone)."""
    try:
        return json.loads(uio.read_bytes(_closed_path(run_dir)))["session"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _snapshot_problem(tune_dir: str, session: str) -> str | None:
    """None when the three files of `session`'s snapshot are there and read; else what is wrong, in a line."""
    for pattern in SNAPSHOT:
        path = _snapshot_file(tune_dir, pattern, session)
        name = path.rsplit("/", 1)[-1]
        if not uio.exists(path):
            return f"{name} missing"
        try:
            _READ[pattern](path)
        except Exception as e:
            return f"{name}: {type(e).__name__}: {str(e)[:120]}"
    return None


def _read_table(path: str) -> dict:
    from ray.tune.experiment.trial import Trial
    from ray.tune.utils.serialization import _loads_with_cloudpickle

    table = _loads_with_cloudpickle(uio.read_bytes(path))
    if not isinstance(table, dict) or not isinstance(table.get("trial_data"), list) \
            or not isinstance(table.get("runner_data"), dict):
        raise ValueError("not a Tune experiment state")
    for trial_json, _ in table["trial_data"]:
        Trial.from_json_state(trial_json, stub=True)
    return table


def _read_search_gen(path: str) -> dict:
    state = _cloudpickle_loads(uio.read_bytes(path))
    if not isinstance(state, dict):
        raise ValueError(f"expected a dict, got {type(state).__name__}")
    return state


def _read_searcher(path: str):
    from ulsweep.sweep.searcher import check_state

    state = _cloudpickle_loads(uio.read_bytes(path))
    check_state(state)
    return state


_READ = {EXPERIMENT_STATE: _read_table, SEARCH_GEN_STATE: _read_search_gen, SEARCHER_STATE: _read_searcher}
_WHAT = {EXPERIMENT_STATE: "Tune trial table", SEARCH_GEN_STATE: "search generator state",
         SEARCHER_STATE: "searcher state"}


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
