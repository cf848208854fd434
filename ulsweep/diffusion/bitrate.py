"""Latent bitrate: the Eq. 3 bound evaluated on held-out images, in bits per image pixel."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .losses import prior_loss
from .process import diffuse, x_from_v
from .schedules import LogSNRSchedule


# bits/pixel = nats / ln 2 / (H * W), pixels of the image (not channels, not latent positions).
def nats_to_bits_per_pixel(nats: torch.Tensor | float, height: int, width: int):
    return nats / (math.log(2.0) * height * width)


@dataclass(frozen=True)
class BitrateEstimate:
    bpp: float  # mean latent bits per image pixel
    bpp_se: float  # standard error of that mean over images
    nats_per_image: float
    num_images: int
    t_per_image: int


@torch.no_grad()
def latent_bitrate(encode: Callable[[torch.Tensor], torch.Tensor],
                   predict_v: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                   images: torch.Tensor, schedule: LogSNRSchedule, t_per_image: int = 4,
                   batch_size: int = 256, generator: torch.Generator | None = None) -> BitrateEstimate:
    """Estimate E_x E_t[L_z(x, t)] of Eq. 3 over `images` (model range, (N, C, H, W)).

    `encode(x) -> z_clean`; `predict_v(z_t, logsnr) -> v` is the prior (or a base model trained with the
    unweighted ELBO on the same latents). Each image gets `t_per_image` stratified noise levels; the
    per-image means give the standard error. `schedule` runs from lambda_z(0) to lambda_z(1).
    """
    n, _, h, w = images.shape
    per_image = []
    k = t_per_image
    for i in range(0, n, batch_size):
        x = images[i:i + batch_size]
        z = encode(x).float()
        b = z.shape[0]
        zk = z.repeat_interleave(k, 0)  # (b*k, c, h', w')
        # stratified t per image: (u + j/k) mod 1 with u ~ U(0,1) per image
        u = torch.rand(b, 1, generator=generator, device=z.device)
        t = torch.remainder(u + torch.arange(k, device=z.device) / k, 1.0).reshape(-1)
        lam, dlam = schedule.logsnr(t), schedule.dlogsnr_dt(t)
        eps = torch.randn(zk.shape, generator=generator, device=z.device)
        z_t = diffuse(zk, lam, eps)
        z_hat = x_from_v(z_t, predict_v(z_t, lam).float(), lam)
        nats = prior_loss(zk, z_hat, lam, dlam, schedule.logsnr_1).reshape(b, k).mean(1)
        per_image.append(nats.double().cpu())
    nats = torch.cat(per_image)
    bpp = nats_to_bits_per_pixel(nats, h, w)
    se = bpp.std().item() / math.sqrt(len(bpp)) if len(bpp) > 1 else float("nan")
    return BitrateEstimate(bpp.mean().item(), se, nats.mean().item(), n, k)
