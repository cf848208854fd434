"""A sweep's trials of one architecture trained as one stacked program each (`resources.stack_trials`).

The driver plans the groups before the first trial starts: the planned autoencoder trials (grid or none search)
whose data, autoencoder and evaluation settings agree but for the loss factor, sigmoid bias and seed
(ulsweep.train.identity.MEMBER_KEYS), in plan order, at most `stack_trials` a group (`plan`); and, per such group and
base model, the base trials its members will spawn, whose base settings agree but for the seed (`base_plan`). It
starts one `GroupTrainer` Ray actor per group (`start`), on a node with the trials' GPUs. Every trial stays a Tune
trial of its own (its MLflow run, retries, timings and spawned base trials are as before), but its worker, instead
of training, joins its group's actor (`train_in_group`) and relays what the group's loop reports for it to its own
hooks: its curves to its MLflow run and to Tune, its checkpoints. The group writes each member's final checkpoint,
images and result.json in the member's own run directory (ulsweep.train.group.train_autoencoders,
ulsweep.train.group_base.train_bases), and the trial returns that result as if it had trained alone.

An autoencoder group's actor builds the group's data and networks, and runs its uncompiled step once, for the members
the driver planned while their trial processes start (ulsweep.train.group.prepare_autoencoders), and trains from that
when they join as planned; a base group's actor builds its networks and warms their compiled step while the autoencoders
train (ulsweep.train.group_base.prepare_bases), in the thread that trains them. A group trains once all its members have
joined, or `stack_wait_s` after its first member joined with those that have (a member finished before, in a resumed
sweep, never joins; a base trial whose autoencoder failed never comes); a base group reads each member's autoencoder
checkpoint, and encodes its latents (ulsweep.train.group_base.encode_ahead, in ENCODERS threads: those queued while all
are busy together), when the member's autoencoder group passes it on (`ReadAhead`, as soon as the member's final
checkpoint is written, which the group does beside its members' final evaluation), or else reads it as the member
joins, while it waits for the others. A member that comes after its group started trains alone. A member whose loss
turns non-finite fails as it would alone (TrainingDiverged, not retried) and the others train on; any other failure of
the group's training is every member's failure, and their retries train alone. An actor that dies is restarted (up to
`resources.max_worker_failures` times): its members' trials fail with it, and their retries form the group again, which
resumes from its checkpoint when they are the same members (without a member that diverged, they are another group,
which starts from scratch). A member's trial that dies alone comes back to its group (`join`) and relays its events
again. Between the group's loop and a member's trial, `before_checkpoint` waits (at most ACK_WAIT_S) until the trial has
taken every point before the checkpoint, as a trial's own loop would.
"""
from __future__ import annotations

import dataclasses
import io
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ulsweep.config import ExperimentConfig, config_hash, dump_yaml, flatten, to_dict
from ulsweep.train.hooks import StageResult, TrainHooks

ACK_WAIT_S = 10.0  # longest the group's loop waits for a member's trial to take the points before a checkpoint
POLL_S = 1.0  # a member's trial asks its group for news at least this often
READERS = 4  # threads of a base group that read its members' checkpoints as they join (group_base.read_ahead)
# threads of a base group that encode the latents of the checkpoints passed on (group_base.encode_ahead), each
# taking every checkpoint queued when it starts: one checkpoint's encoding is mostly the store's writing on the
# host (0.7-2.0 s of 60,000 latents on session 31's H100, the encoder a fraction of it), which threads overlap;
# those that come while all are busy are encoded together
ENCODERS = 3


def plan(exp: ExperimentConfig) -> list[list[str]]:
    """The groups of the sweep's planned autoencoder trials (their keys), groups of one left out (they train
    alone); [] with `resources.stack_trials: 1`. A group is at most `search.max_concurrent` trials too: its members
    must run at once."""
    from ulsweep.train.identity import shared_settings  # no torch in the driver

    return _groups(_planned(exp).items(), lambda e: dump_yaml(shared_settings(e)), _size(exp))


def base_plan(exp: ExperimentConfig) -> list[list[str]]:
    """The groups of the base trials that the groups of `plan(exp)` spawn: per autoencoder group and base model,
    the members' base trials (their keys) whose base settings agree but for the seed (the autoencoders' agree
    already: ulsweep.train.group_base.check_members)."""
    from ulsweep.sweep.searcher import base_key
    from ulsweep.sweep.space import find_base
    from ulsweep.train.identity import BASE_MEMBER_KEYS

    trials, out = _planned(exp), []
    for group in plan(exp):
        for name in [b.name for b in exp.base_models]:
            def ident(e: ExperimentConfig) -> str:
                base = flatten({"base": to_dict(find_base(e, name))})
                return dump_yaml({k: v for k, v in base.items() if k not in BASE_MEMBER_KEYS})

            out += _groups([(base_key(key, name), trials[key]) for key in group], ident, _size(exp))
    return out


