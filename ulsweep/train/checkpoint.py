"""A training run's directory: `config.yaml`, `checkpoints/step_XXXXXXXX/{state.pt, meta.json}`,
`images/*.png` and, once the run has finished, `result.json`.

Checkpoints: a directory `step_XXXXXXXX/` holding `state.pt` and `meta.json`.

`meta.json` is written last and records the SHA-256 of `state.pt`: a checkpoint without a manifest,
or whose state does not match its hash, is never loaded (truncated or corrupted files are refused).
`state.pt` holds only tensors and plain Python data and is read with `torch.load(weights_only=True)`.

torch is imported where a state is written or read: the rest (manifests, results) serves processes that never
load a network, such as a stacked member's trial process (ulsweep/sweep/stacking.py).
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import threading
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ulsweep import io as uio
from ulsweep.train.hooks import StageResult

if TYPE_CHECKING:
    import torch

FORMAT = "ulsweep-checkpoint-v1"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names its path."""


@dataclass(frozen=True)
class CheckpointInfo:
    path: str  # the step directory
    step: int
    meta: dict


def step_dir(run_dir: str, step: int) -> str:
    return uio.join(run_dir, "checkpoints", f"step_{step:08d}")


def save_checkpoint(run_dir: str, step: int, state: dict[str, Any], meta: dict[str, Any]) -> str:
    """Write state then manifest atomically; return the checkpoint directory."""
    import torch

    d = step_dir(run_dir, step)
    # torch.save given a path (a local run directory) writes it without holding the GIL for its bytes
    digest, size = uio.write_atomic_with(uio.join(d, "state.pt"), lambda target: torch.save(state, target))
    _write_manifest(d, {"format": FORMAT, "step": step, "sha256": digest, "bytes": size, **meta})
    return d


def _write_manifest(path: str, manifest: dict[str, Any]) -> None:
    uio.atomic_write_text(uio.join(path, "meta.json"), json.dumps(manifest, indent=1, sort_keys=True))


def update_meta(path: str, **fields: Any) -> None:
    """The manifest of checkpoint `path` with `fields` set (atomically; its state and SHA-256 as they are): a
    group's member checkpoint is written before its final evaluation and gets its metrics after it."""
    _write_manifest(path, read_meta(path) | fields)


def _map(state: Any, fn: Callable) -> Any:
    """`state` with `fn` applied to each of its tensors, in dicts, lists and tuples; other values as they are
    (numbers, strings, None: immutable)."""
    import torch

    if isinstance(state, torch.Tensor):
        return fn(state)
    if isinstance(state, dict):
        return {k: _map(v, fn) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_map(v, fn) for v in state)
    return state


def _tensors(state: Any) -> list:
    found: list = []
    _map(state, found.append)
    return found


def to_host(state: Any) -> Any:
    """A copy of `state` in host memory that shares no storage with it: training updates the weights, the EMA and
    the optimizer's moments in place (and the learning rate in its param groups) while a copy is being written.
    GPU tensors go through `device_to_host`."""
    return _map(state, device_to_host)


STAGING_BYTES = 128 << 20  # the pinned buffer a thread's device -> host copies go through (`device_to_host`)
_staging = threading.local()


