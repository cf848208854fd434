"""MLflow lineage helpers against a real (sqlite) tracking store."""
from __future__ import annotations

import pytest
from mlflow.entities import Metric

from ulsweep import tracking


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp("mlflow")
    uri = tracking.resolve_tracking_uri(None, None, str(d))
    c = tracking.client(uri)
    eid = tracking.get_or_create_experiment(c, "t", str(d / "art"))
    return uri, c, eid


def test_default_uri_is_absolute_sqlite_in_run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert tracking.resolve_tracking_uri(None, None, str(tmp_path / "r")) == f"sqlite:///{tmp_path}/r/mlflow.db"
    # relative sqlite paths are made absolute (Ray changes workers' directories)
    assert tracking.resolve_tracking_uri("sqlite:///x.db", None, "r") == f"sqlite:///{tmp_path}/x.db"
    assert tracking.default_tracking_uri("s3://bucket/runs/exp", create=False) == \
        f"sqlite:///{tmp_path}/runs/exp/mlflow.db"


def test_uri_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert tracking.resolve_tracking_uri("http://cli:5000", "http://cfg", str(tmp_path)) == "http://cli:5000"
    assert tracking.resolve_tracking_uri(None, "http://cfg", str(tmp_path)) == "http://env:5000"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert tracking.resolve_tracking_uri(None, "http://cfg", str(tmp_path)) == "http://cfg"


def test_three_level_lineage_and_reuse_by_key(store):
    uri, c, eid = store
    sweep = tracking.create_sweep_run(c, eid, "sweep-x")
    ae, new = tracking.get_or_create_trial_run(c, eid, sweep, "ae-0000", "ae", sweep)
    assert new
    base, new_b = tracking.get_or_create_trial_run(c, eid, sweep, "ae-0000-tiny", "base", ae)
    again, new2 = tracking.get_or_create_trial_run(c, eid, sweep, "ae-0000", "ae", sweep)
    assert again == ae and not new2  # the same key never makes a second run
    r = c.get_run(base)
    assert r.data.tags[tracking.TAG_PARENT] == ae and r.data.tags[tracking.TAG_SWEEP] == sweep
    assert c.get_run(ae).data.tags[tracking.TAG_PARENT] == sweep
    # a killed driver leaves RUNNING runs: resume closes them, and a reopened run is RUNNING again
    closed = tracking.close_orphans(c, eid, sweep, exclude=[sweep])
    assert sorted(closed) == ["ae-0000", "ae-0000-tiny"]
    assert c.get_run(ae).info.status == "KILLED"
    reopened, _ = tracking.get_or_create_trial_run(c, eid, sweep, "ae-0000", "ae", sweep)
    assert reopened == ae and c.get_run(ae).info.status == "RUNNING"
    assert len(tracking.sweep_runs(c, eid, sweep)) == 3


def test_params_batched_and_truncated(store):
    uri, c, eid = store
    run = c.create_run(eid).info.run_id
    params = {f"p.{i}": i for i in range(250)}
    params["long"] = "x" * 10000
    tracking.log_params(c, run, params)
    got = c.get_run(run).data.params
    assert len(got) == 251 and got["p.249"] == "249" and len(got["long"]) == 6000


def test_metric_buffer_batches_curves(store):
    uri, c, eid = store
    run = c.create_run(eid).info.run_id
    calls = []

    class Counting:
        def log_batch(self, run_id, metrics=(), params=(), tags=()):
            calls.append(len(metrics))
            return c.log_batch(run_id, metrics=metrics)

    buf = tracking.MetricBuffer(Counting(), run, flush_s=3600, max_items=1000)
    for step in range(1, 101):
        buf.add(step, {"loss": 1.0 / step, "lr": 1e-3, "flag": True})  # bools are not metrics
    assert calls == []
    buf.flush()
    assert calls == [200]
    hist = c.get_metric_history(run, "loss")
    assert len(hist) == 100 and {m.step for m in hist} == set(range(1, 101))


