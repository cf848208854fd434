"""One compiled transformer block of the paper base model, forward + backward, with parts switched off or
written another way: where the block's non-matmul time goes.

    python benchmarks/block.py --out block.json

Times the compiled `TransformerBlock` (bf16 autocast, fp32 weights, as in training) on the base model's two
stages at batch 128: stage 1 (131,072 tokens x 512) and stage 2 (32,768 tokens x 1,024), dropout 0.1, with
heads of `--head-dims` channels (default 128, the paper preset's: 4 and 8 heads), compiled with the library's
Inductor heuristics (`accel.install_choices`; `--one-pass-rows 0` for Inductor's own), for these variants:
  library      the block as ulsweep builds it,
  head-major   QK-RMSNorm after rearranging q, k, v to (B, heads, N, d) (the library normalizes (B, N, heads, d)
               views and hands SDPA their transposes),
  no-qk-norm   without QK-RMSNorm (what the norm costs),
  no-dropout   p = 0 (what dropout costs),
  gelu-tanh    the tanh approximation of GELU (what the exact erf costs; the MLP's `approximate`),
  qk-v-split   q and k from one matmul into a buffer of their own, v from another (same weights): the QK norms
               read a contiguous buffer, which Inductor needs to keep a 128-channel norm in one pass,
  norm-all     the RMS of every head of q, k and v from the whole contiguous projection, v passed through
               unnormalized (same outputs),
  multi-kernel Inductor's `triton.multi_kernel`: reductions of up to 16x more channels may run in one pass
               (both kernels are compiled, the faster is picked when first run).
Reports ms per forward + backward and TFLOP/s of the block's matmul and attention FLOPs (3 x forward, from
torch.utils.flop_counter); `--kernels N` adds each row's N largest GPU kernels (ms per call). CUDA only.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import statistics
import sys

import torch
import torch.nn.functional as F
from einops import rearrange
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from timing import cuda_micro_args, run_env, time_calls, write_results  # noqa: E402
from train_step import profile_step  # noqa: E402

from ulsweep.models import layers  # noqa: E402
from ulsweep.train.accel import ONE_PASS_MAX_ROW, install_choices  # noqa: E402

SHAPES = {"base stage 1": (1024, 512), "base stage 2": (256, 1024)}  # tokens, width
COND = 1024


def attention_head_major(self, x):
    """Attention.forward with q, k, v rearranged to (B, h, N, d) before the norms (a copy of each)."""
    q, k, v = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.heads)
    o = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)  # (B, h, N, d)
    return self.drop(self.proj(rearrange(o, "b h n d -> b n (h d)")))


def qk_norm_weight(self, dtype, v: bool) -> torch.Tensor:
    """The q and k norms' weights stacked (2, 1, d), with ones for v (3, 1, d) when `v`."""
    w = [self.q_norm.weight, self.k_norm.weight] + ([torch.ones_like(self.q_norm.weight)] if v else [])
    return torch.stack(w)[:, None].to(dtype)


def attention_qk_v_split(self, x):
    """q, k from one matmul ((B, N, 2, h, d), contiguous) and v from another, with the library's weights."""
    dim = self.proj.in_features
    w, b = self.qkv.weight, self.qkv.bias
    qk = F.linear(x, w[:2 * dim], b[:2 * dim]).unflatten(-1, (2, self.heads, -1))
    v = F.linear(x, w[2 * dim:], b[2 * dim:]).unflatten(-1, (self.heads, -1))
    qk = F.rms_norm(qk, qk.shape[-1:], eps=self.q_norm.eps) * qk_norm_weight(self, qk.dtype, v=False)
    q, k = qk.unbind(2)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return self.drop(self.proj(o.transpose(1, 2).flatten(2)))


def attention_norm_all(self, x):
    """The RMS over every head of the whole (B, N, 3, h, d) projection; v keeps its values."""
    qkv = self.qkv(x).unflatten(-1, (3, self.heads, -1))
    normed = F.rms_norm(qkv, qkv.shape[-1:], eps=self.q_norm.eps) * qk_norm_weight(self, qkv.dtype, v=True)
    is_v = torch.arange(3, device=x.device)[:, None, None] == 2
    q, k, v = torch.where(is_v, qkv, normed).unbind(2)
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return self.drop(self.proj(o.transpose(1, 2).flatten(2)))


