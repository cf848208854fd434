"""One sweep trial, Tune side: a Tune function trainable that builds and fits a Ray Train trainer (`TorchTrainer`;
in local mode Ray Train's plain `DataParallelTrainer`, which imports no torch: make_trainer).

    Tune trial process (`run_trial`, holds resources.driver_cpus; in a process that Tune reuses, every trial
    runs in the process's one trial thread: trial_thread.py)
      - tags the run with its Ray trial id, its process and how many trials that process has started
        (ulsweep.process)
      - finds or creates the trial's MLflow run (child of the sweep, or of its AE trial for base models) and
        lists its dataset splits as MLflow inputs; a finished base trial adds the latents it trained on
      - TorchTrainer(train_worker, num_workers DDP workers, gloo/NCCL) with TuneReportCallback, or with 0
        workers DataParallelTrainer(train_worker) in this process
      - appends the attempt's timings to <run dir>/trials/<key>/timings.jsonl
    Ray Train workers: ulsweep.sweep.worker.train_worker

Trial configs are small dicts made by the searcher: {"kind": "ae"|"base", "key", "overrides", ...}.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

from ulsweep import io as uio, tracking
from ulsweep.config import ExperimentConfig, ResourcesConfig, dump_yaml, flatten, to_dict
from ulsweep.sweep import attempts, timeline, trial_thread
from ulsweep.sweep.space import find_base, trial_experiment
from ulsweep.sweep.worker import IMPLS, deterministic_errors, error_line, numbers, read_failure, train_worker

log = logging.getLogger(__name__)

# result entries that are bookkeeping, not metrics of the trained model
_BOOKKEEPING = {"step", "final", "loop_seconds", "train_seconds", "t_worker", "t_loop", "t_loop_end", "compile_gate",
                "cuda_wait", "t_compiled_step_end", "eager_steps", *timeline.PARTS, *timeline.GROUP_MARKS,
                *(m for m, _ in timeline.MARKS)}
# compile_gate: how the first step got through ulsweep/train/compile_gate.py ("first", "after", "done", ...);
# cuda_wait: resources.cuda_wait's outcome in the trial process (ulsweep/train/cuda_wait.py), e.g. "block: set"
_TIMINGS = ("t_worker", "t_loop", "t_loop_end", "train_seconds", "loop_seconds", "compile_gate", "cuda_wait",
            "t_compiled_step_end",
            "eager_steps", *timeline.PARTS, *timeline.GROUP_MARKS,
            *(m for m, _ in timeline.MARKS
              if m not in ("t_imports", "t_run", "t_loop", "t_fit_end")))  # those four: the trial's own marks


@dataclass(frozen=True)
class SweepContext:
    """What every trial of a sweep shares (picklable; handed to Tune via tune.with_parameters)."""

    experiment: dict  # the sweep's resolved experiment (to_dict form)
    run_dir: str  # absolute path or URI of the sweep's run directory
    tracking_uri: str
    mlflow_experiment_id: str
    sweep_id: str  # the sweep's MLflow parent run id
    train_impl: str = "ulsweep"
    session: str = ""  # one driver start: the retry budget of a trial's attempts (attempts.py) is per session
    one_thread: bool = False  # trial processes are reused: every trial of a process runs in one thread of it
    stack_groups: dict = field(default_factory=dict)  # trial key -> its stacked group's actor (stacking.py)


def trial_dir(run_dir: str, key: str) -> str:
    return f"{run_dir.rstrip('/')}/trials/{key}"


def trial_resources(res: ResourcesConfig) -> dict[str, float]:
    """Tune resources of the trial process: a sliver of CPU, or the worker's share in local mode."""
    if res.num_workers == 0:
        out = {"cpu": res.cpus_per_worker}
        if res.gpus_per_worker:
            out["gpu"] = res.gpus_per_worker
        return out
    return {"cpu": res.driver_cpus}


def trial_label(trial) -> str:
    """Tune trial name and directory: job key + trial id (stable across restore, never a timestamp)."""
    return f"{trial.config.get('key', 'trial')}_{trial.trial_id}"


def worker_config(exp: ExperimentConfig, res: ResourcesConfig, kind: str, key: str, run_dir: str,
                  tracking_uri: str, run_id: str, train_impl: str, base: str | None = None,
                  ae_checkpoint: str | None = None, attempt: str | None = None, stack_group: str | None = None) -> dict:
    """The train_loop_config of a trial's trainer (what ulsweep.sweep.worker.train_worker reads)."""
    wcfg = {"experiment": to_dict(exp), "kind": kind, "key": key, "base": base, "ae_checkpoint": ae_checkpoint,
            "run_dir": run_dir, "tracking_uri": tracking_uri, "run_id": run_id, "train_impl": train_impl,
            "local_mode": res.num_workers == 0, "system_metrics_s": exp.tracking.system_metrics_s}
    if attempt is not None:  # a Tune trial's attempt: a failure recorded by it is not retried
        wcfg["attempt"] = attempt
    if stack_group is not None:  # the actor of the stacked group that trains it (ulsweep/sweep/stacking.py)
        wcfg["stack_group"] = stack_group
    return wcfg


