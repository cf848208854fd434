"""What a checkpoint saves and a resume restores: weights, their EMA, the optimizer, the RNG and the step;
and the optimizer step that moves them (AdamW with warm-up and clipping, then the EMA)."""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from ulsweep.config import OptimConfig
from ulsweep.train.accel import clip_gradients
from ulsweep.train.runtime import Runtime


def make_optimizer(params, cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    kw = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, **kw)


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
    trials: a fixed decay of 0.999 over 300 steps averages so far back that the EMA encoder and EMA prior
    no longer match, and the held-out bitrate bound of such a run came out 6x that of the online weights.
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
        self.apply_gradients()
        return gnorm

    def apply_gradients(self) -> None:
        """The step on the gradients as they are (clipped already): warm-up learning rate, AdamW, EMA update."""
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, self.oc)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        self.ema.update(self.net, self.step)

    def state_dict(self) -> dict:
        return {"model": self.net.state_dict(), "ema": self.ema.state_dict(), "optimizer": self.opt.state_dict(),
                "rng": rng_state(self.gen)}

    def load_state_dict(self, state: dict, meta: dict) -> None:
        self.net.load_state_dict(state["model"])
        self.ema.load_state_dict(state["ema"])
        self.opt.load_state_dict(state["optimizer"])
        set_rng_state(self.gen, state["rng"])
        self.step, self.train_seconds = meta["step"], meta.get("train_seconds", 0.0)
