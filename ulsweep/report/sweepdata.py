"""A sweep's MLflow runs as pandas DataFrames: one row per run, the AE frame with its base models' metrics
joined, the base frame with its AE's, and the trials that failed. `ulsweep.report.columns` describes the
frames; `ulsweep.report.dashboard.resolve_sweep` finds the sweep.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import pandas as pd

from ulsweep import tracking
from ulsweep.report.columns import generation_metric, reconstruction_metric


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
    derived: dict[str, Any] = field(default_factory=dict, repr=False)  # analyses computed once per report
    timeline: pd.DataFrame | None = None  # trials by phase (ulsweep.report.timeline.timeline_frame)


def get_run(c, run_id: str):
    """The MLflow run with id `run_id`, or None (no such run, or not a run id)."""
    if not all(ch in "0123456789abcdef" for ch in run_id.lower()) or len(run_id) < 8:
        return None
    try:
        return c.get_run(run_id)
    except Exception:  # noqa: BLE001 - RESOURCE_DOES_NOT_EXIST and friends
        return None


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
            if k.startswith("system/"):  # MLflow's system metrics: curves in the UI, not a result of the trial
                continue
            row[k if k not in row else f"metric:{k}"] = v
        rows.append(row)
    return pd.DataFrame(rows)


def trials_frames(runs_df: pd.DataFrame, base_order: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(ae, base) frames of `ulsweep.report.plots` from the per-run frame; base models joined in `base_order`
    (the experiment's order) first, then any others by name."""
    if runs_df.empty:
        return pd.DataFrame(columns=["key", "run_id", "status"]), pd.DataFrame(columns=["key", "base", "ae_key"])
    ae, base = _of_kind(runs_df, "ae"), _of_kind(runs_df, "base")
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
        ae_m = ae.set_index("key")[[c for c in ("bpp", "bpp_se", "psnr", reconstruction_metric(ae))
                                    if c and c in ae.columns]]
        base = base.merge(ae_m.rename(columns=lambda c: f"ae/{c}"), left_on="ae_key", right_index=True, how="left")
    return ae, base


def _of_kind(runs_df: pd.DataFrame, kind: str) -> pd.DataFrame:
    """The runs of one kind, without the columns no run of it has, sorted by key. The identity columns stay even
    when no run of that kind exists yet (a sweep stopped before its first base trial)."""
    part = runs_df[runs_df["kind"] == kind]
    keep = {"key", "run_id", "status", "kind", "ae_key"}
    part = part.drop(columns=[c for c in part.columns if c not in keep and part[c].isna().all()])
    return part.sort_values("key").reset_index(drop=True)


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
    gen, rec = generation_metric(base), reconstruction_metric(ae)
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
        parent_run = get_run(c, ref.sweep_id)
    if parent_run is None:
        raise ReportError(f"sweep run {ref.sweep_id} not found in {ref.tracking_uri}")
    trial_runs = [r for r in runs if r.info.run_id != ref.sweep_id]
    runs_df = run_rows(trial_runs)
    ae, base = trials_frames(runs_df, _list_param(parent_run.data.params.get("base_models")))
    parent = {"status": parent_run.info.status, "params": dict(parent_run.data.params),
              "metrics": dict(parent_run.data.metrics), "tags": dict(parent_run.data.tags),
              "artifact_uri": parent_run.info.artifact_uri}
    from ulsweep.report.timeline import timeline_frame

    return SweepData(ref, runs_df, ae, base, parent, failed_trials(ae, base, parent_run.info.status),
                     timeline=timeline_frame(trial_runs))