def _size(exp: ExperimentConfig) -> int:
    return min(exp.resources.stack_trials, exp.search.max_concurrent)


def _planned(exp: ExperimentConfig) -> dict[str, ExperimentConfig]:
    """{autoencoder trial key: its experiment} of the planned search, in plan order ({} where there is no plan
    or stacking is off)."""
    if _size(exp) <= 1:
        return {}
    from ulsweep.sweep.searcher import ae_key
    from ulsweep.sweep.space import planned_overrides, trial_experiment

    raw = to_dict(exp)
    return {ae_key(i): trial_experiment(raw, ov)
            for i, ov in enumerate(planned_overrides(exp.search, exp.ae.train.seed) or [])}


def _groups(trials, ident, size: int) -> list[list[str]]:
    """Keys of (key, experiment) `trials` in groups of equal `ident(experiment)`, in order, at most `size` a
    group; groups of one left out."""
    filling, groups = {}, []
    for key, e in trials:
        i = ident(e)
        group = filling.setdefault(i, [])
        if not group:
            groups.append(group)
        group.append(key)
        if len(group) == size:
            filling.pop(i)
    return [g for g in groups if len(g) > 1]


def all_groups(exp: ExperimentConfig) -> list[tuple[str, list[str]]]:
    """Every stacked group of the sweep as (kind, keys): the autoencoders' (`plan`), then their base trials'
    (`base_plan`)."""
    return [("ae", g) for g in plan(exp)] + [("base", g) for g in base_plan(exp)]


def actor_name(sweep_id: str, index: int) -> str:
    return f"ulsweep-stack-{sweep_id}-{index}"


def group_names(exp: ExperimentConfig, sweep_id: str) -> dict[str, str]:
    """{trial key: the name of its group's actor} for the trials of `all_groups(exp)` (the others train alone)."""
    return {key: actor_name(sweep_id, i) for i, (_, keys) in enumerate(all_groups(exp)) for key in keys}


