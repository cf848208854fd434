"""The optimum estimator (ulsweep/report/optimum.py) on synthetic gFID-vs-bitrate curves with known shape."""
from __future__ import annotations

import math

import numpy as np
import pytest

from ulsweep.report.optimum import (INTERIOR, NO_INTERIOR, estimate_optimum, fit_quadratic, pooled_seed_sd,
                                    range_argmin)

# the layout of experiments/base_size.yaml: 7 bitrates over 20x, seed repeats at three of them
RATES = np.array([0.003, 0.004, 0.0058, 0.0095, 0.02, 0.034, 0.06])
BPP = np.concatenate([RATES, RATES[[1, 3, 5]]])
CONFIG = np.concatenate([np.arange(7), [1, 3, 5]])  # configuration label: repeats share it
U = np.log(BPP)
NOISE = 0.15  # gFID seed noise of the Fig. 8 run: pairs differ by 0.16-0.21


def noisy(curve, draw: int) -> np.ndarray:
    return curve(U) + np.random.default_rng(draw).normal(0.0, NOISE, len(U))


def u_shape(u):  # minimum 1.6 at 0.01 bits/pixel
    return 1.6 + 0.5 * (u - math.log(0.01)) ** 2


def test_known_minimum_lies_in_the_interval():
    for draw in range(5):
        opt = estimate_optimum(BPP, noisy(u_shape, draw), CONFIG, seed=0)
        assert opt.verdict == INTERIOR and opt.interior, opt.reason
        lo, hi = opt.interval
        assert BPP.min() < lo <= opt.best_bpp <= hi < BPP.max()
        assert lo <= 0.01 <= hi, (draw, opt.interval)
        assert opt.best_gen == pytest.approx(1.6, abs=0.25) and opt.edge_fraction < 0.05
        assert opt.p_falls_low < 0.05 and opt.p_rises_high < 0.05
        assert opt.seed_dof == 3 and 0.0 < opt.seed_sd < 0.5  # three repeated configurations, 1 dof each


def test_monotone_curve_has_no_interior_optimum():
    rises = lambda u: 1.6 + 0.3 * (u - U.min())  # noqa: E731 - gFID worsens with bitrate everywhere
    for draw in range(5):
        opt = estimate_optimum(BPP, noisy(rises, draw), CONFIG, seed=0)
        assert opt.verdict == NO_INTERIOR and not opt.interior
        assert all(math.isnan(v) for v in opt.interval)
        assert opt.best_bpp == pytest.approx(BPP.min())  # the fitted minimum is the low end
        assert "does not fall significantly at the lowest" in opt.reason or "flat within noise" in opt.reason


def test_flat_noisy_curve_has_no_interior_optimum():
    """Pure noise around a constant: the verdict must be "no interior optimum" (the test's false-positive
    rate is about alpha at each end; 20 draws allow 2, 0.6 expected)."""
    verdicts = [estimate_optimum(BPP, noisy(lambda u: 1.6 + 0 * u, draw), CONFIG, seed=0, n_boot=300)
                for draw in range(20)]
    assert sum(v.interior for v in verdicts) <= 2
    flat = [v for v in verdicts if not v.interior]
    assert all(math.isnan(v.interval[0]) for v in flat)
    assert sum("flat within noise" in v.reason for v in flat) >= 15


def test_deterministic_under_a_seed():
    y = noisy(u_shape, 0)
    a, b = estimate_optimum(BPP, y, CONFIG, seed=7), estimate_optimum(BPP, y, CONFIG, seed=7)
    assert a.interval == b.interval and np.array_equal(a.boot_u, b.boot_u)
    c = estimate_optimum(BPP, y, CONFIG, seed=8)
    assert not np.array_equal(a.boot_u, c.boot_u) and c.best_bpp == a.best_bpp  # only the bootstrap moves


def test_exact_quadratic_is_fitted_exactly():
    fit = fit_quadratic(U, u_shape(U))
    assert fit.coef[2] == pytest.approx(0.5) and fit.s == pytest.approx(0.0, abs=1e-9) and fit.dof == 7
    opt = estimate_optimum(BPP, u_shape(U))
    assert opt.interior and opt.best_bpp == pytest.approx(0.01) and opt.interval == pytest.approx((0.01, 0.01))


def test_too_few_points_say_so():
    opt = estimate_optimum([0.01, 0.02, 0.04], [2.0, 1.5, 2.0])
    assert opt.verdict == NO_INTERIOR and "too few points" in opt.reason and opt.best_bpp == 0.02
    opt = estimate_optimum([0.01, 0.01, 0.04, 0.04, float("nan")], [2.0, 2.1, 1.5, 1.4, 1.0])
    assert opt.n == 4 and opt.n_bitrates == 2 and "too few points" in opt.reason


def test_range_argmin_closed_forms():
    coef = np.array([[0.0, 0.0, 1.0],  # vertex at 0, inside
                     [0.0, -4.0, 1.0],  # vertex at 2, beyond the upper end: the upper end
                     [0.0, 1.0, -1.0],  # concave: the lower of the two ends (-1 -> -2, 1 -> 0)
                     [3.0, 0.0, 0.0]])  # constant: the lower end
    loc, val = range_argmin(coef, -1.0, 1.0)
    assert loc.tolist() == [0.0, 1.0, -1.0, -1.0] and val.tolist() == [0.0, -3.0, -2.0, 3.0]


def test_pooled_seed_sd_by_hand():
    # groups a: 1, 3 (SS 2), b: 5 (no dof), c: 2, 2, 5 (SS 6) -> sqrt(8 / 3)
    sd, dof = pooled_seed_sd(np.array([1.0, 3.0, 5.0, 2.0, 2.0, 5.0]), np.array(list("aabccc")))
    assert dof == 3 and sd == pytest.approx(math.sqrt(8 / 3))
    assert pooled_seed_sd(np.array([1.0, 2.0]), np.array([0, 1])) == (pytest.approx(float("nan"), nan_ok=True), 0)
