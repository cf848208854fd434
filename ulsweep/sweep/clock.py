"""Where a sweep's time outside its trials goes: the driver's own steps, timed.

A sweep's wall is its trials' span plus what the driver does before the first trial starts (the interpreter and
its imports, the data check, MLflow's store, Ray, the groups' actors, the precompile tasks, the Tuner) and after
the last one ends (Ray's shutdown, the outcome, closing the MLflow runs, the summary, the dashboard): on one H200
~22 s before and ~15 s after (session 34), with the GPU idle. `DriverClock` times those steps; the driver writes
them to summary.json (`phases.driver`), tags the sweep's MLflow run with them (`ulsweep.driver_phases`) and prints
them on its last line; `benchmarks/sweep_wall.py` reads them back.
"""
from __future__ import annotations

import json
import os
import time


def process_start_time() -> float | None:
    """When this process started, in seconds since the epoch (to ~10 ms: /proc's clock ticks), or None where
    /proc does not say (not Linux)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # after the command name, which may hold spaces
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        return time.time() - uptime + int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime
    except (OSError, ValueError, IndexError, AttributeError):
        return None


class DriverClock:
    """`mark(name)` ends the driver's step `name`, begun where the previous step ended (the first at the clock's
    creation, `t0`); `phases()` lists the steps in order. `t_process`: when the process began (`process_start_time`),
    which adds the step `before_run` (interpreter, imports, config) ahead of the others."""

    def __init__(self, t_process: float | None = None):
        self.t0 = self._last = time.time()
        self.steps: list[tuple[str, float, float]] = []
        if t_process is not None and t_process <= self.t0:
            self.steps.append(("before_run", t_process, self.t0))

    def mark(self, name: str) -> None:
        now = time.time()
        self.steps.append((name, self._last, now))
        self._last = now

    def phases(self) -> list[dict]:
        """[{"phase", "start" (epoch s), "seconds"}], in the order the steps ran."""
        return [{"phase": n, "start": round(a, 3), "seconds": round(b - a, 3)} for n, a, b in self.steps]

    def line(self) -> str:
        """The steps on one line, e.g. `driver: before_run 7.1 s, check 2.0 s, ...`."""
        return "driver: " + ", ".join(f"{n} {b - a:.1f} s" for n, a, b in self.steps)

    def tag(self) -> str:
        """The steps as the sweep run's `ulsweep.driver_phases` tag: JSON {phase: seconds}, in order."""
        return json.dumps({n: round(b - a, 2) for n, a, b in self.steps})
