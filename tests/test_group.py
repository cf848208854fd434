"""ulsweep.train.group: K stage-1 runs trained as one stacked program must be the K runs trained alone (weights,
generators, metrics, the files they leave), resume when killed, and refuse members of another architecture."""
import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from ulsweep.config import experiment_from_dict
from ulsweep.train.checkpoint import load_checkpoint, read_meta
from ulsweep.train.group import GroupHooks, check_members, train_autoencoders
from ulsweep.train.stage1 import stage1_hash, train_autoencoder
from ulsweep.train.runtime import make_runtime
from ulsweep.train.stage2 import load_frozen_autoencoder, train_base

from test_train import Recorder

TRAIN = {"steps": 4, "batch_size": 8, "log_every": 2, "eval_images": 16, "eval_t_per_image": 2, "sample_steps": 2,
         "ckpt_every": 2}
MEMBERS = [(1.5, -2.0, 0), (2.0, 0.0, 1), (4.0, 2.0, 2)]  # loss factor, sigmoid bias, seed


def member_exp(lf, bias, seed, resources=None, **train):
    return experiment_from_dict({
        **({"resources": resources} if resources else {}),
        "name": f"lf{lf}-b{bias}-s{seed}",
        "data": {"path": "builtin:digits", "image_size": 16},
        "ae": {"model": {"preset": "tiny", "downsample": 4, "latent_channels": 2},
               "loss": {"loss_factor": lf, "sigmoid_bias": bias},
               # clipping that binds: each member must be clipped by its own norm
               "optim": {"lr": 1e-3, "warmup_steps": 0, "grad_clip": 0.05},
               "train": {**TRAIN, "seed": seed, **train}},
        "base_models": [{"name": "b", "train": {**TRAIN, "steps": 4, "seed": seed}}],
        "eval": {"extractor": "none"},
    })


def rel(a, b):
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


@pytest.fixture(scope="module")
def alone(tmp_path_factory, digits_cache):
    """Each member trained alone: its result and its logged metrics."""
    out = []
    for lf, b, s in MEMBERS:
        rec = Recorder()
        res = train_autoencoder(member_exp(lf, b, s), str(tmp_path_factory.mktemp("alone") / "ae"), rec)
        out.append((res, rec))
    return out


class Handed(Recorder):
    """A member's hooks that also note, in a list the members share, when its checkpoint and its result came."""

    def __init__(self, events: list, i: int):
        super().__init__()
        self.events, self.i = events, i

    def checkpoint_ready(self, path):
        self.events.append(("checkpoint", self.i, path, read_meta(path)["metrics"]))

    def finished(self, result):
        self.events.append(("result", self.i, result.checkpoint, result.metrics))


