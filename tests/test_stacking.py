"""ulsweep.sweep.stacking: which planned trials form a group, the group's actor protocol (joins, events relayed to
each member's hooks, checkpoints waited for, errors), and a sweep whose autoencoders train as one program."""
import dataclasses
import json
import re
import subprocess
import threading
import time

import pytest

from ulsweep.config import ConfigError, experiment_from_dict, load_experiment, to_dict
from ulsweep.sweep.stacking import GroupTrainer, base_plan, group_names, plan, relay, trainer_args
from ulsweep.train.checkpoint import load_checkpoint
from ulsweep.train.hooks import TrainHooks

from test_group import MEMBERS, member_exp
from test_sweep import check_lineage, cli, sweep_env, tiny_experiment, write_yaml


def lf_sweep(**resources) -> dict:
    d = to_dict(load_experiment("experiments/lf_sweep.yaml"))
    d["resources"].update(resources)
    return d


def test_the_planned_trials_of_one_architecture_form_groups_of_at_most_stack_trials():
    exp = experiment_from_dict(lf_sweep(stack_trials=18))
    assert plan(exp) == [[f"ae-{i:04d}" for i in range(18)]]  # loss factor, bias and seed change no shape
    six = plan(experiment_from_dict(lf_sweep(stack_trials=6)))
    assert [len(g) for g in six] == [6, 6, 6] and sum(six, []) == [f"ae-{i:04d}" for i in range(18)]
    assert plan(experiment_from_dict(lf_sweep())) == plan(exp)  # the file's own setting: 18
    assert plan(experiment_from_dict(lf_sweep(stack_trials=1))) == []  # stack_trials 1: every trial alone
    capped = lf_sweep(stack_trials=18)
    capped["search"]["max_concurrent"] = 9  # a group's members run at once
    assert [len(g) for g in plan(experiment_from_dict(capped))] == [9, 9]
    assert group_names(exp, "s1")["ae-0017"] == "ulsweep-stack-s1-0"
    # their base trials form a group of the same members, per base model (base settings but the seed agree)
    assert base_plan(exp) == [[f"ae-{i:04d}-small" for i in range(18)]]
    assert group_names(exp, "s1")["ae-0017-small"] == "ulsweep-stack-s1-1"
    assert [len(g) for g in base_plan(experiment_from_dict(lf_sweep(stack_trials=6)))] == [6, 6, 6]
    two = lf_sweep(stack_trials=18)
    two["base_models"].append({**two["base_models"][0], "name": "wide"})
    two["search"]["points"][0]["base_models.1.optim.lr"] = 1e-4  # ae-0015's "wide" differs: it trains alone
    groups = base_plan(experiment_from_dict(two))
    assert groups[0] == [f"ae-{i:04d}-small" for i in range(18)]
    assert groups[1] == [f"ae-{i:04d}-wide" for i in range(18) if i != 15] and len(groups) == 2
    # an autoencoder group hands its results over together only where all its members' base trials are a group
    keys18 = [f"ae-{i:04d}" for i in range(18)]
    assert trainer_args(exp, "r", 0, keys18)[6] is True
    assert trainer_args(experiment_from_dict(two), "r", 0, keys18)[6] is False  # ae-0015's "wide" trains alone
    # and passes each member's checkpoint on to the base groups of its base trials (those in a group)
    assert trainer_args(exp, "r", 0, keys18)[7] is None  # without the actors' names
    assert trainer_args(exp, "r", 0, keys18)[8] == "r/groups/group-0/actor.log"
    assert trainer_args(exp, "s3://b/r", 0, keys18)[8] is None  # a local file only
    names = group_names(experiment_from_dict(two), "s")
    links = trainer_args(experiment_from_dict(two), "r", 0, keys18, names=names)[7].links
    assert links["ae-0000"] == [("ae-0000-small", "ulsweep-stack-s-1"), ("ae-0000-wide", "ulsweep-stack-s-2")]
    assert links["ae-0015"] == [("ae-0015-small", "ulsweep-stack-s-1")] and len(links) == 18
    assert trainer_args(exp, "r", 1, base_plan(exp)[0], "base", group_names(exp, "s"))[7] is None
    d = lf_sweep(stack_trials=4)  # two architectures interleaved in the plan: a group each, in plan order
    d["search"] = {"method": "grid", "metrics": ["gfid"], "modes": ["min"], "max_concurrent": 20,
                   "space": {"ae.model.latent_channels": {"values": [4, 8]},
                             "ae.loss.loss_factor": {"values": [1.5, 2.0, 3.0]}}}
    groups = plan(experiment_from_dict(d))
    assert groups == [["ae-0000", "ae-0001", "ae-0002"], ["ae-0003", "ae-0004", "ae-0005"]]
    d["search"]["space"]["ae.model.latent_channels"]["values"] = [4, 8, 16]
    d["search"]["space"]["ae.loss.loss_factor"]["values"] = [1.5]  # three architectures of one trial each
    assert plan(experiment_from_dict(d)) == [] and group_names(experiment_from_dict(d), "s") == {}


