"""One thread per trial process for the bodies of all its trials.

Tune runs a function trainable in a new thread for every trial, also in a process it reuses for the next trial
(`resources.reuse_processes`). Torch keeps per-thread state that a later trial of the process wants to find
again: torch.compile's CUDA graphs live in per-thread trees (and with torch 2.11 a second thread of a process
failed in capture: ulsweep/train/runtime.compile_mode), while Dynamo's compiled code, cuDNN's chosen algorithms
and the caching allocator's memory are per process. So a reused process hands each trial to the one thread
here, and Tune's thread waits for it: every trial of the process is then the first thread's trial as far as
torch can tell.

    run(fn, *args)    fn(*args) in this process's trial thread; returns what it returns, raises what it raises
    note_trial()      counts a trial starting in this process: 1 in a fresh process, 2 in its first reuse, ...
"""
from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable

_lock = threading.Lock()
_thread: threading.Thread | None = None
_jobs: queue.SimpleQueue = queue.SimpleQueue()
_started = 0  # trials started in this process (note_trial)


def _serve() -> None:
    while True:
        fut, fn, args = _jobs.get()
        if not fut.set_running_or_notify_cancel():
            continue
        try:
            fut.set_result(fn(*args))
        except BaseException as e:  # noqa: BLE001 - SystemExit from Tune's stop too: the caller re-raises it
            fut.set_exception(e)


def run(fn: Callable[..., Any], *args: Any) -> Any:
    """fn(*args) in this process's trial thread (started on first use; a daemon, so that a process that Ray
    ends does not wait for a trial stuck in it). The calling thread waits."""
    global _thread
    if threading.current_thread() is _thread:  # already in it: waiting on itself would never return
        return fn(*args)
    with _lock:
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_serve, name="ulsweep-trial", daemon=True)
            _thread.start()
    fut: Future = Future()
    _jobs.put((fut, fn, args))
    return fut.result()


def note_trial() -> int:
    """Count a trial that starts in this process; returns its number here (1: the process is fresh)."""
    global _started
    with _lock:
        _started += 1
        return _started
