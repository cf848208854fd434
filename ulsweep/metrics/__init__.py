"""Metrics: PSNR, Fréchet distances (rFID/gFID, rfd_<x>/gfd_<x>) with offline feature extractors, FLOPs.

The names below load their module (and torch) when first used: `ulsweep`'s command line registers `ulsweep fid`
and `ulsweep features` from `ulsweep.metrics.cli`, which every command imports, and `ulsweep run` needs no torch
in its process (ulsweep/sweep/driver.py)."""
from __future__ import annotations

import importlib

# bound here, not lazily: importing the submodule `psnr` would set the package's attribute `psnr` to it
from .psnr import psnr

_WHERE = {
    "psnr": "psnr",
    **dict.fromkeys(["frechet_distance", "FeatureStats", "StatsAccumulator", "stats_from_features", "feature_stats",
                     "RefKey", "RefStatsCache", "reference_stats", "reconstruction_fd", "generation_fd",
                     "metric_name"], "fid"),
    **dict.fromkeys(["FeatureExtractor", "InceptionExtractor", "DomainCNN", "load_inception", "load_domain_extractor",
                     "save_domain_extractor", "train_domain_extractor", "load_extractor",
                     "extractor_name_for_dataset", "ExtractorError", "MissingWeightsError", "WeightsHashError",
                     "INCEPTION_SHA256", "INCEPTION_WEIGHTS_ENV"], "extractors"),
    **dict.fromkeys(["forward_flops", "count_forward", "gflops_per_image", "training_flops", "model_gflops"],
                    "flops"),
}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
