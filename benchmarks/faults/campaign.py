"""Issue 24's fault campaign: `ulsweep run` (fake training loops, real Ray Tune / Train / MLflow code) disturbed
one fault at a time, each disturbed sweep resumed as a user would and then checked against an undisturbed run
of the same experiment by one checker (tests/faults/campaignlib.check_sweep: one FINISHED MLflow run per trial
key, lineage tags, every metric at the reference's steps, objectives, summary.json and the sweep run's
best/* and trials/*).

    scenario            fault (times are seeded draws)
    reference-*         none: the undisturbed runs the others are compared with (local mode and worker actors)
    driver-kill         SIGKILL of the driver at a random moment of its sweep, then --resume
    driver-kill-early   SIGKILL of the driver in its first seconds (Ray and MLflow starting), then --resume
    sigint              Ctrl-C (SIGINT) at a random moment (exit 130), then --resume
    worker-kill         SIGKILL of the process training a random running trial, at a random moment; some
                        trials twice (local mode: the Tune trial process; worker mode: the Ray Train worker)
    worker-kill-twice   issue 24's row: one AE trial's training process killed at steps 14 and 26
    worker-kill-thrice  three kills: one more than resources.max_worker_failures, the trial fails; --resume
                        re-runs it and spawns its base trial
    storage-window      ulsweep's writes under two trial directories refused (EROFS for 2 s, under the retry
                        budget; ENOSPC until the trial has failed), then --resume
    storage-ro-mount    the whole storage root (run dir, mlflow.db, Tune state) remounted read-only for 30 s
                        at a random moment (a bind mount in a private mount namespace: needs root)
    storage-full-tmpfs  the storage root on a 64 MB tmpfs, filled to the last byte for 30 s at a random moment
    damaged-state       a sweep stopped with Ctrl-C, then each state file damaged in turn (sweep.json, Tune's
                        trial table, Tuner settings, search generator, searcher state, mlflow.db): --resume must
                        exit 2 with one line naming the file, no traceback, no hang; restored, it resumes
    config-fuzz         configfuzz.py at full size in process, and a sample through the real CLI process
    mlflow-outage       the sweep tracks to a real `mlflow server` (sqlite backend) that is stopped for 60 s at
                        a random moment after a first checkpoint and started again on the same port: trials
                        queue and spool their points, the driver replays them; no --resume expected
    raylet-kill         the sweep runs with --address on a 2-node local Ray cluster (`ray start --head` +
                        `ray start --address`, as tests/test_cluster_e2e.py); the worker node's raylet is
                        SIGKILLed while a trial trains on that node: Tune retries the trial on the head node
                        (or --resume finishes the sweep)

    python benchmarks/faults/campaign.py                          # everything, seed 24
    python benchmarks/faults/campaign.py --only worker-kill,sigint --driver-kills 2
    nice python benchmarks/faults/campaign.py --out benchmarks/results/cpu-fault-campaign.json

Prints a table and the counts (faults tried, runs checked, problems found) and writes them with every finding
to --out (JSON). Exit code 1 when a problem was found."""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "faults"), str(REPO / "tests")]

from campaignlib import Driver, StorageWindow, check_sweep, sweep_snapshot, training_pid  # noqa: E402
from faultlib import cli, fake_experiment, reap, run_driver, sandbox, tail, write_yaml  # noqa: E402

STEP_S = 0.1  # seconds per fake training step: 30 steps, ~3 s of training per trial
MODES = {"local": 0, "workers": 1}  # resources.num_workers
DAMAGE = {  # state file (glob under the run dir) -> new bytes (as test_driver_kill.py damages them)
    "sweep.json": b'{"sweep_id": "x", "tracking',
    "tune/experiment_state-*.json": b'{"trial_data": [["{\\"stub',
    "tune/tuner.pkl": b"\x80\x04garbage",
    "tune/search_gen_state-*.json": b"garbage",
    "tune/searcher-state-*.pkl": b"garbage",
    "mlflow.db": b"SQLite format 3\x00" + b"\xff" * 4000,
}


class Scenario:
    """One disturbed sweep (or a fuzz batch): its faults, checks and findings."""

    def __init__(self, name: str, root: Path, mode: str = "local"):
        self.name, self.mode = name, mode
        self.dir = root / name
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir.mkdir(parents=True)
        self.log = self.dir / "driver.log"
        self.faults: list[str] = []
        self.problems: list[str] = []
        self.notes: list[str] = []
        self.rcs: list[int] = []
        self.checked = 0
        self.t0 = time.time()

    def expect(self, ok: bool, problem: str) -> bool:
        if not ok:
            self.problems.append(problem)
        return ok

    def result(self) -> dict:
        return {"scenario": self.name, "mode": self.mode, "faults": self.faults, "faults_tried": len(self.faults),
                "runs_checked": self.checked, "problems": self.problems, "exit_codes": self.rcs,
                "notes": self.notes, "seconds": round(time.time() - self.t0, 1)}


