"""Stage-1 / stage-2 loops on CPU: short runs, checkpoints, exact resume, corrupted checkpoints."""
import os

import pytest
import torch

from ulsweep.config import experiment_from_dict, to_dict
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
        "eval": {"extractor": "none"} if extractor == "none" else {"extractor": extractor, "gfd_samples": 16,
                                                                 "extractor_epochs": 1},
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
    assert train_base(exp, exp.base_models[0], res.checkpoint, str(tmp_path / "base")).metrics == b.metrics
    # ... unless it was evaluated otherwise: gFD of 24 samples is not the stored one of 16 (both stages refuse)
    other = experiment_from_dict(to_dict(exp), {"eval.gfd_samples": 24})
    with pytest.raises(CheckpointError, match="fresh run directory"):
        train_base(other, other.base_models[0], res.checkpoint, str(tmp_path / "base"))
    with pytest.raises(CheckpointError, match="fresh run directory"):
        train_autoencoder(other, str(tmp_path / "ae"))


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


def test_a_checkpoint_written_beside_training_holds_the_state_of_its_step(tmp_path, digits_cache):
    """The full run's step-3 checkpoint is written in the writer's thread while steps 4-6 update the weights in
    place; it must equal the stopped run's step-3 checkpoint, written before its loop returned. Both are
    announced in order, each once."""
    exp = tiny_exp(steps=6, ckpt_every=3)
    full, stopped = Recorder(), Recorder(stop_at=3)
    train_autoencoder(exp, str(tmp_path / "full"), full)
    train_autoencoder(exp, str(tmp_path / "stopped"), stopped)
    assert [s for s, _ in full.ckpts] == [3, 6], full.ckpts
    assert [s for s, _ in stopped.ckpts] == [3], stopped.ckpts
    a, meta = load_checkpoint(full.ckpts[0][1])
    b, _ = load_checkpoint(stopped.ckpts[0][1])
    assert meta["step"] == 3
    for part in ("model", "ema"):
        for k in a[part]:
            torch.testing.assert_close(a[part][k], b[part][k], rtol=0, atol=0)
    for i, st in a["optimizer"]["state"].items():
        for k, v in st.items():
            torch.testing.assert_close(v, b["optimizer"]["state"][i][k], rtol=0, atol=0)


def hold_checkpoint_writes(monkeypatch):
    """`save_checkpoint` held until the returned event is set: a write beside training that has not happened yet."""
    import threading

    from ulsweep.train import checkpoint as ck

    release, real = threading.Event(), ck.save_checkpoint

    def held(*a):
        assert release.wait(30)
        return real(*a)

    monkeypatch.setattr(ck, "save_checkpoint", held)
    return release


def test_the_checkpoint_writer_copies_before_it_returns(tmp_path, monkeypatch):
    """What `save` was given, not what the tensors hold later: the write is held until the tensor has changed."""
    from ulsweep.train import checkpoint as ck

    release = hold_checkpoint_writes(monkeypatch)
    w, seen = ck.CheckpointWriter(), []
    x = torch.zeros(4)
    groups = [{"lr": 1.0}]
    w.save(str(tmp_path), 7, {"x": x, "groups": groups}, {"kind": "t"}, seen.append)
    x.add_(1.0)
    groups[0]["lr"] = 2.0
    w.poll()
    assert seen == []  # not written yet: nothing announced
    release.set()
    w.wait()
    state, meta = load_checkpoint(seen[0])
    assert seen == [ck.step_dir(str(tmp_path), 7)] and meta["step"] == 7
    assert state["x"].tolist() == [0.0] * 4 and state["groups"] == [{"lr": 1.0}]
    w.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a snapshot on the GPU needs one")
