"""resources.precompile: which training steps a sweep compiles ahead, and that the task's compile is the one the
trial then finds done at the compile gate."""
import os
import time

import pytest

from ulsweep.config import ConfigError, experiment_from_dict, to_dict
from ulsweep.sweep import precompile


def sweep_exp(space=None, base_compile=True, ae_compile=False, **resources):
    return experiment_from_dict({
        "name": "p",
        "data": {"path": "builtin:digits", "image_size": 16},
        "ae": {"model": {"preset": "tiny", "downsample": 4, "latent_channels": 2}, "train": {"compile": ae_compile}},
        "base_models": [{"name": "b", "train": {"steps": 2, "batch_size": 8, "compile": base_compile}},
                        {"name": "plain", "train": {"steps": 2, "batch_size": 8}}],
        "search": {"method": "grid", "space": space or {"ae.loss.loss_factor": {"values": [1.5, 4.0]},
                                                         "ae.loss.sigmoid_bias": {"values": [-2.0, 2.0]}},
                   "metrics": ["base_bpp"], "modes": ["min"]},
        "resources": {"num_workers": 0, **resources},
    })


def test_one_job_per_distinct_base_step_and_none_for_uncompiled_bases():
    # loss factor and bias change no base-model graph: four trials, one step to compile; "plain" compiles nothing
    (job,) = precompile.jobs(sweep_exp())
    assert job.pop("claim").startswith("precompile-")
    assert job == {"stage": "base", "base": "b", "latent_shape": (2, 4, 4),
                   "overrides": {"ae.loss.loss_factor": 1.5, "ae.loss.sigmoid_bias": -2.0}}
    # latent channels do: one job per latent shape
    jobs = precompile.jobs(sweep_exp({"ae.model.latent_channels": {"values": [2, 4]},
                                      "ae.loss.loss_factor": {"values": [1.5, 4.0]}}))
    assert [(j["overrides"]["ae.model.latent_channels"], j["base"], j["latent_shape"]) for j in jobs] == [
        (2, "b", (2, 4, 4)), (4, "b", (4, 4, 4))]


def test_one_job_per_distinct_autoencoder_step_before_the_base_models():
    # loss factor, bias and seed change no autoencoder graph: one job, listed first
    jobs = precompile.jobs(sweep_exp({"ae.loss.loss_factor": {"values": [1.5, 4.0]},
                                      "ae.train.seed": {"values": [0, 1]}}, ae_compile=True))
    assert [(j["stage"], j.get("base"), j["latent_shape"]) for j in jobs] == [("ae", None, (2, 4, 4)),
                                                                             ("base", "b", (2, 4, 4))]
    assert precompile.label(jobs[0]) == "ae, ae.loss.loss_factor=1.5, ae.train.seed=0"
    # latent channels and batch size do
    jobs = precompile.jobs(sweep_exp({"ae.model.latent_channels": {"values": [2, 4]},
                                      "ae.train.batch_size": {"values": [8, 16]}}, ae_compile=True,
                                     base_compile=False))
    assert [(j["overrides"]["ae.model.latent_channels"], j["overrides"]["ae.train.batch_size"]) for j in jobs] == [
        (2, 8), (2, 16), (4, 8), (4, 16)] and {j["stage"] for j in jobs} == {"ae"}


