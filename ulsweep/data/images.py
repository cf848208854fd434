"""One source image file -> one dataset image: mode conversion, then EDM2's `center-crop` transform.

    img = open_image(fs, path)                          # fully decoded; raises for unreadable/truncated files
    pixels, kind = prepare(img, image_size=64, channels=3)   # uint8 (C, 64, 64), e.g. "RGBA -> RGB (...)"

Crop and resize follow EDM2's `dataset_tool.py convert --transform=center-crop` (NVlabs/edm2): take the
largest centred square (side s = min(H, W), rows (H - s) // 2 .. (H + s) // 2 and the same for columns, so an
odd excess leaves the extra row/column at the bottom/right), then resize it to N x N with Pillow's Lanczos
filter (a resize to the size the crop already has is a copy). Two steps come first that EDM2 does not take:
the EXIF orientation tag is applied (a phone photo stored sideways is imported upright), and the image is
brought to the dataset's channels as below instead of EDM2's plain `convert('RGB')`:

    L                       unchanged for 1 channel; grey replicated to R = G = B for 3
    1 (bilevel)             0/1 -> 0/255
    I;16*, I (16-bit grey)  scaled to 8 bits: round(v * 255 / 65535), values outside 0..65535 clipped
    F (float grey)          clipped to 0..255 and rounded (Pillow's F -> L)
    LA, RGBA, PA, P or L with a transparent colour
                            composited over black (alpha 0 -> black, the model's -1 background), then as RGB/L
    P (palette)             looked up in the palette
    RGB, CMYK, YCbCr, ...   Pillow's conversion to RGB (CMYK without an ICC profile: naive); for 1 channel then
                            ITU-R 601-2 luma L = (299 R + 587 G + 114 B) / 1000 (exact for grey pixels)

`prepare` returns a short description of what it did (`kind`), which the importer counts by kind.
`is_colour` says from the header alone (no pixel decoding) whether an image has colour, which decides a
dataset's channels when none are given: 3 when any image does, else 1.
"""
from __future__ import annotations

import numpy as np

_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
_ALPHA = ("LA", "La", "RGBA", "RGBa", "PA")
_GREY = ("1", "L", "LA", "La", "F") + _SIXTEEN_BIT


def open_image(fs, path: str):
    """The image at `path` on fsspec filesystem `fs`, decoded in full (first frame of an animation), with
    its EXIF orientation applied. Raises whatever Pillow raises for a file it cannot read
    (UnidentifiedImageError, OSError 'image file is truncated', DecompressionBombError, SyntaxError, ...)."""
    from PIL import Image, ImageOps

    with fs.open(path, "rb") as f:
        img = Image.open(f)
        img.load()
    return ImageOps.exif_transpose(img)  # keeps the mode


def is_colour(img) -> bool:
    """Whether an opened (not necessarily decoded) image has colour: a colour mode, or a palette with any
    entry whose R, G, B differ. Reads the header only."""
    if img.mode in ("P", "PA"):
        pal = img.getpalette("RGB") or []
        rgb = np.asarray(pal, np.int64).reshape(-1, 3)
        return bool(((rgb[:, 0] != rgb[:, 1]) | (rgb[:, 1] != rgb[:, 2])).any())
    return img.mode not in _GREY


def _over_black(img):
    """Composite an image with alpha (or a transparent colour) over opaque black; returns RGB."""
    from PIL import Image

    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba).convert("RGB")


def to_channels(img, channels: int):
    """(image in mode L for `channels` = 1 or RGB for 3, description of the conversion)."""
    from PIL import Image

    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3 (got {channels!r})")
    src = img.mode
    target = "L" if channels == 1 else "RGB"
    notes = []
    if img.mode in _SIXTEEN_BIT:
        a = np.asarray(img, np.float64)
        img = Image.fromarray(np.clip(np.rint(a * (255.0 / 65535.0)), 0, 255).astype(np.uint8), "L")
        notes.append("16-bit scaled to 8-bit")
    elif img.mode == "F":
        img = img.convert("L")
        notes.append("float clipped to 0..255")
    elif img.mode == "1":
        img = img.convert("L")
        notes.append("bilevel to 0/255")
    if img.mode in _ALPHA or "transparency" in img.info:
        img = _over_black(img)
        notes.append("alpha composited over black")
    elif img.mode == "P":
        img = img.convert("RGB")
        notes.append("palette looked up")
    if img.mode not in ("L", "RGB"):
        notes.append(f"Pillow {img.mode} -> RGB")
        img = img.convert("RGB")
    if img.mode != target:
        notes.append("luma" if target == "L" else "grey replicated")
        img = img.convert(target)
    kind = f"{src} -> {target}" + (f" ({', '.join(notes)})" if notes else " (unchanged)")
    return img, kind


def center_crop(img, image_size: int):
    """EDM2's `center-crop`: the largest centred square, resized to image_size x image_size with Lanczos."""
    from PIL import Image

    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s)).resize((image_size, image_size), Image.Resampling.LANCZOS)


def prepare(img, image_size: int, channels: int) -> tuple[np.ndarray, str]:
    """uint8 (channels, image_size, image_size) pixels of an opened image, and what `to_channels` did."""
    img, kind = to_channels(img, channels)
    a = np.asarray(center_crop(img, image_size), dtype=np.uint8)
    return (a[None] if a.ndim == 2 else a.transpose(2, 0, 1)), kind
