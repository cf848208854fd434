"""What the stage-2 latent cache saves a base trial: encoding the training split (the first trial of an
autoencoder, and every trial before the cache) against reading the stored latents (every later trial).

    python benchmarks/latents.py                                  # lf_sweep's small AE, Fashion-MNIST 32x32, CPU
    python benchmarks/latents.py --device cuda --data builtin:fashion-mnist

The autoencoder is the experiment's, freshly initialised (time does not depend on the weights), written as
a checkpoint in a temporary directory. Rows: `encode` = load the split + encode + write shards and manifest
(`training_latents` on an empty cache), `read` = read + verify + copy to the device (`training_latents` on the
published cache), each `--repeats` times (the cache is removed before every `encode`). Prints a table and
writes JSON (`--out`).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "experiments" / "lf_sweep.yaml"))
    p.add_argument("--data", default="builtin:fashion-mnist")
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="latents-cache.json")
    args = p.parse_args(argv)
    sys.path.insert(0, str(ROOT))
    import torch

    from ulsweep import io as uio
    from ulsweep.config import load_experiment, to_dict
    from ulsweep.train.build import build_autoencoder
    from ulsweep.train.checkpoint import read_meta, save_checkpoint
    from ulsweep.data.sources import open_splits
    from ulsweep.train.latents import training_latents

    torch.set_num_threads(args.threads)
    exp = load_experiment(args.config, {"data.path": args.data})
    ds = open_splits(exp.data)
    ae = build_autoencoder(exp.ae, ds.image_shape[0]).to(args.device).eval().requires_grad_(False)
    rows = {"encode": [], "read": []}
    with tempfile.TemporaryDirectory() as d:
        ckpt = save_checkpoint(d, 1, {"ema": ae.state_dict(), "config": to_dict(exp)}, {"kind": "ae"})
        sha = read_meta(ckpt)["sha256"]
        for _ in range(args.repeats):
            fs, path = uio.filesystem(uio.join(ckpt, "latents"))
            if fs.exists(path):
                fs.rm(path, recursive=True)
            for kind in ("encode", "read"):
                _sync(args.device)
                t0 = time.perf_counter()
                lat, z = training_latents(ae.encoder, ckpt, sha, ds, exp.data, args.device)
                _sync(args.device)
                rows[kind].append(time.perf_counter() - t0)
    cfg = Path(args.config).resolve()
    out = {"config": str(cfg.relative_to(ROOT)) if cfg.is_relative_to(ROOT) else str(cfg), "data": args.data, "device": args.device, "torch": torch.__version__,
           "images": lat.num_rows, "latent_shape": list(lat.latent_shape),
           "bytes": lat.num_rows * 4 * int(torch.tensor(lat.latent_shape).prod()),
           **{f"{k}_seconds": v for k, v in rows.items()}}
    print(f"{'row':<8} {'median s':>9}  ({out['images']} images -> {tuple(out['latent_shape'])}, {args.device})")
    for k, v in rows.items():
        print(f"{k:<8} {statistics.median(v):>9.3f}")
    Path(args.out).write_text(json.dumps(out, indent=1))
    return 0


def _sync(device: str) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


if __name__ == "__main__":
    raise SystemExit(main())
