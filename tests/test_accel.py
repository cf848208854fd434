"""Speed-ups on torch internals (ulsweep/train/accel.py) and the compile settings around them: CUDA-graph
state in new threads, CUDA graphs kept to one thread, DDP's graph splitting, clipping folded into fused AdamW."""
import pytest
import torch



def test_cuda_graph_state_is_set_up_in_a_new_thread():
    """Tune runs a reused actor's next trial in a new thread; CUDA-graph trees must find their state there
    (and autograd's backward threads through the TLS stash)."""
    import threading

    from torch._inductor import cudagraph_trees as cgt

    from ulsweep.train.accel import cuda_graph_state_for_this_thread

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


def test_cuda_graphs_stay_in_the_first_thread_that_asks(monkeypatch, capsys):
    """compile_mode: reduce-overhead only on one CUDA process per model, and only in the first thread of the
    process that asks for it; any other thread gets the default mode and a note saying why."""
    import threading

    from ulsweep.train import runtime
    from ulsweep.train.runtime import Runtime, compile_mode

    monkeypatch.setattr(runtime, "_cuda_graph_owner", None)
    cuda, cpu = Runtime(torch.device("cuda", 0), torch.bfloat16, 0, 1), Runtime(torch.device("cpu"), None, 0, 1)
    assert compile_mode(False, cuda) is None and compile_mode(True, cuda) == "default"
    assert compile_mode("reduce-overhead", cpu) == "default"
    assert compile_mode("reduce-overhead", Runtime(torch.device("cuda", 0), None, 0, 2)) == "default"  # DDP
    assert runtime._cuda_graph_owner is None  # none of these claimed CUDA graphs
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
    """Under DDP, compile_module sets Dynamo's optimize_ddp to accel.DDP_COMPILE (one graph, all-reduce after
    the backward: what measured best on 2 x H200); a single process and eager DDP leave Dynamo's setting alone."""
    from ulsweep.train import accel
    from ulsweep.train.runtime import Runtime, compile_module

    cpu1, cpu2 = Runtime(torch.device("cpu"), None, 0, 1), Runtime(torch.device("cpu"), None, 0, 2)
    net = torch.nn.Linear(2, 2)
    with torch._dynamo.config.patch(optimize_ddp="ddp_optimizer"):  # restores Dynamo's setting afterwards
        assert compile_module(net, False, cpu2) is net
        compile_module(net, True, cpu1)
        assert torch._dynamo.config.optimize_ddp == "ddp_optimizer"
        monkeypatch.setattr(accel, "DDP_COMPILE", "no_optimization")
        compiled = compile_module(net, "default", cpu2)
        assert torch._dynamo.config.optimize_ddp == "no_optimization" and compiled is not net


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
    from ulsweep.train.accel import clip_gradients

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
