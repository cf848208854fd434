"""Interrupted and damaged writes: a checkpoint, a Parquet dataset or a result.json whose write was cut
short (an exception between write and rename, or SIGKILL of the writing process) is never read as valid,
and a corrupted or truncated checkpoint is refused by its hash before torch.load sees a byte."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from ulsweep import io as uio
from ulsweep.data import DataError, open_dataset, write_dataset
from ulsweep.train import checkpoint as ck
from ulsweep.train.hooks import StageResult

STATE = {"w": torch.arange(1000, dtype=torch.float32), "step": 1}


class ReplaceFails:
    """os.replace that raises on its n-th call (1-based), like a crash between write and rename. The error is
    EIO, which ulsweep.io does not retry (a full or read-only storage, ENOSPC/EROFS, would be retried)."""

    def __init__(self, n: int):
        self.n, self.calls, self.real = n, 0, os.replace

    def __call__(self, src, dst):
        self.calls += 1
        if self.calls == self.n:
            raise OSError(errno.EIO, "Input/output error (injected)")
        return self.real(src, dst)


@pytest.mark.parametrize("nth, left", [(1, "nothing"), (2, "state.pt without meta.json")])
def test_checkpoint_write_cut_short_is_never_a_checkpoint(tmp_path, monkeypatch, nth, left):
    run = str(tmp_path / "run")
    ck.save_checkpoint(run, 1, STATE, {"kind": "t"})
    monkeypatch.setattr(uio.os, "replace", ReplaceFails(nth))
    with pytest.raises(OSError, match="injected"):
        ck.save_checkpoint(run, 2, {**STATE, "step": 2}, {"kind": "t"})
    monkeypatch.undo()
    d2 = tmp_path / "run" / "checkpoints" / "step_00000002"
    assert sorted(p.name for p in d2.iterdir()) == ([] if nth == 1 else ["state.pt"]), left
    with pytest.warns(UserWarning, match="incomplete checkpoint") if nth == 2 else _nothing():
        assert [c.step for c in ck.list_checkpoints(run)] == [1]
    with pytest.raises(ck.CheckpointError, match="step_00000002: no meta.json"):
        ck.load_checkpoint(str(d2))
    state, meta = ck.latest_valid_checkpoint(run)
    assert meta["step"] == 1 and torch.equal(state["w"], STATE["w"])


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize("kill_at", [1, 2])  # SIGKILL before the state's rename, before the manifest's
def test_writer_sigkilled_mid_checkpoint_leaves_the_previous_one_in_force(tmp_path, kill_at):
    run = str(tmp_path / "run")
    script = textwrap.dedent(f"""
        import os, signal, torch
        from ulsweep import io as uio
        from ulsweep.train import checkpoint as ck
        ck.save_checkpoint({run!r}, 1, {{"w": torch.zeros(3)}}, {{}})
        real, n = os.replace, [0]
        def replace(a, b):
            n[0] += 1
            if n[0] == {kill_at}:
                os.kill(os.getpid(), signal.SIGKILL)
            real(a, b)
        uio.os.replace = replace
        ck.save_checkpoint({run!r}, 2, {{"w": torch.ones(10**6)}}, {{}})
    """)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert p.returncode == -signal.SIGKILL, p.stderr
    left = sorted(x.name for x in (tmp_path / "run" / "checkpoints" / "step_00000002").iterdir())
    assert left and all(n.startswith(".tmp-") or n == "state.pt" for n in left), left  # debris, no manifest
    state, meta = ck.latest_valid_checkpoint(run)
    assert meta["step"] == 1 and torch.equal(state["w"], torch.zeros(3))


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupted_checkpoint_refused_by_hash_before_torch_load(tmp_path, monkeypatch, damage):
    d = ck.save_checkpoint(str(tmp_path / "run"), 3, STATE, {})
    f = tmp_path / "run" / "checkpoints" / "step_00000003" / "state.pt"
    blob = bytearray(f.read_bytes())
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    else:
        blob[len(blob) // 2] ^= 0xFF
    f.write_bytes(bytes(blob))

    def no_load(*a, **k):
        raise AssertionError("torch.load reached a corrupted checkpoint")

    monkeypatch.setattr(torch, "load", no_load)
    with pytest.raises(ck.CheckpointError, match=r"step_00000003/state.pt: SHA-256 .* does not match .*refusing"):
        ck.load_checkpoint(d)
    with pytest.warns(UserWarning, match="not resuming from a bad checkpoint"):
        assert ck.latest_valid_checkpoint(str(tmp_path / "run")) is None


def _images(n, value):
    return np.full((n, 1, 4, 4), value, np.uint8), np.zeros(n, np.int64)


@pytest.mark.parametrize("nth", [1, 2])  # the first shard's rename, the manifest's rename
def test_parquet_write_cut_short_is_never_read_as_valid(tmp_path, monkeypatch, nth):
    uri = str(tmp_path / "ds")
    write_dataset(uri, "ds", {"train": _images(6, 1)}, shard_rows=3)
    monkeypatch.setattr(uio.os, "replace", ReplaceFails(nth))
    with pytest.raises(OSError, match="injected"):
        write_dataset(uri, "ds", {"train": _images(6, 2)}, shard_rows=3, overwrite=True)
    monkeypatch.undo()
    try:  # either the old dataset, complete, or a refusal: never new bytes under the old manifest
        images, _ = open_dataset(uri).load_split("train")
        assert (images == 1).all()
    except DataError as e:
        assert "SHA-256 mismatch" in str(e) or "missing" in str(e), e
    fresh = str(tmp_path / "fresh")
    monkeypatch.setattr(uio.os, "replace", ReplaceFails(nth + 1))
    with pytest.raises(OSError, match="injected"):
        write_dataset(fresh, "fresh", {"train": _images(6, 3)}, shard_rows=3)
    monkeypatch.undo()
    with pytest.raises(DataError, match="dataset manifest is missing"):
        open_dataset(fresh)


def test_result_json_cut_short_means_not_finished(tmp_path, monkeypatch):
    run = str(tmp_path / "run")

    def publish():  # the end of the training loop (ulsweep/train/loop.py): final checkpoint, then result.json
        path = ck.save_checkpoint(run, 5, STATE, {})
        ck.write_result(run, StageResult({"bpp": 0.1}, path, 5, 1.0), "h")

    monkeypatch.setattr(uio.os, "replace", ReplaceFails(3))  # state.pt, meta.json, then result.json
    with pytest.raises(OSError, match="injected"):
        publish()
    monkeypatch.undo()
    assert ck.finished_result(run, "h") is None  # not finished: the loop resumes from step 5 and publishes again
    (tmp_path / "run" / "result.json").write_text('{"metrics": {"bpp": 0.1}, "check')  # a torn file
    with pytest.warns(UserWarning, match="unreadable result"):
        assert ck.finished_result(run, "h") is None
    publish()
    assert ck.finished_result(run, "h").metrics == {"bpp": 0.1}
    assert json.loads((tmp_path / "run" / "result.json").read_text())["steps"] == 5


def test_a_file_written_from_a_path_has_its_hash_and_leaves_no_debris(tmp_path, monkeypatch):
    """`write_atomic_with` on a local path: the writer gets a path (torch.save then writes without the GIL), the
    SHA-256 and size returned are the file's, nothing else is left in its directory, and torch.save's archive
    (named after the file) comes out byte for byte the same on every write."""
    import hashlib

    targets = []
    real_save = torch.save

    def save(obj, target):
        targets.append(target)
        real_save(obj, target)

    monkeypatch.setattr(torch, "save", save)
    digests = []
    for run in ("a", "b"):
        d = ck.save_checkpoint(str(tmp_path / run), 1, STATE, {})
        blob = (tmp_path / run / "checkpoints" / "step_00000001" / "state.pt").read_bytes()
        meta = ck.read_meta(d)
        assert meta["sha256"] == hashlib.sha256(blob).hexdigest() and meta["bytes"] == len(blob)
        assert sorted(p.name for p in (tmp_path / run / "checkpoints" / "step_00000001").iterdir()) == \
            ["meta.json", "state.pt"]
        digests.append(meta["sha256"])
    assert all(isinstance(t, str) for t in targets) and len(targets) == 2
    assert digests[0] == digests[1]
    state, _ = ck.load_checkpoint(str(tmp_path / "a" / "checkpoints" / "step_00000001"))
    assert torch.equal(state["w"], STATE["w"]) and state["step"] == 1


def test_a_writer_that_fails_leaves_the_file_before_it_and_no_debris(tmp_path):
    """A `write_atomic_with` writer that raises half way: its error goes on, the file written before stays whole
    and the writer's temporary directory is gone."""
    f = tmp_path / "d" / "x.bin"

    def whole(target):
        with open(target, "wb") as out:
            out.write(b"old" * 10)

    def half(target):
        with open(target, "wb") as out:
            out.write(b"new")
        raise RuntimeError("writer failed (injected)")

    _, size = uio.write_atomic_with(str(f), whole)
    assert f.read_bytes() == b"old" * 10 and size == 30

    with pytest.raises(RuntimeError, match="injected"):
        uio.write_atomic_with(str(f), half)
    assert f.read_bytes() == b"old" * 10 and sorted(p.name for p in f.parent.iterdir()) == ["x.bin"]


