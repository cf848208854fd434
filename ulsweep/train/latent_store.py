"""Stage 2's latent files: the set of z_clean shards of one training split and its manifest.

    <dir>/latents.json                manifest, written last: latent shape, dtype, rows, per-shard SHA-256, the
                                      key fields (AE checkpoint hash, dataset hash, split, image size), content hash
    <dir>/<token>/part-00000.parquet  columns: z (fixed_size_binary, the C*h*w float32 values of one latent,
                                      little-endian, row-major), index (int64, row of the split)

`LatentWriter` writes shards as they come and the manifest last; `read_latents` finds and checks a published
set; `Latents.load` reads it whole, `decode_latents` turns a `z` column back into float32 (N, C, h, w).
Who encodes, and when, is `ulsweep.train.latents`; `published_latents` finds a set for tracking. torch only where
tensors come in or go out (`Latents.load`, `write_latents`): a stacked base member's trial process, which logs its
latents as a dataset input, never imports it.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ulsweep import io as uio
from ulsweep.data.manifest import HEX64_RE, DataError

if TYPE_CHECKING:
    import torch

    from ulsweep.config import DataConfig

FORMAT = "ulsweep-latents"
FORMAT_VERSION = 1
MANIFEST = "latents.json"
SHARD_BYTES = 64 * 2**20  # float32 bytes of latents per shard


@dataclass(frozen=True)
class LatentsKey:
    """What z_clean of a training split is a function of."""

    ae_sha256: str  # SHA-256 of the autoencoder checkpoint's state.pt (its meta.json `sha256`)
    data_hash: str  # the dataset's content hash
    split: str
    image_size: int

    def fields(self) -> dict:
        return {"ae_sha256": self.ae_sha256, "data_hash": self.data_hash, "split": self.split,
                "image_size": self.image_size}

    def digest(self) -> str:
        payload = json.dumps({"format": FORMAT, "version": FORMAT_VERSION, **self.fields()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()


def latents_dir(ae_checkpoint: str, key: LatentsKey) -> str:
    return uio.join(ae_checkpoint, "latents", key.digest()[:16])


def content_hash(latent_shape: Sequence[int], shard_shas: Sequence[str]) -> str:
    """SHA-256 over the latent shape and the shards' SHA-256 in order: the latents' identity (MLflow digest)."""
    payload = json.dumps({"latent_shape": list(latent_shape), "dtype": "float32", "shards": list(shard_shas)})
    return hashlib.sha256(payload.encode()).hexdigest()


@dataclass(frozen=True)
class Latents:
    """A published, validated set of latents (the manifest is read; shards are read by `load`)."""

    uri: str  # the directory holding latents.json
    manifest: dict

    @property
    def latent_shape(self) -> tuple[int, int, int]:  # (C, h, w)
        return tuple(self.manifest["latent_shape"])

    @property
    def num_rows(self) -> int:
        return self.manifest["num_rows"]

    @property
    def content_hash(self) -> str:
        return self.manifest["content_hash"]

    @property
    def shard_uris(self) -> list[str]:
        return [uio.join(self.uri, sh["file"]) for sh in self.manifest["shards"]]

    def load(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """All latents as float32 (N, C, h, w) on `device`, each shard checked against its SHA-256 first;
        DataError naming the shard otherwise."""
        out = np.empty((self.num_rows, *self.latent_shape), np.float32)
        done = 0
        for uri, sh in zip(self.shard_uris, self.manifest["shards"]):
            try:
                data = uio.read_bytes(uri)
            except FileNotFoundError:
                raise DataError(f"{uri}: latent shard is missing") from None
            got = hashlib.sha256(data).hexdigest()
            if got != sh["sha256"]:
                raise DataError(f"{uri}: SHA-256 {got[:12]}... does not match the manifest's "
                                f"{sh['sha256'][:12]}... (corrupt or modified latent shard)")
            table = _read_table(data, uri)
            if table.num_rows != sh["num_rows"]:
                raise DataError(f"{uri}: holds {table.num_rows} rows, the manifest says {sh['num_rows']}")
            try:
                out[done:done + table.num_rows] = decode_latents(table.column("z"), self.latent_shape)
            except ValueError as e:
                raise DataError(f"{uri}: {e}") from None
            done += table.num_rows
        import torch

        return torch.from_numpy(out).to(device)


def decode_latents(values: Any, shape: Sequence[int]) -> np.ndarray:
    """The `z` column -> float32 (N, C, h, w). `values`: an Arrow (chunked) array of fixed-size or variable
    binary, a sequence of bytes (what Ray Data hands a `map_batches` function for a binary column), or a
    float array (N, C*h*w). ValueError naming the row for a value of the wrong size."""
    C, h, w = (int(s) for s in shape)
    D = C * h * w
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array) and pa.types.is_fixed_size_binary(values.type):
        if values.type.byte_width != 4 * D:
            raise ValueError(f"latents hold {values.type.byte_width} bytes per row, expected "
                             f"4*C*h*w = 4*{C}*{h}*{w} = {4 * D}")
        if values.null_count:
            raise ValueError(f"latent column has {values.null_count} null value(s)")
        flat = np.frombuffer(values.buffers()[1], "<f4")[values.offset * D:(values.offset + len(values)) * D]
        return flat.astype(np.float32).reshape(len(values), C, h, w)
    if isinstance(values, pa.Array):
        values = values.to_pylist()
    if isinstance(values, np.ndarray) and values.dtype.kind == "f":
        if values.ndim < 2 or values[0].size != D:
            raise ValueError(f"latents of shape {values.shape} are not (N, {C}*{h}*{w})")
        return np.ascontiguousarray(values, np.float32).reshape(len(values), C, h, w)
    for i, v in enumerate(values):
        if v is None or len(v) != 4 * D:
            raise ValueError(f"latent row {i} holds {0 if v is None else len(v)} bytes, expected "
                             f"4*C*h*w = 4*{C}*{h}*{w} = {4 * D}")
    flat = np.frombuffer(b"".join(values), "<f4") if len(values) else np.empty(0, np.float32)
    return flat.astype(np.float32).reshape(len(values), C, h, w)


def _read_table(data: bytes, uri: str) -> pa.Table:
    try:
        table = pq.read_table(pa.BufferReader(data))
    except (pa.ArrowException, OSError, ValueError) as e:
        raise DataError(f"{uri}: not a readable Parquet file ({type(e).__name__}: {e})") from None
    if "z" not in table.schema.names:
        raise DataError(f"{uri}: column 'z' is missing (columns: {', '.join(table.schema.names)})")
    return table


# ----------------------------------------------------------------------------------------------
# manifest


def _manifest_problem(m: Any, key: LatentsKey) -> str | None:
    """What is wrong with a parsed manifest for `key`, or None."""
    if not isinstance(m, dict):
        return "not a JSON object"
    if m.get("format") != FORMAT or m.get("version") != FORMAT_VERSION:
        return f"format {m.get('format')!r} version {m.get('version')!r}, expected {FORMAT!r} {FORMAT_VERSION}"
    for k, want in key.fields().items():
        if m.get(k) != want:
            return f"key {k!r} is {m.get(k)!r}, expected {want!r}"
    shape, shards = m.get("latent_shape"), m.get("shards")
    if not (isinstance(shape, list) and len(shape) == 3 and all(isinstance(s, int) and s > 0 for s in shape)):
        return f"key 'latent_shape' is {shape!r}, expected [C, h, w] of positive integers"
    if m.get("dtype") != "float32":
        return f"key 'dtype' is {m.get('dtype')!r}, expected 'float32'"
    if not isinstance(shards, list) or not shards:
        return "key 'shards' is not a non-empty list"
    for i, sh in enumerate(shards):
        f = sh.get("file") if isinstance(sh, dict) else None
        if (not isinstance(f, str) or not f.endswith(".parquet") or f.startswith("/") or ".." in f.split("/")
                or "://" in f or not isinstance(sh.get("num_rows"), int) or sh["num_rows"] < 1
                or not isinstance(sh.get("sha256"), str) or not HEX64_RE.match(sh["sha256"])):
            return f"key 'shards[{i}]' is malformed ({sh!r})"
    if sum(sh["num_rows"] for sh in shards) != m.get("num_rows"):
        return f"key 'num_rows' is {m.get('num_rows')!r}, the shards hold {sum(s['num_rows'] for s in shards)}"
    if m.get("content_hash") != content_hash(shape, [sh["sha256"] for sh in shards]):
        return "key 'content_hash' does not match the shards listed"
    return None


def read_latents(directory: str, key: LatentsKey) -> tuple[Latents | None, str | None]:
    """(the latents published in `directory` for `key`, None) or (None, what is wrong; None when simply
    absent). Reads the manifest only."""
    path = uio.join(directory, MANIFEST)
    try:
        raw = uio.read_bytes(path)
    except FileNotFoundError:
        return None, None
    try:
        m = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{path}: not valid JSON ({e})"
    problem = _manifest_problem(m, key)
    if problem:
        return None, f"{path}: {problem}"
    return Latents(directory, m), None


class LatentWriter:
    """Latent shards written as the encoder produces them (each atomically, under `directory`/`token`/), then
    the manifest (`finish`, atomically, last). Shards hold SHARD_BYTES of float32 each: their boundaries
    depend only on the row count and the latent size, not on how the rows arrive."""

    def __init__(self, directory: str, token: str):
        self.directory, self.token = directory, token
        self.shards: list[dict] = []
        self.shape: tuple[int, ...] | None = None
        self.rows_per_shard = 0
        self._buf: list[np.ndarray] = []
        self._nbuf = 0
        self._done = 0

    def add(self, z: np.ndarray) -> None:
        """Append float32 latents (n, C, h, w)."""
        z = np.ascontiguousarray(z, dtype="<f4")
        if self.shape is None:
            self.shape = tuple(int(d) for d in z.shape[1:])
            self.rows_per_shard = max(1, SHARD_BYTES // (4 * int(np.prod(self.shape))))
        elif tuple(z.shape[1:]) != self.shape:
            raise ValueError(f"latents of shape {tuple(z.shape[1:])} after {self.shape}")
        self._buf.append(z)
        self._nbuf += len(z)
        while self._nbuf >= self.rows_per_shard:
            self._write(self.rows_per_shard)

    def _write(self, n: int) -> None:
        rows = self._buf[0] if len(self._buf) == 1 else np.concatenate(self._buf)
        part, rest = rows[:n], rows[n:]
        self._buf, self._nbuf = ([rest] if len(rest) else []), len(rest)
        data = _shard_bytes(part.reshape(n, -1), self._done)
        rel = f"{self.token}/part-{len(self.shards):05d}.parquet"
        uio.atomic_write_bytes(uio.join(self.directory, rel), data)
        self.shards.append({"file": rel, "num_rows": n, "sha256": hashlib.sha256(data).hexdigest()})
        self._done += n

    def finish(self, key: LatentsKey, info: dict) -> Latents:
        """Write what is left and the manifest; `info`: extra manifest entries (provenance)."""
        if self._nbuf:
            self._write(self._nbuf)
        if not self.shards:
            raise ValueError(f"{self.directory}: no latents were written")
        manifest = {"format": FORMAT, "version": FORMAT_VERSION, **key.fields(), "latent_shape": list(self.shape),
                    "dtype": "float32", "byte_order": "little", "num_rows": self._done, "shards": self.shards,
                    "content_hash": content_hash(self.shape, [sh["sha256"] for sh in self.shards]), **info}
        uio.atomic_write_text(uio.join(self.directory, MANIFEST), json.dumps(manifest, indent=1))
        return Latents(self.directory, manifest)


def write_latents(directory: str, key: LatentsKey, z: torch.Tensor, token: str, info: dict) -> Latents:
    """Write z (float32 (N, C, h, w)) as shards under `directory`/`token`/, each atomically, then the
    manifest (atomically, last). `info`: extra manifest entries (provenance)."""
    import torch

    w = LatentWriter(directory, token)
    w.add(z.detach().to("cpu", torch.float32).numpy())
    return w.finish(key, info)


def _shard_bytes(z: np.ndarray, first_row: int) -> pa.Buffer:
    """float32 (n, D) -> Parquet bytes with columns z (fixed_size_binary(4 D)) and index (int64), as an Arrow
    buffer (bytes-like: written and hashed as it is). The rows are not copied into the column, and the file is
    written into Arrow's own memory: through a Python file object every write would hold the GIL for its copy,
    stalling the threads that launch a group's encoding beside it (benchmarks/checkpoint_gil.py's reasoning)."""
    n, D = z.shape
    rows = np.ascontiguousarray(z, dtype="<f4").reshape(-1).view(np.uint8)
    col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(4 * D), n, [None, pa.py_buffer(rows)])
    table = pa.table({"z": col, "index": pa.array(np.arange(first_row, first_row + n), pa.int64())})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="none", use_dictionary=False, write_statistics=["index"])
    return sink.getvalue()


def published_latents(ae_checkpoint: str, data: DataConfig) -> Latents | None:
    """The latents published for the autoencoder checkpoint and `data`'s training split, if any (manifest
    checked, shards not read); for tracking."""
    from ulsweep.data.builtin import resolve_dataset
    from ulsweep.data.reader import open_dataset
    from ulsweep.train.checkpoint import read_meta

    ds = open_dataset(resolve_dataset(data.path))
    key = LatentsKey(read_meta(ae_checkpoint)["sha256"], ds.content_hash, data.train_split, data.image_size)
    return read_latents(latents_dir(ae_checkpoint, key), key)[0]
