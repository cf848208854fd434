"""Without Ray: the retry budget of a trial's attempts (ulsweep/sweep/attempts.py), the searcher handing failed
trials out again on resume (SpawningSearcher.revivable / revive), and ulsweep.io's writes through a storage
window. The end-to-end checks of the same rows: tests/faults/test_worker_faults.py (a killed trial process)
and the campaign (benchmarks/faults/campaign.py --only worker-kill-twice,worker-kill-thrice,storage-window)."""
from __future__ import annotations

import errno
import os
import threading
import time

import pytest
import torch

from ulsweep import io as uio
from ulsweep.config import SearchConfig
from ulsweep.sweep import attempts
from ulsweep.sweep.searcher import Searcher, SpawningSearcher
from ulsweep.testing import faults
from ulsweep.train.hooks import TrainHooks


def _begin(d, session, n):
    for i in range(n):
        attempts.begin(d, session, f"dead{i}")


def test_deaths_are_retried_up_to_max_worker_failures_and_errors_up_to_max_failures(tmp_path):
    d = str(tmp_path)
    check = lambda **kw: attempts.check_budget(d, "s1", "now", "ae-0000", failure=None, **kw)  # noqa: E731
    check(max_failures=0, max_deaths=2)  # a first attempt trains
    _begin(d, "s1", 2)  # two attempts whose process died (no end line)
    check(max_failures=0, max_deaths=2)
    attempts.begin(d, "s1", "dead2")
    with pytest.raises(attempts.RetryRefused, match=r"ae-0000: its training process died 3 time\(s\).*"
                                                    r"max_worker_failures=2"):
        check(max_failures=0, max_deaths=2)
    check(max_failures=0, max_deaths=-1)  # -1: no limit
    attempts.begin(d, "s1", "err0")
    attempts.end(d, "s1", "err0", "RuntimeError: flaky", deterministic=False)
    with pytest.raises(attempts.RetryRefused, match=r"failed 1 time\(s\), search.max_failures=0; last error: "
                                                    r"RuntimeError: flaky"):
        check(max_failures=0, max_deaths=-1)
    check(max_failures=1, max_deaths=-1)
    # a new driver session (a resume) starts with a fresh budget
    attempts.check_budget(d, "s2", "now", "ae-0000", 0, 0, None)


def test_a_deterministic_failure_is_never_retried_and_keeps_its_record(tmp_path):
    d = str(tmp_path)
    rec = {"attempt": "a0", "error": "TrainingDiverged: non-finite loss by step 16", "checkpoint": "/ck/10"}
    attempts.begin(d, "s", "a0")
    attempts.end(d, "s", "a0", rec["error"], deterministic=True)
    with pytest.raises(attempts.RetryRefused, match="not retried, a retry would fail the same way: "
                                                    "TrainingDiverged") as e:
        attempts.check_budget(d, "s", "a1", "ae-0001", max_failures=5, max_deaths=5, failure=rec)
    assert e.value.record == rec  # the trial's run is tagged with the original error and checkpoint
    import pickle

    again = pickle.loads(pickle.dumps(e.value))  # crosses Ray's process boundary intact
    assert again.record == rec and str(again) == str(e.value)


def test_a_torn_ledger_line_is_skipped(tmp_path):
    d = str(tmp_path)
    attempts.begin(d, "s", "a0")
    with open(tmp_path / attempts.LEDGER, "a") as f:
        f.write('{"session": "s", "attempt": "a1", "sta')  # a write cut short
    assert attempts.tally(d, "s", "x") == attempts.Tally([], 1, None)


def _grid(**kw):
    return SearchConfig(**{"method": "grid", "space": {"ae.loss.loss_factor": {"values": [1.5, 4.0, 2.0]}},
                           "metrics": ("gfd",), "modes": ("min",), **kw})


def _ae(key, **m):
    return {"key": key, "kind": "ae", "checkpoint": f"/ck/{key}", "mlflow_run_id": f"run-{key}", "final": 1.0, **m}


@pytest.mark.parametrize("search", [_grid(), SearchConfig(
    method="optuna-tpe", space={"ae.loss.loss_factor": {"low": 1.0, "high": 4.0}}, num_samples=3,
    metrics=("gfd",), modes=("min",), seed=3)], ids=["grid", "optuna-tpe"])
