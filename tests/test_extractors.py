"""Feature extractors: domain CNN training / save / load with hashes, the Inception architecture with verified
weights, and the `ulsweep features train` command."""
from __future__ import annotations

import argparse
import importlib.util
import json

import numpy as np
import pytest
import torch

from ulsweep.metrics import extractors as ex

HAS_TORCH_FIDELITY = importlib.util.find_spec("torch_fidelity") is not None
needs_tf = pytest.mark.skipif(not HAS_TORCH_FIDELITY,
                              reason="torch-fidelity not installed: pip install --no-deps torch-fidelity==0.4.0")


def digits_split():
    """scikit-learn's 8x8 digits as uint8 (N, 1, 8, 8): 1,400 train / 397 test."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(np.round(d.images * 255 / 16).astype(np.uint8))[:, None]  # (N, 1, 8, 8)
    y = torch.from_numpy(d.target.astype(np.int64))
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return x[:1400], y[:1400], x[1400:], y[1400:]


pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


@pytest.fixture(scope="module")
def trained(one_thread):
    xtr, ytr, xte, yte = digits_split()
    res = ex.train_domain_extractor(xtr, ytr, xte, yte, name="digits", arch="cnn-xs-v1", epochs=3,
                                    batch_size=64, lr=3e-3, seed=0)
    return res, (xtr, ytr, xte, yte)


# --- domain extractor -----------------------------------------------------------------------------


def test_domain_extractor_trains_on_tiny_split(trained):
    res, (_, _, xte, yte) = trained
    assert res.test_accuracy >= 0.8, res.history  # chance is 0.1 (measured: 0.987)
    assert res.test_accuracy == pytest.approx(ex.classifier_accuracy(res.model, xte, yte))
    f = res.model(xte[:5])
    assert f.shape == (5, 128) and f.dtype == torch.float32 and torch.isfinite(f).all()


def test_domain_extractor_any_shape_and_channels(trained):
    model = trained[0].model
    for shape in [(3, 1, 8, 8), (3, 1, 32, 32), (3, 3, 16, 20)]:
        assert model(torch.randint(0, 256, shape, dtype=torch.uint8)).shape == (3, model.feature_dim)
    with pytest.raises(ValueError, match="uint8"):
        model(torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="uint8"):
        model(torch.zeros(2, 2, 8, 8, dtype=torch.uint8))


def test_domain_extractor_save_load_right_and_wrong_hash(trained, tmp_path):
    model = trained[0].model
    out = str(tmp_path / "sub" / "digits.pt")
    meta = ex.save_domain_extractor(model, out, {"dataset_hash": "f" * 64, "test_accuracy": 0.9})
    side = json.loads((tmp_path / "sub" / "digits.json").read_text())
    assert side == meta and side["sha256"] == ex.sha256_bytes((tmp_path / "sub" / "digits.pt").read_bytes())
    assert side["arch"] == "cnn-xs-v1" and side["name"] == "digits" and side["dataset_hash"] == "f" * 64
    assert not [p for p in (tmp_path / "sub").iterdir() if ".tmp-" in p.name]

    x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    loaded = ex.load_domain_extractor(out)  # hash from the sidecar
    torch.testing.assert_close(loaded(x), model(x))
    assert loaded.weights_sha256 == side["sha256"] and loaded.name == "digits"
    assert ex.load_domain_extractor(out, sha256=side["sha256"].upper()).weights_sha256 == side["sha256"]
    assert ex.load_extractor(out).name == "digits"

    with pytest.raises(ex.WeightsHashError, match="0000"):
        ex.load_domain_extractor(out, sha256="0" * 64)  # a pinned hash that differs
    data = bytearray((tmp_path / "sub" / "digits.pt").read_bytes())
    data[-100] ^= 0xFF  # corrupt the weights: no longer the sidecar's hash
    (tmp_path / "sub" / "digits.pt").write_bytes(bytes(data))
    with pytest.raises(ex.WeightsHashError, match="SHA-256 mismatch"):
        ex.load_domain_extractor(out)
    with pytest.raises(ex.ExtractorError, match="not found"):
        ex.load_domain_extractor(str(tmp_path / "missing.pt"))


def test_domain_extractor_fsspec_uri_roundtrip(trained):
    model = trained[0].model
    uri = "memory://ulsweep-test/extractors/digits.pt"
    ex.save_domain_extractor(model, uri, {})
    loaded = ex.load_domain_extractor(uri)
    x = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8)
    torch.testing.assert_close(loaded(x), model(x))


def test_extractor_name_for_dataset():
    assert ex.extractor_name_for_dataset("fashion-mnist") == "fmnist"
    assert ex.extractor_name_for_dataset("digits") == "digits"
    assert ex.extractor_name_for_dataset("My Photos-2") == "my_photos_2"
    assert ex.extractor_name_for_dataset("3d") == "d_3d"


def test_extractor_name_validation():
    with pytest.raises(ex.ExtractorError, match="name"):
        ex.DomainCNN("Bad-Name", "cnn-xs-v1", 1, 8, 10)
    with pytest.raises(ex.ExtractorError, match="arch"):
        ex.DomainCNN("ok", "resnet", 1, 8, 10)


# --- Inception (torch-fidelity definition) ----------------------------------------------------------


@pytest.fixture(scope="module")
def random_inception_file(tmp_path_factory):
    if not HAS_TORCH_FIDELITY:
        pytest.skip("torch-fidelity not installed: pip install --no-deps torch-fidelity==0.4.0")
    ext = ex.random_inception(seed=0)
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    path.write_bytes(ex.state_dict_bytes(ext.net.state_dict()))
    return ext, str(path), ex.sha256_bytes(path.read_bytes())


@needs_tf
def test_inception_random_weights_load_with_explicit_hash(random_inception_file):
    ext, path, sha = random_inception_file
    assert ext.name == "inception_random" and not ext.is_standard_fid
    loaded = ex.load_inception(path, sha256=sha)
    assert loaded.weights_sha256 == sha and loaded.name == f"inception_{sha[:8]}" and not loaded.is_standard_fid
    for (k, a), (k2, b) in zip(ext.net.state_dict().items(), loaded.net.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = torch.randint(0, 256, (1, 1, 28, 28), dtype=torch.uint8)  # gray, any size: resized to 299 inside
    f = loaded(x)
    assert f.shape == (1, 2048) and f.dtype == torch.float32 and torch.isfinite(f).all()  # FID's pool3 features
    assert loaded.feature_dim == f.shape[1]  # the width it declares is the width it returns


@needs_tf
def test_inception_wrong_hash_refused(random_inception_file):
    _, path, _ = random_inception_file
    with pytest.raises(ex.WeightsHashError, match="SHA-256 mismatch") as e:
        ex.load_inception(path)  # default: the standard FID weights' hash
    assert ex.INCEPTION_SHA256 in str(e.value)
    with pytest.raises(ex.WeightsHashError):
        ex.load_inception(path, sha256="1" * 64)


@needs_tf
def test_inception_weights_from_env(random_inception_file, monkeypatch):
    _, path, sha = random_inception_file
    monkeypatch.setenv(ex.INCEPTION_WEIGHTS_ENV, path)
    assert ex.load_inception(sha256=sha).weights_sha256 == sha


def test_inception_missing_weights_says_how(monkeypatch):
    monkeypatch.delenv(ex.INCEPTION_WEIGHTS_ENV, raising=False)
    with pytest.raises(ex.MissingWeightsError) as e:
        ex.load_inception()
    msg = str(e.value)
    assert ex.INCEPTION_WEIGHTS_ENV in msg and ex.INCEPTION_SHA256 in msg and ex.INCEPTION_FILENAME in msg


@needs_tf
def test_inception_fid_names_belong_to_the_standard_weights_hash_alone(random_inception_file, monkeypatch):
    """Verified weights are called `inception` (metrics rfid / gfid) exactly when their SHA-256 is the standard
    FID weights' hash; any other weights get their hash in the name and rfd_/gfd_ metrics."""
    from ulsweep.metrics.fid import metric_name

    _, path, sha = random_inception_file
    other = ex.load_inception(path, sha256=sha)
    assert (other.name, other.is_standard_fid) == (f"inception_{sha[:8]}", False)
    assert (metric_name("r", other), metric_name("g", other)) == (f"rfd_inception_{sha[:8]}", f"gfd_inception_{sha[:8]}")
    from ulsweep.metrics import features, inception

    for module in (features, inception):  # these weights' hash as the standard one, where it is read
        monkeypatch.setattr(module, "INCEPTION_SHA256", sha)
    std = ex.load_inception(path, sha256=sha.upper())
    assert (std.name, std.is_standard_fid, std.weights_sha256) == ("inception", True, sha)
    assert (metric_name("r", std), metric_name("g", std)) == ("rfid", "gfid")
    std.weights_sha256 = "0" * 64  # the name alone does not make FID
    assert not std.is_standard_fid and metric_name("r", std) == "rfd_inception"


