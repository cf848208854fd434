"""A sweep whose run directory is an s3:// URI, against an S3-compatible server on 127.0.0.1 (moto's server).

Ray Tune and Ray Train write their state through pyarrow's S3 filesystem, ulsweep writes checkpoints, results and
sweep state through s3fs; both find the endpoint in AWS_ENDPOINT_URL. The sweep then resumes from the bucket.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from ray_cluster import free_port, kill_all, private_network, private_network_unavailable, with_descendants

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@contextlib.contextmanager
def s3_server(log: Path):
    """moto's S3-compatible server on 127.0.0.1:<port>; yields its endpoint URL."""
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):
            assert proc.poll() is None, log.read_text()[-2000:]
            try:
                urllib.request.urlopen(url, timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        yield url
    finally:
        pids = with_descendants([proc.pid])
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        assert not kill_all(pids, grace_s=5), "moto server survived"


def test_sweep_with_s3_storage_then_resume(tmp_path):
    import boto3
    import fsspec

    d = yaml.safe_load((REPO / "experiments" / "quickstart.yaml").read_text())
    small = {"steps": 10, "batch_size": 16, "log_every": 5, "eval_images": 32, "eval_t_per_image": 1,
             "sample_steps": 4}
    d.update(name="s3sweep", search={**d["search"], "space": {"ae.loss.loss_factor": {"values": [2.0]}}},
             resources={"num_workers": 0, "cpus_per_worker": 0.99, "gpus_per_worker": 0.0})
    d["ae"]["train"] = dict(small)
    d["base_models"][0]["train"] = dict(small)
    exp_file = tmp_path / "s3sweep.yaml"
    exp_file.write_text(yaml.safe_dump(d, sort_keys=False))

    net = private_network() if private_network_unavailable() is None else contextlib.nullcontext()
    with net, s3_server(tmp_path / "moto.log") as endpoint:
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
        env.update({"RAY_AUTH_MODE": "disabled", "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"})
        old = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                               "AWS_DEFAULT_REGION")}
        os.environ.update({k: env[k] for k in old})
        try:
            boto3.client("s3").create_bucket(Bucket="ulsweep-test")
            cmd = [sys.executable, "-m", "ulsweep.cli", "run", str(exp_file), "--storage", "s3://ulsweep-test/runs"]
            t0 = time.time()
            p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            first_s = time.time() - t0
            assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]

            fs = fsspec.filesystem("s3", skip_instance_cache=True)
            root = "ulsweep-test/runs/s3sweep"
            files = set(fs.find(root))
            for f in ("sweep.json", "summary.json", "trials/ae-0000/result.json",
                      "trials/ae-0000/checkpoints/step_00000010/state.pt",
                      "trials/ae-0000/checkpoints/step_00000010/meta.json", "trials/ae-0000-tiny/result.json"):
                assert f"{root}/{f}" in files, (f, sorted(files)[:40])
            assert any(f.startswith(f"{root}/tune/") for f in files)  # Tune's state went to the bucket too
            summary = json.loads(fs.cat_file(f"{root}/summary.json"))
            assert summary["counts"] == {"ae_done": 1, "base_done": 1}
            assert not (tmp_path / "runs" / "s3sweep" / "trials").exists()  # nothing trained into a local dir

            # MLflow (default for a URI run dir: ./runs/<name>/mlflow.db) points at the checkpoint in the bucket
            from ulsweep import tracking

            state = json.loads(fs.cat_file(f"{root}/sweep.json"))
            c = tracking.client(state["tracking_uri"])
            runs = {r.data.tags[tracking.TAG_KEY]: r for r in
                    tracking.sweep_runs(c, state["mlflow_experiment_id"], state["sweep_id"])}
            assert runs["ae-0000"].data.tags[tracking.TAG_CHECKPOINT].startswith("s3://ulsweep-test/runs/s3sweep/")
            assert runs["ae-0000-tiny"].data.tags[tracking.TAG_PARENT] == runs["ae-0000"].info.run_id
            # the base trial's latents were encoded into the bucket, next to the AE checkpoint, and listed in MLflow
            ckpt = f"{root}/trials/ae-0000/checkpoints/step_00000010"
            manifests = [f for f in files if f.startswith(f"{ckpt}/latents/") and f.endswith("/latents.json")]
            assert len(manifests) == 1 and not any(f.endswith("/lock.json") for f in files), sorted(files)
            inputs = c.get_run(runs["ae-0000-tiny"].info.run_id).inputs.dataset_inputs
            lat = [i.dataset for i in inputs if i.dataset.name == "latents:digits:train"]
            assert lat and lat[0].source_type == "s3"
            assert json.loads(lat[0].source)["uri"] == "s3://" + manifests[0].rsplit("/", 1)[0]

            # resume reads everything back from the bucket; finished trials are not trained again
            mtime = fs.info(f"{root}/trials/ae-0000/result.json")["LastModified"]
            p = subprocess.run([*cmd, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=600)
            assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
            fs.invalidate_cache()
            assert fs.info(f"{root}/trials/ae-0000/result.json")["LastModified"] == mtime
            assert json.loads(fs.cat_file(f"{root}/summary.json"))["counts"] == {"ae_done": 1, "base_done": 1}
            print(f"s3 sweep: first run {first_s:.0f} s")
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
