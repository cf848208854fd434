"""Helpers shared by the benchmark scripts: warm-up calls, then wall time per call (CUDA synchronized); the
result file every script writes."""
from __future__ import annotations

import json
import time

import torch


def sync(device: torch.device) -> None:
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
