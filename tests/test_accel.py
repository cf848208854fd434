"""Speed-ups on torch internals (ulsweep/train/accel.py) and the compile settings around them: one-pass short
rows in Inductor, CUDA-graph state in new threads, CUDA graphs kept to one thread, DDP's graph splitting,
clipping folded into fused AdamW; and for each, that a torch without the private API it needs trains on the
plain path after one warning."""
from __future__ import annotations

import pickle
import threading
import warnings

import pytest
import torch

from ulsweep.train import accel, runtime
from ulsweep.train.runtime import Runtime, compile_mode, compile_module

CPU1 = Runtime(torch.device("cpu"), None, 0, 1)
CPU2 = Runtime(torch.device("cpu"), None, 0, 2)  # compile_module's DDP branch; the module itself stays plain
CUDA1 = Runtime(torch.device("cuda", 0), torch.bfloat16, 0, 1)  # compile_mode only looks at the device type


@pytest.fixture
def fresh_accel(monkeypatch):
    """Probes run again and fallbacks warn again; Inductor's heuristics, Dynamo's optimize_ddp and the
    CUDA-graph owner as they were afterwards."""
    from torch._inductor import config
    from torch._inductor.virtualized import V

    probes = (accel.choices_problem, accel.cuda_graph_state_problem, accel.grad_scale_problem,
              accel.optimize_ddp_problem)
    saved = getattr(config, "inductor_choices_class", None), V.choices, torch._dynamo.config.optimize_ddp
    set_handler = V.set_choices_handler  # a test may patch it away
    for probe in probes:
        probe.cache_clear()
    monkeypatch.setattr(accel, "_fallbacks", {})
    monkeypatch.setattr(runtime, "_cuda_graph_owner", None)
    yield
    for probe in probes:  # a probe that saw a patched-away API must not answer for the next test
        probe.cache_clear()
    if hasattr(config, "inductor_choices_class"):
        config.inductor_choices_class = saved[0]
    set_handler(saved[1])
    torch._dynamo.config.optimize_ddp = saved[2]


def _fallback_warnings(record) -> list[str]:
    return [str(w.message) for w in record if issubclass(w.category, accel.AccelFallbackWarning)]


def _train(model: torch.nn.Module, params: list[torch.Tensor], steps: int = 3) -> None:
    """A few AdamW steps of `model` (maybe compiled) on a fixed batch; the parameters must stay finite and
    move."""
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=0.1)
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        model(x).square().mean().backward()
        accel.clip_gradients(opt, 1.0)
        opt.step()
        opt.zero_grad()
    assert all(torch.isfinite(p).all() for p in params)
    assert all((p.detach() - b).abs().max() > 1e-3 for p, b in zip(params, before))


def _record_compile_modes(monkeypatch) -> list[str | None]:
    """torch.compile as it is, with the modes compile_module asks for recorded."""
    modes, compile_ = [], torch.compile

    def recording(module, mode=None, **kw):
        modes.append(mode)
        return compile_(module, mode=mode, **kw)

    monkeypatch.setattr(torch, "compile", recording)
    return modes


# --- Inductor's reduction heuristic -------------------------------------------------------------------------

def test_one_pass_for_short_rows_unless_inductor_forbids_it():
    assert accel.one_pass(True, False, True, False)  # short row, Inductor said no: one pass
    assert accel.one_pass(False, True, True, False)  # Inductor's own yes stands
    assert not accel.one_pass(False, False, True, False)  # long row: Inductor's no stands
    assert not accel.one_pass(True, False, False, False)  # triton.persistent_reductions off
    assert not accel.one_pass(True, False, True, True)  # cooperative: a row spans several blocks


