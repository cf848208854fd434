"""`ulsweep run`: one Ray Tune + Optuna search whose trials train through Ray Train, with MLflow lineage.

    run dir  <cwd>/runs/<name> (absolute) or <storage URI>/<name>
      sweep.json            sweep id (= MLflow parent run id), MLflow experiment, config identity
      tune/                 Tune experiment state (trial table + searcher state), restorable
      trials/<key>/         each trial's training run dir = Ray Train run dir (checkpoints, images)
      mlflow.db             default tracking store (sqlite, absolute URI)
      mlartifacts/          default MLflow artifact root
      summary.json          final table

Resume (`--resume`): closes MLflow runs left RUNNING by the killed driver (KILLED), restores the Tune
experiment (trial table and searcher state are saved together), re-runs unfinished trials (their loops
resume from their own checkpoints; their MLflow runs are reopened by key, never duplicated). Trials that
had failed stay failed (raise search.max_failures to retry failures within a run).
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ulsweep import tracking
from ulsweep.config import (ConfigError, ExperimentConfig, check_data, dump_yaml, experiment_from_dict, flatten,
                            to_dict)
from ulsweep.tracking.redact import check_no_userinfo, is_redacted, redact_text, redact_uri, split_userinfo
from ulsweep.sweep.credentials import stop_tune_copying_credentials
from ulsweep.sweep.space import planned_overrides, validate_space

log = logging.getLogger(__name__)

STATE_FILE = "sweep.json"
# Ray Train V2 knobs for many short trials: notice finished workers sooner (default 2 s), and give a
# worker group on a busy small machine longer than 60 s to start (design.md §4: 2-core deadlock/timeouts).
RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300"}
TUNE_NAME = "tune"


class SweepError(RuntimeError):
    """A sweep cannot start or resume; the message says what to do."""


@dataclass
class SweepOutcome:
    run_dir: str
    tracking_uri: str
    sweep_id: str
    mlflow_experiment_id: str
    records: list[dict]  # searcher AE records (key, overrides, status, result, bases, objective)
    wall_seconds: float
    counts: dict[str, int] = field(default_factory=dict)
    loop_seconds: float = 0.0  # sum over trials of the time spent inside the training loops
    trial_results: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(r["status"] == "done" for r in self.records)


# ----------------------------------------------------------------------------------------------
# paths and state


def resolve_run_dir(exp: ExperimentConfig, storage: str | None = None) -> str:
    root = storage or exp.storage
    try:  # Ray writes the storage path into its own logs: credentials must come from the environment
        check_no_userinfo(root, "--storage" if storage else "storage")
    except ValueError as e:
        raise SweepError(str(e)) from None
    if "://" in root:
        return f"{root.rstrip('/')}/{exp.name}"
    return str((Path(root).expanduser().absolute() / exp.name))


def _identity(exp: ExperimentConfig) -> dict:
    """The parts of an experiment that define its trials (resources/storage/tracking may change on resume)."""
    d = to_dict(exp)
    for k in ("resources", "storage", "tracking"):
        d.pop(k, None)
    for k in ("max_concurrent", "max_failures", "max_trials"):
        d["search"].pop(k, None)
    return d


def _read_state(run_dir: str) -> dict | None:
    import fsspec

    fs, p = fsspec.core.url_to_fs(f"{run_dir}/{STATE_FILE}")
    if not fs.exists(p):
        return None
    with fs.open(p, "r") as f:
        return json.load(f)


def _write_state(run_dir: str, state: dict) -> None:
    from ulsweep import io as uio

    uio.atomic_write_text(f"{run_dir}/{STATE_FILE}", json.dumps(state, indent=1, sort_keys=True))


def _diff(old: dict, new: dict) -> list[str]:
    a, b = flatten(old), flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


# ----------------------------------------------------------------------------------------------
# objective -> MLflow (called by the searcher in the Tune driver process)


class ObjectiveLogger:
    """Logs an AE trial's objective (told to Optuna) into its MLflow run. Picklable."""

    def __init__(self, tracking_uri: str, metrics: tuple[str, ...]):
        # pickled into Tune's searcher state: run_sweep has moved any password to the environment already
        self.tracking_uri, self.metrics = tracking_uri, metrics

    def __call__(self, rec: dict) -> None:
        run_id = (rec.get("result") or {}).get("mlflow_run_id")
        if not run_id:
            return
        c = tracking.client(self.tracking_uri)
        if rec["objective"] is not None:
            tracking.log_metrics_once(c, run_id, {f"objective/{m}": v for m, v in zip(self.metrics, rec["objective"])})
        tracking.retry(c.set_tag, run_id, "ulsweep.objective_status", rec["status"])


