"""A group's final evaluation alone and beside its members' checkpoint writes, side by side in one process.

A stacked group writes every member's final checkpoint in threads (`checkpoints_first`, `MEMBER_WRITERS` at once)
while its members are evaluated, so that the next stage can read them early. In session 37's lf_sweep on one H100
the autoencoders' bits/pixel took 13.0 s of their evaluation, though the same calls alone took 1.7 s each (two:
online and EMA weights; session 38, `group_sampling.py`'s `bpp_ae`). This script times what the evaluation's
thread does first (`latent_bpps` of the online and the EMA weights, then `reconstruct_images`) for K randomly
initialized autoencoders of the experiment, stacked and given AdamW moments by one step, as a group holds them:

    alone                  the evaluation, nothing beside it
    writes                 the K checkpoints written as the group writes them (`save_member`), nothing beside
    beside:<writer>        the evaluation while the K checkpoints are written by <writer>

<writer>s (`--writers`): `library` (the group's `save_member`, MEMBER_WRITERS threads), `one` (the same, one
thread) and `previous` (MEMBER_WRITERS threads writing as the library did until session 38: each member's rows
cloned on the device's default stream, torch.save into an in-memory buffer, which holds the GIL while it copies
the bytes, then the buffer hashed and written). Rows: `eval_s` (the evaluation's wall) and `writes_s` (from the
first write's start to the last's end). Checkpoints go under `--dir` (a temporary directory by default; local
disk as on a node), removed after each row. One H100, session 38, before the library's writer changed: alone
8.7 s, beside its writes 19.2 s, beside one writer thread 12.4 s (`h100-eval-beside-writes-s38.json`).

    python benchmarks/eval_beside_writes.py experiments/lf_sweep.yaml --members 18 --out $OUT/eval-beside-writes.json
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import Future

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from timing import run_env, sync, write_results  # noqa: E402  (beside this script)

WRITERS = ("library", "one", "previous")


def build(exp, k: int):
    """K members of `exp` (seeds 0..K-1) stacked as a group builds them, after one training step on random
    images (AdamW's moments then exist, as in a final checkpoint): (their experiments, runtime, train state, eval
    images)."""
    from ulsweep.config import experiment_from_dict, to_dict
    from ulsweep.train.group import MemberGenerators, build_networks
    from ulsweep.train.runtime import make_runtime

    exps = [experiment_from_dict(to_dict(exp), {"ae.train.seed": s}) for s in range(k)]
    rt = make_runtime(exps[0].ae.train)
    s = exp.data.image_size
    image_shape = (1, s, s)
    objective, ts = build_networks(exps, rt, image_shape)
    gen = torch.Generator(rt.device).manual_seed(0)
    x = torch.rand((k * exp.ae.train.batch_size, *image_shape), generator=gen, device=rt.device) * 2 - 1
    with rt.autocast():
        loss = objective(x, objective.draw_noise(exp.ae.train.batch_size, MemberGenerators([gen] * k)))["total"]
    ts.optimizer_step(loss.float().mean() / objective.dims)
    x_eval = torch.rand((exp.ae.train.eval_images, *image_shape), generator=gen, device=rt.device) * 2 - 1
    return exps, rt, ts, x_eval


def save_previous(i: int, run_dir: str, ts, meta: dict) -> str:
    """Member i's checkpoint written as `save_member` wrote it until session 38 (module docstring): its rows
    cloned on the device, then `checkpoint_gil.save_previous` (the write of then)."""
    from checkpoint_gil import save_previous as write_previous  # beside this script

    def rows(state: dict) -> dict:
        return {name: t[i].clone() for name, t in state.items()}

    opt = ts.opt.state_dict()
    state = {"model": rows(ts.net.state_dict()), "ema": rows(ts.ema.state_dict()),
             "optimizer": {"state": {p: {n: (t[i].clone() if n != "step" else t.clone()) for n, t in s.items()}
                                     for p, s in opt["state"].items()}, "param_groups": opt["param_groups"]}}
    return write_previous(run_dir, ts.step, state, meta)


def evaluation(exps, ts, x_eval) -> None:
    """What a group's final evaluation does first: bits/pixel of the online, then the EMA weights, then the
    reconstructions."""
    from ulsweep.train.stage1 import eval_generator, latent_bpps, reconstruct_images

    k, device = len(exps), x_eval.device
    ts.net.eval()
    latent_bpps(ts.net, x_eval, exps[0], eval_generator(exps, device), k)
    ts.net.train()
    ema = ts.ema.shadow
    latent_bpps(ema, x_eval, exps[0], eval_generator(exps, device), k)
    reconstruct_images(ema, x_eval, exps[0], eval_generator(exps, device), k)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("experiment", nargs="?", default="experiments/lf_sweep.yaml")
    ap.add_argument("--members", type=int, default=18)
    ap.add_argument("--writers", nargs="+", choices=WRITERS, default=list(WRITERS))
    ap.add_argument("--dir", default=None, help="where the checkpoints go (default: a temporary directory)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="experiment overrides")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.members < 2:
        ap.error("--members: a group has at least 2")

    from ulsweep.config import load_experiment
    from ulsweep.config.loading import parse_overrides
    from ulsweep.train import group
    from ulsweep.train.group import checkpoints_first, save_member

    exp = load_experiment(args.experiment, parse_overrides(args.set))
    exps, rt, ts, x_eval = build(exp, args.members)
    k, device = args.members, rt.device
    root = tempfile.mkdtemp(prefix="eval-beside-writes-", dir=args.dir)
    meta = {"image_shape": list(x_eval.shape[1:])}

    def timed(fn) -> float:
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - t0

    def with_writes(inside, writers: str) -> tuple[float, float]:
        """`inside()`'s seconds while the K checkpoints are written as `writers` says, and the writes' own."""
        written: dict[int, Future] = {}
        ends: list[float] = []
        kept, group.MEMBER_WRITERS = group.MEMBER_WRITERS, (1 if writers == "one" else group.MEMBER_WRITERS)

        def save(i: int) -> str:
            run_dir = os.path.join(root, f"m{i}")
            path = (save_previous(i, run_dir, ts, meta) if writers == "previous" else
                    save_member(i, run_dir, ts, "ae", "bench", {}, meta))
            ends.append(time.perf_counter())
            return path

        try:
            sync(device)
            t0 = time.perf_counter()
            with checkpoints_first(list(range(k)), written, None, save):
                secs = timed(inside)
            for f in written.values():
                f.result()
        finally:
            group.MEMBER_WRITERS = kept
        writes = max(ends) - t0
        shutil.rmtree(root, ignore_errors=True)
        os.makedirs(root, exist_ok=True)
        return secs, writes

    evaluation(exps, ts, x_eval)  # first calls: kernels loaded, cuDNN's search of the evaluation's shapes
    rows = []
    print(f"{'row':>16} {'members':>7} {'eval s':>8} {'writes s':>9}")

    def row(name: str, eval_s: float | None, writes_s: float | None) -> None:
        rows.append({"row": name, "members": k, "eval_s": eval_s, "writes_s": writes_s})
        print(f"{name:>16} {k:>7} {eval_s if eval_s is not None else float('nan'):>8.2f} "
              f"{writes_s if writes_s is not None else float('nan'):>9.2f}", flush=True)

    row("alone", timed(lambda: evaluation(exps, ts, x_eval)), None)
    row("writes", None, with_writes(lambda: None, "library")[1])
    for w in args.writers:
        row(f"beside:{w}", *with_writes(lambda: evaluation(exps, ts, x_eval), w))
    row("alone again", timed(lambda: evaluation(exps, ts, x_eval)), None)
    shutil.rmtree(root, ignore_errors=True)
    write_results(args.out, run_env(args) | {"device": str(device)}, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