def test_install_sets_and_removes_the_handler(fresh_accel):
    from torch._inductor import config
    from torch._inductor.choices import InductorChoices
    from torch._inductor.virtualized import V

    assert accel.choices_problem() is None  # this torch has what the heuristic needs
    assert accel.install_choices(256)
    assert isinstance(V.choices, accel.choices_class(256)) and V.choices.max_row == 256
    if hasattr(config, "inductor_choices_class"):
        assert config.inductor_choices_class is accel.choices_class(256)
    # Inductor pickles its config (which holds the class on newer torch) for its cache key
    assert pickle.loads(pickle.dumps(accel.choices_class(256))) is accel.choices_class(256)
    assert pickle.loads(pickle.dumps(accel.choices_class())) is accel.choices_class(128)
    assert accel.choices_class(128)().uuid() != accel.choices_class(256)().uuid()
    assert not accel.install_choices(0)
    assert type(V.choices) is InductorChoices
    assert getattr(config, "inductor_choices_class", None) is None
    assert accel.fallbacks() == {}


def test_compile_module_compiles_static_shapes(monkeypatch, fresh_accel):
    """A run's step never changes shape: compile_module asks for static shapes, so a reused trial process that
    meets a second architecture compiles it as a fresh process would. Without dynamic=False, torch.compile's
    automatic dynamic shapes made the second latent shape symbolic (two create_symbol for the latent channels
    of the noise, CPU, session 20)."""
    asked = []

    def recording(module, **kw):
        asked.append(kw)
        return module

    monkeypatch.setattr(torch, "compile", recording)
    compile_module(torch.nn.Linear(4, 4), True, CPU1)
    compile_module(torch.nn.Linear(4, 4), "reduce-overhead", CPU1)
    assert [kw.get("dynamic") for kw in asked] == [False, False]


def test_compile_module_installs_the_rows_it_is_given(fresh_accel):
    from torch._inductor.virtualized import V

    net = torch.nn.Linear(2, 2)
    compile_module(net, True, CPU1)
    assert V.choices.max_row == accel.ONE_PASS_MAX_ROW == 128  # the library's default
    compile_module(net, True, CPU1, one_pass_max_row=64)
    assert V.choices.max_row == 64
    compile_module(net, True, CPU1, one_pass_max_row=0)
    assert not hasattr(V.choices, "max_row")  # Inductor's own
    compile_module(net, False, CPU1, one_pass_max_row=32)
    assert not hasattr(V.choices, "max_row")  # nothing compiled, nothing installed


@pytest.mark.parametrize("break_it", ["no method", "other signature", "no handler setter"])
def test_without_inductors_choices_api_a_compiled_module_trains_on_inductors_heuristics(
        fresh_accel, monkeypatch, break_it):
    from torch._inductor import config
    from torch._inductor.choices import InductorChoices
    from torch._inductor.virtualized import V, _V

    if break_it == "no method":
        monkeypatch.delattr(InductorChoices, "should_use_persistent_reduction")
    elif break_it == "other signature":
        monkeypatch.setattr(InductorChoices, "should_use_persistent_reduction",
                            staticmethod(lambda features, cooperative_reduction, hint: False))
    else:
        monkeypatch.delattr(_V, "set_choices_handler")
    before = V.choices
    net = torch.nn.Linear(8, 4)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        compiled = compile_module(net, True, CPU1)
        compile_module(torch.nn.Linear(8, 4), True, CPU1)  # a second compile: no second warning
        _train(compiled, list(net.parameters()))
    got = _fallback_warnings(record)
    assert len(got) == 1 and "Inductor's own reduction heuristics" in got[0], got
    assert accel.ONE_PASS in accel.fallbacks()
    assert V.choices is before and not isinstance(V.choices, accel.choices_class())
    assert getattr(config, "inductor_choices_class", None) is not accel.choices_class()


def test_heuristic_that_meets_unfamiliar_kernel_features_gives_inductors_answer(fresh_accel, monkeypatch):
    """At compile time: kernel features without `reduction_numel` (or no size variables) -> Inductor's own
    decision, one warning."""
    from torch._inductor.choices import InductorChoices

    monkeypatch.setattr(InductorChoices, "should_use_persistent_reduction",
                        staticmethod(lambda features, cooperative_reduction: False))
    ours = accel.choices_class(128)()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert ours.should_use_persistent_reduction(object(), False) is False
        assert ours.should_use_persistent_reduction(object(), False) is False
    assert len(_fallback_warnings(record)) == 1


