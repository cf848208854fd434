"""Atomic file I/O on local paths and fsspec URIs.

Local files are written to a temporary name in the same directory, fsynced and renamed (os.replace),
so a reader never sees a partial file. Object stores (s3://, gs://, memory://) write each object in one
PUT; callers that need several files to appear together write a manifest last.

A write the storage refuses for a reason that passes (read-only file system, no space left, quota
exceeded: a remount, a full disk being cleaned) is retried with backoff for up to `storage_retry_s()`
seconds ($ULSWEEP_STORAGE_RETRY_S, default 120) before its error is raised; a training loop waits there
instead of failing its trial.

Also the one place that says where ulsweep's local cache lives (`cache_root`, `cache_dir`).
"""
from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import shutil
import tempfile
import time
from typing import BinaryIO, Callable

import fsspec
from fsspec.implementations.local import LocalFileSystem


log = logging.getLogger(__name__)

CACHE_ENV = "ULSWEEP_CACHE"
STORAGE_RETRY_ENV = "ULSWEEP_STORAGE_RETRY_S"
# errors of a storage that may take writes again soon (EDQUOT: a quota, cleaned up like a full disk)
PASSING_ERRNOS = frozenset({errno.EROFS, errno.ENOSPC, errno.EDQUOT})
CACHE_KINDS = ("datasets", "extractors", "refstats", "compile", "stores")


def cache_root() -> str:
    """ulsweep's cache root: $ULSWEEP_CACHE, else ~/.cache/ulsweep."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "ulsweep")


def cache_dir(kind: str) -> str:
    """The cache folder of one kind of file, `<cache_root()>/<kind>`: `datasets` (materialised builtin
    datasets), `extractors` (domain extractors trained for `eval.extractor: domain`), `refstats` (reference
    feature statistics of Fréchet distances), `compile` (compiled programs, ulsweep/train/compile_artifacts.py),
    `stores` (an empty, migrated MLflow store that new sqlite stores are copied from, ulsweep/tracking/runs.py)."""
    if kind not in CACHE_KINDS:
        raise ValueError(f"unknown cache kind {kind!r}; known: {', '.join(CACHE_KINDS)}")
    return os.path.join(cache_root(), kind)


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path or URI."""
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def join(base: str, *parts: str) -> str:
    """Join URI/path segments with '/' (works for local paths and URIs)."""
    out = base.rstrip("/")
    for p in parts:
        out = f"{out}/{p.strip('/')}"
    return out


def is_local(uri: str) -> bool:
    return isinstance(filesystem(uri)[0], LocalFileSystem)


def storage_retry_s() -> float:
    """How long a write refused with a passing storage error is retried ($ULSWEEP_STORAGE_RETRY_S, default 120)."""
    try:
        return max(0.0, float(os.environ.get(STORAGE_RETRY_ENV, "120")))
    except ValueError:
        return 120.0


