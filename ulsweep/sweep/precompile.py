"""Compile the trials' training steps ahead of them (`resources.precompile`): the autoencoders' before the first
wave takes its first step, the base models' while the autoencoders train.

A base trial starts only when its autoencoder is done, and the first base trial of an architecture on a node then
compiles its training step from cold (on one H200, 48-67 s of CUDA-graph compilation in the published sweeps,
`time/first_step_s`), on the sweep's critical path: in a sweep whose autoencoders finish together, every base
trial waits for it or trains uncompiled meanwhile (ulsweep/train/compile_gate.py). Nothing about that compilation
depends on the autoencoder's weights: only on the base model, its batch, the latent shape and the noise schedule.

So the driver starts, beside the first autoencoder trials, one Ray task per distinct base-model step that the sweep
will compile (`jobs`), chained so that one runs at a time (`after`). The task trains that base model for a few
steps on random latents of the trial's shape through the library's own loop (`ulsweep.train.loop.train`: the same
objective, compile mode, autocast and compile gate as the trial), in a scratch directory it deletes. Its first step
enters the compile gate as the first process of the key and compiles; the gate's marker and torch's caches
(Inductor's FX graph cache, AOTAutograd's, Triton's kernels, all on the node's disk) are what the base trials then
find. A base trial that starts while the task still compiles trains uncompiled until it is done (gate_compile:
eager) or waits for it. With `eval.sample_compile` the task then runs one batch of the final evaluation's
generation the same way (the EMA base model and a decoder of the trial's architecture, random weights), so that the
base trials' gFD sampling starts compiled too (its gate keys on the networks; the caches on the batch's shape, the
trial's first).

The autoencoders' step is compiled the same way (`compile_ae`: three steps on random images; for trials that train
in stacked groups, `resources.stack_trials`, the group's program at the group's size). Its first trials
start with the task, but reach their first step only after their imports, tracking and data (~25 s into a
sweep's first wave on one H200, session 21), by when the task is compiling: they train uncompiled meanwhile, and
the first of them no longer compiles for all the others while they train uncompiled beside it (151 s on one
H200 then, against 77.5 s for the same compile on an idle machine).

The task reserves no Ray resources (`start` says why) and warms the node it runs on; on a cluster the trials of
other nodes compile as before. With `search.method: optuna` the shapes of later trials are not known in advance:
only the experiment's own `ae.model` is compiled ahead.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
import shutil
import tempfile
import time
from typing import Any

from ulsweep.config import ExperimentConfig, dump_yaml, to_dict
from ulsweep.sweep.space import find_base, planned_overrides, trial_experiment

STEPS = 3  # CUDA graphs: a warm-up run, the recording, a replay


def wanted(exp: ExperimentConfig) -> bool:
    """Whether the sweep compiles steps ahead (`resources.precompile`; auto: where there is something to compile
    and the trials train in one process, whose graphs the task's are)."""
    setting = exp.resources.precompile
    if setting != "auto":
        return setting == "on"
    return exp.resources.num_workers <= 1 and exp.compiles_a_step()


def jobs(exp: ExperimentConfig) -> list[dict[str, Any]]:
    """The distinct training steps the sweep's trials will compile, autoencoders' first: one {"stage": "ae",
    "overrides" (those of the first trial that has it), "latent_shape"} per distinct autoencoder step (its model,
    its loss but the loss factor and sigmoid bias, which enter the graph as tensors, its batch, compile mode and
    precision) and one {"stage": "base", "overrides", "base", "latent_shape"} per distinct (base model, latent
    shape, noise schedule), over the planned autoencoder trials (for optuna, the experiment's own autoencoder
    only); stages that do not compile are left out."""
    if not wanted(exp):
        return []
    from ulsweep.sweep.searcher import ae_key, base_key
    from ulsweep.sweep.stacking import all_groups
    from ulsweep.train.identity import latent_shape  # no torch in the driver

    raw = to_dict(exp)
    aes, out, seen = [], [], set()
    sizes = {key: len(g) for _, g in all_groups(exp) for key in g}  # a stacked group's trials: its size
    for i, ov in enumerate(planned_overrides(exp.search, exp.ae.train.seed) or [{}]):
        trial = trial_experiment(raw, ov)
        shape = latent_shape(trial)
        if trial.ae.train.compile is not False:
            members = sizes.get(ae_key(i), 1)
            claim = ae_claim(trial, members)
            if claim not in seen:
                seen.add(claim)
                aes.append({"stage": "ae", "overrides": ov, "latent_shape": shape, "claim": claim}
                           | ({"members": members} if members > 1 else {}))
        for b in trial.base_models:
            if b.train.compile is False:
                continue
            members = sizes.get(base_key(ae_key(i), b.name), 1)
            claim = base_claim(trial, b, members)
            if claim not in seen:
                seen.add(claim)
                out.append({"stage": "base", "overrides": ov, "base": b.name, "latent_shape": shape, "claim": claim}
                           | ({"members": members} if members > 1 else {}))
    return aes + out


def ae_claim(trial: ExperimentConfig, members: int = 1) -> str:
    """The name of the autoencoder step that `trial` trains (in a stacked group of `members`), as far as its graph
    depends on `trial` (`_graph_of_ae`, the data): one job of `jobs` each, and its task's claim
    (compile_gate.claim_ahead), which the trials of that step look for (`TrainHooks.compile_claim`)."""
    return _claim(("ae", dump_yaml(_graph_of_ae(trial.ae)), repr(trial.data), members))


def base_claim(trial: ExperimentConfig, base, members: int = 1) -> str:
    """As `ae_claim`, for the step of base model `base` (a BaseStageConfig of `trial`): the base model but its seed,
    the latent shape and the noise schedule (the base model's, from the autoencoder's lambda_z(0))."""
    from ulsweep.train.identity import latent_shape  # no torch in the driver

    train = dataclasses.replace(base.train, seed=0)  # the seed changes no graph
    return _claim(("base", dump_yaml(dataclasses.replace(base, train=train)), tuple(latent_shape(trial)),
                   trial.ae.loss.logsnr_z0, members))


def claim_of(exp: ExperimentConfig, kind: str, base_name: str | None = None, members: int = 1) -> str | None:
    """The claim a trial of `kind` ("ae", or "base" of base model `base_name`) looks for: None where the sweep
    compiles no step ahead (`wanted`), else `ae_claim`'s or `base_claim`'s."""
    if not wanted(exp):
        return None
    return ae_claim(exp, members) if kind == "ae" else base_claim(exp, find_base(exp, base_name), members)


def _claim(ident: tuple) -> str:
    return "precompile-" + hashlib.sha256(repr(ident).encode()).hexdigest()[:24]


def _graph_of_ae(ae):
    """What of an autoencoder's config its compiled step depends on (`jobs`): the training settings that change
    no graph (seed, steps, schedules of logging and evaluation, ...) and the two loss weights left out."""
    t = ae.train
    loss = dataclasses.replace(ae.loss, loss_factor=1.0, sigmoid_bias=0.0)
    return {"model": ae.model, "loss": loss, "train": (t.batch_size, t.compile, t.precision, t.device)}


def _schedule(exp: ExperimentConfig, base):
    from ulsweep.train.build import base_schedule

    return base_schedule(exp.ae.loss, base)


def _keeping_threads(fn):
    """`fn` with torch's thread count as it was once it returns (`_runtime` sets a group's on CPUs: a task's
    process ends after it, a caller in its own process, a test, keeps its own)."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        import torch

        before = torch.get_num_threads()
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return wrapped


@_keeping_threads
def compile_ae(raw: dict, overrides: dict, steps: int = STEPS, members: int = 1) -> dict[str, Any]:
    """Train the trial experiment's autoencoder (`raw` with `overrides`) for `steps` steps on random images through
    the library's loop and the trial's own objective, in a scratch directory (with `members` > 1, that many of
    them as the stacked program of a group, ulsweep/train/group.py); with `eval.sample_compile`, then reconstruct
    random images as the trial's final evaluation does, one call of the one size its calls have
    (`sampling_calls`), so that the trials' reconstructions start compiled too. Returns {"stage":
    "ae", "latent_shape", "members", "compile_gate" (as compile_base's), with eval.sample_compile "sampling"
    ("compiled", or "busy": another process compiled it), "t_start", "step_s", "step_parts_s", "step_phases_s"
    (as compile_base's), "seconds"}."""
    import torch

    from ulsweep.data.sources import DeviceSplit
    from ulsweep.models.stacked import plain
    from ulsweep.train import accel
    from ulsweep.train.build import build_autoencoder, latent_shape
    from ulsweep.train.sampling import member_by_member, sample_rows, sampling_calls
    from ulsweep.train.stage1 import AEObjective, reconstruct_images

    t0 = time.time()
    exp = trial_experiment(raw, overrides)
    tc = _short(exp.ae.train, steps)
    rt = _runtime(exp, tc, members)
    image_shape, shape = _image_shape(exp), latent_shape(exp)
    c = image_shape[0]
    gen = torch.Generator(rt.device).manual_seed(0)
    source = DeviceSplit(torch.rand(tc.batch_size, *image_shape, generator=gen, device=rt.device) * 2 - 1)
    objectives = [AEObjective(build_autoencoder(exp.ae, c).to(rt.device), exp.ae.loss, image_shape, shape)
                  for _ in range(members)]
    t_built = time.time()
    ts, how, marks = _train_briefly(objectives, lambda o: o.ae, source, exp.ae.optim, tc, rt, "ae",
                                    conv=exp.resources.stack_conv)
    out = {"stage": "ae", "latent_shape": list(shape), "members": members, "compile_gate": how, "t_start": t0,
           "step_s": time.time() - t0, "step_parts_s": step_parts(t0, t_built, marks),
           "step_phases_s": accel.compile_phase_seconds()}
    if exp.eval.sample_compile:  # as the trial's evaluation reconstructs: a group's, as resources.stack_sampling says
        # the AdamW moments and the EMA copy are not needed to reconstruct: their memory back to the card, which
        # this task shares with the training trials (75,605 of 81,559 MiB at its peak in session 27, one H100)
        ts.opt = ts.ema = None
        if rt.device.type == "cuda":
            torch.cuda.empty_cache()
        net, k = (plain(ts.net), 1) if member_by_member(exp, members) else (ts.net, members)
        n, _ = sampling_calls(exp.ae.train.eval_images, sample_rows(exp.eval.sample_batch, image_shape), k)
        x = torch.rand(n, *image_shape, generator=gen, device=rt.device) * 2 - 1
        _, compiled = reconstruct_images(net.eval(), x, exp, ts.gen if k > 1 else gen, k)
        out["sampling"] = "compiled" if compiled else "busy"
    return out | {"seconds": time.time() - t0}


def _image_shape(exp: ExperimentConfig) -> tuple[int, int, int]:
    """(channels, size, size) of the images the trials train on: the dataset's channels at `data.image_size`."""
    from ulsweep.data.sources import open_splits

    size = exp.data.image_size
    return open_splits(exp.data).image_shape[0], size, size


def _short(tc, steps: int):
    return dataclasses.replace(tc, steps=steps, log_every=0, eval_every=0, ckpt_every=0, keep_checkpoints=1)


def _runtime(exp: ExperimentConfig, tc, members: int = 1):
    """The task's runtime, as its trials' (or, `members` > 1, their group's): on CPUs with the group's threads,
    which Inductor's C++ kernels and so its cache key depend on (the quickstart's groups of two, session 41: the
    task compiled under Ray's 1 thread for a task of 0 CPUs, the group's step under 2 missed its caches and
    compiled again, 113 s). A single trial's process has Ray's count for its CPUs, as the task's does for most."""
    import torch

    from ulsweep.sweep.stacking import group_threads
    from ulsweep.train.runtime import make_runtime, require_gpus

    require_gpus(exp.resources, "the precompile task", "it would compile graphs they never use")
    rt = make_runtime(tc)
    if rt.device.type == "cpu" and members > 1:
        torch.set_num_threads(group_threads(exp, members))
    return rt


def _train_briefly(objectives: list, net, source, optim, tc, rt, kind: str, label: str = "",
                   conv: str = "grouped"):
    """`tc.steps` steps of one trial's objective, or of several as a group's stacked program
    (ulsweep/train/group.py; its convolutions as `conv`, resources.stack_conv, says), on batches of `source`
    through the library's loop in a scratch directory it deletes; `net(objective)` is the network an objective
    trains. Returns the TrainState, how its first
    compiled step got through the compile gate, and the loop's marks (`t_setup_end`, `t_first_step_end`, ...)."""
    import torch

    from ulsweep.train.group import GroupObjective, GroupSource, GroupTrainState
    from ulsweep.train.hooks import TrainHooks
    from ulsweep.train.loop import RunSpec, train
    from ulsweep.train.state import TrainState

    if len(objectives) == 1:
        objective, ts = objectives[0], TrainState(net(objectives[0]), optim, rt, 0)
    else:
        objective = GroupObjective(objectives, conv)
        gens = [torch.Generator(rt.device).manual_seed(i) for i in range(len(objectives))]
        ts = GroupTrainState(net(objective.stacked), optim, rt, gens)
        source = GroupSource([source] * len(objectives))

    scratch = tempfile.mkdtemp(prefix="ulsweep-precompile-")
    try:
        spec = RunSpec(scratch, kind, f"precompile {label or kind}", "precompile", "", {}, {})
        res = train(objective, source, lambda ema, final: ({}, {}), ts, tc, spec, TrainHooks())
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    marks = res.extra.get("marks", {})
    return ts, marks.get("compile_gate", "busy" if tc.gate_compile else "ungated"), marks


def step_parts(t0: float, t_built: float, marks: dict) -> dict[str, float]:
    """Where a task's seconds to its step's end went, from its wall-clock marks: `build` (the experiment, the random
    inputs, the networks), `setup` (a group's stacked program, the optimizer and EMA, the loop's own),
    `first_step` (the compile gate, the compile of the step and its first run: `step_phases_s` splits the
    compile), `steps` (the other steps, with CUDA graphs their capture). A part whose mark is missing is left out
    (its seconds go to the next part)."""
    out, last = {"build": t_built - t0}, t_built
    for part, mark in (("setup", "t_setup_end"), ("first_step", "t_first_step_end"), ("steps", "t_train_end")):
        t = marks.get(mark)
        if isinstance(t, (int, float)) and t >= last:
            out[part], last = t - last, t
    return {k: round(v, 1) for k, v in out.items()}


@_keeping_threads
def compile_base(raw: dict, overrides: dict, base_name: str, steps: int = STEPS, members: int = 1) -> dict[str, Any]:
    """Train base model `base_name` of the trial experiment (`raw` with `overrides`) for `steps` steps on random
    latents through the library's loop, in a scratch directory (with `members` > 1, that many as the stacked
    program of a group, ulsweep/train/group_base.py); returns what it did: {"stage": "base", "base",
    "latent_shape", "members", "compile_gate" (how its first compiled step got through the gate: "first" or
    "after" compiled, "done" found it compiled, "busy" another process compiled it meanwhile; "ungated" with
    train.gate_compile: false), "t_start" (when the task started, time.time()), "step_s" (seconds to the step's
    end: set-up, compile, the steps), "step_parts_s" (`step_parts`: those seconds by part), "step_phases_s"
    (`accel.compile_phase_seconds` then: the compile by phase), with eval.sample_compile "sampling"
    (`_compile_sampling`), and "seconds"}."""
    import torch

    from ulsweep.data.sources import DeviceSplit
    from ulsweep.train import accel
    from ulsweep.train.build import build_base_model, latent_shape
    from ulsweep.train.stage2 import BaseObjective

    t0 = time.time()
    exp = trial_experiment(raw, overrides)
    base = find_base(exp, base_name)
    tc = _short(base.train, steps)
    rt = _runtime(exp, tc, members)
    shape = latent_shape(exp)
    gen = torch.Generator(rt.device).manual_seed(0)
    source = DeviceSplit(torch.randn(tc.batch_size, *shape, generator=gen, device=rt.device))
    objectives = [BaseObjective(build_base_model(base, shape[0]).to(rt.device), _schedule(exp, base),
                                base.loss.sigmoid_bias, shape) for _ in range(members)]
    t_built = time.time()
    ts, how, marks = _train_briefly(objectives, lambda o: o.net, source, base.optim, tc, rt, "base", base_name,
                                    exp.resources.stack_conv)
    out = {"stage": "base", "base": base_name, "latent_shape": list(shape), "members": members, "compile_gate": how,
           "t_start": t0, "step_s": time.time() - t0, "step_parts_s": step_parts(t0, t_built, marks),
           "step_phases_s": accel.compile_phase_seconds()}
    if exp.eval.sample_compile:
        out["sampling"] = _compile_sampling(exp, base, ts.ema.shadow, shape, rt.device, members)
    return out | {"seconds": time.time() - t0}


def _compile_sampling(exp: ExperimentConfig, base, ema_net, shape, device, members: int = 1) -> str:
    """The generation that the base trial's final evaluation compiles (`eval.sample_compile`): the EMA base model
    and a decoder of the trial's autoencoder architecture (random weights: only shapes matter), through the
    evaluation's own `sampling_networks` and `generate`, one call of the one size the trial's calls have
    (`sampling_calls`; a group's: one member's through ordinary networks with `resources.stack_sampling` each, as
    the group samples; with stacked, every member's share at once). Returns "compiled", or "busy" when another
    process was compiling them (nothing compiled here)."""
    import torch

    from ulsweep.diffusion import MemberGenerators
    from ulsweep.models.stacked import plain, stack
    from ulsweep.train.build import build_autoencoder
    from ulsweep.train.sampling import (member_by_member, sample_rows, sampling_calls, sampling_networks,
                                        sampling_precision)
    from ulsweep.train.stage2 import generate

    if member_by_member(exp, members):
        ema_net, members = plain(ema_net), 1
    image_shape = _image_shape(exp)
    aes = [build_autoencoder(exp.ae, image_shape[0]).to(device) for _ in range(members)]
    ae = (stack(aes, exp.resources.stack_conv) if members > 1 else aes[0]).eval().requires_grad_(False)
    n, _ = sampling_calls(exp.eval.gfd_samples if exp.eval.extractor != "none" else 64,
                          sample_rows(exp.eval.sample_batch, image_shape), members)
    gens = [torch.Generator(device).manual_seed(i) for i in range(members)]
    gen = MemberGenerators(gens) if members > 1 else gens[0]
    ev = exp.eval
    with (sampling_precision(ev.sample_precision, device),
          sampling_networks([ema_net, ae.decoder], True, ev.sample_precision, device,
                            f"precompile {base.name} sampling") as (net, decoder)):
        if net is ema_net:  # another process holds the gate: it compiles them
            return "busy"
        generate(net, ae, exp, base, n, shape, image_shape, gen, exp.eval.sample_batch, decoder, members)
    return "compiled"


def start(exp: ExperimentConfig, out, workers_keep_gpus: bool = False) -> list:
    """Start the tasks of `jobs(exp)` on the running Ray instance; returns [(label, object ref)].

    The tasks reserve no resources: the trials hold them all (ten autoencoders at 0.1 GPU fill a GPU, and a task
    holding a trial's share would push one of them into a later wave). A task's compile runs on CPUs the trials
    share anyway (a base trial compiling for itself would use them too), at the trials' priority: at the lowest
    (nice 19) the task never finished its compile beside two busy autoencoders on 2 cores, and every base trial,
    finding the gate held, trained uncompiled throughout (benchmarks/results/cpu-sweep-wall-precompile-nice19.json).
    On the GPU each takes three steps at one trial's batch and one batch of reconstruction or generation. The task
    is pinned to a node with GPUs and sees them (`gpu_node_options`; `workers_keep_gpus`: the driver's Ray leaves
    them visible to what reserves none)."""
    import ray

    todo = jobs(exp)
    if not todo:
        return []
    placed = gpu_node_options(exp, workers_keep_gpus)
    if placed is None:
        print("precompile: no node with GPUs yet; the base trials compile for themselves", file=out, flush=True)
        return []
    # max_calls 1: the worker exits after its task, with its CUDA context and compile workers
    opts: dict[str, Any] = {"num_cpus": 0, "num_gpus": 0, "max_retries": 0, "max_calls": 1, **placed}
    task = ray.remote(**opts)(after)
    raw = to_dict(exp)
    labels = [label(j) for j in todo]
    print(f"precompile: {len(todo)} step(s) compiled ahead of their trials, one after another: {'; '.join(labels)}",
          file=out, flush=True)
    started, previous = [], []
    for lab, j in zip(labels, todo):
        members = j.get("members", 1)
        args = ((compile_ae, raw, j["overrides"], STEPS, members) if j["stage"] == "ae"
                else (compile_base, raw, j["overrides"], j["base"], STEPS, members))
        ref = task.remote(previous, j["claim"], *args)
        started.append((lab, ref))
        previous = [ref]  # in a list, which Ray passes on as it is: the next task waits for it, not for its value
    return started


def after(previous: list, claim: str, fn, *args) -> dict[str, Any]:
    """`fn(*args)` once the task of `previous` (a list of at most one Ray object ref) has ended, whether it
    returned, failed or was cancelled, with its step claimed (`claim`, compile_gate.claim_ahead) from the start,
    before the wait: its trials, which start with the tasks, then train uncompiled until it has compiled the step,
    rather than compile it themselves where they reach the gate first. `start` chains the tasks so that one
    compiles at a time. Side by side they
    held two compiled programs' memory beside the trials' own, and competed for the CPUs with each other as well
    as with the trials. In session 26 (one H100, lf_sweep's 18 autoencoders as one stacked group of ~35 GB,
    benchmarks/results/h100-lf-sweep-partial-s26.tgz at commit ef0ba54) the two tasks filled the 80-GB card 90 s
    into the sweep and both ended within the next 70 s with nothing compiled that the group then found: it
    compiled for itself, 170 s with the GPU idle. The autoencoders' task, which trials wait on from their first
    step, comes first; the base models' tasks have the autoencoders' training to run in."""
    from ulsweep.train.compile_gate import claim_ahead

    with claim_ahead(claim):
        if previous:
            import ray

            ray.wait(previous, num_returns=len(previous), timeout=None, fetch_local=False)
        return fn(*args)


# Ray makes a worker that reserves no GPU see none (CUDA_VISIBLE_DEVICES "") unless this is in its environment
# (ray-project/ray#54928, from Ray 2.50; the default since #62492): the driver puts it in the environment of the
# Ray it starts or joins (`driver._init_ray`), so that the groups' actors and the precompile tasks, which reserve no
# GPU, see the node's GPUs without a runtime_env of their own, and a local Ray runs them in the workers it started
# ahead rather than in new processes (session 41, one H100: 3.3 s from the autoencoder group's new process to its
# actor's first line, which began 4.7 s after the driver created it, and 13 s before the autoencoders' precompile
# task began, beside the 18 trials' processes starting).
KEEP_GPUS_ENV = {"RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}


def keep_gpus_env() -> dict[str, str]:
    """`KEEP_GPUS_ENV` where this Ray reads it (the flag's name, checked where Ray defines it) and the driver's
    environment does not set the flag itself; else {} (an older Ray, or one that moved the flag), and the actors
    and tasks keep their runtime_env."""
    name = next(iter(KEEP_GPUS_ENV))
    if name in os.environ:
        return {}
    try:
        from ray._private import accelerators
    except ImportError:
        return {}
    return dict(KEEP_GPUS_ENV) if getattr(accelerators, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO_ENV_VAR", None) == name \
        else {}


def gpu_node_options(exp: ExperimentConfig, workers_keep_gpus: bool = False) -> dict[str, Any] | None:
    """Ray options that put a task or actor that reserves no GPU where the trials' GPUs are, seeing them: pinned
    to a node with GPUs and, unless every worker of the Ray in use has `KEEP_GPUS_ENV` (`workers_keep_gpus`: the
    driver put it there), with a runtime_env that keeps its CUDA_VISIBLE_DEVICES
    (RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES), which makes Ray start a new process for it. {} when the trials
    train on CPUs; None when no node has GPUs yet."""
    if exp.resources.gpus_per_worker <= 0:
        return {}
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = next((n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get("GPU", 0) > 0), None)
    if node is None:
        return None
    placed: dict[str, Any] = {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}
    if not workers_keep_gpus:
        placed["runtime_env"] = {"env_vars": {"RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES": "1"}}
    return placed


def label(job: dict) -> str:
    """A job of `jobs` in words: "ae" or "base NAME", then the overrides of its first trial."""
    stacked = f" (a stacked group of {job['members']})" if job.get("members", 1) > 1 else ""
    return (f"base {job['base']}" if job["stage"] == "base" else "ae") + stacked + "".join(
        f", {k}={v}" for k, v in job["overrides"].items())


def describe(r: dict) -> str:
    """One finished task's line: what it compiled, how it got through the gate, its seconds, and its step's
    seconds by part."""
    sampling = f", sampling {r['sampling']}" if "sampling" in r else ""
    stacked = f" (a stacked group of {r['members']})" if r.get("members", 1) > 1 else ""
    what = f"base {r['base']}{stacked} at latents" if r["stage"] == "base" else f"ae{stacked} to latents"
    parts = ", ".join(f"{k.replace('_', ' ')} {v:.0f}" for k, v in (r.get("step_parts_s") or {}).items())
    step = f" (the step {r['step_s']:.0f} s{': ' + parts if parts else ''})" if "step_s" in r else ""
    return (f"precompile: {what} {tuple(r['latent_shape'])}: {r['compile_gate']}{sampling} in {r['seconds']:.0f} s"
            f"{step}")


def report(started: list, out) -> list[dict[str, Any]]:
    """What the tasks `start` returned ([(label, ref)]) did, one line each; a task that failed or has not finished
    is named, never fatal: the trials then compile for themselves."""
    import ray

    if not started:
        return []
    done, pending = [], 0
    for lab, ref in started:
        if not ray.wait([ref], timeout=0)[0]:
            ray.cancel(ref, force=True)
            pending += 1
            continue
        try:
            r = ray.get(ref)
        except Exception as e:  # noqa: BLE001 - a warm-up's failure costs the trials only their own compile
            cause = getattr(e, "cause", None) or e  # the task's own exception inside Ray's wrapper
            print(f"precompile: {lab} failed ({type(cause).__name__}: {str(cause)[:300]}); its trials compiled "
                  "for themselves", file=out, flush=True)
            continue
        done.append(r)
        print(describe(r), file=out, flush=True)
    if pending:
        print(f"precompile: {pending} task(s) unfinished at the sweep's end, cancelled", file=out, flush=True)
    return done
