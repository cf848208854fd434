"""Samplers in log-SNR space: DDIM (deterministic) and ancestral (DDPM posterior).

A denoiser maps (x_t, lambda (B,)) to a clean estimate x_hat. Sampling walks a grid of log-SNRs from the
schedule's noisy end lambda(1) up to lambda(0). `sample` returns the final clean estimate x_hat (decoder);
`sample_to_noisy` stops *at* lambda(0) and returns the noisy state there (the base model hands
z_0 ~ q(z_0 | z_clean) at lambda_z(0) to the decoder, design.md §1).
"""
from __future__ import annotations

from typing import Callable, Literal

import torch

from .noise import Generator, randn
from .process import _bcast, alpha_sigma, eps_from_x
from .schedules import LogSNRSchedule

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def logsnr_grid(schedule: LogSNRSchedule, steps: int, device=None) -> torch.Tensor:
    """steps + 1 log-SNRs, uniform in t from t = 1 (noisy) to t = 0 (clean): increasing."""
    t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64, device=device)
    return schedule.logsnr(t)


# DDIM: x_t = alpha_t x_hat + sigma_t eps_hat, with eps_hat implied by x_s and x_hat.
def ddim_step(x_s: torch.Tensor, x_hat: torch.Tensor, logsnr_s: torch.Tensor, logsnr_t: torch.Tensor) -> torch.Tensor:
    eps = eps_from_x(x_s, x_hat, logsnr_s)
    a_t, s_t = alpha_sigma(logsnr_t)
    return _bcast(a_t, x_s) * x_hat + _bcast(s_t, x_s) * eps


# Ancestral: x_t ~ q(x_t | x_s, x = x_hat), lambda_t > lambda_s (VDM eq. 28 with r = exp(lambda_s - lambda_t)).
def ancestral_step(x_s: torch.Tensor, x_hat: torch.Tensor, logsnr_s: torch.Tensor, logsnr_t: torch.Tensor,
                   noise: torch.Tensor) -> torch.Tensor:
    a_s, _ = alpha_sigma(logsnr_s)
    a_t, s_t = alpha_sigma(logsnr_t)
    r = torch.exp(logsnr_s - logsnr_t)  # SNR_s / SNR_t in (0, 1)
    mean = _bcast(r * a_t / a_s, x_s) * x_s + _bcast((1 - r) * a_t, x_s) * x_hat
    std = ((1 - r) * s_t**2).sqrt()
    return mean + _bcast(std, x_s) * noise


def _walk(denoise: Denoiser, x: torch.Tensor, grid: torch.Tensor, method: str,
          generator: Generator, clip: float | None, final_noisy: bool) -> torch.Tensor:
    b = x.shape[0]
    x_hat = x
    n = len(grid) - 1
    for i in range(n):
        ls = grid[i].expand(b).to(x.dtype) if x.dtype == torch.float64 else grid[i].float().expand(b)
        lt = grid[i + 1].expand(b).to(ls.dtype)
        x_hat = denoise(x, ls).to(x.dtype)
        if clip is not None:
            x_hat = x_hat.clamp(-clip, clip)
        if i == n - 1 and not final_noisy:
            break
        if method == "ddim":
            x = ddim_step(x, x_hat, ls, lt)
        else:
            noise = randn(x.shape, generator, x.device, x.dtype)
            x = ancestral_step(x, x_hat, ls, lt, noise)
    return x if final_noisy else x_hat


@torch.no_grad()
def sample(denoise: Denoiser, shape: tuple[int, ...], schedule: LogSNRSchedule, steps: int,
           method: Literal["ddim", "ancestral"] = "ddim", generator: Generator = None,
           device=None, dtype=torch.float32, clip: float | None = None) -> torch.Tensor:
    """Draw x_1 ~ N(0, I) and denoise over `steps` network calls; return the clean estimate x_hat.

    `clip`: clamp x_hat to [-clip, clip] at every step (1.0 for images in [-1, 1]).
    """
    x = randn(shape, generator, device, dtype)
    grid = logsnr_grid(schedule, steps, device)
    return _walk(denoise, x, grid, method, generator, clip, final_noisy=False)


@torch.no_grad()
def sample_to_noisy(denoise: Denoiser, shape: tuple[int, ...], schedule: LogSNRSchedule, steps: int,
                    method: Literal["ddim", "ancestral"] = "ancestral", generator: Generator = None,
                    device=None, dtype=torch.float32) -> torch.Tensor:
    """Draw z_1 ~ N(0, I) and step to lambda(0); return the noisy state z_0 there (not the estimate).

    With the ancestral sampler and an exact denoiser, z_0 ~ N(alpha_0 z, sigma_0^2) for z ~ data.
    """
    x = randn(shape, generator, device, dtype)
    grid = logsnr_grid(schedule, steps, device)
    return _walk(denoise, x, grid, method, generator, None, final_noisy=True)
