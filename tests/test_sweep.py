"""Sweep orchestration: the spawning searcher (no Ray), and end-to-end Ray sweeps (slow).

The slow tests start local Ray clusters of their own and stop exactly what they started. They train the real
tiny loops for a few steps, or the fake ones. The sweep on two `ray start` nodes (`--address`) is in
tests/test_cluster_e2e.py, which checks its lineage with check_lineage from here.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ulsweep.config import SearchConfig, experiment_from_dict
from ulsweep.sweep.searcher import Searcher, SpawningSearcher

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# searcher unit tests (no Ray cluster)


def grid_search(**kw) -> SearchConfig:
    d = dict(method="grid", space={"ae.loss.loss_factor": {"values": [1.5, 4.0]}}, metrics=("gfd",),
             modes=("min",))
    d.update(kw)
    return SearchConfig(**d)


def ae_done(key, ckpt="/ck", run="r", **metrics):
    return {"key": key, "kind": "ae", "checkpoint": ckpt, "mlflow_run_id": run, "final": 1.0, "bpp": 0.1,
            **metrics, "config": {"ignored": True}}


def test_grid_then_spawned_base_trials_ahead_of_new_ae_trials():
    s = SpawningSearcher(grid_search(space={"ae.loss.loss_factor": {"values": [1.5, 2.0, 4.0]}}),
                         ["small", "medium"])
    c0 = s.suggest("t0")
    c1 = s.suggest("t1")
    assert (c0["kind"], c0["key"], c0["overrides"]) == ("ae", "ae-0000", {"ae.loss.loss_factor": 1.5})
    assert (c1["key"], c1["overrides"]) == ("ae-0001", {"ae.loss.loss_factor": 2.0})
    s.on_trial_complete("t0", ae_done("ae-0000", ckpt="/ck0", run="run0"))
    # the finished AE's two base trials come before the third AE trial
    b0, b1, c2 = s.suggest("t2"), s.suggest("t3"), s.suggest("t4")
    assert [b0["key"], b1["key"], c2["key"]] == ["ae-0000-small", "ae-0000-medium", "ae-0002"]
    assert b0 == {"kind": "base", "key": "ae-0000-small", "ae_key": "ae-0000", "base": "small",
                  "ae_checkpoint": "/ck0", "ae_run_id": "run0", "overrides": {"ae.loss.loss_factor": 1.5}}
    assert s.suggest("t5") is None  # everything handed out, outcomes pending: wait, not FINISHED
    assert not s.is_finished()


def test_objective_told_only_after_all_base_trials():
    s = SpawningSearcher(grid_search(), ["small", "medium"])
    s.suggest("a0"), s.suggest("a1")
    s.on_trial_complete("a0", ae_done("ae-0000", gfd=99.0))  # an AE's own gfd is not the objective
    assert s.aes["ae-0000"]["objective"] is None
    assert s.study.trials[0].state.name == "RUNNING"
    s.suggest("b0"), s.suggest("b1")
    s.on_trial_complete("b0", {"key": "ae-0000-small", "gfd": 2.0, "final": 1.0})
    assert s.study.trials[0].state.name == "RUNNING"  # medium still out
    s.on_trial_complete("b1", {"key": "ae-0000-medium", "gfd": 4.0, "final": 1.0})
    assert s.aes["ae-0000"]["objective"] == [3.0]  # mean over base models
    assert s.study.trials[0].state.name == "COMPLETE" and s.study.trials[0].value == 3.0
    # duplicate completion (e.g. a trial re-run after resume) changes nothing
    s.on_trial_complete("b1", {"key": "ae-0000-medium", "gfd": 100.0})
    assert s.aes["ae-0000"]["objective"] == [3.0] and len(s.study.trials) == 2


def test_finished_only_when_everything_reported():
    s = SpawningSearcher(grid_search(), ["tiny"])
    s.suggest("a0"), s.suggest("a1")
    s.on_trial_complete("a0", ae_done("ae-0000"))
    s.on_trial_complete("a1", ae_done("ae-0001"))
    s.suggest("b0"), s.suggest("b1")
    s.on_trial_complete("b0", {"key": "ae-0000-tiny", "gfd": 1.0})
    assert s.suggest("x") is None
    s.on_trial_complete("b1", {"key": "ae-0001-tiny", "gfd": 0.5})
    assert s.suggest("y") == Searcher.FINISHED and s.is_finished()
    assert [r["key"] for r in s.ranked()] == ["ae-0001", "ae-0000"]
    assert s.counts() == {"ae_done": 2, "base_done": 2}


def test_failed_ae_spawns_nothing_and_failed_base_fails_the_objective():
    s = SpawningSearcher(grid_search(), ["tiny"])
    s.suggest("a0"), s.suggest("a1")
    s.on_trial_complete("a0", None, error=True)
    assert s.aes["ae-0000"]["status"] == "failed" and s.study.trials[0].state.name == "FAIL"
    s.on_trial_complete("a1", ae_done("ae-0001"))
    b = s.suggest("b")
    assert b["key"] == "ae-0001-tiny"
    s.on_trial_complete("b", {"key": "ae-0001-tiny"}, error=True)
    assert s.aes["ae-0001"]["status"] == "failed" and s.suggest("z") == Searcher.FINISHED


def test_metric_sources_ae_metric_and_named_base():
    s = SpawningSearcher(SearchConfig(method="optuna-nsga2", space={"ae.loss.loss_factor": {"low": 1.0, "high": 4.0}},
                                      metrics=("bpp", "big/gfd"), modes=("min", "min"), num_samples=1),
                         ["small", "big"])
    c = s.suggest("a")
    assert 1.0 <= c["overrides"]["ae.loss.loss_factor"] <= 4.0
    s.on_trial_complete("a", ae_done("ae-0000", bpp=0.25))
    s.suggest("b1"), s.suggest("b2")
    s.on_trial_complete("b1", {"key": "ae-0000-small", "gfd": 1.0})
    s.on_trial_complete("b2", {"key": "ae-0000-big", "gfd": 7.0})
    assert s.aes["ae-0000"]["objective"] == [0.25, 7.0]
    assert s.study.trials[0].values == [0.25, 7.0]


def test_no_base_models_objective_from_ae():
    s = SpawningSearcher(grid_search(metrics=("bpp",)), [])
    s.suggest("a0"), s.suggest("a1")
    s.on_trial_complete("a0", ae_done("ae-0000", bpp=0.3))
    s.on_trial_complete("a1", ae_done("ae-0001", bpp=0.2))
    assert s.suggest("x") == Searcher.FINISHED
    assert [r["objective"] for r in s.ranked()] == [[0.2], [0.3]]


def test_tpe_samples_in_range_and_learns_from_objectives():
    space = {"ae.loss.loss_factor": {"low": 1.0, "high": 4.0, "log": True},
             "ae.model.latent_channels": {"low": 2, "high": 16, "int": True}}
    s = SpawningSearcher(SearchConfig(method="optuna-tpe", space=space, num_samples=12, metrics=("gfd",),
                                      modes=("min",), seed=1), ["tiny"])
    for i in range(12):
        c = s.suggest(f"a{i}")
        lf, ch = c["overrides"]["ae.loss.loss_factor"], c["overrides"]["ae.model.latent_channels"]
        assert 1.0 <= lf <= 4.0 and isinstance(ch, int) and 2 <= ch <= 16
        s.on_trial_complete(f"a{i}", ae_done(c["key"]))
        b = s.suggest(f"b{i}")
        s.on_trial_complete(f"b{i}", {"key": b["key"], "gfd": (lf - 2.0) ** 2})
    assert s.suggest("end") == Searcher.FINISHED
    assert len(s.study.trials) == 12 and all(t.state.name == "COMPLETE" for t in s.study.trials)


def test_save_restore_midway_neither_loses_nor_doubles(tmp_path):
    s = SpawningSearcher(grid_search(space={"ae.loss.loss_factor": {"values": [1.5, 2.0, 4.0]}}), ["tiny"])
    s.suggest("a0"), s.suggest("a1")
    s.on_trial_complete("a0", ae_done("ae-0000"))
    s.suggest("b0")  # ae-0000-tiny handed out
    s.on_trial_complete("a1", ae_done("ae-0001"))  # ae-0001-tiny queued, not yet handed out
    s.save_to_dir(str(tmp_path), session_str="x")

    r = SpawningSearcher(grid_search(space={"ae.loss.loss_factor": {"values": [1.5, 2.0, 4.0]}}), ["tiny"])
    r.restore_from_dir(str(tmp_path))
    assert r.next_index == 2 and r.queue == [("ae-0001", "tiny")]
    assert r.suggest("b1")["key"] == "ae-0001-tiny"  # the queued one, once
    assert r.suggest("a2")["key"] == "ae-0002"
    # the restored, resumed trial b0 reports under its old id
    r.on_trial_complete("b0", {"key": "ae-0000-tiny", "gfd": 1.0})
    r.on_trial_complete("b1", {"key": "ae-0001-tiny", "gfd": 2.0})
    r.on_trial_complete("a2", ae_done("ae-0002"))
    assert r.suggest("b2")["key"] == "ae-0002-tiny"
    r.on_trial_complete("b2", {"key": "ae-0002-tiny", "gfd": 0.5})
    assert r.suggest("end") == Searcher.FINISHED
    keys = sorted(set(r.trial_keys.values()))
    assert keys == ["ae-0000", "ae-0000-tiny", "ae-0001", "ae-0001-tiny", "ae-0002", "ae-0002-tiny"]
    assert len(r.trial_keys) == 6 and [t.value for t in r.study.trials] == [1.0, 2.0, 0.5]


def test_repeats_increment_seed_and_searcher_pickles():
    s = SpawningSearcher(SearchConfig(method="none", num_samples=2, metrics=("bpp",), modes=("min",)), [],
                         base_seed=7)
    assert s.suggest("a")["overrides"] == {}
    assert s.suggest("b")["overrides"] == {"ae.train.seed": 8}
    assert pickle.loads(pickle.dumps(s)).next_index == 2


def test_trial_resources_names_and_checkpoint_objects(tmp_path):
    from ray.train import Checkpoint

    from ulsweep.config import ResourcesConfig
    from ulsweep.sweep.trial import trial_label, trial_resources
    from ulsweep.sweep.worker import _checkpoint_obj

    assert trial_resources(ResourcesConfig(num_workers=2, cpus_per_worker=0.99)) == {"cpu": 0.01}
    assert trial_resources(ResourcesConfig(num_workers=0, cpus_per_worker=2, gpus_per_worker=0.25)) == \
        {"cpu": 2, "gpu": 0.25}

    class T:
        trial_id = "abc123"
        config = {"key": "ae-0003-tiny"}

    assert trial_label(T()) == "ae-0003-tiny_abc123"  # stable across restore: no timestamp
    run_dir = tmp_path / "trials" / "ae-0000"
    ck = run_dir / "checkpoints" / "step_00000010"
    ck.mkdir(parents=True)
    obj = _checkpoint_obj(str(ck), str(run_dir))
    assert isinstance(obj, Checkpoint) and obj.path == str(ck)
    assert _checkpoint_obj(str(tmp_path / "elsewhere"), str(run_dir)) is None  # not reportable in place
    assert _checkpoint_obj("", str(run_dir)) is None


def test_gpu_experiment_runs_on_cpu_only_when_ray_was_started_here_without_gpus():
    import io

    from ulsweep.config import experiment_from_dict
    from ulsweep.sweep.driver import fit_to_local_machine

    exp = experiment_from_dict({"resources": {"gpus_per_worker": 0.25, "num_workers": 1}})
    buf = io.StringIO()
    laptop = fit_to_local_machine(exp, {"CPU": 8.0}, started_here=True, out=buf)
    assert laptop.resources.gpus_per_worker == 0.0 and "no GPU" in buf.getvalue()
    assert fit_to_local_machine(exp, {"CPU": 8.0, "GPU": 1.0}, started_here=True, out=buf) is exp
    # a cluster given by --address may still be scaling its GPU nodes up: keep asking for GPUs
    assert fit_to_local_machine(exp, {"CPU": 8.0}, started_here=False, out=buf) is exp


def test_reused_trial_processes_per_setting_cuda_graph_trials_included():
    from ulsweep.config import experiment_from_dict
    from ulsweep.sweep.driver import reuse_processes

    gpu = {"resources": {"gpus_per_worker": 0.1, "num_workers": 0}}
    graphs = {"ae.train.compile": "reduce-overhead"}
    # auto: CUDA-graph trials in the trial process too (they all run in its one trial thread)
    assert reuse_processes(experiment_from_dict(gpu, graphs))
    assert reuse_processes(experiment_from_dict({**gpu, "base_models": [
        {"name": "b", "train": {"compile": "reduce-overhead"}}]}))
    assert reuse_processes(experiment_from_dict({}, graphs))
    assert reuse_processes(experiment_from_dict(gpu, {**graphs, "resources.reuse_processes": "on"}))
    assert not reuse_processes(experiment_from_dict(gpu, {**graphs, "resources.reuse_processes": "off"}))
    assert not reuse_processes(experiment_from_dict({}, {"resources.reuse_processes": "off"}))


def test_trial_thread_runs_every_call_in_one_other_thread_and_hands_back_results_and_errors():
    import threading

    from ulsweep.sweep import trial_thread

    def who(x):
        return threading.get_ident(), threading.current_thread().name, x * 2

    first, second = trial_thread.run(who, 1), trial_thread.run(who, 2)
    assert first[0] == second[0] != threading.get_ident() and first[1] == "ulsweep-trial"
    assert (first[2], second[2]) == (2, 4)
    with pytest.raises(ZeroDivisionError):
        trial_thread.run(lambda: 1 / 0)
    with pytest.raises(SystemExit):  # Tune stops a trial by raising SystemExit in it: the caller sees it too
        trial_thread.run(sys.exit, 0)
    assert trial_thread.run(who, 3)[0] == first[0]  # the thread outlives its trials' errors
    assert trial_thread.run(trial_thread.run, who, 4)[0] == first[0]  # from inside it: run there, no deadlock
    n = trial_thread.note_trial()
    assert trial_thread.note_trial() == n + 1


def test_run_sweep_guards_before_starting_anything(tmp_path):
    from ulsweep.sweep.driver import SweepError, resolve_run_dir, run_sweep
    from ulsweep.sweep.state import identity

    exp = experiment_from_dict(tiny_experiment("guard"), {"storage": str(tmp_path / "runs")})
    run_dir = Path(resolve_run_dir(exp))
    assert run_dir == tmp_path / "runs" / "guard" and run_dir.is_absolute()
    with pytest.raises(SweepError, match="nothing to resume"):
        run_sweep(exp, resume=True)
    run_dir.mkdir(parents=True)
    state = {"sweep_id": "s1", "mlflow_experiment_id": "1", "tracking_uri": "sqlite:////x.db",
             "identity": identity(exp)}
    (run_dir / "sweep.json").write_text(json.dumps(state))
    with pytest.raises(SweepError, match="--resume"):
        run_sweep(exp)
    changed = experiment_from_dict(tiny_experiment("guard"), {"storage": str(tmp_path / "runs"),
                                                              "ae.train.steps": 99})
    with pytest.raises(SweepError, match="ae.train.steps"):
        run_sweep(changed, resume=True)
    # resources and concurrency may change on resume: same identity
    assert identity(experiment_from_dict(tiny_experiment("guard"), {"search.max_concurrent": 1,
                                                                    "resources.num_workers": 0})) == identity(exp)


def test_state_file_round_trip_is_read_alike_by_driver_and_report(tmp_path):
    from ulsweep.report.dashboard import _read_state as report_reads
    from ulsweep.sweep.state import identity, identity_diff, new_state, read_state, state_path, write_state

    exp = experiment_from_dict(tiny_experiment("state"))
    run_dir = str(tmp_path / "r")
    assert read_state(run_dir) is None and report_reads(run_dir) is None
    state = new_state("s1", "7", "postgresql://u:pw@db/mlflow", identity(exp))
    assert state["tracking_uri"] == "postgresql://u:***@db/mlflow"  # the run directory never holds credentials
    write_state(run_dir, state)
    assert state_path(run_dir + "/") == str(tmp_path / "r" / "sweep.json")
    assert read_state(run_dir) == state == report_reads(run_dir)
    changed = experiment_from_dict(tiny_experiment("state"), {"ae.train.steps": 99, "ae.loss.loss_factor": 2.0})
    assert identity_diff(state["identity"], identity(changed)) == ["ae.loss.loss_factor", "ae.train.steps"]
    (tmp_path / "r" / "sweep.json").write_text("{damaged")
    with pytest.raises(ValueError):
        read_state(run_dir)  # the driver refuses to start or resume over it
    assert report_reads(run_dir) is None  # the report looks elsewhere


def test_a_setting_added_since_a_sweep_started_changes_its_identity_only_away_from_its_default():
    """A sweep started before ulsweep had a setting stored an identity without it; resumed by a newer ulsweep
    with the setting at its default it runs the same trials (no change), with another value it does not."""
    from ulsweep.sweep.state import changed_keys, identity

    exp = experiment_from_dict(tiny_experiment("added"))
    stored = identity(exp)
    del stored["ae"]["train"]["keep_checkpoints"], stored["eval"]["gfd_samples"]  # as an older ulsweep wrote it
    assert changed_keys(stored, identity(exp)) == []
    other = experiment_from_dict(tiny_experiment("added"), {"eval.gfd_samples": 123})
    assert changed_keys(stored, identity(other)) == ["eval.gfd_samples"]
    assert changed_keys(identity(exp), identity(other)) == ["eval.gfd_samples"]
    removed = identity(exp) | {"gone": {"setting": 1}}  # a setting since removed: compared as stored
    assert changed_keys(removed, identity(exp)) == ["gone.setting"]


def test_worker_config_follows_the_resources_it_runs_with():
    from ulsweep.config import ResourcesConfig, to_dict
    from ulsweep.sweep.trial import worker_config

    exp = experiment_from_dict(tiny_experiment("wc"))  # one worker per trial
    args = ("ae", "ae-0000", "/r/trials/ae-0000", "sqlite:////r/mlflow.db", "run1", "fake")
    local = worker_config(exp, ResourcesConfig(num_workers=0), *args)
    assert local["local_mode"] and "attempt" not in local and local["experiment"] == to_dict(exp)
    tune = worker_config(exp, exp.resources, *args, base="tiny", ae_checkpoint="/ck", attempt="a1")
    assert not tune["local_mode"] and (tune["attempt"], tune["base"], tune["ae_checkpoint"]) == ("a1", "tiny", "/ck")


def test_trial_results_keep_finished_loop_time_and_one_error_line():
    from types import SimpleNamespace as Result

    from ulsweep.sweep.outcome import trial_results
    from ulsweep.sweep.worker import error_line, numbers

    grid = [Result(metrics={"final": 1.0, "loop_seconds": 3.0, "step": 20}, config={"key": "ae-0000", "kind": "ae"},
                   error=None),
            Result(metrics={"loop_seconds": 9.0}, config={"key": "ae-0001", "kind": "ae"},
                   error=RuntimeError("Traceback:\n  File x\n\n  ValueError: bad  \n")),
            Result(metrics=None, config=None, error=None)]
    results, loop_s = trial_results(grid)
    assert loop_s == 3.0  # unfinished loops do not count
    assert results[0] == {"loop_seconds": 3.0, "train_seconds": None, "step": 20, "key": "ae-0000", "kind": "ae",
                          "error": None}
    assert results[1]["error"] == "ValueError: bad" and results[2]["key"] is None
    assert error_line(RuntimeError("")) == "RuntimeError('')"
    assert numbers({"a": 1, "b": 2.5, "c": True, "d": "x", "e": None}) == {"a": 1, "b": 2.5}


def test_cli_dry_run_lists_trials(tmp_path, capsys):
    from ulsweep.sweep.cli import main

    f = write_yaml(tmp_path, tiny_experiment("dry", n_ae=3))
    assert main(["run", str(f), "--dry-run", "--storage", str(tmp_path / "r"),
                 "--set", "ae.loss.sigmoid_bias=1.0"]) == 0
    out = capsys.readouterr().out
    assert "sigmoid_bias: 1.0" in out and "ae-0002  ae.loss.loss_factor=2.0" in out
    assert f"sqlite:///{tmp_path}/r/dry/mlflow.db" in out
    assert "# precompile (resources.precompile auto): nothing" in out  # the base model does not compile
    assert main(["run", str(f), "--dry-run", "--storage", str(tmp_path / "r"),
                 "--set", "base_models.0.train.compile=true"]) == 0
    out = capsys.readouterr().out
    assert "# precompile (resources.precompile auto): base tiny, ae.loss.loss_factor=1.5 (latents (4, 4, 4))" in out
    assert main(["run", str(f), "--dry-run", "--storage", str(tmp_path / "r"),
                 "--set", "ae.train.compile=true"]) == 0
    out = capsys.readouterr().out
    assert "# precompile (resources.precompile auto): ae, ae.loss.loss_factor=1.5 (latents (4, 4, 4))" in out
    assert not (tmp_path / "r").exists()  # a dry run creates nothing
    assert main(["run", str(f), "--dry-run", "--set", "search.space={ae.loss.nope: {values: [1]}}"]) == 2


# ----------------------------------------------------------------------------------------------
# end-to-end (Ray): helpers


def tiny_experiment(name: str, n_ae: int = 2, bases=("tiny",), steps: int = 20, **search) -> dict:
    train = {"steps": steps, "batch_size": 16, "log_every": 5, "eval_images": 32, "eval_t_per_image": 1,
             "sample_steps": 4}
    d = {
        "name": name,
        "data": {"path": "builtin:digits", "image_size": 16},
        "ae": {"model": {"preset": "tiny", "downsample": 4, "latent_channels": 4},
               "optim": {"warmup_steps": 2}, "train": train},
        "base_models": [{"name": b, "model": {"preset": "tiny"}, "optim": {"warmup_steps": 2}, "train": train}
                        for b in bases],
        "search": {"method": "grid", "space": {"ae.loss.loss_factor": {"values": [1.5, 4.0, 2.0, 3.0][:n_ae]}},
                   "metrics": ["gfd_digits"] if bases else ["bpp"], "modes": ["min"], "max_concurrent": 2,
                   **search},
        "resources": {"num_workers": 1, "cpus_per_worker": 0.99},
        "tracking": {"system_metrics_s": 1},  # a few samples even from trials of seconds
    }
    experiment_from_dict(d)  # fail fast on a bad test config
    return d


def write_yaml(tmp_path: Path, d: dict) -> Path:
    p = tmp_path / f"{d['name']}.yaml"
    p.write_text(yaml.safe_dump(d, sort_keys=False))
    return p


def sweep_env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env.update({"RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", "MLFLOW_TRACKING_URI": ""})
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI")
    return env


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "ulsweep.sweep.cli", "run", *map(str, args)]


def mlflow_runs(run_dir: Path):
    from ulsweep import tracking

    state = json.loads((run_dir / "sweep.json").read_text())
    c = tracking.client(state["tracking_uri"])
    runs = tracking.sweep_runs(c, state["mlflow_experiment_id"], state["sweep_id"])
    return state, c, {r.data.tags[tracking.TAG_KEY]: r for r in runs}, runs


def input_names(c, run) -> set[str]:
    """The names of a run's MLflow dataset inputs."""
    return {i.dataset.name for i in c.get_run(run.info.run_id).inputs.dataset_inputs}


