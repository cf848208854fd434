"""Sweep figures and tables: pure functions of a trials DataFrame, no I/O.

Input frames (built by `ulsweep.report.trials_frames`):
    ae frame    one row per AE trial: `key`, `run_id`, `status`, flattened config params
                (`ae.loss.loss_factor`, ...), AE metrics (`bpp`, `bpp_se`, `psnr`, `rfd_<x>` | `rfid`, ...)
                and, per base model B, that base trial's metrics as `<metric>[B]` (`gfd_fmnist[small]`).
    base frame  one row per base-model trial: `key`, `ae_key`, `base`, `run_id`, `status`, params,
                base metrics (`gfd_<x>` | `gfid`, `base_bpp`, `gflops_base`, `train_flops`) and the AE's
                metrics prefixed `ae/` (`ae/bpp`).
Metric names follow design.md §2: `gfid`/`rfid` (Inception) are labelled gFID/rFID; a domain-extractor
metric `gfd_fmnist` is labelled "gFD (fmnist features)", never FID.
"""
from __future__ import annotations

import math
import re
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from ulsweep.report.pareto import pareto_front

LF, BIAS = "ae.loss.loss_factor", "ae.loss.sigmoid_bias"
CHANNELS, DOWNSAMPLE, IMAGE_SIZE = "ae.model.latent_channels", "ae.model.downsample", "data.image_size"
PRIOR, DECODER = "ae.loss.prior", "ae.loss.decoder"
STOP_GRAD, LOGSNR_Z0 = "ae.loss.stop_grad_prior", "ae.loss.logsnr_z0"
COLORS = qualitative.Plotly
DASHES = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]
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


# ----------------------------------------------------------------------------------------------
# names and labels


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


def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        if not math.isfinite(v):
            return "n/a"
        return f"{v:.4g}"
    return str(v)


def _hover(row: pd.Series, params: Sequence[str], metrics: Sequence[str]) -> str:
    lines = [f"<b>{row.get('key', '')}</b>"]
    lines += [f"{short_param(p)}: {_fmt(row.get(p))}" for p in params if p in row.index]
    lines += [f"{metric_label(m)}: {_fmt(row.get(m))}" for m in metrics if m in row.index]
    if "run_id" in row.index:
        lines.append(f"MLflow run: {row['run_id']}")
    return "<br>".join(lines)


def _num(df: pd.DataFrame, col: str) -> pd.Series:
    if col not in df.columns:
        return pd.Series(np.nan, index=df.index, dtype=float)
    return pd.to_numeric(df[col], errors="coerce")


def _positive(s: pd.Series) -> bool:
    s = s.dropna()
    return len(s) > 0 and bool((s > 0).all())


