"""A compact live view of a sweep (a Tune Callback) and the final summary table."""
from __future__ import annotations

import sys
import time
from typing import Any

from ray.tune import Callback

from ulsweep.tracking import render_table

_SHOW = ("loss", "eval_bpp", "eval_psnr", "bpp", "psnr")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _short(k: str) -> str:
    """Last part of a dotted key, with the section for base-model keys (`base_models.0.train.seed` ->
    `base.seed`), so that an AE and a base-model setting of the same name stay apart."""
    last = k.rsplit(".", 1)[-1]
    return f"base.{last}" if k.startswith("base_models.") else last


class ProgressCallback(Callback):
    """One line per trial event, a status line every `every_s` seconds:

        [  1:05] start  ae-0002  loss_factor=4 sigmoid_bias=-2
        [  1:37] ae-0002  step 150  loss 0.31
        [  2:10] done   ae-0002  bpp 0.021 psnr 17.3  (65 s)
        [  2:10] running 2 | pending 0 | done 3 | failed 0
    """

    def __init__(self, every_s: float = 30.0, result_every_s: float = 20.0, stream=None):
        self.every_s, self.result_every_s = every_s, result_every_s
        self._stream = stream
        self._t0 = None
        self._last_status = 0.0
        self._last_result: dict[str, float] = {}
        self._started: dict[str, float] = {}

    def __getstate__(self):
        d = dict(self.__dict__)
        d["_stream"] = None
        return d

    def _out(self, line: str) -> None:
        if self._t0 is None:
            self._t0 = time.time()
        el = int(time.time() - self._t0)
        print(f"[{el // 60:3d}:{el % 60:02d}] {line}", file=self._stream or sys.stdout, flush=True)

    def setup(self, **info):
        self._t0 = time.time()

    def on_trial_start(self, iteration, trials, trial, **info):
        cfg = trial.config
        self._started[trial.trial_id] = time.time()
        if cfg.get("kind") == "base":
            what = f"base model {cfg.get('base')} on {cfg.get('ae_key')}"
        else:
            what = " ".join(f"{_short(k)}={_fmt(v)}" for k, v in cfg.get("overrides", {}).items())
        self._out(f"start  {cfg.get('key', trial.trial_id):<16} {what}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if result.get("final"):
            return
        now = time.time()
        if now - self._last_result.get(trial.trial_id, 0.0) < self.result_every_s:
            return
        self._last_result[trial.trial_id] = now
        shown = "  ".join(f"{k} {_fmt(result[k])}" for k in _SHOW if k in result)
        self._out(f"       {trial.config.get('key', trial.trial_id):<16} step {result.get('step', '?')}  {shown}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        r = trial.last_result or {}
        keys = [k for k in r if k.startswith(("bpp", "psnr", "rfd", "gfd", "rfid", "gfid", "base_bpp"))
                and not k.endswith("_se")]
        shown = "  ".join(f"{k} {_fmt(r[k])}" for k in sorted(keys))
        took = time.time() - self._started.get(trial.trial_id, time.time())
        self._out(f"done   {trial.config.get('key', trial.trial_id):<16} {shown}  ({took:.0f} s)")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._out(f"FAILED {trial.config.get('key', trial.trial_id):<16} see {trial.error_file or trial.path}")

    def on_step_end(self, iteration, trials, **info):
        now = time.time()
        if now - self._last_status < self.every_s:
            return
        self._last_status = now
        counts: dict[str, int] = {}
        for t in trials:
            counts[t.status] = counts.get(t.status, 0) + 1
        self._out(f"running {counts.get('RUNNING', 0)} | pending {counts.get('PENDING', 0)} | "
                  f"done {counts.get('TERMINATED', 0)} | failed {counts.get('ERROR', 0)}")


def summary_table(records: list[dict], metrics: tuple[str, ...], top: int | None = None) -> str:
    """AE trials, best first: key, searched values, AE metrics, objective(s), status."""
    rows = []
    over_keys: list[str] = []
    for r in records:
        for k in r["overrides"]:
            if k not in over_keys:
                over_keys.append(k)
    for r in records[:top] if top else records:
        row: dict[str, Any] = {"trial": r["key"], "status": r["status"]}
        for k in over_keys:
            row[_short(k)] = r["overrides"].get(k)
        res = r.get("result") or {}
        for k in ("bpp", "psnr"):
            row[k] = res.get(k)
        for k in sorted(res):
            if k.startswith(("rfd_", "rfid")):
                row[k] = res[k]
        for m, v in zip(metrics, r.get("objective") or [None] * len(metrics)):
            row[f"obj:{m}"] = v
        rows.append(row)
    cols: list[str] = []
    for row in rows:
        for k in row:
            if k not in cols:
                cols.append(k)
    return render_table(rows, cols)


class CompletionRelay(Callback):
    """Tells the searcher of every trial that ends, as Tune's controller does through its search algorithm.

    Tune wraps the searcher in a ConcurrencyLimiter (`search.max_concurrent`), which drops the completion of a
    trial that is not in its own set of live trials; after a resume that set, restored from Tune's saved search
    state, can lack a trial Tune restarts itself. The searcher then never heard that the AE trial had finished,
    never queued its base trials and waited for it forever: `--resume` hung after the AE trial's `done` line
    (found by the fault campaign's worker-kill-thrice: a trial killed three times, then --resume). The searcher
    ignores a completion it has handled already, so the limiter's own call and this one make one."""

    def __init__(self, searcher):
        self.searcher = searcher

    def on_trial_complete(self, iteration, trials, trial, **info):
        from ray.tune.utils import flatten_dict

        # as TuneController._schedule_trial_stop: a running trial ends with its last result, a pending one
        # (stopped before it ran) with none
        result = flatten_dict(trial.last_result) if trial.status == "RUNNING" and trial.last_result else None
        self.searcher.on_trial_complete(trial.trial_id, result=result)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.searcher.on_trial_complete(trial.trial_id, error=True)
