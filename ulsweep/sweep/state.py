"""A sweep's run directory and its state file, `<run dir>/sweep.json`.

sweep.json is written once, when a sweep starts, and read by `ulsweep run --resume` and `ulsweep report`:

    sweep_id              the sweep's MLflow parent run id
    mlflow_experiment_id  the MLflow experiment holding its runs
    tracking_uri          the tracking store, credentials masked (they never reach the run directory)
    identity              the experiment's settings that define its trials (see `identity`)
    created               time.time() at the start

Plain Python (no Ray): the report reads it too.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from ulsweep import io as uio
from ulsweep.config import ExperimentConfig, flatten, to_dict
from ulsweep.tracking.redact import check_no_userinfo, redact_uri

STATE_FILE = "sweep.json"
# sections and search settings that may change between a sweep's start and its resume
_NOT_IDENTITY = ("resources", "storage", "tracking")
_NOT_IDENTITY_SEARCH = ("max_concurrent", "max_failures", "max_trials")


class SweepError(RuntimeError):
    """A sweep cannot start or resume; the message says what to do."""


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


def read_state(run_dir: str) -> dict | None:
    """The state of the sweep in `run_dir`, or None when it holds none. A damaged file raises."""
    path = state_path(run_dir)
    if not uio.exists(path):
        return None
    return json.loads(uio.read_bytes(path))


def new_state(sweep_id: str, mlflow_experiment_id: str, tracking_uri: str, ident: dict) -> dict:
    return {"sweep_id": sweep_id, "mlflow_experiment_id": mlflow_experiment_id,
            "tracking_uri": redact_uri(tracking_uri), "identity": ident, "created": time.time()}


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


def identity_diff(old: dict, new: dict) -> list[str]:
    """The dotted keys whose values differ between two identities, sorted."""
    a, b = flatten(old), flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def check_start(state: dict | None, ident: dict, resume: bool, run_dir: str) -> None:
    """Refuse a new sweep where one exists, a resume where none does, and a resume of a changed experiment."""
    if state is not None and not resume:
        raise SweepError(f"{run_dir} already holds sweep {state['sweep_id']}; pass --resume to continue it, "
                         f"or choose another --storage / experiment name, or remove the directory")
    if state is None and resume:
        raise SweepError(f"nothing to resume: {run_dir}/{STATE_FILE} does not exist")
    if state is not None and state["identity"] != ident:
        raise SweepError(f"the experiment changed since sweep {state['sweep_id']} started "
                         f"(keys: {', '.join(identity_diff(state['identity'], ident)[:10])}); resume with the "
                         f"same file and --set values, or start a new sweep elsewhere")
