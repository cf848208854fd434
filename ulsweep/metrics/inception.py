"""The standard FID Inception-v3 feature extractor. Its definition is torch-fidelity's
`FeatureExtractorInceptionV3` (not rewritten here); its weights come from a local path or fsspec URI
(argument, config, or $ULSWEEP_INCEPTION_WEIGHTS) and must match the known SHA-256 of
`pt_inception-2015-12-05-6726825d.pth`. Metrics from it are `rfid` / `gfid`.
"""
from __future__ import annotations

import importlib.util
import io
import os
import sys
import types

import torch
import torch.nn as nn
from torch import Tensor

from .features import INCEPTION_SHA256, ExtractorError, FeatureExtractor, MissingWeightsError, check_name, check_u8
from .weights import read_bytes, sha256_bytes, state_dict_bytes, state_dict_from_bytes, verify_sha256

INCEPTION_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_SOURCE_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                        + INCEPTION_FILENAME)
INCEPTION_WEIGHTS_ENV = "ULSWEEP_INCEPTION_WEIGHTS"
INCEPTION_FEATURE_DIM = 2048


def _torch_fidelity_inception_cls() -> type:
    """torch-fidelity's FeatureExtractorInceptionV3 class, imported without torchvision.

    `import torch_fidelity` runs its package __init__, which imports torchvision (CLIP/VGG extractors);
    PyPI torchvision does not import beside every torch build. The Inception module itself needs only
    torch, so when the package is not imported yet we load its submodules under a temporary bare package
    entry and then remove that entry (the submodules stay cached; a later `import torch_fidelity` runs the
    real __init__ normally).
    """
    name = "torch_fidelity.feature_extractor_inceptionv3"
    if name in sys.modules:
        return sys.modules[name].FeatureExtractorInceptionV3
    spec = importlib.util.find_spec("torch_fidelity")
    if spec is None or not spec.submodule_search_locations:
        raise ExtractorError(
            "the Inception extractor needs torch-fidelity's network definition: "
            "pip install --no-deps torch-fidelity==0.4.0  (--no-deps: its torchvision requirement would "
            "replace this torch build; only the Inception module is used, which needs torch alone)")
    if "torch_fidelity" in sys.modules:  # real package already imported
        import torch_fidelity.feature_extractor_inceptionv3 as m
        return m.FeatureExtractorInceptionV3
    stub = types.ModuleType("torch_fidelity")
    stub.__path__ = list(spec.submodule_search_locations)
    stub.__spec__ = spec
    sys.modules["torch_fidelity"] = stub
    try:
        import torch_fidelity.feature_extractor_inceptionv3 as m
    finally:
        if sys.modules.get("torch_fidelity") is stub:
            del sys.modules["torch_fidelity"]
    return m.FeatureExtractorInceptionV3


def _build_torch_fidelity_inception(state_dict: dict[str, Tensor] | None) -> nn.Module:
    """torch-fidelity's FID Inception-v3 returning 2048-d pool features, with `state_dict` (None: random init).

    Its constructor loads weights itself (from a URL when given no path, never wanted here); we hand it an
    in-memory empty dict and divert its one `load_state_dict` call to our already verified state dict.
    """
    base = _torch_fidelity_inception_cls()

    class _Inception(base):  # type: ignore[misc, valid-type]
        def __init__(self, sd):
            self._ulsweep_pending = sd
            empty = io.BytesIO()
            torch.save({}, empty)
            empty.seek(0)
            super().__init__("inception-v3-compat", ["2048"], feature_extractor_weights_path=empty)

        def load_state_dict(self, sd, strict=True, assign=False):
            if "_ulsweep_pending" in self.__dict__:  # the constructor's call
                pending = self.__dict__.pop("_ulsweep_pending")
                if pending is None:
                    return None  # random init (tests, benchmarks)
                sd = pending
            return super().load_state_dict(sd, strict=strict, assign=assign)

    return _Inception(state_dict)


class InceptionExtractor(FeatureExtractor):
    """The standard FID Inception-v3 (torch-fidelity's definition: TF1-compatible bilinear resize to 299,
    (x - 128) / 128, 2048-d pool3 features). Gray images are repeated to RGB."""

    def __init__(self, state_dict: dict[str, Tensor] | None, weights_sha256: str, name: str = "inception"):
        super().__init__()
        check_name(name)
        self.net = _build_torch_fidelity_inception(state_dict)
        self.name, self.feature_dim, self.weights_sha256 = name, INCEPTION_FEATURE_DIM, weights_sha256
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "InceptionExtractor":
        return super().train(False)  # BatchNorm stays in inference mode

    @torch.no_grad()
    def forward(self, images_u8: Tensor) -> Tensor:  # (N, C, H, W) uint8 -> (N, 2048) float32
        check_u8(images_u8)
        if images_u8.shape[1] == 1:
            images_u8 = images_u8.expand(-1, 3, -1, -1)
        (features,) = self.net(images_u8.contiguous())
        return features


def inception_weights_help(expected_sha256: str = INCEPTION_SHA256) -> str:
    return (f"Provide the FID Inception weights file {INCEPTION_FILENAME} (SHA-256 {expected_sha256}): "
            f"set ${INCEPTION_WEIGHTS_ENV}=/path/or/fsspec-URI, or pass it as `inception_weights` "
            f"(config / --inception-weights). The file is published at {INCEPTION_SOURCE_URL}; "
            f"download it on a machine with internet access and copy it here (nothing is downloaded at "
            f"run time). Without it, use a domain extractor (`ulsweep features train`).")


def load_inception(weights: str | None = None, sha256: str = INCEPTION_SHA256,
                   name: str | None = None) -> InceptionExtractor:
    """The FID Inception-v3 with weights from `weights` (path / fsspec URI), else $ULSWEEP_INCEPTION_WEIGHTS.

    The file's SHA-256 must equal `sha256` (default: the standard FID weights). The name is `inception`
    (metrics rfid/gfid) only for the standard weights; other verified weights get `inception_<sha[:8]>`.
    """
    uri = weights or os.environ.get(INCEPTION_WEIGHTS_ENV)
    if not uri:
        raise MissingWeightsError("no Inception weights given. " + inception_weights_help(sha256))
    data = read_bytes(uri)
    verify_sha256(data, uri, sha256, "the Inception weights")
    sd = state_dict_from_bytes(data, uri)
    if name is None:
        name = "inception" if sha256.lower() == INCEPTION_SHA256 else f"inception_{sha256[:8].lower()}"
    try:
        return InceptionExtractor(sd, sha256.lower(), name=name)
    except RuntimeError as e:  # missing / unexpected keys or wrong shapes
        raise ExtractorError(f"{uri}: weights do not fit the FID Inception-v3 definition: {e}") from e


def random_inception(seed: int = 0) -> InceptionExtractor:
    """The Inception architecture with random weights (tests, benchmarks). Named `inception_random`, so its
    metrics are `rfd_inception_random`, never FID."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        ext = InceptionExtractor(None, weights_sha256="", name="inception_random")
    ext.weights_sha256 = sha256_bytes(state_dict_bytes(ext.net.state_dict()))
    return ext
