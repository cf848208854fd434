"""A base trial's final sampling (`ulsweep.train.stage2.generate`: base model, then the diffusion decoder) with
the networks in fp32 against bf16 autocast (`eval.sample_precision`), side by side in one run: images/s, and
how far bf16 moves the samples next to how far another seed moves them.

    python benchmarks/eval_sampling.py experiments/lf_sweep.yaml --samples 10000 --batches 1000 2500 \
        --out benchmarks/results/h200-eval-sampling.json
    python benchmarks/eval_sampling.py --base-ckpt RUN_DIR/trials/ae-0000-small/checkpoints/step_00002500 \
        --samples 10000 --extractor both --out benchmarks/results/h200-eval-sampling-trained.json

Models: with `--base-ckpt` (a base trial's checkpoint directory) its EMA base model and the autoencoder whose
checkpoint it names; otherwise the experiment's AE and first base model, randomly initialized (timing only:
their zero-initialized output layers make every sample the same in either precision).

Per batch size (`--batches`, the most images a sampling call holds, as `eval.sample_batch`) and precision: one
untimed generation of one call (of the size `sampling_calls` gives the timed ones), then `--repeats` timed
generations of `--samples` images, each from the same seed; a row gives the median seconds, images/s and the ratio
to fp32 at that batch size, and the mean and largest |bf16 - fp32| over the images' uint8 levels. With
`--extractor` (and a checkpoint), once at the first batch size: the Frechet distance of each set (fp32, bf16, and
fp32 from another seed) to the first `eval.gfd_reference_images` eval images, and between the sets; the seed row is
the yardstick for the precision's. With `--compile MODE` (a `torch.compile` mode, e.g. `default`), the same rows
again with the base model and the decoder compiled (`compiled: true`; their ratio and differences are still against
the eager fp32 row), and `first_call_s`, the untimed first generation of one batch, which carries the compilation:
the time a trial would pay once per architecture and batch shape (Inductor's caches on the node then serve the
others).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from timing import run_env, sync, write_results  # noqa: E402  (beside this script)

PRECISIONS = ("fp32", "bf16")


def load_models(args, device: torch.device) -> dict:
    """The networks and shapes to sample with (see the module docstring)."""
    from ulsweep.config import experiment_from_dict, load_experiment
    from ulsweep.train.build import build_autoencoder, build_base_model, latent_shape as latent_shape_of
    from ulsweep.train.checkpoint import load_checkpoint
    from ulsweep.train.stage2 import load_frozen_autoencoder

    if args.base_ckpt:
        state, meta = load_checkpoint(args.base_ckpt, map_location=device)
        if meta.get("kind") != "base":
            sys.exit(f"{args.base_ckpt}: is a {meta.get('kind')!r} checkpoint, not a base model's")
        exp = experiment_from_dict(state["experiment"], file=f"{args.base_ckpt} (embedded experiment)")
        base = next(b for b in exp.base_models if b.name == state["config"]["name"])
        ae, ae_exp, ae_meta = load_frozen_autoencoder(meta["ae_checkpoint"], device)
        latent_shape = tuple(meta["latent_shape"])
        net = build_base_model(base, latent_shape[0]).to(device)
        net.load_state_dict(state["ema"])
        image_shape = tuple(ae_meta["image_shape"])
        trained = True
    else:
        exp = ae_exp = load_experiment(args.experiment)
        base = exp.base_models[0]
        torch.manual_seed(0)
        ae = build_autoencoder(exp.ae, args.channels).to(device)
        s = exp.data.image_size
        latent_shape = latent_shape_of(exp)
        net = build_base_model(base, latent_shape[0]).to(device)
        image_shape = (args.channels, s, s)
        trained = False
    return {"exp": exp, "ae": ae.eval().requires_grad_(False), "ae_exp": ae_exp, "base": base,
            "net": net.eval().requires_grad_(False), "latent_shape": latent_shape, "image_shape": image_shape,
            "trained": trained}


def sample(m: dict, precision: str, n: int, batch: int, seed: int, device: torch.device) -> torch.Tensor:
    from ulsweep.train.sampling import sampling_precision
    from ulsweep.train.stage2 import generate

    gen = torch.Generator(device).manual_seed(seed)
    with sampling_precision(precision, device):
        return generate(m["net"], m["ae"], m["ae_exp"], m["base"], n, m["latent_shape"], m["image_shape"], gen,
                        rows=batch)


def timed(m: dict, precision: str, n: int, batch: int, repeats: int, device: torch.device):
    """(seconds of each of `repeats` generations of n images, the images of the last one, seconds of the
    untimed first generation of one batch)."""
    import time

    from ulsweep.train.sampling import sampling_calls

    sync(device)
    t0 = time.perf_counter()
    sample(m, precision, sampling_calls(n, batch)[0], batch, 0, device)  # warm-up: cuDNN, the allocator, compiling
    sync(device)
    first = time.perf_counter() - t0
    secs, images = [], None
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        images = sample(m, precision, n, batch, 0, device)
        sync(device)
        secs.append(time.perf_counter() - t0)
    return secs, images, first


@contextlib.contextmanager
def compiled_networks(m: dict, mode: str | None):
    """While the block runs, the base model and the decoder sample compiled in `mode` (None: eager)."""
    if mode is None:
        yield
        return
    net, decoder = m["net"], m["ae"].decoder
    m["net"], m["ae"].decoder = torch.compile(net, mode=mode), torch.compile(decoder, mode=mode)
    try:
        yield
    finally:
        m["net"], m["ae"].decoder = net, decoder


def frechet_rows(m: dict, sets: dict, extractor: str, device: torch.device) -> list[dict]:
    """FD of each sample set to the reference images, and between the sets, per feature extractor."""
    from ulsweep.config import experiment_from_dict, to_dict
    from ulsweep.data.sources import load_eval_images, open_splits
    from ulsweep.metrics.fid import fd_between, feature_stats, metric_name
    from ulsweep.train.evaluation import EVAL_BATCH, load_eval_extractor
    from ulsweep.train.sampling import to_uint8

    exp = experiment_from_dict(to_dict(m["exp"]), {"eval.extractor": extractor})
    ds = open_splits(exp.data)
    ref = to_uint8(load_eval_images(ds, exp.data, device, exp.eval.gfd_reference_images))
    ext = load_eval_extractor(exp, device)
    rows = []
    for e in (ext if isinstance(ext, tuple) else (ext,)):
        def stats(x):
            return feature_stats(e, (x[i:i + EVAL_BATCH] for i in range(0, len(x), EVAL_BATCH)))

        st = {k: stats(v) for k, v in sets.items()}
        st_ref = stats(ref)
        name = metric_name("g", e)
        row = {"metric": name, "reference_images": len(ref)}
        row |= {f"{k}_vs_reference": fd_between(s, st_ref) for k, s in st.items()}
        row |= {"bf16_vs_fp32": fd_between(st["bf16"], st["fp32"]),
                "fp32_other_seed_vs_fp32": fd_between(st["fp32_other_seed"], st["fp32"])}
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", nargs="?", default="experiments/lf_sweep.yaml",
                    help="experiment whose AE and first base model sample, randomly initialized (without --base-ckpt)")
    ap.add_argument("--base-ckpt", default=None, help="a base trial's checkpoint directory (trained models)")
    ap.add_argument("--channels", type=int, default=1, help="image channels of the randomly initialized models")
    ap.add_argument("--samples", type=int, default=10000)
    ap.add_argument("--batches", type=int, nargs="+", default=[1000])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--extractor", default=None, help="inception, domain or both: FDs of the sample sets")
    ap.add_argument("--compile", default=None, metavar="MODE",
                    help="also time the networks compiled in this torch.compile mode (default, reduce-overhead, ...)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as training runs
    m = load_models(args, device)
    rows, firsts = [], {}
    print(f"{'batch':>6} {'precision':>9} {'compiled':>8} {'median s':>9} {'images/s':>9} {'vs fp32':>8} "
          f"{'mean |d|':>9} {'max |d|':>8} {'first s':>8}")
    variants = [(p, None) for p in PRECISIONS] + ([(p, args.compile) for p in PRECISIONS] if args.compile else [])
    for batch in args.batches:
        by = {}
        for p, mode in variants:
            with compiled_networks(m, mode):
                secs, images, first = timed(m, p, args.samples, batch, args.repeats, device)
            by[p, mode] = (statistics.median(secs), images, first)
            if mode is None:
                firsts.setdefault(p, images)
        s32, im32, _ = by["fp32", None]
        for p, mode in variants:
            s, images, first = by[p, mode]
            d = (images.int() - im32.int()).abs().float()
            row = {"batch": batch, "precision": p, "compiled": mode is not None, "samples": args.samples,
                   "median_s": s, "images_per_s": args.samples / s, "ratio_to_fp32": s32 / s,
                   "mean_abs_uint8_diff": d.mean().item(), "max_abs_uint8_diff": d.max().item(), "first_call_s": first}
            rows.append(row)
            print(f"{batch:>6} {p:>9} {mode or 'no':>8} {s:>9.3f} {row['images_per_s']:>9.0f} "
                  f"{row['ratio_to_fp32']:>7.2f}x {row['mean_abs_uint8_diff']:>9.3f} {row['max_abs_uint8_diff']:>8.0f} "
                  f"{first:>8.2f}")
    fds = []
    if args.extractor:
        if not m["trained"]:
            print("--extractor: skipped, randomly initialized models (no samples worth a distance)")
        else:
            sets = dict(firsts) | {"fp32_other_seed": sample(m, "fp32", args.samples, args.batches[0], 1, device)}
            fds = frechet_rows(m, sets, args.extractor, device)
            for r in fds:
                print(f"{r['metric']}: fp32 {r['fp32_vs_reference']:.3f}, bf16 {r['bf16_vs_reference']:.3f}, "
                      f"fp32 other seed {r['fp32_other_seed_vs_reference']:.3f} (vs reference); "
                      f"bf16 vs fp32 {r['bf16_vs_fp32']:.3f}, other seed vs fp32 {r['fp32_other_seed_vs_fp32']:.3f}")
    env = run_env(args) | {"device": str(device), "trained": m["trained"]}
    write_results(args.out, env, rows + [{"frechet": r} for r in fds])
    return 0


if __name__ == "__main__":
    sys.exit(main())
