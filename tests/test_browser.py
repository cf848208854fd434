"""Real browser tests (headless Debian chromium): the generated dashboard renders offline with its traces,
kaleido exports non-blank PNGs, and `ulsweep ui` serves the MLflow UI on 127.0.0.1 showing the sweep's runs.
Skipped when /usr/bin/chromium is missing (`apt-get install -y chromium`; .ci/run installs it)."""
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
from PIL import Image

from test_report import make_store  # the same small MLflow store as the report tests (no Ray)
from ulsweep.report import dashboard as report

CHROMIUM = os.environ.get("ULSWEEP_CHROMIUM", "/usr/bin/chromium")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)),
                       reason=f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium) "
                              f"or set ULSWEEP_CHROMIUM to run the headless-browser tests"),
]
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars"]
PLOTLY_BLUE = (99, 110, 250)  # first colour of plotly's qualitative palette: drawn traces, not page text
VIRIDIS_LOW = (68, 1, 84)  # the low end of Viridis: the lowest-bitrate line of base_size_flops_per_bitrate


def chromium(tmp_path, *args, timeout=180) -> str:
    """Run headless chromium in its own session; on timeout kill exactly that process group."""
    cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'chromium-profile'}", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise
    return out


def assert_not_blank(png_path, min_std=8.0):
    img = np.asarray(Image.open(png_path).convert("RGB"), dtype=np.float64)
    assert img.shape[0] > 100 and img.shape[1] > 100
    gray = img.mean(axis=2)
    assert gray.std() > min_std, f"{png_path} looks blank (pixel std {gray.std():.2f})"
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 50
    return img


def colour_pixels(img, rgb, tol=30):
    return int((np.abs(img - np.array(rgb)).max(axis=2) < tol).sum())


@pytest.fixture(scope="module")
def sweep_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser-store")
    return make_store(root, name="mini")


def test_dashboard_renders_offline_in_headless_chromium(sweep_store, tmp_path):
    run_dir, uri, sweep_id = sweep_store
    res = report.make_report(str(run_dir), out_dir=str(tmp_path / "dash"), png=False, log_artifacts=False)
    url = f"file://{res.index_html}"
    # a dead proxy: any attempt to fetch from the network fails, so what renders came from the file itself
    offline = ["--proxy-server=127.0.0.1:9", "--virtual-time-budget=10000"]
    shot = tmp_path / "dashboard.png"
    # one chromium run takes both the screenshot and the DOM (a chromium start costs seconds on 2 cores)
    dom = chromium(tmp_path, *offline, "--window-size=1400,2400", f"--screenshot={shot}", "--dump-dom", url)
    img = assert_not_blank(shot)
    assert colour_pixels(img, PLOTLY_BLUE) > 200, "no plotly traces drawn in the screenshot"
    assert dom.count('class="main-svg"') >= 8  # plotly.js ran: 4 figures (2 svg layers each)
    legend = set(re.findall(r'class="legendtext"[^>]*>([^<]+)<', dom))
    assert {"sigmoid bias -2 [s]", "sigmoid bias 2 [m]", "all trials [s]", "Pareto front [s]", "Pareto front [m]",
            "base s", "base m"} <= legend, legend
    assert "ulsweep sweep report: mini" in dom and sweep_id in dom and "ae-0003" in dom


def test_kaleido_png_export_with_chromium(sweep_store, tmp_path, monkeypatch):
    pytest.importorskip("kaleido", reason="kaleido not installed (pip install kaleido)")
    monkeypatch.setenv("BROWSER_PATH", CHROMIUM)
    run_dir, uri, sweep_id = sweep_store
    res = report.make_report(str(run_dir), out_dir=str(tmp_path / "dash"), png=True, log_artifacts=False)
    assert res.png_note is None, res.png_note
    assert sorted(os.path.basename(p) for p in res.pngs) == [  # the store's sweep has two base sizes
        "base_size_flops_per_bitrate.png", "base_size_optimum.png", "fig8_quality_vs_bitrate.png", "flops_vs_gen.png", "pareto_bpp_vs_gen.png", "pareto_rec_vs_gen.png"]
    for p in res.pngs:
        img = assert_not_blank(p)
        trace = VIRIDIS_LOW if os.path.basename(p) == "base_size_flops_per_bitrate.png" else PLOTLY_BLUE
        assert colour_pixels(img, trace) > 50, p


def _post(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.load(r)


def _answers(url) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=3) as r:
            return r.status == 200
    except OSError:
        return False


def test_ulsweep_ui_serves_mlflow_ui_on_localhost(sweep_store, tmp_path):
    """`ulsweep ui RUN_DIR --port 0` prints the URL; the REST API and the UI (headless chromium) show the
    sweep's runs; SIGTERM to `ulsweep ui` stops the server it started."""
    run_dir, uri, sweep_id = sweep_store
    log = open(tmp_path / "ui.log", "w")
    ui = subprocess.Popen([sys.executable, "-m", "ulsweep.cli", "ui", str(run_dir), "--port", "0",
                           "--timeout", "240"], stdout=subprocess.PIPE, stderr=log, text=True)
    url = None
    try:
        deadline = time.monotonic() + 300
        for line in ui.stdout:  # blocks until the server answered (or ui exits)
            m = re.match(r"MLflow UI: (http://127\.0\.0\.1:\d+)/#/experiments/(\w+)/runs$", line.strip())
            if m:
                url, eid = m.group(1), m.group(2)
                break
            assert time.monotonic() < deadline
        assert url, f"`ulsweep ui` printed no URL; log: {(tmp_path / 'ui.log').read_text()[-2000:]}"
        # REST API: every run of the sweep by name
        runs = _post(f"{url}/api/2.0/mlflow/runs/search", {"experiment_ids": [eid], "max_results": 100})["runs"]
        names = {r["info"]["run_name"] for r in runs}
        assert {"sweep-mini", "ae-0000", "ae-0001", "ae-0002", "ae-0003", "ae-0000-s", "ae-0001-m"} <= names
        trial = next(r["info"]["run_id"] for r in runs if r["info"]["run_name"] == "ae-0001")
        # the UI itself (a JS app): the runs table shows the sweep run (DOM and screenshot from one chromium
        # run), a trial's page shows its name
        shot = tmp_path / "mlflow.png"
        dom = chromium(tmp_path, "--virtual-time-budget=15000", "--window-size=1400,1000", "--dump-dom",
                       f"--screenshot={shot}", f"{url}/#/experiments/{eid}/runs")
        assert "sweep-mini" in dom
        assert_not_blank(shot)
        dom = chromium(tmp_path, "--virtual-time-budget=15000", "--window-size=1400,1000", "--dump-dom",
                       f"{url}/#/experiments/{eid}/runs/{trial}")
        assert "ae-0001" in dom
    finally:
        if ui.poll() is None:
            ui.send_signal(signal.SIGTERM)  # ulsweep ui stops its mlflow server (by its process group)
            try:
                ui.wait(60)
            except subprocess.TimeoutExpired:
                ui.kill()
                ui.wait()
        log.close()
    assert ui.returncode == 0, (tmp_path / "ui.log").read_text()[-2000:]
    if url:
        time.sleep(1)
        assert not _answers(url), "the MLflow server outlived `ulsweep ui`"
