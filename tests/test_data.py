"""Dataset format, validation, builtins, importers and CLI of ulsweep.data."""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from ulsweep.data import DataError, open_dataset, resolve_dataset, to_model_range, write_dataset
from ulsweep.data.builtin import digits_arrays, photos_arrays
from ulsweep.data.importers import import_fashion_mnist
from ulsweep.data.manifest import content_hash

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"


def _arrays(n=10, shape=(3, 4, 5), seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, *shape), dtype=np.uint8), rng.integers(-1, 10, n)


def _mem_uri() -> str:
    return f"memory://ulsweep-test-{uuid.uuid4().hex}/ds"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cache"))


# ----------------------------------------------------------------------------------------------
# Round trip and hashing


@pytest.mark.parametrize("where", ["tmp", "memory"])
def test_round_trip_exact(tmp_path, where):
    uri = str(tmp_path / "ds") if where == "tmp" else _mem_uri()
    tr, te = _arrays(23), _arrays(5, seed=1)
    ds = write_dataset(uri, "toy", {"train": tr, "test": te}, shard_rows=7)  # 4 shards: 7+7+7+2
    again = open_dataset(uri)
    assert (again.name, again.image_shape, again.splits) == ("toy", (3, 4, 5), {"train": 23, "test": 5})
    assert again.content_hash == ds.content_hash and len(again.content_hash) == 64
    assert len(again.shard_uris("train")) == 4
    x, y = again.load_split("train")
    assert x.dtype == torch.uint8 and y.dtype == torch.int64 and x.shape == (23, 3, 4, 5)
    assert np.array_equal(x.numpy(), tr[0]) and np.array_equal(y.numpy(), tr[1])
    x, y = again.load_split("test", verify=False)
    assert np.array_equal(x.numpy(), te[0]) and np.array_equal(y.numpy(), te[1])
    x, y = again.load_split("train", limit=9)  # crosses a shard boundary
    assert np.array_equal(x.numpy(), tr[0][:9]) and np.array_equal(y.numpy(), tr[1][:9])
    assert again.load_split("train", limit=1000)[0].shape[0] == 23


def test_hash_stable_across_filesystems_and_rewrites(tmp_path):
    splits = {"train": _arrays(12), "test": _arrays(3, seed=1)}
    h = {write_dataset(uri, "toy", splits, shard_rows=5).content_hash
         for uri in (str(tmp_path / "a"), str(tmp_path / "b"), _mem_uri(), f"file://{tmp_path}/c")}
    assert len(h) == 1
    # the manifest's hash is recomputable from its shard list
    m = json.loads((tmp_path / "a" / "dataset.json").read_text())
    shas = {s: [sh["sha256"] for sh in info["shards"]] for s, info in m["splits"].items()}
    assert content_hash(tuple(m["image_shape"]), shas) == h.pop()
    for s, info in m["splits"].items():
        for sh in info["shards"]:
            assert hashlib.sha256((tmp_path / "a" / sh["file"]).read_bytes()).hexdigest() == sh["sha256"]


def test_hash_changes_with_one_pixel_label_or_split(tmp_path):
    x, y = _arrays(8)
    base = write_dataset(str(tmp_path / "a"), "toy", {"train": (x, y)}).content_hash
    x2 = x.copy()
    x2[5, 2, 3, 4] ^= 1
    assert write_dataset(str(tmp_path / "b"), "toy", {"train": (x2, y)}).content_hash != base
    y2 = y.copy()
    y2[0] += 1
    assert write_dataset(str(tmp_path / "c"), "toy", {"train": (x, y2)}).content_hash != base
    assert write_dataset(str(tmp_path / "d"), "toy", {"test": (x, y)}).content_hash != base


