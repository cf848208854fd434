"""`ulsweep report SWEEP` and `ulsweep ui SWEEP`; wired into ulsweep/cli.py through `register(subparsers)`.

SWEEP is a sweep's run directory (holding sweep.json), its name (./runs/<name>, else looked up in the
tracking store given by --tracking-uri / MLFLOW_TRACKING_URI) or the MLflow run id of the sweep or any of
its trials.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

from ulsweep.tracking.redact import redact_uri

_SWEEP_HELP = ("the sweep: its run directory (runs/<name>, holding sweep.json), its name, or the MLflow run id "
               "of the sweep or of one of its trials")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="HTML dashboard + CSV of a sweep (Fig. 8, Pareto fronts, FLOPs vs gFD, tables, "
                       "optimal bitrate per base size)",
        description="Read a sweep's runs from MLflow and write a self-contained HTML dashboard (opens offline), "
                    "CSVs and trends.md (Spearman rank correlations, gFD curves, seed repeats, repeated configurations "
                    "compared by Welch's t-test; with several "
                    "base-model sizes the optimal bitrate of each and a verdict per claim of the paper) under "
                    "dashboards/<sweep>/; PNGs of the figures when kaleido and Chrome/Chromium "
                    "are installed; the folder is also logged as artifacts of the sweep's MLflow run.")
    p.add_argument("sweep", help=_SWEEP_HELP)
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: the one in the run directory's sweep.json, else "
                        "$MLFLOW_TRACKING_URI)")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: ./dashboards/<sweep name>)")
    p.add_argument("--no-png", action="store_true", help="skip the PNG export")
    p.add_argument("--no-log", action="store_true", help="do not log the dashboard to the sweep's MLflow run")
    p.set_defaults(func=handle_report)

    u = subparsers.add_parser(
        "ui", help="start the MLflow UI on a sweep's tracking store (127.0.0.1) and print its URL",
        description="Start `mlflow server` on the sweep's tracking store, bound to 127.0.0.1, print the URL of "
                    "the sweep's run, and serve until Ctrl-C.")
    u.add_argument("sweep", help=_SWEEP_HELP)
    u.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: from sweep.json)")
    u.add_argument("--port", type=int, default=5000, help="port (default 5000; 0: any free port)")
    u.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the server to answer")
    u.set_defaults(func=handle_ui)


def handle_report(args: argparse.Namespace) -> int:
    from ulsweep.report.dashboard import ReportError, make_report

    try:
        res = make_report(args.sweep, tracking_uri=args.tracking_uri, out_dir=args.out, png=not args.no_png,
                          log_artifacts=not args.no_log)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    d = res.data
    print(f"sweep {d.ref.name} (run {d.ref.sweep_id}): {len(d.ae)} autoencoder trial(s), "
          f"{len(d.base)} base-model trial(s), {len(d.failed)} failed or incomplete")
    for f in d.failed:
        print(f"  failed: {f['key']} ({f['kind']}): {f['reason']}")
    print(f"csv:       {', '.join(res.csv)}")
    trends = os.path.join(res.out_dir, "trends.md")
    if os.path.exists(trends):
        print(f"trends:    {trends} (rank correlations of bits/pixel, PSNR, reconstruction and "
              "generation metrics, FID against domain FD where both are logged; seed repeats and, with several "
              "repeated configurations, their comparison"
              + ("; optimal bitrate per base size, verdicts per claim)"
                 if os.path.exists(os.path.join(res.out_dir, "base_size.json")) else ")"))
    if res.pngs:
        print(f"png:       {len(res.pngs)} figure(s) in {os.path.dirname(res.pngs[0])}")
    elif res.png_note:
        print(res.png_note)
    if res.logged_to_run:
        print(f"mlflow:    logged as artifacts 'dashboard/' of run {res.logged_to_run}")
    print(f"dashboard: {res.index_html}")
    return 0


# ----------------------------------------------------------------------------------------------
# ui


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def start_mlflow_server(tracking_uri: str, port: int = 0, host: str = "127.0.0.1",
                        log_path: str | None = None,
                        artifacts_destination: str | None = None) -> tuple[subprocess.Popen, str]:
    """Start `mlflow server` on `tracking_uri` bound to host:port (0: a free port) in its own process group.
    Artifacts that clients send through it go to `artifacts_destination` (MLflow's default: ./mlartifacts of
    the working directory). Returns (process, base URL). Stop it with `stop_server(proc)`."""
    port = port or free_port(host)
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri, "--host", host,
           "--port", str(port), "--workers", "1"]
    if artifacts_destination:
        cmd += ["--artifacts-destination", artifacts_destination]
    env = dict(os.environ)
    if tracking_uri.startswith("file:"):
        env.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    # MLflow 3 starts a job runner (a huey consumer and a runner process) beside the server for GenAI jobs,
    # which a sweep's store never holds: off unless the environment asks for it, the server answers /health
    # 2-3x sooner (~25 s -> ~9 s on 2 cores)
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    out = open(log_path, "ab") if log_path else None  # None: the server logs to our stderr, like `mlflow ui`
    proc = subprocess.Popen(cmd, env=env, stdout=out or sys.stderr, stderr=subprocess.STDOUT,
                            start_new_session=True)
    if out is not None:
        out.close()  # the child holds its own descriptor
    return proc, f"http://{host}:{port}"


def wait_for_server(url: str, proc: subprocess.Popen | None = None, timeout: float = 120.0) -> bool:
    """Poll <url>/health until it answers 200 (True), the process exits or the timeout passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=3) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def stop_server(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    """Stop a server started by start_mlflow_server: SIGTERM to its own process group, then SIGKILL."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)  # the group is the server's own (start_new_session=True)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(5)


def handle_ui(args: argparse.Namespace) -> int:
    from ulsweep.report.dashboard import ReportError, resolve_sweep

    try:
        ref = resolve_sweep(args.sweep, args.tracking_uri)
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if ref.tracking_uri.startswith(("http://", "https://")):  # a tracking server already serves the UI
        base = redact_uri(ref.tracking_uri).rstrip("/")
        print(f"MLflow UI (tracking server): {base}/#/experiments/{ref.experiment_id}/runs/{ref.sweep_id}",
              flush=True)
        return 0
    port = args.port
    if port:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                print(f"error: port {port} on 127.0.0.1 is in use; pass --port N (or --port 0 for any free one)",
                      file=sys.stderr)
                return 2
    def _term(signum, frame):  # `kill` of ulsweep ui stops its server too
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, _term)
    proc, url = start_mlflow_server(ref.tracking_uri, port)
    print(f"starting the MLflow UI on {redact_uri(ref.tracking_uri)} ...", flush=True)
    try:
        if not wait_for_server(url, proc, args.timeout):
            print(f"error: the MLflow server did not answer at {url} within {args.timeout:.0f} s "
                  f"(exit code {proc.poll()})", file=sys.stderr)
            return 1
        print(f"MLflow UI: {url}/#/experiments/{ref.experiment_id}/runs\n"
              f"  sweep run {ref.name}: {url}/#/experiments/{ref.experiment_id}/runs/{ref.sweep_id}\n"
              f"  (bound to 127.0.0.1; Ctrl-C stops it)", flush=True)
        return proc.wait() or 0
    except KeyboardInterrupt:
        return 0
    finally:
        stop_server(proc)
        signal.signal(signal.SIGTERM, old)
