"""Experiment YAML -> typed config: defaults, overrides, and errors that name file, key and value."""
from pathlib import Path

import pytest

from ulsweep.cli import main
from ulsweep.config import ConfigError, config_hash, experiment_from_dict, load_experiment, parse_overrides

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))


def write(tmp_path, text):
    p = tmp_path / "exp.yaml"
    p.write_text(text)
    return str(p)


# an empty list would make pytest skip the test: [None] runs it once, to fail
@pytest.mark.parametrize("path", EXPERIMENTS or [None], ids=lambda p: getattr(p, "name", "none-found"))
def test_every_shipped_experiment_loads(path):
    assert path is not None, f"no experiments/*.yaml under {REPO}"
    exp = load_experiment(str(path))
    assert exp.data.image_size % exp.ae.model.downsample == 0


@pytest.mark.parametrize("text, key, value_repr", [
    ("ae: {loss: {loss_factor: 0}}", "ae.loss.loss_factor", "0.0"),
    ("ae: {loss: {loss_factor: -1.5}}", "ae.loss.loss_factor", "-1.5"),
    ("ae: {model: {latent_channels: 0}}", "ae.model.latent_channels", "0"),
    ("ae: {model: {downsample: 6}}", "ae.model.downsample", "6"),
    ("data: {image_size: 20}\nae: {model: {downsample: 8}}", "ae.model.downsample", "8"),
    ("ae: {train: {steps: ten}}", "ae.train.steps", "'ten'"),
    ("ae: {train: {compile: 1}}", "ae.train.compile", "1"),
    ("ae: {loss: {decoder: gan}}", "ae.loss.decoder", "'gan'"),
    ("base_models: [{name: a}, {name: a}]", "base_models", "['a', 'a']"),
    ("base_models: [{name: a, train: {batch_size: 0}}]", "base_models[0].train.batch_size", "0"),
    ("search: {method: grid}", "search.space", "{}"),
    ("ae: {train: {device: cpu, cudnn_benchmark: false}}", "ae.train.cudnn_benchmark", "False"),
])
def test_bad_values_name_file_key_and_value(tmp_path, text, key, value_repr):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_experiment(path)
    msg = str(e.value)
    assert msg.startswith(path + ": " + key + ":"), msg
    assert f"(got {value_repr})" in msg


def test_a_union_with_choices_lists_them():
    with pytest.raises(ConfigError) as e:
        experiment_from_dict({"ae": {"train": {"compile": True, "gate_compile": "eagre"}}})
    assert "expected true or false or 'eager'" in str(e.value)


def test_yaml_on_and_off_mean_the_choice_they_spell(tmp_path):
    # YAML 1.1 reads unquoted on/off as booleans: `mps: on` must mean "on", in a file and in a --set alike
    exp = load_experiment(write(tmp_path, "resources: {mps: on, gpus_per_worker: 0.1}"))
    assert exp.resources.mps == "on"
    assert load_experiment(write(tmp_path, "resources: {mps: off}")).resources.mps == "off"
    over = experiment_from_dict({}, parse_overrides(["resources.mps=on", "resources.gpus_per_worker=0.5"]))
    assert over.resources.mps == "on"
    with pytest.raises(ConfigError, match=r"search.method: must be one of .*\(got True\)"):
        experiment_from_dict({"search": {"method": True}})


def test_unknown_key_suggests_the_close_one(tmp_path):
    with pytest.raises(ConfigError, match=r"exp.yaml: ae.loss.loss_facotr: unknown key; did you mean 'loss_factor'"):
        load_experiment(write(tmp_path, "ae: {loss: {loss_facotr: 2}}"))