def test_a_group_trains_each_member_as_its_own_run(tmp_path, alone, one_thread):
    exps = [member_exp(*m) for m in MEMBERS]
    dirs = [str(tmp_path / f"m{i}") for i in range(len(exps))]
    events: list = []
    recs = [Handed(events, i) for i in range(len(exps))]
    results = train_autoencoders(exps, dirs, str(tmp_path / "group"), GroupHooks(recs))
    # each member's final checkpoint handed on before its result (written beside the evaluation, its metrics not
    # yet in it), the same checkpoint, which has them once the member is done
    for i, res in enumerate(results):
        (ready,) = [e for e in events if e[:2] == ("checkpoint", i)]
        (done,) = [e for e in events if e[:2] == ("result", i)]
        assert events.index(ready) < events.index(done) and ready[2] == done[2] == res.checkpoint
        assert ready[3] == {} and read_meta(res.checkpoint)["metrics"] == res.metrics and res.metrics
    for i, ((res_alone, rec_alone), res, rec, d) in enumerate(zip(alone, results, recs, dirs)):
        mine, theirs = load_checkpoint(res.checkpoint), load_checkpoint(res_alone.checkpoint)
        for part in ("model", "ema"):  # up to rounding, which AdamW's normalized step magnifies where a gradient
            for name, t in theirs[0][part].items():  # is near 0 (a grouped kernel sums in another order)
                assert rel(mine[0][part][name], t) < 1e-3, (i, part, name)
        assert torch.equal(mine[0]["rng"]["gen"], theirs[0]["rng"]["gen"])  # the same batches and noise drawn
        for p, s in theirs[0]["optimizer"]["state"].items():
            assert rel(mine[0]["optimizer"]["state"][p]["exp_avg_sq"], s["exp_avg_sq"]) < 1e-3, (i, p)
        # its own file layout: the meta, config and result.json of its run alone
        assert mine[1]["config_hash"] == stage1_hash(exps[i]) == theirs[1]["config_hash"]
        assert mine[1]["kind"] == "ae" and mine[1]["step"] == 4 and mine[0]["config"] == theirs[0]["config"]
        with open(os.path.join(d, "result.json")) as f:
            assert json.load(f)["config_hash"] == stage1_hash(exps[i])
        assert os.path.exists(res.extra["images"]["reconstructions.png"])
        # the group's setup, timed by part in every member's marks (the sweep's timeline reads them)
        assert {k for k in res.extra["marks"] if k.startswith("setup_")} == {"setup_data_s", "setup_models_s"}
        assert all(res.extra["marks"][k] > 0 for k in ("setup_data_s", "setup_models_s"))
        # its own metrics: the final evaluation and every logged curve (the clipped norm is its own)
        for k in ("bpp", "bpp_se", "psnr", "bpp_online"):
            assert res.metrics[k] == pytest.approx(res_alone.metrics[k], rel=1e-3, abs=1e-4), (i, k)
        assert [s for s, _ in rec.logs] == [s for s, _ in rec_alone.logs]
        for (_, m), (_, m_alone) in zip(rec.logs, rec_alone.logs):
            for k in ("loss", "grad_norm", "train_bpp", "eval_psnr"):
                if k in m_alone:
                    assert m[k] == pytest.approx(m_alone[k], rel=1e-3), (i, k)
        # what the base stage reads of an autoencoder run
        ae, ae_exp, meta = load_frozen_autoencoder(res.checkpoint, "cpu")
        assert ae_exp.ae.loss.loss_factor == MEMBERS[i][0] and meta["latent_shape"] == [2, 4, 4]
    # the clip binds (so per-member clipping is tested), and the members' norms differ
    assert min(m["grad_norm"] for _, m in alone[0][1].logs if "grad_norm" in m) > 0.05
    assert len({round(m["grad_norm"], 3) for _, m in recs[0].logs[:1] + recs[2].logs[:1]}) == 2
    base = train_base(exps[0], exps[0].base_models[0], results[0].checkpoint, str(tmp_path / "base"))
    assert base.steps == 4 and base.metrics["base_bpp"] > 0
    again = train_autoencoders(exps, dirs, str(tmp_path / "group"))  # finished members are not trained again
    assert [r.checkpoint for r in again] == [r.checkpoint for r in results]


def test_a_group_runs_its_convolutions_as_resources_stack_conv_says(one_thread):
    """The members' stacked networks with resources.stack_conv loop: one convolution per member, the same
    weights (each member's seed) and the same losses, up to rounding, as the grouped convolutions'."""
    from ulsweep.models.stacked import StackedConv2d
    from ulsweep.train.group import build_networks

    losses = {}
    for conv in ("grouped", "loop"):
        exps = [member_exp(*m, resources={"num_workers": 0, "stack_trials": 3, "stack_conv": conv}) for m in MEMBERS]
        objective, ts = build_networks(exps, make_runtime(exps[0].ae.train), (1, 16, 16))
        convs = [m for m in objective.modules() if isinstance(m, StackedConv2d)]
        assert convs and all(m.conv == conv for m in convs)
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(3 * 4, 1, 16, 16, generator=gen) * 2 - 1
        noise = objective.draw_noise(4, type(ts.gen)([torch.Generator().manual_seed(i) for i in range(3)]))
        losses[conv] = objective(x, noise)["total"].detach()
    assert rel(losses["loop"], losses["grouped"]) < 1e-5