class GroupTrainer:
    """One group's trainer (a threaded Ray actor in a sweep; plain Python in tests): members `join`, the group
    trains in a thread of its own, each member's trial `poll`s for its events and, at the end, its outcome."""

    def __init__(self, keys: list[str], group_root: str, wait_s: float, threads: int = 0, kind: str = "ae",
                 planned: list[dict] | None = None, together: bool = False,
                 pass_on: Callable[[str, str], None] | None = None, log: str | None = None):
        self.keys, self.group_root, self.wait_s, self.threads = list(keys), group_root.rstrip("/"), wait_s, threads
        if log:  # a sweep's actor: what it prints (its loop's lines too) kept in a file, as the driver shows none
            try:
                tee_output(log)
            except OSError as e:  # never the group's failure: its lines stay in Ray's logs
                print(f"[group {self.group_root}] cannot keep its output in {log}: {e}", flush=True)
        self.kind = kind  # "ae": autoencoder trials (train_autoencoders); "base": base trials (train_bases)
        # members' results handed to their trials all at once, when the last member's evaluation is done (an
        # autoencoder group whose members' base trials form a group: that group waits for its last member anyway,
        # and its members would wait the longer the earlier they came), rather than each as soon as it is done
        self.together = together
        # an autoencoder group's: told (member key, its final checkpoint) as each member's checkpoint is written, so
        # that the base group its base trials will join reads the checkpoint before they start (`ReadAhead`)
        self.pass_on = pass_on
        self.finished: dict[str, tuple[str, Any]] = {}  # key -> its result, not handed over yet
        self.cv = threading.Condition()
        self.joined: dict[str, tuple[dict, str, dict]] = {}  # key -> (experiment dict, run dir, base trial's info)
        self.state = "forming"  # -> "training" -> "done"
        self.events: dict[str, list] = {}  # key -> ("log", step, metrics) | ("before_checkpoint", step) | ...
        self.taken: dict[str, int] = {}  # key -> events its trial has taken
        self.outcome: dict[str, tuple[str, Any]] = {}  # key -> ("result", StageResult fields) | ("error", exc)
        self.members: list[str] = []
        # a base group's members' autoencoder checkpoints, read ahead on the host (group_base.read_ahead) when their
        # autoencoder group passes them on (`read_ahead`) or else as they join: key -> (checkpoint, future)
        self.read: dict[str, tuple[str, Future]] = {}
        # and, of those passed on (and not read again at the join, for another checkpoint), their latents encoded
        # as their checkpoints are read, those queued by the time an encoding thread is free all together
        # (ENCODERS; group_base.encode_ahead: only where the group will hold its latents on the device):
        # key -> future; and the queue: (checkpoint, its reading, time.time() it was passed on, the future)
        self.ahead: dict[str, Future] = {}
        self._queued: list[tuple[str, Future, float, Future]] = []
        self._encoder: ThreadPoolExecutor | None = None
        self._reader: ThreadPoolExecutor | None = None
        # torch and the training modules, while the members' trial processes start (a fresh process spent ~10 s
        # importing them on the H200 machine), so that the group trains as soon as they have joined
        t_imports = time.time()
        import torch._dynamo  # noqa: F401 - the optimizer's first construction imports it (~1 s on this box)

        import ulsweep.train.group  # noqa: F401
        import ulsweep.train.group_base  # noqa: F401

        # its members can join from now on (a Ray actor serves no call before its __init__ returns): when its
        # process started and how long the imports took, for where a sweep's first seconds go (epoch seconds)
        from ulsweep.sweep.clock import process_start_time

        started = process_start_time()
        print(f"[{kind} group of {len(self.keys)}] actor up at {time.time():.2f}: process started at "
              f"{started if started is None else round(started, 2)}, imports {time.time() - t_imports:.1f} s",
              flush=True)

        # an autoencoder group's data and networks, built and its step warmed while the members' trial processes
        # start (`planned`: the experiments the driver planned for `keys`, in order), taken if they join as planned
        self._prepared: Future | None = None
        if kind == "ae" and planned and len(planned) == len(self.keys) > 1:
            self._prepared = ThreadPoolExecutor(1, thread_name_prefix="ulsweep-prepare").submit(self._prepare,
                                                                                              planned)
        # a base group's networks, built and their compiled step warmed while the autoencoders train (`planned`: per
        # member its experiment and base model's name), in the thread that will train them (CUDA graphs belong to
        # one thread of a process: runtime.compile_mode), which then waits for the members and trains
        self._first_join: float | None = None  # time.monotonic() of the first join: the group waits wait_s from it
        self._thread: threading.Thread | None = None
        if kind == "base" and planned and len(planned) == len(self.keys) > 1:
            self._thread = threading.Thread(target=self._prepare_bases_then_run, args=(planned,),
                                            name="ulsweep-group", daemon=True)
            self._thread.start()

    def _prepare(self, planned: list[dict]):
        import torch

        from ulsweep.config import experiment_from_dict
        from ulsweep.train.group import prepare_autoencoders

        if self.threads:
            torch.set_num_threads(self.threads)
        exps = [experiment_from_dict(d) for d in planned]
        _require_gpus(exps[0])
        prepared = prepare_autoencoders(exps)
        parts = ", ".join(f"{k[len('prepare_'):-2]} {v:.1f}" for k, v in prepared.parts.items())
        print(f"[ae group of {len(planned)}] built and its step warmed in {prepared.seconds:.1f} s ({parts}), ready "
              f"at {prepared.t_end:.2f}", flush=True)
        with self.cv:  # kept while its members come; dropped (its GPU memory with it) if none comes in wait_s
            if not self.cv.wait_for(lambda: bool(self.joined), self.wait_s):
                print(f"[ae group of {len(planned)}] no member joined within {self.wait_s:g} s: the group built "
                      "ahead is dropped", flush=True)
                prepared = None
        if prepared is None:
            _release_gpu_memory()
        return prepared

    def _take_prepared(self, exps: list) -> Any:
        """The group prepared ahead when its members are the planned ones (the same experiments, in order), else
        None (it is dropped, its memory released); a preparation that failed is named and costs nothing else."""
        if self._prepared is None:
            return None
        future, self._prepared = self._prepared, None
        try:
            prepared, future = future.result(), None  # the future lets go of it: dropped below, its memory freed
        except Exception as e:  # noqa: BLE001 - the group builds itself as it would have without it
            print(f"[ae group] preparing ahead failed ({type(e).__name__}: {str(e)[:300]}); building it now",
                  flush=True)
            return None
        if prepared is None:  # dropped: nobody came in time
            return None
        from ulsweep.train.group import group_hash

        if prepared.ident == group_hash(exps):
            return prepared
        print(f"[ae group] {len(exps)} members joined, not the {len(self.keys)} planned: building it for them",
              flush=True)
        del prepared
        _release_gpu_memory()
        return None

    def join(self, key: str, experiment: dict, run_dir: str, base: dict | None = None) -> bool:
        """Add trial `key` (its experiment and run directory; a base trial's `base`: {"base": its base model's name,
        "ae_checkpoint"}) to the group; False when it is not a member or the group has started without it (it then
        trains alone). A member's trial that comes again while the group trains it (a retry of a trial process
        that died) takes its events up again from the start."""
        with self.cv:
            if self.state != "forming":
                return key in self.members and key not in self.outcome
            if key not in self.keys:
                return False
            first = not self.joined
            self.joined[key] = (experiment, run_dir, base or {})
            if self.kind == "base" and base and self.read.get(key, ("",))[0] != base["ae_checkpoint"]:
                self._read(key, base["ae_checkpoint"])  # not read ahead, or another checkpoint than the one passed on
                self.ahead.pop(key, None)  # encoded from another checkpoint: the group encodes its own
            self.events[key], self.taken[key] = [], 0
            if first:
                self._first_join = time.monotonic()
                if self._thread is None:  # else the thread that prepared the group goes on to train it
                    self._thread = threading.Thread(target=self._run, name="ulsweep-group", daemon=True)
                    self._thread.start()
            self.cv.notify_all()
            return True

    def read_ahead(self, key: str, ae_checkpoint: str) -> bool:
        """A forming base group's member `key` will train on the autoencoder at `ae_checkpoint`, whose trial has just
        finished (its autoencoder group passes it on): read it now, before the member's trial starts and joins.
        False where there is nothing to do: not a base group's member, read already, or the group has started."""
        with self.cv:
            if self.kind != "base" or self.state != "forming" or key not in self.keys or key in self.read:
                return False
            self._read(key, ae_checkpoint)
            self.ahead[key] = Future()
            self._queued.append((ae_checkpoint, self.read[key][1], time.time(), self.ahead[key]))
            self._encoder = self._encoder or ThreadPoolExecutor(ENCODERS, thread_name_prefix="ulsweep-encode-ahead")
            self._encoder.submit(self._encode_queued)
            return True

    def stop_reading_ahead(self, wait: bool) -> None:
        """Shut the threads that read checkpoints and encode latents ahead down, cancelling what they have not
        started; `wait`: until those running have ended."""
        for pool in (self._reader, self._encoder):
            if pool is not None:
                pool.shutdown(wait=wait, cancel_futures=True)

    def _encode_queued(self) -> None:
        """Encode the latents of every checkpoint queued by now (`read_ahead`) together, and set their futures; a
        call in another thread may have taken them all. A failure fails each of them: the group then encodes them
        itself."""
        from ulsweep.train.group_base import encode_ahead

        with self.cv:
            queued, self._queued = self._queued, []
            members = len(self.keys)
        if not queued:
            return
        try:
            out = encode_ahead([(ckpt, read, t) for ckpt, read, t, _ in queued], members)
        except BaseException as e:  # noqa: BLE001 - each member's future says it; train_bases names it
            for *_, f in queued:
                f.set_exception(e)
        else:
            for (*_, f), o in zip(queued, out):
                f.set_result(o)

    def _read(self, key: str, ae_checkpoint: str) -> None:
        """Start reading member `key`'s autoencoder checkpoint on the host; called with `cv` held."""
        from ulsweep.train.group_base import read_ahead

        self._reader = self._reader or ThreadPoolExecutor(READERS, thread_name_prefix="ulsweep-read-ahead")
        self.read[key] = (ae_checkpoint, self._reader.submit(read_ahead, ae_checkpoint))

    def forgo(self, key: str) -> None:
        """Trial `key` will not come (a base trial whose autoencoder trial failed): a forming group stops waiting
        for it, and trains as soon as the others have joined."""
        with self.cv:
            if self.state == "forming" and key in self.keys and key not in self.joined:
                self.keys.remove(key)
                self.cv.notify_all()

    def poll(self, key: str, taken: int, timeout: float = POLL_S) -> tuple[list, tuple[str, Any] | None]:
        """(member `key`'s events after the first `taken`, its outcome or None); waits up to `timeout` for news.
        `taken` also tells the group how far the trial has got (`before_checkpoint` waits for it)."""
        with self.cv:
            if taken > self.taken.get(key, 0):  # news for a before_checkpoint waiting on this trial
                self.taken[key] = taken
                self.cv.notify_all()
            # woken by anything (another member's events, another trial's poll), it waits on for its own news:
            # trials that woke each other at every poll kept the actor's lock and the GIL busy
            self.cv.wait_for(lambda: len(self.events[key]) > taken or key in self.outcome, timeout)
            return self.events[key][taken:], self.outcome.get(key)

    def hand_over_finished(self) -> None:
        """The results held back (`together`) to their members' trials; called with `cv` held."""
        for k, v in self.finished.items():
            self.outcome.setdefault(k, v)
        self.finished.clear()

    def status(self) -> dict:
        with self.cv:
            return {"state": self.state, "joined": list(self.joined), "members": list(self.members)}

    def _prepare_bases_then_run(self, planned: list[dict]) -> None:
        """A base group's thread: its networks built and compiled step warmed (`group_base.prepare_bases`; a
        failure is named and costs nothing else), then, once a member has joined, its training (`_run`)."""
        prepared = None
        try:
            import torch

            from ulsweep.config import experiment_from_dict
            from ulsweep.sweep.space import find_base
            from ulsweep.train.identity import latent_shape
            from ulsweep.train.group_base import prepare_bases

            if self.threads:
                torch.set_num_threads(self.threads)
            exps = [experiment_from_dict(d["experiment"]) for d in planned]
            _require_gpus(exps[0])
            bases = [find_base(e, d["base"]) for e, d in zip(exps, planned)]
            prepared = prepare_bases(bases, exps, latent_shape(exps[0]), keep_waiting=lambda: not self.joined)
            print(f"[base {bases[0].name} group of {len(bases)}] built ahead in {prepared.seconds:.1f} s, before its "
                  f"members joined; its compiled step warmed: {prepared.compiled}", flush=True)
        except Exception as e:  # noqa: BLE001 - the group builds its networks when its members have joined
            print(f"[base group] preparing ahead failed ({type(e).__name__}: {str(e)[:300]}); building it when its "
                  "members have joined", flush=True)
        with self.cv:
            self.cv.wait_for(lambda: bool(self.joined))
        self._run(prepared)

    def _run(self, prepared: Any = None) -> None:
        with self.cv:
            deadline = (self._first_join or time.monotonic()) + self.wait_s
            while len(self.joined) < len(self.keys) and time.monotonic() < deadline:
                self.cv.wait(max(0.0, min(1.0, deadline - time.monotonic())))
            self.state = "training"
            self.members = [k for k in self.keys if k in self.joined]  # plan order
        joined = {"t_joined": time.time()}  # in every member's marks: when the group stopped waiting for members
        try:
            import torch

            from ulsweep.config import experiment_from_dict
            from ulsweep.sweep import precompile
            from ulsweep.train.group import GroupHooks, group_hash, train_autoencoders

            if self.threads:  # the CPUs its members' trials hold while they wait (an actor of 0 CPUs gets 1 thread)
                torch.set_num_threads(self.threads)

            exps = [experiment_from_dict(self.joined[k][0]) for k in self.members]
            _require_gpus(exps[0])
            run_dirs = [self.joined[k][1] for k in self.members]
            base_name = None if self.kind == "ae" else self.joined[self.members[0]][2]["base"]
            # the claim of a task that compiles the group's step ahead (ulsweep/sweep/precompile.py), if any
            claim = precompile.claim_of(exps[0], self.kind, base_name, len(exps))
            hooks = GroupHooks([_Relay(self, k) for k in self.members], claim)
            if self.kind == "ae":
                group_dir = f"{self.group_root}/{group_hash(exps)[:16]}"  # other members: another group, afresh
                results = train_autoencoders(exps, run_dirs, group_dir, hooks, self._take_prepared(exps), joined)
            else:
                from ulsweep.sweep.space import find_base
                from ulsweep.train.group_base import train_bases

                infos = [self.joined[k][2] for k in self.members]
                bases = [find_base(e, i["base"]) for e, i in zip(exps, infos)]
                ckpts = [i["ae_checkpoint"] for i in infos]
                # what its members train (not resources, which a resume may change), as the autoencoders' group_hash
                ident = config_hash({"members": [{"data": e.data, "eval": e.eval, "base": b, "ae_checkpoint": c}
                                                 for e, b, c in zip(exps, bases, ckpts)]})
                results = train_bases(exps, bases, ckpts, run_dirs, f"{self.group_root}/{ident[:16]}", hooks,
                                      [self.read[k][1] for k in self.members],
                                      [self.ahead.get(k) for k in self.members],  # and in every member's marks:
                                      joined | {"checkpoints_passed_on": sum(k in self.ahead for k in self.members)},
                                      prepared)
                prepared = None
            outcome = {k: ("result", dataclasses.asdict(r))
                       for k, r in zip(self.members, results) if r is not None}  # a diverged one failed already
        except BaseException as e:  # noqa: BLE001 - every member's trial raises it
            outcome = {k: ("error", e) for k in self.members}
        self.stop_reading_ahead(wait=False)
        self.read.clear()  # the autoencoders read ahead: host memory
        self.ahead.clear()  # their latents encoded ahead: device memory
        _release_gpu_memory()  # the actor lives on, idle, beside the trials that come after it
        with self.cv:
            self.hand_over_finished()  # members evaluated before a failure keep their results
            for k, v in outcome.items():
                self.outcome.setdefault(k, v)  # a member handed its result already keeps it
            self.state = "done"
            self.cv.notify_all()