def test_retry_on_locked_database():
    n = {"k": 0}

    def flaky():
        n["k"] += 1
        if n["k"] < 3:
            raise RuntimeError("(sqlite3.OperationalError) database is locked")
        return "ok"

    assert tracking.retry(flaky) == "ok" and n["k"] == 3
    with pytest.raises(ValueError):
        tracking.retry(lambda: (_ for _ in ()).throw(ValueError("bad param")))


def test_render_table():
    t = tracking.render_table([{"a": 1.23456, "b": "x"}, {"a": None, "b": "long"}], ["a", "b"])
    lines = t.splitlines()
    assert lines[0].split() == ["a", "b"] and "1.235" in lines[2] and lines[3].split() == ["long"]


def test_a_finished_trial_sends_its_final_metrics_instead_of_spooling_them(store, tmp_path, monkeypatch):
    """A trial's worker (here outside Ray, with the fake loop) hands its final metrics to MLflow before it
    closes its metric buffer: they reach the run while the sweep goes on, and nothing is left for the driver
    to replay. (Closing the buffer first would spool every finished trial's final points.)"""
    import ray
    from ray.tune.trainable import trainable_fn_utils

    from ulsweep.sweep import worker

    uri, c, eid = store
    run_id = c.create_run(eid).info.run_id
    reported = []
    monkeypatch.setattr(trainable_fn_utils, "_in_tune_session", lambda: True)  # rank 0 of 1, local mode
    monkeypatch.setattr(worker, "report", lambda metrics, local, checkpoint=None: reported.append(metrics))
    monkeypatch.setattr(ray, "get_runtime_context", lambda: type("Ctx", (), {"get_node_id": lambda self: "n0"})())
    monkeypatch.setenv("ULSWEEP_FAKE_STEP_S", "0")
    train = {"steps": 6, "batch_size": 8, "log_every": 2, "ckpt_every": 3}
    exp = {"name": "t", "data": {"path": "builtin:digits", "image_size": 16}, "ae": {"train": train},
           "base_models": [{"name": "tiny", "train": train}]}
    run_dir = tmp_path / "ae-0000"
    wcfg = {"kind": "ae", "key": "ae-0000", "local_mode": True, "run_id": run_id, "run_dir": str(run_dir),
            "tracking_uri": uri, "experiment": exp, "train_impl": "fake", "attempt": 0}
    worker.train_worker(wcfg)
    assert reported and reported[-1]["final"] == 1.0 and reported[-1]["mlflow_run_id"] == run_id
    assert not list(run_dir.glob("mlflow-spool/*.jsonl"))
    final = c.get_run(run_id).data.metrics
    assert final["bpp"] == pytest.approx(reported[-1]["bpp"]) and final["step"] == 6
    assert [m.step for m in c.get_metric_history(run_id, "loss")] == [2, 4, 6]


def test_deduping_buffer_keeps_one_point_per_key_and_step(store):
    """With dedupe, a point at a step the curve already reached is dropped, whether MLflow held it before the
    buffer started, this buffer sent it earlier, or it sits in the same batch; other keys are untouched."""
    uri, c, eid = store
    run = c.create_run(eid).info.run_id
    c.log_batch(run, metrics=[Metric("loss", 9.0, 0, 2)])  # a previous attempt of the loop logged step 2
    buf = tracking.MetricBuffer(c, run, flush_s=3600, dedupe=True)
    for step in (1, 2, 3, 4):
        buf.add(step, {"loss": 1.0 / step})
    buf.add(4, {"loss": 0.5, "bpp": 0.1})  # a final value at the curve's last step, in the same batch
    assert buf.flush()
    buf.add(4, {"loss": 0.25, "bpp": 0.2})  # and once more after that batch went through
    buf.add(5, {"loss": 0.2})
    assert buf.flush()
    loss = sorted((m.step, m.value) for m in c.get_metric_history(run, "loss"))
    assert loss == [(2, 9.0), (3, 1 / 3), (4, 0.25), (5, 0.2)]
    assert [(m.step, m.value) for m in c.get_metric_history(run, "bpp")] == [(4, 0.1)]
    assert buf.dropped_duplicates == 5  # steps 1 and 2, loss at 4 twice, bpp at 4 once


