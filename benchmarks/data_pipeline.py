"""The stage-1 stream (ulsweep/data/stream.py): decode throughput against CPU workers, and the paper preset's
stage-1 step fed by the stream against synthetic tensors.

    python benchmarks/data_pipeline.py --out benchmarks/results/cpu-data-pipeline.json           # 2-core box
    python benchmarks/data_pipeline.py --cpus 1 2 4 8 16 --device cuda --preset paper --image-size 512 \
        --downsample 16 --latent-channels 32 --batch 16 --compile default --out h200-data-pipeline.json

Throughput rows: synthetic photos-like images (smooth gradients plus noise, so that the codecs have work
like on real photos) at 256^2 and 512^2, RGB, written as JPEG (quality 90) and PNG shards, streamed once
through the library's own pipeline (verified shard reads -> decode on Ray Data CPU tasks -> one consumer's
iter_torch_batches) in a Ray of `--cpus` CPUs; images/s of the consumer, after a warm-up pass.

Step rows (`--device cuda`): the library's stage-1 optimizer step (AEObjective + TrainState, compiled as
the trials compile it) fed by (a) a batch of synthetic tensors already on the GPU and (b) the stream of the
JPEG shards at --image-size, side by side in one process; the slowdown of (b) and the CPU cores per GPU the
step needs (its images/s over the decode images/s per CPU). Prints a table and writes JSON.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from timing import write_results  # noqa: E402  (benchmarks/timing.py, beside this script)


def photo_like(n: int, size: int, seed: int) -> np.ndarray:
    """uint8 (n, 3, size, size): per-image colour gradients plus Gaussian noise (sigma 12)."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, size, dtype=np.float32)
    out = np.empty((n, 3, size, size), np.uint8)
    for i in range(n):
        a, b, c = rng.uniform(0, 255, (3, 3, 1, 1)).astype(np.float32)
        img = a + (b - a) * t[None, :, None] + (c - a) * t[None, None, :] * 0.5
        out[i] = np.clip(img + rng.normal(0, 12, (3, size, size)), 0, 255).astype(np.uint8)
    return out


def write_encoded(uri: str, images: np.ndarray, encoding: str, shard_rows: int) -> None:
    """A dataset whose `image` column holds `encoding` bytes (JPEG at quality 90); one `train` split."""
    from ulsweep.data import write_dataset

    write_dataset(uri, f"bench-{encoding}", {"train": (images, np.zeros(len(images), np.int64))}, shard_rows,
                  encoding=encoding, quality=90 if encoding in ("jpeg", "webp") else None)


def stream_rate(uri: str, batch: int, passes: int = 2) -> float:
    """Images/s of one consumer over the whole split (the last of `passes` passes; the first warms up)."""
    import torch

    from ulsweep.data import open_dataset
    from ulsweep.data.stream import StreamSource, local_dataset
    from ulsweep.train.runtime import Runtime

    ds = open_dataset(uri)
    src = StreamSource(local_dataset(ds, "train", batch), ds.splits["train"],
                       Runtime(torch.device("cpu"), None, 0, 1), 0, lambda b: b["image"])
    n = src.steps_per_epoch(batch)
    rate = 0.0
    for _ in range(passes):
        t0 = time.perf_counter()
        for _ in range(n):
            src.draw(batch, None)
        rate = n * batch / (time.perf_counter() - t0)
    src.close()
    return rate


def throughput_rows(a, root: str) -> list[dict]:
    import ray

    rows = []
    for size in a.sizes:
        images = photo_like(a.images, size, 0)
        for enc in a.encodings:
            uri = f"{root}/{enc}-{size}"
            write_encoded(uri, images, enc, a.shard_rows)
            for cpus in a.cpus:
                ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
                try:
                    r = stream_rate(uri, a.stream_batch)
                finally:
                    ray.shutdown()
                rows.append({"kind": "decode", "size": size, "encoding": enc, "cpus": cpus, "images_per_s": r,
                             "images_per_s_per_cpu": r / cpus})
                print(f"decode {enc:<4} {size:>4}^2  cpus {cpus:>2}  {r:9.1f} img/s  ({r / cpus:.1f} per cpu)",
                      flush=True)
    return rows


