"""Encoder E: x -> z_clean (§3.1, §5.1): 2x2 patching, then a ResNet with downsampling levels.

The 2x2 patching counts as the first factor 2 of `downsample`: downsample 2 is patching only (one
level), 4 is patching + 1 stride-2 conv, ..., 32 is patching + 4. Level i uses
preset.enc_channels[i] (the last entry repeats if more levels are needed, the first entries are used if
fewer), preset.enc_blocks res blocks a level and preset.enc_final_blocks in the last level.
"""
from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from ulsweep.models.layers import Downsample, ResBlock, num_groups, patchify
from ulsweep.models.presets import AEPreset


def level_channels(channels: tuple[int, ...], levels: int) -> list[int]:
    """The first `levels` entries of `channels`, padded with its last entry."""
    return [channels[min(i, len(channels) - 1)] for i in range(levels)]


class Encoder(nn.Module):
    def __init__(self, image_channels: int, latent_channels: int, downsample: int, preset: AEPreset):
        super().__init__()
        if downsample < 2 or downsample & (downsample - 1):
            raise ValueError(f"downsample must be a power of 2 >= 2, got {downsample}")
        self.downsample = downsample
        levels = int(math.log2(downsample))  # patching + (levels - 1) stride-2 convs
        ch = level_channels(preset.enc_channels, levels)
        self.conv_in = nn.Conv2d(4 * image_channels, ch[0], 3, padding=1)
        self.levels = nn.ModuleList()
        for i, c in enumerate(ch):
            n = preset.enc_final_blocks if i == levels - 1 else preset.enc_blocks
            blocks: list[nn.Module] = [ResBlock(c, c) for _ in range(n)]
            if i < levels - 1:
                blocks.append(Downsample(c, ch[i + 1]))
            self.levels.append(nn.Sequential(*blocks))
        self.norm_out = nn.GroupNorm(num_groups(ch[-1]), ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, H, W) in [-1, 1]
        d = self.downsample
        if x.shape[-2] % d or x.shape[-1] % d:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by downsample {d}")
        h = self.conv_in(patchify(x, 2))  # (B, ch0, H/2, W/2)
        for level in self.levels:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, c, H/d, W/d)
