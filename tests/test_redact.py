"""Credentials never reach MLflow, sweep.json or the console: URI userinfo and credential env vars."""
from __future__ import annotations

import importlib
import os

import pytest

from ulsweep import tracking
from ulsweep.tracking.redact import (check_no_userinfo, is_credential_name, is_redacted, redact_text, redact_uri,
                            secret_values)


@pytest.mark.parametrize("uri, expected", [
    ("postgresql://mlflow:hunter2@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),
    ("postgresql+psycopg://u:p%40ss@10.0.0.1/x", "postgresql+psycopg://u:***@10.0.0.1/x"),
    ("https://ghp_tokenvalue@mlflow.example.org", "https://***@mlflow.example.org"),
    ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
    ("s3://bucket/runs", "s3://bucket/runs"),
    ("sqlite:////abs/mlflow.db", "sqlite:////abs/mlflow.db"),
    ("/local/path/with@sign", "/local/path/with@sign"),
])
def test_redact_uri(uri, expected):
    assert redact_uri(uri) == expected
    assert is_redacted(redact_uri(uri)) == (uri != expected)


def test_credential_env_names():
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "GOOGLE_APPLICATION_CREDENTIALS",
                 "AZURE_STORAGE_KEY", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "HF_TOKEN",
                 "PGPASSWORD", "my_api_key"):
        assert is_credential_name(name), name
    for name in ("AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "RAY_AUTH_MODE", "PATH", "HOME",
                 "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME"):
        assert not is_credential_name(name), name


def test_redact_text_masks_uris_and_env_secrets():
    env = {"AWS_SECRET_ACCESS_KEY": "s3cr3t-value-123", "MLFLOW_TRACKING_PASSWORD": "pw-abcdef",
           "AWS_REGION": "us-east-1", "SHORT_TOKEN": "abc", "HOME": "/root"}
    assert secret_values(env) == ["s3cr3t-value-123", "pw-abcdef"]
    text = ("tracking: http://alice:pw-abcdef@mlflow:5000\nkey = s3cr3t-value-123\nregion us-east-1 "
            "abc /root")
    out = redact_text(text, env)
    assert "pw-abcdef" not in out and "s3cr3t-value-123" not in out
    assert "http://alice:***@mlflow:5000" in out and "key = ***" in out
    assert "us-east-1 abc /root" in out  # settings and short values stay readable


def test_storage_uri_with_credentials_is_refused():
    check_no_userinfo("s3://bucket/runs", "--storage")
    with pytest.raises(ValueError, match=r"--storage 's3://AKIA:\*\*\*@bucket/runs'.*environment") as e:
        check_no_userinfo("s3://AKIA:topsecret@bucket/runs", "--storage")
    assert "topsecret" not in str(e.value)


def test_params_and_text_artifacts_are_redacted(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "ulsweep-unit-secret-42")
    uri = tracking.resolve_tracking_uri(None, None, str(tmp_path))
    c = tracking.client(uri)
    eid = tracking.get_or_create_experiment(c, "redact", str(tmp_path / "art"))
    run_id = c.create_run(eid).info.run_id
    tracking.log_params(c, run_id, {"tracking.uri": "postgresql://u:dbpass99@h/db",
                                    "note": "key ulsweep-unit-secret-42", "lr": 0.001})
    tracking.log_text(c, run_id, "storage: s3://x\nsecret: ulsweep-unit-secret-42\n", "config.yaml")
    params = c.get_run(run_id).data.params
    assert params == {"tracking.uri": "postgresql://u:***@h/db", "note": "key ***", "lr": "0.001"}
    text = (tmp_path / "art").rglob("config.yaml").__next__().read_text()
    assert text == "storage: s3://x\nsecret: ***\n"


def test_default_artifact_location_defers_to_a_tracking_server():
    assert tracking.default_artifact_location("http://127.0.0.1:5000", "s3://b/runs/x") is None
    assert tracking.default_artifact_location("https://mlflow.example.org", "/r") is None
    assert tracking.default_artifact_location("sqlite:////r/mlflow.db", "/r/") == "/r/mlartifacts"
    assert tracking.default_artifact_location("postgresql://h/db", "s3://b/runs/x") == "s3://b/runs/x/mlartifacts"


