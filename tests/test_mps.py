"""resources.mps: when a run starts NVIDIA's MPS control daemon, what its trials are told, and that it is stopped.

The daemon here is a stand-in `nvidia-cuda-mps-control` on PATH that keeps the real one's protocol where ulsweep
touches it (`-d` opens `$CUDA_MPS_PIPE_DIRECTORY/control`; `get_server_list` answers while it is open; `quit`
closes it) and writes each call to a record file. The CUDA probe is replaced where a test needs a GPU; on this
machine the real probe runs and must fail.
"""
from __future__ import annotations

import os
import stat
import sys
from pathlib import Path

import pytest

from ulsweep.config import ConfigError, experiment_from_dict
from ulsweep.sweep import mps

FAKE = """#!{python}
import os, sys
pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")
control = os.path.join(pipe, "control")
def record(what):
    with open(os.environ["FAKE_MPS_RECORD"], "a") as f:
        f.write(what + " " + pipe + "\\n")
if sys.argv[1:] == ["-d"]:
    record("start")
    if os.environ.get("FAKE_MPS_FAIL"):
        print("An instance of this daemon is already running", file=sys.stderr)
        sys.exit(1)
    open(control, "w").close()
    sys.exit(0)
cmd = sys.stdin.read().strip()
record(cmd)
if cmd == "quit" and os.environ.get("FAKE_MPS_QUIT_S"):  # a client still running: the real quit blocks till it ends
    import time
    time.sleep(float(os.environ["FAKE_MPS_QUIT_S"]))
if cmd == "quit" and os.path.exists(control):
    os.remove(control)
sys.exit(0 if os.path.exists(control) else 1)
"""