def test_yaml_syntax_error_gives_the_line(tmp_path):
    with pytest.raises(ConfigError, match=r"exp.yaml: YAML syntax error: line 2, column 9: expected the node content"):
        load_experiment(write(tmp_path, "name: x\nae: {a: : b}\n"))


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml: file not found"):
        load_experiment(str(tmp_path / "nope.yaml"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_experiment(write(tmp_path, "- 1\n- 2\n"))


def test_overrides_apply_and_are_validated():
    exp = experiment_from_dict({}, parse_overrides(["ae.loss.loss_factor=4", "ae.loss.sigmoid_bias=-2"]))
    assert (exp.ae.loss.loss_factor, exp.ae.loss.sigmoid_bias) == (4.0, -2.0)
    with pytest.raises(ConfigError, match="ae.loss.loss_factor"):
        experiment_from_dict({}, parse_overrides(["ae.loss.loss_factor=0"]))
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_overrides(["ae.loss.loss_factor"])


def test_config_hash_is_stable_and_sensitive():
    a, b = experiment_from_dict({}), experiment_from_dict({})
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(experiment_from_dict({"ae": {"loss": {"loss_factor": 2.0}}}))


def test_cli_rejects_bad_config_before_any_work(tmp_path, capsys):
    path = write(tmp_path, "ae: {loss: {loss_factor: 0}}")
    assert main(["train", "ae", path, "--run-dir", str(tmp_path / "run")]) == 2
    assert "ae.loss.loss_factor: must be a finite number > 0" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_cli_dry_run_prints_resolved_config(capsys):
    assert main(["train", "ae", str(REPO / "experiments" / "quickstart.yaml"), "--dry-run", "--set",
                 "ae.loss.loss_factor=3"]) == 0
    out = capsys.readouterr().out
    assert "loss_factor: 3.0" in out and "run directory" in out


def test_experiment_file_from_a_uri():
    import fsspec

    text = (REPO / "experiments" / "quickstart.yaml").read_text()
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/ulsweep-cfg/quickstart.yaml", text.encode())
    try:
        exp = load_experiment("memory://ulsweep-cfg/quickstart.yaml", {"ae.train.steps": 7})
        assert exp.name == "quickstart" and exp.ae.train.steps == 7
        with pytest.raises(ConfigError, match="file not found"):
            load_experiment("memory://ulsweep-cfg/missing.yaml")
    finally:
        fs.rm("/ulsweep-cfg", recursive=True)


def test_the_command_exits_with_its_code_after_its_atexit_handlers_and_its_last_output(tmp_path):
    """`ulsweep`'s exit (`exit_now`): its code, the atexit handlers run, everything printed reaches the pipe
    (buffered output included), and with another thread alive the ordinary exit, which waits for it."""
    import subprocess
    import sys

    code = ("import atexit, sys, threading, time\n"
            "from ulsweep.cli import exit_now\n"
            "atexit.register(lambda: print('atexit ran', flush=False))\n"
            "sys.stdout.write('buffered, ')\n"
            "if sys.argv[1] == 'thread':\n"
            "    threading.Thread(target=lambda: (time.sleep(0.5), print('thread done, ', end=''))).start()\n"
            "exit_now(7)\n")
    for mode, want in (("alone", "buffered, atexit ran\n"), ("thread", "buffered, thread done, atexit ran\n")):
        p = subprocess.run([sys.executable, "-c", code, mode], capture_output=True, text=True, timeout=120)
        assert (p.returncode, p.stdout, p.stderr) == (7, want, ""), (mode, p)


def test_exit_now_skips_the_teardown_only_when_alone_and_after_the_atexit_handlers(monkeypatch):
    import atexit
    import os
    import threading

    from ulsweep import cli

    calls = []

    class Exited(Exception):
        pass

    def fake_exit(rc):
        calls.append(("os._exit", rc))
        raise Exited

    monkeypatch.setattr(atexit, "_run_exitfuncs", lambda: calls.append(("atexit",)))
    monkeypatch.setattr(os, "_exit", fake_exit)
    monkeypatch.setattr(threading, "active_count", lambda: 1)
    with pytest.raises(Exited):
        cli.exit_now(5)
    assert calls == [("atexit",), ("os._exit", 5)]
    calls.clear()
    monkeypatch.setattr(threading, "active_count", lambda: 2)  # another thread: the ordinary exit waits for it
    with pytest.raises(SystemExit) as e:
        cli.exit_now(5)
    assert e.value.code == 5 and calls == []
