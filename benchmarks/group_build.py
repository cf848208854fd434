"""Issue 23: how long a stacked autoencoder group takes to make its members' networks and their TrainState
(`group.build_networks`: the networks, the EMA copy, AdamW), with every member's network made (`each`: what the
group did before session 39) against one network made per distinct seed and architecture (`per-seed`:
`group.seeded_members` since), side by side in one process, alternating; and that both give the same stacked
weights, bit for bit. The planned trials of the experiment's sweep are the members (lf_sweep: 18, two seeds).
Prints a table and writes JSON.

    python benchmarks/group_build.py experiments/lf_sweep.yaml --repeats 3 --out benchmarks/results/cpu-group-build.json
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402

import ulsweep.train.group as group  # noqa: E402
from ulsweep.config import load_experiment, to_dict  # noqa: E402
from ulsweep.sweep.space import planned_overrides, trial_experiment  # noqa: E402
from ulsweep.train.runtime import make_runtime  # noqa: E402


def build(exps, rt, how: str, c: int):
    """The members' stacked objective and TrainState (`group.build_networks`, images of `c` channels), made `how`:
    "per-seed" as the library makes them, "each" with every member's init key its own (every network made); and
    its seconds."""
    library = group.autoencoder_init
    if how == "each":
        keys = iter(range(len(exps)))
        group.autoencoder_init = lambda cfg, channels: next(keys)
    try:
        size = exps[0].data.image_size
        t = time.perf_counter()
        objective, _ = group.build_networks(exps, rt, (c, size, size))
        return objective, time.perf_counter() - t
    finally:
        group.autoencoder_init = library


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("experiment", help="a sweep's YAML; its planned autoencoder trials are the members")
    p.add_argument("--channels", type=int, default=1, help="the images' channels (Fashion-MNIST, digits: 1)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None, help="JSON file for the rows")
    a = p.parse_args(argv)
    exp = load_experiment(a.experiment)
    raw = to_dict(exp)
    exps = [trial_experiment(raw, ov) for ov in planned_overrides(exp.search, exp.ae.train.seed)]
    rt = make_runtime(exps[0].ae.train)
    rows, same = [], True
    for r in range(a.repeats):
        made = {}
        for how in ("each", "per-seed"):
            made[how], seconds = build(exps, rt, how, a.channels)
            rows.append({"row": how, "repeat": r, "members": len(exps), "seeds": len({e.ae.train.seed for e in exps}),
                         "seconds": seconds})
        one, other = made["each"].state_dict(), made["per-seed"].state_dict()
        same = same and one.keys() == other.keys() and all(torch.equal(one[k], other[k]) for k in one)
        del made, one, other
    print(f"{'row':>9} {'members':>8} {'seconds (each repeat)':>24} {'median':>8}")
    for how in ("each", "per-seed"):
        s = [x["seconds"] for x in rows if x["row"] == how]
        print(f"{how:>9} {len(exps):>8} {' '.join(f'{x:.2f}' for x in s):>24} {statistics.median(s):>8.2f}")
    print(f"stacked weights bit for bit the same: {same}")
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"experiment": a.experiment, "device": str(rt.device), "rows": rows, "same_weights": same}, f,
                      indent=1)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
