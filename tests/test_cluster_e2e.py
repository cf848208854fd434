"""The cluster setup end to end on one machine, with real components that this test starts and stops:

    PostgreSQL (Debian's binaries; initdb + pg_ctl in a temp dir, as `nobody` when the test runs as root)
    `mlflow server` through cluster/mlflow/serve.sh: that PostgreSQL as backend, artifacts proxied to a directory
    a two-node Ray cluster (`ray start --head` + `ray start --address`)
    `ulsweep run` of a tiny sweep with --address and --tracking-uri http://..., as a user would run it

then reads the runs, their lineage and artifacts back through the server's REST API. Fake credentials sit in
the environment of every process and in the tracking URI; none may show up in MLflow, in the run directory, in
the artifacts or in any log. Everything runs in a private network namespace whose only interface is loopback
(Ray's servers bind every interface), and every listening socket is checked to be on 127.0.0.1.

The same sweep (one module-scoped fixture) also checks `ulsweep run --address` itself: the full three-level
lineage in MLflow and trials on both nodes (test_two_node_cluster_with_address; where PostgreSQL or a private
network is missing it runs on its own, tracking to the run directory's sqlite store).
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from ray_cluster import (LocalRayCluster, free_port, interfaces, kill_all, private_network,
                         private_network_unavailable, with_descendants)

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
# `ulsweep run` of tiny_sweep takes ~40 s on 2 cores (4 trials, two at a time, Ray and MLflow start-up
# included); the budget leaves room for a machine ten times slower (other work on its cores) and keeps the
# suite's worst case bounded
SWEEP_BUDGET_S = 400


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


# ----------------------------------------------------------------------------------------------
# components


class Postgres:
    """A throwaway PostgreSQL cluster on 127.0.0.1:<port>, password-protected. PostgreSQL refuses to run as root,
    so as root the server runs as `nobody` (runuser) in a temp dir that `nobody` owns."""

    user, database = "ulsweep", "postgres"

    def __init__(self, bin_dir: Path):
        self.bin = bin_dir
        self.port = free_port()
        self.password = "pg-" + secrets.token_hex(8)
        self.dir = Path(tempfile.mkdtemp(prefix="ulsw-pg-"))
        self.data = self.dir / "data"
        self.as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []

    def _run(self, *cmd: str) -> None:
        p = subprocess.run([*self.as_user, *cmd], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, f"{cmd[0]} failed: {p.stdout[-2000:]}{p.stderr[-2000:]}"

    def start(self) -> None:
        pwfile = self.dir / "pw"
        pwfile.write_text(self.password + "\n")
        if self.as_user:
            shutil.chown(self.dir, "nobody")
            shutil.chown(pwfile, "nobody")
        os.chmod(self.dir, 0o700)
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user, f"--pwfile={pwfile}",
                  "--auth=scram-sha-256", "-E", "UTF8", "--no-sync")
        pwfile.unlink()
        opts = (f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.dir} "
                f"-c fsync=off")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.dir / "server.log"), "-w",
                  "-t", "60", "-o", opts, "start")

    def pid(self) -> int | None:
        try:
            return int((self.data / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> None:
        pid = self.pid()
        if pid is not None:
            subprocess.run([*self.as_user, str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate",
                            "-w", "stop"], capture_output=True, timeout=60)
            left = kill_all(with_descendants([pid]), grace_s=3)
            assert not left, f"PostgreSQL processes survived: {left}"
        shutil.rmtree(self.dir, ignore_errors=True)


class MlflowServer:
    """cluster/mlflow/serve.sh on 127.0.0.1:<port>, in its own process group."""

    def __init__(self, pg: Postgres, artifacts: Path, log: Path, env: dict):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self.env = {**env, "PGPASSWORD": pg.password,
                    "ULSWEEP_MLFLOW_DB": f"postgresql://{pg.user}@127.0.0.1:{pg.port}/{pg.database}",
                    "ULSWEEP_MLFLOW_ARTIFACTS": str(artifacts), "ULSWEEP_MLFLOW_HOST": "127.0.0.1",
                    "ULSWEEP_MLFLOW_PORT": str(self.port), "ULSWEEP_MLFLOW_WORKERS": "1",
                    "ULSWEEP_MLFLOW_BIN": str(Path(sys.executable).parent / "mlflow")}
        self.proc = None

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(["bash", str(REPO / "cluster" / "mlflow" / "serve.sh")], env=self.env,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float = 150) -> None:
        t0 = time.time()
        while time.time() - t0 < timeout:
            assert self.proc.poll() is None, f"mlflow server exited: {self.log_path.read_text()[-3000:]}"
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"mlflow server not ready in {timeout} s: {self.log_path.read_text()[-3000:]}")

    def pids(self) -> set[int]:
        return with_descendants([self.proc.pid]) if self.proc else set()

    def stop(self) -> None:
        if self.proc is None:
            return
        pids = self.pids()
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        left = kill_all(pids, grace_s=3)
        assert not left, f"mlflow server processes survived: {left}"

    def api(self, path: str, body: dict | None = None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(f"{self.url}{path}", data=data, method="POST" if data else "GET",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read() or b"{}")

    def download(self, path: str) -> bytes:
        with urllib.request.urlopen(f"{self.url}/api/2.0/mlflow-artifacts/artifacts/{path}", timeout=30) as r:
            return r.read()


# ----------------------------------------------------------------------------------------------
# checks


_LOOPBACK = ("127.0.0.1", "[::ffff:127.0.0.1]", "::ffff:127.0.0.1")


def listening_sockets() -> list[tuple[str, str, set[int]]]:
    """(local address, port, pids) of every listening TCP/UDP socket in this network namespace."""
    out = subprocess.run(["ss", "-Hltunp"], capture_output=True, text=True, timeout=30, check=True).stdout
    socks = []
    for line in out.splitlines():
        cols = line.split()
        if len(cols) < 6:
            continue
        local = cols[4]
        addr, _, port = local.rpartition(":")
        socks.append((addr.split("%")[0], port, {int(x) for x in re.findall(r"pid=(\d+)", line)}))
    return socks


def tiny_sweep(name: str) -> dict:
    """experiments/quickstart.yaml cut down to what the cluster path needs: 2 AE trials (one per Ray node),
    each with its base model, 6 steps, a curve of 3 points. No Fréchet distance (its extractor is trained
    on first use and the local sweep tests cover it): the objective is the base model's bits/pixel."""
    d = yaml.safe_load((REPO / "experiments" / "quickstart.yaml").read_text())
    d["name"] = name
    small = {"steps": 6, "batch_size": 8, "log_every": 2, "eval_images": 16, "eval_t_per_image": 1,
             "sample_steps": 2}
    d["ae"]["train"] = dict(small)
    d["ae"]["optim"]["warmup_steps"] = 2
    for b in d["base_models"]:
        b["train"] = dict(small)
        b["optim"]["warmup_steps"] = 2
    d["eval"] = {"extractor": "none"}
    d["search"]["space"] = {"ae.loss.loss_factor": {"values": [1.5, 4.0]}}
    d["search"]["metrics"] = ["base_bpp"]
    d["search"]["max_concurrent"] = 2
    d["resources"] = {"num_workers": 0, "cpus_per_worker": 0.99, "gpus_per_worker": 0.0}
    d["tracking"] = {"system_metrics_s": 1}  # system metrics through the tracking server (check_lineage)
    return d


