"""The variance-preserving forward process and the network parameterization.

alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda); x_t = alpha x + sigma eps.
Networks predict v = alpha eps - sigma x; the clean estimate is x_hat = alpha x_t - sigma v.
"""
from __future__ import annotations

import torch


def _bcast(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, ...) to broadcast against `like`."""
    return s.reshape(s.shape + (1,) * (like.dim() - s.dim()))


# alpha^2 = sigmoid(lambda), sigma^2 = sigmoid(-lambda)  (so alpha^2 + sigma^2 = 1).
def alpha_sigma(logsnr: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.sigmoid(logsnr).sqrt(), torch.sigmoid(-logsnr).sqrt()


# x_t = alpha(lambda) x + sigma(lambda) eps.
def diffuse(x: torch.Tensor, logsnr: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    a, s = alpha_sigma(logsnr)
    return _bcast(a, x) * x + _bcast(s, x) * eps


# x_hat = alpha x_t - sigma v.
def x_from_v(x_t: torch.Tensor, v: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
    a, s = alpha_sigma(logsnr)
    return _bcast(a, x_t) * x_t - _bcast(s, x_t) * v


# eps_hat = (x_t - alpha x_hat) / sigma.
def eps_from_x(x_t: torch.Tensor, x_hat: torch.Tensor, logsnr: torch.Tensor) -> torch.Tensor:
    a, s = alpha_sigma(logsnr)
    return (x_t - _bcast(a, x_t) * x_hat) / _bcast(s, x_t)
