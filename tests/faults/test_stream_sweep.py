"""`ulsweep run` of a tiny sweep whose stage-1 batches stream through Ray Data (`data.loader: stream`), on local
disk, in a Ray Train worker actor that is SIGKILLed mid-trial (step 8, after the step-4 checkpoint): Ray Train
restarts the worker group, the loop and the stream resume at step 4 (epoch 0, step 4 of 6), the curve has one
point per logged step and the trial ends at epoch 1, step 6 of its data.

The same stream from the moto S3 server (data and run directory in the bucket, and the dataset without
credentials failing at start with an error naming the file, data.path and its URI) is checked on
tests/test_s3_storage.py's sweep: test_stream_sweep_reads_its_shards_from_s3 there.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from faultlib import mlflow_state, run_driver, sandbox, tail

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_s3_storage import BATCH, N_TRAIN, STEPS, write_noise_data  # noqa: E402  (6 steps per epoch: 2 epochs)

pytestmark = pytest.mark.slow


def experiment(name: str, data: str) -> dict:
    train = {"steps": STEPS, "batch_size": BATCH, "log_every": 2, "ckpt_every": 4, "eval_images": 16,
             "eval_t_per_image": 1, "sample_steps": 2}
    return {"name": name, "data": {"path": data, "image_size": 16, "loader": "stream", "hflip": True},
            "ae": {"model": {"preset": "tiny", "downsample": 4, "latent_channels": 2}, "train": train},
            "base_models": [], "eval": {"extractor": "none"},
            "search": {"metrics": ["bpp"], "modes": ["min"], "max_concurrent": 1},
            "resources": {"num_workers": 1, "cpus_per_worker": 0.5, "max_worker_failures": 2}}


def cmd(exp_file: Path, *args) -> list[str]:
    return [sys.executable, "-m", "ulsweep.cli", "run", str(exp_file), *map(str, args)]


def final_data_state(trial: str) -> dict:
    from ulsweep.train.checkpoint import load_checkpoint

    res = json.loads(open(f"{trial}/result.json").read())
    return load_checkpoint(res["checkpoint"])[0]["data"]


def test_stream_sweep_on_local_disk_survives_a_killed_worker(tmp_path):
    write_noise_data(str(tmp_path / "data"))
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