def stop_all(*stops) -> list[str]:
    """Run the stop functions side by side (each waits for its processes' grace periods); their failures."""
    failures: list[str] = []

    def run(stop):
        try:
            stop()
        except AssertionError as e:
            failures.append(str(e))

    threads = [threading.Thread(target=run, args=(stop,)) for stop in stops]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return failures


def _text_files(*roots: Path) -> list[Path]:
    return [p for r in roots if r.exists() for p in ([r] if r.is_file() else r.rglob("*")) if p.is_file()]


# ----------------------------------------------------------------------------------------------
# the sweep, shared by the tests below

SKIP_FULL = [(_pg_bin() is None, "PostgreSQL server binaries absent (Debian package `postgresql`): "
                                 "no /usr/lib/postgresql/*/bin/initdb"),
             (private_network_unavailable() is not None,
              f"{private_network_unavailable()}: Ray's servers bind every interface, so this test only runs where "
              f"it can keep them on a loopback-only network")]
FULL = not any(cond for cond, _ in SKIP_FULL)
AE_KEYS = ["ae-0000", "ae-0001"]


@pytest.fixture(scope="module")
def cluster_sweep(tmp_path_factory):
    """One `ulsweep run --address` of tiny_sweep on a two-node Ray cluster, shared by this module's tests;
    everything it started is stopped at the end of the module (the tests run while it all still runs, inside
    the private network namespace). Where PostgreSQL and a private network are at hand (CI) the sweep tracks
    to an `mlflow server` on PostgreSQL, with fake credentials in every environment and in the URI; elsewhere
    it tracks to its run directory's sqlite store (only the lineage test runs then)."""
    tmp_path = tmp_path_factory.mktemp("cluster-e2e")
    t0 = time.time()
    token = secrets.token_hex(6)
    fake = {"AWS_ACCESS_KEY_ID": f"AKIAULSWEEPE2E{token.upper()}",
            "AWS_SECRET_ACCESS_KEY": f"ulsweep-e2e-aws-secret-{token}",
            "MLFLOW_TRACKING_USERNAME": "ulsweep-e2e",
            "MLFLOW_TRACKING_PASSWORD": f"ulsweep-e2e-mlflow-password-{token}"}
    uri_password = f"ulsweep-e2e-uri-password-{token}"
    # serve.sh as deployed: with MLflow's job runner (tests/conftest.py turns it off for the other servers)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION")}
    env.update({"RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1", **fake})
    # the Ray nodes hold the credentials too, as a cluster's nodes would (instance profile / k8s Secret env)
    sweep = SimpleNamespace(full=FULL, tmp_path=tmp_path, runs=tmp_path / "runs", artifacts=tmp_path / "mlflow-artifacts",
                            needles=[fake["AWS_ACCESS_KEY_ID"], fake["AWS_SECRET_ACCESS_KEY"],
                                     fake["MLFLOW_TRACKING_PASSWORD"], uri_password],
                            out_path=tmp_path / "ulsweep.out", err_path=tmp_path / "ulsweep.err", timings={})
    sweep.run_dir = sweep.runs / "e2e_cluster"
    exp_file = tmp_path / "e2e_cluster.yaml"
    exp_file.write_text(yaml.safe_dump(tiny_sweep("e2e_cluster"), sort_keys=False))

    # Ray's GCS and raylets bind every interface: where possible keep them in a loopback-only namespace
    net = private_network() if private_network_unavailable() is None else contextlib.nullcontext()
    with net as netns:
        sweep.netns = netns
        pg = Postgres(_pg_bin()) if FULL else None
        server = MlflowServer(pg, sweep.artifacts, tmp_path / "mlflow-server.log", env) if FULL else None
        cluster = LocalRayCluster(env, nodes=2, cpus_per_node=1, node_ip="127.0.0.1")
        sweep.pg, sweep.server, sweep.cluster = pg, server, cluster
        driver = None
        try:
            if FULL:
                assert interfaces() == ["lo"], interfaces()
                pg.start()
                server.start()  # its start-up (migrations, ~10-20 s) overlaps Ray's
            sweep.address = cluster.start()
            if FULL:
                server.wait_ready()
            sweep.timings["setup_s"] = time.time() - t0

            tracking_args = []
            if FULL:
                tracking_args = ["--tracking-uri", f"http://ulsweep-e2e:{uri_password}@127.0.0.1:{server.port}"]
            t1 = time.time()
            with open(sweep.out_path, "w") as out, open(sweep.err_path, "w") as err:
                driver = subprocess.Popen([sys.executable, "-m", "ulsweep.cli", "run", str(exp_file),
                                           "--address", sweep.address, *tracking_args, "--storage", str(sweep.runs)],
                                          cwd=tmp_path, env=env, stdout=out, stderr=err, start_new_session=True)
                sockets_seen, ours = [], set()
                while driver.poll() is None and time.time() - t1 < SWEEP_BUDGET_S:
                    if FULL:
                        ours |= cluster.pids() | server.pids() | with_descendants([driver.pid]) | {pg.pid()}
                        sockets_seen += listening_sockets()
                    time.sleep(2)
                if driver.poll() is None:
                    raise AssertionError(f"ulsweep run did not finish in {SWEEP_BUDGET_S} s (load average "
                                         f"{os.getloadavg()}); its output so far:\n"
                                         f"{sweep.out_path.read_text()[-3000:]}")
            sweep.timings["sweep_s"] = time.time() - t1
            sweep.sockets_seen, sweep.ours, sweep.returncode = sockets_seen, ours, driver.returncode
            sweep.stdout, sweep.stderr = sweep.out_path.read_text(), sweep.err_path.read_text()
            yield sweep
        finally:
            t3 = time.time()
            failures = []
            if driver is not None and driver.poll() is None:
                failures += [f"driver {p}" for p in kill_all(with_descendants([driver.pid]))]
            failures += stop_all(*[x.stop for x in (cluster, server, pg) if x is not None])
            sweep.timings["teardown_s"] = time.time() - t3
            assert not failures, failures
    sweep.timings["total_s"] = time.time() - t0
    print("cluster e2e timings:", {k: round(v, 1) for k, v in sweep.timings.items()})