def test_every_trial_of_a_job_looks_for_the_claim_its_task_holds():
    """lf_sweep's 18 autoencoders, of two seeds, loss factors and biases, are one stacked group: every trial's
    experiment (as the group's actor rebuilds it) names the claim of the one autoencoder job, and of the one base
    job for its base model; a group of another size, or another latent shape, another."""
    from ulsweep.config import load_experiment
    from ulsweep.sweep.space import planned_overrides, trial_experiment

    exp = load_experiment("experiments/lf_sweep.yaml")
    ae_job, base_job = precompile.jobs(exp)
    assert (ae_job["stage"], ae_job["members"], base_job["stage"], base_job["members"]) == ("ae", 18, "base", 18)
    raw = to_dict(exp)
    trials = [experiment_from_dict(to_dict(trial_experiment(raw, ov)))
              for ov in planned_overrides(exp.search, exp.ae.train.seed)]
    assert len(trials) == 18 and len({t.ae.train.seed for t in trials}) == 2
    assert {precompile.claim_of(t, "ae", None, 18) for t in trials} == {ae_job["claim"]}
    assert {precompile.claim_of(t, "base", "small", 18) for t in trials} == {base_job["claim"]}
    assert precompile.claim_of(trials[0], "ae", None, 17) != ae_job["claim"]
    other = experiment_from_dict(raw, {"ae.model.latent_channels": 4})
    assert precompile.claim_of(other, "ae", None, 18) != ae_job["claim"]
    assert precompile.claim_of(experiment_from_dict(raw, {"resources.precompile": "off"}), "ae") is None


def test_the_task_holds_its_claim_while_its_function_runs_and_lets_go_after(tmp_path, monkeypatch):
    """`after` claims the step before anything else (the wait for a previous task too, which needs Ray: not run
    here) and lets go when its function returns or fails."""
    from ulsweep.train import compile_gate as G

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    seen = []
    assert precompile.after([], "precompile-x", lambda v: seen.append(G._claimant(G.claim_path("precompile-x")))
                            or v, 7) == 7
    assert seen == [os.getpid()] and not os.path.exists(G.claim_path("precompile-x"))
    with pytest.raises(ZeroDivisionError):  # a task that fails lets go too
        precompile.after([], "precompile-x", lambda: 1 / 0)
    assert not os.path.exists(G.claim_path("precompile-x"))


def test_precompile_settings():
    assert precompile.jobs(sweep_exp(precompile="off")) == []
    assert precompile.jobs(sweep_exp(base_compile=False)) == []  # auto: nothing compiles
    assert [j["stage"] for j in precompile.jobs(sweep_exp(base_compile=False, ae_compile=True))] == ["ae"]
    assert precompile.jobs(sweep_exp(num_workers=2)) == []  # auto: DDP ranks compile other graphs
    with pytest.raises(ConfigError, match="resources.precompile.*nothing to compile"):
        sweep_exp(base_compile=False, precompile="on")
    with pytest.raises(ConfigError, match="resources.precompile.*one process"):
        sweep_exp(precompile="on", num_workers=2)


def test_the_task_compiles_the_step_the_base_trial_then_finds_done(tmp_path, monkeypatch, digits_cache):
    """compile_base goes through the library's loop and the compile gate as the first process of the key; the base
    trial of an autoencoder of the sweep then gets in as "done" (compilation itself is stubbed out: ~100 s on CPU;
    what is checked is that both compute the one gate key)."""
    from ulsweep.train import loop
    from ulsweep.train.stage1 import train_autoencoder
    from ulsweep.train.stage2 import train_base

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # the gate's folder
    monkeypatch.setattr(loop, "compile_module", lambda module, setting, rt, **kw: module)
    exp = sweep_exp()
    (job,) = precompile.jobs(exp)
    r = precompile.compile_base(to_dict(exp), job["overrides"], job["base"])
    assert r["stage"] == "base" and r["base"] == "b" and r["latent_shape"] == [2, 4, 4]
    assert r["compile_gate"] == "first"
    assert precompile.compile_base(to_dict(exp), job["overrides"], job["base"])["compile_gate"] == "done"

    trial = experiment_from_dict(to_dict(exp), {"ae.loss.loss_factor": 4.0, "ae.loss.sigmoid_bias": 2.0,
                                                "ae.train.steps": 2, "ae.train.batch_size": 8,
                                                "ae.train.eval_images": 8, "eval.extractor": "none"})
    ae = train_autoencoder(trial, str(tmp_path / "ae"))
    base = train_base(trial, trial.base_models[0], ae.checkpoint, str(tmp_path / "base"))
    assert base.extra["marks"]["compile_gate"] == "done"
    # without the task, the same trial is the first of its key
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cold"))
    cold = train_base(trial, trial.base_models[0], ae.checkpoint, str(tmp_path / "base-cold"))
    assert cold.extra["marks"]["compile_gate"] == "first"


