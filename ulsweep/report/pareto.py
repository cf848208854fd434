"""Pareto (non-dominated) sets of sweep trials.

A point p dominates q when p is no worse than q in every objective and strictly better in at least one.
Consequences the tests pin down: identical points never dominate each other (duplicates are all on the
front); a tie in one objective is broken by the others; a single point is its own front. Rows whose
objectives are not all finite (NaN from a failed trial, inf) are left out of the comparison and reported
in `ParetoResult.excluded`, never silently treated as good or bad.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import pandas as pd


def non_dominated(points: np.ndarray, minimize: Sequence[bool] | bool = True) -> np.ndarray:
    """Boolean mask of the non-dominated rows of `points` (n, k); all values must be finite.

    O(n^2 k) and vectorized, which is plenty for sweeps (thousands of trials)."""
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"points must be 2-D (n, k), got shape {p.shape}")
    n, k = p.shape
    if n == 0:
        return np.zeros(0, dtype=bool)
    if not np.isfinite(p).all():
        raise ValueError("non_dominated needs finite values; use pareto_front() to leave out NaN/inf rows")
    sign = np.where(np.broadcast_to(np.asarray(minimize, dtype=bool), (k,)), 1.0, -1.0)
    q = p * sign  # everything minimized from here on
    mask = np.ones(n, dtype=bool)
    for i in range(n):
        # rows j that dominate row i: q[j] <= q[i] everywhere and q[j] < q[i] somewhere
        le = (q <= q[i]).all(axis=1)
        lt = (q < q[i]).any(axis=1)
        if (le & lt).any():
            mask[i] = False
    return mask


@dataclass(frozen=True)
class ParetoResult:
    front: pd.Index  # index labels of the non-dominated rows, sorted by the first objective then the rest
    dominated: pd.Index  # index labels of the valid rows that some other row dominates
    excluded: pd.Index  # index labels left out: some objective is NaN / inf / missing

    def mask(self, index: pd.Index) -> pd.Series:
        return pd.Series(index.isin(self.front), index=index)


def pareto_front(df: pd.DataFrame, columns: Sequence[str], minimize: Sequence[bool] | bool = True) -> ParetoResult:
    """The non-dominated rows of `df` over `columns`; rows with a non-finite or missing objective are
    returned in `excluded`. A column missing from `df` excludes every row."""
    columns = list(columns)
    if not columns:
        raise ValueError("pareto_front needs at least one objective column")
    if any(c not in df.columns for c in columns):
        return ParetoResult(df.index[:0], df.index[:0], df.index)
    vals = df[columns].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    ok = np.isfinite(vals).all(axis=1)
    valid = df.index[ok]
    m = non_dominated(vals[ok], minimize)
    front_vals = vals[ok][m]
    order = np.lexsort(tuple(front_vals[:, j] for j in reversed(range(len(columns)))))
    return ParetoResult(front=valid[m][order], dominated=valid[~m], excluded=df.index[~ok])
