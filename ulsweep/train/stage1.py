"""Stage 1 (Algorithm 1): encoder + diffusion prior + diffusion decoder, trained jointly.

`AEObjective` is the per-example loss; `evaluate_ae` the held-out bits/pixel, PSNR and rFD;
`train_autoencoder` runs them through the training loop (ulsweep/train/loop.py). Plain PyTorch: usable
without Ray.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection, Iterator, Sequence

import torch

from ulsweep.config import AELossConfig, ExperimentConfig, dump_yaml, to_dict
from ulsweep.data.sources import train_source
from ulsweep.diffusion import (decoder_loss, diffuse, latent_bitrates, low_discrepancy_times,
                               mse_decoder_loss, nats_to_bits_per_pixel, normal_prior_loss, prior_loss, x_from_v)
from ulsweep.diffusion.noise import Generator, seeded
from ulsweep.metrics.psnr import psnr
from ulsweep.models import UnifiedAutoencoder
from ulsweep.models.stacked import load_trial, per_example, plain
from ulsweep.train.build import build_autoencoder, decoder_schedule, mse_decoder_logsnr, prior_schedule, sampler
from ulsweep.train.build import latent_shape as latent_shape_of
from ulsweep.train.checkpoint import finished_result
from ulsweep.train.evaluation import (PartTimer, eval_batch_shapes, extractor_ahead, reconstruction_fd_of,
                                     reference_split, resolve_extractor, scored_in_order)
from ulsweep.train.hooks import StageResult, TrainHooks
from ulsweep.train.identity import stage1_hash
from ulsweep.train.loop import RunSpec, train
from ulsweep.train.runtime import make_runtime
from ulsweep.train.sampling import (fill_up, image_grid_png, member_by_member, reconstruct, sample_rows,
                                    sampling_calls, sampling_networks, sampling_precision, to_uint8)
from ulsweep.train.state import TrainState

KIND = "ae"


def draw_noise(batch: int, z_shape: tuple, x_shape: tuple, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One global batch's t_z, eps_z, eps_z0, t_x, eps_x from the shared generator (the same on every rank)."""
    device = gen.device
    return {
        "t_z": low_discrepancy_times(batch, gen, device),
        "eps_z": torch.randn((batch, *z_shape), generator=gen, device=device),
        "eps_z0": torch.randn((batch, *z_shape), generator=gen, device=device),
        "t_x": low_discrepancy_times(batch, gen, device),
        "eps_x": torch.randn((batch, *x_shape), generator=gen, device=device),
    }


