"""How long a checkpoint written beside training holds the training up, on a GPU, side by side (issue 23).

lf_sweep's stacked group of 18 autoencoders keeps 6.6 GB of weights, EMA and AdamW moments; at its mid-run
checkpoint its 50 steps after step 1,700 ran at ~566 images/s a member against ~1,110 (one H100, sessions 36-41:
~5.6 s lost). `CheckpointWriter.save` copied the state to host memory on the training thread before handing the
write to its thread; since session 42 it snapshots the state on the GPU where it fits (`checkpoint.snapshot`) and
copies it to host memory in the writer's thread, through a pinned buffer (`checkpoint.device_to_host`). Here a
stand-in step (`--matmuls` bf16 matmuls of `--dim`, queued without a sync, as CUDA-graph steps are) runs `--steps`
times with a checkpoint of `--gb` GB (in `--tensors` tensors on the GPU, and a generator state in host memory)
saved at step `--at`, written to a temporary directory:

    none             no checkpoint: the steps' own time
    host             the state copied to host memory on the training thread first (the writer before session 42)
    device-pageable  a snapshot on the GPU, copied in the writer's thread straight into pageable host memory
    device           the library's `CheckpointWriter.save`: the snapshot copied through a pinned buffer, its
                     GPU memory given back to the driver after (`torch.cuda.empty_cache`; these rows not yet
                     run with it, session 43's sweep did: ~0.35 s lost)

Per row: `steps_s` (the steps' wall, synchronized at the end), `lost_s` (against `none`), `save_call_s` (the
training thread's time in `save`), `write_s` (from `save` until the training thread learns the file is written:
`poll` between steps, or the wait after them). Rows repeat `--repeats` times in turn.

One H100, session 42, the defaults (60 steps of ~83 ms): `host` lost 3.3-3.4 s (3.8-4.0 s in `save`),
`device-pageable` 2.4-3.1 s (0.3-0.5 s in `save`), the pinned buffer none (-0.02 to 0.01 s, three repeats), each
measured before it became a mode here (`h100-checkpoint-pause-s42.json`, whose `device` rows are the writer as it
then was, now `device-pageable`; `-staged-s42.json`, an inline variant of this script); the whole destination
pinned (`h100-checkpoint-pause-pinned-s42.json`) lost 3.2 s the first time (its allocation), 0.01 s once reused.

    python benchmarks/checkpoint_pause.py --out benchmarks/results/h100-checkpoint-pause.json
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from timing import run_env, sync, write_results  # noqa: E402  (beside this script)

MODES = ("none", "host", "device-pageable", "device")


def pageable(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", copy=True)  # straight into pageable host memory (the driver stages it)


def run(mode: str, args: argparse.Namespace, state: dict, xs: list, device: torch.device) -> dict:
    from ulsweep.train import checkpoint as ck

    real, real_copy = ck.snapshot, ck.device_to_host
    if mode == "host":
        ck.snapshot, ck.device_to_host = (lambda s: (ck.to_host(s), None)), pageable
    if mode == "device-pageable":
        ck.device_to_host = pageable
    writer, written = ck.CheckpointWriter(), {}
    try:
        with tempfile.TemporaryDirectory() as d:
            sync(device)
            t0 = time.perf_counter()
            save_call = 0.0
            for step in range(args.steps):
                if mode != "none" and step == args.at:
                    t = time.perf_counter()
                    writer.save(d, step, state, {"kind": "bench"},
                                lambda _: written.setdefault("t", time.perf_counter()))
                    save_call, written["t0"] = time.perf_counter() - t, t
                for i in range(args.matmuls):  # the stand-in step: its kernels queued, no sync
                    xs[i % len(xs)] = torch.tanh(xs[i % len(xs)] @ xs[(i + 1) % len(xs)])
                writer.poll()
            sync(device)
            steps_s = time.perf_counter() - t0
            writer.wait()
            writer.close()
    finally:
        ck.snapshot, ck.device_to_host = real, real_copy
    row = {"mode": mode, "steps_s": steps_s, "save_call_s": save_call}
    if mode != "none":
        row["write_s"] = written["t"] - written["t0"]
    return row


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=6.6, help="the checkpoint's size (lf_sweep's stacked group: 6.6)")
    p.add_argument("--tensors", type=int, default=300)
    p.add_argument("--dim", type=int, default=4096)
    p.add_argument("--matmuls", type=int, default=60, help="matmuls a step")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--at", type=int, default=10, help="the step whose start saves the checkpoint")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    per = int(args.gb * 2**30 / 4 / args.tensors)
    # as a run's state: its tensors on the GPU, its generator states in host memory
    state = {"model": {f"w{i}": torch.randn(per, device=device) for i in range(args.tensors)},
             "rng": torch.get_rng_state(), "step": 1}
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    xs = [torch.randn(args.dim, args.dim, device=device, dtype=dtype) / args.dim**0.5 for _ in range(2)]
    rows = []
    for r in range(args.repeats):
        for mode in MODES:
            rows.append(run(mode, args, state, xs, device) | {"repeat": r})
    base = {r["repeat"]: r["steps_s"] for r in rows if r["mode"] == "none"}
    print(f"{'mode':16} {'steps_s':>8} {'lost_s':>7} {'save_call_s':>11} {'write_s':>8}")
    for r in rows:
        r["lost_s"] = r["steps_s"] - base[r["repeat"]]
        print(f"{r['mode']:16} {r['steps_s']:8.2f} {r['lost_s']:7.2f} {r['save_call_s']:11.3f} "
              f"{r.get('write_s', float('nan')):8.2f}")
    if args.out:
        write_results(args.out, run_env(args), rows)


if __name__ == "__main__":
    main()
