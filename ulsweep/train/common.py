"""Pieces shared by the stage-1 and stage-2 loops: device and precision, distributed helpers,
optimizer and learning-rate schedule, EMA of weights, RNG state capture."""
from __future__ import annotations

import collections
import contextlib
import copy
import os
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ulsweep.config import OptimConfig, TrainConfig
from ulsweep.train.inductor import install_choices


class TrainingDiverged(RuntimeError):
    """Loss became NaN/Inf; the last good checkpoint (`checkpoint`, None if there is none) is kept,
    nothing newer is written."""

    def __init__(self, message: str, checkpoint: str | None = None):
        super().__init__(message)
        self.checkpoint = checkpoint

    def __reduce__(self):  # crosses Ray process boundaries with its checkpoint
        return (type(self), (str(self), self.checkpoint))


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype, None for fp32
    rank: int
    world: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def make_runtime(train: TrainConfig) -> Runtime:
    """Pick device and precision; under torch.distributed (Ray Train) use the local rank's GPU."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    want = train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but CUDA is not available on this machine")
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True  # fixed training shapes: pick the fastest conv algorithms once
    else:
        device = torch.device("cpu")
    if train.precision == "bf16" or (train.precision == "auto" and device.type == "cuda"):
        amp = torch.bfloat16
    else:
        amp = None
    return Runtime(device, amp, rank, world)


def shard(batch: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """This rank's contiguous slice of a global batch (all ranks draw the same global batch)."""
    if rt.world == 1:
        return batch
    n = batch.shape[0]
    if n % rt.world:
        raise ValueError(f"global batch {n} is not divisible by the {rt.world} workers")
    k = n // rt.world
    return batch[rt.rank * k:(rt.rank + 1) * k]


def all_reduce_mean(x: torch.Tensor, rt: Runtime) -> torch.Tensor:
    if rt.world > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= rt.world
    return x


def wrap_ddp(module: nn.Module, rt: Runtime) -> nn.Module:
    if rt.world == 1:
        return module
    ids = [rt.device.index] if rt.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


# How a compiled step meets DDP's gradient buckets (torch._dynamo.config.optimize_ddp): "no_optimization"
# compiles the forward and the backward as one graph each and all-reduces the gradients after the backward;
# "ddp_optimizer" splits the graph at every 25-MB bucket so that all-reduce overlaps the backward, at the price
# of fusion across the splits. Paper base model, batch 64 a GPU, 2 x H200, one run: scaling 91.7% vs 87.6%
# (benchmarks/README.md, `benchmarks/ddp.py --optimize-ddp no_optimization ddp_optimizer`).
DDP_COMPILE = "no_optimization"


def compile_module(module: nn.Module, setting: bool | str, rt: Runtime) -> nn.Module:
    """torch.compile per `train.compile` (False: the module itself), in the mode `compile_mode` picks; under
    DDP (more than one worker) with `DDP_COMPILE` as Dynamo's way of meeting DDP's buckets."""
    mode = compile_mode(setting, rt)
    if mode is None:
        return module
    if rt.world > 1:
        torch._dynamo.config.optimize_ddp = DDP_COMPILE
    install_choices()  # one-pass kernels for short rows (ulsweep/train/inductor.py)
    return torch.compile(module, mode=mode)


_cuda_graph_owner: threading.Thread | None = None  # the one thread of this process that may use CUDA graphs
_cuda_graph_owner_lock = threading.Lock()


def compile_mode(setting: bool | str, rt: Runtime) -> str | None:
    """The torch.compile mode for `train.compile` (None: no compile). "reduce-overhead" replays the compiled
    forward and backward as CUDA graphs; it needs CUDA and one process per model, so it falls back to the
    default mode on CPU and under DDP (which splits the graph at its buckets), and in every thread of a
    process but the first that asked for it: with torch 2.11 on an H200, a second thread's training fails in
    CUDA-graph capture ("operation failed due to a previous error during capture") after the first thread's
    run succeeded. The sweep driver therefore gives each trial its own process when trials use CUDA graphs."""
    global _cuda_graph_owner
    if setting is False:
        return None
    mode = "default" if setting is True else setting
    if mode == "reduce-overhead" and (rt.device.type != "cuda" or rt.world > 1):
        mode = "default"
    if mode == "reduce-overhead":
        me = threading.current_thread()
        with _cuda_graph_owner_lock:
            if _cuda_graph_owner is None:
                _cuda_graph_owner = me
        if _cuda_graph_owner is not me:
            print(f"note: train.compile=reduce-overhead -> default in thread {me.name!r}: this process already "
                  f"uses CUDA graphs in thread {_cuda_graph_owner.name!r}", file=sys.stderr, flush=True)
            return "default"
        cuda_graph_state_for_this_thread()
    return mode


def cuda_graph_state_for_this_thread() -> None:
    """Give this thread torch.compile's CUDA-graph-tree state. torch 2.11 sets it up only in the thread that
    imported torch._inductor.cudagraph_trees and fails with an AssertionError in any other (a reused Tune
    actor runs each trial in a new thread); later versions do the same set-up lazily, as here."""
    from torch._inductor import cudagraph_trees as cgt

    if hasattr(cgt.local, "tree_manager_containers") or torch._C._is_key_in_tls("tree_manager_containers"):
        return
    cgt.local.tree_manager_containers = {}
    cgt.local.tree_manager_locks = collections.defaultdict(threading.Lock)
    # stashed so that autograd's backward threads, which copy this thread's TLS, find the same state
    torch._C._stash_obj_in_tls("tree_manager_containers", cgt.local.tree_manager_containers)
    torch._C._stash_obj_in_tls("tree_manager_locks", cgt.local.tree_manager_locks)