class AEObjective(torch.nn.Module):
    """Algorithm 1's per-example losses (nats, [B]) around the autoencoder: what DDP wraps and torch.compile
    traces, so that the noising and the weighted errors compile together with the networks.

    The loss factor and the sigmoid bias enter as 0-d tensors (non-persistent buffers), not Python floats, which
    torch.compile would bake into the graph as constants: trials of a sweep that differ only in them then compile
    the same graphs, and a trial after the first compiles from torch's caches (ulsweep/train/compile_gate.py).
    In eager mode the losses are bit-identical to Python floats (a float scalar is applied in the tensor's dtype)."""

    progress_keys = ("loss", "train_bpp", "grad_norm")

    def __init__(self, ae: UnifiedAutoencoder, loss: AELossConfig, image_shape: tuple, latent_shape: tuple):
        super().__init__()
        self.ae, self.loss = ae, loss
        self.sz, self.sx = prior_schedule(loss), decoder_schedule(loss)
        self.image_shape, self.latent_shape = tuple(image_shape), tuple(latent_shape)
        self.dims = math.prod(self.image_shape)
        device = next(ae.parameters()).device
        self.register_buffer("loss_factor", torch.tensor(loss.loss_factor, device=device), persistent=False)
        self.register_buffer("sigmoid_bias", torch.tensor(loss.sigmoid_bias, device=device), persistent=False)

    def extra_repr(self) -> str:
        """What the graph depends on besides the networks (in repr, hence in the compile gate's key and in what
        `ulsweep.models.stacked.stack` compares): the loss settings but the two tensors, and the shapes."""
        loss = dataclasses.replace(self.loss, loss_factor=1.0, sigmoid_bias=0.0)
        return f"loss={loss}, image_shape={self.image_shape}, latent_shape={self.latent_shape}"

    def draw_noise(self, batch: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
        return draw_noise(batch, self.latent_shape, self.image_shape, gen)

    def forward(self, x: torch.Tensor, noise: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """x (B, C, H, W) in [-1, 1] -> {"total", "prior", "decoder"}, each (B,) in nats."""
        L, sz, sx = self.loss, self.sz, self.sx
        lam_z, dlam_z = sz.logsnr(noise["t_z"]), sz.dlogsnr_dt(noise["t_z"])
        lam_x, dlam_x = sx.logsnr(noise["t_x"]), sx.dlogsnr_dt(noise["t_x"])
        mse = L.decoder == "mse"

        z_clean = self.ae.encoder(x)
        z_prior_in = z_clean.detach() if L.stop_grad_prior else z_clean  # ablation A: prior sees sg(z_clean)
        z_t = diffuse(z_prior_in.float(), lam_z, noise["eps_z"]) if L.prior == "diffusion" else None
        z0 = diffuse(z_clean.float(), torch.full_like(lam_z, L.logsnr_z0), noise["eps_z0"])  # decoder's latent
        # Table 5 MSE decoder: no x_t; it maps z_0 straight to x, conditioned on a fixed lambda
        x_t = torch.zeros_like(x) if mse else diffuse(x, lam_x, noise["eps_x"])
        lam_dec = torch.full_like(lam_x, mse_decoder_logsnr(L)) if mse else lam_x
        v_z = self.ae.prior(z_t, lam_z) if z_t is not None else None
        v_x = self.ae.decoder(x_t, lam_dec, z0)

        z_clean = z_clean.float()
        out = {}
        if L.prior == "diffusion":
            z_in = z_clean.detach() if L.stop_grad_prior else z_clean
            out["prior"] = prior_loss(z_in, x_from_v(z_t, v_z.float(), lam_z), lam_z, dlam_z, sz.logsnr_1)
            # ablation A: the encoder sees only a discounted KL to N(0, I); the prior still measures the rate
            reg = L.normal_kl_weight * normal_prior_loss(z_clean, L.logsnr_z0) if L.stop_grad_prior else 0.0
        else:  # Table 5 normal prior: KL[q(z_0|x) || N(0, I)] is the rate
            out["prior"] = normal_prior_loss(z_clean, L.logsnr_z0)
            reg = 0.0
        # (K,) under ulsweep.models.stacked: K trials' values, each over its own rows of the batch
        lf, b = per_example(self.loss_factor, len(x)), per_example(self.sigmoid_bias, len(x))
        if mse:
            out["decoder"] = mse_decoder_loss(x, v_x.float(), lf, math.exp(L.mse_logsnr))
        else:
            out["decoder"] = decoder_loss(x, x_from_v(x_t, v_x.float(), lam_x), lam_x, dlam_x, lf, b)
        out["total"] = out["prior"] + out["decoder"] + reg
        return out

    def curves(self, means: dict[str, float]) -> dict[str, float]:
        _, h, w = self.image_shape
        return {"loss": means["total"], "prior_nats": means["prior"], "decoder_nats": means["decoder"],
                "train_bpp": nats_to_bits_per_pixel(means["prior"], h, w)}


def eval_generator(exps: Sequence[ExperimentConfig], device: torch.device) -> Generator:
    """The evaluation's own fixed-seed generator (it never disturbs the training RNG stream); for a group's
    members (more than one experiment), each member's, as its run alone would seed it."""
    return seeded([e.ae.train.seed + 12345 for e in exps], device)


@torch.no_grad()
def reconstruct_images(ae, x: torch.Tensor, exp: ExperimentConfig, gen: Generator,
                       members: int = 1) -> tuple[torch.Tensor, bool]:
    """Reconstructions of `x` (model range) by `ae` as the evaluation samples them, in calls of one size of at
    most `eval.sample_batch` images (`sample_rows`, `sampling_calls`), under `eval.sample_precision` and, with
    `eval.sample_compile`, through the sampling gate; and whether the decoder ran compiled (False while another
    process of the node compiled it). With `members` K > 1, `ae` is a group's stacked autoencoder
    (ulsweep/models/stacked.py) and `gen` its MemberGenerators, and the result is (K, N, C, H, W), member k's
    reconstructions by its own weights and noise: with `resources.stack_sampling` each, member after member
    through one ordinary autoencoder holding its weights in turn (as its run alone samples them); with stacked,
    every call through the stacked one for all members at once (each member's share of the call's rows)."""
    tc = exp.ae.train
    each = member_by_member(exp, members)
    net = plain(ae) if each else ae

    def batches(decoder, g, m: int) -> torch.Tensor:  # (m, N, C, H, W)
        size, calls = sampling_calls(len(x), sample_rows(exp.eval.sample_batch, x.shape), m)

        def rows(xb: torch.Tensor) -> torch.Tensor:  # a stacked group's batch holds every member's rows
            return xb.repeat(m, 1, 1, 1) if m > 1 else xb

        return torch.cat([reconstruct(net.encoder, decoder, rows(fill_up(x, i * size, size)), exp.ae.loss,
                                      tc.sample_steps, sampler(tc, "decoder"), g).unflatten(0, (m, -1))
                          for i in range(calls)], 1)[:, :len(x)]

    with (sampling_precision(exp.eval.sample_precision, x.device),
          sampling_networks([net.decoder], exp.eval.sample_compile, exp.eval.sample_precision, x.device,
                            f"ae {exp.name} sampling") as (decoder,)):
        if not each:
            recon = batches(decoder, gen, members)
        else:
            recon = []
            for k in range(members):
                load_trial(net, ae, k)
                recon.append(batches(decoder, gen.gens[k], 1)[0])
            recon = torch.stack(recon)
    return (recon if members > 1 else recon[0]), decoder is not net.decoder


@torch.no_grad()
def latent_bpps(ae, x_eval: torch.Tensor, exp: ExperimentConfig, gen: Generator, members: int = 1) -> list[dict]:
    """Held-out latent bits/pixel (+- s.e.) of each of the `members` autoencoders of `ae` (stacked for more than
    one) on `x_eval`: the diffusion prior's bound (Eq. 3), or the Table 5 normal prior's KL."""
    L, tc = exp.ae.loss, exp.ae.train
    if L.prior == "diffusion":
        return [{"bpp": e.bpp, "bpp_se": e.bpp_se}
                for e in latent_bitrates(ae.encoder, ae.prior, x_eval, prior_schedule(L), tc.eval_t_per_image,
                                         generator=gen, members=members)]
    _, _, h, w = x_eval.shape
    nats = torch.cat([normal_prior_loss(ae.encoder(xb.repeat(members, 1, 1, 1)).float(), L.logsnr_z0)
                      .reshape(members, -1) for xb in x_eval.split(256)], 1).double()
    bpp = nats_to_bits_per_pixel(nats, h, w)
    return [{"bpp": b.mean().item(), "bpp_se": b.std().item() / math.sqrt(len(b))} for b in bpp]


@torch.no_grad()
def evaluate_aes(ae, x_eval: torch.Tensor, exps: Sequence[ExperimentConfig], with_images: bool = True,
                 extractor=None, data_hash: str = "", timer: PartTimer | None = None,
                 skip: Collection[int] = ()) -> Iterator[tuple[dict, dict, dict]]:
    """Held-out latent bits/pixel (+- s.e.), reconstruction PSNR (8-bit scale) and, with an extractor,
    rFD/rFID of an (EMA) autoencoder on the images `x_eval` (model range); with K = len(exps) > 1 experiments,
    of the K members of a group's stacked autoencoder `ae` at once (ulsweep/train/group.py: they differ only in
    loss factor, bias and seed). The bits/pixel and the reconstructions run once for all members, each drawing
    from its own generator (`eval_generator`); then each member's PSNR, rFD/rFID and images in turn.

    Yields each member's (metrics, images, seconds) as soon as its own parts are done, in order, but the members
    in `skip` (a group's diverged ones): images maps a name to PNG bytes; seconds, the `seconds/<part>` of its
    evaluation (the shared parts' and its own), where `timer` times the parts (bpp, sampling, fd) of all members.
    """
    exp, k = exps[0], len(exps)
    timer = timer or PartTimer(enabled=False)
    gen = eval_generator(exps, x_eval.device)
    with timer("bpp"):
        bpps = latent_bpps(ae, x_eval, exp, gen, k)
    with timer("sampling"):
        recons, _ = reconstruct_images(ae, x_eval, exp, gen, k)
    with timer("extractor"):  # loaded and warmed beside the parts above, where it comes from `extractor_ahead`
        extractor = resolve_extractor(extractor)
    real_u8 = to_uint8(x_eval)
    shared = dict(timer.seconds)

    def score(i: int) -> tuple[dict, dict, PartTimer]:
        e = exps[i]
        recon = recons[i] if k > 1 else recons
        recon_u8 = to_uint8(recon)
        metrics = bpps[i] | {"psnr": psnr(recon_u8, real_u8).mean().item(),
                             "psnr_steps": float(e.ae.train.sample_steps)}
        own = PartTimer(x_eval.device, enabled=timer.enabled)
        if extractor is not None:
            with own("fd"):
                metrics.update(reconstruction_fd_of(extractor, real_u8, recon_u8, data_hash, reference_split(e)))
        images = {}
        if with_images:
            n = min(32, len(x_eval))
            pairs = torch.stack([real_u8[:n], recon_u8[:n]], 1).flatten(0, 1)
            images["reconstructions.png"] = image_grid_png(pairs, cols=8)
        return metrics, images, own

    # each member's PSNR, rFD and images; a group's, two at a time on a GPU
    for metrics, images, own in scored_in_order(score, [i for i in range(k) if i not in skip], x_eval.device):
        timer.add(own)
        yield metrics, images, shared | own.seconds


def ae_extractor_ahead(exp: ExperimentConfig, device: torch.device, x_eval: torch.Tensor, data_hash: str):
    """`extractor_ahead` for an autoencoder evaluation's scoring of `x_eval`'s reconstructions: the extractors
    warmed at its batch shapes, the statistics of `x_eval` itself (rFD's reference) cached."""
    return extractor_ahead(exp, device, eval_batch_shapes(tuple(x_eval.shape[1:]), [len(x_eval)]),
                           [(to_uint8(x_eval), data_hash, reference_split(exp))])


def evaluate_ae(ae, x_eval: torch.Tensor, exp: ExperimentConfig, with_images: bool = True,
                extractor=None, data_hash: str = "", timer: PartTimer | None = None) -> tuple[dict, dict]:
    """`evaluate_aes` of one run's autoencoder: (metrics, images)."""
    metrics, images, _ = next(evaluate_aes(ae, x_eval, [exp], with_images, extractor, data_hash, timer))
    return metrics, images


def final_evaluations(ema_ae, ae, x_eval: torch.Tensor, exps: Sequence[ExperimentConfig], extractor,
                      data_hash: str, steps: int, timer: PartTimer,
                      skip: Collection[int] = ()) -> Iterator[tuple[dict, dict, dict]]:
    """The final evaluation after `steps` steps of one run (one experiment) or of a group's members (stacked
    `ema_ae` and `ae`): `evaluate_aes` of the EMA autoencoder with images and the extractor's rFD/rFID, the same
    bits/pixel bound for the online weights `ae` (it shows any EMA mismatch; taken first, for all members) and
    the FLOPs. Yields each member's but `skip`'s (metrics, images, seconds) as `evaluate_aes` does."""
    exp, k = exps[0], len(exps)
    online = {}
    if exp.ae.loss.prior == "diffusion":
        was_training = ae.training
        ae.eval()
        with timer("bpp"):
            bpps = latent_bpps(ae, x_eval, exp, eval_generator(exps, x_eval.device), k)
        online = {"bpp_online": [b["bpp"] for b in bpps]}
        ae.train(was_training)
    with timer("flops"):
        flops = _flops_metrics(exp, x_eval.shape[1], steps)
    alive = [i for i in range(k) if i not in skip]
    for i, (metrics, images, seconds) in zip(alive, evaluate_aes(ema_ae, x_eval, exps, True, extractor, data_hash,
                                                                 timer, skip)):
        yield metrics | {key: v[i] for key, v in online.items()} | flops, images, seconds


def final_evaluation(ema_ae, ae, x_eval: torch.Tensor, exp: ExperimentConfig, extractor, data_hash: str, steps: int,
                     timer: PartTimer) -> tuple[dict, dict]:
    """`final_evaluations` of one run: (metrics, images)."""
    metrics, images, _ = next(final_evaluations(ema_ae, ae, x_eval, [exp], extractor, data_hash, steps, timer))
    return metrics, images


def train_autoencoder(exp: ExperimentConfig, run_dir: str, hooks: TrainHooks | None = None) -> StageResult:
    """Train stage 1 in `run_dir` (path or URI), resuming from its newest valid checkpoint."""
    hooks = hooks or TrainHooks()
    tc = exp.ae.train
    cfg_hash = stage1_hash(exp)
    done = finished_result(run_dir, cfg_hash)
    if done is not None:
        return done
    rt = make_runtime(tc)
    torch.manual_seed(tc.seed + 1000 * rt.rank)  # weight initialization
    shard = getattr(hooks, "dataset_shard", lambda name: None)("train")
    source, x_eval, data_hash, image_shape = train_source(exp.data, rt, tc.seed, tc.eval_images, tc.batch_size,
                                                          shard, label=f"ae {exp.name}")
    c = image_shape[0]
    latent_shape = latent_shape_of(exp)
    ae = build_autoencoder(exp.ae, c).to(rt.device)
    ts = TrainState(ae, exp.ae.optim, rt, tc.seed)

    def evaluate(ema_ae, final: bool) -> tuple[dict, dict]:
        if not final:
            return evaluate_ae(ema_ae, x_eval, exp, with_images=False)
        timer = PartTimer(rt.device)
        extractor = ae_extractor_ahead(exp, rt.device, x_eval, data_hash)
        metrics, images = final_evaluation(ema_ae, ae, x_eval, exp, extractor, data_hash, ts.step, timer)
        metrics.update(timer.seconds)
        return metrics, images

    spec = RunSpec(run_dir, KIND, f"ae {exp.name}", cfg_hash, dump_yaml(exp), {"config": to_dict(exp)},
                   {"data_hash": data_hash, "image_shape": list(image_shape), "latent_shape": list(latent_shape)})
    res = train(AEObjective(ae, exp.ae.loss, image_shape, latent_shape), source, evaluate, ts, tc, spec, hooks)
    if res.metrics:
        say_done(exp, res.metrics, res.checkpoint)
    return res


def say_done(exp: ExperimentConfig, metrics: dict, checkpoint: str, how: str = "") -> None:
    """A finished run's line: bits/pixel, PSNR, rFD/rFID and checkpoint (`how`: e.g. " (member 2 of a group of
    18)")."""
    fd = "".join(f"  {k}={v:.3f}" for k, v in metrics.items() if k.startswith(("rfd", "rfid")))
    print(f"[ae {exp.name}] done{how}: bits/pixel={metrics['bpp']:.4f} +- {metrics['bpp_se']:.4f}  "
          f"PSNR={metrics['psnr']:.2f} dB{fd}  checkpoint={checkpoint}", flush=True)


def _flops_metrics(exp: ExperimentConfig, image_channels: int, steps: int) -> dict[str, float]:
    """Forward GFLOP per image of each stage-1 network and the run's training FLOPs (3 x fwd x images)."""
    from ulsweep.metrics.flops import model_gflops, training_flops

    g = model_gflops(exp, image_channels)
    out = {f"gflops_{k}": v for k, v in g.items() if not k.startswith("base")}
    fwd = sum(v for k, v in g.items() if k in ("encoder", "prior", "decoder")) * 1e9
    out["train_flops"] = float(training_flops(fwd, steps * exp.ae.train.batch_size))
    return out
