"""`ulsweep run`: one Ray Tune + Optuna search whose trials train through Ray Train, with MLflow lineage.

    run dir  <cwd>/runs/<name> (absolute) or <storage URI>/<name>
      sweep.json            sweep id (= MLflow parent run id), MLflow experiment, config identity (state.py)
      tune/                 Tune experiment state (trial table + searcher state), restorable
      trials/<key>/         each trial's training run dir = Ray Train run dir (checkpoints, images)
      mlflow.db             default tracking store (sqlite, absolute URI)
      mlartifacts/          default MLflow artifact root
      summary.json          final table (outcome.py)
      tune_closed.json      the Tune snapshot the last driver to end left (statecheck.py)

sweep.json is written before any MLflow run exists (pending, then completed with the sweep's run id), and
the state files are checked before Ray starts (statecheck.py: a damaged one is named, with what to do).

Resume (`--resume`): closes MLflow runs left RUNNING by the killed driver (KILLED), restores the Tune
experiment (trial table and searcher state are saved together; a snapshot the kill cut short is set aside
and the one before it restored), re-runs unfinished trials (their loops
resume from their own checkpoints; their MLflow runs are reopened by key, never duplicated). Trials that
had failed for a reason a retry may change (storage read-only or full for longer than the writes retry, a
training process killed more often than resources.max_worker_failures) are re-run under their keys, and
a revived AE trial spawns its base trials; a deterministic failure (NaN loss, bad checkpoint, config or
data error: the trial's failure.json) stays failed.

Ctrl-C: Tune stops the trials and saves its state; the sweep run and the trial runs still RUNNING are
marked KILLED, summary.json is written, and the exit code is 130. Every run and resume ends by recomputing
the sweep run's `best/*` and `trials/*` from the trials (lineage.close_sweep_run).
"""
from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ulsweep import io as uio, tracking
from ulsweep.config import ConfigError, ExperimentConfig, check_data, dump_yaml, experiment_from_dict, to_dict
from ulsweep.sweep import lineage, mps, outcome as outcomes, precompile, stacking
from ulsweep.sweep.clock import DriverClock
from ulsweep.sweep.credentials import stop_tune_copying_credentials
from ulsweep.sweep.lineage import SweepRun
from ulsweep.sweep.outcome import SweepOutcome
from ulsweep.sweep.space import planned_overrides, validate_space
from ulsweep.sweep.state import (
    DamagedStateError,
    SweepError,
    check_start,
    identity,
    is_pending,
    pending_state,
    read_state,
    resolve_run_dir,
    write_state,
)
from ulsweep.sweep.statecheck import (
    TUNE_NAME,
    RestoreTripwire,
    check_sqlite_store,
    record_closed_snapshot,
    restorable_tune_state,
    set_aside_torn_snapshots,
    tune_advice,
    tune_dir_of,
)
from ulsweep.tracking.redact import redact_text, redact_uri

# Ray Train V2 knobs for many short trials: notice finished workers sooner (default 2 s), and give a
# worker group on a busy small machine longer than 60 s to start (design.md §4: 2-core deadlock/timeouts).
RAY_TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300"}