def test_the_task_compiles_the_autoencoder_step_its_trials_then_find_done(tmp_path, monkeypatch, digits_cache):
    """compile_ae builds the trial's own objective on random images: a trial of another loss factor and bias gets
    through the gate as "done" (compilation stubbed out, as above)."""
    from ulsweep.train import loop
    from ulsweep.train.stage1 import train_autoencoder

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(loop, "compile_module", lambda module, setting, rt, **kw: module)
    exp = sweep_exp(ae_compile=True, base_compile=False)
    (job,) = precompile.jobs(exp)
    r = precompile.compile_ae(to_dict(exp), job["overrides"])
    assert r["stage"] == "ae" and r["latent_shape"] == [2, 4, 4] and r["compile_gate"] == "first"
    assert 0 < r["step_s"] <= r["seconds"] and isinstance(r["step_phases_s"], dict)
    parts = r["step_parts_s"]  # the step's seconds by part, every mark reached, in order
    assert list(parts) == ["build", "setup", "first_step", "steps"] and all(v >= 0 for v in parts.values())
    # the parts end at the training's end; the rest of step_s is the loop's last checkpoint and the scratch folder's
    # removal (0.85 s on a loaded CI box): no closeness asked of a wall clock, only that the parts fit in the step
    assert sum(parts.values()) <= r["step_s"] + 0.2 and r["t_start"] <= time.time() - r["step_s"]  # 0.2: rounding
    trial = experiment_from_dict(to_dict(exp), {"ae.loss.loss_factor": 4.0, "ae.loss.sigmoid_bias": 2.0,
                                                "ae.train.steps": 2, "ae.train.eval_images": 8,
                                                "eval.extractor": "none"})
    assert train_autoencoder(trial, str(tmp_path / "ae")).extra["marks"]["compile_gate"] == "done"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cold"))
    cold = train_autoencoder(trial, str(tmp_path / "ae-cold"))
    assert cold.extra["marks"]["compile_gate"] == "first"


def test_a_stacked_groups_program_is_compiled_ahead_at_the_groups_size(tmp_path, monkeypatch, digits_cache):
    """With resources.stack_trials the autoencoder job is the groups' stacked program (one job per group size: 4
    trials in groups of 3 are a group of 3 and one trial alone), compiled on CPUs under the group's actor's threads
    (Inductor's C++ kernels and cache key hold the count); the group then gets through the gate as "done"."""
    import torch

    from ulsweep.sweep.stacking import group_threads
    from ulsweep.train import loop
    from ulsweep.train.group import train_autoencoders

    threads = []
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(loop, "compile_module",
                        lambda module, setting, rt, **kw: threads.append(torch.get_num_threads()) or module)
    exp = experiment_from_dict(to_dict(sweep_exp(ae_compile=True, base_compile=False, stack_trials=3,
                                                 cpus_per_worker=1.0)), {"search.max_concurrent": 4})
    jobs = precompile.jobs(exp)
    assert [(j["stage"], j.get("members", 1)) for j in jobs] == [("ae", 3), ("ae", 1)]
    assert precompile.label(jobs[0]).startswith("ae (a stacked group of 3)")
    before = torch.get_num_threads()
    r = precompile.compile_ae(to_dict(exp), jobs[0]["overrides"], members=3)
    assert r["members"] == 3 and r["compile_gate"] == "first"
    assert threads == [group_threads(exp, 3)] == [3] and torch.get_num_threads() == before
    small = {"ae.train.steps": 2, "ae.train.eval_images": 8, "eval.extractor": "none"}
    members = [experiment_from_dict(to_dict(exp), {**small, "ae.loss.loss_factor": lf}) for lf in (1.5, 2.0, 4.0)]
    res = train_autoencoders(members, [str(tmp_path / f"m{i}") for i in range(3)], str(tmp_path / "g"))
    assert res[0].extra["marks"]["compile_gate"] == "done"
    pair = train_autoencoders(members[:2], [str(tmp_path / f"p{i}") for i in range(2)], str(tmp_path / "g2"))
    assert pair[0].extra["marks"]["compile_gate"] == "first"  # another size: another program