# ----------------------------------------------------------------------------------------------
# the sweep


def plan_description(exp: ExperimentConfig) -> list[dict[str, Any]] | None:
    """The AE trials' overrides that `none` / `grid` will run (None for optuna: sampled on the fly)."""
    return planned_overrides(exp.search, exp.ae.train.seed)


def _uses_cuda_graphs(exp: ExperimentConfig) -> bool:
    """A reused Tune actor runs its next trial in a new thread, and CUDA graphs work in one thread of a process
    only (torch 2.11: capture fails in the second; `train.common.compile_mode` falls back to plain compile
    there): one process a trial keeps every trial on CUDA graphs."""
    modes = [exp.ae.train.compile] + [b.train.compile for b in exp.base_models]
    return "reduce-overhead" in modes and exp.resources.gpus_per_worker > 0


def fit_to_local_machine(exp: ExperimentConfig, cluster: dict, started_here: bool, out) -> ExperimentConfig:
    """The same experiment file on a laptop: a Ray instance started here without GPUs runs GPU trials on
    CPU instead of waiting forever for a GPU. A cluster (--address) is left alone: its GPU nodes may still
    be on their way (autoscaling from zero)."""
    if not started_here or exp.resources.gpus_per_worker == 0 or cluster.get("GPU", 0) > 0:
        return exp
    print(f"note: no GPU on this machine; trials run on CPU (resources.gpus_per_worker "
          f"{exp.resources.gpus_per_worker} -> 0)", file=out, flush=True)
    return experiment_from_dict(to_dict(exp), {"resources.gpus_per_worker": 0.0, "resources.backend": "auto"})


