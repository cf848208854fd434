"""Training-step throughput of stage 1 (encoder + prior + decoder) and stage 2 (base model).

    python benchmarks/train_step.py --preset small --image-size 32 --channels 1 --batch 128 256 --out small.json
    python benchmarks/train_step.py --preset paper --image-size 512 --channels 3 --downsample 16 \
        --latent-channels 32 --batch 8 --compile both --out paper.json

For each (stage, batch, eager|compiled) it times full optimizer steps of the library's own loss and
step functions (`stage1_losses`, `TrainState.optimizer_step`) on synthetic data already on the device, and
reports images/s, MFU and peak memory. Model FLOPs come from ulsweep's FLOP counter (forward GFLOP per
image x 3 for training, the paper's rule); MFU is against the dense bf16 peak `--peak-tflops` (989 for
H100/H200 SXM). Prints a table and writes JSON. Absolute numbers are only meaningful on a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from timing import time_calls  # noqa: E402  (benchmarks/timing.py, beside this script)

from ulsweep.config import experiment_from_dict  # noqa: E402
from ulsweep.diffusion import base_loss, diffuse, low_discrepancy_times, x_from_v  # noqa: E402
from ulsweep.metrics.flops import gflops_per_image, model_gflops  # noqa: E402
from ulsweep.models import build_autoencoder, build_base_model  # noqa: E402
from ulsweep.train.common import TrainState, make_runtime  # noqa: E402
from ulsweep.train.stage1 import draw_noise, stage1_losses  # noqa: E402


def bench_stage1(exp, batch: int, compile_: bool, warmup: int, iters: int, channels: int):
    rt = make_runtime(exp.ae.train)
    s = exp.data.image_size
    ae = build_autoencoder(exp.ae, channels).to(rt.device)
    if rt.device.type == "cuda":
        ae = ae.to(memory_format=torch.channels_last)
    ts = TrainState(ae, exp.ae.optim, rt, seed=0)
    model = torch.compile(ae) if compile_ else ae
    d = exp.ae.model.downsample
    z_shape = (exp.ae.model.latent_channels, s // d, s // d)
    x = torch.rand(batch, channels, s, s, device=rt.device) * 2 - 1

    def step():
        noise = draw_noise(batch, z_shape, (channels, s, s), ts.gen, rt.device)
        with rt.autocast():
            losses = stage1_losses(model, x, exp, noise)
        ts.optimizer_step(losses["total"].mean() / x[0].numel())

    g = model_gflops(exp, channels)
    fwd = g["encoder"] + g.get("prior", 0.0) + g["decoder"]
    return time_calls(step, rt.device, warmup, iters), fwd, rt


def bench_stage2(exp, batch: int, compile_: bool, warmup: int, iters: int):
    rt = make_runtime(exp.ae.train)
    s, d = exp.data.image_size, exp.ae.model.downsample
    shape = (exp.ae.model.latent_channels, s // d, s // d)
    net = build_base_model(exp.base_models[0], shape[0]).to(rt.device)
    ts = TrainState(net, exp.base_models[0].optim, rt, seed=0)
    model = torch.compile(net) if compile_ else net
    z = torch.randn(batch, *shape, device=rt.device)
    lam_max, lam_min = exp.ae.loss.logsnr_z0, exp.base_models[0].loss.logsnr_min
    from ulsweep.diffusion import LogSNRSchedule

    sched = LogSNRSchedule("cosine", lam_max, lam_min)

    def step():
        t = low_discrepancy_times(batch, ts.gen, rt.device)
        eps = torch.randn(z.shape, generator=ts.gen, device=rt.device)
        lam, dlam = sched.logsnr(t), sched.dlogsnr_dt(t)
        z_t = diffuse(z, lam, eps)
        with rt.autocast():
            v = model(z_t, lam)
        ts.optimizer_step(base_loss(z, x_from_v(z_t, v.float(), lam), lam, dlam, 0.0).mean() / z[0].numel())

    fwd = gflops_per_image(build_base_model(exp.base_models[0], shape[0]), torch.zeros(2, *shape), torch.zeros(2))
    return time_calls(step, rt.device, warmup, iters), fwd, rt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--base-preset", default=None, help="default: same as --preset (tiny/small/medium/paper)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--downsample", type=int, default=4)
    p.add_argument("--latent-channels", type=int, default=8)
    p.add_argument("--batch", type=int, nargs="+", default=[128])
    p.add_argument("--compile", choices=["no", "yes", "both"], default="both")
    p.add_argument("--stages", nargs="+", default=["ae", "base"], choices=["ae", "base"])
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    exp = experiment_from_dict({
        "data": {"image_size": a.image_size},
        "ae": {"model": {"preset": a.preset, "downsample": a.downsample, "latent_channels": a.latent_channels}},
        "base_models": [{"name": "b", "model": {"preset": a.base_preset or a.preset}}],
    })
    modes = {"no": [False], "yes": [True], "both": [False, True]}[a.compile]
    rows = []
    print(f"{'stage':6} {'batch':>5} {'compile':>7} {'step ms':>9} {'img/s':>10} {'GFLOP/img':>10} {'MFU':>7} {'mem GiB':>8}",
          flush=True)
    for stage in a.stages:
        for batch in a.batch:
            for comp in modes:
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                try:
                    if stage == "ae":
                        times, fwd, rt = bench_stage1(exp, batch, comp, a.warmup, a.iters, a.channels)
                    else:
                        times, fwd, rt = bench_stage2(exp, batch, comp, a.warmup, a.iters)
                except torch.OutOfMemoryError:
                    rows.append({"stage": stage, "batch": batch, "compile": comp, "error": "out of memory"})
                    print(f"{stage:6} {batch:>5} {str(comp):>7}  out of memory", flush=True)
                    continue
                t = statistics.median(times)
                ips = batch / t
                mfu = 3 * fwd * 1e9 * ips / (a.peak_tflops * 1e12)
                mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
                rows.append({"stage": stage, "batch": batch, "compile": comp, "step_s": t, "images_per_s": ips,
                             "fwd_gflop_per_image": fwd, "mfu": mfu, "peak_mem_gib": mem,
                             "device": str(rt.device), "amp": str(rt.amp_dtype)})
                print(f"{stage:6} {batch:>5} {str(comp):>7} {1e3 * t:>9.2f} {ips:>10.0f} {fwd:>10.3f} "
                      f"{100 * mfu:>6.2f}% {mem:>8.2f}", flush=True)
    env = {"torch": torch.__version__, "python": platform.python_version(),
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "args": vars(a)}
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"env": env, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
