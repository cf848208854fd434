"""Training-step throughput of stage 1 (encoder + prior + decoder), the prior alone and stage 2 (base model).

    python benchmarks/train_step.py --preset small --image-size 32 --channels 1 --batch 128 256 --out small.json
    python benchmarks/train_step.py --preset paper --image-size 512 --channels 3 --downsample 16 \
        --latent-channels 32 --stages prior base ae --batch 8 32 --modes eager default --profile --out paper.json

For each (stage, batch, mode) it times full optimizer steps of the library's own loss and step functions
(`AEObjective`, `prior_loss`, `base_loss`, `TrainState.optimizer_step`) on synthetic data already on the
device, compiled by the library's `compile_module` (modes: eager, default, reduce-overhead = CUDA graphs,
max-autotune = Inductor's GEMM/conv autotuning and epilogue fusion without CUDA graphs),
and reports images/s, MFU and peak memory. Model FLOPs come from ulsweep's FLOP counter (forward GFLOP per
image x 3 for training, the paper's rule); MFU is against the dense bf16 peak `--peak-tflops` (989 for
H100/H200 SXM). `--profile` adds, per row, where the GPU time of a few steps goes (GEMM, attention, conv,
fused/elementwise, optimizer, other) and how much of the wall time the GPU was busy.
Prints a table and writes JSON. Absolute numbers are only meaningful on a GPU.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import inspect
import itertools
import os
import statistics
import sys
from collections import defaultdict

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from timing import run_env, sync, time_calls, write_results  # noqa: E402  (benchmarks/timing.py, beside this script)

import ulsweep.models.dropout as dropout_mod  # noqa: E402
import ulsweep.models.layers as layers  # noqa: E402
from ulsweep.train import accel  # noqa: E402
from ulsweep.config import experiment_from_dict  # noqa: E402
from ulsweep.diffusion import diffuse, low_discrepancy_times, prior_loss, x_from_v  # noqa: E402
from ulsweep.metrics.flops import gflops_per_image, model_gflops  # noqa: E402
from ulsweep.models import AE_PRESETS, BASE_PRESETS  # noqa: E402
from ulsweep.models.presets import with_head_dim  # noqa: E402
from ulsweep.train.build import (base_schedule, build_autoencoder, build_base_model, latent_shape,  # noqa: E402
                                 prior_schedule)
from ulsweep.train.runtime import compile_module, make_runtime, wrap_ddp  # noqa: E402
from ulsweep.train.stage1 import AEObjective  # noqa: E402
from ulsweep.train.stage2 import BaseObjective  # noqa: E402
from ulsweep.train.state import TrainState  # noqa: E402

MODES = {"eager": False, "default": "default", "reduce-overhead": "reduce-overhead",
         "max-autotune": "max-autotune-no-cudagraphs"}  # train.compile values of the library


def set_dropout(module: torch.nn.Module, p: float | None) -> torch.nn.Module:
    """Every dropout layer of `module` at rate p (None: the preset's rate); to measure what dropout costs."""
    if p is not None:
        for m in module.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = p
    return module


def set_gelu(module: torch.nn.Module, approximate: str | None) -> torch.nn.Module:
    """Every transformer MLP of `module` with GELU's `approximate` form (None: the library's)."""
    if approximate is not None:
        for m in module.modules():
            if isinstance(m, layers.Mlp):
                m.approximate = approximate
    return module


# The library's GELU form (the default of the MLPs' constructor): what a row without --gelu runs.
LIBRARY_GELU = inspect.signature(layers.Mlp).parameters["approximate"].default


def step_stage1(exp, batch: int, mode: str, channels: int, channels_last: str = "none", dropout=None, *,
                gelu=None, **compile_kw):
    """One stage-1 optimizer step as a closure, and the forward GFLOP per image it trains. `channels_last`:
    "weights" puts the autoencoder's weights in that memory format, "all" the input images too (the trials
    do neither). `gelu`: GELU's form in the transformer MLPs (None: the library's); `compile_kw`: settings of
    `compile_module` (`one_pass_max_row`, `optimize_ddp`), the library's where left out."""
    rt = make_runtime(exp.ae.train)
    s = exp.data.image_size
    ae = set_gelu(set_dropout(build_autoencoder(exp.ae, channels).to(rt.device), dropout), gelu)
    cl = rt.device.type == "cuda" and channels_last in ("weights", "all")
    if cl:
        ae = ae.to(memory_format=torch.channels_last)
    ts = TrainState(ae, exp.ae.optim, rt, seed=0)
    # the trials' module: losses and networks compiled together, DDP only under torch.distributed
    objective = AEObjective(ae, exp.ae.loss, (channels, s, s), latent_shape(exp))
    model = compile_module(wrap_ddp(objective, rt), MODES[mode], rt, **compile_kw)
    x = torch.rand(batch, channels, s, s, device=rt.device) * 2 - 1
    if cl and channels_last == "all":
        x = x.contiguous(memory_format=torch.channels_last)

    def step():
        noise = objective.draw_noise(batch, ts.gen)
        with rt.autocast():
            losses = model(x, noise)
        ts.optimizer_step(losses["total"].mean() / objective.dims)

    g = model_gflops(exp, channels)
    return step, g["encoder"] + g.get("prior", 0.0) + g["decoder"], rt


def _latent_step(net, objective, oc, exp, batch: int, mode: str, rt, compile_kw: dict):
    """One optimizer step of a latent model: `objective(z, {"t", "eps"})` -> {"total": per-example nats},
    compiled whole."""
    ts = TrainState(net, oc, rt, seed=0)
    model = compile_module(wrap_ddp(objective, rt), MODES[mode], rt, **compile_kw)
    z = torch.randn(batch, *latent_shape(exp), device=rt.device)

    def step():
        noise = {"t": low_discrepancy_times(batch, ts.gen, rt.device),
                 "eps": torch.randn(z.shape, generator=ts.gen, device=rt.device)}
        with rt.autocast():
            ts.optimizer_step(model(z, noise)["total"].mean() / z[0].numel())

    return step


class PriorObjective(torch.nn.Module):
    """Eq. 3's loss of the prior ViT alone on fixed latents (the library trains it only inside stage 1)."""

    def __init__(self, prior, sched):
        super().__init__()
        self.prior, self.sched = prior, sched

    def forward(self, z, noise):
        lam, dlam = self.sched.logsnr(noise["t"]), self.sched.dlogsnr_dt(noise["t"])
        z_t = diffuse(z, lam, noise["eps"])
        v = self.prior(z_t, lam).float()
        return {"total": prior_loss(z, x_from_v(z_t, v, lam), lam, dlam, self.sched.logsnr_1)}


def step_prior(exp, batch: int, mode: str, channels: int, channels_last: str = "none", dropout=None, *,
               gelu=None, **compile_kw):
    """The prior ViT trained alone: the stage-1 part the paper's §5 MFU numbers single out."""
    rt = make_runtime(exp.ae.train)
    prior = set_gelu(build_autoencoder(exp.ae, channels).prior.to(rt.device), gelu)
    step = _latent_step(prior, PriorObjective(prior, prior_schedule(exp.ae.loss)), exp.ae.optim, exp, batch, mode,
                        rt, compile_kw)
    return step, model_gflops(exp, channels)["prior"], rt


def step_stage2(exp, batch: int, mode: str, channels: int, channels_last: str = "none", dropout=None, *,
                gelu=None, **compile_kw):
    rt = make_runtime(exp.ae.train)
    shape = latent_shape(exp)
    bc = exp.base_models[0]
    net = set_gelu(set_dropout(build_base_model(bc, shape[0]).to(rt.device), dropout), gelu)
    objective = BaseObjective(net, base_schedule(exp.ae.loss, bc), bc.loss.sigmoid_bias, shape)  # stage-2 loss
    step = _latent_step(net, objective, bc.optim, exp, batch, mode, rt, compile_kw)
    fwd = gflops_per_image(build_base_model(bc, shape[0]), torch.zeros(2, *shape), torch.zeros(2))
    return step, fwd, rt


@contextlib.contextmanager
def head_dim(exp, d: int | None):
    """While the block runs, the experiment's AE and base presets split their transformers into heads of d
    channels (None: the presets' own heads)."""
    if d is None:
        yield
        return
    names = exp.ae.model.preset, exp.base_models[0].model.preset
    saved = AE_PRESETS[names[0]], BASE_PRESETS[names[1]]
    AE_PRESETS[names[0]], BASE_PRESETS[names[1]] = with_head_dim(saved[0], d), with_head_dim(saved[1], d)
    try:
        yield
    finally:
        AE_PRESETS[names[0]], BASE_PRESETS[names[1]] = saved


STAGES = {"ae": step_stage1, "prior": step_prior, "base": step_stage2}

# GPU kernel name fragments -> category of the profile breakdown (first match wins)
KERNEL_KINDS = (("dropout mask", ("keep_bits",)),  # ulsweep's Triton kernel (ulsweep/models/dropout.py)
                # cuDNN's SDPA backward also runs cudnn::fusion::compute_dot_do_o and convert_dq_to_16bits
                ("attention", ("flash", "fmha", "attention", "sdpa", "dot_do_o", "convert_dq")),
                ("layout conversion", ("nchwtonhwc", "nhwctonchw")),  # cuDNN's own NCHW <-> NHWC transposes
                ("conv", ("conv", "implicit_gemm", "cudnn", "wgrad", "dgrad", "fprop", "xmma")),
                ("gemm", ("gemm", "cutlass", "nvjet", "sm90_", "sm80_", "matmul", "splitk")),
                ("optimizer", ("adam", "foreach", "multi_tensor")),
                ("norm/elementwise (fused)", ("triton",)),
                ("norm/elementwise (eager)", ("elementwise", "reduce", "norm", "vectorized", "copy", "fill")))


def kernel_kind(name: str) -> str:
    n = name.lower()
    if n.startswith("triton_tem"):  # Inductor's max-autotune templates, epilogues fused in ("triton_tem_fused_mm_t_")
        return "conv" if "convolution" in n else "gemm"
    if n.startswith("triton_"):  # Inductor's fused pointwise/reduction kernels, named after the ops fused in
        return "norm/elementwise (fused)"  # ("..._convolution_mul_...")
    for kind, keys in KERNEL_KINDS:
        if any(k in n for k in keys):
            return kind
    return "other"


def profile_step(step, device: torch.device, steps: int = 5) -> dict:
    """GPU kernel time of `steps` steps by category, and the fraction of wall time the GPU was busy."""
    import time

    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        wall = time.perf_counter() - t0
    by_kind: dict[str, float] = defaultdict(float)
    top: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    for ev in prof.events():
        # annotations on the GPU timeline ("## name ##" of compiled graphs, record_function ranges such as
        # "Optimizer.step#AdamW.step") span kernels that are counted on their own
        annotation = getattr(ev, "is_user_annotation", False) or ev.name.startswith("##")
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time > 0 and not annotation:
            by_kind[kernel_kind(ev.name)] += ev.device_time  # microseconds
            top[ev.name[:80]] += ev.device_time
            calls[ev.name[:80]] += 1
    busy = sum(by_kind.values()) / 1e6
    ranked = sorted(top.items(), key=lambda kv: -kv[1])
    # which aten ops (with their input shapes) launched kernels themselves: Triton kernels of compiled
    # graphs have no aten op around them, so what shows here ran eagerly or as an extern call of a graph
    ops = sorted((e for e in prof.key_averages(group_by_input_shape=True)
                  if e.key.startswith("aten::") and e.self_device_time_total > 0),
                 key=lambda e: -e.self_device_time_total)[:12]
    return {"wall_s": wall, "gpu_busy_s": busy, "gpu_busy_frac": busy / wall,
            "by_kind_frac_of_gpu": {k: v / 1e6 / busy for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top_kernels_ms": {k: v / 1e3 / steps for k, v in ranked[:40]},
            "kernels": [{"name": k, "kind": kernel_kind(k), "ms_per_step": v / 1e3 / steps,
                         "calls_per_step": calls[k] / steps} for k, v in ranked],
            "top_aten_ops_ms": [{"op": e.key, "shapes": str(e.input_shapes)[:160], "calls_per_step": e.count / steps,
                                 "ms_per_step": e.self_device_time_total / 1e3 / steps} for e in ops]}


def bench_experiment(a):
    """The experiment the benchmarks build their networks from (model sizes only)."""
    return experiment_from_dict({
        "data": {"image_size": a.image_size},
        "ae": {"model": {"preset": a.preset, "downsample": a.downsample, "latent_channels": a.latent_channels}},
        "base_models": [{"name": "b", "model": {"preset": a.base_preset or a.preset}}],
    })


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="small")
    p.add_argument("--base-preset", default=None, help="default: same as --preset (tiny/small/medium/paper)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--downsample", type=int, default=4)
    p.add_argument("--latent-channels", type=int, default=8)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    p.add_argument("--dropout", type=float, default=None, help="dropout rate of every network (default: the "
                   "preset's, 0.1 in the paper decoder and base model); 0 measures what the dropout costs")
    p.add_argument("--channels-last", nargs="?", const="weights", default="none", choices=["none", "weights", "all"],
                   help="channels_last memory format for the autoencoder's weights (bare flag: 'weights') or its "
                        "weights and input images ('all'); the trials use neither")
    p.add_argument("--out", default=None)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--batch", type=int, nargs="+", default=[128])
    p.add_argument("--base-batch", type=int, nargs="+", default=None, help="batches of the prior/base stages "
                   "(default: --batch); latent models need larger batches than the image model")
    p.add_argument("--modes", nargs="+", default=["eager", "default"], choices=list(MODES))
    p.add_argument("--stages", nargs="+", default=["ae", "base"], choices=list(STAGES))
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--profile", action="store_true", help="add a GPU-time breakdown of 5 steps per row")
    p.add_argument("--dropout-kernel", nargs="+", default=["triton"], choices=["triton", "torch"],
                   help="compiled dropout's mask: ulsweep's Triton kernel (the library's default) or Inductor's "
                        "own; several are measured side by side")
    p.add_argument("--gelu", nargs="+", default=[LIBRARY_GELU], choices=["none", "tanh"],
                   help="the transformer MLPs' GELU: exact (none) or its tanh approximation; several are measured "
                        "side by side (default: the library's)")
    p.add_argument("--head-dim", nargs="+", type=int, default=[None],
                   help="channels a head in every transformer (heads = width / head dim); several are measured "
                        "side by side (default: the presets' heads)")
    p.add_argument("--one-pass-rows", nargs="+", type=int, default=[None],
                   help="compile_module's one_pass_max_row: rows of up to this many elements reduced in one pass "
                        "(0: Inductor's own rule); several are measured side by side, with Inductor's "
                        f"compiled-graph caches off (default: the library's, {accel.ONE_PASS_MAX_ROW})")
    p.add_argument("--inductor", nargs="*", default=[], metavar="KEY=VALUE",
                   help="torch._inductor.config settings for every compiled row, e.g. coordinate_descent_tuning=True")
    a = p.parse_args(argv)
    for kv in a.inductor:
        key, _, value = kv.partition("=")
        *path, name = key.split(".")  # nested settings: triton.prefer_nd_tiling=True
        owner = torch._inductor.config
        for part in path:
            owner = getattr(owner, part, None)
        if owner is None or not hasattr(owner, name):
            p.error(f"--inductor {kv}: torch._inductor.config has no {key!r}")
        try:
            value = ast.literal_eval(value)  # True, 4, 0.5, ...; anything else stays a string
        except (ValueError, SyntaxError):
            pass
        setattr(owner, name, value)
    if a.one_pass_rows != [None]:  # torch 2.11's graph cache keys do not see the setting: compile every row
        torch._inductor.config.fx_graph_cache = False
        if hasattr(torch._functorch.config, "enable_autograd_cache"):
            torch._functorch.config.enable_autograd_cache = False
    exp = bench_experiment(a)
    env = run_env(a)
    rows, use_triton = [], dropout_mod.USE_TRITON
    print(f"{'stage':6} {'batch':>5} {'mode':>15} {'dropout':>7} {'gelu':>4} {'hd':>4} {'1pass':>5} {'step ms':>9} "
          f"{'img/s':>10} {'GFLOP/img':>10} {'MFU':>7} {'mem GiB':>8} {'GPU busy':>8}", flush=True)
    for stage in a.stages:
        for batch in (a.batch if stage == "ae" else (a.base_batch or a.batch)):
            for mode, kernel, gelu, hd, rows1 in itertools.product(a.modes, a.dropout_kernel, a.gelu, a.head_dim,
                                                                   a.one_pass_rows):
                dropout_mod.USE_TRITON = kernel == "triton"
                one_pass = accel.ONE_PASS_MAX_ROW if rows1 is None else rows1
                settings = {"gelu": gelu, "one_pass_max_row": one_pass}
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                try:
                    with head_dim(exp, hd):
                        step, fwd, rt = STAGES[stage](exp, batch, mode, a.channels, a.channels_last, a.dropout,
                                                      **settings)
                    times = time_calls(step, rt.device, a.warmup, a.iters)
                    prof = profile_step(step, rt.device) if a.profile and rt.device.type == "cuda" else None
                except torch.OutOfMemoryError:
                    rows.append({"stage": stage, "batch": batch, "mode": mode, "dropout_kernel": kernel,
                                 "gelu": gelu, "head_dim": hd, "one_pass_rows": one_pass, "error": "out of memory"})
                    print(f"{stage:6} {batch:>5} {mode:>15} {kernel:>7} {gelu:>4} {hd or '-':>4} {one_pass:>5}  out of "
                          f"memory", flush=True)
                    write_results(a.out, env, rows)
                    continue
                finally:
                    torch._dynamo.reset()  # each row compiles its own model; drop the previous graphs
                t = statistics.median(times)
                ips = batch / t
                mfu = 3 * fwd * 1e9 * ips / (a.peak_tflops * 1e12)
                mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
                row = {"stage": stage, "batch": batch, "mode": mode, "step_s": t, "images_per_s": ips,
                       "fwd_gflop_per_image": fwd, "mfu": mfu, "peak_mem_gib": mem,
                       "device": str(rt.device), "amp": str(rt.amp_dtype), "dropout_kernel": kernel, "gelu": gelu,
                       "head_dim": hd, "one_pass_rows": one_pass}
                if prof:
                    row["profile"] = prof
                rows.append(row)
                write_results(a.out, env, rows)  # after every row: a run cut off by a time limit keeps its rows
                busy = f"{100 * prof['gpu_busy_frac']:.0f}%" if prof else "-"
                print(f"{stage:6} {batch:>5} {mode:>15} {kernel:>7} {gelu:>4} {hd or '-':>4} {one_pass:>5} "
                      f"{1e3 * t:>9.2f} {ips:>10.0f} {fwd:>10.3f} {100 * mfu:>6.2f}% {mem:>8.2f} {busy:>8}", flush=True)
                if prof:
                    print("        GPU time: " + ", ".join(f"{k} {100 * v:.0f}%"
                                                        for k, v in prof["by_kind_frac_of_gpu"].items()), flush=True)
                    for o in prof["top_aten_ops_ms"][:6]:
                        print(f"        {o['ms_per_step']:7.2f} ms/step  {o['calls_per_step']:5.1f}x  {o['op']} "
                              f"{o['shapes'][:90]}", flush=True)
    dropout_mod.USE_TRITON = use_triton  # the library's mask kernel again for whatever runs next in this process
    return 0


if __name__ == "__main__":
    sys.exit(main())
