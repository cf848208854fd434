"""The networks of Unified Latents: encoder, latent prior, decoder (stage 1) and base model (stage 2).

All denoisers return the v-prediction; the diffusion code turns it into x_hat = alpha*x_t - sigma*v.
Sizes come from the preset tables in `presets.py`.
"""
from __future__ import annotations

from typing import Callable

from torch import Tensor, nn

from ulsweep.config import AEStageConfig, BaseStageConfig
from ulsweep.models.encoder import Encoder
from ulsweep.models.presets import AE_PRESETS, BASE_PRESETS, AEPreset, BasePreset
from ulsweep.models.uvit import DecoderUViT
from ulsweep.models.vit import BaseViT, PriorViT

__all__ = ["Encoder", "PriorViT", "DecoderUViT", "BaseViT", "AE_PRESETS", "BASE_PRESETS", "AEPreset",
           "BasePreset", "UnifiedAutoencoder", "build_autoencoder", "build_base_model", "num_params"]

# noisify(z_clean) -> (z_t, logsnr_z, z0, x_t, logsnr_x); z_t and logsnr_z may be None without a prior.
Noisify = Callable[[Tensor], tuple]


class UnifiedAutoencoder(nn.Module):
    """Stage-1 model: encoder E, diffusion prior (None for the `normal` prior) and diffusion decoder.

    The parts can be called directly (`ae.encoder(x)`, `ae.prior(z_t, lam)`, `ae.decoder(x_t, lam, z0)`).
    `forward` runs all three in one call, which is what DistributedDataParallel needs (one forward per
    backward); the noising, i.e. the math, stays with the caller in `noisify`.
    """

    def __init__(self, encoder: Encoder, prior: PriorViT | None, decoder: DecoderUViT):
        super().__init__()
        self.encoder, self.prior, self.decoder = encoder, prior, decoder

    def forward(self, x: Tensor, noisify: Noisify) -> tuple[Tensor, Tensor | None, Tensor]:
        """x (B, C, H, W) -> (z_clean (B, c, h, w), v_z (B, c, h, w) or None, v_x (B, C, H, W))."""
        z_clean = self.encoder(x)
        z_t, logsnr_z, z0, x_t, logsnr_x = noisify(z_clean)
        v_z = self.prior(z_t, logsnr_z) if self.prior is not None and z_t is not None else None
        return z_clean, v_z, self.decoder(x_t, logsnr_x, z0)


def build_autoencoder(cfg: AEStageConfig, image_channels: int) -> UnifiedAutoencoder:
    m, preset = cfg.model, AE_PRESETS[cfg.model.preset]
    encoder = Encoder(image_channels, m.latent_channels, m.downsample, preset)
    prior = None if cfg.loss.prior == "normal" else PriorViT(m.latent_channels, preset)
    decoder = DecoderUViT(image_channels, m.latent_channels, m.downsample, preset)
    return UnifiedAutoencoder(encoder, prior, decoder)


def build_base_model(cfg: BaseStageConfig, latent_channels: int) -> BaseViT:
    return BaseViT(latent_channels, BASE_PRESETS[cfg.model.preset])


def num_params(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())