def test_revived_trials_run_again_under_their_keys_and_spawn_their_bases(search):
    """ae-0000 failed itself (its base skipped), ae-0001's base failed, ae-0002's base failed
    deterministically: a resume hands out ae-0000 (then its base) and ae-0001-tiny again, not ae-0002-tiny;
    the revived records reach objectives told to new Optuna trials."""
    s = SpawningSearcher(search, ["tiny"])
    cfg = {k: s.suggest(f"t{i}") for i, k in enumerate(["ae-0000", "ae-0001", "ae-0002"])}
    s.on_trial_complete("t0", None, error=True)
    s.on_trial_complete("t1", _ae("ae-0001"))
    s.on_trial_complete("t2", _ae("ae-0002"))
    s.suggest("b1"), s.suggest("b2")
    s.on_trial_complete("b1", {"key": "ae-0001-tiny"}, error=True)
    s.on_trial_complete("b2", {"key": "ae-0002-tiny"}, error=True)
    assert s.suggest("x") == Searcher.FINISHED
    told = len(s.study.trials)

    aes, bases = s.revivable(lambda key: key == "ae-0002-tiny")
    assert (aes, bases) == (["ae-0000"], [("ae-0001", "tiny")])
    s.revive(aes, bases)
    s.set_state(s.get_state())  # what the driver saves and Tune restores
    assert s.counts() == {"ae_running": 1, "base_waiting": 1, "ae_trained": 1, "base_queued": 1,
                          "ae_failed": 1, "base_failed": 1}
    again = [s.suggest("r0"), s.suggest("r1")]
    assert [(c["kind"], c["key"]) for c in again] == [("base", "ae-0001-tiny"), ("ae", "ae-0000")]
    assert again[1]["overrides"] == cfg["ae-0000"]["overrides"]
    assert s.suggest("r2") is None  # outcomes pending: wait
    s.on_trial_complete("r0", {"key": "ae-0001-tiny", "gfd": 2.0})
    s.on_trial_complete("r1", _ae("ae-0000"))
    b = s.suggest("r3")
    assert (b["key"], b["ae_checkpoint"]) == ("ae-0000-tiny", "/ck/ae-0000")
    s.on_trial_complete("r3", {"key": "ae-0000-tiny", "gfd": 1.0})
    assert s.suggest("y") == Searcher.FINISHED
    assert s.counts() == {"ae_done": 2, "base_done": 2, "ae_failed": 1, "base_failed": 1}
    assert [r["key"] for r in s.ranked()] == ["ae-0000", "ae-0001"]
    trials = s.study.trials  # the revived records' new Optuna trials, complete with their values
    for key, value in (("ae-0000", 1.0), ("ae-0001", 2.0)):
        t = trials[s.aes[key]["optuna_number"]]
        assert t.number >= told and (t.state.name, t.value) == ("COMPLETE", value)
        assert t.params == cfg[key]["overrides"]


def test_a_trial_tune_restarts_itself_is_waited_for_not_handed_out_twice():
    """Ray Tune records a trial whose last attempt died as RUNNING (not ERROR) and restarts it on restore; the
    searcher's record, failed, then waits for that trial's completion instead of handing out a second one."""
    s = SpawningSearcher(_grid(), ["tiny"])
    s.suggest("t0"), s.suggest("t1"), s.suggest("t2")
    s.on_trial_complete("t0", None, error=True)  # ae-0000's process killed once too often
    s.on_trial_complete("t1", _ae("ae-0001"))
    s.suggest("b1")
    s.on_trial_complete("b1", {"key": "ae-0001-tiny"}, error=True)
    s.revive(["ae-0000"], [("ae-0001", "tiny")], resumed={"ae-0000", "ae-0001-tiny"})
    assert s.redo == [] and s.queue == []
    assert s.aes["ae-0000"]["status"] == "running" and s.aes["ae-0001"]["bases"]["tiny"]["status"] == "running"
    assert s.suggest("x") is None  # nothing new to hand out: wait for Tune's restarted trials
    s.on_trial_complete("t0", _ae("ae-0000"))  # the same Tune trial ids complete
    s.on_trial_complete("b1", {"key": "ae-0001-tiny", "gfd": 2.0})
    assert s.suggest("b0")["key"] == "ae-0000-tiny"  # the revived AE spawns its base
    assert s.aes["ae-0001"]["objective"] == [2.0]


