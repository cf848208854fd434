"""A cross-process lease on one file, on a local path or an fsspec URI: who does a one-time job.

    lease = Lease.claim(uri)        the lease, or None when another process holds it
    with lease: ... do the job ...  a thread rewrites the file every `heartbeat_s` while the job runs;
                                    leaving the block deletes the file
    LeaseWatch(uri, stale_s)        a waiter's view of someone else's lease: stale when its content has not
                                    changed for `stale_s` seconds of the waiter's own clock (no clock
                                    comparison between machines), or at once when its owner was a process
                                    of this host that no longer exists

Claiming is an atomic create: O_CREAT | O_EXCL on local disks, a conditional PUT (`If-None-Match: *`,
fsspec's `pipe_file(mode="create")`) on S3. Filesystems without an atomic create fall back to fsspec's
exists-then-write, so two claimants can both win a narrow race there: callers must stay correct when two
holders run the job (ulsweep's latent cache writes each holder's files under its own token and publishes
with a manifest written last), the lease only saves the duplicate work.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
import uuid

from fsspec.implementations.local import LocalFileSystem

from ulsweep import io as uio

HEARTBEAT_S = 10.0  # how often a holder rewrites its lease file
STALE_S = 120.0  # how long a lease may stay unchanged before a waiter takes it over


def _create_exclusive(uri: str, data: bytes) -> bool:
    """Create `uri` holding `data` unless it exists; True when this call created it."""
    fs, path = uio.filesystem(uri)
    if isinstance(fs, LocalFileSystem):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return True
    parent = path.rsplit("/", 1)[0]
    if parent and parent != path:
        fs.makedirs(parent, exist_ok=True)
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    return True


def read_lease(uri: str) -> bytes | None:
    """The lease file's bytes, or None when there is none."""
    try:
        return uio.read_bytes(uri)
    except FileNotFoundError:
        return None


class Lease:
    """A held lease (see the module docstring). `token` names this holder. The heartbeat stops when the file
    no longer holds this holder's record (another process judged it stale and took it over)."""

    def __init__(self, uri: str, record: dict, heartbeat_s: float):
        self.uri, self.record, self.heartbeat_s = uri, record, heartbeat_s
        self.token: str = record["token"]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def claim(cls, uri: str, heartbeat_s: float = HEARTBEAT_S, **info) -> "Lease | None":
        """Take the lease at `uri` if nobody holds it. `info` (JSON values) is stored in the file for
        whoever waits, e.g. what the holder is doing."""
        record = {"token": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                  "beat": 0, "time": time.time(), **info}
        if not _create_exclusive(uri, json.dumps(record).encode()):
            return None
        return cls(uri, record, heartbeat_s)

    def __enter__(self) -> "Lease":
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _mine(self) -> bool:
        raw = read_lease(self.uri)
        try:
            return raw is not None and json.loads(raw).get("token") == self.token
        except ValueError:
            return False

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                if not self._mine():
                    return
                self.record.update(beat=self.record["beat"] + 1, time=time.time())
                uio.atomic_write_bytes(self.uri, json.dumps(self.record).encode())
            except OSError:  # a storage hiccup: the next beat tries again
                continue

    def release(self) -> None:
        """Stop the heartbeat and delete the lease file if it is still this holder's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            if self._mine():
                fs, path = uio.filesystem(self.uri)
                fs.rm(path)
        except (FileNotFoundError, OSError):
            pass


class LeaseWatch:
    """A waiter's view of a lease held by someone else: `stale()` per the module docstring."""

    def __init__(self, uri: str, stale_s: float = STALE_S):
        self.uri, self.stale_s = uri, stale_s
        self.seen: bytes | None = None
        self.since = time.monotonic()

    def look(self) -> bytes | None:
        """Read the lease file; remember when its content last changed. None when it is gone."""
        raw = read_lease(self.uri)
        if raw != self.seen:
            self.seen, self.since = raw, time.monotonic()
        return raw

    def holder(self) -> dict:
        try:
            return json.loads(self.seen or b"{}")
        except ValueError:
            return {}

    def stale(self) -> bool:
        if self.seen is None:
            return False
        h = self.holder()
        if h.get("host") == socket.gethostname() and isinstance(h.get("pid"), int) and not _alive(h["pid"]):
            return True
        return time.monotonic() - self.since >= self.stale_s

    def take_over(self) -> bool:
        """Delete a stale lease, unless its content changed since it was last seen (its holder woke up);
        True when it was deleted here."""
        if read_lease(self.uri) != self.seen:
            return False
        try:
            fs, path = uio.filesystem(self.uri)
            fs.rm(path)
        except FileNotFoundError:
            return False
        return True


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError as e:  # EPERM: it exists, owned by someone else
        return e.errno == errno.EPERM
    return True