def test_runs_list_their_datasets_and_latents_as_mlflow_inputs(store, tmp_path):
    """Dataset splits (training, evaluation) and a base trial's latents, read back from MLflow: name, digest =
    content hash (MLflow keeps 36 characters), source = URI, context tag; logging again adds nothing."""
    import json

    from latentlib import SlowEncoder, tiny_data

    from ulsweep.config import experiment_from_dict
    from ulsweep.sweep.trial import log_datasets
    from ulsweep.train.checkpoint import save_checkpoint
    from ulsweep.train.latents import training_latents

    _, c, eid = store
    data, ds = tiny_data(tmp_path / "data")
    exp = experiment_from_dict({"name": "t", "data": {"path": data.path, "image_size": 8}})
    ckpt = save_checkpoint(str(tmp_path / "ae"), 1, {"w": 1}, {"kind": "ae"})
    with open(f"{ckpt}/meta.json") as f:
        ae_sha = json.load(f)["sha256"]
    lat, _ = training_latents(SlowEncoder(sleep_s=0), ckpt, ae_sha, ds, data, "cpu")
    run_id = c.create_run(eid).info.run_id
    for _ in range(2):  # a resumed trial logs again
        log_datasets(c, run_id, exp)
        log_datasets(c, run_id, exp, ae_checkpoint=ckpt)
    inputs = c.get_run(run_id).inputs.dataset_inputs
    got = {i.dataset.name: (i.dataset, {t.key: t.value for t in i.tags}) for i in inputs}
    assert len(inputs) == 3 and set(got) == {"tiny:train", "tiny:test", "latents:tiny:train"}
    for name, context, h, uri in (("tiny:train", "training", ds.content_hash, ds.uri),
                                  ("tiny:test", "evaluation", ds.content_hash, ds.uri),
                                  ("latents:tiny:train", "training", lat.content_hash, lat.uri)):
        d, tags = got[name]
        assert len(h) == 64 and d.digest == h[:36]
        assert json.loads(d.source)["uri"] == uri and d.source_type == "local"
        assert json.loads(d.profile)["content_hash"] == h and tags["mlflow.data.context"] == context
    assert json.loads(got["latents:tiny:train"][0].profile)["latent_shape"] == [2, 4, 4]
    assert json.loads(got["tiny:train"][0].profile)["num_images"] == 40


def test_dataset_inputs_retry_when_another_run_inserted_the_same_dataset(store, tmp_path, monkeypatch):
    """Two trials logging one dataset at the same moment: the second insert of the shared dataset row fails
    its unique key (sqlalchemy IntegrityError); the retry links the run to the row the first committed."""
    from latentlib import tiny_data

    from ulsweep.tracking import datasets as D

    _, c, eid = store
    _, ds = tiny_data(tmp_path / "data")
    refs = D.split_refs(ds, "train", "test", 8)
    monkeypatch.setattr(D.time, "sleep", lambda s: None)

    class Racing:
        """The real client, whose first log_inputs call loses the race."""

        def __init__(self, error):
            self.calls, self.error = 0, error

        def __getattr__(self, name):
            return getattr(c, name)

        def log_inputs(self, *a, **k):
            self.calls += 1
            if self.calls == 1:
                raise RuntimeError(self.error)
            return c.log_inputs(*a, **k)

    run_id = c.create_run(eid).info.run_id
    racing = Racing("(sqlite3.IntegrityError) UNIQUE constraint failed: datasets.experiment_id, datasets.name")
    assert D.log_dataset_inputs(racing, run_id, refs) == 2 and racing.calls == 2
    assert len(c.get_run(run_id).inputs.dataset_inputs) == 2
    other = c.create_run(eid).info.run_id
    with pytest.raises(RuntimeError, match="FOREIGN KEY"):  # any other error is not retried
        D.log_dataset_inputs(Racing("(sqlite3.IntegrityError) FOREIGN KEY constraint failed"), other, refs)
