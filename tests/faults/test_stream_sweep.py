"""`ulsweep run` of a tiny sweep whose stage-1 batches stream through Ray Data (`data.loader: stream`):

- on local disk, in a Ray Train worker actor that is SIGKILLed mid-trial (step 8, after the step-4
  checkpoint): Ray Train restarts the worker group, the loop and the stream resume at step 4 (epoch 0, step 4
  of 6), the curve has one point per logged step and the trial ends at epoch 1, step 6 of its data;
- on the moto S3 server (tests/test_s3_storage.py), data and run directory in the bucket; the same dataset
  without credentials fails at start with an error naming the file, data.path and its URI.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from faultlib import mlflow_state, run_driver, sandbox, tail

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_s3_storage import s3_server  # noqa: E402

pytestmark = pytest.mark.slow
N_TRAIN, BATCH, STEPS = 96, 16, 12  # 6 steps per epoch: the trial runs 2 epochs


def experiment(name: str, data: str) -> dict:
    train = {"steps": STEPS, "batch_size": BATCH, "log_every": 2, "ckpt_every": 4, "eval_images": 16,
             "eval_t_per_image": 1, "sample_steps": 2}
    return {"name": name, "data": {"path": data, "image_size": 16, "loader": "stream", "hflip": True},
            "ae": {"model": {"preset": "tiny", "downsample": 4, "latent_channels": 2}, "train": train},
            "base_models": [], "eval": {"extractor": "none"},
            "search": {"metrics": ["bpp"], "modes": ["min"], "max_concurrent": 1},
            "resources": {"num_workers": 1, "cpus_per_worker": 0.5, "max_worker_failures": 2}}


def write_data(uri: str) -> None:
    from ulsweep.data import write_dataset

    rng = np.random.default_rng(0)
    write_dataset(uri, "noise", {"train": (rng.integers(0, 256, (N_TRAIN, 1, 16, 16), dtype=np.uint8),
                                           np.zeros(N_TRAIN, np.int64)),
                                 "test": (rng.integers(0, 256, (16, 1, 16, 16), dtype=np.uint8), np.zeros(16, np.int64))},
                  shard_rows=16)


def cmd(exp_file: Path, *args) -> list[str]:
    return [sys.executable, "-m", "ulsweep.cli", "run", str(exp_file), *map(str, args)]


def final_data_state(trial: str) -> dict:
    from ulsweep.train.checkpoint import load_checkpoint

    res = json.loads(open(f"{trial}/result.json").read())
    return load_checkpoint(res["checkpoint"])[0]["data"]


def test_stream_sweep_on_local_disk_survives_a_killed_worker(tmp_path):
    write_data(str(tmp_path / "data"))
    f = tmp_path / "stream.yaml"
    f.write_text(yaml.safe_dump(experiment("stream", str(tmp_path / "data"))))
    log = tmp_path / "driver.log"
    with sandbox(tmp_path) as (env, _):
        env["ULSWEEP_MLFLOW_FLUSH_S"] = "0.2"
        p = run_driver(cmd(f, "--storage", tmp_path / "runs"), env, tmp_path, log, timeout=500,
                       fault="worker.log/ae-0000@4")
    assert p.returncode == 0, tail(log)
    assert (tmp_path / "faults" / "worker.log-ae-0000@4").exists(), "the worker was never killed:\n" + tail(log)
    trial = tmp_path / "runs" / "stream" / "trials" / "ae-0000"
    assert final_data_state(str(trial)) == {"epoch": 1, "step_in_epoch": 6, "seed": 0, "world": 1,
                                            "num_rows": N_TRAIN, "batch": BATCH}
    c, by_key = mlflow_state(tmp_path / "runs" / "stream")
    run = by_key["ae-0000"]
    assert len(run) == 1 and run[0].info.status == "FINISHED" and "bpp" in run[0].data.metrics
    steps = sorted(m.step for m in c.get_metric_history(run[0].info.run_id, "loss"))
    assert steps == list(range(2, STEPS + 1, 2))


def test_stream_sweep_reads_its_shards_from_s3(tmp_path):
    import boto3

    with contextlib.ExitStack() as stack:
        endpoint = stack.enter_context(s3_server(tmp_path / "moto.log"))
        creds = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}
        old = {k: os.environ.get(k) for k in creds}
        os.environ.update(creds)
        stack.callback(lambda: [os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
                                for k, v in old.items()])
        boto3.client("s3").create_bucket(Bucket="ulsweep-data")
        write_data("s3://ulsweep-data/noise")
        f = tmp_path / "s3stream.yaml"
        d = experiment("s3stream", "s3://ulsweep-data/noise")
        d["resources"] = {"num_workers": 0, "cpus_per_worker": 0.5}
        f.write_text(yaml.safe_dump(d))
        log = tmp_path / "driver.log"
        with sandbox(tmp_path) as (env, _):
            env.update(creds)
            p = run_driver(cmd(f, "--storage", "s3://ulsweep-data/runs"), env, tmp_path, log, timeout=500)
            assert p.returncode == 0, tail(log)
            import fsspec

            fs = fsspec.filesystem("s3", skip_instance_cache=True)
            res = json.loads(fs.cat_file("ulsweep-data/runs/s3stream/trials/ae-0000/result.json"))
            from ulsweep.train.checkpoint import load_checkpoint

            assert load_checkpoint(res["checkpoint"])[0]["data"]["epoch"] == 1  # 12 steps = 2 epochs of 6
            for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                env.pop(k)
            env["AWS_SHARED_CREDENTIALS_FILE"] = env["AWS_CONFIG_FILE"] = str(tmp_path / "none")
            env["AWS_EC2_METADATA_DISABLED"] = "true"
            p = run_driver(cmd(f, "--storage", tmp_path / "runs"), env, tmp_path, log, timeout=120)
            text = log.read_text().rsplit("=====", 1)[-1]
            assert p.returncode != 0 and "s3stream.yaml: data.path: cannot open" in text, text
            assert "s3://ulsweep-data/noise" in text, text
            assert "credentials" in text.lower(), text
            assert not (tmp_path / "runs" / "s3stream" / "trials").exists()  # failed before any trial
