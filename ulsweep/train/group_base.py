"""Several stage-2 runs of one architecture trained as one program: the base models of a stacked group's members.

The base trials of a group of autoencoders (ulsweep/train/group.py) train the same base model on the latents of
autoencoders that differ only in loss factor, bias and seed; `train_bases` trains K of them as one stacked network
through the one training loop, as `train_autoencoders` does for stage 1. Each member is the run it would have been
alone (`ulsweep.train.stage2.train_base`):

- its own frozen autoencoder's latents (encoded once per checkpoint and stored, as alone, but for all members in
  one pass over the split where none is stored yet: `encode_together`; in a sweep, each as soon as its
  autoencoder is done: `encode_ahead`), drawn with its own generator, and its weights initialized from its own
  seed (in a sweep, built and their compiled step warmed while the autoencoders train: `prepare_bases`);
- its own gradient norm and clipping, AdamW and EMA over its own rows of the stacked tensors;
- its own final evaluation, with its own noise (the stacked base models' bits/pixel and samples, decoded by the
  stacked frozen autoencoders, for all members at once; then its gFD/gFID), and its checkpoint, images and
  result.json in its own run directory, in the layout of a run trained alone.

A member whose loss turns non-finite fails alone (`GroupHooks.diverged`); the group's own checkpoints go to
`group_dir`, from which a killed group resumes.
"""
from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from ulsweep.config import BaseStageConfig, ExperimentConfig, config_hash, dump_yaml, flatten, to_dict
from ulsweep.data.sources import DeviceSplit, choose_loader, choose_loader_for, load_eval_images, open_splits
from ulsweep.diffusion import MemberGenerators
from ulsweep.models.stacked import stack
from ulsweep.train.build import base_model_init, base_schedule, build_base_model
from ulsweep.train.checkpoint import finished_result
from ulsweep.train.compile_gate import compiled_before, first_compile, graph_key
from ulsweep.train.evaluation import PartTimer
from ulsweep.train.identity import BASE_MEMBER_KEYS  # what base members may differ in, besides MEMBER_KEYS
from ulsweep.train.group import (MEMBER_KEYS, GroupObjective, GroupSource, GroupTrainState, one_process,
                                 seeded_members, train_group, write_member)
from ulsweep.train.hooks import StageResult, TrainHooks
from ulsweep.train.latents import decode_path, encode_together, latent_source, training_latents
from ulsweep.train.loop import RunSpec
from ulsweep.train.runtime import Runtime, compile_mode, compile_module, make_runtime
from ulsweep.train.stage2 import (KIND, BaseObjective, base_extractor_ahead, evaluate_bases, flops_metrics,
                                  load_frozen_autoencoder, say_decode_path, say_done, stage2_hash)



def read_ahead(ae_checkpoint: str) -> tuple[torch.nn.Module, ExperimentConfig, dict]:
    """A member's frozen autoencoder read on the host (`load_frozen_autoencoder` to the CPU), for `train_bases`'s
    `frozen`: reading and checking the checkpoints (weights, EMA and AdamW moments) took 16.5 of a base group's 61 s
    of setup (lf_sweep's 18 members on one H100, session 26), while its members' autoencoder trials
    finish one after another over ~15 s: read as each member joins, the reading overlaps that wait."""
    return load_frozen_autoencoder(ae_checkpoint, "cpu")


def latents_need(members: int, split_size: int, latent_shape) -> int:
    """Bytes of `members` members' training latents as float32 on the device."""
    return members * split_size * 4 * math.prod(latent_shape)


