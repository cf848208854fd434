"""Metric curves to MLflow that survive a tracking-server outage and a restarted training loop.

`MetricBuffer.add(step, metrics)` only appends to memory: a background thread sends the points in
batches (every `flush_s` seconds, at `max_items`, or on `flush()`), so training never waits on MLflow.
A batch that fails (server down, HTTP 5xx, connection refused) stays queued and is retried with backoff
until it goes through. `spool()` writes what is still queued to a JSONL file under `spool_dir` (one new
file each time, written atomically) and forgets it; `replay_spools` sends such files later (the sweep
driver does, at its start and end) and deletes them. So every point is, at any time, in memory, in
MLflow, or on disk.

Resumed loops re-run the steps between their checkpoint and the point where they stopped. With
`dedupe=True` a point is dropped when MLflow already holds a point of that key at that step or later
(the high-water mark is read from the run before the first send and follows every point sent since), so a
curve has one point per step: no duplicates, and no rewind past what was already logged.
"""
from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from typing import Any, Mapping

log = logging.getLogger(__name__)

_BATCH = 1000  # MLflow's log_batch limit on metrics


def is_number(v: Any) -> bool:
    """A metric value MLflow takes: an int or float, not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class MetricBuffer:
    def __init__(self, c, run_id: str, flush_s: float = 10.0, max_items: int = 900, prefix: str = "",
                 dedupe: bool = False, spool_dir: str | None = None, max_backoff_s: float = 30.0):
        self.c, self.run_id, self.flush_s, self.max_items, self.prefix = c, run_id, flush_s, max_items, prefix
        self.spool_dir, self.max_backoff_s = spool_dir, max_backoff_s
        self._dedupe = dedupe
        self._hwm: dict[str, int] | None = None  # dedupe: highest step of each key in MLflow, read on first send
        self._pending: list = []  # mlflow.entities.Metric, oldest first
        self._cv = threading.Condition()
        self._last = time.monotonic()
        self._want = False  # flush requested
        self._retry_at = 0.0
        self._closed = False
        self._outage_since: float | None = None
        self.sent = self.dropped_duplicates = self.failed_attempts = 0
        self._thread = threading.Thread(target=self._sender, daemon=True, name=f"mlflow-buffer-{run_id[:8]}")
        self._thread.start()

    # ------------------------------------------------------------------ producer side
    def add(self, step: int, metrics: Mapping[str, Any]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [Metric(self.prefix + k, float(v), ts, int(step)) for k, v in metrics.items() if is_number(v)]
        with self._cv:
            self._pending += items
            if len(self._pending) >= self.max_items or time.monotonic() - self._last >= self.flush_s:
                self._cv.notify_all()

    def flush(self, timeout: float | None = 60.0) -> bool:
        """Send everything queued now; wait up to `timeout` s. True when nothing is left in memory."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            self._want = True
            self._cv.notify_all()
            while self._pending and not self._closed:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._cv.wait(timeout=0.5 if left is None else min(left, 0.5))
            return not self._pending

    def spool(self) -> int:
        """Write the queued points to a new JSONL file under spool_dir and forget them; returns how many.
        Without a spool_dir the points stay queued."""
        from ulsweep import io as uio

        with self._cv:
            items = list(self._pending)
            if not items or not self.spool_dir:
                return 0
            lines = [json.dumps({"run_id": self.run_id, "key": m.key, "value": m.value, "timestamp": m.timestamp,
                                 "step": m.step}) for m in items]
            name = f"{int(time.time() * 1000)}-{os.getpid()}-{uuid.uuid4().hex[:8]}.jsonl"
            uio.atomic_write_text(f"{self.spool_dir.rstrip('/')}/{name}", "\n".join(lines) + "\n")
            del self._pending[:len(items)]
            self._cv.notify_all()
        log.warning("MLflow unreachable: %d metric point(s) of run %s spooled to %s", len(items), self.run_id,
                    self.spool_dir)
        return len(items)

    def close(self, timeout: float = 30.0) -> int:
        """Flush for up to `timeout` s, spool what is left, stop the sender. Returns the points spooled."""
        self.flush(timeout)
        n = self.spool()
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        return n

    @property
    def pending(self) -> int:
        with self._cv:
            return len(self._pending)

    # ------------------------------------------------------------------ sender thread
    def _due(self, now: float) -> bool:
        if not self._pending or now < self._retry_at:
            return False
        return self._want or len(self._pending) >= self.max_items or now - self._last >= self.flush_s

    def _sender(self) -> None:
        backoff = 0.5
        while True:
            with self._cv:
                while not self._closed and not self._due(time.monotonic()):
                    self._cv.wait(timeout=0.25)
                if self._closed:
                    return
                batch = self._pending[:_BATCH]
            try:
                kept = self._send(batch)
            except Exception as e:  # noqa: BLE001 - any transport or server error: keep the points, retry
                with self._cv:
                    self.failed_attempts += 1
                    self._retry_at = time.monotonic() + backoff
                    if self._outage_since is None:
                        self._outage_since = time.monotonic()
                        log.warning("MLflow log_batch for run %s failed (%s: %s); %d point(s) kept, retrying",
                                    self.run_id, type(e).__name__, str(e)[:200], len(self._pending))
                backoff = min(backoff * 2, self.max_backoff_s)
                continue
            with self._cv:
                if self._closed:
                    return
                ids = {id(m) for m in batch}  # spool() may have taken them meanwhile: remove by identity
                self._pending = [m for m in self._pending if id(m) not in ids]
                self.sent += kept
                self.dropped_duplicates += len(batch) - kept
                self._last, self._retry_at, backoff = time.monotonic(), 0.0, 0.5
                if self._outage_since is not None:
                    log.warning("MLflow reachable again for run %s after %.0f s", self.run_id,
                                time.monotonic() - self._outage_since)
                    self._outage_since = None
                if not self._pending:
                    self._want = False
                self._cv.notify_all()

    def _send(self, batch: list) -> int:
        if not self._dedupe:
            self.c.log_batch(self.run_id, metrics=batch)
            return len(batch)
        if self._hwm is None:  # what the run already holds (a resumed loop re-runs steps)
            self._hwm = high_water_marks(self.c, self.run_id)
        hwm, fresh = dict(self._hwm), []
        for m in batch:  # oldest first; what this buffer sent counts too (a final value at the curve's last step)
            if m.step > hwm.get(m.key, -1):
                fresh.append(m)
                hwm[m.key] = m.step
        if fresh:
            self.c.log_batch(self.run_id, metrics=fresh)
        self._hwm = hwm  # only once MLflow holds them
        return len(fresh)


