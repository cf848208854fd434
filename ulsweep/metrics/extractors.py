"""Feature extractors for Fréchet distances: one interface, two kinds.

- `inception`: the standard FID Inception-v3 network. Its definition is torch-fidelity's
  `FeatureExtractorInceptionV3` (not rewritten here); its weights come from a local path or fsspec URI
  (argument, config, or $ULSWEEP_INCEPTION_WEIGHTS) and must match the known SHA-256 of
  `pt_inception-2015-12-05-6726825d.pth`. Metrics from it are `rfid` / `gfid`.
- a domain extractor (`DomainCNN`): a small classifier ulsweep trains itself on a labelled dataset
  (`ulsweep features train`), stored as a state dict plus a JSON sidecar with its SHA-256. Metrics from it
  carry its name (`rfd_fmnist`, `gfd_fmnist`) and are never called FID.

Every extractor takes uint8 images (N, C, H, W), C = 1 or 3, any H, W, does its own resize / channel
conversion / normalisation, and returns float32 features (N, D).
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import re
import sys
import types
from dataclasses import dataclass
from typing import Any

import fsspec

from ulsweep.io import atomic_write_bytes
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# SHA-256 of pt_inception-2015-12-05-6726825d.pth (95,628,359 bytes), the TF-ported FID Inception weights
# distributed by pytorch-fid (same bytes as torch-fidelity's weights-inception-2015-12-05-6726825d.pth).
# Both packages pin only its first 8 hex digits, "6726825d", in the file name (torch.hub's check_hash
# convention: `filename-<first 8+ hex digits of sha256>.ext`); the full digest below starts with them.
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INCEPTION_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_SOURCE_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                        + INCEPTION_FILENAME)
INCEPTION_WEIGHTS_ENV = "ULSWEEP_INCEPTION_WEIGHTS"
INCEPTION_FEATURE_DIM = 2048
_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")


class ExtractorError(ValueError):
    """An extractor cannot be built or loaded; the message says what to do."""


class MissingWeightsError(ExtractorError):
    pass


class WeightsHashError(ExtractorError):
    pass


# ----------------------------------------------------------------------------------------------
# The interface


class FeatureExtractor(nn.Module):
    """uint8 images (N, C, H, W) -> float32 features (N, feature_dim).

    `name` names the metrics (`inception` -> rfid/gfid, anything else X -> rfd_X/gfd_X);
    `weights_sha256` identifies the weights (reference-statistics cache key).
    """

    name: str
    feature_dim: int
    weights_sha256: str

    def forward(self, images_u8: Tensor) -> Tensor:
        raise NotImplementedError

    @property
    def is_standard_fid(self) -> bool:
        return self.name == "inception" and self.weights_sha256 == INCEPTION_SHA256


def _check_u8(images: Tensor) -> None:
    if not (torch.is_tensor(images) and images.dtype == torch.uint8 and images.dim() == 4
            and images.shape[1] in (1, 3)):
        got = (f"{images.dtype} {tuple(images.shape)}" if torch.is_tensor(images) else type(images).__name__)
        raise ValueError(f"feature extractors take uint8 images (N, C, H, W) with C in (1, 3); got {got}")


def _to_channels(x: Tensor, c: int) -> Tensor:  # (N, C, H, W) float -> (N, c, H, W)
    if x.shape[1] == c:
        return x
    if c == 3:  # gray -> RGB
        return x.expand(-1, 3, -1, -1)
    w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)  # RGB -> luma


# ----------------------------------------------------------------------------------------------
# Hashing and atomic I/O (paths or fsspec URIs)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_bytes(uri: str) -> bytes:
    try:
        with fsspec.open(uri, "rb") as f:
            return f.read()
    except FileNotFoundError as e:
        raise ExtractorError(f"{uri}: file not found") from e


def state_dict_bytes(state_dict: dict[str, Tensor]) -> bytes:
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, buf)
    return buf.getvalue()


def _load_state_dict(data: bytes, where: str) -> dict[str, Tensor]:
    try:
        sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure
        raise ExtractorError(f"{where}: not a loadable tensor state dict ({type(e).__name__}: {e})") from e
    if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
        raise ExtractorError(f"{where}: expected a dict of tensors (a state dict)")
    return sd


def _verified(data: bytes, where: str, expected: str, what: str) -> None:
    got = sha256_bytes(data)
    if got != expected.lower():
        raise WeightsHashError(
            f"{where}: SHA-256 mismatch for {what}: expected {expected}, file has {got}. "
            f"The file is corrupt, truncated, or not the expected weights.")


# ----------------------------------------------------------------------------------------------
# Inception (torch-fidelity definition)


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
        if not _NAME_RE.match(name):
            raise ExtractorError(f"extractor name must match {_NAME_RE.pattern} (got {name!r})")
        self.net = _build_torch_fidelity_inception(state_dict)
        self.name, self.feature_dim, self.weights_sha256 = name, INCEPTION_FEATURE_DIM, weights_sha256
        self.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> "InceptionExtractor":
        return super().train(False)  # BatchNorm stays in inference mode

    @torch.no_grad()
    def forward(self, images_u8: Tensor) -> Tensor:  # (N, C, H, W) uint8 -> (N, 2048) float32
        _check_u8(images_u8)
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
    _verified(data, uri, sha256, "the Inception weights")
    sd = _load_state_dict(data, uri)
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


# ----------------------------------------------------------------------------------------------
# Domain extractor: a small CNN classifier trained by ulsweep


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


class DomainCNN(FeatureExtractor):
    """Three conv stages (2 convs each, 2x2 max-pool after the first two), global average pool,
    a `feature_dim` hidden layer (the features: penultimate layer, after ReLU) and a linear classifier.

    Inputs are resized (bilinear, antialiased) to `input_size`, converted to `in_channels` and mapped to
    [-1, 1]; so any (C, H, W) can be compared with the training images, identically for both sides of a FD.
    """

    def __init__(self, name: str, arch: str, in_channels: int, input_size: int, num_classes: int):
        super().__init__()
        if not _NAME_RE.match(name):
            raise ExtractorError(f"extractor name must match {_NAME_RE.pattern} (got {name!r})")
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
        _check_u8(images_u8)
        x = images_u8.float()
        x = _to_channels(x, self.in_channels)
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear",
                              align_corners=False, antialias=True)
        return x / 127.5 - 1.0

    def logits(self, x: Tensor) -> Tensor:  # preprocessed (N, c, s, s) -> (N, classes)
        return self.head(self.hidden(self.body(x)))

    def forward(self, images_u8: Tensor) -> Tensor:  # uint8 (N, C, H, W) -> (N, feature_dim) float32
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
    _verified(data, weights, sha256 or meta["sha256"], f"domain extractor {meta.get('name')!r}")
    model = DomainCNN(meta["name"], meta["arch"], meta["in_channels"], meta["input_size"], meta["num_classes"])
    try:
        model.load_state_dict(_load_state_dict(data, weights))
    except RuntimeError as e:
        raise ExtractorError(f"{weights}: state dict does not fit arch {meta['arch']!r}: {e}") from e
    model.weights_sha256 = meta["sha256"]
    model.training_meta = meta
    return model.eval().requires_grad_(False)


def load_extractor(spec: str, weights: str | None = None, sha256: str | None = None) -> FeatureExtractor:
    """`inception` (weights: arg or $ULSWEEP_INCEPTION_WEIGHTS) or a domain extractor's weights path/URI."""
    if spec == "inception":
        return load_inception(weights, sha256 or INCEPTION_SHA256)
    return load_domain_extractor(spec, sha256)


