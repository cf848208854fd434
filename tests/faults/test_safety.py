"""Safety by construction: no unsafe deserialisation in the package, servers bound to 127.0.0.1."""
from __future__ import annotations

import re
from pathlib import Path

import ulsweep
from ulsweep.report import cli as report_cli

PKG = Path(ulsweep.__file__).parent


def _calls(pattern: str) -> list[tuple[str, str]]:
    out = []
    for f in sorted(PKG.rglob("*.py")):
        for line in f.read_text().splitlines():
            code = line.split("#", 1)[0]
            if re.search(pattern, code) and not code.strip().startswith(('"', "'", "`")):
                out.append((str(f.relative_to(PKG)), code.strip()))
    return out


def test_torch_load_always_weights_only():
    calls = _calls(r"\btorch\.load\(")
    assert calls, "the scan found no torch.load at all: the pattern is broken"
    assert all("weights_only=True" in code for _, code in calls), calls


def test_no_unsafe_yaml_or_pickle_loading():
    assert _calls(r"\byaml\.(load|unsafe_load|full_load|load_all)\(|yaml\.(Unsafe|Full)?Loader\b") == []
    assert len(_calls(r"\byaml\.safe_load\(")) >= 2  # the scan sees the loads that do exist
    # the pickle loads: the searcher's own state, the check of Tune's state files before a --resume
    # (statecheck.py), and the search generator's state reopened to re-run failed trials on --resume
    # (driver.py); all read only what Tune wrote into the sweep's run dir and unpickles itself on --resume
    # (never a user-supplied path)
    assert _calls(r"\bpickle\.loads?\(|\bcloudpickle\.loads?\(|\bdill\.loads?\(") == [
        ("sweep/driver.py", "gen = cloudpickle.loads(uio.read_bytes(gen_file))"),
        ("sweep/searcher.py", "state = pickle.load(f)"), ("sweep/statecheck.py", "return cloudpickle.loads(data)")]


def test_ui_server_binds_localhost_by_default(monkeypatch):
    seen = {}

    class FakePopen:
        def __init__(self, cmd, **kw):
            seen["cmd"] = cmd
            self.pid = -1

    monkeypatch.setattr(report_cli.subprocess, "Popen", FakePopen)
    _, url = report_cli.start_mlflow_server("sqlite:////tmp/x.db", port=5999)
    cmd = seen["cmd"]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and url == "http://127.0.0.1:5999"
    # `ulsweep ui` has no option that changes the host: it always goes through this default
    parser = __import__("ulsweep.cli", fromlist=["build_parser"]).build_parser()
    ui = parser.parse_args(["ui", "runs/x"])
    assert not hasattr(ui, "host") and ui.func.__name__ == "handle_ui"