def check_lineage(run_dir: Path, ae_keys: list[str], bases: list[str], latents: bool = False,
                  base_metric: str = "gfd", system_metrics: bool = True, real_loops: bool = True) -> dict:
    """Three-level lineage, one run per key, nothing RUNNING, params/metrics/artifacts present, dataset
    inputs (with `latents`, base runs list the latents they trained on), base runs with a metric whose name
    starts with `base_metric`; every trial's timeline and, with `system_metrics` (trials of real loops, long
    enough for a sample), MLflow system metrics and, with `real_loops` (not --train-impl fake), the final
    evaluation's parts (check_timelines). Also used by tests/test_cluster_e2e.py (the two-node `--address` sweep)."""
    from ulsweep import tracking

    state, c, by_key, runs = mlflow_runs(run_dir)
    expected = {"sweep", *ae_keys, *(f"{k}-{b}" for k in ae_keys for b in bases)}
    assert sorted(by_key) == sorted(expected)
    assert len(runs) == len(expected), "duplicate MLflow runs for a key"
    assert all(r.info.status == "FINISHED" for r in runs), {k: r.info.status for k, r in by_key.items()}
    sweep = by_key["sweep"]
    for k in ae_keys:
        ae = by_key[k]
        assert ae.data.tags[tracking.TAG_PARENT] == sweep.info.run_id
        assert "ae.loss.loss_factor" in ae.data.params
        assert "bpp" in ae.data.metrics and "psnr" in ae.data.metrics
        assert ae.data.tags.get(tracking.TAG_CHECKPOINT)
        assert len(c.get_metric_history(ae.info.run_id, "loss")) >= 2  # a curve, not a point
        arts = {a.path for a in c.list_artifacts(ae.info.run_id)}
        assert "config.yaml" in arts
        assert input_names(c, ae) == {"digits:train", "digits:test"}
        for b in bases:
            br = by_key[f"{k}-{b}"]
            assert br.data.tags[tracking.TAG_PARENT] == ae.info.run_id
            assert input_names(c, br) == {"digits:train", "digits:test", *(["latents:digits:train"] if latents else [])}
            assert any(m.startswith(base_metric) for m in br.data.metrics)
        if bases:
            assert any(m.startswith("objective/") for m in ae.data.metrics)
    check_timelines([r for k, r in by_key.items() if k != "sweep"], system_metrics, real_loops)
    check_processes([r for k, r in by_key.items() if k != "sweep"])
    return by_key


