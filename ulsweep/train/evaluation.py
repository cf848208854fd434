"""Fréchet-distance evaluation inside training runs: which extractor, and rFD / gFD from images.

`eval.extractor: auto` trains a small domain classifier once per dataset (keyed by its content hash)
and caches it under $ULSWEEP_CACHE (or ~/.cache/ulsweep)/extractors; later runs and concurrent trials
reuse it. Metric names come from the extractor: rfd_<name>/gfd_<name>, or rfid/gfid for Inception.
"""
from __future__ import annotations

import os
import sys

import torch

from ulsweep import io as uio
from ulsweep.config import ExperimentConfig
from ulsweep.data import open_dataset, resolve_dataset
from ulsweep.metrics.extractors import (FeatureExtractor, extractor_name_for_dataset, load_domain_extractor,
                                        load_inception, save_domain_extractor, train_domain_extractor)
from ulsweep.metrics.fid import RefStatsCache, fd_between, feature_stats, metric_name, reference_stats


def cache_root() -> str:
    return os.environ.get("ULSWEEP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "ulsweep")


def ensure_domain_extractor(exp: ExperimentConfig, device: str | torch.device = "cpu") -> str:
    """Path of the cached domain extractor of the experiment's dataset; trains it first if missing."""
    ds = open_dataset(resolve_dataset(exp.data.path))
    name = extractor_name_for_dataset(ds.name)
    path = os.path.join(cache_root(), "extractors", f"{name}-{ds.content_hash[:16]}.pt")
    if uio.exists(path):
        return path
    xtr, ytr = ds.load_split(exp.data.train_split)
    xte, yte = ds.load_split(exp.data.eval_split)
    print(f"[eval] training domain extractor {name!r} on {ds.name} ({len(xtr)} images, "
          f"{exp.eval.extractor_epochs} epochs) -> {path}", file=sys.stderr, flush=True)
    res = train_domain_extractor(xtr, ytr, xte, yte, name=name, epochs=exp.eval.extractor_epochs, device=device)
    save_domain_extractor(res.model.cpu(), path, {
        "dataset": exp.data.path, "dataset_name": ds.name, "dataset_hash": ds.content_hash,
        "train_split": exp.data.train_split, "test_split": exp.data.eval_split,
        "test_accuracy": res.test_accuracy, "epochs": res.epochs})
    print(f"[eval] domain extractor {name!r}: test accuracy {res.test_accuracy:.4f}", file=sys.stderr, flush=True)
    return path


def load_eval_extractor(exp: ExperimentConfig, device: torch.device) -> FeatureExtractor | None:
    spec = exp.eval.extractor
    if spec == "none":
        return None
    if spec == "inception":
        ext = load_inception(exp.eval.inception_weights)
    else:
        path = ensure_domain_extractor(exp, device) if spec == "auto" else spec
        ext = load_domain_extractor(path, exp.eval.extractor_sha256)
    return ext.to(device).eval()


@torch.no_grad()
def reconstruction_fd_of(extractor: FeatureExtractor, real_u8: torch.Tensor, recon_u8: torch.Tensor,
                         dataset_hash: str, split: str) -> dict[str, float]:
    """rFD/rFID (paper §5.2): the reference statistics come from the same images that were reconstructed."""
    cache = RefStatsCache(os.path.join(cache_root(), "refstats"))
    ref = reference_stats(extractor, real_u8, 256, cache, dataset_hash, split)
    fake = feature_stats(extractor, recon_u8.split(256))
    return {metric_name("r", extractor): fd_between(ref, fake)}


@torch.no_grad()
def generation_fd_of(extractor: FeatureExtractor, samples_u8: torch.Tensor, ref_u8: torch.Tensor,
                     dataset_hash: str, split: str) -> dict[str, float]:
    """gFD/gFID: base-model samples (decoded) against held-out reference images."""
    cache = RefStatsCache(os.path.join(cache_root(), "refstats"))
    ref = reference_stats(extractor, ref_u8, 256, cache, dataset_hash, split)
    return {metric_name("g", extractor): fd_between(ref, feature_stats(extractor, samples_u8.split(256)))}
