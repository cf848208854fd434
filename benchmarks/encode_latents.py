"""Stage 2's encoding of a training split (`ulsweep.train.latents.encode_split`): images/s with the images
decoded in the trial's process (`in-process`, one thread) against decoded by Ray Data CPU tasks (`ray-data`),
side by side in one run.

    python benchmarks/encode_latents.py --cpus 2 --out benchmarks/results/cpu-encode-latents.json

Data: JPEG (quality 90) and PNG shards of `--images` crops of scikit-image's sample photos per size
(`image_codecs.photo_crops`), `--shard-rows` images per shard. Encoder (`--encoder`): `conv`, a stand-in
whose cost is small next to decoding, as a GPU encoder's is (one 8x8 convolution of stride 8 to 16 channels,
float32); or `small`, the `small` AE preset's encoder (downsample 8, 16 latent channels), which on a CPU costs
more than decoding (then both paths run at the encoder's speed). The encoder runs on `--threads` torch threads
of this process, as it runs in the trial. Per (Ray CPUs, size, encoding): one untimed pass per path (Ray's
workers start), then `--repeats` timed passes of each path in turn, each a whole `encode_split` of the split
in batches of `--batch` with a sink that only hashes z; a row gives per path the medians of images/s over
the pass and seconds until the first batch of z (the Ray Data path starts a coordinator actor and its
executor first); the ratio of the passes' images/s, and whether the two paths' z were bit-identical
(SHA-256 of every batch's bytes).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from data_pipeline import write_encoded  # noqa: E402  (beside this script)
from image_codecs import photo_crops  # noqa: E402
from timing import write_results  # noqa: E402


def make_encoder(kind: str):
    """The frozen encoder of `--encoder` for RGB images, in eval mode without gradients."""
    import torch

    from ulsweep.config import experiment_from_dict
    from ulsweep.train.build import build_autoencoder

    torch.manual_seed(0)
    if kind == "conv":
        enc = torch.nn.Conv2d(3, 16, 8, stride=8)
    else:
        exp = experiment_from_dict({"ae": {"model": {"preset": "small", "downsample": 8, "latent_channels": 16}}})
        enc = build_autoencoder(exp.ae, 3).encoder
    return enc.eval().requires_grad_(False)


def timed_pass(encoder, ds, size: int, batch: int, decode: str) -> dict:
    """One `encode_split` of the `train` split on the `decode` path: images/s over the whole pass (for the
    Ray Data path including its start-up: a coordinator actor and its executor), seconds until the first
    batch of z, and the SHA-256 of z."""
    from ulsweep.train.latents import encode_split

    h, first = hashlib.sha256(), []

    def sink(z) -> None:
        h.update(z.numpy().tobytes())
        if not first:
            first.append(time.perf_counter())

    t0 = time.perf_counter()
    n = encode_split(encoder, ds, "train", size, "cpu", sink, batch, decode)
    t1 = time.perf_counter()
    return {"images_per_s": n / (t1 - t0), "first_batch_s": first[0] - t0, "sha256": h.hexdigest()}


def measure(encoder, ds, size: int, batch: int, repeats: int) -> dict:
    """A row: both paths' median images/s and seconds to the first batch over `repeats` passes each (after one
    untimed pass each), their ratio, and whether their z were bit-identical."""
    from ulsweep.train.latents import IN_PROCESS, RAY_DATA

    paths = (IN_PROCESS, RAY_DATA)
    sha = {path: timed_pass(encoder, ds, size, batch, path)["sha256"] for path in paths}  # warm-up
    passes = {path: [] for path in paths}
    for _ in range(repeats):
        for path in paths:
            passes[path].append(timed_pass(encoder, ds, size, batch, path))
    row = {"size": size, "batch": batch, "passes": passes, "z_bit_identical": sha[IN_PROCESS] == sha[RAY_DATA]}
    for path in paths:
        for k in ("images_per_s", "first_batch_s"):
            row[f"{path.replace('-', '_')}_{k}"] = statistics.median(p[k] for p in passes[path])
    row["ray_data_over_in_process"] = row["ray_data_images_per_s"] / row["in_process_images_per_s"]
    return row


def say(r: dict) -> None:
    print(f"{r['encoder']} {r['encoding']:<4} {r['size']:>4}^2  ray cpus {r['cpus']:>2}  "
          f"in-process {r['in_process_images_per_s']:7.1f} img/s (first batch {r['in_process_first_batch_s']:4.2f} s)  "
          f"ray-data {r['ray_data_images_per_s']:7.1f} img/s (first batch {r['ray_data_first_batch_s']:4.2f} s)  "
          f"x{r['ray_data_over_in_process']:.2f}  z bit-identical: {r['z_bit_identical']}", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    p.add_argument("--encodings", nargs="+", default=["jpeg", "png"], choices=["jpeg", "png"])
    p.add_argument("--cpus", type=int, nargs="+", default=[2], help="Ray CPUs (decode tasks), one row set each")
    p.add_argument("--encoder", default="conv", choices=["conv", "small"])
    p.add_argument("--images", type=int, default=1024, help="images per dataset")
    p.add_argument("--shard-rows", type=int, default=128)
    p.add_argument("--batch", type=int, default=None, help="encoder batch (default: the library's ENCODE_BATCH)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the encoder")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import torch

    from ulsweep.data import open_dataset
    from ulsweep.train.latents import ENCODE_BATCH

    torch.set_num_threads(a.threads)
    batch, encoder, rows = a.batch or ENCODE_BATCH, make_encoder(a.encoder), []
    env = {"argv": sys.argv[1:], "cpu_count": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__}
    with tempfile.TemporaryDirectory() as root:
        for size in a.sizes:
            images = photo_crops(size, a.images)
            for enc in a.encodings:
                write_encoded(f"{root}/{enc}-{size}", images, enc, a.shard_rows)
        for cpus in a.cpus:
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
            try:
                for size in a.sizes:
                    for enc in a.encodings:
                        ds = open_dataset(f"{root}/{enc}-{size}")
                        rows.append(measure(encoder, ds, size, batch, a.repeats))
                        rows[-1].update({"encoder": a.encoder, "encoding": enc, "cpus": cpus, "images": a.images,
                                         "shard_rows": a.shard_rows, "threads": a.threads})
                        say(rows[-1])
                        write_results(a.out, env, rows)
            finally:
                ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
