"""Where a sweep's time went: each trial's phases (ulsweep/sweep/timeline.py, read from the `ulsweep.timeline`
tag of its MLflow run) as a frame, a Gantt chart, a table of seconds per phase, and the share of the sweep's
wall time during which at least one trial was training.
"""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go

from ulsweep import tracking
from ulsweep.sweep.timeline import PARTS, PHASES, TAG, TAG_PROCESS, parse_tag, process_trial

PHASE_COLORS = {"imports": "#d8b5a5", "tracking": "#9d755d", "start": "#bab0ac", "setup": "#f58518",
                "first_step": "#e45756", "train": "#4c78a8", "evaluate": "#54a24b", "finish": "#b279a2",
                "failed": "#000000"}
PHASE_LABELS = {"imports": "imports (MLflow, torch, Ray Train; older sweeps: in the MLflow run)",
                "tracking": "MLflow run (open, params, datasets)",
                "start": "start (Ray Train, worker; older sweeps: MLflow run too)",
                "setup": "setup (data, latents, networks)", "first_step": "first step (compile)", "train": "train",
                "evaluate": "final evaluation", "finish": "finish (checkpoint, MLflow)", "failed": "failed attempt"}
COLUMNS = ["key", "kind", "attempt", "phase", "start", "end", "seconds", "process_trial"]
PART_LABELS = {"setup_encode_ahead_s": "setup: wait for the latents encoded as the autoencoders were done",
               "setup_checkpoints_s": "setup: read the autoencoders' checkpoints", "setup_data_s": "setup: data",
               "setup_encode_s": "setup: encode the members' latents",
               "setup_encode_read_s": "setup: encode, of it waiting for the images (read, decode)",
               "setup_encode_encoder_s": "setup: encode, of it the encoder",
               "setup_encode_store_s": "setup: encode, of it storing the latents",
               "setup_latents_s": "setup: read the latents back",
               "setup_models_s": "setup: build the stacked networks",
               "first_step_resume_s": "first step: resume, and torch.compile's wrapper (its imports)",
               "train_compile_switch_s": "train: the first compiled step after uncompiled ones (compile from the "
                                         "caches, CUDA graph capture)",
               "evaluate_extractor_s": "final evaluation: load the feature extractors",
               "evaluate_bpp_s": "final evaluation: held-out bits/pixel",
               "evaluate_sampling_s": "final evaluation: sampling (reconstructions / generations)",
               "evaluate_fd_s": "final evaluation: features and Fréchet distances",
               "evaluate_flops_s": "final evaluation: FLOPs count"}


def timeline_frame(runs) -> pd.DataFrame:
    """One row per (trial, attempt, phase) of MLflow runs: key, kind, attempt, phase, start and end (seconds
    since the epoch), seconds, and for the last attempt the number of trials its process had started by then
    (1: a fresh process; missing for earlier attempts and older sweeps). Runs without a timeline tag (sweeps of
    older versions) give no rows."""
    rows = []
    for r in runs:
        tags = r.data.tags
        ph = parse_tag(tags.get(TAG))
        last = max((int(x[0]) for x in ph), default=None)
        n = process_trial(tags.get(TAG_PROCESS))
        for attempt, phase, a, b in ph:
            rows.append({"key": tags.get(tracking.TAG_KEY, r.info.run_name), "kind": tags.get(tracking.TAG_KIND, ""),
                         "attempt": int(attempt), "phase": phase, "start": float(a), "end": float(b),
                         "seconds": float(b) - float(a), "process_trial": n if int(attempt) == last else None})
    return pd.DataFrame(rows, columns=COLUMNS).astype({"process_trial": "Int64"})