# ----------------------------------------------------------------------------------------------
# Training the domain extractor


@dataclass
class DomainTrainResult:
    model: DomainCNN
    test_accuracy: float
    train_seconds: float
    epochs: int
    history: list[dict[str, float]]


@torch.no_grad()
def classifier_accuracy(model: DomainCNN, images_u8: Tensor, labels: Tensor, batch_size: int = 1024) -> float:
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(images_u8), batch_size):
        x = model.preprocess(images_u8[i:i + batch_size].to(device))
        correct += (model.logits(x).argmax(1).cpu() == labels[i:i + batch_size]).sum().item()
    model.train(was)
    return correct / max(1, len(images_u8))


def train_domain_extractor(train_images: Tensor, train_labels: Tensor, test_images: Tensor,
                           test_labels: Tensor, *, name: str, arch: str = "cnn-s-v1", epochs: int = 5,
                           batch_size: int = 256, lr: float = 3e-3, seed: int = 0, input_size: int | None = None,
                           device: str | torch.device = "cpu", log=None) -> DomainTrainResult:
    """Train a DomainCNN classifier: AdamW, one-cycle LR, label smoothing 0.05, random shifts of up to
    input_size // 12 pixels. Returns the model in eval mode and its accuracy on the test images."""
    import time

    _check_u8(train_images)
    n, c, h, w = train_images.shape
    classes = int(max(train_labels.max().item(), test_labels.max().item())) + 1
    if train_labels.min().item() < 0:
        raise ExtractorError("the domain extractor needs labelled images (labels >= 0)")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DomainCNN(name, arch, c, input_size or max(h, w), classes).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=5e-4)
    steps_per_epoch = (n + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch,
                                                pct_start=0.15)
    shift = model.input_size // 12  # augmentation: +-2 px at 28x28 / 32x32, none at 8x8
    t0, history = time.perf_counter(), []
    for epoch in range(epochs):
        model.train()
        perm = torch.randperm(n, generator=g)
        loss_sum = 0.0
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            x = model.preprocess(train_images[idx].to(device))
            dx, dy = torch.randint(-shift, shift + 1, (2,), generator=g).tolist()  # random shift (wrap-around)
            if dx or dy:
                x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
            loss = F.cross_entropy(model.logits(x), train_labels[idx].to(device), label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
        acc = classifier_accuracy(model, test_images, test_labels)
        history.append({"epoch": epoch + 1, "train_loss": loss_sum / n, "test_accuracy": acc,
                        "seconds": time.perf_counter() - t0})
        if log:
            log(f"epoch {epoch + 1}/{epochs}: train loss {loss_sum / n:.4f}, test accuracy {acc:.4f}, "
                f"{time.perf_counter() - t0:.1f} s")
    model.eval().requires_grad_(False)
    return DomainTrainResult(model, history[-1]["test_accuracy"], time.perf_counter() - t0, epochs, history)
