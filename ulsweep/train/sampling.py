"""Reconstruction and generation with trained UL models (used by evaluation and the metrics)."""
from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from torch import nn

from ulsweep.config import AELossConfig
from ulsweep.diffusion import LogSNRSchedule, diffuse, sample, sample_to_noisy, x_from_v
from ulsweep.diffusion.noise import Generator, randn
from ulsweep.train.build import decoder_schedule, mse_decoder_logsnr


def sampling_precision(precision: str, device: torch.device):
    """The context the networks run in while sampling (`eval.sample_precision`): bf16 autocast, or none (fp32).
    Samplers take the networks' outputs in fp32 (`.float()`) either way."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    if precision == "fp32":
        return nullcontext()
    raise ValueError(f"sample precision {precision!r}: expected fp32 or bf16")


def member_by_member(exp, members: int) -> bool:
    """Whether a group of `members` samples its final evaluation member after member through one ordinary
    network (`resources.stack_sampling` each; ulsweep/models/stacked.py `plain`, `load_trial`) rather than all at
    once through its stacked networks; one run (members 1) has nothing to choose."""
    return members > 1 and exp.resources.stack_sampling == "each"


@contextmanager
def sampling_networks(nets: list[nn.Module], compile_them: bool, precision: str, device: torch.device,
                      label: str = "sampling") -> Iterator[list[nn.Module]]:
    """The networks to sample with (`eval.sample_compile`): compiled with torch.compile's default mode, or as
    they are when not asked, or while another process of the node compiles the same networks for the first time
    (ulsweep/train/compile_gate.py without waiting: this one samples uncompiled meanwhile; the first process
    holds the gate through its whole sampling, whose first call compiles, and marks the networks done)."""
    if not compile_them:
        yield nets
        return
    from ulsweep.train.compile_gate import first_compile, graph_key

    amp = torch.bfloat16 if precision == "bf16" else None
    key = graph_key(nn.ModuleList(nets), (), "sampling-default", device.type, amp)
    with first_compile(key, label, wait=False) as how:
        yield nets if how == "busy" else [torch.compile(n) for n in nets]


SAMPLE_PIXELS = 4096 * 32 * 32  # eval.sample_batch's default: the images of a call hold this many pixels


def sample_rows(sample_batch: int | None, image_shape: Sequence[int]) -> int:
    """The most images one sampling call holds: `eval.sample_batch`, or by default as many as hold SAMPLE_PIXELS
    pixels of `image_shape` (C, H, W): 4,096 at 32x32, 16 at 512x512 (sampling memory grows with the pixels)."""
    if sample_batch is not None:
        return sample_batch
    return max(1, SAMPLE_PIXELS // (image_shape[-2] * image_shape[-1]))


def sampling_calls(n: int, rows: int, members: int = 1) -> tuple[int, int]:
    """(images of each member a call, calls) that sample `n` images of each of `members` members (all of them in
    every call) with at most `rows` images a call (`eval.sample_batch`; a member gets at least one): the fewest
    calls, all of one size, so that a compiled network meets one shape; the last call's surplus is dropped."""
    calls = -(-n // max(1, rows // members))
    return -(-n // calls), calls


def fill_up(x: torch.Tensor, start: int, size: int) -> torch.Tensor:
    """x[start:start + size], filled up to `size` rows with x's first rows where x ends before (the last call of
    `sampling_calls`; their results are dropped)."""
    part = x[start:start + size]
    return part if len(part) == size else torch.cat([part, x[:size - len(part)]])


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model range [-1, 1] -> uint8 0..255 (rounded)."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@torch.no_grad()
def decode(decoder: nn.Module, z0: torch.Tensor, image_shape: tuple[int, int, int], loss: AELossConfig,
           steps: int, method: str = "ddim", generator: Generator = None) -> torch.Tensor:
    """Sample x ~ p(x | z_0) with the diffusion decoder (or the MSE decoder's single pass); model range."""
    b = z0.shape[0]
    if loss.decoder == "mse":
        lam = torch.full((b,), mse_decoder_logsnr(loss), device=z0.device)  # the lambda it was trained at
        return decoder(torch.zeros((b, *image_shape), device=z0.device), lam, z0).float().clamp(-1, 1)

    def denoise(x_t, lam):
        return x_from_v(x_t, decoder(x_t, lam, z0).float(), lam)

    return sample(denoise, (b, *image_shape), decoder_schedule(loss), steps, method=method,
                  generator=generator, device=z0.device, clip=1.0)


@torch.no_grad()
def reconstruct(encoder: nn.Module, decoder: nn.Module, x: torch.Tensor, loss: AELossConfig, steps: int,
                method: str = "ddim", generator: Generator = None) -> torch.Tensor:
    """x -> z_clean -> z_0 at lambda_z(0) -> decoder sample (model range)."""
    z = encoder(x).float()
    lam0 = torch.full((x.shape[0],), loss.logsnr_z0, device=x.device)
    z0 = diffuse(z, lam0, randn(z.shape, generator, z.device))
    return decode(decoder, z0, tuple(x.shape[1:]), loss, steps, method, generator)


@torch.no_grad()
def generate_latents(base: nn.Module, n: int, latent_shape: tuple[int, int, int], schedule: LogSNRSchedule,
                     steps: int, method: str = "ancestral", generator: Generator = None,
                     device=None) -> torch.Tensor:
    """Base-model samples z_0 at lambda_z(0) (noisy, as the decoder was trained on)."""

    def denoise(z_t, lam):
        return x_from_v(z_t, base(z_t, lam).float(), lam)

    return sample_to_noisy(denoise, (n, *latent_shape), schedule, steps, method=method, generator=generator,
                           device=device)


def image_grid_png(images_u8: torch.Tensor, cols: int = 8) -> bytes:
    """uint8 (N, C, H, W) -> PNG bytes of a grid with `cols` columns."""
    from PIL import Image

    x = images_u8.cpu().numpy()
    n, c, h, w = x.shape
    rows = (n + cols - 1) // cols
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i in range(n):
        r, q = divmod(i, cols)
        grid[r * h:(r + 1) * h, q * w:(q + 1) * w] = x[i].transpose(1, 2, 0)
    img = Image.fromarray(grid[..., 0] if c == 1 else grid)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
