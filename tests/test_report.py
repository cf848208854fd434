"""`ulsweep report`: MLflow -> DataFrames -> dashboard/CSV/artifacts, on a small store made with MlflowClient
(the sweep's tagging conventions through ulsweep.tracking; no Ray, no training)."""
import argparse
import json
import math
import re
import sys

import pandas as pd
import pytest

from ulsweep import tracking
from ulsweep.report import dashboard as report
from ulsweep.report import png
from ulsweep.report.cli import register

LFS, BIASES = (1.5, 4.0), (-2.0, 2.0)


def make_store(root, name="mini", failed=True):
    """A sweep like `ulsweep run` leaves it: parent run, 4 AE trials (2 LF x 2 bias), each with base models
    's' and 'm'; ae-0003 FAILED without metrics (and has no base trials); ae-0002-m left RUNNING."""
    run_dir = root / "runs" / name
    run_dir.mkdir(parents=True)
    uri = tracking.default_tracking_uri(str(run_dir))
    c = tracking.client(uri)
    eid = tracking.get_or_create_experiment(c, name, str(run_dir / "mlartifacts"))
    sweep_id = tracking.create_sweep_run(c, eid, f"sweep-{name}", tags={"ulsweep.run_dir": str(run_dir)})
    tracking.log_params(c, sweep_id, {"experiment": name, "search.metrics": "('gfd_digits',)",
                                      "base_models": ["s", "m"]})
    i = 0
    for lf in LFS:
        for b in BIASES:
            key = f"ae-{i:04d}"
            ae_id, _ = tracking.get_or_create_trial_run(c, eid, sweep_id, key, "ae", sweep_id,
                                                        tags={"ulsweep.ae_key": key})
            tracking.log_params(c, ae_id, {"ae.loss.loss_factor": lf, "ae.loss.sigmoid_bias": b,
                                           "ae.model.latent_channels": 4, "ae.model.downsample": 4,
                                           "data.image_size": 16, "ae.train.seed": 0, "ae.optim.betas": (0.9, 0.99)})
            if failed and i == 3:
                tracking.retry(c.set_terminated, ae_id, status="FAILED")
                break
            bpp = 0.01 * lf * math.exp(0.4 * b)
            final = {"bpp": bpp, "bpp_se": bpp / 50, "psnr": 10 + 20 * bpp, "rfd_digits": 100 / (1 + 20 * bpp),
                     "gflops_encoder": 0.01, "train_flops": 1e12}
            tracking.log_metrics(c, ae_id, {f"eval_{k}": v for k, v in final.items()}, step=60)
            tracking.log_metrics(c, ae_id, {**final, "loss": 0.3}, step=60)
            tracking.log_metrics(c, ae_id, {"eval_only_in_loop": 7.0}, step=60)
            for base, scale, gfl in (("s", 1.0, 0.002), ("m", 0.8, 0.008)):
                bkey = f"{key}-{base}"
                bid, _ = tracking.get_or_create_trial_run(c, eid, sweep_id, bkey, "base", ae_id,
                                                          tags={"ulsweep.ae_key": key})
                tracking.log_params(c, bid, {"ae.loss.loss_factor": lf, "ae.loss.sigmoid_bias": b, "base.name": base,
                                             "base.model.preset": "tiny" if base == "s" else "small",
                                             "ae_key": key, "ae_checkpoint": f"/ckpt/{key}"})
                if bkey == "ae-0002-m":
                    continue  # left RUNNING by a killed sweep
                gfd = scale * ((math.log(bpp) + 4.0) ** 2 + 10)
                tracking.log_metrics(c, bid, {"gfd_digits": gfd, "base_bpp": bpp * 1.1, "gflops_base": gfl,
                                              "train_flops": gfl * 3e9 * 60 * 64, "gen_samples": 1000})
                tracking.log_metrics(c, ae_id, {f"{base}/gfd_digits": gfd})
                tracking.retry(c.set_terminated, bid, status="FINISHED")
            tracking.retry(c.set_terminated, ae_id, status="FINISHED")
            i += 1
    tracking.retry(c.set_terminated, sweep_id, status="FINISHED")
    (run_dir / "sweep.json").write_text(json.dumps({"sweep_id": sweep_id, "mlflow_experiment_id": eid,
                                                    "tracking_uri": uri, "identity": {}}))
    return run_dir, uri, sweep_id


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("store")
    run_dir, uri, sweep_id = make_store(root)
    return root, run_dir, uri, sweep_id


