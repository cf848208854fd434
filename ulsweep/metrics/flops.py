"""FLOPs, counted the paper's way (§5.2): linear projections (matmuls, convolutions) and attention, one
multiply-add = 2 FLOPs, training = 3 x forward (forward + backward to inputs + backward to weights).

Counting uses `torch.utils.flop_counter.FlopCounterMode`. On CPU it counts 0 for fused
`scaled_dot_product_attention` kernels, so CPU counts run under `sdpa_kernel(SDPBackend.MATH)`, whose
decomposition into two batched matmuls is counted (4·B·H·L·S·E, the same formula as the fused kernels).
Counting on the `meta` device costs no compute and needs no memory (paper-size models count in seconds).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

_ATTENTION_OPS = ("bmm", "baddbmm", "scaled_dot_product", "flash_attention", "efficient_attention",
                  "cudnn_attention")


def _tensors(obj: Any) -> list[torch.Tensor]:
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _category(op_name: str) -> str:
    if "convolution" in op_name or "conv" in op_name:
        return "conv"
    if any(a in op_name for a in _ATTENTION_OPS):
        return "attention"
    return "linear"


@dataclass(frozen=True)
class FlopCount:
    total: int
    by_op: dict[str, int]  # aten op name -> FLOPs

    def by_category(self) -> dict[str, int]:
        """'linear' (mm/addmm), 'conv', 'attention' (bmm + SDPA kernels). With the MATH SDPA backend,
        attention shows up as bmm; models here use bmm only in attention."""
        out = {"linear": 0, "conv": 0, "attention": 0}
        for op, f in self.by_op.items():
            out[_category(op)] += f
        return out


def count_forward(module: nn.Module | Any, *example_inputs: Any, **kwargs: Any) -> FlopCount:
    """FLOPs of one call `module(*example_inputs, **kwargs)` under no_grad (attention counted on CPU too)."""
    tensors = _tensors(example_inputs) + _tensors(kwargs)
    on_cpu = any(t.device.type == "cpu" for t in tensors) or not tensors
    ctx = sdpa_kernel(SDPBackend.MATH) if on_cpu else contextlib.nullcontext()
    with torch.no_grad(), ctx, FlopCounterMode(display=False) as counter:
        module(*example_inputs, **kwargs)
    by_op = {str(op).split(".", 1)[-1]: int(f) for op, f in counter.get_flop_counts().get("Global", {}).items()}
    return FlopCount(int(counter.get_total_flops()), by_op)


def forward_flops(module: nn.Module | Any, *example_inputs: Any, **kwargs: Any) -> int:
    """FLOPs (not MACs) of one forward of `module` on `example_inputs` (whole batch)."""
    return count_forward(module, *example_inputs, **kwargs).total


def gflops_per_image(module: nn.Module | Any, *example_inputs: Any, **kwargs: Any) -> float:
    """Forward GFLOP per example: forward FLOPs / batch size (dim 0 of the first tensor input) / 1e9."""
    first = _tensors(example_inputs)
    if not first:
        raise ValueError("gflops_per_image needs at least one tensor input (its dim 0 is the batch)")
    return forward_flops(module, *example_inputs, **kwargs) / first[0].shape[0] / 1e9


# Training FLOPs = 3 x forward x images seen (paper §5.2, Fig. 4).
def training_flops(forward_flops_per_image: float, images_seen: int) -> float:
    return 3.0 * float(forward_flops_per_image) * float(images_seen)


# ----------------------------------------------------------------------------------------------
# ulsweep's networks


def _count_models(exp_cfg: Any, image_channels: int, device: str, batch: int,
                  breakdown: bool) -> dict[str, Any]:
    from ulsweep.train.build import build_autoencoder, build_base_model  # lazy: counting needs no config

    dev = torch.device(device)
    s = exp_cfg.data.image_size
    out: dict[str, Any] = {}
    with torch.device(dev):
        ae = build_autoencoder(exp_cfg.ae, image_channels)
    enc, prior, dec = ae.encoder, ae.prior, ae.decoder
    for m in (enc, prior, dec):
        if m is not None:
            m.eval()
    x = torch.zeros(batch, image_channels, s, s, device=dev)  # (B, C, H, W) in [-1, 1]
    logsnr = torch.zeros(batch, device=dev)

    def record(key: str, module: nn.Module, *inputs: Any) -> Any:
        c = count_forward(module, *inputs)
        out[key] = c.total / batch / 1e9
        if breakdown:
            for cat, f in c.by_category().items():
                out[f"{key}.{cat}"] = f / batch / 1e9
        with torch.no_grad():
            return module(*inputs) if key.endswith("encoder") else None

    z = record("encoder", enc, x)  # (B, c, h, w)
    if prior is not None:  # None: the `normal` prior ablation has no network
        record("prior", prior, torch.zeros_like(z), logsnr)
    record("decoder", dec, x, logsnr, torch.zeros_like(z))
    for bcfg in exp_cfg.base_models:
        with torch.device(dev):
            base = build_base_model(bcfg, z.shape[1])
        base.eval()
        record(f"base.{bcfg.name}", base, torch.zeros_like(z), logsnr)
        del base
    return out


def model_gflops(exp_cfg: Any, image_channels: int, *, device: str | None = None, batch: int = 2,
                 breakdown: bool = False) -> dict[str, float]:
    """Forward GFLOP per image of the encoder, prior, decoder and every base model of an ExperimentConfig,
    at `exp_cfg.data.image_size`. Keys: 'encoder', 'prior', 'decoder', 'base.<name>' (and '<key>.linear',
    '<key>.conv', '<key>.attention' with `breakdown`). Counts on the meta device (no compute) unless
    `device` is given; falls back to CPU if a model cannot run on meta."""
    if device is not None:
        return _count_models(exp_cfg, image_channels, device, batch, breakdown)
    try:
        return _count_models(exp_cfg, image_channels, "meta", batch, breakdown)
    except (NotImplementedError, RuntimeError):
        return _count_models(exp_cfg, image_channels, "cpu", batch, breakdown)


def format_table(gflops: dict[str, float], exp_cfg: Any, image_channels: int) -> str:
    s, d, c = exp_cfg.data.image_size, exp_cfg.ae.model.downsample, exp_cfg.ae.model.latent_channels
    lines = [f"forward GFLOP per image  (image {image_channels}x{s}x{s}, latent {c}x{s // d}x{s // d}; "
             f"AE preset {exp_cfg.ae.model.preset})",
             f"{'model':<24}{'total':>12}{'linear':>12}{'conv':>12}{'attention':>12}"]
    for key in [k for k in gflops if "." not in k or k.startswith("base.") and k.count(".") == 1]:
        row = f"{key:<24}{gflops[key]:>12.3f}"
        for cat in ("linear", "conv", "attention"):
            v = gflops.get(f"{key}.{cat}")
            row += f"{v:>12.3f}" if v is not None else f"{'':>12}"
        lines.append(row)
    lines.append("training FLOPs of a run = 3 x forward x images seen (paper §5.2); "
                 "FLOPs count multiply-adds as 2")
    return "\n".join(lines)
