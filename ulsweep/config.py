"""Typed experiment configuration: YAML -> frozen dataclasses.

One experiment file drives everything: `ulsweep train ae` reads its `data` and `ae` sections,
`ulsweep train base` its `data` and `base_models` sections, `ulsweep run` all of it.

Every error raised while loading is a `ConfigError` naming the file, the dotted key and the value at
fault, and it is raised before any work starts. Dicts appear only at the YAML / Ray / MLflow boundaries.
"""
from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

_MISSING = object()


class ConfigError(ValueError):
    """A configuration problem, located by file and dotted key."""

    def __init__(self, message: str, *, key: str | None = None, value: Any = _MISSING,
                 file: str | None = None):
        self.message, self.key, self.value, self.file = message, key, value, file
        super().__init__(self._render())

    def _render(self) -> str:
        where = ": ".join(p for p in (self.file, self.key) if p)
        got = "" if self.value is _MISSING else f" (got {self.value!r})"
        return f"{where}: {self.message}{got}" if where else f"{self.message}{got}"

    def located(self, prefix: str = "", file: str | None = None) -> "ConfigError":
        key = ".".join(p for p in (prefix, self.key) if p) or None
        return ConfigError(self.message, key=key, value=self.value, file=self.file or file)


def _require(ok: bool, key: str, value: Any, message: str) -> None:
    if not ok:
        raise ConfigError(message, key=key, value=value)


# ----------------------------------------------------------------------------------------------
# Sections


@dataclass(frozen=True)
class DataConfig:
    path: str = "builtin:digits"  # Parquet dataset directory / fsspec URI, or builtin:NAME
    image_size: int = 16  # images are padded/resized to image_size x image_size
    train_split: str = "train"
    eval_split: str = "test"

    def __post_init__(self):
        _require(self.image_size >= 4, "image_size", self.image_size, "must be >= 4")
        _require(bool(self.path), "path", self.path, "must be a dataset path, URI or builtin:NAME")


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
    sampler: Literal["ddim", "ancestral"] = "ddim"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    # torch.compile of the trained network: false, true (= "default"), or "reduce-overhead" (CUDA graphs:
    # removes the per-kernel launch cost that bounds small models; single-process trials only)
    compile: bool | Literal["default", "reduce-overhead", "max-autotune-no-cudagraphs"] = False
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def __post_init__(self):
        for k in ("steps", "batch_size", "eval_images", "eval_t_per_image", "sample_steps", "keep_checkpoints"):
            _require(getattr(self, k) > 0, k, getattr(self, k), "must be > 0")
        for k in ("log_every", "eval_every", "ckpt_every"):
            _require(getattr(self, k) >= 0, k, getattr(self, k), "must be >= 0")


