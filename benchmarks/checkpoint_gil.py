"""How much a checkpoint write or read takes from a thread of small torch ops beside it (the GIL), CPU only, side
by side.

A GPU's training or evaluation thread is launch-bound: it needs the GIL between every two kernels, and a writer
thread that holds it (Python code, or a C++ call that does not release it) holds the launches up. Here a ticker
thread runs small CPU ops (a stand-in for those launches) while the main thread writes `--checkpoints` states of
`--mb` MB in `--tensors` tensors, then reads them back, then cuts a member's latents into shards:

    alone          the ticker with nothing beside it (`--alone-s` seconds): its ops/s
    previous       the write as `save_checkpoint` did until session 38: torch.save into an in-memory buffer (its
                   records copied through a Python callback), the buffer hashed and written atomically
    library        `ulsweep.train.checkpoint.save_checkpoint`: torch.save to the file's own path
                   (`io.write_atomic_with`), read back for the hash
    read:previous  the library's checkpoints read as `load_checkpoint` did until session 38: the file's bytes,
                   their hash, torch.load from an in-memory buffer (a Python callback a record)
    read:library   `load_checkpoint`: the file hashed in chunks, then torch.load from its path
    shards:previous  a member's latents (`--latent-rows` x `--latent-dim` float32) cut into Parquet shards as the
                   latent store did until session 38: the rows copied to bytes, the file written through a Python
                   file object
    shards:library the latent store's `_shard_bytes`: the rows viewed, the file written into Arrow's memory

Per row: `write_s`, the writes' (or reads') wall; `ticker_ops_per_s`; `ticker_lost_s`, the ticker's ops lost
against alone, in seconds of its alone rate (write_s x (1 - rate / alone rate)). The rows are repeated
`--repeats` times, in turn.

    python benchmarks/checkpoint_gil.py --out benchmarks/results/cpu-checkpoint-gil.json
"""
from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from timing import run_env, write_results  # noqa: E402  (beside this script)


def save_previous(run_dir: str, step: int, state: dict, meta: dict) -> str:
    """A checkpoint written as `save_checkpoint` wrote it until session 38 (module docstring)."""
    from ulsweep import io as uio
    from ulsweep.train.checkpoint import FORMAT, _write_manifest, step_dir

    buf = io.BytesIO()
    torch.save(state, buf)
    blob = buf.getvalue()
    d = step_dir(run_dir, step)
    uio.atomic_write_bytes(uio.join(d, "state.pt"), blob)
    _write_manifest(d, {"format": FORMAT, "step": step, "sha256": hashlib.sha256(blob).hexdigest(),
                        "bytes": len(blob), **meta})
    return d


def load_previous(path: str) -> dict:
    """A checkpoint read as `load_checkpoint` read it until session 38 (module docstring)."""
    from ulsweep import io as uio
    from ulsweep.train.checkpoint import read_meta

    meta = read_meta(path)
    blob = uio.read_bytes(uio.join(path, "state.pt"))
    if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
        raise RuntimeError(f"{path}: SHA-256 mismatch")
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


