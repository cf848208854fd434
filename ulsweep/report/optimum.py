"""The bitrate at which one base model generates best, with an interval, or the statement that there is none.

Input: (bits/pixel, generation metric) points of one base-model size, one per trial; seed repeats of a
configuration are separate points. Units: bits/pixel is the autoencoder's latent bitrate per image pixel; the
generation metric (gFID, or a domain gFD) is in its own units, lower is better.

Curve. gen(u) = c0 + c1·u + c2·u², u = ln(bits/pixel), fitted by ordinary least squares (`numpy.linalg.lstsq`).
Why this and not a smoothing spline: a base-size sweep has 6-8 distinct bitrates and ~10 points per size; a
spline's smoothing parameter cannot be chosen from so few points (cross-validation on 10 points picks anything
between interpolation and a straight line), while a quadratic is the lowest-order curve that can have an
interior minimum, any smooth curve is locally quadratic around its minimum, and the location of the minimum,
u* = −c1 / (2·c2), and the slope at any u are closed forms with a normal-theory standard error. Log-bitrate:
the sweep spans ~20× in bits/pixel, the loss factor moves the bitrate multiplicatively, and the paper plots
bitrate on a log axis. The price: an asymmetric true curve (steep on one side, flat on the other) puts the
fitted vertex off the true minimum; the interval does not include that bias.

Decision. "Interior optimum" only when the fitted curve falls significantly at the lowest sampled bitrate and
rises significantly at the highest: one-sided t-tests at level `alpha` of slope(u_lo) = c1 + 2·c2·u_lo < 0
and slope(u_hi) > 0, with the OLS covariance and n − 3 degrees of freedom (`scipy.stats.t`). The slope is
linear in u, so the two together put the vertex strictly inside [u_lo, u_hi] with c2 > 0. A monotone curve
fails one test, a curve flat within noise fails at least one; either way the answer is "no interior optimum",
never an invented one.

Interval. Residual bootstrap (Davison & Hinkley 1997, Algorithm 6.1): the residuals, divided by
sqrt(1 − h_i) (h_i: leverage) and centred, are drawn with replacement, added to the fitted values and the
quadratic is refitted; in each of `n_boot` replicates the minimum of the refitted curve over the sampled range
(the vertex when it lies inside and c2 > 0, else the lower end value) gives a location; the interval is the
percentile interval of those locations at `level`, mapped back to bits/pixel. Residuals rather than seed
repeats are resampled because a base-size sweep repeats only a few configurations (2 seeds at 3 of 6-8
bitrates): resampling within configurations would treat every single-seed point as noise-free. The residuals
hold both the seed noise and the lack of fit of the quadratic; the pooled within-configuration standard
deviation of the seed repeats is reported beside the residual standard deviation as a check of that scale.
Deterministic under `seed` (`numpy.random.default_rng`).

Calibration on the layout of experiments/base_size.yaml (7 bitrates over 20×, seed repeats at 3, Gaussian noise
of SD 0.15 around a quadratic with curvature 0.5 per ln(bpp)², 400 simulated sweeps): the 90% interval held the
true minimum in 85% of them (a 95% interval in 91%): percentile intervals from 10 points run a little short.
A flat curve was called interior in 3% of sweeps, a monotone one in 0%.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import stats

INTERIOR = "interior optimum"
NO_INTERIOR = "no interior optimum"


@dataclass(frozen=True)
class QuadFit:
    """OLS fit of gen = c0 + c1·u + c2·u² (u = ln bits/pixel)."""
    coef: np.ndarray  # (3,) c0 [gen], c1 [gen per ln(bpp)], c2 [gen per ln(bpp)^2]
    cov: np.ndarray  # (3, 3) covariance of coef: s² (XᵀX)⁻¹
    fitted: np.ndarray  # (n,) fitted gen at the data
    resid: np.ndarray  # (n,) gen − fitted
    leverage: np.ndarray  # (n,) diagonal of the hat matrix
    dof: int  # n − 3
    s: float  # residual standard deviation [gen units], sqrt(RSS / dof)


@dataclass(frozen=True)
class Optimum:
    verdict: str  # INTERIOR or NO_INTERIOR
    reason: str  # why, with the numbers
    n: int  # points used
    n_bitrates: int  # distinct bitrates
    bpp_range: tuple[float, float]  # lowest and highest sampled bits/pixel
    best_bpp: float  # bits/pixel of the fitted curve's minimum over the sampled range (an end when not interior)
    best_gen: float  # fitted gen there
    interval: tuple[float, float]  # bootstrap percentile interval of best_bpp [bits/pixel]; NaN when not interior
    gen_interval: tuple[float, float]  # bootstrap percentile interval of the fitted minimum [gen units]
    level: float
    p_falls_low: float  # one-sided p of "slope at the lowest bitrate < 0"
    p_rises_high: float  # one-sided p of "slope at the highest bitrate > 0"
    edge_fraction: float  # share of bootstrap replicates whose minimum lies at an end of the range
    resid_sd: float  # residual standard deviation of the fit [gen units]
    seed_sd: float  # pooled within-configuration SD of the seed repeats [gen units]; NaN without repeats
    seed_dof: int  # degrees of freedom of seed_sd
    coef: tuple[float, float, float] = (math.nan, math.nan, math.nan)
    boot_u: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)  # replicate minima, ln(bpp)
    boot_coef: np.ndarray = field(default_factory=lambda: np.zeros((0, 3)), repr=False)

    @property
    def interior(self) -> bool:
        return self.verdict == INTERIOR


def design(u: np.ndarray) -> np.ndarray:
    """Design matrix [1, u, u²] (n, 3) of the quadratic in u = ln(bits/pixel)."""
    u = np.asarray(u, dtype=float)
    return np.column_stack([np.ones_like(u), u, u * u])


def fit_quadratic(u: np.ndarray, y: np.ndarray) -> QuadFit:
    """OLS fit of y [gen units] on [1, u, u²], u = ln(bits/pixel); needs ≥ 4 points and ≥ 3 distinct u."""
    X, y = design(u), np.asarray(y, dtype=float)
    n = len(y)
    if n < 4 or len(np.unique(u)) < 3:
        raise ValueError(f"a quadratic with a noise estimate needs >= 4 points at >= 3 bitrates, got {n} at "
                         f"{len(np.unique(u))}")
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    fitted = X @ coef
    resid = y - fitted
    dof = n - 3
    s2 = float(resid @ resid) / dof
    xtx_inv = np.linalg.pinv(X.T @ X)
    leverage = np.einsum("ij,jk,ik->i", X, xtx_inv, X)
    return QuadFit(coef, s2 * xtx_inv, fitted, resid, leverage, dof, math.sqrt(s2))


def slope(fit: QuadFit, u: float) -> tuple[float, float]:
    """d gen / d ln(bpp) at u [gen units per ln(bpp)] and its standard error: c1 + 2·c2·u, sqrt(gᵀ Σ g)."""
    g = np.array([0.0, 1.0, 2.0 * u])
    return float(g @ fit.coef), float(math.sqrt(max(g @ fit.cov @ g, 0.0)))


def edge_slope_pvalues(fit: QuadFit, u_lo: float, u_hi: float) -> tuple[float, float]:
    """One-sided t-test p-values (dof n − 3) that the fitted curve falls at u_lo (H0: slope ≥ 0) and rises at
    u_hi (H0: slope ≤ 0). A zero standard error (exact fit) gives p = 0 or 1 by the slope's sign."""
    out = []
    for u, sign in ((u_lo, -1.0), (u_hi, 1.0)):
        b, se = slope(fit, u)
        if se == 0.0:
            out.append(0.0 if sign * b > 0 else 1.0)
        else:
            out.append(float(stats.t.sf(sign * b / se, fit.dof)))
    return out[0], out[1]