def test_the_driver_starts_the_groups_actors_before_the_precompile_tasks_and_the_tuner(monkeypatch):
    """An autoencoder group builds itself and warms its step while its members' trials start: its actor is
    started first (session 31, one H100: started after the precompile tasks and the Tuner, it began building 0.1 s
    before its last member joined, which then waited 6.4 s for it)."""
    import io

    from ulsweep.sweep import driver

    calls = []

    class Stop(Exception):
        pass

    def tuner(*args):
        calls.append("tuner")
        raise Stop

    monkeypatch.setattr(driver, "_print_header", lambda *args: calls.append("header"))
    monkeypatch.setattr(driver.stacking, "start", lambda *args: calls.append("groups") or [])
    monkeypatch.setattr(driver.precompile, "start", lambda *args: calls.append("precompile") or [])
    monkeypatch.setattr(driver, "_make_tuner", tuner)
    monkeypatch.setattr(driver.lineage, "mark_interrupted", lambda run: calls.append("interrupted"))
    monkeypatch.setattr(driver, "_close_precompile", lambda *args: calls.append("closed precompile"))
    monkeypatch.setattr(driver, "_close_groups", lambda groups: calls.append("closed groups"))
    with pytest.raises(Stop):
        run = dataclasses.make_dataclass("Run", [("sweep_id", str)])("s")
        driver._fit(experiment_from_dict(lf_sweep(stack_trials=18)), "rd", run, "ulsweep", False, io.StringIO())
    assert calls == ["header", "groups", "precompile", "tuner", "interrupted", "closed precompile", "closed groups"]


def test_stacking_settings_are_checked_by_name():
    with pytest.raises(ConfigError, match="resources.stack_trials.*planned search.*optuna-tpe"):
        d = lf_sweep(stack_trials=4)
        d["search"] = {"method": "optuna-tpe", "num_samples": 4, "metrics": ["gfid"], "modes": ["min"],
                       "space": {"ae.loss.loss_factor": {"low": 1.5, "high": 4.0}}}
        experiment_from_dict(d)
    with pytest.raises(ConfigError, match="stack_wait_s.*no effect with resources.stack_trials: 1"):
        experiment_from_dict(lf_sweep(stack_trials=1, stack_wait_s=5))
    with pytest.raises(ConfigError, match="stack_sampling.*no effect with resources.stack_trials: 1"):
        experiment_from_dict(lf_sweep(stack_trials=1, stack_sampling="stacked"))
    with pytest.raises(ConfigError, match="stack_sampling"):
        experiment_from_dict(lf_sweep(stack_trials=2, stack_sampling="together"))
    assert experiment_from_dict(lf_sweep(stack_trials=2, stack_sampling="stacked")).resources.stack_sampling == "stacked"
    with pytest.raises(ConfigError, match="stack_conv.*no effect with resources.stack_trials: 1"):
        experiment_from_dict(lf_sweep(stack_trials=1, stack_conv="loop"))
    with pytest.raises(ConfigError, match="stack_conv"):
        experiment_from_dict(lf_sweep(stack_trials=2, stack_conv="unfold"))
    assert experiment_from_dict(lf_sweep(stack_trials=2, stack_conv="loop")).resources.stack_conv == "loop"
    with pytest.raises(ConfigError, match="stack_trials.*>= 1"):
        experiment_from_dict(lf_sweep(stack_trials=0))
    with pytest.raises(ConfigError, match="stack_trials.*not DDP"):
        experiment_from_dict(lf_sweep(stack_trials=2, num_workers=2, gpus_per_worker=0, mps="off",
                                      cuda_wait="auto"))


class Recorder(TrainHooks):
    def __init__(self):
        self.logs, self.ckpts, self.flushed = [], [], []

    def log_metrics(self, step, metrics):
        self.logs.append((step, dict(metrics)))

    def before_checkpoint(self, step):
        time.sleep(0.2)  # a flush to MLflow that takes a while: the group's checkpoint waits for it
        self.flushed.append((step, len(self.logs)))

    def checkpoint_saved(self, step, path, metrics):
        self.ckpts.append((step, path))