def check_processes(trial_runs) -> dict[str, list[int]]:
    """Every trial run names the process and thread of its last attempt; all trials of a process ran in one
    thread of it (resources.reuse_processes: trial_thread.py). Returns {process: [its trials' numbers]}."""
    from ulsweep.sweep import timeline

    threads, numbers = {}, {}
    for r in trial_runs:
        tag = r.data.tags.get(timeline.TAG_PROCESS)
        n = timeline.process_trial(tag)
        assert n is not None, (r.info.run_name, tag)
        proc, thread = tag.rsplit(" trial ", 1)[0].split("/")
        threads.setdefault(proc, set()).add(thread)
        numbers.setdefault(proc, []).append(n)
    assert all(len(t) == 1 for t in threads.values()), threads
    return {p: sorted(ns) for p, ns in numbers.items()}


def check_timelines(trial_runs, system_metrics: bool = True, real_loops: bool = True) -> None:
    """Every trial run holds its timeline (every phase of a finished attempt, in order, each as long as its
    time/<phase>_s metric) and, with `system_metrics`, MLflow system metrics were logged (sampled every second by
    tiny_experiment)."""
    from ulsweep.sweep import timeline

    for r in trial_runs:
        rows = timeline.parse_tag(r.data.tags.get(timeline.TAG))
        last = [x for x in rows if x[0] == rows[-1][0]] if rows else []
        assert [x[1] for x in last] == ["imports", "tracking", "start", "setup", "first_step", "train", "evaluate",
                                        "finish"], rows
        assert all(a <= b for _, _, a, b in last) and all(x[3] == y[2] for x, y in zip(last, last[1:])), last
        if len({x[0] for x in rows}) == 1:  # one attempt: its durations are the time/* metrics
            for _, phase, a, b in last:
                assert r.data.metrics[f"time/{phase}_s"] == pytest.approx(b - a, abs=0.02), phase
            if real_loops:  # and the final evaluation's parts, which fit inside it
                parts = [r.data.metrics[f"time/evaluate_{p}_s"] for p in ("extractor", "bpp", "sampling", "flops")]
                assert 0 <= sum(parts) <= r.data.metrics["time/evaluate_s"] + 0.02
    if system_metrics:
        assert any("system/cpu_utilization_percentage" in r.data.metrics for r in trial_runs)


