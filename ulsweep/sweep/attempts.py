"""The attempts of one trial, for the retry budget of its Tune trial: `<run dir>/trials/<key>/attempts.jsonl`.

Tune retries a failed trial up to `search.max_failures + resources.max_worker_failures` times (FailureConfig
of the whole sweep), and cannot tell why an attempt ended. The trial process can, from this ledger: every
attempt appends a `start` line and, when it ends in an exception it caught, an `end` line. At the start of
the next attempt of the same driver session (a resumed sweep starts a new session and a new budget):

    an attempt that ended with a deterministic error   (failure.json: NaN loss, bad checkpoint, config or data
                                                         error) -> fail at once, never train again
    attempts that ended in an exception                 -> at most search.max_failures of them are retried
    attempts that never ended (their process died: a   -> at most resources.max_worker_failures of them are
      SIGKILLed, OOM-killed or crashed training process)    retried (-1: no limit)

So a training process killed twice resumes twice from its last checkpoint (both in Ray Train's local mode,
where the loop runs in the trial process, and in worker mode, where a dead worker is restarted by Ray Train
inside one attempt and the trial process itself dying is what counts here), while a NaN trial is still
never retrained. The ledger is advisory: a line that cannot be written is logged and skipped.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

from ulsweep import io as uio

log = logging.getLogger(__name__)

LEDGER = "attempts.jsonl"


class RetryRefused(RuntimeError):
    """A Tune retry of a trial that has used up its budget, or whose last error would recur; the message
    says which. `record` is the failure.json record when a deterministic failure is the reason."""

    def __init__(self, message: str, record: dict | None = None):
        super().__init__(message)
        self.record = record

    def __reduce__(self):  # crosses Ray process boundaries with its record
        return (type(self), (str(self), self.record))


@dataclass(frozen=True)
class Tally:
    """What the earlier attempts of this session came to."""

    errors: list[str]  # error lines of attempts that ended in an exception
    deaths: int  # attempts that started and never ended
    deterministic: str | None  # the error of an attempt that ended in a deterministic failure


def _path(trial_dir: str) -> str:
    return f"{trial_dir.rstrip('/')}/{LEDGER}"


def _append(trial_dir: str, rec: dict) -> None:
    try:
        uio.append_text(_path(trial_dir), json.dumps(rec) + "\n")
    except Exception as e:  # noqa: BLE001 - the ledger must never fail a trial
        log.warning("could not record attempt %s in %s: %s", rec.get("attempt"), trial_dir, e)


def begin(trial_dir: str, session: str, attempt: str) -> None:
    _append(trial_dir, {"session": session, "attempt": attempt, "start": time.time()})


def end(trial_dir: str, session: str, attempt: str, error: str, deterministic: bool) -> None:
    _append(trial_dir, {"session": session, "attempt": attempt, "end": time.time(), "error": error[:2000],
                        "deterministic": deterministic})


def tally(trial_dir: str, session: str, attempt: str) -> Tally:
    """The attempts of `session` before `attempt` (torn or foreign lines are skipped)."""
    try:
        text = uio.read_bytes(_path(trial_dir)).decode(errors="replace")
    except FileNotFoundError:
        return Tally([], 0, None)
    started, ended = [], {}
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict) or rec.get("session") != session or rec.get("attempt") == attempt:
            continue
        if "start" in rec:
            started.append(rec.get("attempt"))
        elif "end" in rec:
            ended[rec.get("attempt")] = rec
    errors = [str(ended[a].get("error")) for a in started if a in ended]
    deterministic = next((str(ended[a].get("error")) for a in started if a in ended
                          and ended[a].get("deterministic")), None)
    return Tally(errors, sum(a not in ended for a in started), deterministic)


def check_budget(trial_dir: str, session: str, attempt: str, key: str, max_failures: int,
                 max_deaths: int, failure: dict | None) -> None:
    """RetryRefused when this attempt must not train (see the module docstring); `failure` is the trial's
    failure.json record, if any."""
    t = tally(trial_dir, session, attempt)
    if t.deterministic is not None:
        rec = failure if failure and failure.get("error") == t.deterministic else None
        raise RetryRefused(f"{key}: not retried, a retry would fail the same way: {t.deterministic}", rec)
    if len(t.errors) > max_failures:
        raise RetryRefused(f"{key}: failed {len(t.errors)} time(s), search.max_failures={max_failures}; last "
                           f"error: {t.errors[-1]}")
    if 0 <= max_deaths < t.deaths:
        raise RetryRefused(f"{key}: its training process died {t.deaths} time(s) (killed, out of memory or "
                           f"crashed), resources.max_worker_failures={max_deaths}")