def test_overwrite_needs_flag_and_removes_stale_shards(tmp_path):
    uri = str(tmp_path / "ds")
    write_dataset(uri, "toy", {"train": _arrays(10)}, shard_rows=3)  # 4 shards
    with pytest.raises(DataError, match="already exists"):
        write_dataset(uri, "toy", {"train": _arrays(10)})
    x, y = _arrays(4, seed=3)
    ds = write_dataset(uri, "toy2", {"train": (x, y)}, overwrite=True)  # 1 shard
    assert sorted(os.listdir(tmp_path / "ds" / "train")) == ["part-00000.parquet"]
    assert ds.name == "toy2" and np.array_equal(ds.load_split("train")[0].numpy(), x)
    assert not [p for p in os.listdir(tmp_path / "ds" / "train") if ".tmp-" in p]


def test_write_rejects_bad_input(tmp_path):
    uri = str(tmp_path / "ds")
    x, y = _arrays(4)
    with pytest.raises(DataError, match=r"split 'train'.*empty"):
        write_dataset(uri, "toy", {"train": (x[:0], y[:0])})
    with pytest.raises(DataError, match="uint8"):
        write_dataset(uri, "toy", {"train": (x.astype(np.float32), y)})
    with pytest.raises(DataError, match="different image shapes"):
        write_dataset(uri, "toy", {"train": (x, y), "test": (x[:, :, :2], y)})
    with pytest.raises(DataError, match=">= -1"):
        write_dataset(uri, "toy", {"train": (x, y - 5)})
    assert not os.path.exists(tmp_path / "ds" / "dataset.json")


# ----------------------------------------------------------------------------------------------
# Validation on read: every error is a DataError naming the file


def _rewrite_shard(root, rel: str, data: bytes, num_rows: int | None = None):
    """Replace a shard and make the manifest agree with it, so only the shard's content is wrong."""
    (root / rel).write_bytes(data)
    m = json.loads((root / "dataset.json").read_text())
    for info in m["splits"].values():
        for sh in info["shards"]:
            if sh["file"] == rel:
                sh["sha256"] = hashlib.sha256(data).hexdigest()
    shas = {s: [sh["sha256"] for sh in info["shards"]] for s, info in m["splits"].items()}
    m["content_hash"] = content_hash(tuple(m["image_shape"]), shas)
    (root / "dataset.json").write_text(json.dumps(m))


def _parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


@pytest.fixture()
def toy(tmp_path):
    root = tmp_path / "ds"
    write_dataset(str(root), "toy", {"train": _arrays(6, shape=(1, 2, 2)), "test": _arrays(2, shape=(1, 2, 2))},
                  shard_rows=3)
    return root


def test_missing_manifest(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path}/nope/dataset.json.*missing"):
        open_dataset(str(tmp_path / "nope"))
    (tmp_path / "shards_only" / "train").mkdir(parents=True)  # shards without a manifest: not a dataset
    with pytest.raises(DataError, match="shards_only/dataset.json"):
        open_dataset(str(tmp_path / "shards_only"))
    with pytest.raises(DataError, match="memory://.*dataset.json"):
        open_dataset(_mem_uri())


def test_bad_manifest_names_file_and_key(toy):
    mpath = toy / "dataset.json"
    good = json.loads(mpath.read_text())
    mpath.write_text("{not json")
    with pytest.raises(DataError, match=f"{mpath}: not valid JSON"):
        open_dataset(str(toy))
    for key, patch in [("image_shape", {"image_shape": [1, 2]}), ("dtype", {"dtype": "float32"}),
                       ("content_hash", {"content_hash": "0" * 64})]:
        mpath.write_text(json.dumps({**good, **patch}))
        with pytest.raises(DataError, match=f"{mpath}: key '{key}'"):
            open_dataset(str(toy))
    bad = json.loads(json.dumps(good))
    bad["splits"]["train"]["num_images"] = 7
    mpath.write_text(json.dumps(bad))
    with pytest.raises(DataError, match=r"key 'splits.train.num_images'.*hold 6 rows"):
        open_dataset(str(toy))
    bad["splits"]["train"]["shards"][0]["file"] = "../../etc/passwd.parquet"
    mpath.write_text(json.dumps(bad))
    with pytest.raises(DataError, match=r"splits.train.shards\[0\].file"):
        open_dataset(str(toy))


