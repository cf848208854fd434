"""Shapes, zero init, z0 dependence, variable token counts, parameter use and preset sizes of the
networks in ulsweep.models (tiny preset on CPU; paper sizes counted on the meta device)."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from ulsweep.config import AELossConfig, AEModelConfig, AEStageConfig, BaseModelConfig, BaseStageConfig
from ulsweep.models import (AE_PRESETS, BASE_PRESETS, BaseViT, DecoderUViT, Encoder, PriorViT,
                            UnifiedAutoencoder, num_params)
from ulsweep.train.build import build_autoencoder, build_base_model

TINY = AE_PRESETS["tiny"]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def perturb_zero_params_(model: torch.nn.Module, std: float = 0.02) -> None:
    """Undo the zero init (output layers, adaLN gates, residual convs, biases) so every path is live."""
    with torch.no_grad():
        for p in model.parameters():
            if torch.all(p == 0):
                p.normal_(0.0, std)


def lam(b: int) -> torch.Tensor:
    return torch.empty(b).uniform_(-20, 20)


@pytest.mark.parametrize("downsample", [2, 4, 8, 16, 32])
@pytest.mark.parametrize("latent_channels", [1, 4, 16])
def test_stage1_shapes(downsample, latent_channels):
    image_channels = 3 if latent_channels == 4 else 1  # every downsample sees both 1 and 3 channels
    size = max(32, 2 * downsample)  # 64 for downsample 32 (2x2 latent)
    B, h = 2, size // downsample
    enc = Encoder(image_channels, latent_channels, downsample, TINY)
    prior = PriorViT(latent_channels, TINY)
    dec = DecoderUViT(image_channels, latent_channels, downsample, TINY)
    x = torch.rand(B, image_channels, size, size) * 2 - 1
    z = enc(x)
    assert z.shape == (B, latent_channels, h, h)
    assert torch.isfinite(z).all() and z.abs().sum() > 0
    assert prior(z, lam(B)).shape == z.shape
    assert dec(x, lam(B), z).shape == x.shape


def test_zero_init_outputs():
    B = 3
    x, z = torch.randn(B, 1, 16, 16), torch.randn(B, 4, 4, 4)
    assert torch.equal(PriorViT(4, TINY)(z, lam(B)), torch.zeros_like(z))
    assert torch.equal(DecoderUViT(1, 4, 4, TINY)(x, lam(B), z), torch.zeros_like(x))
    for name, preset in BASE_PRESETS.items():
        if name in ("tiny", "small"):
            assert torch.equal(BaseViT(4, preset).eval()(z, lam(B)), torch.zeros_like(z)), name


def test_decoder_uses_z0_and_logsnr():
    dec = DecoderUViT(3, 4, 8, TINY)
    perturb_zero_params_(dec)
    x, z0, z1 = torch.randn(2, 3, 32, 32), torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    l = lam(2)
    out = dec(x, l, z0)
    assert out.abs().mean() > 0
    assert (out - dec(x, l, z1)).abs().mean() > 1e-3 * out.abs().mean()
    assert (out - dec(x, l + 3.0, z0)).abs().mean() > 1e-3 * out.abs().mean()
    # z0 reaches the decoder along both paths (input concat and transformer tokens)
    z = z0.clone().requires_grad_(True)
    dec(x, l, z).square().sum().backward()
    assert z.grad.abs().sum() > 0 and dec.z_proj.weight.grad.abs().sum() > 0


def test_decoder_rejects_mismatched_z0():
    dec = DecoderUViT(1, 4, 4, TINY)
    with pytest.raises(ValueError, match="does not match"):
        dec(torch.randn(1, 1, 16, 16), lam(1), torch.randn(1, 4, 8, 8))


def test_decoder_pads_odd_grids():
    # The UViT needs the patched grid (H/2) to be a multiple of 2^(levels-1) * dec_patch: 2 for tiny,
    # 8 for a 3-level, patch-2 variant. Other sizes are zero-padded and the output is cropped back.
    deep = dataclasses.replace(TINY, dec_channels=(16, 16, 32), dec_patch=2)
    for preset, size, d in [(TINY, 6, 2), (TINY, 10, 2), (deep, 12, 4), (deep, 24, 8), (deep, 32, 4)]:
        dec = DecoderUViT(1, 2, d, preset)
        perturb_zero_params_(dec)
        out = dec(torch.randn(2, 1, size, size), lam(2), torch.randn(2, 2, size // d, size // d))
        assert out.shape == (2, 1, size, size) and torch.isfinite(out).all() and out.abs().sum() > 0


@pytest.mark.parametrize("model", ["prior", "base"])
def test_vit_variable_token_counts(model):
    net = PriorViT(4, TINY) if model == "prior" else BaseViT(4, BASE_PRESETS["tiny"])
    perturb_zero_params_(net)
    for h, w in [(4, 4), (8, 8), (3, 3), (1, 1), (2, 5)]:
        z = torch.randn(2, 4, h, w)
        out = net(z, lam(2))
        assert out.shape == z.shape and torch.isfinite(out).all() and out.abs().sum() > 0


def test_logsnr_scalar_broadcast():
    net = PriorViT(4, TINY)
    perturb_zero_params_(net)
    z = torch.randn(3, 4, 4, 4)
    torch.testing.assert_close(net(z, torch.tensor(2.0)), net(z, torch.full((3,), 2.0)))


def _all_params(net, fn, zero_ok: bool):
    for p in net.parameters():
        p.grad = None
    fn().square().sum().backward()
    names = [n for n, p in net.named_parameters() if p.grad is None]
    assert not names, f"parameters without gradient (unused): {names}"
    if not zero_ok:
        dead = [n for n, p in net.named_parameters() if p.grad.abs().sum() == 0]
        assert not dead, f"parameters with zero gradient: {dead}"


@pytest.mark.parametrize("perturbed", [False, True])
def test_every_parameter_gets_gradient(perturbed):
    """DDP needs every parameter used in each backward. At init the zero-init output layers block the
    gradient (zero but present); once they are perturbed, every gradient is non-zero."""
    x, l = torch.randn(2, 1, 16, 16), lam(2)
    enc, prior, dec = Encoder(1, 4, 4, TINY), PriorViT(4, TINY), DecoderUViT(1, 4, 4, TINY)
    base = BaseViT(4, BASE_PRESETS["tiny"])
    z = torch.randn(2, 4, 4, 4)
    for net, fn in [(enc, lambda: enc(x)), (prior, lambda: prior(z, l)), (dec, lambda: dec(x, l, z)),
                    (base, lambda: base(z, l))]:
        if perturbed:
            perturb_zero_params_(net)
        _all_params(net, fn, zero_ok=not perturbed)


def test_unified_autoencoder_parts_and_build():
    cfg = AEStageConfig(model=AEModelConfig(preset="tiny", downsample=4, latent_channels=3))
    ae = build_autoencoder(cfg, image_channels=1)
    assert isinstance(ae, UnifiedAutoencoder) and isinstance(ae.prior, PriorViT)
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    z = ae.encoder(x)
    v_z = ae.prior(torch.randn_like(z), lam(4))
    v_x = ae.decoder(torch.randn_like(x), lam(4), z + 0.08 * torch.randn_like(z))
    assert z.shape == (4, 3, 4, 4) and v_z.shape == z.shape and v_x.shape == x.shape
    normal = build_autoencoder(AEStageConfig(model=cfg.model, loss=AELossConfig(prior="normal")), 1)
    assert normal.prior is None and num_params(normal) < num_params(ae)
    base = build_base_model(BaseStageConfig(model=BaseModelConfig(preset="tiny")), latent_channels=3)
    assert isinstance(base, BaseViT) and base(z, lam(4)).shape == z.shape


# Measured counts (1 image channel, 8 latent channels; paper downsample 16) and the ranges asserted:
#   paper: encoder 30.4M, prior 154.4M (8 x 1024; ~101M without the adaLN modulation), decoder 197.5M,
#   base 347.0M. small: AE 22.8M (decoder 17.0M), base 9.1M; medium base 31.2M; large base 101.2M.
PARAM_RANGES = {  # (part, preset): (low, high) in millions
    ("encoder", "paper"): (20, 40), ("prior", "paper"): (100, 200), ("decoder", "paper"): (150, 250),
    ("base", "paper"): (250, 450), ("ae", "small"): (10, 25), ("base", "small"): (5, 12),
    ("base", "medium"): (15, 35), ("base", "large"): (80, 120), ("ae", "tiny"): (0.1, 1.0),
    ("base", "tiny"): (0.05, 0.5),
}


def test_param_counts(capsys):
    counts = {}
    with torch.device("meta"):  # no memory, no init cost
        for preset, d in [("tiny", 4), ("small", 4), ("paper", 16)]:
            ae = build_autoencoder(AEStageConfig(model=AEModelConfig(preset, d, 8)), 1)
            for part in ("encoder", "prior", "decoder"):
                counts[part, preset] = num_params(getattr(ae, part)) / 1e6
            counts["ae", preset] = num_params(ae) / 1e6
        for preset in BASE_PRESETS:
            counts["base", preset] = num_params(build_base_model(
                BaseStageConfig(model=BaseModelConfig(preset)), 8)) / 1e6
    with capsys.disabled():
        print("\n" + "\n".join(f"  {p:>6} {k:<8} {v:9.3f}M" for (k, p), v in counts.items()))
    for key, (lo, hi) in PARAM_RANGES.items():
        assert lo <= counts[key] <= hi, (key, counts[key])
    assert counts["base", "tiny"] < counts["base", "small"] < counts["base", "medium"] < counts["base", "large"] \
        < counts["base", "paper"]


def test_base_size_family_flops():
    """small : medium : large forward FLOPs ~ 1 : 3 : 10 (the paper's 100 / 300 / 970 GFLOP family) on the
    8x8x8 latent of experiments/lf_sweep.yaml, counted on the meta device (measured 1 : 3.06 : 9.59)."""
    from ulsweep.metrics.flops import gflops_per_image

    g = {}
    for preset in ("small", "medium", "large"):
        with torch.device("meta"):
            net = build_base_model(BaseStageConfig(model=BaseModelConfig(preset)), 8).eval()
            z, lam_ = torch.zeros(2, 8, 8, 8), torch.zeros(2)
        g[preset] = gflops_per_image(net, z, lam_)
    assert g["small"] == pytest.approx(0.2811, rel=1e-3)  # the published Fig. 8 base model, unchanged
    assert 2.8 <= g["medium"] / g["small"] <= 3.2 and 9.0 <= g["large"] / g["small"] <= 10.5, g


def test_with_head_dim_splits_every_transformer_and_names_a_width_it_does_not_divide():
    from ulsweep.models.presets import with_head_dim
    base, ae = with_head_dim(BASE_PRESETS["paper"], 64), with_head_dim(AE_PRESETS["paper"], 128)
    assert base.heads == (8, 16) and base.channels == BASE_PRESETS["paper"].channels
    assert (ae.prior_heads, ae.dec_heads) == (8, 8) and ae.prior_width == ae.dec_width == 1024
    assert with_head_dim(BASE_PRESETS["paper"], 128) == BASE_PRESETS["paper"]  # the paper preset's own heads
    with pytest.raises(ValueError, match="stage-1 width 128"):
        with_head_dim(BASE_PRESETS["small"], 96)


def test_bf16_autocast(recwarn):
    """The trainer runs bf16 autocast on CUDA; the same code path must work (CPU autocast here)."""
    enc, prior, dec = Encoder(1, 4, 4, TINY), PriorViT(4, TINY), DecoderUViT(1, 4, 4, TINY)
    base = BaseViT(4, BASE_PRESETS["tiny"])
    for net in (prior, dec, base):
        perturb_zero_params_(net)
    x, l = torch.randn(2, 1, 16, 16), lam(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = enc(x)
        outs = [prior(z, l), dec(x, l, z), base(z, l)]
        sum(o.float().square().sum() for o in outs).backward()
    assert all(torch.isfinite(o).all() and o.shape[0] == 2 for o in outs)
    assert not [w for w in recwarn if "dtype" in str(w.message).lower()], [str(w.message) for w in recwarn]