def test_inception_weights_that_do_not_fit_are_refused(tmp_path):
    if not HAS_TORCH_FIDELITY:
        pytest.skip("torch-fidelity not installed")
    p = tmp_path / "other.pth"
    p.write_bytes(ex.state_dict_bytes({"w": torch.zeros(3)}))
    with pytest.raises(ex.ExtractorError, match="do not fit"):
        ex.load_inception(str(p), sha256=ex.sha256_bytes(p.read_bytes()))


# --- `ulsweep features train` ----------------------------------------------------------------------


class FakeDataset:
    name = "fashion-mnist"
    content_hash = "c" * 64

    def __init__(self):
        self.splits = dict(zip(("train", "test"), (digits_split()[:2], digits_split()[2:])))

    def load_split(self, split, limit=None):
        x, y = self.splits[split]
        return (x[:limit], y[:limit]) if limit else (x, y)


def test_features_train_cli(tmp_path, monkeypatch, capsys):
    import ulsweep.data
    from ulsweep.metrics.cli import register

    monkeypatch.setattr(ulsweep.data, "resolve_dataset", lambda spec: spec, raising=False)
    monkeypatch.setattr(ulsweep.data, "open_dataset", lambda uri: FakeDataset(), raising=False)
    parser = argparse.ArgumentParser(prog="ulsweep")
    register(parser.add_subparsers(dest="cmd", required=True))
    out = str(tmp_path / "fmnist.pt")
    args = parser.parse_args(["features", "train", "--dataset", "builtin:fashion-mnist", "--out", out,
                              "--epochs", "1", "--arch", "cnn-xs-v1", "--limit", "256", "--batch-size", "128",
                              "--device", "cpu"])
    assert args.func(args) == 0
    meta = json.loads((tmp_path / "fmnist.json").read_text())
    assert meta["name"] == "fmnist" and meta["dataset_hash"] == "c" * 64 and meta["train_images"] == 256
    assert 0 <= meta["test_accuracy"] <= 1 and meta["arch"] == "cnn-xs-v1"
    assert ex.load_domain_extractor(out).name == "fmnist"
    from ulsweep.metrics.fid import metric_name
    assert metric_name("r", ex.load_domain_extractor(out)) == "rfd_fmnist"


def test_features_train_cli_unknown_arch(tmp_path, monkeypatch, capsys):
    import ulsweep.data
    from ulsweep.metrics.cli import register

    monkeypatch.setattr(ulsweep.data, "resolve_dataset", lambda spec: spec, raising=False)
    monkeypatch.setattr(ulsweep.data, "open_dataset", lambda uri: FakeDataset(), raising=False)
    parser = argparse.ArgumentParser(prog="ulsweep")
    register(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(["features", "train", "--dataset", "x", "--out", str(tmp_path / "a.pt"),
                              "--arch", "resnet"])
    assert args.func(args) == 2 and "unknown --arch" in capsys.readouterr().err
    assert not (tmp_path / "a.pt").exists()