@contextlib.contextmanager
def variant(name: str, block: layers.TransformerBlock):
    saved = (layers.Attention.forward, block.mlp.approximate, torch._inductor.config.triton.multi_kernel)
    norms = (block.attn.q_norm, block.attn.k_norm)
    drops = [m for m in block.modules() if isinstance(m, torch.nn.Dropout)]
    rates = [m.p for m in drops]
    try:
        if name == "head-major":
            layers.Attention.forward = attention_head_major
        elif name == "no-qk-norm":
            block.attn.q_norm = block.attn.k_norm = torch.nn.Identity()
        elif name == "no-dropout":
            for m in drops:
                m.p = 0.0
        elif name == "gelu-tanh":
            block.mlp.approximate = "tanh"
        elif name == "qk-v-split":
            layers.Attention.forward = attention_qk_v_split
        elif name == "norm-all":
            layers.Attention.forward = attention_norm_all
        elif name == "multi-kernel":
            torch._inductor.config.triton.multi_kernel = 1
        yield
    finally:
        layers.Attention.forward, block.mlp.approximate, torch._inductor.config.triton.multi_kernel = saved
        block.attn.q_norm, block.attn.k_norm = norms
        for m, p in zip(drops, rates):
            m.p = p


VARIANTS = ("library", "head-major", "no-qk-norm", "no-dropout", "gelu-tanh", "qk-v-split", "norm-all",
            "multi-kernel")


def bench(shape, name: str, head_dim: int, batch: int, warmup: int, iters: int, kernels: int = 0,
          one_pass_max_row: int = ONE_PASS_MAX_ROW) -> tuple[float, float, list]:
    n, d = shape
    h = d // head_dim
    dev = torch.device("cuda")
    block = layers.TransformerBlock(d, h, COND, dropout=0.1).to(dev)
    torch.nn.init.normal_(block.ada.weight, std=0.02)  # non-zero gates: every branch takes part
    x = torch.randn(batch, n, d, device=dev, dtype=torch.bfloat16, requires_grad=True)
    c = torch.randn(batch, COND, device=dev, dtype=torch.bfloat16)
    g = torch.randn_like(x)
    with variant(name, block):
        torch._dynamo.reset()
        install_choices(one_pass_max_row)  # as the library's compile_module does
        f = torch.compile(block)
        with FlopCounterMode(display=False) as fc, torch.autocast("cuda", torch.bfloat16):
            block(x[:2], c[:2])
        flop = 3 * fc.get_total_flops() * batch / 2

        def call():
            x.grad = None
            for p in block.parameters():
                p.grad = None
            with torch.autocast("cuda", torch.bfloat16):
                out = f(x, c)
            out.backward(g)

        t = statistics.median(time_calls(call, dev, warmup, iters))
        top = profile_step(call, dev)["kernels"][:kernels] if kernels else []
    return t, flop, top


def main(argv=None) -> int:
    def extra(ap):
        ap.add_argument("--batch", type=int, default=128)
        ap.add_argument("--head-dims", type=int, nargs="+", default=[128])
        ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS)
        ap.add_argument("--kernels", type=int, default=0, help="list each row's largest GPU kernels")
        ap.add_argument("--one-pass-rows", type=int, default=ONE_PASS_MAX_ROW,
                        help="rows of up to this many elements reduced in one pass (0: Inductor's own rule; "
                             f"default: the library's, {ONE_PASS_MAX_ROW})")

    a = cuda_micro_args(__doc__, 20, argv, extra)
    rows = []
    print(f"{'shape':14} {'heads':>8} {'variant':>12} {'ms':>8} {'+ms':>8} {'TFLOP/s':>8}")
    for (shape_name, shape), hd in itertools.product(SHAPES.items(), a.head_dims):
        ref = None  # +ms: against the first variant at this shape and head size
        for name in a.variants:
            t, flop, top = bench(shape, name, hd, a.batch, a.warmup, a.iters, a.kernels, a.one_pass_rows)
            ref = t if ref is None else ref
            rows.append({"shape": shape_name, "tokens": shape[0], "width": shape[1], "heads": shape[1] // hd,
                         "head_dim": hd, "batch": a.batch, "variant": name, "one_pass_rows": a.one_pass_rows,
                         "ms": 1e3 * t,
                         "delta_ms": 1e3 * (t - ref), "tflops": flop / t / 1e12, "kernels": top})
            print(f"{shape_name:14} {shape[1] // hd:>3} x {hd:<3} {name:>12} {1e3 * t:8.3f} {1e3 * (t - ref):8.3f} "
                  f"{flop / t / 1e12:8.0f}", flush=True)
            for k in top:
                print(f"{'':16}{k['ms_per_step']:7.3f} ms {k['kind'][:10]:>10}  {k['name'][:80]}", flush=True)
            write_results(a.out, run_env(a), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