def step_rows(a, root: str, per_cpu: float) -> list[dict]:
    """Stage-1 step fed by synthetic tensors vs by the stream of JPEG shards, side by side."""
    import ray
    import torch

    from ulsweep.config import experiment_from_dict
    from ulsweep.data import open_dataset
    from ulsweep.data.model_range import to_model_range
    from ulsweep.data.stream import StreamSource, local_dataset
    from ulsweep.train.build import build_autoencoder
    from ulsweep.train.runtime import compile_module, make_runtime
    from ulsweep.train.stage1 import AEObjective
    from ulsweep.train.state import TrainState

    s = a.image_size
    exp = experiment_from_dict({"data": {"image_size": s}, "ae": {
        "model": {"preset": a.preset, "downsample": a.downsample, "latent_channels": a.latent_channels},
        "train": {"device": a.device, "batch_size": a.batch}}})
    rt = make_runtime(exp.ae.train)
    uri = f"{root}/step-jpeg-{s}"
    write_encoded(uri, photo_like(a.step_images, s, 1), "jpeg", a.shard_rows)
    ray.init(num_cpus=max(a.cpus), include_dashboard=False, log_to_driver=False, configure_logging=False)
    ds = open_dataset(uri)
    src = StreamSource(local_dataset(ds, "train", a.batch), ds.splits["train"], rt, 0,
                       lambda b: to_model_range(b["image"], s))
    ae = build_autoencoder(exp.ae, 3).to(rt.device)
    ts = TrainState(ae, exp.ae.optim, rt, seed=0)
    d = s // a.downsample
    objective = AEObjective(ae, exp.ae.loss, (3, s, s), (a.latent_channels, d, d))
    model = compile_module(objective, {"eager": False}.get(a.compile, a.compile), rt)
    synthetic = torch.rand(a.batch, 3, s, s, device=rt.device) * 2 - 1

    def step(x):
        noise = objective.draw_noise(a.batch, ts.gen)
        with rt.autocast():
            losses = model(x, noise)
        ts.optimizer_step(losses["total"].mean() / objective.dims)

    def timed(feed) -> float:
        for _ in range(a.warmup):
            step(feed())
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            step(feed())
        if rt.device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / a.steps

    rows = []
    for rep in range(a.repeats):  # alternated, so that drift in clocks or load hits both
        for feed, name in ((lambda: synthetic, "synthetic"), (lambda: src.draw(a.batch, ts.gen), "stream")):
            sec = timed(feed)
            rows.append({"kind": "step", "feed": name, "repeat": rep, "batch": a.batch, "image_size": s,
                         "preset": a.preset, "ms_per_step": sec * 1e3, "images_per_s": a.batch / sec})
            print(f"step  {name:<9} batch {a.batch} {s}^2  {sec * 1e3:8.1f} ms  {a.batch / sec:8.1f} img/s", flush=True)
    src.close()
    ray.shutdown()
    syn = min(r["ms_per_step"] for r in rows if r["feed"] == "synthetic")
    st = min(r["ms_per_step"] for r in rows if r["feed"] == "stream")
    need = a.batch / (syn / 1e3) / per_cpu if per_cpu else float("nan")
    rows.append({"kind": "summary", "stream_slowdown": st / syn - 1, "cpus_per_gpu_needed": need,
                 "decode_images_per_s_per_cpu": per_cpu})
    print(f"stream slows the step by {100 * (st / syn - 1):+.1f}%; the step needs {need:.1f} CPU cores of JPEG "
          f"decode at {s}^2 per GPU ({per_cpu:.0f} img/s per core)", flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--encodings", nargs="+", default=["jpeg", "png"])
    p.add_argument("--cpus", type=int, nargs="+", default=[1, 2], help="Ray CPUs (decode workers)")
    p.add_argument("--images", type=int, default=256, help="images per throughput dataset")
    p.add_argument("--shard-rows", type=int, default=64)
    p.add_argument("--stream-batch", type=int, default=32)
    p.add_argument("--device", default=None, help="cuda: add the stage-1 step rows")
    p.add_argument("--preset", default="paper")
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--downsample", type=int, default=16)
    p.add_argument("--latent-channels", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--compile", default="default", choices=["eager", "default", "reduce-overhead"])
    p.add_argument("--step-images", type=int, default=2048)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    with tempfile.TemporaryDirectory() as root:
        rows = throughput_rows(a, root)
        if a.device:
            jpeg = [r for r in rows if r["encoding"] == "jpeg" and r["size"] == a.image_size]
            per_cpu = max((r["images_per_s_per_cpu"] for r in jpeg), default=0.0)
            rows += step_rows(a, root, per_cpu)
    write_results(a.out, {"argv": sys.argv[1:], "cpu_count": os.cpu_count()}, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
