"""Rank trends of a sweep, the way Fig. 8 of the paper is read: does the latent bitrate rise with each knob,
do reconstruction and generation follow the bitrate, where is generation best, and how large is seed noise
(with several repeated configurations, their comparison by Welch's t-test: `ulsweep.report.compare`).

Input is the AE frame of `ulsweep.report.sweepdata` (one row per AE trial: config columns with dots, `bpp`, `psnr`,
`rfd_<x>`/`rfid`, base metrics as `<metric>[<base>]`); output is a dict and a Markdown summary. No I/O.
Knobs are the config columns that vary across trials; seed columns (`*.seed`) mark repeats.
"""
from __future__ import annotations

import math
from typing import Any

import pandas as pd

from ulsweep.report import columns, compare
from ulsweep.report.columns import fmt_value as _fmt, key_tail as _short


# Spearman's rank correlation: Pearson's correlation of the (average-tie) ranks.
def spearman(a: pd.Series, b: pd.Series) -> float:
    """rho in [-1, 1]; NaN with fewer than 2 complete pairs or a constant side (2 pairs give +-1)."""
    ok = a.notna() & b.notna()
    if ok.sum() < 2:
        return math.nan
    ra, rb = a[ok].rank(), b[ok].rank()
    if ra.nunique() < 2 or rb.nunique() < 2:
        return math.nan
    return float(ra.corr(rb))


def knobs(ae: pd.DataFrame) -> tuple[list[str], list[str]]:
    """(numeric knobs that vary across trials, seed columns that vary)."""
    # config columns (dotted keys); `search.<key>` repeats the searched keys, which appear as <key> too
    varying = [c for c in ae.columns if "." in c and not c.startswith("search.") and ae[c].nunique(dropna=True) > 1]
    seeds = columns.seed_columns(ae)
    numeric = [c for c in varying if c not in seeds and pd.api.types.is_numeric_dtype(ae[c])]
    return numeric, seeds


def summarize(ae: pd.DataFrame) -> dict[str, Any]:
    """Rank correlations and curves of a finished sweep's AE frame (see the module docstring)."""
    if "status" in ae:
        ae = ae[ae["status"] == "FINISHED"]
    numeric, seeds = knobs(ae)
    prim = ae[~columns.seed_repeats(ae)]  # one row per configuration, repeats with another seed left out
    rec, gen_name = columns.reconstruction_metric(ae), columns.generation_metric(ae)
    bases = columns.base_names(ae)
    gen = f"{gen_name}[{bases[0]}]" if gen_name and bases and f"{gen_name}[{bases[0]}]" in ae else None
    rec2, gen2 = domain_beside(ae, rec, gen)
    out: dict[str, Any] = {"knobs": numeric, "seeds": seeds, "reconstruction": rec, "generation": gen,
                           "domain_reconstruction": rec2, "domain_generation": gen2,
                           "n_trials": len(ae), "bpp_vs_knob": [], "vs_bpp": {}, "generation_curves": [],
                           "repeats": [], "agreement": agreement(prim, numeric, [(rec, rec2), (gen, gen2)])}
    for k in numeric:  # bpp against one knob, the other knobs held fixed
        others = [o for o in numeric if o != k]
        groups = prim.groupby(others, dropna=False) if others else [((), prim)]
        for gkey, g in groups:
            gkey = gkey if isinstance(gkey, tuple) else (gkey,)
            out["bpp_vs_knob"].append({"knob": k, "fixed": dict(zip(others, gkey)), "n": len(g),
                                       "rho": spearman(g[k], g["bpp"])})
    for m in [c for c in ("psnr", rec, rec2, gen, gen2) if c and c in prim]:
        out["vs_bpp"][m] = spearman(prim["bpp"], prim[m])
    if gen and numeric:  # generation against bitrate along the knob with most values, per setting of the others
        axis = max(numeric, key=lambda k: prim[k].nunique())
        others = [k for k in numeric if k != axis]
        groups = prim.groupby(others) if others else [((), prim)]
        for gkey, g in groups:
            gkey = gkey if isinstance(gkey, tuple) else (gkey,)
            if (c := _curve(g, gen)) is not None:
                out["generation_curves"].append({"group": dict(zip(others, gkey)), **c})
        if others and (c := _curve(prim, gen)) is not None:  # every configuration on one bitrate axis
            out["generation_curves"].append({"group": {}, **c})
    if seeds and numeric:
        for cfg, g in ae.groupby(numeric):
            if len(g) > 1:
                cfg = cfg if isinstance(cfg, tuple) else (cfg,)
                cols = [c for c in ("bpp", "psnr", rec, rec2, gen, gen2) if c and c in g]
                out["repeats"].append({"config": dict(zip(numeric, cfg)),
                                       "values": {c: g[c].tolist() for c in cols},
                                       "spread": {c: float(g[c].max() - g[c].min()) for c in cols}})
    out["compared"] = compare.compare(ae, numeric, ["bpp", "psnr", *[c for c in (rec, rec2, gen, gen2) if c]], seeds)
    return out


def domain_beside(ae: pd.DataFrame, rec: str | None, gen: str | None) -> tuple[str | None, str | None]:
    """The domain Fréchet distances logged beside the Inception FIDs (`eval.extractor: both`): (`rfd_<x>`,
    `gfd_<x>[<base>]`) when the primary metrics are `rfid` / `gfid[<base>]`, else None for that side."""
    rec2 = next((c for c in sorted(ae.columns) if c.startswith("rfd_")), None) if rec == "rfid" else None
    gen2 = None
    if gen and gen.startswith("gfid["):
        base = gen[len("gfid"):]  # "[<base>]"
        gen2 = next((c for c in sorted(ae.columns) if c.startswith("gfd_") and c.endswith(base)), None)
    return rec2, gen2