def test_empty_split_in_manifest(toy):
    m = json.loads((toy / "dataset.json").read_text())
    m["splits"]["test"] = {"num_images": 0, "shards": []}
    (toy / "dataset.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=r"dataset.json: key 'splits.test.num_images'.*empty"):
        open_dataset(str(toy))


def test_unknown_split_lists_available(toy):
    with pytest.raises(DataError, match=r"dataset.json: unknown split 'val'; available: test, train"):
        open_dataset(str(toy)).load_split("val")


def test_missing_image_column(toy):
    rel = "train/part-00001.parquet"
    _rewrite_shard(toy, rel, _parquet(pa.table({"pixels": [b"abcd"] * 3, "label": [0, 1, 2]})))
    with pytest.raises(DataError, match=f"{toy}/{rel} \\(split 'train'\\): column 'image' is missing"):
        open_dataset(str(toy)).load_split("train")


def test_wrong_column_type(toy):
    rel = "train/part-00000.parquet"
    _rewrite_shard(toy, rel, _parquet(pa.table({"image": ["abcd"] * 3, "label": [0, 1, 2]})))
    with pytest.raises(DataError, match=f"{rel}.*column 'image' has type string, expected binary"):
        open_dataset(str(toy)).load_split("train")
    _rewrite_shard(toy, rel, _parquet(pa.table({"image": [b"abcd"] * 3, "label": [0.5, 1.0, 2.0]})))
    with pytest.raises(DataError, match=f"{rel}.*column 'label' has type double, expected integer"):
        open_dataset(str(toy)).load_split("train")


def test_row_with_wrong_byte_length(toy):
    rel = "train/part-00001.parquet"
    rows = [b"abcd", b"abcdefghi", b"abcd"]  # row 1 is a 3x3 image in a 1x2x2 dataset
    _rewrite_shard(toy, rel, _parquet(pa.table({"image": pa.array(rows, pa.binary()), "label": [0, 1, 2]})))
    with pytest.raises(DataError, match=f"{rel}.*row 1 holds 9 bytes, expected C\\*H\\*W = 1\\*2\\*2 = 4"):
        open_dataset(str(toy)).load_split("train")


def test_null_image_row(toy):
    rel = "train/part-00000.parquet"
    _rewrite_shard(toy, rel, _parquet(pa.table({"image": pa.array([b"abcd", None, b"abcd"], pa.binary()),
                                                "label": [0, 1, 2]})))
    with pytest.raises(DataError, match=f"{rel}.*column 'image' has 1 null value\\(s\\), first at row 1"):
        open_dataset(str(toy)).load_split("train")


def test_row_count_disagrees_with_manifest(toy):
    rel = "train/part-00001.parquet"
    _rewrite_shard(toy, rel, _parquet(pa.table({"image": pa.array([b"abcd"] * 2, pa.binary()), "label": [0, 1]})))
    with pytest.raises(DataError, match=f"{rel}.*file has 2 rows, manifest says 3"):
        open_dataset(str(toy)).load_split("train")


@pytest.mark.parametrize("image_type", [pa.large_binary(), pa.binary(4)])
def test_other_binary_types_are_read(toy, image_type):
    rel = "train/part-00001.parquet"
    rows = [bytes([i, i + 1, i + 2, i + 3]) for i in range(3)]
    _rewrite_shard(toy, rel, _parquet(pa.table({"image": pa.array(rows, image_type),
                                                "label": pa.array([4, 5, 6], pa.int32())})))
    x, y = open_dataset(str(toy)).load_split("train")
    assert x[3:].flatten().tolist() == [b for r in rows for b in r] and y[3:].tolist() == [4, 5, 6]


def test_truncated_shard(toy):
    rel = "train/part-00001.parquet"
    data = (toy / rel).read_bytes()
    (toy / rel).write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=f"{toy}/{rel} \\(split 'train'\\): SHA-256 mismatch"):
        open_dataset(str(toy)).load_split("train")
    with pytest.raises(DataError, match=f"{toy}/{rel} \\(split 'train'\\): not a readable Parquet file"):
        open_dataset(str(toy)).load_split("train", verify=False)
    _rewrite_shard(toy, rel, b"PAR1 this is not parquet")  # consistent hash, garbage bytes
    with pytest.raises(DataError, match=f"{rel}.*not a readable Parquet file"):
        open_dataset(str(toy)).load_split("train")


