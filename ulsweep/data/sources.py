"""Batch sources: where a training loop's batches come from.

A source's `draw(batch_size, gen)` returns the next batch, with any randomness taken from the run's generator
`gen`, whose state every checkpoint saves. `DeviceSplit` returns the global batch (every rank draws the same
one and trains on its slice); `ulsweep.data.stream.StreamSource` returns this rank's part (`local_batches`)
and checkpoints its position (`state_dict`). Either way a resumed run continues with exactly the batches the
uninterrupted run would have drawn.

`train_source` picks the loader (`data.loader`) and builds the source of stage 1's training split.
"""
from __future__ import annotations

import os

import torch

from ulsweep.config import DataConfig
from ulsweep.data.builtin import resolve_dataset
from ulsweep.data.manifest import DataError
from ulsweep.data.model_range import to_model_range
from ulsweep.data.reader import Dataset, open_dataset
from ulsweep.data.stream import (SMALL_SPLIT_BYTES, StreamSource, decoded_bytes, flip_where, image_dataset,
                                 local_dataset)

DEVICE_BUDGET_FRACTION = 0.5  # auto's default budget: this fraction of the training device's free memory


class DeviceSplit:
    """A whole split held on the training device; a batch is `batch_size` indices drawn uniformly with
    replacement (then, with `hflip`, a left-right flip per image with probability 1/2). Small datasets
    (Fashion-MNIST at 32x32 is 245 MB as float32) live on the GPU, so a step needs no host-to-device copy and
    no data-loader process."""

    def __init__(self, x: torch.Tensor, hflip: bool = False):
        self.x, self.hflip = x, hflip

    def __len__(self) -> int:
        return len(self.x)

    def draw(self, batch_size: int, gen: torch.Generator) -> torch.Tensor:
        idx = torch.randint(len(self.x), (batch_size,), generator=gen, device=self.x.device)
        x = self.x[idx]
        if self.hflip:
            x = flip_where(x, torch.rand(batch_size, generator=gen, device=gen.device) < 0.5)
        return x


def open_splits(data: DataConfig) -> Dataset:
    """The dataset of `data.path`, checked to hold the training and evaluation splits."""
    ds = open_dataset(resolve_dataset(data.path))
    for split in (data.train_split, data.eval_split):
        if split not in ds.splits:
            raise DataError(f"{data.path}: no split {split!r} (available: {', '.join(ds.splits)})")
    return ds


def load_eval_images(ds: Dataset, data: DataConfig, device: torch.device, eval_images: int) -> torch.Tensor:
    """The first `eval_images` images of the eval split in [-1, 1], float32 (M, C, S, S), on `device`."""
    eval_u8, _ = ds.load_split(data.eval_split, limit=eval_images)
    return to_model_range(eval_u8, data.image_size).to(device)


def split_bytes(data: DataConfig, ds: Dataset) -> int:
    """Bytes of the training split decoded to float32 at `data.image_size` (what the device path holds)."""
    return decoded_bytes(ds.splits[data.train_split], ds.image_shape[0], data.image_size)


def may_stream(data: DataConfig, ds: Dataset) -> bool:
    """Whether `choose_loader` can pick the stream for this split on any device (the Ray Train side hands a
    dataset to the trainer only then)."""
    return data.loader == "stream" or (data.loader == "auto" and split_bytes(data, ds) > SMALL_SPLIT_BYTES)


