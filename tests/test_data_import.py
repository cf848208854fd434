"""Encoded-image datasets (png/jpeg/webp shards) and the image-folder importer (ulsweep.data.folder)."""
import argparse
import hashlib
import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import skimage.data
from PIL import Image

from ulsweep.data import folder
from ulsweep.data.manifest import DataError, content_hash, parse_manifest
from ulsweep.data.reader import open_dataset
from ulsweep.data.writer import write_dataset

S = 16  # imported image side

# ----------------------------------------------------------------------------------------------
# Manifest and codec round trip


def test_old_raw_manifest_keeps_its_hash():
    # content_hash of this shard list as computed before encodings existed (main at 54a1317)
    shas = {"train": ["a" * 64, "b" * 64], "test": ["c" * 64]}
    old = "7fa8993956478e8a7ac8b53ad5fc0db7020dd7624546037bbb8335b85d54c027"
    assert content_hash((1, 8, 8), shas) == old
    m = {"format": "ulsweep-dataset", "version": 1, "name": "old", "image_shape": [1, 8, 8], "dtype": "uint8",
         "content_hash": old, "label_names": None, "source": {},
         "splits": {s: {"num_images": 2 * len(v), "shards": [{"file": f"{s}/p{i}.parquet", "num_rows": 2,
                                                              "sha256": h} for i, h in enumerate(v)]}
                    for s, v in shas.items()}}
    assert parse_manifest("old/dataset.json", json.dumps(m).encode())["content_hash"] == old
    png = content_hash((1, 8, 8), shas, "png")
    assert len({old, png, content_hash((1, 8, 8), shas, "jpeg", 90), content_hash((1, 8, 8), shas, "jpeg", 80)}) == 4
    for key, value, match in (("encoding", "gif", r"'encoding': expected one of raw, png, jpeg, webp"),
                              ("quality", 90, r"'quality': png: takes no quality setting"),
                              ("encoding", "jpeg", r"'quality': jpeg: quality must be an integer in 1\.\.100")):
        bad = {**m, "encoding": "png", "content_hash": png, key: value}
        with pytest.raises(DataError, match=r"^bad/dataset.json: key " + match):
            parse_manifest("bad/dataset.json", json.dumps(bad).encode())


@pytest.mark.parametrize("encoding,quality,tol", [("png", None, 0), ("jpeg", 90, 12), ("webp", 90, 12)])
def test_write_read_encoded(tmp_path, encoding, quality, tol):
    photo = skimage.data.astronaut()[100:132, 200:232].transpose(2, 0, 1)  # (3, 32, 32)
    x = np.stack([photo, photo[:, ::-1], photo[:, :, ::-1]])
    ds = write_dataset(str(tmp_path / "d"), "a", {"train": (x, np.arange(3))}, shard_rows=2,
                       encoding=encoding, quality=quality)
    assert (ds.encoding, ds.quality) == (encoding, quality)
    got, y = ds.load_split("train")
    err = np.abs(got.numpy().astype(int) - x)
    assert y.tolist() == [0, 1, 2] and err.max() <= (tol or 0) * 4 and err.mean() <= tol
    with pytest.raises(DataError, match=r"d: png: takes no quality setting"):
        write_dataset(str(tmp_path / "d"), "a", {"train": (x, np.arange(3))}, encoding="png", quality=5)


# ----------------------------------------------------------------------------------------------
# Mode conversion (ulsweep.data.images), mode by mode on tiny images