def run_sweep(exp: ExperimentConfig, *, resume: bool = False, address: str | None = None,
              storage: str | None = None, tracking_uri: str | None = None, train_impl: str = "ulsweep",
              verbose: bool = False, stream=None, t_command: float | None = None) -> SweepOutcome:
    """Run (or resume) the sweep of `exp` to completion and return its outcome. `t_command`: when the command
    began (the CLI's handler), to time its config and data check too."""
    clock = DriverClock(t_command)  # the driver's own steps (clock.py)
    import ray

    clock.mark("import_ray")
    out = stream or sys.stdout
    t_start = clock.t0
    run_dir, state, ident = _open_run_dir(exp, storage, resume)
    uri = lineage.tracking_uri_of(exp, state, tracking_uri, run_dir)
    restore = _check_state_files(exp, run_dir, uri, state, out)
    if restore:
        _revive_failed_trials(exp, run_dir, out)
    if state is None:  # before any MLflow run exists: --resume can always find (or create) the sweep's run
        state = pending_state(uri, ident)
        write_state(run_dir, state)
    clock.mark("check")  # experiment, data, run dir, state files, the MLflow store
    address = address or os.environ.get("RAY_ADDRESS") or None
    daemon = _start_mps(exp, run_dir, address, out)
    clock.mark("mps")
    closing = None  # Ray's shutdown, the daemon's stop: a thread beside closing the runs, the summary, the dashboard
    try:
        run, started_ray = _start_ray_and_sweep_run(exp, run_dir, uri, state, ident, address, verbose, out,
                                                    env=daemon.env if daemon else {})
        clock.mark("ray_and_sweep_run")
        phases = {"setup": time.time() - t_start}
        exp = fit_to_local_machine(exp, ray.cluster_resources(), started_here=not address, out=out)
        # a Ray started or joined here has precompile.KEEP_GPUS_ENV in every worker's environment (_init_ray)
        keeps_gpus = started_ray and bool(precompile.keep_gpus_env())
        try:
            grid, phases["tune_fit"] = _fit(exp, run_dir, run, train_impl, restore, out, clock, keeps_gpus)
            searcher = _final_searcher(exp, run_dir)  # Tune's results read while Ray is up
            result = _collect_outcome(run_dir, run, searcher, grid, wall=time.time() - t_start)
            ranked = searcher.ranked()
            clock.mark("outcome")
        except BaseException:
            if started_ray:
                ray.shutdown()
                clock.mark("ray_shutdown")
            raise
        closing = Closing(ray.shutdown if started_ray else None, daemon)
    finally:
        if closing is None and daemon:
            daemon.stop()
            clock.mark("mps_stop")
    try:
        lineage.close_sweep_run(run, ranked, exp.search.metrics, result.counts, result.status, run_dir, out)
        clock.mark("close_runs")
        phases["wall"] = time.time() - t_start
        outcomes.write_summary(result, ranked, phases | {"driver": clock.phases()})
        outcomes.print_summary(result, ranked, exp.search.metrics, out)
        clock.mark("summary")
        if result.finished:
            outcomes.write_dashboard(result, out)
            clock.mark("dashboard")
        else:  # Ctrl-C: Tune stopped its trials and saved its state
            print(f"sweep stopped before its end; continue it with --resume (run dir {run_dir})", file=out,
                  flush=True)
    except BaseException:
        closing.join(clock, raise_error=False)  # Ray is down and the daemon stopped before the error goes on
        raise
    closing.join(clock)
    _record_driver_phases(result, ranked, phases, clock, run, out)
    return result


class Closing:
    """What ends a sweep's services once its fit is over, in a thread beside the driver's last steps (none of which
    needs Ray): `shutdown` (Ray's, where this driver started it), then the MPS `daemon`'s stop (its clients, the
    Ray workers, gone first). `join(clock)` waits for it and times the wait (`shutdown_wait`), and its steps as
    having run beside the others."""

    def __init__(self, shutdown: Callable[[], None] | None, daemon: mps.MpsDaemon | None):
        self.steps: list[tuple[str, float, float]] = []
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(shutdown, daemon), name="ulsweep-closing",
                                       daemon=True)
        self.thread.start()

    def _run(self, shutdown, daemon) -> None:
        for name, step in (("ray_shutdown", shutdown), ("mps_stop", daemon.stop if daemon else None)):
            if step is None:
                continue
            t0 = time.time()
            try:
                step()
            except BaseException as e:  # noqa: BLE001 - raised by join, in the driver's thread
                self.error = self.error or e
            self.steps.append((name, t0, time.time()))

    def join(self, clock: DriverClock, raise_error: bool = True) -> None:
        self.thread.join()
        clock.mark("shutdown_wait")
        for step in self.steps:
            clock.beside(*step)
        if raise_error and self.error is not None:
            raise self.error


def _record_driver_phases(result: SweepOutcome, ranked: list[dict], phases: dict, clock: DriverClock,
                          run: SweepRun, out) -> None:
    """The driver's steps, the summary and dashboard included: into summary.json again (`phases.driver`, those
    that ran beside them `phases.driver_beside`, and whether its process imported torch, which it needs not), as
    the sweep run's tag `ulsweep.driver_phases`, and on the console; never fails the sweep."""
    print(clock.line(), file=out, flush=True)
    try:
        outcomes.write_summary(result, ranked, phases | {"driver": clock.phases(),
                                                         "driver_beside": clock.phases_beside(),
                                                         "driver_imported_torch": "torch" in sys.modules})
        tracking.retry(run.client.set_tag, run.sweep_id, "ulsweep.driver_phases", clock.tag())
    except Exception as e:  # noqa: BLE001 - timings only: the sweep's results are written already
        print(f"  driver phases not recorded ({type(e).__name__}: {str(e)[:200]})", file=out, flush=True)


