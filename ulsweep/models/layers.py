"""Shared building blocks: log-SNR embedding, 2-D sin-cos positions, attention (SDPA), the adaLN-Zero
transformer block (DiT), conditioned ResNet blocks (ADM), and patching / resizing helpers.

Conventions: images and feature maps are (B, C, H, W); token sequences are (B, N, D) in row-major
(h, w) order; every network conditions on log-SNR lambda (about [-20, 20]) through `LogSNREmbedding`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ulsweep.models.dropout import Dropout

# Periods (in log-SNR units) of the Fourier features of lambda: the slowest is monotone over the whole
# [-20, 20] range (quarter period 32), the fastest resolves differences of about 0.5.
LOGSNR_PERIOD_MIN = 2.0
LOGSNR_PERIOD_MAX = 128.0


def zero_(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module` in place (output projections, gates); returns it."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def init_linears_(module: nn.Module) -> None:
    """DiT init: xavier-uniform weights, zero biases for every nn.Linear below `module`."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def num_groups(channels: int) -> int:
    """GroupNorm groups: up to 32, at least 4 channels per group where possible."""
    g = 32
    while g > 1 and (channels % g or channels // g < 4):
        g //= 2
    return g


def patchify(x: Tensor, p: int) -> Tensor:
    """Space-to-depth: (B, C, H, W) -> (B, C*p*p, H/p, W/p)."""
    return rearrange(x, "b c (h p1) (w p2) -> b (c p1 p2) h w", p1=p, p2=p)


def unpatchify(x: Tensor, p: int) -> Tensor:
    """Depth-to-space: (B, C*p*p, h, w) -> (B, C, h*p, w*p)."""
    return rearrange(x, "b (c p1 p2) h w -> b c (h p1) (w p2)", p1=p, p2=p)


def pad_to_multiple(x: Tensor, m: int) -> Tensor:
    """Zero-pad the bottom/right of (B, C, H, W) so that H and W are multiples of m."""
    ph, pw = (-x.shape[-2]) % m, (-x.shape[-1]) % m
    return F.pad(x, (0, pw, 0, ph)) if ph or pw else x


def logsnr_fourier(logsnr: Tensor, dim: int) -> Tensor:
    """Sin/cos features of lambda at geometric periods in [LOGSNR_PERIOD_MIN, _MAX]: (B,) -> (B, dim)."""
    half = dim // 2
    periods = torch.logspace(math.log10(LOGSNR_PERIOD_MIN), math.log10(LOGSNR_PERIOD_MAX), half,
                             device=logsnr.device, dtype=torch.float32)
    angles = logsnr.float()[:, None] * (2 * math.pi / periods)[None]  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class LogSNREmbedding(nn.Module):
    """lambda (B,) -> Fourier features -> MLP -> (B, dim)."""

    def __init__(self, dim: int, freq_dim: int = 128):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, logsnr: Tensor, batch: int) -> Tensor:
        logsnr = torch.as_tensor(logsnr, device=self.mlp[0].weight.device).reshape(-1).expand(batch)
        return self.mlp(logsnr_fourier(logsnr, self.freq_dim).to(self.mlp[0].weight.dtype))  # (B, dim)


