"""What dropout costs inside a compiled training step, by mask kernel, on the paper base model's MLP shapes.

    python benchmarks/dropout.py --out dropout.json

Times forward + backward of the compiled `dropout(gelu(x))` (bf16) on the hidden activations of the base
model's two stages at batch 128 (131,072 tokens x 2,048 and 32,768 tokens x 4,096), for
  none:   p = 0 (GELU alone: what a memory-bound pass costs),
  torch:  Inductor's own dropout (one Philox-4x32-10 call per element),
  triton: ulsweep's bit-packed mask (one Philox call per 8 elements, `ulsweep/models/dropout.py`),
and reports ms per call, the cost over `none` and the bandwidth of the bytes the fused passes must move
(x, y, grad y, grad x in bf16; torch's one-byte mask written and read once, ulsweep's 1/8-byte mask
written once and read twice). CUDA only.
"""
from __future__ import annotations

import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from timing import cuda_micro_args, run_env, time_calls, write_results  # noqa: E402

import ulsweep.models.dropout as dropout_mod  # noqa: E402

MASK_BYTES = {"none": 0.0, "torch": 2.0, "triton": 3 / 8}  # mask traffic per element, beside bf16 x, y, dy, dx
SHAPES = {"base stage 1 MLP (b128)": (131072, 2048), "base stage 2 MLP (b128)": (32768, 4096)}


def bench(shape, kernel: str, p: float, warmup: int, iters: int) -> float:
    dropout_mod.USE_TRITON = kernel == "triton"
    torch._dynamo.reset()

    @torch.compile
    def f(x):
        return dropout_mod.dropout(F.gelu(x), p if kernel != "none" else 0.0)

    x = torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(shape, device="cuda", dtype=torch.bfloat16)

    def call():
        x.grad = None
        f(x).backward(g)

    return statistics.median(time_calls(call, torch.device("cuda"), warmup, iters))


def main(argv=None) -> int:
    a = cuda_micro_args(__doc__, 30, argv, lambda ap: ap.add_argument("--p", type=float, default=0.1))
    rows = []
    print(f"{'shape':28} {'kernel':>7} {'ms':>8} {'+ms':>8} {'GB/s':>8}")
    for name, shape in SHAPES.items():
        base = None
        for kernel in ("none", "torch", "triton"):
            t = bench(shape, kernel, a.p, a.warmup, a.iters)
            base = t if kernel == "none" else base
            n = shape[0] * shape[1]
            moved = n * (4 * 2 + MASK_BYTES[kernel])
            rows.append({"shape": list(shape), "name": name, "kernel": kernel, "p": a.p, "ms": 1e3 * t,
                         "extra_ms": 1e3 * (t - base), "gb_per_s": moved / t / 1e9})
            print(f"{name:28} {kernel:>7} {1e3 * t:8.3f} {1e3 * (t - base):8.3f} {moved / t / 1e9:8.0f}", flush=True)
    write_results(a.out, run_env(a), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
