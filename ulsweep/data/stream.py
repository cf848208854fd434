"""Stage-1 batches streamed through Ray Data, for splits too large to hold on the training device.

    shard list (manifest) -> ReadShards (CPU task per shard: read, SHA-256 check, row chunks of whole batches)
                          -> decode (CPU tasks: `DecodeImages`, or any other row decoder)
                          -> streaming_split over the Ray Train ranks (`ray.train.get_dataset_shard`), or into
                             one part when the training process got the pipeline itself (`StreamSource`)
                          -> iter_torch_batches (drop_last, local shuffle seeded per epoch, prefetch, pinned memory)
                          -> `StreamSource.draw` (to the model's range, horizontal flips from the run's generator)

Processes. The decode tasks run in Ray workers, and the pipeline's scheduler (Ray Data's streaming executor)
in the split's coordinator actor: never in the training process. The executor's scheduling loop is Python
that busy-polls while the pipeline is backpressured (the steady state whenever decoding outpaces training);
run as a thread of the training process (what iterating a Dataset does) it took the GIL from the training
loop at every op or kernel launch that released it: on one H200 the compiled paper-preset step at 256^2 went
from 74.6 ms to 1185 ms on synthetic tensors while a backpressured stream merely stood open in the process
(benchmarks/results/h200-data-pipeline-step-256-s11.log), and on CPU fixed torch work ran 30-85% slower
(benchmarks/data_pipeline.py, consumer rows). A `StreamSource` therefore turns a Dataset it is handed into
`streaming_split(1)`, the mechanism Ray Train uses for its workers; the training process keeps only the
iterator's prefetch threads. The loop polls on in the coordinator: up to one core of the machine (0.6
measured on a 2-core box) while backpressured, no longer taken from the training loop.

Epoch. One pass over the split: Ray Train splits the stream into N equal parts (`equal=True`: each rank gets
floor(n / N) rows) and each rank batches its part into `batch / N` rows, dropping the last incomplete batch, so
an epoch is floor(floor(n / N) / (batch / N)) steps on every rank. The global batch is `train.batch_size` for
any N, the union of the ranks' batches; the loss is its mean (DDP averages equal-sized rank gradients).

Order. The shard order and the rows within a shard are the same every epoch; what changes per epoch is the
local shuffle of `iter_torch_batches` (a buffer of SHUFFLE_BATCHES batches, seeded by (seed, epoch, rank)).
With `preserve_order` the pipeline's output, the split between ranks and so every rank's batches are a
function of (dataset, N, batch, seed, epoch): a resumed run replays its epoch from the start and skips the
batches it had already trained on, and continues with exactly the batches of the uninterrupted run (tested).
The skip costs reading at most one epoch again. A resume with another number of workers or batch size
continues at the same epoch and step with another order (approximate; it says so).

Memory. Blocks hold whole batches of one rank (`block_rows`: as many as fit in BLOCK_BYTES, at least one).
The pipeline runs under an object-store limit (`execution_options`) of BLOCKS_PER_CPU blocks per CPU of the
Ray cluster (at least INFLIGHT_BLOCKS) plus twice the prefetched and shuffle-buffered batches: a function of
the CPU count, so that every CPU can decode while the blocks already decoded wait for the trainer. A read
task holds one shard's file bytes, and the training process holds the shuffle buffer and `PREFETCH_BATCHES`
batches: O(prefetch) batches plus O(CPUs) blocks, never the split.

Other row types (e.g. stage 2's float32 latents) plug in as another `decode` callable and `to_batch` function.
"""
from __future__ import annotations

import hashlib
import math
import os
import re
import sys
import warnings
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ulsweep import io as uio
from ulsweep.data.codec import CodecError, decode_images
from ulsweep.data.manifest import DataError, filesystem, where

if TYPE_CHECKING:  # the decode tasks unpickle this module's UDFs in every Ray worker: they import no torch
    import torch

    from ulsweep.data.reader import Dataset

