"""Stage-1 batches streamed through Ray Data (ulsweep/data/stream.py): epochs, per-epoch shuffles, exact resume,
two Ray Train workers on disjoint parts, both loaders' bits/pixel, hflip, bad shards, bounded memory, the
streaming executor kept out of the training process, blocks of whole batches under a CPU-scaled limit; stage 2's
latents encoded from Ray Data decode tasks (bit-identical to in-process, bad shards) and streamed.

One local Ray for the module; every image carries its row id in its first two pixels."""
from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch

from ulsweep.config import ConfigError, experiment_from_dict
from ulsweep.data import DataError, open_dataset, write_dataset
from ulsweep.data import sources, stream
from ulsweep.train.runtime import Runtime

pytestmark = pytest.mark.slow
N_TRAIN, SHARD_ROWS = 96, 16


def id_images(n: int, size: int = 16, channels: int = 1, seed: int = 0) -> np.ndarray:
    """uint8 (n, C, size, size) noise whose pixels [0, 0, 0] and [0, 0, 1] hold the row id."""
    x = np.random.default_rng(seed).integers(0, 256, (n, channels, size, size), dtype=np.uint8)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
    return x


def ids_of(batch: dict) -> torch.Tensor:
    x = batch["image"]
    return x[:, 0, 0, 0].long() + 256 * x[:, 0, 0, 1].long()


@pytest.fixture(scope="module")
def ray_local():
    import sys

    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray Train workers cannot import this file
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream-data")
    x = id_images(N_TRAIN)
    write_dataset(str(d / "ids"), "ids", {"train": (x, np.zeros(N_TRAIN, np.int64)),
                                          "test": (id_images(32, seed=1), np.zeros(32, np.int64))},
                  shard_rows=SHARD_ROWS)
    return d


def cpu_rt(rank: int = 0, world: int = 1) -> Runtime:
    return Runtime(torch.device("cpu"), None, rank, world)