class _Tee(io.TextIOBase):
    """A text stream that writes to several; its file descriptor, encoding and terminal are the first one's (what
    asks for them, e.g. faulthandler or a subprocess handed sys.stderr, gets the stream it replaced)."""

    def __init__(self, *streams):
        self.streams = streams

    def fileno(self) -> int:
        return self.streams[0].fileno()

    def isatty(self) -> bool:
        return self.streams[0].isatty()

    @property
    def encoding(self) -> str:
        return getattr(self.streams[0], "encoding", "utf-8")

    def write(self, text: str) -> int:
        for stream in self.streams:
            stream.write(text)
        return len(text)

    def flush(self) -> None:
        for stream in self.streams:
            stream.flush()


def tee_output(path: str) -> None:
    """This process's stdout and stderr written to the local file `path` too (appended, line by line): a group's
    actor runs under a driver that shows no actor output unless `--verbose` (`log_to_driver`), and its lines (built
    ahead in how long, the checkpoints passed on, the latents encoded, the loop's progress) belong with the sweep."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    f = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - open for the process's life
    sys.stdout, sys.stderr = _Tee(sys.stdout, f), _Tee(sys.stderr, f)


def _release_gpu_memory() -> None:
    """Hand the blocks torch's caching allocator holds for this process back to the GPU (a finished group's
    training and evaluation reserved tens of GiB that the base models and other groups need)."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


