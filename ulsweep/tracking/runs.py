"""MLflow runs with ulsweep's lineage: sweep (parent) -> AE trial (child) -> base-model trial (grandchild).

Everything goes through `MlflowClient` with an explicit, absolute tracking URI (the fluent API's
`set_experiment` leaks MLFLOW_EXPERIMENT_ID into the environment, and relative sqlite paths break once Ray
changes a worker's directory). Runs are found again by stable tags, never created twice for one key:
    ulsweep.sweep_id   the sweep's id (its parent run id)      on every run of a sweep
    ulsweep.key        "sweep" | "ae-0003" | "ae-0003-tiny"   unique within a sweep
"""
from __future__ import annotations

import io
import logging
import os
import time
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import quote

from ulsweep.tracking.buffer import is_number
from ulsweep.tracking.redact import redact_text, redact_uri, split_userinfo

log = logging.getLogger(__name__)

TAG_SWEEP = "ulsweep.sweep_id"
TAG_KEY = "ulsweep.key"
TAG_KIND = "ulsweep.kind"
TAG_PARENT = "mlflow.parentRunId"
TAG_CHECKPOINT = "ulsweep.checkpoint"
_MAX_PARAM_LEN = 6000  # MLflow's limit on a param value
_PARAMS_PER_BATCH = 100
_METRICS_PER_BATCH = 1000


def default_tracking_uri(run_dir: str, create: bool = True) -> str:
    """sqlite:///<absolute run dir>/mlflow.db; for a URI run dir, a local ./runs/<name>/mlflow.db."""
    if "://" in run_dir:
        local = Path.cwd() / "runs" / run_dir.rstrip("/").rsplit("/", 1)[-1]
    else:
        local = Path(run_dir)
    local = local.absolute()
    if create:
        local.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{local / 'mlflow.db'}"


def resolve_tracking_uri(cli_uri: str | None, config_uri: str | None, run_dir: str, create: bool = True) -> str:
    """--tracking-uri, then MLFLOW_TRACKING_URI, then the experiment's tracking.uri, then the default.

    Relative sqlite / file URIs are made absolute against the current directory."""
    uri = cli_uri or os.environ.get("MLFLOW_TRACKING_URI") or config_uri or default_tracking_uri(run_dir, create)
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = f"sqlite:///{Path(uri[len('sqlite:///'):]).absolute()}"
    elif "://" not in uri:  # a bare path: file store
        uri = Path(uri).absolute().as_uri()
    return uri


def default_artifact_location(uri: str, run_dir: str) -> str | None:
    """Artifact root for a new MLflow experiment: the tracking server's own (it proxies uploads through
    mlflow-artifacts:/, so workers need no store credentials) for http(s) URIs, else <run dir>/mlartifacts."""
    if uri.startswith(("http://", "https://")):
        return None
    return f"{run_dir.rstrip('/')}/mlartifacts"


def client(uri: str):
    from mlflow.tracking import MlflowClient

    if uri.startswith("file:") or "://" not in uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = credentials_to_env(uri)
    if redact_uri(uri) != uri:  # a password credentials_to_env cannot move: MLflow would print it in run URLs
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    # a new sqlite store creates and migrates its tables here: retried like any write to a refusing storage
    retry(create_sqlite_store, uri)
    return retry(MlflowClient, tracking_uri=uri)