def experiment(sc: Scenario, n_ae: int = 3) -> tuple[Path, list[str]]:
    d = fake_experiment("camp", n_ae=n_ae, bases=("tiny",), num_workers=MODES[sc.mode])
    f = write_yaml(sc.dir, d)
    return f, cli(f, "--storage", sc.dir / "runs")


def run_dir(sc: Scenario) -> Path:
    return sc.dir / "runs" / "camp"


def env_for(env: dict, sc: Scenario) -> dict:
    env.update({"ULSWEEP_MLFLOW_FLUSH_S": "0.2", "ULSWEEP_FAULT_PIDS": str(sc.dir / "pids")})
    (sc.dir / "pids").mkdir(exist_ok=True)
    return env


def finish_or_resume(sc: Scenario, d, args, env, ok: tuple[int, ...], why: str, timeout: float = 600) -> int:
    """Wait for a disturbed driver: an exit code outside `ok` is a problem (`why` says what was expected); a
    non-zero one is then resumed to the end, as a user would."""
    rc = d.finish(timeout=timeout)
    sc.rcs.append(rc)
    sc.expect(rc in ok, f"exit code {rc} {why}\n{tail(sc.log, 1500)}")
    if rc != 0:
        resume_to_end(sc, args, env)
    return rc


def resume_to_end(sc: Scenario, args: list[str], env: dict, tries: int = 2) -> None:
    """--resume until the sweep finishes (exit 0); the first resume should do it. A driver stopped before it
    wrote sweep.json left no sweep to resume (`--resume` says so): the user starts it again."""
    for i in range(tries):
        again = (run_dir(sc) / "sweep.json").exists()
        if not again:
            sc.notes.append("no sweep.json: started again without --resume")
        try:
            p = run_driver(args + ["--resume"] if again else args, env, sc.dir, sc.log, timeout=600)
        except subprocess.TimeoutExpired:  # run_driver killed it: a hang is a finding, not a crash of the campaign
            sc.problems.append(f"--resume hung (no exit in 600 s):\n{tail(sc.log, 1500)}")
            return
        sc.rcs.append(p.returncode)
        if p.returncode == 0:
            if i:
                sc.problems.append(f"the sweep needed {i + 1} resumes")
            return
    sc.problems.append(f"--resume did not finish the sweep (exit codes {sc.rcs}):\n{tail(sc.log, 1500)}")


def check(sc: Scenario, ref: dict | None) -> None:
    sc.checked += 1
    sc.problems += check_sweep(run_dir(sc), ref)


# ----------------------------------------------------------------------------------------------
# scenarios


def reference(root: Path, mode: str) -> tuple[dict, dict]:
    sc = Scenario(f"reference-{mode}", root, mode)
    f, args = experiment(sc, n_ae=3 if mode == "local" else 2)
    with sandbox(sc.dir, step_s=STEP_S) as (env, _):
        t = time.time()
        p = run_driver(args, env_for(env, sc), sc.dir, sc.log, timeout=900)
        wall = time.time() - t
    sc.rcs.append(p.returncode)
    sc.expect(p.returncode == 0, f"the undisturbed run failed (exit {p.returncode}):\n{tail(sc.log, 2000)}")
    snap = sweep_snapshot(run_dir(sc))
    snap.pop("client")
    sc.checked += 1
    sc.problems += check_sweep(run_dir(sc))  # the reference keeps the contract on its own
    sc.notes.append(f"wall {wall:.0f} s")
    res = sc.result() | {"wall": wall}
    return snap, res


def driver_kill(root: Path, rng: random.Random, ref: dict, wall: float, i: int, early: bool = False) -> dict:
    sc = Scenario(f"driver-kill{'-early' if early else ''}-{i}", root)
    _, args = experiment(sc)
    at = rng.uniform(0.5, 8.0) if early else rng.uniform(3.0, 0.7 * wall)
    with sandbox(sc.dir, step_s=STEP_S) as (env, _):
        env_for(env, sc)
        d = Driver(args, env, sc.dir, sc.log, note=f"SIGKILL at {at:.1f} s")
        time.sleep(at)
        if d.p.poll() is None:
            d.signal(signal.SIGKILL)
            sc.faults.append(f"driver SIGKILL at {at:.1f} s")
        else:
            sc.notes.append(f"the sweep ended before {at:.1f} s: no kill")
        sc.rcs.append(d.finish())
        resume_to_end(sc, args, env)
    check(sc, ref)
    return sc.result()