@pytest.mark.parametrize("share", [0.5, 0.0])
def test_a_gpu_snapshot_is_the_state_when_taken(tmp_path, monkeypatch, share):
    """On the GPU where it fits (share 0.5: clones, copied to host memory in the writer's thread), in host memory
    where it does not (share 0): either way the checkpoint holds the values `save` was given, though the training
    thread overwrites them at once on its stream. The state holds CPU tensors too, as a run's does (generator
    states)."""
    from ulsweep.train import checkpoint as ck

    monkeypatch.setattr(ck, "DEVICE_SNAPSHOT_SHARE", share)
    x = torch.arange(1 << 22, dtype=torch.float32, device="cuda")
    expected, rng = x.cpu(), torch.get_rng_state()
    copy, event = ck.snapshot({"x": x, "n": 3, "rng": rng})
    assert (event is not None) == (share > 0) and copy["x"].device.type == ("cuda" if share else "cpu")
    release = hold_checkpoint_writes(monkeypatch)
    w, seen = ck.CheckpointWriter(), []
    w.save(str(tmp_path), 5, {"x": x, "n": 3, "rng": rng}, {"kind": "t"}, seen.append)
    for _ in range(20):
        x.mul_(1.0001).add_(1.0)
    release.set()
    w.wait()
    state, _ = load_checkpoint(seen[0])
    assert state["n"] == 3 and torch.equal(state["x"], expected) and torch.equal(state["rng"], rng)
    assert torch.equal(ck.host_copy(copy, event)["x"], expected)
    w.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a pinned buffer needs a GPU")
def test_device_to_host_copies_every_kind_of_tensor_through_its_buffer(monkeypatch):
    """In pieces of a small buffer: values, dtype and shape as on the GPU for a non-contiguous float, bf16,
    bool, 0-d and empty tensor, each a host tensor of its own."""
    from ulsweep.train import checkpoint as ck

    monkeypatch.setattr(ck, "STAGING_BYTES", 1000)  # so that one tensor goes in many pieces
    monkeypatch.setattr(ck._staging, "buffer", None, raising=False)
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(64, 48, device="cuda", generator=g)
    tensors = [x.t(), x.bfloat16(), x > 0, x.sum(), x[:0]]
    copies = [ck.device_to_host(t) for t in tensors]
    buffer = ck._staging.buffer
    assert buffer.is_pinned() and buffer.numel() == 1000
    for t, h in zip(tensors, copies):  # compared after all were copied: one left in the buffer would be overwritten
        assert h.device.type == "cpu" and h.dtype == t.dtype and h.shape == t.shape
        assert torch.equal(h, t.cpu())
        if h.numel():  # an empty tensor has no storage to share
            assert h.untyped_storage().data_ptr() != buffer.untyped_storage().data_ptr()


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


def test_resume_with_other_resources_tracking_or_search_continues_the_run(tmp_path, digits_cache):
    """What a sweep may change on resume (resources, tracking, the search, the base models) is not the trained
    autoencoder's config: its checkpoint is taken up, not refused."""
    run = str(tmp_path / "run")
    first = train_autoencoder(tiny_exp(steps=2), run, Recorder())
    os.remove(os.path.join(run, "result.json"))
    d = to_dict(tiny_exp(steps=2))
    d["resources"].update(num_workers=0, gpus_per_worker=0.5, mps="auto")
    d["tracking"]["system_metrics_s"] = 0
    d["search"]["max_concurrent"] = 7
    d["base_models"] = []
    again = train_autoencoder(experiment_from_dict(d), run, Recorder())
    assert again.steps == 2 and again.checkpoint == first.checkpoint  # restored at step 2, nothing trained