def create_sqlite_store(uri: str) -> None:
    """Create the sqlite store of a `sqlite:///PATH` URI whose file does not exist yet, atomically: MLflow's
    migrations run on a temporary file beside PATH, which is hard-linked to PATH once they are done (or renamed,
    where the filesystem has no hard links). Migrating in place, a process killed during the migrations
    (seconds on a busy machine) left a half-migrated PATH: pysqlite commits DDL statements as they come, so a
    migration's tables existed without its alembic version, and every later open failed with `table datasets
    already exists` (a driver SIGKILLed 8.7 s into `ulsweep run`, found by the fault campaign). Now such a
    kill leaves a stray `PATH.creating-*` file and no PATH: the next run creates the store anew. Another
    process that created PATH meanwhile wins; its store is kept. The temporary file is a copy of the cache's
    migrated template where there is one (`empty_store_template`), and the first migrated store becomes it."""
    if not uri.startswith("sqlite:///"):
        return
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    if not path or path == ":memory:" or os.path.exists(path):
        return
    import uuid

    make_engine, init_tables = _store_helpers()
    if make_engine is None or init_tables is None:
        import warnings

        warnings.warn(f"this MLflow ({_mlflow_version()}) lacks the store-creation helpers ulsweep uses to create "
                      f"{path} atomically; MLflow creates it in place (a process killed meanwhile can leave it "
                      "half-migrated)", RuntimeWarning, stacklevel=2)
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.creating-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    template = empty_store_template()
    try:
        if not _copy_if_present(template, tmp):
            engine = make_engine(f"sqlite:///{tmp}")
            try:
                init_tables(engine)  # what SqlAlchemyStore() runs on an empty database
            finally:
                engine.dispose()
            _keep_copy(tmp, template)
        try:
            os.link(tmp, path)  # atomic, and never over a store that another process linked first
        except FileExistsError:
            pass
        except OSError:  # no hard links on this filesystem
            if not os.path.exists(path):
                os.replace(tmp, path)
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def empty_store_template() -> str:
    """Where a new sqlite store of this MLflow version, migrated and empty, is kept (`<cache>/stores/`): the next
    new store is a copy of it. MLflow's migrations (68 in MLflow 3.17) take 1.5-1.7 CPU-seconds on a 2-core box,
    in every `ulsweep run` that starts a sweep (before its Ray starts) and in every test that makes a store; the
    copy of the ~1-MB file takes milliseconds. The file holds the schema, its alembic version and MLflow's
    default workspace row, nothing of a sweep; MLflow checks the schema's version whenever it opens a store."""
    from ulsweep import io as uio

    return os.path.join(uio.cache_dir("stores"), f"mlflow-{_mlflow_version()}.db")


def _copy_if_present(src: str, dst: str) -> bool:
    """Copy src to dst; False, and no dst, where src cannot be read (none yet, or a cache that is no folder) or
    its copy is no whole migrated store (a template cut short by a crash: it is migrated anew and replaced)."""
    import shutil
    import sqlite3

    try:
        shutil.copyfile(src, dst)
        con = sqlite3.connect(f"{Path(os.path.abspath(dst)).as_uri()}?mode=ro", uri=True)
        try:
            whole = con.execute("PRAGMA quick_check").fetchone() == ("ok",) and \
                len(con.execute("SELECT version_num FROM alembic_version").fetchall()) == 1
        finally:
            con.close()
        if whole:
            return True
        log.warning("the store template %s is damaged; migrating a new store instead", src)
    except (OSError, sqlite3.Error) as e:
        if not os.path.exists(src):
            log.debug("no store template at %s: %s", src, e)
        else:
            log.warning("could not copy the store template %s (%s); migrating a new store instead", src, e)
    try:
        os.unlink(dst)
    except OSError:
        pass
    return False


def _keep_copy(src: str, dst: str) -> None:
    """Copy src to dst atomically (`io.atomic_write_bytes_once`); a cache that cannot be written is skipped."""
    from ulsweep import io as uio

    try:
        with open(src, "rb") as f:
            uio.atomic_write_bytes_once(dst, f.read())
    except OSError as e:
        log.debug("no store template kept at %s: %s", dst, e)


def _store_helpers():
    """MLflow's engine factory and its table creation (private: None where this MLflow lacks them)."""
    from mlflow.store.db import utils as dbu

    return getattr(dbu, "create_sqlalchemy_engine_with_retry", None), getattr(dbu, "_initialize_tables", None)


def _mlflow_version() -> str:
    import mlflow

    return getattr(mlflow, "__version__", "?")


