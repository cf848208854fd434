"""Datasets: Parquet shards + dataset.json on any fsspec filesystem, built-in small real datasets, importers.

    from ulsweep.data import open_dataset, resolve_dataset, to_model_range
    ds = open_dataset(resolve_dataset("builtin:digits"))
    images, labels = ds.load_split("train")          # uint8 (N, C, H, W), int64 (N,)
    x = to_model_range(images, 16)                   # float32 in [-1, 1]
"""
from ulsweep.data.builtin import resolve_dataset
from ulsweep.data.importers import import_fashion_mnist, import_image_folder
from ulsweep.data.manifest import DataError
from ulsweep.data.model_range import to_model_range
from ulsweep.data.reader import Dataset, open_dataset
from ulsweep.data.writer import write_dataset

__all__ = ["DataError", "Dataset", "open_dataset", "write_dataset", "resolve_dataset", "to_model_range",
           "import_fashion_mnist", "import_image_folder"]
