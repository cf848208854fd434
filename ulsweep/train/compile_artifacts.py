"""Compiled programs shared beyond one node: torch's portable compile caches ("Mega-Cache",
`torch.compiler.save_cache_artifacts` / `load_cache_artifacts`) kept in ulsweep's cache.

The compile gate (compile_gate.py) makes the trials of a node compile each graph once: the first process of a key
compiles, the others find its entries in the node's caches (Inductor's FX graph cache, AOTAutograd's, Triton's
kernels and autotuning, under /tmp). Those caches stay on the node. A cluster's other nodes, and the next sweep on
a fresh machine, compiled the same graphs again from cold: lf_sweep's 18 stacked autoencoders 170-208 s on one
H100 (sessions 24 and 26), during which the group's trials trained uncompiled or waited.

So the process that compiles a key first on its node (`first_compile`'s "first") saves, once its block is done,
what it compiled as one file, `<cache_root>/compile/<torch version>/<device>/<key>.bin` (`save`), and a process
about to compile a key its node has not compiled yet loads that file into its node's caches before it compiles
(`load`): its compile then mostly hits them. With $ULSWEEP_CACHE on storage the nodes share (or carried to a new
machine), every node after the first compiles from the shared entries. The file holds everything the saving
process compiled by then (for a trial: its training step; for a precompile task: the step, and after its sampling
block, the sampling too), and a later save of the key replaces it. A file that does not load (torch changed its
format, a partial copy) is named in a warning and left alone: the process compiles as it would have.

Both need torch >= 2.7 (ulsweep requires 2.11); where this torch lacks them, nothing is saved or loaded.
"""
from __future__ import annotations

import os
import sys
import tempfile

from ulsweep import io as uio

FOLDER = "compile"


def path(key: str) -> str:
    """The file of compile-gate key `key` for this torch and this process's device (a GPU's compute capability:
    kernels of one do not serve another)."""
    import torch

    device = "cpu"
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        device = f"sm{major}{minor}"
    return os.path.join(uio.cache_dir(FOLDER), f"torch-{torch.__version__}", device, f"{key}.bin")


def _api() -> bool:
    import torch

    return hasattr(torch.compiler, "save_cache_artifacts") and hasattr(torch.compiler, "load_cache_artifacts")


def load(key: str, label: str = "") -> int:
    """Load the saved compile of `key` into this node's caches, if there is one; returns its size in bytes (0:
    none, or it did not load, which a warning says)."""
    p = path(key)
    if not _api() or not os.path.exists(p):
        return 0
    import torch

    try:
        with open(p, "rb") as f:
            data = f.read()
        # torch logs what is wrong with bytes it cannot read (a checksum, a format) and returns None
        if torch.compiler.load_cache_artifacts(data) is None:
            raise ValueError("torch read no artifacts from it")
    except Exception as e:  # noqa: BLE001 - a cache that does not load costs a compile, never the run
        print(f"[{label}] compile cache {p} did not load ({type(e).__name__}: {str(e)[:200]}); compiling "
              "without it", file=sys.stderr, flush=True)
        return 0
    print(f"[{label}] compile cache: loaded {len(data) / 2**20:.1f} MB compiled elsewhere ({p})", file=sys.stderr,
          flush=True)
    return len(data)


def save(key: str, label: str = "") -> int:
    """Save what this process has compiled as the compile of `key` (atomically, replacing an older one); returns
    the bytes written (0: nothing compiled, or it failed, which a warning says: a cache is worth no retry and no
    failed run, unlike ulsweep's results, so a full or read-only cache is not waited for)."""
    if not _api():
        return 0
    import torch

    p = path(key)
    tmp = None
    try:
        artifacts = torch.compiler.save_cache_artifacts()
        if not artifacts or not artifacts[0]:
            return 0
        os.makedirs(os.path.dirname(p), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(p), prefix=".tmp-", suffix=".bin")
        with os.fdopen(fd, "wb") as f:
            f.write(artifacts[0])
        os.replace(tmp, p)  # readers see the old file or the whole new one
    except Exception as e:  # noqa: BLE001 - the next node compiles for itself
        if tmp and os.path.exists(tmp):
            os.unlink(tmp)
        print(f"[{label}] compile cache not saved to {p} ({type(e).__name__}: {str(e)[:200]})", file=sys.stderr,
              flush=True)
        return 0
    return len(artifacts[0])