def test_a_stacked_base_groups_program_is_compiled_ahead_at_the_groups_size(tmp_path, monkeypatch, digits_cache):
    """The base trials of a stacked autoencoder group form a group too (per base model): their job is the stacked
    base program at the group's size, which the group then finds "done" at its gate."""
    from ulsweep.train import loop
    from ulsweep.train.group import train_autoencoders
    from ulsweep.train.group_base import train_bases

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(loop, "compile_module", lambda module, setting, rt, **kw: module)
    exp = experiment_from_dict(to_dict(sweep_exp(stack_trials=3)), {"search.max_concurrent": 4})
    jobs = precompile.jobs(exp)
    assert [(j["stage"], j.get("base"), j.get("members", 1)) for j in jobs] == [("base", "b", 3), ("base", "b", 1)]
    assert precompile.label(jobs[0]).startswith("base b (a stacked group of 3)")
    r = precompile.compile_base(to_dict(exp), jobs[0]["overrides"], "b", members=3)
    assert r["members"] == 3 and r["compile_gate"] == "first"
    small = {"ae.train.steps": 2, "ae.train.eval_images": 8, "eval.extractor": "none",
             "base_models.0.train.eval_images": 8}
    members = [experiment_from_dict(to_dict(exp), {**small, "ae.loss.loss_factor": lf}) for lf in (1.5, 2.0, 4.0)]
    aes = train_autoencoders(members, [str(tmp_path / f"m{i}") for i in range(3)], str(tmp_path / "g"))
    res = train_bases(members, [m.base_models[0] for m in members], [a.checkpoint for a in aes],
                      [str(tmp_path / f"b{i}") for i in range(3)], str(tmp_path / "gb"))
    assert res[0].extra["marks"]["compile_gate"] == "done" and res[0].extra["group"]["members"] == 3


def test_the_driver_starts_one_task_per_job_and_reports_each_without_failing_the_sweep(monkeypatch):
    """start() runs the jobs as Ray tasks that reserve nothing (they run while the trials hold every CPU), and
    report() prints what each did; a task that failed is named, one still running is cancelled."""
    import io
    import os
    import time

    import ray

    calls = []

    def fake(raw, overrides, base_name, steps, members):  # pickled by value: the real one is tested above
        if overrides.get("ae.model.latent_channels") == 4:
            raise RuntimeError("compile failed")
        if overrides.get("ae.model.latent_channels") == 8:
            time.sleep(600)  # still running at the report, which cancels it
        return {"stage": "base", "base": base_name, "latent_shape": [overrides["ae.model.latent_channels"], 4, 4],
                "compile_gate": "first", "seconds": 1.0}

    monkeypatch.setattr(precompile, "compile_base", fake)
    exp = sweep_exp({"ae.model.latent_channels": {"values": [2, 4, 8]}})
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        @ray.remote(num_cpus=1)
        def hold_the_cpu():
            time.sleep(600)  # longer than any wait below: cancelled at the end

        held = hold_the_cpu.remote()  # a trial holding the node's only CPU
        out = io.StringIO()
        refs = precompile.start(exp, out)
        assert len(refs) == 3
        ready, _ = ray.wait([r for _, r in refs[:2]], num_returns=2, timeout=120)  # not queued behind the trial
        assert len(ready) == 2
        done = precompile.report(refs, out)
        calls.append(out.getvalue())
        ray.cancel(held, force=True)
    finally:
        ray.shutdown()
    text = calls[0]
    assert done == [{"stage": "base", "base": "b", "latent_shape": [2, 4, 4], "compile_gate": "first", "seconds": 1.0}]
    assert "precompile: 3 step(s) compiled ahead" in text and "base b at latents (2, 4, 4): first in 1 s" in text
    assert "base b, ae.model.latent_channels=4 failed (RuntimeError: compile failed)" in text
    assert "1 task(s) unfinished" in text


