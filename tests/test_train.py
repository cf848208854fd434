"""Stage-1 / stage-2 loops on CPU: short runs, checkpoints, exact resume, corrupted checkpoints."""
import os

import pytest
import torch

from ulsweep.config import experiment_from_dict
from ulsweep.train.checkpoint import CheckpointError, latest_valid_checkpoint, list_checkpoints, load_checkpoint
from ulsweep.train.hooks import TrainHooks
from ulsweep.train.stage1 import train_autoencoder
from ulsweep.train.stage2 import train_base

TINY_TRAIN = {"steps": 2, "batch_size": 8, "log_every": 1, "eval_images": 8, "eval_t_per_image": 2,
              "sample_steps": 2}


def tiny_exp(extractor="none", **ae_train):
    return experiment_from_dict({
        "name": "t",
        "data": {"path": "builtin:digits", "image_size": 16},
        "ae": {"model": {"preset": "tiny", "downsample": 4, "latent_channels": 2},
               "train": {**TINY_TRAIN, **ae_train}},
        "base_models": [{"name": "b", "train": TINY_TRAIN}],
        "eval": {"extractor": extractor, "gfd_samples": 16, "extractor_epochs": 1},
    })


class Recorder(TrainHooks):
    def __init__(self, stop_at=None):
        self.logs, self.ckpts, self.stop_at, self.step = [], [], stop_at, 0

    def log_metrics(self, step, metrics):
        self.step = step
        self.logs.append((step, dict(metrics)))

    def checkpoint_saved(self, step, path, metrics):
        self.ckpts.append((step, path))

    def should_stop(self):
        return self.stop_at is not None and self.step >= self.stop_at


def losses(rec):
    return [(s, m["loss"]) for s, m in rec.logs if "loss" in m]


def test_two_step_runs_of_both_stages(tmp_path, digits_cache):
    exp = tiny_exp(extractor="auto")  # trains and caches the digits domain extractor (1 epoch)
    rec = Recorder()
    res = train_autoencoder(exp, str(tmp_path / "ae"), rec)
    assert res.steps == 2 and [s for s, _ in losses(rec)] == [1, 2]
    for k in ("bpp", "bpp_se", "psnr", "rfd_digits", "gflops_encoder", "gflops_prior", "gflops_decoder",
              "train_flops"):
        assert k in res.metrics and res.metrics[k] == res.metrics[k], k  # present and not NaN
    assert res.metrics["bpp"] > 0 and 0 < res.metrics["psnr"] < 60
    assert os.path.exists(os.path.join(res.extra["images"]["reconstructions.png"]))
    state, meta = load_checkpoint(res.checkpoint)
    assert meta["step"] == 2 and meta["kind"] == "ae" and set(state) >= {"model", "ema", "optimizer", "rng", "config"}
    assert state["config"]["ae"]["train"]["steps"] == 2  # the resolved config travels with the weights

    b = train_base(exp, exp.base_models[0], res.checkpoint, str(tmp_path / "base"))
    assert b.steps == 2 and b.metrics["base_bpp"] > 0 and b.metrics["gflops_base"] > 0
    assert b.metrics["gfd_digits"] > 0 and b.metrics["gen_samples"] == 16
    assert os.path.exists(b.extra["images"]["samples.png"])
    # a finished run is not trained again: the stored result comes back
    again = train_autoencoder(exp, str(tmp_path / "ae"), Recorder())
    assert again.metrics == res.metrics and again.checkpoint == res.checkpoint


def test_resume_reproduces_uninterrupted_run_exactly(tmp_path, digits_cache):
    exp = tiny_exp(steps=6, ckpt_every=3)
    full = Recorder()
    train_autoencoder(exp, str(tmp_path / "full"), full)

    first = Recorder(stop_at=3)
    r1 = train_autoencoder(exp, str(tmp_path / "split"), first)
    assert r1.steps == 3 and r1.extra.get("stopped")
    second = Recorder()
    r2 = train_autoencoder(exp, str(tmp_path / "split"), second)
    assert r2.steps == 6
    assert losses(first) + losses(second) == losses(full)  # bit-identical loss curve
    a, _ = load_checkpoint(list_checkpoints(str(tmp_path / "full"))[-1].path)
    b, _ = load_checkpoint(list_checkpoints(str(tmp_path / "split"))[-1].path)
    for k in a["model"]:
        torch.testing.assert_close(a["model"][k], b["model"][k], rtol=0, atol=0)


