"""`ulsweep report`: a sweep's MLflow runs -> pandas DataFrames -> a self-contained HTML dashboard + CSVs.

    dashboards/<sweep name>/
      index.html        every figure (plotly.js embedded once: opens offline) and table, header with the
                        sweep's name, parent run id, tracking URI, trial counts and failed trials
      trials.csv        one row per MLflow run of the sweep (AE and base trials): params, final metrics,
                        run ids, parent run ids, status
      ae_trials.csv     one row per AE trial with its base trials' metrics joined as `<metric>[<base>]`
      figures/*.json    the Plotly figures (plotly.io.read_json reloads them)
      figures/*.png     static images (kaleido + Chrome/Chromium), when available
The same folder is logged as artifacts of the sweep's parent run under `dashboard/`.
Figures come from `ulsweep.report.plots` (pure functions); this module does the I/O.
"""
from __future__ import annotations

import datetime as _dt
import html
import logging
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import pandas as pd

from ulsweep import tracking
from ulsweep.report import plots
from ulsweep.sweep.state import STATE_FILE, read_state
from ulsweep.tracking.redact import is_redacted, redact_uri

log = logging.getLogger(__name__)

_CURVE_ONLY = {"step", "loop_seconds", "train_seconds"}  # bookkeeping, kept in trials.csv only


class ReportError(RuntimeError):
    """The sweep cannot be found or read; the message says what to pass."""


@dataclass(frozen=True)
class SweepRef:
    sweep_id: str  # the sweep's MLflow parent run id
    experiment_id: str
    tracking_uri: str
    name: str
    run_dir: str | None = None


@dataclass
class SweepData:
    ref: SweepRef
    runs: pd.DataFrame  # one row per MLflow run of the sweep (parent excluded)
    ae: pd.DataFrame  # one row per AE trial, base metrics joined as <metric>[<base>]
    base: pd.DataFrame  # one row per base trial, AE metrics as ae/<metric>
    parent: dict[str, Any] = field(default_factory=dict)  # status, params, metrics, tags of the parent run
    failed: list[dict[str, str]] = field(default_factory=list)  # {"key", "kind", "status", "reason"}


# ----------------------------------------------------------------------------------------------
# which sweep


def _read_state(run_dir: str) -> dict | None:
    try:
        return read_state(run_dir)
    except (OSError, ValueError):  # unreadable: not a sweep run directory
        return None


def resolve_sweep(sweep: str, tracking_uri: str | None = None) -> SweepRef:
    """A sweep from its run directory (holding sweep.json), its name (./runs/<name>, or a search of the
    tracking store) or its parent run id / the id of any of its runs (needs a tracking URI)."""
    candidates = [sweep, os.path.join("runs", sweep)] if "://" not in sweep else [sweep]
    for d in candidates:
        state = _read_state(d)
        if state is not None:
            run_dir = d if "://" in d else str(Path(d).absolute())
            if not tracking_uri and is_redacted(state["tracking_uri"]):  # sweep.json holds no credentials
                tracking_uri = os.environ.get("MLFLOW_TRACKING_URI")
                if not tracking_uri:
                    raise ReportError(f"sweep {state['sweep_id']} is tracked in {state['tracking_uri']}: pass "
                                      f"--tracking-uri (or set MLFLOW_TRACKING_URI) with its credentials")
            uri = tracking.resolve_tracking_uri(tracking_uri, state["tracking_uri"], run_dir, create=False) \
                if tracking_uri or is_redacted(state["tracking_uri"]) else state["tracking_uri"]
            c = tracking.client(uri)
            name = _sweep_name(c, state["sweep_id"]) or Path(run_dir.rstrip("/")).name
            return SweepRef(state["sweep_id"], state["mlflow_experiment_id"], uri, name, run_dir)
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        raise ReportError(f"{sweep!r} is neither a sweep run directory (with {STATE_FILE}) nor ./runs/{sweep}; "
                          f"to look it up by name or run id pass --tracking-uri (or set MLFLOW_TRACKING_URI)")
    uri = tracking.resolve_tracking_uri(uri, None, ".", create=False)
    c = tracking.client(uri)
    run = _get_run(c, sweep)
    if run is not None:
        tags = run.data.tags
        sweep_id = tags.get(tracking.TAG_SWEEP)
        if not sweep_id:
            raise ReportError(f"run {sweep} in {uri} is not part of an ulsweep sweep (no {tracking.TAG_SWEEP} tag)")
        return SweepRef(sweep_id, run.info.experiment_id, uri, _sweep_name(c, sweep_id) or sweep_id,
                        _run_dir_tag(c, sweep_id))
    from mlflow.entities import ViewType

    exps = [e.experiment_id for e in tracking.retry(c.search_experiments, view_type=ViewType.ACTIVE_ONLY)]
    found = []
    for filt in (f"tags.`{tracking.TAG_KIND}` = 'sweep' and attributes.run_name = 'sweep-{sweep}'",
                 f"tags.`{tracking.TAG_KIND}` = 'sweep' and params.experiment = '{sweep}'"):
        found = tracking.retry(c.search_runs, exps, filter_string=filt, order_by=["attributes.start_time DESC"],
                               max_results=20) if exps else []
        if found:
            break
    if not found:
        raise ReportError(f"no sweep named {sweep!r} (and no run with that id) in {uri}")
    if len(found) > 1:
        print(f"note: {len(found)} sweeps named {sweep!r} in {uri}; reporting the newest, "
              f"{found[0].info.run_id} (pass a run id to choose another)", file=sys.stderr)
    r = found[0]
    return SweepRef(r.info.run_id, r.info.experiment_id, uri, sweep, r.data.tags.get("ulsweep.run_dir"))


