"""Stage 1 (Algorithm 1): encoder + diffusion prior + diffusion decoder, trained jointly.

Plain PyTorch, usable without Ray; under torch.distributed every rank draws the same global batch
and noise from a shared generator and trains on its slice, so the loss does not depend on the number
of workers. Checkpoints make the run resumable exactly (weights, EMA, optimizer, RNG, step).
"""
from __future__ import annotations

import json
import math
import time
import warnings

import torch

from ulsweep import io as uio
from ulsweep.config import ExperimentConfig, config_hash, dump_yaml, to_dict
from ulsweep.diffusion import (decoder_loss, diffuse, low_discrepancy_times, mse_decoder_loss,
                               normal_prior_loss, prior_loss, x_from_v)
from ulsweep.diffusion.bitrate import latent_bitrate, nats_to_bits_per_pixel
from ulsweep.metrics.psnr import psnr
from ulsweep.models import build_autoencoder
from ulsweep.train.checkpoint import (CheckpointError, latest_valid_checkpoint, prune_checkpoints,
                                      save_checkpoint, step_dir)
from ulsweep.train.common import (Progress, Runtime, TrainingDiverged, TrainState, all_reduce_mean, compile_module,
                                  due, lr_at, make_runtime, shard, wrap_ddp)
from ulsweep.train.data import load_images
from ulsweep.train.evaluation import load_eval_extractor, reconstruction_fd_of
from ulsweep.train.hooks import StageResult, TrainHooks
from ulsweep.train.sampling import decoder_schedule, image_grid_png, prior_schedule, reconstruct, to_uint8

KIND = "ae"


def stage1_losses(ae, x: torch.Tensor, exp: ExperimentConfig, noise: dict) -> dict[str, torch.Tensor]:
    """Per-example losses (nats, [B]) of Algorithm 1 for images x (B, C, H, W) in [-1, 1].

    `noise` holds this batch's t_z, eps_z, eps_z0, t_x, eps_x (drawn by the caller so that the result
    is reproducible and independent of how the batch is split across workers).
    """
    L = exp.ae.loss
    sz, sx = prior_schedule(L), decoder_schedule(L)
    lam_z, dlam_z = sz.logsnr(noise["t_z"]), sz.dlogsnr_dt(noise["t_z"])
    lam_x, dlam_x = sx.logsnr(noise["t_x"]), sx.dlogsnr_dt(noise["t_x"])
    lam_0 = torch.full_like(lam_z, L.logsnr_z0)
    mse = L.decoder == "mse"

    kept = {}

    def noisify(z_clean):
        z_in = z_clean.detach() if L.stop_grad_prior else z_clean
        kept["z_t"] = diffuse(z_in.float(), lam_z, noise["eps_z"]) if L.prior == "diffusion" else None
        z0 = diffuse(z_clean.float(), lam_0, noise["eps_z0"])  # z_0 = alpha_0 z_clean + sigma_0 eps
        kept["x_t"] = torch.zeros_like(x) if mse else diffuse(x, lam_x, noise["eps_x"])
        # Table 5 MSE decoder: no x_t, the decoder maps z_0 straight to x (at a fixed, noisy lambda)
        lam_dec = torch.full_like(lam_x, sx.logsnr_1) if mse else lam_x
        return kept["z_t"], lam_z, z0, kept["x_t"], lam_dec

    z_clean, v_z, v_x = ae(x, noisify)
    z_clean = z_clean.float()
    out = {}
    if L.prior == "diffusion":
        z_in = z_clean.detach() if L.stop_grad_prior else z_clean
        out["prior"] = prior_loss(z_in, x_from_v(kept["z_t"], v_z.float(), lam_z), lam_z, dlam_z, sz.logsnr_1)
        # ablation A: the encoder sees only a discounted KL to N(0, I); the prior still measures the rate
        reg = L.normal_kl_weight * normal_prior_loss(z_clean, L.logsnr_z0) if L.stop_grad_prior else 0.0
    else:  # Table 5 normal prior: KL[q(z_0|x) || N(0, I)] is the rate
        out["prior"] = normal_prior_loss(z_clean, L.logsnr_z0)
        reg = 0.0
    if mse:
        out["decoder"] = mse_decoder_loss(x, v_x.float(), L.loss_factor, math.exp(L.mse_logsnr))
    else:
        out["decoder"] = decoder_loss(x, x_from_v(kept["x_t"], v_x.float(), lam_x), lam_x, dlam_x, L.loss_factor,
                                      L.sigmoid_bias)
    out["total"] = out["prior"] + out["decoder"] + reg
    return out


