"""The compile gate (ulsweep/train/compile_gate.py) between real processes: the first process of a key runs its
first step alone, a waiter enters only after it (or after it died), later processes pass at once, a waiter gives
up after its limit; and the loop enters the gate on a compiled run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ulsweep.train import compile_gate as G

HOLDER = textwrap.dedent("""
    import sys, time
    from ulsweep.train.compile_gate import first_compile
    with first_compile(sys.argv[1], "holder", folder=sys.argv[2]) as how:
        print(how, flush=True)
        time.sleep(float(sys.argv[3]))
    print("released", time.time(), flush=True)
    """)


def hold(key: str, folder, seconds: float) -> subprocess.Popen:
    """A process that takes the gate of `key` and keeps it for `seconds`; returns once it holds it."""
    p = subprocess.Popen([sys.executable, "-c", HOLDER, key, str(folder), str(seconds)], stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "first"
    return p


def test_a_waiter_enters_after_the_first_process_and_later_ones_pass_at_once(tmp_path):
    p = hold("k1", tmp_path, 1.5)
    with G.first_compile("k1", "waiter", folder=str(tmp_path)) as how:
        entered = time.time()
    out = p.communicate()[0].split()
    assert how == "done" or how == "after", how
    assert entered >= float(out[-1]) - 0.05  # not before the holder released the gate
    t0 = time.monotonic()
    with G.first_compile("k1", "late", folder=str(tmp_path)) as how:
        assert how == "done" and time.monotonic() - t0 < 5
    with G.first_compile("k2", "other key", folder=str(tmp_path)) as how:  # another model is not held up
        assert how == "first"


def test_a_holder_that_dies_releases_the_gate_and_a_waiter_gives_up_after_its_limit(tmp_path):
    p = hold("k", tmp_path, 60)
    t0 = time.monotonic()
    with G.first_compile("k", "impatient", folder=str(tmp_path), wait_s=0.5) as how:
        assert how == "timeout" and time.monotonic() - t0 >= 0.5
    assert not (tmp_path / "ulsweep-compile-gate" / "k.done").exists()  # a timed-out waiter marks nothing done
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    with G.first_compile("k", "survivor", folder=str(tmp_path)) as how:
        assert how == "first"  # the dead holder never finished: this process compiles first, then marks it
    assert (tmp_path / "ulsweep-compile-gate" / "k.done").exists()


def test_the_key_follows_the_model_and_the_batch_not_the_values(tmp_path):
    import torch

    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 8)
    k = G.graph_key(a, (2, 4), "default", "cpu", None)
    assert k == G.graph_key(torch.nn.Linear(4, 4), (2, 4), "default", "cpu", None)  # other weights, same graph
    assert len({k, G.graph_key(b, (2, 4), "default", "cpu", None), G.graph_key(a, (3, 4), "default", "cpu", None),
                G.graph_key(a, (2, 4), "reduce-overhead", "cuda", torch.bfloat16)}) == 4


@pytest.mark.parametrize("setting", [True, "eager", False])
def test_a_compiled_run_goes_through_the_gate_unless_told_not_to(tmp_path, monkeypatch, digits_cache, setting):
    from test_train import tiny_exp  # the loop tests' tiny experiment

    from ulsweep.train import loop

    entered = []

    def spy(key, label, **kw):
        entered.append(key)
        return G.first_compile(key, label, folder=str(tmp_path), **kw)

    monkeypatch.setattr(loop, "first_compile", spy)
    # the gate follows train.compile; the compilation itself (~100 s cold on CPU) is not what is tested here
    monkeypatch.setattr(loop, "compile_module", lambda module, setting, rt, **kw: module)
    exp = tiny_exp(steps=2, compile=True, gate_compile=setting)
    from ulsweep.train.stage1 import train_autoencoder

    res = train_autoencoder(exp, str(tmp_path / "run"))
    assert len(entered) == (1 if setting else 0)
    assert res.extra["marks"].get("compile_gate") == ("first" if setting else None)


def _objective(lf: float, b: float):
    from ulsweep.config import experiment_from_dict
    from ulsweep.train.build import build_autoencoder
    from ulsweep.train.stage1 import AEObjective

    exp = experiment_from_dict({"ae": {"model": {"preset": "tiny", "downsample": 4, "latent_channels": 2},
                                       "loss": {"loss_factor": lf, "sigmoid_bias": b}}})
    import torch

    torch.manual_seed(0)
    return AEObjective(build_autoencoder(exp.ae, 1), exp.ae.loss, (1, 16, 16), (2, 4, 4))


def test_loss_factor_and_bias_are_tensors_so_trials_of_a_sweep_trace_one_graph(one_thread):
    """Dynamo traces two objectives that differ only in c_lf and b to the same graph (what makes a second trial's
    compile a cache hit), and in eager mode the tensors give bit for bit the losses of Python floats."""
    import torch

    from ulsweep.diffusion import decoder_loss

    codes = []

    def record(gm, inputs):
        codes.append(gm.code)
        return gm.forward

    x = torch.rand(4, 1, 16, 16) * 2 - 1
    outs = []
    for lf, b in ((1.3, 0.0), (4.0, -2.0)):
        torch._dynamo.reset()
        obj = _objective(lf, b)
        noise = obj.draw_noise(4, torch.Generator().manual_seed(1))
        outs.append(torch.compile(obj, backend=record)(x, noise)["total"])
        lam, dlam = obj.sx.logsnr(noise["t_x"]), obj.sx.dlogsnr_dt(noise["t_x"])
        x_hat = torch.randn_like(x)
        assert torch.equal(decoder_loss(x, x_hat, lam, dlam, obj.loss_factor, obj.sigmoid_bias),
                           decoder_loss(x, x_hat, lam, dlam, lf, b))
    assert len(codes) == 2 and codes[0] == codes[1]
    assert not torch.equal(outs[0], outs[1])  # the values still act


HOLD_UNTIL_TOLD = textwrap.dedent("""
    import sys
    from ulsweep.train.compile_gate import first_compile
    with first_compile(sys.argv[1], "holder", folder=sys.argv[2]) as how:
        print(how, flush=True)
        sys.stdin.readline()
    print("released", flush=True)
    """)


def test_a_process_that_will_not_wait_hears_busy_and_holds_nothing(tmp_path):
    p = subprocess.Popen([sys.executable, "-c", HOLD_UNTIL_TOLD, "k", str(tmp_path)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "first"
    with G.first_compile("k", "eager", folder=str(tmp_path), wait=False) as how:
        assert how == "busy"
    with G.first_compile("other", "eager", folder=str(tmp_path), wait=False) as how:
        assert how == "first"  # nobody holds that key: this process compiles it
    assert p.communicate("\n")[0].split() == ["released"]  # asking took the gate from nobody
    assert (tmp_path / "ulsweep-compile-gate" / "k.done").exists()  # the holder marked k done
    with G.first_compile("k", "eager", folder=str(tmp_path), wait=False) as how:
        assert how == "done"


def _stand_in_compile(monkeypatch, gate_dir) -> list:
    """The loop's compile replaced by a module that counts its calls (torch.compile takes ~100 s cold on CPU), its
    gate key fixed to "k" and its gate in `gate_dir`; returns the list the calls are counted in."""
    import torch

    from ulsweep.train import loop

    calls = []

    class Compiled(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            calls.append(1)
            return self.inner(*args)

    monkeypatch.setattr(loop, "compile_module", lambda module, setting, rt, **kw: Compiled(module))
    monkeypatch.setattr(loop, "graph_key", lambda *a, **kw: "k")
    monkeypatch.setattr(loop, "first_compile",
                        lambda key, label, **kw: G.first_compile(key, label, folder=str(gate_dir), **kw))
    return calls


def test_an_eager_trial_trains_uncompiled_while_another_compiles_then_switches(tmp_path, monkeypatch, digits_cache):
    """gate_compile: eager. The gate is held by another process until the trial has logged step 3: steps 1-3 run
    the uncompiled objective with cuDNN's algorithm search off, steps 4-6 the compiled module with it back on, and
    the run's weights equal those of a run that never waited (the stand-in compile changes no arithmetic)."""
    import torch
    from test_train import Recorder, tiny_exp

    from ulsweep.train.stage1 import train_autoencoder

    gate_dir = tmp_path / "gate"
    calls = _stand_in_compile(monkeypatch, gate_dir)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_UNTIL_TOLD, "k", str(gate_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "first"

    searched = []  # cuDNN's algorithm search at each step: off for the uncompiled ones only

    class ReleaseAfter3(Recorder):
        def log_metrics(self, step, metrics):
            super().log_metrics(step, metrics)
            if "loss" in metrics:  # a training step's line (the final evaluation logs too)
                searched.append(torch.backends.cudnn.benchmark)
            if step == 3:  # the other process finishes its compile
                holder.stdin.write("\n")
                holder.stdin.flush()
                assert holder.stdout.readline().strip() == "released"

    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)  # as make_runtime sets it on CUDA
    res = train_autoencoder(tiny_exp(steps=6, log_every=1, compile=True, gate_compile="eager"),
                            str(tmp_path / "eager"), ReleaseAfter3())
    holder.wait(timeout=60)
    marks = res.extra["marks"]
    assert marks["eager_steps"] == 3 and len(calls) == 3 and marks["compile_gate"] == "done"
    assert searched == [False] * 3 + [True] * 3 and torch.backends.cudnn.benchmark
    assert marks["t_first_step_end"] < marks["t_compiled_step_end"]
    # the first step's part before its step: the resume and torch.compile's wrapper
    assert 0 < marks["first_step_resume_s"] < marks["t_first_step_end"] - marks["t_setup_end"]
    calls.clear()
    plain = train_autoencoder(tiny_exp(steps=6, log_every=1, compile=True, gate_compile=False), str(tmp_path / "plain"))
    assert len(calls) == 6
    a = torch.load(f"{res.checkpoint}/state.pt", weights_only=False)["model"]
    b = torch.load(f"{plain.checkpoint}/state.pt", weights_only=False)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_an_eager_trial_compiles_anyway_once_the_gate_stays_held_past_its_limit(tmp_path, monkeypatch, digits_cache):
    """A holder that hangs (a starved precompile task, say) keeps the gate: after loop.EAGER_MAX_S of uncompiled
    steps the run compiles for itself ("timeout") instead of training uncompiled to its end."""
    from test_train import tiny_exp

    from ulsweep.train import loop
    from ulsweep.train.stage1 import train_autoencoder

    gate_dir = tmp_path / "gate"
    calls = _stand_in_compile(monkeypatch, gate_dir)
    monkeypatch.setattr(loop, "EAGER_MAX_S", 0.0)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_UNTIL_TOLD, "k", str(gate_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "first"
        res = train_autoencoder(tiny_exp(steps=4, log_every=1, compile=True, gate_compile="eager"),
                                str(tmp_path / "run"))
        marked = (gate_dir / "ulsweep-compile-gate" / "k.done").exists()
    finally:
        holder.stdin.write("\n")
        holder.stdin.flush()
        holder.wait(timeout=60)
    marks = res.extra["marks"]
    assert marks["eager_steps"] == 1 and marks["compile_gate"] == "timeout" and len(calls) == 3, marks
    assert not marked  # a compile that timed out marks nothing done: the holder's own does


def test_sampling_networks_are_compiled_once_asked_and_left_alone_while_another_process_compiles_them(
        tmp_path, monkeypatch, digits_cache):
    """eval.sample_compile: the decoder (AE evaluation) and the base model with the decoder (generations) are
    sampled through torch.compile, with the same metrics as uncompiled (a stand-in compile that records what it
    was given); while another process holds the same networks' gate, they are sampled uncompiled."""
    import torch
    from test_train import Recorder, tiny_exp

    from ulsweep.config import experiment_from_dict, to_dict
    from ulsweep.train import sampling
    from ulsweep.train.stage1 import train_autoencoder
    from ulsweep.train.stage2 import train_base

    compiled = []

    def fake_compile(module, **kw):
        compiled.append(type(module).__name__)
        return module

    monkeypatch.setattr(sampling.torch, "compile", fake_compile)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    d = to_dict(tiny_exp(steps=2))
    d["eval"] = {"extractor": "none", "sample_compile": True}
    exp = experiment_from_dict(d)
    ae = train_autoencoder(exp, str(tmp_path / "ae"), Recorder())
    assert compiled == ["DecoderUViT"]
    train_base(exp, exp.base_models[0], ae.checkpoint, str(tmp_path / "base"), Recorder())
    assert compiled == ["DecoderUViT", "BaseViT", "DecoderUViT"]
    d["eval"]["sample_compile"] = False
    plain = train_autoencoder(experiment_from_dict(d), str(tmp_path / "plain"), Recorder())
    assert plain.metrics["psnr"] == ae.metrics["psnr"] and plain.metrics["bpp"] == ae.metrics["bpp"]
    # on another node's caches (the first compile done here counts no more), another process compiles the
    # same decoder: this one samples it as it is
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "other-node"))
    key = G.graph_key(torch.nn.ModuleList([_decoder_of(ae.checkpoint)]), (), "sampling-default", "cpu", None)
    holder = subprocess.Popen([sys.executable, "-c", HOLD_UNTIL_TOLD, key, str(tmp_path / "other-node")],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "first"
    compiled.clear()
    d["eval"]["sample_compile"] = True
    again = train_autoencoder(experiment_from_dict(d), str(tmp_path / "again"), Recorder())
    assert compiled == [] and again.metrics["psnr"] == ae.metrics["psnr"]
    holder.communicate("\n", timeout=60)


def _decoder_of(checkpoint: str):
    from ulsweep.train.stage2 import load_frozen_autoencoder

    return load_frozen_autoencoder(checkpoint, __import__("torch").device("cpu"))[0].decoder


NODE = textwrap.dedent("""
    import sys, torch
    from torch._dynamo.utils import counters
    from ulsweep.train.compile_gate import first_compile
    net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
    step = torch.compile(net, dynamic=False)
    with first_compile("k-artifacts", "node") as how, torch.no_grad():  # a forward graph: quicker to compile
        step(torch.randn(4, 16))
    print(how, counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"], flush=True)
    """)


def test_the_first_compile_of_a_node_is_saved_and_the_next_node_compiles_from_it(tmp_path):
    """Two nodes (their own Inductor caches) and one ulsweep cache: the first node's first process of a key,
    with no saved file yet, misses and compiles, and saves what it compiled (compile_artifacts.save); the next
    node's first process loads it before compiling and hits every graph."""
    from ulsweep.train import compile_artifacts

    def node(name: str, cache: str) -> list[str]:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / name), "ULSWEEP_CACHE": cache}
        out = subprocess.run([sys.executable, "-c", NODE], env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stdout.split()

    shared = str(tmp_path / "shared")
    first = node("node-a", shared)
    assert first[0] == "first" and int(first[1]) == 0 and int(first[2]) > 0  # compiled: nothing to hit
    env = {**os.environ, "ULSWEEP_CACHE": shared}
    saved = subprocess.run([sys.executable, "-c", "from ulsweep.train.compile_artifacts import path; "
                            "print(path('k-artifacts'))"], env=env, capture_output=True, text=True).stdout.strip()
    assert saved.startswith(shared) and os.path.getsize(saved) > 0
    second = node("node-b", shared)  # another node: its own empty Inductor cache, the shared ulsweep cache
    assert second[0] == "first" and int(second[1]) > 0 and int(second[2]) == 0, second
    assert compile_artifacts.FOLDER in saved


def test_a_saved_compile_that_does_not_load_is_named_and_left_alone(tmp_path, monkeypatch, capsys):
    from ulsweep.train import compile_artifacts

    monkeypatch.setenv("ULSWEEP_CACHE", str(tmp_path))
    p = compile_artifacts.path("k-bad")
    os.makedirs(os.path.dirname(p))
    with open(p, "wb") as f:
        f.write(b"not a cache")
    assert compile_artifacts.load("k-bad", "t") == 0
    err = capsys.readouterr().err
    assert p in err and "did not load" in err and os.path.exists(p)
    assert compile_artifacts.load("k-none", "t") == 0 and compile_artifacts.save("k-none", "t") >= 0


def test_a_compile_cache_that_cannot_be_written_costs_a_warning_not_the_run(tmp_path, monkeypatch, capsys):
    import errno

    import torch

    from ulsweep.train import compile_artifacts

    monkeypatch.setenv("ULSWEEP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"artifacts", None))
    assert compile_artifacts.save("k", "t") == len(b"artifacts")
    folder = os.path.dirname(compile_artifacts.path("k"))

    def full(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"newer artifacts", None))
    monkeypatch.setattr(compile_artifacts.os, "replace", full)
    assert compile_artifacts.save("k", "t") == 0  # no retry, no exception
    assert "compile cache not saved" in capsys.readouterr().err
    assert os.listdir(folder) == ["k.bin"]  # its temporary file removed
    with open(compile_artifacts.path("k"), "rb") as f:
        assert f.read() == b"artifacts"  # the old file is left whole


CLAIM_UNTIL_TOLD = textwrap.dedent("""
    import sys
    from ulsweep.train.compile_gate import claim_ahead
    with claim_ahead(sys.argv[1], folder=sys.argv[2]):
        print("claimed", flush=True)
        sys.stdin.readline()
    print("released", flush=True)
    """)


def claimant(name: str, folder) -> subprocess.Popen:
    """A process (a precompile task, say) that claims `name`'s first compile until told; returns once it has."""
    p = subprocess.Popen([sys.executable, "-c", CLAIM_UNTIL_TOLD, name, str(folder)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "claimed"
    return p


def test_a_claimed_step_is_busy_to_a_process_that_will_not_wait_until_its_claimant_lets_go(tmp_path):
    p = claimant("step", tmp_path)
    assert G.claimed_ahead("step", str(tmp_path)) and not G.claimed_ahead("other", str(tmp_path))
    with G.first_compile("k", "eager", folder=str(tmp_path), wait=False, claim="step") as how:
        assert how == "busy"  # the gate is free, but the claimant will compile it
    assert not (tmp_path / "ulsweep-compile-gate" / "k.done").exists()  # nothing taken, nothing marked
    with G.first_compile("k", "eager", folder=str(tmp_path), wait=False, claim="other") as how:
        assert how == "first"  # another step's claim holds nothing up
    assert p.communicate("\n")[0].split() == ["released"]
    assert not os.path.exists(G.claim_path("step", str(tmp_path)))  # the claimant removed its claim
    with G.first_compile("k2", "eager", folder=str(tmp_path), wait=False, claim="step") as how:
        assert how == "first"


def test_a_claim_whose_process_died_or_that_is_this_processs_own_holds_nothing_up(tmp_path):
    p = claimant("step", tmp_path)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert os.path.exists(G.claim_path("step", str(tmp_path))) and not G.claimed_ahead("step", str(tmp_path))
    with G.claim_ahead("mine", str(tmp_path)) as path:
        assert open(path).read().split() == [str(os.getpid())]
        assert not G.claimed_ahead("mine", str(tmp_path))  # its own claim does not keep a task from its compile
        with G.first_compile("k", "task", folder=str(tmp_path), wait=False, claim="mine") as how:
            assert how == "first"
    assert not os.path.exists(path)
    (tmp_path / "file").write_text("")  # a gate folder that cannot be made: no claim, and the task goes on
    with G.claim_ahead("step", str(tmp_path / "file")) as path:
        assert path is None


def test_an_eager_trial_trains_uncompiled_while_its_step_is_claimed_and_compiles_it_once_the_claim_goes(
        tmp_path, monkeypatch, digits_cache, capsys):
    """The trial reaches the free gate before the task that claimed its step (hooks.compile_claim): steps 1-3
    uncompiled; then the claimant lets go without compiling (a task that failed), and the trial compiles first,
    marking that first compiled step's seconds (the switch) and saying them in a line."""
    from test_train import Recorder, tiny_exp

    from ulsweep.train.stage1 import train_autoencoder

    gate_dir = tmp_path / "gate"
    calls = _stand_in_compile(monkeypatch, gate_dir)  # the gate, and the claims, in gate_dir
    task = claimant("step", gate_dir)

    class LetGoAfter3(Recorder):
        compile_claim = "step"

        def log_metrics(self, step, metrics):
            super().log_metrics(step, metrics)
            if step == 3:
                task.stdin.write("\n")
                task.stdin.flush()
                assert task.stdout.readline().strip() == "released"

    res = train_autoencoder(tiny_exp(steps=6, log_every=1, compile=True, gate_compile="eager"),
                            str(tmp_path / "run"), LetGoAfter3())
    task.wait(timeout=60)
    marks = res.extra["marks"]
    assert marks["eager_steps"] == 3 and marks["compile_gate"] == "first" and len(calls) == 3, marks
    assert (gate_dir / "ulsweep-compile-gate" / "k.done").exists()
    assert 0 < marks["train_compile_switch_s"] < marks["t_train_end"] - marks["t_first_step_end"]
    assert "first compiled step, after 3 uncompiled ones:" in capsys.readouterr().err
