"""Closed-form checks of the diffusion core (design.md §1)."""
import math

import pytest
import torch

from ulsweep.diffusion import (LogSNRSchedule, alpha_sigma, decoder_loss, decoder_weight, diffuse,
                               kl_to_standard_normal, low_discrepancy_times, prior_loss, sample,
                               sample_to_noisy, x_from_v, base_loss)

from gaussian import diffusion_term_nats, gaussian_denoiser  # tests/gaussian.py

KINDS = ["cosine", "linear"]

# small CPU work: two OpenMP threads on a busy 2-core machine can be ~10x slower than one (conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kind", KINDS)
def test_schedule_endpoints_and_monotone(kind):
    s = LogSNRSchedule(kind, logsnr_max=5.0, logsnr_min=-15.0, shift=0.0)
    t = torch.linspace(0, 1, 1001, dtype=torch.float64)
    lam = s.logsnr(t)
    torch.testing.assert_close(lam[0], torch.tensor(5.0, dtype=torch.float64))
    torch.testing.assert_close(lam[-1], torch.tensor(-15.0, dtype=torch.float64))
    assert (lam[1:] < lam[:-1]).all()
    assert (s.dlogsnr_dt(t) < 0).all()


def test_schedule_shift_moves_endpoints():
    s = LogSNRSchedule("cosine", 15.0, -15.0, shift=-2.0)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(s.logsnr(t), torch.tensor([13.0, -17.0], dtype=torch.float64))
    assert (s.logsnr_0, s.logsnr_1) == (13.0, -17.0)


@pytest.mark.parametrize("kind", KINDS)
def test_dlogsnr_dt_matches_finite_differences(kind):
    s = LogSNRSchedule(kind, 15.0, -15.0)
    t = torch.linspace(0.01, 0.99, 99, dtype=torch.float64)
    h = 1e-6
    fd = (s.logsnr(t + h) - s.logsnr(t - h)) / (2 * h)
    torch.testing.assert_close(s.dlogsnr_dt(t), fd, rtol=1e-6, atol=1e-6)


def test_alpha_sigma_variance_preserving():
    lam = torch.linspace(-20, 20, 401, dtype=torch.float64)
    a, s = alpha_sigma(lam)
    torch.testing.assert_close(a**2 + s**2, torch.ones_like(lam))
    torch.testing.assert_close(torch.log(a**2 / s**2), lam)
    a5, s5 = alpha_sigma(torch.tensor(5.0, dtype=torch.float64))
    assert abs(a5.item() - 0.99665) < 1e-4 and abs(s5.item() - 0.08181) < 1e-4  # design.md: 0.997, 0.082