def sigint(root: Path, rng: random.Random, ref: dict, wall: float, i: int) -> dict:
    sc = Scenario(f"sigint-{i}", root)
    _, args = experiment(sc)
    at = rng.uniform(5.0, 0.7 * wall)
    with sandbox(sc.dir, step_s=STEP_S) as (env, _):
        env_for(env, sc)
        d = Driver(args, env, sc.dir, sc.log, note=f"SIGINT at {at:.1f} s")
        time.sleep(at)
        if d.p.poll() is None:
            d.signal(signal.SIGINT)
            sc.faults.append(f"SIGINT at {at:.1f} s")
        rc = d.finish(timeout=300)
        sc.rcs.append(rc)
        if sc.faults:
            sc.expect(rc in (130, 0), f"exit code {rc} after SIGINT (expected 130, or 0 when it came at the very "
                                      f"end)\n{tail(sc.log, 1500)}")
        resume_to_end(sc, args, env)
    check(sc, ref)
    return sc.result()


def _kill_training(sc: Scenario, d: Driver, ray_tmp: str, rng: random.Random, key: str | None, delay: float,
                   timeout: float = 300) -> str | None:
    """SIGKILL the process training `key` (or a random running trial) `delay` s after one is seen training."""
    deadline = time.time() + timeout
    pids = sc.dir / "pids"
    while time.time() < deadline and d.p.poll() is None:
        keys = [key] if key else sorted(p.stem for p in pids.glob("*.pid"))
        live = [(k, pid) for k in keys if (pid := training_pid(pids, k, ray_tmp))]
        if live:
            k, pid = rng.choice(live)
            time.sleep(delay)
            if training_pid(pids, k, ray_tmp) != pid:
                continue  # it finished meanwhile: pick again
            os.kill(pid, signal.SIGKILL)
            sc.faults.append(f"SIGKILL of {k}'s training process (pid {pid}) {delay:.1f} s after it was seen")
            (pids / f"{k}.pid").unlink(missing_ok=True)
            return k
        time.sleep(0.1)
    sc.notes.append("no training process to kill")
    return None


def worker_kill(root: Path, rng: random.Random, ref: dict, i: int, mode: str) -> dict:
    sc = Scenario(f"worker-kill-{mode}-{i}", root, mode)
    _, args = experiment(sc, n_ae=3 if mode == "local" else 2)
    twice = rng.random() < 0.5
    with sandbox(sc.dir, step_s=STEP_S) as (env, ray_tmp):
        env_for(env, sc)
        d = Driver(args, env, sc.dir, sc.log, note="worker kills")
        key = _kill_training(sc, d, ray_tmp, rng, None, rng.uniform(0.0, 2.5))
        if key and twice:
            _kill_training(sc, d, ray_tmp, rng, key, rng.uniform(0.3, 2.5))
        finish_or_resume(sc, d, args, env, (0,), f"after {len(sc.faults)} kill(s) (expected 0: retried in place)")
    check(sc, ref)
    return sc.result()


def worker_kill_n(root: Path, ref: dict, mode: str, kills: int) -> dict:
    """Deterministic kills of ae-0000's training process at its metric points (ulsweep.testing.faults)."""
    name = {2: "twice", 3: "thrice"}[kills]
    sc = Scenario(f"worker-kill-{name}-{mode}", root, mode)
    _, args = experiment(sc, n_ae=3 if mode == "local" else 2)
    # per process, the N-th metric point: 2 kills at steps 14 and 26 (resumed from 10, then 20); 3 kills at
    # steps 10 (before the step-10 checkpoint), 12 (resumed from 0) and 24 (resumed from 10); --resume then
    # continues from 20
    spec = {2: "worker.log/ae-0000@7,worker.log/ae-0000@8",
            3: "worker.log/ae-0000@5,worker.log/ae-0000@6,worker.log/ae-0000@7"}[kills]
    with sandbox(sc.dir, step_s=STEP_S) as (env, _):
        env_for(env, sc)
        p = run_driver(args, env, sc.dir, sc.log, timeout=600, fault=spec)
        sc.rcs.append(p.returncode)
        fired = sorted(x.name for x in (sc.dir / "faults").iterdir())
        sc.faults += [f"SIGKILL at {x}" for x in fired]
        sc.expect(len(fired) == kills, f"{len(fired)} of {kills} kills fired")
        starts = (run_dir(sc) / "trials" / "ae-0000" / "fake-starts.txt").read_text().split()
        want = {2: ["0", "10", "20"], 3: ["0", "0", "10"]}[kills]
        sc.expect(starts == want, f"ae-0000 started at steps {starts}, expected {want}")
        if kills == 2:
            sc.expect(p.returncode == 0, f"exit code {p.returncode} after two kills (expected 0)")
        else:
            sc.expect(p.returncode == 1, f"exit code {p.returncode} after three kills (expected 1: the trial "
                                         "failed)")
            resume_to_end(sc, args, env)
            sc.expect("resume: re-running 1 trial(s)" in sc.log.read_text(), "--resume did not re-run ae-0000")
            starts = (run_dir(sc) / "trials" / "ae-0000" / "fake-starts.txt").read_text().split()
            sc.expect(starts == want + ["20"], f"after --resume ae-0000 started at {starts}, expected "
                                              f"{want + ['20']} (once more, from its step-20 checkpoint)")
    check(sc, ref)
    return sc.result()