class Stage1Objective(torch.nn.Module):
    """Algorithm 1's per-example losses as one module around the autoencoder: what DDP wraps and torch.compile
    traces, so that the loss arithmetic (noising, x_hat from v, weighted squared errors) is compiled together
    with the networks instead of running as eager kernels on full-size images between them."""

    def __init__(self, ae, exp: ExperimentConfig):
        super().__init__()
        self.ae, self.exp = ae, exp

    def forward(self, x: torch.Tensor, noise: dict) -> dict[str, torch.Tensor]:
        return stage1_losses(self.ae, x, self.exp, noise)


def draw_noise(batch: int, z_shape: tuple, x_shape: tuple, gen: torch.Generator, device) -> dict:
    """Global-batch noise from the shared generator (same on every rank)."""
    return {
        "t_z": low_discrepancy_times(batch, gen, device),
        "eps_z": torch.randn((batch, *z_shape), generator=gen, device=device),
        "eps_z0": torch.randn((batch, *z_shape), generator=gen, device=device),
        "t_x": low_discrepancy_times(batch, gen, device),
        "eps_x": torch.randn((batch, *x_shape), generator=gen, device=device),
    }


@torch.no_grad()
def evaluate_ae(ae, x_eval: torch.Tensor, exp: ExperimentConfig, with_images: bool = True,
                extractor=None, data_hash: str = "") -> tuple[dict, dict]:
    """Held-out latent bits/pixel (+- s.e.), reconstruction PSNR (8-bit scale) and, with an extractor,
    rFD/rFID of an (EMA) autoencoder on the images `x_eval` (model range).

    Uses its own fixed-seed generator so that evaluation never disturbs the training RNG stream.
    Returns (metrics, images) where images maps a name to PNG bytes.
    """
    tc, L = exp.ae.train, exp.ae.loss
    gen = torch.Generator(x_eval.device).manual_seed(tc.seed + 12345)
    _, _, h, w = x_eval.shape
    if L.prior == "diffusion":
        est = latent_bitrate(ae.encoder, ae.prior, x_eval, prior_schedule(L), tc.eval_t_per_image,
                             generator=gen)
        metrics = {"bpp": est.bpp, "bpp_se": est.bpp_se}
    else:
        nats = torch.cat([normal_prior_loss(ae.encoder(x_eval[i:i + 256]).float(), L.logsnr_z0)
                          for i in range(0, len(x_eval), 256)]).double()
        bpp = nats_to_bits_per_pixel(nats, h, w)
        metrics = {"bpp": bpp.mean().item(), "bpp_se": bpp.std().item() / math.sqrt(len(bpp))}
    recon = torch.cat([reconstruct(ae.encoder, ae.decoder, x_eval[i:i + 256], L, tc.sample_steps, tc.sampler, gen)
                       for i in range(0, len(x_eval), 256)])
    real_u8, recon_u8 = to_uint8(x_eval), to_uint8(recon)
    metrics["psnr"] = psnr(recon_u8, real_u8).mean().item()
    metrics["psnr_steps"] = float(tc.sample_steps)
    if extractor is not None:
        split = f"{exp.data.eval_split}@{exp.data.image_size}"
        metrics.update(reconstruction_fd_of(extractor, real_u8, recon_u8, data_hash, split))
    images = {}
    if with_images:
        k = min(32, len(x_eval))
        pairs = torch.stack([to_uint8(x_eval[:k]), to_uint8(recon[:k])], 1).flatten(0, 1)
        images["reconstructions.png"] = image_grid_png(pairs, cols=8)
    return metrics, images


def write_images(run_dir: str, images: dict[str, bytes]) -> dict[str, str]:
    """PNG bytes -> run_dir/images/<name>; returns name -> path."""
    paths = {}
    for name, png in images.items():
        paths[name] = uio.join(run_dir, "images", name)
        uio.atomic_write_bytes(paths[name], png)
    return paths


def publish(run_dir: str, step: int, train_seconds: float, metrics: dict, images: dict[str, bytes], checkpoint,
            hooks: TrainHooks, cfg_hash: str) -> StageResult:
    """End of a finished run (rank 0): final metrics to the hooks, final checkpoint, images, then result.json,
    written last and atomically: it marks the run finished (`finished_result` reads it back)."""
    hooks.log_metrics(step, {f"eval_{k}": v for k, v in metrics.items()})
    path = checkpoint(metrics)
    extra = {"images": write_images(run_dir, images)}
    result = {"metrics": metrics, "checkpoint": path, "steps": step, "train_seconds": train_seconds,
              "config_hash": cfg_hash, "extra": extra}
    uio.atomic_write_text(uio.join(run_dir, "result.json"), json.dumps(result, indent=1, sort_keys=True))
    return StageResult(metrics, path, step, train_seconds, extra)


