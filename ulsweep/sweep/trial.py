"""One sweep trial: a Tune function trainable that builds and fits a Ray Train `TorchTrainer`.

    Tune trial process (`run_trial`, holds resources.driver_cpus)
      - finds or creates the trial's MLflow run (child of the sweep, or of its AE trial for base models)
      - TorchTrainer(train_worker, num_workers DDP workers, gloo/NCCL) with TuneReportCallback
    Ray Train workers (`train_worker`)
      - call ulsweep.train.stage1.train_autoencoder / stage2.train_base on <run dir>/trials/<key>
        (the Ray Train run directory too, so checkpoints are reported in place: NO_UPLOAD)
      - rank 0: metric curves to MLflow in batches; final metrics, images, checkpoint URI at the end
      - every rank: a final ray.train.report carrying rank 0's checkpoint (Result.metrics needs it)

Trial configs are small dicts made by the searcher: {"kind": "ae"|"base", "key", "overrides", ...}.
"""
from __future__ import annotations

import importlib
import logging
import os
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from ulsweep import io as uio, tracking
from ulsweep.testing import faults
from ulsweep.config import (ExperimentConfig, ResourcesConfig, dump_yaml, experiment_from_dict, flatten,
                            to_dict)
from ulsweep.sweep.space import find_base, trial_experiment
from ulsweep.train.hooks import StageResult, TrainHooks

log = logging.getLogger(__name__)

IMPLS = {  # train_impl -> (module of train_autoencoder, module of train_base)
    "ulsweep": ("ulsweep.train.stage1", "ulsweep.train.stage2"),
    "fake": ("ulsweep.testing.fake", "ulsweep.testing.fake"),
}
# metric curves go to MLflow in one batch per this many seconds (and at every checkpoint)
MLFLOW_FLUSH_S = float(os.environ.get("ULSWEEP_MLFLOW_FLUSH_S", "10"))
REPORT_EVERY_S = 2.0  # at most one intermediate Tune report per trial per this many seconds


@dataclass(frozen=True)
class SweepContext:
    """What every trial of a sweep shares (picklable; handed to Tune via tune.with_parameters)."""

    experiment: dict  # the sweep's resolved experiment (to_dict form)
    run_dir: str  # absolute path or URI of the sweep's run directory
    tracking_uri: str
    mlflow_experiment_id: str
    sweep_id: str  # the sweep's MLflow parent run id
    train_impl: str = "ulsweep"


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


def trial_dirname(trial) -> str:
    """Tune trial directory: job key + trial id (stable across restore, never a timestamp)."""
    return f"{trial.config.get('key', 'trial')}_{trial.trial_id}"


def trial_name(trial) -> str:
    return f"{trial.config.get('key', 'trial')}_{trial.trial_id}"


# ----------------------------------------------------------------------------------------------
# Tune side


