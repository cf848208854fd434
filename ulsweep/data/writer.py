"""Writing a dataset: Parquet shards first, each atomically, then the manifest (`write_dataset`).

`build_manifest` / `publish_manifest` are shared with the folder importer (`ulsweep.data.folder`), whose
worker processes write the shards themselves (`ulsweep.data.shards`).
"""
from __future__ import annotations

import hashlib
import json
import sys
from typing import Any, Mapping

import numpy as np
import pyarrow as pa

from ulsweep import io as uio
from ulsweep.data.codec import CodecError, check_encoding
from ulsweep.data.manifest import (FORMAT, FORMAT_VERSION, MANIFEST, SPLIT_RE, DataError, content_hash,
                                   filesystem, where)
from ulsweep.data.reader import Dataset, open_dataset
from ulsweep.data.shards import shard_bytes

SHARD_BYTES = 64 * 2**20  # raw image bytes per shard (files are smaller: zstd-compressed)


def _check_split(uri: str, split: str, images: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    at = where(uri, split)
    if not isinstance(split, str) or not SPLIT_RE.match(split):
        raise DataError(f"{uri}: bad split name {split!r} (letters, digits, '_', '-', '.')")
    torch = sys.modules.get("torch")  # a tensor comes only from a process that imported torch: none is imported here
    if torch is not None and isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if torch is not None and isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8:
        raise DataError(f"{at}: images must be uint8, got {images.dtype}")
    if images.ndim != 4:
        raise DataError(f"{at}: images must be (N, C, H, W), got shape {images.shape}")
    if images.shape[0] == 0:
        raise DataError(f"{at}: split is empty")
    if labels.shape != (images.shape[0],):
        raise DataError(f"{at}: labels must have shape ({images.shape[0]},), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{at}: labels must be integers, got {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.min() < -1:
        raise DataError(f"{at}: labels must be >= -1 (-1 = unlabelled), got {int(labels.min())}")
    return np.ascontiguousarray(images), labels


def build_manifest(name: str, image_shape: tuple[int, int, int], splits: Mapping[str, list[dict]], *,
                   encoding: str = "raw", quality: int | None = None, label_names: list[str] | None = None,
                   source: dict | None = None) -> dict:
    """The manifest of shards already written: `splits` {split: [{file, num_rows, sha256}, ...]}.
    Raw datasets get no `encoding` key, so their manifests read exactly as before encodings existed."""
    shape = tuple(int(s) for s in image_shape)
    shas = {split: [sh["sha256"] for sh in shards] for split, shards in splits.items()}
    manifest: dict[str, Any] = {
        "format": FORMAT, "version": FORMAT_VERSION, "name": name,
        "image_shape": list(shape), "dtype": "uint8",
    }
    if encoding != "raw":
        manifest.update(encoding=encoding, quality=quality)
    manifest.update({
        "content_hash": content_hash(shape, shas, encoding, quality),
        "label_names": list(label_names) if label_names is not None else None,
        "splits": {split: {"num_images": sum(sh["num_rows"] for sh in shards), "shards": list(shards)}
                   for split, shards in splits.items()},
        "source": source or {},
        "writer": {"pyarrow": pa.__version__},
    })
    return manifest


def publish_manifest(fs, root: str, manifest: dict) -> None:
    """Write `dataset.json` atomically: the step that makes the directory a dataset."""
    uio.write_atomic(fs, uio.join(root, MANIFEST), (json.dumps(manifest, indent=1) + "\n").encode())


def write_dataset(uri: str, name: str, splits: Mapping[str, tuple[Any, Any]], shard_rows: int | None = None,
                  *, label_names: list[str] | None = None, source: dict | None = None,
                  overwrite: bool = False, encoding: str = "raw", quality: int | None = None) -> Dataset:
    """Write `splits` {split: (uint8 (N, C, H, W), int (N,))} as a dataset at `uri`; returns it opened.

    `encoding` is how each image is stored (`ulsweep.data.codec`: raw, png, or jpeg / webp with a
    `quality` of 1..100). Shards hold `shard_rows` images each (default: as many as fit in ~64 MiB of raw
    pixels). Files are written atomically, shards first and `dataset.json` last. Writing over an existing
    dataset needs `overwrite=True`; its manifest is removed first and shards it alone used are deleted afterwards.
    """
    if not isinstance(name, str) or not name:
        raise DataError(f"{uri}: dataset name must be a non-empty string (got {name!r})")
    if not splits:
        raise DataError(f"{uri}: no splits given")
    try:
        check_encoding(encoding, quality)
    except CodecError as e:
        raise DataError(f"{uri}: {e}") from e
    checked = {s: _check_split(uri, s, im, lab) for s, (im, lab) in splits.items()}
    shapes = {s: im.shape[1:] for s, (im, _) in checked.items()}
    shape = next(iter(shapes.values()))
    if any(sh != shape for sh in shapes.values()):
        raise DataError(f"{uri}: splits have different image shapes: {shapes}")
    D = int(np.prod(shape))
    if shard_rows is None:
        shard_rows = max(1, SHARD_BYTES // D)
    if not isinstance(shard_rows, int) or isinstance(shard_rows, bool) or shard_rows < 1:
        raise DataError(f"{uri}: shard_rows must be a positive integer (got {shard_rows!r})")

    fs, root = filesystem(uri)
    mroot = uio.join(root, MANIFEST)
    old_files: set[str] = set()
    if fs.exists(mroot):
        if not overwrite:
            raise DataError(f"{uio.join(uri, MANIFEST)}: a dataset already exists here (pass overwrite=True)")
        try:
            old = json.loads(fs.cat_file(mroot))
            old_files = {sh["file"] for info in old["splits"].values() for sh in info["shards"]}
        except Exception:  # an unreadable old manifest: nothing to clean up
            pass
        fs.rm(mroot)  # from here on the directory is not a valid dataset until the new manifest lands
    fs.makedirs(root, exist_ok=True)

    manifest_splits = {}
    for split, (images, labels) in checked.items():
        shards = []
        for k, start in enumerate(range(0, images.shape[0], shard_rows)):
            try:
                data = shard_bytes(images[start:start + shard_rows], labels[start:start + shard_rows],
                                   encoding, quality)
            except CodecError as e:
                raise DataError(f"{where(uri, split)}: {e}") from e
            rel = f"{split}/part-{k:05d}.parquet"
            uio.write_atomic(fs, uio.join(root, rel), data)
            shards.append({"file": rel, "num_rows": min(shard_rows, images.shape[0] - start),
                           "sha256": hashlib.sha256(data).hexdigest()})
        manifest_splits[split] = shards
    publish_manifest(fs, root, build_manifest(name, shape, manifest_splits, encoding=encoding, quality=quality,
                                              label_names=label_names, source=source))
    new_files = {sh["file"] for shards in manifest_splits.values() for sh in shards}
    for rel in sorted(old_files - new_files):
        try:
            fs.rm(uio.join(root, rel))
        except FileNotFoundError:
            pass
    return open_dataset(uri)