def test_the_tasks_run_one_after_another_in_the_jobs_order_past_a_failed_one(monkeypatch, tmp_path):
    """start() chains the tasks: each begins when the one before it has ended (a failure included), in the order
    of jobs(), so that two compiled programs never hold GPU memory and CPUs at once beside the trials."""
    import io
    import os
    import time

    import ray

    log = tmp_path / "tasks.log"

    def fake(raw, overrides, base_name, steps, members):  # pickled by value: the real one is tested above
        c = overrides["ae.model.latent_channels"]
        with open(log, "a") as f:
            f.write(f"start {c} {time.time()}\n")
        time.sleep(1.0)
        with open(log, "a") as f:
            f.write(f"end {c} {time.time()}\n")
        if c == 4:
            raise RuntimeError("compile failed")
        return {"stage": "base", "base": base_name, "latent_shape": [c, 4, 4], "compile_gate": "first",
                "seconds": 1.0}

    monkeypatch.setattr(precompile, "compile_base", fake)
    exp = sweep_exp({"ae.model.latent_channels": {"values": [2, 4, 8]}})
    os.environ["RAY_AUTH_MODE"] = "disabled"
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        refs = precompile.start(exp, io.StringIO())
        ready, _ = ray.wait([r for _, r in refs], num_returns=3, timeout=300)
        assert len(ready) == 3
        done = precompile.report(refs, io.StringIO())
    finally:
        ray.shutdown()
    events = [line.split() for line in log.read_text().splitlines()]
    assert [(e[0], e[1]) for e in events] == [("start", "2"), ("end", "2"), ("start", "4"), ("end", "4"),
                                              ("start", "8"), ("end", "8")]
    assert [d["latent_shape"][0] for d in done] == [2, 8]


def stub_compiles(monkeypatch, tmp_path) -> list:
    """torch.compile stubbed by a wrapper, the training step's compile by nothing, and the compile gate spied on:
    the (label, how) of every gate entered, in order."""
    import contextlib

    import torch

    from ulsweep.train import compile_gate, loop

    class Compiled(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, *a, **kw):
            return self.m(*a, **kw)

    seen = []
    real = compile_gate.first_compile

    @contextlib.contextmanager
    def spy(key, label="", **kw):
        with real(key, label, **kw) as how:
            seen.append((label, how))
            yield how

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(loop, "compile_module", lambda module, setting, rt, **kw: module)
    monkeypatch.setattr(torch, "compile", lambda m, *a, **kw: Compiled(m))
    monkeypatch.setattr(compile_gate, "first_compile", spy)
    monkeypatch.setattr(loop, "first_compile", spy)
    return seen


def test_with_sample_compile_the_task_also_compiles_the_generation_the_base_trial_then_finds_done(
        tmp_path, monkeypatch, digits_cache):
    """eval.sample_compile: the task also runs one batch of the final evaluation's generation through the same
    sampling gate, so the base trial's evaluation gets in as "done" (torch.compile stubbed by a wrapper)."""
    from ulsweep.train.stage1 import train_autoencoder
    from ulsweep.train.stage2 import train_base

    seen = stub_compiles(monkeypatch, tmp_path)
    exp = experiment_from_dict(to_dict(sweep_exp()), {"eval.sample_compile": True, "eval.extractor": "none"})
    (job,) = precompile.jobs(exp)
    r = precompile.compile_base(to_dict(exp), job["overrides"], job["base"])
    assert (r["compile_gate"], r["sampling"]) == ("first", "compiled")
    assert seen == [("precompile b", "first"), ("precompile b sampling", "first")]

    trial = experiment_from_dict(to_dict(exp), {"ae.train.steps": 2, "ae.train.batch_size": 8,
                                                "ae.train.eval_images": 8})
    ae = train_autoencoder(trial, str(tmp_path / "ae"))
    seen.clear()
    train_base(trial, trial.base_models[0], ae.checkpoint, str(tmp_path / "base"))
    assert seen == [("base b", "done"), ("base b sampling", "done")]


