"""Ray Train worker side of a sweep trial: the training loop of one stage, run with hooks that send its curves
to MLflow (rank 0, batched) and its results to Tune.

    train_worker(wcfg)   the per-worker function of the trial's trainer (ulsweep.sweep.trial.make_trainer)
      - calls ulsweep.train.stage1.train_autoencoder / stage2.train_base on <run dir>/trials/<key>
        (the Ray Train run directory too, so checkpoints are reported in place: NO_UPLOAD)
      - rank 0: metric curves to MLflow in batches; final metrics, images, checkpoint URI at the end;
        MLflow system metrics (CPU, memory, disk, network, GPU utilization and memory) every
        `tracking.system_metrics_s` seconds, and the trial's own peak GPU memory at the end
      - every rank: a final ray.train.report carrying rank 0's checkpoint (Result.metrics needs it)
    failure.json         a failure that a retry would not change, so that Ray Train's restart fails at once

`wcfg` is the dict that ulsweep.sweep.trial.worker_config builds.
"""
from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import tempfile
import threading
import time
from typing import Any

from ulsweep import io as uio, tracking
from ulsweep.tracking.buffer import is_number
from ulsweep.config import experiment_from_dict
from ulsweep.sweep.space import find_base
from ulsweep.testing import faults
from ulsweep.train.hooks import StageResult, TrainHooks

log = logging.getLogger(__name__)

IMPLS = {  # train_impl -> (module of train_autoencoder, module of train_base)
    "ulsweep": ("ulsweep.train.stage1", "ulsweep.train.stage2"),
    "fake": ("ulsweep.testing.fake", "ulsweep.testing.fake"),
}
# metric curves go to MLflow in one batch per this many seconds (and at every checkpoint)
MLFLOW_FLUSH_S = float(os.environ.get("ULSWEEP_MLFLOW_FLUSH_S", "10"))
REPORT_EVERY_S = 2.0  # at most one intermediate Tune report per trial per this many seconds
FAILURE_FILE = "failure.json"


class RayHooks(TrainHooks):
    """Training-loop hooks inside a Ray Train worker: curves to MLflow (rank 0, batched) and to Tune.

    The loops call log_metrics, before_checkpoint and checkpoint_saved on rank 0 only, and every
    ray.train.report is a barrier across workers, so intermediate reports go to Tune only when the trial has
    one worker (or runs in local mode); a DDP trial reports once, at the end, from every rank.
    """

    def __init__(self, wcfg: dict, rank: int, world: int):
        self.kind, self.key, self.rank, self.world = wcfg["kind"], wcfg["key"], rank, world
        self.local_mode = wcfg["local_mode"]
        self.datasets = wcfg.get("datasets", [])  # names of the datasets the trainer was handed
        self.run_id = wcfg["run_id"]
        self.system_metrics_s = float(wcfg.get("system_metrics_s") or 0)  # tracking.system_metrics_s
        self._monitor = None
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
            if self.system_metrics_s > 0:  # before _ready: close() waits for it and then stops the monitor
                self._monitor = start_system_metrics(self.run_id, uri, self.system_metrics_s)
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

    def before_checkpoint(self, step: int) -> None:
        if self.buffer is not None:
            # every point up to a checkpoint is in MLflow or spooled on disk before the checkpoint exists: a
            # loop restarted from it re-logs only the steps after it (a process killed between the checkpoint
            # and this flush lost the points before it). Training waits a few seconds at most (MLflow may be down).
            if not self.buffer.flush(timeout=5.0):
                self.buffer.spool()

    def checkpoint_saved(self, step: int, path: str, metrics: dict[str, float]) -> None:
        self.last_checkpoint = path
        if self.client is not None:
            threading.Thread(target=self._set_tag, args=(tracking.TAG_CHECKPOINT, path), daemon=True).start()

    def finish(self, res: StageResult, loop_seconds: float) -> dict[str, Any]:
        """Rank 0: flush curves; final metrics, images and checkpoint to MLflow; the final Tune result."""
        final = {k: float(v) for k, v in numbers(res.metrics).items()}
        # a stacked group's member: the memory of the group's process, which trained it (this one relayed, and
        # in local mode never imported torch: importing it only to find no CUDA would cost seconds here)
        memory = _own_device_memory() or (res.extra or {}).get("device_memory", {})
        final.update({"step": res.steps, "train_seconds": res.train_seconds, "loop_seconds": loop_seconds, **memory})
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

    def dataset_shard(self, name: str):
        """This worker's part of the trainer's dataset `name` (Ray Train's streaming split; in local mode the
        whole dataset), or None where the trainer got none, or inside Tune in local mode, where ray.train.*
        calls are refused (the stage then streams in this process)."""
        from ray.tune.trainable.trainable_fn_utils import _in_tune_session

        if name not in self.datasets or (self.local_mode and _in_tune_session()):
            return None
        import ray.train

        return ray.train.get_dataset_shard(name)

    def close(self) -> None:
        """Rank 0: send the queued points (up to 30 s), spool the rest for the sweep driver to replay; stop the
        system metrics."""
        if self.rank == 0 and self.buffer is not None:  # waits for _connect, which starts the monitor
            self.buffer.close(timeout=30.0)
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None


