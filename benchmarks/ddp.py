"""DDP scaling through Ray Train: stage-1 and stage-2 training throughput on 1 vs N GPUs.

    python benchmarks/ddp.py --preset paper --image-size 512 --channels 3 --downsample 16 --latent-channels 32 \
        --workers 1 2 --stages ae base --batch 8 --base-batch 64 --mode default --out ddp.json

Each world size is one `TorchTrainer` fit (NCCL, one GPU per worker) whose workers build the library's
training step (benchmarks/train_step.py: `wrap_ddp` + `compile_module`, as the trials do) with a fixed batch
per GPU (weak scaling) and time it; rank 0 writes its timings. Scaling efficiency = throughput(N) /
(N x throughput(1)). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

from timing import write_results  # noqa: E402
from train_step import MODES, STAGES, add_model_args  # noqa: E402

from ulsweep.train.accel import OPTIMIZE_DDP  # noqa: E402


def build_step(a: argparse.Namespace, exp, stage: str):
    """(step, forward GFLOP per image, runtime, batch per GPU) of `stage` as the library builds it, its
    compiled step meeting DDP's gradient buckets per `a.optimize_ddp` (Dynamo's optimize_ddp)."""
    from train_step import STAGES

    batch = a.batch if stage == "ae" else a.base_batch
    step, fwd, rt = STAGES[stage](exp, batch, a.mode, a.channels, a.channels_last, a.dropout,
                                  optimize_ddp=a.optimize_ddp)
    return step, fwd, rt, batch


def worker(cfg: dict) -> None:
    """Ray Train worker: time every stage's step at this world size; rank 0 writes the result file."""
    import torch
    import torch.distributed as dist

    sys.path.insert(0, HERE)
    from timing import time_calls
    from train_step import bench_experiment

    a = argparse.Namespace(**cfg["args"])
    exp = bench_experiment(a)
    gpu = torch.cuda.is_available()
    out = []
    for stage in a.stages:
        step, fwd, rt, batch = build_step(a, exp, stage)
        times = time_calls(step, rt.device, a.warmup, a.iters)
        t = torch.tensor([statistics.median(times)], device=rt.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
        out.append({"stage": stage, "batch_per_gpu": batch, "step_s": t.item(), "fwd_gflop_per_image": fwd,
                    "world": rt.world, "device": torch.cuda.get_device_name() if gpu else "cpu",
                    "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if gpu else float("nan")})
        torch._dynamo.reset()
    if rt.rank == 0:
        with open(cfg["out"], "w") as f:
            json.dump(out, f)


def fit(n: int, args: dict, use_gpu: bool) -> list[dict]:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank0.json")
        trainer = TorchTrainer(
            worker, train_loop_config={"args": args, "out": out},
            scaling_config=ray.train.ScalingConfig(num_workers=n, use_gpu=use_gpu),
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            run_config=ray.train.RunConfig(name=f"ddp-bench-{n}", storage_path=os.path.join(tmp, "ray")))
        trainer.fit()
        with open(out) as f:
            return json.load(f)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--stages", nargs="+", default=["ae", "base"], choices=[s for s in STAGES])
    p.add_argument("--batch", type=int, default=8, help="stage-1 images per GPU")
    p.add_argument("--base-batch", type=int, default=64, help="latents per GPU for the prior/base stages")
    p.add_argument("--mode", default="default", choices=list(MODES))
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--optimize-ddp", nargs="+", default=[OPTIMIZE_DDP], choices=["ddp_optimizer", "no_optimization"],
                   help="compile_module's optimize_ddp (torch._dynamo.config.optimize_ddp) of compiled modes, one fit "
                        "per setting on > 1 GPU: one graph and all-reduce after the backward, or the graph split at "
                        "DDP's buckets so that all-reduce overlaps the backward (default: the library's, "
                        f"{OPTIMIZE_DDP})")
    p.add_argument("--cpu", action="store_true", help="gloo workers on CPU (a smoke test of the script)")
    a = p.parse_args(argv)
    import ray

    ray.init(include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
        [HERE, os.path.join(HERE, ".."), os.environ.get("PYTHONPATH", "")])}})
    rows = []
    for n in a.workers:
        # one process has no DDP, so optimize_ddp cannot matter there: one fit, its rows shared by every setting
        for o in (a.optimize_ddp[:1] if n == 1 else a.optimize_ddp):
            for r in fit(n, {**vars(a), "optimize_ddp": o}, use_gpu=not a.cpu):
                ips = r["world"] * r["batch_per_gpu"] / r["step_s"]
                mfu = 3 * r["fwd_gflop_per_image"] * 1e9 * ips / r["world"] / (a.peak_tflops * 1e12)
                r.update({"optimize_ddp": o if n > 1 else "-", "images_per_s": ips, "mfu_per_gpu": mfu})
                rows.append(r)
    print(f"{'stage':6} {'GPUs':>4} {'optimize_ddp':>15} {'batch/GPU':>9} {'step ms':>8} {'img/s':>9} {'MFU/GPU':>8} "
          f"{'scaling':>8}")
    for r in rows:
        one = next(x for x in rows if x["stage"] == r["stage"] and x["world"] == min(a.workers))
        r["scaling_efficiency"] = r["images_per_s"] / (r["world"] / one["world"] * one["images_per_s"])
        print(f"{r['stage']:6} {r['world']:>4} {r['optimize_ddp']:>15} {r['batch_per_gpu']:>9} "
              f"{1e3 * r['step_s']:>8.1f} {r['images_per_s']:>9.1f} {100 * r['mfu_per_gpu']:>7.1f}% "
              f"{100 * r['scaling_efficiency']:>7.1f}%")
    write_results(a.out, {"ray": ray.__version__, "args": vars(a)}, rows)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
