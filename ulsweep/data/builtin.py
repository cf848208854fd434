"""Small real datasets that need no download: `builtin:digits`, `builtin:photos`, `builtin:fashion-mnist`.

- digits: scikit-learn's `load_digits` (1,797 8x8 handwritten digits, values 0..16) scaled to 0..255
  (round(v * 255 / 16)) and upscaled 2x to 16x16 by nearest neighbour (pixel repetition), 1 channel.
  Split stratified by digit with a fixed seed: 1,497 train / 300 test.
- photos: 32x32 RGB crops of the colour photos shipped by scikit-learn (china, flower) and scikit-image
  (astronaut, coffee, chelsea, rocket, hubble_deep_field, immunohistochemistry). Each crop is a random
  square of side 32*f (f in 1..4, offsets on the f-grid) area-downsampled by f. Test crops come from a held-out region of every
  photo (its right-most quarter of columns); train crops lie entirely in the other three quarters, so no
  test pixel is ever seen in training. 4,096 train / 512 test; label = photo index.
- fashion-mnist: the Debian package `dataset-fashion-mnist` (/usr/share/datasets/fashion-mnist).

Each is materialised once into a cache directory (built in a temporary sibling, then renamed), so
concurrent processes race harmlessly.
"""
from __future__ import annotations

import os
import shutil
import uuid
from typing import Callable

import numpy as np

from ulsweep import io as uio
from ulsweep.data.manifest import MANIFEST, DataError
from ulsweep.data.reader import open_dataset

# Bump a builder's version when its output changes; caches of older versions are then ignored.
BUILTIN_VERSIONS = {"digits": 1, "photos": 2, "fashion-mnist": 1}
SEED = 0

PHOTOS = ("china", "flower", "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field",
          "immunohistochemistry")


