"""Paper-style tables of a sweep (Tables 2-6, each when the sweep varies that axis) and the all-trials table.
Pure functions of the AE frame (`ulsweep.report.columns` describes it), no I/O."""
from __future__ import annotations

import math

import pandas as pd

from ulsweep.report.columns import (BIAS, CHANNELS, DECODER, DOWNSAMPLE, IMAGE_SIZE, LF, LOGSNR_Z0, PRIOR,
                                    STOP_GRAD, base_names, generation_metric, metric_label, numeric,
                                    reconstruction_metric, short_param, varied_params)


def _gen_columns(ae: pd.DataFrame) -> dict[str, str]:
    gen = generation_metric(ae)
    if not gen:
        return {}
    return {f"{gen}[{b}]": f"{metric_label(gen)} [{b}]" for b in base_names(ae) if f"{gen}[{b}]" in ae.columns}


def _table(ae: pd.DataFrame, first: dict[str, str], sort: list[str]) -> pd.DataFrame:
    rec = reconstruction_metric(ae)
    cols = {"key": "trial", **first, "bpp": "bits/pixel"}
    if rec:
        cols[rec] = metric_label(rec)
    cols["psnr"] = "PSNR (dB)"
    cols.update(_gen_columns(ae))
    cols = {k: v for k, v in cols.items() if k in ae.columns}
    t = ae.sort_values([s for s in sort if s in ae.columns] or ["key"], kind="stable")[list(cols)]
    return t.rename(columns=cols).reset_index(drop=True)


def _ablation_name(row: pd.Series) -> str:
    parts = []
    if str(row.get(STOP_GRAD)).lower() == "true":
        parts.append("A. stop-grad prior")
    z0 = pd.to_numeric(pd.Series([row.get(LOGSNR_Z0)]), errors="coerce").iloc[0]
    if math.isfinite(z0) and z0 != 5.0:
        parts.append(f"B. λ_z(0) = {z0:g}")
    return " + ".join(parts) or "baseline"


def paper_tables(ae: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Paper-style tables for each axis the sweep varies: Table 2 (loss factor), 3 (latent channels),
    4 (latent shape / downsampling), 5 (prior / decoder type), 6 (ablations A, B). Keys are titles."""
    out: dict[str, pd.DataFrame] = {}
    varied = set(varied_params(ae, [LF, BIAS, CHANNELS, DOWNSAMPLE, PRIOR, DECODER, STOP_GRAD, LOGSNR_Z0]))
    if LF in varied:
        first = ({BIAS: "sigmoid bias"} if BIAS in varied else {}) | {LF: "LF"}
        out["Table 2 · loss factor vs bits/pixel and quality"] = _table(ae, first, [BIAS, LF])
    elif BIAS in varied:
        out["Table 2 · sigmoid bias vs bits/pixel and quality"] = _table(ae, {BIAS: "sigmoid bias"}, [BIAS])
    if CHANNELS in varied:
        out["Table 3 · latent channels"] = _table(ae, {CHANNELS: "# chan"}, [CHANNELS])
    if DOWNSAMPLE in varied:
        a = ae.copy()
        size, down, ch = numeric(a, IMAGE_SIZE), numeric(a, DOWNSAMPLE), numeric(a, CHANNELS)
        a["_shape"] = [f"{int(s // d)}×{int(s // d)}×{int(c)}" if all(map(math.isfinite, (s, d, c))) else "?"
                       for s, d, c in zip(size, down, ch)]
        a["_down"] = down
        out["Table 4 · latent shape (h×w×c)"] = _table(a, {"_shape": "latent shape (h×w×c)",
                                                           DOWNSAMPLE: "downsample"}, ["_down"])
    if varied & {PRIOR, DECODER}:
        a = ae.copy()
        bases = base_names(ae)
        first = {PRIOR: "prior", DECODER: "reconstruction loss", "bpp": "latent bits/pixel (prior)"}
        first |= {f"base_bpp[{b}]": f"latent bits/pixel (base model {b})" for b in bases if f"base_bpp[{b}]" in a}
        out["Table 5 · prior and decoder"] = _table(a, first, [PRIOR, DECODER])
    if varied & {STOP_GRAD, LOGSNR_Z0}:
        a = ae.copy()
        a["_ablation"] = [_ablation_name(r) for _, r in a.iterrows()]
        first = {"_ablation": "ablation"} | {p: short_param(p) for p in (STOP_GRAD, LOGSNR_Z0) if p in varied}
        out["Table 6 · ablations"] = _table(a, first, [STOP_GRAD, LOGSNR_Z0])
    return out


def trials_table(ae: pd.DataFrame) -> pd.DataFrame:
    """Every AE trial: key, status, varied params, the main metrics, MLflow run id."""
    rec, gen = reconstruction_metric(ae), generation_metric(ae)
    cols = ["key", "status"] + varied_params(ae) + [c for c in ("bpp", "bpp_se", rec, "psnr") if c]
    cols += [f"{gen}[{b}]" for b in base_names(ae)] if gen else []
    cols += ["run_id"]
    cols = [c for c in dict.fromkeys(cols) if c in ae.columns]
    names = {c: (short_param(c) if "." in c and "[" not in c else metric_label(c)) for c in cols}
    names |= {"key": "trial", "status": "status", "run_id": "MLflow run"}
    return ae[cols].sort_values("key").rename(columns=names).reset_index(drop=True)