def storage_window(root: Path, ref: dict) -> dict:
    sc = Scenario("storage-window", root)
    _, args = experiment(sc)
    ctl = sc.dir / "storage-ctl"
    ctl.mkdir()
    trials = run_dir(sc) / "trials"
    with sandbox(sc.dir, step_s=STEP_S) as (env, _):
        env_for(env, sc)
        env.update({"ULSWEEP_FAULT_STORAGE": str(ctl), "ULSWEEP_STORAGE_RETRY_S": "5"})
        d = Driver(args, env, sc.dir, sc.log, note="storage windows")
        ro = StorageWindow(ctl, "ro", "EROFS", trials / "ae-0000")
        full = StorageWindow(ctl, "full", "ENOSPC", trials / "ae-0001")
        first = lambda key: (trials / key / "checkpoints" / "step_00000010.json").exists()  # noqa: E731
        d.wait_for(lambda: first("ae-0000") or first("ae-0001"), "a first checkpoint")
        for w, key in ((ro, "ae-0000"), (full, "ae-0001")):
            if first(key):
                w.open()
        d.wait_for(lambda: first("ae-0000") and first("ae-0001"), "both first checkpoints")
        for w in (ro, full):
            if w.opened is None:
                w.open()
        time.sleep(2.0)
        ro.close()
        sc.faults.append(f"EROFS on trials/ae-0000 for {ro.closed - ro.opened:.1f} s (retry budget 5 s)")
        d.wait_for_line("FAILED ae-0001", timeout=400)
        full.close()
        sc.faults.append(f"ENOSPC on trials/ae-0001 for {full.closed - full.opened:.1f} s, until it failed")
        rc = d.finish()
        sc.rcs.append(rc)
        sc.expect(rc == 1, f"exit code {rc} (expected 1: ae-0001 failed)")
        sc.expect("FAILED ae-0000" not in d.output(), "ae-0000 failed although its window closed in time")
        resume_to_end(sc, args, env)
        sc.expect("resume: re-running 1 trial(s) that had failed for a reason a retry may change: ae-0001"
                  in sc.log.read_text(), "--resume did not re-run ae-0001")
    check(sc, ref)
    return sc.result()


def storage_real(root: Path, rng: random.Random, ref: dict, wall: float, kind: str) -> dict:
    """Inside a private mount namespace (this process, started by main() under `unshare -m`)."""
    sc = Scenario(f"storage-{kind}", root)
    _, args = experiment(sc)
    storage = sc.dir / "runs"
    storage.mkdir()
    if kind == "full-tmpfs":
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(storage)], check=True)
    at = rng.uniform(4.0, 0.7 * wall)
    hold = 30.0
    try:
        with sandbox(sc.dir, step_s=STEP_S) as (env, _):
            env_for(env, sc)
            d = Driver(args, env, sc.dir, sc.log, note=f"{kind} at {at:.1f} s for {hold:.0f} s")
            time.sleep(at)
            if d.p.poll() is not None:
                sc.notes.append(f"the sweep ended before {at:.1f} s")
            elif kind == "ro-mount":  # a new read-only mount over the root: every new open fails
                subprocess.run(["mount", "--bind", str(storage), str(storage)], check=True)
                subprocess.run(["mount", "-o", "remount,bind,ro", str(storage)], check=True)
                sc.faults.append(f"storage root read-only at {at:.1f} s for {hold:.0f} s")
                time.sleep(hold)
                subprocess.run(["umount", "-l", str(storage)], check=True)
            else:
                use = shutil.disk_usage(storage)
                sc.notes.append(f"storage root {use.used >> 20} of {use.total >> 20} MiB used before the window; "
                                f"largest: {_largest(storage)}")
                ballast = storage / "ballast"
                fd = os.open(ballast, os.O_WRONLY | os.O_CREAT)
                try:
                    for chunk in (1 << 20, 4096, 1):  # to the last byte
                        while True:
                            try:
                                os.write(fd, b"\0" * chunk)
                            except OSError:
                                break
                finally:
                    os.close(fd)
                sc.faults.append(f"storage root full at {at:.1f} s for {hold:.0f} s")
                time.sleep(hold)
                ballast.unlink()
            finish_or_resume(sc, d, args, env, (0, 1), "(expected 0, or 1 with failed trials to resume)")
            check(sc, ref)
    finally:
        if kind == "full-tmpfs":
            subprocess.run(["umount", "-l", str(storage)], check=False)
    return sc.result()


