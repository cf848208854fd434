"""The benchmark scripts run (tiny sizes, CPU) and report what they measured consistently; the profile's
kernel categories on kernel names taken from an H200 run. Speeds are never asserted here."""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import train_step  # noqa: E402  (benchmarks/train_step.py)


def test_train_step_runs_every_stage_and_writes_its_rows(tmp_path):
    out = tmp_path / "r.json"
    assert train_step.main(["--preset", "tiny", "--image-size", "16", "--stages", "ae", "prior", "base",
                            "--batch", "4", "--modes", "eager", "--warmup", "1", "--iters", "2",
                            "--peak-tflops", "1", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["env"]["args"]["stages"] == ["ae", "prior", "base"]
    rows = res["rows"]
    assert [r["stage"] for r in rows] == ["ae", "prior", "base"]
    for r in rows:
        assert r["step_s"] > 0 and r["fwd_gflop_per_image"] > 0 and r["mfu"] > 0


def test_train_step_mfu_of_a_known_step(tmp_path, monkeypatch):
    """A stage of 2 forward GFLOP per image, batch 4, timed at 0.4, 1.2 and 0.5 s (median 0.5 s), on a
    0.5 TFLOP/s peak: 8 images/s, 3 x 2e9 x 8 = 48 GFLOP/s of training, MFU 0.096 (by hand)."""
    def known_stage(exp, batch, mode, channels, channels_last="none", dropout=None, **kw):
        return (lambda: None), 2.0, train_step.make_runtime(exp.ae.train)

    monkeypatch.setitem(train_step.STAGES, "prior", known_stage)
    monkeypatch.setattr(train_step, "time_calls", lambda step, device, warmup, iters: [0.4, 1.2, 0.5])
    out = tmp_path / "k.json"
    assert train_step.main(["--preset", "tiny", "--image-size", "16", "--stages", "prior", "--batch", "4",
                            "--modes", "eager", "--peak-tflops", "0.5", "--out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert (row["step_s"], row["images_per_s"], row["fwd_gflop_per_image"]) == (0.5, 8.0, 2.0)
    assert row["mfu"] == pytest.approx(0.096, rel=1e-12)


def _record_compiles(monkeypatch) -> list[tuple]:
    """benchmarks' compile_module replaced by one that records (module, settings) and compiles nothing."""
    calls = []

    def recording(module, setting, rt, **kw):
        calls.append((module, kw))
        return module

    monkeypatch.setattr(train_step, "compile_module", recording)
    return calls


def test_train_step_gelu_rows_build_and_run_the_gelu_they_name(tmp_path, monkeypatch):
    import torch.nn.functional as F

    from ulsweep.models.layers import Mlp
    seen, gelu = [], F.gelu

    def recording_gelu(x, approximate="none"):
        seen.append(approximate)
        return gelu(x, approximate=approximate)

    monkeypatch.setattr(F, "gelu", recording_gelu)
    built = _record_compiles(monkeypatch)
    out = tmp_path / "g.json"
    assert train_step.main(["--preset", "tiny", "--image-size", "16", "--stages", "base", "--batch", "4",
                            "--modes", "eager", "--warmup", "1", "--iters", "1", "--gelu", "tanh", "none",
                            "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["gelu"] for r in rows] == ["tanh", "none"]
    assert [{m.approximate for m in module.modules() if isinstance(m, Mlp)} for module, _ in built] == \
        [{"tanh"}, {"none"}]
    assert set(seen) == {"tanh", "none"}
    # without --gelu a row runs the library's form: the MLP's own default, the exact GELU
    assert train_step.LIBRARY_GELU == Mlp(4, 8).approximate == "none"


def test_train_step_one_pass_rows_compile_with_the_rows_they_name(tmp_path, monkeypatch):
    import torch
    import torch._inductor.config as inductor

    # rows given on the command line switch Inductor's graph caches off for the process: back afterwards, through
    # the config modules' own patch() (a plain setattr/restore leaves torch 2.13's autograd-cache key hidden)
    with contextlib.ExitStack() as stack:
        stack.enter_context(inductor.patch(fx_graph_cache=inductor.fx_graph_cache))
        if hasattr(torch._functorch.config, "enable_autograd_cache"):
            stack.enter_context(torch._functorch.config.patch(
                enable_autograd_cache=torch._functorch.config.enable_autograd_cache))
        _one_pass_rows_compile(tmp_path, monkeypatch)


def _one_pass_rows_compile(tmp_path, monkeypatch):
    from ulsweep.train import accel

    built = _record_compiles(monkeypatch)
    args = ["--preset", "tiny", "--image-size", "16", "--stages", "base", "--batch", "2", "--modes", "default",
            "--warmup", "0", "--iters", "1"]
    out = tmp_path / "o.json"
    assert train_step.main(args + ["--one-pass-rows", "64", "0", "--out", str(out)]) == 0
    assert [r["one_pass_rows"] for r in json.loads(out.read_text())["rows"]] == [64, 0]
    assert train_step.main(args + ["--out", str(out)]) == 0  # default: the library's
    assert json.loads(out.read_text())["rows"][0]["one_pass_rows"] == accel.ONE_PASS_MAX_ROW
    assert [kw["one_pass_max_row"] for _, kw in built] == [64, 0, accel.ONE_PASS_MAX_ROW]


def test_ddp_rows_compile_with_the_optimize_ddp_they_name(monkeypatch):
    import argparse

    import ddp  # benchmarks/ddp.py

    from ulsweep.train import accel
    built = _record_compiles(monkeypatch)
    a = argparse.Namespace(preset="tiny", base_preset=None, image_size=16, downsample=4, latent_channels=8,
                           channels=1, channels_last="none", dropout=None, batch=2, base_batch=2, mode="default")
    exp = train_step.bench_experiment(a)
    for mode in ("ddp_optimizer", accel.OPTIMIZE_DDP):
        _, _, _, batch = ddp.build_step(argparse.Namespace(**vars(a), optimize_ddp=mode), exp, "base")
        assert batch == 2
    assert [kw["optimize_ddp"] for _, kw in built] == ["ddp_optimizer", "no_optimization"]


def test_train_step_head_dim_rows_build_heads_of_that_size_and_restore_the_presets(tmp_path, monkeypatch):
    from ulsweep.models import AE_PRESETS, BASE_PRESETS, layers
    before, sizes, init = (dict(AE_PRESETS), dict(BASE_PRESETS)), [], layers.Attention.__init__

    def recording_init(self, dim, heads, dropout=0.0):
        sizes.append(dim // heads)
        init(self, dim, heads, dropout)

    monkeypatch.setattr(layers.Attention, "__init__", recording_init)
    out = tmp_path / "h.json"
    # the tiny presets' own heads have 16 and 32 channels; rows of 8 and 16 rebuild every transformer
    assert train_step.main(["--preset", "tiny", "--image-size", "16", "--stages", "prior", "base", "--batch", "4",
                            "--modes", "eager", "--warmup", "1", "--iters", "1", "--head-dim", "8", "16",
                            "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["stage"], r["head_dim"]) for r in rows] == [("prior", 8), ("prior", 16), ("base", 8), ("base", 16)]
    assert set(sizes) == {8, 16}
    assert (dict(AE_PRESETS), dict(BASE_PRESETS)) == before


def test_kernel_kinds_of_an_h200_profile():
    top = json.loads((BENCH / "results" / "h200-train-step-paper-ae-compiled-loss.json").read_text())
    names = list(top["rows"][0]["profile"]["top_kernels_ms"])
    kinds = {n: train_step.kernel_kind(n) for n in names}
    assert kinds[next(n for n in names if n.startswith("void at::native::elementwise_kernel"))] == \
        "norm/elementwise (eager)"
    # Inductor names fused kernels after their ops: "triton_poi_fused_..._convolution_..." is not a convolution
    assert any("convolution" in n for n in names if n.startswith("triton_"))
    assert all(k == "norm/elementwise (fused)" for n, k in kinds.items() if n.startswith("triton_"))
    assert all(k == "conv" for n, k in kinds.items() if "_xmma_" in n and "implicit_gemm" in n)
    assert all(k == "gemm" for n, k in kinds.items() if n.startswith("nvjet_"))
    assert all(k == "attention" for n, k in kinds.items() if "sdpa" in n)


def test_cudnn_layout_transposes_are_not_convolutions():
    """cuDNN converts NCHW activations to NHWC and back around its NHWC kernels (20% of the stage-1 step in
    session 4's default-layout run): that is memory traffic, not convolution arithmetic."""
    top = json.loads((BENCH / "results" / "h200-train-step-paper-ae-default-layout.json").read_text())
    names = list(top["rows"][0]["profile"]["top_kernels_ms"])
    transposes = [n for n in names if "nchwToNhwc" in n or "nhwcToNchw" in n]
    assert len(transposes) == 2 and all(n.startswith("void cudnn::") for n in transposes)
    assert {train_step.kernel_kind(n) for n in transposes} == {"layout conversion"}
    assert all(train_step.kernel_kind(n) == "conv" for n in names if "_xmma_" in n and "implicit_gemm" in n)


def test_cudnn_attention_backward_helpers_and_the_dropout_mask_have_their_kinds():
    """cuDNN's SDPA backward runs two helper kernels of its own (filed as convolutions before, by "cudnn");
    ulsweep's dropout mask kernel is its own kind. Names from session 5's H200 base-model profile."""
    top = json.loads((BENCH / "results" / "h200-train-step-paper-base-b128-bytemask.json").read_text())
    names = list(top["rows"][0]["profile"]["top_kernels_ms"])
    helpers = [n for n in names if "compute_dot_do_o" in n or "convert_dq_to_16bits" in n]
    assert len(helpers) == 2 and {train_step.kernel_kind(n) for n in helpers} == {"attention"}
    assert train_step.kernel_kind("_keep_bits_kernel") == "dropout mask"
    assert "conv" not in {train_step.kernel_kind(n) for n in names}  # the base model has no convolution


def test_inductor_gemm_templates_are_gemms():
    """Under GEMM autotuning Inductor runs some matmuls as Triton templates ("triton_tem_fused_mm_..."), with
    epilogues fused in: matmul arithmetic, not elementwise work (session 7's H200 base-model profile)."""
    top = json.loads((BENCH / "results" / "h200-train-step-paper-base-b256-autotune-gemm.json").read_text())
    names = [k["name"] for k in top["rows"][0]["profile"]["kernels"]]
    templates = [n for n in names if n.startswith("triton_tem_")]
    assert len(templates) >= 10 and any("rshift" in n for n in templates)  # one has the dropout unpack fused in
    assert {train_step.kernel_kind(n) for n in templates} == {"gemm"}
    assert train_step.kernel_kind("triton_tem_fused_convolution_relu_3") == "conv"
    fused = [n for n in names if n.startswith(("triton_poi_", "triton_red_", "triton_per_"))]
    assert fused and {train_step.kernel_kind(n) for n in fused} == {"norm/elementwise (fused)"}


def test_inductor_settings_may_be_nested_and_a_wrong_key_is_named(capsys):
    import torch._inductor.config as inductor

    before = inductor.triton.prefer_nd_tiling
    args = ["--preset", "tiny", "--image-size", "16", "--stages", "base", "--batch", "2", "--modes", "eager",
            "--warmup", "0", "--iters", "1"]
    try:
        assert train_step.main(args + ["--inductor", f"triton.prefer_nd_tiling={not before}"]) == 0
        assert inductor.triton.prefer_nd_tiling is (not before)
    finally:
        inductor.triton.prefer_nd_tiling = before
    with pytest.raises(SystemExit):
        train_step.main(args + ["--inductor", "triton.no_such_setting=1"])
    assert "torch._inductor.config has no 'triton.no_such_setting'" in capsys.readouterr().err


def test_block_variants_switch_parts_off_or_rewrite_them_and_restore_the_block():
    """benchmarks/block.py: `head-major`, `qk-v-split`, `norm-all` and `multi-kernel` compute the library's
    function another way, the ablations change the output, and every variant leaves the block as it found it."""
    import torch

    import block
    from ulsweep.models.layers import TransformerBlock

    torch.manual_seed(0)
    blk = TransformerBlock(64, 4, 32, dropout=0.0)
    torch.nn.init.normal_(blk.ada.weight, std=0.02)  # non-zero gates: every branch reaches the output
    for norm in (blk.attn.q_norm, blk.attn.k_norm):  # distinct q and k norm weights, as after training
        torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    x, c = torch.randn(2, 16, 64), torch.randn(2, 32)
    want = blk(x, c)
    for name in block.VARIANTS:
        with block.variant(name, blk):
            got = blk(x, c)
        diff = (got - want).abs().max().item()
        if name in ("library", "head-major", "no-dropout", "qk-v-split", "norm-all", "multi-kernel"):
            # no-dropout: the block has none here; multi-kernel only changes how Inductor compiles
            assert diff < 1e-6, name
        elif name == "gelu-tanh":  # GELU's tanh form differs from the exact one by < 1e-3
            assert 0 < diff < 1e-3
            assert blk.mlp.approximate == "none"  # the block's own MLP again
        else:
            assert diff > 1e-3, name
        torch.testing.assert_close(blk(x, c), want)  # restored
        assert not torch._inductor.config.triton.multi_kernel
    drop = TransformerBlock(64, 4, 32, dropout=0.1)
    with block.variant("no-dropout", drop):
        assert {m.p for m in drop.modules() if isinstance(m, torch.nn.Dropout)} == {0.0}
    assert {m.p for m in drop.modules() if isinstance(m, torch.nn.Dropout)} == {0.1}


def test_sweep_wall_variants_split_into_overrides_and_environment_and_bad_ones_are_named():
    import sweep_wall

    assert sweep_wall.parse_variant("warm=") == ("warm", [], {})
    assert sweep_wall.parse_variant("cold=env:TORCHINDUCTOR_FORCE_DISABLE_CACHES=1, search.max_concurrent=2") == (
        "cold", ["search.max_concurrent=2"], {"TORCHINDUCTOR_FORCE_DISABLE_CACHES": "1"})
    for bad, named in (("=x=1", "NAME=SPEC"), ("v=env:NOVALUE", "env:NOVALUE"), ("v=nokey", "nokey")):
        with pytest.raises(SystemExit, match=named):
            sweep_wall.parse_variant(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-driver path")
def test_sweep_wall_gpu_sampler_without_a_driver_reports_none_and_why():
    import sweep_wall

    with sweep_wall.GpuSampler(0.01) as g:
        pass
    assert g.busy_fraction() is None and g.samples == [] and g.error


def test_sweep_wall_limit_stops_the_sweep_as_ctrl_c_would_and_keeps_the_time_until_then(tmp_path):
    import subprocess

    import sweep_wall

    marker = tmp_path / "interrupted"
    child = ("import signal, sys, time, pathlib\n"
             "def stop(*_):\n"
             f"    pathlib.Path({str(marker)!r}).write_text('SIGINT'); sys.exit(130)\n"
             "signal.signal(signal.SIGINT, stop)\n"
             "print('ready', flush=True)\n"
             "time.sleep(120)\n")
    rc, wall, stopped = sweep_wall.run_limited([sys.executable, "-c", child], 3.0, grace_s=60,
                                               stdout=subprocess.DEVNULL)
    assert (rc, stopped, marker.read_text()) == (130, True, "SIGINT")
    assert 3.0 <= wall < 60  # the time until the limit, not the grace period after it
    stubborn = "import signal, time; signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(120)"
    rc, wall, stopped = sweep_wall.run_limited([sys.executable, "-c", stubborn], 2.0, grace_s=2.0)
    assert stopped and rc == -9  # SIGINT ignored: killed after the grace period
    rc, wall, stopped = sweep_wall.run_limited([sys.executable, "-c", "raise SystemExit(3)"], 60)
    assert (rc, stopped) == (3, False)


def test_sweep_wall_reads_trials_phases_readiness_and_results_from_a_store(tmp_path):
    """--from-store / the end of every variant: the numbers come from the sweep's MLflow store."""
    import sweep_wall
    from test_report import make_store

    from ulsweep import tracking
    from ulsweep.sweep import timeline

    run_dir, uri, sweep_id = make_store(tmp_path)
    c = tracking.client(uri)
    runs = {r.data.tags.get("ulsweep.trial_key", r.info.run_name): r for r in c.search_runs(
        [c.get_run(sweep_id).info.experiment_id])}
    t = 1_000.0  # ae-0000: 5 s start, 1 s setup, 20 s first step, 30 s training, 4 s evaluation, 1 s finish
    ph = [("start", t, t + 5), ("setup", t + 5, t + 6), ("first_step", t + 6, t + 26), ("train", t + 26, t + 56),
          ("evaluate", t + 56, t + 60), ("finish", t + 60, t + 61)]
    c.set_tag(runs["ae-0000"].info.run_id, timeline.TAG, timeline.add_attempt(None, ph))
    # ae-0001, the same architecture, 10 s later in a warm process: ready after 2 s + 1 s + 5 s
    later = [("start", t + 10, t + 12), ("setup", t + 12, t + 13), ("first_step", t + 13, t + 18),
             ("train", t + 18, t + 48)]
    c.set_tag(runs["ae-0001"].info.run_id, timeline.TAG, timeline.add_attempt(None, later))
    c.set_tag(runs["ae-0001"].info.run_id, timeline.TAG_PROCESS, timeline.process_tag("h", 7, 8, 2))
    assert "precompile" not in sweep_wall.sweep_numbers(str(run_dir))  # nothing compiled ahead
    ahead = [{"base": "m", "latent_shape": [4, 4, 4], "compile_gate": "first", "seconds": 61.5}]
    c.set_tag(sweep_id, "ulsweep.precompile", json.dumps(ahead))
    for via in (dict(sweep=str(run_dir)), dict(sweep="mini", tracking_uri=uri)):
        got = sweep_wall.sweep_numbers(**via)
        assert got["precompile"] == ahead
        assert got["trials"] == 10 and got["finished"] == 8  # 4 AE + 6 base runs; ae-0003 FAILED, ae-0002-m RUNNING
        assert got["ready_s"] == {"ae-0000": 26.0, "ae-0001": 8.0}
        assert got["ready_after_first_max_s"] == 8.0  # ae-0000 is the first of its architecture
        assert got["process_trial"] == {"ae-0001": 2}  # ae-0000 has no process tag (an older sweep)
        first = {r["phase"]: r["trial-seconds"] for r in got["phases"]}
        assert first == {"start": 7.0, "setup": 2.0, "first_step": 25.0, "train": 60.0, "evaluate": 4.0,
                         "finish": 1.0}
        assert got["results"]["ae-0000"]["bpp"] == pytest.approx(0.01 * 1.5 * 2.718281828 ** -0.8)
    row = sweep_wall.table([{"variant": "v", **got}]).splitlines()[-1].split()
    assert row[-3:] == ["26", "26", "8"]  # ready median and max, and the max after the first of the architecture


def test_sweep_wall_first_of_an_architecture_is_per_kind_and_model_shape():
    import pandas as pd
    import sweep_wall

    runs = pd.DataFrame([
        {"key": "a0", "kind": "ae", "ae.model.latent_channels": 4, "data.image_size": 16},
        {"key": "a1", "kind": "ae", "ae.model.latent_channels": 8, "data.image_size": 16},
        {"key": "a2", "kind": "ae", "ae.model.latent_channels": 4, "data.image_size": 16},
        {"key": "a0-s", "kind": "base", "ae.model.latent_channels": 4, "data.image_size": 16,
         "base.model.preset": "small"},
        {"key": "a2-s", "kind": "base", "ae.model.latent_channels": 4, "data.image_size": 16,
         "base.model.preset": "small"},
        {"key": "a2-m", "kind": "base", "ae.model.latent_channels": 4, "data.image_size": 16,
         "base.model.preset": "medium"}])
    # a0 and a2 start together; a2 compiles (ready after 30 s) while a0 trains uncompiled (ready after 4 s)
    ready = pd.DataFrame({"key": ["a0", "a2", "a1", "a0-s", "a2-m", "a2-s"], "start": [0, 1, 2, 40, 41, 90],
                          "ready_s": [4, 30, 8, 7, 6, 2]})
    assert sweep_wall.after_first_of_architecture(ready, runs)["key"].tolist() == ["a0", "a2-s"]


def test_sweep_wall_gpu_busy_by_phase_counts_each_sample_for_every_phase_under_way():
    """A sample counts for every (kind, phase) some trial was in at its time, once per pair however many trials
    were; samples when no trial was in any phase go to ("-", "outside")."""
    import pandas as pd
    import sweep_wall

    tl = pd.DataFrame([("a0", "ae", "train", 0.0, 10.0), ("a1", "ae", "train", 0.0, 10.0),
                       ("a0", "ae", "evaluate", 10.0, 14.0), ("a0-s", "base", "setup", 12.0, 20.0)],
                      columns=["key", "kind", "phase", "start", "end"])
    samples = [(1.0, 100), (5.0, 80), (11.0, 20), (13.0, 60), (16.0, 10), (30.0, 0)]
    got = {(r["kind"], r["phase"]): (r["samples"], r["gpu_busy"]) for r in sweep_wall.busy_by_phase(tl, samples)}
    assert got == {("ae", "train"): (2, 0.9), ("ae", "evaluate"): (2, 0.4), ("base", "setup"): (2, 0.35),
                   ("-", "outside"): (1, 0.0)}
    assert [r["kind"] for r in sweep_wall.busy_by_phase(tl, samples)] == ["ae", "ae", "base", "-"]


def test_sweep_wall_says_what_each_precompile_task_did_with_its_longest_compile_phases():
    import sweep_wall

    row = {"variant": "v", "precompile": [
        {"stage": "ae", "members": 18, "compile_gate": "first", "step_s": 190.4, "seconds": 207.0,
         "step_parts_s": {"build": 4.2, "setup": 1.0, "first_step": 180.1, "steps": 5.1},
         "step_phases_s": {"compile_fx_inner": 150.0, "Scheduler.codegen": 60.2, "async_compile.wait": 40.0,
                           "bytecode_tracing": 4.0, "gc": 1.0}},
        {"stage": "base", "base": "small", "members": 18, "compile_gate": "done", "seconds": 24.9}]}
    assert sweep_wall.precompile_lines(row, phases=2).splitlines() == [
        "Compiled ahead (v):",
        "  ae x18: first, step 190 s (build 4.2, setup 1.0, first_step 180.1, steps 5.1), in all 207 s; "
        "compile_fx_inner 150 s, Scheduler.codegen 60 s",
        "  base small x18: done, in all 25 s"]
    assert sweep_wall.precompile_lines({"variant": "v"}) == ""


def test_sweep_wall_gpu_busy_from_an_nvidia_smi_log_over_the_sweeps_window(tmp_path):
    import sweep_wall

    log = tmp_path / "gpu_util.csv"
    log.write_text("timestamp, utilization.gpu [%], memory.used [MiB]\n"
                   "2026/12/04 16:22:17.078, 0 %, 0 MiB\n"
                   "2026/12/04 16:22:22.083, 100 %, 900 MiB\n"
                   "2026/12/04 16:22:27.083, 50 %, 900 MiB\n"
                   "2026/12/04 16:22:32.0")  # the sampler killed mid-line
    t = 1796401337.0  # 2026-12-04 16:22:17 UTC
    assert sweep_wall.nvidia_smi_busy(str(log)) == (0.5, 3)
    assert sweep_wall.nvidia_smi_busy(str(log), t + 1, t + 11) == (0.75, 2)
    assert sweep_wall.nvidia_smi_busy(str(log), t + 100, t + 200) == (None, 0)
    log.write_text("timestamp, utilization.gpu [%]\nyesterday, 5 %\n")
    with pytest.raises(SystemExit, match="line 2 is not an nvidia-smi sample"):
        sweep_wall.nvidia_smi_busy(str(log))


def test_data_pipeline_cores_per_gpu_count_the_cores_the_decode_tasks_kept_busy():
    import data_pipeline

    busy = {"images_per_s": 454.3, "cpus": 16, "tasks_in_flight": 0.776}  # H200, session 13: backpressured
    assert data_pipeline.decode_rate_per_core([busy]) == pytest.approx(454.3 / 0.776)
    no_stats = {"images_per_s": 600.0, "cpus": 2}  # no executor stats: all the CPUs Ray was given
    assert data_pipeline.decode_rate_per_core([no_stats]) == pytest.approx(300.0)
    assert data_pipeline.decode_rate_per_core([busy, no_stats]) == pytest.approx(454.3 / 0.776)  # the fastest
    assert data_pipeline.decode_rate_per_core([]) == 0.0


def test_eval_sampling_times_both_precisions_on_a_trained_checkpoint(tmp_path, digits_cache):
    """benchmarks/eval_sampling.py on a base trial's checkpoint: one row per precision, fp32 the yardstick
    (ratio 1, no difference to itself), the trained networks' bf16 samples differ from fp32's by a little."""
    import eval_sampling

    from ulsweep.config import experiment_from_dict
    from ulsweep.train.stage1 import train_autoencoder
    from ulsweep.train.stage2 import train_base

    train = {"steps": 40, "batch_size": 8, "log_every": 10, "eval_images": 8, "eval_t_per_image": 1,
             "sample_steps": 2}
    exp = experiment_from_dict({
        "name": "evs", "data": {"path": "builtin:digits", "image_size": 16},
        "ae": {"model": {"preset": "tiny", "downsample": 4, "latent_channels": 2}, "train": train},
        "base_models": [{"name": "b", "model": {"preset": "tiny"}, "train": train}], "eval": {"extractor": "none"}})
    ae = train_autoencoder(exp, str(tmp_path / "ae"))
    base = train_base(exp, exp.base_models[0], ae.checkpoint, str(tmp_path / "base"))
    out = tmp_path / "evs.json"
    assert eval_sampling.main(["--base-ckpt", base.checkpoint, "--samples", "8", "--batches", "4", "--repeats", "1",
                               "--device", "cpu", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["env"]["trained"] is True
    fp32, bf16 = res["rows"]
    assert (fp32["precision"], bf16["precision"]) == ("fp32", "bf16")
    assert fp32["ratio_to_fp32"] == 1.0 and fp32["mean_abs_uint8_diff"] == 0.0
    assert 0 < bf16["mean_abs_uint8_diff"] < 32 and bf16["images_per_s"] > 0
    assert not fp32["compiled"] and fp32["first_call_s"] > 0

    # --compile: the same rows with the base model and the decoder swapped for torch.compile's modules (here a
    # pass-through that counts its calls, so the compiled fp32 samples equal the eager ones exactly)
    calls = []

    class Through(torch.nn.Module):
        def __init__(self, inner, mode):
            super().__init__()
            self.inner, self.mode = inner, mode

        def forward(self, *a, **k):
            calls.append((type(self.inner).__name__, self.mode))
            return self.inner(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(eval_sampling.torch, "compile", lambda module, mode=None: Through(module, mode))
        assert eval_sampling.main(["--base-ckpt", base.checkpoint, "--samples", "8", "--batches", "4",
                                   "--repeats", "1", "--device", "cpu", "--compile", "default", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["precision"], r["compiled"]) for r in rows] == [("fp32", False), ("bf16", False), ("fp32", True),
                                                                ("bf16", True)]
    assert rows[2]["mean_abs_uint8_diff"] == 0.0  # against the eager fp32 row
    assert rows[2]["ratio_to_fp32"] == pytest.approx(rows[0]["median_s"] / rows[2]["median_s"])
    assert sorted(set(calls)) == [("BaseViT", "default"), ("DecoderUViT", "default")]  # both networks, in that mode


def _tiny_exp(clip: float = 1.0):
    import argparse
    import dataclasses

    exp = train_step.bench_experiment(argparse.Namespace(image_size=16, preset="tiny", downsample=4,
                                                         latent_channels=4, base_preset=None))
    return dataclasses.replace(exp, ae=dataclasses.replace(
        exp.ae, optim=dataclasses.replace(exp.ae.optim, grad_clip=clip, warmup_steps=2)))


def test_batched_trials_are_the_same_trials_as_stepped_one_by_one():
    """vmap(grad) over stacked weights and one AdamW over the stacked tensors train N trials exactly as N
    TrainStates would (clipping active, so each trial's own norm matters), and the check can tell when not:
    one norm over all trials moves the weights far away."""
    import batched_trials as bt

    exp = _tiny_exp(clip=0.01)
    ok = bt.check(exp, "ae", 3, 4, 1, 3, torch.device("cpu"))
    assert ok["max_rel_grad_diff"] < 1e-4 and ok["max_rel_weight_diff"] < 1e-3, ok

    def joint_norm_step(self, x, noise):  # the bug the per-trial clipping avoids
        with torch.enable_grad():
            g = self.grads(self.params, self.buffers, x, noise)
        norm = torch.stack([t.pow(2).sum() for t in g.values()]).sum().sqrt()
        for k, p in self.params.items():
            p.grad = g[k] / ((norm + 1e-6) / self.oc.grad_clip).clamp_min(1.0)
        for group in self.opt.param_groups:
            group["lr"] = bt.lr_at(self.step_count, self.oc)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step_count += 1

    with pytest.MonkeyPatch.context() as m:
        m.setattr(bt.BatchedTrials, "step", joint_norm_step)
        bad = bt.check(exp, "ae", 3, 4, 1, 3, torch.device("cpu"))
    assert bad["max_rel_weight_diff"] > 100 * ok["max_rel_weight_diff"], (ok, bad)


def test_batched_check_runs_without_tf32_names_its_worst_tensors_and_restores_the_flags(monkeypatch):
    import batched_trials as bt

    seen = []
    real = bt._check

    def spy(*a, **kw):
        seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
        return real(*a, **kw)

    monkeypatch.setattr(bt, "_check", spy)
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        res = bt.check(_tiny_exp(), "base", 2, 4, 1, 1, torch.device("cpu"))
        assert seen == [(False, False)]
        assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == (True, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    names = {n for n, _ in bt.trial_objectives(_tiny_exp(), "base", 1, 1, torch.device("cpu"))[0].named_parameters()}
    assert res["grad_tensor"] in names and res["weight_tensor"] in names


def test_batched_fallback_ops_of_any_namespace_are_listed():
    import batched_trials as bt

    class W:
        def __init__(self, text):
            self.message = text

    text = "There is a performance drop because we have not yet implemented the batching rule for {}. Please"
    caught = [W(text.format("ulsweep::keep_bits")), W(text.format("aten::_scaled_dot_product_efficient_attention"
                                                                   "_backward")), W("something else")]
    assert bt.fallback_ops(caught) == ["aten::_scaled_dot_product_efficient_attention_backward",
                                       "ulsweep::keep_bits"]


@pytest.mark.parametrize("stage", ["ae", "base"])
def test_stacked_program_trains_the_same_trials_as_stepped_one_by_one(stage):
    """The stacked network (ulsweep.models.stacked) with one fused AdamW and per-trial clipping trains N trials as
    N TrainStates would; one norm over all trials (the bug per-trial clipping avoids) moves the weights away."""
    import batched_trials as bt

    exp = _tiny_exp(clip=0.01)
    ok = bt.check(exp, stage, 3, 4, 1, 3, torch.device("cpu"), program="stacked")
    # the weights' bound is looser than the gradients': AdamW's first steps are close to lr * sign(g) whatever
    # |g|, so where a gradient element near zero rounds differently the weights move apart by a share of a step,
    # large against the zero-initialised convolutions' few steps (an AVX2 CPU, session 43: 1.07e-3 in the
    # encoder's residual conv, gradients within 6.5e-7); one norm for all trials, the bug below, moved them by 0.88
    assert ok["program"] == "stacked" and ok["max_rel_grad_diff"] < 1e-4 and ok["max_rel_weight_diff"] < 1e-2, ok
    if stage == "base":  # _tiny_exp clips the autoencoders only
        return
    import ulsweep.models.stacked as st

    real = st.trial_norms
    with pytest.MonkeyPatch.context() as m:  # every trial clipped by the norm of all of them together
        m.setattr(st, "trial_norms", lambda grads, n: real(grads, n).pow(2).sum().sqrt().expand(n))
        bad = bt.check(exp, stage, 3, 4, 1, 3, torch.device("cpu"), program="stacked")
    assert bad["max_rel_weight_diff"] > 100 * ok["max_rel_weight_diff"], (ok, bad)


def test_batched_base_models_are_the_same_trials_as_stepped_one_by_one():
    import batched_trials as bt

    ok = bt.check(_tiny_exp(), "base", 3, 4, 1, 3, torch.device("cpu"))
    assert ok["stage"] == "base" and ok["max_rel_grad_diff"] < 1e-4 and ok["max_rel_weight_diff"] < 1e-3, ok


def test_batched_trials_stack_each_trials_own_objective_and_ema():
    import batched_trials as bt

    exp = _tiny_exp()
    objs = bt.trial_objectives(exp, "ae", 6, 1, torch.device("cpu"))
    assert [float(o.loss_factor) for o in objs] == [1.5, 1.75, 2.0, 3.0, 4.0, 1.5]
    assert [float(o.sigmoid_bias) for o in objs] == [-2.0] * 5 + [0.0]
    b = bt.BatchedTrials(objs, exp.ae.optim, bt.make_runtime(exp.ae.train))
    assert b.buffers["loss_factor"].tolist() == [1.5, 1.75, 2.0, 3.0, 4.0, 1.5]
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(6, 4, 1, 16, 16, generator=gen) * 2 - 1
    noise = bt.stacked_noise(objs[0], 6, 4, gen)
    for k in ("t_z", "t_x"):  # every trial's times stratified over its own batch: one per quarter of [0, 1)
        assert noise[k].shape == (6, 4)
        assert (noise[k] * 4).floor().sort(dim=1).values.tolist() == [[0.0, 1.0, 2.0, 3.0]] * 6
    assert noise["eps_x"].shape == (6, 4, 1, 16, 16)
    norms = b.step(x, noise)
    assert norms.shape == (6,) and bool((norms > 0).all())
    w1, ema1 = ({k: v.clone() for k, v in d.items()} for d in (b.params, b.shadow))
    b.step(x, bt.stacked_noise(objs[0], 6, 4, gen))
    beta = b.ema.decay(2)  # EMA after step 2: lerp of the EMA after step 1 towards the new weights by 1 - beta
    assert 0 < beta < 1
    for k in w1:
        assert torch.allclose(b.shadow[k], beta * ema1[k] + (1 - beta) * b.params[k], atol=1e-7), k
    assert any(not torch.equal(b.params[k], w1[k]) for k in w1)  # the step moved the weights


def test_batched_trials_benchmark_writes_its_rows(tmp_path):
    import batched_trials as bt

    out = tmp_path / "b.json"
    assert bt.main(["--preset", "tiny", "--image-size", "16", "--latent-channels", "4", "--batch", "4",
                    "--trials", "1", "2", "--seconds", "0.2", "--warmup", "1", "--check-steps", "1",
                    "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert set(res["env"]["check"]) == {"stacked", "vmap"}
    assert all(c["max_rel_grad_diff"] < 1e-4 for c in res["env"]["check"].values())
    rows = res["rows"]
    assert [r["program"] for r in rows] == ["one trial", "stacked 1", "stacked 2", "vmap 1", "vmap 2"]
    assert all(r["first_step_s"] > 0 for r in rows)
    assert {r["stage"] for r in rows} == {"ae"}
    assert rows[0]["vmap_fallback_ops"] == []  # one trial's own step runs no vmap
    assert all(isinstance(r["vmap_fallback_ops"], list) for r in rows)
    for r in rows:
        assert r["images_per_s"] > 0 and r["per_trial_images_per_s"] * r["trials"] == pytest.approx(r["images_per_s"])
    assert rows[0]["ratio_to_one_trial"] == pytest.approx(1.0)
    assert rows[4]["ratio_to_one_trial"] == pytest.approx(rows[4]["images_per_s"] / rows[0]["images_per_s"])


def test_batched_trials_cudnn_search_rows_build_their_programs_under_the_flag_they_name(tmp_path, monkeypatch):
    """--cudnn-search on off: per stacked variant a row with cuDNN's timed search and one with its heuristics, each
    program built (and so compiled and captured) under its own flag, whatever the runtime turned on."""
    import batched_trials as bt

    seen, make = [], bt.make_program

    def spy(*args, **kw):
        seen.append(torch.backends.cudnn.benchmark)
        return make(*args, **kw)

    def runtime(train):
        rt = make_runtime(train)
        torch.backends.cudnn.benchmark = True  # as the trials' runtime turns it on, on a GPU
        return rt

    from ulsweep.train.runtime import make_runtime

    monkeypatch.setattr(bt, "make_program", spy)
    monkeypatch.setattr(bt, "make_runtime", runtime)
    out = tmp_path / "s.json"
    before = torch.backends.cudnn.benchmark
    try:
        assert bt.main(["--preset", "tiny", "--image-size", "16", "--latent-channels", "4", "--batch", "2",
                        "--trials", "2", "--programs", "stacked", "--conv", "grouped", "loop", "--cudnn-search",
                        "on", "off", "--no-baseline", "--seconds", "0.1", "--warmup", "1", "--check-steps", "0",
                        "--out", str(out)]) == 0
    finally:
        torch.backends.cudnn.benchmark = before
    rows = json.loads(out.read_text())["rows"]
    assert [(r["program"], r["cudnn_search"]) for r in rows] == [
        ("stacked 2", "on"), ("stacked 2 no-search", "off"), ("stacked 2 loop", "on"),
        ("stacked 2 loop no-search", "off")]
    assert seen == [True, False, True, False]


def test_first_step_times_the_parts_of_fresh_processes_and_passes_them_only_the_model_arguments(tmp_path):
    import first_step as fs

    assert fs._without(["--preset", "tiny", "--processes", "1", "2", "--out", "x.json", "--batch", "4"],
                       {"--out": 1, "--processes": 2}) == ["--preset", "tiny", "--batch", "4"]
    out = tmp_path / "f.json"
    assert fs.main(["--preset", "tiny", "--image-size", "16", "--latent-channels", "4", "--batch", "4",
                    "--processes", "1", "--variants", "library", "no-cudnn-benchmark", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["variant"], r["processes"], r["errors"]) for r in rows] == [("library", 1, []),
                                                                        ("no-cudnn-benchmark", 1, [])]
    for r in rows:
        (proc,) = r["per_process"]
        assert all(proc[k] > 0 for k in fs.PARTS), proc
        assert proc["import_s"] < 120 and r["first_step_max_s"] == proc["forward_s"] + proc["backward_s"]


def test_batched_trials_with_math_attention_leave_vmap_nothing_to_run_trial_by_trial(tmp_path):
    """On CPU the library's attention (a fused SDPA kernel) has no batching rule, and vmap loops over the trials
    there (the rows name it); with --attention math the program batches it and is still the same trials."""
    import batched_trials as bt

    rows = {}
    for att in ("library", "math"):
        out = tmp_path / f"{att}.json"
        assert bt.main(["--preset", "tiny", "--image-size", "16", "--latent-channels", "4", "--batch", "4",
                        "--trials", "2", "--seconds", "0.2", "--warmup", "1", "--check-steps", "1",
                        "--attention", att, "--programs", "vmap", "--out", str(out)]) == 0
        res = json.loads(out.read_text())
        assert res["env"]["check"]["vmap"]["max_rel_grad_diff"] < 1e-4
        rows[att] = res["rows"][-1]
    assert rows["math"]["attention"] == "math" and rows["math"]["vmap_fallback_ops"] == []
    assert any("attention" in op for op in rows["library"]["vmap_fallback_ops"])


def test_first_step_beside_compile_starts_a_cold_compiling_process_first(monkeypatch):
    """The beside-compile row: one more process, with --compiler and an Inductor cache of its own, starts before
    the P measured ones, is waited for, and is not among them."""
    import first_step as fs

    started = []

    class Proc:
        def __init__(self, cmd, env=None, **kw):
            started.append((cmd, env))
            self.returncode, self.compiler = 0, "--compiler" in cmd

        def communicate(self, timeout=None):
            out = "" if self.compiler else json.dumps({k: 1.0 for k in fs.PARTS})
            return out + "\n", ""

    monkeypatch.setattr(fs.subprocess, "Popen", Proc)
    monkeypatch.setattr(fs, "COMPILER_HEAD_START_S", 0.0)
    a = argparse.Namespace(timeout_s=10.0)
    row = fs.run_row(a, ["--preset", "tiny"], "beside-compile", 2)
    assert ["--compiler" in cmd for cmd, _ in started] == [True, False, False]
    compiler_env, trial_env = started[0][1], started[1][1]
    assert "first-step-inductor-" in compiler_env["TORCHINDUCTOR_CACHE_DIR"]
    assert trial_env.get("TORCHINDUCTOR_CACHE_DIR") == os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    assert len(row["per_process"]) == 2 and row["errors"] == [] and row["compiler_s"] >= 0


def test_warm_process_runs_both_variants_and_a_warm_run_matches_its_fresh_twin(tmp_path):
    """benchmarks/warm_process.py: the same runs in fresh processes and in one reused process's trial thread give
    the same bits/pixel (a warm process changes where the time goes, not what trains); only fresh processes and a
    warm process's first run import anything."""
    import warm_process

    out = tmp_path / "w.json"
    assert warm_process.main(["--runs", "2", "--steps", "2", "--workdir", str(tmp_path / "w"),
                              "--set", "ae.train.eval_images=16", "--set", "ae.train.sample_steps=2",
                              "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["variant"], r["run"]) for r in rows] == [("fresh", 0), ("fresh", 1), ("warm", 0), ("warm", 1)]
    by = {(r["variant"], r["run"]): r for r in rows}
    for i in (0, 1):
        assert by[("warm", i)]["bpp"] == by[("fresh", i)]["bpp"]
    assert by[("fresh", 0)]["bpp"] != by[("fresh", 1)]["bpp"]  # the runs differ (their loss factors)
    assert all(by[k]["imports_s"] > 0 for k in (("fresh", 0), ("fresh", 1), ("warm", 0)))
    assert by[("warm", 1)]["imports_s"] is None
    assert all(r["ready_s"] >= r["first_step_s"] > 0 for r in rows)
    assert all(r["rss_gib"] > 0.05 for r in rows)  # torch alone takes more than 50 MiB


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_wait_benchmark_says_it_needs_a_gpu(tmp_path):
    out = subprocess.run([sys.executable, str(BENCH / "cuda_wait.py"), "--out", str(tmp_path / "w.json")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 1 and "no CUDA device here" in out.stderr and not (tmp_path / "w.json").exists()


def test_member_writes_benchmark_times_both_hand_overs_and_writes_its_rows(tmp_path):
    out = tmp_path / "w.json"
    p = subprocess.run([sys.executable, "benchmarks/member_writes.py", "--experiment", "experiments/quickstart.yaml",
                        "--members", "2", "--eval-s", "0.05", "--out", str(out)], cwd=BENCH.parent, capture_output=True,
                       text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["between evaluations", "1 writer thread", "4 writer threads"]
    assert all(r["seconds"] > 2 * 0.05 for r in rows) and rows[0]["ratio_to_between"] == 1.0


def test_checkpoint_pause_times_every_writer_and_puts_the_library_back(tmp_path):
    """benchmarks/checkpoint_pause.py on the CPU (where its writers copy alike): a row per mode and repeat, each
    with a checkpoint written but `none`, lost seconds against that repeat's `none`, and the library's snapshot and
    copy functions as they were after the rows that replace them."""
    import checkpoint_pause

    from ulsweep.train import checkpoint as ck

    snapshot, copy = ck.snapshot, ck.device_to_host
    out = tmp_path / "p.json"
    checkpoint_pause.main(["--gb", "0.01", "--tensors", "4", "--dim", "32", "--matmuls", "2", "--steps", "4",
                           "--at", "1", "--repeats", "2", "--device", "cpu", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["mode"], r["repeat"]) for r in rows] == [(m, i) for i in range(2) for m in checkpoint_pause.MODES]
    for r in rows:
        none = next(x for x in rows if x["mode"] == "none" and x["repeat"] == r["repeat"])
        assert r["lost_s"] == pytest.approx(r["steps_s"] - none["steps_s"])
        assert ("write_s" in r) == (r["mode"] != "none") and r.get("write_s", 1) > 0
    assert ck.snapshot is snapshot and ck.device_to_host is copy


def test_group_sampling_times_each_mode_and_part_on_the_same_images(tmp_path):
    """benchmarks/group_sampling.py: one row per mode and part, every member's images counted, and the two
    modes' images the same up to rounding (stacked's grouped kernels against each member's own); then the
    bits/pixel rows, cuDNN's search off and on, and the caller's cuDNN setting left as it was."""
    import group_sampling

    search = torch.backends.cudnn.benchmark
    out = tmp_path / "g.json"
    assert group_sampling.main(["experiments/quickstart.yaml", "--members", "2", "--recon-images", "6",
                                "--samples", "4", "--repeats", "1", "--device", "cpu", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    rows, bpp = rows[:4], rows[4:]
    assert [(r["mode"], r["part"]) for r in rows] == [("each", "reconstruct"), ("each", "generate"),
                                                      ("stacked", "reconstruct"), ("stacked", "generate")]
    assert [r["images_per_member"] for r in rows] == [6, 4, 6, 4] and {r["members"] for r in rows} == {2}
    assert [(r["part"], r["cudnn_search"]) for r in bpp] == [("bpp_ae", False), ("bpp_base", False),
                                                             ("bpp_ae", True), ("bpp_base", True)]
    assert all(r["images_per_member"] == 6 and r["median_s"] > 0 and r["first_s"] > 0 for r in bpp)
    assert torch.backends.cudnn.benchmark is search
    for r in rows:
        assert r["images_per_s"] == pytest.approx(2 * r["images_per_member"] / r["median_s"])
        assert r["max_abs_uint8_diff"] <= 1
    with pytest.raises(SystemExit):
        group_sampling.main(["experiments/quickstart.yaml", "--members", "1"])


@pytest.mark.parametrize("kind", ["unfold", "channels-last", "nhwc", "loop"])
@pytest.mark.parametrize("conv", [dict(kernel_size=3, padding=1), dict(kernel_size=2, stride=2),
                                  dict(kernel_size=1), dict(kernel_size=3, stride=2, padding=1, bias=False)])
def test_batched_trials_conv_variants_compute_the_stacked_convolution(kind, conv):
    """`--conv unfold` / `channels-last` / `nhwc` / `loop` rows time the same convolutions as the library's grouped
    one: each trial's own nn.Conv2d on its own rows, forwards and input gradients."""
    import batched_trials as bt
    from ulsweep.models.stacked import StackedConv2d

    torch.manual_seed(0)
    convs = [torch.nn.Conv2d(3, 5, **conv) for _ in range(3)]
    x = torch.randn(3 * 2, 3, 8, 8, requires_grad=True)
    want = torch.cat([c(xk) for c, xk in zip(convs, x.chunk(3))])
    (gx_want,) = torch.autograd.grad(want.square().sum(), x)
    stacked = StackedConv2d(convs)
    with bt.stacked_conv(kind):
        got = stacked(x)
    assert StackedConv2d.forward is not bt.CONVS[kind]  # put back after the block
    (gx,) = torch.autograd.grad(got.square().sum(), x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, gx_want, atol=1e-4, rtol=1e-4)


def test_stacked_trials_take_the_math_attention_when_asked_and_stay_the_same_trials():
    """`--attention math` for the stacked program: its steps run with SDPA's math backend alone (the fused
    kernels off), and its trials are still the N trials stepped one by one."""
    import batched_trials as bt

    exp = _tiny_exp()
    objs = bt.trial_objectives(exp, "base", 2, 1, torch.device("cpu"))
    st = bt.StackedTrials(objs, exp.base_models[0].optim, bt.make_runtime(exp.ae.train), attention="math")
    with st.pick():
        assert torch.backends.cuda.math_sdp_enabled() and not torch.backends.cuda.flash_sdp_enabled()
    assert torch.backends.cuda.flash_sdp_enabled()  # as it was after the step
    ok = bt.check(exp, "base", 2, 4, 1, 2, torch.device("cpu"), attention="math", program="stacked")
    assert ok["max_rel_grad_diff"] < 1e-4 and ok["max_rel_weight_diff"] < 1e-3, ok


def test_regional_compilation_compiles_every_block_in_place_and_trains_the_same_trials(monkeypatch):
    """`--regions blocks`: each transformer and residual block of the stacked network compiled on its own (here
    through Dynamo's eager backend, which traces as Inductor would without its compile time), nothing else, the
    step's top left eager; the trials' gradients are those of the uncompiled program."""
    import batched_trials as bt
    from ulsweep.models.layers import ResBlock, TransformerBlock

    real = torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, mode=None, dynamic=None: real(self, backend="eager", dynamic=dynamic))
    monkeypatch.setattr(torch._dynamo.config, "cache_size_limit", torch._dynamo.config.cache_size_limit)
    exp = _tiny_exp()
    rt = bt.make_runtime(exp.ae.train)
    objs = bt.trial_objectives(exp, "ae", 2, 1, torch.device("cpu"))
    plain = bt.StackedTrials(copy.deepcopy(objs), exp.ae.optim, rt)
    st = bt.StackedTrials(objs, exp.ae.optim, rt, compile_mode="default", regions="blocks")
    compiled = [m for m in st.net.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert st.model is st.net and len(compiled) == st.regions > 0
    assert all(isinstance(m, (TransformerBlock, ResBlock)) for m in compiled)
    assert len(compiled) == sum(isinstance(m, (TransformerBlock, ResBlock)) for m in st.net.modules())
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 4, 1, 16, 16, generator=gen) * 2 - 1
    noise = bt.stacked_noise(objs[0], 2, 4, gen)
    want, got = plain.gradients(x, noise), st.gradients(x, noise)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-5, rtol=1e-4)
    torch._dynamo.reset()


def test_clip_trials_benchmark_rows_clip_as_the_old_per_tensor_function_did(tmp_path, monkeypatch, capsys):
    """benchmarks/clip_trials.py: the library's clipping against the per-tensor function it replaced,
    the same norms and gradients; a clipping that mixed the trials up shows in max_rel_diff."""
    import clip_trials as ct

    monkeypatch.setattr(ct, "stacked_shapes", lambda experiment, stage, overrides: [torch.Size([3, 4]),
                                                                                    torch.Size([5])])
    out = tmp_path / "clip.json"
    assert ct.main(["x.yaml", "--members", "3", "--device", "cpu", "--repeats", "2", "--warmup", "1",
                    "--programs", "per-tensor", "library", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["stage"], r["program"]) for r in rows] == [(s, p) for s in ("ae", "base")
                                                         for p in ("per-tensor", "library")]
    assert all(r["max_rel_diff"] < 1e-5 and r["ms"] > 0 and r["tensors"] == 2 for r in rows)
    assert "library" in capsys.readouterr().out
    import ulsweep.models.stacked as st

    with pytest.MonkeyPatch.context() as m:  # one norm for all trials together: no longer each trial's own
        real = st.trial_norms
        m.setattr(st, "trial_norms", lambda grads, n: real(grads, n).pow(2).sum().sqrt().expand(n))
        bad = ct.rows_for("ae", [torch.Size([3, 4])], 3, torch.device("cpu"), 1.0, 0, 1, ["library"])
    assert bad[0]["max_rel_diff"] > 1e-2


def test_compile_phases_table_gives_each_rows_step_by_part_and_its_phases():
    import compile_phases

    rows = [{"members": 18, "step_s": 143.2, "step_parts_s": {"build": 4.2, "setup": 1.0, "first_step": 130.1},
             "phases_s": {"bytecode_tracing": 3.9, "Scheduler.codegen": 49.2}},
            {"members": 1, "caches": "warm", "step_s": 127.4, "step_parts_s": None, "phases_s": None}]
    head, first, second = compile_phases.table(rows).splitlines()
    assert head.split()[:7] == ["members", "caches", "step", "s", "build", "setup", "first_step"]
    assert first.split()[:8] == ["18", "cold", "143.2", "4.2", "1.0", "130.1", "0.0", "3.9"]  # cold unless said
    assert "49.2" in first.split() and second.split()[:4] == ["1", "warm", "127.4", "0.0"]


def test_import_contention_times_each_set_alone_and_in_a_wave(tmp_path, monkeypatch, capsys):
    """benchmarks/import_contention.py: per module set, one interpreter alone and --procs at once, each timing its
    own imports (cheap standard-library sets here; the benchmark's own are MLflow, Ray and torch)."""
    import import_contention

    monkeypatch.setattr(import_contention, "SETS", {"light": ["json"], "heavier": ["json", "csv", "decimal"]})
    out = tmp_path / "ic.json"
    monkeypatch.setattr(sys, "argv", ["import_contention.py", "--procs", "3", "--out", str(out)])
    import_contention.main()
    rows = json.loads(out.read_text())["rows"]
    assert [(r["set"], r["procs"]) for r in rows] == [("light", 1), ("light", 3), ("heavier", 1), ("heavier", 3)]
    assert all(0 < r["median_s"] <= r["max_s"] <= r["wave_s"] for r in rows), rows
    assert rows[3]["modules"] == ["json", "csv", "decimal"]
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["set", "procs", "median", "s", "max", "s"] and len(table) == 5


def test_warm_group_step_times_both_variants_of_a_groups_first_steps(tmp_path):
    """benchmarks/warm_group_step.py: each variant in its own process, the warmed one warming before its steps."""
    import warm_group_step

    out = tmp_path / "w.json"
    assert warm_group_step.main(["--members", "2", "--batch", "2", "--preset", "tiny", "--image-size", "16",
                                 "--latent-channels", "2", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["cold", "warmed"] and "warm_s" not in rows[0] and rows[1]["warm_s"] > 0
    assert all(r["first_step_s"] > 0 and r["second_step_s"] > 0 and r["members"] == 2 for r in rows)


def test_encode_ahead_passes_checkpoints_on_to_both_encodings_and_compares_their_latents(tmp_path, digits_cache,
                                                                                         one_thread):
    """benchmarks/encode_ahead.py: the same fresh checkpoints passed on to an encoding one by one (one encoding
    each) and to the group's queue (what came by the time a thread was free, together), with one thread and with
    the library's; each stores every member's latents, which agree up to the grouped kernels' rounding."""
    import encode_ahead

    out = tmp_path / "ea.json"
    assert encode_ahead.main(["experiments/lf_sweep.yaml", "--members", "3", "--repeats", "1", "--interval", "0.05",
                              "--set", "data.path=builtin:digits", "--set", "data.image_size=16",
                              "--set", "ae.model.preset=tiny", "--set", "ae.model.downsample=4",
                              "--set", "ae.model.latent_channels=2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {r["mode"]: r for r in result["rows"]}
    assert set(rows) == {"one-by-one", "queued-1", "queued-3"}  # the library's ENCODERS and one thread
    assert rows["one-by-one"]["batches"] == [1, 1, 1]
    assert all(sum(r["batches"]) == 3 and 0 < r["after_last_s"] <= r["total_s"] for r in rows.values())
    assert result["env"]["device"] == "cpu" and result["env"]["latents_max_rel_diff"] < 1e-4
    assert set(result["env"]["median_after_last_s"]) == set(rows)


def test_member_fd_rows_split_a_members_scoring_into_features_and_the_rest(monkeypatch):
    """metrics.py --member-fd on CPU with two small domain CNNs in place of Inception and the domain extractor:
    both rows, scoring = features + overhead, and the caller's ULSWEEP_CACHE back afterwards."""
    import metrics

    from ulsweep.metrics.domain import DomainCNN

    monkeypatch.setenv("ULSWEEP_CACHE", "/nonexistent/kept")
    nets = [DomainCNN(f"d{i}", "cnn-s-v1", 1, 32, 10).eval().requires_grad_(False) for i in range(2)]
    rows = metrics.bench_member_fd(*nets, torch.device("cpu"), 1, n_gen=40, n_ref=20, n_members=3)
    assert os.environ["ULSWEEP_CACHE"] == "/nonexistent/kept"
    assert [(r["bench"], r["images"]) for r in rows] == [("gfd_member", 40), ("rfd_member", 20),
                                                          ("gfd_members_1", 120), ("gfd_members_2", 120),
                                                          ("gfd_members_3", 120)]
    for r in rows[:2]:
        assert r["seconds"] == r["runs"][0] > 0 and r["extract_s"] == r["extract_runs"][0] > 0
        assert r["overhead_s"] == pytest.approx(r["seconds"] - r["extract_s"])
    for r in rows[2:]:  # the members n at a time, against one at a time (the first row)
        assert r["seconds"] == r["runs"][0] > 0 and r["per_member_s"] == pytest.approx(r["seconds"] / 3)
        assert r["ratio_to_one_at_a_time"] == pytest.approx(r["seconds"] / rows[2]["seconds"])


def test_inception_profile_row_profiles_the_extractors_calls_at_the_evaluations_images():
    """metrics.py's `inception_profile` on CPU with a small domain CNN in place of Inception: its calls profiled
    on gray 32x32 uint8 images, the wall a call and the profile's breakdown (no GPU kernels here: busy 0)."""
    import metrics

    from ulsweep.metrics.domain import DomainCNN

    net = DomainCNN("d", "cnn-s-v1", 1, 32, 10).eval().requires_grad_(False)
    row = metrics.profile_inception(net, torch.device("cpu"), 4, calls=2)
    assert row["bench"] == "inception_profile" and row["batch"] == 4 and row["input"] == [1, 32, 32]
    prof = row["profile"]
    assert row["seconds"] == pytest.approx(prof["wall_s"] / 2) and prof["gpu_busy_s"] == 0
    assert set(prof) >= {"by_kind_frac_of_gpu", "top_kernels_ms", "kernels", "top_aten_ops_ms"}


def test_pick_conv_takes_the_variant_that_saves_the_most_only_when_it_clearly_beats_the_sweeps_own(tmp_path):
    """benchmarks/device/pick_conv.py: the `--set`s for the sweep after `levers.sh conv`, from its rows (in the order
    they ran: each way of convolving compiles cold in its first row)."""
    sys.path.insert(0, str(BENCH / "device"))
    import pick_conv

    def row(conv, search, ips=None, first=1.0, error=None):
        timed = {"images_per_s": ips, "ms_per_step": 1000 * 18 * 128 / ips, "first_step_s": first} if ips else {}
        return {"conv": conv, "cudnn_search": search} | timed | ({"error": error} if error else {})

    rows = [row("grouped", "on", 20_000.0, first=140.0), row("grouped", "off", 20_100.0),
            row("loop", "on", 24_000.0, first=200.0), row("loop", "off", 23_000.0)]
    # loop: 3,400 steps of 96.0 ms against 115.2 ms, 65 s sooner, its compile 60 s longer: 5 s saved
    assert pick_conv.pick(rows)[0] == ["--set", "resources.stack_conv=loop"]
    rows[3]["images_per_s"], rows[3]["ms_per_step"] = 26_000.0, 1000 * 18 * 128 / 26_000  # both levers at once
    assert pick_conv.pick(rows)[0] == ["--set", "resources.stack_conv=loop", "--set", "ae.train.cudnn_benchmark=false"]
    slow_compile = [row("grouped", "on", 20_000.0, first=140.0), row("loop", "on", 20_800.0, first=600.0)]
    args, why = pick_conv.pick(slow_compile)  # 4% faster: 15 s sooner over 3,400 steps, 460 s more compiling
    assert args == [] and "keeping" in why and "-445 s" in why
    assert pick_conv.pick(slow_compile, steps=200_000)[0] == ["--set", "resources.stack_conv=loop"]
    close = [row("grouped", "on", 20_000.0), row("loop", "on", 20_400.0)]  # under MIN_GAIN: noise, not a lever
    assert pick_conv.pick(close)[0] == []
    failed = [row("grouped", "on", 20_000.0), row("loop", "on", error="OutOfMemoryError: ...")]
    assert pick_conv.pick(failed)[0] == []
    args, why = pick_conv.pick([row("loop", "on", 30_000.0)])  # nothing to compare with: the sweep keeps its own
    assert args == [] and "no row of the sweep's own setting" in why
    f = tmp_path / "rows.json"
    f.write_text(json.dumps({"env": {}, "rows": rows}))
    out = subprocess.run([sys.executable, str(BENCH / "device" / "pick_conv.py"), str(f)], capture_output=True,
                         text=True, check=True)
    assert out.stdout.split() == ["--set", "resources.stack_conv=loop", "--set", "ae.train.cudnn_benchmark=false"]
    missing = subprocess.run([sys.executable, str(BENCH / "device" / "pick_conv.py"), str(tmp_path / "no.json")],
                             capture_output=True, text=True, check=True)
    assert missing.stdout.strip() == "" and "no rows" in missing.stderr


def test_eval_beside_writes_times_each_writer_and_the_previous_writer_saves_the_same_state(tmp_path):
    """benchmarks/eval_beside_writes.py: the rows in order, each beside-row with its writes' seconds; and its
    `previous` writer (the serialization before session 38, the before of the comparison) saves each member's
    state as the library's `save_member` does, tensor for tensor."""
    import eval_beside_writes as ebw
    from ulsweep.config import load_experiment
    from ulsweep.config.loading import parse_overrides
    from ulsweep.train.checkpoint import load_checkpoint
    from ulsweep.train.group import save_member

    sets = ["--set", "ae.train.eval_images=4", "--set", "ae.train.sample_steps=2"]
    out = tmp_path / "w.json"
    assert ebw.main(["experiments/quickstart.yaml", "--members", "2", "--dir", str(tmp_path), *sets,
                     "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["row"] for r in rows] == ["alone", "writes", "beside:library", "beside:one", "beside:previous",
                                        "alone again"]
    assert all(r["eval_s"] > 0 for r in rows if r["row"] != "writes")
    assert all(r["writes_s"] > 0 for r in rows[1:5]) and {r["members"] for r in rows} == {2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.json"]  # the checkpoints removed after each row

    exp = load_experiment("experiments/quickstart.yaml", parse_overrides(["ae.train.eval_images=4"]))
    exps, rt, ts, _ = ebw.build(exp, 2)
    a = load_checkpoint(ebw.save_previous(1, str(tmp_path / "prev"), ts, {}))[0]
    b = load_checkpoint(save_member(1, str(tmp_path / "lib"), ts, "ae", "h", {}, {}))[0]
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][n], b[part][n]) for n in a[part])
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[p][n], sb[p][n]) for p in sa for n in sa[p])
    with pytest.raises(SystemExit):
        ebw.main(["experiments/quickstart.yaml", "--members", "1"])


def test_checkpoint_gil_rows_alternate_and_the_previous_writer_writes_a_loadable_checkpoint(tmp_path):
    """benchmarks/checkpoint_gil.py: the alone row, then the previous and the library's writer and reader in turn,
    each with its seconds and the ticker's rate; its `previous` writer's checkpoint loads as the library's does,
    and its `previous` reader reads it."""
    import checkpoint_gil as cg
    from ulsweep.train.checkpoint import load_checkpoint

    out = tmp_path / "g.json"
    assert cg.main(["--mb", "0.2", "--tensors", "5", "--checkpoints", "2", "--repeats", "2", "--alone-s", "0.05",
                    "--latent-rows", "300", "--latent-dim", "8", "--dir", str(tmp_path), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["row"] for r in rows] == ["alone"] + ["previous", "library", "read:previous", "read:library",
                                                    "shards:previous", "shards:library"] * 2
    assert all(r["write_s"] > 0 and r["ticker_ops_per_s"] > 0 for r in rows[1:])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.json"]
    state = {"w": torch.arange(5.0)}
    path = cg.save_previous(str(tmp_path / "run"), 3, state, {"kind": "t"})
    got, meta = load_checkpoint(path)
    assert torch.equal(got["w"], state["w"]) and meta["step"] == 3 and meta["kind"] == "t"
    assert torch.equal(cg.load_previous(path)["w"], state["w"])
    import numpy as np

    from ulsweep.train.latent_store import _shard_bytes  # the previous shards: the library's bytes

    z = np.random.default_rng(0).random((5, 8), dtype=np.float32)
    assert cg.shard_previous(z, 3) == bytes(_shard_bytes(z, 3))
    with pytest.raises(SystemExit):
        cg.main(["--tensors", "0"])


def test_group_build_rows_alternate_and_both_ways_stack_the_same_weights(tmp_path):
    """benchmarks/group_build.py: `each` and `per-seed` rows in turn over the sweep's planned trials, and the
    stacked weights of both ways the same (its exit code and `same_weights` say so)."""
    import group_build

    out = tmp_path / "b.json"
    assert group_build.main(["experiments/quickstart.yaml", "--repeats", "2", "--out", str(out)]) == 0
    got = json.loads(out.read_text())
    assert [r["row"] for r in got["rows"]] == ["each", "per-seed"] * 2 and got["same_weights"] is True
    assert all(r["seconds"] > 0 and r["members"] == got["rows"][0]["members"] > 1 for r in got["rows"])


def test_prepare_imports_rows_alternate_and_only_the_ahead_rows_leave_the_step_nothing_to_import(tmp_path):
    """benchmarks/prepare_imports.py: `off` and `on` rows in turn, each a fresh process preparing the quickstart's
    planned group with a compiled step; the `on` rows name the wait for the imports among the preparation's parts,
    the `off` rows do not (they import in the step)."""
    import prepare_imports

    out = tmp_path / "p.json"
    assert prepare_imports.main(["experiments/quickstart.yaml", "--set", "ae.train.compile=true", "--repeats", "1",
                                 "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["off", "on"] and all(r["members"] > 1 for r in rows)
    assert ["prepare_inductor_s" in r["parts"] for r in rows] == [False, True]
    assert all(r["prepare_s"] > 0 and r["first_step_imports_s"] >= 0 for r in rows)