def shard_previous(z, first_row: int) -> bytes:
    """A latent shard's bytes as the latent store made them until session 38 (module docstring)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    n, D = z.shape
    col = pa.FixedSizeBinaryArray.from_buffers(pa.binary(4 * D), n, [None, pa.py_buffer(z.tobytes())])
    table = pa.table({"z": col, "index": pa.array(np.arange(first_row, first_row + n), pa.int64())})
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="none", use_dictionary=False, write_statistics=["index"])
    return sink.getvalue()


def beside_ticker(work) -> tuple[float, float]:
    """work()'s seconds and the ops/s of a thread of small torch ops running beside it."""
    a, b = torch.randn(64), torch.randn(64)
    stop, rate = threading.Event(), []

    def tick() -> None:
        n, t0 = 0, time.perf_counter()
        while not stop.is_set():
            for _ in range(100):
                a.add(b)
            n += 100
        rate.append(n / (time.perf_counter() - t0))

    th = threading.Thread(target=tick)
    th.start()
    t0 = time.perf_counter()
    try:
        work()
    finally:
        secs = time.perf_counter() - t0
        stop.set()
        th.join()
    return secs, rate[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=368.0, help="a checkpoint's size (lf_sweep's autoencoder: ~365 MB)")
    ap.add_argument("--tensors", type=int, default=800, help="its tensors (weights, EMA, two AdamW moments)")
    ap.add_argument("--checkpoints", type=int, default=3, help="checkpoints written a row")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--alone-s", type=float, default=3.0)
    ap.add_argument("--latent-rows", type=int, default=60000, help="a member's latents (lf_sweep: the 60,000 "
                    "training images)")
    ap.add_argument("--latent-dim", type=int, default=512, help="floats a latent (lf_sweep: 8 x 8 x 8)")
    ap.add_argument("--dir", default=None, help="where the checkpoints go (default: a temporary directory)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.mb <= 0 or min(args.tensors, args.checkpoints, args.latent_rows, args.latent_dim) < 1:
        ap.error("--mb, --tensors, --checkpoints, --latent-rows and --latent-dim must be positive")

    import numpy as np

    from ulsweep.train.checkpoint import load_checkpoint, save_checkpoint
    from ulsweep.train.latent_store import SHARD_BYTES, _shard_bytes

    torch.set_num_threads(1)  # the ticker's ops and the writes' copies, one core each
    numel = max(1, int(args.mb * 1e6 / 4 / args.tensors))
    state = {f"t{j}": torch.randn(numel) for j in range(args.tensors)}
    root = tempfile.mkdtemp(prefix="checkpoint-gil-", dir=args.dir)
    writers = {"previous": save_previous, "library": save_checkpoint}
    _, alone = beside_ticker(lambda: time.sleep(args.alone_s))
    rows = [{"row": "alone", "write_s": None, "ticker_ops_per_s": alone, "ticker_lost_s": 0.0}]
    print(f"{'row':>15} {'work s':>8} {'ticker ops/s':>13} {'ticker lost s':>14}")
    print(f"{'alone':>15} {'-':>8} {alone:>13.0f} {0.0:>14.2f}")
    z = np.random.default_rng(0).random((args.latent_rows, args.latent_dim), dtype=np.float32)
    per_shard = max(1, SHARD_BYTES // (4 * args.latent_dim))
    shards = {"shards:previous": shard_previous, "shards:library": _shard_bytes}
    readers = {"read:previous": load_previous, "read:library": lambda path: load_checkpoint(path)[0]}

    def row(name: str, work) -> None:
        secs, rate = beside_ticker(work)
        lost = secs * (1 - rate / alone)
        rows.append({"row": name, "write_s": secs, "ticker_ops_per_s": rate, "ticker_lost_s": lost})
        print(f"{name:>15} {secs:>8.2f} {rate:>13.0f} {lost:>14.2f}", flush=True)

    try:
        for _ in range(args.repeats):
            for name, save in writers.items():
                row(name, lambda: [save(os.path.join(root, f"{name}-{i}"), 1, state, {})
                                   for i in range(args.checkpoints)])
            # the library's checkpoints of this repeat, read back (from the page cache, as a node reads one just
            # written), by each reader
            paths = [os.path.join(root, f"library-{i}", "checkpoints", "step_00000001")
                     for i in range(args.checkpoints)]
            for name, load in readers.items():
                row(name, lambda: [load(p) for p in paths])
            shutil.rmtree(root, ignore_errors=True)
            os.makedirs(root, exist_ok=True)
            for name, shard in shards.items():
                row(name, lambda: [shard(z[r:r + per_shard], r) for r in range(0, len(z), per_shard)])
    finally:
        shutil.rmtree(root, ignore_errors=True)
    env = run_env(args) | {"checkpoint_bytes": 4 * numel * args.tensors}
    write_results(args.out, env, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