def test_x_from_v_inverts_v_target():
    g = torch.Generator().manual_seed(0)
    x, eps = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    lam = torch.tensor([-10.0, -1.0, 2.0, 12.0])
    a, s = alpha_sigma(lam)
    v = a.view(-1, 1, 1, 1) * eps - s.view(-1, 1, 1, 1) * x
    torch.testing.assert_close(x_from_v(diffuse(x, lam, eps), v, lam), x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("s2", [1.0, 0.25])
def test_immse_prior_diffusion_term(kind, s2):
    """E_t[1/2 (-dl/dt) e^l (z - z_hat*)^2] = 1/2 ln(1 + s^2 e^{l0}) - 1/2 ln(1 + s^2 e^{l1}) per dim."""
    l0, l1 = 5.0, -15.0
    sched = LogSNRSchedule(kind, l0, l1)
    g = torch.Generator().manual_seed(1)
    n = 400_000
    z = torch.randn(n, 1, generator=g, dtype=torch.float64) * math.sqrt(s2)
    t = low_discrepancy_times(n, generator=g).double()
    lam, dlam = sched.logsnr(t), sched.dlogsnr_dt(t)
    z_t = diffuse(z, lam, torch.randn(n, 1, generator=g, dtype=torch.float64))
    z_hat = gaussian_denoiser(0.0, s2)(z_t, lam)  # Bayes-optimal denoiser
    kl1 = kl_to_standard_normal(z, l1)
    per_example = prior_loss(z, z_hat, lam, dlam, l1) - kl1
    expected = diffusion_term_nats(s2, l0, l1)
    if s2 == 1.0:
        assert abs(expected - 2.5034) < 1e-4  # design.md's number
    mean, se = per_example.mean().item(), per_example.std().item() / math.sqrt(n)
    assert abs(mean - expected) < 4 * se + 1e-3, (mean, expected, se)


def test_kl_to_standard_normal_closed_form():
    z = torch.tensor([[0.0, 0.0], [1.0, -2.0]], dtype=torch.float64)
    lam = 0.0  # alpha^2 = sigma^2 = 1/2
    expected = [2 * 0.5 * (0.5 - 1 - math.log(0.5)), 0.5 * (0.5 * 5) + 2 * 0.5 * (0.5 - 1 - math.log(0.5))]
    torch.testing.assert_close(kl_to_standard_normal(z, lam), torch.tensor(expected, dtype=torch.float64))
    # at lambda_z(1) = -15 the KL of a unit-scale latent is tiny
    assert kl_to_standard_normal(torch.ones(1, 256), -15.0).item() < 1e-4


def test_decoder_weight_sign_and_value():
    lam = torch.tensor([-30.0, 0.0, 2.0, 30.0])
    w = decoder_weight(lam, loss_factor=1.6, sigmoid_bias=2.0)
    assert (w > 0).all()
    torch.testing.assert_close(w[2], torch.tensor(0.8))  # c_lf * sigmoid(0) at lambda = b
    assert abs(w[0].item() - 1.6) < 1e-6  # noisy end: full weight c_lf
    assert w[3].item() < 1e-10  # clean end: discounted
    assert (w[1:] < w[:-1]).all()  # discounts low noise levels (high lambda)
    # raising b or c_lf raises the weight everywhere
    assert (decoder_weight(lam, 1.6, 3.0) >= w).all() and (decoder_weight(lam, 2.0, 2.0) > w).all()


def test_decoder_loss_matches_eps_form():
    """c_lf w 1/2 (-dl/dt) e^l ||x - x_hat||^2 == c_lf w 1/2 (-dl/dt) ||eps - eps_hat||^2."""
    g = torch.Generator().manual_seed(2)
    x, eps, eps_hat = (torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(3))
    lam, dlam = torch.tensor([-3.0, 0.5, 4.0], dtype=torch.float64), torch.tensor([-7.0, -20.0, -9.0], dtype=torch.float64)
    a, s = (v.view(-1, 1, 1, 1) for v in alpha_sigma(lam))
    x_t = a * x + s * eps
    x_hat = (x_t - s * eps_hat) / a
    got = decoder_loss(x, x_hat, lam, dlam, loss_factor=1.5, sigmoid_bias=-1.0)
    w = 1.5 * torch.sigmoid(-1.0 - lam)
    expected = w * 0.5 * (-dlam) * (eps - eps_hat).pow(2).flatten(1).sum(1)
    torch.testing.assert_close(got, expected)
    assert got.shape == (3,) and (got > 0).all()
    torch.testing.assert_close(base_loss(x, x_hat, lam, dlam, -1.0), expected / 1.5)


def test_low_discrepancy_times_stratified():
    t = low_discrepancy_times(8, generator=torch.Generator().manual_seed(0))
    assert ((t >= 0) & (t < 1)).all()
    assert sorted((t * 8).floor().long().tolist()) == list(range(8))  # one per stratum


@pytest.mark.parametrize("method", ["ddim", "ancestral"])
def test_sampler_reproduces_1d_gaussian(method):
    m, s2, n = 0.7, 0.3, 100_000
    sched = LogSNRSchedule("cosine", 10.0, -12.0)
    g = torch.Generator().manual_seed(3)
    # DDIM is exact in the ODE limit; the ancestral sampler drops Var[x | x_s] each step, an O(1/steps) bias
    steps = 200 if method == "ddim" else 1000
    x = sample(gaussian_denoiser(m, s2), (n, 1), sched, steps=steps, method=method, generator=g,
               dtype=torch.float64)
    # the final estimate is E[x | x at lambda = 10]: variance shrinks by s2 e^10 / (1 + s2 e^10)
    shrink = s2 * math.exp(10) / (1 + s2 * math.exp(10))
    assert abs(x.mean().item() - m) < 0.01
    assert abs(x.var().item() - s2 * shrink) < 0.02 * s2


@pytest.mark.parametrize("method", ["ddim", "ancestral"])
def test_sample_to_noisy_stops_at_logsnr0(method):
    """Base-model sampling ends at lambda_z(0) = 5: z_0 ~ N(alpha_0 m, alpha_0^2 s^2 + sigma_0^2)."""
    m, s2, n = -0.4, 0.5, 100_000
    sched = LogSNRSchedule("cosine", 5.0, -15.0)
    g = torch.Generator().manual_seed(4)
    z0 = sample_to_noisy(gaussian_denoiser(m, s2), (n, 1), sched, steps=500, method=method, generator=g,
                         dtype=torch.float64)
    a0, s0 = (v.item() for v in alpha_sigma(torch.tensor(5.0, dtype=torch.float64)))
    assert abs(z0.mean().item() - a0 * m) < 0.01
    assert abs(z0.var().item() - (a0**2 * s2 + s0**2)) < 0.02