def stratified_split(labels: np.ndarray, n_test: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test), each sorted, with `n_test` test items spread over classes in proportion.

    Per-class quotas are n_c * n_test / N rounded by largest remainder, so they sum to `n_test` exactly.
    """
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * n_test / len(labels)
    quota = np.floor(exact).astype(int)
    rest = n_test - quota.sum()
    quota[np.argsort(-(exact - quota), kind="stable")[:rest]] += 1
    test = [rng.permutation(np.flatnonzero(labels == c))[:q] for c, q in zip(classes, quota)]
    test = np.sort(np.concatenate(test)) if test else np.zeros(0, int)
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


# ----------------------------------------------------------------------------------------------
# Builders: each returns (splits, label_names, source) for write_dataset


def digits_arrays(n_test: int = 300, seed: int = SEED):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.rint(d.images * (255.0 / 16.0)).astype(np.uint8)  # (N, 8, 8) in 0..255
    x = x.repeat(2, axis=1).repeat(2, axis=2)[:, None]  # (N, 1, 16, 16), nearest-neighbour 2x
    y = d.target.astype(np.int64)
    train, test = stratified_split(y, n_test, seed)
    splits = {"train": (x[train], y[train]), "test": (x[test], y[test])}
    source = {"builder": "builtin:digits", "from": "sklearn.datasets.load_digits", "upscale": "nearest 2x",
              "test": f"{n_test} stratified, seed {seed}"}
    return splits, [str(i) for i in range(10)], source


def _load_photo(name: str) -> np.ndarray:
    """(H, W, 3) uint8."""
    if name in ("china", "flower"):
        from sklearn.datasets import load_sample_image
        return np.asarray(load_sample_image(f"{name}.jpg"), dtype=np.uint8)
    import skimage.data
    return np.asarray(getattr(skimage.data, name)(), dtype=np.uint8)[..., :3]


def _pooled(img: np.ndarray, f: int) -> np.ndarray:
    """Area downsampling by f (exact integer sums, then rounded): (H, W, 3) -> (H // f, W // f, 3) uint8."""
    if f == 1:
        return img
    h, w = img.shape[0] // f, img.shape[1] // f
    sums = img[:h * f, :w * f].reshape(h, f, w, f, 3).sum(axis=(1, 3), dtype=np.uint32)
    return np.rint(sums / (f * f)).astype(np.uint8)


def _crops(pooled: dict[int, np.ndarray], n: int, col0: int, col1: int, rng: np.random.Generator) -> np.ndarray:
    """n random 32x32 crops: each is a 32f x 32f square (f in 1..4, offsets on the f-grid) lying inside
    columns [col0, col1) of the photo, area-downsampled by f (`pooled[f]`). Returns (n, 3, 32, 32) uint8."""
    H = pooled[1].shape[0]
    factors = np.array([f for f in sorted(pooled) if 32 * f <= min(H, col1 - col0)])
    f_of = rng.choice(factors, size=n)
    out = np.empty((n, 32, 32, 3), np.uint8)
    ar = np.arange(32)
    for f in factors:
        idx = np.flatnonzero(f_of == f)
        lo, hi = -(-col0 // f), col1 // f - 32  # pooled columns [lo, hi + 32) lie inside [col0, col1)
        tops = rng.integers(0, pooled[f].shape[0] - 32 + 1, size=idx.size)
        lefts = rng.integers(lo, hi + 1, size=idx.size)
        out[idx] = pooled[f][(tops[:, None] + ar)[:, :, None], (lefts[:, None] + ar)[:, None, :]]
    return out.transpose(0, 3, 1, 2)


def photos_arrays(n_train: int = 4096, n_test: int = 512, seed: int = SEED):
    rng = np.random.default_rng(seed)
    per_train, per_test = n_train // len(PHOTOS), n_test // len(PHOTOS)
    xs = {"train": [], "test": []}
    ys = {"train": [], "test": []}
    for label, name in enumerate(PHOTOS):
        img = _load_photo(name)
        pooled = {f: _pooled(img, f) for f in (1, 2, 3, 4)}
        W = img.shape[1]
        cut = W - W // 4  # columns [cut, W) are held out for test
        xs["train"].append(_crops(pooled, per_train, 0, cut, rng))
        xs["test"].append(_crops(pooled, per_test, cut, W, rng))
        ys["train"].append(np.full(per_train, label, np.int64))
        ys["test"].append(np.full(per_test, label, np.int64))
    splits = {s: (np.concatenate(xs[s]), np.concatenate(ys[s])) for s in ("train", "test")}
    source = {"builder": "builtin:photos", "photos": list(PHOTOS), "seed": seed,
              "crops": "32f x 32f (f in 1..4) area-downsampled to 32x32",
              "test": "held-out region: right-most quarter of each photo's columns"}
    return splits, list(PHOTOS), source


def _build_fashion_mnist(out: str, overwrite: bool = False) -> None:
    from ulsweep.data.importers import DEFAULT_FASHION_MNIST, import_fashion_mnist
    import_fashion_mnist(os.environ.get("ULSWEEP_FASHION_MNIST_SRC", DEFAULT_FASHION_MNIST), out,
                         overwrite=overwrite)


def _writer(name: str, arrays: Callable) -> Callable[..., None]:
    def build(out: str, overwrite: bool = False) -> None:
        from ulsweep.data.writer import write_dataset  # torch: only where a dataset is written

        splits, label_names, source = arrays()
        write_dataset(out, name, splits, label_names=label_names, source=source, overwrite=overwrite)
    return build


BUILDERS: dict[str, Callable[..., None]] = {
    "digits": _writer("digits", digits_arrays),
    "photos": _writer("photos", photos_arrays),
    "fashion-mnist": _build_fashion_mnist,
}


# ----------------------------------------------------------------------------------------------
# Resolution


_UNKNOWN = f"unknown builtin dataset; available: {', '.join('builtin:' + n for n in BUILDERS)}"


def _unknown(spec: str) -> DataError:
    return DataError(f"{spec}: {_UNKNOWN}")


def resolve_dataset(spec: str, cache_dir: str | None = None) -> str:
    """`builtin:NAME` -> path of the materialised dataset (built on first use); any other spec unchanged.

    The cache lives under `cache_dir`, else `ulsweep.io.cache_dir("datasets")` ($ULSWEEP_CACHE/datasets,
    else ~/.cache/ulsweep/datasets; local paths).
    """
    if not spec.startswith("builtin:"):
        return spec
    name = spec.removeprefix("builtin:")
    if name not in BUILDERS:
        raise _unknown(spec)
    cache = cache_dir or uio.cache_dir("datasets")
    final = os.path.join(cache, f"{name}-v{BUILTIN_VERSIONS[name]}")
    try:
        open_dataset(final)
        return final
    except DataError:
        pass
    if os.path.exists(final):  # another process may have just renamed a valid one into place
        try:
            open_dataset(final)
            return final
        except DataError:  # invalid leftover (damaged by hand, or an old layout): move aside and rebuild
            junk = os.path.join(cache, f".{name}-stale-{uuid.uuid4().hex}")
            try:
                os.rename(final, junk)
                shutil.rmtree(junk, ignore_errors=True)
            except OSError:
                pass
    os.makedirs(cache, exist_ok=True)
    tmp = os.path.join(cache, f".{name}-v{BUILTIN_VERSIONS[name]}.tmp-{uuid.uuid4().hex}")
    try:
        BUILDERS[name](tmp)
        try:
            os.rename(tmp, final)  # atomic; fails if another process finished first
        except OSError:
            open_dataset(final)  # theirs must be valid, else re-raise below
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    open_dataset(final)
    return final


def data_path_problem(spec: str) -> str | None:
    """Why `spec` (a data.path) names no dataset, or None; cheap (no data is read or built)."""
    if spec.startswith("builtin:"):
        if spec.removeprefix("builtin:") in BUILDERS:
            return None
        return _UNKNOWN
    try:
        fs, root = uio.filesystem(spec)
        if not fs.exists(root):
            return "no such dataset directory"
        if not fs.exists(f"{root.rstrip('/')}/{MANIFEST}"):
            return f"not a dataset directory (no {MANIFEST}; see `ulsweep data import --help`)"
    except Exception as e:  # unknown protocol, missing credentials, unreachable bucket
        return f"cannot open ({type(e).__name__}: {e})"
    return None


def materialise(name: str, out: str, overwrite: bool = False) -> str:
    """Build builtin `name` directly at `out` (any fsspec URI), not in the cache."""
    name = name.removeprefix("builtin:")
    if name not in BUILDERS:
        raise _unknown(f"builtin:{name}")
    BUILDERS[name](out, overwrite=overwrite)
    return out