SHUFFLE_BATCHES = 8  # local shuffle buffer, in batches of this rank
# Batches fetched ahead of the training step (per rank). The shuffle buffer refills in bursts: once half of it
# has been drawn it takes SHUFFLE_BATCHES + 2 batches' worth of blocks at once (Ray's ShufflingBatcher), and
# a prefetch window shorter than that burst stalls the step at every refill.
PREFETCH_BATCHES = SHUFFLE_BATCHES + 4
BLOCK_BYTES = 8 * 2**20  # most decoded bytes per Ray Data block, unless one batch is larger (`block_rows`)
BLOCKS_PER_CPU = 4  # object-store limit of the pipeline, in blocks per CPU of the Ray cluster ...
INFLIGHT_BLOCKS = 8  # ... and at least this many
SMALL_SPLIT_BYTES = 2**30  # `data.loader: auto` never streams a split whose decoded float32 size is below this


def decoded_bytes(num_images: int, channels: int, image_size: int) -> int:
    """Bytes of a split decoded to float32 at the model's size (what the device path holds)."""
    return num_images * channels * image_size * image_size * 4


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    """The local-shuffle seed of one rank's epoch (32 bits, stable across processes)."""
    return int(np.random.SeedSequence([seed, epoch, rank]).generate_state(1)[0])


# ----------------------------------------------------------------------------------------------
# CPU side: Ray Data tasks