@pytest.fixture
def daemon_bin(tmp_path, monkeypatch):
    """The stand-in daemon on PATH, CUDA said to be there, the probe passing; returns the record file."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    exe = bindir / mps.CONTROL
    exe.write_text(FAKE.format(python=sys.executable))
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)
    record = tmp_path / "record.txt"
    record.touch()
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_MPS_RECORD", str(record))
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(tmp_path / "no-admin-daemon"))  # none serves the machine
    monkeypatch.setattr(mps, "_cuda_available", lambda: True)
    monkeypatch.setattr(mps, "probe", lambda daemon: (True, "mps probe ok"))
    monkeypatch.setattr(mps.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    return record


def _calls(record: Path) -> list[str]:
    return [line.split()[0] for line in record.read_text().splitlines()]


def _start(setting, run_dir, capsys=None, **kw):
    args = {"address": None, "ray_running": False, "gpus_per_worker": 0.1} | kw
    return mps.start_for_run(setting, str(run_dir), **args, out=sys.stdout)


def test_auto_starts_a_daemon_for_the_run_tells_its_pipe_and_stops_it(daemon_bin, tmp_path, capsys):
    d = _start("auto", tmp_path / "run")
    assert d is not None
    pipe, log = mps.folders_for(str(tmp_path / "run"))
    assert d.env == {"CUDA_MPS_PIPE_DIRECTORY": pipe, "CUDA_MPS_LOG_DIRECTORY": log}
    assert os.path.exists(os.path.join(pipe, "control")) and os.path.isdir(log)
    # a UNIX socket path must stay short: the temp folder plus a few dozen characters, whatever the run dir
    assert len(os.path.relpath(os.path.join(pipe, "control"), str(tmp_path / "tmp"))) < 40
    assert f"pipe {pipe}" in capsys.readouterr().out
    d.stop(wait_s=60)  # the run waits STOP_WAIT_S; here the quit is waited for to its end (a loaded box)
    assert _calls(daemon_bin) == ["start", "quit"]
    assert not os.path.exists(os.path.join(pipe, "control"))


def test_stop_sends_the_quit_and_leaves_a_slow_one_to_finish_beside(daemon_bin, tmp_path, monkeypatch):
    """The real quit blocks until the daemon's last client has exited (the trials' processes, seconds after Ray's
    shutdown): `stop` waits STOP_WAIT_S for it, then returns with the quit delivered and still running."""
    import time

    d = _start("auto", tmp_path / "run")
    pipe, _ = mps.folders_for(str(tmp_path / "run"))
    monkeypatch.setenv("FAKE_MPS_QUIT_S", "20")
    monkeypatch.setattr(mps, "STOP_WAIT_S", 0.1)
    d.stop()
    assert os.path.exists(os.path.join(pipe, "control"))  # the quit has not finished: it goes on beside
    deadline = time.time() + 120  # a guard against a hang, not a speed limit
    while _calls(daemon_bin) != ["start", "quit"]:
        assert time.time() < deadline, _calls(daemon_bin)
        time.sleep(0.1)


def test_each_run_directory_has_its_own_daemon_folders(tmp_path):
    assert mps.folders_for("/runs/a") != mps.folders_for("/runs/b")
    assert mps.folders_for("/runs/a") == mps.folders_for("/runs/a")


def test_a_daemon_left_by_a_killed_run_is_taken_over_not_started_again(daemon_bin, tmp_path, capsys):
    first = _start("on", tmp_path / "run")
    assert first is not None  # then the driver is killed: no stop
    again = _start("on", tmp_path / "run")
    assert again.env == first.env
    assert _calls(daemon_bin) == ["start", "get_server_list"]
    assert "taking over" in capsys.readouterr().out


def test_an_administrators_daemon_is_used_as_it_is(daemon_bin, tmp_path, monkeypatch, capsys):
    admin = tmp_path / "admin-pipe"
    admin.mkdir()
    (admin / "control").touch()
    monkeypatch.setenv("CUDA_MPS_PIPE_DIRECTORY", str(admin))
    assert _start("on", tmp_path / "run") is None
    assert f"already serves {admin}" in capsys.readouterr().out
    assert "start" not in _calls(daemon_bin)


@pytest.mark.parametrize("case, kw, reason", [
    ("cluster", {"address": "ray://head:10001"}, "joins a cluster"),
    ("ray up", {"ray_running": True}, "Ray was already running"),
    ("whole GPUs", {"gpus_per_worker": 1.0}, "do not share GPUs"),
    ("no GPUs", {"gpus_per_worker": 0.0}, "do not share GPUs"),
])
def test_auto_says_why_it_starts_nothing_and_on_refuses(daemon_bin, tmp_path, capsys, case, kw, reason):
    assert _start("auto", tmp_path / "run", **kw) is None
    assert reason in capsys.readouterr().out
    with pytest.raises(mps.MpsError, match=f"resources.mps: on: .*{reason}"):
        _start("on", tmp_path / "run", **kw)
    assert _calls(daemon_bin) == []


def test_without_the_daemon_binary_or_cuda(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(mps.shutil, "which", lambda name: None)
    assert _start("auto", tmp_path / "run") is None
    assert "not on PATH" in capsys.readouterr().out
    with pytest.raises(mps.MpsError, match="not on PATH"):
        _start("on", tmp_path / "run")
    monkeypatch.setattr(mps.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(mps, "_cuda_available", lambda: False)
    with pytest.raises(mps.MpsError, match="CUDA is not available"):
        _start("on", tmp_path / "run")


def test_off_starts_nothing_and_says_nothing(daemon_bin, tmp_path, capsys):
    assert _start("off", tmp_path / "run") is None
    assert capsys.readouterr().out == "" and _calls(daemon_bin) == []


def test_a_daemon_that_fails_to_start_or_to_serve_cuda_is_stopped_and_named(daemon_bin, tmp_path, monkeypatch,
                                                                             capsys):
    monkeypatch.setenv("FAKE_MPS_FAIL", "1")
    with pytest.raises(mps.MpsError, match="exited 1: An instance of this daemon is already running"):
        _start("on", tmp_path / "run")
    monkeypatch.delenv("FAKE_MPS_FAIL")
    monkeypatch.setattr(mps, "probe", lambda daemon: (False, "RuntimeError: CUDA error: all CUDA-capable devices "
                                                             "are busy or unavailable"))
    assert _start("auto", tmp_path / "run2") is None
    out = capsys.readouterr().out
    assert "mps: not used (a CUDA process failed under the daemon" in out and "busy or unavailable" in out
    assert _calls(daemon_bin)[-2:] == ["start", "quit"]  # the daemon that could not serve is stopped
    with pytest.raises(mps.MpsError, match="busy or unavailable"):
        _start("on", tmp_path / "run3")


def test_the_real_probe_fails_without_a_gpu(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the probe would pass")
    ok, said = mps.probe(mps.MpsDaemon(str(tmp_path / "pipe"), str(tmp_path / "log")))
    assert not ok and said  # torch's own error (no driver, or no CUDA build), for the message


def test_on_needs_trials_that_share_gpus_in_the_config():
    with pytest.raises(ConfigError, match="resources.mps"):
        experiment_from_dict({"resources": {"mps": "on", "gpus_per_worker": 1.0}})
    with pytest.raises(ConfigError, match="resources.mps"):
        experiment_from_dict({"resources": {"mps": "sometimes"}})
    assert experiment_from_dict({"resources": {"mps": "on", "gpus_per_worker": 0.1}}).resources.mps == "on"
    assert experiment_from_dict({"resources": {"mps": "auto"}}).resources.mps == "auto"  # no GPUs: auto says why


def test_on_a_gpu_less_laptop_the_run_turns_mps_off_with_the_gpus():
    from ulsweep.sweep.driver import fit_to_local_machine

    exp = experiment_from_dict({"resources": {"mps": "on", "gpus_per_worker": 0.1}})
    fitted = fit_to_local_machine(exp, {"CPU": 2.0}, started_here=True, out=sys.stdout)
    assert fitted.resources.gpus_per_worker == 0 and fitted.resources.mps == "off"


def test_the_sweep_gives_its_workers_the_pipe_and_stops_the_daemon_even_when_it_fails(tmp_path, monkeypatch,
                                                                                      digits_cache):
    import ray

    from ulsweep.sweep import driver

    stopped, seen = [], {}

    class Daemon:
        env = {"CUDA_MPS_PIPE_DIRECTORY": "/tmp/p", "CUDA_MPS_LOG_DIRECTORY": "/tmp/l"}

        def stop(self):
            stopped.append(True)

    def start_for_run(setting, run_dir, **kw):
        seen["setting"], seen["kw"] = setting, kw
        return Daemon()

    def ray_init(**kw):  # a local Ray: its processes inherit the variables from the driver's environment
        seen["runtime_env"] = kw.get("runtime_env")
        seen["environ"] = {k: os.environ.get(k)
                           for k in ("CUDA_MPS_PIPE_DIRECTORY", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")}
        raise RuntimeError("ray did not start")

    monkeypatch.setattr(mps, "start_for_run", start_for_run)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", ray_init)
    exp = experiment_from_dict({"name": "m", "data": {"path": "builtin:digits", "image_size": 16},
                                "resources": {"mps": "auto", "gpus_per_worker": 0.1},
                                "tracking": {"system_metrics_s": 0}})
    with pytest.raises(RuntimeError, match="ray did not start"):
        driver.run_sweep(exp, storage=str(tmp_path / "runs"))
    assert seen["setting"] == "auto" and seen["kw"]["gpus_per_worker"] == 0.1 and seen["kw"]["address"] is None
    assert seen["runtime_env"] is None
    assert seen["environ"] == {"CUDA_MPS_PIPE_DIRECTORY": "/tmp/p", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}
    assert "CUDA_MPS_PIPE_DIRECTORY" not in os.environ  # the driver's own environment as it was
    assert stopped == [True]


def test_cuda_is_asked_of_the_driver_library_without_torch():
    """`_cuda_available` agrees with torch here, and asks libcuda itself: torch is not imported by it."""
    import subprocess
    import sys

    import torch

    code = ("import sys\nfrom ulsweep.sweep import mps\n"
            "print(mps._cuda_available(), 'torch' in sys.modules)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == [str(torch.cuda.is_available()), "False"]


FAKE_LIBCUDA = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
typedef int CUresult;
static unsigned int mem[1 << 14];
static int current = 0;
static CUresult fail(const char *what) {  /* FAKE_CUDA_FAIL=<function>: that call fails (805: MPS connection) */
    const char *f = getenv("FAKE_CUDA_FAIL");
    return f && strcmp(f, what) == 0 ? 805 : 0;
}
CUresult cuInit(unsigned int flags) { return flags ? 1 : fail("cuInit"); }
CUresult cuDeviceGetCount(int *n) { *n = 1; return fail("cuDeviceGetCount"); }
CUresult cuDeviceGet(int *dev, int ordinal) { *dev = ordinal; return ordinal ? 101 : fail("cuDeviceGet"); }
CUresult cuDevicePrimaryCtxRetain(void **ctx, int dev) {
    *ctx = (void *)mem; return dev ? 101 : fail("cuDevicePrimaryCtxRetain");
}
CUresult cuCtxSetCurrent(void *ctx) { current = ctx == (void *)mem; return current ? 0 : 201; }
CUresult cuMemAlloc_v2(unsigned long long *p, size_t n) {
    if (!current || n > sizeof mem) return 2;
    *p = (unsigned long long)(uintptr_t)mem; return 0;
}
CUresult cuMemsetD32_v2(unsigned long long p, unsigned int v, size_t n) {
    for (size_t i = 0; i < n; i++) ((unsigned int *)(uintptr_t)p)[i] = v;
    return 0;
}
CUresult cuMemcpyDtoH_v2(void *dst, unsigned long long src, size_t n) {
    memcpy(dst, (void *)(uintptr_t)src, n); return 0;
}
CUresult cuCtxSynchronize(void) { return current ? 0 : 201; }
"""