def run_sweep(exp: ExperimentConfig, *, resume: bool = False, address: str | None = None,
              storage: str | None = None, tracking_uri: str | None = None, train_impl: str = "ulsweep",
              verbose: bool = False, stream=None) -> SweepOutcome:
    """Run (or resume) the sweep of `exp` to completion and return its outcome."""
    import ray
    from ray import tune

    from ulsweep.sweep.progress import ProgressCallback, summary_table
    from ulsweep.sweep.searcher import SpawningSearcher
    from ulsweep.sweep.trial import SweepContext, run_trial, trial_dirname, trial_name, trial_resources

    out = stream or sys.stdout
    t_start = time.time()
    phases: dict[str, float] = {}
    validate_space(exp)
    check_data(exp)  # before Ray starts
    run_dir = resolve_run_dir(exp, storage)
    tune_dir = f"{run_dir}/{TUNE_NAME}"
    state = _read_state(run_dir)
    ident = _identity(exp)
    if state is not None and not resume:
        raise SweepError(f"{run_dir} already holds sweep {state['sweep_id']}; pass --resume to continue it, "
                         f"or choose another --storage / experiment name, or remove the directory")
    if state is None and resume:
        raise SweepError(f"nothing to resume: {run_dir}/{STATE_FILE} does not exist")
    if state is not None and state["identity"] != ident:
        raise SweepError(f"the experiment changed since sweep {state['sweep_id']} started "
                         f"(keys: {', '.join(_diff(state['identity'], ident)[:10])}); resume with the same file "
                         f"and --set values, or start a new sweep elsewhere")

    # ---- MLflow: parent run (reused on resume), orphans closed. Runs in a thread while Ray starts:
    # both take seconds (a new sqlite store runs its migrations).
    if state is not None:  # a resumed sweep stays in its tracking store
        uri = _resume_tracking_uri(state, tracking_uri, run_dir)
    else:
        uri = tracking.resolve_tracking_uri(tracking_uri, exp.tracking.uri, run_dir)
    uri = tracking.credentials_to_env(uri)  # before Ray starts (inherits it) and before trials pickle the URI
    pool = ThreadPoolExecutor(1)
    mlflow_setup = pool.submit(_setup_tracking, exp, run_dir, uri, state, ident, out)

    # ---- Ray. Tune snapshots its trial table + searcher every 2 s (default >= 10 s): a kill then loses
    # less (what it loses is re-run idempotently: finished loops return their stored result at once).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    # Tune copies AWS_* credentials into each trial's runtime env, and Ray's runtime-env agent logs runtime
    # envs at INFO: a Ray that ulsweep starts logs at WARNING so that no credential lands in its session logs
    # (for a cluster of your own, start it with RAY_LOGGER_LEVEL=warning too)
    os.environ.setdefault("RAY_LOGGER_LEVEL", "warning")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    stop_tune_copying_credentials()  # Ray would log them: trials take credentials from their node's environment
    address = address or os.environ.get("RAY_ADDRESS") or None
    started_ray = False
    try:
        if not ray.is_initialized():
            kw: dict[str, Any] = {"log_to_driver": verbose, "runtime_env": {"env_vars": dict(RAY_TRAIN_ENV)}}
            if address:
                ray.init(address=address, **kw)
            else:
                ray.init(include_dashboard=False, **kw)
            started_ray = True
        c, sweep_id, eid = mlflow_setup.result()  # its errors surface here
    except BaseException:
        if started_ray:
            ray.shutdown()
        raise
    finally:
        pool.shutdown()  # waits for the MLflow setup even when Ray failed to start
    phases["setup"] = time.time() - t_start
    exp = fit_to_local_machine(exp, ray.cluster_resources(), started_here=not address, out=out)
    try:
        ctx = SweepContext(experiment=to_dict(exp), run_dir=run_dir, tracking_uri=uri, mlflow_experiment_id=eid,
                           sweep_id=sweep_id, train_impl=train_impl)
        trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), trial_resources(exp.resources))
        n_planned = plan_description(exp)
        n_ae = len(n_planned) if n_planned is not None else exp.search.num_samples
        print(f"sweep {exp.name}: {n_ae} autoencoder trial(s) x {len(exp.base_models)} base model(s), "
              f"method {exp.search.method}, {exp.search.max_concurrent} at a time, "
              f"{exp.resources.num_workers} worker(s) each\n  run dir  {run_dir}\n  mlflow   {redact_uri(uri)}  "
              f"(experiment {exp.tracking.experiment or exp.name}, sweep run {sweep_id})", file=out, flush=True)
        if resume and tune.Tuner.can_restore(tune_dir):
            # errored trials stay errored: the searcher already told Optuna they failed (retries within a
            # run: search.max_failures)
            tuner = tune.Tuner.restore(tune_dir, trainable=trainable, resume_unfinished=True,
                                       resume_errored=False)
        else:
            searcher = SpawningSearcher(exp.search, [b.name for b in exp.base_models], exp.ae.train.seed,
                                        on_objective=ObjectiveLogger(uri, exp.search.metrics))
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(search_alg=searcher, num_samples=-1,
                                            max_concurrent_trials=exp.search.max_concurrent,
                                            reuse_actors=not _uses_cuda_graphs(exp),  # warm trial processes
                                            trial_name_creator=trial_name, trial_dirname_creator=trial_dirname),
                run_config=tune.RunConfig(name=TUNE_NAME, storage_path=run_dir, verbose=0,
                                          callbacks=[ProgressCallback()],
                                          failure_config=tune.FailureConfig(max_failures=exp.search.max_failures)),
            )
        t_fit = time.time()
        grid = tuner.fit()
        phases["tune_fit"] = time.time() - t_fit
    except BaseException:  # Ctrl-C or a driver error: nothing may stay RUNNING; --resume continues
        try:
            tracking.close_orphans(c, eid, sweep_id, status="KILLED")
        except Exception as e:
            log.warning("could not close MLflow runs: %s", e)
        print(f"sweep interrupted; continue it with --resume (run dir {run_dir})", file=out, flush=True)
        raise
    finally:
        if started_ray:
            ray.shutdown()

    # ---- outcome: searcher state as Tune saved it at the end
    searcher = SpawningSearcher(exp.search, [b.name for b in exp.base_models], exp.ae.train.seed)
    searcher.restore_from_dir(_local_tune_dir(tune_dir))
    records = sorted(searcher.aes.values(), key=lambda r: r["index"])
    trial_results = []
    loop_s = 0.0
    for r in grid:
        m = r.metrics or {}
        if m.get("final"):
            loop_s += float(m.get("loop_seconds", 0.0))
        cfg = r.config or {}
        trial_results.append({k: m.get(k) for k in ("loop_seconds", "train_seconds", "step")}
                             | {"key": cfg.get("key"), "kind": cfg.get("kind"),
                                "error": _last_line(r.error) if r.error else None})
    wall = time.time() - t_start
    outcome = SweepOutcome(run_dir, uri, sweep_id, eid, records, wall, searcher.counts(), loop_s, trial_results)

    # ---- close the sweep in MLflow
    ranked = searcher.ranked()
    if ranked:
        best = ranked[0]
        tracking.log_metrics_once(c, sweep_id, {f"best/{m}": v for m, v in zip(exp.search.metrics, best["objective"])})
        tracking.retry(c.set_tag, sweep_id, "ulsweep.best_trial", best["key"])
    tracking.log_metrics_once(c, sweep_id, {f"trials/{k}": float(v) for k, v in outcome.counts.items()})
    _replay_spools(c, run_dir, out)
    leftovers = tracking.close_orphans(c, eid, sweep_id, status="FAILED", exclude=[sweep_id])
    if leftovers:
        log.warning("runs still RUNNING after the sweep were marked FAILED: %s", leftovers)
    tracking.retry(c.set_terminated, sweep_id, status="FINISHED" if outcome.ok else "FAILED")

    phases["wall"] = time.time() - t_start
    summary = {"run_dir": run_dir, "tracking_uri": redact_uri(uri), "sweep_id": sweep_id, "wall_seconds": wall,
               "phases": phases, "counts": outcome.counts, "best": [r["key"] for r in ranked],
               "trials": [{k: r[k] for k in ("key", "overrides", "status", "objective")} |
                          {"ae_metrics": r["result"], "bases": r["bases"]} for r in records]}
    from ulsweep import io as uio

    uio.atomic_write_text(f"{run_dir}/summary.json", json.dumps(summary, indent=1, default=str))

    print("\n" + summary_table(ranked + [r for r in records if r["objective"] is None], exp.search.metrics),
          file=out)
    failed = [r for r in trial_results if r["error"]]
    for f in failed:
        print(f"failed trial {f.get('key')}: {f['error'][:300]}", file=out)
    print(f"{outcome.counts}  wall {wall:.0f} s\n  run dir  {run_dir}\n  mlflow   {redact_uri(uri)}\n"
          f"  browse   ulsweep ui {run_dir}", file=out, flush=True)
    _dashboard(outcome, out)
    return outcome


