"""The dashboard page: a sweep's figures and tables as one self-contained HTML file (plotly.js embedded once,
so it opens offline)."""
from __future__ import annotations

import datetime as _dt
import html
from typing import Any

import pandas as pd

from ulsweep.report import basesize, plots
from ulsweep.report.columns import generation_metric, metric_label
from ulsweep.report.sweepdata import SweepData
from ulsweep.report.tables import paper_tables, trials_table
from ulsweep.tracking.redact import redact_uri


_SECTIONS = {"fig8_quality_vs_bitrate": "Quality vs latent bits/pixel (Fig. 8)",
             "pareto_rec_vs_gen": "Pareto front: reconstruction vs generation",
             "pareto_bpp_vs_gen": "Pareto front: latent bits/pixel vs generation",
             "flops_vs_gen": "Generation quality vs compute (Fig. 4)",
             "base_size_optimum": "Base-model size: generation vs latent bits/pixel, optimum per size (Fig. 6)",
             "base_size_flops_per_bitrate": "Base-model size: generation vs compute per autoencoder bitrate "
                                            "(Fig. 4 reading)",
             "timeline": "Where the time went: trials by phase"}


def build_figures(data: SweepData) -> dict[str, Any]:
    """name -> plotly Figure, in dashboard order; the base-size figures when the sweep has several base sizes,
    the timeline when its trials recorded their phases."""
    figures = {
        "fig8_quality_vs_bitrate": plots.fig8_triptych(data.ae),
        "pareto_rec_vs_gen": plots.pareto_figure(data.ae, x="rec"),
        "pareto_bpp_vs_gen": plots.pareto_figure(data.ae, x="bpp"),
        "flops_vs_gen": plots.flops_figure(data.base),
    }
    bs = basesize.for_sweep(data)
    if bs is not None:
        figures["base_size_optimum"] = plots.optimum_figure(bs)
        figures["base_size_flops_per_bitrate"] = plots.flops_per_bitrate_figure(bs)
    if data.timeline is not None and not data.timeline.empty:
        from ulsweep.report.timeline import timeline_figure

        figures["timeline"] = timeline_figure(data.timeline)
    return figures


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;max-width:1500px}
h1{margin:0 0 6px 0;font-size:24px} h2{margin-top:32px;font-size:18px;border-bottom:1px solid #ddd}
table.meta td{padding:2px 12px 2px 0;vertical-align:top} table.meta td:first-child{color:#666}
table.tbl{border-collapse:collapse;font-size:13px;margin:8px 0} table.tbl th,table.tbl td{padding:3px 9px;
border-bottom:1px solid #e3e3e3;text-align:right;white-space:nowrap} table.tbl th{background:#f4f4f4;
white-space:normal} table.tbl td:first-child{text-align:left}
.failed{color:#a33} code{background:#f4f4f4;padding:1px 4px}
.note{color:#666;font-size:13px}
"""


def _verdicts_html(claims, list_id: str) -> str:
    e = html.escape
    return (f"<ul id='{e(list_id)}'>" + "".join(f"<li><b>{e(c.name)}: {e(c.verdict)}</b> — {e(c.evidence)}</li>"
                                               for c in claims) + "</ul>")


def _table_html(df: pd.DataFrame) -> str:
    return df.to_html(index=False, border=0, classes="tbl", na_rep="—",
                      float_format=lambda v: f"{v:.4g}", escape=True)


def dashboard_html(data: SweepData, figures: dict[str, Any], png_note: str | None = None) -> str:
    """The dashboard page: header, figures (plotly.js embedded once), paper-style tables, all trials."""
    ref, e = data.ref, html.escape
    n_ae, n_base = len(data.ae), len(data.base)
    objective = data.parent["params"].get("search.metrics", "")
    meta = [("sweep", e(ref.name)), ("sweep run id", f"<code>{e(ref.sweep_id)}</code>"),
            ("MLflow experiment", f"<code>{e(ref.experiment_id)}</code>"),
            ("tracking URI", f"<code>{e(redact_uri(ref.tracking_uri))}</code>"),
            ("run directory", f"<code>{e(ref.run_dir or '—')}</code>"),
            ("status", e(data.parent.get("status", "?"))),
            ("trials", f"{n_ae + n_base} ({n_ae} autoencoder, {n_base} base model)"),
            ("objective", e(str(objective))),
            ("failed / incomplete", str(len(data.failed))),
            ("generated", _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S"))]
    if "ulsweep.best_trial" in data.parent["tags"]:
        meta.insert(8, ("best trial", e(data.parent["tags"]["ulsweep.best_trial"])))
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>ulsweep · {e(ref.name)}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>ulsweep sweep report: {e(ref.name)}</h1>",
             "<table class='meta'>" + "".join(f"<tr><td>{k}</td><td>{v}</td></tr>" for k, v in meta) + "</table>"]
    if data.failed:
        parts.append("<h2 class='failed'>Failed or incomplete trials</h2><ul class='failed' id='failed-trials'>"
                     + "".join(f"<li><b>{e(f['key'])}</b> ({e(f['kind'])}): {e(f['reason'])}"
                               f" <span class='note'>run {e(f['run_id'])}</span></li>" for f in data.failed)
                     + "</ul><p class='note'>They are left out of the figures below.</p>")
    if png_note:
        parts.append(f"<p class='note'>{e(png_note)}</p>")
    first = True
    for name, fig in figures.items():
        parts.append(f"<h2>{e(_SECTIONS.get(name, name))}</h2>")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=first, div_id=f"fig-{name}",
                                 config={"displaylogo": False, "responsive": True}))
        first = False
    bs = basesize.for_sweep(data)
    if bs is not None:
        parts.append("<h2>Base-model size → optimal latent bits/pixel</h2>" + _table_html(bs.table)
                     + "<p class='note'>Optimum: quadratic in ln(bits/pixel) per size, interior only when the fit "
                       "falls significantly at the lowest bitrate and rises at the highest; interval: residual "
                       "bootstrap (ulsweep/report/optimum.py). Verdicts (also in trends.md):</p>"
                     + _verdicts_html(bs.claims, "verdicts"))
        for b in basesize.beside_for_sweep(data):
            parts.append(f"<p class='note'>The same by {e(metric_label(b.gen))} (trends.md has its table):</p>"
                         + _verdicts_html(b.claims, f"verdicts-{b.gen}"))
    if data.timeline is not None and not data.timeline.empty:
        from ulsweep.report.timeline import PHASE_LABELS, phase_table

        t = phase_table(data.timeline).assign(phase=lambda d: d["phase"].map(PHASE_LABELS))
        parts.append("<h2>Trial-seconds per phase</h2>" + _table_html(t) + "<p class='note'>From each trial's "
                     "<code>ulsweep.timeline</code> MLflow tag (<a href='timeline.csv'>timeline.csv</a>); GPU "
                     "utilization and memory are each trial's <code>system/</code> metrics in MLflow.</p>")
    for title, table in paper_tables(data.ae).items():
        parts.append(f"<h2>{e(title)}</h2>" + _table_html(table))
    parts.append("<h2>All autoencoder trials</h2>" + _table_html(trials_table(data.ae)))
    if not data.base.empty:
        cols = [c for c in ("key", "base", "status", generation_metric(data.base), "base_bpp", "gflops_base",
                            "train_flops", "ae/bpp", "run_id") if c and c in data.base.columns]
        names = {"key": "trial", "base": "base model", "status": "status", "run_id": "MLflow run",
                 "train_flops": "base training FLOPs"}
        parts.append("<h2>All base-model trials</h2>" + _table_html(
            data.base[cols].rename(columns=lambda c: names.get(c) or metric_label(c))))
    parts.append("<p class='note'>Every trial's params and metrics: <a href='trials.csv'>trials.csv</a> "
                 "(one row per MLflow run), <a href='ae_trials.csv'>ae_trials.csv</a> (one row per autoencoder "
                 "with its base models' metrics).</p></body></html>")
    return "\n".join(parts)