def _own_device_memory() -> dict[str, float]:
    """This process's peak CUDA memory (runtime.device_memory), {} where it has not imported torch."""
    if "torch" not in sys.modules:
        return {}
    from ulsweep.train.runtime import device_memory

    return device_memory()


def start_system_metrics(run_id: str, tracking_uri: str, every_s: float):
    """MLflow's system metrics monitor on `run_id` (a thread: CPU, memory, disk, network, and with
    nvidia-ml-py every GPU of the node, as `system/...` metrics every `every_s` seconds, continuing the steps
    of an earlier attempt), or None where it cannot start (it says why)."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        mon = SystemMetricsMonitor(run_id, sampling_interval=every_s, resume_logging=True,
                                   tracking_uri=tracking_uri)
        mon.start()
        return mon
    except Exception as e:  # noqa: BLE001 - a missing psutil, an MLflow without the module: the trial goes on
        log.warning("MLflow system metrics of run %s not logged: %s", run_id, e)
        return None


def _log_image(c, run_id: str, name: str, path: str) -> None:
    if "://" not in path:
        tracking.log_artifact(c, run_id, path, "images")
        return
    with tempfile.TemporaryDirectory() as d:
        local = os.path.join(d, os.path.basename(name) or "image.png")
        with open(local, "wb") as dst:
            dst.write(uio.read_bytes(path))
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
    """(the autoencoder's, the base model's) training function of `impl`, each imported when first asked for: a
    stacked member's loop, which its group trains, never imports torch."""
    if impl not in IMPLS:
        raise ValueError(f"unknown train_impl {impl!r}; known: {sorted(IMPLS)}")
    m1, m2 = IMPLS[impl]
    return lambda: importlib.import_module(m1).train_autoencoder, lambda: importlib.import_module(m2).train_base


def train_worker(wcfg: dict) -> dict:
    """Ray Train per-worker function: run one stage's training loop and report its result."""
    t_worker = time.time()
    rank, world = _rank_and_world(wcfg["local_mode"])
    _fail_again_if_recorded(wcfg)
    run_dir = wcfg["run_dir"]
    exp = experiment_from_dict(wcfg["experiment"])
    waits = _cuda_wait(exp.resources)  # before torch first touches the GPU in this process
    hooks = RayHooks(wcfg, rank, world)
    if not wcfg.get("stack_group"):  # a trial alone: the claim of a task that compiles its step ahead, if any
        from ulsweep.sweep.precompile import claim_of

        hooks.compile_claim = claim_of(exp, wcfg["kind"], wcfg.get("base"))
    get_train_ae, get_train_base = _train_fns(wcfg["train_impl"])
    t0, t_loop = time.perf_counter(), time.time()
    try:
        res = None
        if wcfg.get("stack_group"):  # trained with its group, or alone when the group has no place for it
            from ulsweep.sweep.stacking import train_in_group

            base = None if wcfg["kind"] == "ae" else {"base": wcfg["base"], "ae_checkpoint": wcfg["ae_checkpoint"]}
            res = train_in_group(wcfg["stack_group"], wcfg["key"], exp, run_dir, hooks, base)
        if res is None and wcfg["kind"] == "ae":
            res = get_train_ae()(exp, run_dir, hooks)
        elif res is None:
            res = get_train_base()(exp, find_base(exp, wcfg["base"]), wcfg["ae_checkpoint"], run_dir, hooks)
    except BaseException as e:
        if rank == 0 and isinstance(e, deterministic_errors()):  # retrying would fail the same way: recorded,
            _write_failure(run_dir, wcfg.get("attempt"), e)  # so that Ray Train's restart does not train again
        hooks.close()  # the curve up to the failure is kept too
        raise
    loop_seconds = time.perf_counter() - t0
    final = hooks.finish(res, loop_seconds)  # the final points join the curves, then the buffer closes
    final.update({"kind": wcfg["kind"], "key": wcfg["key"], "final": 1.0, "t_worker": t_worker,
                  "t_loop": t_loop, "t_loop_end": t_loop + loop_seconds,
                  **(res.extra or {}).get("marks", {})})  # phases of the trial's timeline
    if waits is not None:
        final["cuda_wait"] = waits
    _report_final(final, res, wcfg, rank)
    return final  # local mode hands it back as Result.return_value


