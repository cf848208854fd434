"""Packing: aggregate training throughput of 1, 2, 4, 8 concurrent small trials on one GPU, the way a sweep
packs them (Ray tasks holding 1/n of a GPU each, one process per trial).

    python benchmarks/packing.py --preset small --image-size 32 --channels 1 --batch 128 --trials 1 2 4 8 \
        --seconds 30 --out packing.json

Each trial builds the library's stage-1 (or base) training step (benchmarks/train_step.py), warms it up, waits
for the other trials of its group to be warm too (a file barrier), then steps for `--seconds`, recording (time, images) every 10 steps after a CUDA sync. Aggregate images/s is
counted over the window in which every trial of the group was in its timed phase, so warm-up and start-up
skew do not inflate it. Memory per trial: the trial's own peak (`max_memory_reserved`) and the whole GPU's
used memory seen while all n trials ran (over n, which includes every process's CUDA context).
Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

from timing import write_results  # noqa: E402
from train_step import STAGES, MODES, add_model_args, bench_experiment  # noqa: E402


def gpu_used_gib() -> float:
    free, total = torch.cuda.mem_get_info()
    return (total - free) / 2**30


def wait_for_group(folder: str, n: int, timeout_s: float = 600.0) -> None:
    """Start barrier of the group: every trial warms up (and compiles) first, then all start timing together."""
    open(os.path.join(folder, f"ready-{os.getpid()}"), "w").close()
    t0 = time.time()
    while len(os.listdir(folder)) < n:
        if time.time() - t0 > timeout_s:
            raise TimeoutError(f"only {len(os.listdir(folder))} of {n} packed trials got ready in {timeout_s} s")
        time.sleep(0.05)


def run_trial(args: dict) -> dict:
    """One packed trial (runs in its own Ray worker process)."""
    sys.path.insert(0, HERE)
    a = argparse.Namespace(**args)
    exp = bench_experiment(a)
    step, fwd, rt = STAGES[a.stage](exp, a.batch, a.mode, a.channels)
    for _ in range(a.warmup):
        step()
    torch.cuda.synchronize()
    wait_for_group(a.barrier, a.group_size)
    marks = [(time.time(), 0)]
    n, gpu_used = 0, 0.0
    while time.time() - marks[0][0] < a.seconds:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
        n += 10
        marks.append((time.time(), n * a.batch))
        gpu_used = max(gpu_used, gpu_used_gib())
    return {"marks": marks, "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
            "peak_allocated_gib": torch.cuda.max_memory_allocated() / 2**30, "gpu_used_gib": gpu_used,
            "fwd_gflop_per_image": fwd, "pid": os.getpid()}


def images_in(marks: list, t0: float, t1: float) -> float:
    """Images a trial finished within [t0, t1], interpolating linearly between its marks."""
    import numpy as np

    ts = np.array([m[0] for m in marks])
    imgs = np.array([m[1] for m in marks], dtype=float)
    return float(np.interp(t1, ts, imgs) - np.interp(t0, ts, imgs))


def aggregate(results: list[dict]) -> tuple[float, float]:
    """(images/s of all trials together over their common timed window, window seconds)."""
    t0 = max(r["marks"][0][0] for r in results)
    t1 = min(r["marks"][-1][0] for r in results)
    if t1 <= t0:
        raise RuntimeError("the packed trials never ran their timed phases at the same time; raise --seconds")
    return sum(images_in(r["marks"], t0, t1) for r in results) / (t1 - t0), t1 - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--stage", default="ae", choices=list(STAGES))
    p.add_argument("--mode", default="eager", choices=list(MODES))
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--trials", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--seconds", type=float, default=30.0, help="timed phase of each trial")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    a = p.parse_args(argv)
    import ray

    if not torch.cuda.is_available():
        print("packing needs a CUDA GPU", file=sys.stderr)
        return 2
    ray.init(num_gpus=1, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
        [HERE, os.path.join(HERE, ".."), os.environ.get("PYTHONPATH", "")])}})
    remote = ray.remote(run_trial)
    args = {k: v for k, v in vars(a).items() if k not in ("trials", "out")}
    rows = []
    print(f"{'trials':>6} {'agg img/s':>10} {'x 1 trial':>9} {'per trial':>10} {'MFU':>6} {'reserved GiB':>12} "
          f"{'GPU used/n':>10} {'window s':>8}", flush=True)
    for n in a.trials:
        with tempfile.TemporaryDirectory() as barrier:
            group = {**args, "barrier": barrier, "group_size": n}
            res = ray.get([remote.options(num_gpus=1.0 / n, num_cpus=a.cpus_per_trial).remote(group)
                           for _ in range(n)])
        ips, window = aggregate(res)
        fwd = res[0]["fwd_gflop_per_image"]
        row = {"trials": n, "aggregate_images_per_s": ips, "window_s": window,
               "per_trial_images_per_s": ips / n, "mfu": 3 * fwd * 1e9 * ips / (a.peak_tflops * 1e12),
               "peak_reserved_gib": max(r["peak_reserved_gib"] for r in res),
               "gpu_used_per_trial_gib": max(r["gpu_used_gib"] for r in res) / n}
        rows.append(row)
        base = rows[0]["aggregate_images_per_s"]
        print(f"{n:>6} {ips:>10.0f} {ips / base:>8.2f}x {ips / n:>10.0f} {100 * row['mfu']:>5.1f}% "
              f"{row['peak_reserved_gib']:>12.2f} {row['gpu_used_per_trial_gib']:>10.2f} {window:>8.1f}", flush=True)
    env = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "ray": ray.__version__, "args": vars(a)}
    write_results(a.out, env, rows)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
