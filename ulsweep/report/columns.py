"""Names, labels and columns of a sweep's trial frames: which column is which metric, how it is labelled,
which config params vary, which rows repeat a configuration with another seed. Pure functions, no I/O.

Input frames (built by `ulsweep.report.sweepdata.trials_frames`):
    ae frame    one row per AE trial: `key`, `run_id`, `status`, flattened config params
                (`ae.loss.loss_factor`, ...), AE metrics (`bpp`, `bpp_se`, `psnr`, `rfd_<x>` | `rfid`, ...)
                and, per base model B, that base trial's metrics as `<metric>[B]` (`gfd_fmnist[small]`).
    base frame  one row per base-model trial: `key`, `ae_key`, `base`, `run_id`, `status`, params,
                base metrics (`gfd_<x>` | `gfid`, `base_bpp`, `gflops_base`, `train_flops`) and the AE's
                metrics prefixed `ae/` (`ae/bpp`).
Metric names are those of `ulsweep.metrics.fid.metric_name`: `gfid`/`rfid` (standard Inception weights) are
labelled gFID/rFID; a domain-extractor metric `gfd_fmnist` is labelled "gFD (fmnist features)", never FID.
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

LF, BIAS = "ae.loss.loss_factor", "ae.loss.sigmoid_bias"
CHANNELS, DOWNSAMPLE, IMAGE_SIZE = "ae.model.latent_channels", "ae.model.downsample", "data.image_size"
PRIOR, DECODER = "ae.loss.prior", "ae.loss.decoder"
STOP_GRAD, LOGSNR_Z0 = "ae.loss.stop_grad_prior", "ae.loss.logsnr_z0"
_BASE_COL = re.compile(r"^(?P<metric>[^\[\]]+)\[(?P<base>[^\[\]]+)\]$")

_FIXED_LABELS = {
    "bpp": "latent bits/pixel",
    "bpp_se": "latent bits/pixel (std. error)",
    "base_bpp": "latent bits/pixel (base model)",
    "psnr": "PSNR (dB)",
    "gfid": "gFID",
    "rfid": "rFID",
    "train_flops": "training FLOPs",
    "gflops_base": "base model forward GFLOP / image",
    "gflops_encoder": "encoder forward GFLOP / image",
    "gflops_prior": "prior forward GFLOP / image",
    "gflops_decoder": "decoder forward GFLOP / image",
}


def metric_label(name: str) -> str:
    """Axis label of a metric column: 'gfd_fmnist' -> 'gFD (fmnist features)', 'gfid' -> 'gFID',
    'gfd_fmnist[small]' -> 'gFD (fmnist features), base small'."""
    m = _BASE_COL.match(name)
    if m:
        return f"{metric_label(m['metric'])}, base {m['base']}"
    if name.startswith("ae/"):
        return f"AE {metric_label(name[3:])}"
    if name in _FIXED_LABELS:
        return _FIXED_LABELS[name]
    for prefix, label in (("gfd_", "gFD"), ("rfd_", "rFD")):
        if name.startswith(prefix):
            return f"{label} ({name[len(prefix):]} features)"
    return name


def _is_gen(name: str) -> bool:
    return name == "gfid" or name.startswith("gfd_")


def _is_rec(name: str) -> bool:
    return name == "rfid" or name.startswith("rfd_")


def _pick(cands: Iterable[str], inception: str) -> str | None:
    cands = sorted(set(cands))
    if inception in cands:
        return inception
    return cands[0] if cands else None


def generation_metric(df: pd.DataFrame) -> str | None:
    """The generation metric's name (without base suffix): 'gfid' if logged, else the first 'gfd_<x>'."""
    names = [_BASE_COL.match(c)["metric"] if _BASE_COL.match(c) else c for c in df.columns]
    return _pick((n for n in names if _is_gen(n)), "gfid")


def reconstruction_metric(df: pd.DataFrame) -> str | None:
    return _pick((c for c in df.columns if _is_rec(c)), "rfid")


def base_names(ae: pd.DataFrame) -> list[str]:
    """Base-model names that have joined columns in the AE frame, in column order."""
    out: list[str] = []
    for c in ae.columns:
        m = _BASE_COL.match(c)
        if m and m["base"] not in out:
            out.append(m["base"])
    return out


def varied_params(df: pd.DataFrame, candidates: Sequence[str] | None = None) -> list[str]:
    """Param columns (dotted config keys) that take more than one value across the trials."""
    cols = candidates if candidates is not None else [
        c for c in df.columns if "." in c and "[" not in c and not c.startswith("search.")]  # search.*: copies
    out = []
    for c in cols:
        if c in df.columns and df[c].dropna().astype(str).nunique() > 1:
            out.append(c)
    return out


def short_param(name: str) -> str:
    return {LF: "loss factor", BIAS: "sigmoid bias", CHANNELS: "latent channels", DOWNSAMPLE: "downsample",
            STOP_GRAD: "stop-grad prior", LOGSNR_Z0: "λ_z(0)", PRIOR: "prior", DECODER: "decoder"}.get(
        name, name.split(".", 1)[-1] if name.startswith("ae.") else name)


def key_tail(key: str) -> str:
    """A dotted config key's last part (`ae.loss.loss_factor` -> `loss_factor`): markdown's short names."""
    return key.rsplit(".", 1)[-1]


def fmt_value(v) -> str:
    """A value in markdown: floats to 4 significant digits, NaN as n/a, anything else as str()."""
    if isinstance(v, float):
        return "n/a" if math.isnan(v) else f"{v:.4g}"
    return str(v)


def numeric(df: pd.DataFrame, col: str) -> pd.Series:
    """Column `col` as floats (NaN where missing or not a number; all NaN when there is no such column)."""
    if col not in df.columns:
        return pd.Series(np.nan, index=df.index, dtype=float)
    return pd.to_numeric(df[col], errors="coerce")


def seed_columns(df: pd.DataFrame) -> list[str]:
    """Config seed columns (`*.seed`; `search.<key>` copies left out) that vary across the frame."""
    return [c for c in df.columns
            if c.endswith(".seed") and not c.startswith("search.") and df[c].nunique(dropna=True) > 1]


def seed_repeats(df: pd.DataFrame) -> pd.Series:
    """True for rows that repeat a configuration with another seed: a varying seed column not at its most
    common value."""
    mask = pd.Series(False, index=df.index)
    for c in seed_columns(df):
        mask |= df[c] != df[c].mode().iloc[0]
    return mask