def test_members_of_one_seed_start_from_one_network_made_as_their_runs_alone_make_it(one_thread, monkeypatch):
    """Members that differ in their loss settings but not in their seed start from the same weights: the group
    makes each seed's network once, every member's rows are the weights its run alone draws, and torch's CPU
    generator is left as making the last member's network leaves it."""
    import ulsweep.train.group as group
    from ulsweep.models.stacked import unstack
    from ulsweep.train.build import build_autoencoder

    exps = [member_exp(lf, b, s) for lf, b, s in [(1.5, -2.0, 0), (2.0, 0.0, 1), (4.0, 2.0, 0), (3.0, 0.0, 0)]]
    made = []
    monkeypatch.setattr(group, "build_autoencoder", lambda cfg, c: made.append(cfg.loss.loss_factor)
                        or build_autoencoder(cfg, c))
    objective, _ = group.build_networks(exps, make_runtime(exps[0].ae.train), (1, 16, 16))
    after = torch.get_rng_state()
    assert made == [1.5, 2.0]  # seed 0's network, then seed 1's; members 2 and 3 share seed 0's
    for i, e in enumerate(exps):
        torch.manual_seed(e.ae.train.seed)
        own = build_autoencoder(e.ae, 1).state_dict()
        rows = unstack(objective.stacked.ae, i)
        assert own.keys() == rows.keys() and all(torch.equal(own[n], rows[n]) for n in own)
    assert torch.equal(after, torch.get_rng_state())  # the last member's (seed 0's) making, as just repeated
    assert [float(objective.stacked.loss_factor[i]) for i in range(4)] == [1.5, 2.0, 4.0, 3.0]


def test_base_members_of_one_seed_start_from_one_network_made_as_their_runs_alone_make_it(one_thread, monkeypatch):
    """The same for a base group's members: one base model made per seed, every member's rows its run alone's."""
    import ulsweep.train.group_base as group_base
    from ulsweep.models.stacked import unstack
    from ulsweep.train.build import build_base_model

    exps = [member_exp(lf, b, s) for lf, b, s in [(1.5, -2.0, 0), (2.0, 0.0, 0), (4.0, 2.0, 1)]]
    bases = [e.base_models[0] for e in exps]
    made = []
    monkeypatch.setattr(group_base, "build_base_model", lambda cfg, c: made.append(cfg.train.seed)
                        or build_base_model(cfg, c))
    objective, _ = group_base.build_base_networks(bases, exps, (2, 4, 4), make_runtime(bases[0].train))
    assert made == [0, 1]
    for i, b in enumerate(bases):
        torch.manual_seed(b.train.seed)
        own, rows = build_base_model(b, 2).state_dict(), unstack(objective.stacked.net, i)
        assert own.keys() == rows.keys() and all(torch.equal(own[n], rows[n]) for n in own)


def test_a_killed_group_resumes_to_the_uninterrupted_weights(tmp_path, alone, one_thread):
    exps = [member_exp(*m) for m in MEMBERS]
    dirs = [str(tmp_path / f"m{i}") for i in range(len(exps))]
    group = str(tmp_path / "group")
    stopped = train_autoencoders(exps, dirs, group, GroupHooks([Recorder(stop_at=2) for _ in exps]))
    assert [r.steps for r in stopped] == [2, 2, 2] and not any(os.path.exists(d) for d in dirs)
    results = train_autoencoders(exps, dirs, group)
    for (res_alone, _), res in zip(alone, results):
        mine, theirs = load_checkpoint(res.checkpoint)[0], load_checkpoint(res_alone.checkpoint)[0]
        assert torch.equal(mine["rng"]["gen"], theirs["rng"]["gen"])
        assert max(rel(mine["ema"][n], t) for n, t in theirs["ema"].items()) < 1e-3


class Failing(Recorder):
    def __init__(self):
        super().__init__()
        self.errors = []

    def failed(self, error):
        self.errors.append(error)


def test_a_member_that_diverges_fails_alone_and_the_others_train_on(tmp_path, alone, one_thread, monkeypatch):
    """Member 1's weights turn NaN after step 3 (as a diverging run's do): its loss is non-finite by step 4, so
    it fails with TrainingDiverged as its run alone would, writes nothing and hears nothing more; members 0 and 2
    finish with the weights and metrics of their runs alone, untouched by its NaNs."""
    from ulsweep.train.group import GroupTrainState
    from ulsweep.train.hooks import TrainingDiverged

    real = GroupTrainState.optimizer_step

    def poisoned(self, loss):
        norms = real(self, loss)
        if self.step == 3:
            with torch.no_grad():
                for p in self.net.parameters():
                    p[1] = float("nan")
        return norms

    monkeypatch.setattr(GroupTrainState, "optimizer_step", poisoned)
    exps = [member_exp(*m) for m in MEMBERS]
    dirs = [str(tmp_path / f"m{i}") for i in range(len(exps))]
    recs = [Failing() for _ in exps]
    results = train_autoencoders(exps, dirs, str(tmp_path / "group"), GroupHooks(recs))
    assert results[1] is None and not os.path.exists(dirs[1])
    [err] = recs[1].errors
    assert isinstance(err, TrainingDiverged) and err.checkpoint.endswith("step_00000002")
    assert "non-finite loss by step 4" in str(err) and "member 1 of a group of 3" in str(err)
    assert max(s for s, _ in recs[1].logs) == 2  # its last curve point came before it diverged
    for i in (0, 2):
        assert not recs[i].errors and results[i].steps == 4
        mine, theirs = load_checkpoint(results[i].checkpoint)[0], load_checkpoint(alone[i][0].checkpoint)[0]
        assert max(rel(mine["ema"][n], t) for n, t in theirs["ema"].items()) < 1e-3, i
        for k in ("bpp", "psnr", "bpp_online"):
            assert results[i].metrics[k] == pytest.approx(alone[i][0].metrics[k], rel=1e-3, abs=1e-4), (i, k)
    # a group whose members all diverge ends with the error, as a run alone does
    monkeypatch.setattr(GroupTrainState, "optimizer_step", lambda self, loss: poisoned(self, loss * float("nan")))
    with pytest.raises(TrainingDiverged, match="non-finite loss by step 2"):
        train_autoencoders(exps, [str(tmp_path / f"n{i}") for i in range(3)], str(tmp_path / "g2"),
                           GroupHooks([Failing() for _ in exps]))


