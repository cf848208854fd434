"""From the typed config to the objects a run trains and samples with: networks and log-SNR schedules.

The networks themselves (ulsweep/models) and the diffusion math (ulsweep/diffusion) never read the config;
this module is where config values become their arguments.
"""
from __future__ import annotations

from ulsweep.config import AELossConfig, AEStageConfig, BaseStageConfig, TrainConfig
from ulsweep.diffusion import LogSNRSchedule
from ulsweep.models import AE_PRESETS, BASE_PRESETS, BaseViT, DecoderUViT, Encoder, PriorViT, UnifiedAutoencoder
from ulsweep.train import identity

latent_shape = identity.latent_shape  # config arithmetic, kept without torch (identity.py: the driver plans with it)


def build_autoencoder(cfg: AEStageConfig, image_channels: int) -> UnifiedAutoencoder:
    m, preset = cfg.model, AE_PRESETS[cfg.model.preset]
    encoder = Encoder(image_channels, m.latent_channels, m.downsample, preset)
    prior = None if cfg.loss.prior == "normal" else PriorViT(m.latent_channels, preset)
    decoder = DecoderUViT(image_channels, m.latent_channels, m.downsample, preset)
    return UnifiedAutoencoder(encoder, prior, decoder)


def autoencoder_init(cfg: AEStageConfig, image_channels: int) -> tuple:
    """What `build_autoencoder` reads, hence what its weights drawn after one seed depend on: runs that differ only
    in the rest (a loss factor, a sigmoid bias, the training) start from the same weights."""
    return repr(cfg.model), cfg.loss.prior == "normal", image_channels


def build_base_model(cfg: BaseStageConfig, latent_channels: int) -> BaseViT:
    return BaseViT(latent_channels, BASE_PRESETS[cfg.model.preset])


def base_model_init(cfg: BaseStageConfig, latent_channels: int) -> tuple:
    """What `build_base_model` reads (`autoencoder_init`'s counterpart)."""
    return repr(cfg.model), latent_channels


def prior_schedule(loss: AELossConfig) -> LogSNRSchedule:
    """The prior's lambda_z(t), from the encoder's fixed noise lambda_z(0) to lambda_z(1)."""
    return LogSNRSchedule(loss.prior_schedule, loss.logsnr_z0, loss.logsnr_z1)


def decoder_schedule(loss: AELossConfig) -> LogSNRSchedule:
    """The diffusion decoder's lambda_x(t) (shift included)."""
    s = loss.decoder_schedule
    return LogSNRSchedule(s.kind, s.logsnr_max, s.logsnr_min, s.shift)


def mse_decoder_logsnr(loss: AELossConfig) -> float:
    """The fixed lambda the Table 5 MSE decoder is conditioned on, in training and in decoding alike: the
    noisy end of the decoder schedule, shift included."""
    return decoder_schedule(loss).logsnr_1


def base_schedule(ae_loss: AELossConfig, base: BaseStageConfig) -> LogSNRSchedule:
    """The base model's lambda from lambda_z(0) (the AE's encoder noise, fixed) down to its logsnr_min."""
    return LogSNRSchedule(base.loss.schedule, ae_loss.logsnr_z0, base.loss.logsnr_min)


# train.sampler "auto": DDIM for the autoencoder's decoder, ancestral sampling for the base model
AUTO_SAMPLER = {"decoder": "ddim", "base": "ancestral"}


def sampler(train: TrainConfig, network: str) -> str:
    """The sampler `train.sampler` asks for when `network` ("decoder" or "base") samples."""
    return AUTO_SAMPLER[network] if train.sampler == "auto" else train.sampler