def test_corrupted_checkpoint_is_refused_and_resume_falls_back(tmp_path, digits_cache):
    run = str(tmp_path / "run")
    exp = tiny_exp(steps=4, ckpt_every=2)
    train_autoencoder(exp, run, Recorder())
    ckpts = list_checkpoints(run)
    assert [c.step for c in ckpts] == [2, 4]
    state_file = os.path.join(ckpts[-1].path, "state.pt")
    blob = bytearray(open(state_file, "rb").read())
    blob[len(blob) // 2] ^= 0xFF
    open(state_file, "wb").write(bytes(blob))
    with pytest.raises(CheckpointError, match="SHA-256.*does not match"):
        load_checkpoint(ckpts[-1].path)
    with open(state_file, "r+b") as f:  # truncated
        f.truncate(100)
    with pytest.raises(CheckpointError, match="step_00000004/state.pt"):
        load_checkpoint(ckpts[-1].path)
    with pytest.warns(UserWarning, match="bad checkpoint"):
        _, meta = latest_valid_checkpoint(run)
    assert meta["step"] == 2


def test_checkpoint_without_manifest_is_not_a_checkpoint(tmp_path, digits_cache):
    run = str(tmp_path / "run")
    train_autoencoder(tiny_exp(), run, Recorder())
    path = list_checkpoints(run)[-1].path
    os.remove(os.path.join(path, "meta.json"))
    with pytest.raises(CheckpointError, match="no meta.json"):
        load_checkpoint(path)


def test_resume_with_a_different_config_is_refused(tmp_path, digits_cache):
    run = str(tmp_path / "run")
    train_autoencoder(tiny_exp(steps=2), run, Recorder())
    os.remove(os.path.join(run, "result.json"))
    with pytest.raises(CheckpointError, match="use a fresh run directory"):
        train_autoencoder(tiny_exp(steps=3), run, Recorder())


def test_nonfinite_loss_stops_with_clear_error(tmp_path, digits_cache, monkeypatch):
    from ulsweep.train import common, stage1

    exp = tiny_exp(steps=4, ckpt_every=2, log_every=1)
    real = stage1.stage1_losses
    calls = {"n": 0}

    def poisoned(*a, **k):
        out = real(*a, **k)
        calls["n"] += 1
        if calls["n"] >= 3:
            out["total"] = out["total"] * float("nan")
        return out

    monkeypatch.setattr(stage1, "stage1_losses", poisoned)
    with pytest.raises(common.TrainingDiverged, match="non-finite loss by step 3.*step_00000002"):
        train_autoencoder(exp, str(tmp_path / "run"), Recorder())
    assert [c.step for c in list_checkpoints(str(tmp_path / "run"))] == [2]  # nothing newer written


@pytest.mark.parametrize("ablation", [
    {"stop_grad_prior": True}, {"logsnr_z0": 10.0}, {"decoder": "mse"}, {"prior": "normal"}])
def test_ablation_switches_train(tmp_path, digits_cache, ablation):
    raw = {"data": {"path": "builtin:digits", "image_size": 16}, "eval": {"extractor": "none"},
           "ae": {"model": {"preset": "tiny", "downsample": 4, "latent_channels": 2}, "loss": ablation,
                  "train": {**TINY_TRAIN, "steps": 1}}}
    res = train_autoencoder(experiment_from_dict(raw), str(tmp_path / "run"), Recorder())
    assert res.metrics["bpp"] > 0 and res.metrics["psnr"] > 0


def test_checkpoints_on_an_fsspec_uri(digits_cache):
    """Run directories may be URIs: memory:// stands in for s3:// / gs:// here."""
    run = "memory://ulsweep-test/run"
    exp = tiny_exp(steps=4, ckpt_every=2)
    first = Recorder(stop_at=2)
    train_autoencoder(exp, run, first)
    res = train_autoencoder(exp, run, Recorder())  # resumes from memory://.../step_00000002
    assert res.steps == 4 and res.checkpoint == "memory://ulsweep-test/run/checkpoints/step_00000004"
    state, meta = load_checkpoint(res.checkpoint)
    assert meta["step"] == 4 and "model" in state
    assert [c.step for c in list_checkpoints(run)] == [2, 4]


@pytest.mark.parametrize("std", [0.05, 0.1, 0.2])
def test_power_ema_exponent_gives_the_requested_width(std):
    from ulsweep.train.common import ema_exponent

    g = ema_exponent(std)
    assert abs(((g + 1) / ((g + 2) ** 2 * (g + 3))) ** 0.5 - std) < 1e-9
    if std == 0.1:
        assert abs(g - 6.94) < 0.01  # EDM2's value for sigma_rel = 0.10


def test_power_ema_averages_and_std0_tracks():
    from torch import nn

    from ulsweep.train.common import EMA

    m = nn.Linear(1, 1, bias=False)
    ema, track = EMA(m, 0.1), EMA(m, 0.0)
    for step in range(1, 101):
        with torch.no_grad():
            m.weight.fill_(float(step))
        ema.update(m, step)
        track.update(m, step)
    assert track.shadow.weight.item() == 100.0
    # the average of a linear ramp lags it: between the mean of the ramp (50.5) and its end (100)
    assert 80 < ema.shadow.weight.item() < 100


def test_cuda_graph_state_is_set_up_in_a_new_thread():
    """Tune runs a reused actor's next trial in a new thread; CUDA-graph trees must find their state there
    (and autograd's backward threads through the TLS stash)."""
    import threading

    from torch._inductor import cudagraph_trees as cgt

    from ulsweep.train.common import cuda_graph_state_for_this_thread

    seen = {}

    def trial_thread():
        seen["before"] = hasattr(cgt.local, "tree_manager_containers") or torch._C._is_key_in_tls(
            "tree_manager_containers")
        cuda_graph_state_for_this_thread()
        seen["local"] = cgt.local.tree_manager_containers
        seen["stashed"] = torch._C._get_obj_in_tls("tree_manager_containers")
        seen["lock"] = cgt.get_obj(cgt.local, "tree_manager_locks")[0]

    t = threading.Thread(target=trial_thread)
    t.start()
    t.join()
    assert seen["before"] is False  # a new thread starts without it
    assert seen["stashed"] is seen["local"] and isinstance(seen["local"], dict)
    assert hasattr(seen["lock"], "acquire")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_training_in_a_second_thread(tmp_path, digits_cache):
    """Two stage-1 runs with train.compile=reduce-overhead, each in its own thread, like two trials of one
    reused Tune actor: both finish (the second without CUDA graphs: torch 2.11 fails to capture there)."""
    import threading

    exp = experiment_from_dict({"data": {"path": "builtin:digits"}, "ae": {"train": {
        "steps": 3, "batch_size": 8, "log_every": 1, "eval_images": 16, "sample_steps": 2,
        "compile": "reduce-overhead"}}, "eval": {"extractor": "none"}})
    errors, results = [], []
    for i in range(2):
        def run(i=i):
            try:
                results.append(train_autoencoder(exp, str(tmp_path / f"run{i}")))
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
        t = threading.Thread(target=run)
        t.start()
        t.join()
    assert not errors, errors
    assert all(r.steps == 3 and r.metrics["bpp"] >= 0 for r in results)


def test_cuda_graphs_stay_in_the_first_thread_that_asks(monkeypatch, capsys):
    """compile_mode: reduce-overhead only on one CUDA process per model, and only in the first thread of the
    process that asks for it; any other thread gets the default mode and a note saying why."""
    import threading

    from ulsweep.train import common
    from ulsweep.train.common import Runtime, compile_mode

    monkeypatch.setattr(common, "_cuda_graph_owner", None)
    cuda, cpu = Runtime(torch.device("cuda", 0), torch.bfloat16, 0, 1), Runtime(torch.device("cpu"), None, 0, 1)
    assert compile_mode(False, cuda) is None and compile_mode(True, cuda) == "default"
    assert compile_mode("reduce-overhead", cpu) == "default"
    assert compile_mode("reduce-overhead", Runtime(torch.device("cuda", 0), None, 0, 2)) == "default"  # DDP
    assert common._cuda_graph_owner is None  # none of these claimed CUDA graphs
    assert compile_mode("reduce-overhead", cuda) == "reduce-overhead"
    seen = []
    t = threading.Thread(target=lambda: seen.append(compile_mode("reduce-overhead", cuda)), name="trial-2")
    t.start()
    t.join()
    assert seen == ["default"]
    assert "thread 'trial-2'" in capsys.readouterr().err
    assert compile_mode("reduce-overhead", cuda) == "reduce-overhead"  # the owner keeps them
    assert compile_mode("max-autotune-no-cudagraphs", cuda) == "max-autotune-no-cudagraphs"


def test_compiled_ddp_uses_the_librarys_bucket_setting(monkeypatch):
    """Under DDP, compile_module sets Dynamo's optimize_ddp to common.DDP_COMPILE (one graph, all-reduce after
    the backward: what measured best on 2 x H200); a single process and eager DDP leave Dynamo's setting alone."""
    from ulsweep.train import common
    from ulsweep.train.common import Runtime, compile_module

    cpu1, cpu2 = Runtime(torch.device("cpu"), None, 0, 1), Runtime(torch.device("cpu"), None, 0, 2)
    net = torch.nn.Linear(2, 2)
    with torch._dynamo.config.patch(optimize_ddp="ddp_optimizer"):  # restores Dynamo's setting afterwards
        assert compile_module(net, False, cpu2) is net
        compile_module(net, True, cpu1)
        assert torch._dynamo.config.optimize_ddp == "ddp_optimizer"
        monkeypatch.setattr(common, "DDP_COMPILE", "no_optimization")
        compiled = compile_module(net, "default", cpu2)
        assert torch._dynamo.config.optimize_ddp == "no_optimization" and compiled is not net


def test_compiled_objectives_match_eager_losses():
    """Stage-1 and base objectives (what DDP wraps and torch.compile traces) give the eager losses."""
    from ulsweep.diffusion import base_loss, diffuse, x_from_v
    from ulsweep.models import build_autoencoder, build_base_model
    from ulsweep.train.stage1 import Stage1Objective, draw_noise, stage1_losses
    from ulsweep.train.stage2 import BaseObjective, base_schedule

    torch.manual_seed(0)
    exp = experiment_from_dict({"data": {"image_size": 16}, "ae": {"model": {"preset": "tiny"}},
                                "base_models": [{"name": "b", "model": {"preset": "tiny"}}]})
    ae = build_autoencoder(exp.ae, 1).eval()  # eval: no dropout, so eager and compiled see the same network
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    noise = draw_noise(4, (exp.ae.model.latent_channels, 4, 4), (1, 16, 16), torch.Generator().manual_seed(1), "cpu")
    want = stage1_losses(ae, x, exp, noise)
    got = torch.compile(Stage1Objective(ae, exp))(x, noise)
    for k in ("prior", "decoder", "total"):
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-4)

    bc = exp.base_models[0]
    net = build_base_model(bc, exp.ae.model.latent_channels).eval()
    sched = base_schedule(exp, bc)
    c = exp.ae.model.latent_channels
    z, t, eps = torch.randn(4, c, 4, 4), torch.rand(4), torch.randn(4, c, 4, 4)
    lam = sched.logsnr(t)
    z_t = diffuse(z, lam, eps)
    want = base_loss(z, x_from_v(z_t, net(z_t, lam), lam), lam, sched.dlogsnr_dt(t), bc.loss.sigmoid_bias)
    torch.testing.assert_close(BaseObjective(net, sched, bc.loss.sigmoid_bias)(z, t, eps), want)


