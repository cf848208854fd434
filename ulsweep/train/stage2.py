"""Stage 2 (§3.3): a base diffusion model on the frozen encoder's latents.

The encoder (EMA weights of the stage-1 checkpoint) maps the training split to z_clean once; the base
model learns z_clean with the sigmoid-weighted ELBO over lambda in [logsnr_min, lambda_z(0)]. Sampling
ends at lambda_z(0) and hands the noisy z_0 to the frozen decoder.
"""
from __future__ import annotations

import time

import torch

from ulsweep.config import BaseStageConfig, ExperimentConfig, config_hash, dump_yaml, experiment_from_dict, to_dict
from ulsweep.diffusion import LogSNRSchedule, base_loss, diffuse, low_discrepancy_times, x_from_v
from ulsweep.diffusion.bitrate import latent_bitrate
from ulsweep.models import build_autoencoder, build_base_model
from ulsweep.train.checkpoint import (CheckpointError, load_checkpoint, prune_checkpoints,
                                      save_checkpoint, step_dir)
from ulsweep.train.common import (Progress, TrainingDiverged, TrainState, all_reduce_mean, due, lr_at, make_runtime,
                                  shard)
from ulsweep.train.data import load_images
from ulsweep.train.evaluation import generation_fd_of, load_eval_extractor
from ulsweep.train.hooks import StageResult, TrainHooks
from ulsweep.train.sampling import decode, generate_latents, image_grid_png, to_uint8
from ulsweep.train.stage1 import finished_result, publish, start_or_resume

KIND = "base"


def base_schedule(ae_exp: ExperimentConfig, base: BaseStageConfig) -> LogSNRSchedule:
    """lambda from lambda_z(0) (the AE's encoder noise, fixed) down to the base model's logsnr_min."""
    return LogSNRSchedule(base.loss.schedule, ae_exp.ae.loss.logsnr_z0, base.loss.logsnr_min)