def _get_run(c, run_id: str):
    if not all(ch in "0123456789abcdef" for ch in run_id.lower()) or len(run_id) < 8:
        return None
    try:
        return c.get_run(run_id)
    except Exception:  # noqa: BLE001 - RESOURCE_DOES_NOT_EXIST and friends
        return None


def _sweep_name(c, sweep_id: str) -> str | None:
    run = _get_run(c, sweep_id)
    if run is None:
        return None
    name = run.data.params.get("experiment") or run.info.run_name or ""
    return name[len("sweep-"):] if name.startswith("sweep-") else (name or None)


def _run_dir_tag(c, sweep_id: str) -> str | None:
    run = _get_run(c, sweep_id)
    return run.data.tags.get("ulsweep.run_dir") if run else None


# ----------------------------------------------------------------------------------------------
# MLflow -> DataFrames


def _coerce(v: str) -> Any:
    """MLflow params are strings: numbers back to numbers; everything else unchanged."""
    try:
        f = float(v)
    except (TypeError, ValueError):
        return v
    return int(f) if f.is_integer() and v.strip().lstrip("+-").isdigit() else f


def _final_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """Final values: `eval_<m>` (logged by the loop) only where the plain `<m>` (the sweep's final) is absent."""
    out = {k: v for k, v in metrics.items() if not k.startswith("eval_")}
    for k, v in metrics.items():
        if k.startswith("eval_") and k[5:] not in out:
            out[k[5:]] = v
    return out


def run_rows(runs: Iterable) -> pd.DataFrame:
    """One row per MLflow run: identity columns, then params (dotted config keys), then final metrics."""
    rows = []
    for r in runs:
        tags, info = r.data.tags, r.info
        row: dict[str, Any] = {
            "key": tags.get(tracking.TAG_KEY, info.run_name), "kind": tags.get(tracking.TAG_KIND, ""),
            "status": info.status, "run_id": info.run_id, "run_name": info.run_name,
            "parent_run_id": tags.get(tracking.TAG_PARENT, ""), "ae_key": tags.get("ulsweep.ae_key", ""),
            "checkpoint": tags.get(tracking.TAG_CHECKPOINT, ""),
            "start_time": pd.Timestamp(info.start_time, unit="ms") if info.start_time else pd.NaT,
            "end_time": pd.Timestamp(info.end_time, unit="ms") if info.end_time else pd.NaT,
        }
        row.update({k: _coerce(v) for k, v in sorted(r.data.params.items())})
        for k, v in sorted(_final_metrics(r.data.metrics).items()):
            row[k if k not in row else f"metric:{k}"] = v
        rows.append(row)
    return pd.DataFrame(rows)


