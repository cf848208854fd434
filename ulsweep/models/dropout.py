"""Dropout for compiled CUDA training whose keep-mask takes an eighth of the usual random-number work.

Inductor compiles `nn.Dropout` into one Philox-4x32-10 evaluation per element and keeps one of its four
32-bit outputs. Ten rounds of 32-bit multiplies per element make the fused dropout kernels compute-bound:
on the paper base model (batch 128, H200) dropout 0.1 costs 17.8 ms of a 183-ms step, against ~3 ms for
writing and reading the masks it saves (benchmarks/README.md, "Dropout").

Here one Philox evaluation gives 128 random bits, cut into eight 16-bit uniforms u in {0, ..., 2^16 - 1};
an element is kept when u >= t, t = round(p * 2^16). The dropout rate is therefore p_q = t / 2^16
(|p_q - p| <= 2^-17: 0.1000061 for p = 0.1) and kept values are scaled by 1 / (1 - p_q), so
E[dropout(x)] = x exactly. The mask comes from a Triton kernel registered as a torch custom op (a
boolean tensor, one byte per element, which autograd saves for the backward as it saves
`native_dropout`'s mask); the scaling is plain tensor arithmetic that Inductor fuses into its neighbours.

The path is taken only inside `torch.compile` on CUDA with Triton installed; eager mode and the CPU use
`F.dropout`, whose eager CUDA kernel already draws four values per Philox call. `USE_TRITON = False`
switches the fast path off (benchmarks/train_step.py --dropout-kernel torch measures the difference).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

USE_TRITON = True
UNIFORM_BITS = 16  # bits of one uniform; a Philox call gives 128 bits = 8 uniforms
PER_CALL = 128 // UNIFORM_BITS
BLOCK = 1024  # Philox calls per Triton program (8 * BLOCK mask elements)

try:  # Triton ships with CUDA builds of torch; the CPU wheel has none
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:  # pragma: no cover - exercised on CPU-only installs
    triton = None


def quantized_rate(p: float) -> float:
    """The dropout rate the 16-bit comparison realizes: round(p * 2^16) / 2^16."""
    return round(p * (1 << UNIFORM_BITS)) / (1 << UNIFORM_BITS)


def check_rate(p: float) -> float:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {p}")
    return p


if triton is not None:
    @triton.jit
    def _store_keep(out_ptr, idx, u, threshold, n):
        tl.store(out_ptr + idx, u >= threshold, mask=idx < n)

    @triton.jit
    def _keep_mask_kernel(seed_ptr, out_ptr, n, threshold, BLOCK: tl.constexpr):
        pid = tl.program_id(0).to(tl.int64)
        lane = tl.arange(0, BLOCK)
        r0, r1, r2, r3 = tl.randint4x(tl.load(seed_ptr), pid * BLOCK + lane)  # 4 x uint32 per call
        i = pid * (8 * BLOCK) + lane  # uniform j of call `lane` -> element i + j * BLOCK: coalesced stores
        _store_keep(out_ptr, i, r0 & 0xFFFF, threshold, n)
        _store_keep(out_ptr, i + BLOCK, r0 >> 16, threshold, n)
        _store_keep(out_ptr, i + 2 * BLOCK, r1 & 0xFFFF, threshold, n)
        _store_keep(out_ptr, i + 3 * BLOCK, r1 >> 16, threshold, n)
        _store_keep(out_ptr, i + 4 * BLOCK, r2 & 0xFFFF, threshold, n)
        _store_keep(out_ptr, i + 5 * BLOCK, r2 >> 16, threshold, n)
        _store_keep(out_ptr, i + 6 * BLOCK, r3 & 0xFFFF, threshold, n)
        _store_keep(out_ptr, i + 7 * BLOCK, r3 >> 16, threshold, n)

    @triton_op("ulsweep::keep_mask", mutates_args=())
    def keep_mask(seed: Tensor, shape: list[int], p: float) -> Tensor:
        """Boolean keep-mask of `shape` on seed's device: True with probability 1 - quantized_rate(p).
        `seed`: a 0-d int64 CUDA tensor; the same seed gives the same mask."""
        out = torch.empty(shape, dtype=torch.bool, device=seed.device)
        n = out.numel()
        threshold = round(p * (1 << UNIFORM_BITS))
        wrap_triton(_keep_mask_kernel)[(triton.cdiv(n, PER_CALL * BLOCK),)](seed, out, n, threshold,
                                                                             BLOCK=BLOCK)
        return out


def fast_path(x: Tensor) -> bool:
    """Whether `Dropout` draws its mask with the Triton kernel for this input."""
    return USE_TRITON and triton is not None and x.is_cuda and torch.compiler.is_compiling()


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Inverted dropout at rate p: the 16-bit Triton mask under torch.compile on CUDA, else `F.dropout`."""
    if not training or p == 0.0:
        return x
    if not fast_path(x):
        return F.dropout(x, p, training=True)
    seed = torch.randint(0, 1 << 62, (), device=x.device, dtype=torch.int64)
    keep = torch.ops.ulsweep.keep_mask(seed, list(x.shape), p)
    return torch.where(keep, x * (1.0 / (1.0 - quantized_rate(p))), 0.0)


class Dropout(nn.Dropout):
    """`nn.Dropout` (same state dict, same `p`) that takes the fast mask under torch.compile on CUDA."""

    def __init__(self, p: float = 0.5):
        super().__init__(check_rate(p))

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)