def test_a_group_prepared_and_warmed_ahead_trains_as_one_built_when_its_members_joined(tmp_path, digits_cache,
                                                                                        one_thread, monkeypatch):
    """prepare_autoencoders builds a group and runs its step once on random images before its members join: the
    group then trains to the very weights, optimizer state, generators and metrics of one built when they joined
    (the warm-up leaves no trace: torch's generator, which draws the dropout masks, restored, the gradients
    dropped), and a group prepared for other members is refused."""
    from ulsweep.models import presets
    from ulsweep.train.group import prepare_autoencoders

    # dropout in the decoder, so that a warm-up that moved torch's generator would change the training
    monkeypatch.setitem(presets.AE_PRESETS, "tiny", dataclasses.replace(presets.AE_PRESETS["tiny"], dec_dropout=0.2))
    exps = [member_exp(*m) for m in MEMBERS[:2]]
    plain = train_autoencoders(exps, [str(tmp_path / f"a{i}") for i in range(2)], str(tmp_path / "ga"))
    prepared = prepare_autoencoders(exps)
    assert prepared.seconds > 0 and all(p.grad is None for p in prepared.objective.parameters())
    with pytest.raises(ValueError, match="prepared ahead was built for other members"):
        train_autoencoders(exps[::-1], [str(tmp_path / f"r{i}") for i in range(2)], str(tmp_path / "gr"),
                           prepared=prepared)
    recs = [Recorder() for _ in exps]
    ahead = train_autoencoders(exps, [str(tmp_path / f"b{i}") for i in range(2)], str(tmp_path / "gb"),
                               GroupHooks(recs), prepared=prepared)
    for a, b in zip(plain, ahead):
        mine, theirs = load_checkpoint(b.checkpoint)[0], load_checkpoint(a.checkpoint)[0]
        for part in ("model", "ema"):
            assert all(torch.equal(mine[part][n], t) for n, t in theirs[part].items()), part
        assert torch.equal(mine["rng"]["gen"], theirs["rng"]["gen"])
        for p, st in theirs["optimizer"]["state"].items():
            assert torch.equal(mine["optimizer"]["state"][p]["exp_avg_sq"], st["exp_avg_sq"])
        assert b.metrics["bpp"] == a.metrics["bpp"] and b.metrics["psnr"] == a.metrics["psnr"]
        # built before its members joined: no setup left to time; when it was ready, and its seconds, are marked
        assert not {k for k in b.extra["marks"] if k.startswith("setup_")}
        assert b.extra["marks"]["prepared_s"] == prepared.seconds > 0
        assert b.extra["marks"]["t_prepared_end"] == prepared.t_end <= b.extra["marks"]["t_setup_end"]
        assert "prepared_s" not in a.extra["marks"]
    assert [m["loss"] for _, m in recs[0].logs if "loss" in m]  # its curves went to the members' hooks