def test_hash_mismatch_on_flipped_byte(toy):
    rel = "test/part-00000.parquet"
    data = bytearray((toy / rel).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (toy / rel).write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"{rel} \\(split 'test'\\): SHA-256 mismatch"):
        open_dataset(str(toy)).load_split("test")
    x, _ = open_dataset(str(toy)).load_split("train")  # other splits still load
    assert x.shape == (6, 1, 2, 2)


def test_missing_shard_file(toy):
    os.remove(toy / "train/part-00001.parquet")
    with pytest.raises(DataError, match="train/part-00001.parquet.*missing"):
        open_dataset(str(toy)).load_split("train")
    assert open_dataset(str(toy)).load_split("train", limit=3)[0].shape[0] == 3  # only shard 0 needed


# ----------------------------------------------------------------------------------------------
# Builtins


def _rows(x: torch.Tensor) -> set[bytes]:
    return {bytes(r) for r in x.reshape(x.shape[0], -1).numpy()}


def test_builtin_digits(cache):
    path = resolve_dataset("builtin:digits", cache_dir=cache)
    assert path.startswith(cache) and not [p for p in os.listdir(cache) if ".tmp-" in p]
    ds = open_dataset(path)
    assert ds.image_shape == (1, 16, 16) and ds.splits == {"train": 1497, "test": 300}
    xtr, ytr = ds.load_split("train")
    xte, yte = ds.load_split("test")
    assert int(xtr.min()) == 0 and int(xtr.max()) == 255
    assert torch.equal(xtr[:, :, ::2, ::2].repeat_interleave(2, 2).repeat_interleave(2, 3), xtr)  # nearest 2x
    assert set(ytr.tolist()) == set(range(10)) and np.bincount(yte.numpy()).min() >= 29  # stratified
    assert not _rows(xtr) & _rows(xte)
    # deterministic: building again (and in another cache) gives the same bytes and hash
    assert resolve_dataset("builtin:digits", cache_dir=cache) == path
    splits, _, _ = digits_arrays()
    assert np.array_equal(splits["test"][0], xte.numpy()) and np.array_equal(splits["train"][1], ytr.numpy())
    assert write_dataset(_mem_uri(), "digits", splits, label_names=ds.label_names,
                         source=ds.source).content_hash == ds.content_hash


def test_builtin_photos(cache):
    ds = open_dataset(resolve_dataset("builtin:photos", cache_dir=cache))
    assert ds.image_shape == (3, 32, 32) and ds.splits == {"train": 4096, "test": 512}
    xtr, ytr = ds.load_split("train")
    xte, _ = ds.load_split("test")
    assert not _rows(xtr) & _rows(xte)
    assert len(set(ytr.tolist())) == len(ds.label_names) == 8
    x = xtr.double()
    assert x.min() < 10 and x.max() > 245 and 40 < x.std() < 100
    # real photos, not noise: neighbouring pixels are strongly correlated
    corr = np.corrcoef(x[..., :-1].flatten().numpy(), x[..., 1:].flatten().numpy())[0, 1]
    assert corr > 0.9
    splits, _, _ = photos_arrays()
    assert np.array_equal(splits["test"][0], xte.numpy())