def trials_frames(runs_df: pd.DataFrame, base_order: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(ae, base) frames of `ulsweep.report.plots` from the per-run frame; base models joined in `base_order`
    (the experiment's order) first, then any others by name."""
    if runs_df.empty:
        return pd.DataFrame(columns=["key", "run_id", "status"]), pd.DataFrame(columns=["key", "base", "ae_key"])
    ae = runs_df[runs_df["kind"] == "ae"].dropna(axis=1, how="all").sort_values("key").reset_index(drop=True)
    base = runs_df[runs_df["kind"] == "base"].dropna(axis=1, how="all").sort_values("key").reset_index(drop=True)
    if not base.empty:
        names = base["base.name"] if "base.name" in base.columns else None
        base["base"] = [str(n) if isinstance(n, str) and n else str(k).rsplit("-", 1)[-1]
                        for n, k in zip(names if names is not None else [None] * len(base), base["key"])]
    seen = list(dict.fromkeys(base["base"])) if not base.empty else []
    bases = [b for b in (base_order or []) if b in seen] + [b for b in seen if b not in (base_order or [])]
    if not base.empty:
        rank = {b: i for i, b in enumerate(bases)}
        base = base.assign(_o=base["base"].map(rank)).sort_values(["ae_key", "_o", "key"]).drop(columns="_o")
        base = base.reset_index(drop=True)
    # AE metrics logged as "<base>/<metric>" copies of the base trials' results: the join below replaces them
    ae = ae.drop(columns=[c for c in ae.columns if "/" in c and c.split("/", 1)[0] in bases])
    metric_cols = [c for c in base.columns if c not in _identity_cols() and "." not in c and c != "base"
                   and c not in ("ae_checkpoint", "ae_key")]
    for name in bases:
        b = base[base["base"] == name].drop_duplicates("ae_key", keep="last").set_index("ae_key")
        join = b[[c for c in metric_cols + ["run_id", "status"] if c in b.columns]]
        join = join.rename(columns=lambda c: f"{c}[{name}]")
        ae = ae.merge(join, left_on="key", right_index=True, how="left")
    if not base.empty and not ae.empty:  # the AE's own results beside each base trial
        ae_m = ae.set_index("key")[[c for c in ("bpp", "bpp_se", "psnr", plots.reconstruction_metric(ae))
                                    if c and c in ae.columns]]
        base = base.merge(ae_m.rename(columns=lambda c: f"ae/{c}"), left_on="ae_key", right_index=True, how="left")
    return ae, base


def _list_param(v: str | None) -> list[str]:
    """A list param as MLflow stored it ("['small', 'medium']") back to a list; [] if it is not one."""
    import ast

    try:
        out = ast.literal_eval(v) if v else []
    except (ValueError, SyntaxError):
        return []
    return [str(x) for x in out] if isinstance(out, (list, tuple)) else []


def _identity_cols() -> set[str]:
    return {"key", "kind", "status", "run_id", "run_name", "parent_run_id", "ae_key", "checkpoint", "start_time",
            "end_time"}


def failed_trials(ae: pd.DataFrame, base: pd.DataFrame, parent_status: str | None = None) -> list[dict[str, str]]:
    """Trials that did not finish, or finished without their key metrics (left out of the figures)."""
    out = []
    gen, rec = plots.generation_metric(base), plots.reconstruction_metric(ae)
    for kind, df, need in (("ae", ae, ["bpp"] + ([rec] if rec else [])), ("base", base, [gen] if gen else [])):
        for _, r in df.iterrows():
            status = str(r.get("status", ""))
            missing = [m for m in need if m not in df.columns or pd.isna(r.get(m))]
            if status == "RUNNING" and parent_status == "RUNNING":
                continue  # the sweep is still going
            if status != "FINISHED":
                reason = f"MLflow status {status}" + (f"; no {', '.join(missing)}" if missing else "")
            elif missing:
                reason = f"no {', '.join(missing)} logged"
            else:
                continue
            out.append({"key": str(r.get("key")), "kind": kind, "status": status, "reason": reason,
                        "run_id": str(r.get("run_id", ""))})
    return out


def load_sweep(ref: SweepRef) -> SweepData:
    c = tracking.client(ref.tracking_uri)
    runs = tracking.sweep_runs(c, ref.experiment_id, ref.sweep_id)
    parent_run = next((r for r in runs if r.info.run_id == ref.sweep_id), None)
    if parent_run is None:
        parent_run = _get_run(c, ref.sweep_id)
    if parent_run is None:
        raise ReportError(f"sweep run {ref.sweep_id} not found in {ref.tracking_uri}")
    trial_runs = [r for r in runs if r.info.run_id != ref.sweep_id]
    runs_df = run_rows(trial_runs)
    ae, base = trials_frames(runs_df, _list_param(parent_run.data.params.get("base_models")))
    parent = {"status": parent_run.info.status, "params": dict(parent_run.data.params),
              "metrics": dict(parent_run.data.metrics), "tags": dict(parent_run.data.tags),
              "artifact_uri": parent_run.info.artifact_uri}
    return SweepData(ref, runs_df, ae, base, parent, failed_trials(ae, base, parent_run.info.status))


# ----------------------------------------------------------------------------------------------
# figures and HTML


_SECTIONS = {"fig8_quality_vs_bitrate": "Quality vs latent bits/pixel (Fig. 8)",
             "pareto_rec_vs_gen": "Pareto front: reconstruction vs generation",
             "pareto_bpp_vs_gen": "Pareto front: latent bits/pixel vs generation",
             "flops_vs_gen": "Generation quality vs compute (Fig. 4)"}


def build_figures(data: SweepData) -> dict[str, Any]:
    """name -> plotly Figure, in dashboard order."""
    return {
        "fig8_quality_vs_bitrate": plots.fig8_triptych(data.ae),
        "pareto_rec_vs_gen": plots.pareto_figure(data.ae, x="rec"),
        "pareto_bpp_vs_gen": plots.pareto_figure(data.ae, x="bpp"),
        "flops_vs_gen": plots.flops_figure(data.base),
    }


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
    for title, table in plots.paper_tables(data.ae).items():
        parts.append(f"<h2>{e(title)}</h2>" + _table_html(table))
    parts.append("<h2>All autoencoder trials</h2>" + _table_html(plots.trials_table(data.ae)))
    if not data.base.empty:
        cols = [c for c in ("key", "base", "status", plots.generation_metric(data.base), "base_bpp", "gflops_base",
                            "train_flops", "ae/bpp", "run_id") if c and c in data.base.columns]
        names = {"key": "trial", "base": "base model", "status": "status", "run_id": "MLflow run",
                 "train_flops": "base training FLOPs"}
        parts.append("<h2>All base-model trials</h2>" + _table_html(
            data.base[cols].rename(columns=lambda c: names.get(c) or plots.metric_label(c))))
    parts.append("<p class='note'>Every trial's params and metrics: <a href='trials.csv'>trials.csv</a> "
                 "(one row per MLflow run), <a href='ae_trials.csv'>ae_trials.csv</a> (one row per autoencoder "
                 "with its base models' metrics).</p></body></html>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------
# PNG export


def find_browser() -> str | None:
    """Chrome/Chromium for kaleido: $BROWSER_PATH, Debian's chromium, Chrome on PATH, kaleido's own download."""
    env = os.environ.get("BROWSER_PATH")
    if env and os.path.isfile(env) and os.access(env, os.X_OK):
        return env
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome"):
        p = shutil.which(name)
        if p:
            return p
    try:
        from choreographer.browsers.chromium import Chromium

        return Chromium.find_browser(skip_local=False)
    except Exception:  # noqa: BLE001 - choreographer missing or changed
        return None


def export_pngs(figures: dict[str, Any], out_dir: str | os.PathLike, width: int = 1400,
                height: int = 520) -> tuple[list[str], str | None]:
    """Write <out_dir>/<name>.png for each figure with kaleido. Returns (paths, None) or ([], why not)."""
    try:
        import kaleido
    except ImportError:
        return [], ("PNG export skipped: kaleido is not installed (pip install 'ulsweep[report]' or "
                    "pip install kaleido); the HTML dashboard does not need it")
    browser = find_browser()
    if browser is None:
        return [], ("PNG export skipped: no Chrome/Chromium found for kaleido (Debian: apt-get install -y "
                    "chromium; or set BROWSER_PATH to a Chrome binary); the HTML dashboard does not need it")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [{"fig": fig, "path": str(out / f"{name}.png"),
             "opts": {"format": "png", "width": width, "height": max(height, int(fig.layout.height or 0))}}
            for name, fig in figures.items()]
    try:
        errors = kaleido.write_fig_from_object_sync(jobs, kopts={"path": browser, "mathjax": False, "timeout": 120},
                                                    cancel_on_error=True)
    except Exception as ex:  # noqa: BLE001 - kaleido/choreographer raise many types
        return [], f"PNG export failed with {browser}: {type(ex).__name__}: {ex}"
    if errors:
        return [], f"PNG export failed with {browser}: {errors}"
    paths = [j["path"] for j in jobs if os.path.isfile(j["path"])]
    return paths, None if len(paths) == len(jobs) else f"PNG export wrote {len(paths)} of {len(jobs)} images"


# ----------------------------------------------------------------------------------------------
# the report


@dataclass
class ReportResult:
    index_html: str
    out_dir: str
    csv: list[str]
    pngs: list[str]
    png_note: str | None
    logged_to_run: str | None  # the parent run id if the artifacts were logged
    data: SweepData


def default_out_dir(name: str) -> str:
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name) or "sweep"
    return str(Path.cwd() / "dashboards" / safe)


def make_report(sweep: str | SweepRef, tracking_uri: str | None = None, out_dir: str | None = None,
                png: bool = True, log_artifacts: bool = True) -> ReportResult:
    ref = sweep if isinstance(sweep, SweepRef) else resolve_sweep(sweep, tracking_uri)
    data = load_sweep(ref)
    out = Path(out_dir or default_out_dir(ref.name)).absolute()
    (out / "figures").mkdir(parents=True, exist_ok=True)
    figures = build_figures(data)
    csvs = [str(out / "trials.csv"), str(out / "ae_trials.csv")]
    data.runs.to_csv(csvs[0], index=False)
    data.ae.to_csv(csvs[1], index=False)
    if not data.ae.empty and "bpp" in data.ae:  # rank trends (Fig. 8 reading) beside the CSVs
        from ulsweep.report import trends

        (out / "trends.md").write_text(trends.markdown(data.ae), encoding="utf-8")
    for name, fig in figures.items():
        (out / "figures" / f"{name}.json").write_text(fig.to_json())
    for stale in (out / "figures").glob("*.png"):
        stale.unlink()
    pngs, note = export_pngs(figures, out / "figures") if png else ([], None)
    index = out / "index.html"
    tmp = out / ".index.html.tmp"
    tmp.write_text(dashboard_html(data, figures, note), encoding="utf-8")
    os.replace(tmp, index)
    logged = None
    if log_artifacts:
        try:
            c = tracking.client(ref.tracking_uri)
            tracking.retry(c.log_artifacts, ref.sweep_id, str(out), "dashboard")
            logged = ref.sweep_id
        except Exception as ex:  # noqa: BLE001 - the local dashboard is still useful
            log.warning("could not log the dashboard to MLflow run %s: %s", ref.sweep_id, ex)
    return ReportResult(str(index), str(out), csvs, pngs, note, logged, data)


def write_report(run_dir_or_sweep: str, tracking_uri: str | None = None, out_dir: str | None = None) -> str:
    """Write the dashboard of a sweep (run directory, name or run id) and return the path of its index.html.
    For the sweep driver: `write_report(outcome.run_dir, outcome.tracking_uri)`."""
    return make_report(run_dir_or_sweep, tracking_uri=tracking_uri, out_dir=out_dir).index_html


__all__ = ["ReportError", "SweepRef", "SweepData", "ReportResult", "resolve_sweep", "load_sweep", "run_rows",
           "trials_frames", "failed_trials", "build_figures", "dashboard_html", "export_pngs", "find_browser",
           "make_report", "write_report", "default_out_dir"]