def test_members_of_another_architecture_or_training_are_refused_by_name():
    a = member_exp(1.5, 0.0, 0)
    check_members([a, member_exp(3.0, 2.0, 5)])  # loss factor, bias and seed may differ
    wider = dataclasses.replace(a, ae=dataclasses.replace(a.ae, model=dataclasses.replace(a.ae.model,
                                                                                          latent_channels=4)))
    with pytest.raises(ValueError, match=r"member 1 .*ae\.model\.latent_channels is 4, member 0 .* has 2"):
        check_members([a, wider])
    with pytest.raises(ValueError, match=r"ae\.train\.steps"):
        check_members([a, member_exp(1.5, 0.0, 1, steps=5)])
    with pytest.raises(ValueError, match="3 members but 2 run directories"):
        train_autoencoders([a, a, a], ["x", "y"], "g")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_group_trains_with_cuda_graphs_on_a_gpu(tmp_path, digits_cache):
    """On a GPU the group's step compiles with CUDA graphs (its per-member clipping compiled too), its stacked
    decoder reconstructs compiled (`eval.sample_compile`), and the members come out as they train alone there
    (bf16 autocast: the same within a few percent after a few steps); so do their base models as a group."""
    exps = [member_exp(*m, compile="reduce-overhead", steps=6, ckpt_every=0) for m in MEMBERS]
    exps = [dataclasses.replace(e, eval=dataclasses.replace(e.eval, sample_compile=True)) for e in exps]
    group = train_autoencoders(exps, [str(tmp_path / f"m{i}") for i in range(3)], str(tmp_path / "group"))
    for i, (e, res) in enumerate(zip(exps, group)):
        alone = train_autoencoder(e, str(tmp_path / f"alone{i}"))
        assert res.steps == 6 and res.extra["marks"]["compile_gate"] in ("first", "done", "after")
        for k in ("bpp", "psnr"):
            assert res.metrics[k] == pytest.approx(alone.metrics[k], rel=0.05), (i, k)
    assert len({round(r.metrics["bpp"], 6) for r in group}) == 3
    # their base models as a group on the same GPU, compiled with CUDA graphs (sampling uncompiled: two compiles
    # fewer for the device's budget; the stacked decoder's compiled sampling is the autoencoders' above)
    from ulsweep.train.group_base import train_bases

    bexps = [dataclasses.replace(e, eval=dataclasses.replace(e.eval, sample_compile=False)) for e in exps]
    bases = [dataclasses.replace(e.base_models[0], train=dataclasses.replace(e.base_models[0].train,
                                                                            compile="reduce-overhead")) for e in bexps]
    based = train_bases(bexps, bases, [r.checkpoint for r in group], [str(tmp_path / f"b{i}") for i in range(3)],
                        str(tmp_path / "bgroup"))
    alone = train_base(bexps[0], bases[0], group[0].checkpoint, str(tmp_path / "b-alone"))
    assert based[0].extra["marks"]["compile_gate"] in ("first", "done", "after")
    assert based[0].metrics["base_bpp"] == pytest.approx(alone.metrics["base_bpp"], rel=0.05)


@pytest.fixture(scope="module")
def bases_alone(tmp_path_factory, alone):
    """Each member's base model trained alone on its autoencoder run alone: its result and logged metrics."""
    out = []
    for (ae, _), m in zip(alone, MEMBERS):
        exp, rec = member_exp(*m), Recorder()
        out.append((train_base(exp, exp.base_models[0], ae.checkpoint, str(tmp_path_factory.mktemp("base")), rec),
                    rec))
    return out