def retry_storage(fn, what: str):
    """fn(), retried with backoff while it raises an OSError of PASSING_ERRNOS, for up to storage_retry_s()
    seconds; then (or for any other error) the error is raised. One warning per refused write."""
    deadline, delay = None, 0.25
    while True:
        try:
            return fn()
        except OSError as e:
            if e.errno not in PASSING_ERRNOS:
                raise
            now = time.monotonic()
            if deadline is None:
                deadline = now + storage_retry_s()
                log.warning("storage refused writing %s (%s); retrying for up to %.0f s", what,
                            e.strerror or e, deadline - now)
            if now >= deadline:
                raise
            time.sleep(min(delay, deadline - now))
            delay = min(delay * 2, 5.0)


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `data` to `path` on `fs` so that readers see the old file or the whole new one; a write the
    storage refuses for a passing reason is retried (`retry_storage`)."""
    retry_storage(lambda: _write_atomic(fs, path, data), path)


def _write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    from ulsweep.testing import faults

    faults.storage(path)  # tests: a storage window (read-only / full) injected for this path
    if isinstance(fs, LocalFileSystem):
        d = os.path.dirname(os.path.abspath(path))
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix="-" + os.path.basename(path))
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)  # atomic rename on POSIX
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    else:  # object stores publish one PUT atomically (and have no atomic rename)
        parent = path.rsplit("/", 1)[0]
        if parent and parent != path:
            fs.makedirs(parent, exist_ok=True)
        fs.pipe_file(path, bytes(data) if not isinstance(data, bytes) else data)  # a bytes-like buffer too


def write_atomic_with(uri: str, write: Callable[[str | BinaryIO], None]) -> tuple[str, int]:
    """The file at `uri` written by `write(target)` with `write_atomic`'s guarantees (readers see the old file or
    the whole new one; a passing storage error retried); returns the SHA-256 (hex) and size of what was written.

    On a local path `target` is a path, `<dir>/.tmp-<random>/<name>` (the file's own name, so that a format that
    records it, as torch.save's archive does, comes out the same every time), read back for its hash, fsynced and
    renamed into place: a writer that takes a path writes without the GIL where it can (torch.save's C++ writer;
    given a file object it calls back into Python for every record and holds the GIL while the bytes are copied,
    which stalls the threads launching a GPU's kernels beside it: `benchmarks/eval_beside_writes.py`). On an object
    store `target` is an in-memory buffer, published in one PUT."""
    fs, path = filesystem(uri)
    return retry_storage(lambda: _write_atomic_with(fs, path, write), path)


def _write_atomic_with(fs: fsspec.AbstractFileSystem, path: str, write) -> tuple[str, int]:
    from ulsweep.testing import faults

    if not isinstance(fs, LocalFileSystem):
        buf = io.BytesIO()
        write(buf)
        data = buf.getvalue()
        _write_atomic(fs, path, data)
        return hashlib.sha256(data).hexdigest(), len(data)
    faults.storage(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    tmp_dir = tempfile.mkdtemp(dir=d, prefix=".tmp-")
    tmp = os.path.join(tmp_dir, os.path.basename(path))
    try:
        try:
            write(tmp)
        except OSError:
            raise
        except Exception as e:  # noqa: BLE001 - torch.save's C++ writer says "file write failed", not why
            passing = _passing_storage_error(d)
            if passing is None:
                raise
            raise passing from e
        with open(tmp, "rb+") as f:
            digest, size = _sha256_of(f)
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic rename on POSIX
        return digest, size
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def _sha256_of(f: BinaryIO) -> tuple[str, int]:
    """SHA-256 (hex) and size of what is left to read in file `f`, read in chunks (hashlib releases the GIL on
    chunks this large, and no copy of the whole file is held)."""
    digest, size = hashlib.sha256(), 0
    while chunk := f.read(HASH_CHUNK):
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def file_sha256(uri: str) -> tuple[str, int]:
    """SHA-256 (hex) and size of the file at `uri` (local path or URI), read in chunks."""
    fs, path = filesystem(uri)
    with fs.open(path, "rb") as f:
        return _sha256_of(f)


HASH_CHUNK = 16 << 20  # bytes read at a time for a file's SHA-256
FULL_BYTES = 16 << 20  # a file system with less than this left to a writer counts as full


def _passing_storage_error(d: str) -> OSError | None:
    """The passing storage error (PASSING_ERRNOS) that explains a failed write into directory `d`, judged from
    its file system now (read-only, or full: under FULL_BYTES left), or None: for a writer whose own error does
    not carry the errno (torch.save's C++ writer), so that such a write is retried as `f.write`'s would be."""
    try:
        st = os.statvfs(d)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return OSError(errno.EROFS, "Read-only file system (the write into it failed)", d)
    if st.f_bavail * st.f_frsize < FULL_BYTES:
        return OSError(errno.ENOSPC, "No space left on device (the write into it failed)", d)
    return None


def atomic_write_bytes(uri: str, data: bytes | memoryview) -> None:
    """`data` (bytes, or any bytes-like buffer) at `uri`, written atomically (`write_atomic`)."""
    fs, path = filesystem(uri)
    write_atomic(fs, path, data)


def atomic_write_text(uri: str, text: str) -> None:
    atomic_write_bytes(uri, text.encode())


def atomic_write_bytes_once(uri: str, data: bytes | memoryview) -> None:
    """`atomic_write_bytes` without its retries: the storage's refusal is raised at once (for a writer that must
    not wait on it, e.g. a compile claim, compile_gate.claim_ahead, or a cache's copy, tracking.runs)."""
    _write_atomic(*filesystem(uri), data)


def atomic_write_text_once(uri: str, text: str) -> None:
    atomic_write_bytes_once(uri, text.encode())


def append_text(uri: str, text: str) -> None:
    """Append `text` to a small file (created if missing): read, add, write back atomically, since object
    stores cannot append. For logs of a few lines, never for data."""
    old = read_bytes(uri) if exists(uri) else b""
    atomic_write_bytes(uri, old + text.encode())


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    return fs.cat_file(path)


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.exists(path)


def listdir(uri: str) -> list[str]:
    """Base names of the entries directly under `uri` (empty if it does not exist)."""
    fs, path = filesystem(uri)
    if not fs.exists(path):
        return []
    return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False))


def makedirs(uri: str) -> None:
    fs, path = filesystem(uri)
    fs.makedirs(path, exist_ok=True)
