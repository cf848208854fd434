"""Fault injection for the fault-tolerance tests and campaign (inert unless its environment variables are set).

    ULSWEEP_FAULT="driver.ae_complete@1,worker.log/ae-0000@9"

Each entry is `POINT[/KEY][@N]`: the process that reaches named point POINT (for trial KEY, if given) for
the N-th time (default 1) kills itself with SIGKILL, as if the machine had taken it away. An entry fires
once: a marker file in ULSWEEP_FAULT_DIR (required with ULSWEEP_FAULT) records it, so a restarted worker
or a resumed driver passes the same point unharmed.

Storage windows (ULSWEEP_FAULT_STORAGE=DIR): while DIR holds a file whose text is `ERRNO PATH` (ERRNO one of
EROFS, ENOSPC, EDQUOT), every write of ulsweep.io under PATH (a path prefix) raises OSError(ERRNO), as a
read-only remount or a full disk would; the window closes when the file is removed. It covers ulsweep's own
files (checkpoints, result.json, failure and attempt records, spools, sweep.json, summary.json), not MLflow's
sqlite store or Ray's files (a real read-only mount or a full tmpfs does: benchmarks/faults/campaign.py).

Training PIDs (ULSWEEP_FAULT_PIDS=DIR): the process that logs a metric point of trial KEY writes its PID to
DIR/KEY.pid (once per process), so that a campaign can SIGKILL it at a moment of its own choosing.

Named points:
    driver.sweep_run     the sweep driver created the sweep's MLflow run, not yet recorded in sweep.json
    driver.ae_result     the sweep driver received an intermediate result of an AE trial (during it)
    driver.ae_complete   the driver recorded a finished AE trial and queued its base trials (between them)
    driver.base_result   the driver received an intermediate result of a base trial (during it)
    worker.log           a training worker logged a metric point (mid-trial; KEY is the trial key)
"""
from __future__ import annotations

import errno
import os
import re
import signal
from collections import Counter

ENV, DIR_ENV, STORAGE_ENV = "ULSWEEP_FAULT", "ULSWEEP_FAULT_DIR", "ULSWEEP_FAULT_STORAGE"
PIDS_ENV = "ULSWEEP_FAULT_PIDS"
_recorded: set = set()
_ENTRY = re.compile(r"^(?P<point>[\w.]+)(?:/(?P<key>[\w.-]+))?(?:@(?P<n>\d+))?$")
_hits: Counter = Counter()


def parse(spec: str) -> list[tuple[str, str | None, int]]:
    """'a@2,b/k' -> [('a', None, 2), ('b', 'k', 1)]; a malformed entry is an error, not silence."""
    out = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        m = _ENTRY.match(entry)
        if m is None:
            raise ValueError(f"{ENV}: cannot parse {entry!r} (expected POINT[/KEY][@N])")
        out.append((m["point"], m["key"], int(m["n"] or 1)))
    return out


def point(name: str, key: str | None = None) -> None:
    """Called by ulsweep at named points; kills this process when an armed entry matches."""
    if key is not None and name == "worker.log" and PIDS_ENV in os.environ:
        _record_pid(key)
    spec = os.environ.get(ENV)
    if not spec:
        return
    _hits[(name, key)] += 1
    _hits[(name, None)] += key is not None
    for p, k, n in parse(spec):
        if p != name or (k is not None and k != key) or _hits[(name, k)] != n:
            continue
        marker = os.path.join(os.environ[DIR_ENV], re.sub(r"[^\w.@-]", "_", f"{p}-{k}@{n}"))
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # fire once, across processes
        except FileExistsError:
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        os.kill(os.getpid(), signal.SIGKILL)


def _record_pid(key: str) -> None:
    if (key, os.getpid()) in _recorded:
        return
    _recorded.add((key, os.getpid()))
    path = os.path.join(os.environ[PIDS_ENV], f"{key}.pid")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(str(os.getpid()))
    os.replace(tmp, path)


def storage(path: str) -> None:
    """Called by ulsweep.io before each write; raises OSError while a storage window covers `path`."""
    root = os.environ.get(STORAGE_ENV)
    if not root:
        return
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return
    target = os.path.abspath(path) if "://" not in path else path
    for name in names:
        try:
            with open(os.path.join(root, name)) as f:
                code, prefix = f.read().split(None, 1)
        except (OSError, ValueError):
            continue  # being written, or removed meanwhile
        if target.startswith(prefix.strip()):
            num = getattr(errno, code)
            raise OSError(num, f"{os.strerror(num)} (injected: {name})", path)
