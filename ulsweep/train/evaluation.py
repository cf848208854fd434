"""Fréchet-distance evaluation inside training runs: which extractor, which cache. The pipelines themselves
are `ulsweep.metrics.fid.reconstruction_fd` / `generation_fd`.

`eval.extractor: domain` trains a small domain classifier once per dataset (keyed by its content hash)
and caches it under `ulsweep.io.cache_dir("extractors")` ($ULSWEEP_CACHE, else ~/.cache/ulsweep, then
extractors/); later runs and concurrent trials reuse it. Reference feature statistics are cached under
`cache_dir("refstats")`. Metric names come from the extractor: rfd_<name>/gfd_<name>, or rfid/gfid for
Inception; `eval.extractor: both` loads the Inception and the domain extractor and reports both; `auto` is
Inception on CUDA and the domain extractor on CPU.
"""
from __future__ import annotations

import collections
import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import torch

from ulsweep import io as uio
from ulsweep.config import ExperimentConfig
from ulsweep.data import open_dataset, resolve_dataset
from ulsweep.metrics.domain import extractor_name_for_dataset, load_domain_extractor, save_domain_extractor
from ulsweep.metrics.domain_training import train_domain_extractor
from ulsweep.metrics.features import FeatureExtractor
from ulsweep.metrics.fid import RefStatsCache, generation_fd, reconstruction_fd, reference_stats
from ulsweep.metrics.inception import load_inception

EVAL_BATCH = 256  # images per extractor call
# a group's members scored at once on a GPU (`scored_in_order`): one member's features leave the GPU idle while its
# host does that member's statistics, reference, distance and PNGs (in session 34's lf_sweep on one H200, ~2.1 s
# a base member one after another, the GPU busy about half of that time)
SCORERS_CUDA = 2
T = TypeVar("T")
SECONDS = "seconds/"  # metrics under it are how long a final evaluation's parts took; the loop moves them
# into the run's timings (evaluate_<part>_s in timings.jsonl, time/evaluate_<part>_s in MLflow)