def test_a_write_through_a_storage_window_waits_for_it_to_close(tmp_path, monkeypatch):
    """ulsweep.io retries a write refused with EROFS/ENOSPC until the storage takes it, up to
    ULSWEEP_STORAGE_RETRY_S; then the error is raised. Other errors are raised at once.

    Simulates a trial directory remounted read-only for a second (EROFS), then a full disk (ENOSPC) that
    outlasts the retries: tests run as root, which chmod does not stop, so the writer itself raises the errno
    a read-only mount or a full disk gives, for as long as a control file names the directory
    (ULSWEEP_FAULT_STORAGE, ulsweep/testing/faults.py). A real read-only bind mount and a full tmpfs are the
    campaign's (benchmarks/faults/campaign.py --only storage-ro-mount,storage-full-tmpfs)."""
    ctl = tmp_path / "ctl"
    ctl.mkdir()
    target = tmp_path / "runs" / "trials" / "ae-0000" / "checkpoints" / "step_00000010.json"
    monkeypatch.setenv(faults.STORAGE_ENV, str(ctl))
    monkeypatch.setenv(uio.STORAGE_RETRY_ENV, "20")
    (ctl / "ro").write_text(f"EROFS {tmp_path / 'runs' / 'trials'}")
    threading.Timer(1.0, (ctl / "ro").unlink).start()
    t0 = time.monotonic()
    uio.atomic_write_text(str(target), "{}")
    assert target.read_text() == "{}" and 0.9 < time.monotonic() - t0 < 10
    assert not [p for p in target.parent.iterdir() if p.name.startswith(".tmp-")]

    monkeypatch.setenv(uio.STORAGE_RETRY_ENV, "0.5")
    (ctl / "full").write_text(f"ENOSPC {tmp_path / 'runs'}")
    with pytest.raises(OSError) as e:
        uio.atomic_write_text(str(target), "[]")
    assert e.value.errno == errno.ENOSPC and target.read_text() == "{}"  # the old file is intact
    uio.atomic_write_text(str(tmp_path / "elsewhere.json"), "1")  # outside the window
    (ctl / "full").unlink()

    calls = []

    def denied():
        calls.append(1)
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    with pytest.raises(PermissionError):
        uio.retry_storage(denied, "x")
    assert len(calls) == 1


