"""Configurations that were each run with several seeds, compared metric by metric: does one beat the other by
more than seed noise? (The matched-bitrate pairs of `experiments/bias_pairs.yaml` are read this way.)

Input is the AE frame of `ulsweep.report.sweepdata` (see `ulsweep.report.trends`); a configuration is one value
of every numeric knob, its seeds the rows that share it. Per metric and configuration: mean, sample standard
deviation and n; per pair of configurations: the difference of means (first minus second, in the metric's own
units), the relative difference, and Welch's unequal-variance t-test (`scipy.stats.ttest_ind(equal_var=False)`,
two-sided). No I/O.

A seed whose latent collapsed is not at its configuration's bitrate and would compare something else: rows whose
bits/pixel lies more than `COLLAPSE_FACTOR` times below the median of their configuration are left out of the
means and tests, and listed.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import pandas as pd
from scipy import stats

from ulsweep.report.columns import fmt_value, key_tail

COLLAPSE_FACTOR = 10.0  # bits/pixel this many times below the configuration's median: the latent collapsed
MAX_CONFIGS = 6  # beyond this many repeated configurations the pairwise table is no longer a reading aid


@dataclass(frozen=True)
class Summary:
    """One metric over one configuration's seeds (collapsed ones left out)."""
    mean: float
    sd: float  # sample standard deviation (ddof 1); NaN for one seed
    n: int


@dataclass(frozen=True)
class Difference:
    """Configuration a minus configuration b on one metric."""
    a: int  # indices into Comparison.configs
    b: int
    metric: str
    diff: float  # mean_a - mean_b, the metric's units
    rel: float  # diff / mean_b
    p: float  # Welch's two-sided p; NaN with fewer than 2 seeds on a side or no spread on both


@dataclass
class Comparison:
    knobs: list[str]
    configs: list[dict]  # knob -> value, one per repeated configuration
    summaries: dict[str, list[Summary]] = field(default_factory=dict)  # metric -> one per config
    differences: list[Difference] = field(default_factory=list)
    collapsed: list[dict] = field(default_factory=list)  # {config index, seed columns' values, bpp, median bpp}


def welch(a: pd.Series, b: pd.Series) -> float:
    """Two-sided p of Welch's t-test; NaN when a side has < 2 values or neither side varies."""
    a, b = a.dropna(), b.dropna()
    if len(a) < 2 or len(b) < 2 or (a.std() == 0 and b.std() == 0):
        return math.nan
    return float(stats.ttest_ind(a, b, equal_var=False).pvalue)


def collapsed_rows(g: pd.DataFrame) -> pd.Series:
    """True where a seed's bits/pixel is more than COLLAPSE_FACTOR times below its configuration's median."""
    return g["bpp"] < g["bpp"].median() / COLLAPSE_FACTOR


def compare(ae: pd.DataFrame, knobs: list[str], metrics: list[str], seeds: list[str]) -> Comparison | None:
    """The comparison of every configuration run with 2+ seeds, or None when fewer than two configurations (or
    more than MAX_CONFIGS) were repeated."""
    if not knobs or not seeds:
        return None
    groups = [(cfg if isinstance(cfg, tuple) else (cfg,), g) for cfg, g in ae.groupby(knobs, sort=True)
              if len(g) > 1]
    if not 2 <= len(groups) <= MAX_CONFIGS:
        return None
    res = Comparison(knobs=knobs, configs=[dict(zip(knobs, cfg)) for cfg, _ in groups])
    kept = []
    for i, (_, g) in enumerate(groups):
        out = collapsed_rows(g)
        for _, r in g[out].iterrows():
            res.collapsed.append({"config": i, **{s: r[s] for s in seeds}, "bpp": float(r["bpp"]),
                                  "median_bpp": float(g["bpp"].median())})
        kept.append(g[~out])
    metrics = [m for m in metrics if m in ae]
    for m in metrics:
        res.summaries[m] = [Summary(float(g[m].mean()), float(g[m].std()) if g[m].count() > 1 else math.nan,
                                    int(g[m].count())) for g in kept]
    for i, j in itertools.combinations(range(len(kept)), 2):
        for m in metrics:
            sa, sb = res.summaries[m][i], res.summaries[m][j]
            d = sa.mean - sb.mean
            res.differences.append(Difference(i, j, m, d, d / sb.mean if sb.mean else math.nan,
                                              welch(kept[i][m], kept[j][m])))
    return res


def markdown(c: Comparison) -> str:
    """trends.md's section: one table of means ± SD per configuration, one of the pairwise differences."""
    def name(i):
        return ", ".join(f"{key_tail(k)} = {fmt_value(v)}" for k, v in c.configs[i].items())

    metrics = list(c.summaries)
    lines = ["", "Configurations with seed repeats compared (mean ± sample SD over seeds, n; differences first "
             "minus second with Welch's two-sided t-test p):", "",
             "| configuration | " + " | ".join(metrics) + " |", "|---|" + "---:|" * len(metrics)]
    for i in range(len(c.configs)):
        cells = [f"{fmt_value(s.mean)} ± {fmt_value(s.sd)} ({s.n})" for s in (c.summaries[m][i] for m in metrics)]
        lines.append(f"| {name(i)} | " + " | ".join(cells) + " |")
    lines += ["", "| first | second | metric | difference | relative | Welch p |", "|---|---|---|---:|---:|---:|"]
    for d in c.differences:
        diff = "n/a" if math.isnan(d.diff) else f"{d.diff:+.4g}"
        lines.append(f"| {name(d.a)} | {name(d.b)} | {d.metric} | {diff} | "
                     f"{'n/a' if math.isnan(d.rel) else f'{100 * d.rel:+.0f}%'} | {fmt_value(d.p)} |")
    if c.collapsed:
        lines += ["", f"Left out as collapsed (bits/pixel more than {COLLAPSE_FACTOR:g}× below the "
                  "configuration's median):", ""]
        for r in c.collapsed:
            seeds = ", ".join(f"{k} = {v}" for k, v in r.items() if k.endswith(".seed"))
            lines.append(f"- {name(r['config'])}, {seeds}: bits/pixel {r['bpp']:.4g} against a median of "
                         f"{r['median_bpp']:.4g}")
    return "\n".join(lines) + "\n"
