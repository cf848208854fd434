"""The Parquet dataset format in one import: the manifest (`ulsweep.data.manifest`), reading
(`ulsweep.data.reader`), writing (`ulsweep.data.writer`) and the model-input transform
(`ulsweep.data.model_range`)."""
from __future__ import annotations

from ulsweep.data.manifest import FORMAT, FORMAT_VERSION, MANIFEST, DataError, content_hash, parse_manifest
from ulsweep.data.model_range import to_model_range
from ulsweep.data.reader import Dataset, open_dataset
from ulsweep.data.writer import SHARD_BYTES, write_dataset

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "SHARD_BYTES", "DataError", "Dataset", "content_hash",
           "open_dataset", "parse_manifest", "to_model_range", "write_dataset"]
