"""Which latent bitrate is best for which base-model size (issue 22; the paper's Table 2, Fig. 6 and §5.4).

Input is the base frame of `ulsweep.report.sweepdata` (one row per base-model trial: `base` (its name),
`ae_key`, `ae/bpp` (its autoencoder's bits/pixel), the generation metric (`gfid`, else `gfd_<x>`),
`gflops_base`, `train_flops`, the autoencoder's config as `ae.*` columns). Every autoencoder spawns every base
size, so sizes are compared on the same latents. Output: per size the optimum of `ulsweep.report.optimum`, a
table, and a verdict per claim of the paper, computed from the data; Markdown for trends.md. No I/O.

Claims and the statistic behind each verdict (reproduced / not reproduced / inconclusive, two-sided 5% tests):

- Table 2: the small base model's gFID worsens as the loss factor rises over 1.3 → 2.1 while the medium one's
  is flat. Δ_size = mean gen at the highest loss factor in [1.3, 2.1] − mean at the lowest (seed repeats
  averaged), t = Δ / SE with SE from the pooled seed SD; the contrast is the same difference of the paired
  per-autoencoder gaps small − medium. Reproduced: small worsens (t > t_crit) and worsens more than medium
  (contrast t > t_crit); not reproduced: small improves, or medium worsens more (t < −t_crit).
- Fig. 6 (a): smaller base models prefer lower bitrates: the optimum of the largest size lies above that of the
  smallest. P = share of bootstrap replicate pairs (independent per size) with u*_largest > u*_smallest (ties
  count half). Reproduced: P ≥ 0.975; not reproduced: P ≤ 0.025.
- Fig. 6 (b), read like Fig. 4: larger base models tolerate or profit from higher bitrates: the paired gain
  g = gen_smallest − gen_largest of each autoencoder grows with its bitrate. Least-squares slope of g on
  log2(bits/pixel) (`scipy.stats.linregress`) and its 95% t interval. Reproduced: interval above 0; not
  reproduced: below 0.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from ulsweep.report.columns import LF, generation_metric, metric_label, numeric
from ulsweep.report.optimum import Optimum, estimate_optimum, pooled_seed_sd

BPP = "ae/bpp"
TABLE2_LF = (1.3, 2.1)  # the paper's Table 2 loss-factor range
REPRODUCED, NOT_REPRODUCED, INCONCLUSIVE = "reproduced", "not reproduced", "inconclusive"
ALPHA = 0.05  # two-sided level of every verdict


@dataclass
class Claim:
    name: str  # the paper's claim in words
    verdict: str  # REPRODUCED / NOT_REPRODUCED / INCONCLUSIVE
    evidence: str  # the numbers behind it
    numbers: dict[str, float] = field(default_factory=dict)


@dataclass
class BaseSizeResult:
    gen: str  # generation metric column
    sizes: list[str]  # base names, smallest forward FLOPs first
    gflops: dict[str, float]  # forward GFLOP per image of each size (NaN when not logged)
    optima: dict[str, Optimum]
    table: pd.DataFrame
    claims: list[Claim]
    frame: pd.DataFrame  # the trials used: base, ae_key, config, bpp, gen, gflops_base, train_flops


# ----------------------------------------------------------------------------------------------
# the trials


def base_sizes(base: pd.DataFrame) -> tuple[list[str], dict[str, float]]:
    """Base names ordered by forward GFLOP per image (median over trials; frame order where not logged), and
    those GFLOPs; ([], {}) unless at least two sizes differ in FLOPs or in preset."""
    if base.empty or "base" not in base.columns:
        return [], {}
    names = list(dict.fromkeys(base["base"].astype(str)))
    g = numeric(base, "gflops_base").groupby(base["base"].astype(str)).median()
    gflops = {n: float(g.get(n, math.nan)) for n in names}
    presets = base.groupby(base["base"].astype(str))["base.model.preset"].first() \
        if "base.model.preset" in base.columns else pd.Series(dtype=object)
    distinct = len({round(v, 9) for v in gflops.values() if math.isfinite(v)}) > 1 or presets.nunique() > 1
    if len(names) < 2 or not distinct:
        return [], {}
    order = sorted(range(len(names)), key=lambda i: (not math.isfinite(gflops[names[i]]),
                                                     gflops[names[i]] if math.isfinite(gflops[names[i]]) else 0, i))
    names = [names[i] for i in order]
    return names, {n: gflops[n] for n in names}


def configuration_labels(base: pd.DataFrame) -> pd.Series:
    """The autoencoder configuration of each row without its seeds: the `ae.*` params that vary, as a string
    (seed repeats share a label)."""
    cols = [c for c in base.columns if c.startswith("ae.") and not c.endswith(".seed")
            and base[c].astype(str).nunique() > 1]
    if not cols:
        return pd.Series("all", index=base.index)
    return base[cols].astype(str).apply(lambda r: ", ".join(f"{c.rsplit('.', 1)[-1]}={v}" for c, v in r.items()),
                                        axis=1)


def trial_frame(base: pd.DataFrame, gen: str) -> pd.DataFrame:
    """Finished base trials with a bitrate and a generation metric: base, ae_key, config, lf, bpp, gen,
    gflops_base, train_flops."""
    ok = (base["status"] == "FINISHED") if "status" in base.columns else pd.Series(True, index=base.index)
    d = pd.DataFrame({"base": base["base"].astype(str), "ae_key": base.get("ae_key", base.index.astype(str)),
                      "config": configuration_labels(base), "lf": numeric(base, LF), "bpp": numeric(base, BPP),
                      "gen": numeric(base, gen), "gflops_base": numeric(base, "gflops_base"),
                      "train_flops": numeric(base, "train_flops"), "key": base.get("key", "")})
    d = d[ok & np.isfinite(d["bpp"]) & (d["bpp"] > 0) & np.isfinite(d["gen"])]
    return d.reset_index(drop=True)


# ----------------------------------------------------------------------------------------------
# statistics, one function each


def config_means(d: pd.DataFrame) -> pd.DataFrame:
    """Per (base, config): mean bits/pixel, mean gen [gen units], seed count n, loss factor."""
    return (d.groupby(["base", "config"], sort=False)
             .agg(bpp=("bpp", "mean"), gen=("gen", "mean"), n=("gen", "size"), lf=("lf", "first"))
             .reset_index())


def end_to_end_change(d: pd.DataFrame, lo_cfg: str, hi_cfg: str) -> dict[str, float]:
    """Δ = mean gen at config hi_cfg − mean at lo_cfg [gen units], its SE from the pooled seed SD of `d`
    (sd·sqrt(1/n_hi + 1/n_lo)), t = Δ / SE and the SD's degrees of freedom (t NaN without seed repeats or
    when either config has no trial in `d`)."""
    lo, hi = d[d["config"] == lo_cfg]["gen"], d[d["config"] == hi_cfg]["gen"]
    sd, dof = pooled_seed_sd(d["gen"].to_numpy(), d["config"].to_numpy())
    delta = float(hi.mean() - lo.mean()) if len(hi) and len(lo) else math.nan
    se = sd * math.sqrt(1 / len(hi) + 1 / len(lo)) if dof and len(hi) and len(lo) else math.nan
    return {"lo": float(lo.mean()), "hi": float(hi.mean()), "delta": delta, "se": se,
            "t": delta / se if se and math.isfinite(se) and se > 0 else math.nan, "sd": sd, "dof": dof}


def paired_gaps(d: pd.DataFrame, a: str, b: str) -> pd.DataFrame:
    """Per autoencoder trial: gen of base `a` − gen of base `b` [gen units] (`gap`), with its config and bpp;
    autoencoders where either base model is missing are left out."""
    wide = d.pivot_table(index=["ae_key", "config"], columns="base", values="gen", aggfunc="first")
    bpp = d.groupby("ae_key")["bpp"].first()
    if a not in wide or b not in wide:
        return pd.DataFrame(columns=["ae_key", "config", "bpp", "gap"])
    out = (wide[a] - wide[b]).dropna().rename("gap").reset_index()
    out["bpp"] = out["ae_key"].map(bpp)
    return out


def prob_optimum_above(small: Optimum, large: Optimum) -> float:
    """P(u*_large > u*_small) over paired bootstrap replicates (independent resamples per size; ties half);
    NaN without replicates."""
    m = min(len(small.boot_u), len(large.boot_u))
    if m == 0:
        return math.nan
    a, b = small.boot_u[:m], large.boot_u[:m]
    return float(np.mean(b > a) + 0.5 * np.mean(b == a))


def gain_slope(gaps: pd.DataFrame) -> dict[str, float]:
    """Least-squares slope of the paired gain on log2(bits/pixel) [gen units per doubling of bits/pixel], its
    standard error, the 95% t interval and n (`scipy.stats.linregress`); NaN with < 3 pairs or one bitrate."""
    x, y = np.log2(gaps["bpp"].to_numpy(dtype=float)), gaps["gap"].to_numpy(dtype=float)
    n = len(x)
    if n < 3 or np.unique(x).size < 2:
        return {"slope": math.nan, "se": math.nan, "lo": math.nan, "hi": math.nan, "n": n}
    r = stats.linregress(x, y)
    tq = float(stats.t.ppf(1 - ALPHA / 2, n - 2))
    return {"slope": float(r.slope), "se": float(r.stderr), "lo": float(r.slope - tq * r.stderr),
            "hi": float(r.slope + tq * r.stderr), "n": n}


# ----------------------------------------------------------------------------------------------
# claims


def _f(v: float, digits: int = 3) -> str:
    return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}g}"


def _table2_ends(means: pd.DataFrame) -> tuple[str, str, str]:
    """(lowest config, highest config, how chosen): the lowest and highest loss factor inside Table 2's range
    when the sweep has two there, else the lowest and highest bitrate."""
    cfg = means.groupby("config").agg(lf=("lf", "first"), bpp=("bpp", "mean"))
    inside = cfg[(cfg["lf"] >= TABLE2_LF[0] - 1e-9) & (cfg["lf"] <= TABLE2_LF[1] + 1e-9)]
    if inside["lf"].nunique() >= 2:
        lo, hi = inside["lf"].idxmin(), inside["lf"].idxmax()
        return lo, hi, f"loss factor {cfg.loc[lo, 'lf']:g} → {cfg.loc[hi, 'lf']:g}"
    lo, hi = cfg["bpp"].idxmin(), cfg["bpp"].idxmax()
    return lo, hi, (f"lowest → highest bitrate ({cfg.loc[lo, 'bpp']:.4g} → {cfg.loc[hi, 'bpp']:.4g} bits/pixel; "
                    f"the sweep has < 2 loss factors in {TABLE2_LF[0]}–{TABLE2_LF[1]})")


def table2_claim(d: pd.DataFrame, small: str, medium: str, label: str) -> Claim:
    name = (f"Table 2: the small base model's {label} worsens as the loss factor rises over "
            f"{TABLE2_LF[0]}–{TABLE2_LF[1]}, the medium one's is flat")
    means = config_means(d[d["base"].isin([small, medium])])
    if means["config"].nunique() < 2:
        return Claim(name, INCONCLUSIVE, "fewer than two autoencoder configurations")
    lo, hi, how = _table2_ends(means)
    s = end_to_end_change(d[d["base"] == small], lo, hi)
    m = end_to_end_change(d[d["base"] == medium], lo, hi)
    gaps = paired_gaps(d, small, medium)
    c = end_to_end_change(gaps.rename(columns={"gap": "gen"}), lo, hi) if not gaps.empty else \
        {"delta": math.nan, "t": math.nan, "dof": 0, "sd": math.nan}
    if not (s["dof"] and m["dof"] and c["dof"]):
        verdict, why = INCONCLUSIVE, "no seed repeats to measure the noise"
    elif not (math.isfinite(s["t"]) and math.isfinite(c["t"])):
        verdict, why = INCONCLUSIVE, "a size has no finished trial at one end of the range"
    else:
        crit_s = stats.t.ppf(1 - ALPHA / 2, s["dof"])
        crit_c = stats.t.ppf(1 - ALPHA / 2, c["dof"])
        if s["t"] > crit_s and c["t"] > crit_c:
            verdict, why = REPRODUCED, "small worsens, and by more than medium"
        elif s["t"] < -crit_s or c["t"] < -crit_c:
            verdict, why = NOT_REPRODUCED, ("small improves with bitrate" if s["t"] < -crit_s
                                            else "medium worsens more than small")
        else:
            verdict, why = INCONCLUSIVE, "the changes are within seed noise"
    ev = (f"{how}: {small} {_f(s['lo'])} → {_f(s['hi'])} (Δ {s['delta']:+.3g}, t = {_f(s['t'])}), "
          f"{medium} {_f(m['lo'])} → {_f(m['hi'])} (Δ {m['delta']:+.3g}, t = {_f(m['t'])}); "
          f"Δ{small} − Δ{medium} = {c['delta']:+.3g} (paired per autoencoder, t = {_f(c['t'])}, "
          f"seed SD of the gap {_f(c['sd'])}, {c['dof']} dof); seed SD {small} {_f(s['sd'])}, "
          f"{medium} {_f(m['sd'])} ({s['dof']} dof); {why}")
    return Claim(name, verdict, ev, {"delta_small": s["delta"], "delta_medium": m["delta"], "t_small": s["t"],
                                     "t_contrast": c["t"], "contrast": c["delta"]})


def optimum_order_claim(optima: dict[str, Optimum], small: str, large: str) -> Claim:
    name = f"Fig. 6 (a): smaller base models prefer lower bitrates (the optimum of {large} lies above {small}'s)"
    p = prob_optimum_above(optima[small], optima[large])

    def where(o: Optimum) -> str:
        if o.interior:
            return f"{o.best_bpp:.4g} [{o.interval[0]:.4g}, {o.interval[1]:.4g}]"
        return f"no interior optimum (fitted best at {o.best_bpp:.4g})"

    if not math.isfinite(p):
        verdict = INCONCLUSIVE
    else:
        verdict = REPRODUCED if p >= 1 - ALPHA / 2 else NOT_REPRODUCED if p <= ALPHA / 2 else INCONCLUSIVE
    ev = (f"P(optimum of {large} > optimum of {small}) = {_f(p)} over {len(optima[small].boot_u)} bootstrap "
          f"replicates; {small}: {where(optima[small])}, {large}: {where(optima[large])} bits/pixel")
    return Claim(name, verdict, ev, {"p_above": p})


def gain_claim(d: pd.DataFrame, small: str, large: str, label: str) -> Claim:
    name = (f"Fig. 6 (b) / Fig. 4: larger base models tolerate or profit from higher bitrates (the gain "
            f"{small} − {large} in {label} grows with bits/pixel)")
    gaps = paired_gaps(d, small, large)
    g = gain_slope(gaps)
    if not math.isfinite(g["slope"]):
        return Claim(name, INCONCLUSIVE, f"{g['n']} paired autoencoder(s): too few for a slope")
    verdict = REPRODUCED if g["lo"] > 0 else NOT_REPRODUCED if g["hi"] < 0 else INCONCLUSIVE
    means = gaps.groupby("config").agg(bpp=("bpp", "mean"), gap=("gap", "mean")).sort_values("bpp")
    ev = (f"slope {g['slope']:+.3g} {label} per doubling of bits/pixel, 95% interval [{g['lo']:+.3g}, "
          f"{g['hi']:+.3g}] (n = {g['n']} autoencoders); gain {_f(means['gap'].iloc[0])} at "
          f"{means['bpp'].iloc[0]:.4g} bits/pixel, {_f(means['gap'].iloc[-1])} at {means['bpp'].iloc[-1]:.4g}")
    return Claim(name, verdict, ev, dict(g))


# ----------------------------------------------------------------------------------------------
# everything


def size_table(d: pd.DataFrame, sizes: list[str], gflops: dict[str, float], optima: dict[str, Optimum],
               label: str) -> pd.DataFrame:
    """Base size → optimal bits/pixel [interval], fitted gen there, mean gen at the lowest and highest bitrate."""
    rows = []
    means = config_means(d)
    g0 = gflops.get(sizes[0], math.nan)
    for s in sizes:
        o, m = optima[s], means[means["base"] == s].sort_values("bpp")
        rows.append({
            "base size": s, "forward GFLOP / image": gflops.get(s, math.nan),
            "× smallest": gflops.get(s, math.nan) / g0 if g0 else math.nan, "trials": o.n,
            "optimal bits/pixel": o.best_bpp if o.interior else math.nan,
            f"interval ({o.level:.0%})": (f"{o.interval[0]:.4g} – {o.interval[1]:.4g}" if o.interior
                                          else "no interior optimum"),
            f"{label} at optimum (fit)": o.best_gen if o.interior else math.nan,
            "lowest bits/pixel": float(m["bpp"].iloc[0]) if len(m) else math.nan,
            f"{label} at lowest": float(m["gen"].iloc[0]) if len(m) else math.nan,
            "highest bits/pixel": float(m["bpp"].iloc[-1]) if len(m) else math.nan,
            f"{label} at highest": float(m["gen"].iloc[-1]) if len(m) else math.nan,
            "seed SD": o.seed_sd})
    return pd.DataFrame(rows)


def analyze(base: pd.DataFrame, *, gen: str | None = None, seed: int = 0, n_boot: int = 2000,
            level: float = 0.9) -> BaseSizeResult | None:
    """The base-size analysis of a sweep's base frame by generation metric `gen` (default: gFID if logged, else
    the first domain FD); None unless it has ≥ 2 base sizes and that metric."""
    sizes, gflops = base_sizes(base)
    if gen is None:
        gen = generation_metric(base) if not base.empty else None
    if not sizes or gen is None or BPP not in base.columns:
        return None
    d = trial_frame(base, gen)
    sizes = [s for s in sizes if (d["base"] == s).any()]
    if len(sizes) < 2:
        return None
    label = metric_label(gen)
    optima = {s: estimate_optimum(d.loc[d["base"] == s, "bpp"], d.loc[d["base"] == s, "gen"],
                                  d.loc[d["base"] == s, "config"], seed=seed, n_boot=n_boot, level=level)
              for s in sizes}
    small = "small" if "small" in sizes else sizes[0]
    medium = "medium" if "medium" in sizes and small == "small" else next(s for s in sizes if s != small)
    smallest, largest = sizes[0], sizes[-1]
    claims = [table2_claim(d, small, medium, label), optimum_order_claim(optima, smallest, largest),
              gain_claim(d, smallest, largest, label)]
    return BaseSizeResult(gen, sizes, gflops, optima, size_table(d, sizes, gflops, optima, label), claims, d)


def for_sweep(data) -> BaseSizeResult | None:
    """`analyze(data.base)` of a `SweepData`, computed once and kept in `data.derived` (the figures, the page
    and trends.md all read it)."""
    if "base_size" not in data.derived:
        data.derived["base_size"] = analyze(data.base)
    return data.derived["base_size"]


def beside_for_sweep(data) -> list[BaseSizeResult]:
    """The same analysis by each other generation metric the base trials logged (the domain FDs `gfd_<x>`
    beside gFID), so a verdict that depends on the feature network shows it; computed once, kept in
    `data.derived`."""
    if "base_size_beside" not in data.derived:
        primary = for_sweep(data)
        others = sorted({c for c in data.base.columns if c.startswith("gfd_")} - {primary.gen}) if primary else []
        data.derived["base_size_beside"] = [r for r in (analyze(data.base, gen=g) for g in others) if r is not None]
    return data.derived["base_size_beside"]


def markdown(res: BaseSizeResult, heading: str = "## Base-model size and latent bitrate") -> str:
    """trends.md's base-size section: sizes, the optimum table, the method, a verdict per claim."""
    label = metric_label(res.gen)
    g0 = res.gflops.get(res.sizes[0], math.nan)
    sizes = ", ".join(f"{s} {_f(res.gflops[s], 4)}" + (f" (×{res.gflops[s] / g0:.3g})" if g0 else "")
                      for s in res.sizes)
    lines = ["", heading, "",
             f"Generation metric: {label}. Base sizes, forward GFLOP per image: {sizes}.", "",
             "| base | optimal bits/pixel | interval | " + label + " at optimum | lowest bits/pixel → " + label
             + " | highest bits/pixel → " + label + " | seed SD | trials |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    t = res.table
    icol = next(c for c in t.columns if c.startswith("interval"))
    for _, r in t.iterrows():
        lines.append(f"| {r['base size']} | {_f(r['optimal bits/pixel'], 4)} | {r[icol]} | "
                     f"{_f(r[f'{label} at optimum (fit)'])} | {_f(r['lowest bits/pixel'], 4)} → "
                     f"{_f(r[f'{label} at lowest'])} | {_f(r['highest bits/pixel'], 4)} → "
                     f"{_f(r[f'{label} at highest'])} | {_f(r['seed SD'])} | {r['trials']} |")
    lines += ["", "Optimum: quadratic in ln(bits/pixel) fitted to every trial of a size; \"interior\" only when "
              "the fit falls significantly at the lowest bitrate and rises at the highest (one-sided t-tests, "
              "5%); interval: residual bootstrap, percentile (ulsweep/report/optimum.py).", ""]
    for s in res.sizes:
        lines.append(f"- {s}: {res.optima[s].verdict} — {res.optima[s].reason}")
    lines += ["", "Verdicts (ulsweep/report/basesize.py states each test):", ""]
    for c in res.claims:
        lines.append(f"- **{c.name}: {c.verdict}** — {c.evidence}")
    return "\n".join(lines) + "\n"


def _plain(v: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy scalars -> Python, containers recursively."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, (float, np.floating)):
        return float(v) if math.isfinite(v) else None
    return v


def summary(res: BaseSizeResult) -> dict[str, Any]:
    """The verdicts and optima as plain values (for JSON; NaN as null)."""
    return _plain({"generation_metric": res.gen, "sizes": res.sizes, "gflops": res.gflops,
            "optima": {s: {"verdict": o.verdict, "best_bpp": o.best_bpp, "interval": list(o.interval),
                           "best_gen": o.best_gen, "reason": o.reason} for s, o in res.optima.items()},
            "claims": [{"claim": c.name, "verdict": c.verdict, "evidence": c.evidence, "numbers": c.numbers}
                       for c in res.claims]})