def _qk_norm_forward_kernels(max_row: int) -> list[str]:
    """Names of the generated Triton kernels that normalize q and k in a compiled attention layer's training
    step (the backward's kernels and the weight-gradient sums over all tokens are left out). 32,768 rows:
    Inductor's own rule looks at the memory layout only for fewer rows."""
    import re

    from torch._inductor.utils import run_and_get_code

    from ulsweep.models.layers import Attention

    accel.install_choices(max_row)
    torch._dynamo.reset()
    attn = torch.compile(Attention(512, 4).cuda())  # heads of 128 channels
    x = torch.randn(8, 1024, 512, device="cuda", requires_grad=True)

    def step():
        with torch.autocast("cuda", torch.bfloat16):
            attn(x).float().square().mean().backward()

    with torch._inductor.config.patch(fx_graph_cache=False):
        _, code = run_and_get_code(step)
    names = re.findall(r"def (triton_\w+)\(", "\n".join(code))
    return [k for k in names if "rms_norm" in k and "unbind" in k and "backward" not in k and "sum" not in k]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Inductor's Triton kernels need CUDA")
def test_qk_norm_of_128_channel_heads_is_one_pass_on_the_gpu(fresh_accel):
    """The QK-RMSNorm of 128-channel heads compiles to a one-pass kernel with ulsweep's heuristic and to a
    two-pass kernel with Inductor's own rule, read from the generated code."""
    ours, inductors = _qk_norm_forward_kernels(128), _qk_norm_forward_kernels(0)
    assert ours and all(k.startswith("triton_per_") for k in ours), ours
    assert inductors and all(k.startswith("triton_red_") for k in inductors), inductors  # what it replaces


# --- CUDA-graph state and the thread that may use CUDA graphs ------------------------------------------------

def _in_new_thread(fn, name: str = "trial"):
    out = []
    t = threading.Thread(target=lambda: out.append(fn()), name=name)
    t.start()
    t.join()
    return out[0] if out else None


def test_cuda_graph_state_is_set_up_in_a_new_thread(fresh_accel):
    """Tune runs a reused actor's next trial in a new thread; CUDA-graph trees must find their state there
    (and autograd's backward threads through the TLS stash)."""
    from torch._inductor import cudagraph_trees as cgt

    def trial_thread():
        before = hasattr(cgt.local, "tree_manager_containers") or torch._C._is_key_in_tls("tree_manager_containers")
        ok = accel.cuda_graph_state_for_this_thread()
        return (before, ok, cgt.local.tree_manager_containers, torch._C._get_obj_in_tls("tree_manager_containers"),
                cgt.get_obj(cgt.local, "tree_manager_locks")[0])

    before, ok, local, stashed, lock = _in_new_thread(trial_thread)
    assert before is False and ok  # a new thread starts without it
    assert stashed is local and isinstance(local, dict)
    assert hasattr(lock, "acquire")
    assert accel.fallbacks() == {}


def test_cuda_graphs_stay_in_the_first_thread_that_asks(fresh_accel, capsys):
    """compile_mode: reduce-overhead only on one CUDA process per model, and only in the first thread of the
    process that asks for it; any other thread gets the default mode and a note saying why."""
    assert compile_mode(False, CUDA1) is None and compile_mode(True, CUDA1) == "default"
    assert compile_mode("reduce-overhead", CPU1) == "default"
    assert compile_mode("reduce-overhead", Runtime(torch.device("cuda", 0), None, 0, 2)) == "default"  # DDP
    assert runtime._cuda_graph_owner is None  # none of these claimed CUDA graphs
    assert compile_mode("reduce-overhead", CUDA1) == "reduce-overhead"
    assert _in_new_thread(lambda: compile_mode("reduce-overhead", CUDA1), "trial-2") == "default"
    assert "thread 'trial-2'" in capsys.readouterr().err
    assert compile_mode("reduce-overhead", CUDA1) == "reduce-overhead"  # the owner keeps them
    assert compile_mode("max-autotune-no-cudagraphs", CUDA1) == "max-autotune-no-cudagraphs"