def encode_ahead(queued: Sequence[tuple[str, Future, float | None]],
                 members: int) -> list[tuple[str, tuple, torch.Tensor | None]]:
    """The training latents of the checkpoints `queued` (each: its path, its `read_ahead` future, and time.time()
    when it was passed on, or None), encoded and stored before their base trials join: the sweep's base group
    encodes the checkpoints its autoencoder group has passed on by then, while the other autoencoders are still
    evaluated, where the group's `members` members' latents will be on the device (`data.loader`'s choice).
    Several are encoded together, in one pass over the split through their encoders stacked (`encode_together`):
    session 31's one H100 encoded lf_sweep's 18 one after another, 0.7-2.0 s each as the checkpoints came ~0.4 s
    apart, and the base members waited 9.2 s for the last after they joined. Those another process encodes, or
    that are stored already, are read as a base trial alone reads them (`training_latents`: the same latents, the
    same store). Returns per checkpoint (its path, what they are the latents of: the dataset's hash, split and
    image size, them on the device); (…, None) each where the group streams its latents: a streamed split is
    better decoded once for all members, by the group. Says when it began, had the checkpoints read and was done,
    in seconds after the first was passed on."""
    began = time.time()
    read = [f.result() for _, f, _ in queued]
    got = time.time()
    data = read[0][1].data
    for (ckpt, _, _), (_, ae_exp, _) in zip(queued, read):
        if ae_exp.data != data:
            raise ValueError(f"{ckpt}: its data ({ae_exp.data.path!r}) is not that of {queued[0][0]} "
                             f"({data.path!r}): a base group's members train on one dataset")
    rt = make_runtime(read[0][1].ae.train)
    ds = open_splits(data)
    key = (ds.content_hash, data.train_split, data.image_size)
    need = latents_need(members, ds.splits[data.train_split], read[0][2]["latent_shape"])
    if choose_loader_for(data, need, rt.device, "latents")[0] != "device":
        return [(ckpt, key, None) for ckpt, _, _ in queued]
    decode = decode_path(choose_loader(data, ds, rt.device)[0])
    z: dict[int, torch.Tensor] = {}
    together: list[int] = []
    with torch.no_grad():
        if len(queued) > 1:  # stack copies the weights: the host copies stay as they were, for train_bases
            encoders = stack([ae.encoder for ae, _, _ in read],
                             read[0][1].resources.stack_conv).eval().to(rt.device)
            shas = [(ckpt, meta["sha256"]) for (ckpt, _, _), (_, _, meta) in zip(queued, read)]
            together = encode_together(encoders, shas, ds, data, rt.device, decode, keep=z)
            del encoders
        for i, ((ckpt, _, _), (ae, _, meta)) in enumerate(zip(queued, read)):
            if i not in z:
                encoder = copy.deepcopy(ae.encoder).to(rt.device)
                z[i] = training_latents(encoder, ckpt, meta["sha256"], ds, data, rt.device, decode=decode)[1]
    done = time.time()
    t0 = min((t for _, _, t in queued if t is not None), default=began)
    print(f"[latents] encoded ahead at {time.strftime('%H:%M:%S', time.localtime(done))}: {len(queued)} "
          f"checkpoint(s), {len(together)} of them in one pass; began {began - t0:.2f} s after the first was passed "
          f"on ({queued[0][0]}), had them read at {got - t0:.2f} s, done at {done - t0:.2f} s", flush=True)
    return [(ckpt, key, z[i]) for i, (ckpt, _, _) in enumerate(queued)]


def shared_settings(exp: ExperimentConfig, base: BaseStageConfig, ae_exp: ExperimentConfig) -> dict:
    """What base members of a group must agree on: the data and evaluation, the base model's settings but its
    seed, and their autoencoders' settings but MEMBER_KEYS (flattened)."""
    flat = flatten(to_dict({"data": exp.data, "eval": exp.eval, "base": base, "ae": ae_exp.ae}))
    return {k: v for k, v in flat.items() if k not in MEMBER_KEYS + BASE_MEMBER_KEYS}