def test_with_sample_compile_the_autoencoder_task_also_compiles_the_reconstruction_its_trials_then_find_done(
        tmp_path, monkeypatch, digits_cache):
    """The same for the autoencoders: the task reconstructs one batch through the evaluation's own sampling gate,
    and a trial's training step and final reconstruction both get in as "done"."""
    from ulsweep.train.stage1 import train_autoencoder

    seen = stub_compiles(monkeypatch, tmp_path)
    exp = experiment_from_dict(to_dict(sweep_exp(ae_compile=True, base_compile=False)), {
        "eval.sample_compile": True, "eval.extractor": "none", "ae.train.eval_images": 8})
    (job,) = precompile.jobs(exp)
    r = precompile.compile_ae(to_dict(exp), job["overrides"])
    assert (r["stage"], r["compile_gate"], r["sampling"]) == ("ae", "first", "compiled")
    assert seen == [("precompile ae", "first"), ("ae p sampling", "first")]
    seen.clear()
    trial = experiment_from_dict(to_dict(exp), {"ae.loss.loss_factor": 4.0, "ae.train.steps": 2})
    train_autoencoder(trial, str(tmp_path / "ae"))
    assert seen == [("ae p", "done"), ("ae p sampling", "done")]


@pytest.mark.parametrize("sampling", ["each", "stacked"])
def test_a_groups_sampling_is_compiled_ahead_as_the_group_samples(sampling, tmp_path, monkeypatch, digits_cache):
    """A stacked group's jobs compile its members' sampling as the group's evaluation runs it
    (resources.stack_sampling): member after member through ordinary networks, the sampling of a trial alone
    (each), or the stacked networks at the group's size; the groups' reconstruction and generation then get
    through their sampling gates as "done"."""
    from ulsweep.train.group import train_autoencoders
    from ulsweep.train.group_base import train_bases

    seen = stub_compiles(monkeypatch, tmp_path)
    exp = experiment_from_dict(to_dict(sweep_exp({"ae.loss.loss_factor": {"values": [1.5, 2.0, 4.0]}},
                                                 ae_compile=True, stack_trials=3)), {
        "search.max_concurrent": 3, "eval.sample_compile": True, "eval.extractor": "none",
        "ae.train.eval_images": 8, "resources.stack_sampling": sampling})
    jobs = precompile.jobs(exp)
    assert [(j["stage"], j.get("members", 1)) for j in jobs] == [("ae", 3), ("base", 3)]
    assert precompile.compile_ae(to_dict(exp), jobs[0]["overrides"], members=3)["sampling"] == "compiled"
    assert precompile.compile_base(to_dict(exp), jobs[1]["overrides"], "b", members=3)["sampling"] == "compiled"
    assert [how for _, how in seen] == ["first"] * 4
    seen.clear()
    small = {"ae.train.steps": 2, "base_models.0.train.eval_images": 8}
    members = [experiment_from_dict(to_dict(exp), {**small, "ae.loss.loss_factor": lf}) for lf in (1.5, 2.0, 4.0)]
    aes = train_autoencoders(members, [str(tmp_path / f"m{i}") for i in range(3)], str(tmp_path / "g"))
    train_bases(members, [m.base_models[0] for m in members], [a.checkpoint for a in aes],
                [str(tmp_path / f"b{i}") for i in range(3)], str(tmp_path / "gb"))
    assert [(label.split()[-1], how) for label, how in seen if label.endswith("sampling")] == [("sampling", "done")] * 2


