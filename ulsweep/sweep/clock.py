"""Where a sweep's time outside its trials goes: the driver's own steps, timed.

A sweep's wall is its trials' span plus what the driver does before the first trial starts (its config and data
check, its imports, MLflow's store, Ray, the groups' actors, the precompile tasks, the Tuner) and after
the last one ends (the outcome, closing the MLflow runs, the summary, the dashboard, with Ray's shutdown and the
MPS daemon's stop in a thread beside them): on one H200 ~22 s before and ~15 s after (session 34), with the GPU
idle. `DriverClock` times those steps; the driver writes
them to summary.json (`phases.driver`), tags the sweep's MLflow run with them (`ulsweep.driver_phases`) and prints
them on its last line; `benchmarks/sweep_wall.py` reads them back.
"""
from __future__ import annotations

import json
import os
import time


def process_start_time() -> float | None:
    """When this process started, in seconds since the epoch (to ~10 ms: /proc's clock ticks), or None where
    /proc does not say (not Linux). A process that another `exec`ed into keeps the other's start (a group's actor
    in a worker Ray started earlier, a command a shell ran last in a subshell)."""
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
    creation, `t0`); `phases()` lists the steps in order. `t_command`: when the command began (`ulsweep run`'s
    handler), which adds the step `command` (its imports, config and data check) ahead of the others. Not the process's
    start (`process_start_time`): a process that a shell `exec`s keeps the shell's start time."""

    def __init__(self, t_command: float | None = None):
        self.t0 = self._last = time.time()
        self.steps: list[tuple[str, float, float]] = []
        self.beside_steps: list[tuple[str, float, float]] = []  # steps a thread ran beside these (`beside`)
        if t_command is not None and t_command <= self.t0:
            self.steps.append(("command", t_command, self.t0))

    def mark(self, name: str) -> None:
        now = time.time()
        self.steps.append((name, self._last, now))
        self._last = now

    def beside(self, name: str, start: float, end: float) -> None:
        """A step that ran in a thread beside the marked ones (e.g. Ray's shutdown beside the outcome), from
        `start` to `end` (epoch s): listed apart from them, which stay back to back."""
        self.beside_steps.append((name, start, end))

    def phases(self) -> list[dict]:
        """[{"phase", "start" (epoch s), "seconds"}], in the order the steps ran."""
        return [{"phase": n, "start": round(a, 3), "seconds": round(b - a, 3)} for n, a, b in self.steps]

    def phases_beside(self) -> list[dict]:
        """The steps that ran beside the others (`beside`), as `phases` lists those."""
        return [{"phase": n, "start": round(a, 3), "seconds": round(b - a, 3)} for n, a, b in self.beside_steps]

    def line(self) -> str:
        """The steps on one line, e.g. `driver: command 0.2 s, import_ray 1.0 s, check 0.0 s, ...`, then those that
        ran beside them (`; beside: ray_shutdown 1.4 s`)."""
        line = "driver: " + ", ".join(f"{n} {b - a:.1f} s" for n, a, b in self.steps)
        if self.beside_steps:
            line += "; beside: " + ", ".join(f"{n} {b - a:.1f} s" for n, a, b in self.beside_steps)
        return line

    def tag(self) -> str:
        """The steps as the sweep run's `ulsweep.driver_phases` tag: JSON {phase: seconds}, in order, those that
        ran beside them last, as `<phase> (beside)`."""
        return json.dumps({n: round(b - a, 2) for n, a, b in self.steps}
                          | {f"{n} (beside)": round(b - a, 2) for n, a, b in self.beside_steps})
