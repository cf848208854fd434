"""The work of an image-folder import that runs in its process pool (`ulsweep.data.folder`): reading headers
to decide the channels, and writing one shard with its done marker. Jobs are plain dicts and tuples, so a
worker process needs nothing from the parent but this module."""
from __future__ import annotations

import hashlib
import json
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import get_context
from typing import Any, Callable

import numpy as np

from ulsweep import io as uio
from ulsweep.data.manifest import DataError, filesystem
from ulsweep.data.shards import shard_bytes

WORK_DIR = "_import"


def marker_rel(split: str, k: int) -> str:
    """Where shard k of `split` records that it is done, relative to the dataset root."""
    return f"{WORK_DIR}/{split}/part-{k:05d}.json"


def shard_rel(split: str, k: int) -> str:
    return f"{split}/part-{k:05d}.parquet"


def probe_colour(job: tuple[str, list[str]]) -> tuple[int, Counter, int]:
    """For a job (source URI, relative paths): (number of files with colour, Counter of the modes of the
    readable headers, number of files). Unreadable headers are left to the shard pass, which lists them."""
    src, rels = job
    from PIL import Image

    from ulsweep.data.images import is_colour

    fs, root = filesystem(src)
    colour, modes = 0, Counter()
    for r in rels:
        try:
            with fs.open(uio.join(root, r), "rb") as f, Image.open(f) as img:
                modes[img.mode] += 1
                colour += is_colour(img)
        except Exception:  # counted as bad by the shard that holds it
            pass
    return colour, modes, len(rels)


def _reason(e: Exception) -> str:
    """Why a file is bad, without Pillow's repr of the file object (it holds a memory address)."""
    from PIL import UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):
        return "UnidentifiedImageError: not an image format Pillow can identify"
    return f"{type(e).__name__}: {e}"


def write_shard(job: dict) -> dict:
    """Read, convert and encode one shard's files, write the shard file and then its done marker, both
    atomically; returns the marker: {file, num_rows, sha256, size, bad: [[rel, reason]], conversions}."""
    from ulsweep.data.images import open_image, prepare

    fs_in, root_in = filesystem(job["src"])
    fs_out, root_out = filesystem(job["out"])
    size, channels = job["image_size"], job["channels"]
    pixels, labels, bad, kinds = [], [], [], Counter()
    for rel, label in job["items"]:
        try:
            arr, kind = prepare(open_image(fs_in, uio.join(root_in, rel)), size, channels)
        except Exception as e:  # Pillow raises many kinds (UnidentifiedImageError, OSError, SyntaxError, ...)
            bad.append([rel, _reason(e)])
            continue
        pixels.append(arr)
        labels.append(label)
        kinds[kind] += 1
    file = shard_rel(job["split"], job["index"])
    marker: dict[str, Any] = {"file": file, "num_rows": len(pixels), "bad": bad, "conversions": dict(kinds)}
    if pixels:
        data = shard_bytes(np.stack(pixels), np.asarray(labels, np.int64), job["encoding"], job["quality"])
        uio.write_atomic(fs_out, uio.join(root_out, file), data)
        marker.update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    marker_path = uio.join(root_out, marker_rel(job["split"], job["index"]))
    uio.write_atomic(fs_out, marker_path, json.dumps(marker).encode())
    return marker


def _context():
    """Processes forked from a fork server that has imported this module and Pillow once: a plain fork
    could copy locks held by the parent's threads, spawning imports them again in every worker. Nothing
    the workers import needs torch (`ulsweep.data` imports its modules lazily)."""
    from multiprocessing import get_all_start_methods

    if "forkserver" not in get_all_start_methods():
        return get_context("spawn")
    ctx = get_context("forkserver")
    ctx.set_forkserver_preload(["ulsweep.data.folder_jobs", "ulsweep.data.images", "PIL.Image"])
    return ctx


class Pool:
    """A lazily started pool of `workers` processes (none for workers = 1: jobs then run here).

        with Pool(4) as pool:
            for result in pool.unordered(fn, jobs): ...

    Leaving `unordered` early (an exception in the caller) cancels its jobs not yet started; leaving the
    `with` waits for the running ones, which finish their shard and its marker."""

    def __init__(self, workers: int):
        self.workers, self.ex = workers, None

    def unordered(self, fn: Callable[[Any], Any], jobs: list):
        """Yield fn(job) for every job, in the order they finish."""
        if self.workers == 1 or len(jobs) <= 1:
            for job in jobs:
                yield fn(job)
            return
        if self.ex is None:
            self.ex = ProcessPoolExecutor(max_workers=self.workers, mp_context=_context())
        futures = [self.ex.submit(fn, job) for job in jobs]
        try:
            for fut in as_completed(futures):
                try:
                    yield fut.result()
                except BrokenProcessPool as e:
                    raise DataError("an import worker process died (killed, out of memory?); rerun the same "
                                    "import to resume it") from e
        finally:
            for fut in futures:
                fut.cancel()

    def __enter__(self) -> "Pool":
        return self

    def __exit__(self, *exc) -> None:
        if self.ex is not None:
            self.ex.shutdown(wait=True, cancel_futures=True)