def test_compile_phases_are_the_longest_of_dynamos_own_and_none_where_its_api_changed(monkeypatch):
    """accel.compile_phase_seconds reads torch's private `compile_times` (checked here against this torch: it must
    give a dict), keeps the `top` longest phases of at least `least` s, rounded, less the totals taken `since`, and
    answers None where the function is gone or returns another form."""
    import torch._dynamo.utils as dynamo_utils

    from ulsweep.train import accel

    assert isinstance(accel.compile_phase_seconds(), dict)  # this torch's API has the form it reads
    names, values = ["a", "b", "c", "d"], ["0.4", "12.34", "3.0", "120.06"]
    monkeypatch.setattr(dynamo_utils, "compile_times", lambda repr, aggregate: (names, values))
    assert accel.compile_phase_seconds(top=2) == {"d": 120.1, "b": 12.3}
    assert accel.compile_phase_seconds(least=0.1) == {"d": 120.1, "b": 12.3, "c": 3.0, "a": 0.4}
    assert accel.compile_phase_seconds(since={"d": 100.0, "b": 12.0}) == {"d": 20.1, "c": 3.0}
    monkeypatch.setattr(dynamo_utils, "compile_times", lambda repr, aggregate: "a table")
    assert accel.compile_phase_seconds() is None and accel.compile_phase_totals() is None
    monkeypatch.delattr(dynamo_utils, "compile_times")
    assert accel.compile_phase_seconds() is None


def test_what_was_compiled_ahead_is_a_tag_of_the_sweep_run(tmp_path):
    import json

    from ulsweep import tracking
    from ulsweep.sweep.lineage import SweepRun, tag_precompile

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = tracking.client(uri)
    eid = tracking.get_or_create_experiment(c, "p", str(tmp_path / "art"))
    run = SweepRun(c, uri, c.create_run(eid).info.run_id, eid)
    tag_precompile(run, [])  # nothing compiled ahead: no tag
    assert "ulsweep.precompile" not in c.get_run(run.sweep_id).data.tags
    done = [{"base": "b", "latent_shape": [2, 4, 4], "compile_gate": "first", "sampling": "compiled",
             "seconds": 81.234}]
    tag_precompile(run, done)
    assert json.loads(c.get_run(run.sweep_id).data.tags["ulsweep.precompile"]) == [dict(done[0], seconds=81.2)]
    # phases too many for MLflow's 5,000 characters go; the tag stays JSON with the rest
    phases = {f"phase_{i:04d}_{'x' * 40}": float(i) for i in range(200)}
    tag_precompile(run, [dict(done[0], step_s=70.04, step_phases_s=phases)])
    assert json.loads(c.get_run(run.sweep_id).data.tags["ulsweep.precompile"]) == [
        dict(done[0], seconds=81.2, step_s=70.0)]


def test_reporting_the_tasks_never_masks_how_the_fit_ended(monkeypatch):
    """The driver reports and tags in its `finally`: if Ray or MLflow went down with the error that ended the fit,
    the report says so in one line instead of raising over that error."""
    import io

    from ulsweep.sweep import driver

    def broken(started, out):
        raise ConnectionError("Ray is gone")

    monkeypatch.setattr(precompile, "report", broken)
    out = io.StringIO()
    driver._close_precompile(None, [("base b", None)], out)
    assert out.getvalue() == "precompile: not reported (ConnectionError: Ray is gone)\n"


def test_a_tasks_step_seconds_split_by_its_marks_and_a_missing_mark_merges_into_the_next_part():
    marks = {"t_setup_end": 103.0, "t_first_step_end": 190.5, "t_train_end": 196.0, "compile_gate": "first"}
    assert precompile.step_parts(100.0, 101.5, marks) == {"build": 1.5, "setup": 1.5, "first_step": 87.5,
                                                           "steps": 5.5}
    assert precompile.step_parts(100.0, 101.5, {"t_setup_end": 103.0, "t_train_end": 196.0}) == {
        "build": 1.5, "setup": 1.5, "steps": 93.0}
    assert precompile.step_parts(100.0, 101.5, {"t_setup_end": 99.0}) == {"build": 1.5}  # a mark out of order