def _empty(title: str, msg: str) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(title=title, xaxis_visible=False, yaxis_visible=False,
                      annotations=[dict(text=msg, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")])
    return fig


def _left_out_note(keys: Sequence[str], what: str) -> dict:
    shown = ", ".join(map(str, keys[:8])) + (" …" if len(keys) > 8 else "")
    return dict(text=f"left out ({what}): {shown}", showarrow=False, x=0, y=-0.22, xref="paper", yref="paper",
                xanchor="left", font=dict(size=11, color="#a33"))


# ----------------------------------------------------------------------------------------------
# Fig. 8: quality vs latent bits/pixel, one line per sigmoid bias


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


def fig8_triptych(ae: pd.DataFrame) -> go.Figure:
    """Paper Fig. 8: generation metric (left), reconstruction metric (middle) and PSNR (right) against
    latent bits/pixel (log x, error bars = bpp std. error), one line per sigmoid bias sorted by bits/pixel,
    the loss factor written on the markers. Repeats with another seed are open markers off the lines. With
    several base models the left panel has one line per (bias, base model), dashed by base model."""
    gen, rec = generation_metric(ae), reconstruction_metric(ae)
    bases = base_names(ae) if gen else []
    titles = [f"generation: {metric_label(gen)}" if gen else "generation: (no metric logged)",
              f"reconstruction: {metric_label(rec)}" if rec else "reconstruction: (no metric logged)",
              "reconstruction: PSNR"]
    fig = make_subplots(rows=1, cols=3, subplot_titles=titles, horizontal_spacing=0.07)
    bpp = _num(ae, "bpp")
    if BIAS in ae.columns and ae[BIAS].notna().any():
        biases = sorted(_num(ae, BIAS).dropna().unique())
        groups = [(b, ae[_num(ae, BIAS) == b]) for b in biases]
    else:
        groups = [(None, ae)]
    lf = _num(ae, LF)
    params = [p for p in (LF, BIAS) if p in ae.columns] + varied_params(ae)
    params = list(dict.fromkeys(params))
    panels = [(1, [(f"{gen}[{b}]", b) for b in bases]), (2, [(rec, None)] if rec else []), (3, [("psnr", None)])]
    left_out: set[str] = set()
    repeat = seed_repeats(ae)
    for gi, (bias, g) in enumerate(groups):
        color = COLORS[gi % len(COLORS)]
        name = f"sigmoid bias {bias:g}" if bias is not None else "all trials"
        for col, ycols in panels:
            for bi, (ycol, base) in enumerate(ycols):
                y = _num(g, ycol)
                ok = y.notna() & bpp[g.index].notna()
                left_out |= set(g.loc[~ok, "key"].astype(str)) if "key" in g.columns else set()
                d = g[ok].assign(_x=bpp[g.index][ok], _y=y[ok]).sort_values("_x")
                if d.empty:
                    continue
                tname = name + (f" [{base}]" if base is not None and len(bases) > 1 else "")
                for rep in (False, True):
                    r = d[repeat[d.index] == rep]
                    if r.empty:
                        continue
                    se = _num(r, "bpp_se")
                    fig.add_trace(go.Scatter(
                        x=r["_x"], y=r["_y"], mode="markers" if rep else "lines+markers+text",
                        name=tname + (" (other seed)" if rep else ""), legendgroup=name,
                        showlegend=col == 1 or (col == 2 and not bases),
                        text=[f"LF {v:g}" if math.isfinite(v) else "" for v in lf[r.index]],
                        textposition="top center", textfont=dict(size=9),
                        error_x=dict(type="data", array=se.fillna(0).to_numpy(), visible=bool(se.notna().any())),
                        line=dict(color=color, dash=DASHES[bi % len(DASHES)]),
                        marker=dict(color=color, size=9 if rep else 8, symbol="circle-open" if rep else "circle"),
                        hovertext=[_hover(x, params, ["bpp", "bpp_se", ycol]) for _, x in r.iterrows()],
                        hoverinfo="text"), row=1, col=col)
    xlog = "log" if _positive(bpp) else "linear"
    for col in (1, 2, 3):
        fig.update_xaxes(title_text=metric_label("bpp"), type=xlog, row=1, col=col)
    fig.update_yaxes(title_text=metric_label(gen) if gen else "", row=1, col=1)
    fig.update_yaxes(title_text=metric_label(rec) if rec else "", row=1, col=2)
    fig.update_yaxes(title_text=metric_label("psnr"), row=1, col=3)
    fig.update_layout(title="Quality vs latent bits/pixel (paper Fig. 8): one line per sigmoid bias, "
                            "loss factor on the markers", height=460, legend_title_text="line",
                      margin=dict(b=110))
    if left_out:
        fig.add_annotation(**_left_out_note(sorted(left_out), "no metrics"))
    return fig


# ----------------------------------------------------------------------------------------------
# Pareto fronts


def pareto_figure(ae: pd.DataFrame, x: str = "rec") -> go.Figure:
    """All trials and, per base model, the non-dominated set (both axes minimized) highlighted and connected.

    x = "rec": reconstruction metric (rFD / rFID) vs the generation metric; x = "bpp": latent bits/pixel vs
    the generation metric. Hover: the trial's key, its varied config and its MLflow run id. Trials without
    the two metrics (failed) are left out and named under the plot."""
    gen = generation_metric(ae)
    xcol = reconstruction_metric(ae) if x == "rec" else ("bpp" if x == "bpp" else x)
    bases = base_names(ae) if gen else []
    what = f"{metric_label(xcol) if xcol else 'reconstruction'} vs {metric_label(gen) if gen else 'generation'}"
    if not gen or not xcol or not bases:
        return _empty(f"Pareto front: {what}", "needs a reconstruction / bits-per-pixel metric and a base model's "
                                               "generation metric; none logged")
    params = list(dict.fromkeys([p for p in (LF, BIAS) if p in ae.columns] + varied_params(ae)))
    fig = go.Figure()
    left_out: set[str] = set()
    for bi, base in enumerate(bases):
        ycol = f"{gen}[{base}]"
        d = ae.assign(_x=_num(ae, xcol), _y=_num(ae, ycol))
        res = pareto_front(d, ["_x", "_y"])
        left_out |= set(d.loc[res.excluded, "key"].astype(str)) if "key" in d.columns else set()
        color = COLORS[bi % len(COLORS)]
        valid = d.drop(index=res.excluded)
        hover = {i: _hover(r, params, [xcol, ycol]) for i, r in valid.iterrows()}
        fig.add_trace(go.Scatter(
            x=valid["_x"], y=valid["_y"], mode="markers", name=f"all trials [{base}]", legendgroup=base,
            marker=dict(color=color, size=9, opacity=0.35, line=dict(width=1, color=color)),
            hovertext=[hover[i] for i in valid.index], hoverinfo="text"))
        front = d.loc[res.front]
        fig.add_trace(go.Scatter(
            x=front["_x"], y=front["_y"], mode="lines+markers", name=f"Pareto front [{base}]", legendgroup=base,
            line=dict(color=color, width=2.5), marker=dict(color=color, size=12, symbol="diamond",
                                                          line=dict(width=1.5, color="black")),
            hovertext=["<b>Pareto-optimal</b><br>" + hover[i] for i in front.index], hoverinfo="text"))
    xs = _num(ae, xcol)
    fig.update_xaxes(title_text=metric_label(xcol), type="log" if xcol == "bpp" and _positive(xs) else "linear")
    fig.update_yaxes(title_text=metric_label(gen))
    fig.update_layout(title=f"Pareto front: {what} (lower is better on both; per base model)", height=460,
                      margin=dict(b=110))
    if left_out:
        fig.add_annotation(**_left_out_note(sorted(left_out), "missing metrics"))
    return fig


# ----------------------------------------------------------------------------------------------
# FLOPs vs generation quality (paper Fig. 4)


def flops_figure(base: pd.DataFrame) -> go.Figure:
    """Paper Fig. 4 style: the generation metric against the base model's training FLOPs (left) and its
    forward GFLOP per image (right), log x, one trace per base-model size; with several sizes, a dotted line
    joins the base models trained on the same autoencoder."""
    gen = generation_metric(base)
    if gen is None or base.empty:
        return _empty("Generation quality vs FLOPs", "no base-model trial logged a generation metric")
    if _num(base, "train_flops").isna().all() and _num(base, "gflops_base").isna().all():
        return _empty(f"{metric_label(gen)} vs FLOPs", "no base-model trial logged train_flops or gflops_base")
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.08,
                        subplot_titles=[f"{metric_label(gen)} vs base training FLOPs",
                                        f"{metric_label(gen)} vs base forward GFLOP / image"])
    y = _num(base, gen)
    names = list(dict.fromkeys(base["base"].astype(str))) if "base" in base.columns else ["base"]
    params = [p for p in ("ae_key", LF, BIAS) if p in base.columns]
    params = list(dict.fromkeys(params + varied_params(base)))
    left_out: set[str] = set()
    for col, xcol in ((1, "train_flops"), (2, "gflops_base")):
        x = _num(base, xcol)
        ok = x.notna() & y.notna()
        left_out |= set(base.loc[~ok, "key"].astype(str)) if "key" in base.columns else set()
        d = base[ok].assign(_x=x[ok], _y=y[ok])
        if len(names) > 1 and "ae_key" in d.columns:  # same autoencoder, different base sizes
            first = True
            for _, g in d.sort_values("_x").groupby("ae_key", sort=True):
                if len(g) < 2:
                    continue
                fig.add_trace(go.Scatter(x=g["_x"], y=g["_y"], mode="lines", name="same autoencoder",
                                         legendgroup="same autoencoder", showlegend=first and col == 1,
                                         line=dict(color="#999", dash="dot", width=1), hoverinfo="skip"),
                              row=1, col=col)
                first = False
        for bi, name in enumerate(names):
            g = d[d["base"].astype(str) == name] if "base" in d.columns else d
            g = g.sort_values("_x")
            fig.add_trace(go.Scatter(
                x=g["_x"], y=g["_y"], mode="markers", name=f"base {name}", legendgroup=f"base {name}",
                showlegend=col == 1, marker=dict(color=COLORS[bi % len(COLORS)], size=10),
                hovertext=[_hover(r, params, ["ae/bpp", gen, xcol]) for _, r in g.iterrows()],
                hoverinfo="text"), row=1, col=col)
        fig.update_xaxes(title_text=metric_label(xcol) if xcol != "train_flops" else "base training FLOPs",
                         type="log" if _positive(x) else "linear", exponentformat="power", row=1, col=col)
        fig.update_yaxes(title_text=metric_label(gen), row=1, col=col)
    fig.update_layout(title=f"{metric_label(gen)} vs compute per base-model size (paper Fig. 4; "
                            "autoencoder training not included)", height=460, margin=dict(b=110))
    if left_out:
        fig.add_annotation(**_left_out_note(sorted(left_out), "missing FLOPs or metric"))
    return fig


# ----------------------------------------------------------------------------------------------
# tables (paper Tables 2-6, when the sweep varies that axis)


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
        size, down, ch = _num(a, IMAGE_SIZE), _num(a, DOWNSAMPLE), _num(a, CHANNELS)
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
