"""The `--set`s a sweep takes from `levers.sh conv`'s rows (benchmarks/batched_trials.py's JSON): the variant of
the stacked autoencoder step with the most images/s, if it beats the sweep's own setting (grouped convolutions,
cuDNN's algorithm search on: lf_sweep's `resources.stack_conv` and `ae.train.cudnn_benchmark` defaults) by at
least MIN_GAIN; else none. Prints the arguments on stdout (nothing, or e.g. `--set resources.stack_conv=loop`), the
rows and the choice on stderr; a missing or unreadable file, or no row of the sweep's own setting, gives none.

    python3 benchmarks/device/pick_conv.py $OUT/profile-ae-conv.json
"""
from __future__ import annotations

import json
import sys

MIN_GAIN = 0.03  # a variant must be this much faster (images/s) than the sweep's own setting to replace it
OWN = ("grouped", "on")
SETS = {"conv": {"grouped": [], "loop": ["--set", "resources.stack_conv=loop"]},
        "cudnn_search": {"on": [], "off": ["--set", "ae.train.cudnn_benchmark=false"]}}


def pick(rows: list[dict]) -> tuple[list[str], str]:
    """(the arguments, why) from batched_trials.py's rows."""
    timed = {(r.get("conv"), r.get("cudnn_search")): r["images_per_s"] for r in rows
             if r.get("images_per_s") and r.get("conv") in SETS["conv"]
             and r.get("cudnn_search") in SETS["cudnn_search"]}
    if OWN not in timed:
        return [], f"no row of the sweep's own setting {OWN} among {sorted(timed)}: keeping it"
    best = max(timed, key=timed.get)
    gain = timed[best] / timed[OWN] - 1
    if best == OWN or gain < MIN_GAIN:
        return [], f"keeping {OWN} ({timed[OWN]:.0f} images/s): the best other, {best}, is {gain:+.1%}"
    args = SETS["conv"][best[0]] + SETS["cudnn_search"][best[1]]
    return args, f"{best}: {timed[best]:.0f} images/s, {gain:+.1%} against {OWN} ({timed[OWN]:.0f})"


def main(argv: list[str]) -> int:
    try:
        with open(argv[0]) as f:
            rows = json.load(f)["rows"]
    except (IndexError, OSError, ValueError, KeyError) as e:
        print(f"pick_conv: no rows ({type(e).__name__}: {e}): keeping the sweep's setting", file=sys.stderr)
        return 0
    for r in rows:
        print(f"pick_conv: {r.get('conv')} search {r.get('cudnn_search')}: "
              f"{r.get('images_per_s') or r.get('error')}", file=sys.stderr)
    args, why = pick(rows)
    print(f"pick_conv: {why}", file=sys.stderr)
    print(" ".join(args))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
