"""latent_bitrate, the project's headline number, against the I-MMSE closed form (design.md §1).

Gaussian latents z ~ N(0, s2 I) with the Bayes-optimal prior have an expected Eq.-3 loss of
1/2 ln(1 + s2 e^l0) - 1/2 ln(1 + s2 e^l1) + E KL[N(a1 z, sig1^2) || N(0, 1)] nats per latent dimension
(tests/gaussian.py), for any schedule: 2.5034 nats for s2 = 1 and l0 = 5.
"""
import math

import pytest
import torch

from ulsweep.diffusion import LogSNRSchedule, alpha_sigma, latent_bitrate, nats_to_bits_per_pixel

from gaussian import gaussian_denoiser, prior_loss_nats  # tests/gaussian.py

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py

C, H, W = 3, 16, 16  # images
LATENT_DIMS = 2 * 4 * 4  # the encoder keeps 2 channels of every 4th pixel in both directions


def gaussian_autoencoder(s2):
    """(encode, predict_v): images ~ N(0, 1) -> z ~ N(0, s2) i.i.d. of shape (2, 4, 4), and the Bayes-optimal
    prior written as the v-prediction latent_bitrate expects (x_hat = alpha z_t - sigma v)."""
    def encode(x):
        return math.sqrt(s2) * x[:, :2, ::4, ::4]

    denoise = gaussian_denoiser(0.0, s2)

    def predict_v(z_t, lam):
        a, s = (v.view(-1, 1, 1, 1) for v in alpha_sigma(lam))
        return (a * z_t - denoise(z_t, lam)) / s
    return encode, predict_v


def estimate(s2, schedule, n, seed):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, C, H, W, generator=g)
    return latent_bitrate(*gaussian_autoencoder(s2), images, schedule, t_per_image=4, batch_size=256, generator=g)


def test_nats_to_bits_per_pixel_by_hand():
    # 100 nats over a 16 x 16 image: 100 / ln 2 = 144.2695 bits, / 256 pixels = 0.563553 bits/pixel
    assert nats_to_bits_per_pixel(100.0, 16, 16) == pytest.approx(0.5635527503472513, rel=1e-12)
    assert nats_to_bits_per_pixel(math.log(2) * 24, 4, 6) == pytest.approx(1.0, rel=1e-12)
    torch.testing.assert_close(nats_to_bits_per_pixel(torch.tensor([0.0, 100.0], dtype=torch.float64), 16, 16),
                               torch.tensor([0.0, 0.5635527503472513], dtype=torch.float64))


# the KL at lambda_z(1) = -2 is 0.06 to 0.24 nats a dimension: a bound that dropped it would be 10-35 s.e. off
@pytest.mark.parametrize("kind, s2, logsnr_1", [("cosine", 1.0, -15.0), ("linear", 4.0, -2.0), ("cosine", 0.3, -2.0)])
def test_latent_bitrate_of_gaussian_latents_is_the_immse_value(kind, s2, logsnr_1):
    schedule = LogSNRSchedule(kind, 5.0, logsnr_1)
    nats_per_dim = prior_loss_nats(s2, 5.0, logsnr_1)
    if s2 == 1.0:
        assert nats_per_dim == pytest.approx(2.5034, abs=1e-4)  # README / design.md
    exact_bpp = nats_per_dim * LATENT_DIMS / math.log(2) / (H * W)  # pixels of the image, not of the latent
    est = estimate(s2, schedule, n=4000, seed=0)
    assert est.bpp_se < 0.01 * exact_bpp, est  # precise enough to tell a wrong bound (measured: 0.2-0.8%)
    assert abs(est.bpp - exact_bpp) < 4 * est.bpp_se, (est, exact_bpp)
    assert est.nats_per_image == pytest.approx(est.bpp * math.log(2) * H * W, rel=1e-9)
    assert (est.num_images, est.t_per_image) == (4000, 4)


def test_bpp_se_matches_the_spread_of_repeats_and_shrinks_as_one_over_sqrt_n():
    schedule = LogSNRSchedule("cosine", 5.0, -15.0)
    repeats = [estimate(1.0, schedule, n=400, seed=seed) for seed in range(1, 31)]
    spread = torch.tensor([e.bpp for e in repeats], dtype=torch.float64).std().item()
    mean_se = sum(e.bpp_se for e in repeats) / len(repeats)
    # 30 repeats know a standard deviation to about 13%; measured ratio 1.0
    assert 0.6 < spread / mean_se < 1.6, (spread, mean_se)
    big = estimate(1.0, schedule, n=4000, seed=0)
    # 10x the images: s.e. / sqrt(10) = 0.316x (measured 0.313)
    assert 0.25 < big.bpp_se / mean_se < 0.40, (big.bpp_se, mean_se)
