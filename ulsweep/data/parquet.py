"""The on-disk dataset format: a directory of Parquet shards plus a `dataset.json` manifest.

    <uri>/dataset.json                   manifest (written last; a directory without it is not a dataset)
    <uri>/<split>/part-00000.parquet     columns: image (binary, raw uint8 C*H*W row-major), label (int64, -1 = none)

`<uri>` is a local path or any fsspec URI (memory://, file://, s3://, gs://, ...). The manifest records the
image shape, and per split the number of images and each shard's file name, row count and SHA-256 (of the
file bytes). The dataset content hash is the SHA-256 of the image shape plus the sorted "split:shard-sha256"
list, so it changes when any pixel, label or split assignment changes.

Every problem found while reading is a `DataError` naming the file or URI, the split and what is wrong, and
`load_split` returns nothing until all of the split's shards have been read and checked.
"""
from __future__ import annotations

import hashlib
import io
import json
import re
from dataclasses import dataclass
from typing import Any, Mapping

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F

from ulsweep.io import write_atomic

MANIFEST = "dataset.json"
FORMAT = "ulsweep-dataset"
FORMAT_VERSION = 1
SHARD_BYTES = 64 * 2**20  # raw image bytes per shard (files are smaller: zstd-compressed)
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_HEX64_RE = re.compile(r"^[0-9a-f]{64}$")


class DataError(ValueError):
    """A dataset problem; the message names the file or URI, the split and what is wrong."""


def _where(path: str, split: str | None = None) -> str:
    return f"{path} (split {split!r})" if split is not None else path


# ----------------------------------------------------------------------------------------------
# Filesystem helpers


def _join(uri: str, *parts: str) -> str:
    return "/".join([uri.rstrip("/"), *parts])