def block_rows(batch_rows: int, row_bytes: int) -> int:
    """Rows per Ray Data block: whole batches of `batch_rows` rows, as many as fit in BLOCK_BYTES (at least
    one), so that a batch never straddles two blocks."""
    return batch_rows * max(1, BLOCK_BYTES // (batch_rows * row_bytes))


def data_cpus() -> int:
    """CPUs the pipeline may decode on: the connected Ray cluster's, else this machine's."""
    import ray

    if ray.is_initialized():
        return max(1, int(ray.cluster_resources().get("CPU", 1)))
    return os.cpu_count() or 1


def shard_items(ds: Dataset, split: str) -> list[dict]:
    """One item per shard of `split`: its URI, SHA-256 and row count (the input rows of `ReadShards`)."""
    info = ds._split_info(split)
    return [{"uri": uio.join(ds.uri, sh["file"]), "sha256": sh["sha256"], "num_rows": sh["num_rows"],
             "split": split} for sh in info["shards"]]


class ReadShards:
    """Ray Data UDF (batch_size=1): read one shard whole, check its SHA-256 against the manifest, yield its
    `columns` in tables of `block_rows` rows. A missing, changed or malformed shard is a DataError naming it."""

    def __init__(self, columns: tuple[str, ...], block_rows: int):
        self.columns, self.block_rows = columns, block_rows

    def __call__(self, item: dict[str, np.ndarray]) -> Iterator[pa.Table]:
        uri, sha, rows, split = (item[k][0] for k in ("uri", "sha256", "num_rows", "split"))
        at = where(uri, split)
        fs, path = filesystem(uri)
        try:
            data = fs.cat_file(path)
        except FileNotFoundError as e:
            raise DataError(f"{at}: shard file is missing (deleted after the manifest was written?)") from e
        except Exception as e:  # OSError, botocore's NoCredentialsError, ...
            raise DataError(f"{at}: cannot read ({type(e).__name__}: {e})") from e
        got = hashlib.sha256(data).hexdigest()
        if got != sha:
            raise DataError(f"{at}: SHA-256 mismatch: manifest says {sha}, file has {got} "
                            "(shard changed or corrupted since the dataset was written)")
        try:
            table = pq.read_table(pa.BufferReader(data), columns=list(self.columns))
        except (pa.ArrowException, OSError, ValueError) as e:
            raise DataError(f"{at}: not a readable Parquet file with columns {list(self.columns)} "
                            f"({type(e).__name__}: {e})") from e
        if table.num_rows != rows:
            raise DataError(f"{at}: file has {table.num_rows} rows, manifest says {rows}")
        del data
        for start in range(0, table.num_rows, self.block_rows):
            yield table.slice(start, self.block_rows).combine_chunks()


class DecodeImages:
    """Ray Data UDF: the `image` column (bytes per row, in the dataset's encoding) -> {"image": uint8
    (n, C, H, W)}. Rows of another shape are a DataError."""

    def __init__(self, encoding: str, shape: tuple[int, int, int], dataset_uri: str):
        self.encoding, self.shape, self.uri = encoding, tuple(shape), dataset_uri

    def __call__(self, batch: pa.Table) -> dict[str, np.ndarray]:
        values = batch.column("image").to_pylist()
        try:
            return {"image": decode_images(values, self.encoding, self.shape)}
        except CodecError as e:
            raise DataError(f"{self.uri}: image does not match the manifest's {self.encoding} "
                            f"{self.shape[0]}x{self.shape[1]}x{self.shape[2]}: {e}") from e


def build_pipeline(items: list[dict], columns: tuple[str, ...], decode: Callable, block_rows: int):
    """The lazy Ray Data pipeline over shard `items` (dicts of uri, sha256, num_rows, split; see `shard_items`):
    verified row chunks of `block_rows` rows holding `columns` -> `decode` (a Ray Data UDF taking a pyarrow
    table). Nothing runs until iterated."""
    import ray.data

    pipe = ray.data.from_items(items, override_num_blocks=len(items))
    pipe = pipe.map_batches(ReadShards(columns, block_rows), batch_size=1, batch_format="numpy")
    return pipe.map_batches(decode, batch_size=None, batch_format="pyarrow")


def build_dataset(ds: Dataset, split: str, batch_rows: int, decode: Callable | None = None,
                  columns: tuple[str, ...] = ("image",), row_bytes: int | None = None):
    """The lazy Ray Data pipeline of one split: shards -> verified row chunks -> `decode` (default: images to
    uint8). `row_bytes`, the decoded bytes of one row, and `batch_rows`, the rows of one rank's batch, set the
    block size (`block_rows`). Nothing runs until iterated."""
    C, H, W = ds.image_shape
    decode = decode or DecodeImages(ds.encoding, (C, H, W), ds.uri)
    return build_pipeline(shard_items(ds, split), columns, decode, block_rows(batch_rows, row_bytes or C * H * W))


def execution_options(row_bytes: int, batch_rows: int, cpus: int | None = None):
    """Ray Data options of a training stream: deterministic order (so that a resume replays an epoch exactly)
    and an object-store limit of max(INFLIGHT_BLOCKS, BLOCKS_PER_CPU * `cpus`) blocks of `block_rows` rows
    plus twice the prefetched and shuffle-buffered batches. `cpus`: the CPUs the pipeline decodes on
    (default: `data_cpus()`)."""
    return ordered_options(block_rows(batch_rows, row_bytes) * row_bytes,
                           (PREFETCH_BATCHES + SHUFFLE_BATCHES) * batch_rows * row_bytes, cpus)


def ordered_options(block_bytes: int, held_bytes: int, cpus: int | None = None):
    """Ray Data options of an ordered pipeline (`preserve_order`) under an object-store limit of
    max(INFLIGHT_BLOCKS, BLOCKS_PER_CPU * `cpus`) blocks of `block_bytes` bytes plus twice `held_bytes`, the
    bytes the consumer holds ahead (prefetched, shuffle-buffered). `cpus`: the CPUs the pipeline decodes on
    (default: `data_cpus()`)."""
    from ray.data import ExecutionOptions, ExecutionResources

    cpus = cpus or data_cpus()
    inflight = max(INFLIGHT_BLOCKS, BLOCKS_PER_CPU * cpus) * block_bytes + 2 * held_bytes
    return ExecutionOptions(preserve_order=True, resource_limits=ExecutionResources(object_store_memory=inflight))


def image_dataset(ds: Dataset, split: str, batch_rows: int, cpus: int | None = None):
    """(the image pipeline of `split` with its execution options applied, those options): what a trainer is
    handed (the options once more for its DataConfig, which replaces the dataset's own). `batch_rows`: rows
    of one rank's batch; `cpus`: see `execution_options`."""
    row = math.prod(ds.image_shape)
    opts = execution_options(row, batch_rows, cpus)
    pipe = build_dataset(ds, split, batch_rows, row_bytes=row)
    pipe.context.execution_options = opts
    return pipe, opts


def local_dataset(ds: Dataset, split: str, batch_rows: int):
    """The image pipeline for a process outside Ray Train (`ulsweep train ae`, Ray Train's local mode inside
    Tune); starts a local Ray if none is running."""
    ensure_ray()
    return image_dataset(ds, split, batch_rows)[0]


def ensure_ray() -> None:
    """Start a local Ray in this process unless one is connected (inside trials it always is)."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)


# ----------------------------------------------------------------------------------------------
# training side: the batch source


# what Ray Data appends to the message of an exception its task raised (ray/data/_internal/util.py)
_RAY_RETRY_NOTE = re.compile(r"\nFailed to .* after \d+/\d+ attempts \(total backoff .*", re.S)


def data_error_in(e: BaseException) -> DataError | None:
    """The DataError a failed Ray task raised, found behind the exception Ray raised for it, as a DataError
    of the task's own message (naming the file); None when there is none. Ray wraps the task's error in a
    `RayTaskError(DataError)`, itself a DataError but whose text is the task's traceback, and Ray Data appends
    a note on retries to the message: the innermost DataError is taken, without that note."""
    seen, found = set(), None
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, DataError):
            found = e
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return None if found is None else DataError(_RAY_RETRY_NOTE.sub("", str(found)))


def raising_data_errors(batches: Iterable) -> Iterator:
    """The items of `batches` (a Ray Data iterable); a failed task's DataError is raised as itself, naming
    the file (`data_error_in`), not as Ray's wrapper."""
    try:
        yield from batches
    except Exception as e:
        err = data_error_in(e)
        if err is None:
            raise
        raise err from e


def out_of_process(shard):
    """A DataIterator over `shard` whose streaming executor runs outside this process: a Dataset becomes the
    one part of `streaming_split(1)` (its executor then runs in the split's coordinator actor); a DataIterator
    (Ray Train's split, or one the caller chose) is returned as it is."""
    import ray.data

    if isinstance(shard, ray.data.Dataset):
        return shard.streaming_split(1, equal=True)[0]
    return shard


class StreamSource:
    """Batches of this rank from a Ray Data stream (`shard`: a DataIterator from `ray.train.get_dataset_shard`,
    or a Dataset, whose executor is then moved out of this process: `out_of_process`). `draw` returns this
    rank's `batch_size / world` rows (`local_batches`), moved to the device and brought to the model by
    `to_batch`; with `hflip` each image is mirrored left-right with probability 1/2, decided by the run's
    generator for the whole global batch (the same draws on every rank and on the device path).
    `state_dict()` (epoch, step in epoch, seed, layout) goes into checkpoints. `prefetch` and `shuffle`
    (batches; default PREFETCH_BATCHES and SHUFFLE_BATCHES) are for benchmarks: the shuffle is part of the
    order a resume reproduces."""

    local_batches = True

    def __init__(self, shard, num_rows: int, rt, seed: int, to_batch: Callable[[dict], torch.Tensor],
                 hflip: bool = False, label: str = "stream", prefetch: int = PREFETCH_BATCHES,
                 shuffle: int = SHUFFLE_BATCHES):
        self.shard, self.num_rows, self.rt, self.seed = out_of_process(shard), num_rows, rt, seed
        self.to_batch, self.hflip, self.label = to_batch, hflip, label
        self.prefetch, self.shuffle = prefetch, shuffle
        self.epoch, self.step_in_epoch = 0, 0
        self._skip = 0  # batches of the current epoch to read and drop before the next draw (resume)
        self._it = None
        self._batch = None  # global batch size the running epoch was started with

    def steps_per_epoch(self, batch_size: int) -> int:
        per_rank = self.num_rows // self.rt.world
        return per_rank // (batch_size // self.rt.world)

    def _start_epoch(self, batch_size: int) -> None:
        k = batch_size // self.rt.world
        cuda = self.rt.device.type == "cuda"
        self._it = raising_data_errors(self.shard.iter_torch_batches(
            batch_size=k, drop_last=True, prefetch_batches=self.prefetch,
            local_shuffle_buffer_size=self.shuffle * k if self.shuffle else None,
            local_shuffle_seed=epoch_seed(self.seed, self.epoch, self.rt.rank),
            device=self.rt.device if cuda else "cpu", pin_memory=cuda))
        self._batch = batch_size

    def _next(self, batch_size: int) -> dict:
        if batch_size % self.rt.world:
            raise ValueError(f"global batch {batch_size} is not divisible by the {self.rt.world} workers")
        if self.steps_per_epoch(batch_size) < 1:
            raise DataError(f"{self.label}: {self.num_rows} rows over {self.rt.world} worker(s) do not fill "
                            f"one batch of {batch_size}")
        while True:
            if self._it is None:
                self._start_epoch(batch_size)
            try:
                out = next(self._it)
            except StopIteration:
                self.epoch, self.step_in_epoch, self._it = self.epoch + 1, 0, None
                continue
            if self._skip:
                self._skip -= 1
                continue
            self.step_in_epoch += 1
            return out

    def draw(self, batch_size: int, gen: torch.Generator) -> torch.Tensor:
        import torch

        x = self.to_batch(self._next(batch_size))
        if self.hflip:
            mask = torch.rand(batch_size, generator=gen, device=gen.device) < 0.5
            k = batch_size // self.rt.world
            x = flip_where(x, mask[self.rt.rank * k:(self.rt.rank + 1) * k].to(x.device))
        return x

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "seed": self.seed,
                "world": self.rt.world, "num_rows": self.num_rows, "batch": self._batch}

    def load_state_dict(self, state: dict | None, batch_size: int) -> None:
        """Continue at the checkpoint's epoch and step: the epoch restarts and its first `step_in_epoch`
        batches are read and dropped."""
        if not state:
            return
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self._skip, self._it = self.step_in_epoch, None
        if self.step_in_epoch >= self.steps_per_epoch(batch_size):  # saved at an epoch's last step
            self.epoch, self.step_in_epoch, self._skip = self.epoch + 1, 0, 0
        same = (state.get("seed"), state.get("world"), state.get("num_rows"), state.get("batch")) == (
            self.seed, self.rt.world, self.num_rows, batch_size)
        if not same:
            warnings.warn(f"{self.label}: the checkpoint streamed with seed/workers/rows/batch "
                          f"{state.get('seed')}/{state.get('world')}/{state.get('num_rows')}/{state.get('batch')}, "
                          f"this run with {self.seed}/{self.rt.world}/{self.num_rows}/{batch_size}: continuing at "
                          f"epoch {self.epoch} step {self.step_in_epoch} in another order")

    def close(self) -> None:
        it, self._it = self._it, None
        if it is not None and hasattr(it, "close"):
            it.close()


def flip_where(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x (B, C, H, W) with the images where `mask` (B,) is True mirrored left-right."""
    import torch

    return torch.where(mask.view(-1, *([1] * (x.ndim - 1))), x.flip(-1), x)


def say(line: str) -> None:
    print(line, file=sys.stdout, flush=True)
