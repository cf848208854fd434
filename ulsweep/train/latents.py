"""Stage 2's training latents, encoded once per (autoencoder checkpoint, dataset) and read by every base trial.

    <AE checkpoint>/latents/<key16>/latents.json              manifest, written last
    <AE checkpoint>/latents/<key16>/<token>/part-00000.parquet  columns: z (fixed_size_binary, the C*h*w
                                                               float32 values of one latent, little-endian,
                                                               row-major), index (int64, row of the split)
    <AE checkpoint>/latents/<key16>/lock.json                  lease of the trial that is encoding (ulsweep.lease)

`key16` is the start of `LatentsKey.digest()`, a hash of what z_clean is a function of: the SHA-256 of the
checkpoint's state.pt, the dataset content hash, the split and the image size. The latents live inside the
checkpoint directory, so pruning a checkpoint removes its latents with it.

z_clean = E(x) of the whole training split, float32, encoded in batches of `ENCODE_BATCH` under
`torch.no_grad` on the trial's device, exactly as stage 2 encoded it in-process before: base training on the
stored latents is bit-identical. Concurrent base trials of one autoencoder: the first to claim the lease
encodes, the others wait for the manifest (a lease whose heartbeat stops is taken over). Each encoder writes
its shards under its own token and the manifest last, so readers see one complete set or none, even if two
encoders ran. A manifest or shard that fails its checks is reported and encoded again, never trained on.

`decode_latents` turns the `z` column (bytes values or an Arrow array) back into float32 (N, C, h, w), for
`Latents.load` and for a streaming source over `Latents.shard_uris`.
"""
from __future__ import annotations

import hashlib
import io
import json
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ulsweep import io as uio
from ulsweep.config import DataConfig
from ulsweep.data.builtin import resolve_dataset
from ulsweep.data.manifest import HEX64_RE, DataError
from ulsweep.data.model_range import to_model_range
from ulsweep.data.reader import Dataset, open_dataset
from ulsweep.lease import HEARTBEAT_S, STALE_S, Lease, LeaseWatch

FORMAT = "ulsweep-latents"
FORMAT_VERSION = 1
MANIFEST = "latents.json"
LOCK = "lock.json"
ENCODE_BATCH = 512  # images per encoder call (stage 2's batch before the cache: keeps z bit-identical)
SHARD_BYTES = 64 * 2**20  # float32 bytes of latents per shard
POLL_S = 1.0  # how often a waiting trial looks for the manifest


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
    w = LatentWriter(directory, token)
    w.add(z.detach().to("cpu", torch.float32).numpy())
    return w.finish(key, info)


def _shard_bytes(z: np.ndarray, first_row: int) -> bytes:
    """float32 (n, D) -> Parquet bytes with columns z (fixed_size_binary(4 D)) and index (int64)."""
    n, D = z.shape
    col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(4 * D), n, [None, pa.py_buffer(z.tobytes())])
    table = pa.table({"z": col, "index": pa.array(np.arange(first_row, first_row + n), pa.int64())})
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="none", use_dictionary=False, write_statistics=["index"])
    return sink.getvalue()


# ----------------------------------------------------------------------------------------------
# the training split's latents, encoded once


def split_images(ds: Dataset, split: str, image_size: int, limit: int | None = None) -> torch.Tensor:
    """The first `limit` (all) images of `split` in [-1, 1], float32 (N, C, S, S), on the CPU."""
    return to_model_range(ds.load_split(split, limit=limit)[0], image_size)


