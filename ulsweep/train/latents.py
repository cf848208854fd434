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
stored latents is bit-identical. The images are read and decoded in the trial's process (one thread) where
stage 1 holds the split on the device, and by Ray Data CPU tasks over the cluster where stage 1 streams it
(`decode_path`, `encode_split`); the encoder runs in the trial's process either way, on the same batches, so z
is the same. The manifest records the path (`decode`) and the encoding's images/s. Concurrent base trials of
one autoencoder: the first to claim the lease encodes, the others wait for the manifest (a lease whose
heartbeat stops is taken over). Each encoder writes its shards under its own token and the manifest last, so
readers see one complete set or none, even if two encoders ran. A manifest or shard that fails its checks is
reported and encoded again, never trained on.

The files themselves (manifest, shards, `LatentWriter`, `read_latents`, `decode_latents`) are
`ulsweep.train.latent_store`; this module decides who encodes and when, and how a base trial reads them
(`Latents.load` onto the device, or `latent_source` streaming them).
"""
from __future__ import annotations

import collections
import contextlib
import json
import math
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch

from ulsweep import io as uio
from ulsweep.config import DataConfig
from ulsweep.data.manifest import DataError
from ulsweep.data.model_range import to_model_range
from ulsweep.data.reader import Dataset
from ulsweep.lease import HEARTBEAT_S, STALE_S, Lease, LeaseWatch
from ulsweep.train.latent_store import (MANIFEST, LatentsKey, Latents, LatentWriter, decode_latents,  # noqa: F401
                                        latents_dir, published_latents, read_latents, write_latents)

LOCK = "lock.json"
ENCODE_BATCH = 512  # images per encoder call (stage 2's batch before the cache: keeps z bit-identical)
POLL_S = 1.0  # how often a waiting trial looks for the manifest


# ----------------------------------------------------------------------------------------------
# the training split's latents, encoded once


IN_PROCESS, RAY_DATA = "in-process", "ray-data"  # where encode_split reads and decodes the images
ENCODE_PREFETCH = 2  # encoder batches the Ray Data path decodes ahead of the encoder
STORE_THREADS = 4  # threads writing a group's latents beside its encoder (`encode_together`), a member each
STORE_AHEAD = 4  # encoder batches the writers may fall behind (each holds every stored member's rows)


def decode_path(images_loader: str) -> str:
    """Where stage 2 decodes the training images it encodes, given stage 1's loader choice for them
    (`ulsweep.data.sources.choose_loader`): through Ray Data where stage 1 streams them (a split too large
    for the device, or `data.loader: stream`), in this process where it holds them on the device."""
    return RAY_DATA if images_loader == "stream" else IN_PROCESS


@torch.no_grad()
def encode_split(encoder: torch.nn.Module, ds: Dataset, split: str, image_size: int, device: torch.device | str,
                 sink: Callable[[torch.Tensor], None], batch: int = ENCODE_BATCH, decode: str = IN_PROCESS,
                 timer: Callable[[str], contextlib.AbstractContextManager] | None = None) -> int:
    """z_clean = E(x) of every image of `split`, in order, handed to `sink` as float32 (n, C, h, w) on `device`
    one encoder batch at a time; returns the number of images. The batches are `batch` consecutive images
    of the split whatever its shard layout (so z is bit-identical to stage 2's in-process encoding of the whole
    split in slices of `batch`, before the cache), on either `decode` path:

    `in-process`: this process reads and decodes the shards, one thread, one shard at a time (one core's
    decode rate: fine for small splits, hours for ImageNet-scale ones).
    `ray-data`: CPU tasks of the Ray cluster read and decode them (`_ray_data_batches`); a fixed start-up
    of about 1.5-2 s per split on a 2-core box (benchmarks/results/cpu-encode-latents.json).

    The encoder runs here, on the device the trial already holds, on either path: encoding in GPU actors
    would wait for GPUs that the sweep's trials hold. Memory holds a shard or O(ENCODE_PREFETCH) batches of
    images and one batch of latents: the split can be far larger than the host or device. A missing or
    changed shard is a DataError naming it. `timer` (an evaluation.PartTimer, whose parts end with the device
    synchronized) times the parts, summed over the batches: `encode_read` (waiting for the next batch of
    images), `encode_encoder` (to the device and through the encoder), `encode_store` (the sink)."""
    batches = {IN_PROCESS: _in_process_batches, RAY_DATA: _ray_data_batches}.get(decode)
    if batches is None:
        raise ValueError(f"decode must be {IN_PROCESS!r} or {RAY_DATA!r}, not {decode!r}")
    timer = timer or _untimed
    n, it = 0, iter(batches(ds, split, batch))
    while True:
        with timer("encode_read"):
            x_u8 = next(it, None)
        if x_u8 is None:
            break
        with timer("encode_encoder"):
            z = encoder(to_model_range(x_u8, image_size).to(device)).float()
        with timer("encode_store"):
            sink(z)
        n += len(x_u8)
    if n != ds.splits[split]:
        raise DataError(f"{ds.uri}: split {split!r} gave {n} images, the manifest says {ds.splits[split]}")
    return n


def _untimed(part: str) -> contextlib.AbstractContextManager:
    """The timer of `encode_split` and `encode_together` when none is given: times nothing."""
    return contextlib.nullcontext()


def _in_process_batches(ds: Dataset, split: str, batch: int) -> Iterator[torch.Tensor]:
    """uint8 (batch, C, H, W) CPU tensors of `split` in order, the last one partial, read and decoded by this
    process one shard at a time."""
    carry: torch.Tensor | None = None  # images of the last shard that did not fill a batch
    for img, _ in ds.iter_split(split):
        x = torch.from_numpy(img)
        if carry is not None:
            x, carry = torch.cat([carry, x]), None
        full = len(x) - len(x) % batch
        for i in range(0, full, batch):
            yield x[i:i + batch]
        if full < len(x):
            carry = x[full:].clone()
    if carry is not None:
        yield carry


def _ray_data_batches(ds: Dataset, split: str, batch: int) -> Iterator[torch.Tensor]:
    """The batches of `_in_process_batches`, read and decoded by `ulsweep.data.stream`'s pipeline (ReadShards,
    DecodeImages) as CPU tasks over the Ray cluster, in order (`preserve_order`), re-batched to `batch`
    rows. Blocks are up to BLOCK_BYTES of images (many tasks, even for a few shards); the object-store limit
    is `stream.ordered_options` of those blocks plus ENCODE_PREFETCH batches. The streaming executor runs in
    the split's coordinator actor (`stream.out_of_process`), not beside the encoder; a DataError raised by a
    task is raised as itself (`stream.data_error_in`)."""
    from ulsweep.data import stream

    stream.ensure_ray()
    row = math.prod(ds.image_shape)
    pipe = stream.build_dataset(ds, split, 1, row_bytes=row)
    pipe.context.execution_options = stream.ordered_options(stream.block_rows(1, row) * row,
                                                            ENCODE_PREFETCH * batch * row)
    it = stream.out_of_process(pipe).iter_torch_batches(batch_size=batch, drop_last=False, device="cpu",
                                                        prefetch_batches=ENCODE_PREFETCH)
    for b in stream.raising_data_errors(it):
        yield b["image"]


def training_latents(encoder: torch.nn.Module, ae_checkpoint: str, ae_sha256: str, ds: Dataset,
                     data: DataConfig, device: torch.device | str, *, poll_s: float = POLL_S,
                     heartbeat_s: float = HEARTBEAT_S, stale_s: float = STALE_S, load: bool = True,
                     decode: str = IN_PROCESS) -> tuple[Latents | None, torch.Tensor | None]:
    """(the published latents of `data.train_split`, them as float32 (N, C, h, w) on `device`, or None when
    not `load`: a base trial that streams them reads the shards itself).

    Reads them when published and valid; otherwise takes the lease and encodes (or waits for the trial
    holding it), decoding the images on the `decode` path (`encode_split`; recorded in the manifest). A
    published set that fails its checks is reported (warning naming the file) and replaced. Where the
    checkpoint directory cannot be written the latents are encoded for this call only (None). An encoding
    that fails (e.g. a DataError for a changed image shard) publishes nothing and removes its shards.
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
            encode_split(encoder, ds, data.train_split, data.image_size, device, zs.append, decode=decode)
            return None, torch.cat(zs)
        if lease is not None:
            with lease:
                lat, _ = read_latents(directory, key)  # published between our look and our claim?
                if lat is not None and lat.manifest != rejected:
                    continue
                return _encode_and_publish(encoder, ae_checkpoint, key, ds, data, device, directory, lease, load,
                                           decode)
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
                        directory: str, lease: Lease, load: bool, decode: str) -> tuple[Latents, torch.Tensor | None]:
    """Encode the split under the held `lease`, write its shards and then the manifest. On any failure the
    shards written so far are removed and nothing is published."""
    t0 = time.perf_counter()
    writer = LatentWriter(directory, lease.token)
    zs: list[torch.Tensor] = []

    def sink(z: torch.Tensor) -> None:
        writer.add(z.cpu().numpy())
        if load:
            zs.append(z)

    try:
        n = encode_split(encoder, ds, data.train_split, data.image_size, device, sink, decode=decode)
        seconds = time.perf_counter() - t0
        info = _provenance(ae_checkpoint, ds, n, seconds, decode, device)
        lat = writer.finish(key, info)
    except BaseException:
        _remove_unpublished(directory, lease.token)
        raise
    how = "in process" if decode == IN_PROCESS else f"through Ray Data on {info['ray_cpus']} CPUs"
    print(f"[latents] encoded {n} images of {data.train_split!r} to {lat.latent_shape} in {seconds:.1f} s "
          f"({n / seconds:.0f} images/s, decoded {how}) -> {directory}", flush=True)
    return lat, (torch.cat(zs) if load else None)


