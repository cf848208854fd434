"""Fréchet distance (closed forms, scipy agreement), statistics, reference cache, rFD/gFD pipelines, PSNR."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from ulsweep.metrics import (FeatureStats, RefKey, RefStatsCache, StatsAccumulator, frechet_distance,
                             generation_fd, metric_name, psnr, reconstruction_fd, stats_from_features)
from ulsweep.metrics.extractors import FeatureExtractor, INCEPTION_SHA256


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


def random_spd(d: int, rng: np.random.Generator, scale: float = 1.0) -> np.ndarray:
    a = rng.standard_normal((d, 2 * d))
    return scale * (a @ a.T) / (2 * d) + 1e-3 * np.eye(d)


# --- Fréchet distance ---------------------------------------------------------------------------


def test_fd_of_identical_gaussians_is_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(64), random_spd(64, rng)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-8


def test_fd_closed_form_diagonal_covariances():
    # commuting (diagonal) covariances: FD = ||mu1 - mu2||^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2
    rng = np.random.default_rng(1)
    d = 50
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    a, b = rng.uniform(0.1, 4.0, d), rng.uniform(0.1, 4.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-10)


def test_fd_closed_form_commuting_rotated_covariances():
    # same eigenvectors Q: S1 = Q diag(a) Q^T, S2 = Q diag(b) Q^T -> same closed form
    rng = np.random.default_rng(2)
    d = 32
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a, b = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    got = frechet_distance(mu1, q @ np.diag(a) @ q.T, mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("d", [8, 128])
def test_fd_agrees_with_scipy_sqrtm(d):
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    s1, s2 = random_spd(d, rng), random_spd(d, rng, scale=2.0)
    covmean = scipy_linalg.sqrtm(s1 @ s2)  # the classic (non-symmetric) pytorch-fid / TTUR form
    covmean = covmean.real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    got = frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(expected, rel=1e-8, abs=1e-8)
    # symmetric in its arguments
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-10)


def test_fd_singular_covariances_rank_deficient():
    # fewer samples than dims (rank-deficient covariances, as with small sample counts): finite, >= 0
    rng = np.random.default_rng(3)
    x, y = rng.standard_normal((20, 64)), rng.standard_normal((20, 64)) + 0.5
    a, b = stats_from_features(x), stats_from_features(y)
    fd = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    assert math.isfinite(fd) and fd > 0
    # sqrt of round-off-sized eigenvalues at the null space: error ~ d * sqrt(eps * |S|), still tiny
    assert abs(frechet_distance(a.mu, a.sigma, a.mu, a.sigma)) < 1e-6 * np.trace(a.sigma)


def test_fd_accepts_tensors_and_rejects_bad_shapes():
    mu, s = torch.zeros(4), torch.eye(4)
    assert frechet_distance(mu, s, mu + 1, s) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="shapes differ"):
        frechet_distance(mu, s, torch.zeros(5), torch.eye(5))


def test_fd_reusing_the_reference_factor_is_the_same_arithmetic_with_one_decomposition_less(monkeypatch):
    # a group's members scored against one reference: its sqrt is decomposed once, then only each product's
    # eigenvalues; the values are bit for bit those of the plain call, and a reference whose content changed
    # (here in place, same array object) is decomposed afresh
    from ulsweep.metrics import fid

    monkeypatch.setattr(fid, "_factors", fid.collections.OrderedDict())
    calls = {"eigh": 0}
    eigh = torch.linalg.eigh

    def counting_eigh(a, *args, **kw):
        calls["eigh"] += 1
        return eigh(a, *args, **kw)

    monkeypatch.setattr(torch.linalg, "eigh", counting_eigh)
    rng = np.random.default_rng(5)
    d = 48
    ref_mu, ref_s = rng.standard_normal(d), random_spd(d, rng)
    members = [(rng.standard_normal(d), random_spd(d, rng, scale=1.5)) for _ in range(3)]
    plain = [frechet_distance(ref_mu, ref_s, mu, s, device="cpu") for mu, s in members]
    assert calls["eigh"] == 3
    calls["eigh"] = 0
    reused = [frechet_distance(ref_mu, ref_s, mu, s, device="cpu", reuse_first=True) for mu, s in members]
    assert reused == plain  # exactly
    assert calls["eigh"] == 1
    ref_s *= 2.0  # new content under the same object: not the kept factor
    again = frechet_distance(ref_mu, ref_s, *members[0], device="cpu", reuse_first=True)
    assert calls["eigh"] == 2
    assert again == frechet_distance(ref_mu, ref_s, *members[0], device="cpu")
    assert again != plain[0]
    assert len(fid._factors) == 2
    for i in range(fid.FACTORS_KEPT + 2):  # only the most recent references are kept
        frechet_distance(ref_mu + i + 1, ref_s, *members[0], device="cpu", reuse_first=True)
    assert len(fid._factors) == fid.FACTORS_KEPT


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fd_gpu_matches_cpu():
    rng = np.random.default_rng(4)
    d = 256
    args = (rng.standard_normal(d), random_spd(d, rng), rng.standard_normal(d), random_spd(d, rng))
    assert frechet_distance(*args, device="cuda") == pytest.approx(frechet_distance(*args, device="cpu"),
                                                                   rel=1e-9)


# --- statistics ---------------------------------------------------------------------------------


def test_streaming_stats_match_numpy_float64():
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((1000, 16)) * 3 + 100).astype(np.float32)  # large offset: shift matters
    acc = StatsAccumulator(torch.device("cpu"))
    for chunk in np.array_split(x, 7):
        acc.update(torch.from_numpy(chunk))
    st = acc.stats()
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(st.mu, x64.mean(0), rtol=1e-12)
    np.testing.assert_allclose(st.sigma, np.cov(x64, rowvar=False), rtol=1e-9, atol=1e-10)
    assert st.n == 1000 and st.mu.dtype == np.float64 and st.sigma.dtype == np.float64


def test_fd_of_samples_matches_gaussian_closed_form():
    # samples of N(0, I) vs N(m, 4 I): FD -> ||m||^2 + d (2 - 1)^2
    rng = np.random.default_rng(6)
    d, n = 8, 200_000
    m = np.full(d, 0.5)
    a = stats_from_features(rng.standard_normal((n, d)))
    b = stats_from_features(rng.standard_normal((n, d)) * 2 + m)
    fd = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
    assert fd == pytest.approx(d * 0.25 + d * 1.0, rel=0.02)


# --- reference cache and pipelines ----------------------------------------------------------------


class MeanPoolExtractor(FeatureExtractor):
    """A deterministic toy extractor: per-channel 4x4 average pool of [0, 1] images -> 16*C features."""

    def __init__(self, name="toy", sha="ab" * 32):
        super().__init__()
        self.name, self.weights_sha256, self.feature_dim = name, sha, 16
        self.calls = 0
        self.dummy = nn.Parameter(torch.zeros(()), requires_grad=False)

    def forward(self, images_u8):
        self.calls += len(images_u8)
        x = images_u8.float().mean(1, keepdim=True) / 255
        return nn.functional.adaptive_avg_pool2d(x, 4).flatten(1)


def _images(n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 16, 16), generator=g, dtype=torch.uint8)


def test_metric_names():
    assert metric_name("r", MeanPoolExtractor("fmnist")) == "rfd_fmnist"
    assert metric_name("g", MeanPoolExtractor("fmnist")) == "gfd_fmnist"
    std = MeanPoolExtractor("inception", sha=INCEPTION_SHA256)
    assert metric_name("r", std) == "rfid" and metric_name("g", std) == "gfid"
    # Inception architecture with other weights is never called FID
    assert metric_name("r", MeanPoolExtractor("inception", sha="00" * 32)) == "rfd_inception"


def test_reconstruction_fd_identity_is_zero_and_noise_is_positive(tmp_path):
    ext, imgs = MeanPoolExtractor(), _images()
    out = reconstruction_fd(ext, imgs, lambda b: b.clone(), batch_size=32)
    assert set(out) == {"rfd_toy"} and abs(out["rfd_toy"]) < 1e-9
    noisy = lambda b: (b.float() * 0.5 + 60).clamp(0, 255).to(torch.uint8)  # noqa: E731
    assert reconstruction_fd(ext, imgs, noisy, batch_size=32)["rfd_toy"] > 1e-3


def test_reconstruction_fd_uses_reference_cache(tmp_path):
    cache = RefStatsCache(str(tmp_path / "refstats"))
    imgs = _images()
    ext = MeanPoolExtractor()
    shift = lambda b: (b.int() // 2).to(torch.uint8)  # noqa: E731
    first = reconstruction_fd(ext, imgs, shift, 40, ref_cache=cache, dataset_hash="d" * 64, split="test")
    assert ext.calls == 2 * len(imgs)
    files = list((tmp_path / "refstats").iterdir())
    assert len(files) == 1 and files[0].name.startswith("toy-test-96-") and files[0].suffix == ".npz"
    ext.calls = 0
    second = reconstruction_fd(ext, imgs, shift, 40, ref_cache=cache, dataset_hash="d" * 64, split="test")
    assert ext.calls == len(imgs)  # real features came from the cache
    assert second == pytest.approx(first, rel=1e-12)
    # the key separates datasets, splits, extractor weights, sample counts, image sizes and arithmetic
    shape = tuple(imgs.shape[1:])
    key = RefKey("d" * 64, "test", ext.weights_sha256, 96, "toy", shape)
    assert cache.load(key) is not None
    for other in (RefKey("e" * 64, "test", ext.weights_sha256, 96, "toy", shape),
                  RefKey("d" * 64, "train", ext.weights_sha256, 96, "toy", shape),
                  RefKey("d" * 64, "test", "cd" * 32, 96, "toy", shape),
                  RefKey("d" * 64, "test", ext.weights_sha256, 95, "toy", shape),
                  RefKey("d" * 64, "test", ext.weights_sha256, 96, "toy", (shape[0], shape[1] + 4, shape[2] + 4)),
                  RefKey("d" * 64, "test", ext.weights_sha256, 96, "toy", shape, "exact fp32")):
        assert cache.load(other) is None


def test_cache_roundtrip_and_corrupt_entry_recomputed(tmp_path):
    cache = RefStatsCache(str(tmp_path))
    key = RefKey("a" * 64, "train", "b" * 64, 3, "toy")
    feats = np.random.default_rng(0).normal(size=(3, 3))  # float64 values that float32 would not keep
    st = FeatureStats(feats.mean(0), np.cov(feats, rowvar=False), 3)
    cache.save(key, st)
    got = cache.load(key)
    np.testing.assert_array_equal(got.mu, st.mu)
    np.testing.assert_array_equal(got.sigma, st.sigma)
    assert got.n == st.n
    with open(cache.path(key), "wb") as f:
        f.write(b"garbage")
    assert cache.load(key) is None
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # atomic writes leave no temp files


def test_cache_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("ULSWEEP_CACHE", str(tmp_path))
    assert RefStatsCache().directory == str(tmp_path / "refstats")
    monkeypatch.delenv("ULSWEEP_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert RefStatsCache().directory == str(tmp_path / "home" / ".cache" / "ulsweep" / "refstats")
    assert RefStatsCache().load(RefKey("a", "b", "c", 1)) is None


def test_generation_fd(tmp_path):
    ext, ref = MeanPoolExtractor(), _images(128, seed=1)
    pool = _images(256, seed=2)
    state = {"i": 0}

    def sample(k):
        out = pool[state["i"]:state["i"] + k]
        state["i"] += k
        return out

    out = generation_fd(ext, sample, 200, ref_images_u8=ref, batch_size=64)
    assert set(out) == {"gfd_toy"} and out["gfd_toy"] >= 0 and state["i"] == 200
    bad = generation_fd(ext, lambda k: torch.zeros(k, 1, 16, 16, dtype=torch.uint8) + 30, 64,
                        ref_stats=stats_from_features(ext(ref)), batch_size=64)
    assert bad["gfd_toy"] > out["gfd_toy"]
    with pytest.raises(TypeError, match="uint8"):
        generation_fd(ext, lambda k: torch.zeros(k, 1, 16, 16), 8, ref_images_u8=ref)


# --- PSNR -----------------------------------------------------------------------------------------


def test_psnr_at_known_mse():
    x = torch.full((2, 1, 8, 8), 100, dtype=torch.uint8)
    y = x.clone()
    y[0] += 5  # MSE 25
    y[1, :, :4] += 10  # MSE 50
    got = psnr(x, y, 255.0)
    expected = torch.tensor([10 * math.log10(255**2 / 25), 10 * math.log10(255**2 / 50)], dtype=torch.float64)
    torch.testing.assert_close(got, expected)
    assert torch.isinf(psnr(x, x)).all()
