"""Stand-in training loops with the real loops' contract, for orchestration tests and benchmarks.

They take the same arguments, resume from the newest checkpoint in `run_dir`, call the hooks, sleep
`ULSWEEP_FAKE_STEP_S` seconds per step (default 0.02; ULSWEEP_FAKE_FAIL=key,... makes those trials raise;
ULSWEEP_FAKE_NAN=key:step,... gives those trials a NaN loss from that step on, which they detect like the
real loops: TrainingDiverged naming the last good checkpoint) and return metrics that depend smoothly on the
searched knobs, so that a sweep driven by them measures Ray/Tune/MLflow overhead and nothing else.
Selected with `ulsweep run --train-impl fake` (hidden flag) or `run_sweep(..., train_impl="fake")`.
"""
from __future__ import annotations

import json
import math
import os
import time

from ulsweep import io as uio
from ulsweep.config import BaseStageConfig, ExperimentConfig, TrainConfig
from ulsweep.train.hooks import TrainingDiverged
from ulsweep.train.hooks import StageResult, TrainHooks


def _step_s() -> float:
    return float(os.environ.get("ULSWEEP_FAKE_STEP_S", "0.02"))


def _latest(run_dir: str) -> tuple[int, str | None]:
    root = uio.join(run_dir, "checkpoints")
    steps = [int(name[5:-5]) for name in uio.listdir(root) if name.startswith("step_") and name.endswith(".json")]
    if not steps:
        return 0, None
    return max(steps), uio.join(root, f"step_{max(steps):08d}.json")


def _save(run_dir: str, step: int, state: dict) -> str:
    path = uio.join(run_dir, "checkpoints", f"step_{step:08d}.json")
    uio.atomic_write_text(path, json.dumps(state))
    return path


def _rank() -> int:
    try:
        import torch.distributed as dist

        return dist.get_rank() if dist.is_initialized() else 0
    except Exception:
        return 0


def _loop(tc: TrainConfig, run_dir: str, hooks: TrainHooks, metrics_fn) -> StageResult:
    rank = _rank()
    fail = [k for k in os.environ.get("ULSWEEP_FAKE_FAIL", "").split(",") if k]
    if run_dir.rstrip("/").rsplit("/", 1)[-1] in fail:  # failure injection for tests: trial keys
        raise RuntimeError(f"injected failure in {run_dir}")
    key = run_dir.rstrip("/").rsplit("/", 1)[-1]
    nan_at = dict(e.split(":") for e in os.environ.get("ULSWEEP_FAKE_NAN", "").split(",") if e)
    step, path = _latest(run_dir)
    if rank == 0:  # where every start of this loop began (tests: a restart resumes from the checkpoint)
        uio.append_text(f"{run_dir.rstrip('/')}/fake-starts.txt", f"{step}\n")
    t_train = 0.0
    ck_every = tc.ckpt_every or tc.steps
    marks = {"t_setup_end": time.time()}  # the real loop's phase marks (ulsweep/train/loop.py)
    while step < tc.steps and not hooks.should_stop():
        t0 = time.perf_counter()
        time.sleep(_step_s())
        step += 1
        t_train += time.perf_counter() - t0
        marks.setdefault("t_first_step_end", time.time())
        loss = 1.0 / math.sqrt(step) if step < int(nan_at.get(key, 1 << 62)) else math.nan
        if not math.isfinite(loss) and (step % (tc.log_every or 1) == 0 or step % ck_every == 0):
            raise TrainingDiverged(f"fake {key}: non-finite loss by step {step}; last good checkpoint "
                                   f"{path or '(none)'} kept in {run_dir}", checkpoint=path)
        if rank == 0 and tc.log_every and step % tc.log_every == 0:
            hooks.log_metrics(step, {"loss": loss})
        if rank == 0 and (step % ck_every == 0 or step == tc.steps):
            getattr(hooks, "before_checkpoint", lambda s: None)(step)
            path = _save(run_dir, step, {"step": step})
            hooks.checkpoint_saved(step, path, {})
    marks["t_train_end"] = time.time()
    if rank != 0:
        return StageResult({}, "", step, t_train, {"marks": marks})
    metrics = metrics_fn()
    marks["t_eval_end"] = time.time()
    hooks.log_metrics(step, {f"eval_{k}": v for k, v in metrics.items()})
    return StageResult(metrics, path or "", step, t_train, {"marks": marks})


def train_autoencoder(exp: ExperimentConfig, run_dir: str, hooks: TrainHooks | None = None) -> StageResult:
    L = exp.ae.loss

    def metrics():
        bpp = 0.01 * L.loss_factor * math.exp(0.4 * L.sigmoid_bias) * 4 / exp.ae.model.latent_channels ** 0.5
        return {"bpp": bpp, "bpp_se": bpp / 50, "psnr": 12 + 10 * bpp ** 0.5 * 5,
                "rfd_fake": 1.0 / (1 + 20 * bpp)}

    return _loop(exp.ae.train, run_dir, hooks or TrainHooks(), metrics)


def train_base(exp: ExperimentConfig, base: BaseStageConfig, ae_checkpoint: str, run_dir: str,
               hooks: TrainHooks | None = None) -> StageResult:
    if not uio.exists(ae_checkpoint):
        raise FileNotFoundError(f"AE checkpoint {ae_checkpoint} does not exist")
    L = exp.ae.loss

    def metrics():
        bpp = 0.01 * L.loss_factor * math.exp(0.4 * L.sigmoid_bias)
        return {"gfd_fake": (math.log(bpp) + 4.0) ** 2 + 0.1, "loss": 0.5}

    return _loop(base.train, run_dir, hooks or TrainHooks(), metrics)
