"""Rank trends of a sweep (ulsweep/trends.py) against hand-computed values."""
from __future__ import annotations

import math

import pandas as pd
import pytest

from ulsweep.report.trends import knobs, markdown, spearman, summarize


def test_spearman_closed_forms():
    a = pd.Series([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(a, a ** 3) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    # one swapped pair: rho = 1 - 6 * sum(d^2) / (n (n^2 - 1)) = 1 - 6 * 2 / 120 = 0.9
    assert spearman(a, pd.Series([1.0, 3.0, 2.0, 4.0, 5.0])) == pytest.approx(0.9)
    assert math.isnan(spearman(a, pd.Series([2.0] * 5)))  # a constant side has no ranks to compare
    assert math.isnan(spearman(a.iloc[:1], a.iloc[:1]))


def _frame():
    """2 biases x 3 loss factors, plus the middle point of bias 0 again with seed 1."""
    rows = []
    for b in (0.0, 2.0):
        for i, lf in enumerate((1.5, 2.0, 4.0)):
            bpp = 0.01 * (i + 1) * (1 + b)
            rows.append({"ae.loss.sigmoid_bias": b, "ae.loss.loss_factor": lf, "ae.train.seed": 0,
                         "search.ae.loss.loss_factor": lf, "ae.model.preset": "small", "status": "FINISHED",
                         "bpp": bpp, "psnr": 10 + 100 * bpp, "rfd_fmnist": 5 - 10 * bpp,
                         "gfd_fmnist[small]": [7.0, 5.0, 6.0][i] if b == 0 else [4.0, 5.0, 6.0][i]})
    rows.append({**rows[1], "ae.train.seed": 1, "bpp": 0.021, "gfd_fmnist[small]": 5.5})
    return pd.DataFrame(rows)


def test_summary_reads_the_fig8_trends():
    df = _frame()
    assert knobs(df) == (["ae.loss.sigmoid_bias", "ae.loss.loss_factor"], ["ae.train.seed"])
    s = summarize(df)
    per_bias = [e for e in s["bpp_vs_knob"] if e["knob"] == "ae.loss.loss_factor"]
    assert [(e["fixed"]["ae.loss.sigmoid_bias"], e["n"], e["rho"]) for e in per_bias] == [(0.0, 3, 1.0), (2.0, 3, 1.0)]
    assert s["vs_bpp"]["psnr"] == pytest.approx(1.0) and s["vs_bpp"]["rfd_fmnist"] == pytest.approx(-1.0)
    curves = {c["group"]["ae.loss.sigmoid_bias"]: c for c in s["generation_curves"] if c["group"]}
    assert curves[0.0]["interior"] and curves[0.0]["best_gen"] == 5.0  # minimum in the middle
    assert not curves[2.0]["interior"] and curves[2.0]["best_bpp"] == pytest.approx(0.03)  # at the low end
    # pooled (both biases on one bitrate axis): bpp 0.01 0.02 0.03 0.03 0.06 0.09 -> gFD 7 5 6 4 5 6
    (pooled,) = [c for c in s["generation_curves"] if not c["group"]]
    assert pooled["gen"] == [7.0, 5.0, 6.0, 4.0, 5.0, 6.0] and pooled["interior"] and pooled["best_gen"] == 4.0
    assert (pooled["n_below"], pooled["n_above"]) == (3, 2)
    # below, with average ranks for the tied bpp: bpp ranks 1 2 3.5 3.5, gFD ranks 4 2 3 1 -> rho = -0.6325
    assert pooled["rho_below"] == pytest.approx(-0.6 / math.sqrt(0.9), abs=1e-4)
    assert pooled["rho_above"] == pytest.approx(1.0)
    (rep,) = s["repeats"]
    assert rep["config"] == {"ae.loss.sigmoid_bias": 0.0, "ae.loss.loss_factor": 2.0}
    assert rep["spread"]["gfd_fmnist[small]"] == pytest.approx(0.5)
    md = markdown(df, s)
    assert "ρ(bits/pixel, loss_factor) at sigmoid_bias = 0: 1 (n = 3)" in md and "interior" in md
    assert "- all trials: " in md and "below it 3 point(s)" in md



def test_inception_fid_is_ranked_against_the_domain_fd_per_bias():
    """With `eval.extractor: both` the Inception metrics lead and the domain FDs stand beside them; their rank
    agreement is Spearman's ρ over all first-seed trials and within each sigmoid bias."""
    df = _frame()
    df["rfid"] = 30 - 100 * df["bpp"]  # same order as rfd_fmnist (5 - 10 bpp)
    # gFID at bias 0 in the reverse order of gFD (ranks 1 3 2 vs 3 1 2: rho = 1 - 6*8/(3*8) = -1); at bias 2 equal
    df["gfid[small]"] = [10.0, 14.0, 12.0, 4.0, 5.0, 6.0, 13.0]
    s = summarize(df)
    assert (s["reconstruction"], s["domain_reconstruction"]) == ("rfid", "rfd_fmnist")
    assert (s["generation"], s["domain_generation"]) == ("gfid[small]", "gfd_fmnist[small]")
    got = {(e["a"], tuple(e["slice"].values())): (e["n"], e["rho"]) for e in s["agreement"]}
    assert got[("rfid", ())] == (6, pytest.approx(1.0))
    assert got[("gfid[small]", (0.0,))] == (3, pytest.approx(-1.0))
    assert got[("gfid[small]", (2.0,))] == (3, pytest.approx(1.0))
    # pooled: gFID 10 14 12 4 5 6 vs gFD 7 5 6 4 5 6 (gFD ties at 5 and 6)
    ranks = pd.Series([10.0, 14, 12, 4, 5, 6]).rank().corr(pd.Series([7.0, 5, 6, 4, 5, 6]).rank())
    assert got[("gfid[small]", ())] == (6, pytest.approx(ranks))
    md = markdown(df, s)
    assert "| rfid | rfd_fmnist | gfid[small] | gfd_fmnist[small] |" in md
    assert "ρ(gfid[small], gfd_fmnist[small]), sigmoid_bias = 0: -1 (n = 3)" in md
    assert "gfd_fmnist[small] 5, 5.5" in md  # the seed repeat lists the domain FD too
    # without the domain FDs (extractor inception) there is nothing to compare
    assert summarize(df.drop(columns=["rfd_fmnist", "gfd_fmnist[small]"]))["agreement"] == []

# ----------------------------------------------------------------------------------------------
# base-model size against bitrate (ulsweep/report/basesize.py)

from basesize_data import base_frame, paper_like  # noqa: E402  tests/basesize_data.py

from ulsweep.report import basesize  # noqa: E402


def _verdicts(res):
    return [c.verdict for c in res.claims]


def test_base_size_verdicts_follow_the_data():
    df = base_frame()
    res = basesize.analyze(df.sample(frac=1.0, random_state=1))  # frame order must not matter
    assert res.sizes == ["small", "medium", "large"] and res.gen == "gfid"
    assert [res.optima[s].interior for s in res.sizes] == [False, True, False]
    assert res.optima["medium"].interval[0] <= 0.01 <= res.optima["medium"].interval[1]
    assert _verdicts(res) == [basesize.REPRODUCED] * 3
    # Table 2's numbers are the data's: mean gFID at loss factor 2.1 minus at 1.3, seeds averaged
    small = df[df["base"] == "small"]
    delta = small.loc[small["ae.loss.loss_factor"] == 2.1, "gfid"].mean() - \
        small.loc[small["ae.loss.loss_factor"] == 1.3, "gfid"].mean()
    assert res.claims[0].numbers["delta_small"] == pytest.approx(delta)
    assert f"Δ {delta:+.3g}" in res.claims[0].evidence and "loss factor 1.3 → 2.1" in res.claims[0].evidence
    t = res.table.set_index("base size")
    low = small.loc[small["ae.loss.loss_factor"] == 1.3, "gfid"].mean()
    assert t.loc["small", "gFID at lowest"] == pytest.approx(low)
    assert t.loc["large", "× smallest"] == pytest.approx(2.695 / 0.281)
    md = basesize.markdown(res)
    assert "## Base-model size and latent bitrate" in md and md.count(": reproduced**") == 3


def test_base_size_verdicts_turn_when_the_data_turn():
    """The sizes' curves swapped (the small model profits from bitrate, the large one is hurt): every claim
    is 'not reproduced'."""
    swap = {"small": "large", "medium": "medium", "large": "small"}
    res = basesize.analyze(base_frame(lambda s, b: paper_like(swap[s], b)))
    assert _verdicts(res) == [basesize.NOT_REPRODUCED] * 3


def test_base_size_flat_curves_and_missing_repeats_are_inconclusive():
    flat = basesize.analyze(base_frame(lambda s, b: 1.5, noise=0.1))
    assert not any(o.interior for o in flat.optima.values())
    assert _verdicts(flat) == [basesize.INCONCLUSIVE] * 3
    no_repeats = basesize.analyze(base_frame(repeated=()))
    assert no_repeats.claims[0].verdict == basesize.INCONCLUSIVE and "no seed repeats" in no_repeats.claims[0].evidence
    df = base_frame()
    gap = basesize.analyze(df[~((df["base"] == "medium") & (df["ae.loss.loss_factor"] == 1.3))])
    assert gap.claims[0].verdict == basesize.INCONCLUSIVE and "no finished trial at one end" in gap.claims[0].evidence


def test_base_size_needs_several_sizes():
    assert basesize.analyze(base_frame(sizes=("small",))) is None
    same = base_frame(sizes=("small", "medium")).assign(gflops_base=0.281, **{"base.model.preset": "small"})
    assert basesize.analyze(same) is None  # two base models of one size: not a size study
    assert basesize.analyze(base_frame().iloc[0:0]) is None

# ----------------------------------------------------------------------------------------------
# configurations with seed repeats compared (ulsweep/report/compare.py)

from scipy import stats as _stats  # noqa: E402

from ulsweep.report import compare  # noqa: E402


def _pairs_frame():
    """Two matched-bitrate configurations, three seeds each; seed 1 of the first collapsed."""
    rows = []
    for b, lf, bpps, gfid in ((0.0, 1.5, [5.2e-3, 1.5e-4, 5.0e-3], [12.4, 11.9, 11.8]),
                              (-2.0, 2.0, [4.2e-3, 4.1e-3, 4.0e-3], [13.7, 14.0, 14.2])):
        for seed, (bpp, g) in enumerate(zip(bpps, gfid)):
            rows.append({"ae.loss.sigmoid_bias": b, "ae.loss.loss_factor": lf, "ae.train.seed": seed,
                         "status": "FINISHED", "bpp": bpp, "psnr": 13.0 + 100 * bpp, "gfid[small]": g})
    return pd.DataFrame(rows)


def test_welch_p_matches_its_closed_form():
    a, b = pd.Series([13.7, 14.0, 14.2]), pd.Series([12.4, 11.8])
    va, vb = a.var() / 3, b.var() / 2  # sample variances over n
    t = (a.mean() - b.mean()) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 1)  # Welch-Satterthwaite
    assert compare.welch(a, b) == pytest.approx(2 * _stats.t.sf(abs(t), df), rel=1e-9)
    assert math.isnan(compare.welch(a, b.iloc[:1]))  # one value: no variance to test against
    assert math.isnan(compare.welch(pd.Series([1.0, 1.0]), pd.Series([2.0, 2.0])))  # no spread on either side


def test_repeated_configurations_are_compared_without_their_collapsed_seeds():
    s = summarize(_pairs_frame())
    c = s["compared"]
    assert c.configs == [{"ae.loss.sigmoid_bias": -2.0, "ae.loss.loss_factor": 2.0},
                         {"ae.loss.sigmoid_bias": 0.0, "ae.loss.loss_factor": 1.5}]
    assert [(r["config"], r["ae.train.seed"]) for r in c.collapsed] == [(1, 1)]  # 1.5e-4 < 5.0e-3 / 10
    g = c.summaries["gfid[small]"]
    assert (g[0].n, g[1].n) == (3, 2)
    assert g[0].mean == pytest.approx(13.9667, abs=1e-4) and g[1].mean == pytest.approx(12.1)
    assert g[1].sd == pytest.approx(math.sqrt(0.18))  # (12.4 - 12.1)^2 * 2 / (2 - 1)
    (d,) = [d for d in c.differences if d.metric == "gfid[small]"]
    assert (d.a, d.b) == (0, 1) and d.diff == pytest.approx(13.9667 - 12.1, abs=1e-4)
    assert d.rel == pytest.approx(d.diff / 12.1)
    assert d.p == pytest.approx(compare.welch(pd.Series([13.7, 14.0, 14.2]), pd.Series([12.4, 11.8])))
    md = markdown(_pairs_frame(), s)
    assert "| sigmoid_bias = -2, loss_factor = 2 | sigmoid_bias = 0, loss_factor = 1.5 | gfid[small] | +1.867 | +15% |" in md
    assert "| sigmoid_bias = 0, loss_factor = 1.5 | 0.0051 ± 0.0001414 (2) |" in md
    assert "- sigmoid_bias = 0, loss_factor = 1.5, ae.train.seed = 1: bits/pixel 0.00015 against a median of 0.005" in md


def test_nothing_is_compared_without_two_repeated_configurations():
    assert summarize(_frame())["compared"] is None  # one configuration has a second seed
    one = _pairs_frame()[lambda d: d["ae.loss.sigmoid_bias"] == 0.0]
    assert compare.compare(one, ["ae.loss.sigmoid_bias"], ["bpp"], ["ae.train.seed"]) is None
    many = pd.concat([_pairs_frame().assign(**{"ae.loss.loss_factor": lf}) for lf in range(4)])
    assert compare.compare(many, ["ae.loss.sigmoid_bias", "ae.loss.loss_factor"], ["bpp"],
                           ["ae.train.seed"]) is None  # 8 configurations: more than MAX_CONFIGS
    assert "Configurations with seed repeats" not in markdown(_frame())
