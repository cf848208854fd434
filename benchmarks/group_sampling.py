"""A stacked group's final-evaluation sampling, member by member against all members at once
(`resources.stack_sampling` each / stacked) and at several `eval.sample_batch` sizes, side by side in one process:
K randomly initialized autoencoders and base models of the experiment (timing only), stacked as a group holds
them, through the library's own `reconstruct_images` (stage 1: `--recon-images` per member) and
`generate_members` (stage 2: `--samples` per member), under the experiment's `eval.sample_precision` and
`eval.sample_compile`.

    python benchmarks/group_sampling.py experiments/lf_sweep.yaml --members 18 --sample-batches 1000 4096 \
        --out benchmarks/results/h200-group-sampling.json

Per mode, sample batch and part: `first_s`, the untimed first call of the size the timed calls have (with
compilation: the time a group pays once per architecture and shape unless precompiled; compiled code is reset
between rows, so each row compiles for itself, from Inductor's caches where an earlier row compiled its shapes),
then the median of `--repeats` timed calls; `size` and `calls`, each member's images a call and the calls
(`sampling_calls`); images/s counts all members' images. `max_abs_uint8_diff`: the largest difference of the
row's images from the first row's of its part and size (rows of another size draw other noise): each gives a
member's run-alone images; stacked differs by the rounding of its grouped kernels.

Then the final evaluations' bits/pixel, which a group takes stacked either way (`bpp_ae`: `latent_bpps`, the
autoencoders' encoder and prior on `--recon-images` images; `bpp_base`: `latent_bitrates` of the base models on
those images' latents; each `ae.train.eval_t_per_image` noise levels an image), with cuDNN's timed algorithm search
off and then on (`cudnn_search`; the trials keep it on, `train.cudnn_benchmark`): `first_s` holds the search of the
shapes new to the process. In session 37's lf_sweep on one H100 the autoencoders' bits/pixel took 13.0 s of their
evaluation, the base models' 3.1 s, for as many images and noise levels.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from timing import run_env, sync, write_results  # noqa: E402  (beside this script)

MODES = ("each", "stacked")


def build_group(exp, k: int, channels: int, device: torch.device) -> tuple:
    """K autoencoders and base models of `exp` (seeds 0..K-1), stacked: (stacked AE, stacked base, latent shape)."""
    from ulsweep.models.stacked import stack
    from ulsweep.train.build import build_autoencoder, build_base_model, latent_shape

    aes, bases = [], []
    for i in range(k):
        torch.manual_seed(i)
        aes.append(build_autoencoder(exp.ae, channels).to(device).eval())
        bases.append(build_base_model(exp.base_models[0], latent_shape(exp)[0]).to(device).eval())
    group = [stack(m).eval().requires_grad_(False) for m in (aes, bases)]
    return group[0], group[1], latent_shape(exp)


def timed(fn, repeats: int, device: torch.device) -> tuple[list[float], object]:
    out, secs = None, []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        out = fn()
        sync(device)
        secs.append(time.perf_counter() - t0)
    return secs, out


def bpp_rows(exp, ae, base_model, x: torch.Tensor, k: int, repeats: int, device: torch.device) -> list[dict]:
    """The `bpp_ae` and `bpp_base` rows (module docstring), cuDNN's search off, then on; the previous setting
    restored."""
    from ulsweep.diffusion import latent_bitrates
    from ulsweep.diffusion.noise import seeded
    from ulsweep.train.build import base_schedule
    from ulsweep.train.stage1 import latent_bpps

    base, t = exp.base_models[0], exp.ae.train.eval_t_per_image
    parts = (("bpp_ae", lambda: latent_bpps(ae, x, exp, seeded(range(k), device), k)),
             ("bpp_base", lambda: latent_bitrates(ae.encoder, base_model, x, base_schedule(exp.ae.loss, base), t,
                                                  generator=seeded(range(k), device), members=k)))
    rows, before = [], torch.backends.cudnn.benchmark
    try:
        for search in (False, True):
            torch.backends.cudnn.benchmark = search
            for part, fn in parts:
                first, _ = timed(fn, 1, device)
                secs, _ = timed(fn, repeats, device)
                med = statistics.median(secs)
                rows.append({"mode": "stacked", "part": part, "cudnn_search": search, "members": k,
                             "images_per_member": len(x), "t_per_image": t, "first_s": first[0], "median_s": med,
                             "seconds": secs, "images_per_s": k * len(x) / med})
                label = f"{part}:{'on' if search else 'off'}"  # the part and cuDNN's search
                print(f"{'stacked':>8} {'-':>6} {label:>12} {k:>7} {'-':>5} {'-':>5} {first[0]:>8.2f} {med:>9.3f} "
                      f"{k * len(x) / med:>9.0f}")
    finally:
        torch.backends.cudnn.benchmark = before
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", nargs="?", default="experiments/lf_sweep.yaml")
    ap.add_argument("--members", type=int, default=18)
    ap.add_argument("--channels", type=int, default=1, help="image channels of the randomly initialized models")
    ap.add_argument("--recon-images", type=int, default=None, help="default: the experiment's ae.train.eval_images")
    ap.add_argument("--samples", type=int, default=None, help="default: the experiment's eval.gfd_samples")
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--sample-batches", type=int, nargs="+", default=None, metavar="N",
                    help="eval.sample_batch values, each a row (default: the experiment's; its default by the "
                         "image size, 4,096 at 32x32)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="experiment overrides")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.members < 2:
        ap.error("--members: a group has at least 2")

    from ulsweep.config import experiment_from_dict, load_experiment, to_dict
    from ulsweep.config.loading import parse_overrides
    from ulsweep.diffusion.noise import seeded
    from ulsweep.train.sampling import sample_rows, sampling_calls, to_uint8
    from ulsweep.train.stage1 import reconstruct_images
    from ulsweep.train.stage2 import generate_members

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as training runs
    base_exp = load_experiment(args.experiment, parse_overrides(args.set))
    args.sample_batches = args.sample_batches or [base_exp.eval.sample_batch]
    k = args.members
    ae, base_model, shape = build_group(base_exp, k, args.channels, device)
    s = base_exp.data.image_size
    image_shape = (args.channels, s, s)
    n_rec = args.recon_images or base_exp.ae.train.eval_images
    n_gen = args.samples or base_exp.eval.gfd_samples
    x = torch.rand(n_rec, *image_shape, generator=torch.Generator().manual_seed(0)).to(device) * 2 - 1
    base = base_exp.base_models[0]
    rows, ref = [], {}
    print(f"{'mode':>8} {'batch':>6} {'part':>12} {'members':>7} {'size':>5} {'calls':>5} {'first s':>8} "
          f"{'median s':>9} {'images/s':>9} {'max |d|':>8}")
    for mode, sample_batch in [(m, b) for m in args.modes for b in args.sample_batches]:
        exp = experiment_from_dict(to_dict(base_exp), {"resources.stack_trials": k, "resources.num_workers": 0,
                                                       "resources.stack_sampling": mode,
                                                       "eval.sample_batch": sample_batch})

        def recon(n: int):
            return to_uint8(reconstruct_images(ae, x[:n], exp, seeded(range(k), device), k)[0])

        def gen(n: int):
            return torch.stack(generate_members(base_model, ae, exp, exp, base, n, shape, image_shape,
                                                seeded(range(k), device), k))

        for part, fn, n in (("reconstruct", recon, n_rec), ("generate", gen, n_gen)):
            torch.compiler.reset()  # this row's shapes compile for this row's first call
            rows_a_call = sample_rows(sample_batch, image_shape)
            size, calls = sampling_calls(n, rows_a_call, 1 if mode == "each" else k)
            first, _ = timed(lambda: fn(size), 1, device)
            secs, images = timed(lambda: fn(n), args.repeats, device)
            same = ref.setdefault((part, size), images)  # the same images a call: the same noise
            diff = (images.int() - same.int()).abs().max().item()
            med = statistics.median(secs)
            row = {"mode": mode, "sample_batch": rows_a_call, "part": part, "members": k, "images_per_member": n,
                   "size": size, "calls": calls, "first_s": first[0], "median_s": med, "seconds": secs,
                   "images_per_s": k * n / med, "max_abs_uint8_diff": diff}
            rows.append(row)
            print(f"{mode:>8} {rows_a_call:>6} {part:>12} {k:>7} {size:>5} {calls:>5} {first[0]:>8.2f} {med:>9.3f} "
                  f"{row['images_per_s']:>9.0f} {diff:>8}")
    rows += bpp_rows(base_exp, ae, base_model, x, k, args.repeats, device)
    env = run_env(args) | {"device": str(device), "sample_precision": base_exp.eval.sample_precision,
                           "sample_compile": base_exp.eval.sample_compile}
    write_results(args.out, env, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
