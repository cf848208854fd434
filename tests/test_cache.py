"""One cache root ($ULSWEEP_CACHE, else ~/.cache/ulsweep) with one folder per kind: datasets/, extractors/,
refstats/ (ulsweep.io.cache_root / cache_dir), used by builtin datasets, `eval.extractor: auto` and the
reference statistics of Fréchet distances alike."""
from __future__ import annotations

import os

import pytest

from ulsweep import io as uio


def test_cache_root_from_env_else_home(monkeypatch, tmp_path):
    monkeypatch.setenv("ULSWEEP_CACHE", str(tmp_path / "c"))
    assert uio.cache_root() == str(tmp_path / "c")
    assert uio.cache_dir("datasets") == str(tmp_path / "c" / "datasets")
    monkeypatch.delenv("ULSWEEP_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert uio.cache_root() == str(tmp_path / "home" / ".cache" / "ulsweep")
    assert [uio.cache_dir(k) for k in ("datasets", "extractors", "refstats")] == \
        [str(tmp_path / "home" / ".cache" / "ulsweep" / k) for k in ("datasets", "extractors", "refstats")]
    monkeypatch.setenv("ULSWEEP_CACHE", "")  # empty counts as unset
    assert uio.cache_root() == str(tmp_path / "home" / ".cache" / "ulsweep")


def test_unknown_cache_kind_is_refused():
    with pytest.raises(ValueError, match="unknown cache kind 'dataset'.*datasets, extractors, refstats"):
        uio.cache_dir("dataset")


def test_datasets_extractors_and_refstats_share_one_root(monkeypatch, tmp_path):
    """A builtin dataset, the domain extractor `auto` trains for it and reference statistics all land in
    their own folder under $ULSWEEP_CACHE."""
    from ulsweep import config as C
    from ulsweep.config import experiment_from_dict
    from ulsweep.data import open_dataset
    from ulsweep.metrics.domain import DomainCNN
    from ulsweep.metrics.domain_training import DomainTrainResult
    from ulsweep.train import evaluation

    root = tmp_path / "cache"
    monkeypatch.setenv("ULSWEEP_CACHE", str(root))
    trained = []

    def fake_training(xtr, ytr, xte, yte, *, name, epochs, device):  # an untrained CNN: the layout is the point
        trained.append(name)
        return DomainTrainResult(DomainCNN(name, "cnn-xs-v1", xtr.shape[1], xtr.shape[-1], 10), 0.1, 0.0, epochs, [])

    monkeypatch.setattr(evaluation, "train_domain_extractor", fake_training)
    exp = experiment_from_dict({"data": {"path": "builtin:digits", "image_size": 16},
                                "eval": {"extractor": "auto", "extractor_epochs": 1}})
    ext = evaluation.load_eval_extractor(exp, "cpu")
    ds_path = root / "datasets" / "digits-v1"
    ds = open_dataset(str(ds_path))
    stem = f"digits-{ds.content_hash[:16]}-train-1ep"  # what the weights depend on: data, split, epochs
    assert sorted(os.listdir(root / "extractors")) == [f"{stem}.json", f"{stem}.pt"]
    assert evaluation.load_eval_extractor(exp, "cpu").weights_sha256 == ext.weights_sha256
    assert trained == ["digits"]  # the second run reused the cached extractor
    evaluation.load_eval_extractor(experiment_from_dict(C.to_dict(exp), {"eval.extractor_epochs": 2}), "cpu")
    assert trained == ["digits", "digits"]  # other epochs: another extractor
    x, _ = ds.load_split("test", limit=32)
    evaluation.reconstruction_fd_of(ext, x, x.flip(-1), ds.content_hash, "test@16")
    assert len(os.listdir(root / "refstats")) == 1
    assert sorted(os.listdir(root)) == ["datasets", "extractors", "refstats"]