def check_members(exps: Sequence[ExperimentConfig], bases: Sequence[BaseStageConfig],
                  ae_exps: Sequence[ExperimentConfig]) -> None:
    """Refuse a group whose base members differ in more than their seed and their autoencoders' MEMBER_KEYS,
    naming the first key that differs."""
    if not exps or not (len(exps) == len(bases) == len(ae_exps)):
        raise ValueError(f"a group of base runs needs members: {len(exps)} experiments, {len(bases)} base models, "
                         f"{len(ae_exps)} autoencoders")
    first = shared_settings(exps[0], bases[0], ae_exps[0])
    for i in range(1, len(exps)):
        other = shared_settings(exps[i], bases[i], ae_exps[i])
        for key in sorted(set(first) | set(other)):
            if first.get(key) != other.get(key):
                raise ValueError(
                    f"base group member {i} ({bases[i].name!r} of {exps[i].name!r}): {key} is {other.get(key)!r}, "
                    f"member 0 has {first.get(key)!r}: only base runs that differ in their seed and their "
                    f"autoencoder's {', '.join(MEMBER_KEYS)} train as one program")


def base_networks_ident(bases: Sequence[BaseStageConfig], ae_exps: Sequence[ExperimentConfig],
                        latent_shape: Sequence[int]) -> str:
    """What a base group's networks and their TrainState are built from (`build_base_networks`): the members' base
    models (seeds and optimizer included), their autoencoders' loss settings (the noise schedule) and the latent."""
    return config_hash({"bases": list(bases), "ae_loss": [e.ae.loss for e in ae_exps],
                        "latent_shape": list(latent_shape)})


def build_base_networks(bases: Sequence[BaseStageConfig], ae_exps: Sequence[ExperimentConfig],
                        latent_shape: Sequence[int], rt: Runtime) -> tuple[GroupObjective, GroupTrainState]:
    """The members' base models stacked into one objective, each initialized from its own seed as its run alone
    would, and their TrainState (AdamW, EMA, each member's generator)."""
    latent_shape = tuple(latent_shape)
    c = latent_shape[0]
    objective, gens = seeded_members(
        [b.train.seed for b in bases], lambda i: build_base_model(bases[i], c).to(rt.device),
        [base_model_init(b, c) for b in bases],
        lambda i, net: BaseObjective(net, base_schedule(ae_exps[i].ae.loss, bases[i]), bases[i].loss.sigmoid_bias,
                                     latent_shape), rt, ae_exps[0].resources.stack_conv)
    return objective, GroupTrainState(objective.stacked.net, bases[0].optim, rt, gens)


@dataclass
class PreparedBases:
    """A base group's networks and TrainState built ahead, for `train_bases` (`prepare_bases`)."""

    ident: str  # base_networks_ident of what they were built for
    rt: Runtime
    objective: GroupObjective
    ts: GroupTrainState
    compiled: str  # how its compiled step was warmed: the compile gate's answer ("done", "first", ...) or why not
    seconds: float = 0.0
    t_end: float = 0.0  # when it was ready (time.time())


WARM_STEPS = 3  # compiled forwards and backwards ahead: CUDA graph trees warm up, then record, then replay


def prepare_bases(bases: Sequence[BaseStageConfig], ae_exps: Sequence[ExperimentConfig], latent_shape: Sequence[int],
                  keep_waiting: Callable[[], bool] = lambda: False, poll_s: float = 1.0,
                  compile_first: bool = False) -> PreparedBases:
    """A base group's networks built and their compiled step warmed before its members join (a sweep's base group
    does this while the autoencoders train), in the thread that will train them: its first compiled step took
    8.6 s after the members joined (session 31, one H100, 18 members, caches warm from the precompile task; in a
    fresh process alone 11.3 s, of which Dynamo's tracing 2.9 s and loading the compiled code 3.7 s:
    `h100-compile-phases-base-warm-s31.json`), which Dynamo's cache of this process then answers for the loop's
    own compiled module (a new torch.compile of the same objective). The warm-up leaves no trace (`warm_compiled`).
    It runs once another process of the node has compiled this step (the sweep's precompile task), waited for
    while `keep_waiting()` (no member has joined yet), or with `compile_first` compiles it here if nobody has; else
    the networks are only built, and the loop compiles as it would have."""
    t0 = time.perf_counter()
    tc = bases[0].train
    rt = make_runtime(tc)
    objective, ts = build_base_networks(bases, ae_exps, latent_shape, rt)
    compiled = warm_compiled(objective, rt, tc, tuple(latent_shape), keep_waiting, poll_s,
                             f"base {bases[0].name} group of {len(bases)}", compile_first)
    return PreparedBases(base_networks_ident(bases, ae_exps, latent_shape), rt, objective, ts, compiled,
                         time.perf_counter() - t0, time.time())