def credentials_to_env(uri: str) -> str:
    """The URI without its password; the password goes where the client library reads it from the environment:
    http(s)://user:pw@host -> MLFLOW_TRACKING_USERNAME/PASSWORD (a lone token -> MLFLOW_TRACKING_TOKEN),
    postgresql://user:pw@host -> PGPASSWORD (libpq). MLflow prints run URLs built from the URI, and Ray keeps
    pickled copies of the trials' arguments: neither may hold the password. Other schemes are returned as is."""
    bare, user, password = split_userinfo(uri)
    if uri.startswith(("http://", "https://")):
        if password is None:
            if user is not None:
                os.environ["MLFLOW_TRACKING_TOKEN"] = user
        else:
            os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = user, password
        return bare
    if uri.startswith(("postgresql://", "postgresql+")) and password is not None:
        os.environ["PGPASSWORD"] = password
        scheme, rest = bare.split("://", 1)
        return f"{scheme}://{quote(user, safe='')}@{rest}"
    return uri


_TRANSIENT = ("locked", "busy", "timed out", "timeout", "503", "502", "connection", "temporarily")
# a sqlite store on a storage that refuses writes for a while (read-only remount, full disk)
_STORAGE = ("readonly database", "read-only file system", "disk is full", "no space left", "disk i/o error",
            "unable to open database file")


def is_storage_error(e: BaseException) -> bool:
    """An MLflow store (or file) error of a storage that refuses writes: read-only, full, I/O error."""
    from ulsweep.io import PASSING_ERRNOS

    if isinstance(e, OSError) and e.errno in PASSING_ERRNOS:
        return True
    msg = str(e).lower()
    return any(s in msg for s in _STORAGE)


