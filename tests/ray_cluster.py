"""Test helpers: a multi-node local Ray cluster (`ray start --head` + `ray start --address`), stopped by the test
that started it, and a private network namespace in which servers that bind every interface stay on loopback.

    with private_network():                       # optional; needs root (CAP_SYS_ADMIN)
        cluster = LocalRayCluster(env, nodes=2)
        try:
            address = cluster.start()             # "127.0.0.1:<port>"
            ...
        finally:
            cluster.stop()                        # exactly its own processes (temp dir + their children)

Nothing here runs a machine-wide `ray stop`.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_range(n: int) -> int:
    """First port of n consecutive free ports below the ephemeral range (32768+), where free_port's picks (and
    Ray's fixed defaults such as 52365) cannot fall into it."""
    for _ in range(50):
        lo = random.randrange(20000, 32000 - n)
        socks = []
        try:
            for q in range(lo, lo + n):
                sk = socket.socket()
                socks.append(sk)
                sk.bind(("127.0.0.1", q))
            return lo
        except OSError:
            continue
        finally:
            for sk in socks:
                sk.close()
    raise RuntimeError("no free port range")


def node_ports() -> list[str]:
    """Explicit ports for every per-node Ray component: two nodes on one host must not share a default."""
    lo = free_range(200)
    return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
            f"--min-worker-port={lo}", f"--max-worker-port={lo + 199}"]


def pids_with(text: str) -> list[int]:
    """Processes (not this one) whose command line contains `text`."""
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmd:
            out.append(int(p.name))
    return out


def _parents() -> dict[int, int]:
    out = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                # the command name may hold spaces and parentheses: the ppid is the 2nd field after the last ')'
                out[int(p.name)] = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    return out


def with_descendants(pids) -> set[int]:
    """`pids` and every process below them."""
    parents = _parents()
    found = set(pids)
    grew = True
    while grew:
        grew = False
        for child, parent in parents.items():
            if parent in found and child not in found:
                found.add(child)
                grew = True
    return found


def alive(pid: int) -> bool:
    """Whether the process runs (a zombie, state Z, has exited)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_all(pids, grace_s: float = 5.0) -> set[int]:
    """SIGTERM, then after `grace_s` SIGKILL; returns the pids still alive (zombies count as gone)."""
    pids = set(pids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for p in [p for p in pids if alive(p)]:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + grace_s
        while time.time() < deadline and any(alive(p) for p in pids):
            time.sleep(0.2)
    return {p for p in pids if alive(p)}


class LocalRayCluster:
    """`nodes` Ray nodes on this host, one `ray start` each, sharing a temp dir of their own."""

    def __init__(self, env: dict, nodes: int = 2, cpus_per_node: int = 1, node_ip: str | None = None):
        self.env, self.nodes, self.cpus, self.node_ip = env, nodes, cpus_per_node, node_ip
        # short: Ray's socket paths must stay < 108 bytes
        self.temp_dir = Path("/tmp") / f"ulsw-rc-{os.getpid()}-{random.randrange(10**6)}"
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.ray_bin = str(Path(sys.executable).parent / "ray")

    def _start(self, *args: str) -> None:
        ip = [f"--node-ip-address={self.node_ip}"] if self.node_ip else []
        p = subprocess.run([self.ray_bin, "start", f"--num-cpus={self.cpus}", f"--temp-dir={self.temp_dir}",
                            "--disable-usage-stats", *ip, *args, *node_ports()],
                           env=self.env, capture_output=True, text=True, timeout=180)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    def start(self) -> str:
        self._start("--head", f"--port={self.port}", "--include-dashboard=false")
        for _ in range(self.nodes - 1):
            self._start(f"--address={self.address}")
        return self.address

    def pids(self) -> set[int]:
        """Every process of this cluster: those naming its temp dir and their children (e.g. Ray's agents)."""
        return with_descendants(pids_with(str(self.temp_dir)))

    def session_logs(self) -> list[Path]:
        return [p for p in self.temp_dir.glob("session_*/logs/**/*") if p.is_file()]

    def stop(self) -> None:
        left = kill_all(self.pids())
        left |= kill_all(self.pids())  # anything started while the first round ran
        assert not left, f"Ray processes of the test cluster survived: {sorted(left)}"
        shutil.rmtree(self.temp_dir, ignore_errors=True)


# ----------------------------------------------------------------------------------------------
# private network namespace

_CLONE_NEWNET = 0x40000000


def private_network_unavailable() -> str | None:
    """Why this process cannot make a private network namespace, or None if it can."""
    if os.geteuid() != 0:
        return "a private network namespace needs root (CAP_SYS_ADMIN)"
    if not Path("/proc/self/ns/net").exists():
        return "no /proc/self/ns/net (network namespaces unsupported)"
    missing = [b for b in ("ip", "ss") if shutil.which(b) is None]
    if missing:
        return f"iproute2 absent (no {', '.join(missing)}; Debian package `iproute2`)"
    return None


@contextlib.contextmanager
def private_network():
    """Move the calling thread (and every process it starts) into a new network namespace whose only interface
    is loopback, brought up; move back on exit. Servers that bind 0.0.0.0 inside are reachable from nowhere
    else. Yields the namespace's inode (compare with os.stat('/proc/PID/ns/net').st_ino)."""
    why = private_network_unavailable()
    if why:
        raise RuntimeError(why)
    libc = ctypes.CDLL(None, use_errno=True)
    original = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        if libc.unshare(_CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET) failed")
        try:
            # SIOCSIFFLAGS by hand would need struct ifreq; `ip` (iproute2) is the plain way
            subprocess.run(["ip", "link", "set", "lo", "up"], check=True, capture_output=True, timeout=30)
            _fresh_fsspec_loop()
            yield os.stat("/proc/thread-self/ns/net").st_ino
        finally:
            if libc.setns(original, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns back to the original network namespace failed")
            _fresh_fsspec_loop()
    finally:
        os.close(original)


def _fresh_fsspec_loop() -> None:
    """fsspec runs async filesystems (s3fs) on one IO thread per process, started on first use; a thread
    stays in the network namespace it started in. Forget it and the cached filesystem instances, so that
    the next use starts a new IO thread in the calling thread's namespace (without this, a test after a
    test that used s3fs inside another private namespace reached its own moto server from a dead one)."""
    import fsspec
    import fsspec.asyn

    fsspec.asyn.reset_lock()
    fsspec.AbstractFileSystem.clear_instance_cache()
    for cls in list(fsspec.registry.values()):
        if hasattr(cls, "clear_instance_cache"):
            cls.clear_instance_cache()


def interfaces(pid: int | str = "thread-self") -> list[str]:
    """Network interfaces visible in the namespace of process `pid`."""
    lines = Path(f"/proc/{pid}/net/dev").read_text().splitlines()[2:]
    return sorted(line.split(":", 1)[0].strip() for line in lines)