def test_resolve_by_run_dir_name_and_run_id(store, monkeypatch):
    root, run_dir, uri, sweep_id = store
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ref = report.resolve_sweep(str(run_dir))
    assert (ref.sweep_id, ref.tracking_uri, ref.name, ref.run_dir) == (sweep_id, uri, "mini", str(run_dir))
    monkeypatch.chdir(root)  # ./runs/<name>
    assert report.resolve_sweep("mini").sweep_id == sweep_id
    monkeypatch.chdir(root.parent)
    with pytest.raises(report.ReportError, match="--tracking-uri"):
        report.resolve_sweep("mini")
    assert report.resolve_sweep("mini", uri).sweep_id == sweep_id  # looked up by name in the store
    assert report.resolve_sweep(sweep_id, uri).name == "mini"  # by the parent run id
    c = tracking.client(uri)
    child = tracking.find_run(c, ref.experiment_id, sweep_id, "ae-0001-m").info.run_id
    assert report.resolve_sweep(child, uri).sweep_id == sweep_id  # by any trial's run id
    with pytest.raises(report.ReportError, match="no sweep named"):
        report.resolve_sweep("nope", uri)


def test_frames_join_base_metrics_and_list_failures(store):
    _, run_dir, uri, sweep_id = store
    data = report.load_sweep(report.resolve_sweep(str(run_dir)))
    assert list(data.ae["key"]) == ["ae-0000", "ae-0001", "ae-0002", "ae-0003"]
    assert len(data.base) == 6 and list(data.base["base"][:2]) == ["s", "m"]  # the experiment's order
    from ulsweep.report.columns import base_names

    assert base_names(data.ae) == ["s", "m"]
    assert len(data.runs) == 10 and sweep_id not in set(data.runs["run_id"])
    ae = data.ae.set_index("key")
    # params back as numbers, metrics final, eval_ duplicates collapsed, base metrics joined per base model
    assert ae.loc["ae-0001", "ae.loss.sigmoid_bias"] == 2.0 and ae.loc["ae-0001", "ae.model.latent_channels"] == 4
    assert "eval_bpp" not in ae.columns and ae.loc["ae-0000", "only_in_loop"] == 7.0
    assert ae.loc["ae-0000", "ae.optim.betas"] == "(0.9, 0.99)"
    for col in ("gfd_digits[s]", "gfd_digits[m]", "base_bpp[m]", "run_id[s]", "status[m]"):
        assert col in ae.columns
    assert "s/gfd_digits" not in ae.columns  # the AE run's copies are replaced by the join
    assert math.isnan(ae.loc["ae-0002", "gfd_digits[m]"]) and ae.loc["ae-0002", "status[m]"] == "RUNNING"
    b = data.base.set_index("key")
    assert b.loc["ae-0001-m", "ae/bpp"] == pytest.approx(ae.loc["ae-0001", "bpp"])
    failed = {f["key"]: f for f in data.failed}
    assert set(failed) == {"ae-0003", "ae-0002-m"}
    assert failed["ae-0003"]["reason"].startswith("MLflow status FAILED")
    assert "RUNNING" in failed["ae-0002-m"]["reason"] and "gfd_digits" in failed["ae-0002-m"]["reason"]


def test_report_writes_offline_html_csv_and_logs_artifacts(store, tmp_path):
    _, run_dir, uri, sweep_id = store
    res = report.make_report(str(run_dir), out_dir=str(tmp_path / "dash"), png=False)
    html = open(res.index_html, encoding="utf-8").read()
    # self-contained: plotly.js embedded once, no remote scripts; 4 figures drawn, 2 more for the two base sizes
    assert html.count("window.PlotlyConfig") == 1 and len(html) > 1_000_000
    assert not re.search(r"<script[^>]+src=[\"']https?://", html)
    assert html.count("Plotly.newPlot(") == 6
    for s in ("mini", sweep_id, uri, "ae-0003", "ae-0002-m", "sigmoid bias -2", "Pareto front [s]",
              "Pareto front [m]", "base s", "base m", "Table 2 · loss factor", "gFD (digits features)"):
        assert s in html, s
    assert "gFID" not in html and "rFID" not in html  # domain metrics only: never called FID
    runs = pd.read_csv(res.csv[0])
    assert len(runs) == 10 and {"run_id", "parent_run_id", "status", "ae.train.seed", "bpp"} <= set(runs.columns)
    ae = pd.read_csv(res.csv[1])
    assert len(ae) == 4 and "gfd_digits[m]" in ae.columns
    assert sorted(p.name for p in (tmp_path / "dash" / "figures").glob("*.json")) == [
        "base_size_flops_per_bitrate.json", "base_size_optimum.json", "fig8_quality_vs_bitrate.json",
        "flops_vs_gen.json", "pareto_bpp_vs_gen.json", "pareto_rec_vs_gen.json"]
    # 3 (s) and 2 (m) finished base trials: too few for a curve, and trends.md says so rather than invent one
    trends = (tmp_path / "dash" / "trends.md").read_text()
    assert "## Base-model size and latent bitrate" in trends and "- s: no interior optimum — too few points" in trends
    assert res.logged_to_run == sweep_id
    c = tracking.client(uri)
    logged = {a.path for a in c.list_artifacts(sweep_id, "dashboard")}
    assert {"dashboard/index.html", "dashboard/trials.csv", "dashboard/ae_trials.csv", "dashboard/figures"} <= logged