def make_trainer(wcfg: dict, res: ResourcesConfig, storage_path: str, name: str, in_tune: bool):
    """A TorchTrainer for one trial (DDP over res.num_workers workers), or in local mode (0 workers: the loop runs
    in this process, world size 1; no retries, no callbacks: the trial reports to Tune itself, worker.report) Ray
    Train's plain DataParallelTrainer, which runs the loop alike without importing torch (TorchTrainer's local
    mode adds only torchrun's process group, which ulsweep does not use): a stacked member's process, whose
    group's actor trains it, then never imports torch."""
    import ray.train

    datasets, data_config = stream_datasets(wcfg, res, in_tune)
    if datasets:
        wcfg = {**wcfg, "datasets": sorted(datasets)}
    loop = {"train_loop_config": wcfg, "datasets": datasets, "dataset_config": data_config}
    if res.num_workers == 0:
        from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

        return DataParallelTrainer(train_worker, **loop, scaling_config=ray.train.ScalingConfig(num_workers=0),
                                   run_config=ray.train.RunConfig(name=name, storage_path=storage_path))
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = res.gpus_per_worker > 0
    backend = res.backend if res.backend != "auto" else ("nccl" if use_gpu else "gloo")
    per_worker = {"CPU": res.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = res.gpus_per_worker
    callbacks = []
    if in_tune:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    return TorchTrainer(
        train_worker,
        **loop,
        scaling_config=ray.train.ScalingConfig(num_workers=res.num_workers, use_gpu=use_gpu,
                                               resources_per_worker=per_worker),
        torch_config=TorchConfig(backend=backend),
        run_config=ray.train.RunConfig(name=name, storage_path=storage_path, callbacks=callbacks,
                                       failure_config=ray.train.FailureConfig(max_failures=res.max_worker_failures)),
    )


def stream_datasets(wcfg: dict, res: ResourcesConfig, in_tune: bool = False):
    """(datasets, ray.train.DataConfig) of a stage-1 trial whose training split may stream
    (`data.loader`), else (None, None). Ray Train splits the stream over the ranks (`equal=True`, order
    preserved: ulsweep/data/stream.py) and every worker reads its part with `ray.train.get_dataset_shard`.
    None in local mode inside Tune, where Ray Train refuses that call and the stage streams in its own process
    (worker.RayHooks.dataset_shard): nothing to build, and a stacked member's process imports no torch for it."""
    if wcfg["kind"] != "ae" or wcfg["train_impl"] != "ulsweep" or (in_tune and res.num_workers == 0):
        return None, None
    from ulsweep.config import experiment_from_dict
    from ulsweep.data.sources import trainer_datasets

    exp = experiment_from_dict(wcfg["experiment"])
    datasets, opts = trainer_datasets(exp.data, exp.ae.train.batch_size, max(1, res.num_workers))
    if datasets is None:
        return None, None
    import ray.train

    return datasets, ray.train.DataConfig(execution_options=opts)


# ----------------------------------------------------------------------------------------------
# the Tune trainable


def run_trial(config: dict, ctx: SweepContext) -> None:
    """Tune function trainable for one AE or base-model trial (one attempt of it: see attempts.py); in a
    process that Tune reuses, run in the process's one trial thread (trial_thread.py)."""
    if ctx.one_thread:
        return trial_thread.run(_run_trial, config, ctx)
    return _run_trial(config, ctx)


def _run_trial(config: dict, ctx: SweepContext) -> None:
    t_trial = time.time()
    process_trial = trial_thread.note_trial()
    kind, key = config["kind"], config["key"]
    exp = trial_experiment(ctx.experiment, config.get("overrides", {}))
    group = ctx.stack_groups.get(key) if ctx.train_impl == "ulsweep" else None
    import_trial_modules(ctx.train_impl, local=exp.resources.num_workers == 0, stacked=group is not None)
    t_imports = time.time()
    tdir, attempt = trial_dir(ctx.run_dir, key), uuid.uuid4().hex
    c = tracking.client(ctx.tracking_uri)
    try:
        attempts.check_budget(tdir, ctx.session, attempt, key, exp.search.max_failures,
                              exp.resources.max_worker_failures, read_failure(tdir))
    except attempts.RetryRefused as e:  # before any setup: a refused retry costs little
        run = tracking.find_run(c, ctx.mlflow_experiment_id, ctx.sweep_id, key)
        if run is not None:
            _tag_failure(c, run.info.run_id, {"run_dir": tdir, "key": key, "attempt": attempt}, e)
            tracking.retry(c.set_terminated, run.info.run_id, status="FAILED")
        raise
    parent = _parent_run_id(c, ctx, config)
    run_id = _open_trial_run(c, ctx, config, exp, parent)
    _tag_attempt(c, run_id, process_trial)
    t_run = time.time()  # the MLflow run is open: the start phase's tracking part ends here
    wcfg = worker_config(exp, exp.resources, kind, key, tdir, ctx.tracking_uri, run_id,
                         ctx.train_impl, base=config.get("base"), ae_checkpoint=config.get("ae_checkpoint"),
                         attempt=attempt, stack_group=group)
    attempts.begin(tdir, ctx.session, attempt)
    trainer = make_trainer(wcfg, exp.resources, storage_path=f"{ctx.run_dir.rstrip('/')}/trials", name=key,
                           in_tune=True)
    t_fit = time.time()
    try:
        result = trainer.fit()
    except BaseException as e:
        failed = read_failure(tdir)
        recorded = bool(failed and failed.get("attempt") == attempt)  # the worker recorded a deterministic error
        attempts.end(tdir, ctx.session, attempt, failed["error"] if recorded else error_line(e),
                     deterministic=recorded or isinstance(e, deterministic_errors()))
        _tag_failure(c, run_id, wcfg, e)
        tracking.retry(c.set_terminated, run_id, status="FAILED")
        _record_timings(c, run_id, ctx.run_dir, key, {"t_trial": t_trial, "t_imports": t_imports, "t_run": t_run,
                                                      "t_fit": t_fit, "t_fit_end": time.time(), "error": True,
                                                      "process_trial": process_trial})
        raise
    m = result.metrics or getattr(result, "return_value", None) or {}
    if kind == "base":
        log_datasets(c, run_id, exp, ae_checkpoint=config.get("ae_checkpoint"))
    _record_timings(c, run_id, ctx.run_dir, key, {"t_trial": t_trial, "t_imports": t_imports, "t_run": t_run,
                                                  "t_fit": t_fit, "t_fit_end": time.time(),
                                                  "process_trial": process_trial,
                                                  **{k: m.get(k) for k in _TIMINGS}})
    if kind == "base" and m and parent != ctx.sweep_id:
        _log_to_ae_run(c, parent, config, m)
    tracking.retry(c.set_terminated, run_id, status="FINISHED")


def import_trial_modules(train_impl: str, local: bool, stacked: bool = False) -> None:
    """Import what the trial process will need before anything of it is timed as tracking or start (the
    `imports` phase): MLflow and Ray Train, torch and Ray Train's torch backend, and with `local` (Ray Train's
    local mode: the loop runs in this process) the training modules; a `stacked` trial in local mode no torch at
    all, since its group's actor trains it (make_trainer; torch is imported later should it train alone). A fresh
    process pays seconds here (on the H200 machine's sandbox, importing torch and ulsweep took ~10 s; 8.8-15.2 s
    for 18 fresh processes at once on an H100 machine), a reused Tune actor nothing. Only a warm-up: a module
    that fails to import fails again where the trial needs it, after its MLflow run and retry budget are in place
    (so an unknown train_impl is named by worker._train_fns, a broken install by the trial's recorded failure)."""
    import importlib

    if local and stacked:
        wanted = ["mlflow", "ray.train", "ray.tune"]
    else:
        wanted = ["mlflow", "torch", "ray.train.torch"] + (list(IMPLS.get(train_impl, ())) if local else [])
    for module in wanted:
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - see above: raised again, and recorded, where it is used
            log.warning("could not import %s ahead of trial setup: %s", module, e)


def _tag_attempt(c, run_id: str, n: int) -> None:
    """The tags of this attempt, in one write: its Ray Tune trial id, and which process and thread ran it with how
    many trials the process had started by then (1: fresh; timeline.TAG_PROCESS): a warm process skips the
    imports and, for an architecture it has trained, compiling."""
    from mlflow.entities import RunTag

    tags = {timeline.TAG_PROCESS: timeline.process_tag(socket.gethostname(), os.getpid(),
                                                        threading.get_native_id(), n)}
    try:
        import ray.tune

        tags["ray.trial_id"] = ray.tune.get_context().get_trial_id() or ""
    except Exception:  # noqa: BLE001 - outside a Tune trial: no trial id
        pass
    try:
        tracking.retry(c.log_batch, run_id, tags=[RunTag(k, v) for k, v in tags.items()])
    except Exception as e:  # noqa: BLE001 - tracking must not lose a trial
        log.warning("could not tag the attempt of run %s: %s", run_id, e)


def _parent_run_id(c, ctx: SweepContext, config: dict) -> str:
    """An AE trial's run is a child of the sweep's, a base trial's a child of its AE trial's (if found)."""
    if config["kind"] == "ae":
        return ctx.sweep_id
    return config.get("ae_run_id") or _run_id_of(c, ctx, config["ae_key"]) or ctx.sweep_id


def _run_id_of(c, ctx: SweepContext, key: str) -> str | None:
    run = tracking.find_run(c, ctx.mlflow_experiment_id, ctx.sweep_id, key)
    return run.info.run_id if run else None


def _open_trial_run(c, ctx: SweepContext, config: dict, exp: ExperimentConfig, parent: str) -> str:
    """The trial's MLflow run, found by key (a rerun of the trial reopens it) or created with its setup."""
    key = config["key"]
    run_id, created = tracking.get_or_create_trial_run(
        c, ctx.mlflow_experiment_id, ctx.sweep_id, key, config["kind"], parent,
        tags={"ulsweep.ae_key": config.get("ae_key", key)})
    if created:
        _log_trial_setup(c, run_id, exp, config)
    else:  # a failed run that a Tune retry or a resume runs again: its old failure is history
        _clear_failure_tags(c, run_id)
    log_datasets(c, run_id, exp)  # every time: a run reopened after a failed first attempt gets them too
    return run_id


def log_datasets(c, run_id: str, exp: ExperimentConfig, ae_checkpoint: str | None = None) -> None:
    """The training and evaluation splits as MLflow dataset inputs; with `ae_checkpoint` (a base trial that
    has trained) the latents it trained on. Never fails the trial: a problem is logged as a warning."""
    from ulsweep.data.builtin import resolve_dataset
    from ulsweep.data.reader import open_dataset
    from ulsweep.tracking.datasets import latents_ref, log_dataset_inputs, split_refs

    try:
        d = exp.data
        ds = open_dataset(resolve_dataset(d.path))
        refs = split_refs(ds, d.train_split, d.eval_split, d.image_size)
        if ae_checkpoint:
            from ulsweep.train.latent_store import published_latents

            lat = published_latents(ae_checkpoint, d)
            refs = [latents_ref(lat, ds.name)] if lat is not None else []
        log_dataset_inputs(c, run_id, refs)
    except Exception as e:  # noqa: BLE001 - tracking must not lose a trial
        log.warning("could not log the datasets of run %s: %s", run_id, e)


def _log_trial_setup(c, run_id: str, exp: ExperimentConfig, config: dict) -> None:
    """Flattened params and the resolved config (YAML) as an artifact, once per run."""
    d = to_dict(exp)
    if config["kind"] == "ae":
        params = flatten({k: d[k] for k in ("data", "ae")})
        text = dump_yaml(exp)
    else:
        base = find_base(exp, config["base"])
        params = flatten({"data": d["data"], "ae": d["ae"], "base": to_dict(base)})
        params["ae_key"] = config["ae_key"]
        params["ae_checkpoint"] = config.get("ae_checkpoint", "")
        text = dump_yaml(exp) + "\n# this trial trains base model:\n" + dump_yaml(base)
    params.update({f"search.{k}": v for k, v in config.get("overrides", {}).items()})
    params["resources.num_workers"] = exp.resources.num_workers
    tracking.log_params(c, run_id, params)
    tracking.log_text(c, run_id, text, "config.yaml")


def _log_to_ae_run(c, ae_run_id: str, config: dict, result: dict) -> None:
    """The AE run shows its base models' final metrics too, e.g. "tiny/gfd_digits"."""
    final = {f"{config['base']}/{k}": v for k, v in numbers(result).items() if k not in _BOOKKEEPING}
    try:
        tracking.log_metrics_once(c, ae_run_id, final, step=0)
    except Exception as e:
        log.warning("could not log %s metrics to the AE run: %s", config["key"], e)


def _tag_failure(c, run_id: str, wcfg: dict, e: BaseException) -> None:
    """ulsweep.error (what failed, in one line) and ulsweep.last_good_checkpoint on a failed trial's run."""
    failed = read_failure(wcfg["run_dir"])
    if isinstance(e, attempts.RetryRefused) and e.record:  # a retry refused over a recorded failure
        error, ckpt = e.record["error"], e.record.get("checkpoint")
    elif isinstance(e, attempts.RetryRefused):
        error, ckpt = str(e), None
    elif failed and failed.get("attempt") == wcfg["attempt"]:
        error, ckpt = failed["error"], failed.get("checkpoint")
    else:
        error, ckpt = error_line(e), None
    tags = {_FAILURE_TAGS[0]: error[:5000]}
    if ckpt:
        tags[_FAILURE_TAGS[1]] = ckpt
    for k, v in tags.items():
        try:
            tracking.retry(c.set_tag, run_id, k, v)
        except Exception as w:
            log.warning("could not tag the failure of %s: %s", wcfg["key"], w)


_FAILURE_TAGS = ("ulsweep.error", "ulsweep.last_good_checkpoint")


def _clear_failure_tags(c, run_id: str) -> None:
    try:
        tags = tracking.retry(c.get_run, run_id).data.tags
        for k in _FAILURE_TAGS:
            if k in tags:
                tracking.retry(c.delete_tag, run_id, k)
    except Exception as e:  # noqa: BLE001 - tracking must not lose a trial
        log.warning("could not clear the failure tags of run %s: %s", run_id, e)


def _record_timings(c, run_id: str, run_dir: str, key: str, rec: dict) -> None:
    """One attempt's timings: a line in <run dir>/trials/<key>/timings.jsonl (benchmarks/orchestration.py), and
    in the trial's MLflow run its phases (ulsweep/sweep/timeline.py) appended to the `ulsweep.timeline` tag
    (the dashboard's timeline) and, for the first attempt that finished, seconds per phase (`time/<phase>_s`) and
    per part of the final evaluation (`time/evaluate_<part>_s`). `torch_imported`: whether this trial's process
    had imported torch by then (a stacked member's, in local mode, never does: import_trial_modules)."""
    rec = {**rec, "torch_imported": "torch" in sys.modules}
    try:
        uio.append_text(f"{trial_dir(run_dir, key)}/timings.jsonl", json.dumps(rec) + "\n")
    except Exception as e:
        log.warning("could not write timings of %s: %s", key, e)
    ph = timeline.phases(rec)
    if not ph:
        return
    try:
        old = tracking.retry(c.get_run, run_id).data.tags.get(timeline.TAG)
        tracking.retry(c.set_tag, run_id, timeline.TAG, timeline.add_attempt(old, ph))
        if not rec.get("error"):  # once: a trial re-run after a driver kill keeps its first durations
            parts = {f"time/{k}": rec[k] for k in timeline.PARTS if isinstance(rec.get(k), (int, float))}
            tracking.log_metrics_once(c, run_id, {**{f"time/{k}_s": v for k, v in timeline.durations(ph).items()},
                                                  **parts})
    except Exception as e:  # noqa: BLE001 - tracking must not lose a trial
        log.warning("could not log the timeline of %s: %s", key, e)


# ----------------------------------------------------------------------------------------------
# outside Tune (tests, `ulsweep train` with several workers)


def fit_stage(exp: ExperimentConfig, run_dir: str, kind: str = "ae", base: str | None = None,
              ae_checkpoint: str | None = None, tracking_uri: str | None = None, run_id: str | None = None,
              train_impl: str = "ulsweep", resources: ResourcesConfig | None = None):
    """Fit one stage through a Ray Train trainer (make_trainer) without Tune (needs ray.init). Returns the
    ray.train.Result."""
    res = resources or exp.resources
    run_dir = os.path.abspath(run_dir) if "://" not in run_dir else run_dir
    uri = tracking_uri or tracking.default_tracking_uri(run_dir)
    c = tracking.client(uri)
    if run_id is None:
        eid = tracking.get_or_create_experiment(c, exp.tracking.experiment or exp.name,
                                                f"{run_dir.rstrip('/')}/mlartifacts")
        run_id = tracking.retry(c.create_run, eid, run_name=f"{kind}-{os.path.basename(run_dir)}").info.run_id
    log_datasets(c, run_id, exp)
    name = run_dir.rstrip("/").rsplit("/", 1)[-1]
    wcfg = worker_config(exp, res, kind, name, run_dir, uri, run_id, train_impl, base=base,
                         ae_checkpoint=ae_checkpoint)
    trainer = make_trainer(wcfg, res, storage_path=run_dir.rstrip("/").rsplit("/", 1)[0], name=name, in_tune=False)
    result = trainer.fit()
    if kind == "base":
        log_datasets(c, run_id, exp, ae_checkpoint=ae_checkpoint)
    return result