def sincos_2d(h: int, w: int, dim: int, device=None) -> Tensor:
    """Fixed 2-D sin-cos position embedding (MAE) for an h x w grid: (h*w, dim), float32."""
    assert dim % 4 == 0, f"sin-cos position embedding needs dim % 4 == 0, got {dim}"
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, device=device, dtype=torch.float32) / (dim // 4))
    ys, xs = torch.meshgrid(torch.arange(h, device=device, dtype=torch.float32),
                            torch.arange(w, device=device, dtype=torch.float32), indexing="ij")
    out = [ys.reshape(-1, 1) * omega, xs.reshape(-1, 1) * omega]  # 2 x (h*w, dim/4)
    return torch.cat([out[0].sin(), out[0].cos(), out[1].sin(), out[1].cos()], dim=1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


class RMSNorm(nn.RMSNorm):
    """RMSNorm whose weight follows the input dtype, so the fused kernel also runs under bf16 autocast."""

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, self.normalized_shape, self.weight.to(x.dtype), self.eps)


class Attention(nn.Module):
    """Multi-head self-attention with QK-RMSNorm, via scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        assert dim % heads == 0, f"width {dim} not divisible by heads {heads}"
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(dim // heads, eps=1e-6)
        self.k_norm = RMSNorm(dim // heads, eps=1e-6)
        self.proj = nn.Linear(dim, dim)
        self.drop = Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:  # (B, N, D)
        # the norms run on (B, N, h, d) views of the projection and SDPA takes their transposes: no copies
        # into a head-major layout (0.3 ms less per base-model block at batch 128, benchmarks/block.py)
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).unbind(2)  # 3 x (B, N, h, d)
        o = F.scaled_dot_product_attention(self.q_norm(q).transpose(1, 2), self.k_norm(k).transpose(1, 2),
                                           v.transpose(1, 2))  # (B, h, N, d)
        return self.drop(self.proj(o.transpose(1, 2).flatten(2)))


class Mlp(nn.Module):
    """fc1 -> GELU -> dropout -> fc2 -> dropout. `approximate` is GELU's form: "none" the exact x * Phi(x)
    with erf, "tanh" its tanh approximation (DiT's blocks), within 5e-4 of it; the library's blocks use the
    exact one (`benchmarks/train_step.py --gelu none tanh` prices the two)."""

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0, approximate: str = "none"):
        super().__init__()
        if approximate not in ("none", "tanh"):
            raise ValueError(f"GELU approximate must be 'none' or 'tanh', got {approximate!r}")
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.drop = Dropout(dropout)
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x), approximate=self.approximate))))


class TransformerBlock(nn.Module):
    """Pre-LN block with adaLN-Zero modulation (DiT): the gates start at 0, so the block is identity."""

    def __init__(self, dim: int, heads: int, cond_dim: int, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, heads, dropout)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)
        self.ada = nn.Linear(cond_dim, 6 * dim)
        init_linears_(self)
        zero_(self.ada)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:  # x (B, N, D), c = silu(emb) (B, Dc)
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c)[:, None].chunk(6, dim=-1)  # 6 x (B, 1, D)
        x = x + g1 * self.attn(modulate(self.norm1(x), sh1, sc1))
        return x + g2 * self.mlp(modulate(self.norm2(x), sh2, sc2))


class FinalLayer(nn.Module):
    """adaLN (shift, scale) + linear to `out_dim`; zero-initialised when `zero` (v-prediction heads)."""

    def __init__(self, dim: int, out_dim: int, cond_dim: int, zero: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ada = zero_(nn.Linear(cond_dim, 2 * dim))
        self.linear = nn.Linear(dim, out_dim)
        if zero:
            zero_(self.linear)
        else:
            init_linears_(self.linear)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:  # (B, N, D) -> (B, N, out_dim)
        shift, scale = self.ada(c)[:, None].chunk(2, dim=-1)
        return self.linear(modulate(self.norm(x), shift, scale))


class Transformer(nn.Module):
    """A stack of adaLN-Zero blocks on a (B, N, D) sequence."""

    def __init__(self, dim: int, depth: int, heads: int, cond_dim: int, dropout: float = 0.0):
        super().__init__()
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, cond_dim, dropout=dropout)
                                    for _ in range(depth))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        for blk in self.blocks:
            x = blk(x, c)
        return x


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv residual block (ADM); with `cond_dim`, scale/shift of the second norm come
    from the conditioning vector. The second conv starts at zero, so the block starts as its skip."""

    def __init__(self, cin: int, cout: int, cond_dim: int | None = None, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(num_groups(cin), cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(num_groups(cout), cout, eps=1e-6)
        self.cond = nn.Linear(cond_dim, 2 * cout) if cond_dim else None
        self.drop = Dropout(dropout)
        self.conv2 = zero_(nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor, c: Tensor | None = None) -> Tensor:  # (B, Cin, H, W) -> (B, Cout, H, W)
        h = self.norm2(self.conv1(F.silu(self.norm1(x))))
        if self.cond is not None:
            scale, shift = self.cond(c)[:, :, None, None].chunk(2, dim=1)  # (B, Cout, 1, 1) each
            h = modulate(h, shift, scale)
        return self.skip(x) + self.conv2(self.drop(F.silu(h)))


class Downsample(nn.Module):
    """Stride-2 3x3 conv: (B, Cin, H, W) -> (B, Cout, H/2, W/2)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest x2 then 3x3 conv: (B, Cin, H, W) -> (B, Cout, 2H, 2W)."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))
