"""What a finished sweep hands back and leaves behind: its outcome, <run dir>/summary.json, the console
summary and the dashboard."""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from ulsweep import io as uio
from ulsweep.tracking.redact import redact_uri


@dataclass
class SweepOutcome:
    run_dir: str
    tracking_uri: str
    sweep_id: str
    mlflow_experiment_id: str
    records: list[dict]  # searcher AE records (key, overrides, status, result, bases, objective)
    wall_seconds: float
    counts: dict[str, int] = field(default_factory=dict)
    loop_seconds: float = 0.0  # sum over trials of the time spent inside the training loops
    trial_results: list[dict] = field(default_factory=list)
    finished: bool = True  # False: the search was stopped before its end (Ctrl-C); --resume continues it

    @property
    def ok(self) -> bool:
        return self.finished and all(r["status"] == "done" for r in self.records)

    @property
    def status(self) -> str:
        """The sweep run's MLflow status: FINISHED, FAILED (a trial failed) or KILLED (stopped before its end)."""
        if not self.finished:
            return "KILLED"
        return "FINISHED" if self.ok else "FAILED"


def trial_results(grid) -> tuple[list[dict], float]:
    """Per Tune trial: its timings, key, kind and error line; and the time all finished loops took."""
    from ulsweep.sweep.worker import error_line

    results, loop_s = [], 0.0
    for r in grid:
        m = r.metrics or {}
        if m.get("final"):
            loop_s += float(m.get("loop_seconds", 0.0))
        cfg = r.config or {}
        results.append({k: m.get(k) for k in ("loop_seconds", "train_seconds", "step")}
                       | {"key": cfg.get("key"), "kind": cfg.get("kind"),
                          "error": error_line(r.error)[:500] if r.error else None})
    return results, loop_s


def write_summary(outcome: SweepOutcome, ranked: list[dict], phases: dict[str, float]) -> None:
    """<run dir>/summary.json: counts, phases, the AE trials best first, each with its base trials."""
    summary = {"run_dir": outcome.run_dir, "tracking_uri": redact_uri(outcome.tracking_uri),
               "sweep_id": outcome.sweep_id, "finished": outcome.finished, "wall_seconds": outcome.wall_seconds,
               "phases": phases,
               "counts": outcome.counts, "best": [r["key"] for r in ranked],
               "trials": [{k: r[k] for k in ("key", "overrides", "status", "objective")} |
                          {"ae_metrics": r["result"], "bases": r["bases"]} for r in outcome.records]}
    uio.atomic_write_text(f"{outcome.run_dir}/summary.json", json.dumps(summary, indent=1, default=str))


def print_summary(outcome: SweepOutcome, ranked: list[dict], metrics: tuple[str, ...], out) -> None:
    """The trial table (best first, then trials without an objective), failed trials, where to look."""
    from ulsweep.sweep.progress import summary_table

    no_objective = [r for r in outcome.records if r["objective"] is None]
    print("\n" + summary_table(ranked + no_objective, metrics), file=out)
    succeeded = {f.get("key") for f in outcome.trial_results if not f["error"]}  # e.g. re-run by a resume
    for f in outcome.trial_results:
        if f["error"] and f.get("key") not in succeeded:
            print(f"failed trial {f.get('key')}: {f['error'][:300]}", file=out)
    print(f"{outcome.counts}  wall {outcome.wall_seconds:.0f} s\n  run dir  {outcome.run_dir}\n"
          f"  mlflow   {redact_uri(outcome.tracking_uri)}\n  browse   ulsweep ui {outcome.run_dir}", file=out,
          flush=True)


def write_dashboard(outcome: SweepOutcome, out) -> None:
    """The sweep's dashboard (HTML + CSV, no PNGs: `ulsweep report` adds them); never fails the sweep."""
    from ulsweep.report.dashboard import make_report

    try:
        res = make_report(outcome.run_dir, tracking_uri=outcome.tracking_uri, png=False)
    except Exception as e:  # a report problem must not turn a finished sweep into a failure
        print(f"  dashboard not written ({type(e).__name__}: {e}); retry with: ulsweep report {outcome.run_dir}",
              file=out, flush=True)
        return
    print(f"  dashboard {res.index_html}", file=out, flush=True)