def finished_result(run_dir: str, cfg_hash: str) -> StageResult | None:
    """The stored result of a run that already finished with this config, else None."""
    path = uio.join(run_dir, "result.json")
    if not uio.exists(path):
        return None
    try:
        r = json.loads(uio.read_bytes(path))
        if r.get("config_hash") != cfg_hash:
            return None
        return StageResult(r["metrics"], r["checkpoint"], r["steps"], r["train_seconds"], r.get("extra", {}))
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # damaged: not finished, resume instead
        warnings.warn(f"{path}: unreadable result ({type(e).__name__}: {e}); resuming the run instead")
        return None


def start_or_resume(ts: TrainState, run_dir: str, cfg_hash: str, kind: str, config_yaml: str,
                    compile_: bool | str, objective: torch.nn.Module) -> torch.nn.Module:
    """Restore `ts` from the run's newest valid checkpoint (it must be of this kind and config), or write
    config.yaml on a fresh run; return `objective` (a module around `ts.net` that computes the losses) to
    train: DDP-wrapped under torch.distributed, compiled when asked."""
    rt = ts.rt
    ck = latest_valid_checkpoint(run_dir, map_location=rt.device)
    if ck is not None:
        state, meta = ck
        if meta.get("kind") != kind or meta.get("config_hash") != cfg_hash:
            raise CheckpointError(
                f"{run_dir}: holds a {meta.get('kind')!r} checkpoint of config {meta.get('config_hash')} but this "
                f"run is {kind!r} with config {cfg_hash}; use a fresh run directory or the same config")
        ts.load_state_dict(state, meta)
    elif rt.is_main:
        uio.atomic_write_text(uio.join(run_dir, "config.yaml"), config_yaml)
    return compile_module(wrap_ddp(objective, rt), compile_, rt)