def test_a_base_group_trains_each_member_as_its_own_run(tmp_path, alone, bases_alone, one_thread, capsys):
    """The base models of three autoencoders (their own latents, seeds) trained as one program end as their
    runs alone: weights, generators, bits/pixel under the base model, curves and files; with the checkpoints
    read ahead (`read_ahead`) and the first member's latents with them (`encode_ahead`; the second's encoded ahead
    from another member's checkpoint, which the group refuses, the third's failed, which the group names; and
    networks built ahead for other members, which it refuses too) and, the second time, read by the group itself."""
    from concurrent.futures import Future, ThreadPoolExecutor

    from ulsweep.train.group_base import PreparedBases, encode_ahead, read_ahead, train_bases

    exps = [member_exp(*m) for m in MEMBERS]
    dirs = [str(tmp_path / f"b{i}") for i in range(3)]
    recs = [Recorder() for _ in exps]
    ckpts = [ae.checkpoint for ae, _ in alone]
    with ThreadPoolExecutor(2) as pool:  # the checkpoints read ahead on the host, as the sweep's group does
        frozen = [pool.submit(read_ahead, c) for c in ckpts]
        ahead = [pool.submit(lambda: encode_ahead([(ckpts[0], frozen[0], None)], 3)[0]), Future(), Future()]
        ahead[1].set_result(ahead[0].result())  # another member's latents, labelled with its checkpoint
        ahead[2].set_exception(OSError("disk gone"))
        # and networks built ahead for other members, which the group refuses by what they were built from
        other = PreparedBases("built for others", make_runtime(exps[0].base_models[0].train), None, None, "done")
        results = train_bases(exps, [e.base_models[0] for e in exps], ckpts, dirs,
                              str(tmp_path / "group"), GroupHooks(recs), frozen, ahead, prepared=other)
    out = capsys.readouterr().out
    assert "member 2's latents encoded ahead failed (OSError: disk gone)" in out
    assert "built for other members: building them anew" in out
    for i, ((res_alone, rec_alone), res, rec) in enumerate(zip(bases_alone, results, recs)):
        (mine, my_meta), (theirs, their_meta) = load_checkpoint(res.checkpoint), load_checkpoint(res_alone.checkpoint)
        for part in ("model", "ema"):
            for name, t in theirs[part].items():
                assert rel(mine[part][name], t) < 1e-3, (i, part, name)
        assert torch.equal(mine["rng"]["gen"], theirs["rng"]["gen"])
        assert mine["config"] == theirs["config"] and mine["experiment"] == theirs["experiment"]
        for key in ("kind", "config_hash", "ae_checkpoint", "ae_sha256", "latent_shape", "latents_hash", "step"):
            assert my_meta[key] == their_meta[key], (i, key)
        for key in ("base_bpp", "base_bpp_se", "gflops_base", "train_flops"):
            assert res.metrics[key] == pytest.approx(res_alone.metrics[key], rel=1e-3, abs=1e-4), (i, key)
        assert os.path.exists(res.extra["images"]["samples.png"]) and res.extra["group"]["member"] == i
        setup = {k: v for k, v in res.extra["marks"].items() if k.startswith("setup_")}
        # the encoding's own parts only where it encoded: the runs alone stored these latents already
        assert set(setup) == {f"setup_{p}_s" for p in ("encode_ahead", "checkpoints", "data", "encode", "latents",
                                                       "models")}
        assert all(v > 0 for v in setup.values()), setup
        assert res.extra["marks"]["latents_encoded_ahead"] == 1
        assert [s for s, _ in rec.logs] == [s for s, _ in rec_alone.logs]
        for (_, m), (_, m_alone) in zip(rec.logs, rec_alone.logs):
            if "loss" in m_alone:
                assert m["loss"] == pytest.approx(m_alone["loss"], rel=1e-3), i
    assert len({round(r.metrics["base_bpp"], 5) for r in results}) == 3
    again = train_bases(exps, [e.base_models[0] for e in exps], [ae.checkpoint for ae, _ in alone], dirs,
                        str(tmp_path / "group"))  # finished members are not trained again
    assert [r.checkpoint for r in again] == [r.checkpoint for r in results]


def test_checkpoints_passed_on_together_are_encoded_in_one_pass_as_each_alone(tmp_path, alone, bases_alone,
                                                                              one_thread, capsys):
    """encode_ahead: checkpoints queued together are encoded through their encoders stacked, in one pass over the
    split, each stored as its own (the latents its base run alone stored, up to the rounding of a grouped kernel);
    a queue of one is encoded as a base trial alone encodes it; each comes back on the device with its key."""
    import shutil
    from concurrent.futures import Future

    from ulsweep.data.sources import open_splits
    from ulsweep.train.group_base import encode_ahead, read_ahead
    from ulsweep.train.latents import training_latents

    def passed_on(i):  # a copy of member i's checkpoint, with no latents stored: as it comes from its trial
        ckpt = str(shutil.copytree(alone[i][0].checkpoint, tmp_path / f"ae{i}",
                                   ignore=shutil.ignore_patterns("latents")))
        read = Future()
        read.set_result(read_ahead(ckpt))
        return ckpt, read, time.time()

    queued = [passed_on(i) for i in range(3)]
    out = encode_ahead(queued[:2], 3) + encode_ahead(queued[2:], 3)
    said = capsys.readouterr().out
    assert "2 checkpoint(s), 2 of them in one pass" in said and "1 checkpoint(s), 0 of them in one pass" in said
    exp = member_exp(*MEMBERS[0])
    ds = open_splits(exp.data)
    for i, ((ckpt, key, z), (ae, _, meta)) in enumerate(zip(out, (q[1].result() for q in queued))):
        assert ckpt == queued[i][0] and key == (ds.content_hash, exp.data.train_split, exp.data.image_size)
        lat, stored = training_latents(ae.encoder, ckpt, meta["sha256"], ds, exp.data, "cpu")  # read, not encoded
        assert torch.equal(z, stored) and lat.manifest["encoder"].get("stacked") == (2 if i < 2 else None)
        _, theirs = training_latents(ae.encoder, alone[i][0].checkpoint, meta["sha256"], ds, exp.data, "cpu")
        assert rel(z, theirs) < 1e-4, i  # the latents the member's base run alone stored