# ----------------------------------------------------------------------------------------------
# the steps of run_sweep


def _open_run_dir(exp: ExperimentConfig, storage: str | None, resume: bool) -> tuple[str, dict | None, dict]:
    """Check the experiment and its data (before Ray starts), then find the run dir and the state in it:
    (run dir, state or None, the experiment's identity)."""
    validate_space(exp)
    check_data(exp)
    run_dir = resolve_run_dir(exp, storage)
    state = read_state(run_dir, pending_ok=True)
    ident = identity(exp)
    check_start(state, ident, resume, run_dir)
    return run_dir, state, ident


def _check_state_files(exp: ExperimentConfig, run_dir: str, uri: str, state: dict | None, out) -> bool:
    """Refuse damaged state files before Ray starts (DamagedStateError naming the file and what to do), after
    setting aside a Tune snapshot that a kill cut short; True when the run dir holds a Tune experiment to
    restore."""
    check_sqlite_store(uri)
    if state is None or is_pending(state):
        return False
    set_aside_torn_snapshots(run_dir, out)
    return restorable_tune_state(_tune_dir(run_dir), exp.search.method)


def _revive_failed_trials(exp: ExperimentConfig, run_dir: str, out) -> list[str]:
    """Resume: the trials that failed for a reason a retry may change (no failure.json: not a NaN loss, bad
    checkpoint, config or data error) are handed out again by the restored searcher, under their keys; a
    revived AE trial then spawns its base trials. Rewrites the searcher's saved state and marks Tune's search
    generator unfinished (it stops asking a searcher that once said FINISHED). Returns the revived keys."""
    import pickle

    import ray.cloudpickle as cloudpickle

    from ulsweep.sweep.searcher import base_key
    from ulsweep.sweep.statecheck import SEARCH_GEN_STATE, SEARCHER_STATE, newest, unfinished_trials
    from ulsweep.sweep.trial import trial_dir
    from ulsweep.sweep.worker import read_failure

    tune_dir = _tune_dir(run_dir)
    searcher = _final_searcher(exp, run_dir)
    aes, bases = searcher.revivable(lambda key: read_failure(trial_dir(run_dir, key)) is not None)
    if not aes and not bases:
        return []
    resumed = {searcher.trial_keys[t] for t in unfinished_trials(tune_dir) if t in searcher.trial_keys}
    searcher.revive(aes, bases, resumed)
    searcher_file, gen_file = newest(tune_dir, SEARCHER_STATE), newest(tune_dir, SEARCH_GEN_STATE)
    gen = cloudpickle.loads(uio.read_bytes(gen_file))
    gen["finished"] = False
    uio.atomic_write_bytes(searcher_file, pickle.dumps(searcher.get_state()))
    uio.atomic_write_bytes(gen_file, cloudpickle.dumps(gen))
    keys = aes + [base_key(a, b) for a, b in bases]
    print(f"resume: re-running {len(keys)} trial(s) that had failed for a reason a retry may change: "
          f"{', '.join(keys)}", file=out, flush=True)
    return keys


def _start_mps(exp: ExperimentConfig, run_dir: str, address: str | None, out) -> mps.MpsDaemon | None:
    """The MPS daemon `resources.mps` asks for (ulsweep/sweep/mps.py), before Ray starts: its pipe goes into the
    workers' environment."""
    import ray

    return mps.start_for_run(exp.resources.mps, run_dir, address=address, ray_running=ray.is_initialized(),
                             gpus_per_worker=exp.resources.gpus_per_worker, out=out)


def _start_ray_and_sweep_run(exp: ExperimentConfig, run_dir: str, uri: str, state: dict, ident: dict,
                             address: str | None, verbose: bool, out, env: dict | None = None
                             ) -> tuple[SweepRun, bool]:
    """Open the sweep's MLflow run in a thread while Ray starts (both take seconds: a new sqlite store runs
    its migrations). `env`: environment variables every Ray worker gets (the MPS daemon's pipe). Returns the
    run and whether Ray was started here (and is to be shut down here)."""
    import ray

    pool = ThreadPoolExecutor(1)
    opening = pool.submit(lineage.open_sweep_run, exp, run_dir, uri, state, ident, out)
    _configure_ray_environment()
    started_ray = False
    try:
        started_ray = _init_ray(address, verbose, env or {})
        return opening.result(), started_ray  # its errors surface here
    except BaseException:
        if started_ray:
            ray.shutdown()
        raise
    finally:
        pool.shutdown()  # waits for the MLflow setup even when Ray failed to start


