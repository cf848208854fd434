"""Log-SNR schedules lambda(t) on t in [0, 1] with exact derivatives.

t = 0 is the clean end (lambda = logsnr_max), t = 1 the noisy end (lambda = logsnr_min), so
lambda decreases in t and -dlambda/dt > 0. A constant `shift` moves the whole curve (resolution shift).
The weighted diffusion loss in continuous time does not depend on the schedule between its endpoints;
only the variance of its Monte-Carlo estimate does.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


# Cosine in log-SNR: lambda(t) = -2 log tan(a t + c), with c, a chosen to hit the endpoints.
def cosine_logsnr(t: torch.Tensor, logsnr_max: float, logsnr_min: float) -> torch.Tensor:
    c = math.atan(math.exp(-0.5 * logsnr_max))
    a = math.atan(math.exp(-0.5 * logsnr_min)) - c
    return -2.0 * torch.log(torch.tan(a * t + c))


# d/dt [-2 log tan(a t + c)] = -2a / (sin(a t + c) cos(a t + c)) = -4a / sin(2(a t + c)).
def cosine_dlogsnr_dt(t: torch.Tensor, logsnr_max: float, logsnr_min: float) -> torch.Tensor:
    c = math.atan(math.exp(-0.5 * logsnr_max))
    a = math.atan(math.exp(-0.5 * logsnr_min)) - c
    return -4.0 * a / torch.sin(2.0 * (a * t + c))


# Linear in log-SNR: lambda(t) = logsnr_max + (logsnr_min - logsnr_max) t.
def linear_logsnr(t: torch.Tensor, logsnr_max: float, logsnr_min: float) -> torch.Tensor:
    return logsnr_max + (logsnr_min - logsnr_max) * t


def linear_dlogsnr_dt(t: torch.Tensor, logsnr_max: float, logsnr_min: float) -> torch.Tensor:
    return torch.full_like(t, logsnr_min - logsnr_max)


_KINDS = {
    "cosine": (cosine_logsnr, cosine_dlogsnr_dt),
    "linear": (linear_logsnr, linear_dlogsnr_dt),
}


@dataclass(frozen=True)
class LogSNRSchedule:
    """lambda(t) + shift, from logsnr_max + shift at t=0 to logsnr_min + shift at t=1."""

    kind: str = "cosine"
    logsnr_max: float = 15.0
    logsnr_min: float = -15.0
    shift: float = 0.0

    def __post_init__(self):
        if self.kind not in _KINDS:
            raise ValueError(f"unknown schedule kind {self.kind!r}; known: {sorted(_KINDS)}")
        if not self.logsnr_max > self.logsnr_min:
            raise ValueError(f"schedule needs logsnr_max > logsnr_min, got {self.logsnr_max}, {self.logsnr_min}")

    def logsnr(self, t: torch.Tensor) -> torch.Tensor:
        """lambda(t), same shape as t (float64 math is the caller's choice via t's dtype)."""
        return _KINDS[self.kind][0](t, self.logsnr_max, self.logsnr_min) + self.shift

    def dlogsnr_dt(self, t: torch.Tensor) -> torch.Tensor:
        """d lambda / dt (negative everywhere)."""
        return _KINDS[self.kind][1](t, self.logsnr_max, self.logsnr_min)

    @property
    def logsnr_0(self) -> float:
        return self.logsnr_max + self.shift

    @property
    def logsnr_1(self) -> float:
        return self.logsnr_min + self.shift


def low_discrepancy_times(batch: int, generator: torch.Generator | None = None,
                          device: torch.device | str | None = None) -> torch.Tensor:
    """t_i = (u + i / B) mod 1 with one u ~ U(0, 1): stratified times that lower the loss variance."""
    u = torch.rand((), generator=generator, device=device)
    return torch.remainder(u + torch.arange(batch, device=device) / batch, 1.0)