def _cuda_wait(resources) -> str | None:
    """`resources.cuda_wait` applied to this process's GPUs (None for auto): e.g. "block: set", or "block: as
    set" in a reused process, kept in the trial's timings."""
    policy = resources.cuda_wait
    if policy == "auto":
        return None
    from ulsweep.train import cuda_wait

    outcomes = sorted(set(cuda_wait.apply(policy).values())) or ["not applied"]
    return f"{policy}: {', '.join(outcomes)}"


def _rank_and_world(local_mode: bool) -> tuple[int, int]:
    import ray.train
    from ray.tune.trainable.trainable_fn_utils import _in_tune_session

    if local_mode and _in_tune_session():  # ray.train.get_context() is refused here
        return 0, 1
    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size()


def _report_final(final: dict, res: StageResult, wcfg: dict, rank: int) -> None:
    """Every rank reports (a report is a barrier); rank 0's result names its checkpoint and MLflow run, and
    outside local mode carries the checkpoint, reported in place."""
    ckpt = None
    if rank == 0:
        final.update({"checkpoint": res.checkpoint, "mlflow_run_id": wcfg["run_id"]})
        if not wcfg["local_mode"]:
            ckpt = _checkpoint_obj(res.checkpoint, wcfg["run_dir"])
    report(final, local=wcfg["local_mode"], checkpoint=ckpt)


def numbers(metrics: dict) -> dict[str, float]:
    """The numeric entries of a metrics dict (booleans are not numbers here)."""
    return {k: v for k, v in metrics.items() if is_number(v)}


# ----------------------------------------------------------------------------------------------
# failure records


class TrialFailed(RuntimeError):
    """A trial failed for a reason that a retry would not change (see failure.json in its run dir)."""


def deterministic_errors() -> tuple[type, ...]:
    from ulsweep.config import ConfigError
    from ulsweep.data import DataError
    from ulsweep.train.checkpoint import CheckpointError
    from ulsweep.train.hooks import TrainingDiverged

    return (TrainingDiverged, CheckpointError, ConfigError, DataError, TrialFailed)


def _fail_again_if_recorded(wcfg: dict) -> None:
    """A worker group that Ray Train restarted after a recorded failure fails again at once."""
    failed = read_failure(wcfg["run_dir"])
    if failed and failed.get("attempt") == wcfg.get("attempt"):
        raise TrialFailed(f"{wcfg['key']}: {failed['error']}")


def _write_failure(run_dir: str, attempt: str | None, e: BaseException) -> None:
    rec = {"attempt": attempt, "error": f"{type(e).__name__}: {e}", "checkpoint": getattr(e, "checkpoint", None),
           "time": time.time()}
    try:
        uio.atomic_write_text(f"{run_dir.rstrip('/')}/{FAILURE_FILE}", json.dumps(rec, indent=1))
    except Exception as w:
        log.warning("could not record the failure of %s: %s", run_dir, w)


def read_failure(run_dir: str) -> dict | None:
    """The failure a trial's last attempt recorded (error text, last good checkpoint), or None."""
    try:
        return json.loads(uio.read_bytes(f"{run_dir.rstrip('/')}/{FAILURE_FILE}"))
    except (FileNotFoundError, ValueError):
        return None


def error_line(err: BaseException) -> str:
    """The last non-blank line of an error's text (where Ray puts the cause), or its repr."""
    lines = [x.strip() for x in str(err).splitlines() if x.strip()]
    return lines[-1] if lines else repr(err)