def _dashboard(outcome: SweepOutcome, out) -> None:
    """Write the sweep's dashboard (HTML + CSV, no PNGs: `ulsweep report` adds them); never fails the sweep."""
    from ulsweep.report.dashboard import make_report

    try:
        res = make_report(outcome.run_dir, tracking_uri=outcome.tracking_uri, png=False)
    except Exception as e:  # a report problem must not turn a finished sweep into a failure
        print(f"  dashboard not written ({type(e).__name__}: {e}); retry with: ulsweep report {outcome.run_dir}",
              file=out, flush=True)
        return
    print(f"  dashboard {res.index_html}", file=out, flush=True)


def _last_line(err: BaseException) -> str:
    lines = [x for x in str(err).strip().splitlines() if x.strip()]
    return lines[-1][:500] if lines else repr(err)


def _setup_tracking(exp: ExperimentConfig, run_dir: str, uri: str, state: dict | None, ident: dict, out):
    """Create (or, on resume, reopen) the sweep's parent run; returns (client, sweep id, experiment id)."""
    c = tracking.client(uri)
    if state is None:
        eid = tracking.get_or_create_experiment(c, exp.tracking.experiment or exp.name,
                                                exp.tracking.artifact_location
                                                or tracking.default_artifact_location(uri, run_dir))
        sweep_id = tracking.create_sweep_run(c, eid, f"sweep-{exp.name}", tags={"ulsweep.run_dir": run_dir})
        tracking.log_params(c, sweep_id, {**{f"search.{k}": v for k, v in flatten(to_dict(exp.search)).items()},
                                          "experiment": exp.name, "base_models": [b.name for b in exp.base_models],
                                          "resources.num_workers": exp.resources.num_workers})
        tracking.log_text(c, sweep_id, dump_yaml(exp), "experiment.yaml")
        _write_state(run_dir, {"sweep_id": sweep_id, "mlflow_experiment_id": eid,
                               "tracking_uri": redact_uri(uri), "identity": ident, "created": time.time()})
        return c, sweep_id, eid
    sweep_id, eid = state["sweep_id"], state["mlflow_experiment_id"]
    _replay_spools(c, run_dir, out)
    closed = tracking.close_orphans(c, eid, sweep_id, status="KILLED", exclude=[sweep_id])
    tracking.retry(c.update_run, sweep_id, status="RUNNING")
    if closed:
        print(f"resume: marked {len(closed)} MLflow run(s) left RUNNING as KILLED: {', '.join(closed)}",
              file=out, flush=True)
    return c, sweep_id, eid


