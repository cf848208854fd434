"""NVIDIA's Multi-Process Service (MPS) for the trials a sweep packs on a GPU (`resources.mps`).

Trials that hold a fraction of a GPU (`resources.gpus_per_worker` < 1) are separate processes. Without MPS their
kernels take turns on the GPU (time-slicing: one process's context at a time); under MPS one server process runs
the kernels of all of them, side by side on the SMs. Small trials leave most SMs idle, so that matters: on one
H200, five packed lf_sweep autoencoder steps gave 15,137 images/s time-sliced and 22,438 under MPS (README,
"Measured so far"; `benchmarks/device/mps.sh`).

`resources.mps`:
- `off` (default): nothing is started.
- `auto`: this run starts an MPS control daemon when it can help and nothing else provides one: the run starts its
  own Ray (no `--address`), trials pack GPUs (0 < gpus_per_worker < 1), `nvidia-cuda-mps-control` is on PATH,
  CUDA is available. Otherwise one line says why not, and the run goes on time-sliced.
- `on`: the same, but any of those missing is an error before the sweep starts (naming `resources.mps`).
With either, a daemon that already serves the machine (an administrator's, found where CUDA clients look for it)
is used as it is.

The daemon gets pipe and log folders of its own (`CUDA_MPS_PIPE_DIRECTORY`, `CUDA_MPS_LOG_DIRECTORY` under the
temp folder, keyed by the run directory; a socket path must stay short), which the trial processes receive through
Ray's runtime environment. Before the sweep relies on it, a probe process allocates a tensor on the GPU through
it; if that fails the daemon is stopped (`on`: error with the probe's output; `auto`: a note, and no MPS). A daemon
left running by a killed run of the same run directory answers on its pipe and is taken over. The run stops the
daemon at its end (`quit`; the server exits once its last client has, which the run does not wait for).

On a cluster (`--address`) ulsweep cannot start daemons on other nodes: start one on every GPU node with the node
(the cluster configs' start commands) and leave `resources.mps: off`; trials then use it without further setting.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from ulsweep.sweep.state import SweepError

CONTROL = "nvidia-cuda-mps-control"
DEFAULT_PIPE = "/tmp/nvidia-mps"  # where CUDA clients look without CUDA_MPS_PIPE_DIRECTORY
START_S = 10.0  # how long the daemon may take to open its control pipe
PROBE_S = 120.0  # the probe's CUDA start-up (a first context on a busy node can take tens of seconds)
STOP_WAIT_S = 2.0  # how long `stop` waits for the daemon's quit before leaving it to finish on its own
# the probe, first written against the CUDA driver's library (ctypes: a context, a memset on the device read back;
# no torch to import, which took seconds of the sweep's start before Ray's), then, only if that one failed, with torch
PROBE_LIBCUDA = (
    "import ctypes, sys\n"
    "cuda = ctypes.CDLL('libcuda.so.1')\n"
    "def check(r, what):\n"
    "    if r != 0:\n"
    "        sys.exit(f'{what} failed: CUresult {r}')\n"
    "dev, ctx, ptr, host = ctypes.c_int(), ctypes.c_void_p(), ctypes.c_uint64(), (ctypes.c_uint * 1024)()\n"
    "check(cuda.cuInit(0), 'cuInit')\n"
    "check(cuda.cuDeviceGet(ctypes.byref(dev), 0), 'cuDeviceGet')\n"
    "check(cuda.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), 'cuDevicePrimaryCtxRetain')\n"
    "check(cuda.cuCtxSetCurrent(ctx), 'cuCtxSetCurrent')\n"
    "check(cuda.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(4096)), 'cuMemAlloc')\n"
    "check(cuda.cuMemsetD32_v2(ptr, ctypes.c_uint(7), ctypes.c_size_t(1024)), 'cuMemsetD32')\n"
    "check(cuda.cuMemcpyDtoH_v2(host, ptr, ctypes.c_size_t(4096)), 'cuMemcpyDtoH')\n"
    "check(cuda.cuCtxSynchronize(), 'cuCtxSynchronize')\n"
    "assert sum(host) == 7 * 1024, 'the device gave back other values'\n"
    "print('mps probe ok')\n")
PROBE = ("import torch; x = torch.ones(1024, device='cuda'); torch.cuda.synchronize(); "
         "assert float(x.sum()) == 1024.0; print('mps probe ok')")


class MpsError(SweepError):
    """`resources.mps: on` could not give the run an MPS daemon; the message names the setting and why."""


@dataclass
class MpsDaemon:
    """A control daemon this run started (or took over): the environment its clients need, and how to stop it."""

    pipe_dir: str
    log_dir: str

    @property
    def env(self) -> dict[str, str]:
        return {"CUDA_MPS_PIPE_DIRECTORY": self.pipe_dir, "CUDA_MPS_LOG_DIRECTORY": self.log_dir}

    def stop(self, wait_s: float | None = None) -> None:
        """Ask the daemon to quit; never raises. It takes no new clients then and exits once its last one has: the
        trials' processes, which Ray's shutdown ends but which took more than 10 s to go after it in session 36
        (one H100; the quit, synchronous, ran into its 10-s timeout at the end of every GPU sweep). So the control
        program that sends the quit runs in a session of its own, waited for `wait_s` (STOP_WAIT_S), then left to
        finish beside: the driver need not outlive the last client."""
        try:
            p = subprocess.Popen([CONTROL], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL, text=True, env={**os.environ, **self.env},
                                 start_new_session=True)
            p.stdin.write("quit\n")
            p.stdin.close()
            p.wait(timeout=STOP_WAIT_S if wait_s is None else wait_s)
        except (OSError, subprocess.SubprocessError):
            pass


def folders_for(run_dir: str) -> tuple[str, str]:
    """(pipe folder, log folder) of this run directory's daemon: short paths under the temp folder (a UNIX
    socket path has ~100 bytes), one pair per run directory."""
    h = hashlib.sha256(run_dir.encode()).hexdigest()[:12]
    base = os.path.join(tempfile.gettempdir(), f"ulsweep-mps-{h}")
    return os.path.join(base, "pipe"), os.path.join(base, "log")


def _answers(pipe_dir: str) -> bool:
    """A daemon serves `pipe_dir` (its control pipe exists and it answers a query)."""
    if not os.path.exists(os.path.join(pipe_dir, "control")):
        return False
    try:
        r = subprocess.run([CONTROL], input="get_server_list\n", text=True, capture_output=True, timeout=10,
                           env={**os.environ, "CUDA_MPS_PIPE_DIRECTORY": pipe_dir})
    except (OSError, subprocess.SubprocessError):
        return False
    return r.returncode == 0


def _cuda_available() -> bool:
    """Whether CUDA sees a GPU here, asked of the driver library itself (libcuda's cuInit and cuDeviceGetCount,
    which honour CUDA_VISIBLE_DEVICES) rather than through torch: the sweep's driver asks before Ray starts, and
    importing torch there cost seconds on the GPU machine; the daemon's probe then runs a CUDA program."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:  # no NVIDIA driver
        return False
    count = ctypes.c_int(0)
    try:
        return cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    except AttributeError:  # not the CUDA driver's library
        return False


