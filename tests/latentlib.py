"""Small pieces the latent-cache tests share (tests/test_latents.py, tests/test_tracking.py)."""
import threading

import numpy as np
import torch

from ulsweep.config import DataConfig
from ulsweep.data.parquet import write_dataset


def tiny_data(root, n=40) -> tuple:
    """A raw 1x8x8 dataset of n random images, its DataConfig and the opened dataset."""
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (n, 1, 8, 8), dtype=np.uint8)
    ds = write_dataset(str(root), "tiny", {"train": (img, np.zeros(n, np.int64)),
                                           "test": (img[:4], np.zeros(4, np.int64))}, shard_rows=16)
    return DataConfig(path=str(root), image_size=8), ds


class SlowEncoder(torch.nn.Module):
    """A fixed 2-channel conv that sleeps in every call, so that a second trial arrives while it encodes."""

    def __init__(self, sleep_s=0.3):
        super().__init__()
        torch.manual_seed(0)
        self.conv, self.sleep_s, self.calls = torch.nn.Conv2d(1, 2, 2, stride=2), sleep_s, 0

    def forward(self, x):
        self.calls += 1
        threading.Event().wait(self.sleep_s)
        return self.conv(x)
