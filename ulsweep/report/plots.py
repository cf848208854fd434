"""Sweep figures (paper Fig. 8, Pareto fronts, Fig. 4): pure functions of the trial frames that
`ulsweep.report.columns` describes, returning Plotly figures; no I/O."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.colors import qualitative
from plotly.subplots import make_subplots

from ulsweep.report.columns import (BIAS, LF, base_names, generation_metric, metric_label, numeric,
                                    reconstruction_metric, seed_repeats, short_param, varied_params)
from ulsweep.report.pareto import pareto_front

if TYPE_CHECKING:
    from ulsweep.report.basesize import BaseSizeResult

COLORS = qualitative.Plotly
DASHES = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]


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


def _positive(s: pd.Series) -> bool:
    s = s.dropna()
    return len(s) > 0 and bool((s > 0).all())


def _empty(title: str, msg: str) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(title=title, xaxis_visible=False, yaxis_visible=False,
                      annotations=[dict(text=msg, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper")])
    return fig


def _note_left_out(fig: go.Figure, keys: set[str], what: str) -> None:
    """Name the trials left out of `fig` (the first 8) under the plot; nothing when there are none."""
    if not keys:
        return
    keys = sorted(keys)
    shown = ", ".join(keys[:8]) + (" …" if len(keys) > 8 else "")
    fig.add_annotation(text=f"left out ({what}): {shown}", showarrow=False, x=0, y=-0.22, xref="paper",
                       yref="paper", xanchor="left", font=dict(size=11, color="#a33"))


# ----------------------------------------------------------------------------------------------
# Fig. 8: quality vs latent bits/pixel, one line per sigmoid bias


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
    bpp = numeric(ae, "bpp")
    if BIAS in ae.columns and ae[BIAS].notna().any():
        biases = sorted(numeric(ae, BIAS).dropna().unique())
        groups = [(b, ae[numeric(ae, BIAS) == b]) for b in biases]
    else:
        groups = [(None, ae)]
    lf = numeric(ae, LF)
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
                y = numeric(g, ycol)
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
                    se = numeric(r, "bpp_se")
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
    _note_left_out(fig, left_out, "no metrics")
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
        d = ae.assign(_x=numeric(ae, xcol), _y=numeric(ae, ycol))
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
    xs = numeric(ae, xcol)
    fig.update_xaxes(title_text=metric_label(xcol), type="log" if xcol == "bpp" and _positive(xs) else "linear")
    fig.update_yaxes(title_text=metric_label(gen))
    fig.update_layout(title=f"Pareto front: {what} (lower is better on both; per base model)", height=460,
                      margin=dict(b=110))
    _note_left_out(fig, left_out, "missing metrics")
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
    if numeric(base, "train_flops").isna().all() and numeric(base, "gflops_base").isna().all():
        return _empty(f"{metric_label(gen)} vs FLOPs", "no base-model trial logged train_flops or gflops_base")
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.08,
                        subplot_titles=[f"{metric_label(gen)} vs base training FLOPs",
                                        f"{metric_label(gen)} vs base forward GFLOP / image"])
    y = numeric(base, gen)
    names = list(dict.fromkeys(base["base"].astype(str))) if "base" in base.columns else ["base"]
    params = [p for p in ("ae_key", LF, BIAS) if p in base.columns]
    params = list(dict.fromkeys(params + varied_params(base)))
    left_out: set[str] = set()
    for col, xcol in ((1, "train_flops"), (2, "gflops_base")):
        x = numeric(base, xcol)
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
    _note_left_out(fig, left_out, "missing FLOPs or metric")
    return fig


# ----------------------------------------------------------------------------------------------
# base-model size against latent bitrate (issue 22; paper Table 2, Fig. 6, Fig. 4)


def optimum_figure(res: BaseSizeResult) -> go.Figure:
    """Generation metric against the autoencoder's bits/pixel (log x), one colour per base size: every trial
    (seed repeats included), the fitted quadratic in ln(bits/pixel) over the sampled range, and the optimum as a
    star with its bootstrap interval as a horizontal error bar; a size without an interior optimum says so in
    its legend entry."""
    from ulsweep.report.optimum import fitted_curve

    label = metric_label(res.gen)
    fig = go.Figure()
    d = res.frame
    for i, s in enumerate(res.sizes):
        color, o, g = COLORS[i % len(COLORS)], res.optima[s], d[d["base"] == s].sort_values("bpp")
        gfl = res.gflops.get(s, math.nan)
        name = f"{s}" + (f" ({gfl:.3g} GFLOP)" if math.isfinite(gfl) else "")
        fig.add_trace(go.Scatter(
            x=g["bpp"], y=g["gen"], mode="markers", name=name, legendgroup=s,
            marker=dict(color=color, size=8),
            hovertext=[f"<b>{r.key}</b><br>{r.config}<br>bits/pixel {r.bpp:.4g}<br>{label} {r.gen:.4g}"
                       for r in g.itertuples()], hoverinfo="text"))
        x, y = fitted_curve(o)
        if len(x):
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=f"{s}: fit", legendgroup=s, showlegend=False,
                                     line=dict(color=color, width=2), hoverinfo="skip"))
        if o.interior:
            lo, hi = o.interval
            fig.add_trace(go.Scatter(
                x=[o.best_bpp], y=[o.best_gen], mode="markers", legendgroup=s,
                name=f"{s}: optimum {o.best_bpp:.3g} [{lo:.3g}, {hi:.3g}]",
                marker=dict(color=color, size=16, symbol="star", line=dict(width=1, color="black")),
                error_x=dict(type="data", symmetric=False, array=[hi - o.best_bpp], arrayminus=[o.best_bpp - lo],
                             color=color, thickness=2, width=8),
                hovertext=f"<b>{s}</b>: optimum {o.best_bpp:.4g} bits/pixel, {o.level:.0%} interval "
                          f"[{lo:.4g}, {hi:.4g}]<br>{label} (fit) {o.best_gen:.4g}", hoverinfo="text"))
        else:
            fig.add_trace(go.Scatter(x=[None], y=[None], mode="markers", legendgroup=s,
                                     name=f"{s}: no interior optimum", marker=dict(color=color, symbol="x")))
    fig.update_xaxes(title_text=metric_label("bpp"), type="log")
    fig.update_yaxes(title_text=label)
    fig.update_layout(title=f"{label} vs latent bits/pixel per base-model size: quadratic fit in ln(bits/pixel), "
                            f"optimum with its bootstrap interval", height=520, legend_title_text="base size")
    return fig


def flops_per_bitrate_figure(res: BaseSizeResult) -> go.Figure:
    """Paper Fig. 4 reading: the generation metric against the base model's training FLOPs (forward GFLOP per
    image where training FLOPs are not logged), log x, one line per autoencoder configuration (its bitrate),
    seed repeats averaged with their min-max range as error bars, coloured by bits/pixel (log scale)."""
    from plotly.colors import sample_colorscale

    label = metric_label(res.gen)
    d = res.frame
    xcol = "train_flops" if d["train_flops"].notna().all() else "gflops_base"
    agg = (d.groupby(["config", "base"], sort=False)
            .agg(x=(xcol, "median"), y=("gen", "mean"), ymin=("gen", "min"), ymax=("gen", "max"),
                 bpp=("bpp", "mean"), n=("gen", "size")).reset_index())
    rates = agg.groupby("config")["bpp"].mean().sort_values()
    lb = np.log(rates.to_numpy())
    span = float(lb.max() - lb.min()) or 1.0
    colors = sample_colorscale("Viridis", list((lb - lb.min()) / span))
    fig = go.Figure()
    for (cfg, bpp), color in zip(rates.items(), colors):
        g = agg[agg["config"] == cfg].sort_values("x")
        fig.add_trace(go.Scatter(
            x=g["x"], y=g["y"], mode="lines+markers", name=f"{bpp:.3g} bits/pixel ({cfg})",
            line=dict(color=color, width=2), marker=dict(color=color, size=9),
            error_y=dict(type="data", symmetric=False, array=(g["ymax"] - g["y"]).to_numpy(),
                         arrayminus=(g["y"] - g["ymin"]).to_numpy(), visible=bool((g["n"] > 1).any())),
            text=g["base"], hovertext=[f"<b>{r.base}</b> on {cfg}<br>{bpp:.4g} bits/pixel<br>{label} {r.y:.4g}"
                                       f" (n = {r.n})" for r in g.itertuples()], hoverinfo="text"))
    fig.update_xaxes(title_text="base training FLOPs" if xcol == "train_flops" else metric_label(xcol),
                     type="log", exponentformat="power")
    fig.update_yaxes(title_text=label)
    fig.update_layout(title=f"{label} vs base-model compute, one line per autoencoder bitrate (paper Fig. 4 "
                            f"reading: does a bigger base model pay off more at higher bitrate?)", height=520,
                      legend_title_text="autoencoder")
    return fig
