"""Training data on the device: a whole split in model range, indexed by random batches.

Small datasets (Fashion-MNIST at 32x32 is 245 MB as float32) live on the GPU, so a step needs no
host-to-device copy and no data-loader process. The split is read once per trial.
"""
from __future__ import annotations

import torch

from ulsweep.config import DataConfig
from ulsweep.data import DataError, open_dataset, resolve_dataset, to_model_range


def load_images(data: DataConfig, device: torch.device, eval_images: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(x_train (N, C, S, S), x_eval (M, C, S, S), dataset hash); images in [-1, 1] on `device`."""
    ds = open_dataset(resolve_dataset(data.path))
    for split in (data.train_split, data.eval_split):
        if split not in ds.splits:
            raise DataError(f"{data.path}: no split {split!r} (available: {', '.join(ds.splits)})")
    train_u8, _ = ds.load_split(data.train_split)
    eval_u8, _ = ds.load_split(data.eval_split, limit=eval_images)
    x_train = to_model_range(train_u8, data.image_size).to(device)
    x_eval = to_model_range(eval_u8, data.image_size).to(device)
    return x_train, x_eval, ds.content_hash
