"""Shared pieces of the fault suite: tiny sweeps with the fake training loops, drivers run as `ulsweep run`
subprocesses (like a user) with a Ray temp dir of their own, cleanup of exactly what they started, and
MLflow inspection."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import yaml

from ulsweep import tracking
from ulsweep.config import experiment_from_dict
from ulsweep.sweep.driver import RAY_ENV_DEFAULTS

STEPS = 30  # fake loop steps per trial
LOG_EVERY = 2
CKPT_EVERY = 10


def fake_experiment(name: str, n_ae: int = 3, bases=("tiny",), num_workers: int = 0, steps: int = STEPS,
                    **resources) -> dict:
    train = {"steps": steps, "batch_size": 8, "log_every": LOG_EVERY, "ckpt_every": CKPT_EVERY}
    d = {
        "name": name,
        "data": {"path": "builtin:digits", "image_size": 16},
        "ae": {"train": train},
        "base_models": [{"name": b, "train": train} for b in bases],
        "search": {"method": "grid", "space": {"ae.loss.loss_factor": {"values": [1.5, 4.0, 2.0, 3.0][:n_ae]}},
                   "metrics": ["gfd_fake"] if bases else ["bpp"], "modes": ["min"], "max_concurrent": 2},
        "resources": {"num_workers": num_workers, "cpus_per_worker": 0.99, **resources},
    }
    experiment_from_dict(d)  # a bad test config fails here, not in a subprocess
    return d


def write_yaml(tmp_path: Path, d: dict) -> Path:
    p = tmp_path / f"{d['name']}.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "ulsweep.cli", "run", *map(str, args), "--train-impl", "fake"]


@contextmanager
def sandbox(tmp_path: Path, step_s: float = 0.05):
    """(env, ray_tmp): an environment whose Ray lives under a short temp dir of its own (unix socket paths
    must stay short) and whose fault markers go to tmp_path/faults. On exit every process whose command
    line or environment names that temp dir is killed, and the dir removed."""
    ray_tmp = tempfile.mkdtemp(prefix="ulf-", dir="/tmp")
    (tmp_path / "faults").mkdir(exist_ok=True)
    env = dict(os.environ)
    # and what an in-process sweep earlier in this pytest worker left in its environment (the driver sets them for
    # its Ray, so each driver here sets them itself): RAY_LOGGER_LEVEL there at a driver's start silenced Tune's
    # INFO lines in it, which a test read (one CI run)
    for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "ULSWEEP_FAULT", "ULSWEEP_FAKE_NAN", "ULSWEEP_FAKE_FAIL",
              *RAY_ENV_DEFAULTS):
        env.pop(k, None)
    env.update({"RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", "RAY_TMPDIR": ray_tmp,
                "ULSWEEP_FAULT_DIR": str(tmp_path / "faults"), "ULSWEEP_FAKE_STEP_S": str(step_s)})
    try:
        yield env, ray_tmp
    finally:
        left = reap(ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)
        assert not left, f"processes of this test still alive after SIGKILL: {left}"


def pids_of(ray_tmp: str) -> list[int]:
    """Processes started for this test: their command line or environment names its Ray temp dir."""
    out, me = [], os.getpid()
    needle = ray_tmp.encode()
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == me:
            continue
        try:
            if needle in (p / "cmdline").read_bytes() or needle in (p / "environ").read_bytes():
                out.append(int(p.name))
        except OSError:
            continue
    return out


def reap(ray_tmp: str, wait_s: float = 10.0) -> list[int]:
    """SIGKILL the processes of this test (by PID) until none is left; returns any that survived."""
    deadline = time.time() + wait_s
    while True:
        pids = pids_of(ray_tmp)
        if not pids or time.time() > deadline:
            return pids
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)


def run_driver(args: list[str], env: dict, cwd: Path, log: Path, timeout: float = 300,
               fault: str | None = None) -> subprocess.CompletedProcess:
    """`ulsweep run ...` to its end (or its injected SIGKILL); output appended to `log`."""
    e = dict(env)
    if fault:
        e["ULSWEEP_FAULT"] = fault
    with open(log, "a") as f:
        f.write(f"\n===== {' '.join(args[2:])}  fault={fault}\n")
        f.flush()
        p = subprocess.Popen(args, cwd=cwd, env=e, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            p.wait(timeout=timeout)
        finally:
            try:  # whatever the driver leaves behind in its session goes too (sandbox() reaps the rest)
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
    return p


def mlflow_state(run_dir: Path):
    state = json.loads((run_dir / "sweep.json").read_text())
    c = tracking.client(state["tracking_uri"])
    runs = tracking.sweep_runs(c, state["mlflow_experiment_id"], state["sweep_id"])
    by_key: dict[str, list] = {}
    for r in runs:
        by_key.setdefault(r.data.tags[tracking.TAG_KEY], []).append(r)
    return c, by_key


def curve_steps(c, run_id: str, key: str = "loss") -> list[int]:
    return sorted(m.step for m in c.get_metric_history(run_id, key))


def tail(path: Path, n: int = 6000) -> str:
    return path.read_text()[-n:] if path.exists() else ""