def test_a_file_written_to_an_object_store_is_one_put_of_a_buffer():
    """`write_atomic_with` on an object store (memory://): the writer fills a buffer, published in one PUT, and
    the hash and size returned are the object's."""
    import hashlib
    import io as pyio

    seen = []

    def write(target):
        seen.append(type(target))
        target.write(b"abc" * 7)

    digest, size = uio.write_atomic_with("memory://ulsweep-tests/write-with/x.bin", write)
    assert seen == [pyio.BytesIO] and size == 21
    assert uio.read_bytes("memory://ulsweep-tests/write-with/x.bin") == b"abc" * 7
    assert digest == hashlib.sha256(b"abc" * 7).hexdigest()


def test_a_writer_failing_on_a_full_file_system_is_retried_as_a_storage_error(tmp_path, monkeypatch):
    """torch.save's C++ writer fails with a RuntimeError that names no errno: on a file system that is then full
    (statvfs), `write_atomic_with` raises it as ENOSPC, which `retry_storage` retries until the space is back; on
    one with space, the writer's own error goes on at once."""
    import os as pyos

    monkeypatch.setenv("ULSWEEP_STORAGE_RETRY_S", "30")
    real_statvfs, calls = pyos.statvfs, []

    class Full:
        def __init__(self, st):
            self.f_flag, self.f_frsize, self.f_bavail = st.f_flag, st.f_frsize, 0

    def writer(target):
        calls.append(target)
        if len(calls) == 1:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed (injected)")
        with open(target, "wb") as out:
            out.write(b"whole")

    monkeypatch.setattr(uio.os, "statvfs", lambda d: Full(real_statvfs(d)))
    f = tmp_path / "x.bin"
    _, size = uio.write_atomic_with(str(f), writer)
    assert len(calls) == 2 and f.read_bytes() == b"whole" and size == 5
    monkeypatch.setattr(uio.os, "statvfs", real_statvfs)
    calls.clear()
    with pytest.raises(RuntimeError, match="injected"):
        uio.write_atomic_with(str(tmp_path / "y.bin"), writer)
    assert len(calls) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["x.bin"]
