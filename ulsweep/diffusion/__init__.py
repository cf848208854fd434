"""Core diffusion math of Unified Latents: schedules, the forward process, losses (nats), samplers, and the
latent bitrate (the prior's ELBO in bits per image pixel). No config and no network code here."""
from .losses import (base_loss, decoder_loss, decoder_weight, kl_to_standard_normal, mse_decoder_loss,
                     normal_prior_loss, prior_loss, weighted_elbo_term)
from .process import alpha_sigma, diffuse, eps_from_x, x_from_v
from .samplers import ancestral_step, ddim_step, logsnr_grid, sample, sample_to_noisy
from .bitrate import BitrateEstimate, latent_bitrate, latent_bitrates, nats_to_bits_per_pixel
from .noise import MemberGenerators
from .schedules import LogSNRSchedule, cosine_dlogsnr_dt, cosine_logsnr, linear_dlogsnr_dt, linear_logsnr, low_discrepancy_times

__all__ = [
    "LogSNRSchedule", "cosine_logsnr", "cosine_dlogsnr_dt", "linear_logsnr", "linear_dlogsnr_dt",
    "low_discrepancy_times", "alpha_sigma", "diffuse", "x_from_v", "eps_from_x",
    "weighted_elbo_term", "kl_to_standard_normal", "prior_loss", "decoder_weight", "decoder_loss",
    "base_loss", "mse_decoder_loss", "normal_prior_loss",
    "BitrateEstimate", "latent_bitrate", "latent_bitrates", "nats_to_bits_per_pixel", "MemberGenerators",
    "logsnr_grid", "ddim_step", "ancestral_step", "sample", "sample_to_noisy",
]