def device_to_host(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` in (pageable) host memory. A GPU tensor is copied in pieces through a pinned buffer of
    STAGING_BYTES, one a thread, kept for its next copies: each piece by DMA on the current stream, then into place
    on the host. A copy straight into pageable memory holds up the kernel launches of other threads while the
    driver stages it (one H100, benchmarks/checkpoint_pause.py: 6.6 GB copied in a thread beside a training thread
    cost it 2.4-3.1 s of 5 s of steps; through a pinned buffer, none: `h100-checkpoint-pause-*-s42.json`); pinning
    the whole destination costs as much the first time (cudaHostAlloc)."""
    import torch

    if t.device.type != "cuda":
        return t.detach().to("cpu", copy=True)
    src = t.detach().contiguous()
    out = torch.empty(src.shape, dtype=src.dtype)
    a, b = src.reshape(-1).view(torch.uint8), out.reshape(-1).view(torch.uint8)
    stage = getattr(_staging, "buffer", None)
    if stage is None or stage.numel() < min(STAGING_BYTES, a.numel()):
        stage = _staging.buffer = torch.empty(min(STAGING_BYTES, max(a.numel(), 1 << 20)), dtype=torch.uint8,
                                              pin_memory=True)
    stream = torch.cuda.current_stream(src.device)
    for i in range(0, a.numel(), stage.numel()):
        n = min(stage.numel(), a.numel() - i)
        stage[:n].copy_(a[i:i + n], non_blocking=True)
        stream.synchronize()  # this piece is in the buffer: into place, and the buffer free for the next
        b[i:i + n].copy_(stage[:n])
    return out


DEVICE_SNAPSHOT_SHARE = 0.5  # a snapshot stays on its GPU when it takes at most this share of what is free there


def snapshot(state: Any) -> tuple[Any, Any]:
    """(copy, event): a copy of `state` that training's in-place updates do not reach, made without waiting for a
    device -> host copy where it can be. When its CUDA tensors are on one GPU and take at most
    DEVICE_SNAPSHOT_SHARE of the memory free there (the driver's free memory and what torch's allocator holds
    unused), they are cloned on the GPU, queued on the current stream, `event` recorded after them, and its CPU
    tensors (generator states, step counts) cloned here: milliseconds, where a host copy of a stacked group's 6.6 GB
    held the training thread for seconds (`host_copy` makes it later, in the writer's thread). Else the host copy,
    made here, and event None."""
    import torch

    on_gpu = [t for t in _tensors(state) if t.device.type == "cuda"]
    devices = {t.device for t in on_gpu}
    if len(devices) != 1:
        return to_host(state), None
    device = devices.pop()
    free = torch.cuda.mem_get_info(device)[0] + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    if sum(t.numel() * t.element_size() for t in on_gpu) > DEVICE_SNAPSHOT_SHARE * free:
        return to_host(state), None
    copy = _map(state, lambda t: t.detach().clone())
    event = torch.cuda.Event()
    event.record()
    return copy, event


@contextlib.contextmanager
def copy_stream(device: torch.device, after: Any = None):
    """On a GPU, the copies made inside run on a CUDA stream of their own, after `after` (a CUDA event) or else
    after everything queued so far on the default stream (where the loop computed the state; ulsweep uses no
    other): copies to host memory then neither wait for the kernels another thread queues after them nor hold
    those up, as they would on the one default stream. A blocking copy to the host waits for its own stream only.
    Elsewhere, nothing."""
    import torch

    if device.type != "cuda":
        yield
        return
    stream = torch.cuda.Stream(device)
    if after is not None:
        stream.wait_event(after)
    else:
        stream.wait_stream(torch.cuda.default_stream(device))
    with torch.cuda.stream(stream):
        yield


def host_copy(copy: Any, event: Any) -> Any:
    """`snapshot`'s copy in host memory: a device snapshot is copied on a CUDA stream of its own once `event` is
    done, beside the kernels training queues meanwhile on its stream; its copies are done when this returns
    (`device_to_host` waits for each piece), so that the caller may let its device memory go."""
    if event is None:
        return copy
    with copy_stream(next(t.device for t in _tensors(copy) if t.device.type == "cuda"), after=event):
        return to_host(copy)


def _save_snapshot(run_dir: str, step: int, held: list, event: Any, meta: dict) -> str:
    """`held`: [the snapshot], emptied here. A device snapshot's memory goes once it is in host memory, not after
    the write, and back to the driver (`torch.cuda.empty_cache`: the cached blocks this process does not use),
    where other processes on the GPU would otherwise find it taken for the rest of the run (lf_sweep's base group
    encodes beside the autoencoders' evaluation: 68.6 of an H100's 80 GB at its peak in session 41, before the
    snapshot's 6.6 GB)."""
    copy = held.pop()
    host = host_copy(copy, event)
    del copy
    if event is not None:
        import torch

        torch.cuda.empty_cache()
    return save_checkpoint(run_dir, step, host, meta)


class CheckpointWriter:
    """Checkpoints written in a thread while training goes on. `save` takes a snapshot of the state (`snapshot`:
    clones on the GPU where they fit, else a copy in host memory) and returns; the copy to host memory, the
    serialization, SHA-256 and atomic write run beside the next steps. One write at a time: a second `save` first
    waits for the one before. `poll` (between steps) and `wait` hand a finished write's path to its `then` on the
    caller's thread; `close` waits for a write in flight without announcing it (the run is ending on an error:
    the checkpoint is on disk, and a retry finds it there)."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._job: tuple[Future, Callable[[str], None]] | None = None

    def save(self, run_dir: str, step: int, state: dict, meta: dict, then: Callable[[str], None]) -> None:
        self.wait()
        copy, event = snapshot(state)
        self._pool = self._pool or ThreadPoolExecutor(1, thread_name_prefix="ulsweep-checkpoint")
        self._job = (self._pool.submit(_save_snapshot, run_dir, step, [copy], event, meta), then)

    def poll(self) -> None:
        if self._job is not None and self._job[0].done():
            self.wait()

    def wait(self) -> None:
        """Wait for the write in flight, if any, and announce it (an error of the write is raised here)."""
        if self._job is not None:
            job, then = self._job
            self._job = None
            then(job.result())

    def close(self) -> None:
        if self._job is not None:
            job, self._job = self._job[0], None
            try:
                job.result()
            except Exception as e:  # noqa: BLE001 - the run is already failing; its own error goes on
                warnings.warn(f"a checkpoint written while the run failed did not complete: {e}")
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None


def read_meta(path: str) -> dict:
    try:
        meta = json.loads(uio.read_bytes(uio.join(path, "meta.json")))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no meta.json (checkpoint incomplete or not a checkpoint)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}/meta.json: not valid JSON ({e})") from None
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}/meta.json: unknown format {meta.get('format')!r} (expected {FORMAT!r})")
    return meta


def load_checkpoint(path: str, map_location: str | torch.device = "cpu") -> tuple[dict, dict]:
    """(state, meta) of the checkpoint directory `path`, after checking the SHA-256 of its state."""
    meta = read_meta(path)
    uri = uio.join(path, "state.pt")
    local = uio.is_local(uri)
    try:
        # a local file is hashed as it is read, in chunks, and torch.load then reads it from its path (its C++
        # reader, without the GIL); from a buffer it would call back into Python for every record
        blob = None if local else uio.read_bytes(uri)
        digest, size = uio.file_sha256(uri) if local else (hashlib.sha256(blob).hexdigest(), len(blob))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: state.pt is missing") from None
    if digest != meta["sha256"]:
        raise CheckpointError(f"{path}/state.pt: SHA-256 {digest[:12]}... does not match the manifest's "
                              f"{meta['sha256'][:12]}... ({size} of {meta.get('bytes')} bytes): "
                              "corrupted or truncated, refusing to load it")
    import torch

    source = uio.filesystem(uri)[1] if local else io.BytesIO(blob)
    state = torch.load(source, map_location=map_location, weights_only=True)
    return state, meta


def list_checkpoints(run_dir: str) -> list[CheckpointInfo]:
    """Complete checkpoints (with a manifest) under run_dir/checkpoints, oldest first."""
    out = []
    for name in uio.listdir(uio.join(run_dir, "checkpoints")):
        m = _STEP_DIR.match(name)
        if not m:
            continue
        path = uio.join(run_dir, "checkpoints", name)
        try:
            out.append(CheckpointInfo(path, int(m.group(1)), read_meta(path)))
        except CheckpointError as e:
            warnings.warn(f"skipping incomplete checkpoint: {e}")
    return sorted(out, key=lambda c: c.step)


def latest_valid_checkpoint(run_dir: str, map_location="cpu") -> tuple[dict, dict] | None:
    """Newest checkpoint whose state matches its hash; corrupted newer ones are reported and skipped."""
    for info in reversed(list_checkpoints(run_dir)):
        try:
            return load_checkpoint(info.path, map_location)
        except CheckpointError as e:
            warnings.warn(f"not resuming from a bad checkpoint: {e}")
    return None


def prune_checkpoints(run_dir: str, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (a finished trial keeps its final one)."""
    infos = list_checkpoints(run_dir)
    for info in infos[:-keep] if keep > 0 else []:
        fs, p = uio.filesystem(info.path)
        try:
            fs.rm(p, recursive=True)
        except OSError as e:  # a storage that refuses changes for a while: the next save prunes it
            warnings.warn(f"could not delete old checkpoint {info.path}: {e}")
            return


def write_images(run_dir: str, images: dict[str, bytes]) -> dict[str, str]:
    """PNG bytes -> run_dir/images/<name>; returns name -> path."""
    paths = {}
    for name, png in images.items():
        paths[name] = uio.join(run_dir, "images", name)
        uio.atomic_write_bytes(paths[name], png)
    return paths


def write_result(run_dir: str, res: StageResult, cfg_hash: str) -> None:
    """result.json, written last and atomically: it marks the run finished (`finished_result` reads it)."""
    result = {"metrics": res.metrics, "checkpoint": res.checkpoint, "steps": res.steps,
              "train_seconds": res.train_seconds, "config_hash": cfg_hash, "extra": res.extra}
    uio.atomic_write_text(uio.join(run_dir, "result.json"), json.dumps(result, indent=1, sort_keys=True))


def finished_result(run_dir: str, cfg_hash: str) -> StageResult | None:
    """The stored result of a run that already finished with this config, else None."""
    path = uio.join(run_dir, "result.json")
    if not uio.exists(path):
        return None
    try:
        r = json.loads(uio.read_bytes(path))
        if r.get("config_hash") != cfg_hash:
            return None
        return StageResult(r["metrics"], r["checkpoint"], r["steps"], r["train_seconds"], r.get("extra", {}))
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # damaged: not finished, resume instead
        warnings.warn(f"{path}: unreadable result ({type(e).__name__}: {e}); resuming the run instead")
        return None
