"""Stage 2's latents, encoded once per (AE checkpoint, dataset): bit-identical training, no second encoding
(another trial, a resumed one, concurrent ones), stale leases, damaged caches. MLflow dataset inputs:
tests/test_tracking.py."""
import hashlib
import json
import socket
import subprocess
import threading
import time
import warnings

import numpy as np
import pyarrow as pa
import pytest
import torch

from ulsweep import io as uio
from ulsweep.config import experiment_from_dict, to_dict
from ulsweep.data.model_range import to_model_range
from ulsweep.data.parquet import open_dataset
from ulsweep.train import latents as L
from ulsweep.train.evaluation import PartTimer
from ulsweep.train.hooks import TrainHooks
from ulsweep.train.stage1 import train_autoencoder
from ulsweep.train.stage2 import load_frozen_autoencoder, train_base

from latentlib import SlowEncoder, tiny_data

TRAIN = {"steps": 2, "batch_size": 8, "log_every": 1, "eval_images": 8, "eval_t_per_image": 2, "sample_steps": 2}


class Recorder(TrainHooks):
    def __init__(self, stop_at=None):
        self.losses, self.stop_at, self.step = [], stop_at, 0

    def log_metrics(self, step, metrics):
        self.step = step
        if "loss" in metrics:
            self.losses.append((step, metrics["loss"]))

    def should_stop(self):
        return self.stop_at is not None and self.step >= self.stop_at


class Counted:
    """Wraps ulsweep.train.latents.encode_split and counts the encodings."""

    def __init__(self, monkeypatch):
        self.calls, self._f = 0, L.encode_split
        monkeypatch.setattr(L, "encode_split", self)

    def __call__(self, *a, **k):
        self.calls += 1
        return self._f(*a, **k)


@pytest.fixture(scope="module")
def ae(tmp_path_factory, digits_cache, one_thread):
    """A 2-step tiny autoencoder on 16x16 digits (latents 2x4x4); its latents are not encoded yet."""
    exp = experiment_from_dict({
        "name": "lat", "data": {"path": "builtin:digits", "image_size": 16},
        "ae": {"model": {"preset": "tiny", "downsample": 4, "latent_channels": 2}, "train": TRAIN},
        "base_models": [{"name": "b", "train": {**TRAIN, "ckpt_every": 1}}], "eval": {"extractor": "none"}})
    res = train_autoencoder(exp, str(tmp_path_factory.mktemp("lat") / "ae"), TrainHooks())
    return exp, res.checkpoint


def test_base_trials_encode_once_and_train_bit_identically(ae, tmp_path, monkeypatch):
    exp, ckpt = ae
    base = exp.base_models[0]
    counted = Counted(monkeypatch)
    first = Recorder()
    a = train_base(exp, base, ckpt, str(tmp_path / "a"), first)  # encodes and publishes
    assert counted.calls == 1

    # what stage 2 trained on before the cache (load_device_images, then encode_all): the whole split in
    # [-1, 1] on the device, encoded there in batches of 512
    frozen, _, meta = load_frozen_autoencoder(ckpt, "cpu")
    ds = open_dataset(exp.data.path)
    x_train, data_hash = to_model_range(ds.load_split("train")[0], 16), ds.content_hash
    with torch.no_grad():
        z_ref = torch.cat([frozen.encoder(x_train[i:i + 512]).float() for i in range(0, len(x_train), 512)])
    lat = L.published_latents(ckpt, exp.data)
    z = lat.load("cpu")
    assert z.dtype == torch.float32 and torch.equal(z, z_ref)
    m = lat.manifest
    assert (m["latent_shape"], m["num_rows"], m["dtype"]) == (list(z_ref.shape[1:]), len(z_ref), "float32")
    assert (m["ae_sha256"], m["data_hash"]) == (meta["sha256"], data_hash)
    assert m["decode"] == "in-process"  # data.loader auto: stage 1 holds this small split on the device
    for uri, sh in zip(lat.shard_uris, m["shards"]):
        assert hashlib.sha256(uio.read_bytes(uri)).hexdigest() == sh["sha256"]
    assert lat.uri.startswith(f"{ckpt}/latents/")

    # a second trial of the same AE, interrupted after one step and resumed: reads the latents, never encodes
    part = Recorder(stop_at=1)
    train_base(exp, base, ckpt, str(tmp_path / "b"), part)
    rest = Recorder()
    b = train_base(exp, base, ckpt, str(tmp_path / "b"), rest)
    assert counted.calls == 1
    assert part.losses + rest.losses == first.losses and len(first.losses) == 2
    assert b.metrics["base_bpp"] == a.metrics["base_bpp"]


