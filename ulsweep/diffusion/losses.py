"""The UL training losses, in nats per example (shape [B]). Equation numbers are the paper's.

Conventions (design.md §1): lambda = log-SNR, t = 0 clean, -dlambda/dt > 0; sums run over all
non-batch dimensions. Conversion to bits happens once, in `ulsweep.diffusion.bitrate`.
"""
from __future__ import annotations

import torch



def _sum_sq(x: torch.Tensor) -> torch.Tensor:
    """||x||^2 per example: (B, ...) -> (B,)."""
    return x.to(torch.promote_types(x.dtype, torch.float32)).pow(2).flatten(1).sum(1)


# Eq. 2 integrand: w(lambda) * 1/2 * (-dlambda/dt) * exp(lambda) * ||x - x_hat||^2   (nats).
def weighted_elbo_term(x: torch.Tensor, x_hat: torch.Tensor, logsnr: torch.Tensor,
                       dlogsnr_dt: torch.Tensor, weight: torch.Tensor | float = 1.0) -> torch.Tensor:
    """One-sample estimate of the weighted diffusion loss at log-SNR `logsnr` (B,), t ~ U(0, 1)."""
    return weight * 0.5 * (-dlogsnr_dt) * torch.exp(logsnr) * _sum_sq(x - x_hat)


# KL[N(alpha_1 z, sigma_1^2 I) || N(0, I)] = 1/2 sum(alpha_1^2 z^2 + sigma_1^2 - 1 - log sigma_1^2).
def kl_to_standard_normal(z_clean: torch.Tensor, logsnr_1: float | torch.Tensor) -> torch.Tensor:
    """Prior's terminal KL at t = 1 (nats per example, (B,))."""
    logsnr_1 = torch.as_tensor(logsnr_1, dtype=torch.promote_types(z_clean.dtype, torch.float32), device=z_clean.device)
    a2, s2 = torch.sigmoid(logsnr_1), torch.sigmoid(-logsnr_1)
    d = z_clean[0].numel()
    return 0.5 * (a2 * _sum_sq(z_clean) + d * (s2 - 1.0 - torch.log(s2)))


# Eq. 3, unweighted (w = 1): 1/2 (-dlambda_z/dt) e^lambda_z ||z_clean - z_hat||^2 + KL at t = 1.
def prior_loss(z_clean: torch.Tensor, z_hat: torch.Tensor, logsnr: torch.Tensor,
               dlogsnr_dt: torch.Tensor, logsnr_1: float | torch.Tensor) -> torch.Tensor:
    """Latent bitrate bound of Eq. 3 in nats per example, shape [B].

    z_clean: (B, c, h, w) encoder output; z_hat: prior's clean prediction from z_t at `logsnr` (B,);
    dlogsnr_dt: (B,) derivative of the prior schedule at the sampled t; logsnr_1: lambda_z(1).
    Never reweight this term: it is the bound on the information in z_0 (design.md §1).
    Its expectation over t ~ U(0, 1) bounds KL[q(z_0 | x) || p(z_0)].
    """
    return weighted_elbo_term(z_clean, z_hat, logsnr, dlogsnr_dt) + kl_to_standard_normal(z_clean, logsnr_1)


# Fig. 3 weighting on the eps-MSE: w(lambda) = c_lf * sigmoid(b - lambda).
def decoder_weight(logsnr: torch.Tensor, loss_factor: float | torch.Tensor,
                   sigmoid_bias: float | torch.Tensor) -> torch.Tensor:
    """Positive; discounts high log-SNR (low noise) where lambda > b; raising b or c_lf raises it."""
    return loss_factor * torch.sigmoid(sigmoid_bias - logsnr)


# Eq. 4 with the Fig. 3 weighting: c_lf sigmoid(b - lambda) 1/2 (-dlambda/dt) e^lambda ||x - x_hat||^2.
def decoder_loss(x: torch.Tensor, x_hat: torch.Tensor, logsnr: torch.Tensor, dlogsnr_dt: torch.Tensor,
                 loss_factor: float | torch.Tensor, sigmoid_bias: float | torch.Tensor) -> torch.Tensor:
    """Weighted decoder ELBO in nats per example, shape [B]; x in [-1, 1], x_hat = D(x_t, z_0, lambda).
    c_lf and b may be Python floats or 0-d tensors (what a compiled trial passes: ulsweep/train/stage1.py).

    The paper's Eq. 4 drops the minus on dlambda/dt and §3.2 prints sigmoid(lambda - b); the weight
    that discounts low noise levels, as Fig. 3 intends, is sigmoid(b - lambda) and is positive.
    The constant KL[p(x_1|x) || N(0, I)] is dropped.
    """
    w = decoder_weight(logsnr, loss_factor, sigmoid_bias)
    return weighted_elbo_term(x, x_hat, logsnr, dlogsnr_dt, w)


# Stage 2 (§3.3): sigmoid-weighted ELBO of the base model on frozen latents, lambda in [lambda_min, lambda_z(0)].
def base_loss(z_clean: torch.Tensor, z_hat: torch.Tensor, logsnr: torch.Tensor, dlogsnr_dt: torch.Tensor,
              sigmoid_bias: float) -> torch.Tensor:
    """Base-model loss in nats per example, shape [B], with weight sigmoid(b - lambda)."""
    return weighted_elbo_term(z_clean, z_hat, logsnr, dlogsnr_dt, torch.sigmoid(sigmoid_bias - logsnr))


# Table 5 baseline: MSE decoder, -log N(x; x_hat, I/2 e^{...}) up to a constant; here 1/2 ||x - x_hat||^2 scaled by c_lf.
def mse_decoder_loss(x: torch.Tensor, x_hat: torch.Tensor, loss_factor: float | torch.Tensor,
                     scale: float) -> torch.Tensor:
    """Gaussian negative log-likelihood (minus its constant) of x under N(x_hat, 1/scale), times c_lf."""
    return loss_factor * 0.5 * scale * _sum_sq(x - x_hat)


# Table 5 / ablation A: KL[N(alpha_0 z, sigma_0^2 I) || N(0, I)] at lambda_z(0).
def normal_prior_loss(z_clean: torch.Tensor, logsnr_0: float) -> torch.Tensor:
    """KL of the noisy latent z_0 to a standard normal prior, nats per example (B,)."""
    return kl_to_standard_normal(z_clean, logsnr_0)


__all__ = [
    "weighted_elbo_term", "kl_to_standard_normal", "prior_loss", "decoder_weight", "decoder_loss",
    "base_loss", "mse_decoder_loss", "normal_prior_loss"
]
