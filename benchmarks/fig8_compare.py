"""Two runs of the Fig. 8 sweep side by side (issue 21): a published dashboard's `ae_trials.csv` against a new
one's, per AE trial key: bits/pixel (difference in standard errors), PSNR, the domain FDs, and the new run's
Inception rFID/gFID; per sigmoid-bias slice the Spearman ρ between FID and domain FD; the seed-pair spreads.
Prints a table and writes JSON.

    python benchmarks/fig8_compare.py OLD/ae_trials.csv NEW/ae_trials.csv --out benchmarks/results/x.json
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

LF, BIAS = "ae.loss.loss_factor", "ae.loss.sigmoid_bias"
METRICS = ["bpp", "bpp_se", "psnr", "rfd_fmnist", "gfd_fmnist[small]", "rfid", "gfid[small]"]


def _frame(path: str) -> pd.DataFrame:
    df = pd.read_csv(path)
    keep = ["key", BIAS, LF, "ae.train.seed"] + [m for m in METRICS if m in df]
    return df[keep].set_index("key")


def bpp_z(new: pd.Series, old: pd.Series, se_new: pd.Series, se_old: pd.Series) -> pd.Series:
    """(new − old) / sqrt(se_new² + se_old²): the bits/pixel difference in standard errors of the difference."""
    return (new - old) / np.sqrt(se_new ** 2 + se_old ** 2)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("old"), p.add_argument("new"), p.add_argument("--out")
    a = p.parse_args(argv)
    old, new = _frame(a.old), _frame(a.new)
    both = new.join(old[[m for m in METRICS if m in old]].add_suffix("_old"), how="inner")
    both["bpp_z"] = bpp_z(both["bpp"], both["bpp_old"], both["bpp_se"], both["bpp_se_old"])
    for m in ("rfd_fmnist", "gfd_fmnist[small]"):
        both[f"{m}_ratio"] = both[m] / both[f"{m}_old"]
    rows = both.reset_index().sort_values([BIAS, LF, "ae.train.seed"]).to_dict("records")
    prim = both[both["ae.train.seed"].fillna(0) == 0]
    rho = []
    for bias, g in [("all", prim)] + list(prim.groupby(BIAS)):
        for a_, b_ in (("rfid", "rfd_fmnist"), ("gfid[small]", "gfd_fmnist[small]"), ("gfid[small]", "bpp"),
                       ("gfd_fmnist[small]", "bpp")):
            rho.append({"slice": bias, "a": a_, "b": b_, "n": len(g), "rho": float(spearmanr(g[a_], g[b_])[0])})
    pairs = []
    for (bias, lf), g in both.groupby([BIAS, LF]):
        if len(g) > 1:
            pairs.append({"sigmoid_bias": bias, "loss_factor": lf, **{
                f"{m}_spread": float(g[m].max() - g[m].min()) for m in ("bpp", "psnr", "rfid", "gfid[small]",
                                                                          "rfd_fmnist", "gfd_fmnist[small]")}})
    print(f"{'key':8} {'b':>3} {'c_lf':>5} {'seed':>4} {'bpp':>9} {'old':>9} {'z':>6} {'psnr':>6} {'old':>6} "
          f"{'rFD':>6} {'old':>6} {'gFD':>6} {'old':>6} {'rFID':>6} {'gFID':>6}")
    for r in rows:
        print(f"{r['key']:8} {r[BIAS]:>3g} {r[LF]:>5g} {r['ae.train.seed']:>4g} {r['bpp']:9.5f} {r['bpp_old']:9.5f} "
              f"{r['bpp_z']:6.1f} {r['psnr']:6.2f} {r['psnr_old']:6.2f} {r['rfd_fmnist']:6.3f} "
              f"{r['rfd_fmnist_old']:6.3f} {r['gfd_fmnist[small]']:6.3f} {r['gfd_fmnist[small]_old']:6.3f} "
              f"{r['rfid']:6.2f} {r['gfid[small]']:6.2f}")
    for e in rho:
        print(f"spearman {e['slice']!s:>4}  rho({e['a']}, {e['b']}) = {e['rho']:+.2f}  (n={e['n']})")
    for e in pairs:
        print(f"seed pair b={e['sigmoid_bias']:g} c_lf={e['loss_factor']:g}: gFID spread {e['gfid[small]_spread']:.3f}, "
              f"bpp spread {e['bpp_spread']:.2e}")
    out = {"old": a.old, "new": a.new, "rows": rows, "spearman": rho, "seed_pairs": pairs}
    if a.out:
        with open(a.out, "w") as f:
            json.dump(out, f, indent=1, default=float)
    return out


if __name__ == "__main__":
    main()