@pytest.mark.parametrize("where", ["local", "memory"])
def test_concurrent_trials_one_encodes_the_other_waits(tmp_path, where, capsys):
    data, ds = tiny_data(tmp_path / "data")
    ckpt = str(tmp_path / "ckpt") if where == "local" else f"memory://lat-{tmp_path.name}/ckpt"
    enc = SlowEncoder()
    out = [None, None]

    def trial(i):
        out[i] = L.training_latents(enc, ckpt, "0" * 64, ds, data, "cpu", poll_s=0.02)

    threads = [threading.Thread(target=trial, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert enc.calls == 1  # 40 images: one encoder batch, by one of the two trials
    assert out[0][0].manifest == out[1][0].manifest and torch.equal(out[0][1], out[1][1])
    assert out[0][1].shape == (40, 2, 4, 4)
    assert "waiting for" in capsys.readouterr().out
    assert not uio.exists(uio.join(out[0][0].uri, L.LOCK))  # the lease is gone once published


def test_stale_leases_are_taken_over(tmp_path):
    data, ds = tiny_data(tmp_path / "data")
    enc = SlowEncoder(sleep_s=0)
    key = L.LatentsKey("1" * 64, ds.content_hash, "train", 8)
    # a holder on this host whose process is gone: taken over at once
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock = uio.join(L.latents_dir(str(tmp_path / "c1"), key), L.LOCK)
    uio.atomic_write_text(lock, json.dumps({"token": "x", "host": socket.gethostname(), "pid": dead.pid}))
    with pytest.warns(UserWarning, match="stale"):
        lat, _ = L.training_latents(enc, str(tmp_path / "c1"), "1" * 64, ds, data, "cpu", poll_s=0.01,
                                    stale_s=3600)
    assert enc.calls == 1 and lat.num_rows == 40
    # a holder elsewhere whose heartbeat stopped: taken over after stale_s of unchanged lease, and the
    # shards it left half-written are removed
    d2 = L.latents_dir(str(tmp_path / "c2"), key)
    uio.atomic_write_text(uio.join(d2, L.LOCK), json.dumps({"token": "y0", "host": "elsewhere", "pid": 1}))
    uio.atomic_write_bytes(uio.join(d2, "y0", "part-00000.parquet"), b"half")
    with pytest.warns(UserWarning, match="stale"):
        lat, _ = L.training_latents(enc, str(tmp_path / "c2"), "1" * 64, ds, data, "cpu", poll_s=0.01,
                                    stale_s=0.1)
    assert enc.calls == 2 and lat.num_rows == 40
    assert uio.listdir(d2) == sorted([L.MANIFEST, lat.shard_uris[0].split("/")[-2]])


def test_unwritable_checkpoint_dir_encodes_for_the_trial_only(tmp_path, monkeypatch):
    data, ds = tiny_data(tmp_path / "data")

    def refuse(*a, **k):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(L.Lease, "claim", refuse)
    with pytest.warns(UserWarning, match="cannot store latents here .*read-only"):
        lat, z = L.training_latents(SlowEncoder(sleep_s=0), str(tmp_path / "ro"), "3" * 64, ds, data, "cpu")
    assert lat is None and z.shape == (40, 2, 4, 4)


def test_damaged_latents_are_reported_and_encoded_again(tmp_path):
    data, ds = tiny_data(tmp_path / "data")
    enc = SlowEncoder(sleep_s=0)
    ckpt = str(tmp_path / "ckpt")
    lat, z = L.training_latents(enc, ckpt, "2" * 64, ds, data, "cpu")
    shard = lat.shard_uris[0]
    uio.atomic_write_bytes(shard, uio.read_bytes(shard)[:-7] + b"garbage")
    with pytest.warns(UserWarning, match=f"{shard}: SHA-256"):
        lat2, z2 = L.training_latents(enc, ckpt, "2" * 64, ds, data, "cpu")
    assert enc.calls == 2 and torch.equal(z2, z) and lat2.shard_uris[0] != shard
    assert torch.equal(lat2.load(), z)  # the new set is published
    manifest = uio.join(lat2.uri, L.MANIFEST)
    uio.atomic_write_text(manifest, "{not json")
    with pytest.warns(UserWarning, match=f"{manifest}: not valid JSON"):
        L.training_latents(enc, ckpt, "2" * 64, ds, data, "cpu")
    assert enc.calls == 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a good cache is read without a word
        L.training_latents(enc, ckpt, "2" * 64, ds, data, "cpu")
    assert enc.calls == 3


def test_decode_latents_takes_arrow_bytes_and_float_columns():
    z = np.arange(2 * 3 * 2 * 2, dtype=np.float32).reshape(2, 3, 2, 2)
    rows = [r.tobytes() for r in z]
    fixed = pa.FixedSizeBinaryArray.from_buffers(pa.binary(48), 2, [None, pa.py_buffer(z.tobytes())])
    for values in (rows, np.array(rows, dtype=object), pa.array(rows, pa.binary()), fixed,
                   pa.chunked_array([fixed.slice(0, 1), fixed.slice(1, 1)]), z.reshape(2, -1)):
        np.testing.assert_array_equal(L.decode_latents(values, (3, 2, 2)), z)
    with pytest.raises(ValueError, match="latent row 1 holds 44 bytes, expected 4\\*C\\*h\\*w"):
        L.decode_latents([rows[0], rows[1][:44]], (3, 2, 2))


def test_a_latent_shard_holds_its_rows_exactly_whatever_their_layout():
    """`_shard_bytes` (the rows viewed, not copied, into an Arrow buffer): a shard of float32 rows, of rows in
    another layout (a strided slice) and of float64 rows reads back as the float32 rows, indexed from its first."""
    from ulsweep.train.latent_store import _read_table, _shard_bytes

    z = np.random.default_rng(0).standard_normal((6, 12)).astype(np.float32)
    for rows in (z, np.asfortranarray(z), z.astype(np.float64), np.repeat(z, 2, 0)[::2]):
        data = _shard_bytes(rows, 10)
        assert hashlib.sha256(data).hexdigest() == hashlib.sha256(bytes(data)).hexdigest()
        table = _read_table(data, "shard")
        np.testing.assert_array_equal(L.decode_latents(table.column("z"), (3, 2, 2)), z.reshape(6, 3, 2, 2))
        assert table.column("index").to_pylist() == list(range(10, 16))


def test_a_group_whose_latent_writer_fails_publishes_nothing_and_names_the_error(tmp_path, digits_cache,
                                                                                  monkeypatch, one_thread):
    """encode_together's writers run beside the encoder: one that fails (a full disk, say) fails the encoding
    with its own error once it is seen, and no member's latents are published or left half-written."""
    import os

    from ulsweep.models.stacked import stack

    exp = experiment_from_dict({
        "name": "lat2", "data": {"path": "builtin:digits", "image_size": 16},
        "ae": {"model": {"preset": "tiny", "downsample": 4, "latent_channels": 2}, "train": TRAIN},
        "eval": {"extractor": "none"}})
    ckpts = [train_autoencoder(experiment_from_dict(to_dict(exp), {"ae.train.seed": k}), str(tmp_path / f"ae{k}"),
                               TrainHooks()).checkpoint for k in range(2)]
    frozen = [load_frozen_autoencoder(c, "cpu") for c in ckpts]
    members = [(c, f[2]["sha256"]) for c, f in zip(ckpts, frozen)]
    stacked = stack([f[0] for f in frozen]).eval().requires_grad_(False)
    real, calls = L.LatentWriter.add, []

    def add(self, z):
        calls.append(1)
        if len(calls) == 3:  # the second batch of the first member
            raise OSError(28, "No space left on device")
        return real(self, z)

    monkeypatch.setattr(L.LatentWriter, "add", add)
    with pytest.raises(OSError, match="No space left"):
        L.encode_together(stacked.encoder, members, open_dataset(exp.data.path), exp.data, "cpu")
    for c in ckpts:
        assert L.published_latents(c, exp.data) is None
        left = [f for _, _, files in os.walk(os.path.dirname(c)) for f in files if f.endswith(".parquet")]
        assert left == [], left


def test_a_group_stores_its_members_latents_in_one_pass(tmp_path, digits_cache, monkeypatch, one_thread):
    """encode_together: the latents of three autoencoders from one decode of the split through their stacked
    encoders, each published as its own (the member's encoder's z, up to the rounding of a grouped kernel), then
    read by training_latents without a second encoding; stored ones and a single member are left alone."""
    from ulsweep.models.stacked import stack

    exp = experiment_from_dict({
        "name": "lat3", "data": {"path": "builtin:digits", "image_size": 16},
        "ae": {"model": {"preset": "tiny", "downsample": 4, "latent_channels": 2}, "train": TRAIN},
        "eval": {"extractor": "none"}})
    ckpts = []
    for k in range(3):  # three sets of weights: three seeds
        e = experiment_from_dict(to_dict(exp), {"ae.train.seed": k})
        ckpts.append(train_autoencoder(e, str(tmp_path / f"ae{k}"), TrainHooks()).checkpoint)
    frozen = [load_frozen_autoencoder(c, "cpu") for c in ckpts]
    ds = open_dataset(exp.data.path)
    counted = Counted(monkeypatch)
    stacked = stack([f[0] for f in frozen]).eval().requires_grad_(False)
    members = [(c, f[2]["sha256"]) for c, f in zip(ckpts, frozen)]
    timer = PartTimer(torch.device("cpu"))
    kept: dict = {}
    t0 = time.perf_counter()
    assert L.encode_together(stacked.encoder, members, ds, exp.data, "cpu", timer=timer, keep=kept) == [0, 1, 2]
    wall = time.perf_counter() - t0
    assert counted.calls == 1  # one pass over the split for the three
    parts = {k: v for k, v in timer.seconds.items()}  # its parts, summed over the batches
    assert set(parts) == {"seconds/encode_read", "seconds/encode_encoder", "seconds/encode_store"}, parts
    assert all(v > 0 for v in parts.values()) and sum(parts.values()) <= wall
    x_train = to_model_range(ds.load_split("train")[0], 16)
    for (ae, _, meta), c in zip(frozen, ckpts):
        with torch.no_grad():
            z_ref = torch.cat([ae.encoder(x_train[i:i + 512]).float() for i in range(0, len(x_train), 512)])
        lat, z = L.training_latents(ae.encoder, c, meta["sha256"], ds, exp.data, "cpu")
        assert lat.manifest["encoder"]["stacked"] == 3
        assert z.shape == z_ref.shape and float((z - z_ref).abs().max()) < 1e-4 * float(z_ref.abs().max())
        assert torch.equal(kept.pop(ckpts.index(c)), z)  # `keep`: the very values stored, without reading them
    assert counted.calls == 1  # training_latents read them
    assert L.encode_together(stacked.encoder, members, ds, exp.data, "cpu") == []  # stored already
    fourth = train_autoencoder(experiment_from_dict(to_dict(exp), {"ae.train.seed": 3}), str(tmp_path / "ae3"),
                               TrainHooks()).checkpoint
    ae4, _, meta4 = load_frozen_autoencoder(fourth, "cpu")
    four = stack([f[0] for f in frozen] + [ae4]).eval().requires_grad_(False)
    assert L.encode_together(four.encoder, members + [(fourth, meta4["sha256"])], ds, exp.data, "cpu") == []
    assert counted.calls == 1  # one member to encode: left to training_latents, which encodes it alone
    assert L.published_latents(fourth, exp.data) is None

