"""A sweep's run directory and its state file, `<run dir>/sweep.json`.

sweep.json is written when a sweep starts, before MLflow is touched, and completed once the sweep's MLflow
run exists; `ulsweep run --resume` and `ulsweep report` read it:

    sweep_token           a random id the sweep's MLflow run is tagged with (`ulsweep.sweep_token`): a
                          driver killed between creating that run and completing this file leaves a run
                          that `--resume` finds by it and adopts
    sweep_id              the sweep's MLflow parent run id (null until that run exists: a *pending* state)
    mlflow_experiment_id  the MLflow experiment holding its runs (null while pending)
    tracking_uri          the tracking store, credentials masked (they never reach the run directory)
    identity              the experiment's settings that define its trials (see `identity`)
    created               time.time() at the start

Plain Python (no Ray): the report reads it too.
"""
from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

from ulsweep import io as uio
from ulsweep.config import ConfigError, ExperimentConfig, experiment_from_dict, flatten, to_dict
from ulsweep.tracking.redact import check_no_userinfo, redact_uri

STATE_FILE = "sweep.json"
# sections and search settings that may change between a sweep's start and its resume
_NOT_IDENTITY = ("resources", "storage", "tracking")
_NOT_IDENTITY_SEARCH = ("max_concurrent", "max_failures", "max_trials")


class SweepError(RuntimeError):
    """A sweep cannot start or resume; the message says what to do."""


class DamagedStateError(SweepError, ValueError):
    """A state file of a run directory (sweep.json, Tune's state, the searcher's, mlflow.db) cannot be read;
    the message names the file and what to do. A ValueError too: readers that only probe for a sweep
    (`ulsweep report`) treat it as "no sweep here"."""


def resolve_run_dir(exp: ExperimentConfig, storage: str | None = None) -> str:
    """<storage>/<experiment name>: an absolute local path, or a URI when the storage is one."""
    root = storage or exp.storage
    try:  # Ray writes the storage path into its own logs: credentials must come from the environment
        check_no_userinfo(root, "--storage" if storage else "storage")
    except ValueError as e:
        raise SweepError(str(e)) from None
    if "://" in root:
        return f"{root.rstrip('/')}/{exp.name}"
    return str(Path(root).expanduser().absolute() / exp.name)


def state_path(run_dir: str) -> str:
    return f"{run_dir.rstrip('/')}/{STATE_FILE}"


def read_state(run_dir: str, pending_ok: bool = False) -> dict | None:
    """The state of the sweep in `run_dir`, or None when it holds none. A damaged file raises
    DamagedStateError naming it; so does a pending state (a start cut short) unless `pending_ok`."""
    path = state_path(run_dir)
    if not uio.exists(path):
        return None
    try:
        state = json.loads(uio.read_bytes(path))
        _check_fields(state)
    except (ValueError, UnicodeDecodeError) as e:
        raise DamagedStateError(f"{path}: damaged sweep state ({str(e)[:200]}); restore it from a backup, or move "
                                f"{run_dir} away and start the sweep anew") from None
    if is_pending(state) and not pending_ok:
        raise DamagedStateError(f"{path}: the sweep's start was cut short (no MLflow run recorded yet); "
                                f"continue it with `ulsweep run --resume`")
    return state


def _check_fields(state) -> None:
    """ValueError unless `state` has every field of sweep.json with the right type."""
    if not isinstance(state, dict):
        raise ValueError(f"expected a JSON object, got {type(state).__name__}")
    pending = state.get("sweep_id") is None
    want = {"tracking_uri": str, "identity": dict, "sweep_id": (str, type(None)),
            "mlflow_experiment_id": (str, type(None)) if pending else str}
    if pending:
        want["sweep_token"] = str  # a pending state is found again by it
    for key, typ in want.items():
        if not isinstance(state.get(key), typ):
            raise ValueError(f"field {key!r} is missing or of the wrong type (got {state.get(key)!r:.60})")


def is_pending(state: dict) -> bool:
    """True for a state written at the start of a sweep whose MLflow run is not recorded in it yet."""
    return state.get("sweep_id") is None


def pending_state(tracking_uri: str, ident: dict) -> dict:
    """The state written before anything else of a new sweep (sweep_id and experiment id still null)."""
    return {"sweep_id": None, "mlflow_experiment_id": None, "sweep_token": uuid.uuid4().hex,
            "tracking_uri": redact_uri(tracking_uri), "identity": ident, "created": time.time()}


def new_state(sweep_id: str, mlflow_experiment_id: str, tracking_uri: str, ident: dict,
              pending: dict | None = None) -> dict:
    """The complete state of a sweep whose MLflow run exists; `pending` is the state it completes."""
    base = dict(pending) if pending else {"tracking_uri": redact_uri(tracking_uri), "identity": ident,
                                          "created": time.time()}
    return base | {"sweep_id": sweep_id, "mlflow_experiment_id": mlflow_experiment_id}


def write_state(run_dir: str, state: dict) -> None:
    uio.atomic_write_text(state_path(run_dir), json.dumps(state, indent=1, sort_keys=True))


def identity(exp: ExperimentConfig) -> dict:
    """The parts of an experiment that define its trials (resources/storage/tracking may change on resume)."""
    d = to_dict(exp)
    for k in _NOT_IDENTITY:
        d.pop(k, None)
    for k in _NOT_IDENTITY_SEARCH:
        d["search"].pop(k, None)
    return d


def changed_keys(stored: dict, new: dict) -> list[str]:
    """The dotted keys whose values differ between a sweep's stored identity and an experiment's, after reading
    the stored one with today's schema: a setting added to ulsweep since the sweep started is missing from it
    and means its default, so it is a change only where the experiment sets another value. A stored identity
    today's schema refuses (a setting removed since) is compared as it is."""
    try:
        stored = identity(experiment_from_dict(stored))
    except ConfigError:
        pass
    return identity_diff(stored, new)


def identity_diff(old: dict, new: dict) -> list[str]:
    """The dotted keys whose values differ between two identities, sorted."""
    a, b = flatten(old), flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def check_start(state: dict | None, ident: dict, resume: bool, run_dir: str) -> None:
    """Refuse a new sweep where one exists, a resume where none does, and a resume of a changed experiment."""
    if state is not None and not resume:
        what = "a sweep whose start was cut short" if is_pending(state) else f"sweep {state['sweep_id']}"
        raise SweepError(f"{run_dir} already holds {what}; pass --resume to continue it, "
                         f"or choose another --storage / experiment name, or remove the directory")
    if state is None and resume:
        raise SweepError(f"nothing to resume: {run_dir}/{STATE_FILE} does not exist")
    if state is not None and (changed := changed_keys(state["identity"], ident)):
        raise SweepError(f"the experiment changed since sweep {state['sweep_id'] or '(start cut short)'} started "
                         f"(keys: {', '.join(changed[:10])}); resume with the same file and --set values, or start "
                         f"a new sweep elsewhere")