# what the driver sets in its environment, where not set, before Ray starts (`_configure_ray_environment`)
RAY_ENV_DEFAULTS = {
    # Tune snapshots its trial table + searcher every 2 s (default >= 10 s): a kill then loses less (what
    # it loses is re-run idempotently: finished loops return their stored result at once).
    "TUNE_GLOBAL_CHECKPOINT_S": "2",
    # Tune copies AWS_* credentials into each trial's runtime env, and Ray's runtime-env agent logs runtime
    # envs at INFO: a Ray that ulsweep starts logs at WARNING so that no credential lands in its session logs
    # (for a cluster of your own, start it with RAY_LOGGER_LEVEL=warning too)
    "RAY_LOGGER_LEVEL": "warning",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    # none of Tune's automatic loggers; the Tuner names its CSV and JSON ones (_make_tuner), not its TensorBoard
    # logger, which imports tensorboardX and so torch: seconds of the driver's, as Tune starts the first trials
    # (the driver needs no torch: tests/test_stacking.py); ulsweep's curves are in MLflow
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
}


def _configure_ray_environment() -> None:
    for name, value in RAY_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    stop_tune_copying_credentials()  # Ray would log them: trials take credentials from their node's environment


def _init_ray(address: str | None, verbose: bool, env: dict[str, str] | None = None) -> bool:
    """Connect to the cluster at `address` (its workers get `env` besides Ray Train's knobs through the job's
    runtime_env), or start a local Ray whose processes inherit them; False when Ray is running already.

    A local Ray gets them in its environment rather than as a runtime_env: its processes, the workers it starts
    ahead (one per CPU) among them, inherit the driver's environment as Ray starts, while a job's runtime_env
    makes every worker a new process started for it. The groups' actors and the precompile tasks then start in
    a worker that is up already (on the 2-core CI box an actor answered 0.2-0.3 s after its creation, against
    1.5-1.7 s with the runtime_env), which, where this Ray reads it, `precompile.KEEP_GPUS_ENV` lets see the GPUs
    though they reserve none. The driver's own environment is as it was once Ray has started."""
    import ray

    if ray.is_initialized():
        return False
    env_vars = {**RAY_TRAIN_ENV, **precompile.keep_gpus_env(), **(env or {})}
    if address:
        ray.init(address=address, log_to_driver=verbose, runtime_env={"env_vars": env_vars})
        return True
    before = {k: os.environ.get(k) for k in env_vars}
    os.environ.update(env_vars)
    try:
        ray.init(include_dashboard=False, log_to_driver=verbose)
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return True


def _print_header(exp: ExperimentConfig, run_dir: str, run: SweepRun, out) -> None:
    planned = plan_description(exp)
    n_ae = len(planned) if planned is not None else exp.search.num_samples
    print(f"sweep {exp.name}: {n_ae} autoencoder trial(s) x {len(exp.base_models)} base model(s), "
          f"method {exp.search.method}, {exp.search.max_concurrent} at a time, "
          f"{exp.resources.num_workers} worker(s) each\n  run dir  {run_dir}\n  mlflow   "
          f"{redact_uri(run.tracking_uri)}  (experiment {exp.tracking.experiment or exp.name}, "
          f"sweep run {run.sweep_id})", file=out, flush=True)


def _fit(exp: ExperimentConfig, run_dir: str, run: SweepRun, train_impl: str, resume: bool, out,
         clock: DriverClock | None = None, workers_keep_gpus: bool = False):
    """Run the search to its end, or until Ctrl-C, after which Tune stops the trials, saves its state and
    returns: (Tune's ResultGrid, seconds it took). On a second Ctrl-C or a driver error no run of the sweep
    stays RUNNING, and the message says how to continue. `clock` marks the steps. `workers_keep_gpus`: Ray's
    workers see the node's GPUs without reserving one (precompile.gpu_node_options)."""
    mark = clock.mark if clock is not None else (lambda name: None)
    warming: list = []
    groups: list = []  # the stacked groups' actors, the driver's for the fit's length
    try:
        _print_header(exp, run_dir, run, out)
        t_fit = time.time()
        # the groups' actors first: an autoencoder group builds itself and warms its step while its members'
        # trials start, and had not done so when they joined (session 31, one H100: its building began 0.1 s
        # before the last member joined, once their processes no longer imported torch); the precompile tasks
        # and the Tuner (seconds) after them
        if train_impl == "ulsweep":
            groups = stacking.start(exp, run_dir, run.sweep_id, out, workers_keep_gpus)
        mark("groups_start")
        warming = precompile.start(exp, out, workers_keep_gpus)  # the trials' steps, ahead of them
        mark("precompile_start")
        tuner = _make_tuner(exp, run_dir, run, train_impl, resume)
        mark("tuner")
        with RestoreTripwire(_tune_dir(run_dir), exp.search.method):
            grid = tuner.fit()
        record_closed_snapshot(run_dir)
        mark("tune_fit")
        return grid, time.time() - t_fit
    except BaseException as e:
        lineage.mark_interrupted(run)
        if not isinstance(e, SweepError):
            print(f"sweep interrupted; continue it with --resume (run dir {run_dir})", file=out, flush=True)
        raise
    finally:
        _close_precompile(run, warming, out)
        mark("precompile_report")
        _close_groups(groups)
        mark("groups_close")