@torch.no_grad()
def encode_together(stacked_encoder: torch.nn.Module, checkpoints: Sequence[tuple[str, str]], ds: Dataset,
                    data: DataConfig, device: torch.device | str, decode: str = IN_PROCESS,
                    heartbeat_s: float = HEARTBEAT_S,
                    timer: Callable[[str], contextlib.AbstractContextManager] | None = None,
                    keep: dict[int, torch.Tensor] | None = None) -> list[int]:
    """Store the training latents of K autoencoders in one pass over the split: `stacked_encoder` holds their K
    encoders as one (ulsweep/models/stacked.py), `checkpoints` each one's (checkpoint, SHA-256 of its state).
    The images are read and decoded once, and every encoder batch goes through the stacked encoder once per
    member (K*ENCODE_BATCH rows), where K base trials alone would each decode and encode the split. Only the
    members whose latents are not stored and whose lease this process gets are encoded (and only when that is
    more than one: one alone encodes as `training_latents` does); the others are left to `training_latents`,
    which reads them or waits for whoever encodes them. The members' writers run in threads beside the encoder
    (STORE_THREADS, at most STORE_AHEAD batches behind); a writer's error fails the whole encoding, and nothing
    of it is published. `timer`: as `encode_split`'s, its `encode_store` the copy of each batch to the host and
    the waits for the writers. `keep`: a dict that gets the latents of the members it stored, float32 (N, C, h,
    w) on `device`, the values it stored (a group that trains from device memory need not read them back).
    Returns the members it stored."""
    k = len(checkpoints)
    todo: list[tuple[int, LatentsKey, LatentWriter]] = []
    with contextlib.ExitStack() as held:
        for i, (ckpt, sha) in enumerate(checkpoints):
            key = LatentsKey(sha, ds.content_hash, data.train_split, data.image_size)
            directory = latents_dir(ckpt, key)
            if read_latents(directory, key)[0] is not None:
                continue
            try:
                lease = Lease.claim(uio.join(directory, LOCK), heartbeat_s,
                                    job=f"encoding {data.train_split} of {data.path} with {k - 1} others")
            except PermissionError:  # a read-only checkpoint directory: training_latents encodes it alone
                continue
            if lease is None:  # another process encodes it
                continue
            held.enter_context(lease)
            if read_latents(directory, key)[0] is not None:  # published between our look and our claim
                continue
            todo.append((i, key, LatentWriter(directory, lease.token)))
        if len(todo) < 2:
            return []
        t0 = time.perf_counter()
        members = torch.tensor([i for i, *_ in todo], device=device)
        kept: torch.Tensor | None = None  # (stored members, N, C, h, w), filled batch by batch with `keep`
        done = 0
        # the writers (Parquet, SHA-256, the files: CPU work, most of the 8.3 s of `encode_store` for lf_sweep's
        # 18 members on one H100, session 27) run in STORE_THREADS threads beside the encoder, each member's
        # batches in order in one of them, at most STORE_AHEAD batches behind it
        stores = [ThreadPoolExecutor(1, thread_name_prefix="latent-store") for _ in range(STORE_THREADS)]
        pending: collections.deque[list[Future]] = collections.deque()

        def drain(behind: int) -> None:  # wait for the writers until at most `behind` batches are pending
            while len(pending) > behind:
                for f in pending.popleft():
                    f.result()

        def sink(z: torch.Tensor) -> None:
            nonlocal kept, done
            ours = z.unflatten(0, (k, -1))[members]
            if keep is not None:
                total = ds.splits[data.train_split]
                if kept is None:
                    kept = torch.empty((len(todo), total, *z.shape[1:]), device=z.device)
                if done + ours.shape[1] > total:  # as encode_split says at its end, before the copy fails
                    raise DataError(f"{ds.uri}: split {data.train_split!r} gave more images than the manifest's "
                                    f"{total}")
                kept[:, done:done + ours.shape[1]] = ours
                done += ours.shape[1]
            rows = ours.cpu().numpy()  # one copy of the stored members' rows
            pending.append([stores[j % len(stores)].submit(writer.add, rows[j])
                            for j, (_, _, writer) in enumerate(todo)])
            drain(STORE_AHEAD)

        try:
            n = encode_split(lambda x: stacked_encoder(x.repeat(k, 1, 1, 1)), ds, data.train_split,
                             data.image_size, device, sink, decode=decode, timer=timer)
            with (timer or _untimed)("encode_store"):
                drain(0)
            seconds = time.perf_counter() - t0
            for i, key, writer in todo:
                writer.finish(key, _provenance(checkpoints[i][0], ds, n, seconds, decode, device, stacked=k))
            if keep is not None and kept is not None:
                keep.update({i: kept[j] for j, (i, *_) in enumerate(todo)})
        except BaseException:
            for store in stores:  # nothing writes any more when the unpublished files go
                store.shutdown(wait=True, cancel_futures=True)
            for _, _, writer in todo:
                _remove_unpublished(writer.directory, writer.token)
            raise
        finally:
            for store in stores:
                store.shutdown(wait=True)
    print(f"[latents] encoded {n} images of {data.train_split!r} for {len(todo)} autoencoders at once in "
          f"{seconds:.1f} s ({n / seconds:.0f} images/s each)", flush=True)
    return [i for i, *_ in todo]