@pytest.mark.parametrize("break_it", ["no stash", "no thread-local", "stash loses the state"])
def test_without_the_tls_api_a_new_thread_trains_without_cuda_graphs(fresh_accel, monkeypatch, break_it):
    """A trial thread that would need CUDA-graph state this torch cannot set up compiles in the default mode
    (one warning for the process) and trains; the thread that imported cudagraph_trees keeps CUDA graphs.
    The API is patched away while the module is compiled (autograd's backward uses the TLS stash too)."""
    from torch._inductor import cudagraph_trees as cgt

    modes = _record_compile_modes(monkeypatch)
    net = torch.nn.Linear(8, 4)

    def trial():  # on CPU tensors: the runtime says CUDA only to reach the CUDA-graph branch
        with monkeypatch.context() as m:
            if break_it == "no stash":
                m.delattr(torch._C, "_stash_obj_in_tls")
            elif break_it == "no thread-local":
                m.delattr(cgt, "local")
            else:
                m.setattr(torch._C, "_stash_obj_in_tls", lambda key, obj: None)
                m.setattr(torch._C, "_get_obj_in_tls", lambda key: None)
                m.setattr(torch._C, "_is_key_in_tls", lambda key: False)
            compiled = compile_module(net, "reduce-overhead", CUDA1)
            again = compile_mode("reduce-overhead", CUDA1)  # the same thread: the same answer, no new warning
        _train(compiled, list(net.parameters()))
        return again

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert _in_new_thread(trial) == "default"
    assert modes == ["default"]
    got = _fallback_warnings(record)
    assert len(got) == 1 and 'compile mode "default"' in got[0], got
    assert accel.CUDA_GRAPHS in accel.fallbacks()
    if break_it == "no stash":  # this (importing) thread has its state from the import: no set-up needed
        with monkeypatch.context() as m:
            m.delattr(torch._C, "_stash_obj_in_tls")
            assert accel.cuda_graph_state_for_this_thread()


# --- DDP's graph splitting ----------------------------------------------------------------------------------

def test_compiled_ddp_uses_the_bucket_setting_it_is_given(fresh_accel):
    """Under DDP, compile_module sets Dynamo's optimize_ddp to its `optimize_ddp` argument, by default the
    library's (one graph, all-reduce after the backward: what measured best on 2 x H200); a single process
    and eager DDP leave Dynamo's setting alone."""
    net = torch.nn.Linear(2, 2)
    torch._dynamo.config.optimize_ddp = "ddp_optimizer"
    assert compile_module(net, False, CPU2) is net
    compile_module(net, True, CPU1, optimize_ddp="no_optimization")
    assert torch._dynamo.config.optimize_ddp == "ddp_optimizer"
    compiled = compile_module(net, "default", CPU2)
    assert torch._dynamo.config.optimize_ddp == accel.OPTIMIZE_DDP == "no_optimization" and compiled is not net
    compile_module(net, "default", CPU2, optimize_ddp="ddp_optimizer")
    assert torch._dynamo.config.optimize_ddp == "ddp_optimizer"
    assert accel.fallbacks() == {}


@pytest.mark.parametrize("break_it", ["no reader", "value refused"])
def test_without_dynamos_ddp_setting_a_compiled_step_trains_with_dynamos_own(fresh_accel, monkeypatch, break_it):
    import torch._dynamo.utils as dynamo_utils

    if break_it == "no reader":
        monkeypatch.delattr(dynamo_utils, "get_optimize_ddp_mode")
    else:
        def refuse():
            raise AssertionError("Invalid dynamo config optimize_ddp value")
        monkeypatch.setattr(dynamo_utils, "get_optimize_ddp_mode", refuse)
    torch._dynamo.config.optimize_ddp = "ddp_optimizer"
    net = torch.nn.Linear(8, 4)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        compiled = compile_module(net, "default", CPU2)
        compile_module(torch.nn.Linear(8, 4), "default", CPU2)
        _train(compiled, list(net.parameters()))
    got = _fallback_warnings(record)
    assert len(got) == 1 and "Dynamo's own setting" in got[0], got
    assert torch._dynamo.config.optimize_ddp == "ddp_optimizer"  # left alone