def phase_table(tl: pd.DataFrame) -> pd.DataFrame:
    """Trial-seconds per kind and phase: total, share of that kind's trial-seconds, median per trial."""
    g = tl.groupby(["kind", "phase"], sort=False)
    out = pd.DataFrame({"trial-seconds": g["seconds"].sum(), "trials": g["key"].nunique(),
                        "median per trial (s)": g["seconds"].median()}).reset_index()
    out["share of kind"] = out["trial-seconds"] / out.groupby("kind")["trial-seconds"].transform("sum")
    order = {p: i for i, p in enumerate(PHASES)}
    out = out.assign(_o=out["phase"].map(order)).sort_values(["kind", "_o"]).drop(columns="_o")
    return out.reset_index(drop=True)


def union_seconds(intervals) -> float:
    """Length of the union of [a, b] intervals."""
    total, end = 0.0, None
    for a, b in sorted(intervals):
        if end is None or a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def summary(tl: pd.DataFrame) -> dict:
    """Sweep-level numbers of a timeline: span from the first trial start to the last trial end, the seconds
    during which at least one trial was in `train` (and that share of the span), and per kind the median
    seconds from trial start to the end of its first step (ready to train)."""
    if tl.empty:
        return {}
    span = float(tl["end"].max() - tl["start"].min())
    train = union_seconds(zip(tl.loc[tl["phase"] == "train", "start"], tl.loc[tl["phase"] == "train", "end"]))
    out = {"span_s": span, "training_s": train, "training_share": train / span if span > 0 else float("nan")}
    ready = ready_seconds(tl)
    for kind, s in ready.groupby(ready["kind"])["ready_s"]:
        out[f"ready_median_s[{kind}]"] = float(s.median())
        out[f"ready_max_s[{kind}]"] = float(s.max())
    return out


def ready_seconds(tl: pd.DataFrame) -> pd.DataFrame:
    """Per trial (last attempt that reached its first step): seconds from its start to the end of its first
    optimizer step, i.e. until it trains at full speed (start, setup and compilation), and the number of trials
    its process had started (`process_trial`; above 1: a warm, reused process)."""
    rows = []
    for (key, attempt), g in tl.groupby(["key", "attempt"]):
        if "first_step" in set(g["phase"]):
            end = float(g.loc[g["phase"] == "first_step", "end"].iloc[0])
            n = g["process_trial"].iloc[0]
            rows.append({"key": key, "kind": g["kind"].iloc[0], "attempt": attempt, "start": float(g["start"].min()),
                         "ready_s": end - float(g["start"].min()), "process_trial": None if pd.isna(n) else int(n)})
    df = pd.DataFrame(rows, columns=["key", "kind", "attempt", "start", "ready_s", "process_trial"])
    df = df.astype({"process_trial": "Int64"})
    return df.sort_values("attempt").drop_duplicates("key", keep="last").sort_values("start").reset_index(drop=True)


def timeline_figure(tl: pd.DataFrame) -> go.Figure:
    """Gantt chart: one row per trial (attempt), ordered by start, one bar segment per phase; x in seconds
    since the first trial started."""
    t0 = float(tl["start"].min())
    first = tl.groupby(["key", "attempt"])["start"].min().sort_values()
    multi = tl.groupby("key")["attempt"].nunique()
    labels = {(k, a): f"{k} #{a}" if multi[k] > 1 else k for k, a in first.index}
    order = [labels[i] for i in first.index]
    fig = go.Figure()
    for phase in PHASES:
        d = tl[tl["phase"] == phase]
        if d.empty:
            continue
        y = [labels[(k, a)] for k, a in zip(d["key"], d["attempt"])]
        fig.add_trace(go.Bar(
            y=y, x=d["seconds"], base=d["start"] - t0, orientation="h", name=PHASE_LABELS[phase],
            marker=dict(color=PHASE_COLORS[phase]), customdata=[_process_words(n) for n in d["process_trial"]],
            hovertemplate="%{y}<br>" + PHASE_LABELS[phase] + ": %{x:.1f} s, from %{base:.1f} s%{customdata}"
                          "<extra></extra>"))
    fig.update_layout(title="Trials by phase (wall clock since the first trial started)", barmode="overlay",
                      xaxis_title="seconds", height=max(320, 22 * len(order) + 140), legend_title="phase")
    fig.update_yaxes(categoryorder="array", categoryarray=order[::-1])
    return fig