def test_a_group_relays_each_members_own_events_and_result_to_its_trial(tmp_path, digits_cache, one_thread):
    keys = ["ae-0000", "ae-0001", "ae-0002"]
    group = GroupTrainer(keys, str(tmp_path / "groups" / "g0"), wait_s=30.0)
    recs, results, errors = {k: Recorder() for k in keys}, {}, {}

    def member(k, exp):
        try:
            assert group.join(k, to_dict(exp), str(tmp_path / "trials" / k))
            results[k] = relay(group, k, recs[k])
        except BaseException as e:  # noqa: BLE001 - shown by the assertion below
            errors[k] = e

    threads = [threading.Thread(target=member, args=(k, member_exp(*m))) for k, m in zip(keys, MEMBERS)]
    for t in threads:
        t.start()
        time.sleep(0.3)  # members come one after another, as trials start
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert group.status()["members"] == keys and not group.join("ae-0003", {}, "x")  # started: no late joiners
    assert not group.join("ae-0000", {}, "x")  # nor a member that has its result
    for k, (lf, bias, seed) in zip(keys, MEMBERS):
        res, rec = results[k], recs[k]
        assert res.checkpoint.startswith(str(tmp_path / "trials" / k)) and res.steps == 4
        assert res.extra["group"]["members"] == 3 and res.extra["group"]["member"] == keys.index(k)
        state, _ = load_checkpoint(res.checkpoint)
        assert state["config"]["ae"]["loss"]["loss_factor"] == lf and state["config"]["ae"]["train"]["seed"] == seed
        curves = [m for _, m in rec.logs if "loss" in m]
        assert [s for s, m in rec.logs if "loss" in m] == [2, 4]
        assert all(isinstance(m["loss"], float) for m in curves)  # its own value, not the group's list
        # its final evaluation as its own loop logs it, handed over as soon as it was done
        assert isinstance(rec.logs[-1][1]["eval_bpp"], float) and rec.logs[-1][1]["eval_bpp"] == res.metrics["bpp"]
        assert res.extra["marks"]["t_eval_end"] >= res.extra["marks"]["t_train_end"]
        assert "evaluate_sampling_s" in res.extra["marks"]  # its own evaluation's parts
        # the group's checkpoint in the middle of training (the final one comes after the member is done); every
        # point logged before it was handed over (and flushed) before it was written
        assert [s for s, _ in rec.ckpts] == [2] and k not in rec.ckpts[0][1]
        assert [s for s, _ in rec.flushed] == [2] and rec.flushed[0][1] >= 1
    losses = {k: [m["loss"] for _, m in recs[k].logs if "loss" in m] for k in keys}
    assert len({tuple(v) for v in losses.values()}) == 3  # three different runs


def test_a_failing_group_fails_every_member_and_a_lone_group_trains_who_came(tmp_path, digits_cache, one_thread):
    a, wider = member_exp(1.5, 0.0, 0), member_exp(2.0, 0.0, 1)
    wider_d = to_dict(wider)
    wider_d["ae"]["model"]["latent_channels"] = 4  # not of the first's architecture: the group refuses to train
    group = GroupTrainer(["ae-0000", "ae-0001"], str(tmp_path / "g"), wait_s=30.0)
    assert group.join("ae-0000", to_dict(a), str(tmp_path / "a")) and group.join("ae-0001", wider_d,
                                                                                   str(tmp_path / "b"))
    for k in ("ae-0000", "ae-0001"):
        with pytest.raises(ValueError, match="latent_channels"):
            relay(group, k, Recorder())
    training = GroupTrainer(["ae-0000", "ae-0001"], "g", wait_s=1.0)
    training.state, training.members = "training", ["ae-0000"]
    assert training.join("ae-0000", {}, "x") and not training.join("ae-0001", {}, "y")  # a retried member rejoins
    alone = GroupTrainer(["ae-0000", "ae-0001"], str(tmp_path / "g2"), wait_s=0.5)  # ae-0001 never comes
    assert alone.join("ae-0000", to_dict(a), str(tmp_path / "c"))
    res = relay(alone, "ae-0000", Recorder())
    assert alone.status()["members"] == ["ae-0000"] and res.extra["group"]["members"] == 1 and res.steps == 4


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a process that sees no GPU")
def test_a_group_whose_trials_train_on_gpus_fails_every_member_where_its_actor_sees_none(tmp_path, digits_cache):
    """Placed where it sees no GPU, a group of GPU trials neither prepares ahead nor trains its members on the
    CPU: every member's trial raises the error, which names the setting and CUDA_VISIBLE_DEVICES."""
    keys = ["ae-0000", "ae-0001"]
    exps = [to_dict(member_exp(*m, resources={"gpus_per_worker": 0.5})) for m in MEMBERS[:2]]
    group = GroupTrainer(keys, str(tmp_path / "g"), wait_s=30.0, planned=exps)
    for k, e in zip(keys, exps):
        assert group.join(k, e, str(tmp_path / k))
    for k in keys:
        with pytest.raises(RuntimeError, match=r"sees no GPU .*\(resources\.gpus_per_worker 0\.5\)"):
            relay(group, k, Recorder())
    assert not (tmp_path / "ae-0000" / "checkpoints").exists()