def range_argmin(coef: np.ndarray, u_lo: float, u_hi: float) -> tuple[np.ndarray, np.ndarray]:
    """Location [ln bpp] and value [gen] of the minimum over [u_lo, u_hi] of each quadratic in `coef` (m, 3):
    the vertex −c1 / (2·c2) when c2 > 0 and it lies inside, else the lower of the two ends."""
    c = np.atleast_2d(np.asarray(coef, dtype=float))
    c0, c1, c2 = c[:, 0], c[:, 1], c[:, 2]

    def at(u):
        return c0 + c1 * u + c2 * u * u

    with np.errstate(divide="ignore", invalid="ignore"):
        vertex = np.where(c2 > 0, -c1 / (2.0 * c2), np.nan)
    inside = np.isfinite(vertex) & (vertex > u_lo) & (vertex < u_hi)
    lo_v, hi_v = at(u_lo), at(u_hi)
    end = np.where(lo_v <= hi_v, u_lo, u_hi)
    loc = np.where(inside, vertex, end)
    return loc, at(loc)


def bootstrap_minimum(fit: QuadFit, u: np.ndarray, u_lo: float, u_hi: float, n_boot: int,
                      rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Residual bootstrap (Davison & Hinkley Alg. 6.1): (locations [ln bpp], minima [gen], coefficients (m, 3))
    of the refitted curve's minimum over [u_lo, u_hi] in `n_boot` replicates."""
    X = design(u)
    r = fit.resid / np.sqrt(np.clip(1.0 - fit.leverage, 1e-12, None))  # leverage-adjusted
    r = r - r.mean()
    idx = rng.integers(0, len(r), size=(n_boot, len(r)))
    y_star = fit.fitted[None, :] + r[idx]  # (m, n)
    coef, *_ = np.linalg.lstsq(X, y_star.T, rcond=None)  # (3, m): one solve for every replicate
    coef = coef.T
    loc, val = range_argmin(coef, u_lo, u_hi)
    return loc, val, coef


def pooled_seed_sd(y: np.ndarray, groups: np.ndarray) -> tuple[float, int]:
    """Pooled within-configuration standard deviation [gen units] of the seed repeats and its degrees of
    freedom: sqrt(Σ_g Σ_i (y_gi − ȳ_g)² / Σ_g (n_g − 1)); (NaN, 0) when no configuration is repeated."""
    d = pd.DataFrame({"y": np.asarray(y, dtype=float), "g": list(groups)})
    g = d.groupby("g")["y"]
    dev = d["y"] - g.transform("mean")
    dof = int((g.size() - 1).sum())
    if dof == 0:
        return math.nan, 0
    return float(math.sqrt(float((dev ** 2).sum()) / dof)), dof


def estimate_optimum(bpp, gen, groups=None, *, alpha: float = 0.05, level: float = 0.9, n_boot: int = 2000,
                     seed: int = 0) -> Optimum:
    """The optimum of `gen` over bits/pixel `bpp` (see the module docstring for the method).

    bpp: latent bits/pixel per trial (> 0); gen: generation metric per trial (lower is better); groups: a
    configuration label per trial (seed repeats share it), only for the pooled seed SD; NaN rows are dropped."""
    d = pd.DataFrame({"bpp": np.asarray(bpp, dtype=float), "gen": np.asarray(gen, dtype=float)})
    d["g"] = list(groups) if groups is not None else list(range(len(d)))
    d = d[np.isfinite(d["bpp"]) & (d["bpp"] > 0) & np.isfinite(d["gen"])]
    n, n_rates = len(d), int(d["bpp"].nunique())
    seed_sd, seed_dof = pooled_seed_sd(d["gen"].to_numpy(), d["g"].to_numpy()) if n else (math.nan, 0)
    nan2 = (math.nan, math.nan)
    rng_bpp = (float(d["bpp"].min()), float(d["bpp"].max())) if n else nan2
    if n < 4 or n_rates < 3:
        i = int(d["gen"].to_numpy().argmin()) if n else 0
        return Optimum(NO_INTERIOR, f"too few points to fit and test a curve ({n} at {n_rates} bitrates; "
                                    f"needs >= 4 at >= 3)", n, n_rates, rng_bpp,
                       float(d["bpp"].iloc[i]) if n else math.nan, float(d["gen"].iloc[i]) if n else math.nan,
                       nan2, nan2, level, math.nan, math.nan, math.nan, math.nan, seed_sd, seed_dof)
    u = np.log(d["bpp"].to_numpy())
    y = d["gen"].to_numpy()
    u_lo, u_hi = float(u.min()), float(u.max())
    fit = fit_quadratic(u, y)
    p_lo, p_hi = edge_slope_pvalues(fit, u_lo, u_hi)
    loc, val = range_argmin(fit.coef, u_lo, u_hi)
    b_loc, b_val, b_coef = bootstrap_minimum(fit, u, u_lo, u_hi, n_boot, np.random.default_rng(seed))
    edge = float(np.mean((b_loc <= u_lo) | (b_loc >= u_hi)))
    q = [(1 - level) / 2, (1 + level) / 2]
    interior = p_lo < alpha and p_hi < alpha
    s_lo, _ = slope(fit, u_lo)
    s_hi, _ = slope(fit, u_hi)
    slopes = (f"slope d gen / d ln(bpp) {s_lo:+.3g} at the lowest bitrate (p = {p_lo:.2g} that it falls), "
              f"{s_hi:+.3g} at the highest (p = {p_hi:.2g} that it rises); alpha = {alpha:g}")
    if interior:
        reason = f"the fitted curve falls at the low end and rises at the high end: {slopes}"
        interval = tuple(float(v) for v in np.exp(np.quantile(b_loc, q)))
    else:
        if p_hi < alpha:
            shape = "the curve rises towards the highest bitrate but does not fall significantly at the lowest"
        elif p_lo < alpha:
            shape = "the curve falls towards the highest bitrate and does not rise significantly there"
        else:
            shape = "the curve is flat within noise at both ends"
        where = "inside the range" if u_lo < loc[0] < u_hi else "at an end of the range"
        reason = f"{shape}; fitted minimum {where}; {slopes}"
        interval = nan2
    return Optimum(INTERIOR if interior else NO_INTERIOR, reason, n, n_rates, rng_bpp, float(np.exp(loc[0])),
                   float(val[0]), interval, tuple(float(v) for v in np.quantile(b_val, q)), level, p_lo, p_hi,
                   edge, fit.s, seed_sd, seed_dof, tuple(float(c) for c in fit.coef), b_loc, b_coef)


def fitted_curve(opt: Optimum, n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    """(bits/pixel, fitted gen) on a log grid over the sampled range, for plotting; empty without a fit."""
    if not all(math.isfinite(c) for c in opt.coef):
        return np.zeros(0), np.zeros(0)
    u = np.linspace(math.log(opt.bpp_range[0]), math.log(opt.bpp_range[1]), n)
    return np.exp(u), design(u) @ np.asarray(opt.coef)