def _replay_spools(c, run_dir: str, out) -> None:
    """Metric points that trials spooled to disk while MLflow was unreachable go to MLflow now."""
    try:
        n = tracking.replay_spools(c, run_dir)
    except Exception as e:  # they stay on disk; the next resume or end of the sweep tries again
        log.warning("could not replay spooled metrics under %s: %s", run_dir, e)
        return
    if n:
        print(f"mlflow: sent {n} metric point(s) that trials had spooled to disk (MLflow slow or unreachable)",
              file=out, flush=True)


def _resume_tracking_uri(state: dict, given: str | None, run_dir: str) -> str:
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


def _local_tune_dir(tune_dir: str) -> str:
    """Searcher state for restore_from_dir, which globs a local directory (download it for URIs)."""
    if "://" not in tune_dir:
        return tune_dir
    import tempfile

    import fsspec

    fs, p = fsspec.core.url_to_fs(tune_dir)
    d = tempfile.mkdtemp(prefix="ulsweep-tune-")
    for f in fs.glob(f"{p}/searcher-state-*.pkl"):
        fs.get(f, os.path.join(d, f.rsplit("/", 1)[-1]))
    return d


def dry_run(exp: ExperimentConfig, storage: str | None = None, tracking_uri: str | None = None,
            stream=None) -> int:
    """Print the resolved experiment and the AE trials the search would run; start nothing."""
    out = stream or sys.stdout
    validate_space(exp)
    run_dir = resolve_run_dir(exp, storage)
    uri = tracking.resolve_tracking_uri(tracking_uri, exp.tracking.uri, run_dir, create=False)
    print("# resolved experiment", file=out)
    print(redact_text(dump_yaml(exp)), file=out)
    print(f"# run dir: {run_dir}\n# tracking: {redact_uri(uri)}", file=out)
    plan = plan_description(exp)
    bases = [b.name for b in exp.base_models]
    if plan is None:
        print(f"# {exp.search.num_samples} AE trial(s) sampled by {exp.search.method} over:", file=out)
        for k, spec in exp.search.space.items():
            print(f"#   {k}: {spec}", file=out)
    else:
        print(f"# {len(plan)} AE trial(s) ({exp.search.method}), each followed by base model(s) {bases}:", file=out)
        for i, ov in enumerate(plan):
            print(f"ae-{i:04d}  " + "  ".join(f"{k}={v}" for k, v in ov.items()), file=out)
    print(f"# objective: {list(zip(exp.search.metrics, exp.search.modes))}; per trial: "
          f"{exp.resources.num_workers} worker(s) x {exp.resources.cpus_per_worker} CPU, "
          f"{exp.resources.gpus_per_worker} GPU; {exp.search.max_concurrent} trial(s) at a time", file=out)
    return 0


__all__ = ["run_sweep", "dry_run", "resolve_run_dir", "SweepError", "SweepOutcome", "ConfigError"]