def test_a_finished_task_is_described_in_one_line_with_its_steps_parts():
    r = {"stage": "ae", "members": 18, "latent_shape": [8, 8, 8], "compile_gate": "first", "sampling": "compiled",
         "seconds": 162.4, "step_s": 143.2, "step_parts_s": {"build": 4.2, "setup": 1.0, "first_step": 130.1,
                                                             "steps": 7.9}}
    assert precompile.describe(r) == ("precompile: ae (a stacked group of 18) to latents (8, 8, 8): first, sampling "
                                      "compiled in 162 s (the step 143 s: build 4, setup 1, first step 130, steps 8)")
    old = {"stage": "base", "base": "b", "latent_shape": [2, 4, 4], "compile_gate": "done", "seconds": 1.0}
    assert precompile.describe(old) == "precompile: base b at latents (2, 4, 4): done in 1 s"


def test_a_local_rays_workers_see_its_gpus_without_reserving_one_so_groups_and_tasks_start_in_workers_started_ahead(
        monkeypatch):
    """The Ray that the driver starts has precompile.KEEP_GPUS_ENV in every worker's environment: an actor placed
    by gpu_node_options (no runtime_env of its own) keeps the node's CUDA_VISIBLE_DEVICES though it reserves no
    GPU, and so runs in a worker that Ray started before it was asked for (with the runtime_env: a new process,
    started after); with the flag at 1 (Ray's default before ray-project/ray#62492) Ray hides the GPUs from it."""
    import ray

    from ulsweep.sweep import driver

    if not precompile.keep_gpus_env():
        pytest.skip("this Ray does not read RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    real_init = ray.init
    monkeypatch.setattr(ray, "init", lambda **kw: real_init(num_cpus=2, num_gpus=1, **kw))  # a GPU node, on paper
    assert driver._init_ray(None, False)
    try:
        placed = precompile.gpu_node_options(sweep_exp(gpus_per_worker=0.5), workers_keep_gpus=True)
        assert "runtime_env" not in placed and "scheduling_strategy" in placed
        assert "runtime_env" in precompile.gpu_node_options(sweep_exp(gpus_per_worker=0.5))

        @ray.remote
        class Probe:
            def seen(self):
                from ulsweep.sweep.clock import process_start_time

                return os.environ.get("CUDA_VISIBLE_DEVICES"), process_start_time()

        asked = time.time()
        visible, started = ray.get(Probe.options(num_cpus=0, num_gpus=0, **placed).remote().seen.remote(),
                                   timeout=120)
        assert visible == "0"
        assert started is None or started < asked
        hidden = Probe.options(num_cpus=0, num_gpus=0, runtime_env={"env_vars": {
            next(iter(precompile.KEEP_GPUS_ENV)): "1"}}).remote()
        assert ray.get(hidden.seen.remote(), timeout=120)[0] == ""
    finally:
        ray.shutdown()


def test_the_flag_that_keeps_the_gpus_visible_is_left_to_a_driver_environment_that_sets_it(monkeypatch):
    """keep_gpus_env(): nothing where the driver's environment sets the flag itself (its value stands, and the
    actors and tasks keep their runtime_env), else the flag where this Ray reads it."""
    name = next(iter(precompile.KEEP_GPUS_ENV))
    monkeypatch.setenv(name, "1")
    assert precompile.keep_gpus_env() == {}
    monkeypatch.delenv(name)
    from ray._private import accelerators

    expected = precompile.KEEP_GPUS_ENV if hasattr(accelerators, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO_ENV_VAR") else {}
    assert precompile.keep_gpus_env() == expected
