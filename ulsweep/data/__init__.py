"""Datasets: Parquet shards + dataset.json on any fsspec filesystem, built-in small real datasets, importers.

    from ulsweep.data import open_dataset, resolve_dataset, to_model_range
    ds = open_dataset(resolve_dataset("builtin:digits"))
    images, labels = ds.load_split("train")          # uint8 (N, C, H, W), int64 (N,)
    x = to_model_range(images, 16)                   # float32 in [-1, 1]

The names below are imported on first use, so a process that needs only a torch-free part (the codec, the
folder importer's workers) does not pay for importing torch.
"""
from importlib import import_module

_WHERE = {"DataError": "manifest", "Dataset": "reader", "open_dataset": "reader", "write_dataset": "writer",
          "resolve_dataset": "builtin", "to_model_range": "model_range",
          "import_fashion_mnist": "importers", "import_image_folder": "folder"}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
