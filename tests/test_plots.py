"""Figures and tables built from fixed small DataFrames (no MLflow): trace names, point counts, axis titles
(domain metrics never labelled FID), log axes, Pareto highlighting, failed trials left out and named."""
import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest

from ulsweep.report import columns, plots
from ulsweep.report.tables import paper_tables, trials_table

NAN = math.nan


def ae_frame(gen="gfd_fmnist", rec="rfd_fmnist") -> pd.DataFrame:
    """6 AE trials: 2 sigmoid biases x 3 loss factors; ae-0005 failed (no metrics); one base model 'small'."""
    lf = [1.5, 2.0, 4.0, 1.5, 2.0, 4.0]
    bias = [-2.0, -2.0, -2.0, 2.0, 2.0, 2.0]
    bpp = [0.006, 0.011, 0.044, 0.020, 0.029, NAN]
    return pd.DataFrame({
        "key": [f"ae-{i:04d}" for i in range(6)],
        "run_id": [f"run{i}" for i in range(6)],
        "status": ["FINISHED"] * 5 + ["FAILED"],
        "data.image_size": [32] * 6,
        "ae.model.latent_channels": [8] * 6,
        "ae.model.downsample": [4] * 6,
        "ae.loss.loss_factor": lf,
        "ae.loss.sigmoid_bias": bias,
        "bpp": bpp,
        "bpp_se": [b / 50 for b in bpp],
        "psnr": [12.5, 14.0, 18.3, 13.5, 15.0, NAN],
        rec: [30.0, 20.0, 10.0, 25.0, 22.0, NAN],
        f"{gen}[small]": [40.0, 30.0, 35.0, 28.0, 45.0, NAN],
        "base_bpp[small]": [0.006, 0.011, 0.045, 0.020, 0.030, NAN],
        "run_id[small]": [f"base{i}" for i in range(6)],
    })


def base_frame() -> pd.DataFrame:
    """6 base trials: 3 AEs x base models 'tiny' and 'small'; one without FLOPs (failed)."""
    rows = []
    for i in range(3):
        for name, tflops, gfl, gfd in (("tiny", 1e12, 0.5, 40.0 - i), ("small", 4e12, 2.0, 30.0 - i)):
            rows.append({"key": f"ae-{i:04d}-{name}", "ae_key": f"ae-{i:04d}", "base": name,
                         "run_id": f"b{i}{name}", "status": "FINISHED", "ae.loss.loss_factor": [1.5, 2, 4][i],
                         "train_flops": tflops * (1 + i), "gflops_base": gfl, "gfd_fmnist": gfd,
                         "ae/bpp": [0.006, 0.011, 0.044][i]})
    df = pd.DataFrame(rows)
    df.loc[5, ["train_flops", "gfd_fmnist"]] = NAN
    df.loc[5, "status"] = "FAILED"
    return df


def names(fig: go.Figure) -> list[str]:
    return [t.name for t in fig.data]


def test_metric_labels_follow_design_section_2():
    assert columns.metric_label("gfd_fmnist") == "gFD (fmnist features)"
    assert columns.metric_label("rfd_digits") == "rFD (digits features)"
    assert columns.metric_label("gfid") == "gFID" and columns.metric_label("rfid") == "rFID"
    assert columns.metric_label("gfd_fmnist[small]") == "gFD (fmnist features), base small"
    assert columns.metric_label("bpp") == "latent bits/pixel"
    for name in ("gfd_fmnist", "rfd_digits", "gfd_x[tiny]"):
        assert "FID" not in columns.metric_label(name)


def test_metric_discovery():
    ae = ae_frame()
    assert columns.generation_metric(ae) == "gfd_fmnist"
    assert columns.reconstruction_metric(ae) == "rfd_fmnist"
    assert columns.base_names(ae) == ["small"]
    assert columns.varied_params(ae) == ["ae.loss.loss_factor", "ae.loss.sigmoid_bias"]
    both = ae_frame().assign(**{"gfid[small]": 1.0, "rfid": 1.0})
    assert columns.generation_metric(both) == "gfid" and columns.reconstruction_metric(both) == "rfid"