@torch.no_grad()
def encode_split(encoder: torch.nn.Module, ds: Dataset, split: str, image_size: int, device: torch.device | str,
                 sink: Callable[[torch.Tensor], None], batch: int = ENCODE_BATCH) -> int:
    """z_clean = E(x) of every image of `split`, in order, handed to `sink` as float32 (n, C, h, w) on `device`
    one encoder batch at a time; returns the number of images. The batches are `batch` consecutive images
    of the split whatever its shard layout (so z is bit-identical to stage 2's in-process encoding of the whole
    split in slices of `batch`, before the cache), and
    memory holds one shard of images and one batch: the split can be far larger than the host or device."""
    carry: torch.Tensor | None = None  # uint8 images of the last shard that did not fill a batch
    n = 0

    def run(x_u8: torch.Tensor) -> None:
        sink(encoder(to_model_range(x_u8, image_size).to(device)).float())

    for img, _ in ds.iter_split(split):
        x = torch.from_numpy(img)
        if carry is not None:
            x = torch.cat([carry, x])
            carry = None
        full = len(x) - len(x) % batch
        for i in range(0, full, batch):
            run(x[i:i + batch])
        if full < len(x):
            carry = x[full:].clone()
        n += full
    if carry is not None:
        run(carry)
        n += len(carry)
    return n


def training_latents(encoder: torch.nn.Module, ae_checkpoint: str, ae_sha256: str, ds: Dataset,
                     data: DataConfig, device: torch.device | str, *, poll_s: float = POLL_S,
                     heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S,
                     load: bool = True) -> tuple[Latents | None, torch.Tensor | None]:
    """(the published latents of `data.train_split`, them as float32 (N, C, h, w) on `device`, or None when
    not `load`: a base trial that streams them reads the shards itself).

    Reads them when published and valid; otherwise takes the lease and encodes (or waits for the trial
    holding it). A published set that fails its checks is reported (warning naming the file) and replaced.
    Where the checkpoint directory cannot be written the latents are encoded for this call only (None).
    """
    key = LatentsKey(ae_sha256, ds.content_hash, data.train_split, data.image_size)
    directory = latents_dir(ae_checkpoint, key)
    watch = LeaseWatch(uio.join(directory, LOCK), stale_s)
    rejected: dict | None = None  # a published manifest whose shards failed their checks
    reported, said = set(), False
    while True:
        lat, problem = read_latents(directory, key)
        if problem and problem not in reported:
            warnings.warn(f"latent cache unusable, encoding again: {problem}")
            reported.add(problem)
        if lat is not None and lat.manifest != rejected:
            try:
                return lat, (lat.load(device) if load else None)
            except DataError as e:
                warnings.warn(f"latent cache unusable, encoding again: {e}")
                rejected = lat.manifest
                continue
        try:
            lease = Lease.claim(watch.uri, heartbeat_s, job=f"encoding {data.train_split} of {data.path}")
        except PermissionError as e:  # e.g. a read-only checkpoint directory: encode for this trial only
            warnings.warn(f"{directory}: cannot store latents here ({e}); encoding them for this trial only, "
                          "held in memory")
            zs: list[torch.Tensor] = []
            encode_split(encoder, ds, data.train_split, data.image_size, device, zs.append)
            return None, torch.cat(zs)
        if lease is not None:
            with lease:
                lat, _ = read_latents(directory, key)  # published between our look and our claim?
                if lat is not None and lat.manifest != rejected:
                    continue
                return _encode_and_publish(encoder, ae_checkpoint, key, ds, data, device, directory, lease, load)
        if watch.look() is not None:
            if not said:
                h = watch.holder()
                print(f"[latents] waiting for {h.get('host')}:{h.get('pid')} to encode {directory}", flush=True)
                said = True
            if watch.stale():
                warnings.warn(f"{watch.uri}: lease of {watch.holder()} is stale; taking over the encoding")
                if watch.take_over():
                    _remove_unpublished(directory, watch.holder().get("token"))
                continue
        time.sleep(poll_s)


def _remove_unpublished(directory: str, token: Any) -> None:
    """Delete the shards a stale holder left under its token, unless a published manifest lists them."""
    if not isinstance(token, str) or not token.isalnum():
        return
    try:
        listed = json.loads(uio.read_bytes(uio.join(directory, MANIFEST))).get("shards", [])
    except (FileNotFoundError, ValueError, AttributeError):
        listed = []
    if any(str(sh.get("file", "")).startswith(f"{token}/") for sh in listed if isinstance(sh, dict)):
        return
    fs, path = uio.filesystem(uio.join(directory, token))
    try:
        fs.rm(path, recursive=True)
    except FileNotFoundError:
        pass


