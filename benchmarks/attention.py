"""Scaled-dot-product attention backends on the latent models' shapes: forward + backward TFLOP/s, bf16.

    python benchmarks/attention.py --out attention.json

The paper base model attends over 1,024 tokens at width 512 (stage 1) and 256 tokens at width 1,024
(stage 2); the prior over 1,024 tokens at width 1,024. For each shape at batch 128, each head size
(`--head-dims`, default 64 and 128: heads = width / head size) and each SDPA backend torch offers (cuDNN,
FlashAttention-2, memory-efficient) this times forward alone and forward + backward and reports TFLOP/s with
the FLOP counter's convention (QK^T and AV: 4 N^2 d per head forward, the same for every head size at one
width; backward 2.5 x forward). CUDA only; a backend that refuses a shape is reported as such.
"""
from __future__ import annotations

import itertools
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from timing import cuda_micro_args, run_env, time_calls, write_results  # noqa: E402

SHAPES = {"base stage 1": (512, 1024), "base stage 2": (1024, 256), "prior": (1024, 1024)}  # (width, tokens)
BACKENDS = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}


def main(argv=None) -> int:
    def extra(ap):
        ap.add_argument("--batch", type=int, default=128)
        ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])

    a = cuda_micro_args(__doc__, 20, argv, extra)
    dev, rows = torch.device("cuda"), []
    print(f"{'shape':14} {'heads':>8} {'backend':>9} {'fwd ms':>8} {'fwd TF/s':>9} {'f+b ms':>8} {'f+b TF/s':>9}")
    for (name, (width, n)), d in itertools.product(SHAPES.items(), a.head_dims):
        h = width // d
        fwd_flop = 4 * a.batch * h * n * n * d
        q, k, v = (torch.randn(a.batch, h, n, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        g = torch.randn_like(q)
        for backend, enum in BACKENDS.items():
            with sdpa_kernel([enum]):
                def fwd():
                    with torch.no_grad():
                        F.scaled_dot_product_attention(q, k, v)

                def fwd_bwd():
                    q.grad = k.grad = v.grad = None
                    F.scaled_dot_product_attention(q, k, v).backward(g)
                try:
                    tf = statistics.median(time_calls(fwd, dev, a.warmup, a.iters))
                    tb = statistics.median(time_calls(fwd_bwd, dev, a.warmup, a.iters))
                except RuntimeError as e:  # the backend does not take this shape/dtype
                    rows.append({"shape": name, "heads": h, "head_dim": d, "backend": backend,
                                 "error": str(e).splitlines()[0][:200]})
                    print(f"{name:14} {h:>3} x {d:<3} {backend:>9}  not available: {str(e).splitlines()[0][:60]}")
                    continue
            row = {"shape": name, "heads": h, "tokens": n, "head_dim": d, "batch": a.batch, "backend": backend,
                   "fwd_ms": 1e3 * tf, "fwd_tflops": fwd_flop / tf / 1e12, "fwd_bwd_ms": 1e3 * tb,
                   "fwd_bwd_tflops": 3.5 * fwd_flop / tb / 1e12}
            rows.append(row)
            print(f"{name:14} {h:>3} x {d:<3} {backend:>9} {row['fwd_ms']:8.3f} {row['fwd_tflops']:9.0f} "
                  f"{row['fwd_bwd_ms']:8.3f} {row['fwd_bwd_tflops']:9.0f}", flush=True)
    write_results(a.out, run_env(a), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