def _fs(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    try:
        fs, root = fsspec.core.url_to_fs(uri)
    except (ImportError, ValueError) as e:  # unknown protocol / missing s3fs, gcsfs, ...
        raise DataError(f"{uri}: cannot open filesystem: {e}") from e
    return fs, root.rstrip("/") or "/"


# ----------------------------------------------------------------------------------------------
# Manifest


def content_hash(image_shape: tuple[int, int, int], shards: Mapping[str, list[str]]) -> str:
    """SHA-256 over the image shape and the sorted "split:shard_sha256" strings (hex)."""
    entries = sorted(f"{split}:{sha}" for split, shas in shards.items() for sha in shas)
    payload = json.dumps({"image_shape": list(image_shape), "dtype": "uint8", "shards": entries},
                         sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def _manifest_error(path: str, key: str, value: Any, what: str) -> DataError:
    return DataError(f"{path}: key {key!r}: {what} (got {value!r})")


def _parse_manifest(path: str, text: bytes) -> dict:
    """Validate a manifest; returns it with `image_shape` as a tuple. Errors name the file and the key."""
    try:
        m = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(m, dict):
        raise _manifest_error(path, "<root>", type(m).__name__, "expected a JSON object")
    if m.get("format") != FORMAT:
        raise _manifest_error(path, "format", m.get("format"), f"expected {FORMAT!r}")
    if m.get("version") != FORMAT_VERSION:
        raise _manifest_error(path, "version", m.get("version"),
                              f"this ulsweep reads version {FORMAT_VERSION}")
    if not isinstance(m.get("name"), str) or not m["name"]:
        raise _manifest_error(path, "name", m.get("name"), "expected a non-empty string")
    shape = m.get("image_shape")
    if (not isinstance(shape, list) or len(shape) != 3
            or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in shape)):
        raise _manifest_error(path, "image_shape", shape, "expected [C, H, W] of positive integers")
    m["image_shape"] = tuple(shape)
    if m.get("dtype") != "uint8":
        raise _manifest_error(path, "dtype", m.get("dtype"), "only 'uint8' is supported")
    splits = m.get("splits")
    if not isinstance(splits, dict) or not splits:
        raise _manifest_error(path, "splits", splits, "expected a non-empty mapping of split -> info")
    shas: dict[str, list[str]] = {}
    for split, info in splits.items():
        k = f"splits.{split}"
        if not _SPLIT_RE.match(split):
            raise _manifest_error(path, k, split, "bad split name")
        if not isinstance(info, dict):
            raise _manifest_error(path, k, info, "expected a mapping")
        n = info.get("num_images")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise _manifest_error(path, f"{k}.num_images", n, "expected a non-negative integer")
        if n == 0:
            raise _manifest_error(path, f"{k}.num_images", n, "split is empty")
        shards = info.get("shards")
        if not isinstance(shards, list) or not shards:
            raise _manifest_error(path, f"{k}.shards", shards, "expected a non-empty list")
        total = 0
        for i, sh in enumerate(shards):
            ks = f"{k}.shards[{i}]"
            if not isinstance(sh, dict):
                raise _manifest_error(path, ks, sh, "expected a mapping")
            f = sh.get("file")
            if (not isinstance(f, str) or not f.endswith(".parquet") or f.startswith("/")
                    or ".." in f.split("/") or "://" in f):
                raise _manifest_error(path, f"{ks}.file", f, "expected a relative path to a .parquet file")
            rows = sh.get("num_rows")
            if not isinstance(rows, int) or isinstance(rows, bool) or rows <= 0:
                raise _manifest_error(path, f"{ks}.num_rows", rows, "expected a positive integer")
            if not isinstance(sh.get("sha256"), str) or not _HEX64_RE.match(sh["sha256"]):
                raise _manifest_error(path, f"{ks}.sha256", sh.get("sha256"), "expected 64 hex digits")
            total += rows
        if total != n:
            raise _manifest_error(path, f"{k}.num_images", n, f"shards hold {total} rows in all")
        shas[split] = [sh["sha256"] for sh in shards]
    want = content_hash(m["image_shape"], shas)
    if m.get("content_hash") != want:
        raise _manifest_error(path, "content_hash", m.get("content_hash"),
                              f"does not match the shard hashes listed (expected {want})")
    if m.get("label_names") is not None and not (
            isinstance(m["label_names"], list) and all(isinstance(s, str) for s in m["label_names"])):
        raise _manifest_error(path, "label_names", m["label_names"], "expected a list of strings or null")
    return m


# ----------------------------------------------------------------------------------------------
# Reading


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
    def label_names(self) -> list[str] | None:
        return self.manifest.get("label_names")

    @property
    def source(self) -> dict:
        """Free-form provenance written by importers/builders (may be empty)."""
        return self.manifest.get("source") or {}

    def shard_uris(self, split: str) -> list[str]:
        return [_join(self.uri, sh["file"]) for sh in self._split_info(split)["shards"]]

    def _split_info(self, split: str) -> dict:
        info = self.manifest["splits"].get(split)
        if info is None:
            raise DataError(f"{_join(self.uri, MANIFEST)}: unknown split {split!r}; "
                            f"available: {', '.join(sorted(self.manifest['splits']))}")
        return info

    def load_split(self, split: str, limit: int | None = None,
                   verify: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `limit` (default: all) images of `split` as uint8 (N, C, H, W) and int64 labels (N,).

        `verify` checks each shard's SHA-256 against the manifest. Only the shards needed for `limit`
        are read. Raises DataError (naming the shard) for any corrupt, mismatched or malformed shard.
        """
        info = self._split_info(split)
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise DataError(f"{self.uri}: split {split!r}: limit must be a positive integer (got {limit!r})")
        n = info["num_images"] if limit is None else min(limit, info["num_images"])
        C, H, W = self.image_shape
        images = np.empty((n, C, H, W), dtype=np.uint8)  # (N, C, H, W)
        labels = np.empty((n,), dtype=np.int64)
        fs, root = _fs(self.uri)
        done = 0
        for sh in info["shards"]:
            if done >= n:
                break
            uri = _join(self.uri, sh["file"])
            try:
                data = fs.cat_file(_join(root, sh["file"]))
            except FileNotFoundError as e:
                raise DataError(f"{_where(uri, split)}: shard file is missing") from e
            except OSError as e:
                raise DataError(f"{_where(uri, split)}: cannot read ({type(e).__name__}: {e})") from e
            if verify:
                got = hashlib.sha256(data).hexdigest()
                if got != sh["sha256"]:
                    raise DataError(f"{_where(uri, split)}: SHA-256 mismatch: manifest says "
                                    f"{sh['sha256']}, file has {got} (corrupt or modified shard)")
            take = min(sh["num_rows"], n - done)
            img, lab = _decode_shard(data, uri, split, (C, H, W), sh["num_rows"], take)
            images[done:done + take] = img
            labels[done:done + take] = lab
            done += take
        return torch.from_numpy(images), torch.from_numpy(labels)

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, uri={self.uri!r}, image_shape={self.image_shape}, "
                f"splits={self.splits}, content_hash={self.content_hash[:12]}...)")


def _decode_shard(data: bytes, uri: str, split: str, shape: tuple[int, int, int], num_rows: int,
                  take: int) -> tuple[np.ndarray, np.ndarray]:
    """Parse one Parquet shard held in memory; returns (take, C, H, W) uint8 and (take,) int64."""
    where = _where(uri, split)
    try:
        table = pq.read_table(pa.BufferReader(data), columns=None)
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{where}: not a readable Parquet file ({type(e).__name__}: {e})") from e
    schema = table.schema
    for col, ok, want in (("image", _is_binary, "binary"), ("label", pa.types.is_integer, "integer")):
        if col not in schema.names:
            raise DataError(f"{where}: column {col!r} is missing (columns: {', '.join(schema.names)})")
        if not ok(schema.field(col).type):
            raise DataError(f"{where}: column {col!r} has type {schema.field(col).type}, expected {want}")
    if table.num_rows != num_rows:
        raise DataError(f"{where}: file has {table.num_rows} rows, manifest says {num_rows}")
    table = table.slice(0, take)
    image = table.column("image").combine_chunks()
    label = table.column("label").combine_chunks()
    for col, arr in (("image", image), ("label", label)):
        if arr.null_count:
            row = int(np.flatnonzero(~np.asarray(arr.is_valid()))[0])
            raise DataError(f"{where}: column {col!r} has {arr.null_count} null value(s), first at row {row}")
    C, H, W = shape
    D = C * H * W
    if pa.types.is_fixed_size_binary(image.type):
        if image.type.byte_width != D:
            raise DataError(f"{where}: column 'image' holds {image.type.byte_width} bytes per row, "
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
            raise DataError(f"{where}: column 'image' row {r} holds {int(lengths[r])} bytes, expected "
                            f"C*H*W = {C}*{H}*{W} = {D} ({bad.size} bad row(s); mixed image sizes?)")
        pixels = np.frombuffer(image.buffers()[2], np.uint8)[offsets[0]:offsets[0] + take * D]
    labels = label.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    if labels.size and labels.min() < -1:
        r = int(np.argmin(labels))
        raise DataError(f"{where}: column 'label' row {r} is {int(labels[r])}; labels must be >= -1")
    return pixels.reshape(take, C, H, W), labels


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)


def open_dataset(uri: str) -> Dataset:
    """Open and validate the dataset at `uri` (a `builtin:NAME` spec is materialised first)."""
    if uri.startswith("builtin:"):
        from ulsweep.data.builtin import resolve_dataset
        uri = resolve_dataset(uri)
    fs, root = _fs(uri)
    mpath = _join(uri, MANIFEST)
    try:
        text = fs.cat_file(_join(root, MANIFEST))
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
    return Dataset(uri=uri.rstrip("/") or uri, manifest=_parse_manifest(mpath, text))


# ----------------------------------------------------------------------------------------------
# Writing


def _check_split(uri: str, split: str, images: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    where = _where(uri, split)
    if not isinstance(split, str) or not _SPLIT_RE.match(split):
        raise DataError(f"{uri}: bad split name {split!r} (letters, digits, '_', '-', '.')")
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    images, labels = np.asarray(images), np.asarray(labels)
    if images.dtype != np.uint8:
        raise DataError(f"{where}: images must be uint8, got {images.dtype}")
    if images.ndim != 4:
        raise DataError(f"{where}: images must be (N, C, H, W), got shape {images.shape}")
    if images.shape[0] == 0:
        raise DataError(f"{where}: split is empty")
    if labels.shape != (images.shape[0],):
        raise DataError(f"{where}: labels must have shape ({images.shape[0]},), got {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: labels must be integers, got {labels.dtype}")
    labels = labels.astype(np.int64)
    if labels.min() < -1:
        raise DataError(f"{where}: labels must be >= -1 (-1 = unlabelled), got {int(labels.min())}")
    return np.ascontiguousarray(images), labels


def _shard_bytes(images: np.ndarray, labels: np.ndarray) -> bytes:
    n, D = images.shape[0], int(np.prod(images.shape[1:]))
    offsets = np.arange(n + 1, dtype=np.int32) * D
    image = pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets), pa.py_buffer(images)])
    table = pa.table({"image": image, "label": pa.array(labels, pa.int64())})
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", use_dictionary=False, write_statistics=["label"],
                   row_group_size=max(1, min(n, 2**20 // max(D, 1) * 16)))
    return sink.getvalue()


def write_dataset(uri: str, name: str, splits: Mapping[str, tuple[Any, Any]], shard_rows: int | None = None,
                  *, label_names: list[str] | None = None, source: dict | None = None,
                  overwrite: bool = False) -> Dataset:
    """Write `splits` {split: (uint8 (N, C, H, W), int (N,))} as a dataset at `uri`; returns it opened.

    Shards hold `shard_rows` images each (default: as many as fit in ~64 MiB of raw pixels). Files are
    written atomically, shards first and `dataset.json` last. Writing over an existing dataset needs
    `overwrite=True`; its manifest is removed first and shards it alone used are deleted afterwards.
    """
    if not isinstance(name, str) or not name:
        raise DataError(f"{uri}: dataset name must be a non-empty string (got {name!r})")
    if not splits:
        raise DataError(f"{uri}: no splits given")
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

    fs, root = _fs(uri)
    mroot = _join(root, MANIFEST)
    old_files: set[str] = set()
    if fs.exists(mroot):
        if not overwrite:
            raise DataError(f"{_join(uri, MANIFEST)}: a dataset already exists here (pass overwrite=True)")
        try:
            old = json.loads(fs.cat_file(mroot))
            old_files = {sh["file"] for info in old["splits"].values() for sh in info["shards"]}
        except Exception:  # an unreadable old manifest: nothing to clean up
            pass
        fs.rm(mroot)  # from here on the directory is not a valid dataset until the new manifest lands
    fs.makedirs(root, exist_ok=True)

    manifest_splits, shas = {}, {}
    for split, (images, labels) in checked.items():
        shards = []
        for k, start in enumerate(range(0, images.shape[0], shard_rows)):
            data = _shard_bytes(images[start:start + shard_rows], labels[start:start + shard_rows])
            rel = f"{split}/part-{k:05d}.parquet"
            write_atomic(fs, _join(root, rel), data)
            shards.append({"file": rel, "num_rows": min(shard_rows, images.shape[0] - start),
                           "sha256": hashlib.sha256(data).hexdigest()})
        manifest_splits[split] = {"num_images": int(images.shape[0]), "shards": shards}
        shas[split] = [sh["sha256"] for sh in shards]
    manifest = {
        "format": FORMAT, "version": FORMAT_VERSION, "name": name,
        "image_shape": [int(s) for s in shape], "dtype": "uint8",
        "content_hash": content_hash(tuple(int(s) for s in shape), shas),
        "label_names": list(label_names) if label_names is not None else None,
        "splits": manifest_splits,
        "source": source or {},
        "writer": {"pyarrow": pa.__version__},
    }
    write_atomic(fs, mroot, (json.dumps(manifest, indent=1) + "\n").encode())
    new_files = {sh["file"] for info in manifest_splits.values() for sh in info["shards"]}
    for rel in sorted(old_files - new_files):
        try:
            fs.rm(_join(root, rel))
        except FileNotFoundError:
            pass
    return open_dataset(uri)


# ----------------------------------------------------------------------------------------------
# To the model's input range


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
