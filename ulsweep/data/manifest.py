"""The on-disk dataset format and its manifest: a directory of Parquet shards plus a `dataset.json` manifest.

    <uri>/dataset.json                   manifest (written last; a directory without it is not a dataset)
    <uri>/<split>/part-00000.parquet     columns: image (binary, one image per row), label (int64, -1 = none)

`<uri>` is a local path or any fsspec URI (memory://, file://, s3://, gs://, ...). The manifest records the
image shape, and per split the number of images and each shard's file name, row count and SHA-256 (of the
file bytes). The dataset content hash is the SHA-256 of the image shape plus the sorted "split:shard-sha256"
list, so it changes when any pixel, label or split assignment changes.

How the `image` column stores an image is the manifest's optional `encoding` (`ulsweep.data.codec`):

    absent or "raw"   C*H*W uint8 bytes, row-major (every dataset written before encodings existed)
    "png"             one PNG file per row (lossless; grayscale for C = 1, RGB for C = 3)
    "jpeg", "webp"    one JPEG / WebP file per row, lossy; the manifest's `quality` (1..100) says how lossy

Encoded datasets fold `encoding` (and `quality`) into the content hash; a raw dataset's hash is computed
exactly as before encodings existed, so caches keyed by it stay valid.

Reading is `ulsweep.data.reader`, writing `ulsweep.data.writer`; `ulsweep.data.parquet` gathers both.
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Mapping

import fsspec

from ulsweep import io as uio
from ulsweep.data.codec import ENCODINGS, CodecError, check_encoding

MANIFEST = "dataset.json"
FORMAT = "ulsweep-dataset"
FORMAT_VERSION = 1
SPLIT_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
HEX64_RE = re.compile(r"^[0-9a-f]{64}$")


class DataError(ValueError):
    """A dataset problem; the message names the file or URI, the split and what is wrong."""


def where(path: str, split: str | None = None) -> str:
    """How error messages name a file: `path (split 'train')`."""
    return f"{path} (split {split!r})" if split is not None else path


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, root path in it) of a dataset URI; DataError when it cannot be opened."""
    try:
        fs, root = uio.filesystem(uri)
    except (ImportError, ValueError) as e:  # unknown protocol / missing s3fs, gcsfs, ...
        raise DataError(f"{uri}: cannot open filesystem: {e}") from e
    return fs, root.rstrip("/") or "/"


def content_hash(image_shape: tuple[int, int, int], shards: Mapping[str, list[str]], encoding: str = "raw",
                 quality: int | None = None) -> str:
    """SHA-256 over the image shape and the sorted "split:shard_sha256" strings (hex); encoded datasets add
    their encoding and quality (raw datasets hash exactly as they did before encodings existed)."""
    entries = sorted(f"{split}:{sha}" for split, shas in shards.items() for sha in shas)
    fields: dict[str, Any] = {"image_shape": list(image_shape), "dtype": "uint8", "shards": entries}
    if encoding != "raw":
        fields.update(encoding=encoding, quality=quality)
    payload = json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def _manifest_error(path: str, key: str, value: Any, what: str) -> DataError:
    return DataError(f"{path}: key {key!r}: {what} (got {value!r})")


def _parse_encoding(path: str, m: dict) -> tuple[str, int | None]:
    """The manifest's (encoding, quality): ("raw", None) when absent; errors name the key."""
    encoding = m.get("encoding", "raw")
    if encoding not in ENCODINGS:
        raise _manifest_error(path, "encoding", encoding, f"expected one of {', '.join(ENCODINGS)}")
    quality = m.get("quality")
    try:
        check_encoding(encoding, quality)
    except CodecError as e:
        raise _manifest_error(path, "quality", quality, str(e)) from e
    return encoding, quality


def parse_manifest(path: str, text: bytes) -> dict:
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
        if not SPLIT_RE.match(split):
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
            if not isinstance(sh.get("sha256"), str) or not HEX64_RE.match(sh["sha256"]):
                raise _manifest_error(path, f"{ks}.sha256", sh.get("sha256"), "expected 64 hex digits")
            total += rows
        if total != n:
            raise _manifest_error(path, f"{k}.num_images", n, f"shards hold {total} rows in all")
        shas[split] = [sh["sha256"] for sh in shards]
    encoding, quality = _parse_encoding(path, m)
    want = content_hash(m["image_shape"], shas, encoding, quality)
    if m.get("content_hash") != want:
        raise _manifest_error(path, "content_hash", m.get("content_hash"),
                              f"does not match the shard hashes listed (expected {want})")
    if m.get("label_names") is not None and not (
            isinstance(m["label_names"], list) and all(isinstance(s, str) for s in m["label_names"])):
        raise _manifest_error(path, "label_names", m["label_names"], "expected a list of strings or null")
    return m
