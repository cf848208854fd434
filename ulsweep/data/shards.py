"""One shard's Parquet file in memory: columns `image` (binary, one image per row) and `label` (int64).

Needs only numpy, pyarrow and the codec (no torch), so the import's worker processes start quickly.
"""
from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ulsweep.data.codec import encode_images


def _row_group_rows(n: int, raw_row_bytes: int) -> int:
    """Rows per Parquet row group: ~16 MiB of raw pixels (fewer bytes once encoded)."""
    return max(1, min(n, 2**20 // max(raw_row_bytes, 1) * 16))


def _table_bytes(image: pa.Array, labels: np.ndarray, raw_row_bytes: int, compression: str) -> bytes:
    table = pa.table({"image": image, "label": pa.array(labels, pa.int64())})
    sink = io.BytesIO()
    pq.write_table(table, sink, compression={"image": compression, "label": "zstd"}, use_dictionary=False,
                   write_statistics=["label"], row_group_size=_row_group_rows(len(labels), raw_row_bytes))
    return sink.getvalue()


def encoded_shard_bytes(values: list[bytes], labels: np.ndarray, raw_row_bytes: int) -> bytes:
    """One shard's Parquet file from already encoded images (one PNG/JPEG/WebP file per row) and int64 labels.
    The image column is stored uncompressed: zstd gains next to nothing on compressed images."""
    return _table_bytes(pa.array(values, pa.binary()), labels, raw_row_bytes, "none")


def shard_bytes(images: np.ndarray, labels: np.ndarray, encoding: str = "raw", quality: int | None = None) -> bytes:
    """One shard's Parquet file from uint8 (N, C, H, W) images and int64 (N,) labels."""
    n, D = images.shape[0], int(np.prod(images.shape[1:]))
    if encoding != "raw":
        return encoded_shard_bytes(encode_images(images, encoding, quality), labels, D)
    offsets = np.arange(n + 1, dtype=np.int32) * D
    image = pa.Array.from_buffers(pa.binary(), n, [None, pa.py_buffer(offsets),
                                                   pa.py_buffer(np.ascontiguousarray(images))])
    return _table_bytes(image, labels, D, "zstd")