def make_optimizer(params, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    kw = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, **kw)


def clip_gradients(opt: torch.optim.Optimizer, max_norm: float) -> torch.Tensor:
    """Scale the gradients of `opt`'s parameters by min(1, max_norm / (|g| + 1e-6)) (as clip_grad_norm_; no
    clipping for max_norm <= 0) and return the total norm |g| before clipping. A fused optimizer takes the
    factor as its `grad_scale` divisor (the attribute GradScaler sets), which folds it into the AdamW kernel:
    for the 347M-parameter base model on an H200 the 0.8-ms pass over the gradients goes and AdamW takes 0.5 ms
    longer."""
    grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
    gnorm = torch.nn.utils.get_total_norm(grads)
    if max_norm <= 0:
        return gnorm
    divisor = ((gnorm + 1e-6) / max_norm).clamp_min(1.0)
    if opt.defaults.get("fused"):
        opt.grad_scale = divisor.to(torch.float32)
    else:
        torch._foreach_div_(grads, divisor)
    return gnorm


# Linear warm-up to the base rate, then constant.
def lr_at(step: int, cfg: OptimConfig) -> float:
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr


# EDM2 power-function EMA: beta_t = (1 - 1/t)^(gamma + 1), whose averaging profile has a width of
# sigma_rel of the training length at every t, with sigma_rel^2 = (gamma + 1) / ((gamma + 2)^2 (gamma + 3)).
def ema_exponent(std: float) -> float:
    """gamma of a power-function EMA with relative width `std` (largest real root of the cubic)."""
    t = std**-2
    return float(np.roots([1.0, 7.0, 16.0 - t, 12.0 - t]).real.max())


class EMA:
    """Power-function EMA of a module's parameters (buffers copied); std 0 tracks the weights exactly.

    A width relative to the run length keeps the average close to the current weights in short sweep
    trials: a fixed decay of 0.999 over 300 steps averaged so far back that the EMA encoder and EMA prior
    no longer matched, and the held-out bitrate bound came out 6x that of the online weights.
    """

    def __init__(self, module: nn.Module, std: float):
        self.gamma = ema_exponent(std) if std > 0 else None
        self.shadow = copy.deepcopy(module).eval().requires_grad_(False)

    def decay(self, step: int) -> float:
        """beta after optimizer step `step` (1-based)."""
        return 0.0 if self.gamma is None else (1.0 - 1.0 / step) ** (self.gamma + 1.0)

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        src = [p.detach() for p in module.parameters()]
        dst = list(self.shadow.parameters())
        torch._foreach_lerp_(dst, src, 1.0 - self.decay(step))
        for b_dst, b_src in zip(self.shadow.buffers(), module.buffers()):
            b_dst.copy_(b_src)

    def state_dict(self) -> dict:
        return self.shadow.state_dict()

    def load_state_dict(self, sd: dict) -> None:
        self.shadow.load_state_dict(sd)


def rng_state(gen: torch.Generator) -> dict:
    state = {"gen": gen.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(gen: torch.Generator, state: dict) -> None:
    gen.set_state(state["gen"].cpu())
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())


def unwrap(module: nn.Module) -> nn.Module:
    """The plain module under DDP / torch.compile wrappers."""
    while True:
        if isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        elif hasattr(module, "_orig_mod"):
            module = module._orig_mod
        else:
            return module


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
        parts = " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
        print(f"[{self.label}] step {step}/{self.total} {parts} img/s={images_per_s:.0f} eta={eta:.0f}s",
              file=self.stream, flush=True)


class TrainState:
    """Weights, EMA, optimizer, RNG and step of one run: what a checkpoint saves and a resume restores."""

    def __init__(self, net: nn.Module, oc: OptimConfig, rt: Runtime, seed: int):
        self.net, self.oc, self.rt = net, oc, rt
        self.ema = EMA(net, oc.ema_std)
        self.opt = make_optimizer(net.parameters(), oc, rt.device)
        self.gen = torch.Generator(rt.device).manual_seed(seed)  # every batch index and noise draw
        self.step, self.train_seconds = 0, 0.0

    def optimizer_step(self, loss: torch.Tensor) -> torch.Tensor:
        """Backward, clip, warm-up learning rate, AdamW step, EMA update; returns the gradient norm."""
        loss.backward()
        gnorm = clip_gradients(self.opt, self.oc.grad_clip)
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, self.oc)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.ema.update(self.net, self.step)
        return gnorm

    def state_dict(self) -> dict:
        return {"model": self.net.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
                "rng": rng_state(self.gen)}

    def load_state_dict(self, state: dict, meta: dict) -> None:
        self.net.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        set_rng_state(self.gen, state["rng"])
        self.step, self.train_seconds = meta["step"], meta.get("train_seconds", 0.0)


def due(step: int, every: int, total: int) -> bool:
    """An action scheduled every `every` steps (0: never) and always at the last step."""
    return bool(every and step % every == 0) or step == total