def run_trial(config: dict, ctx: SweepContext) -> None:
    """Tune function trainable for one AE or base-model trial."""
    t_trial = time.time()
    kind, key = config["kind"], config["key"]
    exp = trial_experiment(ctx.experiment, config.get("overrides", {}))
    c = tracking.client(ctx.tracking_uri)
    if kind == "ae":
        parent = ctx.sweep_id
    else:
        parent = config.get("ae_run_id") or _run_id_of(c, ctx, config["ae_key"]) or ctx.sweep_id
    run_id, created = tracking.get_or_create_trial_run(
        c, ctx.mlflow_experiment_id, ctx.sweep_id, key, kind, parent,
        tags={"ulsweep.ae_key": config.get("ae_key", key)})
    try:
        import ray.tune

        tracking.retry(c.set_tag, run_id, "ray.trial_id", ray.tune.get_context().get_trial_id() or "")
    except Exception:
        pass
    if created:
        _log_trial_setup(c, run_id, exp, config)
    wcfg = {"experiment": to_dict(exp), "kind": kind, "key": key, "base": config.get("base"),
            "ae_checkpoint": config.get("ae_checkpoint"), "run_dir": trial_dir(ctx.run_dir, key),
            "tracking_uri": ctx.tracking_uri, "run_id": run_id, "train_impl": ctx.train_impl,
            "local_mode": exp.resources.num_workers == 0, "attempt": uuid.uuid4().hex}
    trainer = make_trainer(wcfg, exp.resources, storage_path=f"{ctx.run_dir.rstrip('/')}/trials", name=key,
                           in_tune=True)
    t_fit = time.time()
    try:
        result = trainer.fit()
    except BaseException as e:
        _tag_failure(c, run_id, wcfg, e)
        tracking.retry(c.set_terminated, run_id, status="FAILED")
        _append_timings(ctx.run_dir, key, {"t_trial": t_trial, "t_fit": t_fit, "t_fit_end": time.time(),
                                           "error": True})
        raise
    m = result.metrics or getattr(result, "return_value", None) or {}
    _append_timings(ctx.run_dir, key, {"t_trial": t_trial, "t_fit": t_fit, "t_fit_end": time.time(),
                                       **{k: m.get(k) for k in ("t_worker", "t_loop", "t_loop_end",
                                                                "train_seconds", "loop_seconds")}})
    if kind == "base" and m and parent != ctx.sweep_id:
        # the AE run shows its base models' final metrics too, e.g. "tiny/gfd_digits"
        final = {f"{config['base']}/{k}": v for k, v in m.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in _BOOKKEEPING}
        try:
            tracking.log_metrics_once(c, parent, final, step=0)
        except Exception as e:
            log.warning("could not log %s metrics to the AE run: %s", key, e)
    tracking.retry(c.set_terminated, run_id, status="FINISHED")


def _tag_failure(c, run_id: str, wcfg: dict, e: BaseException) -> None:
    """ulsweep.error (what failed, in one line) and ulsweep.last_good_checkpoint on a failed trial's run."""
    failed = read_failure(wcfg["run_dir"])
    if failed and failed.get("attempt") == wcfg["attempt"]:
        error, ckpt = failed["error"], failed.get("checkpoint")
    else:
        lines = [x.strip() for x in str(e).splitlines() if x.strip()]
        error, ckpt = (lines[-1] if lines else repr(e)), None
    tags = {"ulsweep.error": error[:5000]}
    if ckpt:
        tags["ulsweep.last_good_checkpoint"] = ckpt
    for k, v in tags.items():
        try:
            tracking.retry(c.set_tag, run_id, k, v)
        except Exception as w:
            log.warning("could not tag the failure of %s: %s", wcfg["key"], w)


_BOOKKEEPING = {"step", "final", "loop_seconds", "train_seconds", "t_worker", "t_loop", "t_loop_end"}


def _append_timings(run_dir: str, key: str, rec: dict) -> None:
    """One line per attempt in <run dir>/trials/<key>/timings.jsonl (read by benchmarks/orchestration.py)."""
    import json

    import fsspec

    try:
        path = f"{trial_dir(run_dir, key)}/timings.jsonl"
        fs, p = fsspec.core.url_to_fs(path)
        fs.makedirs(p.rsplit("/", 1)[0], exist_ok=True)
        old = fs.cat_file(p).decode() if fs.exists(p) else ""
        fs.pipe_file(p, (old + json.dumps(rec) + "\n").encode())
    except Exception as e:
        log.warning("could not write timings of %s: %s", key, e)


def _run_id_of(c, ctx: SweepContext, key: str) -> str | None:
    run = tracking.find_run(c, ctx.mlflow_experiment_id, ctx.sweep_id, key)
    return run.info.run_id if run else None


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


