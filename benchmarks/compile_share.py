"""What a sweep's second trial pays to compile its autoencoder step when the first trial has compiled already.

Trials of a loss-factor/bias sweep share the architecture. Each row is two fresh processes on one fresh
torch compile cache folder: the first compiles the stage-1 objective (forward + backward of AEObjective) for
(c_lf, b) = (1.5, 0), cold; the second for (4, 2), with the caches the first left. Two variants side by side:

    constants   c_lf and b as Python floats on the objective (before this benchmark's commit): torch.compile
                bakes them into the graph, so the second process misses part of the caches
    tensors     c_lf and b as 0-d buffers (ulsweep/train/stage1.py): one graph for every trial of the sweep

Per process: seconds of the first forward + backward (tracing, compilation, the step itself) and torch's cache
counters (Inductor FX graph cache, AOTAutograd cache: hits and misses).

    python benchmarks/compile_share.py                                  # tiny preset, CPU
    python benchmarks/compile_share.py --preset small --image-size 32 --latent-channels 8 --device cuda \\
        --mode reduce-overhead --batch 128 --out benchmarks/results/h200-compile-share.json

Prints a table and writes JSON (--out).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

POINTS = ((1.5, 0.0), (4.0, 2.0))  # (c_lf, b) of the first and the second trial


def child(args) -> dict:
    """One process: build the objective for (c_lf, b), compile it, time the first forward + backward."""
    import torch
    from torch._dynamo.utils import counters

    from ulsweep.config import experiment_from_dict
    from ulsweep.train.build import build_autoencoder
    from ulsweep.train.stage1 import AEObjective

    exp = experiment_from_dict({"ae": {
        "model": {"preset": args.preset, "downsample": args.downsample, "latent_channels": args.latent_channels},
        "loss": {"loss_factor": args.lf, "sigmoid_bias": args.bias}}})
    device = torch.device(args.device)
    torch.manual_seed(0)
    ae = build_autoencoder(exp.ae, args.channels).to(device)
    s, d = args.image_size, args.downsample
    obj = AEObjective(ae, exp.ae.loss, (args.channels, s, s), (args.latent_channels, s // d, s // d))
    if args.variant == "constants":  # the objective as it was: Python floats, which Dynamo bakes into the graph
        del obj.loss_factor, obj.sigmoid_bias  # nn.Module's __delattr__ removes the buffers
        obj.loss_factor, obj.sigmoid_bias = float(args.lf), float(args.bias)
    model = torch.compile(obj, mode=args.mode)
    gen = torch.Generator(device).manual_seed(0)
    x = torch.rand(args.batch, args.channels, s, s, device=device, generator=gen) * 2 - 1
    cuda = device.type == "cuda"
    amp = torch.autocast(device.type, dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    t0 = time.perf_counter()
    with amp:
        loss = model(x, obj.draw_noise(args.batch, gen))["total"].mean()
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    return {"seconds": time.perf_counter() - t0, "loss": float(loss),
            "fx_hit": counters["inductor"]["fxgraph_cache_hit"], "fx_miss": counters["inductor"]["fxgraph_cache_miss"],
            "aot_hit": counters["aot_autograd"]["autograd_cache_hit"],
            "aot_miss": counters["aot_autograd"]["autograd_cache_miss"]}


def run_child(args, variant: str, lf: float, bias: float, cache: str) -> dict:
    cmd = [sys.executable, __file__, "--child", "--variant", variant, "--lf", str(lf), "--bias", str(bias),
           "--preset", args.preset, "--image-size", str(args.image_size), "--channels", str(args.channels),
           "--downsample", str(args.downsample), "--latent-channels", str(args.latent_channels),
           "--batch", str(args.batch), "--device", args.device, "--mode", args.mode]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache}
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{variant} ({lf}, {bias}) failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--image-size", type=int, default=16)
    ap.add_argument("--channels", type=int, default=1)
    ap.add_argument("--downsample", type=int, default=4)
    ap.add_argument("--latent-channels", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--mode", default="default", help="torch.compile mode (reduce-overhead needs CUDA)")
    ap.add_argument("--variants", default="constants,tensors")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--variant", default="tensors", help=argparse.SUPPRESS)
    ap.add_argument("--lf", type=float, default=1.5, help=argparse.SUPPRESS)
    ap.add_argument("--bias", type=float, default=0.0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return 0
    rows = []
    for variant in args.variants.split(","):
        cache = tempfile.mkdtemp(prefix=f"compile-share-{variant}-")
        for i, (lf, bias) in enumerate(POINTS):
            r = run_child(args, variant, lf, bias, cache)
            rows.append({"variant": variant, "process": "first (cold)" if i == 0 else "second (warm caches)",
                         "loss_factor": lf, "sigmoid_bias": bias, **r})
            print(f"{variant:<10} {rows[-1]['process']:<22} {r['seconds']:7.1f} s  FX hit/miss {r['fx_hit']}/"
                  f"{r['fx_miss']}  AOT hit/miss {r['aot_hit']}/{r['aot_miss']}", flush=True)
    second = {r["variant"]: r["seconds"] for r in rows if r["process"].startswith("second")}
    ratio = second.get("constants", float("nan")) / second.get("tensors", float("nan"))
    print(f"second trial's compile: constants / tensors = {ratio:.2f}x")
    import torch

    report = {"args": {k: v for k, v in vars(args).items() if k not in ("child", "variant", "lf", "bias")},
              "torch": torch.__version__, "cpus": os.cpu_count(), "rows": rows,
              "second_trial_ratio_constants_over_tensors": ratio}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