def agreement(prim: pd.DataFrame, knobs_: list[str], pairs: list[tuple[str | None, str | None]]) -> list[dict]:
    """Do two metrics rank the trials alike? Spearman ρ between each (FID, domain FD) pair over all
    configurations, and with two or more knobs also within each value of the knob with the fewest values (the
    others varying inside it: Fig. 8 read per sigmoid bias). Pairs with a missing side are left out."""
    varying = [k for k in knobs_ if prim[k].nunique() > 1]
    slicer = min(varying, key=lambda k: prim[k].nunique()) if len(varying) > 1 else None
    out = []
    for a, b in pairs:
        if not (a and b and a in prim and b in prim):
            continue
        groups = [({}, prim)] + ([({slicer: v}, g) for v, g in prim.groupby(slicer)] if slicer else [])
        for where, g in groups:
            out.append({"a": a, "b": b, "slice": where, "n": int((g[a].notna() & g[b].notna()).sum()),
                        "rho": spearman(g[a], g[b])})
    return out


def _curve(g: pd.DataFrame, gen: str) -> dict[str, Any] | None:
    """Generation against bits/pixel: the points, the best one, whether it lies inside the bitrate range,
    and the rank trend overall and on either side of the best point (each side includes it)."""
    g = g.dropna(subset=[gen]).sort_values("bpp", kind="stable")
    if len(g) < 2:
        return None
    i = int(g[gen].to_numpy().argmin())
    lo, hi = g.iloc[:i + 1], g.iloc[i:]
    return {"bpp": g["bpp"].tolist(), "gen": g[gen].tolist(), "best_bpp": float(g["bpp"].iloc[i]),
            "best_gen": float(g[gen].iloc[i]), "interior": 0 < i < len(g) - 1, "rho": spearman(g["bpp"], g[gen]),
            "rho_below": spearman(lo["bpp"], lo[gen]), "rho_above": spearman(hi["bpp"], hi[gen]),
            "n_below": i, "n_above": len(g) - 1 - i}


def markdown(ae: pd.DataFrame, s: dict[str, Any] | None = None) -> str:
    """The summary as Markdown: per-trial table, rank correlations, generation curves, seed repeats."""
    s = s or summarize(ae)
    rec, gen = s["reconstruction"], s["generation"]
    cols = [*s["knobs"], *s["seeds"]]
    base_time = gen and gen.replace(gen.split("[")[0], "train_seconds")  # train_seconds[<base>]
    metric_cols = [c for c in ("bpp", "bpp_se", "psnr", rec, s["domain_reconstruction"], gen,
                               s["domain_generation"], "train_seconds", base_time) if c and c in ae]
    lines = ["| " + " | ".join([_short(c) for c in cols] + metric_cols) + " |",
             "|" + "---|" * (len(cols) + len(metric_cols))]
    for _, r in ae.sort_values(cols).iterrows():
        lines.append("| " + " | ".join(_fmt(r[c]) for c in cols + metric_cols) + " |")
    lines += ["", f"Spearman rank correlations ({s['n_trials']} trials; repeats with another seed left out):", ""]
    for e in s["bpp_vs_knob"]:
        fixed = ", ".join(f"{_short(k)} = {_fmt(v)}" for k, v in e["fixed"].items())
        lines.append(f"- ρ(bits/pixel, {_short(e['knob'])}){' at ' + fixed if fixed else ''}: {_fmt(e['rho'])} "
                     f"(n = {e['n']})")
    for m, rho in s["vs_bpp"].items():
        lines.append(f"- ρ({m}, bits/pixel): {_fmt(rho)}")
    if s["agreement"]:
        lines += ["", "Inception FID against the domain Fréchet distance (Spearman ρ of the trials' ranks; "
                  "repeats with another seed left out):", ""]
        for e in s["agreement"]:
            where = ", ".join(f"{_short(k)} = {_fmt(v)}" for k, v in e["slice"].items()) or "all trials"
            lines.append(f"- ρ({e['a']}, {e['b']}), {where}: {_fmt(e['rho'])} (n = {e['n']})")
    if s["generation_curves"]:
        lines += ["", f"{gen} against bits/pixel:", ""]
        for c in s["generation_curves"]:
            where = ", ".join(f"{_short(k)} = {_fmt(v)}" for k, v in c["group"].items()) or "all trials"
            pts = ", ".join(f"{b:.4f}→{g:.3g}" for b, g in zip(c["bpp"], c["gen"]))
            sides = (f"; below it {c['n_below']} point(s), ρ = {_fmt(c['rho_below'])}; above it {c['n_above']}, "
                     f"ρ = {_fmt(c['rho_above'])}") if c["interior"] else ""
            lines.append(f"- {where}: {pts}; best {c['best_gen']:.4g} at {c['best_bpp']:.4f} bits/pixel "
                         f"({'interior' if c['interior'] else 'at an end'}; ρ = {_fmt(c['rho'])}{sides})")
    if s["repeats"]:
        lines += ["", "Seed repeats (all seeds of a configuration; spread = max − min):", ""]
        for r in s["repeats"]:
            cfg = ", ".join(f"{_short(k)} = {_fmt(v)}" for k, v in r["config"].items())
            vals = "; ".join(f"{m} {', '.join(_fmt(x) for x in v)} (spread {_fmt(r['spread'][m])})"
                             for m, v in r["values"].items())
            lines.append(f"- {cfg}: {vals}")
    text = "\n".join(lines) + "\n"
    return text + compare.markdown(s["compared"]) if s.get("compared") else text
