"""The `--set`s a sweep takes from `levers.sh conv`'s rows (benchmarks/batched_trials.py's JSON): the variant of
the stacked autoencoder step that saves the sweep the most seconds, if it has at least MIN_GAIN more images/s than
the sweep's own setting (grouped convolutions, cuDNN's algorithm search on: lf_sweep's `resources.stack_conv` and
`ae.train.cudnn_benchmark` defaults); else none. A variant's saving is its faster steps over the `--steps` of a
training, less the longer cold compile of its convolutions (the first row of each way of convolving compiled cold,
the next from its caches; on a fresh node the group trains uncompiled meanwhile: on 2 CPU cores the loop's
stacked step of 4 small autoencoders compiled in 261 s against 167 s grouped, and 18 members' graphs hold 18
convolutions a layer). Prints the arguments on stdout (nothing, or e.g. `--set resources.stack_conv=loop`), the
rows and the choice on stderr; a missing or unreadable file, or no row of the sweep's own setting, gives none.

    python3 benchmarks/device/pick_conv.py $OUT/profile-ae-conv.json [--steps 3400]
"""
from __future__ import annotations

import json
import sys

MIN_GAIN = 0.03  # a variant must be this much faster (images/s) than the sweep's own setting to replace it
STEPS = 3400  # lf_sweep's ae.train.steps
OWN = ("grouped", "on")
SETS = {"conv": {"grouped": [], "loop": ["--set", "resources.stack_conv=loop"]},
        "cudnn_search": {"on": [], "off": ["--set", "ae.train.cudnn_benchmark=false"]}}


def pick(rows: list[dict], steps: int = STEPS) -> tuple[list[str], str]:
    """(the arguments, why) from batched_trials.py's rows, in the order they ran."""
    timed = {(r.get("conv"), r.get("cudnn_search")): r for r in rows
             if r.get("images_per_s") and r.get("conv") in SETS["conv"]
             and r.get("cudnn_search") in SETS["cudnn_search"]}
    if OWN not in timed:
        return [], f"no row of the sweep's own setting {OWN} among {sorted(timed)}: keeping it"
    cold: dict[str, float] = {}  # way of convolving -> its first row's first step (compiled cold)
    for r in rows:
        if r.get("first_step_s") is not None:
            cold.setdefault(r.get("conv"), r["first_step_s"])
    own = timed[OWN]

    def saved(v: tuple) -> float:  # seconds a training of `steps` steps saves with variant v, compile included
        r = timed[v]
        return (steps * (own["ms_per_step"] - r["ms_per_step"]) / 1000
                - max(0.0, cold.get(v[0], 0.0) - cold.get(OWN[0], 0.0)))

    said = "; ".join(f"{v}: {timed[v]['images_per_s'] / own['images_per_s'] - 1:+.1%} images/s, {saved(v):+.0f} s"
                     for v in timed if v != OWN)
    good = [v for v in timed if v != OWN and timed[v]["images_per_s"] >= (1 + MIN_GAIN) * own["images_per_s"]
            and saved(v) > 0]
    if not good:
        return [], f"keeping {OWN} ({own['images_per_s']:.0f} images/s); the others: {said or 'none'}"
    best = max(good, key=saved)
    return (SETS["conv"][best[0]] + SETS["cudnn_search"][best[1]],
            f"{best}, saving {saved(best):.0f} s of {steps} steps against {OWN}; all: {said}")


def main(argv: list[str]) -> int:
    steps = int(argv[argv.index("--steps") + 1]) if "--steps" in argv else STEPS
    try:
        with open(argv[0]) as f:
            rows = json.load(f)["rows"]
    except (IndexError, OSError, ValueError, KeyError) as e:
        print(f"pick_conv: no rows ({type(e).__name__}: {e}): keeping the sweep's setting", file=sys.stderr)
        return 0
    for r in rows:
        print(f"pick_conv: {r.get('conv')} search {r.get('cudnn_search')}: "
              f"{r.get('images_per_s') or r.get('error')}", file=sys.stderr)
    args, why = pick(rows, steps)
    print(f"pick_conv: {why}", file=sys.stderr)
    print(" ".join(args))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
