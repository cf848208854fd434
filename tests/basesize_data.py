"""A synthetic base-size sweep as the report's base frame (one row per base-model trial), the layout of
experiments/base_size.yaml: 7 loss factors at b = 0, a second seed at three of them, every autoencoder with the
base sizes small / medium / large. The generation metric follows the curves given, plus Gaussian noise."""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pandas as pd

LFS = (1.3, 1.5, 1.75, 2.1, 3.0, 4.0, 6.0)
BPP = dict(zip(LFS, (0.0030, 0.0040, 0.0058, 0.0095, 0.020, 0.034, 0.060)))  # bits/pixel per loss factor
REPEATED = (1.5, 2.1, 4.0)
GFLOPS = {"small": 0.281, "medium": 0.860, "large": 2.695}  # the presets' forward GFLOP / image


def paper_like(size: str, bpp: float) -> float:
    """small: best at the lowest bitrate; medium: interior minimum at 0.01; large: best at the highest."""
    u = math.log(bpp)
    return {"small": 1.5 + 0.35 * (u - math.log(0.003)),
            "medium": 1.3 + 0.4 * (u - math.log(0.01)) ** 2,
            "large": 1.2 + 0.25 * (u - math.log(0.06)) ** 2}[size]


def base_frame(curve: Callable[[str, float], float] = paper_like, noise: float = 0.05, seed: int = 0,
               repeated=REPEATED, sizes=tuple(GFLOPS)) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows, i = [], 0
    for lf in LFS:
        for s in ((0, 1) if lf in repeated else (0,)):
            key = f"ae-{i:04d}"
            i += 1
            bpp = BPP[lf] * (1 + 0.02 * s)  # a second seed lands near, not on, the first one's bitrate
            for name in sizes:
                g = GFLOPS[name]
                rows.append({"key": f"{key}-{name}", "kind": "base", "status": "FINISHED", "ae_key": key,
                             "base": name, "base.name": name, "base.model.preset": name,
                             "ae.loss.loss_factor": lf, "ae.loss.sigmoid_bias": 0.0, "ae.train.seed": s,
                             "base.train.seed": s, "ae/bpp": bpp, "gfid": curve(name, bpp) + rng.normal(0, noise),
                             "gflops_base": g, "train_flops": 3 * g * 1e9 * 256 * 2500, "run_id": f"{key}{name}"})
    return pd.DataFrame(rows)


def ae_frame(base: pd.DataFrame) -> pd.DataFrame:
    """The AE frame that goes with `base_frame`: one row per autoencoder, `gfid[<base>]` joined."""
    ae = (base.drop_duplicates("ae_key")[["ae_key", "ae.loss.loss_factor", "ae.loss.sigmoid_bias", "ae.train.seed",
                                          "ae/bpp", "status"]]
          .rename(columns={"ae_key": "key", "ae/bpp": "bpp"}).reset_index(drop=True))
    for name in base["base"].unique():
        ae[f"gfid[{name}]"] = base[base["base"] == name].set_index("ae_key").loc[ae["key"], "gfid"].to_numpy()
    return ae.assign(kind="ae", run_id=ae["key"])