def _largest(root: Path, n: int = 3) -> list[str]:
    sizes = []
    for p in root.rglob("*"):
        try:
            if p.is_file():
                sizes.append((p.stat().st_size, str(p.relative_to(root))))
        except OSError:
            continue
    return [f"{name} ({size >> 10} KiB)" for size, name in sorted(sizes)[-n:]]


def damaged_state(root: Path, ref: dict) -> dict:
    sc = Scenario("damaged-state", root)
    f, args = experiment(sc)
    rd = run_dir(sc)
    with sandbox(sc.dir, step_s=STEP_S) as (env, _):
        env_for(env, sc)
        d = Driver(args, env, sc.dir, sc.log, note="SIGINT after ae-0000")
        d.wait_for_line("done   ae-0000 ", timeout=400)
        d.signal(signal.SIGINT)
        sc.faults.append("SIGINT after ae-0000 finished")
        rc = d.finish()
        sc.rcs.append(rc)
        sc.expect(rc == 130, f"exit code {rc} after SIGINT (expected 130)")
        for pattern, garbage in DAMAGE.items():
            path = max(rd.glob(pattern))
            keep = path.read_bytes()
            path.write_bytes(garbage)
            sc.faults.append(f"damaged {path.relative_to(rd)}")
            t = time.time()
            try:
                p = subprocess.run(args + ["--resume"], cwd=sc.dir, env=env, capture_output=True, text=True,
                                   timeout=180)
                rc, err = p.returncode, p.stderr
            except subprocess.TimeoutExpired:
                rc, err = None, ""
                reap(env["RAY_TMPDIR"], 10)
            finally:
                path.write_bytes(keep)
            lines = [x for x in err.splitlines() if x.startswith("error: ")]
            sc.expect(rc is not None, f"{pattern}: --resume hung (no exit in 180 s)")
            sc.expect(rc == 2, f"{pattern}: exit code {rc} (expected 2)")
            sc.expect("Traceback" not in err, f"{pattern}: traceback on stderr:\n{err[-1500:]}")
            sc.expect(len(lines) == 1 and lines[0].startswith(f"error: {path}: "),
                      f"{pattern}: error line does not name the file: {lines}")
            sc.notes.append(f"{pattern}: exit {rc} in {time.time() - t:.1f} s: {lines[0][:160] if lines else ''}")
        resume_to_end(sc, args, env)
    check(sc, ref)
    return sc.result()


def config_fuzz(root: Path, n: int, seed: int) -> dict:
    import configfuzz

    sc = Scenario("config-fuzz", root)
    outcomes = configfuzz.run(n, seed, sc.dir / "cases")
    sc.faults += [f"{o.case.kind}" for o in outcomes]
    sc.problems += [f"[{o.case.n}] {o.case.source} {o.case.what[:120]}: {o.problem}" for o in outcomes if o.problem]
    rcs: dict[str, int] = {}
    for o in outcomes:
        rcs[str(o.rc)] = rcs.get(str(o.rc), 0) + 1
    sc.notes.append(f"exit codes {rcs}; slowest case {max(o.seconds for o in outcomes):.2f} s")
    # a sample through a real CLI process: what in-process main() cannot see (exit status, import-time output)
    sample = random.Random(seed).sample(configfuzz.cases(n, seed), min(40, n))
    for case in sample:
        path = sc.dir / f"cli-{case.n:05d}.yaml"
        path.write_text(case.text, encoding="utf-8", errors="surrogatepass")
        argv = [sys.executable, "-m", "ulsweep.cli", "run", str(path), "--dry-run", "--storage", str(sc.dir / "runs")]
        for o in case.overrides:
            argv += ["--set", o]
        sc.faults.append(f"cli {case.kind}")
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=sc.dir)
        except subprocess.TimeoutExpired:
            sc.problems.append(f"[cli {case.n}] {case.what[:120]}: hang")
            continue
        problem = configfuzz.judge(p.returncode, p.stderr, str(path))
        if problem:
            sc.problems.append(f"[cli {case.n}] {case.source} {case.what[:120]}: {problem}")
    return sc.result()


