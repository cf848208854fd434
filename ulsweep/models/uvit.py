"""Decoder: a UViT (Hoogeboom et al., simple diffusion) conditioned on the noisy latent z0 (§3.2, §5.1).

    x_t (B, C, H, W) --2x2 patch--> (B, 4C, H/2, W/2) ++ z0 upsampled (nearest) to H/2
      -> conv_in -> conv levels dec_channels (dec_blocks res blocks each, stride-2 conv between levels)
      -> dec_patch x dec_patch token merge -> transformer (dec_depth x dec_width), z0 (area-resized to the
         token grid, linear) added to the tokens -> unmerge
      -> conv levels back up (concat skip of the same level, dec_blocks res blocks, nearest x2 + conv)
      -> GroupNorm, SiLU, zero-init conv -> unpatch -> v-prediction (B, C, H, W)

Every res block and transformer block is conditioned on lambda (adaptive norm). The image is
zero-padded (bottom/right) to a multiple of 2 * 2^(levels-1) * dec_patch when needed, the output cropped.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ulsweep.models.layers import (FinalLayer, LogSNREmbedding, ResBlock, Transformer, Upsample,
                                   Downsample, init_linears_, num_groups, pad_to_multiple, patchify,
                                   sincos_2d, unpatchify, zero_)
from ulsweep.models.presets import AEPreset


class DecoderUViT(nn.Module):
    def __init__(self, image_channels: int, latent_channels: int, downsample: int, preset: AEPreset):
        super().__init__()
        if downsample < 2 or downsample & (downsample - 1):
            raise ValueError(f"downsample must be a power of 2 >= 2, got {downsample}")
        ch, nb, drop = list(preset.dec_channels), preset.dec_blocks, preset.dec_dropout
        D, p = preset.dec_width, preset.dec_patch
        self.downsample, self.patch, self.width = downsample, p, D
        self.mid_factor = 2 ** (len(ch) - 1) * p  # patched grid (H/2) -> token grid
        self.embed = LogSNREmbedding(D)
        self.conv_in = nn.Conv2d(4 * image_channels + latent_channels, ch[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        for i, c in enumerate(ch):
            self.down.append(nn.ModuleList(ResBlock(c, c, D, drop) for _ in range(nb)))
            if i < len(ch) - 1:
                self.downsamplers.append(Downsample(c, ch[i + 1]))
        # transformer in the middle
        self.merge = nn.Linear(ch[-1] * p * p, D)
        self.z_proj = nn.Linear(latent_channels, D)
        self.mid = Transformer(D, preset.dec_depth, preset.dec_heads, cond_dim=D, dropout=drop)
        self.unmerge = FinalLayer(D, ch[-1] * p * p, cond_dim=D, zero=False)
        init_linears_(nn.ModuleList([self.merge, self.z_proj]))
        self.up = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        for i in reversed(range(len(ch))):
            c = ch[i]
            self.up.append(nn.ModuleList(ResBlock(2 * c if j == 0 else c, c, D, drop) for j in range(nb)))
            if i > 0:
                self.upsamplers.append(Upsample(c, ch[i - 1]))
        self.norm_out = nn.GroupNorm(num_groups(ch[0]), ch[0], eps=1e-6)
        self.conv_out = zero_(nn.Conv2d(ch[0], 4 * image_channels, 3, padding=1))

    def forward(self, x_t: Tensor, logsnr: Tensor, z0: Tensor) -> Tensor:
        B, _, H, W = x_t.shape  # (B, C, H, W)
        d = self.downsample
        if H % d or W % d or z0.shape[-2:] != (H // d, W // d):
            raise ValueError(f"z0 {tuple(z0.shape)} does not match image {tuple(x_t.shape)} / {d}")
        c = F.silu(self.embed(logsnr, B))  # (B, D)
        z_up = F.interpolate(z0, scale_factor=d // 2, mode="nearest") if d > 2 else z0  # (B, c, H/2, W/2)
        m = self.mid_factor
        h = pad_to_multiple(torch.cat([patchify(x_t, 2), z_up.to(x_t.dtype)], dim=1), m)
        z_up = pad_to_multiple(z_up, m)
        h = self.conv_in(h)  # (B, ch0, H'/2, W'/2)
        skips = []
        for i, blocks in enumerate(self.down):
            for blk in blocks:
                h = blk(h, c)
            skips.append(h)
            if i < len(self.downsamplers):
                h = self.downsamplers[i](h)
        # transformer on the (H'/2/m) x (W'/2/m) token grid
        gh, gw = h.shape[-2] // self.patch, h.shape[-1] // self.patch
        p = self.patch
        tok = self.merge(rearrange(h, "b c (h p1) (w p2) -> b (h w) (c p1 p2)", p1=p, p2=p))  # (B, N, D)
        z_mid = F.avg_pool2d(z_up, m) if m > 1 else z_up  # (B, c, gh, gw)
        tok = tok + self.z_proj(rearrange(z_mid, "b c h w -> b (h w) c").to(tok.dtype))
        tok = tok + sincos_2d(gh, gw, self.width, x_t.device).to(tok.dtype)
        tok = self.unmerge(self.mid(tok, c), c)  # (B, N, ch[-1] p p)
        h = rearrange(tok, "b (h w) (c p1 p2) -> b c (h p1) (w p2)", h=gh, p1=p, p2=p)
        for i, blocks in enumerate(self.up):
            h = torch.cat([h, skips.pop()], dim=1)
            for blk in blocks:
                h = blk(h, c)
            if i < len(self.upsamplers):
                h = self.upsamplers[i](h)
        v = unpatchify(self.conv_out(F.silu(self.norm_out(h))), 2)  # (B, C, H', W')
        return v[:, :, :H, :W]
