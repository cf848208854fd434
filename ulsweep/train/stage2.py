"""Stage 2 (§3.3): a base diffusion model on the frozen encoder's latents.

The encoder (EMA weights of the stage-1 checkpoint) maps the training split to z_clean once per checkpoint and
dataset (`ulsweep.train.latents`: stored next to the checkpoint, read by every later base trial of that
autoencoder, a resumed one included; its images decoded through Ray Data where stage 1 would stream them); the
base model learns z_clean with the sigmoid-weighted ELBO over lambda in [logsnr_min, lambda_z(0)], noise drawn
per step. Sampling ends at lambda_z(0) and hands the noisy z_0 to the frozen decoder. Evaluation encodes the
held-out images itself (bits/pixel through the encoder).
"""
from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Sequence

import torch

from ulsweep.config import BaseStageConfig, ExperimentConfig, dump_yaml, experiment_from_dict, to_dict
from ulsweep.data.sources import DeviceSplit, choose_loader, choose_loader_for, load_eval_images, open_splits
from ulsweep.diffusion import (LogSNRSchedule, base_loss, diffuse, latent_bitrates,
                               low_discrepancy_times, x_from_v)
from ulsweep.diffusion.noise import Generator, seeded
from ulsweep.models.stacked import load_trial, plain
from ulsweep.train.build import base_schedule, build_autoencoder, build_base_model, sampler
from ulsweep.train.checkpoint import CheckpointError, finished_result, load_checkpoint
from ulsweep.train.evaluation import (PartTimer, eval_batch_shapes, extractor_ahead, generation_fd_of,
                                     reference_split, resolve_extractor, scored_in_order)
from ulsweep.train.hooks import StageResult, TrainHooks
from ulsweep.train.identity import stage2_hash
from ulsweep.train.latents import IN_PROCESS, decode_path, latent_source, training_latents
from ulsweep.train.loop import RunSpec, train
from ulsweep.train.runtime import make_runtime
from ulsweep.train.sampling import (decode, generate_latents, image_grid_png, member_by_member, sample_rows,
                                    sampling_calls, sampling_networks, sampling_precision, to_uint8)
from ulsweep.train.state import TrainState

KIND = "base"