def train_autoencoder(exp: ExperimentConfig, run_dir: str, hooks: TrainHooks | None = None) -> StageResult:
    """Train stage 1 in `run_dir` (path or URI), resuming from its newest valid checkpoint."""
    hooks = hooks or TrainHooks()
    tc, oc = exp.ae.train, exp.ae.optim
    cfg_hash = config_hash(exp)
    done = finished_result(run_dir, cfg_hash)
    if done is not None:
        return done
    rt = make_runtime(tc)
    torch.manual_seed(tc.seed + 1000 * rt.rank)
    x_train, x_eval, data_hash = load_images(exp.data, rt.device, tc.eval_images)
    _, c, h, w = x_train.shape
    ae = build_autoencoder(exp.ae, c).to(rt.device)
    ts = TrainState(ae, oc, rt, tc.seed)
    model = start_or_resume(ts, run_dir, cfg_hash, KIND, dump_yaml(exp), tc.compile, Stage1Objective(ae, exp))
    z_shape = (exp.ae.model.latent_channels, h // exp.ae.model.downsample, w // exp.ae.model.downsample)
    meta_base = {"kind": KIND, "config_hash": cfg_hash, "data_hash": data_hash,
                 "image_shape": [c, h, w], "latent_shape": list(z_shape)}

    def checkpoint(metrics: dict) -> str | None:
        if not rt.is_main:
            return None
        path = save_checkpoint(run_dir, ts.step, {**ts.state_dict(), "config": to_dict(exp)},
                               {**meta_base, "step": ts.step, "train_seconds": ts.train_seconds, "metrics": metrics})
        prune_checkpoints(run_dir, tc.keep_checkpoints)
        hooks.checkpoint_saved(ts.step, path, metrics)
        return path

    progress = Progress(tc.steps, f"ae {exp.name}", rt.is_main)
    step = ts.step
    acc = {k: torch.zeros((), device=rt.device) for k in ("total", "prior", "decoder", "grad_norm")}
    bad = torch.zeros((), dtype=torch.bool, device=rt.device)
    n_acc, t_last = 0, time.perf_counter()
    last_ckpt = step_dir(run_dir, ts.step) if ts.step else None  # a resumed run's last good checkpoint
    ae.train()
    while ts.step < tc.steps and not hooks.should_stop():
        t0 = time.perf_counter()
        idx = torch.randint(len(x_train), (tc.batch_size,), generator=ts.gen, device=rt.device)
        noise = draw_noise(tc.batch_size, z_shape, (c, h, w), ts.gen, rt.device)
        x = shard(x_train[idx], rt)
        noise = {k: shard(v, rt) for k, v in noise.items()}
        with rt.autocast():
            losses = model(x, noise)
        loss = losses["total"].mean() / (c * h * w)  # nats per image dimension, for the optimizer
        gnorm = ts.optimizer_step(loss)
        step = ts.step
        bad |= ~torch.isfinite(loss)
        for k in ("total", "prior", "decoder"):
            acc[k] += losses[k].detach().mean()
        acc["grad_norm"] += gnorm.detach()
        n_acc += 1
        ts.train_seconds += time.perf_counter() - t0
        is_log = bool(tc.log_every) and step % tc.log_every == 0
        is_eval, is_ckpt = due(step, tc.eval_every, tc.steps), due(step, tc.ckpt_every, tc.steps)
        if is_log or is_eval or is_ckpt:
            if bad.item():
                raise TrainingDiverged(f"ae {exp.name}: non-finite loss by step {step}; last good checkpoint "
                                       f"{last_ckpt or '(none)'} kept in {run_dir}", checkpoint=last_ckpt)
        if is_log and n_acc:
            m = {k: all_reduce_mean(v / n_acc, rt).item() for k, v in acc.items()}
            m = {"loss": m["total"], "prior_nats": m["prior"], "decoder_nats": m["decoder"],
                 "train_bpp": nats_to_bits_per_pixel(m["prior"], h, w), "grad_norm": m["grad_norm"],
                 "lr": lr_at(step - 1, oc)}
            ips = n_acc * tc.batch_size / max(time.perf_counter() - t_last, 1e-9)
            m["images_per_s"] = ips
            if rt.is_main:
                hooks.log_metrics(step, m)
            progress.line(step, {k: m[k] for k in ("loss", "train_bpp", "grad_norm")}, ips)
            acc = {k: torch.zeros_like(v) for k, v in acc.items()}
            n_acc, t_last = 0, time.perf_counter()
        metrics = {}
        if is_eval and step < tc.steps and rt.is_main:
            metrics, _ = evaluate_ae(ts.ema.shadow, x_eval, exp, with_images=False)
            hooks.log_metrics(step, {f"eval_{k}": v for k, v in metrics.items()})
        if is_ckpt and step < tc.steps:
            last_ckpt = checkpoint(metrics) or last_ckpt
    if ts.step < tc.steps:  # stopped early on request
        path = checkpoint({})
        return StageResult({}, path or "", ts.step, ts.train_seconds, {"stopped": True})
    return finish_ae(exp, run_dir, ae, ts.ema.shadow, x_eval, rt, ts.step, ts.train_seconds, checkpoint, hooks,
                     cfg_hash, data_hash)


def finish_ae(exp, run_dir, ae, ema_ae, x_eval, rt: Runtime, step, train_seconds, checkpoint, hooks, cfg_hash,
              data_hash):
    """Final evaluation (EMA weights), checkpoint and result.json on rank 0."""
    if not rt.is_main:
        return StageResult({}, "", step, train_seconds)
    extractor = load_eval_extractor(exp, rt.device)
    metrics, images = evaluate_ae(ema_ae, x_eval, exp, extractor=extractor, data_hash=data_hash)
    if exp.ae.loss.prior == "diffusion":  # the same bound for the online weights: shows any EMA mismatch
        ae.eval()
        gen = torch.Generator(x_eval.device).manual_seed(exp.ae.train.seed + 12345)
        metrics["bpp_online"] = latent_bitrate(ae.encoder, ae.prior, x_eval, prior_schedule(exp.ae.loss),
                                               exp.ae.train.eval_t_per_image, generator=gen).bpp
    c, h, w = x_eval.shape[1:]
    metrics.update(_flops_metrics(exp, c, step))
    res = publish(run_dir, step, train_seconds, metrics, images, checkpoint, hooks, cfg_hash)
    fd = "".join(f"  {k}={v:.3f}" for k, v in metrics.items() if k.startswith(("rfd", "rfid")))
    print(f"[ae {exp.name}] done: bits/pixel={metrics['bpp']:.4f} +- {metrics['bpp_se']:.4f}  "
          f"PSNR={metrics['psnr']:.2f} dB{fd}  checkpoint={res.checkpoint}", flush=True)
    return res


def _flops_metrics(exp: ExperimentConfig, image_channels: int, steps: int) -> dict[str, float]:
    """Forward GFLOP per image of each stage-1 network and the run's training FLOPs (3 x fwd x images)."""
    from ulsweep.metrics.flops import model_gflops, training_flops

    g = model_gflops(exp, image_channels)
    out = {f"gflops_{k}": v for k, v in g.items() if not k.startswith("base")}
    fwd = sum(v for k, v in g.items() if k in ("encoder", "prior", "decoder")) * 1e9
    out["train_flops"] = float(training_flops(fwd, steps * exp.ae.train.batch_size))
    return out