# ----------------------------------------------------------------------------------------------
# end-to-end (Ray)


@pytest.mark.slow
def test_local_sweep_two_ae_one_base_with_lineage(tmp_path):
    d = tiny_experiment("e2e", n_ae=2)
    # Ray Train's local mode (the loop in the trial process), quickstart's default: a worker actor would add its
    # start-up (a new process, ~15 CPU-seconds on CI's 2 cores) to each of the 4 trials. Real loops in worker
    # actors: tests/faults/test_stream_sweep.py, test_ddp_two_cpu_workers_match_one_worker
    d["resources"]["num_workers"] = 0
    f = write_yaml(tmp_path, d)
    t0 = time.time()
    p = subprocess.run(cli(f, "--storage", tmp_path / "runs"), cwd=tmp_path, env=sweep_env(tmp_path),
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    run_dir = tmp_path / "runs" / "e2e"
    by_key = check_lineage(run_dir, ["ae-0000", "ae-0001"], ["tiny"], latents=True)
    # four trials, two at a time: Tune handed a finished trial's process to a later trial
    processes = check_processes([r for k, r in by_key.items() if k != "sweep"])
    assert max(n for ns in processes.values() for n in ns) >= 2, processes
    for k in ("ae-0000", "ae-0001"):  # each AE's training split encoded once, next to its final checkpoint
        assert len(list((run_dir / "trials" / k / "checkpoints").glob("step_*/latents/*/latents.json"))) == 1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["counts"] == {"ae_done": 2, "base_done": 2}
    assert all(t["objective"] for t in summary["trials"])
    assert "mlflow" in p.stdout and str(run_dir) in p.stdout  # summary says where to look
    # the driver's own steps (sweep/clock.py): back to back from the command's start to the dashboard and the wait
    # for Ray's shutdown, which ran beside the last steps; the same in summary.json, on the sweep run's tag and on
    # the console's last line
    driver = summary["phases"]["driver"]
    names = [d["phase"] for d in driver]
    assert names[:2] == ["command", "import_ray"] and names[-2:] == ["dashboard", "shutdown_wait"], names
    assert "tune_fit" in names and "ray_shutdown" not in names, names
    for a, b in zip(driver, driver[1:]):
        assert b["start"] == pytest.approx(a["start"] + a["seconds"], abs=0.01), (a, b)
    assert t0 < driver[0]["start"] < t0 + 60  # the command began after this test started its process
    assert max(driver, key=lambda d: d["seconds"])["phase"] == "tune_fit"
    [beside] = summary["phases"]["driver_beside"]  # Ray's shutdown began as the runs' closing did
    closing = driver[names.index("close_runs")]
    assert beside["phase"] == "ray_shutdown" and beside["seconds"] > 0, beside
    assert beside["start"] == pytest.approx(closing["start"], abs=0.5), (beside, closing)
    tagged = json.loads(by_key["sweep"].data.tags["ulsweep.driver_phases"])
    assert list(tagged) == names + ["ray_shutdown (beside)"]
    assert tagged["tune_fit"] == pytest.approx(driver[names.index("tune_fit")]["seconds"], abs=0.01)
    assert p.stdout.splitlines()[-1].startswith("driver: command ") and "; beside: ray_shutdown " in p.stdout
    assert summary["phases"]["driver_imported_torch"] is False  # its trials' processes do the training
    print(f"local sweep wall {time.time() - t0:.0f} s")


@pytest.mark.slow
def test_optuna_sweep_local_mode_two_base_models_fake_loops(tmp_path):
    """TPE in Tune, two base models per AE (objective = mean of their gFD), Ray Train local mode, URI storage."""
    d = tiny_experiment("tpe", bases=("s", "m"))
    d["search"] = {"method": "optuna-tpe", "num_samples": 3, "max_concurrent": 2, "metrics": ["gfd_fake"],
                   "modes": ["min"], "space": {"ae.loss.loss_factor": {"low": 1.0, "high": 4.0, "log": True}}}
    d["resources"] = {"num_workers": 0, "cpus_per_worker": 0.99}
    f = write_yaml(tmp_path, d)
    env = sweep_env(tmp_path)
    env["ULSWEEP_FAKE_STEP_S"] = "0.01"
    # storage given as a URI (pyarrow/fsspec): Tune, Ray Train and the loops all write through it
    p = subprocess.run(cli(f, "--storage", f"file://{tmp_path}/runs", "--train-impl", "fake"), cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    run_dir = tmp_path / "runs" / "tpe"
    by_key = check_lineage(run_dir, ["ae-0000", "ae-0001", "ae-0002"], ["s", "m"], system_metrics=False,
                           real_loops=False)  # 0.2-s fake loops
    summary = json.loads((run_dir / "summary.json").read_text())
    for t in summary["trials"]:
        gfds = [t["bases"][b]["result"]["gfd_fake"] for b in ("s", "m")]
        assert t["objective"] == [pytest.approx(sum(gfds) / 2)]
        lf = t["overrides"]["ae.loss.loss_factor"]
        assert 1.0 <= lf <= 4.0
        assert float(by_key[t["key"]].data.params["ae.loss.loss_factor"]) == pytest.approx(lf)
    assert summary["best"][0] == min(summary["trials"], key=lambda t: t["objective"][0])["key"]


@pytest.mark.slow
def test_failed_base_trial_fails_its_ae_and_nothing_stays_running(tmp_path):
    d = tiny_experiment("fail")
    d["search"]["metrics"] = ["gfd_fake"]
    d["resources"] = {"num_workers": 0, "cpus_per_worker": 0.99}
    f = write_yaml(tmp_path, d)
    env = sweep_env(tmp_path)
    env.update({"ULSWEEP_FAKE_STEP_S": "0.01", "ULSWEEP_FAKE_FAIL": "ae-0001-tiny"})
    p = subprocess.run(cli(f, "--storage", tmp_path / "runs", "--train-impl", "fake"), cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 1, p.stdout[-4000:] + p.stderr[-4000:]
    assert "FAILED ae-0001-tiny" in p.stdout and "injected failure" in p.stdout
    summary = json.loads((tmp_path / "runs" / "fail" / "summary.json").read_text())
    status = {t["key"]: t["status"] for t in summary["trials"]}
    assert status == {"ae-0000": "done", "ae-0001": "failed"}
    _, _, by_key, runs = mlflow_runs(tmp_path / "runs" / "fail")
    assert {k: r.info.status for k, r in by_key.items()} == {
        "sweep": "FAILED", "ae-0000": "FINISHED", "ae-0000-tiny": "FINISHED", "ae-0001": "FINISHED",
        "ae-0001-tiny": "FAILED"}
    assert by_key["ae-0001"].data.tags["ulsweep.objective_status"] == "failed"


@pytest.mark.slow
def test_ddp_two_cpu_workers_match_one_worker(tmp_path):
    """Same global batch through TorchTrainer, one process (local mode: num_workers 0, the loop in this process)
    vs 2 gloo workers: same training losses."""
    import ray

    from ulsweep import tracking
    from ulsweep.config import ResourcesConfig
    from ulsweep.sweep.trial import fit_stage

    d = tiny_experiment("ddp", n_ae=1, bases=(), steps=4)
    d["ae"]["train"].update({"log_every": 1, "batch_size": 16})
    d["ae"]["optim"] = {"warmup_steps": 0, "ema_std": 0.0}
    exp = experiment_from_dict(d)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        losses = {}
        for n in (0, 2):
            res = ResourcesConfig(num_workers=n, cpus_per_worker=0.99)
            c = tracking.client(uri)
            eid = tracking.get_or_create_experiment(c, "ddp", str(tmp_path / "art"))
            run_id = c.create_run(eid, run_name=f"w{n}").info.run_id
            fit_stage(exp, str(tmp_path / f"w{n}"), tracking_uri=uri, run_id=run_id, resources=res)
            hist = sorted(c.get_metric_history(run_id, "loss"), key=lambda m: m.step)
            losses[n] = [m.value for m in hist]
    finally:
        ray.shutdown()
    print("DDP losses by number of workers:", losses)
    assert len(losses[0]) == 4 and len(set(losses[0])) == 4  # a real curve
    assert losses[0] == pytest.approx(losses[2], rel=1e-3, abs=1e-4), losses
