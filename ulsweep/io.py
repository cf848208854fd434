"""Atomic file I/O on local paths and fsspec URIs.

Local files are written to a temporary name in the same directory, fsynced and renamed (os.replace),
so a reader never sees a partial file. Object stores (s3://, gs://, memory://) write each object in one
PUT; callers that need several files to appear together write a manifest last.

Also the one place that says where ulsweep's local cache lives (`cache_root`, `cache_dir`).
"""
from __future__ import annotations

import os
import tempfile

import fsspec
from fsspec.implementations.local import LocalFileSystem


CACHE_ENV = "ULSWEEP_CACHE"
CACHE_KINDS = ("datasets", "extractors", "refstats")


def cache_root() -> str:
    """ulsweep's cache root: $ULSWEEP_CACHE, else ~/.cache/ulsweep."""
    return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "ulsweep")


def cache_dir(kind: str) -> str:
    """The cache folder of one kind of file, `<cache_root()>/<kind>`: `datasets` (materialised builtin
    datasets), `extractors` (domain extractors trained for `eval.extractor: domain`), `refstats` (reference
    feature statistics of Fréchet distances)."""
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


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write `data` to `path` on `fs` so that readers see the old file or the whole new one."""
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
        fs.pipe_file(path, data)


def atomic_write_bytes(uri: str, data: bytes) -> None:
    fs, path = filesystem(uri)
    write_atomic(fs, path, data)


def atomic_write_text(uri: str, text: str) -> None:
    atomic_write_bytes(uri, text.encode())


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
