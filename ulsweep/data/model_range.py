"""From stored uint8 images to the model's input range and size."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ulsweep.data.manifest import DataError


def to_model_range(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 (N, C, image_size, image_size) in [-1, 1].

    Smaller images are zero-padded (centered, background value -1: black); larger ones are
    area-downsampled by an integer factor. Anything else is a DataError.
    """
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.ndim != 4:
        desc = (f"{images.dtype} {tuple(images.shape)}" if isinstance(images, torch.Tensor)
                else type(images).__name__)
        raise DataError(f"to_model_range: expected a uint8 tensor (N, C, H, W), got {desc}")
    if not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"to_model_range: image_size must be a positive integer (got {image_size!r})")
    x = images.float().div_(127.5).sub_(1.0)  # (N, C, H, W) in [-1, 1]
    H, W = x.shape[-2:]
    S = image_size
    if H == S and W == S:
        return x
    if H <= S and W <= S:
        top, left = (S - H) // 2, (S - W) // 2
        return F.pad(x, (left, S - W - left, top, S - H - top), value=-1.0)
    if H % S == 0 and W % S == 0 and H // S == W // S:
        return F.avg_pool2d(x, kernel_size=H // S)  # area downsampling
    raise DataError(f"to_model_range: cannot bring {H}x{W} images to {S}x{S}: pad needs both sides <= {S}, "
                    f"downsampling needs both to be the same integer multiple of {S}; re-import the data "
                    f"at that size (ulsweep data import folder ... --image-size {S})")
