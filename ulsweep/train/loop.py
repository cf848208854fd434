"""The one training loop of both stages. Read top to bottom:

    resume or start -> steps (batch, noise, loss, optimizer step, EMA; logging, evaluation, checkpoints and
    the NaN check at their intervals) -> final evaluation -> final checkpoint -> result.json

What differs between the stages comes in as arguments:
  objective  an nn.Module around the trained networks, what DDP wraps and torch.compile traces:
             forward(batch, noise) -> per-example nats {"total": [B], ...}; draw_noise(n, gen) -> global-batch
             noise; `dims`, the dimensions of one example (the optimizer minimizes nats per dimension);
             curves(window means) -> the metrics logged; `progress_keys`, those printed. An objective of
             several runs trained as one program (ulsweep/train/group.py) has `reduce(v)`, each run's mean of
             a per-example value: its metrics are then lists, one value per run
  source     draw(n, gen) -> the next global batch, or this rank's part of it when `source.local_batches`
             (ulsweep/data/sources.py, ulsweep/data/stream.py); a source with `state_dict` / `load_state_dict`
             (its position in the data) has that state saved in checkpoints and restored on resume
  evaluate   (EMA network, final) -> (metrics, PNG images): held-out evaluation, complete when final; a final
             evaluation's `seconds/<part>` entries (evaluation.PartTimer) leave its metrics for the marks
             (`evaluate_<part>_s`)

Phases. The loop marks (wall clock, time.time()) when its first step starts and ends (the first step
includes torch.compile's tracing and compilation, and CUDA graph capture), when training ends and when the
final evaluation ends: `StageResult.extra["marks"]`, from which a sweep draws each trial's timeline
(ulsweep/sweep/timeline.py). With `train.gate_compile: eager` a trial whose model another process is compiling
takes uncompiled steps until that process is done (`eager_steps`; its first step is then uncompiled, and
`t_compiled_step_end` marks the end of its first compiled one), and so it does while a task that compiles its step
ahead holds the claim its hooks name (`TrainHooks.compile_claim`), even before that task has reached the gate.

Under torch.distributed every rank draws the same global batch and noise from the shared generator and
trains on its slice, so the loss does not depend on the number of workers. Checkpoints save weights, EMA,
optimizer, generator, step and the source's state: a resumed run reproduces the uninterrupted one exactly.
Checkpoints before the last are copied to host memory and written in a thread while the next steps run
(checkpoint.CheckpointWriter); the last one, and a stopped run's, are written before the loop returns.
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ulsweep import io as uio
from ulsweep.config import TrainConfig
from ulsweep.train.checkpoint import (CheckpointError, CheckpointWriter, latest_valid_checkpoint, prune_checkpoints,
                                      save_checkpoint, step_dir, write_images, write_result)
from ulsweep.train.hooks import StageResult, TrainHooks, TrainingDiverged
from ulsweep.train.compile_gate import WAIT_S, first_compile, graph_key
from ulsweep.train import accel
from ulsweep.train.evaluation import pop_seconds
from ulsweep.train.runtime import all_reduce_mean, compile_mode, compile_module, shard, wrap_ddp
from ulsweep.train.state import TrainState, lr_at

Evaluate = Callable[[nn.Module, bool], tuple[dict, dict]]
EAGER_MAX_S = WAIT_S  # longest a run trains uncompiled while another process holds its compile gate


@dataclass(frozen=True)
class RunSpec:
    """A run directory and what identifies the run in it."""

    run_dir: str  # local path or fsspec URI
    kind: str  # "ae" | "base": a checkpoint of another kind is refused
    label: str  # "ae NAME" / "base NAME", in progress lines and errors
    cfg_hash: str  # a checkpoint of another config is refused
    config_yaml: str  # written as config.yaml when the run starts
    state_extra: dict  # saved beside the weights in every checkpoint (the resolved config)
    meta: dict  # in every checkpoint's meta.json


def train(objective: nn.Module, source, evaluate: Evaluate, ts: TrainState, tc: TrainConfig, spec: RunSpec,
          hooks: TrainHooks, marks: dict | None = None) -> StageResult:
    """Train `ts.net` through `objective` on batches of `source` to `tc.steps` steps, resuming from the newest
    valid checkpoint in `spec.run_dir`; evaluate, checkpoint and write result.json at the end (rank 0). `marks`:
    a dict the loop keeps its phase marks in (a group's final evaluation reads them, ulsweep/train/group.py)."""
    gate = contextlib.ExitStack()  # held through the first step of a compiled single-process run
    writer = CheckpointWriter()  # the checkpoints before the last, written beside the steps after them
    try:
        return _train(objective, source, evaluate, ts, tc, spec, hooks, gate, writer, {} if marks is None else marks)
    finally:
        writer.close()
        gate.close()
        if hasattr(source, "close"):  # a stream stops reading ahead
            source.close()


def _train(objective: nn.Module, source, evaluate: Evaluate, ts: TrainState, tc: TrainConfig, spec: RunSpec,
           hooks: TrainHooks, gate: contextlib.ExitStack, writer: CheckpointWriter, marks: dict) -> StageResult:
    rt = ts.rt
    marks["t_setup_end"] = time.time()  # data and networks built; the first step starts after resuming
    model = resume(ts, spec, objective, tc.compile, source, tc.batch_size)
    # of the first step's phase: the resume and torch.compile's wrapper (its first call imports Inductor's modules)
    marks["first_step_resume_s"] = time.time() - marks["t_setup_end"]
    # the first compile of this step on the node runs alone, later ones from its caches (compile_gate.py); not
    # under DDP, whose ranks compile together
    mode = compile_mode(tc.compile, rt) if rt.world == 1 and tc.gate_compile else None
    step_fn = objective if mode is not None else model  # the module of the next step
    key, gated, eager_steps = None, False, 0  # gate key; first compiled step entered; uncompiled steps taken
    eager_since = None  # when the first uncompiled step started
    compiled_before = None  # this process's compile seconds by phase when the first compiled step began
    local_batches = getattr(source, "local_batches", False)
    reduce = getattr(objective, "reduce", _mean)  # per-example values -> the window's per-step mean(s)

    def checkpoint(metrics: dict, background: bool = False) -> str | None:
        """Rank 0 writes the state as of this step, after any write in flight; `background`: in the writer's
        thread while training goes on (announced, and `last_ckpt`, once written), else here. The path, if
        written here."""
        if not rt.is_main:
            return None
        writer.wait()  # one in flight is written and announced first: checkpoints are announced in order
        step = ts.step
        meta = {**spec.meta, "kind": spec.kind, "config_hash": spec.cfg_hash, "step": step,
                "train_seconds": ts.train_seconds, "metrics": metrics}
        state = {**ts.state_dict(), **spec.state_extra}
        if hasattr(source, "state_dict"):
            state["data"] = source.state_dict()
        getattr(hooks, "before_checkpoint", lambda step: None)(step)  # hooks may predate it

        def saved(path: str) -> None:
            nonlocal last_ckpt
            last_ckpt = path
            prune_checkpoints(spec.run_dir, tc.keep_checkpoints)
            hooks.checkpoint_saved(step, path, metrics)

        if background:
            writer.save(spec.run_dir, step, state, meta, saved)
            return None
        path = save_checkpoint(spec.run_dir, step, state, meta)
        saved(path)
        return path

    progress = Progress(tc.steps, spec.label, rt.is_main)
    acc: dict[str, torch.Tensor] = {}  # sums over the logging window of per-step means
    n_acc, t_last = 0, time.perf_counter()
    # any non-finite loss since the last check: one flag, or one per member of a group; `gone`: the members that
    # diverged, whose rows a group keeps computing (no member's rows reach another's) but no longer reads
    bad = gone = torch.zeros((), dtype=torch.bool, device=rt.device)
    last_ckpt = step_dir(spec.run_dir, ts.step) if ts.step else None  # a resumed run's last good checkpoint
    ts.net.train()
    while ts.step < tc.steps and not hooks.should_stop():
        t0 = time.perf_counter()
        batch = source.draw(tc.batch_size, ts.gen)
        if mode is not None and not gated:
            key = key or graph_key(objective, batch.shape, mode, rt.device.type, rt.amp_dtype)
            # uncompiled for as long as a waiter would wait (WAIT_S): then compile anyway ("timeout"), so that a
            # holder that hangs (rather than dies, which frees the gate) cannot keep this run uncompiled throughout
            out_waited = eager_since is not None and time.monotonic() - eager_since > EAGER_MAX_S
            if out_waited and rt.is_main:
                print(f"[{spec.label}] compiling anyway after {eager_steps} uncompiled steps: the compile gate "
                      f"{key[:8]} is still held", file=sys.stderr, flush=True)
            attempt = contextlib.ExitStack()
            # a task compiling this step ahead of the run (the hooks name its claim) is let compile it first
            how = attempt.enter_context(first_compile(key, spec.label, wait=tc.gate_compile != "eager" or out_waited,
                                                      wait_s=0.0 if out_waited else WAIT_S,
                                                      claim=getattr(hooks, "compile_claim", None)))
            if how == "busy":  # another process compiles this model: train uncompiled meanwhile
                attempt.close()
                if not eager_steps:
                    eager_since = time.monotonic()
                    # cuDNN's algorithm search times every convolution shape at its first call: seconds (up to 15 s on
                    # a fresh H200 machine, benchmarks/first_step.py) before the first step of an interim that may
                    # be short, whose shapes and layouts the compiled step need not share. Heuristics meanwhile
                    # (not slower there: 69 vs 78 ms a step); the search comes back for the compiled steps.
                    gate.callback(setattr, torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
                    torch.backends.cudnn.benchmark = False
                    if rt.is_main:
                        print(f"[{spec.label}] training uncompiled while another process compiles this model, or "
                              f"has claimed its compile (compile gate {key[:8]})", file=sys.stderr, flush=True)
                eager_steps += 1
            else:
                gate.close()  # cuDNN's search as it was before any uncompiled step
                gate.enter_context(attempt.pop_all())  # held through this first compiled step
                marks["compile_gate"], step_fn, gated = how, model, True
                compiled_before = accel.compile_phase_totals() if eager_steps else None
        noise = objective.draw_noise(tc.batch_size, ts.gen)
        batch = batch if local_batches else shard(batch, rt)
        noise = {k: shard(v, rt) for k, v in noise.items()}
        with rt.autocast():
            losses = step_fn(batch, noise)
        loss = losses["total"].mean() / objective.dims  # nats per dimension, for the optimizer
        gnorm = ts.optimizer_step(loss)
        step_means = {k: reduce(v) for k, v in {**losses, "grad_norm": gnorm}.items()}
        bad = bad | (~torch.isfinite(step_means["total"]) & ~gone)
        for k, v in step_means.items():
            acc[k] = acc.get(k, torch.zeros((), device=rt.device)) + v
        n_acc += 1
        first_compiled = gated and "t_compiled_step_end" not in marks
        if first_compiled or "t_first_step_end" not in marks:  # compiled and captured, or the first step taken
            rt.synchronize()  # wait for the device once
            now = time.time()
            marks.setdefault("t_first_step_end", now)  # ready to train
            if first_compiled:  # let the next process of this model in
                marks["t_compiled_step_end"] = now
                gate.close()
                if eager_steps:  # the switch from uncompiled steps: the compile from the caches, CUDA graph capture
                    _switched(spec.label, marks, time.perf_counter() - t0, eager_steps, compiled_before, rt.is_main)
        ts.train_seconds += time.perf_counter() - t0

        step = ts.step
        is_log = bool(tc.log_every) and step % tc.log_every == 0
        is_eval, is_ckpt = due(step, tc.eval_every, tc.steps), due(step, tc.ckpt_every, tc.steps)
        if (is_log or is_eval or is_ckpt) and bad.any().item():  # one device sync per action, not per step
            writer.wait()  # a checkpoint in flight was taken before the loss turned: the last good one
            err = TrainingDiverged(f"{spec.label}: non-finite loss by step {step}; last good checkpoint "
                                   f"{last_ckpt or '(none)'} kept in {spec.run_dir}", checkpoint=last_ckpt)
            diverged = getattr(hooks, "diverged", lambda *a: False)  # hooks may predate it
            if not (rt.is_main and diverged(step, bad.reshape(-1).tolist(), err)):
                raise err
            gone, bad = gone | bad, torch.zeros_like(bad)
        if is_log:
            means = {k: _host(all_reduce_mean(v / n_acc, rt)) for k, v in acc.items()}
            ips = n_acc * tc.batch_size / max(time.perf_counter() - t_last, 1e-9)
            m = {**objective.curves(means), "grad_norm": means["grad_norm"], "lr": lr_at(step - 1, ts.oc),
                 "images_per_s": ips}
            if rt.is_main:
                hooks.log_metrics(step, m)
            progress.line(step, {k: m[k] for k in objective.progress_keys}, ips)
            acc, n_acc, t_last = {}, 0, time.perf_counter()
        metrics = {}
        if is_eval and step < tc.steps and rt.is_main:
            metrics, _ = evaluate(ts.ema.shadow, False)
            hooks.log_metrics(step, {f"eval_{k}": v for k, v in metrics.items()})
        if is_ckpt and step < tc.steps:
            checkpoint(metrics, background=True)
        writer.poll()

    writer.wait()  # the last checkpoint in flight, announced before the final evaluation hands anything over
    marks["t_train_end"] = time.time()
    if mode is not None:  # steps taken uncompiled while another process compiled (all of them if it never ended)
        marks["eager_steps"] = eager_steps
    if ts.step < tc.steps:  # stopped early on request: checkpointed at this step unless it just was
        path = last_ckpt if rt.is_main and last_ckpt == step_dir(spec.run_dir, ts.step) else checkpoint({})
        return StageResult({}, path or "", ts.step, ts.train_seconds, {"stopped": True, "marks": marks})
    if not rt.is_main:
        return StageResult({}, "", ts.step, ts.train_seconds, {"marks": marks})
    metrics, images = evaluate(ts.ema.shadow, True)
    marks["t_eval_end"] = time.time()
    marks.update(pop_seconds(metrics))  # how long its parts took: timings, not metrics of the model
    hooks.log_metrics(ts.step, {f"eval_{k}": v for k, v in metrics.items()})
    path = checkpoint(metrics)
    res = StageResult(metrics, path, ts.step, ts.train_seconds, {"images": write_images(spec.run_dir, images),
                                                                  "marks": marks})
    write_result(spec.run_dir, res, spec.cfg_hash)  # last: marks the run finished
    return res


def _switched(label: str, marks: dict, seconds: float, eager_steps: int, compiled_before: dict | None,
              main: bool) -> None:
    """The first compiled step after `eager_steps` uncompiled ones took `seconds`: the step's compile from the
    caches another process left (Dynamo's tracing, the compiled code loaded), its CUDA graphs captured and the step
    itself. Marked (`train_compile_switch_s`) and, on the main rank, a line with the compile's longest phases.
    On the H100 of session 41 the stacked autoencoders' 50 steps around it took ~25 s more than their steps."""
    marks["train_compile_switch_s"] = seconds
    if main:
        phases = accel.compile_phase_seconds(top=8, least=0.1, since=compiled_before)
        print(f"[{label}] first compiled step, after {eager_steps} uncompiled ones: {seconds:.1f} s"
              + (f"; compile phases: {', '.join(f'{k} {v:g} s' for k, v in phases.items())}" if phases else ""),
              file=sys.stderr, flush=True)


def resume(ts: TrainState, spec: RunSpec, objective: nn.Module, compile_setting: bool | str, source=None,
           batch_size: int = 0) -> nn.Module:
    """Restore `ts` (and the position of a `source` that has one) from the run's newest valid checkpoint (it
    must be of this kind and config), or write config.yaml on a fresh run; return `objective` as trained:
    DDP-wrapped under torch.distributed, compiled when `train.compile` asks."""
    rt = ts.rt
    ck = latest_valid_checkpoint(spec.run_dir, map_location=rt.device)
    if ck is not None:
        state, meta = ck
        if meta.get("kind") != spec.kind or meta.get("config_hash") != spec.cfg_hash:
            raise CheckpointError(
                f"{spec.run_dir}: holds a {meta.get('kind')!r} checkpoint of config {meta.get('config_hash')} but "
                f"this run is {spec.kind!r} with config {spec.cfg_hash}; use a fresh run directory or the same "
                "config")
        ts.load_state_dict(state, meta)
        if source is not None and hasattr(source, "load_state_dict"):
            source.load_state_dict(state.get("data"), batch_size)
    elif rt.is_main:
        uio.atomic_write_text(uio.join(spec.run_dir, "config.yaml"), spec.config_yaml)
    return compile_module(wrap_ddp(objective, rt), compile_setting, rt)


def _mean(v: torch.Tensor) -> torch.Tensor:
    return v.detach().mean()


def _host(v: torch.Tensor) -> float | list[float]:
    """A window mean on the host: a float, or one float per run of a group (ulsweep/train/group.py)."""
    return v.item() if v.dim() == 0 else v.tolist()


def due(step: int, every: int, total: int) -> bool:
    """An action scheduled every `every` steps (0: never) and always at the last step."""
    return bool(every and step % every == 0) or step == total


class Progress:
    """One line per log step on the main rank: step, loss, throughput, ETA."""

    def __init__(self, total: int, label: str, enabled: bool, stream=None):
        self.total, self.label, self.enabled = total, label, enabled
        self.stream = stream or sys.stdout
        self.t0 = time.perf_counter()

    def line(self, step: int, metrics: dict[str, float], images_per_s: float) -> None:
        if not self.enabled:
            return
        elapsed = time.perf_counter() - self.t0
        eta = elapsed / max(step, 1) * (self.total - step)
        parts = " ".join(f"{k}={_fmt(v)}" for k, v in metrics.items())
        print(f"[{self.label}] step {step}/{self.total} {parts} img/s={images_per_s:.0f} eta={eta:.0f}s",
              file=self.stream, flush=True)


def _fmt(v: float | list[float]) -> str:
    """A progress value: one run's, or the range over a group's runs ("0.41..0.57")."""
    if isinstance(v, list):
        v = [x for x in v if x == x] or v  # a diverged member's NaN left out
        return f"{min(v):.4g}..{max(v):.4g}"
    return f"{v:.4g}"