def _close_groups(groups: list) -> None:
    """End the stacked groups' actors (their members are done, or failed with the fit)."""
    import ray

    for g in groups:
        try:
            ray.kill(g)
        except Exception:  # noqa: BLE001 - gone with Ray already
            pass


def _close_precompile(run: SweepRun, started: list, out) -> None:
    """Report the precompile tasks and tag the sweep run with them; never masks the fit's own outcome."""
    try:
        lineage.tag_precompile(run, precompile.report(started, out))
    except Exception as e:  # noqa: BLE001 - Ray or MLflow gone with the error that ended the fit
        print(f"precompile: not reported ({type(e).__name__}: {str(e)[:200]})", file=out, flush=True)


def _make_tuner(exp: ExperimentConfig, run_dir: str, run: SweepRun, train_impl: str, resume: bool):
    """The Tuner: restored from <run dir>/tune when `resume` (the run dir holds a Tune experiment, checked by
    statecheck.restorable_tune_state), else a new one."""
    from ray import tune

    from ulsweep.sweep.progress import CompletionRelay, ProgressCallback
    from ulsweep.sweep.trial import SweepContext, run_trial, trial_label, trial_resources

    ctx = SweepContext(experiment=to_dict(exp), run_dir=run_dir, tracking_uri=run.tracking_uri,
                       mlflow_experiment_id=run.experiment_id, sweep_id=run.sweep_id, train_impl=train_impl,
                       session=uuid.uuid4().hex, one_thread=reuse_processes(exp),
                       stack_groups=stacking.group_names(exp, run.sweep_id))
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx), trial_resources(exp.resources))
    tune_dir = _tune_dir(run_dir)
    if resume:
        # errored trials stay errored: the searcher already told Optuna they failed (retries within a
        # run: search.max_failures)
        try:
            return tune.Tuner.restore(tune_dir, trainable=trainable, resume_unfinished=True, resume_errored=False)
        except Exception as e:  # damage that statecheck did not foresee
            raise DamagedStateError(f"{tune_dir}: Tune could not restore its state ({type(e).__name__}: "
                                    f"{str(e)[:200]}); {tune_advice(tune_dir, exp.search.method)}") from None
    searcher = _searcher(exp, on_objective=lineage.ObjectiveLogger(run.tracking_uri, exp.search.metrics),
                         on_skip=stacking.Forgo(stacking.group_names(exp, run.sweep_id))
                         if train_impl == "ulsweep" else None)
    # pickled with the searcher in tuner.pkl: a restored Tuner's relay holds the restored searcher; Tune's CSV and
    # JSON loggers named here, as its automatic ones are off (_configure_ray_environment)
    callbacks = [ProgressCallback(), CompletionRelay(searcher), tune.logger.CSVLoggerCallback(),
                 tune.logger.JsonLoggerCallback()]
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=searcher, num_samples=-1,
                                    max_concurrent_trials=exp.search.max_concurrent,
                                    reuse_actors=reuse_processes(exp),  # warm trial processes
                                    trial_name_creator=trial_label, trial_dirname_creator=trial_label),
        run_config=tune.RunConfig(name=TUNE_NAME, storage_path=run_dir, verbose=0, callbacks=callbacks,
                                  failure_config=tune.FailureConfig(max_failures=tune_retries(exp))),
    )


def tune_retries(exp: ExperimentConfig) -> int:
    """Tune's retries of a failed trial: search.max_failures for errors plus resources.max_worker_failures for
    deaths of its training process (-1: no limit); attempts.check_budget keeps each within its own budget."""
    deaths = exp.resources.max_worker_failures
    return -1 if deaths < 0 else exp.search.max_failures + deaths