# ----------------------------------------------------------------------------------------------
# the tests


def test_two_node_cluster_with_address(cluster_sweep):
    """`ulsweep run --address` of a cluster started beforehand: lineage complete, trials on both nodes."""
    from test_sweep import check_lineage

    assert cluster_sweep.returncode == 0, cluster_sweep.stdout[-4000:] + cluster_sweep.stderr[-4000:]
    by_key = check_lineage(cluster_sweep.run_dir, AE_KEYS, ["tiny"], latents=True, base_metric="base_bpp")
    nodes = {r.data.tags.get("ray.node_id") for k, r in by_key.items() if k != "sweep"}
    assert len(nodes) == 2, f"the trials did not use both Ray nodes: {nodes}"


@pytest.mark.skipif(SKIP_FULL[0][0], reason=SKIP_FULL[0][1])
@pytest.mark.skipif(SKIP_FULL[1][0], reason=SKIP_FULL[1][1])
def test_sweep_on_two_node_ray_with_postgres_mlflow_server(cluster_sweep):
    sweep = cluster_sweep
    server, pg, cluster, runs, artifacts = sweep.server, sweep.pg, sweep.cluster, sweep.runs, sweep.artifacts
    stdout = sweep.stdout
    assert sweep.returncode == 0, stdout[-4000:] + sweep.stderr[-4000:]

    # -- nothing listened beyond loopback, and every process of ours stayed in the private namespace
    sockets_seen = sweep.sockets_seen
    assert sockets_seen, "no listening socket observed while the sweep ran"
    ports = {port for _, port, _ in sockets_seen}
    assert str(server.port) in ports and str(pg.port) in ports and sweep.address.rsplit(":", 1)[1] in ports
    wide = [(a, p, sorted(pids)) for a, p, pids in sockets_seen if a not in _LOOPBACK]
    assert not wide, f"sockets listening beyond 127.0.0.1: {wide}"
    ours = sweep.ours - {None}
    outside = [p for p in ours if Path(f"/proc/{p}").exists() and
               os.stat(f"/proc/{p}/ns/net").st_ino != sweep.netns]
    assert not outside, f"processes of the test outside its private network: {outside}"

    # -- read everything back through the tracking server's REST API
    t2 = time.time()
    eid = server.api("/api/2.0/mlflow/experiments/get-by-name?experiment_name=e2e_cluster")["experiment"]
    assert eid["artifact_location"].startswith("mlflow-artifacts:"), eid  # the server's proxied store
    found = server.api("/api/2.0/mlflow/runs/search", {"experiment_ids": [eid["experiment_id"]],
                                                       "max_results": 100}).get("runs", [])
    by_key = {}
    for r in found:
        tags = {t["key"]: t["value"] for t in r["data"].get("tags", [])}
        by_key[tags["ulsweep.key"]] = (r, tags)
    assert sorted(by_key) == ["ae-0000", "ae-0000-tiny", "ae-0001", "ae-0001-tiny", "sweep"]
    sweep_id = by_key["sweep"][0]["info"]["run_id"]
    for key, (r, tags) in by_key.items():
        assert r["info"]["status"] == "FINISHED", (key, r["info"]["status"])
        metrics = {m["key"] for m in r["data"].get("metrics", [])}
        if key.startswith("ae-") and not key.endswith("-tiny"):
            assert tags["mlflow.parentRunId"] == sweep_id
            assert {"bpp", "psnr", "loss"} <= metrics, metrics
            assert any(m.startswith("objective/") for m in metrics)
        elif key.endswith("-tiny"):
            assert tags["mlflow.parentRunId"] == by_key[key[:-len("-tiny")]][0]["info"]["run_id"]
            assert "base_bpp" in metrics, metrics
    nodes = {tags.get("ray.node_id") for k, (r, tags) in by_key.items() if k != "sweep"}
    assert len(nodes - {None}) == 2, f"the trials did not use both Ray nodes: {nodes}"
    history = server.api(f"/api/2.0/mlflow/metrics/get-history?run_id="
                         f"{by_key['ae-0000'][0]['info']['run_id']}&metric_key=loss")["metrics"]
    assert len(history) >= 2  # a curve reached the server, not just a final value

    artifact_texts = []
    for key, (r, _) in by_key.items():
        listed = server.api(f"/api/2.0/mlflow/artifacts/list?run_id={r['info']['run_id']}")
        files = {f["path"] for f in listed.get("files", [])}
        expected = "experiment.yaml" if key == "sweep" else "config.yaml"
        assert expected in files, (key, files)
        root = r["info"]["artifact_uri"]
        assert root.startswith("mlflow-artifacts:/"), root
        text = server.download(f"{root[len('mlflow-artifacts:/'):].lstrip('/')}/{expected}").decode()
        assert "loss_factor" in text
        artifact_texts.append(text)
    # the proxied uploads landed in the server's artifact store, not in the run directory
    assert list(artifacts.rglob("config.yaml")) and not list(runs.rglob("mlartifacts"))
    sweep.timings["readback_s"] = time.time() - t2

    # -- no credential anywhere
    # the URI was printed, its credentials moved out of it (into MLflow's variables)
    assert f"mlflow   http://127.0.0.1:{server.port}" in stdout, stdout[-2000:]
    mlflow_strings = [json.dumps(r) for r, _ in by_key.values()]  # params, tags, metric names, run info
    logs = _text_files(*cluster.session_logs(), runs, artifacts, server.log_path, sweep.out_path, sweep.err_path)
    assert len(cluster.session_logs()) > 5 and any("raylet" in p.name for p in cluster.session_logs())
    needles = sweep.needles
    leaks = [f"{n[:16]}... in MLflow run data" for n in needles for s in mlflow_strings if n in s]
    leaks += [f"{n[:16]}... in an artifact" for n in needles for t in artifact_texts if n in t]
    leaks += [f"{n[:16]}... in {p}" for p in logs for n in needles if n.encode() in p.read_bytes()]
    assert not leaks, leaks