def trainer_datasets(data: DataConfig, batch_size: int, world: int):
    """({"train": pipeline}, Ray Data ExecutionOptions) for a stage-1 trainer of `world` ranks whose training
    split may stream, else (None, None): small splits and `data.loader: device` cost the trainer nothing."""
    ds = open_splits(data)
    if not may_stream(data, ds):
        return None, None
    pipe, opts = image_dataset(ds, data.train_split, max(1, batch_size // world))
    return {"train": pipe}, opts


def free_device_bytes(device: torch.device) -> int:
    """Free memory of the training device: the GPU's (cudaMemGetInfo), or the host's MemAvailable."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def choose_loader(data: DataConfig, ds: Dataset, device: torch.device) -> tuple[str, str]:
    """(`device` or `stream`, why) for `data.loader` on `device`: the training split's images."""
    return choose_loader_for(data, split_bytes(data, ds), device, "split")


def choose_loader_for(data: DataConfig, need: int, device: torch.device, what: str) -> tuple[str, str]:
    """(`device` or `stream`, why) for a training set of `need` bytes on the device (`what`: its name)."""
    gb = f"{need / 1e9:.3g} GB"
    if data.loader != "auto":
        return data.loader, f"set in the config ({what} {gb} as float32)"
    if data.device_budget_gb is not None:
        budget, whose = data.device_budget_gb * 1e9, "data.device_budget_gb"
    else:
        budget = DEVICE_BUDGET_FRACTION * free_device_bytes(device)
        whose = f"{DEVICE_BUDGET_FRACTION:g} x free {device.type} memory"
    if need <= SMALL_SPLIT_BYTES:
        return "device", (f"{what} {gb} as float32, under the {SMALL_SPLIT_BYTES / 1e9:.3g} GB below which auto "
                          "never streams")
    verdict = "device" if need <= budget else "stream"
    return verdict, (f"{what} {gb} as float32 {'<=' if verdict == 'device' else '>'} budget {budget / 1e9:.2f} GB "
                     f"({whose})")


def train_source(data: DataConfig, rt, seed: int, eval_images: int, batch_size: int, shard=None,
                 label: str = ""):
    """(batch source of the training split, eval images (M, C, S, S) on the device, dataset hash, image
    shape (C, S, S)) for stage 1. `shard` is this rank's Ray Train dataset shard, if the trainer got one;
    without it a stream is built in this process (one worker only). Prints the loader it picked (rank 0)."""
    ds = open_splits(data)
    C = ds.image_shape[0]
    _check_size(data, ds)
    loader, why = choose_loader(data, ds, rt.device)
    if rt.is_main:
        print(f"[{label}] data.loader {data.loader} -> {loader}: {why}", flush=True)
    x_eval = load_eval_images(ds, data, rt.device, eval_images)
    if loader == "device":
        train_u8, _ = ds.load_split(data.train_split)
        return (DeviceSplit(to_model_range(train_u8, data.image_size).to(rt.device), data.hflip), x_eval,
                ds.content_hash, (C, data.image_size, data.image_size))
    if shard is None:
        if rt.world > 1:
            raise DataError(f"{data.path}: data.loader stream with {rt.world} workers needs the dataset handed to "
                            "the Ray Train trainer (ulsweep.sweep.trial.make_trainer)")
        shard = local_dataset(ds, data.train_split, batch_size // rt.world)
    size = data.image_size
    source = StreamSource(shard, ds.splits[data.train_split], rt, seed,
                          lambda b: to_model_range(b["image"], size), hflip=data.hflip,
                          label=f"{ds.uri} (split {data.train_split!r})")
    return source, x_eval, ds.content_hash, (C, size, size)


def _check_size(data: DataConfig, ds: Dataset) -> None:
    """A dataset whose images cannot be brought to data.image_size fails before any training."""
    _, H, W = ds.image_shape
    S = data.image_size
    if (H <= S and W <= S) or (H % S == 0 and W % S == 0 and H // S == W // S):
        return
    raise DataError(f"{ds.uri}: images are {H}x{W}, data.image_size is {S}: cannot pad or area-downsample "
                    f"them to {S}x{S} (set data.image_size to a size they pad to or divide by an integer)")


__all__ = ["DeviceSplit", "StreamSource", "train_source", "load_eval_images", "choose_loader", "choose_loader_for",
           "may_stream", "open_splits"]