class Forgo:
    """The searcher's `on_skip` in a sweep: tells the groups of `names` ({trial key: actor name}, `group_names`)
    that those of their members will not come. Picklable (Tune pickles the searcher); a group gone already, or a
    key of no group, is nothing to tell."""

    def __init__(self, names: dict[str, str]):
        self.names = dict(names)

    def __call__(self, keys: list[str]) -> None:
        import ray

        for key in keys:
            if key not in self.names:
                continue
            try:
                ray.get_actor(self.names[key]).forgo.remote(key)
            except ValueError:  # no such actor (any more)
                pass


class ReadAhead:
    """An autoencoder group's `pass_on` in a sweep: tells the base groups of its members' base trials (`links`: {ae
    trial key: [(base trial key, its group's actor name)]}) where a member's final checkpoint is, so that they read
    it while the other members are still evaluated (18 of lf_sweep's, 6.5 GB, took 10.1 s when read as the base
    trials joined, all at once: one H100, session 30). Picklable (a Ray actor's argument); a base group gone, or
    started already, is nothing to tell."""

    def __init__(self, links: dict[str, list[tuple[str, str]]]):
        self.links = {k: list(v) for k, v in links.items()}

    def __call__(self, key: str, checkpoint: str) -> None:
        import ray

        for base_key, name in self.links.get(key, []):
            try:
                ray.get_actor(name).read_ahead.remote(base_key, checkpoint)
            except ValueError:  # no such actor (any more)
                pass


