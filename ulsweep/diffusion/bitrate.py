"""Latent bitrate: the Eq. 3 bound evaluated on held-out images, in bits per image pixel."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .losses import prior_loss
from .noise import Generator, rand, randn
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
                   batch_size: int = 256, generator: Generator = None) -> BitrateEstimate:
    """Estimate E_x E_t[L_z(x, t)] of Eq. 3 over `images` (model range, (N, C, H, W)).

    `encode(x) -> z_clean`; `predict_v(z_t, logsnr) -> v` is the prior (or a base model trained with the
    unweighted ELBO on the same latents). Each image gets `t_per_image` stratified noise levels; the
    per-image means give the standard error. `schedule` runs from lambda_z(0) to lambda_z(1).
    """
    return latent_bitrates(encode, predict_v, images, schedule, t_per_image, batch_size, generator)[0]


@torch.no_grad()
def latent_bitrates(encode: Callable[[torch.Tensor], torch.Tensor],
                    predict_v: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                    images: torch.Tensor, schedule: LogSNRSchedule, t_per_image: int = 4,
                    batch_size: int = 256, generator: Generator = None, members: int = 1) -> list[BitrateEstimate]:
    """`latent_bitrate` of each of the `members` runs of a stacked program (ulsweep/models/stacked.py) at once:
    `encode` and `predict_v` take every batch of `images` once per member, member-major ((K*B, ...)), and with
    MemberGenerators each member draws its times and noise from its own generator, as it would alone."""
    n, _, h, w = images.shape
    per_image = []
    k = t_per_image
    for i in range(0, n, batch_size):
        x = images[i:i + batch_size]
        z = encode(x.repeat(members, 1, 1, 1) if members > 1 else x).float()
        b = z.shape[0]
        zk = z.repeat_interleave(k, 0)  # (b*k, c, h', w'): still member-major
        # stratified t per image: (u + j/k) mod 1 with u ~ U(0,1) per image
        u = rand((b, 1), generator, z.device)
        t = torch.remainder(u + torch.arange(k, device=z.device) / k, 1.0).reshape(-1)
        lam, dlam = schedule.logsnr(t), schedule.dlogsnr_dt(t)
        eps = randn(zk.shape, generator, z.device)
        z_t = diffuse(zk, lam, eps)
        z_hat = x_from_v(z_t, predict_v(z_t, lam).float(), lam)
        nats = prior_loss(zk, z_hat, lam, dlam, schedule.logsnr_1).reshape(b, k).mean(1)
        per_image.append(nats.double().cpu().reshape(members, -1))
    return [_estimate(nats, h, w, k) for nats in torch.cat(per_image, 1)]


def _estimate(nats: torch.Tensor, h: int, w: int, t_per_image: int) -> BitrateEstimate:
    """Mean bits/pixel and its standard error over the per-image nats (N,)."""
    bpp = nats_to_bits_per_pixel(nats, h, w)
    se = bpp.std().item() / math.sqrt(len(bpp)) if len(bpp) > 1 else float("nan")
    return BitrateEstimate(bpp.mean().item(), se, nats.mean().item(), len(nats), t_per_image)
