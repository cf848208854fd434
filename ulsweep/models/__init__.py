"""The networks of Unified Latents: encoder, latent prior, decoder (stage 1) and base model (stage 2).

All denoisers return the v-prediction; the diffusion code turns it into x_hat = alpha*x_t - sigma*v.
Sizes come from the preset tables in `presets.py`; `ulsweep.train.build` makes them from a config.
"""
from __future__ import annotations

from torch import nn

from ulsweep.models.encoder import Encoder
from ulsweep.models.presets import AE_PRESETS, BASE_PRESETS, AEPreset, BasePreset
from ulsweep.models.uvit import DecoderUViT
from ulsweep.models.vit import BaseViT, PriorViT

__all__ = ["Encoder", "PriorViT", "DecoderUViT", "BaseViT", "AE_PRESETS", "BASE_PRESETS", "AEPreset",
           "BasePreset", "UnifiedAutoencoder", "num_params"]


class UnifiedAutoencoder(nn.Module):
    """Stage-1 networks: encoder E, diffusion prior (None for the `normal` prior) and diffusion decoder, called
    as `ae.encoder(x)`, `ae.prior(z_t, lam)`, `ae.decoder(x_t, lam, z0)`. The stage-1 objective
    (ulsweep/train/stage1.py) runs them and the noising between them in one forward."""

    def __init__(self, encoder: Encoder, prior: PriorViT | None, decoder: DecoderUViT):
        super().__init__()
        self.encoder, self.prior, self.decoder = encoder, prior, decoder


def num_params(module: nn.Module | None) -> int:
    return 0 if module is None else sum(p.numel() for p in module.parameters())