def test_resolve_dataset_other_specs(tmp_path, monkeypatch):
    for spec in ("/some/path", "s3://bucket/ds", "memory://x", "file:///tmp/x"):
        assert resolve_dataset(spec) == spec
    with pytest.raises(DataError, match="builtin:nope.*available: builtin:digits, builtin:photos"):
        resolve_dataset("builtin:nope", cache_dir=str(tmp_path))
    monkeypatch.setenv("ULSWEEP_FASHION_MNIST_SRC", str(tmp_path / "absent"))
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        resolve_dataset("builtin:fashion-mnist", cache_dir=str(tmp_path))
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # failed build left nothing behind


def test_resolve_rebuilds_invalid_cache_entry(tmp_path, cache):
    stale = tmp_path / "digits-v1"
    (stale / "train").mkdir(parents=True)
    (stale / "dataset.json").write_text("{truncated")
    path = resolve_dataset("builtin:digits", cache_dir=str(tmp_path))
    assert path == str(stale)
    assert open_dataset(path).content_hash == open_dataset(resolve_dataset("builtin:digits", cache)).content_hash


def test_resolve_uses_env_cache(tmp_path, monkeypatch, cache):
    monkeypatch.setenv("ULSWEEP_CACHE", str(tmp_path))
    path = resolve_dataset("builtin:digits")
    assert path == str(tmp_path / "datasets" / "digits-v1")  # the datasets/ folder of the cache root
    assert open_dataset(path).content_hash == open_dataset(resolve_dataset("builtin:digits", cache)).content_hash


# ----------------------------------------------------------------------------------------------
# to_model_range


def test_to_model_range_pads_28_to_32():
    x = torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8)
    x[0, 0, 0, 0], x[0, 0, 1, 1] = 0, 255
    y = to_model_range(x, 32)
    assert y.dtype == torch.float32 and y.shape == (4, 1, 32, 32)
    assert y.min() == -1.0 and y.max() == 1.0
    torch.testing.assert_close(y[:, :, 2:30, 2:30], x.float() / 127.5 - 1.0)
    border = torch.ones_like(y, dtype=torch.bool)
    border[:, :, 2:30, 2:30] = False
    assert (y[border] == -1.0).all()


def test_to_model_range_identity_downsample_and_errors():
    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    torch.testing.assert_close(to_model_range(x, 16), x.float() / 127.5 - 1.0)
    z = to_model_range(x, 8)  # area downsampling by 2
    torch.testing.assert_close(z, (x.float() / 127.5 - 1.0).reshape(2, 3, 8, 2, 8, 2).mean((3, 5)))
    assert to_model_range(torch.zeros(1, 1, 7, 7, dtype=torch.uint8), 8).shape == (1, 1, 8, 8)
    with pytest.raises(DataError, match="cannot bring 28x28 images to 16x16"):
        to_model_range(torch.zeros(1, 1, 28, 28, dtype=torch.uint8), 16)
    with pytest.raises(DataError, match="uint8"):
        to_model_range(torch.zeros(1, 1, 8, 8), 8)


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST


