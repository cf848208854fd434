"""Importers into the Parquet dataset format: Fashion-MNIST (idx files) and folders of PNG/JPEG images."""
from __future__ import annotations

import gzip
import os
import warnings

import numpy as np

from ulsweep.data.builtin import stratified_split
from ulsweep.data.manifest import DataError, filesystem
from ulsweep.data.reader import Dataset
from ulsweep.data.writer import write_dataset

DEFAULT_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # Debian: apt-get install dataset-fashion-mnist
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


# ----------------------------------------------------------------------------------------------
# Fashion-MNIST


def read_idx(path: str) -> np.ndarray:
    """An idx file (optionally gzipped) as a uint8 array of its declared shape."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError as e:
        raise DataError(f"{path}: file is missing") from e
    except (OSError, EOFError) as e:  # bad gzip / truncated stream
        raise DataError(f"{path}: cannot decompress ({type(e).__name__}: {e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an idx file (magic {raw[:4].hex()!r})")
    if raw[2] != 0x08:
        raise DataError(f"{path}: idx element type 0x{raw[2]:02x} is not unsigned byte (0x08)")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated idx header")
    dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    want = header + int(np.prod(dims))
    if len(raw) != want:
        raise DataError(f"{path}: idx says shape {dims} ({want} bytes with header), file holds {len(raw)} bytes")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _idx_file(src: str, stem: str) -> str:
    for name in (f"{stem}.gz", stem):
        p = os.path.join(src, name)
        if os.path.exists(p):
            return p
    raise DataError(f"{os.path.join(src, stem + '.gz')}: file is missing (Fashion-MNIST needs "
                    f"{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte[.gz])")


def import_fashion_mnist(src: str = DEFAULT_FASHION_MNIST, out: str = "", *, overwrite: bool = False) -> Dataset:
    """Read the four Fashion-MNIST idx files from `src` and write a 1x28x28 dataset (train 60k, test 10k) at `out`."""
    if not out:
        raise DataError("import_fashion_mnist: `out` (dataset URI to write) is required")
    if not os.path.isdir(src):
        raise DataError(f"{src}: Fashion-MNIST directory not found; install it with "
                        f"`apt-get install dataset-fashion-mnist` or pass --src DIR holding the idx .gz files")
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        ipath, lpath = _idx_file(src, f"{prefix}-images-idx3-ubyte"), _idx_file(src, f"{prefix}-labels-idx1-ubyte")
        images, labels = read_idx(ipath), read_idx(lpath)
        if images.ndim != 3:
            raise DataError(f"{ipath}: expected (N, H, W) images, idx shape is {images.shape}")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise DataError(f"{lpath}: {labels.shape} labels for {images.shape[0]} images in {ipath}")
        if labels.size and labels.max() > 9:
            raise DataError(f"{lpath}: label {int(labels.max())} out of range 0..9")
        splits[split] = (images[:, None], labels.astype(np.int64))  # (N, 1, 28, 28)
    return write_dataset(out, "fashion-mnist", splits, label_names=FASHION_MNIST_CLASSES,
                         source={"importer": "fashion-mnist", "src": os.path.abspath(src)}, overwrite=overwrite)


# ----------------------------------------------------------------------------------------------
# Image folders


def _decode(fs, path: str, image_size: int):
    """(image_size, image_size) or (image_size, image_size, 3) uint8, centre-cropped and resized with Pillow."""
    from PIL import Image, ImageOps

    with fs.open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    img = ImageOps.exif_transpose(img)
    if img.mode.startswith("I") or img.mode == "F":  # 16-bit / float greyscale: rescale to 8 bits
        a = np.asarray(img, dtype=np.float64)
        hi = max(float(a.max()), 1.0) if img.mode == "F" else 65535.0
        img = Image.fromarray(np.clip(np.rint(a * 255.0 / hi), 0, 255).astype(np.uint8), "L")
    grey = img.mode in ("1", "L", "LA", "La")
    if "A" in img.mode or "a" in img.mode or "transparency" in img.info:
        # transparent pixels become black (the model's background value, -1)
        img = Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), img.convert("RGBA"))
    img = img.convert("L" if grey else "RGB")
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    img = img.crop((left, top, left + s, top + s)).resize((image_size, image_size), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def import_image_folder(src: str, out: str, image_size: int, test_fraction: float = 0.1, seed: int = 0, *,
                        strict: bool = False, overwrite: bool = False, name: str | None = None) -> Dataset:
    """Import a folder tree of PNG/JPEG images as a dataset of image_size x image_size images.

    Label = index of the top-level subfolder (sorted names) when `src` has subfolders holding images,
    else -1 (images directly in `src` are -1 too). Each image is centre-cropped to a square and resized
    (Pillow, bicubic). All images become RGB unless every one is greyscale (then 1 channel).
    Corrupt or unreadable files are skipped and reported by name (a warning, and `source.skipped` in the
    manifest); with `strict=True` they are a DataError instead. Test split: a `test_fraction` share,
    stratified by class, chosen with `seed` (test_fraction=0 writes only `train`).
    """
    if not isinstance(image_size, int) or image_size < 1:
        raise DataError(f"{src}: image_size must be a positive integer (got {image_size!r})")
    if not 0.0 <= test_fraction < 1.0:
        raise DataError(f"{src}: test_fraction must be in [0, 1) (got {test_fraction!r})")
    fs, root = filesystem(src)
    if not fs.isdir(root):
        raise DataError(f"{src}: image folder not found")
    files = sorted(p for p in fs.find(root) if p.lower().endswith(IMAGE_EXTENSIONS)
                   and not any(part.startswith(".") for part in p[len(root):].split("/")))
    if not files:
        raise DataError(f"{src}: no {'/'.join(IMAGE_EXTENSIONS)} files found")
    rel = [p[len(root):].lstrip("/") for p in files]
    classes = sorted({r.split("/", 1)[0] for r in rel if "/" in r})
    class_index = {c: i for i, c in enumerate(classes)}

    arrays, labels, skipped = [], [], []
    for path, r in zip(files, rel):
        try:
            arrays.append(_decode(fs, path, image_size))
        except Exception as e:  # Pillow raises many kinds (UnidentifiedImageError, OSError, SyntaxError, ...)
            skipped.append(f"{r}: {type(e).__name__}: {e}")
            continue
        labels.append(class_index[r.split("/", 1)[0]] if "/" in r else -1)
    if skipped:
        msg = f"{src}: {len(skipped)} unreadable image file(s): " + "; ".join(skipped)
        if strict:
            raise DataError(msg)
        warnings.warn(msg + " (skipped)", stacklevel=2)
    if not arrays:
        raise DataError(f"{src}: none of the {len(files)} image files could be read")
    grey = all(a.ndim == 2 for a in arrays)
    if grey:
        x = np.stack(arrays)[:, None]  # (N, 1, S, S)
    else:
        x = np.stack([np.repeat(a[..., None], 3, axis=2) if a.ndim == 2 else a for a in arrays])
        x = x.transpose(0, 3, 1, 2)  # (N, 3, S, S)
    y = np.asarray(labels, np.int64)
    n = len(y)
    n_test = int(round(n * test_fraction))
    if test_fraction > 0:
        n_test = max(n_test, 1)
        if n_test >= n:
            raise DataError(f"{src}: {n} readable image(s) cannot be split with test_fraction={test_fraction}")
    if n_test:
        train, test = stratified_split(y, n_test, seed)
        splits = {"train": (x[train], y[train]), "test": (x[test], y[test])}
    else:
        splits = {"train": (x, y)}
    source = {"importer": "image_folder", "src": src, "image_size": image_size, "test_fraction": test_fraction,
              "seed": seed, "skipped": skipped, "resize": "centre crop, Pillow bicubic"}
    name = name or os.path.basename(root.rstrip("/")) or "images"
    return write_dataset(out, name, splits, label_names=classes or None, source=source, overwrite=overwrite)