class BaseObjective(torch.nn.Module):
    """Per-example base-model loss (§3.3, nats [B]) around the network, so that DDP wraps and torch.compile
    trace the noising and the weighted error together with the ViT."""

    progress_keys = ("loss", "grad_norm")

    def __init__(self, net: torch.nn.Module, sched: LogSNRSchedule, sigmoid_bias: float, latent_shape: tuple):
        super().__init__()
        self.net, self.sched, self.sigmoid_bias = net, sched, sigmoid_bias
        self.latent_shape = tuple(latent_shape)
        self.dims = math.prod(self.latent_shape)

    def extra_repr(self) -> str:  # what the graph depends on besides the network (see AEObjective's)
        return f"sched={self.sched}, sigmoid_bias={self.sigmoid_bias}, latent_shape={self.latent_shape}"

    def draw_noise(self, batch: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        return {"t": low_discrepancy_times(batch, gen, gen.device),
                "eps": torch.randn((batch, *self.latent_shape), generator=gen, device=gen.device)}

    def forward(self, z: torch.Tensor, noise: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        lam, dlam = self.sched.logsnr(noise["t"]), self.sched.dlogsnr_dt(noise["t"])
        z_t = diffuse(z, lam, noise["eps"])
        v = self.net(z_t, lam)
        return {"total": base_loss(z, x_from_v(z_t, v.float(), lam), lam, dlam, self.sigmoid_bias)}

    def curves(self, means: dict[str, float]) -> dict[str, float]:
        return {"loss": means["total"]}


def load_frozen_autoencoder(ae_checkpoint: str, device) -> tuple[torch.nn.Module, ExperimentConfig, dict]:
    """(EMA autoencoder in eval mode without gradients, its experiment config, checkpoint meta)."""
    state, meta = load_checkpoint(ae_checkpoint, map_location=device)
    if meta.get("kind") != "ae":
        raise CheckpointError(f"{ae_checkpoint}: is a {meta.get('kind')!r} checkpoint, not an autoencoder")
    ae_exp = experiment_from_dict(state["config"], file=f"{ae_checkpoint} (embedded config)")
    ae = build_autoencoder(ae_exp.ae, meta["image_shape"][0]).to(device)
    ae.load_state_dict(state["ema"])
    return ae.eval().requires_grad_(False), ae_exp, meta


def eval_generator(bases: Sequence[BaseStageConfig], device: torch.device) -> Generator:
    """The base evaluation's own fixed-seed generator; for a group's members (more than one), each member's, as
    its run alone would seed it (`ulsweep.train.stage1.eval_generator`'s counterpart)."""
    return seeded([b.train.seed + 54321 for b in bases], device)


@torch.no_grad()
def evaluate_bases(base_model, ae, exps: Sequence[ExperimentConfig], ae_exp: ExperimentConfig,
                   bases: Sequence[BaseStageConfig], x_eval, latent_shape, extractor=None, data_hash: str = "",
                   samples: bool = True, timer: PartTimer | None = None,
                   skip: Collection[int] = ()) -> Iterator[tuple[dict, dict, dict]]:
    """Held-out latent bits/pixel under the base model (unweighted ELBO, Table 5's 'bpd with base
    model') and, with `samples`, decoded samples: with an extractor gFD/gFID of `eval.gfd_samples` samples
    against the first `eval.gfd_reference_images` held-out images. With K = len(bases) > 1, of the K members of
    a group (ulsweep/train/group_base.py): `base_model` and `ae` are their stacked base models and frozen
    autoencoders, the bits/pixel run once for all of them, each member drawing from its own generator
    (`eval_generator`); the samples member after member through ordinary networks holding each one's weights
    in turn (`resources.stack_sampling` each), or all at once through the stacked ones (stacked); then each
    member's gFD/gFID in turn. `ae_exp`: one member's autoencoder experiment (they differ in nothing that
    sampling reads).

    Yields each member's but `skip`'s (metrics, images as PNG bytes, seconds) as `ulsweep.train.stage1.
    evaluate_aes` does; `timer` times the parts (bpp, sampling, fd) of all members."""
    exp, base, k = exps[0], bases[0], len(bases)
    tc = base.train
    timer = timer or PartTimer(enabled=False)
    gen = eval_generator(bases, x_eval.device)
    with timer("bpp"):
        ests = latent_bitrates(ae.encoder, base_model, x_eval[:tc.eval_images], base_schedule(ae_exp.ae.loss, base),
                               tc.eval_t_per_image, generator=gen, members=k)
    n = exp.eval.gfd_samples if extractor is not None else 64
    images = None
    if samples:
        with timer("sampling"):
            images = generate_members(base_model, ae, exp, ae_exp, base, n, latent_shape, tuple(x_eval.shape[1:]),
                                      gen, k, skip)
        with timer("extractor"):  # loaded and warmed beside the parts above, where it comes from `extractor_ahead`
            extractor = resolve_extractor(extractor)
    shared = dict(timer.seconds)
    alive = [i for i in range(k) if i not in skip]
    if images is None:
        for i in alive:
            yield {"base_bpp": ests[i].bpp, "base_bpp_se": ests[i].bpp_se}, {}, shared
        return

    def score(i: int) -> tuple[dict, dict, PartTimer]:
        e = exps[i]
        metrics = {"base_bpp": ests[i].bpp, "base_bpp_se": ests[i].bpp_se}
        own = PartTimer(x_eval.device, enabled=timer.enabled)
        if extractor is not None:
            ref = to_uint8(x_eval[:e.eval.gfd_reference_images])
            with own("fd"):
                metrics.update(generation_fd_of(extractor, images[i], ref, data_hash, reference_split(e)))
            metrics["gen_samples"] = float(n)
        return metrics, {"samples.png": image_grid_png(images[i][:64], cols=8)}, own

    # each member's gFD/gFID and sample grid; a group's, two at a time on a GPU
    for metrics, pngs, own in scored_in_order(score, alive, x_eval.device):
        timer.add(own)
        yield metrics, pngs, shared | own.seconds


def base_extractor_ahead(exp: ExperimentConfig, device: torch.device, x_eval: torch.Tensor, data_hash: str):
    """`extractor_ahead` for a base evaluation's scoring: the extractors warmed at the batch shapes of its
    generations and their reference images (the first `eval.gfd_reference_images` of `x_eval`), whose statistics
    are cached (gFD's reference)."""
    ref = x_eval[:exp.eval.gfd_reference_images]
    shapes = eval_batch_shapes(tuple(x_eval.shape[1:]), [exp.eval.gfd_samples, len(ref)])
    return extractor_ahead(exp, device, shapes, [(to_uint8(ref), data_hash, reference_split(exp))])


def evaluate_base(base_model, ae, exp: ExperimentConfig, ae_exp: ExperimentConfig, base: BaseStageConfig,
                  x_eval, latent_shape, extractor=None, data_hash: str = "",
                  samples: bool = True, timer: PartTimer | None = None) -> tuple[dict, dict]:
    """`evaluate_bases` of one run: (metrics, images)."""
    metrics, images, _ = next(evaluate_bases(base_model, ae, [exp], ae_exp, [base], x_eval, latent_shape,
                                             extractor, data_hash, samples, timer))
    return metrics, images


def generate_members(base_model, ae, exp: ExperimentConfig, ae_exp: ExperimentConfig, base: BaseStageConfig, n: int,
                     latent_shape, image_shape, gen: Generator, members: int = 1,
                     skip: Collection[int] = ()) -> list[torch.Tensor | None]:
    """Each member's `n` samples as a final evaluation draws them (`eval.sample_precision`, and with
    `eval.sample_compile` through the sampling gate): one run's, or a group's K members' from their stacked
    networks and MemberGenerators, member after member through ordinary networks holding each one's weights in
    turn (`resources.stack_sampling` each: the samples of its run alone; `skip`'s are not drawn, None) or all
    at once (stacked). Returns one uint8 (n, C, H, W) tensor per member."""
    each = member_by_member(exp, members)
    nets = [plain(base_model), plain(ae.decoder)] if each else [base_model, ae.decoder]
    with (sampling_precision(exp.eval.sample_precision, gen.device),
          sampling_networks(nets, exp.eval.sample_compile, exp.eval.sample_precision, gen.device,
                            f"base {base.name} sampling") as (net, decoder)):
        rows = exp.eval.sample_batch
        if not each:
            images = generate(net, ae, ae_exp, base, n, latent_shape, image_shape, gen, rows, decoder, members)
            return list(images) if members > 1 else [images]
        out: list[torch.Tensor | None] = [None] * members
        for i in [i for i in range(members) if i not in skip]:
            load_trial(nets[0], base_model, i)
            load_trial(nets[1], ae.decoder, i)
            out[i] = generate(net, None, ae_exp, base, n, latent_shape, image_shape, gen.gens[i], rows, decoder)
        return out


@torch.no_grad()
def generate(base_model, ae, ae_exp, base: BaseStageConfig, n: int, latent_shape, image_shape, gen: Generator,
             rows: int | None = None, decoder=None, members: int = 1) -> torch.Tensor:
    """n images (uint8) from z_1 ~ N(0, I) -> base model -> z_0 at lambda_z(0) -> decoder, in calls of one size of
    at most `rows` images (`eval.sample_batch`; None: by the image size, `sample_rows`; `sampling_calls`: small
    networks are launch-bound, so larger calls sample 10k images several times faster). `decoder`: the
    autoencoder's decoder as sampling calls it (compiled, say); default `ae.decoder`. With `members` K > 1,
    `base_model` and `ae` are a group's stacked networks and `gen` its MemberGenerators: every call holds the same
    number of samples of each member and the result is (K, n, C, H, W)."""
    tc, sched, out = base.train, base_schedule(ae_exp.ae.loss, base), []
    decoder = decoder if decoder is not None else ae.decoder
    ae_tc = ae_exp.ae.train
    size, calls = sampling_calls(n, sample_rows(rows, image_shape), members)
    for _ in range(calls):
        z0 = generate_latents(base_model, members * size, latent_shape, sched, tc.sample_steps, sampler(tc, "base"),
                              gen, gen.device)
        out.append(to_uint8(decode(decoder, z0, image_shape, ae_exp.ae.loss, ae_tc.sample_steps,
                                   sampler(ae_tc, "decoder"), gen)).unflatten(0, (members, size)))
    images = torch.cat(out, 1)[:, :n]
    return images if members > 1 else images[0]


def train_base(exp: ExperimentConfig, base: BaseStageConfig, ae_checkpoint: str, run_dir: str,
               hooks: TrainHooks | None = None) -> StageResult:
    """Train base model `base` on the latents of the frozen autoencoder at `ae_checkpoint`.

    `exp` supplies the data and eval sections; the autoencoder's own config comes from its checkpoint.
    """
    hooks = hooks or TrainHooks()
    tc = base.train
    rt = make_runtime(tc)
    ae, ae_exp, ae_meta = load_frozen_autoencoder(ae_checkpoint, rt.device)
    cfg_hash = stage2_hash(exp, base, ae_meta)
    done = finished_result(run_dir, cfg_hash)
    if done is not None:
        return done
    torch.manual_seed(tc.seed + 1000 * rt.rank)  # weight initialization
    ds = open_splits(exp.data)
    data_hash = ds.content_hash
    x_eval = load_eval_images(ds, exp.data, rt.device, max(tc.eval_images, exp.eval.gfd_reference_images))
    latent_shape = tuple(ae_meta["latent_shape"])  # (c, h, w), recorded by stage 1
    need = ds.splits[exp.data.train_split] * 4 * math.prod(latent_shape)
    loader, why = choose_loader_for(exp.data, need, rt.device, "latents")
    if rt.is_main:
        print(f"[base {base.name}] data.loader {exp.data.loader} -> {loader} for the latents: {why}", flush=True)
    decode = say_decode_path(exp, ds, rt, f"[base {base.name}]")
    latents, z_train = training_latents(ae.encoder, ae_checkpoint, ae_meta["sha256"], ds, exp.data, rt.device,
                                        load=loader == "device", decode=decode)
    if z_train is not None:
        source = DeviceSplit(z_train)
    else:
        source = latent_source(latents, rt, tc.seed, tc.batch_size)
    net = build_base_model(base, latent_shape[0]).to(rt.device)
    ts = TrainState(net, base.optim, rt, tc.seed)

    def evaluate(ema_net, final: bool) -> tuple[dict, dict]:
        if not final:
            return evaluate_base(ema_net, ae, exp, ae_exp, base, x_eval, latent_shape, samples=False)
        timer = PartTimer(rt.device)
        extractor = base_extractor_ahead(exp, rt.device, x_eval, data_hash)
        metrics, images = evaluate_base(ema_net, ae, exp, ae_exp, base, x_eval, latent_shape, extractor, data_hash,
                                        timer=timer)
        with timer("flops"):
            metrics.update(flops_metrics(base, latent_shape, ts.step))
        metrics.update(timer.seconds)
        return metrics, images

    spec = RunSpec(run_dir, KIND, f"base {base.name}", cfg_hash, dump_yaml(base),
                   {"config": to_dict(base), "experiment": to_dict(exp)},
                   {"data_hash": data_hash, "ae_checkpoint": ae_checkpoint, "ae_sha256": ae_meta["sha256"],
                    "latent_shape": list(latent_shape), "latents": latents.uri if latents else None,
                    "latents_hash": latents.content_hash if latents else None})
    objective = BaseObjective(net, base_schedule(ae_exp.ae.loss, base), base.loss.sigmoid_bias, latent_shape)
    res = train(objective, source, evaluate, ts, tc, spec, hooks)
    if res.metrics:
        say_done(base, res.metrics, res.checkpoint)
    return res


def say_done(base: BaseStageConfig, metrics: dict, checkpoint: str, how: str = "") -> None:
    """A finished base run's line: bits/pixel under the base model, gFD/gFID and checkpoint (`how`: e.g.
    " (member 2 of a group of 18)")."""
    fd = "".join(f"  {k}={v:.3f}" for k, v in metrics.items() if k.startswith(("gfd_", "gfid")))
    print(f"[base {base.name}] done{how}: base-model latent bits/pixel={metrics['base_bpp']:.4f}{fd}  "
          f"checkpoint={checkpoint}", flush=True)


def say_decode_path(exp: ExperimentConfig, ds, rt, label: str) -> str:
    """Where the training images are decoded if their latents must be encoded (`decode_path` of stage 1's
    loader choice for them); printed on rank 0 with the reason."""
    images, why = choose_loader(exp.data, ds, rt.device)
    decode = decode_path(images)
    if rt.is_main:
        how = "in process" if decode == IN_PROCESS else "through Ray Data"
        print(f"{label} data.loader {exp.data.loader} -> {images} for the training images: {why}; encoding "
              f"them, unless their latents are stored, decodes {how}", flush=True)
    return decode


def flops_metrics(base: BaseStageConfig, latent_shape, steps: int) -> dict[str, float]:
    from ulsweep.metrics.flops import gflops_per_image, training_flops

    net = build_base_model(base, latent_shape[0])
    z = torch.zeros(2, *latent_shape)
    g = gflops_per_image(net, z, torch.zeros(2))
    return {"gflops_base": g, "train_flops": float(training_flops(g * 1e9, steps * base.train.batch_size))}
