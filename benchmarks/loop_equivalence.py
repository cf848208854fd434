"""Loss curves of the Fig. 8 configuration on CPU, step by step, to check that a change to the training loop
keeps training bit-identical.

    python benchmarks/loop_equivalence.py --out before.json          # on the old code
    python benchmarks/loop_equivalence.py --out after.json           # on the new code
    python benchmarks/loop_equivalence.py --compare before.json after.json

Trains `experiments/lf_sweep.yaml`'s autoencoder (small preset, Fashion-MNIST at 32x32, seed 0) and then its
base model on that autoencoder, each for --steps steps with a loss point at every step, eager on CPU (batch
sizes reduced so that it runs in minutes on 2 cores). Prints a table and writes the curves and the final
bits/pixel as JSON. --compare prints the first step where two files differ and exits 1 if any value does.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class Recorder:
    """Training hooks that keep every logged point (the loop's own hook interface)."""

    def __init__(self):
        self.points: list[dict] = []

    def log_metrics(self, step, metrics):
        self.points.append({"step": step, **{k: float(v) for k, v in metrics.items()}})

    def checkpoint_saved(self, step, path, metrics):
        pass

    def should_stop(self):
        return False


def curves(points: list[dict], keys: tuple[str, ...]) -> dict[str, list]:
    rows = [p for p in points if "loss" in p]
    return {"step": [p["step"] for p in rows], **{k: [p.get(k) for p in rows] for k in keys}}


def run(args) -> dict:
    import torch

    from ulsweep.config import load_experiment
    from ulsweep.train import train_autoencoder, train_base

    torch.set_num_threads(args.threads)
    over = {"ae.train.steps": args.steps, "ae.train.batch_size": args.ae_batch, "ae.train.log_every": 1,
            "ae.train.compile": False, "ae.train.device": "cpu", "ae.train.eval_images": 64,
            "ae.train.ckpt_every": 0, "ae.optim.warmup_steps": 20,
            "base_models.0.train.steps": args.base_steps, "base_models.0.train.batch_size": args.base_batch,
            "base_models.0.train.log_every": 1, "base_models.0.train.compile": False,
            "base_models.0.train.device": "cpu", "base_models.0.train.eval_images": 64,
            "base_models.0.train.ckpt_every": 0, "base_models.0.optim.warmup_steps": 20,
            "eval.extractor": "none", "eval.gfd_samples": 1000, "data.path": args.data}
    exp = load_experiment(ROOT / "experiments" / "lf_sweep.yaml", over)
    out = {"config": "experiments/lf_sweep.yaml", "overrides": over, "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        rec = Recorder()
        ae = train_autoencoder(exp, f"{d}/ae", rec)
        out["ae"] = {**curves(rec.points, ("loss", "prior_nats", "decoder_nats", "grad_norm")),
                     "bpp": ae.metrics["bpp"], "psnr": ae.metrics["psnr"], "seconds": time.perf_counter() - t0}
        t0 = time.perf_counter()
        rec = Recorder()
        base = train_base(exp, exp.base_models[0], ae.checkpoint, f"{d}/base", rec)
        out["base"] = {**curves(rec.points, ("loss", "grad_norm")), "base_bpp": base.metrics["base_bpp"],
                       "seconds": time.perf_counter() - t0}
    return out


def compare(a: dict, b: dict) -> int:
    bad = 0
    print(f"{'stage':<6} {'series':<13} {'points':>6}  {'first differing step':>20}  {'max |diff|':>10}")
    for stage in ("ae", "base"):
        for k, va in a[stage].items():
            vb = b[stage].get(k)
            if not isinstance(va, list):
                va, vb = [va], [vb]
            if k in ("seconds",):
                continue
            diffs = [i for i, (x, y) in enumerate(zip(va, vb)) if x != y]
            if len(va) != len(vb):
                diffs = diffs or [min(len(va), len(vb))]
            worst = max((abs(x - y) for x, y in zip(va, vb) if x is not None and y is not None), default=0.0)
            first = (a[stage]["step"][diffs[0]] if k != "bpp" and diffs and diffs[0] < len(a[stage]["step"])
                     else ("-" if not diffs else "final"))
            print(f"{stage:<6} {k:<13} {len(va):>6}  {first!s:>20}  {worst:>10.3g}")
            bad += bool(diffs)
    print("bit-identical" if not bad else f"{bad} series differ")
    return 1 if bad else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="loop-equivalence.json")
    p.add_argument("--steps", type=int, default=200, help="autoencoder steps")
    p.add_argument("--base-steps", type=int, default=100)
    p.add_argument("--ae-batch", type=int, default=32)
    p.add_argument("--base-batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data", default="builtin:fashion-mnist")
    p.add_argument("--compare", nargs=2, metavar=("A", "B"))
    args = p.parse_args(argv)
    if args.compare:
        a, b = (json.loads(Path(f).read_text()) for f in args.compare)
        return compare(a, b)
    res = run(args)
    Path(args.out).write_text(json.dumps(res, indent=1))
    print(f"ae: {len(res['ae']['step'])} points, last loss {res['ae']['loss'][-1]:.6g}, bits/pixel "
          f"{res['ae']['bpp']:.5f} ({res['ae']['seconds']:.0f} s); base: last loss {res['base']['loss'][-1]:.6g}, "
          f"base bits/pixel {res['base']['base_bpp']:.5f} ({res['base']['seconds']:.0f} s) -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