def retry(fn, *args, attempts: int = 6, **kwargs):
    """Call an MLflow function, retrying on transient errors (sqlite 'database is locked', HTTP 5xx) up to
    `attempts` times, and on a store whose storage refuses writes (read-only, full) for up to
    ulsweep.io.storage_retry_s() seconds."""
    from ulsweep.io import storage_retry_s

    delay, deadline = 0.2, None
    for i in range(1 << 30):
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001 - MLflow raises many types
            msg = str(e).lower()
            if is_storage_error(e):
                now = time.monotonic()
                if deadline is None:
                    deadline = now + storage_retry_s()
                    log.warning("MLflow store refused a write (%s); retrying for up to %.0f s", str(e)[:200],
                                deadline - now)
                if now >= deadline:
                    raise
            elif not any(s in msg for s in _TRANSIENT) or i >= attempts - 1:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def get_or_create_experiment(c, name: str, artifact_location: str | None = None) -> str:
    exp = retry(c.get_experiment_by_name, name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            retry(c.restore_experiment, exp.experiment_id)
        return exp.experiment_id
    try:
        return retry(c.create_experiment, name, artifact_location=artifact_location)
    except Exception:  # created concurrently by another process
        exp = retry(c.get_experiment_by_name, name)
        if exp is None:
            raise
        return exp.experiment_id


def find_run(c, experiment_id: str, sweep_id: str, key: str):
    """The run tagged (sweep_id, key), or None. Oldest first if several exist (should never happen)."""
    from mlflow.entities import ViewType

    filt = f"tags.`{TAG_SWEEP}` = '{sweep_id}' and tags.`{TAG_KEY}` = '{key}'"
    runs = retry(c.search_runs, [experiment_id], filter_string=filt, run_view_type=ViewType.ACTIVE_ONLY,
                 order_by=["attributes.start_time ASC"], max_results=10)
    return runs[0] if runs else None


def create_sweep_run(c, experiment_id: str, name: str, tags: Mapping[str, str] | None = None) -> str:
    """A new parent run for a sweep; its run id is the sweep id."""
    run = retry(c.create_run, experiment_id, run_name=name, tags={TAG_KEY: "sweep", TAG_KIND: "sweep",
                                                                   **(tags or {})})
    retry(c.set_tag, run.info.run_id, TAG_SWEEP, run.info.run_id)
    return run.info.run_id


def get_or_create_trial_run(c, experiment_id: str, sweep_id: str, key: str, kind: str, parent_run_id: str,
                            tags: Mapping[str, str] | None = None) -> tuple[str, bool]:
    """(run id, created) of the trial run for `key`; an existing one is reopened (status RUNNING)."""
    run = find_run(c, experiment_id, sweep_id, key)
    if run is not None:
        if run.info.status != "RUNNING":
            retry(c.update_run, run.info.run_id, status="RUNNING")
        return run.info.run_id, False
    all_tags = {TAG_SWEEP: sweep_id, TAG_KEY: key, TAG_KIND: kind, TAG_PARENT: parent_run_id, **(tags or {})}
    run = retry(c.create_run, experiment_id, run_name=key, tags=all_tags)
    return run.info.run_id, True


def close_orphans(c, experiment_id: str, sweep_id: str, status: str = "KILLED",
                  exclude: Iterable[str] = ()) -> list[str]:
    """Mark every RUNNING run of the sweep (left by a killed driver) as `status`; returns their keys."""
    from mlflow.entities import ViewType

    exclude = set(exclude)
    filt = f"tags.`{TAG_SWEEP}` = '{sweep_id}' and attributes.status = 'RUNNING'"
    closed = []
    for run in retry(c.search_runs, [experiment_id], filter_string=filt, run_view_type=ViewType.ACTIVE_ONLY,
                     max_results=10000):
        if run.info.run_id in exclude:
            continue
        retry(c.set_terminated, run.info.run_id, status=status)
        closed.append(run.data.tags.get(TAG_KEY, run.info.run_id))
    return closed


def sweep_runs(c, experiment_id: str, sweep_id: str) -> list:
    from mlflow.entities import ViewType

    filt = f"tags.`{TAG_SWEEP}` = '{sweep_id}'"
    return retry(c.search_runs, [experiment_id], filter_string=filt, run_view_type=ViewType.ACTIVE_ONLY,
                 max_results=10000)


def log_params(c, run_id: str, params: Mapping[str, Any]) -> None:
    """Flat params in batches of 100; values stringified and cut to MLflow's length limit."""
    from mlflow.entities import Param

    items = [Param(str(k), redact_text(_param_str(v))) for k, v in params.items()]
    for i in range(0, len(items), _PARAMS_PER_BATCH):
        retry(c.log_batch, run_id, params=items[i:i + _PARAMS_PER_BATCH])


def _param_str(v: Any) -> str:
    s = "None" if v is None else str(v)
    return s if len(s) <= _MAX_PARAM_LEN else s[: _MAX_PARAM_LEN - 3] + "..."


def log_metrics(c, run_id: str, metrics: Mapping[str, float], step: int = 0,
                timestamp_ms: int | None = None) -> None:
    from mlflow.entities import Metric

    ts = timestamp_ms or int(time.time() * 1000)
    items = [Metric(k, float(v), ts, int(step)) for k, v in metrics.items() if is_number(v)]
    for i in range(0, len(items), _METRICS_PER_BATCH):
        retry(c.log_batch, run_id, metrics=items[i:i + _METRICS_PER_BATCH])


def log_text(c, run_id: str, text: str, artifact_file: str) -> None:
    retry(c.log_text, run_id, redact_text(text), artifact_file)


def log_artifact(c, run_id: str, local_path: str, artifact_path: str | None = None) -> None:
    retry(c.log_artifact, run_id, local_path, artifact_path)


def log_metrics_once(c, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
    """log_metrics for summary values, skipping keys the run already holds (a resumed sweep repeats them)."""
    have = set(retry(c.get_run, run_id).data.metrics)
    log_metrics(c, run_id, {k: v for k, v in metrics.items() if k not in have}, step=step)


def render_table(rows: list[dict], columns: list[str], floatfmt: str = ".4g") -> str:
    """A plain-text table (used by the sweep summary)."""
    def cell(v):
        if isinstance(v, float):
            return format(v, floatfmt)
        return "" if v is None else str(v)

    body = [[cell(r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(b[i]) for b in body]) for i, c in enumerate(columns)]
    out = io.StringIO()
    out.write("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip() + "\n")
    out.write("  ".join("-" * w for w in widths) + "\n")
    for b in body:
        out.write("  ".join(x.ljust(w) for x, w in zip(b, widths)).rstrip() + "\n")
    return out.getvalue()
