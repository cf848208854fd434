"""A sweep whose run directory and data are s3:// URIs, against an S3-compatible server on 127.0.0.1 (moto's server).

Ray Tune and Ray Train write their state through pyarrow's S3 filesystem, ulsweep writes checkpoints, results and
sweep state through s3fs; both find the endpoint in AWS_ENDPOINT_URL. The dataset's shards lie in the bucket
too and stage 1 streams them through Ray Data (`data.loader: stream`). One sweep (a module-scoped fixture) is
checked by both tests: what it wrote to the bucket, then its resume from the bucket; that its stream read the
shards from S3 over two epochs, and that the same dataset without credentials fails at start naming it.
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
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from ray_cluster import free_port, kill_all, private_network, private_network_unavailable, with_descendants

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
N_TRAIN, BATCH, STEPS = 96, 16, 12  # 6 steps per epoch: a trial runs 2 epochs


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


def write_noise_data(uri: str) -> None:
    """A dataset `noise` of N_TRAIN random 16x16 train images (+16 test), in shards of 16 rows."""
    from ulsweep.data import write_dataset

    rng = np.random.default_rng(0)
    write_dataset(uri, "noise", {"train": (rng.integers(0, 256, (N_TRAIN, 1, 16, 16), dtype=np.uint8),
                                           np.zeros(N_TRAIN, np.int64)),
                                 "test": (rng.integers(0, 256, (16, 1, 16, 16), dtype=np.uint8), np.zeros(16, np.int64))},
                  shard_rows=16)


def s3_experiment() -> dict:
    """experiments/quickstart.yaml cut down to one AE trial and its base model, 12 steps each, on the noise
    dataset in the bucket, streamed. No Fréchet distance on noise: the objective is the base model's bits/pixel."""
    d = yaml.safe_load((REPO / "experiments" / "quickstart.yaml").read_text())
    small = {"steps": STEPS, "batch_size": BATCH, "log_every": 6, "eval_images": 16, "eval_t_per_image": 1,
             "sample_steps": 4}
    d.update(name="s3sweep", data={"path": "s3://ulsweep-test/noise", "image_size": 16, "loader": "stream", "hflip": True},
             search={**d["search"], "space": {"ae.loss.loss_factor": {"values": [2.0]}}, "metrics": ["base_bpp"]},
             resources={"num_workers": 0, "cpus_per_worker": 0.99, "gpus_per_worker": 0.0}, eval={"extractor": "none"})
    d["ae"]["train"] = dict(small)
    d["base_models"][0]["train"] = dict(small)
    return d


@pytest.fixture(scope="module")
def s3_sweep(tmp_path_factory):
    """The sweep's first run, in a private network namespace where possible, with the moto server and the S3
    variables (also in this process's environment) kept until the module's tests are done."""
    import boto3

    tmp_path = tmp_path_factory.mktemp("s3")
    exp_file = tmp_path / "s3sweep.yaml"
    exp_file.write_text(yaml.safe_dump(s3_experiment(), sort_keys=False))
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
            write_noise_data("s3://ulsweep-test/noise")
            cmd = [sys.executable, "-m", "ulsweep.cli", "run", str(exp_file), "--storage", "s3://ulsweep-test/runs"]
            t0 = time.time()
            p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
            print(f"s3 sweep: first run {time.time() - t0:.0f} s")
            yield SimpleNamespace(tmp_path=tmp_path, exp_file=exp_file, env=env, cmd=cmd, first=p,
                                  root="ulsweep-test/runs/s3sweep")
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def test_sweep_with_s3_storage_then_resume(s3_sweep):
    import fsspec

    tmp_path, cmd, env, root, p = s3_sweep.tmp_path, s3_sweep.cmd, s3_sweep.env, s3_sweep.root, s3_sweep.first
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]

    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    files = set(fs.find(root))
    for f in ("sweep.json", "summary.json", "trials/ae-0000/result.json",
              f"trials/ae-0000/checkpoints/step_{STEPS:08d}/state.pt",
              f"trials/ae-0000/checkpoints/step_{STEPS:08d}/meta.json", "trials/ae-0000-tiny/result.json"):
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
    ckpt = f"{root}/trials/ae-0000/checkpoints/step_{STEPS:08d}"
    manifests = [f for f in files if f.startswith(f"{ckpt}/latents/") and f.endswith("/latents.json")]
    assert len(manifests) == 1 and not any(f.endswith("/lock.json") for f in files), sorted(files)
    inputs = c.get_run(runs["ae-0000-tiny"].info.run_id).inputs.dataset_inputs
    lat = [i.dataset for i in inputs if i.dataset.name == "latents:noise:train"]
    assert lat and lat[0].source_type == "s3"
    assert json.loads(lat[0].source)["uri"] == "s3://" + manifests[0].rsplit("/", 1)[0]

    # resume reads everything back from the bucket; finished trials are not trained again
    mtime = fs.info(f"{root}/trials/ae-0000/result.json")["LastModified"]
    p = subprocess.run([*cmd, "--resume"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    fs.invalidate_cache()
    assert fs.info(f"{root}/trials/ae-0000/result.json")["LastModified"] == mtime
    assert json.loads(fs.cat_file(f"{root}/summary.json"))["counts"] == {"ae_done": 1, "base_done": 1}


def test_stream_sweep_reads_its_shards_from_s3(s3_sweep):
    """Stage 1 streamed the dataset's shards from the bucket across an epoch boundary; without credentials the
    same dataset fails at start with an error naming the file, data.path and its URI."""
    import fsspec

    from ulsweep.train.checkpoint import load_checkpoint

    tmp_path, p = s3_sweep.tmp_path, s3_sweep.first
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    res = json.loads(fs.cat_file(f"{s3_sweep.root}/trials/ae-0000/result.json"))
    assert load_checkpoint(res["checkpoint"])[0]["data"]["epoch"] == 1  # 12 steps = 2 epochs of 6

    env = dict(s3_sweep.env)
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(k)
    env["AWS_SHARED_CREDENTIALS_FILE"] = env["AWS_CONFIG_FILE"] = str(tmp_path / "none")
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    p = subprocess.run([sys.executable, "-m", "ulsweep.cli", "run", str(s3_sweep.exp_file), "--storage",
                        str(tmp_path / "runs")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    text = p.stdout + p.stderr
    assert p.returncode != 0 and "s3sweep.yaml: data.path: cannot open" in text, text
    assert "s3://ulsweep-test/noise" in text, text
    assert "credentials" in text.lower(), text
    assert not (tmp_path / "runs" / "s3sweep" / "trials").exists()  # failed before any trial
