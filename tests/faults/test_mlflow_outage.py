"""The MLflow tracking server (a real `mlflow server` on 127.0.0.1, sqlite backend) goes down mid-sweep
and comes back: training goes on, metric points are kept and sent after recovery, and MLflow ends up
holding every point. The same sweep runs with fake credentials in its environment and a password in its
tracking URI: none of them may reach MLflow (params, tags, metric keys, artifacts), the run directory,
or any log (the driver's output, the server's, Ray's session logs)."""
from __future__ import annotations

import time
from pathlib import Path

import pytest

from faultlib import LOG_EVERY, cli, fake_experiment, mlflow_state, sandbox, tail, write_yaml
from ulsweep.report.cli import free_port, start_mlflow_server, stop_server, wait_for_server

pytestmark = pytest.mark.slow

STEPS = 40
SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "aws-s3cr3t-wJalrXUtnFEMI",
    "AWS_ACCESS_KEY_ID": "AKIAFAKEKEYID0000042",
    "GOOGLE_APPLICATION_CREDENTIALS": "/nonexistent/gcp-s3cr3t-key.json",
    "HF_TOKEN": "hf_s3cr3tTokenValue123",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-s3cr3t-pw",
}
URI_PASSWORD = "uri-s3cr3t-pw"


@pytest.fixture(scope="module")
def outage(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("mlflow-outage")
    d = fake_experiment("mo", n_ae=1, steps=STEPS)
    f = write_yaml(tmp_path, d)
    port = free_port()
    backend = f"sqlite:///{tmp_path}/server.db"
    server_log = tmp_path / "server.log"
    driver_log = tmp_path / "driver.log"
    uri = f"http://ulsweep:{URI_PASSWORD}@127.0.0.1:{port}"
    window = {}
    artifacts = str(tmp_path / "artifacts")  # what the trials log through the server's artifact proxy
    server, _ = start_mlflow_server(backend, port, log_path=str(server_log), artifacts_destination=artifacts)
    proc = None
    try:
        assert wait_for_server(f"http://127.0.0.1:{port}", server, 120), tail(server_log)
        with sandbox(tmp_path, step_s=0.15) as (env, ray_tmp):
            env.update(SECRETS)
            env.update({"ULSWEEP_MLFLOW_FLUSH_S": "0.5", "MLFLOW_TRACKING_USERNAME": "ulsweep"})
            import subprocess

            with open(driver_log, "w") as out:
                proc = subprocess.Popen(cli(f, "--storage", tmp_path / "runs", "--tracking-uri", uri), cwd=tmp_path,
                                        env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            first = tmp_path / "runs" / "mo" / "trials" / "ae-0000" / "checkpoints" / "step_00000010.json"
            deadline = time.time() + 240
            while not first.exists():
                assert proc.poll() is None and time.time() < deadline, tail(driver_log)
                time.sleep(0.2)
            stop_server(server)  # down mid-trial
            window["down"] = time.time()
            # down for 2 s plus the restart (~6-10 s until /health answers on 2 cores); the trial logs a point
            # every 0.3 s, so points fall into the window (test_mlflow_down_mid_sweep_loses_no_metric_point
            # checks that they did)
            time.sleep(2)
            server, _ = start_mlflow_server(backend, port, log_path=str(server_log), artifacts_destination=artifacts)
            assert wait_for_server(f"http://127.0.0.1:{port}", server, 120), tail(server_log)
            window["up"] = time.time()
            assert proc.wait(timeout=300) == 0, tail(driver_log)
            ray_logs = "\n".join(p.read_text(errors="replace") for p in Path(ray_tmp).rglob("*")
                                 if p.is_file() and p.suffix in (".log", ".out", ".err", ".txt", ".json"))
        yield tmp_path, uri, window, ray_logs
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        stop_server(server)


def test_mlflow_down_mid_sweep_loses_no_metric_point(outage):
    tmp_path, uri, window, _ = outage
    run_dir = tmp_path / "runs" / "mo"
    c, by_key = mlflow_state(run_dir)
    assert sorted(by_key) == ["ae-0000", "ae-0000-tiny", "sweep"]
    assert all(len(rs) == 1 and rs[0].info.status == "FINISHED" for rs in by_key.values())
    hist = c.get_metric_history(by_key["ae-0000"][0].info.run_id, "loss")
    assert sorted(m.step for m in hist) == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY))
    during = [m.step for m in hist if window["down"] * 1000 < m.timestamp < window["up"] * 1000]
    assert during, "no point was logged while the server was down: the outage missed the training"
    for key in ("ae-0000", "ae-0000-tiny"):
        run = by_key[key][0]
        assert sorted(m.step for m in c.get_metric_history(run.info.run_id, "loss")) == \
            list(range(LOG_EVERY, STEPS + 1, LOG_EVERY)), key
    assert "bpp" in by_key["ae-0000"][0].data.metrics and "gfd_fake" in by_key["ae-0000-tiny"][0].data.metrics
    assert not list(run_dir.glob("trials/*/mlflow-spool/*.jsonl"))  # spooled points were all sent


def _texts_under(root: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in root.rglob("*")
                     if p.is_file() and p.suffix not in (".db", ".pkl", ".pt", ".parquet", ".png"))


def test_no_credential_reaches_mlflow_the_run_dir_or_a_log(outage):
    tmp_path, uri, _, ray_logs = outage
    run_dir = tmp_path / "runs" / "mo"
    c, by_key = mlflow_state(run_dir)
    blobs = []
    for rs in by_key.values():
        r = rs[0]
        blobs += [f"{k}={v}" for k, v in {**r.data.params, **r.data.tags}.items()] + list(r.data.metrics)
    artifacts = tmp_path / "artifacts"  # the server's artifact store (trials log through its proxy)
    blobs.append(_texts_under(artifacts))
    assert len(blobs) > 20 and any(artifacts.rglob("config.yaml")), "no artifact reached the server's store"
    places = {"mlflow": "\n".join(blobs), "run dir": _texts_under(run_dir),
              "driver log": (tmp_path / "driver.log").read_text(), "server log": (tmp_path / "server.log").read_text(),
              "ray logs": ray_logs}
    assert len(ray_logs) > 1000, "no Ray session logs found to check"
    # the password left the URI for MLFLOW_TRACKING_PASSWORD before Ray started: the URI is shown without it
    assert uri.replace(f"ulsweep:{URI_PASSWORD}@", "") in places["driver log"]
    for secret in [*SECRETS.values(), URI_PASSWORD]:
        for where, text in places.items():
            assert secret not in text, f"{secret!r} leaked into {where}"