@pytest.fixture()
def fake_libcuda(tmp_path, monkeypatch):
    """A stand-in libcuda.so.1 (the driver API calls the probe and `_cuda_available` make, with their C
    signatures; the device memory is host memory) on LD_LIBRARY_PATH of the processes started from here."""
    import shutil
    import subprocess

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler for the stand-in libcuda")
    src, lib = tmp_path / "fake_cuda.c", tmp_path / "lib" / "libcuda.so.1"
    lib.parent.mkdir()
    src.write_text(FAKE_LIBCUDA)
    subprocess.run([cc, "-shared", "-fPIC", "-o", str(lib), str(src)], check=True, capture_output=True)
    monkeypatch.setenv("LD_LIBRARY_PATH", str(lib.parent))
    return lib


def test_the_probe_against_libcuda_passes_on_a_working_driver_and_falls_back_to_torch_when_it_fails(
        fake_libcuda, tmp_path, monkeypatch):
    import subprocess
    import sys

    import torch

    daemon = mps.MpsDaemon(str(tmp_path / "pipe"), str(tmp_path / "log"))
    assert mps._probe_with(mps.PROBE_LIBCUDA, daemon) == (True, "mps probe ok")
    assert mps.probe(daemon) == (True, "mps probe ok")  # torch's probe not needed
    code = "from ulsweep.sweep import mps; print(mps._cuda_available())"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.stdout.strip() == "True", p.stderr[-2000:]
    monkeypatch.setenv("FAKE_CUDA_FAIL", "cuDevicePrimaryCtxRetain")  # e.g. the MPS server cannot be reached
    ok, said = mps._probe_with(mps.PROBE_LIBCUDA, daemon)
    assert not ok and said.endswith("cuDevicePrimaryCtxRetain failed: CUresult 805"), said
    if not torch.cuda.is_available():  # then torch's probe decides, and fails here
        ok, said = mps.probe(daemon)
        assert not ok and "cuDevicePrimaryCtxRetain" not in said, said
    monkeypatch.setenv("FAKE_CUDA_FAIL", "cuInit")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.stdout.strip() == "False", p.stderr[-2000:]