def test_a_refused_retry_tags_the_run_with_the_original_failure_and_trains_nothing(tmp_path, monkeypatch):
    """run_trial in process (no Ray): Tune's retry of a trial whose last attempt diverged is refused before any
    setup; its MLflow run is FAILED with the recorded error and last good checkpoint."""
    import json

    from faultlib import fake_experiment
    from ulsweep import tracking
    from ulsweep.config import experiment_from_dict, to_dict
    from ulsweep.sweep import trial

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = tracking.client(uri)
    eid = tracking.get_or_create_experiment(c, "refused")
    sweep_id = tracking.create_sweep_run(c, eid, "sweep")
    run_id, _ = tracking.get_or_create_trial_run(c, eid, sweep_id, "ae-0001", "ae", sweep_id)
    run_dir = tmp_path / "runs" / "x"
    tdir = run_dir / "trials" / "ae-0001"
    tdir.mkdir(parents=True)
    rec = {"attempt": "a0", "error": "TrainingDiverged: fake ae-0001: non-finite loss by step 16",
           "checkpoint": str(tdir / "checkpoints" / "step_00000010.json"), "time": 0.0}
    (tdir / "failure.json").write_text(json.dumps(rec))
    attempts.begin(str(tdir), "s", "a0")
    attempts.end(str(tdir), "s", "a0", rec["error"], deterministic=True)
    ctx = trial.SweepContext(to_dict(experiment_from_dict(fake_experiment("x", n_ae=2, num_workers=0))),
                             str(run_dir), uri, eid, sweep_id, "fake", session="s")
    monkeypatch.setattr(trial, "make_trainer", lambda *a, **k: pytest.fail("a refused retry trained"))
    with pytest.raises(attempts.RetryRefused, match="ae-0001: not retried"):
        trial.run_trial({"kind": "ae", "key": "ae-0001", "overrides": {}}, ctx)
    run = c.get_run(run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["ulsweep.error"] == rec["error"]
    assert run.data.tags["ulsweep.last_good_checkpoint"] == rec["checkpoint"]
    assert attempts.tally(str(tdir), "s", "x").errors == [rec["error"]]  # the refusal added no attempt


def test_unfinished_trials_of_a_tune_table(tmp_path):
    """statecheck.unfinished_trials reads the ids that Tune's newest trial table holds neither TERMINATED nor
    ERROR (Tune's own format: a list of [trial JSON string, run metadata JSON string])."""
    import json

    from ulsweep.sweep.statecheck import unfinished_trials

    def table(statuses):
        return {"trial_data": [[json.dumps({"trial_id": t, "status": s}), json.dumps({"num_failures": 0})]
                               for t, s in statuses.items()], "runner_data": {}}

    (tmp_path / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps(table({"a": "RUNNING"})))
    (tmp_path / "experiment_state-2026-01-02_00-00-00.json").write_text(json.dumps(table(
        {"a": "TERMINATED", "b": "ERROR", "c": "RUNNING", "d": "PENDING", "e": "PAUSED"})))
    assert unfinished_trials(str(tmp_path)) == {"c", "d", "e"}  # from the newest table only


@pytest.mark.parametrize("error", [OSError(errno.EROFS, "Read-only file system", "/runs/x/trials/ae-0000/y"),
                                   RuntimeError("(sqlite3.OperationalError) attempt to write a readonly database")])
def test_storage_refusing_writes_past_the_retries_is_one_line(tmp_path, monkeypatch, capsys, error):
    """`ulsweep run` whose storage still refuses writes after the retries (or whose sqlite MLflow store does)
    ends with one line saying what to do, not a traceback; other errors still raise."""
    import yaml

    from faultlib import fake_experiment
    from ulsweep.cli import main
    from ulsweep.sweep import driver

    f = tmp_path / "x.yaml"
    f.write_text(yaml.safe_dump(fake_experiment("x")))

    def refused(*a, **k):
        raise error

    monkeypatch.setattr(driver, "run_sweep", refused)
    assert main(["run", str(f), "--storage", str(tmp_path / "runs"), "--train-impl", "fake"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "once the storage takes writes again, continue with --resume" in lines[0], lines
    where = "/runs/x/trials/ae-0000/y: Read-only file system" if isinstance(error, OSError) else "storage: "
    assert lines[0].startswith(f"error: {where}"), lines[0]
    monkeypatch.setattr(driver, "run_sweep", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["run", str(f), "--storage", str(tmp_path / "runs"), "--train-impl", "fake"])



class _Order(TrainHooks):
    """Records, at each hook, whether the checkpoint of that step exists yet."""

    def __init__(self, exists):
        self.exists, self.seen = exists, []

    def before_checkpoint(self, step):
        self.seen.append(("before", step, self.exists(step)))

    def checkpoint_saved(self, step, path, metrics):
        self.seen.append(("saved", step, self.exists(step)))


class _Linear(torch.nn.Module):
    """The smallest objective the training loop takes: a linear map's squared error, in nats."""

    progress_keys = ("loss",)
    dims = 4

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)

    def draw_noise(self, n, gen):
        return {}

    def forward(self, x, noise):
        return {"total": ((self.lin(x) - x) ** 2).sum(1)}

    def curves(self, means):
        return {"loss": means["total"]}


class _Source:
    def draw(self, n, gen):
        return torch.randn(n, 4, generator=gen)


@pytest.mark.parametrize("impl", ["fake", "loop"])
def test_metric_points_are_made_durable_before_each_checkpoint_exists(tmp_path, impl, monkeypatch):
    """Both loops call before_checkpoint(step) (the sweep worker flushes or spools its metric points there)
    before the checkpoint of that step is written, so a process killed right after a checkpoint cannot lose
    the points before it (a loop resumed from it does not log them again: the campaign's random worker kills
    found that gap when the flush came after the checkpoint)."""
    from ulsweep.config import OptimConfig, TrainConfig, experiment_from_dict

    run = tmp_path / "run"
    tc = {"steps": 4, "batch_size": 8, "log_every": 1, "ckpt_every": 2}
    if impl == "fake":
        from ulsweep.testing.fake import train_autoencoder

        monkeypatch.setenv("ULSWEEP_FAKE_STEP_S", "0")
        hooks = _Order(lambda s: (run / "checkpoints" / f"step_{s:08d}.json").exists())
        train_autoencoder(experiment_from_dict({"ae": {"train": tc}}), str(run), hooks)
    else:
        from ulsweep.train.loop import RunSpec, train
        from ulsweep.train.runtime import make_runtime
        from ulsweep.train.state import TrainState

        tcfg = TrainConfig(**tc, device="cpu")
        obj = _Linear()
        ts = TrainState(obj, OptimConfig(), make_runtime(tcfg), 0)
        hooks = _Order(lambda s: (run / "checkpoints" / f"step_{s:08d}" / "meta.json").exists())
        train(obj, _Source(), lambda net, final: ({"m": 1.0}, {}), ts, tcfg,
              RunSpec(str(run), "ae", "ae t", "h", "x: 1\n", {}, {}), hooks)
    assert hooks.seen == [("before", 2, False), ("saved", 2, True), ("before", 4, False), ("saved", 4, True)]
