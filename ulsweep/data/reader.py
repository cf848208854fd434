"""Reading a dataset: `open_dataset` validates the manifest, `Dataset.load_split` reads and checks shards.

Every problem found while reading is a `DataError` naming the file or URI, the split and what is wrong, and
`load_split` returns nothing until all of the split's shards have been read and checked. torch is imported by
`load_split` alone: opening a dataset and naming its splits (a trial's MLflow dataset inputs) does without it.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ulsweep import io as uio
from ulsweep.data.codec import CodecError, decode_images
from ulsweep.data.manifest import MANIFEST, DataError, filesystem, parse_manifest, where

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Dataset:
    """An opened, validated dataset. Cheap: no shard is read until `load_split`."""

    uri: str
    manifest: dict

    @property
    def name(self) -> str:
        return self.manifest["name"]

    @property
    def image_shape(self) -> tuple[int, int, int]:  # (C, H, W)
        return self.manifest["image_shape"]

    @property
    def splits(self) -> dict[str, int]:
        return {s: info["num_images"] for s, info in self.manifest["splits"].items()}

    @property
    def content_hash(self) -> str:
        return self.manifest["content_hash"]

    @property
    def encoding(self) -> str:
        """How the `image` column stores each image (`ulsweep.data.codec`); datasets written before
        encodings existed hold raw pixels."""
        return self.manifest.get("encoding", "raw")

    @property
    def quality(self) -> int | None:
        """The quality setting of a lossy encoding (jpeg, webp; 1..100), else None."""
        return self.manifest.get("quality")

    @property
    def label_names(self) -> list[str] | None:
        return self.manifest.get("label_names")

    @property
    def source(self) -> dict:
        """Free-form provenance written by importers/builders (may be empty)."""
        return self.manifest.get("source") or {}

    def shard_uris(self, split: str) -> list[str]:
        return [uio.join(self.uri, sh["file"]) for sh in self._split_info(split)["shards"]]

    def _split_info(self, split: str) -> dict:
        info = self.manifest["splits"].get(split)
        if info is None:
            raise DataError(f"{uio.join(self.uri, MANIFEST)}: unknown split {split!r}; "
                            f"available: {', '.join(sorted(self.manifest['splits']))}")
        return info

    def load_split(self, split: str, limit: int | None = None,
                   verify: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `limit` (default: all) images of `split` as uint8 (N, C, H, W) and int64 labels (N,).

        `verify` checks each shard's SHA-256 against the manifest. Only the shards needed for `limit`
        are read. Encoded images (png, jpeg, webp) are decoded here, one core. Raises DataError (naming
        the shard, and the row for an image that does not decode) for any corrupt, mismatched or malformed
        shard.
        """
        info = self._split_info(split)
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise DataError(f"{self.uri}: split {split!r}: limit must be a positive integer (got {limit!r})")
        n = info["num_images"] if limit is None else min(limit, info["num_images"])
        images = np.empty((n, *self.image_shape), dtype=np.uint8)  # (N, C, H, W)
        labels = np.empty((n,), dtype=np.int64)
        done = 0
        for img, lab in self.iter_split(split, limit=n, verify=verify):
            images[done:done + len(img)] = img
            labels[done:done + len(img)] = lab
            done += len(img)
        import torch

        return torch.from_numpy(images), torch.from_numpy(labels)

    def iter_split(self, split: str, limit: int | None = None,
                   verify: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The images of `split` shard by shard, in order: (uint8 (n, C, H, W), int64 (n,)) per shard, up to
        `limit` images in all; one shard in memory at a time. Checks and errors as `load_split`."""
        info = self._split_info(split)
        n = info["num_images"] if limit is None else min(limit, info["num_images"])
        fs, root = filesystem(self.uri)
        done = 0
        for sh in info["shards"]:
            if done >= n:
                break
            uri = uio.join(self.uri, sh["file"])
            try:
                data = fs.cat_file(uio.join(root, sh["file"]))
            except FileNotFoundError as e:
                raise DataError(f"{where(uri, split)}: shard file is missing") from e
            except OSError as e:
                raise DataError(f"{where(uri, split)}: cannot read ({type(e).__name__}: {e})") from e
            if verify:
                got = hashlib.sha256(data).hexdigest()
                if got != sh["sha256"]:
                    raise DataError(f"{where(uri, split)}: SHA-256 mismatch: manifest says "
                                    f"{sh['sha256']}, file has {got} (corrupt or modified shard)")
            take = min(sh["num_rows"], n - done)
            yield _decode_shard(data, uri, split, self.image_shape, sh["num_rows"], take, self.encoding)
            done += take

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, uri={self.uri!r}, image_shape={self.image_shape}, "
                f"splits={self.splits}, content_hash={self.content_hash[:12]}...)")


def _decode_shard(data: bytes, uri: str, split: str, shape: tuple[int, int, int], num_rows: int,
                  take: int, encoding: str = "raw") -> tuple[np.ndarray, np.ndarray]:
    """Parse one Parquet shard held in memory; returns (take, C, H, W) uint8 and (take,) int64."""
    at = where(uri, split)
    try:
        table = pq.read_table(pa.BufferReader(data), columns=None)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{at}: not a readable Parquet file ({type(e).__name__}: {e})") from e
    schema = table.schema
    for col, ok, want in (("image", _is_binary, "binary"), ("label", pa.types.is_integer, "integer")):
        if col not in schema.names:
            raise DataError(f"{at}: column {col!r} is missing (columns: {', '.join(schema.names)})")
        if not ok(schema.field(col).type):
            raise DataError(f"{at}: column {col!r} has type {schema.field(col).type}, expected {want}")
    if table.num_rows != num_rows:
        raise DataError(f"{at}: file has {table.num_rows} rows, manifest says {num_rows}")
    table = table.slice(0, take)
    image = table.column("image").combine_chunks()
    label = table.column("label").combine_chunks()
    for col, arr in (("image", image), ("label", label)):
        if arr.null_count:
            row = int(np.flatnonzero(~np.asarray(arr.is_valid()))[0])
            raise DataError(f"{at}: column {col!r} has {arr.null_count} null value(s), first at row {row}")
    labels = label.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    if labels.size and labels.min() < -1:
        r = int(np.argmin(labels))
        raise DataError(f"{at}: column 'label' row {r} is {int(labels[r])}; labels must be >= -1")
    if encoding != "raw":
        try:
            return decode_images(image.to_pylist(), encoding, shape), labels
        except CodecError as e:  # its message starts "row i: ..." (i counts from the shard's first row)
            raise DataError(f"{at}: column 'image' {e}") from e
    return _raw_pixels(image, at, shape, take), labels


def _raw_pixels(image: pa.Array, at: str, shape: tuple[int, int, int], take: int) -> np.ndarray:
    """The (take, C, H, W) uint8 view of a raw `image` column (no copy, no per-row Python work)."""
    C, H, W = shape
    D = C * H * W
    if pa.types.is_fixed_size_binary(image.type):
        if image.type.byte_width != D:
            raise DataError(f"{at}: column 'image' holds {image.type.byte_width} bytes per row, "
                            f"expected C*H*W = {C}*{H}*{W} = {D}")
        buf = np.frombuffer(image.buffers()[1], np.uint8)
        start = image.offset * D
        pixels = buf[start:start + take * D]
    else:
        otype = np.int64 if pa.types.is_large_binary(image.type) else np.int32
        offsets = np.frombuffer(image.buffers()[1], otype)[image.offset:image.offset + take + 1]
        lengths = np.diff(offsets)
        bad = np.flatnonzero(lengths != D)
        if bad.size:
            r = int(bad[0])
            raise DataError(f"{at}: column 'image' row {r} holds {int(lengths[r])} bytes, expected "
                            f"C*H*W = {C}*{H}*{W} = {D} ({bad.size} bad row(s); mixed image sizes?)")
        pixels = np.frombuffer(image.buffers()[2], np.uint8)[offsets[0]:offsets[0] + take * D]
    return pixels.reshape(take, C, H, W)


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)


def open_dataset(uri: str) -> Dataset:
    """Open and validate the dataset at `uri` (a `builtin:NAME` spec is materialised first)."""
    if uri.startswith("builtin:"):
        from ulsweep.data.builtin import resolve_dataset
        uri = resolve_dataset(uri)
    fs, root = filesystem(uri)
    mpath = uio.join(uri, MANIFEST)
    try:
        text = fs.cat_file(uio.join(root, MANIFEST))
    except FileNotFoundError as e:
        try:
            hint = " (directory does not exist)" if not fs.exists(root) else " (not a dataset, or still being written)"
        except Exception:  # e.g. no permission to list: no hint
            hint = ""
        raise DataError(f"{mpath}: dataset manifest is missing{hint}") from e
    except IsADirectoryError as e:
        raise DataError(f"{mpath}: is a directory, expected the dataset manifest file") from e
    except OSError as e:
        raise DataError(f"{mpath}: cannot read the manifest ({type(e).__name__}: {e})") from e
    return Dataset(uri=uri.rstrip("/") or uri, manifest=parse_manifest(mpath, text))
