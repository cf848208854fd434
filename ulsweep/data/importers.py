"""Importers into the Parquet dataset format: Fashion-MNIST (idx files) here, image folder trees in
`ulsweep.data.folder` (re-exported here)."""
from __future__ import annotations

import gzip
import os

import numpy as np

from ulsweep.data.folder import IMAGE_EXTENSIONS, import_image_folder
from ulsweep.data.manifest import DataError
from ulsweep.data.reader import Dataset
from ulsweep.data.writer import write_dataset

__all__ = ["IMAGE_EXTENSIONS", "import_fashion_mnist", "import_image_folder", "read_idx"]

DEFAULT_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"  # Debian: apt-get install dataset-fashion-mnist
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot"]


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