class _Relay(TrainHooks):
    """The group loop's hooks for one member: its events queued for its trial, until its result is handed over
    (`finished`: the member's trial returns; what the group does after concerns the group only)."""

    def __init__(self, group: GroupTrainer, key: str):
        self.group, self.key = group, key

    def _put(self, event: tuple) -> int:
        with self.group.cv:
            if self.key in self.group.outcome:
                return 0
            self.group.events[self.key].append(event)
            self.group.cv.notify_all()
            return len(self.group.events[self.key])

    def log_metrics(self, step: int, metrics: dict) -> None:
        self._put(("log", step, metrics))

    def before_checkpoint(self, step: int) -> None:
        n, deadline = self._put(("before_checkpoint", step)), time.monotonic() + ACK_WAIT_S
        with self.group.cv:  # until the trial has taken the points up to here (flushed them to MLflow)
            while self.group.taken[self.key] < n and time.monotonic() < deadline:
                self.group.cv.wait(max(0.0, deadline - time.monotonic()))

    def checkpoint_saved(self, step: int, path: str, metrics: dict) -> None:
        self._put(("checkpoint_saved", step, path, metrics))

    def failed(self, error: BaseException) -> None:
        """The member diverged and left the group: its trial raises `error`."""
        with self.group.cv:
            self.group.outcome.setdefault(self.key, ("error", error))
            self.group.cv.notify_all()

    def checkpoint_ready(self, path: str) -> None:
        """The member's final checkpoint is written, its evaluation still to come (the autoencoder group writes it
        before the member's result, `group.checkpoints_first`): passed on to the base group its base trial will
        join (`pass_on`), which reads it and encodes its latents meanwhile."""
        g = self.group
        if g.pass_on is None:
            return
        try:
            g.pass_on(self.key, path)
        except Exception as e:  # noqa: BLE001 - the base group then reads it when the base trial joins
            print(f"[{self.key}] could not pass its checkpoint on to its base group ({type(e).__name__}: {e})",
                  flush=True)

    def finished(self, result: StageResult) -> None:
        """The member's final evaluation as its own loop logs it (eval_<metric>), then its result: at once, or
        with `together` once no other member's evaluation is still to come."""
        self.log_metrics(result.steps, {f"eval_{k}": v for k, v in result.metrics.items()})
        g = self.group
        with g.cv:
            g.finished[self.key] = ("result", dataclasses.asdict(result))
            if not g.together or all(k in g.finished or k in g.outcome for k in g.members):
                g.hand_over_finished()
            g.cv.notify_all()


