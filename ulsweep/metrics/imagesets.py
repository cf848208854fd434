"""Image sets for `ulsweep fid A B`: a local folder of PNG / JPEG images (all one size) or a split of a ulsweep
dataset (`URI:split`, e.g. `builtin:digits:test`), as uint8 (N, C, H, W); and the Fréchet distance between two
sets through one feature extractor."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .features import FeatureExtractor
from .fid import FeatureStats, fd_between, feature_stats

IMAGE_EXTS = (".png", ".jpg", ".jpeg")


class ImageSetError(ValueError):
    """An image set cannot be read; the message names the folder or file."""


def _load_folder(folder: str, limit: int | None) -> Tensor:
    from PIL import Image

    names = sorted(n for n in os.listdir(folder)
                   if n.lower().endswith(IMAGE_EXTS) and os.path.isfile(os.path.join(folder, n)))
    if not names:
        raise ImageSetError(f"{folder}: no PNG/JPEG images ({', '.join(IMAGE_EXTS)}) in this folder")
    if limit is not None:
        names = names[:limit]
    arrays, first = [], None
    for n in names:
        path = os.path.join(folder, n)
        try:
            with Image.open(path) as im:
                im = im.convert("L" if im.mode in ("1", "L", "LA") else "RGB")
                a = np.asarray(im, dtype=np.uint8)
        except (OSError, ValueError) as e:
            raise ImageSetError(f"{path}: cannot read this image ({type(e).__name__}: {e})") from e
        a = a[..., None] if a.ndim == 2 else a
        if first is None:
            first = (path, a.shape[:2])
        elif a.shape[:2] != first[1]:
            raise ImageSetError(f"{path}: {a.shape[1]}x{a.shape[0]} pixels, but {first[0]} is "
                                f"{first[1][1]}x{first[1][0]}: all images of a set must have one size")
        arrays.append(a)
    if len({a.shape[2] for a in arrays}) > 1:  # gray and colour mixed: gray repeated to RGB
        arrays = [np.repeat(a, 3, axis=2) if a.shape[2] == 1 else a for a in arrays]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def load_image_set(spec: str, limit: int | None = None) -> Tensor:
    """`spec`: a local folder of PNG/JPEG images (file-name order, not recursive) or `DATASET:SPLIT`
    (a dataset path / fsspec URI / builtin:NAME, then the split). The first `limit` images (default all)."""
    if os.path.isdir(spec):
        return _load_folder(spec, limit)
    uri, sep, split = spec.rpartition(":")
    if not sep or not uri or not split or uri in ("builtin", "s3", "gs", "file", "memory") or "/" in split:
        if os.path.exists(spec):
            raise ImageSetError(f"{spec}: not a folder (an image set is a folder of PNG/JPEG images or "
                                f"DATASET:SPLIT)")
        raise ImageSetError(f"{spec}: no such folder, and not DATASET:SPLIT (e.g. builtin:digits:test)")
    from ulsweep.data import open_dataset

    x, _ = open_dataset(uri).load_split(split, limit=limit)
    if len(x) == 0:
        raise ImageSetError(f"{spec}: split {split!r} has no images")
    return x


@dataclass(frozen=True)
class SetsFD:
    value: float
    stats_a: FeatureStats
    stats_b: FeatureStats


def fd_between_sets(extractor: FeatureExtractor, a: Tensor, b: Tensor, batch_size: int = 50,
                    names: tuple[str, str] = ("A", "B")) -> SetsFD:
    """Fréchet distance between the features of image sets `a` and `b` (uint8 (N, C, H, W) each)."""
    stats = []
    for x, name in zip((a, b), names):
        if len(x) < 2:
            raise ImageSetError(f"{name}: {len(x)} image(s); a Fréchet distance needs at least 2 per set")
        stats.append(feature_stats(extractor, (x[i:i + batch_size] for i in range(0, len(x), batch_size))))
    return SetsFD(fd_between(stats[0], stats[1]), stats[0], stats[1])
