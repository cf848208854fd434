"""Model sizes as a preset table (DiT style): frozen dataclasses, looked up by name from the config.

`paper` is §5.1 of the paper exactly in widths, depths and dropout; the paper gives no head counts, so those
are ulsweep's (heads of 64 channels in the autoencoder, 128 in the base model, where they are faster on an
H200). `small` is for 32x32 Fashion-MNIST GPU sweeps, with the base models `medium` and `large` beside the
base model `small` for base-size sweeps (experiments/base_size.yaml); `tiny` is for CPU tests and the
few-minute CPU quickstart on 16x16 images.

Measured parameter counts (tests/test_models.py::test_param_counts prints them; 1 image channel,
latent_channels 8, downsample 4 for small/tiny and 16 for paper; the encoder depends on downsample,
the prior/base on latent_channels only through their in/out projections):

    AE preset | encoder | prior ViT | decoder UViT | AE total
    tiny      |  0.031M |   0.171M  |    0.260M    |   0.462M
    small     |  0.825M |   4.969M  |   16.958M    |  22.753M
    paper     | 30.440M | 154.417M  |  197.504M    | 382.361M

    base preset | BaseViT   | forward GFLOP / image, latent 8x8x8 | x small
    tiny        |   0.235M  |   0.0085                            |
    small       |   9.145M  |   0.2811                            |  1
    medium      |  31.165M  |   0.8599                            |  3.06
    large       | 101.194M  |   2.6953                            |  9.59
    paper       | 346.998M  |   9.3714                            |

Transformer blocks use per-block adaLN-Zero (DiT), i.e. 18 d^2 parameters a block (attention 4 d^2,
MLP 8 d^2, modulation 6 d^2): the paper prior (8 x 1024) is ~101M without the modulation, 151M with it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class AEPreset:
    # Encoder: ResNet after 2x2 patching; level i has enc_channels[i] (the last entry repeats when the
    # downsample factor needs more levels), enc_blocks res blocks, the final level enc_final_blocks.
    enc_channels: tuple[int, ...]
    enc_blocks: int
    enc_final_blocks: int
    # Prior: single-level ViT on the latent grid, patch size 1.
    prior_width: int
    prior_depth: int
    prior_heads: int
    # Decoder UViT: 2x2 patching, conv levels dec_channels (downsampling between levels) with
    # dec_blocks res blocks each way, then a dec_patch x dec_patch token merge into the transformer.
    dec_channels: tuple[int, ...]
    dec_blocks: int
    dec_width: int
    dec_depth: int
    dec_heads: int
    dec_patch: int
    dec_dropout: float


@dataclass(frozen=True)
class BasePreset:
    # Two-stage ViT: stage 1 (channels[0], blocks[0] split evenly before/after stage 2) on the latent
    # grid with patch size 1, stage 2 (channels[1], blocks[1]) after a 2x2 token merge; UViT skip.
    channels: tuple[int, int]
    blocks: tuple[int, int]
    heads: tuple[int, int]
    dropout: float


AE_PRESETS: dict[str, AEPreset] = {
    "tiny": AEPreset(enc_channels=(16, 32), enc_blocks=1, enc_final_blocks=1,
                     prior_width=64, prior_depth=2, prior_heads=2,
                     dec_channels=(16, 32), dec_blocks=1, dec_width=64, dec_depth=2, dec_heads=2,
                     dec_patch=1, dec_dropout=0.0),
    "small": AEPreset(enc_channels=(64, 128, 256), enc_blocks=2, enc_final_blocks=2,
                      prior_width=256, prior_depth=4, prior_heads=4,
                      dec_channels=(64, 128, 256), dec_blocks=2, dec_width=320, dec_depth=4, dec_heads=5,
                      dec_patch=1, dec_dropout=0.1),
    # §5.1: encoder [128, 256, 512, 512], 2 blocks a stage, 3 in the last; prior ViT 8 x 1024;
    # decoder UViT conv [128, 256, 512], transformer 8 x 1024, dropout 0.1. dec_patch=2 puts the
    # transformer at 1/16 of the image (32x32 tokens at 512px, the latent grid of the 16x AE).
    "paper": AEPreset(enc_channels=(128, 256, 512, 512), enc_blocks=2, enc_final_blocks=3,
                      prior_width=1024, prior_depth=8, prior_heads=16,
                      dec_channels=(128, 256, 512), dec_blocks=2, dec_width=1024, dec_depth=8,
                      dec_heads=16, dec_patch=2, dec_dropout=0.1),
}

BASE_PRESETS: dict[str, BasePreset] = {
    "tiny": BasePreset(channels=(32, 64), blocks=(2, 2), heads=(2, 2), dropout=0.0),
    "small": BasePreset(channels=(128, 256), blocks=(4, 6), heads=(4, 4), dropout=0.1),
    # The base-size family of issue 22 (tests/test_models.py::test_base_size_family_flops): forward FLOPs
    # 1 : 3.06 : 9.59 on the 8x8x8 latent of experiments/lf_sweep.yaml, like the paper's 100 / 300 / 970 GFLOP
    # (1 : 3 : 9.7). Heads of 32 channels in stage 1 and 64 in stage 2, as in `small`. `medium` was
    # blocks (4, 8) (2.64x small) before it joined the family.
    "medium": BasePreset(channels=(192, 384), blocks=(4, 10), heads=(6, 6), dropout=0.1),
    "large": BasePreset(channels=(320, 640), blocks=(4, 12), heads=(10, 10), dropout=0.1),
    # §5.1: two-stage ViT [512, 1024] channels, [6, 16] blocks, dropout 0.1 in both stages. The paper gives
    # no head count: heads of 128 channels make the batch-256 step 3% faster on an H200 than heads of 64
    # (cuDNN attention 40.1 instead of 51.4 ms, benchmarks/README.md).
    "paper": BasePreset(channels=(512, 1024), blocks=(6, 16), heads=(4, 8), dropout=0.1),
}


def with_head_dim(preset: AEPreset | BasePreset, head_dim: int) -> AEPreset | BasePreset:
    """`preset` with every transformer split into heads of `head_dim` channels (heads = width / head_dim).

    The paper gives the transformers' widths, not their heads; attention kernels run at different speeds for
    different head sizes, which `benchmarks/train_step.py --head-dim` measures with this."""
    def heads(width: int, what: str) -> int:
        if head_dim <= 0 or width % head_dim:
            raise ValueError(f"head_dim {head_dim} does not divide the {what} width {width}")
        return width // head_dim

    if isinstance(preset, BasePreset):
        return replace(preset, heads=tuple(heads(w, f"stage-{i + 1}") for i, w in enumerate(preset.channels)))
    return replace(preset, prior_heads=heads(preset.prior_width, "prior"),
                   dec_heads=heads(preset.dec_width, "decoder transformer"))
