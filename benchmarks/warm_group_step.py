"""The first uncompiled step of a stacked autoencoder group, cold and after `warm_up` (issue 23).

    python benchmarks/warm_group_step.py --members 18 --out benchmarks/results/warm-group-step.json

A sweep's autoencoder group trains uncompiled while a precompile task compiles its step, and its first such step
took 4.6 s on an H100 for lf_sweep's 18 autoencoders (session 29), on top of 5.6 s of set-up after its last member
joined. Since session 29 the group's actor builds the group and runs `ulsweep.train.group.warm_up` (one uncompiled
forward and backward on random images, leaving no trace) before the members join. Each variant runs in a fresh
process: `cold` builds the stacked networks and takes two steps as the loop does (backward, per-member clipping,
AdamW and EMA; cuDNN's heuristics, as the loop's uncompiled interim), `warmed` warms first. Rows: seconds to build,
to warm, of the first and of the second step (each synchronized). The images are random (only shapes matter);
the autoencoder is lf_sweep's by default. Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def child(args: argparse.Namespace) -> dict:
    import torch

    from ulsweep.config import experiment_from_dict
    from ulsweep.train.group import build_networks, warm_up
    from ulsweep.train.runtime import make_runtime

    t0 = time.perf_counter()
    exps = [experiment_from_dict({"ae": {"model": {"preset": args.preset, "downsample": args.downsample,
                                                   "latent_channels": args.latent_channels},
                                         "loss": {"loss_factor": 1.5 + 0.1 * i},
                                         "train": {"batch_size": args.batch, "seed": i}},
                                  "data": {"image_size": args.image_size}}) for i in range(args.members)]
    rt = make_runtime(exps[0].ae.train)
    image_shape = (args.channels, args.image_size, args.image_size)
    objective, ts = build_networks(exps, rt, image_shape)  # as the group builds them
    rt.synchronize()
    out = {"variant": args.child, "members": args.members, "batch": args.batch, "build_s": time.perf_counter() - t0}
    if args.child == "warmed":
        t1 = time.perf_counter()
        warm_up(objective, rt, args.batch, image_shape)
        out["warm_s"] = time.perf_counter() - t1
    torch.backends.cudnn.benchmark = False  # as the loop's uncompiled steps while another process compiles
    x = torch.rand((args.members * args.batch, *image_shape), generator=ts.gen.gens[0], device=rt.device) * 2 - 1
    for name in ("first_step_s", "second_step_s"):
        t1 = time.perf_counter()
        noise = objective.draw_noise(args.batch, ts.gen)
        with rt.autocast():
            losses = objective(x, noise)
        ts.optimizer_step(losses["total"].mean() / objective.dims)
        rt.synchronize()
        out[name] = time.perf_counter() - t1
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--members", type=int, default=18)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--preset", default="small")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--downsample", type=int, default=4)
    p.add_argument("--latent-channels", type=int, default=8)
    p.add_argument("--variants", nargs="+", default=["cold", "warmed"], choices=["cold", "warmed"])
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print("ROW " + json.dumps(child(args)), flush=True)
        return 0
    rows = []
    for v in args.variants:  # each in a fresh process: first-call costs are per process
        cmd = [sys.executable, os.path.abspath(__file__), "--child", v] + [
            f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
            ("members", "batch", "preset", "image_size", "channels", "downsample", "latent_channels")]
        done = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("ROW ")), None)
        if done.returncode or line is None:
            print(done.stdout[-2000:] + done.stderr[-4000:], file=sys.stderr)
            raise SystemExit(f"variant {v}: failed (exit {done.returncode})")
        rows.append(json.loads(line[4:]))
    print(f"{'variant':<8}{'members':>8}{'build s':>9}{'warm s':>8}{'first step s':>14}{'second step s':>15}")
    for r in rows:
        warm = f"{r['warm_s']:.2f}" if "warm_s" in r else "-"
        print(f"{r['variant']:<8}{r['members']:>8}{r['build_s']:>9.2f}{warm:>8}{r['first_step_s']:>14.3f}"
              f"{r['second_step_s']:>15.3f}")
    import platform

    import torch

    from timing import write_results  # noqa: E402  (benchmarks/timing.py, beside this script)

    env = {"torch": torch.__version__, "python": platform.python_version(),
           "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "args": vars(args)}
    write_results(args.out, env, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
