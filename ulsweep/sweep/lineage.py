"""The sweep's MLflow parent run, seen from the sweep driver: opened (or reopened on resume), given each AE
trial's objective, closed with the best trial and the trial counts.

Trials log into child runs of it (ulsweep.sweep.trial); this module holds what the driver process does.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from ulsweep import tracking
from ulsweep.config import ExperimentConfig, dump_yaml, flatten, to_dict
from ulsweep.sweep.state import SweepError, is_pending, new_state, pending_state, write_state
from ulsweep.testing import faults
from ulsweep.tracking.redact import is_redacted, redact_uri, split_userinfo

log = logging.getLogger(__name__)

TAG_TOKEN = "ulsweep.sweep_token"  # the sweep_token of sweep.json (ulsweep.sweep.state)


@dataclass(frozen=True)
class SweepRun:
    """The sweep's parent run: where it lives and the client that reaches it."""

    client: object  # an MlflowClient
    tracking_uri: str
    sweep_id: str  # the parent run's id
    experiment_id: str


def tracking_uri_of(exp: ExperimentConfig, state: dict | None, given: str | None, run_dir: str) -> str:
    """The sweep's tracking URI with any password moved to the environment (before Ray starts, so that Ray
    inherits it, and before trials pickle the URI). A resumed sweep stays in its tracking store."""
    if state is not None:
        uri = resume_tracking_uri(state, given, run_dir)
    else:
        uri = tracking.resolve_tracking_uri(given, exp.tracking.uri, run_dir)
    return tracking.credentials_to_env(uri)


def resume_tracking_uri(state: dict, given: str | None, run_dir: str) -> str:
    """The tracking URI of a resumed sweep: the stored one, or the given one if it names the same store.
    A stored URI whose password was masked (sweep.json never holds credentials) must be given again."""
    stored = state["tracking_uri"]
    given = given or (os.environ.get("MLFLOW_TRACKING_URI") if is_redacted(stored) else None)
    if not given:
        if is_redacted(stored):
            raise SweepError(f"sweep {state['sweep_id']} is tracked in {stored}; its credentials are not stored: "
                             f"pass --tracking-uri (or set MLFLOW_TRACKING_URI) with them to resume")
        return stored
    uri = tracking.resolve_tracking_uri(given, None, run_dir)
    if split_userinfo(uri)[0] != split_userinfo(stored)[0]:  # the same store, whoever logs in
        raise SweepError(f"sweep {state['sweep_id']} is tracked in {stored}, not {redact_uri(given)}")
    return uri


def open_sweep_run(exp: ExperimentConfig, run_dir: str, uri: str, state: dict | None, ident: dict,
                   out) -> SweepRun:
    """The sweep's parent run. A pending state (sweep.json as written before MLflow was touched; written here
    when `state` is None) gets its run created, or adopted when a driver killed during its start created it
    already, and is then completed; a complete state's run is reopened (resume), closing the runs a killed
    driver left RUNNING."""
    if state is None:
        state = pending_state(uri, ident)
        write_state(run_dir, state)
    c = tracking.client(uri)
    if is_pending(state):
        return _create_sweep_run(c, exp, run_dir, uri, state, ident, out)
    run = SweepRun(c, uri, state["sweep_id"], state["mlflow_experiment_id"])
    replay_spools(c, run_dir, out)
    closed = tracking.close_orphans(c, run.experiment_id, run.sweep_id, status="KILLED", exclude=[run.sweep_id])
    tracking.retry(c.update_run, run.sweep_id, status="RUNNING")
    if closed:
        print(f"resume: marked {len(closed)} MLflow run(s) left RUNNING as KILLED: {', '.join(closed)}",
              file=out, flush=True)
    return run


def _create_sweep_run(c, exp: ExperimentConfig, run_dir: str, uri: str, pending: dict, ident: dict,
                      out) -> SweepRun:
    """Create (or adopt) the parent run of a sweep whose state is pending, then complete sweep.json. Every step
    may be repeated: a driver killed anywhere in here leaves what `--resume` finishes the same way."""
    eid = tracking.get_or_create_experiment(c, exp.tracking.experiment or exp.name,
                                            exp.tracking.artifact_location
                                            or tracking.default_artifact_location(uri, run_dir))
    sweep_id = _adopt_sweep_run(c, eid, pending["sweep_token"], out)
    if sweep_id is None:
        sweep_id = tracking.create_sweep_run(c, eid, f"sweep-{exp.name}",
                                             tags={"ulsweep.run_dir": run_dir, TAG_TOKEN: pending["sweep_token"]})
    faults.point("driver.sweep_run")  # tests: the driver dies between its run's creation and sweep.json
    tracking.retry(c.set_tag, sweep_id, tracking.TAG_SWEEP, sweep_id)
    tracking.log_params(c, sweep_id, {**{f"search.{k}": v for k, v in flatten(to_dict(exp.search)).items()},
                                      "experiment": exp.name, "base_models": [b.name for b in exp.base_models],
                                      "resources.num_workers": exp.resources.num_workers})
    tracking.log_text(c, sweep_id, dump_yaml(exp), "experiment.yaml")
    write_state(run_dir, new_state(sweep_id, eid, uri, ident, pending=pending))
    return SweepRun(c, uri, sweep_id, eid)