# --- clipping folded into fused AdamW -----------------------------------------------------------------------

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
    want, want_norms = _two_adamw_steps(
        lambda opt, net: torch.nn.utils.clip_grad_norm_(net.parameters(), max_norm or float("inf")), fused, device)
    got, got_norms = _two_adamw_steps(lambda opt, net: accel.clip_gradients(opt, max_norm), fused, device)
    unclipped, _ = _two_adamw_steps(lambda opt, net: torch.nn.utils.get_total_norm(
        [p.grad for p in net.parameters()]), fused, device)
    torch.testing.assert_close(got_norms, want_norms)
    assert want_norms[0] > 1000.0 and 0.0 < want_norms[1] < 100.0  # at 100 the first step is clipped, not the 2nd
    for a, b in zip(want, got):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    # the clipping matters to these two steps: with it the parameters end elsewhere than without
    assert (max_norm > 0) == any((a - u).abs().max() > 1e-3 for a, u in zip(want, unclipped))


def _clip_recording_grad_scale(scales: list):
    def clip(opt, net):
        norm = accel.clip_gradients(opt, 100.0)
        scales.append(getattr(opt, "grad_scale", None))
        return norm
    return clip


def test_fused_adamw_that_ignores_grad_scale_gets_divided_gradients(fresh_accel, monkeypatch):
    """A fused AdamW whose kernel ignores grad_scale (simulated: the fused ops lose the argument) fails the
    probe; clipping then divides the gradients, one warning, and the steps are those of the fast path."""
    fast_scales, slow_scales = [], []
    fast, _ = _two_adamw_steps(_clip_recording_grad_scale(fast_scales), fused=True)
    assert all(isinstance(s, torch.Tensor) for s in fast_scales)  # the fast path on this torch
    for name in ("_fused_adam_", "_fused_adamw_"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real, grad_scale=None, found_inf=None, **k: _real(*a, **k))
    accel.grad_scale_problem.cache_clear()
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        slow, _ = _two_adamw_steps(_clip_recording_grad_scale(slow_scales), fused=True)
    got = _fallback_warnings(record)
    assert len(got) == 1 and "ignores grad_scale" in got[0], got
    assert slow_scales == [None, None]  # the gradients were divided instead
    for a, b in zip(fast, slow):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    reference, _ = _two_adamw_steps(lambda opt, net: torch.nn.utils.clip_grad_norm_(net.parameters(), 100.0), True)
    for a, b in zip(reference, slow):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_fused_step_that_refuses_grad_scale_trains_on_divided_gradients(fresh_accel, monkeypatch):
    """A fused AdamW whose step fails with grad_scale set (simulated: the ops refuse the argument) falls back
    too, and a compiled-free model trains with clipping."""
    for name in ("_fused_adam_", "_fused_adamw_"):
        real = getattr(torch, name)

        def refusing(*a, _real=real, grad_scale=None, found_inf=None, **k):
            if grad_scale is not None:
                raise TypeError("unexpected keyword argument 'grad_scale'")
            return _real(*a, **k)
        monkeypatch.setattr(torch, name, refusing)
    net = torch.nn.Linear(8, 4)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1, fused=True)
    before = [p.detach().clone() for p in net.parameters()]
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(3):
            net(10 * torch.randn(16, 8)).square().sum().backward()
            assert accel.clip_gradients(opt, 1.0) > 1.0
            assert getattr(opt, "grad_scale", None) is None
            opt.step()
            opt.zero_grad()
    got = _fallback_warnings(record)
    assert len(got) == 1 and "TypeError" in got[0], got
    assert all(torch.isfinite(p).all() and (p.detach() - b).abs().max() > 1e-3
               for p, b in zip(net.parameters(), before))