def test_an_autoencoder_group_builds_itself_ahead_and_takes_that_only_for_its_planned_members(tmp_path, digits_cache,
                                                                                              one_thread, capsys):
    """A group given its members' planned experiments builds its data and networks and warms its step while they
    start (`prepare_autoencoders`), and trains from that once they have joined as planned: no setup left after the
    joins. Members that join with other experiments than planned get a group built for them."""
    keys, exps = ["ae-0000", "ae-0001"], [member_exp(*m) for m in MEMBERS[:2]]

    def train(group, joining):
        for k, e in zip(keys, joining):
            assert group.join(k, to_dict(e), str(tmp_path / group.group_root.rsplit("/", 1)[-1] / k))
        out = {}
        threads = [threading.Thread(target=lambda k=k: out.setdefault(k, relay(group, k, Recorder()))) for k in keys]
        for t in threads:  # every member's trial takes its events at once, as in a sweep
            t.start()
        for t in threads:
            t.join(timeout=300)
        return [out[k] for k in keys]

    ahead = GroupTrainer(keys, str(tmp_path / "g"), wait_s=30.0, planned=[to_dict(e) for e in exps])
    time.sleep(0.5)  # the members come while it builds (or after)
    for res in train(ahead, exps):
        assert res.steps == 4 and not {m for m in res.extra["marks"] if m.startswith("setup_")}
        marks = res.extra["marks"]  # when the group had its members, and when it was built: both before its setup
        assert max(marks["t_joined"], marks["t_prepared_end"]) <= marks["t_setup_end"], marks
    said = capsys.readouterr().out
    built = re.search(r"built and its step warmed in ([\d.]+) s \(runtime ([\d.]+), data ([\d.]+), models ([\d.]+), "
                      r"warm_up ([\d.]+)\)", said)
    assert built, said  # where its preparation went, part by part (the parts within its whole)
    assert sum(float(v) for v in built.groups()[1:]) <= float(built.group(1)) + 0.3
    other = GroupTrainer(keys, str(tmp_path / "h"), wait_s=30.0, planned=[to_dict(e) for e in exps[::-1]])
    for res in train(other, exps):
        assert res.steps == 4 and res.extra["marks"]["setup_models_s"] > 0  # built when they joined
    assert "not the 2 planned: building it for them" in capsys.readouterr().out
    nobody = GroupTrainer(keys, str(tmp_path / "n"), wait_s=0.5, planned=[to_dict(e) for e in exps])
    assert nobody._prepared.result(timeout=300) is None  # no member came: its memory goes back
    assert "no member joined within 0.5 s: the group built ahead is dropped" in capsys.readouterr().out


