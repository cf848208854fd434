"""A domain feature extractor (`DomainCNN`): a small classifier ulsweep trains itself on a labelled dataset
(`ulsweep.metrics.domain_training`, `ulsweep features train`), stored as a state dict plus a JSON sidecar
with its SHA-256. Metrics from it carry its name (`rfd_fmnist`, `gfd_fmnist`) and are never called FID.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ulsweep.io import atomic_write_bytes

from .features import ExtractorError, FeatureExtractor, WeightsHashError, check_name, check_u8, feature_arithmetic
from .weights import read_bytes, sha256_bytes, state_dict_bytes, state_dict_from_bytes, verify_sha256


@dataclass(frozen=True)
class DomainArch:
    """A preset of the domain CNN (one entry per `arch` name; the JSON sidecar stores the name)."""

    widths: tuple[int, int, int] = (32, 64, 128)
    feature_dim: int = 256
    dropout: float = 0.3


DOMAIN_ARCHS: dict[str, DomainArch] = {
    "cnn-s-v1": DomainArch(),
    "cnn-xs-v1": DomainArch(widths=(16, 32, 64), feature_dim=128, dropout=0.2),
}


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def _to_channels(x: Tensor, c: int) -> Tensor:  # (N, C, H, W) float -> (N, c, H, W)
    if x.shape[1] == c:
        return x
    if c == 3:  # gray -> RGB
        return x.expand(-1, 3, -1, -1)
    w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)  # RGB -> luma


class DomainCNN(FeatureExtractor):
    """Three conv stages (2 convs each, 2x2 max-pool after the first two), global average pool,
    a `feature_dim` hidden layer (the features: penultimate layer, after ReLU) and a linear classifier.

    Inputs are resized (bilinear, antialiased) to `input_size`, converted to `in_channels` and mapped to
    [-1, 1]; so any (C, H, W) can be compared with the training images, identically for both sides of a FD.
    """

    def __init__(self, name: str, arch: str, in_channels: int, input_size: int, num_classes: int):
        super().__init__()
        check_name(name)
        if arch not in DOMAIN_ARCHS:
            raise ExtractorError(f"unknown domain extractor arch {arch!r}; known: {', '.join(DOMAIN_ARCHS)}")
        a = DOMAIN_ARCHS[arch]
        w1, w2, w3 = a.widths
        self.name, self.arch, self.feature_dim, self.weights_sha256 = name, arch, a.feature_dim, ""
        self.in_channels, self.input_size, self.num_classes = in_channels, input_size, num_classes
        self.body = nn.Sequential(
            _conv_bn(in_channels, w1), _conv_bn(w1, w1), nn.MaxPool2d(2),
            _conv_bn(w1, w2), _conv_bn(w2, w2), nn.MaxPool2d(2),
            _conv_bn(w2, w3), _conv_bn(w3, w3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.hidden = nn.Sequential(nn.Linear(w3, a.feature_dim), nn.ReLU(inplace=True))
        self.head = nn.Sequential(nn.Dropout(a.dropout), nn.Linear(a.feature_dim, num_classes))

    def preprocess(self, images_u8: Tensor) -> Tensor:  # uint8 (N, C, H, W) -> float (N, c, s, s) in [-1, 1]
        check_u8(images_u8)
        x = images_u8.float()
        x = _to_channels(x, self.in_channels)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False, antialias=True)
        return x / 127.5 - 1.0

    def logits(self, x: Tensor) -> Tensor:  # preprocessed (N, c, s, s) -> (N, classes)
        return self.head(self.hidden(self.body(x)))

    def forward(self, images_u8: Tensor) -> Tensor:  # uint8 (N, C, H, W) -> (N, feature_dim) float32
        with feature_arithmetic(images_u8.device, self.precision, self.cudnn_search):
            return self.hidden(self.body(self.preprocess(images_u8))).float()

    def meta(self) -> dict[str, Any]:
        return {"name": self.name, "arch": self.arch, "in_channels": self.in_channels,
                "input_size": self.input_size, "num_classes": self.num_classes, "feature_dim": self.feature_dim}


DOMAIN_FORMAT = "ulsweep-domain-extractor"


def extractor_name_for_dataset(dataset_name: str) -> str:
    """The extractor (and metric-suffix) name for a dataset: fashion-mnist -> fmnist; otherwise lower-case
    with non-alphanumerics as '_' (digits -> digits, my-photos -> my_photos)."""
    known = {"fashion-mnist": "fmnist", "fashion_mnist": "fmnist", "fmnist": "fmnist"}
    if dataset_name.lower() in known:
        return known[dataset_name.lower()]
    name = re.sub(r"[^a-z0-9]+", "_", dataset_name.lower()).strip("_")
    return name if name and name[0].isalpha() else f"d_{name}"


def sidecar_uri(weights_uri: str) -> str:
    """`x/fmnist.pt` -> `x/fmnist.json` (any other suffix: `x/file.ext.json`)."""
    return weights_uri[:-3] + ".json" if weights_uri.endswith(".pt") else weights_uri + ".json"


def save_domain_extractor(model: DomainCNN, out: str, extra: dict[str, Any]) -> dict[str, Any]:
    """Write the state dict to `out` and a JSON sidecar (sha256, arch, dataset hash, accuracy, ...), both
    atomically, weights first (a sidecar never points at missing weights). Returns the sidecar dict."""
    data = state_dict_bytes(model.state_dict())
    sha = sha256_bytes(data)
    meta = {"format": DOMAIN_FORMAT, "format_version": 1, **model.meta(), "sha256": sha,
            "weights_file": out.rsplit("/", 1)[-1], **extra}
    atomic_write_bytes(out, data)
    atomic_write_bytes(sidecar_uri(out), (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    model.weights_sha256 = sha
    return meta


def load_domain_extractor(weights: str, sha256: str | None = None) -> DomainCNN:
    """Load a domain extractor saved by `save_domain_extractor` from a path or fsspec URI.

    The weights' SHA-256 must match the sidecar's, and `sha256` when given (e.g. pinned in a config).
    """
    meta_uri = sidecar_uri(weights)
    try:
        meta = json.loads(read_bytes(meta_uri))
    except json.JSONDecodeError as e:
        raise ExtractorError(f"{meta_uri}: not valid JSON: {e}") from e
    if meta.get("format") != DOMAIN_FORMAT:
        raise ExtractorError(f"{meta_uri}: not a {DOMAIN_FORMAT} sidecar (format={meta.get('format')!r})")
    data = read_bytes(weights)
    if sha256 is not None and sha256.lower() != meta["sha256"]:
        raise WeightsHashError(f"{weights}: the sidecar {meta_uri} records SHA-256 {meta['sha256']}, "
                               f"but {sha256} was required")
    verify_sha256(data, weights, sha256 or meta["sha256"], f"domain extractor {meta.get('name')!r}")
    model = DomainCNN(meta["name"], meta["arch"], meta["in_channels"], meta["input_size"], meta["num_classes"])
    try:
        model.load_state_dict(state_dict_from_bytes(data, weights))
    except RuntimeError as e:
        raise ExtractorError(f"{weights}: state dict does not fit arch {meta['arch']!r}: {e}") from e
    model.weights_sha256 = meta["sha256"]
    model.training_meta = meta
    return model.eval().requires_grad_(False)