def relay(group, key: str, hooks: TrainHooks, call=lambda method, *args: method(*args)) -> StageResult:
    """Hand member `key`'s events from `group` to its trial's `hooks` until its outcome comes; returns its result
    or raises its group's error. `call(method, *args)` calls a method of the group (through Ray in a sweep)."""
    taken = 0
    while True:
        events, outcome = call(group.poll, key, taken)
        for ev in events:
            if ev[0] == "log":
                hooks.log_metrics(ev[1], ev[2])
            elif ev[0] == "before_checkpoint":
                getattr(hooks, "before_checkpoint", lambda step: None)(ev[1])
            else:
                hooks.checkpoint_saved(ev[1], ev[2], ev[3])
        taken += len(events)
        if outcome is not None and not events:  # every event taken before the outcome is acted on
            kind, value = outcome
            if kind == "error":
                raise value
            return StageResult(**value)


def train_in_group(name: str, key: str, exp: ExperimentConfig, run_dir: str, hooks: TrainHooks,
                   base: dict | None = None) -> StageResult | None:
    """Trial `key`'s training as a member of the group of actor `name` (a base trial's `base`: {"base": its base
    model's name, "ae_checkpoint"}): its result, or None when it is finished already or the group has no place for
    it (started without it, or gone with an earlier driver), so that its own loop returns it or trains it alone."""
    import ray

    from ulsweep.sweep.space import find_base
    from ulsweep.train.checkpoint import finished_result, read_meta
    from ulsweep.train.identity import stage1_hash, stage2_hash  # no torch in this process (trial.py)

    if base is None:
        cfg_hash = stage1_hash(exp)
    else:
        cfg_hash = stage2_hash(exp, find_base(exp, base["base"]), read_meta(base["ae_checkpoint"]))
    if finished_result(run_dir, cfg_hash) is not None:  # done before (a retry): its own loop returns it
        return None
    try:
        group = ray.get_actor(name)
    except ValueError:
        return None
    if not ray.get(group.join.remote(key, to_dict(exp), run_dir, base)):
        print(f"[{key}] its stacked group {name} started without it: training alone", flush=True)
        return None
    print(f"[{key}] training in stacked group {name}", flush=True)
    return relay(group, key, hooks, call=lambda method, *args: ray.get(method.remote(*args)))