def _provenance(ae_checkpoint: str, ds: Dataset, n: int, seconds: float, decode: str, device, **encoder) -> dict:
    """The manifest's record of how the latents were made: from which checkpoint and data, how fast, where the
    images were decoded, and the encoder's device, batch and torch (`encoder`: more about it, e.g. stacked=K)."""
    return {"ae_checkpoint": ae_checkpoint, "data_uri": ds.uri, "encode_seconds": seconds, "images_per_s": n / seconds,
            **_decode_info(decode), "encoder": {"device": str(torch.device(device)), "batch": ENCODE_BATCH,
                                                "torch": torch.__version__, **encoder}}


def _decode_info(decode: str) -> dict:
    """The manifest's record of where the images were decoded: the path, and the Ray cluster's CPUs for
    `ray-data`."""
    if decode != RAY_DATA:
        return {"decode": decode}
    from ulsweep.data.stream import data_cpus

    return {"decode": decode, "ray_cpus": data_cpus()}


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
    split = f"latents {lat.manifest['split']}"
    items = [{"uri": uri, "sha256": sh["sha256"], "num_rows": sh["num_rows"], "split": split}
             for uri, sh in zip(lat.shard_uris, lat.manifest["shards"])]
    per_rank = [sum(it["num_rows"] for it in items[r::rt.world]) for r in range(rt.world)]
    rows = min(per_rank)
    if rows < batch_size // rt.world:
        raise DataError(f"{lat.uri}: {len(items)} latent shard(s) over {rt.world} worker(s) leave {rows} rows "
                        f"per worker, less than one batch of {batch_size // rt.world}")
    row_bytes, local = 4 * int(np.prod(lat.latent_shape)), max(1, batch_size // rt.world)
    pipe = stream.build_pipeline(items[rt.rank::rt.world], ("z",), DecodeLatents(lat.latent_shape, lat.uri),
                                 stream.block_rows(local, row_bytes))
    if rt.world > 1 and per_rank[rt.rank] > rows:
        pipe = pipe.limit(rows)
    pipe.context.execution_options = stream.execution_options(row_bytes, local)
    return stream.StreamSource(pipe, rows * rt.world, rt, seed, lambda b: b["z"], label=lat.uri)
