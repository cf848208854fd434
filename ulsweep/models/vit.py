"""Latent ViTs: the prior (single-level, §5.1) and the two-stage base model (§3.3, §5.1).

Both take a noisy latent z_t (B, c, h, w) and its log-SNR lambda (B,) and return the v-prediction
(B, c, h, w); x_hat = alpha * z_t - sigma * v. Tokens are latent pixels (patch size 1); positions are
fixed 2-D sin-cos embeddings computed for the input grid, so any h x w works. The output projections
start at zero (v_hat = 0 at init).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ulsweep.models.layers import (FinalLayer, LogSNREmbedding, Transformer, init_linears_,
                                   pad_to_multiple, sincos_2d)
from ulsweep.models.presets import AEPreset, BasePreset


class PriorViT(nn.Module):
    """Single-level ViT prior on the latent grid (paper: 8 blocks x 1024 channels)."""

    def __init__(self, latent_channels: int, preset: AEPreset):
        super().__init__()
        d = preset.prior_width
        self.width = d
        self.embed = LogSNREmbedding(d)
        self.proj_in = nn.Linear(latent_channels, d)
        self.blocks = Transformer(d, preset.prior_depth, preset.prior_heads, cond_dim=d)
        self.final = FinalLayer(d, latent_channels, cond_dim=d)
        init_linears_(self.proj_in)

    def forward(self, z_t: Tensor, logsnr: Tensor) -> Tensor:  # (B, c, h, w), (B,)
        B, _, h, w = z_t.shape
        c = F.silu(self.embed(logsnr, B))  # (B, D)
        x = self.proj_in(rearrange(z_t, "b c h w -> b (h w) c"))  # (B, N, D)
        x = x + sincos_2d(h, w, self.width, z_t.device).to(x.dtype)
        x = self.final(self.blocks(x, c), c)  # (B, N, c)
        return rearrange(x, "b (h w) c -> b c h w", h=h, w=w)


class BaseViT(nn.Module):
    """Two-stage ViT base model (paper: [512, 1024] channels, [6, 16] blocks, dropout 0.1).

    stage 1 (width D1, blocks[0] // 2 blocks) on the latent grid
      -> 2x2 token merge (grid zero-padded to even) -> stage 2 (width D2, blocks[1] blocks)
      -> 2x2 unmerge, concat with the stage-1 activations (UViT skip), linear back to D1
      -> stage 1 again (the remaining blocks[0] - blocks[0] // 2 blocks) -> v-prediction.
    The paper finds patching the latent hurts the base model, hence patch size 1 at stage 1.
    """

    def __init__(self, latent_channels: int, preset: BasePreset):
        super().__init__()
        d1, d2 = preset.channels
        (h1, h2), drop = preset.heads, preset.dropout
        n_down = preset.blocks[0] // 2
        self.d1, self.d2 = d1, d2
        self.embed = LogSNREmbedding(d2)
        self.proj_in = nn.Linear(latent_channels, d1)
        self.stage1_down = Transformer(d1, n_down, h1, cond_dim=d2, dropout=drop)
        self.merge = nn.Linear(4 * d1, d2)
        self.stage2 = Transformer(d2, preset.blocks[1], h2, cond_dim=d2, dropout=drop)
        self.unmerge = nn.Linear(d2, 4 * d1)
        self.skip = nn.Linear(2 * d1, d1)
        self.stage1_up = Transformer(d1, preset.blocks[0] - n_down, h1, cond_dim=d2, dropout=drop)
        self.final = FinalLayer(d1, latent_channels, cond_dim=d2)
        init_linears_(nn.ModuleList([self.proj_in, self.merge, self.unmerge, self.skip]))

    def forward(self, z_t: Tensor, logsnr: Tensor) -> Tensor:  # (B, c, h, w), (B,)
        B, _, h, w = z_t.shape
        c = F.silu(self.embed(logsnr, B))  # (B, D2)
        x = self.proj_in(rearrange(z_t, "b c h w -> b (h w) c"))  # (B, h*w, D1)
        x = x + sincos_2d(h, w, self.d1, z_t.device).to(x.dtype)
        skip = x = self.stage1_down(x, c)
        # 2x2 token merge: (B, h*w, D1) -> (B, H2*W2, D2), grid padded to even
        g = pad_to_multiple(rearrange(x, "b (h w) d -> b d h w", h=h, w=w), 2)
        H2, W2 = g.shape[-2] // 2, g.shape[-1] // 2
        y = self.merge(rearrange(g, "b d (h p1) (w p2) -> b (h w) (p1 p2 d)", p1=2, p2=2))
        y = y + sincos_2d(H2, W2, self.d2, z_t.device).to(y.dtype)
        y = self.unmerge(self.stage2(y, c))  # (B, H2*W2, 4*D1)
        y = rearrange(y, "b (h w) (p1 p2 d) -> b d (h p1) (w p2)", h=H2, p1=2, p2=2)[:, :, :h, :w]
        x = self.skip(torch.cat([rearrange(y, "b d h w -> b (h w) d"), skip], dim=-1))  # (B, h*w, D1)
        x = self.final(self.stage1_up(x, c), c)  # (B, h*w, c)
        return rearrange(x, "b (h w) c -> b c h w", h=h, w=w)