def mlflow_outage(root: Path, rng: random.Random, ref: dict, down_s: float = 60.0) -> dict:
    """A real `mlflow server` as tracking URI, stopped (SIGTERM to its process group) for `down_s` seconds
    mid-sweep and started again on the same port with the same sqlite backend (test_mlflow_outage.py does the
    same for 8 s). The sweep must end by itself (exit 0) and hold up against the undisturbed reference."""
    from ulsweep.report.cli import free_port, start_mlflow_server, stop_server, wait_for_server

    sc = Scenario("mlflow-outage", root)
    _, args = experiment(sc)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    backend, slog, artifacts = f"sqlite:///{sc.dir}/server.db", sc.dir / "server.log", str(sc.dir / "artifacts")
    args = args + ["--tracking-uri", url]
    delay = rng.uniform(0.0, 3.0)  # the sweep outlasts its first checkpoint by ~40 s or more: mid-sweep

    def serve():
        proc, _ = start_mlflow_server(backend, port, log_path=str(slog), artifacts_destination=artifacts)
        if not wait_for_server(url, proc, 180):
            raise RuntimeError(f"mlflow server did not start:\n{tail(slog, 2000)}")
        return proc

    server = serve()
    try:
        with sandbox(sc.dir, step_s=STEP_S) as (env, _):
            env_for(env, sc)
            d = Driver(args, env, sc.dir, sc.log, note=f"mlflow server down for {down_s:.0f} s")
            ckpts = lambda: list((run_dir(sc) / "trials").glob("*/checkpoints/step_*.json"))  # noqa: E731
            d.wait_for(lambda: bool(ckpts()), "a first checkpoint", timeout=400)
            time.sleep(delay)
            if d.p.poll() is not None:
                sc.notes.append(f"the sweep ended before the outage ({delay:.1f} s after a first checkpoint)")
            else:
                stop_server(server)
                down = time.time()
                n_ckpt = len(ckpts())
                time.sleep(down_s)
                alive = d.p.poll() is None
                server = serve()
                up = time.time()
                sc.faults.append(f"mlflow server stopped {delay:.1f} s after a first checkpoint, for "
                                 f"{up - down:.0f} s (restarted on port {port})")
                sc.notes.append(f"checkpoints written during the outage: {len(ckpts()) - n_ckpt}; the driver "
                                f"{'was still running' if alive else 'had ended'} when the server came back")
            finish_or_resume(sc, d, args, env, (0,), "after the MLflow outage (expected 0: points spooled and "
                             "replayed)", timeout=900)
        spooled = list(run_dir(sc).glob("trials/*/mlflow-spool/*.jsonl"))
        sc.expect(not spooled, f"spooled points never sent: {[str(x.relative_to(run_dir(sc))) for x in spooled]}")
        out = sc.log.read_text(errors="replace")
        sc.notes += [line.strip() for line in out.splitlines() if line.startswith("mlflow: sent")][:3]
        check(sc, ref)  # through the restarted server
    finally:
        stop_server(server)
    return sc.result()


def _raylets(temp_dir: Path) -> set[int]:
    from ray_cluster import pids_with

    return {pid for pid in pids_with(str(temp_dir)) if _comm(pid) == "raylet"}


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _ancestors(pid: int) -> list[int]:
    out = []
    while pid > 1:
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
        out.append(pid)
    return out


