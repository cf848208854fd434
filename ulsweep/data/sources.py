"""Batch sources: where a training loop's batches come from.

A source's `draw(batch_size, gen)` returns the next global batch (every rank draws the same one and trains
on its slice), with any randomness taken from the run's generator `gen`, whose state every checkpoint
saves: a resumed run continues with exactly the batches the uninterrupted run would have drawn.
"""
from __future__ import annotations

import torch

from ulsweep.config import DataConfig
from ulsweep.data.builtin import resolve_dataset
from ulsweep.data.manifest import DataError
from ulsweep.data.model_range import to_model_range
from ulsweep.data.reader import open_dataset


class DeviceSplit:
    """A whole split held on the training device; a batch is `batch_size` indices drawn uniformly with
    replacement. Small datasets (Fashion-MNIST at 32x32 is 245 MB as float32) live on the GPU, so a step
    needs no host-to-device copy and no data-loader process."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def draw(self, batch_size: int, gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(len(self.x), (batch_size,), generator=gen, device=self.x.device)
        return self.x[idx]


def load_device_images(data: DataConfig, device: torch.device,
                       eval_images: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(x_train (N, C, S, S), the first `eval_images` of the eval split (M, C, S, S), dataset hash); images in
    [-1, 1] on `device`. The split is read once per trial."""
    ds = open_dataset(resolve_dataset(data.path))
    for split in (data.train_split, data.eval_split):
        if split not in ds.splits:
            raise DataError(f"{data.path}: no split {split!r} (available: {', '.join(ds.splits)})")
    train_u8, _ = ds.load_split(data.train_split)
    eval_u8, _ = ds.load_split(data.eval_split, limit=eval_images)
    x_train = to_model_range(train_u8, data.image_size).to(device)
    x_eval = to_model_range(eval_u8, data.image_size).to(device)
    return x_train, x_eval, ds.content_hash