def _process_words(n) -> str:
    """Hover text of a Gantt bar: whether its attempt started its process or found it warm."""
    if pd.isna(n):
        return ""
    return "<br>fresh process" if n == 1 else f"<br>warm process (its trial {n})"


def evaluation_parts(runs: pd.DataFrame) -> pd.DataFrame:
    """Median seconds per part of the trials' final evaluations and of stacked groups' setups (their
    `time/evaluate_<part>_s`, `time/setup_<part>_s` metrics), per kind, with the number of trials that have it;
    empty for sweeps recorded before the parts were timed."""
    cols = [f"time/{p}" for p in PARTS if f"time/{p}" in runs.columns]
    if runs.empty or not cols or "kind" not in runs.columns:
        return pd.DataFrame(columns=["kind", "part", "median per trial (s)", "trials"])
    long = runs[["kind", *cols]].melt(id_vars="kind", var_name="part", value_name="s").dropna()
    long["part"] = long["part"].str.removeprefix("time/")
    g = long.groupby(["kind", "part"], sort=False)["s"]
    out = pd.DataFrame({"median per trial (s)": g.median(), "trials": g.size()}).reset_index()
    order = {p: i for i, p in enumerate(PARTS)}
    return out.assign(_o=out["part"].map(order)).sort_values(["kind", "_o"]).drop(columns="_o").reset_index(drop=True)


def markdown(tl: pd.DataFrame, runs: pd.DataFrame | None = None) -> str:
    """trends.md's section on where the time went (`runs`: the per-run frame, for the final evaluations'
    parts)."""
    s, t = summary(tl), phase_table(tl)
    lines = ["", "## Where the time went", "",
             f"Trials span {s['span_s']:.0f} s from the first start to the last end; at least one trial was training "
             f"(after its first step) for {s['training_s']:.0f} s of them ({100 * s['training_share']:.0f}%).", ""]
    r = ready_seconds(tl)
    if not r.empty:
        parts = [f"{k} {g.median():.1f} s (max {g.max():.1f})" for k, g in r.groupby("kind")["ready_s"]]
        lines += ["Median seconds from a trial's start to the end of its first optimizer step (ready to train): "
                  + ", ".join(parts) + ".", ""]
        warm = r["process_trial"] > 1
        if warm.fillna(False).any():
            by = [f"{what} {g.median():.1f} s ({len(g)} trial{'s' * (len(g) != 1)})" for what, g in
                  (("in warm, reused processes", r.loc[warm.fillna(False), "ready_s"]),
                   ("in fresh ones", r.loc[(r["process_trial"] == 1).fillna(False), "ready_s"])) if len(g)]
            lines += ["Ready to train, median: " + "; ".join(by) + ".", ""]
    lines += ["| kind | phase | trial-seconds | share of kind | median per trial (s) | trials |", "|---|---|---:|---:|---:|---:|"]
    for _, r in t.iterrows():
        lines.append(f"| {r['kind']} | {PHASE_LABELS[r['phase']]} | {r['trial-seconds']:.0f} | "
                     f"{100 * r['share of kind']:.0f}% | {r['median per trial (s)']:.1f} | {r['trials']} |")
    parts = evaluation_parts(runs) if runs is not None else pd.DataFrame()
    if not parts.empty:
        lines += ["", "A stacked group's setup and the final evaluation by part (each part's seconds end with the "
                  "device synchronized):", "",
                  "| kind | part | median per trial (s) | trials |", "|---|---|---:|---:|"]
        lines += [f"| {r['kind']} | {PART_LABELS[r['part']]} | {r['median per trial (s)']:.1f} | {r['trials']} |"
                  for _, r in parts.iterrows()]
    return "\n".join(lines) + "\n"