def why_not(*, address: str | None, ray_running: bool, gpus_per_worker: float) -> str | None:
    """Why this run (asking for a daemon) cannot start one of its own, or None when it can."""
    if address:
        return (f"the run joins a cluster ({address}): start a daemon on every GPU node with the node and leave "
                "resources.mps off")
    if ray_running:
        return "Ray was already running in this process: its workers would not see the daemon's pipe"
    if not 0 < gpus_per_worker < 1:  # `on` is refused with such a value when the config loads
        return f"trials do not share GPUs (resources.gpus_per_worker {gpus_per_worker})"
    if shutil.which(CONTROL) is None:
        return f"{CONTROL} is not on PATH (NVIDIA's driver utilities)"
    if not _cuda_available():
        return "CUDA is not available here"
    return None


def serving() -> str | None:
    """The pipe folder of a daemon that already serves this machine's CUDA clients (where this process's
    environment points them), or None."""
    pipe = os.environ.get("CUDA_MPS_PIPE_DIRECTORY") or DEFAULT_PIPE
    return pipe if _answers(pipe) else None


def start_for_run(setting: str, run_dir: str, *, address: str | None, ray_running: bool, gpus_per_worker: float,
                  out=None) -> MpsDaemon | None:
    """The daemon for this run under `resources.mps: setting`, started, taken over or None (with a line to
    `out` saying why for `auto`); raises MpsError for `on` when it cannot be had."""
    out = out or sys.stdout
    if setting == "off":
        return None
    reason = why_not(address=address, ray_running=ray_running, gpus_per_worker=gpus_per_worker)
    if reason is not None:
        return _refuse(setting, reason, out)
    if (other := serving()) is not None:  # an administrator's daemon: the trials are clients already
        print(f"mps: a daemon already serves {other}; trials use it", file=out, flush=True)
        return None
    pipe, log = folders_for(run_dir)
    daemon = MpsDaemon(pipe, log)
    if _answers(pipe):
        print(f"mps: taking over the daemon a previous run of {run_dir} left at {pipe}", file=out, flush=True)
    else:
        os.makedirs(pipe, exist_ok=True)
        os.makedirs(log, exist_ok=True)
        said = os.path.join(log, "start.txt")  # a file, not a pipe: the daemon that forks off may keep it open
        try:
            with open(said, "w") as f:
                r = subprocess.run([CONTROL, "-d"], env={**os.environ, **daemon.env}, stdin=subprocess.DEVNULL,
                                   stdout=f, stderr=subprocess.STDOUT, timeout=30)
        except (OSError, subprocess.SubprocessError) as e:
            return _refuse(setting, f"{CONTROL} -d failed: {e}", out)
        if r.returncode != 0:
            with open(said) as f:
                return _refuse(setting, f"{CONTROL} -d exited {r.returncode}: {f.read().strip()[-300:]}", out)
        t0 = time.monotonic()
        while not os.path.exists(os.path.join(pipe, "control")):
            if time.monotonic() - t0 > START_S:
                daemon.stop(wait_s=START_S)  # no client: its quit is quick, and done before the run goes on
                return _refuse(setting, f"the daemon opened no control pipe in {pipe} within {START_S:.0f} s "
                                        f"(its log: {log})", out)
            time.sleep(0.1)
    ok, said = probe(daemon)
    if not ok:
        daemon.stop(wait_s=START_S)
        return _refuse(setting, f"a CUDA process failed under the daemon (its log: {log}): {said}", out)
    print(f"mps: trials share the GPU through an MPS daemon (pipe {pipe}, log {log})", file=out, flush=True)
    return daemon


def probe(daemon: MpsDaemon) -> tuple[bool, str]:
    """Run a tiny CUDA program as an MPS client of `daemon`: (it worked, the tail of its output). The program
    against libcuda first (PROBE_LIBCUDA); where it failed, torch's (PROBE), whose answer stands."""
    ok, said = _probe_with(PROBE_LIBCUDA, daemon)
    return (ok, said) if ok else _probe_with(PROBE, daemon)


def _probe_with(program: str, daemon: MpsDaemon) -> tuple[bool, str]:
    try:
        r = subprocess.run([sys.executable, "-c", program], env={**os.environ, **daemon.env}, capture_output=True,
                           text=True, timeout=PROBE_S)
    except subprocess.TimeoutExpired:
        return False, f"no answer within {PROBE_S:.0f} s"
    except OSError as e:
        return False, str(e)
    said = (r.stdout + r.stderr).strip()
    return r.returncode == 0 and "mps probe ok" in r.stdout, said[-400:]


def _refuse(setting: str, reason: str, out) -> None:
    if setting == "on":
        raise MpsError(f"resources.mps: on: {reason}")
    print(f"mps: not used ({reason})", file=out, flush=True)
    return None
