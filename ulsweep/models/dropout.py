"""Dropout for compiled CUDA training with a bit-packed keep-mask from one Philox call per 8 elements.

Inductor compiles `nn.Dropout` into one Philox-4x32-10 evaluation per element, keeps one of its four
32-bit outputs, and saves a one-byte mask per element for the backward. On the paper base model (batch
128, H200) dropout 0.1 in every block cost 13-18 ms of a 178-183-ms step: the fused GELU+dropout kernels
ran at ~1 TB/s, bound by the random-number arithmetic (benchmarks/README.md, "Dropout").

Here one Philox evaluation gives 128 random bits, cut into eight 16-bit uniforms u_j in {0, ..., 2^16 - 1};
element 8c + j (c: the Philox counter) is kept when u_j >= t, t = round(p * 2^16), and its keep bit is
bit j of mask byte c. The dropout rate is therefore p_q = t / 2^16 (|p_q - p| <= 2^-17: 0.1000061 for
p = 0.1) and kept values are scaled by 1 / (1 - p_q), so E[dropout(x)] = x exactly. The packed mask (one
byte per 8 elements) comes from a Triton kernel registered as a torch custom op; unpacking it and the
scaling are plain tensor arithmetic that Inductor fuses into the neighbouring kernels. The unpacking sits in
a checkpointed region, so the backward recomputes the keep bits from the packed mask: what is kept for the
backward is 1/8 of a byte an element, where `native_dropout` keeps a byte (without the region, Inductor's
partitioner saves the unpacked booleans; tests/test_dropout.py checks which).

The path is taken only inside `torch.compile` on CUDA with Triton installed; eager mode and the CPU use
`F.dropout`, whose eager CUDA kernel is already one fused pass. `USE_TRITON = False` switches the fast
path off (benchmarks/train_step.py --dropout-kernel torch measures the difference side by side).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

USE_TRITON = True
UNIFORM_BITS = 16  # bits of one uniform: a Philox call's 128 bits give the 8 keep bits of one mask byte
BLOCK = 1024  # mask bytes (Philox calls) per Triton program

try:  # Triton ships with CUDA builds of torch; the CPU wheel has none
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:  # pragma: no cover - exercised on CPU-only installs
    triton = None


def threshold(p: float) -> int:
    """t = round(p * 2^16): a 16-bit uniform below t drops its element."""
    return round(p * (1 << UNIFORM_BITS))


def quantized_rate(p: float) -> float:
    """The dropout rate the 16-bit comparison realizes: t / 2^16."""
    return threshold(p) / (1 << UNIFORM_BITS)


def check_rate(p: float) -> float:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout rate must be in [0, 1), got {p}")
    return p


def unpack_keep(bits: Tensor, shape: list[int] | torch.Size) -> Tensor:
    """Boolean keep-mask of `shape` from packed bytes: element i is bit i % 8 of byte i // 8."""
    shifts = torch.arange(8, device=bits.device, dtype=torch.uint8)
    return ((bits[:, None] >> shifts) & 1).bool().reshape(-1)[:math.prod(shape)].reshape(shape)


if triton is not None:
    @triton.jit
    def _bit(u, threshold, j: tl.constexpr):
        return (u >= threshold).to(tl.uint8) << j

    @triton.jit
    def _keep_bits_kernel(seed_ptr, out_ptr, n_bytes, threshold, BLOCK: tl.constexpr):
        c = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # Philox counter = mask byte
        r0, r1, r2, r3 = tl.randint4x(tl.load(seed_ptr), c)  # 4 x uint32
        byte = (_bit(r0 & 0xFFFF, threshold, 0) | _bit(r0 >> 16, threshold, 1) | _bit(r1 & 0xFFFF, threshold, 2)
                | _bit(r1 >> 16, threshold, 3) | _bit(r2 & 0xFFFF, threshold, 4) | _bit(r2 >> 16, threshold, 5)
                | _bit(r3 & 0xFFFF, threshold, 6) | _bit(r3 >> 16, threshold, 7))
        tl.store(out_ptr + c, byte, mask=c < n_bytes)

    @triton_op("ulsweep::keep_bits", mutates_args=())
    def keep_bits(seed: Tensor, n: int, p: float) -> Tensor:
        """Packed keep-mask of n elements, ceil(n / 8) uint8 on seed's device: each bit is 1 with probability
        1 - quantized_rate(p). `seed`: a 0-d int64 CUDA tensor; the same seed gives the same mask."""
        n_bytes = (n + 7) // 8
        out = torch.empty(n_bytes, dtype=torch.uint8, device=seed.device)
        wrap_triton(_keep_bits_kernel)[(triton.cdiv(n_bytes, BLOCK),)](seed, out, n_bytes, threshold(p),
                                                                         BLOCK=BLOCK)
        return out


def fast_path(x: Tensor) -> bool:
    """Whether `Dropout` draws its mask with the Triton kernel for this input."""
    return USE_TRITON and triton is not None and x.is_cuda and torch.compiler.is_compiling()


def dropout(x: Tensor, p: float, training: bool = True) -> Tensor:
    """Inverted dropout at rate p: the packed Triton mask under torch.compile on CUDA, else `F.dropout`."""
    if not training or p == 0.0:
        return x
    if not fast_path(x):
        return F.dropout(x, p, training=True)
    seed = torch.randint(0, 1 << 62, (), device=x.device, dtype=torch.int64)
    bits = torch.ops.ulsweep.keep_bits(seed, x.numel(), p)
    # unpacked in a checkpointed region: the compiler's partitioner then recomputes the keep bits from the
    # packed mask in the backward instead of saving them (one byte an element, as native_dropout does)
    keep = torch.utils.checkpoint.checkpoint(unpack_keep, bits, x.shape, use_reentrant=False)
    return torch.where(keep, x * (1.0 / (1.0 - quantized_rate(p))), 0.0)


class Dropout(nn.Dropout):
    """`nn.Dropout` (same state dict, same `p`) that takes the fast mask under torch.compile on CUDA."""

    def __init__(self, p: float = 0.5):
        super().__init__(check_rate(p))

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)
