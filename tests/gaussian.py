"""Closed forms for Gaussian data, shared by the diffusion and bitrate tests (design.md §1, I-MMSE check).

For x ~ N(m, s2) per dimension the Bayes-optimal denoiser is
E[x | x_t] = m + alpha s2 / (alpha^2 s2 + sigma^2) (x_t - alpha m), and the unweighted diffusion loss of
x = z_clean between lambda_0 and lambda_1 (Eq. 3 without its terminal KL) has the expectation
1/2 ln(1 + s2 e^lambda_0) - 1/2 ln(1 + s2 e^lambda_1) per dimension, for any schedule (I-MMSE).
"""
from __future__ import annotations

import math

from ulsweep.diffusion import alpha_sigma


def gaussian_denoiser(m: float, s2: float):
    """(x_t, lambda) -> E[x | x_t] for x ~ N(m, s2) per dimension."""
    def denoise(x_t, lam):
        a, s = (v.view(-1, *[1] * (x_t.dim() - 1)) for v in alpha_sigma(lam))
        return m + a * s2 / (a**2 * s2 + s**2) * (x_t - a * m)
    return denoise


def diffusion_term_nats(s2: float, logsnr_0: float, logsnr_1: float) -> float:
    """E_t E[1/2 (-dl/dt) e^l ||x - E[x | x_t]||^2] per dimension for x ~ N(0, s2)."""
    return 0.5 * math.log1p(s2 * math.exp(logsnr_0)) - 0.5 * math.log1p(s2 * math.exp(logsnr_1))


def terminal_kl_nats(s2: float, logsnr_1: float) -> float:
    """E KL[N(alpha_1 x, sigma_1^2) || N(0, 1)] per dimension for x ~ N(0, s2)."""
    a2, sig2 = 1 / (1 + math.exp(-logsnr_1)), 1 / (1 + math.exp(logsnr_1))
    return 0.5 * (a2 * s2 + sig2 - 1 - math.log(sig2))


def prior_loss_nats(s2: float, logsnr_0: float, logsnr_1: float) -> float:
    """Expected Eq. 3 (diffusion term + terminal KL) per dimension for z ~ N(0, s2) and the optimal prior."""
    return diffusion_term_nats(s2, logsnr_0, logsnr_1) + terminal_kl_nats(s2, logsnr_1)


__all__ = ["gaussian_denoiser", "diffusion_term_nats", "terminal_kl_nats", "prior_loss_nats"]
