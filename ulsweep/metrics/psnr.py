"""Peak signal-to-noise ratio."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # no torch at import: ulsweep.metrics binds `psnr` to this function eagerly (its __init__)
    import torch


# PSNR = 10 log10(R^2 / MSE), in dB, per image.
def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 255.0) -> torch.Tensor:
    """PSNR in dB per example (shape [B]) of images `x`, `y` on a scale spanning `data_range`.

    Reconstructions are compared on the 8-bit scale: pass uint8-valued tensors (0..255) and
    data_range=255. Identical images give +inf.
    """
    if x.shape != y.shape:
        raise ValueError(f"psnr: shapes differ: {tuple(x.shape)} vs {tuple(y.shape)}")
    mse = (x.double() - y.double()).pow(2).flatten(1).mean(1)
    return (data_range**2 / mse).log10() * 10.0
