"""Helpers shared by the benchmark scripts: warm-up calls, then wall time per call (CUDA synchronized); the
result file every script writes. torch is imported where a helper needs it: scripts whose own process must not
import it (their rows run in child processes that time torch's import) write their results here too."""
from __future__ import annotations

import argparse
import json
import platform
import time
from typing import TYPE_CHECKING

from provenance import commit

if TYPE_CHECKING:
    import torch


def sync(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls of fn() after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return out


def write_results(path: str | None, env: dict, rows: list[dict]) -> None:
    """{"env": ..., "rows": [...]} as JSON at `path` (nothing without a path), written atomically."""
    if path:
        from ulsweep.io import atomic_write_text

        atomic_write_text(path, json.dumps({"env": env, "rows": rows}, indent=1))


def cuda_micro_args(doc: str, iters: int, argv=None, add=None) -> argparse.Namespace:
    """Arguments of a CUDA micro-benchmark: --warmup, --iters, --out (and what `add(parser)` adds);
    exits with a usage error without a GPU."""
    import torch

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if add:
        add(ap)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=iters)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        ap.error("needs a CUDA GPU")
    return a


def run_env(args: argparse.Namespace) -> dict:
    """The `env` of a result file: torch, Python, GPU (None without one), the commit and the script's arguments."""
    import torch

    return {"torch": torch.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "commit": commit(),
            "args": vars(args)}