def test_mode_conversions():
    from ulsweep.data.images import is_colour, prepare, to_channels

    la = Image.fromarray(np.dstack([np.full((4, 4), 100, np.uint8), np.full((4, 4), 128, np.uint8)]), "LA")
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.info["transparency"] = 1  # palette entry 1 is transparent: black after compositing
    cases = [  # image, channels, expected kind, expected pixel value(s)
        (Image.new("1", (4, 4), 1), 1, "1 -> L (bilevel to 0/255)", 255),
        (Image.new("1", (4, 4), 1), 3, "1 -> RGB (bilevel to 0/255, grey replicated)", 255),
        (la, 1, "LA -> L (alpha composited over black, luma)", 50),  # 100 * 128/255
        (Image.new("CMYK", (4, 4), (0, 0, 0, 0)), 3, "CMYK -> RGB (Pillow CMYK -> RGB)", 255),
        (Image.fromarray(np.full((4, 4), 65535 // 5, np.int32), "I"), 1, "I -> L (16-bit scaled to 8-bit)", 51),
        (Image.fromarray(np.full((4, 4), 300.0, np.float32), "F"), 1, "F -> L (float clipped to 0..255)", 255),
        (pal, 3, "P -> RGB (alpha composited over black)", 0),
        (Image.new("RGB", (4, 4), (10, 200, 30)), 1, "RGB -> L (luma)", 124),  # (299*10 + 587*200 + 114*30) / 1000
    ]
    for img, channels, kind, value in cases:
        out, got = to_channels(img, channels)
        assert got == kind and out.mode == ("L" if channels == 1 else "RGB")
        assert np.abs(np.asarray(out).astype(int) - value).max() <= 1, (kind, np.asarray(out)[0, 0])
    assert not is_colour(la) and is_colour(pal) and is_colour(Image.new("CMYK", (2, 2)))
    grey_pal = Image.new("P", (2, 2))
    grey_pal.putpalette([v for i in range(256) for v in (i, i, i)])
    assert not is_colour(grey_pal)
    x, kind = prepare(Image.new("RGB", (7, 5), (1, 2, 3)), 3, 3)
    assert x.shape == (3, 3, 3) and x.dtype == np.uint8 and x[:, 0, 0].tolist() == [1, 2, 3]


# ----------------------------------------------------------------------------------------------
# Source trees (crops of scikit-image's sample photos, non-square, a few sizes)


def _crop(photo: np.ndarray, i: int) -> np.ndarray:
    h, w = 22 + 9 * i, 45 - 6 * i  # 22x45 ... 49x27
    y, x = 13 * i + 5, 19 * i + 3
    return np.ascontiguousarray(photo[y:y + h, x:x + w])


def _centre_lanczos(arr: np.ndarray, size: int = S) -> np.ndarray:
    """The expected pixels, computed here with Pillow alone: largest centred square, Lanczos to size."""
    h, w = arr.shape[:2]
    s = min(h, w)
    sq = arr[(h - s) // 2:(h + s) // 2, (w - s) // 2:(w + s) // 2]
    mode = "L" if sq.ndim == 2 else "RGB"
    out = np.asarray(Image.fromarray(sq, mode).resize((size, size), Image.Resampling.LANCZOS))
    return np.repeat(out[None], 3, 0) if out.ndim == 2 else out.transpose(2, 0, 1)


def _make_labelled_tree(root) -> dict:
    """Two class folders of photo crops plus odd-mode and bad files; returns {relpath: expected (3, S, S)}."""
    expected = {}
    for cls, names in (("cat", ("chelsea", "cat")), ("coffee", ("coffee", "rocket"))):
        os.makedirs(root / cls)
        for name in names:
            photo = getattr(skimage.data, name)()
            for i in range(3):
                rel = f"{cls}/{name}{i}.png"
                a = _crop(photo, i)
                Image.fromarray(a).save(root / rel)
                expected[rel] = _centre_lanczos(a)
    astro, camera = skimage.data.astronaut(), skimage.data.camera()
    rgba = np.dstack([_crop(astro, 1), np.full(_crop(astro, 1).shape[:2], 255, np.uint8)])
    rgba[:, :10, 3] = 0  # a transparent band: composited over black
    Image.fromarray(rgba, "RGBA").save(root / "cat/rgba.png")
    rgb = rgba[..., :3].copy()
    rgb[:, :10] = 0
    expected["cat/rgba.png"] = _centre_lanczos(rgb)
    pal = Image.fromarray(_crop(astro, 2)).quantize(16)  # palette PNG
    pal.save(root / "coffee/palette.png")
    expected["coffee/palette.png"] = _centre_lanczos(np.asarray(pal.convert("RGB")))
    grey = _crop(camera, 0)
    Image.fromarray(grey.astype(np.uint16) * 257).save(root / "cat/grey16.png")  # 16-bit: v * 257 -> v
    expected["cat/grey16.png"] = _centre_lanczos(grey)
    Image.fromarray(_crop(camera, 1)).save(root / "coffee/grey.jpg", quality=95)
    expected["coffee/grey.jpg"] = _centre_lanczos(np.asarray(Image.open(root / "coffee/grey.jpg")))
    buf = root / "coffee/full.jpg"
    Image.fromarray(_crop(astro, 0)).save(buf, quality=95)
    (root / "cat/truncated.jpg").write_bytes(buf.read_bytes()[: buf.stat().st_size * 2 // 3])
    os.remove(buf)
    (root / "coffee/notes.png").write_text("not an image, despite the name")
    (root / "coffee/readme.txt").write_text("ignored: not an image extension")
    return expected


BAD = {"cat/truncated.jpg", "coffee/notes.png"}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos") / "src"
    return root, _make_labelled_tree(root)


@pytest.fixture(scope="module")
def imported(tree, tmp_path_factory):
    """The labelled tree imported as png through a pool of 2 worker processes."""
    out = tmp_path_factory.mktemp("imported") / "png"
    with pytest.warns(UserWarning, match=r"2 bad image file\(s\) skipped, listed in .*png/import_report.json"):
        ds = folder.import_image_folder(str(tree[0]), str(out), S, test_fraction=0.25, seed=3, workers=2,
                                        max_bad_fraction=0.15, shard_rows=4)
    return ds, json.loads((out / "import_report.json").read_text())


def _rows(ds) -> set[tuple[int, bytes]]:
    out = set()
    for split in ds.splits:
        x, y = ds.load_split(split)
        out |= {(int(lab), im.numpy().tobytes()) for im, lab in zip(x, y)}
    return out


# ----------------------------------------------------------------------------------------------
# The import


def test_png_import_labels_pixels_report(tree, imported):
    _, expected = tree
    ds, report = imported
    assert ds.image_shape == (3, S, S) and ds.encoding == "png" and ds.label_names == ["cat", "coffee"]
    # round(18 * 0.25) = 4 files are assigned to the test split before any is read; bad ones drop out
    assert sum(ds.splits.values()) == len(expected) == 16
    assert ds.splits["test"] + sum(b["split"] == "test" for b in report["bad"]) == 4
    # every imported image is exactly the independently computed crop + Lanczos of its file, with its label
    want = {(["cat", "coffee"].index(rel.split("/")[0]), a.tobytes()) for rel, a in expected.items()}
    assert _rows(ds) == want
    assert {b["file"] for b in report["bad"]} == BAD and report["bad_count"] == 2 and report["listed"] == 18
    reasons = {b["file"]: b["reason"] for b in report["bad"]}
    assert reasons["cat/truncated.jpg"].startswith("OSError: image file is truncated")
    assert reasons["coffee/notes.png"].startswith("UnidentifiedImageError")
    sixteen = Image.open(tree[0] / "cat/grey16.png").mode  # I;16 (Pillow >= 10.1?) or I
    assert report["conversions"] == {
        "RGB -> RGB (unchanged)": 12, f"{sixteen} -> RGB (16-bit scaled to 8-bit, grey replicated)": 1,
        "L -> RGB (grey replicated)": 1, "P -> RGB (palette looked up)": 1,
        "RGBA -> RGB (alpha composited over black)": 1}
    assert report["channels"]["channels"] == 3 and report["channels"]["how"].startswith("auto: 15 of 17")
    assert ds.source["conversions"] == report["conversions"] and ds.source["bad_files"] == 2
    assert not os.path.exists(os.path.join(ds.uri, folder.WORK_DIR))


def test_flat_grey_tree_jpeg(tmp_path):
    src = tmp_path / "flat"
    src.mkdir()
    expected = []
    for name in ("camera", "moon", "coins"):
        for i in range(2):
            a = _crop(getattr(skimage.data, name)(), i)
            Image.fromarray(a).save(src / f"{name}{i}.png")
            expected.append(_centre_lanczos(a)[:1])
    out = f"memory://flat-{tmp_path.name}"  # any fsspec URI; workers default to 1 for memory://
    ds = folder.import_image_folder(str(src), out, S, test_fraction=0.0, encoding="jpeg", quality=90)
    assert ds.image_shape == (1, S, S) and ds.label_names is None and ds.splits == {"train": 6}
    assert (ds.encoding, ds.quality) == ("jpeg", 90) and ds.source["channels"]["how"].startswith("auto: 0 of 6")
    x, y = ds.load_split("train")
    assert (y == -1).all()
    # lossy: each stored image is within a few levels of one expected image, and all are matched
    err = np.abs(x.numpy()[:, None].astype(int) - np.stack(expected)[None]).mean(axis=(2, 3, 4))  # (6, 6)
    assert sorted(err.argmin(1).tolist()) == list(range(6)) and err.min(1).max() < 4


def test_too_many_bad_files_fails_with_report(tree, tmp_path):
    out = tmp_path / "strict"
    with pytest.raises(DataError, match=r"src: failed: 2 of 18 files are bad, more than max_bad_fraction=0.05 "
                                        r"allows; .*see .*strict/import_report.json"):
        folder.import_image_folder(str(tree[0]), str(out), 8, test_fraction=0.0, workers=1, max_bad_fraction=0.05)
    report = json.loads((out / "import_report.json").read_text())
    assert report["status"].startswith("failed") and {b["file"] for b in report["bad"]} == BAD
    assert not (out / "dataset.json").exists()


def _grey_tree(root, n=10):
    root.mkdir()
    moon = skimage.data.moon()
    for i in range(n):
        Image.fromarray(moon[20 * i:20 * i + 30, 7 * i:7 * i + 40]).save(root / f"m{i:02d}.png")


def _interrupt_after(monkeypatch, k):
    def hook(done):
        if done == k:
            raise KeyboardInterrupt

    monkeypatch.setattr(folder, "_after_shard", hook)


def test_resume_keeps_done_shards(tmp_path, monkeypatch):
    src, out = tmp_path / "grey", tmp_path / "out"
    _grey_tree(src)
    kw = dict(image_size=8, test_fraction=0.0, workers=1, shard_rows=3)  # 4 shards
    _interrupt_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        folder.import_image_folder(str(src), str(out), **kw)
    assert not (out / "dataset.json").exists()
    done = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.parquet"))
    assert len(done) == 2 and len(list((out / folder.WORK_DIR).rglob("part-*.json"))) == 2
    stat = {p: os.stat(out / p) for p in done}
    calls = []
    real = folder.write_shard
    monkeypatch.setattr(folder, "write_shard", lambda job: calls.append(job["index"]) or real(job))
    monkeypatch.setattr(folder, "_after_shard", None)
    ds = folder.import_image_folder(str(src), str(out), **kw)
    assert len(calls) == 2  # only the two unfinished shards were written
    for p, st in stat.items():  # finished shards were left alone
        now = os.stat(out / p)
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    assert json.loads((out / "import_report.json").read_text())["status"] == \
        "complete (2 shard(s) kept from an interrupted run)"
    # the resumed dataset is the one an uninterrupted import writes
    again = folder.import_image_folder(str(src), str(tmp_path / "again"), **kw)
    assert ds.content_hash == again.content_hash and ds.splits == {"train": 10}
    other = folder.import_image_folder(str(src), str(tmp_path / "seed1"), **kw, seed=1)
    assert other.content_hash != ds.content_hash and _rows(other) == _rows(ds)  # same images, other order


def test_resume_refuses_changed_options_or_source(tmp_path, monkeypatch):
    src, out = tmp_path / "grey", tmp_path / "out"
    _grey_tree(src, 6)
    kw = dict(image_size=8, test_fraction=0.0, workers=1, shard_rows=2)
    _interrupt_after(monkeypatch, 1)
    with pytest.raises(KeyboardInterrupt):
        folder.import_image_folder(str(src), str(out), **kw)
    monkeypatch.setattr(folder, "_after_shard", None)
    with pytest.raises(DataError, match=r"out: cannot resume the unfinished import here: option 'image_size' "
                                        r"was 8, now 12; rerun with the old value or pass --overwrite"):
        folder.import_image_folder(str(src), str(out), **{**kw, "image_size": 12})
    with pytest.raises(DataError, match=r"option 'encoding' was 'png', now 'raw'"):
        folder.import_image_folder(str(src), str(out), **kw, encoding="raw")
    Image.fromarray(np.zeros((9, 9), np.uint8)).save(src / "new.png")
    with pytest.raises(DataError, match=r"cannot resume .*: the source files changed \(6 -> 7 files"):
        folder.import_image_folder(str(src), str(out), **kw)
    ds = folder.import_image_folder(str(src), str(out), **kw, overwrite=True)
    assert ds.splits == {"train": 7}
    with pytest.raises(DataError, match=r"out/dataset.json: a dataset already exists here \(pass --overwrite\)"):
        folder.import_image_folder(str(src), str(out), **kw)


def test_tampered_or_undecodable_shard_is_named(imported, tmp_path):
    ds, _ = imported
    root = tmp_path / "copy"
    shutil.copytree(ds.uri, root)
    shard = ds.manifest["splits"]["train"]["shards"][1]["file"]
    data = bytearray((root / shard).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (root / shard).write_bytes(bytes(data))
    with pytest.raises(DataError, match=rf"copy/{shard} \(split 'train'\): SHA-256 mismatch"):
        open_dataset(str(root)).load_split("train")
    # a row that is not a PNG, in a shard whose hash the manifest agrees with
    table = pq.read_table(root / ds.manifest["splits"]["test"]["shards"][0]["file"])
    images = table.column("image").to_pylist()
    images[2] = images[2][:40]
    shard = ds.manifest["splits"]["test"]["shards"][0]["file"]
    pq.write_table(pa.table({"image": pa.array(images, pa.binary()), "label": table.column("label")}), root / shard)
    m = json.loads((root / "dataset.json").read_text())
    m["splits"]["test"]["shards"][0]["sha256"] = hashlib.sha256((root / shard).read_bytes()).hexdigest()
    m["content_hash"] = content_hash(tuple(m["image_shape"]),
                                     {s: [sh["sha256"] for sh in i["shards"]] for s, i in m["splits"].items()}, "png")
    (root / "dataset.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=rf"copy/{shard} \(split 'test'\): column 'image' row 2: cannot decode png"):
        open_dataset(str(root)).load_split("test")


def test_bad_arguments_name_the_option(tree, tmp_path):
    src = str(tree[0])
    for kw, match in ((dict(image_size=0), r"image_size: expected a positive integer \(got 0\)"),
                      (dict(image_size=8, channels=2), r"channels: expected 1 or 3 \(got 2\)"),
                      (dict(image_size=8, encoding="jpeg"), r"format/quality: jpeg: quality must be"),
                      (dict(image_size=8, workers=2, encoding="raw"), r"workers: memory:// lives in one process"),
                      (dict(image_size=8, max_bad_fraction=2.0), r"max_bad_fraction: expected a number in \[0, 1\]")):
        out = "memory://x" if kw.get("workers") == 2 else str(tmp_path / "o")
        with pytest.raises(DataError, match=match):
            folder.import_image_folder(src, out, **kw)
    with pytest.raises(DataError, match=r"nowhere: image folder not found"):
        folder.import_image_folder(str(tmp_path / "nowhere"), str(tmp_path / "o"), 8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: no image files found"):
        folder.import_image_folder(str(tmp_path / "empty"), str(tmp_path / "o"), 8)


# ----------------------------------------------------------------------------------------------
# CLI


def _cli(argv):
    from ulsweep.data.cli import register

    parser = argparse.ArgumentParser(prog="ulsweep")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_import_folder(tree, tmp_path, capsys):
    src = str(tree[0])
    base = ["data", "import", "folder", src, "--image-size", "8", "--workers", "1", "--test-fraction", "0"]
    assert _cli(base + ["--out", str(tmp_path / "w"), "--format", "webp", "--quality", "80",
                        "--channels", "1", "--max-bad-fraction", "0.2"]) == 0
    cap = capsys.readouterr()
    assert "channels: 1 (given)" in cap.out and "transform: EDM2 center-crop" in cap.out
    assert "RGB -> L (luma)" in cap.out and "-> L (16-bit scaled to 8-bit)" in cap.out
    assert f"bad files: 2 of 18 (skipped; listed in {tmp_path / 'w'}/import_report.json)" in cap.out
    assert "src 1x8x8 uint8 webp q80, train=16, content_hash" in cap.out and "(complete)" in cap.out
    assert "warning: " in cap.err and "importing" in cap.err  # the bad-file warning and the progress bar
    assert _cli(base + ["--out", str(tmp_path / "f")]) == 1
    err = capsys.readouterr().err
    assert "error: " in err and "more than max_bad_fraction=0.01 allows" in err and "import_report.json" in err
    assert _cli(base + ["--out", str(tmp_path / "q"), "--format", "png", "--quality", "5"]) == 1
    assert "png: takes no quality setting" in capsys.readouterr().err