def _encode_and_publish(encoder, ae_checkpoint: str, key: LatentsKey, ds: Dataset, data: DataConfig, device,
                        directory: str, lease: Lease, load: bool) -> tuple[Latents, torch.Tensor | None]:
    t0 = time.perf_counter()
    writer = LatentWriter(directory, lease.token)
    zs: list[torch.Tensor] = []

    def sink(z: torch.Tensor) -> None:
        writer.add(z.cpu().numpy())
        if load:
            zs.append(z)

    encode_split(encoder, ds, data.train_split, data.image_size, device, sink)
    seconds = time.perf_counter() - t0
    info = {"ae_checkpoint": ae_checkpoint, "data_uri": ds.uri, "encode_seconds": seconds,
            "encoder": {"device": str(torch.device(device)), "batch": ENCODE_BATCH, "torch": torch.__version__}}
    lat = writer.finish(key, info)
    print(f"[latents] encoded {lat.num_rows} images of {data.train_split!r} to {lat.latent_shape} "
          f"in {seconds:.1f} s -> {directory}", flush=True)
    return lat, (torch.cat(zs) if load else None)


class DecodeLatents:
    """Ray Data UDF: the `z` column -> {"z": float32 (n, C, h, w)}; a malformed row is a DataError naming the
    latents directory."""

    def __init__(self, shape: Sequence[int], uri: str):
        self.shape, self.uri = tuple(shape), uri

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        try:
            return {"z": decode_latents(batch.column("z"), self.shape)}
        except ValueError as e:
            raise DataError(f"{self.uri}: {e}") from None


def latent_source(lat: Latents, rt, seed: int, batch_size: int):
    """A `StreamSource` of this rank's latents, read shard by shard through Ray Data (`ulsweep.data.stream`)
    instead of loaded: O(prefetch) batches in memory. With N workers rank r reads shards r, r + N, ... and
    every rank stops at the smallest rank's row count, so all ranks run the same steps per epoch (the rows
    a larger rank holds beyond it are skipped every epoch: at most about one shard per rank)."""
    from ulsweep.data import stream

    stream.ensure_ray()
    items = [{"uri": uri, "sha256": sh["sha256"], "num_rows": sh["num_rows"], "split": f"latents {lat.manifest['split']}"}
             for uri, sh in zip(lat.shard_uris, lat.manifest["shards"])]
    per_rank = [sum(it["num_rows"] for it in items[r::rt.world]) for r in range(rt.world)]
    rows = min(per_rank)
    if rows < batch_size // rt.world:
        raise DataError(f"{lat.uri}: {len(items)} latent shard(s) over {rt.world} worker(s) leave {rows} rows "
                        f"per worker, less than one batch of {batch_size // rt.world}")
    row_bytes = 4 * int(np.prod(lat.latent_shape))
    pipe = stream.build_pipeline(items[rt.rank::rt.world], ("z",), DecodeLatents(lat.latent_shape, lat.uri),
                                 max(1, stream.BLOCK_BYTES // row_bytes))
    if rt.world > 1 and per_rank[rt.rank] > rows:
        pipe = pipe.limit(rows)
    pipe.context.execution_options = stream.execution_options(row_bytes, max(1, batch_size // rt.world))
    return stream.StreamSource(pipe, rows * rt.world, rt, seed, lambda b: b["z"], label=lat.uri)


def published_latents(ae_checkpoint: str, data: DataConfig) -> Latents | None:
    """The latents published for the autoencoder checkpoint and `data`'s training split, if any (manifest
    checked, shards not read); for tracking."""
    from ulsweep.train.checkpoint import read_meta

    ds = open_dataset(resolve_dataset(data.path))
    key = LatentsKey(read_meta(ae_checkpoint)["sha256"], ds.content_hash, data.train_split, data.image_size)
    return read_latents(latents_dir(ae_checkpoint, key), key)[0]
