"""ulsweep's fused bias + GELU + dropout kernels against Inductor's fusion, and their tile settings.

    python benchmarks/gelu.py --out gelu.json

On the paper base model's MLP activations at batch 128 (131,072 x 2,048 and 32,768 x 4,096, bf16, p = 0.1)
this times, forward + backward:
  inductor        compiled `dropout(gelu(x + b))` with ulsweep's mask (the MLP's path without the kernels),
  inductor p=0    the same without dropout,
  fused BMxBN/wW/R  ulsweep's two kernels called directly, for several tiles (rows x columns), warps and
                  backward rows per program; forward and backward timed apart as well,
and the bandwidth of the bytes the kernels must move (forward: h in, a out, 1/8 mask; backward: grad a and h
in, grad h out, 1/8 mask). CUDA only.
"""
from __future__ import annotations

import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from timing import cuda_micro_args, run_env, time_calls, write_results  # noqa: E402

import ulsweep.models.dropout as D  # noqa: E402
import ulsweep.models.gelu as G  # noqa: E402

SHAPES = {"base stage 1 MLP (b128)": (131072, 2048), "base stage 2 MLP (b128)": (32768, 4096)}
CONFIGS = [(8, 256, 4, 256), (4, 256, 4, 256), (2, 256, 2, 256), (4, 128, 2, 256), (2, 512, 4, 256),
           (1, 1024, 4, 256), (8, 256, 8, 256), (4, 256, 4, 128), (4, 256, 4, 512), (8, 128, 4, 256)]
# BLOCK_M, BLOCK_N, NUM_WARPS, BWD_ROWS
FWD_BYTES, BWD_BYTES = 4 + 1 / 8, 6 + 1 / 8  # per element


def inductor(x, b, g, p, warmup, iters, approximate="none"):
    torch._dynamo.reset()
    D.USE_TRITON = True

    @torch.compile
    def f(x, b):
        return D.dropout(F.gelu(x + b, approximate=approximate), p)

    def call():
        x.grad = b.grad = None
        f(x, b).backward(g)
    return statistics.median(time_calls(call, x.device, warmup, iters))


def fused(x, b, g, p, cfg, warmup, iters, form="erf"):
    G.BLOCK_M, G.BLOCK_N, G.NUM_WARPS, G.BWD_ROWS = cfg
    G.FORM = form
    bits = torch.ops.ulsweep.keep_bits(torch.tensor(1, device=x.device), x.numel(), p)
    xd = x.detach()
    fwd = lambda: torch.ops.ulsweep.bias_gelu_dropout(xd, b, bits, p)  # noqa: E731
    bwd = lambda: torch.ops.ulsweep.bias_gelu_dropout_backward(g, xd, b, bits, p)  # noqa: E731
    tf = statistics.median(time_calls(fwd, x.device, warmup, iters))
    tb = statistics.median(time_calls(bwd, x.device, warmup, iters))
    return tf, tb


def main(argv=None) -> int:
    a = cuda_micro_args(__doc__, 30, argv, lambda ap: ap.add_argument("--p", type=float, default=0.1))
    rows, saved = [], (G.BLOCK_M, G.BLOCK_N, G.NUM_WARPS, G.BWD_ROWS)
    print(f"{'shape':26} {'variant':>18} {'f+b ms':>8} {'fwd ms':>8} {'bwd ms':>8} {'fwd GB/s':>9} {'bwd GB/s':>9}")
    for name, (m, n) in SHAPES.items():
        x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        b = torch.zeros(n, device="cuda", requires_grad=True)
        g = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)

        def emit(variant, total, tf=None, tb=None):
            row = {"shape": [m, n], "name": name, "variant": variant, "p": a.p, "ms": 1e3 * total,
                   "fwd_ms": tf and 1e3 * tf, "bwd_ms": tb and 1e3 * tb,
                   "fwd_gb_per_s": tf and m * n * FWD_BYTES / tf / 1e9, "bwd_gb_per_s": tb and m * n * BWD_BYTES / tb / 1e9}
            rows.append(row)
            fmt = lambda v, f: format(v, f) if v is not None else "-"  # noqa: E731
            print(f"{name:26} {variant:>18} {1e3 * total:8.3f} {fmt(row['fwd_ms'], '8.3f'):>8} "
                  f"{fmt(row['bwd_ms'], '8.3f'):>8} {fmt(row['fwd_gb_per_s'], '9.0f'):>9} "
                  f"{fmt(row['bwd_gb_per_s'], '9.0f'):>9}", flush=True)
            write_results(a.out, run_env(a), rows)

        emit("inductor", inductor(x, b, g, a.p, a.warmup, a.iters))
        emit("inductor p=0", inductor(x, b, g, 0.0, a.warmup, a.iters))
        emit("inductor tanh", inductor(x, b, g, a.p, a.warmup, a.iters, "tanh"))
        for form in ("erf", "tanh"):
            for cfg in CONFIGS:
                tf, tb = fused(x, b, g, a.p, cfg, a.warmup, a.iters, form)
                emit("{} {}x{}/w{}/{}".format(form, *cfg), tf + tb, tf, tb)
    G.BLOCK_M, G.BLOCK_N, G.NUM_WARPS, G.BWD_ROWS = saved
    G.FORM = "erf"
    return 0


if __name__ == "__main__":
    sys.exit(main())