def test_png_export_messages_when_unavailable(monkeypatch, tmp_path):
    import plotly.graph_objects as go

    figs = {"f": go.Figure(go.Scatter(x=[1], y=[1]))}
    monkeypatch.setitem(sys.modules, "kaleido", None)  # import kaleido -> ImportError
    paths, note = png.export_pngs(figs, tmp_path)
    assert paths == [] and "kaleido is not installed" in note
    monkeypatch.delitem(sys.modules, "kaleido")
    pytest.importorskip("kaleido")
    monkeypatch.setattr(png, "find_browser", lambda: None)
    paths, note = png.export_pngs(figs, tmp_path)
    assert paths == [] and "apt-get install -y chromium" in note and "BROWSER_PATH" in note


def test_find_browser_honours_browser_path(monkeypatch, tmp_path):
    exe = tmp_path / "mychrome"
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.setenv("BROWSER_PATH", str(exe))
    assert png.find_browser() == str(exe)


def run_cli(argv):
    p = argparse.ArgumentParser(prog="ulsweep")
    register(p.add_subparsers(dest="command", required=True))
    args = p.parse_args(argv)
    return args.func(args)


def test_cli_report_prints_dashboard_path_last(store, tmp_path, capsys, monkeypatch):
    root, run_dir, uri, sweep_id = store
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(report, "export_pngs", lambda figs, out: ([], "PNG export skipped: test"))
    assert run_cli(["report", str(run_dir), "--no-log"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == f"dashboard: {tmp_path / 'dashboards' / 'mini' / 'index.html'}"
    assert any("failed: ae-0003" in line for line in out) and any("PNG export skipped" in line for line in out)
    assert (tmp_path / "dashboards" / "mini" / "trials.csv").is_file()
    assert run_cli(["report", "does-not-exist"]) == 2
    assert "neither a sweep run directory" in capsys.readouterr().err


def test_write_report_api_returns_index_path(store, tmp_path, monkeypatch):
    _, run_dir, uri, _ = store
    monkeypatch.setattr(report, "export_pngs", lambda figs, out: ([], None))
    path = report.write_report(str(run_dir), tracking_uri=uri, out_dir=str(tmp_path / "d"))
    assert path == str(tmp_path / "d" / "index.html") and (tmp_path / "d" / "index.html").is_file()


def _sweep_run(root, name):
    """An MLflow store under root/runs/<name> holding the sweep's parent run and nothing else yet:
    (client, experiment id, sweep run id, its SweepRef)."""
    run_dir = root / "runs" / name
    run_dir.mkdir(parents=True)
    uri = tracking.default_tracking_uri(str(run_dir))
    c = tracking.client(uri)
    eid = tracking.get_or_create_experiment(c, name, str(run_dir / "mlartifacts"))
    sid = tracking.create_sweep_run(c, eid, f"sweep-{name}")
    return c, eid, sid, report.SweepRef(sid, eid, uri, name, str(run_dir))


def test_empty_sweep_still_reports(tmp_path):
    _, _, _, ref = _sweep_run(tmp_path, "empty")
    res = report.make_report(ref, out_dir=str(tmp_path / "d"), png=False, log_artifacts=False)
    html = open(res.index_html, encoding="utf-8").read()
    assert "ulsweep sweep report: empty" in html and html.count("window.PlotlyConfig") == 1


def test_sweep_stopped_before_its_first_base_trial_reports_its_autoencoders(tmp_path):
    """An interrupted sweep whose AE trials ran but whose base trials never started (this raised KeyError 'key')."""
    c, eid, sid, ref = _sweep_run(tmp_path, "ae_only")
    tracking.log_params(c, sid, {"experiment": "ae_only", "base_models": ["small", "large"]})
    for i, (lf, status) in enumerate(((1.5, "FINISHED"), (4.0, "KILLED"))):
        key = f"ae-{i:04d}"
        rid, _ = tracking.get_or_create_trial_run(c, eid, sid, key, "ae", sid, tags={"ulsweep.ae_key": key})
        tracking.log_params(c, rid, {"ae.loss.loss_factor": lf})
        if status == "FINISHED":
            tracking.log_metrics(c, rid, {"bpp": 0.02, "psnr": 15.0}, step=10)
        tracking.retry(c.set_terminated, rid, status=status)
    tracking.retry(c.set_terminated, sid, status="KILLED")
    res = report.make_report(ref, out_dir=str(tmp_path / "d"), png=False, log_artifacts=False)
    d = res.data
    assert list(d.ae["key"]) == ["ae-0000", "ae-0001"] and d.base.empty and "key" in d.base.columns
    assert [(f["key"], f["status"]) for f in d.failed] == [("ae-0001", "KILLED")]
    assert "ae-0000" in (tmp_path / "d" / "ae_trials.csv").read_text()


def test_base_size_sweep_reports_optimum_table_figures_and_verdicts(tmp_path, monkeypatch):
    """A synthetic 3-size sweep (tests/basesize_data.py) through make_report, MLflow left out: the base-size
    figures, the table, trends.md's verdicts and base_size.json."""
    from basesize_data import ae_frame, base_frame, paper_like

    base = base_frame()
    swap = {"small": "large", "medium": "medium", "large": "small"}  # a domain FD that disagrees with gFID
    base["gfd_x"] = [paper_like(swap[s], b) for s, b in zip(base["base"], base["ae/bpp"])]
    ae = ae_frame(base)
    ref = report.SweepRef("0" * 32, "0", "sqlite:///none.db", "base-size", None)
    data = report.SweepData(ref, pd.concat([ae, base], ignore_index=True), ae, base,
                            {"status": "FINISHED", "params": {}, "metrics": {}, "tags": {}})
    monkeypatch.setattr(report, "load_sweep", lambda r: data)
    res = report.make_report(ref, out_dir=str(tmp_path / "d"), png=False, log_artifacts=False)
    html = open(res.index_html, encoding="utf-8").read()
    assert html.count("Plotly.newPlot(") == 6 and "Base-model size → optimal latent bits/pixel" in html
    assert "medium: optimum 0.01" in html and "small: no interior optimum" in html
    assert html.count(": reproduced</b>") == 3 and html.count(": not reproduced</b>") == 3
    assert "id='verdicts-gfd_x'" in html
    summary = json.loads((tmp_path / "d" / "base_size.json").read_text())
    assert summary["sizes"] == ["small", "medium", "large"] and summary["generation_metric"] == "gfid"
    assert [b["generation_metric"] for b in summary["beside"]] == ["gfd_x"]
    assert [c["verdict"] for c in summary["beside"][0]["claims"]] == ["not reproduced"] * 3
    assert summary["optima"]["small"]["interval"] == [None, None]  # NaN written as null
    lo, hi = summary["optima"]["medium"]["interval"]
    assert lo <= 0.01 <= hi
    trends = (tmp_path / "d" / "trends.md").read_text()
    assert trends.count(": reproduced**") == 3 and "Spearman rank correlations" in trends  # both sections
    assert trends.count(": not reproduced**") == 3 and "## Base-model size and latent bitrate by gFD (x features)" in trends
    import plotly.io as pio

    fig = pio.read_json(str(tmp_path / "d" / "figures" / "base_size_flops_per_bitrate.json"))
    assert len(fig.data) == 7  # one line per autoencoder bitrate, through the 3 sizes in FLOPs order
    assert all(list(t.text) == ["small", "medium", "large"] for t in fig.data)


def test_mlflow_server_starts_without_mlflows_job_runner_unless_asked(monkeypatch):
    from ulsweep.report import cli as report_cli

    seen = []

    class FakePopen:
        def __init__(self, cmd, env=None, **kw):
            seen.append((cmd, env))

    monkeypatch.setattr(report_cli.subprocess, "Popen", FakePopen)
    monkeypatch.delenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", raising=False)
    report_cli.start_mlflow_server("sqlite:///x.db", port=5999)
    monkeypatch.setenv("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "true")
    report_cli.start_mlflow_server("sqlite:///x.db", port=5999)
    assert [env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] for _, env in seen] == ["false", "true"]
    assert seen[0][0][1:4] == ["-m", "mlflow", "server"]
