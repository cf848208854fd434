"""A sweep's base group encoding its members' training latents as their autoencoders' checkpoints are passed on
(`GroupTrainer.read_ahead` -> `group_base.encode_ahead`): one checkpoint after another in one encoding thread
(`one-by-one`, the behaviour up to session 31) against the group's own path since session 32 with E encoding
threads (`queued-E`, E from `--encoders`; the library's `stacking.ENCODERS` by default and 1), each taking every
checkpoint queued when it starts and encoding those together, through their encoders stacked; side by side in one
process, alternating over `--repeats` passes.

    python benchmarks/encode_ahead.py experiments/lf_sweep.yaml --members 18 --interval 0.4 \
        --out benchmarks/results/cpu-encode-ahead.json

K randomly initialized autoencoders of the experiment (each its own seed: the time does not depend on the
weights) are written as checkpoints once, then each pass passes fresh copies of them on (no latents stored),
`--interval` seconds apart (session 31, one H100: ~0.4 s as the autoencoder group finished evaluating its
members). Per pass: `after_last_s`, the seconds from the last checkpoint passed on until every member's latents
were encoded and stored (what base members that join right after it wait: `setup_encode_ahead_s`, 9.2 s in
session 31), `total_s` from the first, and `calls`, how many encodings the thread ran. Also the largest difference
between the two modes' latents relative to their scale (a stacked encoder's grouped kernels round differently).
Meaningful on a GPU, where the encoder is fast and a single checkpoint's fixed costs (opening the data, a copy of
the encoder, the store's files) weigh; on a CPU the encoder's own time dominates both modes.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from timing import run_env, write_results  # noqa: E402  (beside this script)



def write_checkpoints(exp, members: int, root: str) -> list[str]:
    """`members` freshly initialized autoencoders of `exp`, each its own seed, as stage-1 checkpoints under `root`."""
    from ulsweep.config import to_dict
    from ulsweep.data.sources import open_splits
    from ulsweep.train.build import build_autoencoder, latent_shape
    from ulsweep.train.checkpoint import save_checkpoint

    image_shape = list(open_splits(exp.data).image_shape)
    out = []
    for i in range(members):
        torch.manual_seed(i)
        ae = build_autoencoder(exp.ae, image_shape[0])
        out.append(save_checkpoint(os.path.join(root, f"ae{i}"), 1, {"ema": ae.state_dict(), "config": to_dict(exp)},
                                   {"kind": "ae", "image_shape": image_shape, "latent_shape": list(latent_shape(exp))}))
    return out


def fresh_copies(ckpts: list[str], root: str) -> list[str]:
    """The checkpoints copied under `root`, without latents: as their trials pass them on."""
    return [shutil.copytree(c, os.path.join(root, f"m{i}"), ignore=shutil.ignore_patterns("latents"))
            for i, c in enumerate(ckpts)]


def one_pass(mode: str, ckpts: list[str], interval: float, group_root: str) -> tuple[dict, list[torch.Tensor]]:
    """Pass `ckpts` on `interval` s apart to a base group's encoding (`mode`: one-by-one or queued-E); the pass's
    times and the latents."""
    from ulsweep.sweep import stacking
    from ulsweep.sweep.stacking import READERS, GroupTrainer
    from ulsweep.train import group_base

    calls = []
    encode = group_base.encode_ahead

    def counted(queued, members):
        calls.append(len(queued))
        return encode(queued, members)

    group_base.encode_ahead = counted  # the group's thread looks it up at each call
    library = stacking.ENCODERS
    if mode != "one-by-one":
        stacking.ENCODERS = int(mode.split("-")[1])
    keys = [f"m{i}" for i in range(len(ckpts))]
    reader = ThreadPoolExecutor(READERS)
    encoder = ThreadPoolExecutor(1)
    group = GroupTrainer(keys, group_root, wait_s=600.0, kind="base") if mode != "one-by-one" else None
    futures: list[Future] = []
    try:
        t_first = time.perf_counter()
        for i, (key, ckpt) in enumerate(zip(keys, ckpts)):
            time.sleep(max(0.0, t_first + i * interval - time.perf_counter()))
            t_last = time.perf_counter()
            if group is not None:
                assert group.read_ahead(key, ckpt)
                futures.append(group.ahead[key])
            else:  # as the group did up to session 31: one encoding per checkpoint, in its one thread
                read = reader.submit(group_base.read_ahead, ckpt)
                futures.append(encoder.submit(lambda c=ckpt, r=read: counted([(c, r, time.time())], len(keys))[0]))
        z = [f.result()[2] for f in futures]
        if z[0] is not None and z[0].is_cuda:
            torch.cuda.synchronize()
        done = time.perf_counter()
    finally:
        group_base.encode_ahead, stacking.ENCODERS = encode, library
        reader.shutdown()
        encoder.shutdown()
        if group is not None:
            group.stop_reading_ahead(wait=True)
    return {"mode": mode, "after_last_s": done - t_last, "total_s": done - t_first, "calls": len(calls),
            "batches": calls}, z


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", nargs="?", default="experiments/lf_sweep.yaml")
    ap.add_argument("--members", type=int, default=18)
    ap.add_argument("--interval", type=float, default=0.4, help="seconds between checkpoints passed on")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--encoders", type=int, nargs="+", default=None,
                    help="encoding threads of the queued rows (default: 1 and the library's stacking.ENCODERS)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="experiment overrides")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.members < 2:
        ap.error("--members must be at least 2: one member has nothing to encode together")

    from ulsweep.config import load_experiment
    from ulsweep.config.loading import parse_overrides
    from ulsweep.sweep.stacking import ENCODERS
    from ulsweep.train import group_base

    encoders = args.encoders or sorted({1, ENCODERS})
    if min(encoders) < 1:
        ap.error(f"--encoders {min(encoders)}: a group needs at least one encoding thread")
    modes = ["one-by-one"] + [f"queued-{e}" for e in encoders]

    exp = load_experiment(args.experiment, parse_overrides(args.set))
    rows, latents = [], {}
    with tempfile.TemporaryDirectory(prefix="ulsweep-encode-ahead-") as root:
        ckpts = write_checkpoints(exp, args.members, os.path.join(root, "written"))
        # the device's and the encoder's first use (CUDA context, cuDNN's choices) paid before any timed pass
        warm = fresh_copies(ckpts[:2], os.path.join(root, "warm"))
        reads = []
        for c in warm:
            reads.append(Future())
            reads[-1].set_result(group_base.read_ahead(c))
        group_base.encode_ahead([(c, r, None) for c, r in zip(warm, reads)], args.members)
        group_base.encode_ahead([(warm[0], reads[0], None)], args.members)
        print(f"{'mode':>10} {'pass':>4} {'after last s':>12} {'total s':>8} {'calls':>5}  batches")
        for rep in range(args.repeats):
            for mode in (modes if rep % 2 == 0 else modes[::-1]):
                where = os.path.join(root, f"{mode}-{rep}")
                row, z = one_pass(mode, fresh_copies(ckpts, where), args.interval, os.path.join(where, "groups"))
                latents.setdefault(mode, z)
                rows.append(row | {"pass": rep})
                print(f"{mode:>10} {rep:>4} {row['after_last_s']:>12.2f} {row['total_s']:>8.2f} {row['calls']:>5}  "
                      f"{row['batches']}")
    a = latents["one-by-one"]
    diff = None if a[0] is None else max(float((x - y).abs().max() / y.abs().max().clamp_min(1e-12))
                                         for m in modes[1:] for x, y in zip(a, latents[m]))
    median = {m: statistics.median(r["after_last_s"] for r in rows if r["mode"] == m) for m in modes}
    ratios = ", ".join(f"{m} {median['one-by-one'] / max(median[m], 1e-9):.2f}x" for m in modes[1:])
    print(f"median seconds after the last checkpoint: {median}; one-by-one over {ratios}; latents' largest "
          f"relative difference {'-' if diff is None else f'{diff:.2e}'}")
    device = str(a[0].device) if a[0] is not None else "streamed (nothing encoded ahead)"
    write_results(args.out, run_env(args) | {"device": device, "members": args.members, "interval_s": args.interval,
                                             "median_after_last_s": median, "latents_max_rel_diff": diff}, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