@pytest.mark.parametrize("together", [False, True])
def test_an_autoencoder_group_hands_its_members_results_over_together_when_their_base_trials_are_a_group(
        together, tmp_path, digits_cache, one_thread, monkeypatch):
    """`together` (an autoencoder group whose members' base trials form a base group, which waits for its last member
    anyway): no member's trial gets its result before the last member's files are written; without it, the first
    member's trial gets its own while the second's are still being written (slowed down here). Either way each
    member's checkpoint is passed on to its base group once, as soon as it is written, before its evaluation's
    files."""
    from ulsweep.train import group as group_mod

    keys, exps = ["ae-0000", "ae-0001"], [member_exp(*m) for m in MEMBERS[:2]]
    written, returned, results = {}, {}, {}
    real_write = group_mod.write_member

    def slow_second(i, *args, **kwargs):
        out = real_write(i, *args, **kwargs)
        if i == 1:
            time.sleep(2.0)
        written[i] = time.time()
        return out

    monkeypatch.setattr(group_mod, "write_member", slow_second)
    passed = []  # (member, its checkpoint) passed on to its base group, as soon as its checkpoint is written

    def pass_on(key, ckpt):
        passed.append((key, ckpt, time.time()))
        raise ConnectionError("base group gone")  # named, never the member's failure

    group = GroupTrainer(keys, str(tmp_path / "g"), wait_s=30.0, together=together, pass_on=pass_on)

    def member(k):
        results[k] = relay(group, k, Recorder())
        returned[k] = time.time()

    for k, e in zip(keys, exps):
        assert group.join(k, to_dict(e), str(tmp_path / k))
    threads = [threading.Thread(target=member, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert set(results) == set(keys) and all(r.steps == 4 for r in results.values())
    assert (returned["ae-0000"] >= written[1]) is together, (returned, written)
    assert sorted((k, c) for k, c, _ in passed) == sorted((k, r.checkpoint) for k, r in results.items())
    first = next(t for k, _, t in passed if k == "ae-0000")
    assert first < written[0]  # passed on before its own evaluation's files (its metrics, images, result.json)


def test_a_base_group_reads_each_members_checkpoint_as_it_joins(monkeypatch):
    """A forming base group starts reading a member's autoencoder checkpoint (`read_ahead`) when the member joins,
    not when the last one has: the reading overlaps the wait for the others. The group's training gets one read
    per member, in its plan order."""
    from ulsweep.train import group_base

    keys = ["ae-0000-small", "ae-0001-small", "ae-0002-small"]
    events, got = [], {}

    def read(ckpt):
        events.append(("read", ckpt))
        return ("ae of " + ckpt, None, {})

    def train(exps, bases, ckpts, run_dirs, group_dir, hooks=None, frozen=None, ahead=None, marks=None,
              prepared=None):
        got["ckpts"], got["frozen"] = ckpts, [f.result() for f in frozen]
        return [None] * len(exps)

    monkeypatch.setattr(group_base, "read_ahead", read)
    monkeypatch.setattr(group_base, "train_bases", train)
    group = GroupTrainer(keys, "g", wait_s=60.0, kind="base")
    exp = to_dict(member_exp(*MEMBERS[0]))
    for i in (2, 0):  # not in plan order
        assert group.join(keys[i], exp, f"run{i}", {"base": "b", "ae_checkpoint": f"ckpt{i}"})
    deadline = time.monotonic() + 60
    while len(events) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(events) == [("read", "ckpt0"), ("read", "ckpt2")] and group.status()["state"] == "forming"
    events.append(("join", "ckpt1"))
    assert group.join(keys[1], exp, "run1", {"base": "b", "ae_checkpoint": "ckpt1"})
    while group.status()["state"] != "done" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [v for v in group.outcome.values() if v[0] == "error"], group.outcome
    assert events.index(("join", "ckpt1")) == 2 and ("read", "ckpt1") in events[3:]
    assert got["ckpts"] == ["ckpt0", "ckpt1", "ckpt2"]
    assert got["frozen"] == [("ae of ckpt0", None, {}), ("ae of ckpt1", None, {}), ("ae of ckpt2", None, {})]
    assert group.read == {}  # what was read is let go once the group is done


def test_a_planned_base_group_builds_itself_ahead_in_the_thread_that_then_trains_it(monkeypatch, capsys):
    """A base group whose members the driver planned (trainer_args: each member's experiment and base model) builds
    its networks and warms its compiled step (`prepare_bases`) before any member joins, in its own thread, which,
    once its members have joined, trains them (CUDA graphs belong to one thread of a process) and hands the
    preparation to `train_bases`; a preparation that fails is named and the group trains all the same."""
    from ulsweep.train import group_base

    d = lf_sweep(stack_trials=2, gpus_per_worker=0.0)  # trials on CPUs, as this box has: the group may train here
    d["search"].update({"space": {"ae.loss.loss_factor": {"values": [1.5, 4.0]}}, "points": []})
    exp = experiment_from_dict(d)
    [keys] = base_plan(exp)
    args = trainer_args(exp, "/runs/x", 1, keys, "base")
    planned = args[5]
    assert [p["base"] for p in planned] == ["small", "small"]
    assert [p["experiment"]["ae"]["loss"]["loss_factor"] for p in planned] == [1.5, 4.0]
    threads, got = {}, {}

    def prepare(bases, ae_exps, latent_shape, keep_waiting=lambda: False):
        threads["prepare"] = threading.current_thread()
        got["waiting"] = keep_waiting()  # no member has joined yet
        got["shape"] = latent_shape
        return "prepared"

    def train(exps, bases, ckpts, run_dirs, group_dir, hooks=None, frozen=None, ahead=None, marks=None,
              prepared=None):
        threads["train"], got["prepared"] = threading.current_thread(), prepared
        return [None] * len(exps)

    monkeypatch.setattr(group_base, "prepare_bases", prepare)
    monkeypatch.setattr(group_base, "read_ahead", lambda ckpt: ("ae", None, {}))
    monkeypatch.setattr(group_base, "train_bases", train)
    for failing in (False, True):
        if failing:
            monkeypatch.setattr(group_base, "prepare_bases", lambda *a, **k: 1 / 0)
        group = GroupTrainer(*args[:5], planned, log=None)
        deadline = time.monotonic() + 60
        while "prepare" not in threads and not failing and time.monotonic() < deadline:
            time.sleep(0.05)
        for i, k in enumerate(keys):
            assert group.join(k, planned[i]["experiment"], f"run{i}", {"base": "small", "ae_checkpoint": f"c{i}"})
        while group.status()["state"] != "done" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert group.status()["state"] == "done"
        if not failing:
            assert threads["train"] is threads["prepare"] and threads["train"] is not threading.current_thread()
            assert got["prepared"] == "prepared" and got["waiting"] is True and got["shape"] == (8, 8, 8)
        else:
            assert got["prepared"] is None
            assert "preparing ahead failed (ZeroDivisionError" in capsys.readouterr().out


def test_a_base_group_reads_the_checkpoints_passed_on_before_its_members_join(monkeypatch):
    """Checkpoints an autoencoder group passes on (`read_ahead`) are read before the base trials start; a member
    that joins with that checkpoint is not read again, one that joins with another is. Keys of no member, a key
    read already, and a group that has started are refused."""
    from ulsweep.train import group_base

    keys = ["ae-0000-small", "ae-0001-small"]
    events, got = [], {}

    def read(ckpt):
        events.append(("read", ckpt))
        return ("ae of " + ckpt, None, {})

    def encode(queued, members):  # each checkpoint passed on is encoded after it is read, those queued together
        out = []
        for ckpt, read, passed_on in queued:
            assert read.result() == ("ae of " + ckpt, None, {}) and members == 2
            assert passed_on <= time.time()  # when it was passed on: the actor's log says how long after it began
            events.append(("encode", ckpt))
            out.append((ckpt, ("data",), "z of " + ckpt))
        return out

    def train(exps, bases, ckpts, run_dirs, group_dir, hooks=None, frozen=None, ahead=None, marks=None,
              prepared=None):
        got["frozen"], got["marks"] = [f.result() for f in frozen], marks
        got["ahead"] = [f.result() if f is not None else None for f in ahead]
        return [None] * len(exps)

    monkeypatch.setattr(group_base, "read_ahead", read)
    monkeypatch.setattr(group_base, "encode_ahead", encode)
    monkeypatch.setattr(group_base, "train_bases", train)
    group = GroupTrainer(keys, "g", wait_s=60.0, kind="base")
    assert group.read_ahead("ae-0000-small", "ckpt0") and group.read_ahead("ae-0001-small", "old1")
    assert not group.read_ahead("ae-0000-small", "ckpt0")  # read already
    assert not group.read_ahead("ae-0002-small", "ckpt2")  # not a member
    assert not GroupTrainer(["ae-0000"], "a", wait_s=1.0).read_ahead("ae-0000", "ckpt0")  # an autoencoder group
    deadline = time.monotonic() + 60
    while len(events) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sorted(events) == [("encode", "ckpt0"), ("encode", "old1"), ("read", "ckpt0"), ("read", "old1")]
    exp = to_dict(member_exp(*MEMBERS[0]))
    assert group.join(keys[0], exp, "run0", {"base": "b", "ae_checkpoint": "ckpt0"})
    assert group.join(keys[1], exp, "run1", {"base": "b", "ae_checkpoint": "ckpt1"})  # not what was passed on
    while group.status()["state"] != "done" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [v for v in group.outcome.values() if v[0] == "error"], group.outcome
    assert sorted(events) == [("encode", "ckpt0"), ("encode", "old1"),  # ckpt0 read and encoded once
                              ("read", "ckpt0"), ("read", "ckpt1"), ("read", "old1")]
    assert got["frozen"] == [("ae of ckpt0", None, {}), ("ae of ckpt1", None, {})]
    assert got["ahead"] == [("ckpt0", ("data",), "z of ckpt0"), None]  # old1's latents are not the member's
    assert got["marks"].pop("t_joined") > 0 and got["marks"] == {"checkpoints_passed_on": 1}  # every member's marks
    assert not group.read_ahead("ae-0000-small", "ckpt0")  # the group has trained


def test_a_groups_output_goes_to_its_log_too_and_an_unwritable_log_is_no_failure(tmp_path, capsys):
    import sys

    out, err = sys.stdout, sys.stderr  # put back below: the group tees this process's output
    try:
        GroupTrainer(["a"], str(tmp_path / "g"), 1.0, log=str(tmp_path / "g" / "actor.log"))
        print("a line of the group's loop")
        assert "a line of the group's loop" in (tmp_path / "g" / "actor.log").read_text()
        assert sys.stderr.isatty() == err.isatty()  # what asks about the stream asks the one it replaced
    finally:
        sys.stdout, sys.stderr = out, err
    GroupTrainer(["a"], "/proc/none/g", 1.0, log="/proc/none/g/actor.log")
    assert "cannot keep its output in /proc/none/g/actor.log" in capsys.readouterr().out
    assert sys.stdout is out
    import io

    from ulsweep.sweep.stacking import _Tee

    with open(tmp_path / "first", "w") as first:  # faulthandler, a subprocess: the replaced stream's descriptor
        assert _Tee(first, io.StringIO()).fileno() == first.fileno()


def test_a_member_that_diverged_fails_its_own_trial_and_no_other():
    from ulsweep.sweep.stacking import _Relay
    from ulsweep.train.hooks import TrainingDiverged

    keys = ["ae-0000", "ae-0001"]
    group = GroupTrainer(keys, "g", wait_s=1.0)
    group.state, group.members = "training", keys
    group.events, group.taken = {k: [] for k in keys}, {k: 0 for k in keys}
    gone = _Relay(group, "ae-0000")
    gone.log_metrics(2, {"loss": 1.0})
    gone.failed(TrainingDiverged("ae group of 2: non-finite loss by step 4 (member 0 of a group of 2; the others "
                                 "train on)", checkpoint="g/checkpoints/step_00000002"))
    gone.log_metrics(4, {"loss": float("nan")})  # nothing after its failure reaches its trial
    rec = Recorder()
    with pytest.raises(TrainingDiverged, match="member 0 of a group of 2") as err:
        relay(group, "ae-0000", rec)
    assert err.value.checkpoint == "g/checkpoints/step_00000002" and rec.logs == [(2, {"loss": 1.0})]
    assert "ae-0001" not in group.outcome  # the other member trains on


def test_a_failed_autoencoder_trial_tells_its_base_group_not_to_wait(tmp_path, digits_cache, one_thread):
    """The searcher tells `on_skip` the base trials a failed AE trial will not spawn (only then); a forming group
    told so (`forgo`) trains as soon as the others have joined, not `stack_wait_s` later, and refuses the key."""
    from test_sweep import ae_done, grid_search

    from ulsweep.sweep.searcher import SpawningSearcher

    skipped = []
    s = SpawningSearcher(grid_search(), ["small", "wide"], on_skip=skipped.extend)
    s.suggest("a0"), s.suggest("a1")
    s.on_trial_complete("a1", ae_done("ae-0001"))
    assert skipped == []
    s.on_trial_complete("a0", None, error=True)
    assert skipped == ["ae-0000-small", "ae-0000-wide"]
    group = GroupTrainer(["ae-0000", "ae-0001"], str(tmp_path / "g"), wait_s=600.0)
    t0 = time.monotonic()
    assert group.join("ae-0000", to_dict(member_exp(*MEMBERS[0])), str(tmp_path / "a"))
    group.forgo("ae-0001")  # else the group would wait 600 s for it (its 4 steps take seconds)
    res = relay(group, "ae-0000", Recorder())
    assert time.monotonic() - t0 < 300 and res.steps == 4 and res.extra["group"]["members"] == 1
    assert not group.join("ae-0001", {}, "x")  # it trains alone, should it come after all


def test_a_relayed_member_reports_the_gpu_memory_of_its_groups_process(tmp_path, monkeypatch):
    """A member's trial process never touches the GPU (it relays): its final result carries the peak memory of
    the group's process (`device_memory` in the member's result), which its trial reports as its own."""
    from ulsweep.sweep.worker import RayHooks
    from ulsweep.train import group as group_module
    from ulsweep.train.hooks import StageResult

    peak = {"gpu_mem_peak_gb": 31.5, "gpu_mem_reserved_peak_gb": 40.0}
    monkeypatch.setattr(group_module, "device_memory", lambda: peak)  # the group's process, on a GPU
    exp = member_exp(*MEMBERS[0])
    [res] = group_module.train_autoencoders([exp], [str(tmp_path / "m")], str(tmp_path / "g"))
    assert res.extra["device_memory"] == peak
    hooks = RayHooks({"kind": "ae", "key": "ae-0000", "local_mode": True, "run_id": "r", "run_dir": str(tmp_path),
                      "tracking_uri": ""}, rank=1, world=2)  # no MLflow: the final result only
    final = hooks.finish(StageResult(**json.loads(json.dumps(dataclasses.asdict(res)))), 1.0)
    assert final["gpu_mem_peak_gb"] == 31.5 and final["gpu_mem_reserved_peak_gb"] == 40.0


@pytest.mark.slow
def test_a_sweep_trains_its_autoencoders_as_one_stacked_group(tmp_path):
    d = tiny_experiment("stack", n_ae=2)
    d["resources"].update({"num_workers": 0, "stack_trials": 2, "stack_wait_s": 120})
    d["search"]["max_concurrent"] = 2
    # 200 samples a base model, not 1,000: Ray runs the group's actor at its workers' niceness (15), and beside
    # another test's process (niceness 0) on CI's 2 cores its one thread sampled 2,000 images in 11 s
    d["eval"] = {"gfd_samples": 200}
    f = write_yaml(tmp_path, d)
    p = subprocess.run(cli(f, "--storage", tmp_path / "runs"), cwd=tmp_path, env=sweep_env(tmp_path),
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert "stacking: 2 group(s) of trials" in p.stdout + p.stderr  # the autoencoders, then their base trials
    run_dir = tmp_path / "runs" / "stack"
    check_lineage(run_dir, ["ae-0000", "ae-0001"], ["tiny"], latents=True)  # curves, params, base trials as ever
    from test_sweep import mlflow_runs

    from ulsweep.sweep.timeline import GROUP_MARKS

    by_key = mlflow_runs(run_dir)[2]  # the group's marks are timings, never metrics of a run
    logged = {m for r in by_key.values() for m in r.data.metrics}
    assert not {m for m in logged if m.rsplit("/", 1)[-1] in GROUP_MARKS}, sorted(logged)
    for k in ("ae-0000", "ae-0001", "ae-0000-tiny", "ae-0001-tiny"):
        # a member's own process relays what its group's actor trains: it never imported torch (~10 s of a fresh
        # process's start under a first wave's contention)
        [timings] = [json.loads(line) for line in (run_dir / "trials" / k / "timings.jsonl").read_text().splitlines()]
        assert timings["torch_imported"] is False, (k, timings)
        result = json.loads((run_dir / "trials" / k / "result.json").read_text())
        assert result["extra"]["group"]["members"] == 2, result["extra"]
        if "tiny" not in k:  # the autoencoders' group was built ahead: nothing of its setup after the joins
            assert not [m for m in result["extra"]["marks"] if m.startswith("setup_")], result["extra"]["marks"]
        else:  # their group passed its members' checkpoints on to the base group before the base trials started,
            # which read them and encoded their latents then (and the runs' lineage lists those latents: above)
            marks = result["extra"]["marks"]
            assert marks["checkpoints_passed_on"] == 2 and marks["latents_encoded_ahead"] == 2, marks
            assert "setup_encode_encoder_s" not in marks, marks  # nothing left for the group to encode
            # and it built its networks while the autoencoders trained, for these very members (nothing to
            # compile here: the tiny base model trains uncompiled)
            assert marks["prepared_compile"] == "not compiled" and marks["prepared_s"] > 0, marks
            assert marks["t_prepared_end"] < marks["t_joined"], marks
    for g in ("group-0", "group-1"):  # each group's own run
        assert len(list((run_dir / "groups").glob(f"{g}/*/result.json"))) == 1, g
    # what the groups' actors printed, which the driver does not show, is in their logs
    assert "built and its step warmed" in (run_dir / "groups" / "group-0" / "actor.log").read_text()
    base_log = (run_dir / "groups" / "group-1" / "actor.log").read_text()
    assert "[latents] encoded" in base_log and "its compiled step warmed: not compiled" in base_log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["counts"] == {"ae_done": 2, "base_done": 2}


def test_the_driver_plans_its_groups_and_precompile_tasks_without_importing_torch():
    """The sweep's driver plans lf_sweep's stacked groups, their actors' arguments and the precompile tasks from
    the config alone: torch is never imported in its process (seconds before its first actor and trial started)."""
    import os
    import sys

    code = ("import sys\n"
            "from ulsweep.config import load_experiment\n"
            "from ulsweep.sweep import driver, precompile, stacking\n"
            "exp = load_experiment(sys.argv[1])\n"
            "groups, names = stacking.all_groups(exp), stacking.group_names(exp, 's')\n"
            "args = [stacking.trainer_args(exp, '/tmp/r', i, keys, kind, names)\n"
            "        for i, (kind, keys) in enumerate(groups)]\n"
            "jobs, plan = precompile.jobs(exp), driver.plan_description(exp)\n"
            "print([len(keys) for _, keys in groups], [j['stage'] for j in jobs], len(plan), 'torch' in sys.modules)\n")
    p = subprocess.run([sys.executable, "-c", code, os.path.abspath("experiments/lf_sweep.yaml")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.split("\n")[-2] == "[18, 18] ['ae', 'base'] 18 False", p.stdout
