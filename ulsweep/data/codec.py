"""Per-image encodings of a dataset's `image` column.

    raw   C*H*W uint8 bytes, row-major (the format's original encoding; what existing datasets hold)
    png   lossless PNG (grayscale for C = 1, RGB for C = 3)
    jpeg  JPEG at a quality setting (4:2:0 chroma as Pillow writes it; lossy)
    webp  WebP at a quality setting (lossy; quality 100 is still lossy, `lossless` is not offered)

`encode_images` and `decode_images` work on whole batches of uint8 (N, C, H, W) arrays; decoding is what a
streaming trial's CPU workers run (`ulsweep.data.stream`), so it returns one contiguous array and checks every
image's shape against the dataset's.
"""
from __future__ import annotations

import io
from typing import Sequence

import numpy as np

ENCODINGS = ("raw", "png", "jpeg", "webp")
LOSSY = ("jpeg", "webp")
_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
_MODES = {1: "L", 3: "RGB"}


class CodecError(ValueError):
    """An image that cannot be encoded or decoded; the message says which row and why."""


def check_encoding(encoding: str, quality: int | None) -> None:
    if encoding not in ENCODINGS:
        raise CodecError(f"unknown image encoding {encoding!r} (one of {', '.join(ENCODINGS)})")
    if encoding in LOSSY:
        if not isinstance(quality, int) or isinstance(quality, bool) or not 1 <= quality <= 100:
            raise CodecError(f"{encoding}: quality must be an integer in 1..100 (got {quality!r})")
    elif quality is not None:
        raise CodecError(f"{encoding}: takes no quality setting (got {quality!r}); only "
                         f"{' and '.join(LOSSY)} are lossy")


def encode_images(images: np.ndarray, encoding: str, quality: int | None = None) -> list[bytes]:
    """uint8 (N, C, H, W) -> one bytes value per image."""
    check_encoding(encoding, quality)
    if images.dtype != np.uint8 or images.ndim != 4:
        raise CodecError(f"expected uint8 (N, C, H, W) images, got {images.dtype} {images.shape}")
    if encoding == "raw":
        return [np.ascontiguousarray(im).tobytes() for im in images]
    C = images.shape[1]
    if C not in _MODES:
        raise CodecError(f"{encoding}: images with {C} channels cannot be encoded (1 or 3)")
    from PIL import Image

    out = []
    for im in images:
        hwc = np.ascontiguousarray(im[0] if C == 1 else im.transpose(1, 2, 0))
        buf = io.BytesIO()
        kw = {"quality": quality} if encoding in LOSSY else {"compress_level": 6}
        Image.fromarray(hwc, _MODES[C]).save(buf, _PIL_FORMAT[encoding], **kw)
        out.append(buf.getvalue())
    return out


def decode_images(values: Sequence[bytes], encoding: str, shape: tuple[int, int, int]) -> np.ndarray:
    """One bytes value per image -> uint8 (N, C, H, W); CodecError naming the row for a bad value."""
    if encoding not in ENCODINGS:
        raise CodecError(f"unknown image encoding {encoding!r} (one of {', '.join(ENCODINGS)})")
    C, H, W = shape
    out = np.empty((len(values), C, H, W), np.uint8)
    if encoding == "raw":
        D = C * H * W
        for i, v in enumerate(values):
            if len(v) != D:
                raise CodecError(f"row {i}: holds {len(v)} bytes, expected C*H*W = {C}*{H}*{W} = {D}")
            out[i] = np.frombuffer(v, np.uint8).reshape(C, H, W)
        return out
    from PIL import Image

    for i, v in enumerate(values):
        try:
            with Image.open(io.BytesIO(v)) as img:
                if img.format != _PIL_FORMAT[encoding]:
                    raise CodecError(f"row {i}: is {img.format}, expected {_PIL_FORMAT[encoding]}")
                arr = np.asarray(img.convert(_MODES[C]) if img.mode != _MODES[C] else img)
        except CodecError:
            raise
        except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, ... for bad bytes
            raise CodecError(f"row {i}: cannot decode {encoding} ({type(e).__name__}: {e})") from e
        if arr.shape[:2] != (H, W):
            raise CodecError(f"row {i}: image is {arr.shape[1]}x{arr.shape[0]}, expected {W}x{H}")
        out[i] = arr[None] if C == 1 else arr.transpose(2, 0, 1)
    return out
