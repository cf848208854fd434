"""Pareto-set correctness: ties, duplicates, a single point, NaN rows left out and reported, and agreement
with a brute-force definition (and Optuna's own helper, an independent implementation) on random data."""
import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ulsweep.report.pareto import non_dominated, pareto_front


def brute_force(points, minimize):
    """Definition: i is dominated if some j is <= everywhere and < somewhere (after orienting)."""
    sign = [1 if m else -1 for m in minimize]
    q = [[s * v for s, v in zip(sign, p)] for p in points]
    out = []
    for i, a in enumerate(q):
        dominated = any(all(b_ <= a_ for a_, b_ in zip(a, b)) and any(b_ < a_ for a_, b_ in zip(a, b))
                        for j, b in enumerate(q) if j != i)
        out.append(not dominated)
    return out


def test_simple_2d_front():
    pts = [(1, 5), (2, 3), (3, 4), (4, 1), (5, 5)]
    assert non_dominated(np.array(pts)).tolist() == [True, True, False, True, False]


def test_single_point_is_its_own_front():
    assert non_dominated(np.array([[3.0, 7.0]])).tolist() == [True]
    df = pd.DataFrame({"x": [0.5], "y": [2.0]}, index=["ae-0000"])
    r = pareto_front(df, ["x", "y"])
    assert list(r.front) == ["ae-0000"] and len(r.dominated) == 0 and len(r.excluded) == 0


def test_empty_input():
    assert non_dominated(np.zeros((0, 2))).tolist() == []
    r = pareto_front(pd.DataFrame({"x": [], "y": []}), ["x", "y"])
    assert len(r.front) == len(r.dominated) == len(r.excluded) == 0


def test_duplicates_are_all_on_the_front():
    pts = np.array([[1.0, 2.0], [1.0, 2.0], [2.0, 1.0], [2.0, 2.0]])
    assert non_dominated(pts).tolist() == [True, True, True, False]
    # a duplicate of a dominated point stays dominated
    pts = np.array([[1.0, 1.0], [2.0, 2.0], [2.0, 2.0]])
    assert non_dominated(pts).tolist() == [True, False, False]


def test_ties_in_one_objective_are_broken_by_the_other():
    # same x: the lower y dominates; same y: the lower x dominates
    assert non_dominated(np.array([[1.0, 3.0], [1.0, 2.0]])).tolist() == [False, True]
    assert non_dominated(np.array([[4.0, 2.0], [3.0, 2.0], [5.0, 1.0]])).tolist() == [False, True, True]
    # all equal in x: only the minimum y (and its duplicates) survive
    pts = np.array([[0.0, 3.0], [0.0, 1.0], [0.0, 1.0], [0.0, 2.0]])
    assert non_dominated(pts).tolist() == [False, True, True, False]


def test_maximize_and_mixed_directions():
    pts = np.array([[1.0, 10.0], [2.0, 20.0], [3.0, 15.0]])
    # minimize x, maximize y (e.g. bits/pixel vs PSNR)
    assert non_dominated(pts, [True, False]).tolist() == [True, True, False]
    # maximize both
    assert non_dominated(pts, False).tolist() == [False, True, True]


def test_nan_rows_left_out_and_reported():
    df = pd.DataFrame({"rfd": [1.0, np.nan, 0.5, 2.0, 1.5, np.inf],
                       "gfd": [1.0, 0.1, np.nan, 0.2, 2.0, 0.0]},
                      index=["a", "failed1", "failed2", "d", "e", "inf"])
    r = pareto_front(df, ["rfd", "gfd"])
    assert set(r.excluded) == {"failed1", "failed2", "inf"}
    assert list(r.front) == ["a", "d"]  # sorted by rfd; (0.1) and (0.0) would have dominated if kept
    assert list(r.dominated) == ["e"]
    assert r.mask(df.index).tolist() == [True, False, False, True, False, False]


def test_all_rows_failed_and_missing_column():
    df = pd.DataFrame({"rfd": [np.nan, np.nan], "gfd": [1.0, np.nan]})
    r = pareto_front(df, ["rfd", "gfd"])
    assert len(r.front) == 0 and list(r.excluded) == [0, 1]
    r = pareto_front(df, ["rfd", "gfd_missing"])
    assert len(r.front) == 0 and list(r.excluded) == [0, 1]


def test_non_numeric_values_count_as_missing():
    df = pd.DataFrame({"x": ["1.0", "oops", None], "y": [1.0, 0.0, 0.0]})
    r = pareto_front(df, ["x", "y"])
    assert list(r.front) == [0] and list(r.excluded) == [1, 2]


def test_front_sorted_for_drawing_a_line():
    df = pd.DataFrame({"x": [3.0, 1.0, 2.0, 0.5], "y": [1.0, 3.0, 2.0, 4.0]})
    r = pareto_front(df, ["x", "y"])
    assert list(r.front) == [3, 1, 2, 0]
    assert df.loc[r.front, "y"].is_monotonic_decreasing


def test_non_dominated_rejects_nan_and_bad_shapes():
    with pytest.raises(ValueError, match="finite"):
        non_dominated(np.array([[1.0, math.nan]]))
    with pytest.raises(ValueError, match="2-D"):
        non_dominated(np.array([1.0, 2.0]))


def test_three_objectives():
    pts = np.array([[1, 1, 3], [1, 3, 1], [3, 1, 1], [2, 2, 2], [3, 3, 3]], dtype=float)
    assert non_dominated(pts).tolist() == [True, True, True, True, False]


small_floats = st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 3.0])  # few values: many ties and duplicates


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(small_floats, small_floats), min_size=1, max_size=25),
       st.tuples(st.booleans(), st.booleans()))
def test_matches_brute_force_2d(points, minimize):
    assert non_dominated(np.array(points), list(minimize)).tolist() == brute_force(points, minimize)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(small_floats, small_floats, small_floats), min_size=1, max_size=20))
def test_matches_brute_force_3d(points):
    assert non_dominated(np.array(points)).tolist() == brute_force(points, (True, True, True))


def test_matches_optunas_helper_on_random_data():
    """Optuna's (private) helper is an independent implementation; skip if its name moved."""
    try:
        from optuna.study._multi_objective import _is_pareto_front
    except ImportError:
        pytest.skip("optuna.study._multi_objective._is_pareto_front not available in this Optuna")
    rng = np.random.default_rng(0)
    for n, k in [(1, 2), (7, 2), (50, 2), (40, 3), (30, 4)]:
        for _ in range(5):
            pts = rng.integers(0, 6, size=(n, k)).astype(float)  # integer grid: ties and duplicates
            expected = _is_pareto_front(pts, assume_unique_lexsorted=False)
            assert non_dominated(pts).tolist() == expected.tolist()