def test_a_base_group_built_and_compiled_ahead_trains_as_one_built_when_its_members_joined(tmp_path, alone,
                                                                                             one_thread, monkeypatch):
    """prepare_bases builds a base group's networks and runs its compiled step (forward and backward, no optimizer
    step) on random latents before its members join: the loop's own compiled module (a new torch.compile of the
    same objective) then compiles nothing more in this process, and the group trains to the very weights,
    generators and bits/pixel of one built when its members joined. Compiled with AOTAutograd's eager backend
    (Dynamo's tracing, guards and cache, the joint graph; not Inductor's code generation, which cost this test a
    minute on 2 cores)."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module, mode=None, dynamic=None: compile_(
        module, backend="aot_eager", dynamic=dynamic))

    from ulsweep.config import to_dict
    from ulsweep.train.build import latent_shape
    from ulsweep.train.group_base import base_networks_ident, prepare_bases, train_bases

    def compiled(m):  # the base model's step compiled (Inductor's default mode on a CPU)
        d = to_dict(member_exp(*m))
        d["base_models"][0]["train"]["compile"] = "default"
        return experiment_from_dict(d)

    exps = [compiled(m) for m in MEMBERS[:2]]
    bases, ckpts = [e.base_models[0] for e in exps], [ae.checkpoint for ae, _ in alone[:2]]
    shape = latent_shape(exps[0])
    assert base_networks_ident(bases, exps, shape) != base_networks_ident(bases[::-1], exps[::-1], shape)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # the compile gate's markers too
    torch._dynamo.reset()  # nothing compiled in this process yet
    assert prepare_bases(bases, exps, shape).compiled.startswith("not compiled ahead")  # nobody compiled it
    prepared = prepare_bases(bases, exps, shape, compile_first=True)  # as the precompile task would have
    assert prepared.compiled in ("first", "after", "done", "unlocked") and prepared.seconds > 0
    assert all(p.grad is None for p in prepared.objective.parameters())
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    ahead = train_bases(exps, bases, ckpts, [str(tmp_path / f"a{i}") for i in range(2)], str(tmp_path / "ga"),
                        prepared=prepared)
    assert counters["stats"]["unique_graphs"] == graphs  # the loop's compiled step: the warm-up's graphs
    plain = train_bases(exps, bases, ckpts, [str(tmp_path / f"p{i}") for i in range(2)], str(tmp_path / "gp"))
    for a, p in zip(ahead, plain):
        mine, theirs = load_checkpoint(a.checkpoint)[0], load_checkpoint(p.checkpoint)[0]
        for part in ("model", "ema"):
            assert all(torch.equal(mine[part][n], t) for n, t in theirs[part].items()), part
        assert torch.equal(mine["rng"]["gen"], theirs["rng"]["gen"])
        assert a.metrics["base_bpp"] == p.metrics["base_bpp"]
        marks = a.extra["marks"]
        assert marks["prepared_s"] == prepared.seconds and marks["prepared_compile"] == prepared.compiled
        assert marks["t_prepared_end"] == prepared.t_end <= marks["t_setup_end"]
        assert "prepared_s" not in p.extra["marks"]


def test_base_members_of_another_base_model_are_refused_by_name(alone):
    from ulsweep.train.group_base import train_bases

    exps = [member_exp(*m) for m in MEMBERS[:2]]
    wider = dataclasses.replace(exps[1].base_models[0], train=dataclasses.replace(exps[1].base_models[0].train,
                                                                                  batch_size=4))
    with pytest.raises(ValueError, match=r"base group member 1 .*base\.train\.batch_size is 4, member 0 has 8"):
        train_bases(exps, [exps[0].base_models[0], wider], [ae.checkpoint for ae, _ in alone[:2]], ["x", "y"], "g")


def test_checkpoints_written_first_are_handed_on_and_a_failing_hand_on_fails_no_member(capsys):
    """`checkpoints_first`: each alive member's checkpoint saved beside the evaluation and handed on as it is
    written; a hook that raises is said, and the member's write still gives its path."""
    from ulsweep.train.group import checkpoints_first

    class Hooks:
        def __init__(self):
            self.got = []

        def member_checkpoint(self, i, path):
            self.got.append((i, path))
            if i == 2:
                raise ConnectionError("base group gone")

    hooks, written = Hooks(), {}
    with checkpoints_first([0, 2, 3], written, hooks, lambda i: f"ckpt-{i}"):
        pass
    assert sorted(written) == [0, 2, 3] and [written[i].result() for i in (0, 2, 3)] == ["ckpt-0", "ckpt-2", "ckpt-3"]
    assert sorted(hooks.got) == [(0, "ckpt-0"), (2, "ckpt-2"), (3, "ckpt-3")]
    assert "[member 2] its checkpoint ckpt-2 was not handed on before its evaluation (ConnectionError" in \
        capsys.readouterr().out