def warm_compiled(objective: GroupObjective, rt: Runtime, tc, latent_shape: tuple, keep_waiting: Callable[[], bool],
                  poll_s: float, label: str, compile_first: bool = False) -> str:
    """The group's compiled step (`train.compile`, through the compile gate as the loop's first compiled step goes)
    run WARM_STEPS times, forward and backward, on random latents, leaving no trace: no optimizer step, the
    gradients dropped, torch's generators (dropout's) as they were, the members' generators untouched. Only from
    another process's compile (`compiled_before`) unless `compile_first`: a cold compile here would compete for
    the node's CPUs with the precompile task's compile of the autoencoders' step, on which the sweep waits. Returns
    the compile gate's answer, or why nothing was compiled."""
    mode = compile_mode(tc.compile, rt)
    if mode is None:
        return "not compiled"
    k = objective.k
    gen = torch.Generator(rt.device).manual_seed(0)
    x = torch.randn((k * tc.batch_size, *latent_shape), generator=gen, device=rt.device)
    key = graph_key(objective, x.shape, mode, rt.device.type, rt.amp_dtype)
    devices = [rt.device] if rt.device.type == "cuda" else []
    while True:
        if not (compile_first or compiled_before(key)):
            if not keep_waiting():
                return "not compiled ahead: members joined before another process had compiled it"
            time.sleep(poll_s)
            continue
        with first_compile(key, label, wait=False) as how:
            if how != "busy":
                step = compile_module(objective, tc.compile, rt)
                with torch.random.fork_rng(devices=devices):
                    for _ in range(WARM_STEPS):
                        noise = objective.draw_noise(tc.batch_size, MemberGenerators([gen] * k))
                        with rt.autocast():
                            losses = step(x, noise)
                        (losses["total"].mean() / objective.dims).backward()  # as the loop's step
                        del losses
                        objective.zero_grad(set_to_none=True)
                rt.synchronize()
                return how
        if not keep_waiting():  # compile_first, and another process compiles it
            return "not compiled ahead: members joined while another process compiled it"
        time.sleep(poll_s)


