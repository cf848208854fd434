"""Fréchet distances between feature distributions: statistics, the distance, a reference-stat cache,
and the rFID / gFID pipelines (the paper's conventions, §5: rFID compares reconstructions with the very
images that were reconstructed; gFID compares base-model samples decoded by the decoder with a reference).
Training runs reach these pipelines through `ulsweep.train.evaluation` (which extractor, which cache).

Metric names say exactly what was measured: `rfid` / `gfid` only for the standard FID Inception weights,
`rfd_<extractor>` / `gfd_<extractor>` for any other extractor (e.g. `rfd_fmnist`).
"""
from __future__ import annotations

import collections
import hashlib
import io
import json
import threading
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor

from ulsweep import io as uio

from .features import FEATURE_PRECISIONS, FeatureExtractor


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _as64(x, device: torch.device) -> Tensor:
    return torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).to(device=device, dtype=torch.float64)


# FD = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr( (sqrt(S1) S2 sqrt(S1))^{1/2} )  (symmetric form)
def frechet_distance(mu1, sigma1, mu2, sigma2, device: str | torch.device | None = None,
                     reuse_first: bool = False) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64.

    tr((S1 S2)^{1/2}) is computed as the sum of the square roots of the eigenvalues of the symmetric PSD
    matrix sqrt(S1) S2 sqrt(S1) (an `eigh` for sqrt(S1), an `eigvalsh` for the product; negative round-off
    eigenvalues clamped to 0), on the GPU when there is one. Accepts numpy arrays or tensors.

    `reuse_first`: N(mu1, sigma1) is a reference that many distances share (a group's members' gFID against
    one reference's statistics): its float64 copy on the device and sqrt(S1) are kept, by content, for the next
    call (`first_factor`), which then does one `eigvalsh` instead of both decompositions. The arithmetic is the
    same either way, so is the value.
    """
    device = torch.device(device) if device is not None else _default_device()
    mu1_, s1_, sqrt_s1 = (first_factor if reuse_first else _factor)(mu1, sigma1, device)
    mu2, s2 = _as64(mu2, device).reshape(-1), _as64(sigma2, device)
    d = mu1_.numel()
    if mu2.numel() != d or s2.shape != (d, d):
        raise ValueError(f"frechet_distance: shapes differ: mu1 {tuple(mu1_.shape)}, sigma1 {tuple(s1_.shape)}, "
                         f"mu2 {tuple(mu2.shape)}, sigma2 {tuple(s2.shape)}")
    s2 = (s2 + s2.T) / 2
    m = sqrt_s1 @ s2 @ sqrt_s1
    tr_covmean = torch.linalg.eigvalsh((m + m.T) / 2).clamp(min=0).sqrt().sum()
    fd = (mu1_ - mu2).square().sum() + s1_.trace() + s2.trace() - 2 * tr_covmean
    return float(fd.item())


def _factor(mu, sigma, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """(mu, the symmetrized sigma, sqrt(sigma)) in float64 on `device`: sqrt(S) = V diag(sqrt(max(w, 0))) V^T
    from S = V diag(w) V^T. Raises ValueError unless sigma is (D, D) for mu of D entries."""
    mu, s = _as64(mu, device).reshape(-1), _as64(sigma, device)
    d = mu.numel()
    if s.shape != (d, d):
        raise ValueError(f"frechet_distance: shapes differ: mu1 {tuple(mu.shape)}, sigma1 {tuple(s.shape)}")
    s = (s + s.T) / 2
    w, v = torch.linalg.eigh(s)
    return mu, s, (v * w.clamp(min=0).sqrt()) @ v.T


FACTORS_KEPT = 4  # references whose factors a process keeps (a sweep's evaluation scores against 1-2 at a time)
_factors: collections.OrderedDict[tuple, tuple[Tensor, Tensor, Tensor]] = collections.OrderedDict()
_factors_lock = threading.Lock()


def first_factor(mu, sigma, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """`_factor` of a reference, kept for the next call with the same content (BLAKE2b of its float64 bytes)
    on the same device: the FACTORS_KEPT most recent ones. Hashing 2048-d statistics (32 MB) costs tens of
    milliseconds on the host; the `eigh` it saves, a large part of a distance."""
    mu64 = np.ascontiguousarray(_host64(mu)).reshape(-1)
    s64 = np.ascontiguousarray(_host64(sigma))
    h = hashlib.blake2b(digest_size=20)
    h.update(np.asarray(s64.shape, dtype=np.int64).tobytes())
    h.update(mu64.data)
    h.update(s64.data)
    key = (h.hexdigest(), str(device))
    with _factors_lock:
        got = _factors.get(key)
        if got is not None:
            _factors.move_to_end(key)
            return got
    got = _factor(mu64, s64, device)
    with _factors_lock:
        _factors[key] = got
        while len(_factors) > FACTORS_KEPT:
            _factors.popitem(last=False)
    return got


def _host64(x) -> np.ndarray:
    if torch.is_tensor(x):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


# ----------------------------------------------------------------------------------------------
# Statistics


@dataclass(frozen=True)
class FeatureStats:
    """Mean and covariance (float64 numpy, unbiased N-1 normalisation as numpy.cov) of `n` feature vectors."""

    mu: np.ndarray  # (D,)
    sigma: np.ndarray  # (D, D)
    n: int

    def to_bytes(self, meta: dict | None = None) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, mu=self.mu, sigma=self.sigma, n=np.int64(self.n),
                 meta=np.frombuffer(json.dumps(meta or {}, sort_keys=True).encode(), dtype=np.uint8))
        return buf.getvalue()

    @staticmethod
    def from_bytes(data: bytes) -> tuple["FeatureStats", dict]:
        with np.load(io.BytesIO(data)) as f:
            stats = FeatureStats(f["mu"].astype(np.float64), f["sigma"].astype(np.float64), int(f["n"]))
            meta = json.loads(bytes(f["meta"]).decode())
        return stats, meta


class StatsAccumulator:
    """Streaming mean / covariance in float64 on `device`, shifted by the first batch's mean for accuracy."""

    def __init__(self, device: torch.device | None = None):
        self.device = device
        self.n, self.shift, self.s1, self.s2 = 0, None, None, None

    def update(self, feats: Tensor) -> None:  # (N, D)
        f = feats.detach().to(device=self.device or feats.device, dtype=torch.float64)
        if self.shift is None:
            self.shift = f.mean(0)
            d = f.shape[1]
            self.s1 = torch.zeros(d, dtype=torch.float64, device=f.device)
            self.s2 = torch.zeros(d, d, dtype=torch.float64, device=f.device)
        f = f - self.shift
        self.s1 += f.sum(0)
        self.s2 += f.T @ f
        self.n += f.shape[0]

    def stats(self) -> FeatureStats:
        if self.n < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance (got {self.n})")
        mean_c = self.s1 / self.n
        sigma = (self.s2 - self.n * torch.outer(mean_c, mean_c)) / (self.n - 1)
        mu = mean_c + self.shift
        return FeatureStats(mu.cpu().numpy(), ((sigma + sigma.T) / 2).cpu().numpy(), self.n)


def stats_from_features(feats) -> FeatureStats:
    """Mean and covariance of features (N, D), computed in float64."""
    acc = StatsAccumulator(torch.device("cpu"))
    acc.update(torch.as_tensor(np.asarray(feats) if not torch.is_tensor(feats) else feats))
    return acc.stats()


def fd_between(a: FeatureStats, b: FeatureStats, device=None) -> float:
    """FD between two statistics; `a` is the reference (the pipelines' real images), whose factor is kept for
    the next distance to it (`frechet_distance(reuse_first=True)`)."""
    return frechet_distance(a.mu, a.sigma, b.mu, b.sigma, device=device, reuse_first=True)


def _batches(images_u8: Tensor, batch_size: int) -> Iterator[Tensor]:
    for i in range(0, len(images_u8), batch_size):
        yield images_u8[i:i + batch_size]


def _extractor_device(extractor: FeatureExtractor) -> torch.device:
    p = next(iter(extractor.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def feature_stats(extractor: FeatureExtractor, batches: Iterable[Tensor]) -> FeatureStats:
    """Statistics of extractor features over uint8 image batches (N, C, H, W); batches move to the
    extractor's device."""
    device = _extractor_device(extractor)
    acc = StatsAccumulator(device)
    for b in batches:
        acc.update(extractor(b.to(device, non_blocking=True)))
    return acc.stats()


# ----------------------------------------------------------------------------------------------
# Reference-statistics cache


@dataclass(frozen=True)
class RefKey:
    """What reference statistics depend on: the first `num_samples` images of `split` of the dataset with
    content hash `dataset_hash`, at the size they were fed in (`image_shape`, (C, H, W) after the run's
    resize/pad), through the extractor with weights hash `extractor_sha256`, in the features' arithmetic
    `features` (a label of `FEATURE_PRECISIONS`: statistics of exact fp32 features never meet TF32 ones, and
    entries from before the arithmetic was part of the key are not reused)."""

    dataset_hash: str
    split: str
    extractor_sha256: str
    num_samples: int
    extractor_name: str = ""
    image_shape: tuple[int, ...] = ()
    features: str = FEATURE_PRECISIONS["tf32"]

    def digest(self) -> str:
        blob = json.dumps([self.dataset_hash, self.split, self.extractor_sha256, int(self.num_samples),
                           [int(s) for s in self.image_shape], self.features])
        return hashlib.sha256(blob.encode()).hexdigest()[:24]

    def meta(self) -> dict:
        return {"dataset_hash": self.dataset_hash, "split": self.split, "extractor_sha256": self.extractor_sha256,
                "num_samples": int(self.num_samples), "extractor_name": self.extractor_name,
                "image_shape": [int(s) for s in self.image_shape], "features": self.features}


class RefStatsCache:
    """Reference statistics on disk (`<dir>/<extractor>-<split>-<n>-<digest>.npz`, written atomically).

    `directory`: a path or fsspec URI; default `ulsweep.io.cache_dir("refstats")` ($ULSWEEP_CACHE/refstats,
    else ~/.cache/ulsweep/refstats). To compute without a cache, pass no cache to the pipelines.
    """

    def __init__(self, directory: str | None = None):
        self.directory = directory or uio.cache_dir("refstats")

    def path(self, key: RefKey) -> str:
        name = f"{key.extractor_name or 'ext'}-{key.split}-{key.num_samples}-{key.digest()}.npz"
        return self.directory.rstrip("/") + "/" + name

    def load(self, key: RefKey) -> FeatureStats | None:
        try:
            stats, meta = FeatureStats.from_bytes(uio.read_bytes(self.path(key)))
        except FileNotFoundError:
            return None
        except Exception:  # noqa: BLE001 - a corrupt entry is recomputed and overwritten
            return None
        return stats if meta == key.meta() and stats.n == key.num_samples else None

    def save(self, key: RefKey, stats: FeatureStats) -> None:
        uio.atomic_write_bytes(self.path(key), stats.to_bytes(key.meta()))

    def get_or_compute(self, key: RefKey, compute: Callable[[], FeatureStats]) -> tuple[FeatureStats, bool]:
        """(stats, hit)."""
        got = self.load(key)
        if got is not None:
            return got, True
        stats = compute()
        self.save(key, stats)
        return stats, False


# ----------------------------------------------------------------------------------------------
# rFID / gFID pipelines. Features are computed on the extractor's device; the distance itself in float64
# on the GPU when there is one (frechet_distance's default), wherever the extractor runs.


def metric_name(kind: str, extractor: FeatureExtractor) -> str:
    """kind 'r' or 'g' -> 'rfid'/'gfid' (standard FID Inception weights only), else 'rfd_<name>'/'gfd_<name>'."""
    if kind not in ("r", "g"):
        raise ValueError(f"kind must be 'r' or 'g' (got {kind!r})")
    return f"{kind}fid" if extractor.is_standard_fid else f"{kind}fd_{extractor.name}"


def _check_generated(x: Tensor, what: str, like: tuple | None = None) -> Tensor:
    """`x` (the output of `what`, a batch of generated images) as uint8 (N, C, H, W) of shape `like`."""
    if not torch.is_tensor(x) or x.dtype != torch.uint8 or x.dim() != 4:
        got = f"{x.dtype} {tuple(x.shape)}" if torch.is_tensor(x) else type(x).__name__
        raise TypeError(f"{what}: expected uint8 images (N, C, H, W), got {got}")
    if like is not None and tuple(x.shape) != like:
        raise ValueError(f"{what}: shape {tuple(x.shape)}, expected {like}")
    return x


def _ref_key(extractor: FeatureExtractor, dataset_hash: str | None, split: str | None,
             images_u8: Tensor) -> RefKey | None:
    if dataset_hash is None or split is None:
        return None
    return RefKey(dataset_hash, split, extractor.weights_sha256, len(images_u8), extractor.name,
                  tuple(images_u8.shape[1:]), extractor.features_label)


@torch.no_grad()
def reconstruction_fd(extractor: FeatureExtractor, images_u8: Tensor,
                      reconstructed: Tensor | Callable[[Tensor], Tensor], batch_size: int = 256,
                      ref_cache: RefStatsCache | None = None, dataset_hash: str | None = None,
                      split: str | None = None) -> dict[str, float]:
    """rFID (paper §5): FD between features of `images_u8` (N, C, H, W) and of their reconstructions.

    `reconstructed` is the uint8 reconstructions (same shape as `images_u8`), or `reconstruct(batch)`, which
    takes and returns uint8 batches of the same shape and is called batch by batch (nothing held in memory).
    With `ref_cache`, `dataset_hash` and `split`, the real-image statistics are read from / written to the
    cache; then `images_u8` must be the first N images of that split. Returns {'rfid' | 'rfd_<name>': value}.
    """
    key = _ref_key(extractor, dataset_hash, split, images_u8)
    ref = ref_cache.load(key) if (ref_cache is not None and key is not None) else None
    device = _extractor_device(extractor)
    real_acc, fake_acc = StatsAccumulator(device), StatsAccumulator(device)
    for i in range(0, len(images_u8), batch_size):
        b = images_u8[i:i + batch_size]
        if torch.is_tensor(reconstructed):
            rec = _check_generated(reconstructed[i:i + batch_size], "reconstructions", like=tuple(b.shape))
        else:
            rec = _check_generated(reconstructed(b), "reconstruct(batch)", like=tuple(b.shape))
        fake_acc.update(extractor(rec.to(device, non_blocking=True)))
        if ref is None:
            real_acc.update(extractor(b.to(device, non_blocking=True)))
    if ref is None:
        ref = real_acc.stats()
        if ref_cache is not None and key is not None:
            ref_cache.save(key, ref)
    return {metric_name("r", extractor): fd_between(ref, fake_acc.stats())}


def reference_stats(extractor: FeatureExtractor, images_u8: Tensor, batch_size: int = 256,
                    ref_cache: RefStatsCache | None = None, dataset_hash: str | None = None,
                    split: str | None = None) -> FeatureStats:
    """Statistics of `images_u8`, through the cache when `ref_cache`, `dataset_hash` and `split` are given
    (`images_u8` = the first N images of that split)."""
    key = _ref_key(extractor, dataset_hash, split, images_u8)
    compute = lambda: feature_stats(extractor, _batches(images_u8, batch_size))  # noqa: E731
    if ref_cache is None or key is None:
        return compute()
    return ref_cache.get_or_compute(key, compute)[0]


@torch.no_grad()
def generation_fd(extractor: FeatureExtractor, samples: Tensor | Callable[[int], Tensor],
                  num_samples: int | None = None, ref_images_u8: Tensor | None = None,
                  ref_stats: FeatureStats | None = None, batch_size: int = 256,
                  ref_cache: RefStatsCache | None = None, dataset_hash: str | None = None,
                  split: str | None = None) -> dict[str, float]:
    """gFID: FD between generated images (base-model samples decoded by the decoder) and reference statistics
    (`ref_stats`, or computed from `ref_images_u8`, cached when `ref_cache`, `dataset_hash`, `split` are given).

    `samples` is a uint8 tensor (N, C, H, W), of which the first `num_samples` (default all) are used, or
    `sample(k) -> uint8 (k, C, H, W)`, called until `num_samples` images. Returns {'gfid' | 'gfd_<name>': value}.
    """
    if ref_stats is None:
        if ref_images_u8 is None:
            raise ValueError("generation_fd needs ref_stats or ref_images_u8")
        ref_stats = reference_stats(extractor, ref_images_u8, batch_size, ref_cache, dataset_hash, split)
    if torch.is_tensor(samples):
        num_samples = len(samples) if num_samples is None else num_samples
        if num_samples > len(samples):
            raise ValueError(f"num_samples={num_samples} but only {len(samples)} samples given")
    elif num_samples is None:
        raise ValueError("generation_fd needs num_samples with a sample(k) function")
    device = _extractor_device(extractor)
    acc, done = StatsAccumulator(device), 0
    while done < num_samples:
        k = min(batch_size, num_samples - done)
        if torch.is_tensor(samples):
            x = _check_generated(samples[done:done + k], "samples")
        else:
            x = _check_generated(samples(k), f"sample({k})")
            if len(x) != k:
                raise ValueError(f"sample({k}) returned {len(x)} images")
        acc.update(extractor(x.to(device, non_blocking=True)))
        done += k
    return {metric_name("g", extractor): fd_between(ref_stats, acc.stats())}