class BaseObjective(torch.nn.Module):
    """Per-example base-model loss (§3.3, nats [B]) as one module around the network, so that DDP wraps and
    torch.compile traces the noising and the weighted error together with the ViT."""

    def __init__(self, net: torch.nn.Module, sched: LogSNRSchedule, sigmoid_bias: float):
        super().__init__()
        self.net, self.sched, self.sigmoid_bias = net, sched, sigmoid_bias

    def forward(self, z: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        lam, dlam = self.sched.logsnr(t), self.sched.dlogsnr_dt(t)
        z_t = diffuse(z, lam, eps)
        v = self.net(z_t, lam)
        return base_loss(z, x_from_v(z_t, v.float(), lam), lam, dlam, self.sigmoid_bias)


def load_frozen_autoencoder(ae_checkpoint: str, device) -> tuple[torch.nn.Module, ExperimentConfig, dict]:
    """(EMA autoencoder in eval mode without gradients, its experiment config, checkpoint meta)."""
    state, meta = load_checkpoint(ae_checkpoint, map_location=device)
    if meta.get("kind") != "ae":
        raise CheckpointError(f"{ae_checkpoint}: is a {meta.get('kind')!r} checkpoint, not an autoencoder")
    ae_exp = experiment_from_dict(state["config"], file=f"{ae_checkpoint} (embedded config)")
    ae = build_autoencoder(ae_exp.ae, meta["image_shape"][0]).to(device)
    ae.load_state_dict(state["ema"])
    return ae.eval().requires_grad_(False), ae_exp, meta


@torch.no_grad()
def encode_all(encoder, x: torch.Tensor, batch: int = 512) -> torch.Tensor:
    return torch.cat([encoder(x[i:i + batch]).float() for i in range(0, len(x), batch)])


@torch.no_grad()
def evaluate_base(base_model, ae, exp: ExperimentConfig, ae_exp: ExperimentConfig, base: BaseStageConfig,
                  x_eval, latent_shape, extractor=None, data_hash: str = "") -> tuple[dict, dict]:
    """Held-out latent bits/pixel under the base model (unweighted ELBO, Table 5's 'bpd with base
    model'), decoded samples, and with an extractor gFD/gFID of `eval.gfd_samples` samples against the
    first `eval.gfd_reference_images` held-out images. Returns (metrics, images as PNG bytes)."""
    tc = base.train
    gen = torch.Generator(x_eval.device).manual_seed(tc.seed + 54321)
    sched = base_schedule(ae_exp, base)
    est = latent_bitrate(ae.encoder, base_model, x_eval[:tc.eval_images], sched, tc.eval_t_per_image,
                         generator=gen)
    metrics = {"base_bpp": est.bpp, "base_bpp_se": est.bpp_se}
    n = exp.eval.gfd_samples if extractor is not None else 64
    samples = generate(base_model, ae, ae_exp, base, n, latent_shape, tuple(x_eval.shape[1:]), gen)
    if extractor is not None:
        ref = to_uint8(x_eval[:exp.eval.gfd_reference_images])
        split = f"{exp.data.eval_split}@{exp.data.image_size}"
        metrics.update(generation_fd_of(extractor, samples, ref, data_hash, split))
        metrics["gen_samples"] = float(n)
    return metrics, {"samples.png": image_grid_png(samples[:64], cols=8)}


@torch.no_grad()
def generate(base_model, ae, ae_exp, base: BaseStageConfig, n: int, latent_shape, image_shape, gen,
             batch: int = 1000) -> torch.Tensor:
    """n images (uint8) from z_1 ~ N(0, I) -> base model -> z_0 at lambda_z(0) -> decoder (in batches of
    `batch`: small networks are launch-bound, so larger batches sample 10k images several times faster)."""
    tc, sched, out = base.train, base_schedule(ae_exp, base), []
    for i in range(0, n, batch):
        b = min(batch, n - i)
        z0 = generate_latents(base_model, b, latent_shape, sched, tc.sample_steps, "ancestral", gen, gen.device)
        out.append(to_uint8(decode(ae.decoder, z0, image_shape, ae_exp.ae.loss, ae_exp.ae.train.sample_steps,
                                   ae_exp.ae.train.sampler, gen)))
    return torch.cat(out)


def train_base(exp: ExperimentConfig, base: BaseStageConfig, ae_checkpoint: str, run_dir: str,
               hooks: TrainHooks | None = None) -> StageResult:
    """Train base model `base` on the latents of the frozen autoencoder at `ae_checkpoint`.

    `exp` supplies the data section; the autoencoder's own config comes from its checkpoint.
    """
    hooks = hooks or TrainHooks()
    tc, oc = base.train, base.optim
    rt = make_runtime(tc)
    ae, ae_exp, ae_meta = load_frozen_autoencoder(ae_checkpoint, rt.device)
    cfg_hash = _hash(exp, base, ae_meta)
    done = finished_result(run_dir, cfg_hash)
    if done is not None:
        return done
    torch.manual_seed(tc.seed + 1000 * rt.rank)
    x_train, x_eval, data_hash = load_images(exp.data, rt.device, max(tc.eval_images, exp.eval.gfd_reference_images))
    z_train = encode_all(ae.encoder, x_train)  # (N, c, h, w) frozen latents
    del x_train
    latent_shape = tuple(z_train.shape[1:])
    net = build_base_model(base, latent_shape[0]).to(rt.device)
    ts = TrainState(net, oc, rt, tc.seed)
    sched = base_schedule(ae_exp, base)
    model = start_or_resume(ts, run_dir, cfg_hash, KIND, dump_yaml(base), tc.compile,
                            BaseObjective(net, sched, base.loss.sigmoid_bias))
    meta_base = {"kind": KIND, "config_hash": cfg_hash, "data_hash": data_hash, "ae_checkpoint": ae_checkpoint,
                 "ae_sha256": ae_meta["sha256"], "latent_shape": list(latent_shape)}
    _, h, w = x_eval.shape[1:]

    def checkpoint(metrics: dict) -> str | None:
        if not rt.is_main:
            return None
        state = {**ts.state_dict(), "config": to_dict(base), "experiment": to_dict(exp)}
        path = save_checkpoint(run_dir, ts.step, state, {**meta_base, "step": ts.step,
                                                         "train_seconds": ts.train_seconds, "metrics": metrics})
        prune_checkpoints(run_dir, tc.keep_checkpoints)
        hooks.checkpoint_saved(ts.step, path, metrics)
        return path

    progress = Progress(tc.steps, f"base {base.name}", rt.is_main)
    step = ts.step
    acc, n_acc = torch.zeros((), device=rt.device), 0
    bad = torch.zeros((), dtype=torch.bool, device=rt.device)
    t_last = time.perf_counter()
    last_ckpt = step_dir(run_dir, ts.step) if ts.step else None  # a resumed run's last good checkpoint
    net.train()
    while ts.step < tc.steps and not hooks.should_stop():
        t0 = time.perf_counter()
        idx = torch.randint(len(z_train), (tc.batch_size,), generator=ts.gen, device=rt.device)
        t = low_discrepancy_times(tc.batch_size, ts.gen, rt.device)
        eps = torch.randn((tc.batch_size, *latent_shape), generator=ts.gen, device=rt.device)
        z, t, eps = shard(z_train[idx], rt), shard(t, rt), shard(eps, rt)
        with rt.autocast():
            nats = model(z, t, eps)
        loss = nats.mean() / z[0].numel()
        gnorm = ts.optimizer_step(loss)
        step = ts.step
        bad |= ~torch.isfinite(loss)
        acc += nats.detach().mean()
        n_acc += 1
        ts.train_seconds += time.perf_counter() - t0
        is_log = bool(tc.log_every) and step % tc.log_every == 0
        is_eval, is_ckpt = due(step, tc.eval_every, tc.steps), due(step, tc.ckpt_every, tc.steps)
        if (is_log or is_eval or is_ckpt) and bad.item():
            raise TrainingDiverged(f"base {base.name}: non-finite loss by step {step}; last good checkpoint "
                                   f"{last_ckpt or '(none)'} kept in {run_dir}", checkpoint=last_ckpt)
        if is_log and n_acc:
            ips = n_acc * tc.batch_size / max(time.perf_counter() - t_last, 1e-9)
            m = {"loss": all_reduce_mean(acc / n_acc, rt).item(), "grad_norm": gnorm.item(),
                 "lr": lr_at(step - 1, oc), "images_per_s": ips}
            if rt.is_main:
                hooks.log_metrics(step, m)
            progress.line(step, {"loss": m["loss"], "grad_norm": m["grad_norm"]}, ips)
            acc, n_acc, t_last = torch.zeros_like(acc), 0, time.perf_counter()
        if is_ckpt and step < tc.steps:
            last_ckpt = checkpoint({}) or last_ckpt
    step, train_seconds = ts.step, ts.train_seconds
    if step < tc.steps:
        path = checkpoint({})
        return StageResult({}, path or "", step, train_seconds, {"stopped": True})
    if not rt.is_main:
        return StageResult({}, "", step, train_seconds)
    extractor = load_eval_extractor(exp, rt.device)
    metrics, images = evaluate_base(ts.ema.shadow, ae, exp, ae_exp, base, x_eval, latent_shape, extractor, data_hash)
    metrics.update(_flops_metrics(exp, base, latent_shape, step))
    res = publish(run_dir, step, train_seconds, metrics, images, checkpoint, hooks, cfg_hash)
    fd = "".join(f"  {k}={v:.3f}" for k, v in metrics.items() if k.startswith(("gfd_", "gfid")))
    print(f"[base {base.name}] done: base-model latent bits/pixel={metrics['base_bpp']:.4f}{fd}  "
          f"checkpoint={res.checkpoint}", flush=True)
    return res


def _hash(exp: ExperimentConfig, base: BaseStageConfig, ae_meta: dict) -> str:
    """Identity of a base run: its data section, its own config and the exact AE weights it sits on."""
    return config_hash({"data": exp.data, "base": base, "ae_sha256": ae_meta["sha256"]})


def _flops_metrics(exp: ExperimentConfig, base: BaseStageConfig, latent_shape, steps: int) -> dict[str, float]:
    from ulsweep.metrics.flops import gflops_per_image, training_flops

    net = build_base_model(base, latent_shape[0])
    z = torch.zeros(2, *latent_shape)
    g = gflops_per_image(net, z, torch.zeros(2))
    return {"gflops_base": g, "train_flops": float(training_flops(g * 1e9, steps * base.train.batch_size))}