def test_resume_with_masked_uri_needs_it_again(tmp_path, monkeypatch):
    from ulsweep.sweep.lineage import resume_tracking_uri as _resume_tracking_uri
    from ulsweep.sweep.state import SweepError

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    state = {"sweep_id": "s1", "tracking_uri": "postgresql://u:***@db/mlflow"}
    with pytest.raises(SweepError, match="credentials are not stored"):
        _resume_tracking_uri(state, None, str(tmp_path))
    assert _resume_tracking_uri(state, "postgresql://u:pw@db/mlflow", str(tmp_path)) == "postgresql://u:pw@db/mlflow"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://u:pw@db/mlflow")
    assert _resume_tracking_uri(state, None, str(tmp_path)) == "postgresql://u:pw@db/mlflow"
    with pytest.raises(SweepError, match="not postgresql://u:\\*\\*\\*@other/mlflow") as e:
        _resume_tracking_uri(state, "postgresql://u:pw@other/mlflow", str(tmp_path))
    assert "pw@" not in str(e.value)
    plain = {"sweep_id": "s2", "tracking_uri": "http://127.0.0.1:5000"}  # as stored: credentials moved out
    assert _resume_tracking_uri(plain, None, str(tmp_path)) == "http://127.0.0.1:5000"
    assert _resume_tracking_uri(plain, "http://a:pw@127.0.0.1:5000", str(tmp_path)) == "http://a:pw@127.0.0.1:5000"
    with pytest.raises(SweepError, match="not http://127.0.0.1:5001"):
        _resume_tracking_uri(plain, "http://127.0.0.1:5001", str(tmp_path))


def test_http_credentials_move_from_the_uri_to_mlflow_variables(monkeypatch):
    from ulsweep.tracking.redact import split_userinfo

    assert split_userinfo("http://al%40ce:p%3Aw@h:5000/x") == ("http://h:5000/x", "al@ce", "p:w")
    assert split_userinfo("http://h:5000") == ("http://h:5000", None, None)
    for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "PGPASSWORD"):
        monkeypatch.setenv(k, "before")  # records the original state, so the variables set below are undone
        monkeypatch.delenv(k)
    c = tracking.client("http://alice:pw-123456@127.0.0.1:5999")
    assert c.tracking_uri == "http://127.0.0.1:5999"  # MLflow prints run URLs built from it
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]) == ("alice", "pw-123456")
    assert tracking.client("https://tok-abcdef@mlflow.example.org").tracking_uri == "https://mlflow.example.org"
    assert os.environ["MLFLOW_TRACKING_TOKEN"] == "tok-abcdef"
    assert tracking.credentials_to_env("postgresql+psycopg://u%40x:p%40ss@db:5432/x") == \
        "postgresql+psycopg://u%40x@db:5432/x"
    assert os.environ["PGPASSWORD"] == "p@ss"  # libpq reads it there
    assert tracking.credentials_to_env("mysql://u:p@db/x") == "mysql://u:p@db/x"  # no standard variable


def test_ray_tune_no_longer_copies_cloud_credentials_into_trial_runtime_envs(monkeypatch):
    from ray.tune.execution import class_cache

    from ulsweep.sweep.credentials import stop_tune_copying_credentials

    # Ray's own default, whatever a sweep driven earlier in this process took out of it (its driver calls
    # stop_tune_copying_credentials): the module's code run again; the value before comes back after the test
    monkeypatch.setattr(class_cache, "ENV_VARS_TO_PROPAGATE", class_cache.ENV_VARS_TO_PROPAGATE)
    importlib.reload(class_cache)
    assert "AWS_SECRET_ACCESS_KEY" in class_cache.ENV_VARS_TO_PROPAGATE  # what Ray 2.60 does by default
    dropped = stop_tune_copying_credentials()
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"} <= set(dropped)
    left = class_cache.ENV_VARS_TO_PROPAGATE
    assert not {n for n in left if "AWS" in n or "SECRET" in n or "TOKEN" in n}
    assert "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S" in left  # Ray Train's own settings still travel
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "never-in-a-runtime-env")
    runtime_env = class_cache._ActorClassCache().get(type("Trainable", (), {}))._default_options["runtime_env"]
    assert "AWS_SECRET_ACCESS_KEY" not in runtime_env["env_vars"]


def test_secret_values_survive_a_variable_removed_while_the_environment_is_read(monkeypatch):
    """Another thread (MLflow's telemetry in a trial process) may delete a variable while redaction copies the
    environment: os.environ lists its keys, then a lookup raises KeyError. The copy is taken again."""
    from collections.abc import Mapping

    from ulsweep.tracking import redact

    class Vanishing(Mapping):  # the first lookup of _GONE finds it removed, as in the race
        def __init__(self):
            self.data, self.misses = {"_GONE": "x", "API_TOKEN": "s3cr3t-value"}, 0

        def __getitem__(self, k):
            if k == "_GONE" and self.misses == 0:
                self.misses += 1
                raise KeyError(k)
            return self.data[k]

        def __iter__(self):
            return iter(list(self.data))

        def __len__(self):
            return len(self.data)

    env = Vanishing()
    assert redact.environ_snapshot(env) == env.data and env.misses == 1
    monkeypatch.setenv("API_TOKEN", "s3cr3t-value")  # the default reads os.environ through the same copy
    assert redact.redact_text("token s3cr3t-value") == "token ***"