def _adopt_sweep_run(c, experiment_id: str, token: str, out) -> str | None:
    """The id of the run tagged with this sweep's token (created by a driver killed during its start), reopened;
    None when there is none."""
    from mlflow.entities import ViewType

    found = tracking.retry(c.search_runs, [experiment_id], filter_string=f"tags.`{TAG_TOKEN}` = '{token}'",
                           run_view_type=ViewType.ACTIVE_ONLY, order_by=["attributes.start_time ASC"],
                           max_results=10)
    if not found:
        return None
    run = found[0]
    if run.info.status != "RUNNING":
        tracking.retry(c.update_run, run.info.run_id, status="RUNNING")
    print(f"resume: adopted sweep run {run.info.run_id}, created by a driver stopped during its start",
          file=out, flush=True)
    return run.info.run_id


def replay_spools(c, run_dir: str, out) -> None:
    """Metric points that trials spooled to disk while MLflow was unreachable go to MLflow now."""
    try:
        n = tracking.replay_spools(c, run_dir)
    except Exception as e:  # they stay on disk; the next resume or end of the sweep tries again
        log.warning("could not replay spooled metrics under %s: %s", run_dir, e)
        return
    if n:
        print(f"mlflow: sent {n} metric point(s) that trials had spooled to disk (MLflow slow or unreachable)",
              file=out, flush=True)


def mark_interrupted(run: SweepRun) -> None:
    """Ctrl-C or a driver error: no run of the sweep may stay RUNNING (--resume reopens them)."""
    try:
        tracking.close_orphans(run.client, run.experiment_id, run.sweep_id, status="KILLED")
    except Exception as e:
        log.warning("could not close MLflow runs: %s", e)


def tag_precompile(run: SweepRun, done: list[dict]) -> None:
    """What the sweep compiled ahead (ulsweep/sweep/precompile.py) on its parent run: tag `ulsweep.precompile`, one
    JSON entry per finished task (base, latent shape, how it got through the compile gate, seconds, the step's
    compile phases). An entry too long for MLflow's 5,000-character tag loses its phases, never its JSON's end."""
    if done:
        entries = [{k: (round(v, 1) if isinstance(v, float) else v) for k, v in r.items()} for r in done]
        value = json.dumps(entries)
        if len(value) > 5000:
            value = json.dumps([{k: v for k, v in r.items() if k != "step_phases_s"} for r in entries])
        tracking.retry(run.client.set_tag, run.sweep_id, "ulsweep.precompile", value[:5000])


def close_sweep_run(run: SweepRun, ranked: list[dict], metrics: tuple[str, ...], counts: dict[str, int],
                    status: str, run_dir: str, out) -> None:
    """The best trial and the trial counts on the parent run, recomputed from the trials; spooled points
    sent; every run closed. `status`: FINISHED, FAILED (a trial failed) or KILLED (the sweep stopped before
    its end, e.g. Ctrl-C; the trial runs left RUNNING are KILLED too, and --resume reopens them)."""
    c, sweep_id = run.client, run.sweep_id
    if ranked:
        tracking.retry(c.set_tag, sweep_id, "ulsweep.best_trial", ranked[0]["key"])
    held = tracking.retry(c.get_run, sweep_id).data.metrics
    log_current(c, sweep_id, sweep_metrics(ranked, metrics, counts, held))
    replay_spools(c, run_dir, out)
    leftovers = tracking.close_orphans(c, run.experiment_id, sweep_id, exclude=[sweep_id],
                                       status="KILLED" if status == "KILLED" else "FAILED")
    if leftovers and status != "KILLED":
        log.warning("runs still RUNNING after the sweep were marked FAILED: %s", leftovers)
    tracking.retry(c.set_terminated, sweep_id, status=status)


def sweep_metrics(ranked: list[dict], metrics: tuple[str, ...], counts: dict[str, int],
                  held: dict[str, float]) -> dict[str, float]:
    """The sweep run's summary metrics, from the trials as they are now: `best/<metric>` of the best AE trial
    and `trials/<status>` counts (as in summary.json). A count the run `held` from an earlier moment (an
    interrupted run's `trials/ae_running`) whose status no trial has now is 0."""
    out = {f"trials/{k}": float(v) for k, v in counts.items()}
    out |= {k: 0.0 for k in held if k.startswith("trials/") and k not in out}
    if ranked:
        out |= {f"best/{m}": float(v) for m, v in zip(metrics, ranked[0]["objective"])}
    return out


def log_current(c, run_id: str, values: dict[str, float]) -> None:
    """Make `values` the run's latest values of their metrics (what MLflow shows: the point of the highest
    step): a metric whose latest value differs gets a new point one step after its last one."""
    held = tracking.retry(c.get_run, run_id).data.metrics
    for k, v in values.items():
        if k in held and held[k] == v:
            continue
        last = max((m.step for m in tracking.retry(c.get_metric_history, run_id, k)), default=-1) \
            if k in held else -1
        tracking.log_metrics(c, run_id, {k: v}, step=last + 1)


class ObjectiveLogger:
    """Logs an AE trial's objective (told to Optuna) into its MLflow run. Picklable: the searcher holds it,
    and Tune pickles the searcher into its experiment state."""

    def __init__(self, tracking_uri: str, metrics: tuple[str, ...]):
        # run_sweep has moved any password out of the URI into the environment already
        self.tracking_uri, self.metrics = tracking_uri, metrics

    def __call__(self, rec: dict) -> None:
        run_id = (rec.get("result") or {}).get("mlflow_run_id")
        if not run_id:
            return
        c = tracking.client(self.tracking_uri)
        if rec["objective"] is not None:
            tracking.log_metrics_once(c, run_id, {f"objective/{m}": v for m, v in zip(self.metrics, rec["objective"])})
        tracking.retry(c.set_tag, run_id, "ulsweep.objective_status", rec["status"])