def make_trainer(wcfg: dict, res: ResourcesConfig, storage_path: str, name: str, in_tune: bool):
    """A TorchTrainer for one trial (DDP over res.num_workers workers; local mode when 0)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    use_gpu = res.gpus_per_worker > 0
    backend = res.backend if res.backend != "auto" else ("nccl" if use_gpu else "gloo")
    per_worker = {"CPU": res.cpus_per_worker}
    if use_gpu:
        per_worker["GPU"] = res.gpus_per_worker
    callbacks = []
    if in_tune and res.num_workers > 0:
        from ray.tune.integration.ray_train import TuneReportCallback

        callbacks.append(TuneReportCallback())
    return TorchTrainer(
        train_worker,
        train_loop_config=wcfg,
        scaling_config=ray.train.ScalingConfig(num_workers=res.num_workers, use_gpu=use_gpu,
                                               resources_per_worker=per_worker),
        torch_config=TorchConfig(backend=backend),
        run_config=ray.train.RunConfig(name=name, storage_path=storage_path, callbacks=callbacks,
                                       failure_config=ray.train.FailureConfig(max_failures=res.max_worker_failures)),
    )


# ----------------------------------------------------------------------------------------------
# Ray Train worker side


class RayHooks(TrainHooks):
    """Training-loop hooks inside a Ray Train worker: curves to MLflow (rank 0, batched) and to Tune.

    The loops call log_metrics / checkpoint_saved on rank 0 only, and every ray.train.report is a barrier
    across workers, so intermediate reports go to Tune only when the trial has one worker (or runs in
    local mode); a DDP trial reports once, at the end, from every rank.
    """

    def __init__(self, wcfg: dict, rank: int, world: int):
        self.kind, self.key, self.rank, self.world = wcfg["kind"], wcfg["key"], rank, world
        self.local_mode = wcfg["local_mode"]
        self.run_id = wcfg["run_id"]
        self.spool_dir = f"{wcfg['run_dir'].rstrip('/')}/mlflow-spool"
        self.last_checkpoint: str | None = None
        self._last_report = 0.0
        self._client = self._buffer = None
        self._ready = threading.Event()
        if rank == 0:  # MLflow start-up (~1-3 s) overlaps the loop's data loading and model building
            threading.Thread(target=self._connect, args=(wcfg["tracking_uri"],), daemon=True).start()
        else:
            self._ready.set()

    def _connect(self, uri: str) -> None:
        try:  # no network here: the buffer holds points until MLflow answers (dedupe: resumed loops)
            self._client = tracking.client(uri)
            self._buffer = tracking.MetricBuffer(self._client, self.run_id, flush_s=MLFLOW_FLUSH_S, dedupe=True,
                                                 spool_dir=self.spool_dir)
        except Exception as e:
            log.warning("MLflow client of %s failed: %s", self.key, e)
        finally:
            self._ready.set()
        if self._client is not None:
            import ray

            self._set_tag("ray.node_id", ray.get_runtime_context().get_node_id())

    def _set_tag(self, key: str, value: str) -> None:
        try:
            tracking.retry(self._client.set_tag, self.run_id, key, value)
        except Exception as e:
            log.warning("could not set MLflow tag %s of %s: %s", key, self.key, e)

    @property
    def client(self):
        self._ready.wait()
        return self._client

    @property
    def buffer(self):
        self._ready.wait()
        return self._buffer

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        faults.point("worker.log", self.key)  # tests: the worker dies mid-trial
        if self.buffer is not None:
            self.buffer.add(step, metrics)
        now = time.monotonic()
        if self.world == 1 and now - self._last_report >= REPORT_EVERY_S:
            self._last_report = now
            report({"step": step, "kind": self.kind, "key": self.key, **metrics}, local=self.local_mode)

    def checkpoint_saved(self, step: int, path: str, metrics: dict[str, float]) -> None:
        self.last_checkpoint = path
        if self.client is not None and self.buffer is not None:
            # every point up to a checkpoint is in MLflow or spooled on disk: a restarted loop re-logs
            # only the steps after it. Training waits a few seconds at most (MLflow may be down).
            if not self.buffer.flush(timeout=5.0):
                self.buffer.spool()
            threading.Thread(target=self._set_tag, args=(tracking.TAG_CHECKPOINT, path), daemon=True).start()

    def finish(self, res: StageResult, loop_seconds: float) -> dict[str, Any]:
        """Rank 0: flush curves; final metrics, images and checkpoint to MLflow; the final Tune result."""
        final = {k: float(v) for k, v in res.metrics.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool)}
        final.update({"step": res.steps, "train_seconds": res.train_seconds, "loop_seconds": loop_seconds})
        if self.client is None or self.buffer is None:
            return final
        self.buffer.add(res.steps, final)
        self.close()
        c, run_id = self.client, self.run_id
        try:
            if res.checkpoint:
                tracking.retry(c.set_tag, run_id, tracking.TAG_CHECKPOINT, res.checkpoint)
            for name, path in (res.extra or {}).get("images", {}).items():
                _log_image(c, run_id, name, path)
        except Exception as e:  # never lose a finished trial over tracking
            log.warning("MLflow logging of %s's final results failed: %s", self.key, e)
        return final

    def close(self) -> None:
        """Rank 0: send the queued points (up to 30 s), spool the rest for the sweep driver to replay."""
        if self.rank == 0 and self.buffer is not None:
            self.buffer.close(timeout=30.0)


def _log_image(c, run_id: str, name: str, path: str) -> None:
    if "://" not in path:
        tracking.log_artifact(c, run_id, path, "images")
        return
    import fsspec

    with tempfile.TemporaryDirectory() as d:
        local = os.path.join(d, os.path.basename(name) or "image.png")
        with fsspec.open(path, "rb") as src, open(local, "wb") as dst:
            dst.write(src.read())
        tracking.log_artifact(c, run_id, local, "images")


def report(metrics: dict, local: bool, checkpoint=None) -> None:
    """ray.train.report from a worker. In local mode inside Tune, straight to ray.tune.report: Ray Train's
    local mode keeps reports to itself and refuses ray.train.* calls inside a Tune function. A checkpoint
    is reported in place (it already lies in the Ray Train run dir: NO_UPLOAD)."""
    from ray.tune.trainable.trainable_fn_utils import _in_tune_session

    if local and _in_tune_session():
        import ray.tune

        ray.tune.report(metrics)
        return
    import ray.train
    from ray.train.v2.api.report_config import CheckpointUploadMode

    if checkpoint is None:
        ray.train.report(metrics)
    else:
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)


def _checkpoint_obj(path: str, run_dir: str):
    """A ray.train.Checkpoint for `path` if it lies inside the trial's run dir (reportable in place)."""
    from ray.train import Checkpoint

    if not path:
        return None
    if "://" not in path and "://" not in run_dir:
        p, r = os.path.realpath(path), os.path.realpath(run_dir)
        if os.path.commonpath([p, r]) != r:
            return None
        if os.path.isfile(p):  # Checkpoint needs a directory
            return Checkpoint.from_directory(os.path.dirname(p))
        return Checkpoint.from_directory(p)
    if not path.startswith(run_dir.rstrip("/") + "/"):
        return None
    return Checkpoint(path)