class PartTimer:
    """Wall seconds of the parts of a final evaluation, the device synchronized at the end of each part (once
    per part: the evaluation ends with a synchronization anyway). `timer("sampling")` is a context; `.seconds`
    holds `seconds/<part>` entries to merge into the evaluation's metrics. A disabled timer times nothing."""

    def __init__(self, device: torch.device | None = None, enabled: bool = True):
        self.device, self.enabled, self.seconds = device, enabled, {}

    @contextlib.contextmanager
    def __call__(self, part: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        t0 = time.perf_counter()
        yield
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        key = SECONDS + part
        self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - t0

    def add(self, other: PartTimer) -> None:
        """Count `other`'s seconds in this timer's, part by part."""
        for key, sec in other.seconds.items():
            self.seconds[key] = self.seconds.get(key, 0.0) + sec


def scored_in_order(score: Callable[[int], T], members: Sequence[int], device: torch.device,
                    scorers: int | None = None) -> Iterator[T]:
    """`score(i)` of each of a group's `members`, yielded in their order as each is done: on a GPU SCORERS_CUDA
    at a time in threads (`scorers` to say otherwise), so that one member's host work overlaps another's
    features, on a CPU one after another (its threads are busy with one member's features already). The first
    member is scored alone, so that the others find the reference statistics it cached (or computed) rather
    than each computing them. Each score computes what it would alone: the extractors keep their arithmetic
    while threads share it (`ulsweep.metrics.features.feature_arithmetic`), and a member's statistics come
    from its own features in their order. A score's error is raised at its member, the scores not yet begun
    are dropped."""
    n = scorers if scorers is not None else (SCORERS_CUDA if device.type == "cuda" else 1)
    members = list(members)
    if n <= 1 or len(members) <= 2:
        for i in members:
            yield score(i)
        return
    yield score(members[0])
    grad = torch.is_grad_enabled()  # thread-local: the caller's in the scoring threads too

    def scored(i: int) -> T:
        with torch.set_grad_enabled(grad):
            return score(i)

    pool = ThreadPoolExecutor(n, thread_name_prefix="ulsweep-score")
    try:
        rest, running = iter(members[1:]), collections.deque()
        for i in rest:
            running.append(pool.submit(scored, i))
            if len(running) == n:
                break
        while running:
            done = running.popleft().result()
            for i in rest:  # the next member starts before this one is handed on
                running.append(pool.submit(scored, i))
                break
            yield done
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def pop_seconds(metrics: dict, phase: str = "evaluate") -> dict[str, float]:
    """Take a timer's `seconds/<part>` entries out of `metrics` (a final evaluation's, or a PartTimer's
    `seconds`): {<phase>_<part>_s: seconds}."""
    return {f"{phase}_{k[len(SECONDS):]}_s": metrics.pop(k) for k in [k for k in metrics if k.startswith(SECONDS)]}


def _domain_extractor_cache(exp: ExperimentConfig):
    """(dataset, extractor name, training split, epochs, cache path) of the experiment's domain extractor."""
    ds = open_dataset(resolve_dataset(exp.data.path))
    name = extractor_name_for_dataset(ds.name)
    epochs, split = exp.eval.extractor_epochs, exp.data.train_split
    path = os.path.join(uio.cache_dir("extractors"), f"{name}-{ds.content_hash[:16]}-{split}-{epochs}ep.pt")
    return ds, name, split, epochs, path


def domain_extractor_path(exp: ExperimentConfig) -> str:
    """Where the domain extractor of the experiment's dataset is cached (`ensure_domain_extractor`). The cache
    key holds what its weights depend on: the dataset's content, the training split and the epochs."""
    return _domain_extractor_cache(exp)[-1]


def ensure_domain_extractor(exp: ExperimentConfig, device: str | torch.device = "cpu") -> str:
    """Path of the cached domain extractor of the experiment's dataset (`domain_extractor_path`); trains it
    first if missing."""
    ds, name, split, epochs, path = _domain_extractor_cache(exp)
    if uio.exists(path):
        return path
    xtr, ytr = ds.load_split(split)
    xte, yte = ds.load_split(exp.data.eval_split)
    print(f"[eval] training domain extractor {name!r} on {ds.name} ({len(xtr)} images, "
          f"{epochs} epochs) -> {path}", file=sys.stderr, flush=True)
    res = train_domain_extractor(xtr, ytr, xte, yte, name=name, epochs=epochs, device=device)
    save_domain_extractor(res.model.cpu(), path, {
        "dataset": exp.data.path, "dataset_name": ds.name, "dataset_hash": ds.content_hash,
        "train_split": split, "test_split": exp.data.eval_split,
        "test_accuracy": res.test_accuracy, "epochs": res.epochs})
    print(f"[eval] domain extractor {name!r}: test accuracy {res.test_accuracy:.4f}", file=sys.stderr, flush=True)
    return path


Extractors = FeatureExtractor | Sequence[FeatureExtractor]


def resolve_auto_extractor(spec: str, device: torch.device) -> str:
    """`auto` -> `inception` on CUDA, `domain` elsewhere (announced on stderr); other values unchanged."""
    if spec != "auto":
        return spec
    if torch.device(device).type == "cuda":
        print("[eval] eval.extractor auto on cuda: the standard FID Inception (metrics rfid/gfid)",
              file=sys.stderr, flush=True)
        return "inception"
    print(f"[eval] eval.extractor auto on {torch.device(device).type}: the dataset's domain extractor "
          "(metrics rfd_<name>/gfd_<name>, not FID: Inception at 299x299 is too slow on CPU; set "
          "eval.extractor: inception to compute FID here anyway)", file=sys.stderr, flush=True)
    return "domain"


def load_eval_extractor(exp: ExperimentConfig, device: torch.device) -> Extractors | None:
    """`eval.extractor` loaded on `device`, computing in `eval.feature_precision`: None (`none`), one extractor,
    or (inception, domain) for `both`."""
    spec = resolve_auto_extractor(exp.eval.extractor, device)
    if spec == "none":
        return None

    def ready(ext: FeatureExtractor) -> FeatureExtractor:
        return ext.to(device).eval().with_precision(exp.eval.feature_precision)

    if spec == "both":
        return (ready(load_inception(exp.eval.inception_weights)),
                ready(load_domain_extractor(ensure_domain_extractor(exp, device), exp.eval.extractor_sha256)))
    if spec == "inception":
        return ready(load_inception(exp.eval.inception_weights))
    path = ensure_domain_extractor(exp, device) if spec == "domain" else spec
    return ready(load_domain_extractor(path, exp.eval.extractor_sha256))


WARM_CALLS = 3  # an extractor's calls at each batch shape before a final evaluation scores (`extractor_ahead`)


def eval_batch_shapes(image_shape: Sequence[int], counts: Sequence[int]) -> list[tuple[int, ...]]:
    """The uint8 batch shapes (N, C, H, W) an extractor is called at when a final evaluation scores `counts`
    images a statistic (reconstructions, generations, their reference images): EVAL_BATCH at a time, then what
    is left of each count."""
    sizes = {min(n, EVAL_BATCH) for n in counts if n > 0} | {n % EVAL_BATCH for n in counts if n % EVAL_BATCH}
    return [(b, *image_shape) for b in sorted(sizes)]


def extractor_ahead(exp: ExperimentConfig, device: torch.device, shapes: Sequence[tuple[int, ...]],
                    references: Sequence[tuple[torch.Tensor, str, str]] = ()) -> Future | Extractors | None:
    """`load_eval_extractor(exp, device)` in a thread of its own, each extractor then called WARM_CALLS times on
    zeros of each of `shapes` (`eval_batch_shapes`) and the statistics of each of `references` (uint8 images,
    their dataset's hash, their split as the scoring names it) read from the reference cache or computed into it,
    as a future: a final evaluation starts it before its parts that need no extractor (bits/pixel, sampling) and
    takes it (`resolve_extractor`) when it first scores, which then finds those statistics cached. The
    extractors' loading and their first calls at a shape then run beside those parts rather than in the first
    member's scoring: TorchScript's profiling executor optimizes a graph at its second call at a shape (a fresh
    FID Inception's first calls at 256 images took 0.17, 1.84 and 0.05 s on one H100, session 38's
    `benchmarks/metrics.py --member-fd`), and in session 37's lf_sweep the first member's scoring took 8.8 s of
    the autoencoders' evaluation against 0.7 s for the last. While those calls run, the features' arithmetic
    holds process-wide (`feature_arithmetic`: cuDNN's heuristics rather than its search), for the evaluation's
    other convolutions too. Where a domain extractor is not yet trained, the extractors are loaded (it trained
    first) in the caller's thread and returned as they are, unwarmed."""
    spec = exp.eval.extractor
    if spec == "none":
        return None
    domain = spec in ("domain", "both") or (spec == "auto" and torch.device(device).type != "cuda")
    if domain and not uio.exists(domain_extractor_path(exp)):
        return load_eval_extractor(exp, device)

    def load_and_warm() -> Extractors | None:
        extractors = load_eval_extractor(exp, device)
        if extractors is not None:
            with torch.no_grad():
                for ext in _each(extractors):
                    for shape in shapes:
                        x = torch.zeros(shape, dtype=torch.uint8, device=device)
                        for _ in range(WARM_CALLS):
                            ext(x)
                    for images, dataset_hash, split in references:
                        reference_stats(ext, images, EVAL_BATCH, RefStatsCache(), dataset_hash, split)
        return extractors

    pool = ThreadPoolExecutor(1, thread_name_prefix="ulsweep-extractor")
    try:
        return pool.submit(load_and_warm)
    finally:
        pool.shutdown(wait=False)


def resolve_extractor(extractor: Future | Extractors | None) -> Extractors | None:
    """The extractors of `extractor_ahead`'s future once loaded and warmed (its error raised here); loaded ones
    and None as they are."""
    return extractor.result() if isinstance(extractor, Future) else extractor


def _each(extractors: Extractors) -> tuple[FeatureExtractor, ...]:
    return (extractors,) if isinstance(extractors, FeatureExtractor) else tuple(extractors)


def reference_split(exp: ExperimentConfig) -> str:
    """The split of a run's Fréchet-distance reference as its cache key names it: the evaluation split at the
    run's image size."""
    return f"{exp.data.eval_split}@{exp.data.image_size}"


def reconstruction_fd_of(extractor: Extractors, real_u8: torch.Tensor, recon_u8: torch.Tensor,
                         dataset_hash: str, split: str) -> dict[str, float]:
    """rFD/rFID (paper §5.2) of `recon_u8`, the reconstructions of `real_u8` (the first images of `split`):
    the reference statistics come from the very images that were reconstructed, cached. One metric per
    extractor."""
    out: dict[str, float] = {}
    for ext in _each(extractor):
        out.update(reconstruction_fd(ext, real_u8, recon_u8, EVAL_BATCH, RefStatsCache(), dataset_hash, split))
    return out


def generation_fd_of(extractor: Extractors, samples_u8: torch.Tensor, ref_u8: torch.Tensor,
                     dataset_hash: str, split: str) -> dict[str, float]:
    """gFD/gFID: base-model samples (decoded) against held-out reference images `ref_u8` (the first images
    of `split`), whose statistics are cached. One metric per extractor."""
    out: dict[str, float] = {}
    for ext in _each(extractor):
        out.update(generation_fd(ext, samples_u8, ref_images_u8=ref_u8, batch_size=EVAL_BATCH,
                                 ref_cache=RefStatsCache(), dataset_hash=dataset_hash, split=split))
    return out