def test_a_members_rows_are_copied_to_host_memory_and_own_their_storage():
    """`_row` and `_optimizer_row` (what `save_member` writes): member i's rows as host tensors of their own, the
    optimizer's shared step count whole."""
    from ulsweep.train.group import _optimizer_row, _row, copy_stream

    w = torch.arange(12.0).reshape(3, 4)
    opt = {"state": {0: {"exp_avg": w * 2, "step": torch.tensor(7.0)}}, "param_groups": [{"lr": 1e-3}]}
    with copy_stream(w.device):
        rows, orows = _row({"w": w}, 1), _optimizer_row(opt, 1)
    assert torch.equal(rows["w"], w[1]) and rows["w"].untyped_storage().nbytes() == 4 * 4
    assert torch.equal(orows["state"][0]["exp_avg"], w[1] * 2) and orows["state"][0]["step"].item() == 7.0
    w.add_(1)  # the training's state moves on; the copies do not
    assert torch.equal(rows["w"], torch.arange(4.0, 8.0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_rows_copied_on_their_own_stream_wait_for_the_kernels_queued_before():
    """`copy_stream` on a GPU: the copies run after what the default stream held when they began (a long kernel,
    then the update that makes the values), without waiting for what is queued after."""
    from ulsweep.train.group import _row, copy_stream

    w = torch.zeros(4, 1 << 20, device="cuda")
    torch.cuda._sleep(200_000_000)  # ~0.1 s of GPU time queued first (test only: a private helper)
    w.add_(1)
    with copy_stream(w.device):
        rows = _row({"w": w}, 2)
    w.add_(1)
    assert rows["w"].device.type == "cpu" and bool((rows["w"] == 1).all())


PREPARE_AND_LIST_IMPORTS = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[2])
    from test_group import member_exp
    from ulsweep.train.group import prepare_autoencoders
    before = "torch._inductor.choices" in sys.modules
    prepared = prepare_autoencoders([member_exp(1.5, -2.0, 0, compile=sys.argv[1] == "on"),
                                     member_exp(2.0, 0.0, 1, compile=sys.argv[1] == "on")])
    print(json.dumps({"before": before, "after": "torch._inductor.choices" in sys.modules,
                      "parts": sorted(prepared.parts)}))
    """)


@pytest.mark.parametrize("compile_setting", ["on", "off"])
def test_a_compiled_group_imports_inductor_while_it_is_prepared_not_in_its_first_step(digits_cache, compile_setting):
    """In a fresh process (nothing imported Inductor yet): preparing a group whose step compiles imports the
    compile's modules beside the build and the warm-up (`accel.preload_inductor`), its wait for them a part of its
    own; an uncompiled group imports none of them."""
    out = subprocess.run([sys.executable, "-c", PREPARE_AND_LIST_IMPORTS, compile_setting, os.path.dirname(__file__)],
                         capture_output=True, text=True, timeout=600,
                         env=os.environ | {"ULSWEEP_CACHE": str(digits_cache)})
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert not got["before"]
    assert got["after"] == (compile_setting == "on")
    assert ("prepare_inductor_s" in got["parts"]) == (compile_setting == "on")
    assert {"prepare_runtime_s", "prepare_models_s", "prepare_warm_up_s"} <= set(got["parts"])