def test_fig8_triptych_traces_axes_and_errors():
    fig = plots.fig8_triptych(ae_frame())
    # 2 biases x 3 panels; the failed trial is dropped from the b=2 lines
    assert names(fig) == ["sigmoid bias -2"] * 3 + ["sigmoid bias 2"] * 3
    assert [len(t.x) for t in fig.data] == [3, 3, 3, 2, 2, 2]
    assert sum(bool(t.showlegend) for t in fig.data) == 2
    b0 = fig.data[0]
    assert list(b0.x) == sorted(b0.x)  # sorted by bits/pixel
    assert list(b0.text) == ["LF 1.5", "LF 2", "LF 4"]
    assert b0.error_x.array is not None and b0.error_x.array[0] == pytest.approx(0.006 / 50)
    assert "run0" in b0.hovertext[0] and "loss factor: 1.5" in b0.hovertext[0]
    lay = fig.layout
    for ax in (lay.xaxis, lay.xaxis2, lay.xaxis3):
        assert ax.type == "log" and ax.title.text == "latent bits/pixel"
    assert lay.yaxis.title.text == "gFD (fmnist features)"
    assert lay.yaxis2.title.text == "rFD (fmnist features)"
    assert lay.yaxis3.title.text == "PSNR (dB)"
    assert "FID" not in fig.to_json()  # no domain metric called FID anywhere (titles, hover, legend)
    assert any("ae-0005" in a.text for a in lay.annotations)  # the failed trial is named


def test_fig8_draws_seed_repeats_off_the_lines():
    ae = ae_frame()
    ae["ae.train.seed"] = 0
    rep = ae.iloc[[0]].assign(**{"ae.train.seed": 1, "key": "ae-0009", "bpp": 0.05})  # b=-2, LF 1.5 again
    ae = pd.concat([ae, rep], ignore_index=True)
    assert columns.seed_repeats(ae).tolist() == [False] * (len(ae) - 1) + [True]
    fig = plots.fig8_triptych(ae)
    assert names(fig) == (["sigmoid bias -2", "sigmoid bias -2 (other seed)"] * 3 + ["sigmoid bias 2"] * 3)
    line, other = fig.data[0], fig.data[1]
    assert len(line.x) == 3 and line.mode == "lines+markers+text"  # the b=-2 line keeps its 3 first-seed trials
    assert list(other.x) == [0.05] and other.mode == "markers" and other.marker.symbol == "circle-open"
    assert list(other.text) == ["LF 1.5"] and other.legendgroup == line.legendgroup


def test_fig8_with_inception_metrics_says_fid():
    fig = plots.fig8_triptych(ae_frame(gen="gfid", rec="rfid"))
    assert fig.layout.yaxis.title.text == "gFID" and fig.layout.yaxis2.title.text == "rFID"


def test_fig8_without_bias_column_and_two_bases():
    ae = ae_frame().drop(columns=["ae.loss.sigmoid_bias"]).assign(**{"gfd_fmnist[tiny]": 50.0})
    fig = plots.fig8_triptych(ae)
    assert names(fig) == ["all trials [small]", "all trials [tiny]", "all trials", "all trials"]
    assert fig.data[0].line.dash != fig.data[1].line.dash


def test_pareto_rec_vs_gen_highlights_and_connects_front():
    ae = ae_frame()
    fig = plots.pareto_figure(ae, x="rec")
    assert names(fig) == ["all trials [small]", "Pareto front [small]"]
    allt, front = fig.data
    assert len(allt.x) == 5  # the failed trial is left out ...
    assert any("ae-0005" in a.text for a in fig.layout.annotations)  # ... and reported
    # (rfd, gfd): (30,40) (20,30) (10,35) (25,28) (22,45) -> front: (10,35) (20,30) (25,28)
    assert list(front.x) == [10.0, 20.0, 25.0] and list(front.y) == [35.0, 30.0, 28.0]
    assert front.mode == "lines+markers"
    assert "MLflow run: run2" in front.hovertext[0] and "sigmoid bias: -2" in front.hovertext[0]
    assert fig.layout.xaxis.title.text == "rFD (fmnist features)"
    assert fig.layout.yaxis.title.text == "gFD (fmnist features)"


