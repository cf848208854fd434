"""The transformer MLP's bias + GELU + dropout as one Triton kernel each way, for compiled CUDA training.

Inductor fuses `dropout(gelu(x @ W1^T + b1))` into one pointwise kernel a direction, but its exact GELU
evaluates libdevice's `erff` (and the backward an `expf` on top) per element: on the paper base model at
batch 128 (H200) these two kernels took 19.4 ms of a 171-ms step, about half the speed the bytes they move
allow. Here the standard normal CDF comes from the complementary error function in the form

    erfc(z) ~= t exp(-z^2 + P(t)),   t = 1 / (1 + z/2),   z >= 0,

with P a degree-9 polynomial (Numerical Recipes' `erfcc`, after Chebyshev): fractional error below 1.2e-7
for every z >= 0, so Phi(x) = erfc(-x / sqrt(2)) / 2 keeps its relative accuracy far into both tails, well
below bf16's rounding (2^-9). One reciprocal, two exponentials and a few FMAs an element.

    forward:  a  = keep / (1 - p_q) * gelu(h + b),            gelu(x) = x Phi(x)
    backward: dh = keep / (1 - p_q) * da * gelu'(h + b),      gelu'(x) = Phi(x) + x phi(x)
              db = sum over rows of dh  (fp32, summed in the same kernel)

`h` is the bias-free product x @ W1^T (the bias is added in fp32 inside the kernel, so the bias gradient
needs no extra pass over dh); the keep bits are ulsweep's packed dropout mask (`dropout.keep_bits`).
The path is taken only inside torch.compile on CUDA with Triton; elsewhere `Mlp` runs `F.gelu` and `Dropout`.
`USE_TRITON = False` switches it off (benchmarks/train_step.py --gelu-kernel torch compares both).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from ulsweep.models import dropout as D

USE_TRITON = True
BLOCK_M, BLOCK_N = 16, 256  # tile of one program (rows x columns); the backward loops over BWD_ROWS rows
BWD_ROWS = 256
NUM_WARPS = 4
FORM = "erf"  # "tanh": GELU's tanh approximation instead (benchmarks/gelu.py prices the exact CDF)

# erfc(z) ~= t * exp(-z^2 + sum_k C[k] t^k), t = 1 / (1 + z / 2), z >= 0 (fractional error < 1.2e-7)
ERFC_COEFFS = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806,
               0.27886807, -1.13520398, 1.48851587, -0.82215223, 0.17087277)


def erfc_reference(z: Tensor) -> Tensor:
    """The approximation above in torch, for z >= 0 (what the kernel computes, for the tests)."""
    t = 1.0 / (1.0 + 0.5 * z)
    poly = torch.zeros_like(z)
    for c in reversed(ERFC_COEFFS):
        poly = poly * t + c
    return t * torch.exp(-z * z + poly)


try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None


if triton is not None:
    _C0, _C1, _C2, _C3, _C4 = (tl.constexpr(c) for c in ERFC_COEFFS[:5])
    _C5, _C6, _C7, _C8, _C9 = (tl.constexpr(c) for c in ERFC_COEFFS[5:])
    _SQRT1_2 = tl.constexpr(1.0 / math.sqrt(2.0))
    _INV_SQRT_2PI = tl.constexpr(1.0 / math.sqrt(2.0 * math.pi))
    _TANH_K = tl.constexpr(2.0 * math.sqrt(2.0 / math.pi))

    @triton.jit
    def _normal_cdf(x):
        """Phi(x) = erfc(-x / sqrt(2)) / 2 with erfc(-z) = 2 - erfc(z)."""
        z = tl.abs(x) * _SQRT1_2
        t = 1.0 / (1.0 + 0.5 * z)
        poly = _C0 + t * (_C1 + t * (_C2 + t * (_C3 + t * (_C4 + t * (_C5 + t * (_C6 + t * (_C7 + t * (
            _C8 + t * _C9))))))))
        half_erfc = 0.5 * t * tl.exp(poly - z * z)  # erfc(|x| / sqrt 2) / 2 = Phi(-|x|)
        return tl.where(x >= 0, 1.0 - half_erfc, half_erfc)

    @triton.jit
    def _cdf(x, TANH: tl.constexpr):
        if TANH:  # GELU's tanh form: Phi(x) ~ (1 + tanh(u)) / 2 = sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3)
            return 1.0 / (1.0 + tl.exp(-((x + 0.044715 * x * x * x) * _TANH_K)))
        return _normal_cdf(x)

    @triton.jit
    def _pdf(x, TANH: tl.constexpr):
        """d cdf / dx."""
        if TANH:
            s = 1.0 / (1.0 + tl.exp(-((x + 0.044715 * x * x * x) * _TANH_K)))
            return s * (1.0 - s) * _TANH_K * (1.0 + 3 * 0.044715 * x * x)
        return tl.exp(-0.5 * x * x) * _INV_SQRT_2PI

    @triton.jit
    def _tile(h_ptr, b_ptr, bits_ptr, rows, cols, bias, M, N, scale, HAS_MASK: tl.constexpr):
        """(x = h + b in fp32, dropout factor keep * scale, element offsets, in-bounds mask) of a tile; int32
        offsets (the op checks the size) and column-only arithmetic for the mask bits (N % 8 == 0)."""
        inb = (rows < M)[:, None] & (cols < N)[None, :]
        offs = rows[:, None] * N + cols[None, :]
        x = tl.load(h_ptr + offs, mask=inb, other=0.0).to(tl.float32) + bias[None, :]
        if HAS_MASK:  # element i is bit i % 8 of mask byte i // 8
            byte = tl.load(bits_ptr + (rows[:, None] * (N // 8) + (cols >> 3)[None, :]), mask=inb, other=0)
            keep = (byte >> (cols & 7).to(tl.uint8)[None, :]) & 1
            factor = tl.where(keep != 0, scale, 0.0).to(tl.float32)  # Inductor passes Python floats as fp64
        else:
            factor = tl.full(x.shape, 1.0, tl.float32)
        return x, factor, offs, inb

    @triton.jit
    def _fwd_kernel(h_ptr, b_ptr, bits_ptr, out_ptr, M, N, scale, HAS_MASK: tl.constexpr, TANH: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        bias = tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        x, factor, offs, inb = _tile(h_ptr, b_ptr, bits_ptr, rows, cols, bias, M, N, scale, HAS_MASK)
        tl.store(out_ptr + offs, (factor * x * _cdf(x, TANH)).to(out_ptr.dtype.element_ty), mask=inb)

    @triton.jit
    def _bwd_kernel(g_ptr, h_ptr, b_ptr, bits_ptr, dh_ptr, db_ptr, M, N, scale, HAS_MASK: tl.constexpr,
                    TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr):
        cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        bias = tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
        db = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)  # summed over rows once, after the loop
        for r in range(0, ROWS, BLOCK_M):
            rows = tl.program_id(0) * ROWS + r + tl.arange(0, BLOCK_M)
            x, factor, offs, inb = _tile(h_ptr, b_ptr, bits_ptr, rows, cols, bias, M, N, scale, HAS_MASK)
            g = tl.load(g_ptr + offs, mask=inb, other=0.0).to(tl.float32) * factor
            dh = g * (_cdf(x, TANH) + x * _pdf(x, TANH))  # 0 outside the tensor: g is 0 there
            tl.store(dh_ptr + offs, dh.to(dh_ptr.dtype.element_ty), mask=inb)
            db += dh
        tl.store(db_ptr + tl.program_id(0) * N + cols, tl.sum(db, axis=0), mask=cols < N)

    def _scale(p: float) -> float:
        return 1.0 / (1.0 - D.quantized_rate(p))

    def _check(h: Tensor, bias: Tensor) -> tuple[int, int]:
        """(rows, columns) of h (..., N) seen as a matrix; N must be a multiple of 8 and h under 2^31 elements."""
        n = h.shape[-1]
        if n % 8 or h.numel() >= 2 ** 31 or bias.shape != (n,):
            raise ValueError(f"bias_gelu_dropout: needs h (..., N) with N % 8 == 0 and < 2^31 elements, and a "
                             f"bias of shape (N,); got h {tuple(h.shape)}, bias {tuple(bias.shape)}")
        return h.numel() // n, n

    @triton_op("ulsweep::bias_gelu_dropout", mutates_args=())
    def bias_gelu_dropout_op(h: Tensor, bias: Tensor, bits: Tensor, p: float) -> Tensor:
        """dropout(gelu(h + bias)) with the packed keep bits `bits` (unused when p == 0); h (..., N)."""
        h = h.contiguous()
        m, n = _check(h, bias)
        out = torch.empty_like(h)
        grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
        wrap_triton(_fwd_kernel)[grid](h, bias, bits, out, m, n, _scale(p), HAS_MASK=p > 0.0,
                                       TANH=FORM == "tanh", BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=NUM_WARPS)
        return out

    @triton_op("ulsweep::bias_gelu_dropout_backward", mutates_args=())
    def bias_gelu_dropout_backward_op(grad: Tensor, h: Tensor, bias: Tensor, bits: Tensor,
                                      p: float) -> tuple[Tensor, Tensor]:
        """(grad of h, grad of bias) of `bias_gelu_dropout` for the output gradient `grad`."""
        grad, h = grad.contiguous(), h.contiguous()
        m, n = _check(h, bias)
        dh = torch.empty_like(h)
        parts = torch.empty(triton.cdiv(m, BWD_ROWS), n, dtype=torch.float32, device=h.device)
        grid = (triton.cdiv(m, BWD_ROWS), triton.cdiv(n, BLOCK_N))
        wrap_triton(_bwd_kernel)[grid](grad, h, bias, bits, dh, parts, m, n, _scale(p), HAS_MASK=p > 0.0,
                                       TANH=FORM == "tanh", BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, ROWS=BWD_ROWS,
                                       num_warps=NUM_WARPS)
        return dh, parts.sum(0).to(bias.dtype)

    def _setup_context(ctx, inputs, output):
        h, bias, bits, p = inputs
        ctx.save_for_backward(h, bias, bits)
        ctx.p = p

    def _backward(ctx, grad):
        h, bias, bits = ctx.saved_tensors
        dh, db = torch.ops.ulsweep.bias_gelu_dropout_backward(grad, h, bias, bits, ctx.p)
        return dh, db, None, None

    torch.library.register_autograd("ulsweep::bias_gelu_dropout", _backward, setup_context=_setup_context)


def fast_path(x: Tensor, hidden: int) -> bool:
    """Whether `Mlp` runs its hidden activation (`hidden` wide) through the fused kernels for input x: under
    torch.compile on CUDA with Triton, for a width that is a multiple of 8 (mask bytes do not straddle rows)
    and fewer than 2^31 activations (int32 offsets)."""
    return (USE_TRITON and triton is not None and x.is_cuda and torch.compiler.is_compiling()
            and hidden % 8 == 0 and x.numel() // x.shape[-1] * hidden < 2 ** 31)


def bias_gelu_dropout(h: Tensor, bias: Tensor, p: float, training: bool = True) -> Tensor:
    """dropout(gelu(h + bias), p) through the fused kernels (call only where `fast_path(h)`); the mask is
    ulsweep's packed keep bits."""
    p = D.check_rate(p) if training else 0.0
    bits = D.draw_keep_bits(h, p) if p > 0.0 else torch.empty(0, dtype=torch.uint8, device=h.device)
    return torch.ops.ulsweep.bias_gelu_dropout(h, bias, bits, p)
