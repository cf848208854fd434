"""`ulsweep report`: a sweep's MLflow runs -> pandas DataFrames -> a self-contained HTML dashboard + CSVs.

    dashboards/<sweep name>/
      index.html        every figure (plotly.js embedded once: opens offline) and table, header with the
                        sweep's name, parent run id, tracking URI, trial counts and failed trials
      trials.csv        one row per MLflow run of the sweep (AE and base trials): params, final metrics,
                        run ids, parent run ids, status
      ae_trials.csv     one row per AE trial with its base trials' metrics joined as `<metric>[<base>]`
      figures/*.json    the Plotly figures (plotly.io.read_json reloads them)
      figures/*.png     static images (kaleido + Chrome/Chromium), when available
      trends.md         rank trends of the Fig. 8 reading; with several base sizes also the optimal bitrate per
                        size and a verdict per claim of the paper (ulsweep/report/basesize.py)
      base_size.json    those optima and verdicts as JSON (only with several base sizes); `beside`: the same
                        by each domain FD the base trials logged
The same folder is logged as artifacts of the sweep's parent run under `dashboard/`.

This module finds the sweep (`resolve_sweep`) and writes the folder (`make_report`). The DataFrames come
from `ulsweep.report.sweepdata`, the figures from `plots`, the tables from `tables`, the page from `page`,
the PNGs from `png`.
"""
from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from ulsweep import tracking
from ulsweep.report.columns import metric_label
from ulsweep.report.page import build_figures, dashboard_html
from ulsweep.report.png import export_pngs, find_browser
from ulsweep.report.sweepdata import (ReportError, SweepData, SweepRef, failed_trials, get_run, load_sweep,
                                      run_rows, trials_frames)
from ulsweep.sweep.state import STATE_FILE, read_state
from ulsweep.tracking.redact import is_redacted

log = logging.getLogger(__name__)



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
    run = get_run(c, sweep)
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


def _sweep_name(c, sweep_id: str) -> str | None:
    run = get_run(c, sweep_id)
    if run is None:
        return None
    name = run.data.params.get("experiment") or run.info.run_name or ""
    return name[len("sweep-"):] if name.startswith("sweep-") else (name or None)


def _run_dir_tag(c, sweep_id: str) -> str | None:
    run = get_run(c, sweep_id)
    return run.data.tags.get("ulsweep.run_dir") if run else None


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
    from ulsweep.report import basesize, trends

    bs = basesize.for_sweep(data)
    md = trends.markdown(data.ae) if not data.ae.empty and "bpp" in data.ae else ""  # Fig. 8 reading
    if bs is not None:  # base-model size against bitrate (Table 2, Fig. 6), verdicts per claim
        md += basesize.markdown(bs)
        beside = basesize.beside_for_sweep(data)  # the same verdicts by each domain FD
        for b in beside:
            md += basesize.markdown(b, f"## Base-model size and latent bitrate by {metric_label(b.gen)}")
        summary = {**basesize.summary(bs), "beside": [basesize.summary(b) for b in beside]}
        (out / "base_size.json").write_text(json.dumps(summary, indent=2) + "\n")
    elif (out / "base_size.json").exists():  # from an earlier report of another sweep into this folder
        (out / "base_size.json").unlink()
    if data.timeline is not None and not data.timeline.empty:  # trials by phase
        from ulsweep.report import timeline

        md += timeline.markdown(data.timeline, data.runs)
        data.timeline.to_csv(out / "timeline.csv", index=False)
        csvs.append(str(out / "timeline.csv"))
    if md:
        (out / "trends.md").write_text(md, encoding="utf-8")
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
