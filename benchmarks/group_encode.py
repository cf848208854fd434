"""A base group's encoding of its members' training latents (`ulsweep.train.latents.encode_together`): the
latent store's writers waited for batch after batch (`inline`: STORE_THREADS 1, STORE_AHEAD 0, as before session
27) against writing beside the encoder (`beside`: the library's STORE_THREADS and STORE_AHEAD), side by side in
one process, alternating over `--repeats` passes. K randomly initialized autoencoders of the experiment, stacked
as a group holds them (timing only), each pass into fresh latent folders.

    python benchmarks/group_encode.py experiments/lf_sweep.yaml --members 18 \
        --out benchmarks/results/cpu-group-encode.json

Per mode: the median seconds of a pass and its parts (`encode_read`, `encode_encoder`, `encode_store`: the copy to
the host and the waits for the writers), and whether every pass of every mode stored the same latents (SHA-256
of the shards' contents in order, per member). Meaningful on a GPU, where the encoder is as fast as the writers
(lf_sweep's base group on one H100, session 27: encoder 7.5 s, store 8.3 s); on a CPU the encoder is ~50x slower
than the writers, and both modes take its time (builtin:digits, the tiny preset, 18 members, 2 cores: 8.4 s
either way).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from timing import run_env, sync, write_results  # noqa: E402  (beside this script)

MODES = {"inline": (1, 0), "beside": None}  # (STORE_THREADS, STORE_AHEAD); None: the library's


def stored_hash(L, ckpt: str, sha: str, ds, data) -> str:
    """The content hash (SHA-256 over the shards' SHA-256) of the latents published for member `ckpt`."""
    key = L.LatentsKey(sha, ds.content_hash, data.train_split, data.image_size)
    latents, why = L.read_latents(L.latents_dir(ckpt, key), key)
    if latents is None:
        raise SystemExit(f"{ckpt}: no latents published ({why})")
    return latents.content_hash


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", nargs="?", default="experiments/lf_sweep.yaml")
    ap.add_argument("--members", type=int, default=18)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="experiment overrides")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)

    from ulsweep.config import load_experiment
    from ulsweep.config.loading import parse_overrides
    from ulsweep.data.builtin import resolve_dataset
    from ulsweep.data.reader import open_dataset
    from ulsweep.models.stacked import stack
    from ulsweep.train import latents as L
    from ulsweep.train.build import build_autoencoder
    from ulsweep.train.evaluation import PartTimer

    device = torch.device(args.device)
    exp = load_experiment(args.experiment, parse_overrides(args.set))
    ds = open_dataset(resolve_dataset(exp.data.path))
    channels = ds.image_shape[0]
    aes = []
    for i in range(args.members):
        torch.manual_seed(i)
        aes.append(build_autoencoder(exp.ae, channels))
    encoder = stack(aes).to(device).eval().requires_grad_(False).encoder
    library = L.STORE_THREADS, L.STORE_AHEAD
    rows, digests = [], {}
    print(f"{'mode':>7} {'pass':>4} {'seconds':>8} {'read':>6} {'encoder':>8} {'store':>6}")
    for rep in range(args.repeats):
        for mode, consts in MODES.items():
            L.STORE_THREADS, L.STORE_AHEAD = consts or library
            root = tempfile.mkdtemp(prefix="ulsweep-group-encode-")
            members = [(os.path.join(root, f"m{i}"), f"{i:064x}") for i in range(args.members)]
            timer = PartTimer(device)
            sync(device)
            t0 = time.perf_counter()
            stored = L.encode_together(encoder, members, ds, exp.data, device, timer=timer)
            sync(device)
            secs = time.perf_counter() - t0
            assert stored == list(range(args.members)), stored
            digests.setdefault(mode, []).append([stored_hash(L, c, sha, ds, exp.data) for c, sha in members])
            parts = {k.split("/")[-1]: v for k, v in timer.seconds.items()}
            rows.append({"mode": mode, "pass": rep, "seconds": secs, "store_threads": L.STORE_THREADS,
                         "store_ahead": L.STORE_AHEAD, **parts})
            print(f"{mode:>7} {rep:>4} {secs:>8.2f} {parts.get('encode_read', 0):>6.2f} "
                  f"{parts.get('encode_encoder', 0):>8.2f} {parts.get('encode_store', 0):>6.2f}")
    L.STORE_THREADS, L.STORE_AHEAD = library
    every = [d for ds_ in digests.values() for d in ds_]
    same = all(d == every[0] for d in every)
    summary = {mode: statistics.median(r["seconds"] for r in rows if r["mode"] == mode) for mode in MODES}
    print(f"median seconds: {summary}; inline/beside {summary['inline'] / summary['beside']:.2f}x; "
          f"same latents in every pass: {same}")
    write_results(args.out, run_env(args) | {"device": str(device), "members": args.members,
                                             "split_images": ds.splits[exp.data.train_split],
                                             "median_s": summary, "same_latents": same}, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