def _searcher(exp: ExperimentConfig, on_objective=None, on_skip=None):
    from ulsweep.sweep.searcher import SpawningSearcher

    return SpawningSearcher(exp.search, [b.name for b in exp.base_models], exp.ae.train.seed,
                            on_objective=on_objective, on_skip=on_skip)


def _final_searcher(exp: ExperimentConfig, run_dir: str):
    """The searcher as Tune saved it at the end of the fit: every AE record with its base trials."""
    searcher = _searcher(exp)
    searcher.restore_from_dir(_local_tune_dir(_tune_dir(run_dir)))
    return searcher


def _collect_outcome(run_dir: str, run: SweepRun, searcher, grid, wall: float) -> SweepOutcome:
    """The outcome from the searcher as Tune saved it last; unfinished when the search was stopped (Ctrl-C)."""
    records = sorted(searcher.aes.values(), key=lambda r: r["index"])
    trial_results, loop_s = outcomes.trial_results(grid)
    return SweepOutcome(run_dir, run.tracking_uri, run.sweep_id, run.experiment_id, records, wall,
                        searcher.counts(), loop_s, trial_results, finished=searcher.is_finished())


def _tune_dir(run_dir: str) -> str:
    return tune_dir_of(run_dir)


def _local_tune_dir(tune_dir: str) -> str:
    """Searcher state for restore_from_dir, which globs a local directory (download it for URIs)."""
    if "://" not in tune_dir:
        return tune_dir
    import tempfile

    fs, p = uio.filesystem(tune_dir)
    d = tempfile.mkdtemp(prefix="ulsweep-tune-")
    for f in fs.glob(f"{p}/searcher-state-*.pkl"):
        fs.get(f, os.path.join(d, f.rsplit("/", 1)[-1]))
    return d


# ----------------------------------------------------------------------------------------------
# what the sweep runs, and where


def plan_description(exp: ExperimentConfig) -> list[dict[str, Any]] | None:
    """The AE trials' overrides that `none` / `grid` will run (None for optuna: sampled on the fly)."""
    return planned_overrides(exp.search, exp.ae.train.seed)


def reuse_processes(exp: ExperimentConfig) -> bool:
    """Whether Tune keeps a trial's process for a later trial (`resources.reuse_processes`): auto and on, yes.
    Until session 21 auto left out trials whose process trains with CUDA graphs on a GPU (Ray Train's local
    mode): torch 2.11 failed to capture in a second thread of a process (session 3), and the one trial thread a
    reused process runs all its trials in (trial_thread.py) had not run on a GPU. On one H200 three CUDA-graph
    trainings in one trial thread then all captured, and the full lf_sweep ran that way (README, "Warm trial
    processes")."""
    return exp.resources.reuse_processes != "off"


def fit_to_local_machine(exp: ExperimentConfig, cluster: dict, started_here: bool, out) -> ExperimentConfig:
    """The same experiment file on a laptop: a Ray instance started here without GPUs runs GPU trials on
    CPU instead of waiting forever for a GPU. A cluster (--address) is left alone: its GPU nodes may still
    be on their way (autoscaling from zero)."""
    if not started_here or exp.resources.gpus_per_worker == 0 or cluster.get("GPU", 0) > 0:
        return exp
    print(f"note: no GPU on this machine; trials run on CPU (resources.gpus_per_worker "
          f"{exp.resources.gpus_per_worker} -> 0)", file=out, flush=True)
    return experiment_from_dict(to_dict(exp), {"resources.gpus_per_worker": 0.0, "resources.backend": "auto",
                                               "resources.mps": "off", "resources.cuda_wait": "auto"})


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
    jobs = precompile.jobs(exp)
    print(f"# precompile (resources.precompile {exp.resources.precompile}): "
          + ("; ".join(f"{precompile.label(j)} (latents {j['latent_shape']})" for j in jobs) if jobs else "nothing"),
          file=out)
    groups = stacking.all_groups(exp)
    print(f"# stacked groups (resources.stack_trials {exp.resources.stack_trials}): "
          + ("; ".join(" ".join(g) for _, g in groups) if groups else "none, every trial trains alone"), file=out)
    return 0


__all__ = ["run_sweep", "dry_run", "resolve_run_dir", "SweepError", "SweepOutcome", "ConfigError"]
