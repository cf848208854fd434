"""The stage-1 stream (ulsweep/data/stream.py): decode throughput against CPU workers, and a training step fed
by the stream against the same step fed by ready tensors, for pipeline configurations side by side.

    python benchmarks/data_pipeline.py --out benchmarks/results/cpu-data-pipeline.json           # decode rows
    python benchmarks/data_pipeline.py --sizes 256 --encodings raw --cpus 16 --decode-ms 20 --images 1024 \
        --shard-rows 32 --stream-batch 16 --configs before inproc after noshuffle unordered --consumer-ms 75 \
        --image-size 256 --step-images 3072 --steps 30 --out benchmarks/results/cpu-data-pipeline-consumer.json
    benchmarks/device/data.sh step                              # GPU step rows on an H200 (`--device cuda`)

Configurations (`--configs`, each row names its own):
  before     the settings of commit 4102f05: the streaming executor as a thread of the training process (the
             consumer iterates the Dataset itself), blocks of 8 MiB // row rows, an object-store limit of
             max(8 blocks, 2 * 12 batches) whatever the CPU count, 4 batches prefetched
  inproc     the library's block size, CPU-scaled limit and prefetch, executor still in the training process
  after      the library as it is (`StreamSource` moves the executor to a split coordinator actor)
  noshuffle  `after` without the local shuffle buffer (its cost; not an option of the library)
  unordered  `after` without preserve_order (its cost; a resume needs the order)

Decode rows: synthetic photo-like images (smooth gradients plus noise, so that the codecs have work like on
real photos), written as shards of `--encodings`, streamed through each configuration in a Ray of `--cpus`
CPUs by a consumer doing nothing else; images/s of the second pass over the split (the first warms up), with
what the executor says about that pass: the mean number of decode tasks in flight (task time / wall time),
and the fractions of the pass it could launch no task (submission backpressure: object-store budget, CPUs, or
a consumer that does not keep up) or read no task output (output backpressure). `--decode-ms` adds a sleep per
image to the decode task: a decoder that costs wall time but no CPU, so that a 2-core machine can show how the
object-store limit caps the tasks in flight at 16 logical CPUs.

Consumer rows (`--consumer-ms`): the CPU imitation of a GPU training step (`--consumer-work`): `hold` keeps
the GIL for that long (a Python loop on the clock: only the stream's lateness shows, as time waiting in
`draw`); `torch` is a fixed number of small torch ops calibrated to take that long alone, each releasing the
GIL like a kernel launch of a GPU step, so that threads of this process that take the GIL slow the step
itself; `python` a fixed pure-Python loop. Per configuration, `--steps` steps fed by a ready uint8 batch with
no stream open, then `--steps` steps fed by the configuration's `StreamSource.draw` (after `--warmup` draws),
then the ready steps again, `--repeats` times; a row gives the median step times, the slowdown, the time
waiting in `draw` (mean, draws over 50 ms, longest) and the delivered against the ideal images/s.

Step rows (`--device cuda`): the library's stage-1 optimizer step (AEObjective + TrainState, compiled as the
trials compile it), each step synchronized, fed by a batch of synthetic tensors already on the GPU and by
each configuration's stream of JPEG shards at --image-size, bracketed the same way, in one process; the
slowdown and the CPU cores per GPU the step needs (its images/s over the decode images/s per CPU).

Every row is printed as soon as it is measured and the JSON rewritten after it; `--time-limit` starts no
measurement after that many seconds (a device call's limit minus a margin).
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from timing import write_results  # noqa: E402  (benchmarks/timing.py, beside this script)

CONFIGS = ("before", "inproc", "after", "noshuffle", "unordered")
OLD_BLOCK_BYTES, OLD_INFLIGHT_BLOCKS = 8 * 2**20, 8  # commit 4102f05


def photo_like(n: int, size: int, seed: int) -> np.ndarray:
    """uint8 (n, 3, size, size): per-image colour gradients plus Gaussian noise (sigma 12), the noise drawn
    from a bank of 8 fields shifted per image (drawing it per image made the larger datasets take minutes)."""
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, size, dtype=np.float32)
    bank = rng.normal(0, 12, (8, 3, size, size)).astype(np.float32)
    out = np.empty((n, 3, size, size), np.uint8)
    for i in range(n):
        a, b, c = rng.uniform(0, 255, (3, 3, 1, 1)).astype(np.float32)
        img = a + (b - a) * t[None, :, None] + (c - a) * t[None, None, :] * 0.5
        noise = np.roll(bank[i % 8], int(rng.integers(size)), axis=int(rng.integers(1, 3)))
        out[i] = np.clip(img + noise, 0, 255).astype(np.uint8)
    return out


def write_encoded(uri: str, images: np.ndarray, encoding: str, shard_rows: int) -> None:
    """A dataset whose `image` column holds `encoding` bytes (JPEG at quality 90); one `train` split."""
    from ulsweep.data import write_dataset

    write_dataset(uri, f"bench-{encoding}", {"train": (images, np.zeros(len(images), np.int64))}, shard_rows,
                  encoding=encoding, quality=90 if encoding in ("jpeg", "webp") else None)


class Delayed:
    """A decode UDF that sleeps `ms` per image before decoding: wall time without CPU."""

    def __init__(self, inner, ms: float):
        self.inner, self.ms = inner, ms

    def __call__(self, batch):
        time.sleep(self.ms * batch.num_rows / 1e3)
        return self.inner(batch)


def make_source(config: str, uri: str, batch: int, rt, to_batch, cpus: int, decode_ms: float = 0.0):
    """A StreamSource of the `train` split at `uri` built as `config` says."""
    from ray.data import ExecutionOptions, ExecutionResources

    from ulsweep.data import open_dataset, stream

    if config not in CONFIGS:
        raise SystemExit(f"unknown configuration {config!r} (one of {', '.join(CONFIGS)})")
    stream.ensure_ray()
    ds = open_dataset(uri)
    row = math.prod(ds.image_shape)
    decode = stream.DecodeImages(ds.encoding, ds.image_shape, ds.uri)
    if decode_ms:
        if __name__ != "__main__":  # imported: Ray workers cannot import this script
            from ray import cloudpickle

            cloudpickle.register_pickle_by_value(sys.modules[__name__])
        decode = Delayed(decode, decode_ms)
    items = stream.shard_items(ds, "train")
    if config == "before":
        pipe = stream.build_pipeline(items, ("image",), decode, max(1, OLD_BLOCK_BYTES // row))
        limit = max(OLD_INFLIGHT_BLOCKS * OLD_BLOCK_BYTES, 2 * (4 + 8) * batch * row)
        opts = ExecutionOptions(preserve_order=True, resource_limits=ExecutionResources(object_store_memory=limit))
    else:
        pipe = stream.build_pipeline(items, ("image",), decode, stream.block_rows(batch, row))
        opts = stream.execution_options(row, batch, cpus)
        opts.preserve_order = config != "unordered"
    pipe.context.execution_options = opts
    shard = pipe.iterator() if config in ("before", "inproc") else pipe  # an iterator keeps the executor here
    src = stream.StreamSource(shard, ds.splits["train"], rt, 0, to_batch, prefetch=4 if config == "before" else
                              stream.PREFETCH_BATCHES, shuffle=0 if config == "noshuffle" else stream.SHUFFLE_BATCHES)
    return src


def executor_report(src, wall: float) -> dict:
    """What the streaming executor recorded for its current (last) execution: decode tasks in flight on
    average, and the fractions of `wall` spent in task-submission and task-output backpressure. Reads the
    split coordinator's stats through Ray 2.60's private `_coord_actor` (the public `stats()` is a string),
    or the in-process executor's through the Dataset's `get_stats_summary()`; {} where neither answers."""
    import ray

    it = src.shard
    try:
        if hasattr(it, "_coord_actor"):
            summary = ray.get(it._coord_actor.stats.remote()).to_summary()
        else:
            summary = it._base_dataset.get_stats_summary()
    except Exception:  # noqa: BLE001  (a diagnostic: never fail the row for it)
        return {}
    todo, m = [summary], None
    while todo and m is None:  # the decode operator's metrics (the split's, if any, come last)
        s = todo.pop()
        if any("DecodeImages" in o.operator_name or "Delayed" in o.operator_name for o in s.operators_stats):
            m = s.extra_metrics
        todo += s.parents
    if m is None:
        return {}
    sub, out = m.get("task_submission_backpressure_time", 0.0), m.get("task_output_backpressure_time", 0.0)
    return {"tasks_in_flight": m.get("task_completion_time_s", 0.0) / wall, "submission_backpressure": sub / wall,
            "output_backpressure": out / wall}


def pass_rate(src, batch: int) -> tuple[float, float]:
    """(images/s, seconds) of one whole epoch drawn from `src` as fast as it comes."""
    n = src.steps_per_epoch(batch)
    t0 = time.perf_counter()
    for _ in range(n):
        src.draw(batch, None)
    dt = time.perf_counter() - t0
    return n * batch / dt, dt


def decode_rate_per_core(rows: list[dict]) -> float:
    """Images a CPU core decodes per second (read + decode tasks), from decode rows: images/s over the cores the
    tasks kept busy (`tasks_in_flight`: the tasks' summed run time over the pass's wall time), not over the CPUs
    Ray was given: a backpressured pass keeps fewer busy, and dividing by all of them (as session 13's summary
    row did: 5.4 cores at 256^2) overstates what a GPU needs by the ratio. The fastest row counts."""
    rates = [r["images_per_s"] / (r["tasks_in_flight"] if r.get("tasks_in_flight", 0) > 0 else r["cpus"])
             for r in rows]
    return max(rates, default=0.0)


def verdict(rep: dict, cpus: int) -> str:
    """`backpressured`: the executor launched no task for over a tenth of the pass while fewer tasks than
    CPUs were in flight (its object-store budget, or a consumer slower than decoding, held it back)."""
    if not rep:
        return "?"
    if rep["submission_backpressure"] > 0.1 and rep["tasks_in_flight"] < 0.9 * cpus:
        return "backpressured"
    return "not backpressured" if rep["submission_backpressure"] <= 0.1 else "backpressured at its CPUs"


class Bench:
    """Rows, printed and written as they come, under a time limit."""

    def __init__(self, a):
        self.a, self.rows, self.t0 = a, [], time.perf_counter()

    def left(self) -> bool:
        return not self.a.time_limit or time.perf_counter() - self.t0 < self.a.time_limit

    def add(self, row: dict, line: str) -> None:
        self.rows.append(row)
        print(line, flush=True)
        write_results(self.a.out, {"argv": sys.argv[1:], "cpu_count": os.cpu_count()}, self.rows)


def decode_rows(b: Bench, root: str) -> None:
    import ray
    import torch

    from ulsweep.train.runtime import Runtime

    a = b.a
    for size in a.sizes:
        images = photo_like(a.images, size, 0)
        for enc in a.encodings:
            uri = f"{root}/{enc}-{size}"
            write_encoded(uri, images, enc, a.shard_rows)
            for cpus in a.cpus:
                ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
                try:
                    for config in a.configs:
                        if not b.left():
                            return
                        src = make_source(config, uri, a.stream_batch, Runtime(torch.device("cpu"), None, 0, 1),
                                          lambda x: x["image"], cpus, a.decode_ms)
                        pass_rate(src, a.stream_batch)  # warm-up pass: Ray workers start, imports
                        r, wall = pass_rate(src, a.stream_batch)
                        rep = executor_report(src, wall)
                        src.close()
                        v = verdict(rep, cpus)
                        b.add({"kind": "decode", "config": config, "size": size, "encoding": enc, "cpus": cpus,
                               "decode_ms": a.decode_ms, "images_per_s": r, "images_per_s_per_cpu": r / cpus,
                               "verdict": v, **rep},
                              f"decode {config:<9} {enc:<4} {size:>4}^2  cpus {cpus:>2}  {r:8.1f} img/s "
                              f"({r / cpus:6.1f} per cpu)  tasks in flight {rep.get('tasks_in_flight', float('nan')):4.1f}  "
                              f"backpressure: submission {rep.get('submission_backpressure', float('nan')):4.0%} "
                              f"output {rep.get('output_backpressure', float('nan')):4.0%}  ({v})")
                finally:
                    ray.shutdown()


class Work:
    """A consumer step: `hold` keeps the GIL for `ms` of wall time (a Python loop on the clock: the step
    cannot be slowed, the stream can only make it wait); `torch` and `python` are a fixed amount of work
    calibrated to take `ms` alone, small torch ops that each release the GIL like a kernel launch of a GPU
    step, or a pure-Python loop that keeps it (then other threads can slow the step itself)."""

    def __init__(self, kind: str, ms: float):
        import torch

        self.kind, self.x, self.n, self.ms = kind, torch.zeros(64), 1, ms
        if kind == "hold":
            return
        for _ in range(3):  # the cost per unit drifts with the count (caches, clocks): converge on it
            per = min(self._time() for _ in range(3)) / self.n
            self.n = max(1, int(ms / 1e3 / per))
        self.ms = min(self._time() for _ in range(3)) * 1e3

    def _time(self) -> float:
        t0 = time.perf_counter()
        self.run()
        return time.perf_counter() - t0

    def run(self) -> None:
        if self.kind == "hold":
            end = time.perf_counter() + self.ms / 1e3
            while time.perf_counter() < end:
                pass
        elif self.kind == "torch":
            x = self.x
            for _ in range(self.n):
                x.add_(1.0)
        else:
            s = 0
            for i in range(self.n * 8):
                s += i


def bracketed(b: Bench, configs, open_source, step, ready_feed, label: str, row: dict) -> None:
    """Per configuration: steps fed by `ready_feed` with no stream open (the baseline), then the same steps fed
    by the configuration's `open_source()` (warmed up, timed, closed), and the baseline once more, `repeats`
    times; a row per configuration with the median step times, the median time waiting in `draw`, and the
    stream's slowdown against the baseline steps around it. Nothing of a stream runs during a baseline step:
    an executor in this process busy-polls while backpressured and slows whatever else runs here."""
    a = b.a

    def steps(feed) -> tuple[list[float], list[float]]:
        times, waits = [], []
        for _ in range(a.steps):
            t0 = time.perf_counter()
            x = feed()
            t1 = time.perf_counter()
            step(x)
            times.append(time.perf_counter() - t0)
            waits.append(t1 - t0)
        return times, waits

    base = steps(ready_feed)[0]
    for config in configs:
        st, waits, ready = [], [], list(base)
        for _ in range(a.repeats):
            if not b.left():
                return
            src = open_source(config)
            try:
                for _ in range(a.warmup):
                    step(src.draw(a.batch, None))
                t, w = steps(lambda: src.draw(a.batch, None))
            finally:
                src.close()
            st += t
            waits += w
            base = steps(ready_feed)[0]
            ready += base
        ms_ready, ms_st = statistics.median(ready) * 1e3, statistics.median(st) * 1e3
        wait, slow = statistics.median(waits) * 1e3, ms_st / ms_ready - 1
        mean_wait, stalls = statistics.fmean(waits) * 1e3, sum(w > 0.05 for w in waits)
        b.add({**row, "config": config, "ms_per_step_ready": ms_ready, "ms_per_step_stream": ms_st,
               "stream_slowdown": slow, "draw_wait_ms": wait, "draw_wait_mean_ms": mean_wait,
               "draw_wait_max_ms": max(waits) * 1e3, "stalls_over_50ms": stalls, "draws": len(waits),
               "delivered_images_per_s": a.batch / statistics.fmean(st),
               "ideal_images_per_s": a.batch / statistics.fmean(ready), "steps": a.steps, "repeats": a.repeats},
              f"{label} {config:<9} ready {ms_ready:6.1f} ms  stream {ms_st:6.1f} ms  slowdown {slow:+6.1%}  "
              f"draw wait mean {mean_wait:5.1f} ms, {stalls}/{len(waits)} over 50 ms (max {max(waits) * 1e3:4.0f})  "
              f"delivered {a.batch / statistics.fmean(st):6.1f} of {a.batch / statistics.fmean(ready):6.1f} img/s")


def consumer_rows(b: Bench, root: str) -> None:
    """Consumer imitation: `Work` steps fed by a ready batch vs by the stream, per configuration."""
    import ray
    import torch

    from ulsweep.train.runtime import Runtime

    a = b.a
    torch.set_num_threads(1)
    s, enc = a.image_size, a.encodings[0]
    uri = f"{root}/consumer-{enc}-{s}"
    write_encoded(uri, photo_like(a.step_images, s, 1), enc, a.shard_rows)
    ready = torch.zeros(a.batch, 3, s, s, dtype=torch.uint8)
    cpus = max(a.cpus)
    rt = Runtime(torch.device("cpu"), None, 0, 1)
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        for kind in a.consumer_work:
            work = Work(kind, a.consumer_ms)
            print(f"consumer step: {work.kind} work of {work.ms:.1f} ms alone; {a.step_images} {enc} images {s}^2, "
                  f"{a.step_images // a.batch} steps per epoch", flush=True)
            bracketed(b, a.configs,
                      lambda config: make_source(config, uri, a.batch, rt, lambda x: x["image"], cpus, a.decode_ms),
                      lambda x, work=work: work.run(), ready.clone, f"consumer {work.kind:<5} {work.ms:4.0f} ms",
                      {"kind": "consumer", "work": work.kind, "work_ms_alone": work.ms, "batch": a.batch,
                       "image_size": s, "encoding": enc, "cpus": cpus, "decode_ms": a.decode_ms})
    finally:
        ray.shutdown()


def step_rows(b: Bench, root: str, per_cpu: float) -> None:
    """Stage-1 step fed by synthetic tensors vs by the stream of JPEG shards, per configuration."""
    import ray
    import torch

    from ulsweep.config import experiment_from_dict
    from ulsweep.data.model_range import to_model_range
    from ulsweep.train.build import build_autoencoder
    from ulsweep.train.runtime import compile_module, make_runtime
    from ulsweep.train.stage1 import AEObjective
    from ulsweep.train.state import TrainState

    a = b.a
    s = a.image_size
    exp = experiment_from_dict({"data": {"image_size": s}, "ae": {
        "model": {"preset": a.preset, "downsample": a.downsample, "latent_channels": a.latent_channels},
        "train": {"device": a.device, "batch_size": a.batch}}})
    rt = make_runtime(exp.ae.train)
    uri = f"{root}/step-jpeg-{s}"
    write_encoded(uri, photo_like(a.step_images, s, 1), "jpeg", a.shard_rows)
    cpus = max(a.cpus)
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ae = build_autoencoder(exp.ae, 3).to(rt.device)
    ts = TrainState(ae, exp.ae.optim, rt, seed=0)
    d = s // a.downsample
    objective = AEObjective(ae, exp.ae.loss, (3, s, s), (a.latent_channels, d, d))
    model = compile_module(objective, {"eager": False}.get(a.compile, a.compile), rt)
    synthetic = torch.rand(a.batch, 3, s, s, device=rt.device) * 2 - 1

    def step(x):
        noise = objective.draw_noise(a.batch, ts.gen)
        with rt.autocast():
            losses = model(x, noise)
        ts.optimizer_step(losses["total"].mean() / objective.dims)
        if rt.device.type == "cuda":  # a step's time, not its launch's
            torch.cuda.synchronize()

    t0 = time.perf_counter()
    for _ in range(a.warmup):  # compiles
        step(synthetic)
    print(f"step  compiled and warmed up in {time.perf_counter() - t0:.0f} s", flush=True)
    try:
        bracketed(b, a.configs,
                  lambda config: make_source(config, uri, a.batch, rt, lambda x: to_model_range(x["image"], s), cpus),
                  step, lambda: synthetic, f"step {a.preset} {s}^2",
                  {"kind": "step", "batch": a.batch, "image_size": s, "preset": a.preset, "cpus": cpus})
    finally:
        ray.shutdown()
        for r in [r for r in b.rows if r["kind"] == "step"]:
            ips = a.batch / (r["ms_per_step_ready"] / 1e3)
            need = ips / per_cpu if per_cpu else float("nan")
            b.add({"kind": "summary", "config": r["config"], "stream_slowdown": r["stream_slowdown"],
                   "cpus_per_gpu_needed": need, "decode_images_per_s_per_cpu": per_cpu},
                  f"stream {r['config']:<9} slows the step by {100 * r['stream_slowdown']:+.1f}%; the step needs "
                  f"{need:.1f} CPU cores of JPEG decode at {s}^2 per GPU ({per_cpu:.0f} img/s per core)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--encodings", nargs="+", default=["jpeg", "png"])
    p.add_argument("--cpus", type=int, nargs="+", default=[1, 2], help="Ray CPUs (decode workers)")
    p.add_argument("--configs", nargs="+", default=["after"], choices=CONFIGS)
    p.add_argument("--images", type=int, default=256, help="images per decode dataset")
    p.add_argument("--shard-rows", type=int, default=64)
    p.add_argument("--stream-batch", type=int, default=32, help="batch of the decode rows")
    p.add_argument("--decode-ms", type=float, default=0.0, help="sleep per image added to decoding")
    p.add_argument("--consumer-ms", type=float, default=0.0, help="add consumer rows: CPU step of this length")
    p.add_argument("--consumer-work", nargs="+", default=["hold", "torch"], choices=["hold", "torch", "python"])
    p.add_argument("--device", default=None, help="cuda: add the stage-1 step rows")
    p.add_argument("--preset", default="paper")
    p.add_argument("--image-size", type=int, default=512)
    p.add_argument("--downsample", type=int, default=16)
    p.add_argument("--latent-channels", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--compile", default="default", choices=["eager", "default", "reduce-overhead"])
    p.add_argument("--step-images", type=int, default=1024)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=20, help="draws before timing a stream (its start and first shuffle refills)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--time-limit", type=float, default=0.0, help="start no measurement after this many seconds")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    b = Bench(a)
    with tempfile.TemporaryDirectory() as root:
        decode_rows(b, root)
        if a.consumer_ms:
            consumer_rows(b, root)
        if a.device:
            jpeg = [r for r in b.rows if r["kind"] == "decode" and r["encoding"] == "jpeg" and r["size"] == a.image_size]
            step_rows(b, root, decode_rate_per_core(jpeg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
