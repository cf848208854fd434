"""Several stage-1 runs of one architecture trained as one program: issue 23's stacked trials.

A bitrate sweep's autoencoders differ in the decoder's loss factor and sigmoid bias and in their seed, never in a
shape, and one of them at batch 128 leaves most of a GPU idle (its kernels are too small). `train_autoencoders`
trains K such runs as one network (`ulsweep.models.stacked`: every layer's weights stacked, the K batches one after
another on the batch dimension) through the one training loop (ulsweep/train/loop.py), so that a step costs one
run's kernel launches for K runs' arithmetic. Each member is the run it would have been alone:

- its weights initialized from its own seed, as `train_autoencoder` does;
- its batches and noise drawn from its own generator (seeded as its own run's), so that it sees the same data
  order and diffusion times;
- its own loss factor and bias (the stacked objective's (K,) buffers), its own gradient norm and clipping, and
  AdamW and the EMA, which are elementwise, over its own rows of the stacked tensors;
- its own final evaluation, with its own noise (the stacked networks' bits/pixel and reconstructions of all
  members at once, then its PSNR and rFD), and its checkpoint, images and result.json in its own run directory,
  in the layout of a run trained alone (`load_frozen_autoencoder` and the base-model stage read it unchanged).

Up to the rounding of the batched kernels, and the dropout masks (drawn for all members at once from torch's
global generator), member k's weights are those of its run alone (tests/test_group.py). The group itself keeps its
checkpoints (the stacked state, every member's generator) in `group_dir`, and a killed group resumes from them.
What the group shares: the step, the data split (one copy on the device) and the evaluation images. A member whose
loss turns non-finite fails as its run alone would, and the others train on (`GroupHooks.diverged`): no member's
rows reach another's, so its NaNs stay in its own rows, which the group computes on but no longer reads.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable, Collection, Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch
from torch import nn

from ulsweep.config import ExperimentConfig, config_hash, dump_yaml, to_dict
from ulsweep.data.sources import DeviceSplit, train_source
from ulsweep.diffusion import MemberGenerators
from ulsweep.models.stacked import clip_trials, stack
from ulsweep.train import accel
from ulsweep.train.build import autoencoder_init, build_autoencoder
from ulsweep.train.build import latent_shape as latent_shape_of
from ulsweep.train.checkpoint import (copy_stream, device_to_host, finished_result, save_checkpoint, update_meta,
                                      write_images, write_result)
from ulsweep.train.evaluation import PartTimer, pop_seconds
from ulsweep.train.hooks import StageResult, TrainHooks, TrainingDiverged
from ulsweep.train.identity import MEMBER_KEYS, shared_settings  # what members may differ in, and must share
from ulsweep.train.loop import RunSpec, train
from ulsweep.train.runtime import Runtime, device_memory, make_runtime
from ulsweep.train.stage1 import (KIND, AEObjective, ae_extractor_ahead, evaluate_aes, final_evaluations, say_done,
                                  stage1_hash)
from ulsweep.train.state import TrainState, rng_state

class GroupSource:
    """Each member's batch from its own source and generator, one after another on the batch dimension."""

    def __init__(self, sources: Sequence):
        self.sources = list(sources)
        self.local_batches = getattr(self.sources[0], "local_batches", False)

    def draw(self, batch_size: int, gen: MemberGenerators) -> torch.Tensor:
        return torch.cat([s.draw(batch_size, g) for s, g in zip(self.sources, gen.gens)])

    def state_dict(self) -> dict:  # a stream's position per member; a device split has none
        return {"members": [s.state_dict() if hasattr(s, "state_dict") else None for s in self.sources]}

    def load_state_dict(self, state: dict | None, batch_size: int) -> None:
        for s, st in zip(self.sources, (state or {}).get("members", [None] * len(self.sources))):
            if hasattr(s, "load_state_dict"):
                s.load_state_dict(st, batch_size)

    def close(self) -> None:
        for s in {id(s): s for s in self.sources}.values():
            if hasattr(s, "close"):
                s.close()