def source(uri: str, batch: int, seed: int = 0, rank: int = 0, world: int = 1, shard=None, hflip=False):
    ds = open_dataset(uri)
    shard = shard if shard is not None else stream.local_dataset(ds, "train", batch // world)
    return stream.StreamSource(shard, ds.splits["train"], cpu_rt(rank, world), seed, ids_of, hflip=hflip)


def exp_for(path: str, loader: str, **train) -> object:
    t = {"steps": 6, "batch_size": 16, "log_every": 1, "eval_images": 32, "eval_t_per_image": 2,
         "sample_steps": 2, **train}
    return experiment_from_dict({
        "name": "s", "data": {"path": path, "image_size": 16, "loader": loader},
        "ae": {"model": {"preset": "tiny", "downsample": 4, "latent_channels": 2}, "train": t},
        "eval": {"extractor": "none"}})


class Rec:
    def __init__(self, stop_at=None):
        self.logs, self.stop_at, self.step = [], stop_at, 0

    def log_metrics(self, step, metrics):
        self.step = step
        if "loss" in metrics:
            self.logs.append((step, metrics["loss"]))

    def checkpoint_saved(self, step, path, metrics):
        pass

    def should_stop(self):
        return self.stop_at is not None and self.step >= self.stop_at


# ---------------------------------------------------------------------------------------------------------


def test_loader_settings():
    assert experiment_from_dict({}).data.loader == "auto"
    with pytest.raises(ConfigError, match="data.device_budget_gb: has no effect with data.loader: stream"):
        experiment_from_dict({"data": {"loader": "stream", "device_budget_gb": 4}}, file="e.yaml")
    with pytest.raises(ConfigError, match="data.loader"):
        experiment_from_dict({"data": {"loader": "disk"}}, file="e.yaml")


def test_epochs_cover_the_split_reshuffle_per_epoch_and_resume_exactly(ray_local, data_dir):
    uri, B = str(data_dir / "ids"), 16
    a = source(uri, B, seed=3)
    steps = a.steps_per_epoch(B)
    assert steps == N_TRAIN // B
    seq = [a.draw(B, None) for _ in range(3 * steps + 2)]
    for e in range(3):  # every epoch is a permutation of the split
        assert sorted(torch.cat(seq[e * steps:(e + 1) * steps]).tolist()) == list(range(N_TRAIN))
    assert not torch.equal(torch.cat(seq[:steps]), torch.cat(seq[steps:2 * steps]))  # reshuffled per epoch
    assert (a.epoch, a.step_in_epoch) == (3, 2)
    b = source(uri, B, seed=3)  # same seed: the same batches
    assert all(torch.equal(b.draw(B, None), s) for s in seq[:steps + 1])
    assert not torch.equal(source(uri, B, seed=4).draw(B, None), seq[0])  # another seed: another order
    c = source(uri, B, seed=3)  # resumed at epoch 1, step 3
    c.load_state_dict({"epoch": 1, "step_in_epoch": 3, "seed": 3, "world": 1, "num_rows": N_TRAIN, "batch": B}, B)
    assert all(torch.equal(c.draw(B, None), s) for s in seq[steps + 3:])
    a.close(), b.close(), c.close()


def test_two_gloo_workers_read_disjoint_parts_that_cover_the_epoch(ray_local, data_dir, tmp_path):
    """Through the trial's own wiring: stream_datasets hands the pipeline and its DataConfig to a TorchTrainer
    of 2 gloo workers, each reads its part with ray.train.get_dataset_shard and batches B/2 rows."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from ulsweep.sweep.trial import stream_datasets

    B = 16
    exp = exp_for(str(data_dir / "ids"), "stream", batch_size=B)
    res = experiment_from_dict({"resources": {"num_workers": 2, "cpus_per_worker": 0.5}}).resources
    wcfg = {"kind": "ae", "train_impl": "ulsweep", "experiment": __import__("ulsweep.config").config.to_dict(exp)}
    datasets, data_config = stream_datasets(wcfg, res)
    assert set(datasets) == {"train"}

    def fn(cfg):
        import torch.distributed as dist

        ctx = ray.train.get_context()
        rank, world = ctx.get_world_rank(), ctx.get_world_size()
        src = stream.StreamSource(ray.train.get_dataset_shard("train"), N_TRAIN, cpu_rt(rank, world), 0, ids_of)
        n = src.steps_per_epoch(B)
        seen = [src.draw(B, None).tolist() for _ in range(2 * n)]
        dist.barrier()
        with open(os.path.join(cfg["out"], f"rank{rank}.txt"), "w") as f:
            f.write(repr({"steps": n, "seen": seen}))
        src.close()

    trainer = TorchTrainer(fn, train_loop_config={"out": str(tmp_path)}, datasets=datasets,
                           dataset_config=data_config, torch_config=TorchConfig(backend="gloo"),
                           scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
                           run_config=ray.train.RunConfig(name="split", storage_path=str(tmp_path / "ray")))
    trainer.fit()
    r = [eval((tmp_path / f"rank{i}.txt").read_text()) for i in range(2)]
    steps = r[0]["steps"]
    assert steps == r[1]["steps"] == (N_TRAIN // 2) // (B // 2)
    for e in range(2):
        parts = [set(sum(x["seen"][e * steps:(e + 1) * steps], [])) for x in r]
        assert all(len(p) == steps * B // 2 for p in parts)  # no row twice within a rank's epoch
        assert not parts[0] & parts[1]  # the ranks' parts are disjoint
        assert parts[0] | parts[1] == set(range(N_TRAIN))  # and together they are the whole split


def test_stream_trial_resumes_at_its_step_with_the_uninterrupted_batches(ray_local, data_dir, tmp_path):
    """A stream run of 7 steps stopped at step 4 (mid-epoch 0: 6 steps per epoch) after its checkpoint resumes there and
    ends with the loss curve of the uninterrupted run, bit for bit: the checkpoint holds epoch, step and seed."""
    from ulsweep.train.checkpoint import load_checkpoint
    from ulsweep.train.stage1 import train_autoencoder

    exp = exp_for(str(data_dir / "ids"), "stream", steps=7, ckpt_every=4, log_every=1)
    full = Rec()
    train_autoencoder(exp, str(tmp_path / "full"), full)
    first, second = Rec(stop_at=4), Rec()
    r1 = train_autoencoder(exp, str(tmp_path / "split"), first)
    assert r1.steps == 4 and r1.extra.get("stopped")
    state, _ = load_checkpoint(r1.checkpoint)
    assert {k: state["data"][k] for k in ("epoch", "step_in_epoch", "seed")} == {"epoch": 0, "step_in_epoch": 4,
                                                                                   "seed": 0}
    r2 = train_autoencoder(exp, str(tmp_path / "split"), second)
    assert r2.steps == 7
    assert first.logs + second.logs == full.logs and len(full.logs) == 7
    assert load_checkpoint(r2.checkpoint)[0]["data"]["epoch"] == 1  # went on into the next epoch


def test_device_and_stream_give_equal_bits_per_pixel(ray_local, tmp_path, digits_cache):
    """The same data (the digits) and seed through both loaders: held-out bits/pixel within 3 standard errors."""
    from ulsweep.data.builtin import resolve_dataset
    from ulsweep.train.stage1 import train_autoencoder

    path = resolve_dataset("builtin:digits")
    out = {}
    for loader in ("device", "stream"):
        exp = exp_for(path, loader, steps=30, batch_size=32, log_every=30, eval_images=128, eval_t_per_image=4)
        out[loader] = train_autoencoder(exp, str(tmp_path / loader)).metrics
    d, s = out["device"], out["stream"]
    se = (d["bpp_se"] ** 2 + s["bpp_se"] ** 2) ** 0.5
    print(f"bits/pixel device {d['bpp']:.4f} +- {d['bpp_se']:.4f}, stream {s['bpp']:.4f} +- {s['bpp_se']:.4f}")
    assert d["bpp"] != s["bpp"]  # different batches, so not the same run twice
    assert abs(d["bpp"] - s["bpp"]) <= 3 * se


def test_hflip_mirrors_about_half_of_the_images_on_both_paths(ray_local, data_dir):
    x = torch.from_numpy(id_images(64)).float()
    plain = sources.DeviceSplit(x).draw(256, torch.Generator().manual_seed(0))
    flipped = sources.DeviceSplit(x, hflip=True).draw(256, torch.Generator().manual_seed(0))
    mirrored = (flipped == plain.flip(-1)).flatten(1).all(1)
    assert ((flipped == plain).flatten(1).all(1) | mirrored).all()  # the same draws, some mirrored
    assert 0.3 < mirrored.float().mean() < 0.7

    uri = str(data_dir / "ids")
    to_images = lambda b: b["image"]  # noqa: E731
    ds = open_dataset(uri)
    srcs = [stream.StreamSource(stream.local_dataset(ds, "train", 32), N_TRAIN, cpu_rt(), 0, to_images, hflip=h)
            for h in (False, True)]
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.cat([s.draw(32, gen) for _ in range(3)]) for s in srcs)
    mirrored = (a.flip(-1) == b).flatten(1).all(1)
    assert ((a == b).flatten(1).all(1) | mirrored).all() and 0.3 < mirrored.float().mean() < 0.7
    for s in srcs:
        s.close()


def test_auto_picks_device_or_stream_and_says_which(ray_local, data_dir, monkeypatch, capsys):
    monkeypatch.setattr(sources, "SMALL_SPLIT_BYTES", 0)  # the test split is tiny: let auto stream it
    ds = open_dataset(str(data_dir / "ids"))
    data = lambda gb: experiment_from_dict({"data": {"path": ds.uri, "device_budget_gb": gb}}).data  # noqa: E731
    need = sources.split_bytes(data(None), ds)
    assert need == N_TRAIN * 16 * 16 * 4
    assert sources.choose_loader(data(need / 1e9), ds, torch.device("cpu"))[0] == "device"
    assert sources.choose_loader(data(need / 2e9), ds, torch.device("cpu"))[0] == "stream"
    src, *_ = sources.train_source(data(need / 2e9), cpu_rt(), 0, 8, 16, label="ae x")
    assert isinstance(src, stream.StreamSource)
    src.close()
    assert "[ae x] data.loader auto -> stream: split" in capsys.readouterr().out


def test_changed_or_deleted_shard_fails_naming_it(ray_local, data_dir, tmp_path):
    import shutil

    uri = str(tmp_path / "copy")
    shutil.copytree(data_dir / "ids", uri)
    src = source(uri, 16)
    for _ in range(src.steps_per_epoch(16)):  # epoch 0 reads every shard
        src.draw(16, None)
    shard = os.path.join(uri, "train", "part-00002.parquet")
    with open(shard, "r+b") as f:  # changed between epochs: same size, other bytes
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(DataError, match=r"part-00002\.parquet.*SHA-256 mismatch"):
        for _ in range(src.steps_per_epoch(16)):
            src.draw(16, None)
    src.close()
    os.remove(shard)
    src = source(uri, 16)
    with pytest.raises(DataError, match=r"part-00002\.parquet.*missing"):
        for _ in range(src.steps_per_epoch(16)):
            src.draw(16, None)
    src.close()


def test_images_that_do_not_fit_the_config_fail_before_training(ray_local, data_dir, tmp_path):
    from ulsweep.train.stage1 import train_autoencoder

    exp = experiment_from_dict({**__import__("ulsweep.config").config.to_dict(exp_for(str(data_dir / "ids"), "stream")),
                                "data": {"path": str(data_dir / "ids"), "image_size": 12, "loader": "stream"}})
    with pytest.raises(DataError, match=r"images are 16x16, data.image_size is 12"):
        train_autoencoder(exp, str(tmp_path / "run"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def executor_threads() -> list[str]:
    import threading

    return [t.name for t in threading.enumerate() if t.name.startswith("StreamingExecutor")]


class SlowDecode(stream.DecodeImages):
    """Decoding that takes 0.3 s per block: the executor is still running after the first batch."""

    def __call__(self, batch):
        import time

        time.sleep(0.3)
        return super().__call__(batch)


def test_the_training_process_runs_no_streaming_executor(ray_local, data_dir):
    """Ray Data's executor busy-polls while the pipeline is backpressured; a source handed a Dataset runs it
    in the split's coordinator actor, so this process holds no executor thread while it draws. The same
    pipeline iterated directly (what the source avoids) runs one here while it produces: the check can fail."""
    ds = open_dataset(str(data_dir / "ids"))
    steps, seen = N_TRAIN // 16, {}
    for how in ("source", "iterated"):
        pipe = stream.build_pipeline(stream.shard_items(ds, "train"), ("image",),
                                     SlowDecode(ds.encoding, ds.image_shape, ds.uri), SHARD_ROWS)
        pipe.context.execution_options = stream.execution_options(16 * 16, 16)
        src = stream.StreamSource(pipe if how == "source" else pipe.iterator(), N_TRAIN, cpu_rt(), 0, ids_of,
                                  prefetch=1, shuffle=0)
        first = src.draw(16, None)
        seen[how] = (executor_threads(), torch.cat([first] + [src.draw(16, None) for _ in range(steps - 1)]))
        src.close()
    assert seen["source"][0] == [] and seen["iterated"][0] != []
    assert seen["source"][1].tolist() == seen["iterated"][1].tolist() == list(range(N_TRAIN))


def test_blocks_hold_whole_batches_under_a_limit_that_grows_with_the_cpus():
    """Blocks are whole batches (one, if a batch is larger than BLOCK_BYTES); the object-store limit is
    INFLIGHT_BLOCKS blocks up to INFLIGHT_BLOCKS / BLOCKS_PER_CPU CPUs, then BLOCKS_PER_CPU more per CPU, plus
    twice the prefetched and shuffle-buffered batches: bounded for any CPU count, never the split."""
    row = 3 * 256 * 256
    for batch, r in ((16, row), (7, row), (1, 3 * 4096 * 4096), (256, 3 * 32 * 32)):
        rows = stream.block_rows(batch, r)
        assert rows % batch == 0 and (rows == batch or rows * r <= stream.BLOCK_BYTES)
    limit = lambda cpus: stream.execution_options(row, 16, cpus).resource_limits.object_store_memory  # noqa: E731
    block, batches = stream.block_rows(16, row) * row, 2 * (stream.PREFETCH_BATCHES + stream.SHUFFLE_BATCHES) * 16 * row
    flat = stream.INFLIGHT_BLOCKS // stream.BLOCKS_PER_CPU
    assert limit(1) == limit(flat) == stream.INFLIGHT_BLOCKS * block + batches
    assert limit(64) - limit(16) == 48 * stream.BLOCKS_PER_CPU * block
    assert stream.execution_options(row, 16, 16).preserve_order


def tree_pids() -> list[int]:
    """This test process and its descendants (it started the module's Ray: raylet, workers, object store)."""
    kids: dict[int, list[int]] = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            kids.setdefault(ppid, []).append(int(p))
    out, todo = [], [os.getpid()]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += kids.get(pid, [])
    return out


def tree_pss(pids: list[int]) -> int:
    """Bytes of the processes `pids`: the sum of their PSS, which counts RSS with each shared page (object
    store, libraries) divided among the processes mapping it, so shared memory is counted once."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                total += next(int(x.split()[1]) * 1024 for x in f if x.startswith("Pss:"))
        except (OSError, StopIteration):
            continue
    return total


class PeakSampler:
    """Samples the process tree's PSS every 50 ms in a thread (the tree itself every 0.5 s); `peak` is the
    largest sample."""

    def __enter__(self):
        self.pids = tree_pids()
        self.peak, self._stop = tree_pss(self.pids), threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        i = 0
        while not self._stop.wait(0.05):
            i += 1
            if i % 10 == 0:
                self.pids = tree_pids()
            self.peak = max(self.peak, tree_pss(self.pids))

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, tree_pss(tree_pids()))


def test_stream_memory_stays_bounded_where_the_device_path_holds_the_split(ray_local, data_dir, tmp_path):
    """One epoch of an 805 MB (float32) split through the stream against loading it for the device path, side
    by side: the memory the data adds to the process tree (peak PSS minus the level before) stays under a
    quarter of the split on the stream (it is O(prefetch + object-store limit), and the split's coordinator
    actor is a process of the tree too: 75-130 MB measured), and is at least the split on the device path."""
    n, B = 65536, 256
    x = np.random.default_rng(0).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    write_dataset(str(tmp_path / "big"), "big", {"train": (x, np.zeros(n, np.int64)), "test": (x[:8], np.zeros(8, np.int64))},
                  shard_rows=1024)
    del x
    split = stream.decoded_bytes(n, 3, 32)
    src = source(str(data_dir / "ids"), 16)  # warm-up: Ray Data's workers have imported what the tasks need
    src.draw(16, None)
    src.close()
    ds = open_dataset(str(tmp_path / "big"))
    src = stream.StreamSource(stream.local_dataset(ds, "train", B), n, cpu_rt(), 0, lambda b: b["image"].float())
    with PeakSampler() as s:
        before = s.peak
        for _ in range(src.steps_per_epoch(B)):
            src.draw(B, None)
    src.close()
    stream_added = s.peak - before
    with PeakSampler() as d:
        before = d.peak
        images, _ = ds.load_split("train")
        x_dev = sources.to_model_range(images, 32)
        del images
    device_added = d.peak - before
    del x_dev
    print(f"split {split / 2**20:.0f} MiB as float32; added to the process tree's PSS: stream "
          f"{stream_added / 2**20:.0f} MiB, device {device_added / 2**20:.0f} MiB")
    assert 4 * stream_added <= split <= device_added


# ---------------------------------------------------------------------------------------------------------
# stage 2: latents encoded shard by shard, streamed to the base model when they do not fit


def test_latents_encode_shard_by_shard_and_stream_over_ranks(ray_local, tmp_path, monkeypatch):
    """encode_split crosses shard boundaries with whole encoder batches (z bit-identical to slicing the split
    as one tensor); latent_source streams the published set: one rank reads every row once per epoch, two
    ranks read disjoint shards, cut to the same row count."""
    from latentlib import SlowEncoder, tiny_data
    from ulsweep.train import latents as L

    data, ds = tiny_data(tmp_path / "data")  # 40 images in shards of 16
    enc = SlowEncoder(sleep_s=0)
    zs = []
    assert L.encode_split(enc, ds, "train", 8, "cpu", zs.append, batch=12) == 40
    x = sources.to_model_range(ds.load_split("train")[0], 8)
    with torch.no_grad():
        want = torch.cat([enc(x[i:i + 12]).float() for i in range(0, 40, 12)])
    assert [len(z) for z in zs] == [12, 12, 12, 4] and torch.equal(torch.cat(zs), want)

    from ulsweep.train import latent_store

    monkeypatch.setattr(latent_store, "SHARD_BYTES", 12 * 4 * 2 * 4 * 4)  # 12 latents (2x4x4 float32) per shard
    lat, z = L.training_latents(enc, str(tmp_path / "ckpt"), "5" * 64, ds, data, "cpu", load=False)
    assert z is None and [sh["num_rows"] for sh in lat.manifest["shards"]] == [12, 12, 12, 4]
    every = lat.load()
    key = lambda rows: sorted(r.flatten().tolist() for r in rows)  # noqa: E731

    src = L.latent_source(lat, cpu_rt(), seed=0, batch_size=8)
    assert src.steps_per_epoch(8) == 5
    epoch = torch.cat([src.draw(8, None) for _ in range(5)])
    assert key(epoch) == key(every)
    src.close()

    seen = []
    for rank in (0, 1):  # shards 0, 2 (24 rows) and 1, 3 (16 rows): both ranks stop at 16
        s = L.latent_source(lat, cpu_rt(rank, 2), seed=0, batch_size=8)
        assert s.steps_per_epoch(8) == 4
        seen.append(torch.cat([s.draw(8, None) for _ in range(4)]))
        s.close()
    assert all(len(p) == 16 for p in seen)
    assert not set(map(tuple, key(seen[0]))) & set(map(tuple, key(seen[1])))
    assert set(map(tuple, key(seen[1]))) == set(map(tuple, key(every[12:24]))) | set(map(tuple, key(every[36:])))


def test_ray_data_encoding_gives_the_in_process_latents_bit_for_bit(ray_local, tmp_path):
    """encode_split through Ray Data decode tasks feeds the encoder the same batches of consecutive images as
    the in-process path (shards of 16, 16, 13 rows in batches of 7: batches cross shards, the last is
    partial), so z is torch.equal."""
    from latentlib import SlowEncoder, tiny_data
    from ulsweep.train import latents as L

    _, ds = tiny_data(tmp_path / "data", n=45)
    enc = SlowEncoder(sleep_s=0)
    z = {}
    for decode in (L.IN_PROCESS, L.RAY_DATA):
        zs = []
        assert L.encode_split(enc, ds, "train", 8, "cpu", zs.append, batch=7, decode=decode) == 45
        assert [len(b) for b in zs] == [7] * 6 + [3]
        z[decode] = torch.cat(zs)
    x = sources.to_model_range(ds.load_split("train")[0], 8)
    with torch.no_grad():
        want = torch.cat([enc(x[i:i + 7]).float() for i in range(0, 45, 7)])
    assert torch.equal(z[L.RAY_DATA], z[L.IN_PROCESS]) and torch.equal(z[L.RAY_DATA], want)


@pytest.mark.parametrize("decode", ["in-process", "ray-data"])
def test_changed_image_shard_fails_the_encoding_naming_it_and_publishes_nothing(ray_local, tmp_path, monkeypatch,
                                                                                 decode):
    """An image shard changed after the dataset manifest was written: a DataError naming it (the task's
    message, not Ray's traceback), no latents.json, and the latent shards already written are removed."""
    import functools

    from latentlib import SlowEncoder, tiny_data
    from ulsweep import io as uio
    from ulsweep.train import latent_store
    from ulsweep.train import latents as L

    data, ds = tiny_data(tmp_path / "data")  # 40 images in shards of 16, 16, 8
    monkeypatch.setattr(latent_store, "SHARD_BYTES", 8 * 4 * 2 * 4 * 4)  # 8 latents (2x4x4 float32) per shard
    monkeypatch.setattr(L, "encode_split", functools.partial(L.encode_split, batch=8))
    written, write = [], latent_store.LatentWriter._write

    def counted(self, n):
        written.append(n)
        write(self, n)

    monkeypatch.setattr(latent_store.LatentWriter, "_write", counted)
    shard = os.path.join(ds.uri, "train", "part-00002.parquet")
    with open(shard, "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    ckpt = str(tmp_path / "ckpt")
    with pytest.raises(DataError) as err:
        L.training_latents(SlowEncoder(sleep_s=0), ckpt, "6" * 64, ds, data, "cpu", decode=decode)
    assert str(err.value).startswith(f"{shard} (split 'train'): SHA-256 mismatch")
    assert "ray::" not in str(err.value) and "Failed to" not in str(err.value)
    if decode == "in-process":  # the 32 images of the two good shards were encoded and written ...
        assert written == [8] * 4  # (Ray Data raises a task's error at once, maybe before earlier batches)
    directory = L.latents_dir(ckpt, L.LatentsKey("6" * 64, ds.content_hash, "train", 8))
    assert uio.listdir(directory) == []  # ... and removed: no manifest, no shard, no lease


def test_base_trial_streams_latents_it_was_told_to(ray_local, data_dir, tmp_path, monkeypatch, capsys):
    """`data.loader: stream` encodes the latents through Ray Data decode tasks (the manifest says so) and trains
    the base model from the latent shards; the latents are never loaded whole, and a second base trial of the
    autoencoder reads them without encoding."""
    from ulsweep.train import latents as L
    from ulsweep.train.stage1 import train_autoencoder
    from ulsweep.train.stage2 import train_base

    exp = exp_for(str(data_dir / "ids"), "device", steps=2)
    ae = train_autoencoder(exp, str(tmp_path / "ae"))
    raw = {"name": "s", "data": {"path": str(data_dir / "ids"), "image_size": 16, "loader": "stream"},
           "ae": {"model": {"preset": "tiny", "downsample": 4, "latent_channels": 2}},
           "base_models": [{"name": "b", "model": {"preset": "tiny"},
                            "train": {"steps": 3, "batch_size": 16, "log_every": 1, "eval_images": 16,
                                      "sample_steps": 2}}],
           "eval": {"extractor": "none"}}
    base_exp = experiment_from_dict(raw)

    def whole(*a, **k):
        raise AssertionError("the streamed latents were loaded whole")

    monkeypatch.setattr(L.Latents, "load", whole)
    res = train_base(base_exp, base_exp.base_models[0], ae.checkpoint, str(tmp_path / "base"))
    out = capsys.readouterr().out
    assert "-> stream for the latents" in out
    assert "data.loader stream -> stream for the training images: set in the config" in out
    assert f"[latents] encoded {N_TRAIN} images" in out and "decoded through Ray Data on 2 CPUs" in out
    assert res.steps == 3 and np.isfinite(res.metrics["base_bpp"])
    m = L.published_latents(ae.checkpoint, base_exp.data).manifest
    assert (m["decode"], m["ray_cpus"], m["num_rows"]) == ("ray-data", 2, N_TRAIN) and m["images_per_s"] > 0

    def again(*a, **k):
        raise AssertionError("the published latents were encoded again")

    monkeypatch.setattr(L, "encode_split", again)
    again_res = train_base(base_exp, base_exp.base_models[0], ae.checkpoint, str(tmp_path / "base2"))
    assert again_res.steps == 3 and "[latents] encoded" not in capsys.readouterr().out
