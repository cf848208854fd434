"""FLOP counting: analytic counts of Linear, Conv2d and attention (CPU and meta), training FLOPs, models."""
from __future__ import annotations

import argparse
import textwrap

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ulsweep.metrics.flops import count_forward, forward_flops, gflops_per_image, training_flops


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


def test_linear_flops_analytic():
    B, fin, fout = 8, 64, 32
    assert forward_flops(nn.Linear(fin, fout), torch.randn(B, fin)) == 2 * B * fin * fout
    # token inputs (B, N, D): 2 * B * N * in * out
    assert forward_flops(nn.Linear(fin, fout, bias=False), torch.randn(B, 5, fin)) == 2 * B * 5 * fin * fout


def test_conv2d_flops_analytic():
    B, cin, cout, k, H, W = 2, 3, 16, 3, 10, 12
    conv = nn.Conv2d(cin, cout, k, padding=1)
    assert forward_flops(conv, torch.randn(B, cin, H, W)) == 2 * B * cout * H * W * cin * k * k
    strided = nn.Conv2d(cin, cout, 2, stride=2)  # patchify: out 5 x 6
    assert forward_flops(strided, torch.randn(B, cin, H, W)) == 2 * B * cout * 5 * 6 * cin * 2 * 2


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_sdpa_attention_flops_analytic(device):
    # QK^T and AV: 2 * (2 * B * H * L * S * E); counted on CPU via the MATH backend
    B, H, L, S, E = 2, 4, 16, 24, 8
    q = torch.randn(B, H, L, E, device=device)
    k, v = torch.randn(B, H, S, E, device=device), torch.randn(B, H, S, E, device=device)
    c = count_forward(F.scaled_dot_product_attention, q, k, v)
    assert c.total == 4 * B * H * L * S * E
    assert c.by_category()["attention"] == c.total


def test_attention_block_and_gflops_per_image():
    B, N, D, H = 3, 16, 32, 4

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.proj = nn.Linear(D, 3 * D), nn.Linear(D, D)

        def forward(self, x):  # (B, N, D)
            q, k, v = self.qkv(x).view(x.shape[0], N, 3, H, D // H).permute(2, 0, 3, 1, 4)
            return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape))

    expected_per_image = 2 * N * D * 3 * D + 4 * H * N * N * (D // H) + 2 * N * D * D
    c = count_forward(Block(), torch.randn(B, N, D))
    assert c.total == B * expected_per_image
    cats = c.by_category()
    assert cats["attention"] == B * 4 * H * N * N * (D // H) and cats["conv"] == 0
    assert gflops_per_image(Block(), torch.randn(B, N, D)) == pytest.approx(expected_per_image / 1e9)


def test_training_flops_match_a_counted_forward_and_backward():
    """training_flops against FlopCounterMode over real training steps of an MLP whose input needs a gradient
    (as every layer inside a network does), and against the hand count: a Linear costs 2·B·in·out FLOPs
    forward, as much for the input gradient and as much again for the weight gradient."""
    B, steps = 8, 3
    net = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 32))
    x = torch.randn(B, 64, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        for _ in range(steps):
            net(x).square().sum().backward()
    by_hand = steps * 3 * 2 * B * (64 * 128 + 128 * 32)
    assert counter.get_total_flops() == by_hand
    assert training_flops(gflops_per_image(net, x) * 1e9, steps * B) == pytest.approx(by_hand, rel=1e-12)


# --- ulsweep's models ---------------------------------------------------------------------------------


def _cfg(**data):
    from ulsweep.config import experiment_from_dict

    return experiment_from_dict({"data": {"path": "builtin:digits", "image_size": 16, **data},
                                 "ae": {"model": {"preset": "tiny", "downsample": 4, "latent_channels": 4}}})


def test_model_gflops_tiny_preset():
    from ulsweep.metrics.flops import model_gflops

    g = model_gflops(_cfg(), image_channels=1, breakdown=True)
    for key in ("encoder", "prior", "decoder", "base.base"):
        assert g[key] > 0, (key, g)
        parts = sum(g[f"{key}.{c}"] for c in ("linear", "conv", "attention"))
        assert parts == pytest.approx(g[key])
    # meta-device counts equal real CPU counts
    cpu = model_gflops(_cfg(), image_channels=1, device="cpu")
    for key in ("encoder", "prior", "decoder", "base.base"):
        assert cpu[key] == pytest.approx(g[key], rel=1e-12)


def test_flops_cli_prints_table(tmp_path, capsys):
    from ulsweep.metrics.cli import register

    cfg = tmp_path / "exp.yaml"
    cfg.write_text(textwrap.dedent("""\
        name: flops-test
        data: {path: builtin:digits, image_size: 16}
        ae: {model: {preset: tiny, downsample: 4, latent_channels: 4}}
        """))
    parser = argparse.ArgumentParser(prog="ulsweep")
    register(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["flops", str(cfg)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    for key in ("encoder", "prior", "decoder", "base.base", "attention"):
        assert key in out


def test_model_gflops_normal_prior_has_no_prior_entry():
    from ulsweep.config import experiment_from_dict
    from ulsweep.metrics.flops import model_gflops

    cfg = experiment_from_dict({"data": {"path": "builtin:digits", "image_size": 16},
                                "ae": {"model": {"preset": "tiny", "downsample": 4, "latent_channels": 4},
                                       "loss": {"prior": "normal"}}})
    g = model_gflops(cfg, image_channels=1)
    assert "prior" not in g and g["encoder"] > 0 and g["decoder"] > 0