def _idx(arr: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return gzip.compress(header + arr.astype(np.uint8).tobytes())


def _fake_fashion(root, n_train=5, n_test=3):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    data = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x, y = rng.integers(0, 256, (n, 28, 28)), rng.integers(0, 10, n)
        (root / f"{prefix}-images-idx3-ubyte.gz").write_bytes(_idx(x))
        (root / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(_idx(y))
        data[prefix] = (x, y)
    return data


def test_fashion_mnist_import_synthetic_idx(tmp_path):
    data = _fake_fashion(tmp_path / "src")
    ds = import_fashion_mnist(str(tmp_path / "src"), _mem_uri())
    assert ds.name == "fashion-mnist" and ds.image_shape == (1, 28, 28) and ds.splits == {"train": 5, "test": 3}
    assert ds.label_names[9] == "Ankle boot"
    for split, prefix in (("train", "train"), ("test", "t10k")):
        x, y = ds.load_split(split)
        assert np.array_equal(x[:, 0].numpy(), data[prefix][0]) and np.array_equal(y.numpy(), data[prefix][1])


def test_fashion_mnist_errors(tmp_path):
    with pytest.raises(DataError, match=r"absent: Fashion-MNIST directory not found.*apt-get install "
                                        r"dataset-fashion-mnist.*--src"):
        import_fashion_mnist(str(tmp_path / "absent"), _mem_uri())
    src = tmp_path / "src"
    _fake_fashion(src)
    bad = src / "t10k-labels-idx1-ubyte.gz"
    bad.write_bytes(_idx(np.zeros(4)))  # 4 labels for 3 images
    with pytest.raises(DataError, match=f"{bad}: \\(4,\\) labels for 3 images"):
        import_fashion_mnist(str(src), _mem_uri())
    bad = src / "train-images-idx3-ubyte.gz"
    bad.write_bytes(gzip.compress(gzip.decompress(bad.read_bytes())[:-10]))  # truncated payload
    with pytest.raises(DataError, match=f"{bad}: idx says shape \\(5, 28, 28\\)"):
        import_fashion_mnist(str(src), _mem_uri())
    bad.write_bytes(bad.read_bytes()[:40])  # truncated gzip stream
    with pytest.raises(DataError, match=f"{bad}: cannot decompress"):
        import_fashion_mnist(str(src), _mem_uri())
    os.remove(bad)
    with pytest.raises(DataError, match="train-images-idx3-ubyte.gz: file is missing"):
        import_fashion_mnist(str(src), _mem_uri())


@pytest.mark.slow
@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST), reason="apt-get install dataset-fashion-mnist")
def test_fashion_mnist_real_package(tmp_path):
    ds = open_dataset(resolve_dataset("builtin:fashion-mnist", cache_dir=str(tmp_path)))
    assert ds.splits == {"train": 60000, "test": 10000}
    x, y = ds.load_split("train")
    assert x.shape == (60000, 1, 28, 28) and np.bincount(y.numpy()).tolist() == [6000] * 10
    assert to_model_range(x[:8], 32).shape == (8, 1, 32, 32)


# ----------------------------------------------------------------------------------------------
# Image folders: tests/test_data_import.py


def _png(path, arr: np.ndarray):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


# ----------------------------------------------------------------------------------------------
# CLI


def _cli(argv):
    from ulsweep.data.cli import register

    parser = argparse.ArgumentParser(prog="ulsweep")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli(tmp_path, capsys, cache):
    assert _cli(["data", "builtin", "digits", "--cache-dir", cache]) == 0
    path = capsys.readouterr().out.strip()
    assert path == resolve_dataset("builtin:digits", cache)
    assert _cli(["data", "info", path, "--verify"]) == 0
    out = capsys.readouterr().out
    assert "digits 1x16x16 uint8, train=1497, test=300" in out and open_dataset(path).content_hash in out
    _fake_fashion(tmp_path / "fm")
    assert _cli(["data", "import", "fashion-mnist", "--src", str(tmp_path / "fm"), "--out", str(tmp_path / "o")]) == 0
    assert "train=5, test=3" in capsys.readouterr().out
    for i in range(4):
        _png(tmp_path / "imgs" / f"{i}.png", np.full((9, 9, 3), i, np.uint8))
    assert _cli(["data", "import", "folder", str(tmp_path / "imgs"), "--out", str(tmp_path / "f"),
                 "--image-size", "4", "--test-fraction", "0.25"]) == 0
    assert "3x4x4 uint8 png, train=3, test=1" in capsys.readouterr().out
    assert _cli(["data", "info", str(tmp_path / "missing")]) == 1
    assert "error:" in capsys.readouterr().err