def high_water_marks(c, run_id: str) -> dict[str, int]:
    """Highest logged step of every metric key of a run (MLflow's latest metric is the one of max step)."""
    run = c.get_run(run_id)
    objs = getattr(run.data, "_metric_objs", None)
    if objs is not None:
        return {m.key: int(m.step) for m in objs}
    return {k: max(int(m.step) for m in c.get_metric_history(run_id, k)) for k in run.data.metrics}


def replay_spools(c, root: str, pattern: str = "trials/*/mlflow-spool/*.jsonl") -> int:
    """Send the spooled points under `root` that MLflow does not hold yet (same key and step), delete
    each file once sent. Unreadable lines (a file cut short) are skipped. Returns the points sent."""
    from mlflow.entities import Metric

    from ulsweep import io as uio

    fs, base = uio.filesystem(root)
    sent = 0
    for path in sorted(fs.glob(f"{base.rstrip('/')}/{pattern}")):
        by_run: dict[str, list] = {}
        for line in fs.cat_file(path).decode(errors="replace").splitlines():
            try:
                d = json.loads(line)
                by_run.setdefault(d["run_id"], []).append(Metric(d["key"], float(d["value"]), int(d["timestamp"]),
                                                                 int(d["step"])))
            except (ValueError, KeyError, TypeError):
                continue
        for run_id, items in by_run.items():
            have: dict[str, set[int]] = {}
            for key in {m.key for m in items}:
                have[key] = {int(m.step) for m in c.get_metric_history(run_id, key)}
            fresh = [m for m in items if m.step not in have[m.key]]
            for i in range(0, len(fresh), _BATCH):
                c.log_batch(run_id, metrics=fresh[i:i + _BATCH])
            sent += len(fresh)
        fs.rm(path)
    return sent