def test_the_final_evaluation_times_its_parts_as_timings_not_as_metrics(tmp_path, digits_cache):
    """Where a final evaluation's time goes (extractor, bits/pixel, sampling, FLOPs; fd with an extractor) is in
    the run's marks, within the evaluation phase, and in none of the logged or returned metrics."""
    exp = tiny_exp(steps=2)
    rec = Recorder()
    ae = train_autoencoder(exp, str(tmp_path / "ae"), rec)
    base = train_base(exp, exp.base_models[0], ae.checkpoint, str(tmp_path / "base"), Recorder())
    for res in (ae, base):
        marks = res.extra["marks"]
        parts = {k: v for k, v in marks.items() if k.startswith("evaluate_")}
        assert set(parts) == {"evaluate_extractor_s", "evaluate_bpp_s", "evaluate_sampling_s", "evaluate_flops_s"}
        assert all(v >= 0 for v in parts.values())
        assert sum(parts.values()) <= marks["t_eval_end"] - marks["t_train_end"]
        assert not any("seconds" in k for k in res.metrics)
    assert not any("seconds" in k for _, m in rec.logs for k in m)


def test_nonfinite_loss_stops_with_clear_error(tmp_path, digits_cache, monkeypatch):
    from ulsweep.train.hooks import TrainingDiverged
    from ulsweep.train.stage1 import AEObjective

    exp = tiny_exp(steps=4, ckpt_every=2, log_every=1)
    real = AEObjective.forward
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        out = real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] >= 3:
            out["total"] = out["total"] * float("nan")
        return out

    monkeypatch.setattr(AEObjective, "forward", poisoned)
    with pytest.raises(TrainingDiverged, match="non-finite loss by step 3.*step_00000002"):
        train_autoencoder(exp, str(tmp_path / "run"), Recorder())
    assert [c.step for c in list_checkpoints(str(tmp_path / "run"))] == [2]  # nothing newer written


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
    from ulsweep.train.state import ema_exponent

    g = ema_exponent(std)
    assert abs(((g + 1) / ((g + 2) ** 2 * (g + 3))) ** 0.5 - std) < 1e-9
    if std == 0.1:
        assert abs(g - 6.94) < 0.01  # EDM2's value for sigma_rel = 0.10


def test_power_ema_averages_and_std0_tracks():
    from torch import nn

    from ulsweep.train.state import EMA, ema_exponent

    m = nn.Linear(1, 1, bias=False)
    ema, track = EMA(m, 0.1), EMA(m, 0.0)
    for step in range(1, 101):
        with torch.no_grad():
            m.weight.fill_(float(step))
        ema.update(m, step)
        track.update(m, step)
    assert track.shadow.weight.item() == 100.0
    # beta_t = (1 - 1/t)^(gamma + 1), beta_1 = 0: the products of the betas telescope to (i/T)^(gamma + 1), so the
    # average of the ramp w_i = i after T steps is T - sum_{i<T} (i/T)^(gamma + 1) (summation by parts): 89.3042
    g, T = ema_exponent(0.1), 100
    exact = T - sum((i / T) ** (g + 1) for i in range(1, T))
    assert ema.shadow.weight.item() == pytest.approx(exact, rel=1e-6)
    # close to the continuous power-function profile ~t^gamma, whose average of a ramp is (g+1)/(g+2) T
    assert abs(exact - (g + 1) / (g + 2) * T) < 0.6


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