class GroupObjective(nn.Module):
    """K members' objectives as one stacked objective (what the loop compiles and steps).

    forward(x (K*B, ...), noise) gives every member's per-example losses on its own rows; `draw_noise` draws each
    member's from its own generator. `dims` is a member's dimensions over K, so that the loop's loss, the mean over
    all K*B rows per dimension, is the sum of the members' own losses: each member's gradient is its own. `reduce`
    takes a per-example value (or the (K,) gradient norms) to each member's mean, so every logged metric is a list
    of K values."""

    def __init__(self, objectives: Sequence[AEObjective], conv: str = "grouped"):
        super().__init__()
        self.k, self.member = len(objectives), objectives[0]
        self.stacked = stack(list(objectives), conv)  # conv: resources.stack_conv
        self.dims = objectives[0].dims / self.k
        self.progress_keys = objectives[0].progress_keys

    def extra_repr(self) -> str:
        return f"members={self.k}"

    def draw_noise(self, batch: int, gen: MemberGenerators) -> dict[str, torch.Tensor]:
        each = [self.member.draw_noise(batch, g) for g in gen.gens]
        return {key: torch.cat([n[key] for n in each]) for key in each[0]}

    def forward(self, x: torch.Tensor, noise: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.stacked(x, noise)

    def reduce(self, v: torch.Tensor) -> torch.Tensor:
        return v.detach().reshape(self.k, -1).float().mean(1)

    def curves(self, means: dict[str, list[float]]) -> dict[str, list[float]]:
        each = [self.member.curves({key: v[i] for key, v in means.items()}) for i in range(self.k)]
        return {key: [c[key] for c in each] for key in each[0]}


class GroupTrainState(TrainState):
    """The stacked network's TrainState: one AdamW and one EMA over the stacked tensors (elementwise, so each
    member's own), each member's generator, and each member's gradient clipped by its own norm."""

    def __init__(self, net: nn.Module, oc, rt, gens: Sequence[torch.Generator]):
        super().__init__(net, oc, rt, 0)
        self.gen, self.k = MemberGenerators(gens), len(gens)

    def optimizer_step(self, loss: torch.Tensor) -> torch.Tensor:
        """Backward, each member's clipping, the step; returns the K gradient norms before clipping."""
        loss.backward()
        # uncompiled (`clip_trials`: a few kernels for the norms, one division a tensor); compiled, as until session
        # 29, it was a second graph for every group to compile (66.7 s for lf_sweep's autoencoders on an H100)
        norms = clip_trials([p.grad for p in self.net.parameters() if p.grad is not None], self.k, self.oc.grad_clip)
        self.apply_gradients()
        return norms


def member_metrics(metrics: dict, k: int) -> dict:
    """Member k's metrics out of a group's (lists of K values; single values belong to all members)."""
    return {key: v[k] if isinstance(v, list) else v for key, v in metrics.items()}


class GroupHooks(TrainHooks):
    """A group's hooks as its members' own: each member's metrics go to its hooks; stop when any asks. A member
    whose loss turns non-finite leaves the group (`diverged`): its hooks' `failed` gets its error, and it hears
    nothing more. `compile_claim`: as TrainHooks', the group's own."""

    def __init__(self, members: Sequence[TrainHooks], compile_claim: str | None = None):
        self.members = list(members)
        self.compile_claim = compile_claim
        self.gone: dict[int, TrainingDiverged] = {}  # member -> its error

    def _alive(self):
        return [(k, h) for k, h in enumerate(self.members) if k not in self.gone]

    def log_metrics(self, step: int, metrics: dict) -> None:
        for k, h in self._alive():
            h.log_metrics(step, member_metrics(metrics, k))

    def before_checkpoint(self, step: int) -> None:
        for _, h in self._alive():
            getattr(h, "before_checkpoint", lambda step: None)(step)

    def checkpoint_saved(self, step: int, path: str, metrics: dict) -> None:
        for k, h in self._alive():
            h.checkpoint_saved(step, path, member_metrics(metrics, k))

    def should_stop(self) -> bool:
        return any(h.should_stop() for _, h in self._alive())

    def diverged(self, step: int, runs: list[bool], error: TrainingDiverged) -> bool:
        """The members whose loss turned non-finite fail as their runs alone would (TrainingDiverged, naming the
        group's last good checkpoint); the others train on, unless none is left. Their rows cannot reach the
        others': no weight is shared, and the optimizer, the EMA and the clipping are per member."""
        for k, bad in enumerate(runs):
            if bad and k not in self.gone:
                self.gone[k] = TrainingDiverged(f"{error} (member {k} of a group of {len(self.members)}; the "
                                                f"others train on)", checkpoint=error.checkpoint)
                getattr(self.members[k], "failed", lambda e: None)(self.gone[k])
        return len(self.gone) < len(self.members)

    def member_checkpoint(self, k: int, path: str) -> None:
        """Member k's final checkpoint is written, its evaluation still to come (`checkpoints_first`): its hooks'
        `checkpoint_ready` gets the path, where they have one (a sweep's trial passes it on to the base group its
        base trial will join, ulsweep/sweep/stacking.py)."""
        if k not in self.gone:
            getattr(self.members[k], "checkpoint_ready", lambda path: None)(path)

    def member_finished(self, k: int, result: StageResult) -> None:
        """Member k is evaluated and its files written (before the others' evaluations): its hooks' `finished`
        gets its result, where they have one (a sweep's trial then returns it, ulsweep/sweep/stacking.py)."""
        getattr(self.members[k], "finished", lambda result: None)(result)


def check_members(exps: Sequence[ExperimentConfig]) -> None:
    """Refuse a group whose members differ in more than MEMBER_KEYS, naming the first key that differs."""
    if not exps:
        raise ValueError("a group of autoencoder runs needs at least one member")
    first = shared_settings(exps[0])
    for i, exp in enumerate(exps[1:], 1):
        other = shared_settings(exp)
        for key in sorted(set(first) | set(other)):
            if first.get(key) != other.get(key):
                raise ValueError(
                    f"group member {i} ({exp.name!r}): {key} is {other.get(key)!r}, member 0 ({exps[0].name!r}) has "
                    f"{first.get(key)!r}: only runs that differ in {', '.join(MEMBER_KEYS)} train as one program")


def group_hash(exps: Sequence[ExperimentConfig]) -> str:
    """The group's identity: its members' stage-1 configs, in order."""
    return config_hash({"members": [stage1_hash(e) for e in exps]})


@dataclasses.dataclass
class PreparedGroup:
    """What `train_autoencoders` builds before a group's first step (the runtime, the data, the stacked networks and
    their TrainState), built for `exps` ahead of time by `prepare_autoencoders`: a sweep's group builds it while its
    members' trial processes start, so that it trains as soon as they have joined."""

    ident: str  # group_hash of the experiments it was built for
    rt: Runtime
    sources: list
    x_eval: torch.Tensor
    data_hash: str
    image_shape: tuple
    objective: GroupObjective
    ts: GroupTrainState
    seconds: float = 0.0  # to build it and warm the step (`prepare_autoencoders`)
    t_end: float = 0.0  # when it was ready (time.time()): the members' marks say whether their group waited for it
    parts: dict = dataclasses.field(default_factory=dict)  # those seconds by part: prepare_<runtime|data|...>_s


def _build(exps: list[ExperimentConfig], rt: Runtime, setup: PartTimer) -> PreparedGroup:
    """The group's data and networks: one split on the device serves every member, each member's weights
    initialized from its own seed as its run alone would."""
    exp0, k, tc = exps[0], len(exps), exps[0].ae.train
    with setup("data"):
        source, x_eval, data_hash, image_shape = train_source(exp0.data, rt, exp0.ae.train.seed, tc.eval_images,
                                                              tc.batch_size, label=f"ae group of {k}")
        sources = [source]
        for e in exps[1:]:  # a split on the device serves every member (each draws with its own generator)
            sources.append(source if isinstance(source, DeviceSplit) else
                           train_source(e.data, rt, e.ae.train.seed, 0, tc.batch_size, label=f"ae {e.name}")[0])
    with setup("models"):
        objective, ts = build_networks(exps, rt, tuple(image_shape))
    return PreparedGroup(group_hash(exps), rt, sources, x_eval, data_hash, tuple(image_shape), objective, ts)


def seeded_members(seeds: Sequence[int], network: Callable[[int], nn.Module], inits: Sequence[Hashable],
                   wrap: Callable[[int, nn.Module], nn.Module], rt: Runtime,
                   conv: str = "grouped") -> tuple[GroupObjective, list[torch.Generator]]:
    """Member i's objective `wrap(i, network(i))`, its network made right after torch.manual_seed(seeds[i]) as its
    run alone makes it, the members stacked into one objective (its convolutions as `conv` says); and each member's
    generator, seeded alike. Members of one seed whose `inits` (what `network` reads: `build.autoencoder_init`)
    are equal start from the same weights: their network is made once and shared until stacked (`stack` copies
    each member's weights and leaves the modules as they were), and torch's CPU generator is left as making it
    left it (`network` makes it on the CPU, then moves it: the device's generator draws nothing and stays as
    manual_seed seeds it) (lf_sweep's 18 autoencoders are two seeds: 2 networks made, not 18)."""
    objectives, made = [], {}
    for i, seed in enumerate(seeds):
        torch.manual_seed(seed)  # weight initialization, as the member's own run
        key = (seed, inits[i])
        if key in made:
            net, after = made[key]
            torch.set_rng_state(after)
        else:
            net = network(i)
            made[key] = net, torch.get_rng_state()
        objectives.append(wrap(i, net))
    del made
    objective = GroupObjective(objectives, conv)
    del objectives  # their weights are copied into the stacked network
    return objective, [torch.Generator(rt.device).manual_seed(seed) for seed in seeds]


def build_networks(exps: list[ExperimentConfig], rt: Runtime,
                   image_shape: tuple) -> tuple[GroupObjective, GroupTrainState]:
    """The members' autoencoders stacked into one objective, each initialized from its own seed as its run alone
    would, and their TrainState (AdamW, EMA, each member's generator)."""
    latent_shape, c = latent_shape_of(exps[0]), image_shape[0]
    objective, gens = seeded_members(
        [e.ae.train.seed for e in exps], lambda i: build_autoencoder(exps[i].ae, c).to(rt.device),
        [autoencoder_init(e.ae, c) for e in exps],
        lambda i, net: AEObjective(net, exps[i].ae.loss, image_shape, latent_shape), rt, exps[0].resources.stack_conv)
    return objective, GroupTrainState(objective.stacked.ae, exps[0].ae.optim, rt, gens)


def warm_up(objective: GroupObjective, rt: Runtime, batch_size: int, image_shape: tuple) -> None:
    """One uncompiled forward and backward of the group's step on random images, as the first steps of a group
    whose step another process compiles run (cuDNN's heuristics, not its search), that leaves no trace: the
    gradients dropped, torch's generators (dropout's) as they were, the members' generators untouched, the
    activations' memory handed back. Its first-call costs (libraries and kernels loaded, cuDNN's and cuBLAS's
    handles and heuristics) are then paid before the members join; a step is otherwise unchanged."""
    gen = torch.Generator(rt.device).manual_seed(0)
    k = objective.k
    x = torch.rand((k * batch_size, *image_shape), generator=gen, device=rt.device) * 2 - 1
    noise = objective.draw_noise(batch_size, MemberGenerators([gen] * k))
    devices = [rt.device] if rt.device.type == "cuda" else []
    search, torch.backends.cudnn.benchmark = torch.backends.cudnn.benchmark, False  # (process-wide)
    try:
        with torch.random.fork_rng(devices=devices), rt.autocast():
            losses = objective(x, noise)["total"]
            (losses.float().mean() / objective.dims).backward()
    finally:
        torch.backends.cudnn.benchmark = search
    objective.zero_grad(set_to_none=True)
    rt.synchronize()
    if rt.device.type == "cuda":  # the step's activations back to the device: a precompile task may compile beside
        torch.cuda.empty_cache()


def prepare_autoencoders(exps: Sequence[ExperimentConfig]) -> PreparedGroup:
    """The group of `exps` built and its uncompiled step warmed (`warm_up`), ahead of `train_autoencoders`, which
    takes it for the same experiments (`prepared`)."""
    exps = list(exps)
    check_members(exps)
    t0 = time.perf_counter()
    # the compile's modules imported beside the build and the warm-up, not in the group's first step
    importing = accel.preload_inductor() if exps[0].ae.train.compile is not False else None
    rt = make_runtime(exps[0].ae.train)
    t_rt = time.perf_counter() - t0  # the device's context among it, on a GPU
    timer = PartTimer(rt.device)
    prepared = _build(exps, rt, timer)
    with timer("warm_up"):
        warm_up(prepared.objective, rt, exps[0].ae.train.batch_size, prepared.image_shape)
    if importing is not None:
        with timer("inductor"):  # what is left of the imports: they never overlap the loop's own
            importing.join()
    prepared.seconds, prepared.t_end = time.perf_counter() - t0, time.time()
    prepared.parts = {"prepare_runtime_s": t_rt, **pop_seconds(dict(timer.seconds), phase="prepare")}
    return prepared


def train_autoencoders(exps: Sequence[ExperimentConfig], run_dirs: Sequence[str], group_dir: str,
                       hooks: TrainHooks | None = None,
                       prepared: PreparedGroup | None = None, marks: dict | None = None) -> list[StageResult | None]:
    """Train the stage-1 runs `exps` (one architecture: `check_members`) as one program; member k's checkpoint,
    images and result.json go to `run_dirs[k]` as its own run's would, the group's checkpoints to `group_dir`.
    `hooks` gets list-valued metrics, one value per member (`GroupHooks` hands each member its own, and fails a
    member that diverges alone: other hooks end the group with its error). `prepared`: the group built ahead for
    these very experiments (`prepare_autoencoders`; one built for others is refused). `marks`: more of the
    members' marks, from before. Returns the members' results (None for a member that diverged); members
    finished before are not trained again when all of them are."""
    exps, run_dirs = list(exps), list(run_dirs)
    if len(exps) != len(run_dirs):
        raise ValueError(f"{len(exps)} members but {len(run_dirs)} run directories")
    check_members(exps)
    done = [finished_result(d, stage1_hash(e)) for e, d in zip(exps, run_dirs)]
    if all(r is not None for r in done):
        return done
    if prepared is not None and prepared.ident != group_hash(exps):
        raise ValueError(f"{group_dir}: the group prepared ahead was built for other members")
    hooks = hooks or TrainHooks()
    exp0, k = exps[0], len(exps)
    tc = exp0.ae.train
    before = dict(marks or {})  # and of a group built ahead: when it was ready, and how long it took
    if prepared is None:
        rt = one_process(make_runtime(tc), group_dir)
        setup = PartTimer(rt.device)  # where the group's time before its first step goes (every member's marks)
        prepared = _build(exps, rt, setup)
    else:
        rt, setup = one_process(prepared.rt, group_dir), PartTimer(prepared.rt.device)
        before |= {"t_prepared_end": prepared.t_end, "prepared_s": prepared.seconds}
    sources, x_eval, data_hash, image_shape = prepared.sources, prepared.x_eval, prepared.data_hash, \
        prepared.image_shape
    objective, ts = prepared.objective, prepared.ts
    del prepared
    latent_shape = latent_shape_of(exp0)
    meta = {"data_hash": data_hash, "image_shape": list(image_shape), "latent_shape": list(latent_shape)}

    def members(ema_stacked, final: bool, extractor, timer, skip):
        """The bits/pixel and the reconstructions of the stacked networks, then each member's PSNR and rFD."""
        if not final:
            return evaluate_aes(ema_stacked, x_eval, exps, False, skip=skip)
        return final_evaluations(ema_stacked, ts.net, x_eval, exps, extractor, data_hash, ts.step, timer, skip=skip)

    written: dict[int, Future] = {}  # member -> its final checkpoint's path, written beside the evaluation

    def first(gone: Collection[int]):
        """Every healthy member's final checkpoint written while the members are evaluated, each passed on as
        soon as it is (`GroupHooks.member_checkpoint`): the base group reads it and encodes its latents during
        the evaluation rather than after (session 36, one H100: the base members, joined, waited 6.1 s for the
        last members' latents, passed on as their evaluations ended). Its metrics join its manifest after."""
        return checkpoints_first([i for i in range(k) if i not in gone], written, hooks, lambda i: save_member(
            i, run_dirs[i], ts, KIND, stage1_hash(exps[i]), {"config": to_dict(exps[i])}, meta))

    def write(i: int, m: dict, images: dict, done: dict) -> StageResult:
        out = write_member(i, run_dirs[i], ts, m, images, KIND, stage1_hash(exps[i]), {"config": to_dict(exps[i])},
                           meta, done, group_dir, written[i].result() if i in written else None)
        say_done(exps[i], m, out.checkpoint, f" (member {i} of a group of {k})")
        return out

    spec = RunSpec(group_dir, "ae-group", f"ae group of {k}", group_hash(exps),
                   dump_yaml({"members": [e.name for e in exps], "run_dirs": run_dirs}),
                   {"configs": [to_dict(e) for e in exps]}, meta | {"members": k})
    return train_group(objective, GroupSource(sources), members, write, ts, tc, spec, hooks, setup, before, first,
                       start_extractor=lambda: ae_extractor_ahead(exp0, rt.device, x_eval, data_hash))


def one_process(rt, group_dir: str):
    """`rt`, refused under torch.distributed: a group trains in one process."""
    if rt.world > 1:
        raise RuntimeError(f"{group_dir}: a group of runs trains in one process, not under torch.distributed "
                           f"({rt.world} workers)")
    return rt


def train_group(objective: GroupObjective, source: GroupSource, members, write, ts: GroupTrainState, tc,
                spec: RunSpec, hooks: TrainHooks, setup: PartTimer | None = None, marks: dict | None = None,
                first: Callable | None = None, *,
                start_extractor: Callable[[], Any]) -> list[StageResult | None]:
    """A group's run of the one training loop, and the members' results (None for one that diverged; a group
    stopped early on request gives each member the group's state, which its checkpoint holds).

    `members(ema, final, extractor, timer, skip)` evaluates the members as one and yields each one's (metrics,
    images, seconds) but `skip`'s (those that diverged): the evaluation of `ulsweep.train.stage1.evaluate_aes`
    or `ulsweep.train.stage2.evaluate_bases`. A final evaluation takes its extractors from `start_extractor()`
    and hands each member's over (`hand_over`: `write(i, metrics, images, marks)` writes its files and returns
    its result), as soon as its own parts are done, so that its next trials need not wait for the others'.
    `setup` timed the parts of the group's setup (`setup_<part>_s` in every member's marks); `marks`: more of the
    members' marks, from before.
    `first(gone)`: a context the final evaluation runs in, which writes the members' checkpoints beside it
    (`checkpoints_first`). `start_extractor()`: the final evaluation's extractors, loaded and warmed while the
    members' bits/pixel and samples are computed (`extractor_ahead`'s future)."""
    k = ts.k
    # the loop's phase marks, every member's timeline; first the setup's parts
    marks = dict(marks or {}) | (pop_seconds(dict(setup.seconds), "setup") if setup else {})
    results: list[StageResult | None] = [None] * k

    def evaluate(ema_stacked, final: bool) -> tuple[dict, dict]:
        gone = getattr(hooks, "gone", {})  # members that diverged: not evaluated, no files
        if not final:
            each = iter(m for m, _, _ in members(ema_stacked, False, None, None, gone))
            return per_member([{} if i in gone else next(each) for i in range(k)]), {}
        timer = PartTimer(ts.rt.device)
        with first(gone) if first else contextlib.nullcontext():
            extractor = start_extractor()
            metrics = hand_over(members(ema_stacked, True, extractor, timer, gone), hooks, results, marks, write)
        metrics.update(timer.seconds)  # the parts' seconds over all members
        return metrics, {}

    res = train(objective, source, evaluate, ts, tc, spec, hooks, marks)
    if not res.metrics:  # stopped early on request: the group's checkpoint holds it
        return [StageResult({}, res.checkpoint, res.steps, res.train_seconds, res.extra) for _ in range(k)]
    return results


def per_member(each: list[dict]) -> dict[str, list[float]]:
    """Members' metrics as lists of K values; NaN for a member without them (one that diverged)."""
    keys = next((m for m in each if m), {})
    return {key: [m.get(key, math.nan) for m in each] for key in keys}


def save_member(i: int, run_dir: str, ts: GroupTrainState, kind: str, cfg_hash: str, state_extra: dict, meta: dict,
                metrics: dict | None = None) -> str:
    """Member i's final checkpoint in its own run directory: its rows of the stacked state, with `state_extra` and
    `meta` as its run alone saves them (and its `metrics`, where they are known); returns its path. Its rows are
    copied to host memory on a stream of their own (`copy_stream`), beside the kernels of the thread that goes on
    (a group's final evaluation), then written from there."""
    with copy_stream(ts.rt.device):
        state = {"model": _row(ts.net.state_dict(), i), "ema": _row(ts.ema.state_dict(), i),
                 "optimizer": _optimizer_row(ts.opt.state_dict(), i)}
    state |= {"rng": rng_state(ts.gen.gens[i]), **state_extra}
    return save_checkpoint(run_dir, ts.step, state, {**meta, "kind": kind, "config_hash": cfg_hash, "step": ts.step,
                                                     "train_seconds": ts.train_seconds, "metrics": metrics or {}})


@contextlib.contextmanager
def checkpoints_first(alive: Sequence[int], written: dict[int, Future], hooks, save: Callable[[int], str]):
    """A context for a group's final evaluation: `save(i)` of each member in `alive` in threads of their own
    (MEMBER_WRITERS at once) beside it, its future in `written`, each path handed to `hooks.member_checkpoint` as
    soon as it is written (an error there is said, never the member's failure: passing it on only saves time); the
    context waits for every write at its end (a write's error is raised by its member's `written[i].result()`)."""
    def saved(i: int) -> str:
        path = save(i)
        try:
            getattr(hooks, "member_checkpoint", lambda i, path: None)(i, path)
        except Exception as e:  # noqa: BLE001
            print(f"[member {i}] its checkpoint {path} was not handed on before its evaluation "
                  f"({type(e).__name__}: {e})", flush=True)
        return path

    with ThreadPoolExecutor(MEMBER_WRITERS, thread_name_prefix="ulsweep-member-checkpoints") as pool:
        written.update({i: pool.submit(saved, i) for i in alive})
        yield


def write_member(i: int, run_dir: str, ts: GroupTrainState, metrics: dict, images: dict, kind: str, cfg_hash: str,
                 state_extra: dict, meta: dict, marks: dict, group_dir: str, path: str | None = None) -> StageResult:
    """Member i's final checkpoint (`save_member`; or, `path`, the one written before its evaluation, which gets
    its metrics in its manifest), images and result.json in its own run directory, after its final evaluation
    (`metrics`, `images`; the loop's `marks` so far)."""
    if path is None:
        path = save_member(i, run_dir, ts, kind, cfg_hash, state_extra, meta, metrics)
    else:
        update_meta(path, metrics=metrics)
    extra = {"marks": dict(marks), "images": write_images(run_dir, images),
             "group": {"dir": group_dir, "member": i, "members": ts.k}, "device_memory": device_memory()}
    out = StageResult(metrics, path, ts.step, ts.train_seconds, extra)
    write_result(run_dir, out, cfg_hash)
    return out


MEMBER_WRITERS = 4  # members' files written at once by a group's final evaluation (hand_over)


def hand_over(evaluations, hooks, results: list, marks: dict, write) -> dict[str, list[float]]:
    """A group's final evaluation, member by member: `evaluations` yields each healthy member's (metrics, images,
    seconds) in order (those in `hooks.gone` left out), `write(i, metrics, images, marks)` writes member i's files
    and returns its result, which goes into `results` and then to its hooks (`member_finished`). The writes run
    in threads of their own (MEMBER_WRITERS at once) while the next members are evaluated: a member's checkpoint
    is its weights, EMA and AdamW moments (365 MB for lf_sweep's autoencoder, ~2 s to write on a 2-core box), which
    18 members written between their evaluations would add to the last one's wait; one writer thread still fell
    behind (session 24, one H100: the 18 autoencoders' evaluations done 0.6 s apart, their files 1.2 s apart, the
    last one's 10 s after its evaluation: each write is fsynced). Returns the members' metrics as lists (NaN for
    the diverged), once every write is done; a write's error is raised here."""
    gone = getattr(hooks, "gone", {})
    alive = [i for i in range(len(results)) if i not in gone]

    def finish(i: int, m: dict, images: dict, done: dict) -> None:
        results[i] = write(i, m, images, done)
        getattr(hooks, "member_finished", lambda i, res: None)(i, results[i])

    with ThreadPoolExecutor(MEMBER_WRITERS, thread_name_prefix="ulsweep-member-files") as writer:
        writes = []
        for i, (m, images, seconds) in zip(alive, evaluations):
            done = marks | pop_seconds(dict(seconds)) | {"t_eval_end": time.time()}
            writes.append(writer.submit(finish, i, m, images, done))
        for w in writes:
            w.result()
    return per_member([r.metrics if r is not None else {} for r in results])


def _row(state: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Member i's tensors of a stacked state dict, copied to host memory (`device_to_host`; a view would save every
    member's storage; torch.save copies a GPU tensor to the host anyway)."""
    return {name: device_to_host(t[i]) for name, t in state.items()}


def _optimizer_row(state: dict, i: int) -> dict:
    """Member i's AdamW state out of the stacked one, in host memory: its rows of the moments, the shared step
    count."""
    rows = {p: {name: device_to_host(t[i] if name != "step" else t) for name, t in s.items()}
            for p, s in state["state"].items()}
    return {"state": rows, "param_groups": state["param_groups"]}