def _train_fns(impl: str):
    if impl not in IMPLS:
        raise ValueError(f"unknown train_impl {impl!r}; known: {sorted(IMPLS)}")
    m1, m2 = IMPLS[impl]
    return importlib.import_module(m1).train_autoencoder, lambda: importlib.import_module(m2).train_base


class TrialFailed(RuntimeError):
    """A trial failed for a reason that a retry would not change (see failure.json in its run dir)."""


def _deterministic_errors() -> tuple[type, ...]:
    from ulsweep.config import ConfigError
    from ulsweep.data import DataError
    from ulsweep.train.checkpoint import CheckpointError
    from ulsweep.train.hooks import TrainingDiverged

    return (TrainingDiverged, CheckpointError, ConfigError, DataError, TrialFailed)


FAILURE_FILE = "failure.json"


def _write_failure(run_dir: str, attempt: str | None, e: BaseException) -> None:
    import json

    rec = {"attempt": attempt, "error": f"{type(e).__name__}: {e}", "checkpoint": getattr(e, "checkpoint", None),
           "time": time.time()}
    try:
        uio.atomic_write_text(f"{run_dir.rstrip('/')}/{FAILURE_FILE}", json.dumps(rec, indent=1))
    except Exception as w:
        log.warning("could not record the failure of %s: %s", run_dir, w)


