"""Size and decode speed of the dataset image encodings (ulsweep.data.codec) on real photos, one core.

    python benchmarks/image_codecs.py [--sizes 32 256] [--images 256] [--out results/cpu-image-codecs.json]

Images are crops of scikit-image's sample photos (random squares, side 1-2x the target) brought to each size
by the importer's own transform (EDM2 center-crop + Lanczos, `ulsweep.data.images`). For each encoding the
table gives bytes per image (mean; raw = C*H*W) and `decode_images` throughput in images/s on this
process's one core (best of 5 windows of 0.4 s), as the shard reader and the streaming pipeline's CPU workers call it.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np
import PIL
import skimage.data
from PIL import Image

from ulsweep.data.codec import decode_images, encode_images
from ulsweep.data.images import prepare

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina")
CODECS = (("raw", None), ("png", None), ("jpeg", 90), ("webp", 90))


def photo_crops(size: int, n: int, seed: int = 0) -> np.ndarray:
    """uint8 (n, 3, size, size): random crops of the sample photos, centre-cropped and resized."""
    rng = np.random.default_rng(seed)
    photos = [getattr(skimage.data, name)() for name in PHOTOS]
    out = np.empty((n, 3, size, size), np.uint8)
    for i in range(n):
        p = photos[i % len(photos)]
        h, w = p.shape[:2]
        side = int(min(rng.integers(size, 2 * size + 1), h, w))
        ch, cw = side, int(min(w, side * rng.uniform(1.0, 1.4)))  # a little non-square
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        out[i] = prepare(Image.fromarray(p[y:y + ch, x:x + cw]), size, 3)[0]
    return out


def decode_rate(values: list[bytes], encoding: str, shape, windows: int = 5, seconds: float = 0.4) -> float:
    """Images decoded per second by `decode_images`: the best of `windows` timed windows (the least
    disturbed by other processes on a shared machine)."""
    decode_images(values[:4], encoding, shape)  # warm-up: Pillow plugin imports
    best = 0.0
    for _ in range(windows):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            decode_images(values, encoding, shape)
            n += len(values)
        best = max(best, n / (time.perf_counter() - t0))
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[32, 256])
    ap.add_argument("--images", type=int, default=256, help="images per size")
    ap.add_argument("--out", help="write the rows as JSON here")
    args = ap.parse_args()
    rows = []
    print(f"{'size':>5} {'encoding':>9} {'bytes/img':>10} {'x raw':>7} {'decode img/s':>13}")
    for size in args.sizes:
        x = photo_crops(size, args.images)
        raw = 3 * size * size
        for enc, q in CODECS:
            values = encode_images(x, enc, q)
            mean = float(np.mean([len(v) for v in values]))
            rate = decode_rate(values, enc, (3, size, size))
            name = enc + (f" q{q}" if q else "")
            rows.append({"size": size, "encoding": enc, "quality": q, "bytes_per_image": mean,
                         "ratio_to_raw": mean / raw, "decode_images_per_s": rate})
            print(f"{size:>5} {name:>9} {mean:>10.0f} {mean / raw:>7.3f} {rate:>13.0f}")
    if args.out:
        meta = {"python": platform.python_version(), "pillow": PIL.__version__, "cpu": platform.processor(),
                "images_per_size": args.images, "threads": 1}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
