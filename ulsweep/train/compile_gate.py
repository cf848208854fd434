"""One process at a time compiles a graph for the first time on a node; the others then compile from the caches.

A sweep's trials share architectures: a loss factor or a sigmoid bias changes no shape. torch.compile's caches
(Inductor's FX graph cache, AOTAutograd's cache, Triton's kernels and autotuning; on by default, under
$TORCHINDUCTOR_CACHE_DIR, else /tmp/torchinductor_<user>, one per node) turn a second compilation of the same
graph into mostly cache hits, but trials that start together all miss and each compiles everything, competing for
the node's CPUs. `first_compile(key)` wraps a trial's first optimizer step: the first process of a key compiles
alone (an exclusive `flock` on a file beside the caches, which the kernel releases if the process dies), the
others wait for it and then compile their own graphs from its cache entries. Once one process has finished, a
marker file lets every later process of that key pass at once. A waiter gives up waiting after `wait_s`
seconds and compiles anyway.

The key names what the compiled graph depends on: torch version, compile mode, device type, autocast dtype, the
objective's class and module tree (`repr`, which lists every layer's sizes) and the batch's shape. Graphs that
differ only in values Dynamo bakes in as constants share a key: a waiter then compiles them cold after the first
process (the same work as without the gate, one compile later).

A task that compiles a step ahead of its trials (ulsweep/sweep/precompile.py) claims it when it starts, before it
has built anything (`claim_ahead`: a file naming its process): a trial that asks without waiting while the claim's
process lives is told "busy" even where the gate is free, so that it trains uncompiled rather than compiling on
its own critical path because it reached the gate a few seconds before the task did (session 40: the stacked
autoencoders' group, built faster, took the gate first and compiled for 191 s with no step taken beside it).

Instead of waiting, a process may ask without waiting (`wait=False`: "busy" while another compiles) and train
its uncompiled module meanwhile (`train.gate_compile: eager`, ulsweep/train/loop.py): its share of the device
does useful work during the first compile, and it gets in, finding the key done, once the first process has
finished (or compiles first itself, if it asks while nobody holds the gate). Like a waiter, it trains uncompiled
for at most `WAIT_S` and then compiles anyway (a holder that hangs, rather than dies, holds the gate for good).

The node's caches stay on the node; the first process of a key also saves what it compiled to ulsweep's cache, and
a process about to compile a key first on its node loads it from there (compile_artifacts.py), so that the next
node, or the next machine, compiles from those entries.
"""
from __future__ import annotations

import contextlib
import errno
import getpass
import hashlib
import os
import sys
import tempfile
import time
from typing import Iterator

from ulsweep import io as uio
from ulsweep.train import compile_artifacts

WAIT_S = 900.0  # longest a process waits for another's first compile before compiling anyway
POLL_S = 0.5


def inductor_cache_dir() -> str:
    """torch's compile cache folder: $TORCHINDUCTOR_CACHE_DIR, else torch's documented default
    /tmp/torchinductor_<user> (the gate's files sit beside the caches they stand for)."""
    env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if env:
        return env
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        user = str(os.getuid())
    return os.path.join(tempfile.gettempdir(), f"torchinductor_{user}")


def graph_key(objective, batch_shape, mode: str, device_type: str, amp_dtype) -> str:
    """The key of a compiled training step: what its graphs depend on besides values baked in as constants."""
    import torch

    parts = [torch.__version__, mode, device_type, str(amp_dtype), type(objective).__qualname__, repr(objective),
             str(tuple(batch_shape))]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def gate_dir(folder: str | None = None) -> str:
    """The gate's folder (its locks, markers and claims), beside the compile caches or in `folder`."""
    return os.path.join(folder or inductor_cache_dir(), "ulsweep-compile-gate")


def claim_path(name: str, folder: str | None = None) -> str:
    """The file by which a process claims the first compile of the step named `name` ahead of its trials."""
    return os.path.join(gate_dir(folder), f"{name}.ahead")


@contextlib.contextmanager
def claim_ahead(name: str, folder: str | None = None) -> Iterator[str | None]:
    """Claim the first compile of `name` on this node for this process while the block runs (the file holds its
    pid, written atomically; removed at the end if still this process's). Yields the claim's path, or None where
    it cannot be written (the gate's folder is not writable: the gate itself then lets everyone in, "unlocked")."""
    path = claim_path(name, folder)
    try:
        uio.atomic_write_text_once(path, f"{os.getpid()}\n")
    except OSError:
        yield None
        return
    try:
        yield path
    finally:
        if _claimant(path) == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)


def _claimant(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):  # none, or a file being replaced: no claim
        return None


def claimed_ahead(name: str, folder: str | None = None) -> bool:
    """Whether another live process of this node has claimed the first compile of `name` (`claim_ahead`); a claim
    whose process has died is no claim."""
    pid = _claimant(claim_path(name, folder))
    if pid is None or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        pass
    return True


def compiled_before(key: str, folder: str | None = None) -> bool:
    """Whether a process of this node has finished compiling `key` (`first_compile`'s marker), without waiting
    or taking anything."""
    return os.path.exists(os.path.join(gate_dir(folder), f"{key}.done"))


@contextlib.contextmanager
def first_compile(key: str, label: str = "", wait_s: float = WAIT_S, folder: str | None = None,
                  wait: bool = True, claim: str | None = None) -> Iterator[str]:
    """Run the block (a first, compiling step) after any other process of this node that is compiling `key` for
    the first time has finished; yields how it got in: "first" (compiled alone, first of its key), "after"
    (waited for the first), "done" (a process had already finished), "timeout" or "unlocked" (a file system
    without flock: no gate). With `wait=False` it yields "busy" at once instead of waiting: the block must
    then not compile (it holds nothing, and marks nothing done); so it does, with `wait=False`, while another live
    process holds the claim `claim` names (`claim_ahead`), gate free or not."""
    import fcntl

    d = gate_dir(folder)
    done = os.path.join(d, f"{key}.done")
    if os.path.exists(done):
        yield "done"
        return
    if not wait and claim is not None and claimed_ahead(claim, folder):
        yield "busy"
        return
    try:
        os.makedirs(d, exist_ok=True)
        fd = os.open(os.path.join(d, f"{key}.lock"), os.O_CREAT | os.O_RDWR, 0o644)
    except OSError:
        yield "unlocked"
        return
    how, t0, said = "first", time.monotonic(), False
    try:
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    how = "unlocked"
                    break
            if os.path.exists(done):
                how = "done"
                break
            if not wait:
                how = "busy"
                break
            if not said:
                print(f"[{label}] waiting for another trial's first compile of this model (compile gate {key[:8]})",
                      file=sys.stderr, flush=True)
                said = True
            if time.monotonic() - t0 > wait_s:
                how = "timeout"
                break
            time.sleep(POLL_S)
        if how == "first" and said:  # got the lock after waiting (its holder finished, or died before it did)
            how = "after"
        if how in ("first", "after", "timeout", "unlocked"):  # compiles here: what another node compiled first
            compile_artifacts.load(key, label)
        yield how
        if how == "first":  # for the nodes that compile it next; saved before this node's waiters come in
            compile_artifacts.save(key, label)
        if how in ("first", "after"):
            with open(done, "w") as f:
                f.write(f"{time.time()}\n")
    finally:
        os.close(fd)  # releases the lock