def raylet_kill(root: Path, rng: random.Random, ref: dict, step_s: float = 0.5) -> dict:
    """`ulsweep run --address` on a head node and a worker node of one machine (tests/ray_cluster.py, each
    node 1 CPU); once a trial trains on the worker node, that node's raylet is SIGKILLed: its worker
    processes lose it and the node is lost for good. Tune retries the trial (the head node's CPU takes it);
    the sweep must finish (or finish after --resume on the remaining node) and hold up against the reference.
    Steps of `step_s` (15 s a trial): the kill lands mid-training, not after it. A training process outlives
    its raylet by a few seconds (Ray 2.60: 1.6-2.6 s seen, when it notices and exits), and Tune starts the
    trial again about 12 s after the kill (when the GCS has declared the node dead); the notes record both,
    so a retry that overlapped the orphan would show."""
    import contextlib

    from ray_cluster import LocalRayCluster, alive, private_network, private_network_unavailable

    sc = Scenario("raylet-kill", root)
    _, args = experiment(sc)
    pids = sc.dir / "pids"
    delay = rng.uniform(0.3, 3.0)
    # Ray's servers bind every interface: keep them on a loopback-only network where possible (as the e2e test)
    net = private_network() if private_network_unavailable() is None else contextlib.nullcontext()
    with net, sandbox(sc.dir, step_s=step_s) as (env, ray_tmp):
        env_for(env, sc)  # the nodes' worker processes take their environment from their raylet
        cluster = LocalRayCluster(env, nodes=1, cpus_per_node=1, node_ip="127.0.0.1")
        try:
            address = cluster.start()
            head = _raylets(cluster.temp_dir)
            cluster._start(f"--address={address}")
            worker = _raylets(cluster.temp_dir) - head
            if not sc.expect(len(head) == 1 and len(worker) == 1, f"raylets: head {head}, worker {worker}"):
                return sc.result()
            raylet = worker.pop()
            args = args + ["--address", address]
            d = Driver(args, env, sc.dir, sc.log, note="worker node's raylet SIGKILL")
            deadline, victim = time.time() + 400, None
            while victim is None and time.time() < deadline and d.p.poll() is None:
                for k in sorted(p.stem for p in pids.glob("*.pid")):
                    pid = training_pid(pids, k, ray_tmp)
                    if pid and raylet in _ancestors(pid):
                        victim = (k, pid)
                        break
                time.sleep(0.1)
            if victim is None:
                sc.notes.append("no trial trained on the worker node: no kill")
            else:
                time.sleep(delay)
                os.kill(raylet, signal.SIGKILL)
                sc.faults.append(f"SIGKILL of the worker node's raylet (pid {raylet}) {delay:.1f} s after "
                                 f"{victim[0]} was seen training on that node (pid {victim[1]})")
                killed = time.time()
                while alive(victim[1]) and d.p.poll() is None and time.time() - killed < 600:
                    time.sleep(0.2)
                orphan_end = time.time()
                sc.notes.append(f"{victim[0]}'s training process (orphaned) "
                                + (f"lived {orphan_end - killed:.1f} s more" if not alive(victim[1]) else
                                   "was still alive when the driver ended"))
            rc = d.finish(timeout=900)
            sc.rcs.append(rc)
            if rc != 0:
                sc.notes.append(f"exit code {rc} after the node loss: --resume on the head node")
                resume_to_end(sc, args, env)
            if victim is not None:
                trial = run_dir(sc) / "trials" / victim[0]
                sc.notes.append(f"{victim[0]} started at steps {(trial / 'fake-starts.txt').read_text().split()}")
                later = [json.loads(x)["start"] for x in (trial / "attempts.jsonl").read_text().splitlines()[1:]]
                sc.notes.append(f"{victim[0]}'s later attempts started " + ", ".join(
                    f"{t - killed:.1f} s after the kill ({'while' if t < orphan_end else 'after'} the orphan "
                    f"trained)" for t in later))
            out = sc.log.read_text(errors="replace")
            sc.notes += [line.strip()[:200] for line in out.splitlines()
                         if "FAILED" in line or "errored" in line or "resume:" in line][:6]
        finally:
            cluster.stop()
    check(sc, ref)
    return sc.result()


# ----------------------------------------------------------------------------------------------


def child(args) -> int:
    """A real-storage scenario in this process's private mount namespace; its result goes to --child-out."""
    root = Path(args.workdir)
    info = json.loads(Path(args.child_in).read_text())
    res = storage_real(root, random.Random(info["seed"]), info["ref"], info["wall"], args.child)
    Path(args.child_out).write_text(json.dumps(res))
    return 0