_ONE_THREAD_TRIALS = """
import json, sys, torch
from torch._dynamo.utils import counters
from ulsweep.config import experiment_from_dict, to_dict
from ulsweep.sweep import trial_thread
from ulsweep.train import runtime
from ulsweep.train.stage1 import train_autoencoder
modes, graphs = [], []
real = runtime.compile_mode
runtime.compile_mode = lambda setting, rt: modes.append(real(setting, rt)) or modes[-1]
out = []
for i, lf in enumerate((1.5, 4.0, 2.0)):
    exp = experiment_from_dict({"data": {"path": "builtin:digits"}, "ae": {"loss": {"loss_factor": lf}, "train": {
        "steps": 3, "batch_size": 8, "log_every": 1, "eval_images": 16, "sample_steps": 2,
        "compile": "reduce-overhead"}}, "eval": {"extractor": "none"}})
    res = trial_thread.run(train_autoencoder, exp, sys.argv[1] + f"/run{i}")
    out.append(res.metrics["bpp"])
    graphs.append(counters["stats"].get("unique_graphs", 0))
print(json.dumps({"modes": modes, "bpp": out, "skips": counters["inductor"].get("cudagraph_skips", 0),
                  "graphs": graphs}))
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graph_trials_of_a_reused_process_all_capture_in_its_one_trial_thread(tmp_path, digits_cache):
    """Three stage-1 runs with train.compile=reduce-overhead, one after another in a fresh process's trial thread
    (ulsweep/sweep/trial_thread.py), as a reused trial process runs them: every one compiles in CUDA-graph
    mode and none skips CUDA graphs; the later two find Dynamo's graphs of the first (benchmarks/warm_process.py
    measures what that saves)."""
    import json
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", _ONE_THREAD_TRIALS, str(tmp_path)], capture_output=True, text=True,
                       timeout=1200)
    assert p.returncode == 0, p.stderr[-4000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    assert got["modes"] == ["reduce-overhead"] * 3, got
    assert got["skips"] == 0 and len(got["bpp"]) == 3 and all(b >= 0 for b in got["bpp"]), got
    assert got["graphs"][0] > 0 and len(set(got["graphs"])) == 1, got  # the later runs compiled no new graph


def test_compiled_objectives_match_eager_losses():
    """The stage-1 objective compiled gives its eager losses; the base objective gives the base loss of §3.3."""
    from ulsweep.diffusion import base_loss, diffuse, x_from_v
    from ulsweep.train.build import base_schedule, build_autoencoder, build_base_model
    from ulsweep.train.stage1 import AEObjective
    from ulsweep.train.stage2 import BaseObjective

    torch.manual_seed(0)
    exp = experiment_from_dict({"data": {"image_size": 16}, "ae": {"model": {"preset": "tiny"}},
                                "base_models": [{"name": "b", "model": {"preset": "tiny"}}]})
    ae = build_autoencoder(exp.ae, 1).eval()  # eval: no dropout, so eager and compiled see the same network
    x = torch.rand(4, 1, 16, 16) * 2 - 1
    objective = AEObjective(ae, exp.ae.loss, (1, 16, 16), (exp.ae.model.latent_channels, 4, 4))
    noise = objective.draw_noise(4, torch.Generator().manual_seed(1))
    want = objective(x, noise)
    got = torch.compile(objective)(x, noise)
    for k in ("prior", "decoder", "total"):
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-4)

    bc = exp.base_models[0]
    net = build_base_model(bc, exp.ae.model.latent_channels).eval()
    sched = base_schedule(exp.ae.loss, bc)
    c = exp.ae.model.latent_channels
    z, t, eps = torch.randn(4, c, 4, 4), torch.rand(4), torch.randn(4, c, 4, 4)
    lam = sched.logsnr(t)
    z_t = diffuse(z, lam, eps)
    want = base_loss(z, x_from_v(z_t, net(z_t, lam), lam), lam, sched.dlogsnr_dt(t), bc.loss.sigmoid_bias)
    objective = BaseObjective(net, sched, bc.loss.sigmoid_bias, (c, 4, 4))  # eager: one compile per test
    torch.testing.assert_close(objective(z, {"t": t, "eps": eps})["total"], want)


@pytest.mark.parametrize("setting", [True, False])
def test_cudnn_benchmark_setting_reaches_cudnn(setting):
    # the CUDA branch of make_runtime on a GPU-less box: only device selection is faked, the flag is torch's own
    from fakecuda import fake_cuda_device  # tests/fakecuda.py

    from ulsweep.train.runtime import make_runtime

    with fake_cuda_device():
        torch.backends.cudnn.benchmark = not setting
        train = experiment_from_dict({"ae": {"train": {"device": "cuda", "cudnn_benchmark": setting}}}).ae.train
        assert make_runtime(train).device == torch.device("cuda", 0)
        assert torch.backends.cudnn.benchmark is setting