@dataclass(frozen=True)
class AEStageConfig:
    model: AEModelConfig = field(default_factory=AEModelConfig)
    loss: AELossConfig = field(default_factory=AELossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass(frozen=True)
class BaseModelConfig:
    preset: Literal["tiny", "small", "medium", "paper"] = "tiny"


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
    max_failures: int = 0  # Tune retries of a failed trial (it resumes from its last checkpoint)
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
        for k, spec in self.space.items():
            _check_space_entry(f"space.{k}", spec, grid=self.method == "grid")
        _require(not self.points or self.method in ("none", "grid"), "points", self.points,
                 "extra points are only for methods none and grid")
        for i, pt in enumerate(self.points):
            _require(len(pt) > 0, f"points[{i}]", pt, "must set at least one dotted key")
            _require(all(isinstance(k, str) for k in pt), f"points[{i}]", pt, "keys must be dotted config keys")
        if self.max_trials is not None:
            _require(self.max_trials > 0, "max_trials", self.max_trials, "must be > 0")
            n, how = self.num_samples, f"num_samples={self.num_samples}"
            if self.method == "grid":
                sizes = [len(spec["values"]) for spec in self.space.values()]
                n = math.prod(sizes) * self.num_samples
                how = " x ".join(map(str, sizes)) + f" points x {self.num_samples} sample(s)"
            if self.points:
                n += len(self.points)
                how += f" + {len(self.points)} extra point(s)"
            _require(n <= self.max_trials, "space" if self.method == "grid" else "num_samples",
                     n, f"{n} AE trials ({how}) exceed the budget search.max_trials={self.max_trials}")


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
    driver_cpus: float = 0.01  # the Tune trial process that builds the TorchTrainer (0 is refused by Ray)
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl with GPUs, gloo without
    # Ray Train restarts of a trial's worker group after a worker process dies (FailureConfig.max_failures);
    # the loop resumes from its last checkpoint. Deterministic errors (NaN loss, bad checkpoint) never retry.
    max_worker_failures: int = 2

    def __post_init__(self):
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


@dataclass(frozen=True)
class TrackingConfig:
    """MLflow. Precedence for the URI: `--tracking-uri`, then MLFLOW_TRACKING_URI, then `uri`, then
    sqlite:///<abs run dir>/mlflow.db (always absolute: Ray changes workers' working directories)."""

    uri: str | None = None  # None: sqlite:///<abs run dir>/mlflow.db
    experiment: str | None = None  # None: the experiment's name
    artifact_location: str | None = None  # None: <run dir>/mlartifacts (for a new MLflow experiment)


@dataclass(frozen=True)
class EvalConfig:
    """Fréchet-distance evaluation. `extractor`: `auto` (a domain classifier ulsweep trains once per dataset
    and caches: metrics rfd_<name>/gfd_<name>), `inception` (standard FID network, weights from
    `inception_weights` or $ULSWEEP_INCEPTION_WEIGHTS: metrics rfid/gfid), a domain extractor's weights
    path/URI, or `none`. rFD uses the AE's `train.eval_images` held-out images and their reconstructions."""

    extractor: str = "auto"
    extractor_sha256: str | None = None  # pin the extractor's weights
    extractor_epochs: int = 4  # when `auto` has to train one
    inception_weights: str | None = None
    gfd_samples: int = 1000  # base-model samples for gFD
    gfd_reference_images: int = 10000  # eval-split images giving gFD's reference statistics

    def __post_init__(self):
        _require(bool(self.extractor), "extractor", self.extractor, "must be auto, inception, none or a path")
        for k in ("extractor_epochs", "gfd_samples", "gfd_reference_images"):
            _require(getattr(self, k) > 0, k, getattr(self, k), "must be > 0")


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

    def __post_init__(self):
        _require(bool(self.name) and "/" not in self.name, "name", self.name,
                 "must be a non-empty name without '/'")
        d = self.ae.model.downsample
        _require(self.data.image_size % d == 0, "ae.model.downsample", d,
                 f"must divide data.image_size={self.data.image_size}")
        names = [b.name for b in self.base_models]
        _require(len(set(names)) == len(names), "base_models", names, "names must be unique")


# ----------------------------------------------------------------------------------------------
# Generic dict -> dataclass conversion with located errors


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, key)
            except ConfigError as e:
                errors.append(e.message)
        raise ConfigError(f"expected {' or '.join(_type_name(a) for a in args)}", key=key, value=value)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"must be one of {', '.join(map(repr, args))}", key=key, value=value)
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"expected a mapping for section {_type_name(tp)}", key=key, value=value)
        return build(tp, value, prefix=key)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError("expected a list", key=key, value=value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"expected a list of {len(args)} items", key=key, value=value)
        return tuple(_convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError("expected a mapping", key=key, value=value)
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError("expected true or false", key=key, value=value)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError("expected an integer", key=key, value=value)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError("expected a number", key=key, value=value)
        try:
            return float(value)
        except OverflowError:
            raise ConfigError("number too large", key=key, value=value) from None
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError("expected a string", key=key, value=value)
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")  # a bug in this module, not in input


def build(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, recursively; errors carry the dotted key."""
    if not isinstance(data, Mapping):
        raise ConfigError("expected a mapping", key=prefix or None, value=data)
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(names)}"
            raise ConfigError(f"unknown key{hint}", key=key)
        kwargs[k] = _convert(hints[k], v, key)
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise e.located(prefix) from None


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), the form written to YAML, MLflow and checkpoints."""

    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists stay values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def config_hash(cfg: Any) -> str:
    """SHA-256 (first 16 hex digits) of the canonical JSON of a config."""
    blob = json.dumps(to_dict(cfg), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    """Set d['a']['b'] = value for dotted='a.b'; 'base_models.0.x' indexes lists."""
    parts = dotted.split(".")
    node: Any = d
    for i, p in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise ConfigError("list index out of range", key=".".join(parts[: i + 1]), value=p)
            node = node[int(p)]
            continue
        nxt = node.get(p)
        if nxt is None:
            nxt = node[p] = {}
        elif not isinstance(nxt, (dict, list)):
            raise ConfigError("is not a section", key=".".join(parts[: i + 1]), value=nxt)
        node = nxt
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError("list index out of range", key=dotted, value=last)
        node[int(last)] = value
    else:
        node[last] = value


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """['ae.loss.loss_factor=4', ...] -> {'ae.loss.loss_factor': 4.0, ...} (values parsed as YAML)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError("override must look like KEY=VALUE", key="--set", value=item)
        k, v = item.split("=", 1)
        try:
            out[k.strip()] = yaml.safe_load(v)
        except yaml.YAMLError as e:
            raise ConfigError(f"value is not valid YAML: {e}", key=k.strip(), value=v) from None
    return out


def _plain(value: Any, key: str) -> Any:
    """Deep copy of YAML data as JSON-like Python (str keys); other types (dates, binary, sets, complex
    keys) are refused with their dotted key."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not (k is None or isinstance(k, (str, bool, int, float))):
                raise ConfigError("keys must be strings", key=key or None, value=k)
            ks = k if isinstance(k, str) else json.dumps(k)
            out[ks] = _plain(v, f"{key}.{ks}" if key else ks)
        return out
    if isinstance(value, (list, tuple)):
        return [_plain(v, f"{key}[{i}]") for i, v in enumerate(value)]
    raise ConfigError(f"unsupported value of type {type(value).__name__}; use a string, number, list or mapping",
                      key=key or None, value=value)


def experiment_from_dict(raw: Mapping[str, Any], overrides: Mapping[str, Any] | None = None,
                         file: str | None = None) -> ExperimentConfig:
    try:
        if not isinstance(raw, Mapping):
            raise ConfigError("top level must be a mapping", value=type(raw).__name__)
        data = _plain(raw, "")  # deep copy of plain YAML data
        for k, v in (overrides or {}).items():
            if not isinstance(k, str) or not k or "" in k.split("."):
                raise ConfigError("override key must be a dotted key such as ae.loss.loss_factor", key="--set",
                                  value=k)
            set_dotted(data, k, _plain(v, k))
        return build(ExperimentConfig, data)
    except ConfigError as e:
        raise e.located(file=file) from None


def load_experiment(path: str | Path, overrides: Mapping[str, Any] | None = None) -> ExperimentConfig:
    """Read an experiment YAML (safe_load only) into a validated ExperimentConfig."""
    path = str(path)
    try:
        if "://" in path:  # an experiment file in a bucket: s3://..., gs://... (fsspec)
            from ulsweep import io as uio

            text = uio.read_bytes(path).decode()
        else:
            text = Path(path).read_text()
    except FileNotFoundError:
        raise ConfigError("file not found", file=path) from None
    except OSError as e:
        raise ConfigError(f"cannot read: {e.strerror}", file=path) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError(f"YAML syntax error: {line}{problem}", file=path) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError("top level must be a mapping", file=path, value=type(raw).__name__)
    return experiment_from_dict(raw, overrides, file=path)


def check_data(exp: ExperimentConfig, file: str | None = None) -> None:
    """data.path must name a dataset (a builtin, or a directory / URI holding dataset.json): checked when a
    command starts, before Ray or training does (a missing dataset is a config error, not a trial failure)."""
    from ulsweep.data import DataError, open_dataset
    from ulsweep.data.builtin import data_path_problem

    path = exp.data.path
    problem = data_path_problem(path)
    if problem is None and not path.startswith("builtin:"):
        try:  # the manifest: schema, splits, shard list (shards themselves are hashed when read)
            splits = open_dataset(path).splits
            missing = [s for s in (exp.data.train_split, exp.data.eval_split) if s not in splits]
            if missing:
                problem = f"has no split(s) {missing} (splits: {', '.join(splits)})"
        except DataError as e:
            problem = f"invalid dataset: {e}"
    if problem:
        raise ConfigError(problem, key="data.path", value=path, file=file)


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
