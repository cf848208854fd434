"""A stacked group's final hand-over: members' files written between their evaluations, or in threads of their
own while the next members are evaluated, one writer thread or the library's MEMBER_WRITERS (issue 23;
`ulsweep.train.group.hand_over`).

K members of the experiment's autoencoder stacked as a group's network (one AdamW step taken, so the checkpoint
holds its moments, as a finished run's does); each member's evaluation is stood in for by `--eval-s` seconds of
torch compute on the host. Both variants write the same files (`write_member`) in the same run; prints a table
and writes JSON.
    python benchmarks/member_writes.py --members 4 --out benchmarks/results/cpu-member-writes.json
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import commit  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiment", default="experiments/lf_sweep.yaml")
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--eval-s", type=float, default=1.0, help="seconds of host compute standing in for a member's "
                                                               "evaluation")
    ap.add_argument("--out", default=None, help="JSON report")
    a = ap.parse_args()

    from ulsweep.config import load_experiment
    from ulsweep.models.stacked import stack
    from ulsweep.train.build import build_autoencoder
    from ulsweep.train import group
    from ulsweep.train.group import GroupTrainState, hand_over, write_member
    from ulsweep.train.runtime import make_runtime

    torch.set_num_threads(1)
    exp = load_experiment(a.experiment)
    k = a.members
    net = stack([build_autoencoder(exp.ae, 1) for _ in range(k)])
    rt = make_runtime(dataclasses.replace(exp.ae.train, device="cpu", compile=False))
    ts = GroupTrainState(net, exp.ae.optim, rt, [torch.Generator().manual_seed(i) for i in range(k)])
    ts.optimizer_step(sum(p.sum() for p in net.parameters()))
    x = torch.randn(256, 1024)
    root = Path(tempfile.mkdtemp())

    def evaluations():
        for _ in range(k):
            t = time.perf_counter()
            while time.perf_counter() - t < a.eval_s:
                x.matmul(x.T).sum()
            yield {"bpp": 0.1}, {}, {}

    def write(i, m, images, done):
        return write_member(i, str(root / f"m{i}-{time.time_ns()}"), ts, m, images, "ae", "bench", {}, {}, done,
                            str(root / "group"))

    rows = []
    t = time.perf_counter()
    for i, (m, images, _) in enumerate(evaluations()):  # as session 22's group did
        write(i, m, images, {})
    rows.append({"variant": "between evaluations", "seconds": time.perf_counter() - t})
    writers = group.MEMBER_WRITERS
    for n in (1, writers):
        group.MEMBER_WRITERS = n
        t = time.perf_counter()
        hand_over(evaluations(), None, [None] * k, {}, write)
        rows.append({"variant": f"{n} writer thread{'s' * (n > 1)}", "seconds": time.perf_counter() - t})
    group.MEMBER_WRITERS = writers
    size = sum(p.stat().st_size for p in root.rglob("state.pt")) / (2 * k)
    for r in rows:
        r["ratio_to_between"] = rows[0]["seconds"] / r["seconds"]
    print(f"{k} members of {a.experiment}'s autoencoder, {size / 1e6:.0f} MB a checkpoint, {a.eval_s} s an "
          f"evaluation\n{'variant':<22}{'seconds':>9}{'speed-up':>10}")
    for r in rows:
        print(f"{r['variant']:<22}{r['seconds']:>9.1f}{r['ratio_to_between']:>9.2f}x")
    if a.out:
        Path(a.out).write_text(json.dumps({"commit": commit(), "members": k, "eval_s": a.eval_s,
                                           "checkpoint_mb": size / 1e6, "device": "cpu",
                                           "cpus": torch.get_num_threads(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