def run_real_storage(root: Path, kind: str, seed: int, ref: dict, wall: float) -> dict:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return {"scenario": f"storage-{kind}", "skipped": "needs root and unshare (mount namespaces)",
                "faults": [], "faults_tried": 0, "runs_checked": 0, "problems": []}
    tmp = root / f"child-{kind}"
    tmp.mkdir(exist_ok=True)
    (tmp / "in.json").write_text(json.dumps({"seed": seed, "ref": ref, "wall": wall}))
    cmd = ["unshare", "-m", "--propagation", "private", sys.executable, __file__, "--workdir", str(root),
           "--child", kind, "--child-in", str(tmp / "in.json"), "--child-out", str(tmp / "out.json")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if p.returncode != 0 or not (tmp / "out.json").exists():
        return {"scenario": f"storage-{kind}", "faults": [], "faults_tried": 0, "runs_checked": 0,
                "problems": [f"the scenario crashed (exit {p.returncode}): {p.stderr[-2000:]}"]}
    return json.loads((tmp / "out.json").read_text())


ALL = ["driver-kill", "driver-kill-early", "sigint", "worker-kill", "worker-kill-twice", "worker-kill-thrice",
       "storage-window", "storage-ro-mount", "storage-full-tmpfs", "damaged-state", "config-fuzz",
       "mlflow-outage", "raylet-kill"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, default=24)
    ap.add_argument("--only", default=",".join(ALL), help=f"comma-separated scenarios of {ALL}")
    ap.add_argument("--driver-kills", type=int, default=4)
    ap.add_argument("--sigints", type=int, default=2)
    ap.add_argument("--worker-kills", type=int, default=4, help="random worker kills in local mode (and half as "
                                                                 "many with worker actors)")
    ap.add_argument("--fuzz", type=int, default=3000)
    ap.add_argument("--mlflow-down-s", type=float, default=60.0, help="seconds the MLflow server stays down")
    ap.add_argument("--workdir", default=None, help="default: a new temp dir (removed unless --keep)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "cpu-fault-campaign.json"))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--child-in", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    if args.child:
        return child(args)
    only = [s for s in args.only.split(",") if s]
    unknown = sorted(set(only) - set(ALL))
    if unknown:
        ap.error(f"unknown scenario(s) {unknown}")
    root = Path(args.workdir or tempfile.mkdtemp(prefix="ulsweep-campaign-"))
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    t0 = time.time()
    results: list[dict] = []

    def write(done: bool) -> dict:
        """The report so far, written atomically to --out after every scenario: a stopped campaign leaves the
        counts of what it finished (`"complete": false`)."""
        totals = {"faults_tried": sum(r["faults_tried"] for r in results),
                  "runs_checked": sum(r["runs_checked"] for r in results),
                  "problems_found": sum(len(r["problems"]) for r in results)}
        report = {"command": "python benchmarks/faults/campaign.py "
                  + " ".join(argv if argv is not None else sys.argv[1:]),
                  "seed": args.seed, "complete": done, "seconds": round(time.time() - t0),
                  "host": {"cpus": os.cpu_count(), "load_avg_end": os.getloadavg()[0]}, **totals,
                  "scenarios": results}
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=1))
        os.replace(tmp, out)
        return report

    def record(fn, *a) -> None:
        try:
            res = fn(*a)
        except Exception as e:  # noqa: BLE001 - a crashed scenario is a finding; the campaign goes on
            res = {"scenario": getattr(fn, "__name__", "?"), "faults": [], "faults_tried": 0, "runs_checked": 0,
                   "problems": [f"scenario crashed: {type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"]}
        results.append(res)
        print(f"{res['scenario']:<26} faults {res['faults_tried']:>5}  checked {res['runs_checked']}  "
              f"problems {len(res['problems'])}  {res.get('seconds', 0):>6.0f} s  {res.get('skipped', '')}",
              flush=True)
        for p in res["problems"][:5]:
            print("    " + p.replace("\n", "\n    ")[:1500], flush=True)
        write(False)

    sweeps = [s for s in only if s != "config-fuzz"]
    refs: dict[str, tuple[dict, float]] = {}
    if sweeps:
        for mode in ("local", "workers") if {"worker-kill", "worker-kill-twice"} & set(sweeps) else ("local",):
            snap, res = reference(root, mode)
            refs[mode] = (snap, res["wall"])
            results.append(res)
            print(f"{res['scenario']:<26} wall {res['wall']:.0f} s  problems {len(res['problems'])}", flush=True)
            write(False)
    ref, wall = refs.get("local", (None, 0.0))
    for s in only:
        if s == "driver-kill":
            for i in range(args.driver_kills):
                record(driver_kill, root, rng, ref, wall, i)
        elif s == "driver-kill-early":
            record(driver_kill, root, rng, ref, wall, 0, True)
        elif s == "sigint":
            for i in range(args.sigints):
                record(sigint, root, rng, ref, wall, i)
        elif s == "worker-kill":
            for i in range(args.worker_kills):
                record(worker_kill, root, rng, ref, i, "local")
            for i in range(max(1, args.worker_kills // 2)):
                record(worker_kill, root, rng, refs["workers"][0], i, "workers")
        elif s == "worker-kill-twice":
            record(worker_kill_n, root, ref, "local", 2)
            record(worker_kill_n, root, refs["workers"][0], "workers", 2)
        elif s == "worker-kill-thrice":
            record(worker_kill_n, root, ref, "local", 3)
        elif s == "storage-window":
            record(storage_window, root, ref)
        elif s in ("storage-ro-mount", "storage-full-tmpfs"):
            record(run_real_storage, root, s.split("-", 1)[1], rng.randrange(1 << 30), ref, wall)
        elif s == "damaged-state":
            record(damaged_state, root, ref)
        elif s == "config-fuzz":
            record(config_fuzz, root, args.fuzz, args.seed)
        elif s == "mlflow-outage":
            record(mlflow_outage, root, rng, ref, args.mlflow_down_s)
        elif s == "raylet-kill":
            record(raylet_kill, root, rng, ref)
    report = write(True)
    print(f"\nfaults tried {report['faults_tried']}, runs checked {report['runs_checked']}, problems found "
          f"{report['problems_found']}  ({report['seconds']} s; {args.out})")
    if not args.keep and args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)
    return 1 if report["problems_found"] else 0


if __name__ == "__main__":
    sys.exit(main())