def read_failure(run_dir: str) -> dict | None:
    """The failure a trial's last attempt recorded (error text, last good checkpoint), or None."""
    import json

    try:
        return json.loads(uio.read_bytes(f"{run_dir.rstrip('/')}/{FAILURE_FILE}"))
    except (FileNotFoundError, ValueError):
        return None


def train_worker(wcfg: dict) -> None:
    """Ray Train per-worker function: run one stage's training loop and report its result."""
    import ray.train

    t_worker = time.time()
    from ray.tune.trainable.trainable_fn_utils import _in_tune_session

    if wcfg["local_mode"] and _in_tune_session():  # ray.train.get_context() is refused here
        rank, world = 0, 1
    else:
        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
    run_dir = wcfg["run_dir"]
    failed = read_failure(run_dir)
    if failed and failed.get("attempt") == wcfg.get("attempt"):  # a restarted worker group: fail again at once
        raise TrialFailed(f"{wcfg['key']}: {failed['error']}")
    exp = experiment_from_dict(wcfg["experiment"])
    hooks = RayHooks(wcfg, rank, world)
    train_ae, get_train_base = _train_fns(wcfg["train_impl"])
    t0, t_loop = time.perf_counter(), time.time()
    try:
        if wcfg["kind"] == "ae":
            res = train_ae(exp, run_dir, hooks)
        else:
            res = get_train_base()(exp, find_base(exp, wcfg["base"]), wcfg["ae_checkpoint"], run_dir, hooks)
    except BaseException as e:
        if rank == 0 and isinstance(e, _deterministic_errors()):  # retrying would fail the same way: recorded,
            _write_failure(run_dir, wcfg.get("attempt"), e)  # so that Ray Train's restart does not train again
        hooks.close()  # the curve up to the failure is kept too
        raise
    loop_seconds = time.perf_counter() - t0
    final = hooks.finish(res, loop_seconds)  # the final points join the curves, then the buffer closes
    final.update({"kind": wcfg["kind"], "key": wcfg["key"], "final": 1.0, "t_worker": t_worker,
                  "t_loop": t_loop, "t_loop_end": t_loop + loop_seconds})
    if rank == 0:
        final.update({"checkpoint": res.checkpoint, "mlflow_run_id": wcfg["run_id"]})
    ckpt = _checkpoint_obj(res.checkpoint, run_dir) if rank == 0 and not wcfg["local_mode"] else None
    report(final, local=wcfg["local_mode"], checkpoint=ckpt)
    return final  # local mode hands it back as Result.return_value


# ----------------------------------------------------------------------------------------------
# Outside Tune (tests, `ulsweep train` with several workers)


def fit_stage(exp: ExperimentConfig, run_dir: str, kind: str = "ae", base: str | None = None,
              ae_checkpoint: str | None = None, tracking_uri: str | None = None, run_id: str | None = None,
              train_impl: str = "ulsweep", resources: ResourcesConfig | None = None):
    """Fit one stage through a TorchTrainer without Tune (needs ray.init). Returns the ray.train.Result."""
    res = resources or exp.resources
    run_dir = os.path.abspath(run_dir) if "://" not in run_dir else run_dir
    uri = tracking_uri or tracking.default_tracking_uri(run_dir)
    if run_id is None:
        c = tracking.client(uri)
        eid = tracking.get_or_create_experiment(c, exp.tracking.experiment or exp.name,
                                                f"{run_dir.rstrip('/')}/mlartifacts")
        run_id = tracking.retry(c.create_run, eid, run_name=f"{kind}-{os.path.basename(run_dir)}").info.run_id
    name = run_dir.rstrip("/").rsplit("/", 1)[-1]
    wcfg = {"experiment": to_dict(exp), "kind": kind, "key": name, "base": base, "ae_checkpoint": ae_checkpoint,
            "run_dir": run_dir, "tracking_uri": uri, "run_id": run_id, "train_impl": train_impl,
            "local_mode": res.num_workers == 0}
    trainer = make_trainer(wcfg, res, storage_path=run_dir.rstrip("/").rsplit("/", 1)[0], name=name, in_tune=False)
    return trainer.fit()