def _require_gpus(exp: ExperimentConfig) -> None:
    """A group whose trials train on GPUs sees them (`precompile.gpu_node_options` places its actor), or fails
    saying so (`runtime.require_gpus`). Its members' trials then raise the error, and their retries train alone."""
    from ulsweep.train.runtime import require_gpus

    require_gpus(exp.resources, "the stacked group's actor", "trained on the CPU instead, a sweep's group would "
                 "take hours")


def group_threads(exp: ExperimentConfig, members: int) -> int:
    """torch's threads in the actor of a group of `members` trials: the CPUs their trials hold, at least 1 (an
    actor of 0 CPUs would get 1). On CPUs Inductor's kernels are compiled for this count (its FX graph cache key
    holds it), so a precompile task compiles a group's step under it too (`precompile._runtime`)."""
    return max(1, round(members * exp.resources.cpus_per_worker))


def trainer_args(exp: ExperimentConfig, run_dir: str, index: int, keys: list[str], kind: str = "ae",
                 names: dict[str, str] | None = None
                 ) -> tuple[list[str], str, float, int, str, list[dict] | None, bool, ReadAhead | None, str | None]:
    """GroupTrainer's arguments for group `index` (of `kind` trials) of the sweep in `run_dir`: its keys, the
    directory under which its runs keep their checkpoints, how long it waits for its members, torch's threads (the
    CPUs its members' trials hold, at least 1), the kind, the members' planned experiments (an autoencoder group
    builds itself ahead for them; a base group gets each with its member's base model, and builds its networks and
    warms their compiled step ahead), whether it hands its members' results over together (when
    every base model's trials of its members form a base group) and, given the groups' actor `names`
    (`group_names`), whom it passes its members' checkpoints on to (the base groups of their base trials); last,
    the file its output goes to (`actor.log` in its directory, where the run directory is local)."""
    from ulsweep import io as uio
    from ulsweep.sweep.searcher import base_key

    threads = group_threads(exp, len(keys))
    planned, together, pass_on = None, False, None
    trials = _planned(exp)
    if kind == "ae":
        planned = [to_dict(trials[k]) for k in keys] if all(k in trials for k in keys) else None
        grouped = [set(g) for g in base_plan(exp)]
        together = bool(exp.base_models) and all(
            any({base_key(k, b.name) for k in keys} <= g for g in grouped) for b in exp.base_models)
        links = {k: [(base_key(k, b.name), names[base_key(k, b.name)]) for b in exp.base_models
                     if base_key(k, b.name) in (names or {})] for k in keys}
        pass_on = ReadAhead({k: v for k, v in links.items() if v}) if any(links.values()) else None
    else:  # a base trial trains on its autoencoder trial's experiment (searcher.base_key: "<ae key>-<base>")
        of = {base_key(k, b.name): (k, b.name) for k in trials for b in exp.base_models}
        planned = ([{"experiment": to_dict(trials[of[k][0]]), "base": of[k][1]} for k in keys]
                   if all(k in of for k in keys) else None)
    root = f"{run_dir.rstrip('/')}/groups/group-{index}"
    log = os.path.join(root, "actor.log") if uio.is_local(root) else None
    return keys, root, exp.resources.stack_wait_s, threads, kind, planned, together, pass_on, log


def start(exp: ExperimentConfig, run_dir: str, sweep_id: str, out, workers_keep_gpus: bool = False) -> list:
    """One GroupTrainer actor per group of `plan(exp)`, on a node with the trials' GPUs (`gpu_node_options`);
    returns their handles (the caller keeps them for the sweep's length: the actors are the driver's)."""
    groups = all_groups(exp)
    if not groups:
        return []
    import ray

    from ulsweep.sweep.precompile import gpu_node_options

    placed = gpu_node_options(exp, workers_keep_gpus)
    if placed is None:
        print("stacking: no node with GPUs yet; every trial trains alone", file=out, flush=True)
        return []
    actor = ray.remote(GroupTrainer)
    handles, names = [], group_names(exp, sweep_id)
    for i, (kind, keys) in enumerate(groups):
        # a restarted actor forms the group again from the members' retried trials, and resumes it from its
        # checkpoint when they are the same members
        handles.append(actor.options(name=actor_name(sweep_id, i), num_cpus=0, num_gpus=0,
                                     max_concurrency=len(keys) + 4,
                                     max_restarts=exp.resources.max_worker_failures, **placed)
                       .remote(*trainer_args(exp, run_dir, i, keys, kind, names)))
    print(f"stacking: {len(groups)} group(s) of trials trained as one program each: "
          + "; ".join(f"{g[0]}..{g[-1]} ({len(g)})" for _, g in groups), file=out, flush=True)
    return handles
