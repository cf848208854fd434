"""Metrics: PSNR, Fréchet distances (rFID/gFID, rfd_<x>/gfd_<x>) with offline feature extractors, FLOPs."""
from .extractors import (INCEPTION_SHA256, INCEPTION_WEIGHTS_ENV, DomainCNN, ExtractorError, FeatureExtractor,
                         InceptionExtractor, MissingWeightsError, WeightsHashError, extractor_name_for_dataset,
                         load_domain_extractor, load_extractor, load_inception,
                         save_domain_extractor, train_domain_extractor)
from .fid import (FeatureStats, RefKey, RefStatsCache, StatsAccumulator, feature_stats, frechet_distance,
                  generation_fd, metric_name, reconstruction_fd, reference_stats, stats_from_features)
from .flops import count_forward, forward_flops, gflops_per_image, model_gflops, training_flops
from .psnr import psnr

__all__ = [
    "psnr", "frechet_distance", "FeatureStats", "StatsAccumulator", "stats_from_features", "feature_stats",
    "RefKey", "RefStatsCache", "reference_stats", "reconstruction_fd", "generation_fd", "metric_name",
    "FeatureExtractor", "InceptionExtractor", "DomainCNN", "load_inception",
    "load_domain_extractor", "save_domain_extractor", "train_domain_extractor", "load_extractor",
    "extractor_name_for_dataset", "ExtractorError", "MissingWeightsError", "WeightsHashError",
    "INCEPTION_SHA256", "INCEPTION_WEIGHTS_ENV",
    "forward_flops", "count_forward", "gflops_per_image", "training_flops", "model_gflops",
]
