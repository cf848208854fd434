"""The sweep driver under faults of its own, on one sweep (3 AE trials, 1 base model each, fake training loops,
real Ray Tune / Train / MLflow code) driven like a user would, `ulsweep run`, six times:

1. SIGKILLed right after creating the sweep's MLflow run, before that run's id reaches sweep.json: sweep.json
   (pending, holding the token the run is tagged with) was written first, and `--resume` adopts the run;
2. resumed, then SIGINT (Ctrl-C) once the first AE trial is done: Tune stops the trials, the runs still
   RUNNING are marked KILLED, exit code 130, and the sweep run's best/<objective> and trials/* equal
   summary.json's (recomputed at the end of every run);
3. resumed, then SIGKILLed at three named points: during an AE trial, between a finished AE trial and its base
   trials, during a base trial; the last kill's Tune snapshot is then cut in half, as a kill while Tune copies
   it into the run dir leaves it (CI once caught one empty);
4. resumed to its end: the cut snapshot is set aside and the one before it restored. Every trial finished exactly once: one MLflow run per trial key, none RUNNING, one
   point per logged step, objectives told once, every spawned base trial present once, and the sweep run's
   best/* and trials/* equal summary.json's.

Then damaged state files of the finished sweep (sweep.json, Tune's trial table, Tuner settings, search
generator and searcher state, mlflow.db): `--resume` stops with a one-line error naming the file and what to
do, exit code 2, before Ray starts, and changes nothing.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from faultlib import STEPS, LOG_EVERY, cli, curve_steps, fake_experiment, mlflow_state, run_driver, sandbox, tail, \
    write_yaml
from ulsweep import tracking
from ulsweep.cli import main
from ulsweep.sweep.state import DamagedStateError

pytestmark = pytest.mark.slow

SETUP_KILL = "driver.sweep_run@1"
KILLS = ["driver.ae_result@2", "driver.ae_complete@1", "driver.base_result@1"]
AE_KEYS = ["ae-0000", "ae-0001", "ae-0002"]


def interrupt_when(args: list[str], env: dict, cwd: Path, log: Path, line: str, timeout: float = 300):
    """Run `ulsweep run ...`, send it SIGINT once `line` shows in its output, and wait for it to end."""
    with open(log, "a") as f:
        f.write(f"\n===== {' '.join(map(str, args[2:]))}  SIGINT after {line!r}\n")
        f.flush()
        start = log.stat().st_size
        p = subprocess.Popen(args, cwd=cwd, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + timeout  # a guard against a hang, not a speed limit
            while line not in log.read_text()[start:]:
                assert p.poll() is None, f"the driver ended before {line!r}:\n{tail(log)}"
                assert time.time() < deadline, f"{line!r} never showed:\n{tail(log)}"
                time.sleep(0.1)
            os.kill(p.pid, signal.SIGINT)
            p.wait(timeout=timeout)
        finally:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()
    return p


def sweep_metrics(c, run_dir: Path) -> tuple[dict, dict, object]:
    """(the sweep run's best/* and trials/* metrics, summary.json, the sweep run)."""
    state = json.loads((run_dir / "sweep.json").read_text())
    run = c.get_run(state["sweep_id"])
    ours = {k: v for k, v in run.data.metrics.items() if k.startswith(("best/", "trials/"))}
    return ours, json.loads((run_dir / "summary.json").read_text()), run


def assert_metrics_match_summary(c, run_dir: Path) -> dict:
    ours, summary, _ = sweep_metrics(c, run_dir)
    counts = {k[len("trials/"):]: v for k, v in ours.items() if k.startswith("trials/")}
    assert counts == {**{k: 0.0 for k in counts}, **{k: float(v) for k, v in summary["counts"].items()}}, \
        (ours, summary["counts"])
    objectives = [t["objective"][0] for t in summary["trials"] if t["objective"]]
    if objectives:
        assert ours["best/gfd_fake"] == min(objectives)
        best = next(t for t in summary["trials"] if t["key"] == summary["best"][0])
        assert ours["best/gfd_fake"] == best["objective"][0]
    return summary


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Runs the sweep through the faults above: (tmp dir, run dir, experiment file, driver log, what each
    stage left)."""
    from mlflow.entities import ViewType

    tmp_path = tmp_path_factory.mktemp("driver-kill")
    f = write_yaml(tmp_path, fake_experiment("dk", n_ae=3))
    run_dir = tmp_path / "runs" / "dk"
    log = tmp_path / "driver.log"
    args = cli(f, "--storage", tmp_path / "runs")
    seen: dict = {}
    with sandbox(tmp_path) as (env, _):
        p = run_driver(args, env, tmp_path, log, fault=SETUP_KILL)
        assert p.returncode == -signal.SIGKILL, f"{SETUP_KILL} never fired (rc {p.returncode}):\n{tail(log)}"
        state = json.loads((run_dir / "sweep.json").read_text())
        c = tracking.client(state["tracking_uri"])
        runs = c.search_runs([c.get_experiment_by_name("dk").experiment_id], run_view_type=ViewType.ALL)
        seen["setup_kill"] = (state, [(r.info.run_id, r.info.status, dict(r.data.tags)) for r in runs])

        p = interrupt_when(args + ["--resume"], env, tmp_path, log, "done   ae-0000 ")
        c, by_key = mlflow_state(run_dir)
        seen["interrupted"] = (p.returncode, {k: [r.info.status for r in rs] for k, rs in by_key.items()},
                               assert_metrics_match_summary(c, run_dir))

        for fault in KILLS:
            p = run_driver(args + ["--resume"], env, tmp_path, log, fault=fault)
            assert p.returncode == -signal.SIGKILL, f"{fault} never fired (rc {p.returncode}):\n{tail(log)}"
            point, n = fault.split("@")
            assert (tmp_path / "faults" / f"{point}-None@{n}").exists(), fault  # it fired where intended
            _, by_key = mlflow_state(run_dir)
            assert any(r.info.status == "RUNNING" for rs in by_key.values() for r in rs), \
                "the kill should leave runs RUNNING (else this test tests nothing)"
        torn = max((run_dir / "tune").glob("experiment_state-*.json"))
        torn.write_bytes(torn.read_bytes()[:torn.stat().st_size // 2])
        older = sorted((run_dir / "tune").glob("experiment_state-*.json"))[-2].name
        seen["torn"] = (torn, torn.read_bytes(), older, log.stat().st_size)
        p = run_driver(args + ["--resume"], env, tmp_path, log)
        assert p.returncode == 0, tail(log)
    return tmp_path, run_dir, f, log, seen


def test_driver_sigkill_at_three_points_then_resume_loses_and_doubles_nothing(sweep):
    _, run_dir, _, log, _ = sweep
    c, by_key = mlflow_state(run_dir)
    expected = {"sweep", *AE_KEYS, *(f"{k}-tiny" for k in AE_KEYS)}
    assert sorted(by_key) == sorted(expected)
    doubles = {k: len(rs) for k, rs in by_key.items() if len(rs) != 1}
    assert not doubles, f"duplicate MLflow runs: {doubles}"
    runs = {k: rs[0] for k, rs in by_key.items()}
    assert {k: r.info.status for k, r in runs.items()} == {k: "FINISHED" for k in expected}

    want = list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    for key in expected - {"sweep"}:
        assert curve_steps(c, runs[key].info.run_id) == want, key  # no gap, no duplicate point
    for key in AE_KEYS:
        assert len(c.get_metric_history(runs[key].info.run_id, "objective/gfd_fake")) == 1, key  # told once
        assert runs[f"{key}-tiny"].data.tags["mlflow.parentRunId"] == runs[key].info.run_id

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["counts"] == {"ae_done": 3, "base_done": 3}
    assert [t["key"] for t in summary["trials"]] == AE_KEYS
    assert all(t["bases"]["tiny"]["status"] == "done" and t["objective"] for t in summary["trials"])
    for key in expected - {"sweep"}:
        assert (run_dir / "trials" / key / "checkpoints" / f"step_{STEPS:08d}.json").exists(), key
    assert "resume: marked" in log.read_text()  # each resume closed the killed driver's RUNNING runs


def test_a_snapshot_the_kill_cut_short_is_set_aside_and_the_one_before_restored(sweep):
    _, run_dir, _, log, seen = sweep
    torn, data, older, log_at = seen["torn"]
    out = log.read_bytes()[log_at:].decode()
    assert f"resume: Tune's last snapshot, of session {torn.name[len('experiment_state-'):-5]}, was cut short" in out
    # the session before it restored, as the driver says (Tune's own INFO line naming the file it reads was missing
    # from all four restores of one CI run: Tune's logging, not the restore, which the state checks below show)
    assert f"restoring session {older[len('experiment_state-'):-len('.json')]} " in out
    assert not torn.exists() and torn.with_name(torn.name + ".torn").read_bytes() == data  # kept, not lost
    closed = json.loads((run_dir / "tune_closed.json").read_text())["session"]
    assert max((run_dir / "tune").glob("experiment_state-*.json")).name == f"experiment_state-{closed}.json"


def _copy_of_state(run_dir: Path, dst: Path, new_session: str | None = "2099-01-01_00-00-00") -> Path:
    """A copy of the finished sweep's Tune state (and closed record) in dst/run, plus, unless None, a snapshot
    of a later session (copies of the newest files) that no driver closed."""
    import shutil

    run = dst / "run"
    shutil.copytree(run_dir / "tune", run / "tune", ignore=shutil.ignore_patterns("ae-*"))
    shutil.copy(run_dir / "tune_closed.json", run / "tune_closed.json")
    if new_session:
        for pattern in ("experiment_state-*.json", "search_gen_state-*.json", "searcher-state-*.pkl"):
            src = max((run / "tune").glob(pattern))
            head, tail = pattern.split("*")
            shutil.copy(src, run / "tune" / f"{head}{new_session}{tail}")
    return run


@pytest.mark.parametrize("cut", ["experiment_state-{}.json", "searcher-state-{}.pkl", "search_gen_state-{}.json"])
@pytest.mark.parametrize("how", ["truncated", "missing"])
def test_an_unclosed_snapshot_that_does_not_read_is_set_aside(sweep, tmp_path, cut, how):
    """Any file of the snapshot of a session no driver closed, cut short or never copied: the whole snapshot is
    renamed *.torn (nothing deleted), and the state left is restorable."""
    import io

    from ulsweep.sweep.statecheck import restorable_tune_state, set_aside_torn_snapshots

    _, run_dir, _, _, _ = sweep
    session = "2099-01-01_00-00-00"
    run = _copy_of_state(run_dir, tmp_path, session)
    target = run / "tune" / cut.format(session)
    if how == "truncated":
        target.write_bytes(target.read_bytes()[:40])
    else:
        target.unlink()
    before = {p.name: p.read_bytes() for p in (run / "tune").iterdir() if p.is_file()}
    out = io.StringIO()
    moved = set_aside_torn_snapshots(str(run), out)
    assert sorted(moved) == sorted(f"{run}/tune/{p}.torn" for p in before if session in p)
    assert f"({target.name}" in out.getvalue() and "restoring session" in out.getvalue()
    after = {p.name: p.read_bytes() for p in (run / "tune").iterdir() if p.is_file()}
    assert after == {(f"{name}.torn" if session in name else name): b for name, b in before.items()}
    assert restorable_tune_state(str(run / "tune"), "grid") is True


def test_a_closed_or_intact_or_only_snapshot_is_not_set_aside(sweep, tmp_path):
    """Left for the damage check: a snapshot a driver closed (damage, named), an intact unclosed one (a kill
    between snapshots: Tune restores it), and a cut one with no older session to restore."""
    import io

    from ulsweep.sweep.statecheck import restorable_tune_state, set_aside_torn_snapshots

    _, run_dir, _, _, _ = sweep
    intact = _copy_of_state(run_dir, tmp_path / "intact")
    assert set_aside_torn_snapshots(str(intact), io.StringIO()) == []
    assert restorable_tune_state(str(intact / "tune"), "grid") is True

    closed = _copy_of_state(run_dir, tmp_path / "closed", new_session=None)
    table = max((closed / "tune").glob("experiment_state-*.json"))
    table.write_bytes(table.read_bytes()[:40])
    assert set_aside_torn_snapshots(str(closed), io.StringIO()) == []
    with pytest.raises(DamagedStateError, match=f"{table}: damaged Tune trial table"):
        restorable_tune_state(str(closed / "tune"), "grid")

    only = _copy_of_state(run_dir, tmp_path / "only")
    for p in (only / "tune").glob("*-20[0-8]*"):  # every session but the unclosed 2099 one
        p.unlink()
    (only / "tune" / "experiment_state-2099-01-01_00-00-00.json").write_bytes(b"")
    assert set_aside_torn_snapshots(str(only), io.StringIO()) == []
    with pytest.raises(DamagedStateError, match="damaged Tune trial table"):
        restorable_tune_state(str(only / "tune"), "grid")


def test_a_driver_killed_before_sweep_json_is_complete_leaves_a_run_resume_adopts(sweep):
    _, run_dir, _, log, seen = sweep
    state, runs = seen["setup_kill"]
    assert state["sweep_id"] is None and state["sweep_token"]  # written before the run existed
    assert [(status, tags["ulsweep.sweep_token"]) for _, status, tags in runs] == [("RUNNING", state["sweep_token"])]
    adopted = runs[0][0]
    final = json.loads((run_dir / "sweep.json").read_text())
    assert final["sweep_id"] == adopted and final["sweep_token"] == state["sweep_token"]
    assert f"resume: adopted sweep run {adopted}" in log.read_text()
    _, by_key = mlflow_state(run_dir)
    assert [r.info.run_id for r in by_key["sweep"]] == [adopted]  # one sweep run, the killed driver's


def test_ctrl_c_stops_cleanly_and_sweep_metrics_are_recomputed_at_every_end(sweep):
    _, run_dir, _, log, seen = sweep
    rc, statuses, summary = seen["interrupted"]
    assert rc == 130, tail(log)
    assert summary["finished"] is False and summary["counts"] != {"ae_done": 3, "base_done": 3}, \
        "the interrupt came after the end: this test tests nothing"
    assert statuses["sweep"] == ["KILLED"]
    assert not [k for k, s in statuses.items() if "RUNNING" in s], statuses
    assert "sweep stopped before its end; continue it with --resume" in log.read_text()
    c, _ = mlflow_state(run_dir)
    final = assert_metrics_match_summary(c, run_dir)  # stale counts of the interrupted moment are gone
    assert final["finished"] is True and final["counts"] == {"ae_done": 3, "base_done": 3}
    ours, _, run = sweep_metrics(c, run_dir)
    assert run.info.status == "FINISHED" and ours["trials/ae_done"] == 3.0


DAMAGE = {  # file (glob under the run dir) -> (new bytes, what the error says)
    "sweep.json": (b'{"sweep_id": "x", "tracking', "damaged sweep state"),
    "tune/experiment_state-*.json": (b'{"trial_data": [["{\\"stub', "damaged Tune trial table"),
    "tune/tuner.pkl": (b"\x80\x04garbage", "damaged Tuner settings"),
    "tune/search_gen_state-*.json": (b"garbage", "damaged search generator state"),
    "tune/searcher-state-*.pkl": (b"garbage", "damaged searcher state"),
    "mlflow.db": (b"SQLite format 3\x00" + b"\xff" * 4000, "damaged MLflow store"),
}


@pytest.mark.parametrize("pattern", list(DAMAGE))
def test_damaged_state_file_is_named_before_anything_starts(sweep, pattern, monkeypatch, capsys):
    tmp_path, run_dir, f, _, _ = sweep
    path = max(run_dir.glob(pattern))  # the newest: the one Tune reads
    keep = {p: p.read_bytes() for p in (path, run_dir / "summary.json", run_dir / "sweep.json")}
    data, says = DAMAGE[pattern]
    path.write_bytes(data)

    def no_ray(*a, **k):
        raise AssertionError("Ray started over a damaged state file")

    import ray

    monkeypatch.setattr(ray, "init", no_ray)
    monkeypatch.chdir(tmp_path)
    try:
        rc = main(["run", str(f), "--storage", str(tmp_path / "runs"), "--resume", "--train-impl", "fake"])
        err = capsys.readouterr().err
    finally:
        path.write_bytes(keep[path])
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1, err
    assert lines[0].startswith(f"error: {path}: {says}"), lines[0]
    advice = "delete" if pattern.startswith("tune/") else "restore it from a backup"
    assert advice in lines[0], lines[0]
    assert all(p.read_bytes() == b for p, b in keep.items())  # nothing lost or rewritten