def train_bases(exps: Sequence[ExperimentConfig], bases: Sequence[BaseStageConfig], ae_checkpoints: Sequence[str],
                run_dirs: Sequence[str], group_dir: str, hooks: TrainHooks | None = None,
                frozen: Sequence[Future] | None = None, ahead: Sequence[Future | None] | None = None,
                marks: dict | None = None, prepared: PreparedBases | None = None) -> list[StageResult | None]:
    """Train base model `bases[k]` of experiment `exps[k]` on the latents of the frozen autoencoder at
    `ae_checkpoints[k]`, for every k, as one program (`check_members`); member k's checkpoint, images and
    result.json go to `run_dirs[k]` as its run's alone would, the group's checkpoints to `group_dir`. `hooks` as
    `ulsweep.train.group.train_autoencoders` takes them. `frozen`: the checkpoints already being read, one future
    of `read_ahead(ae_checkpoints[k])` a member (the sweep's group starts each as its member joins, while it
    waits for the others), else they are read here. `ahead`: one `encode_ahead` future (or None) a member, the
    latents the sweep's group encoded as each checkpoint was passed on to it; those encoded for another checkpoint
    or data, or whose encoding failed, are encoded here. `marks`: more of the members' marks, from
    before. `prepared`: the networks built, and their compiled step warmed, ahead (`prepare_bases`), taken where
    they were built for these very members (`base_networks_ident`). Returns the members' results (None for one
    that diverged); members finished before are not trained again when all of them are."""
    exps, bases, ae_checkpoints, run_dirs = list(exps), list(bases), list(ae_checkpoints), list(run_dirs)
    if not (len(exps) == len(bases) == len(ae_checkpoints) == len(run_dirs)):
        raise ValueError(f"{len(exps)} experiments, {len(bases)} base models, {len(ae_checkpoints)} autoencoder "
                         f"checkpoints and {len(run_dirs)} run directories: one each a member")
    hooks = hooks or TrainHooks()
    exp0, base0, k = exps[0], bases[0], len(exps)
    tc = base0.train
    waited = PartTimer()  # first, the latents still being encoded ahead: their encoding uses the autoencoders
    got_ahead: dict[int, tuple] = {}  # read ahead, and sets up the device as its own runtime has it (make_runtime)
    if ahead is not None:
        if len(ahead) != k:
            raise ValueError(f"{len(ahead)} members' latents encoded ahead for {k} members")
        with waited("encode_ahead"):
            for i, f in enumerate(ahead):
                try:
                    if f is not None:
                        got_ahead[i] = f.result()
                except Exception as e:  # noqa: BLE001 - encoded below with the others, as without it
                    print(f"[base group of {k}] member {i}'s latents encoded ahead failed ({type(e).__name__}: "
                          f"{str(e)[:300]}); encoding them with the others", flush=True)
    rt = one_process(make_runtime(tc), group_dir)
    setup = PartTimer(rt.device)  # where the group's time before its first step goes (every member's marks)
    setup.add(waited)
    # (autoencoder, experiment, meta) of each member, read side by side: a stage-1 checkpoint holds its weights,
    # EMA and AdamW moments (~4x the weights), which the loader reads and checks (SHA-256) before loading
    with setup("checkpoints"):
        if frozen is None:
            with ThreadPoolExecutor(min(8, k)) as pool:
                frozen = list(pool.map(lambda c: load_frozen_autoencoder(c, rt.device), ae_checkpoints))
        else:  # read ahead on the host: here only what was not read yet, and the copies to the device
            if len(frozen) != k:
                raise ValueError(f"{len(frozen)} checkpoints read ahead for {k} members")
            frozen = [(ae.to(rt.device), e, m) for ae, e, m in (f.result() for f in frozen)]
    aes, ae_exps, ae_metas = zip(*frozen)
    check_members(exps, bases, ae_exps)
    hashes = [stage2_hash(e, b, m) for e, b, m in zip(exps, bases, ae_metas)]
    done = [finished_result(d, h) for d, h in zip(run_dirs, hashes)]
    if all(r is not None for r in done):
        return done
    label = f"base {base0.name} group of {k}"
    with setup("data"):
        ds = open_splits(exp0.data)
        data_hash = ds.content_hash
        x_eval = load_eval_images(ds, exp0.data, rt.device, max(tc.eval_images, exp0.eval.gfd_reference_images))
    latent_shape = tuple(ae_metas[0]["latent_shape"])
    need = latents_need(k, ds.splits[exp0.data.train_split], latent_shape)  # every member's latents
    loader, why = choose_loader_for(exp0.data, need, rt.device, "latents")
    print(f"[{label}] data.loader {exp0.data.loader} -> {loader} for the {k} members' latents: {why}", flush=True)
    decode = say_decode_path(exp0, ds, rt, f"[{label}]")
    # the members' frozen autoencoders as one
    stacked_ae = stack(list(aes), exp0.resources.stack_conv).eval().requires_grad_(False)
    encoded: dict[int, torch.Tensor] = {}  # on the device: the latents it stored, not read back
    if ahead is not None:  # those of the right checkpoint and data, where the group holds its latents on the device
        key = (data_hash, exp0.data.train_split, exp0.data.image_size)
        encoded.update({i: z.to(rt.device) for i, (ckpt, of, z) in got_ahead.items()
                        if z is not None and loader == "device" and ckpt == ae_checkpoints[i] and of == key})
        marks = dict(marks or {}) | {"latents_encoded_ahead": len(encoded)}
    with setup("encode"):  # every member's latents in one pass over the split where none is stored yet
        encode_together(stacked_ae.encoder, [(c, m["sha256"]) for c, m in zip(ae_checkpoints, ae_metas)], ds,
                        exp0.data, rt.device, decode, timer=setup,  # and its parts: setup_encode_<part>_s
                        keep=encoded if loader == "device" else None)
    sources, stored = [], []
    with setup("latents"):  # then each member's, read back as ever (but those just encoded, on the device)
        for i, (ae, ckpt, meta, b) in enumerate(zip(aes, ae_checkpoints, ae_metas, bases)):
            here = encoded.pop(i, None)
            latents, z_train = training_latents(ae.encoder, ckpt, meta["sha256"], ds, exp0.data, rt.device,
                                                load=loader == "device" and here is None, decode=decode)
            z_train = here if here is not None else z_train
            sources.append(DeviceSplit(z_train) if z_train is not None else
                           latent_source(latents, rt, b.train.seed, tc.batch_size))
            stored.append(latents)
    with setup("models"):
        if prepared is not None and prepared.ident == base_networks_ident(bases, ae_exps, latent_shape) \
                and prepared.rt.device == rt.device:
            objective, ts = prepared.objective, prepared.ts
            marks = dict(marks or {}) | {"t_prepared_end": prepared.t_end, "prepared_s": prepared.seconds,
                                         "prepared_compile": prepared.compiled}
        else:
            if prepared is not None:
                print(f"[{label}] the networks built ahead were built for other members: building them anew",
                      flush=True)
            objective, ts = build_base_networks(bases, ae_exps, latent_shape, rt)
        prepared = None
    del frozen, aes
    metas = [{"data_hash": data_hash, "ae_checkpoint": c, "ae_sha256": m["sha256"], "latent_shape": list(latent_shape),
              "latents": lat.uri if lat else None, "latents_hash": lat.content_hash if lat else None}
             for c, m, lat in zip(ae_checkpoints, ae_metas, stored)]

    def members(ema_stacked, final: bool, extractor, timer, skip):
        """The bits/pixel and the samples of the stacked networks, then each member's gFD/gFID; and a final
        evaluation's FLOPs."""
        if not final:
            return evaluate_bases(ema_stacked, stacked_ae, exps, ae_exps[0], bases, x_eval, latent_shape,
                                  samples=False, skip=skip)
        with timer("flops"):
            flops = flops_metrics(base0, latent_shape, ts.step)
        return ((m | flops, images, seconds) for m, images, seconds in
                evaluate_bases(ema_stacked, stacked_ae, exps, ae_exps[0], bases, x_eval, latent_shape, extractor,
                               data_hash, timer=timer, skip=skip))

    def write(i: int, m: dict, images: dict, done: dict) -> StageResult:
        out = write_member(i, run_dirs[i], ts, m, images, KIND, hashes[i],
                           {"config": to_dict(bases[i]), "experiment": to_dict(exps[i])}, metas[i], done, group_dir)
        say_done(bases[i], m, out.checkpoint, f" (member {i} of a group of {k})")
        return out

    spec = RunSpec(group_dir, "base-group", label, config_hash({"members": hashes}),
                   dump_yaml({"members": [f"{b.name} of {e.name}" for e, b in zip(exps, bases)],
                              "ae_checkpoints": ae_checkpoints, "run_dirs": run_dirs}),
                   {"configs": [to_dict(b) for b in bases]}, {"data_hash": data_hash, "members": k,
                                                              "latent_shape": list(latent_shape)})
    return train_group(objective, GroupSource(sources), members, write, ts, tc, spec, hooks, setup, marks,
                       start_extractor=lambda: base_extractor_ahead(exp0, rt.device, x_eval, data_hash))