def test_pareto_bpp_vs_gen_log_x():
    fig = plots.pareto_figure(ae_frame(), x="bpp")
    front = fig.data[1]
    # (bpp, gfd): (.006,40) (.011,30) (.044,35) (.020,28) (.029,45) -> front .006, .011, .020
    assert list(front.x) == [0.006, 0.011, 0.020]
    assert fig.layout.xaxis.type == "log" and fig.layout.xaxis.title.text == "latent bits/pixel"


def test_pareto_without_generation_metric_is_an_explained_empty_figure():
    ae = ae_frame().drop(columns=["gfd_fmnist[small]"])
    fig = plots.pareto_figure(ae)
    assert len(fig.data) == 0 and "none logged" in fig.layout.annotations[0].text


def test_flops_figure_per_base_size():
    fig = plots.flops_figure(base_frame())
    per_base = [t for t in fig.data if t.name.startswith("base ")]
    assert [t.name for t in per_base] == ["base tiny", "base small"] * 2
    assert [len(t.x) for t in per_base] == [3, 2, 3, 2]  # the failed small trial has no metric
    joins = [t for t in fig.data if t.name == "same autoencoder"]
    assert len(joins) == 2 + 2 and sum(bool(t.showlegend) for t in joins) == 1
    assert fig.layout.xaxis.type == "log" and fig.layout.xaxis2.type == "log"
    assert fig.layout.xaxis.title.text == "base training FLOPs"
    assert fig.layout.xaxis2.title.text == "base model forward GFLOP / image"
    assert fig.layout.yaxis.title.text == "gFD (fmnist features)"
    assert "FID" not in fig.to_json()
    assert any("ae-0002-small" in a.text for a in fig.layout.annotations)


def test_flops_figure_empty_when_no_metric():
    fig = plots.flops_figure(base_frame().drop(columns=["gfd_fmnist"]))
    assert len(fig.data) == 0


def test_table2_for_a_loss_factor_sweep():
    tables = paper_tables(ae_frame())
    assert list(tables) == ["Table 2 · loss factor vs bits/pixel and quality"]
    t = tables["Table 2 · loss factor vs bits/pixel and quality"]
    assert list(t.columns) == ["trial", "sigmoid bias", "LF", "bits/pixel", "rFD (fmnist features)",
                               "PSNR (dB)", "gFD (fmnist features) [small]"]
    assert len(t) == 6 and list(t["LF"][:3]) == [1.5, 2.0, 4.0]


def test_tables_3_4_5_6_appear_only_when_their_axis_varies():
    ae = ae_frame().assign(**{"ae.loss.loss_factor": 2.0, "ae.loss.sigmoid_bias": 0.0})
    assert paper_tables(ae) == {}
    ch = ae.assign(**{"ae.model.latent_channels": [4, 8, 16, 32, 64, 8]})
    assert list(paper_tables(ch)) == ["Table 3 · latent channels"]
    ds = ae.assign(**{"ae.model.downsample": [2, 4, 8, 2, 4, 8]})
    t4 = paper_tables(ds)["Table 4 · latent shape (h×w×c)"]
    assert list(t4["latent shape (h×w×c)"][:3]) == ["16×16×8", "16×16×8", "8×8×8"]
    ab = ae.assign(**{"ae.loss.stop_grad_prior": ["False", "True"] * 3,
                      "ae.loss.logsnr_z0": [5.0, 5.0, 10.0, 10.0, 5.0, 5.0]})
    t6 = paper_tables(ab)["Table 6 · ablations"]
    assert set(t6["ablation"]) == {"baseline", "A. stop-grad prior", "B. λ_z(0) = 10",
                                   "A. stop-grad prior + B. λ_z(0) = 10"}
    pd_ = ae.assign(**{"ae.loss.prior": ["diffusion", "normal"] * 3})
    t5 = paper_tables(pd_)["Table 5 · prior and decoder"]
    assert "latent bits/pixel (base model small)" in t5.columns


def test_trials_table():
    t = trials_table(ae_frame())
    assert list(t.columns) == ["trial", "status", "loss factor", "sigmoid bias", "latent bits/pixel",
                               "latent bits/pixel (std. error)", "rFD (fmnist features)", "PSNR (dB)",
                               "gFD (fmnist features), base small", "MLflow run"]
    assert len(t) == 6 and np.isnan(t.iloc[5]["latent bits/pixel"])