def _two_adamw_steps(clip, fused: bool, device: str = "cpu") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(parameters, gradient norms) after two AdamW steps on a large then a small gradient, each passed
    through `clip(optimizer, model)` before the step (Adam's first step alone hardly depends on the scale)."""
    torch.manual_seed(0)
    net = torch.nn.Linear(8, 4).to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1, fused=fused)
    norms = []
    for scale in (10.0, 0.1):
        net(scale * torch.randn(16, 8).to(device)).square().sum().backward()
        norms.append(clip(opt, net))
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in net.parameters()], norms


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("max_norm", [100.0, 0.0])
def test_clip_gradients_matches_clip_grad_norm(fused, max_norm, device):
    """clip_gradients + AdamW takes the steps of clip_grad_norm_ + AdamW, whether the factor goes into the
    fused kernel as its grad_scale or divides the gradients first; max_norm 0 clips nothing."""
    from ulsweep.train.common import clip_gradients

    want, want_norms = _two_adamw_steps(
        lambda opt, net: torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm or float("inf")), fused, device)
    got, got_norms = _two_adamw_steps(lambda opt, net: clip_gradients(opt, max_norm), fused, device)
    unclipped, _ = _two_adamw_steps(lambda opt, net: torch.nn.utils.get_total_norm(
        [p.grad for p in net.parameters()]), fused, device)
    torch.testing.assert_close(got_norms, want_norms)
    assert want_norms[0] > 1000.0 and 0.0 < want_norms[1] < 100.0  # at 100 the first step is clipped, not the 2nd
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    # the clipping matters to these two steps: with it the parameters end elsewhere than without
    assert (max_norm > 0) == any((a - u).abs().max() > 1e-3 for a, u in zip(want, unclipped))
