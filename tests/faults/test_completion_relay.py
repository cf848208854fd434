"""A trial that Tune restarts itself on --resume must reach the searcher when it completes. Tune wraps the
searcher in a ConcurrencyLimiter (search.max_concurrent) that drops completions of trials missing from its
restored set of live trials; the searcher then waited forever for a finished AE trial and `--resume` hung
after its `done` line (benchmarks/faults/campaign.py, worker-kill-thrice). ulsweep.sweep.progress.CompletionRelay
tells the searcher of every completion itself."""
from __future__ import annotations

from types import SimpleNamespace

from ray import cloudpickle
from ray.tune.search import ConcurrencyLimiter

from ulsweep.config.schema import SearchConfig
from ulsweep.sweep.progress import CompletionRelay
from ulsweep.sweep.searcher import SpawningSearcher


def _grid():
    return SearchConfig(method="grid", space={"ae.loss.loss_factor": {"values": [1.5, 4.0]}}, metrics=("gfd",),
                        modes=("min",))


def _ae(key):
    return {"key": key, "kind": "ae", "checkpoint": f"/ck/{key}", "mlflow_run_id": f"run-{key}"}


def _trial(trial_id, result, status="RUNNING"):
    return SimpleNamespace(trial_id=trial_id, last_result=result, status=status)


def test_a_completion_the_concurrency_limiter_drops_reaches_the_searcher():
    s = SpawningSearcher(_grid(), ["tiny"])
    relay = CompletionRelay(s)
    s, relay = cloudpickle.loads(cloudpickle.dumps((s, relay)))  # tuner.pkl holds both: one searcher
    assert relay.searcher is s
    lim = ConcurrencyLimiter(s, max_concurrent=2)
    lim.suggest("t0"), lim.suggest("t1")
    lim.on_trial_complete("t0", error=True)  # ae-0000's training process killed once too often
    lim.on_trial_complete("t1", result=_ae("ae-0001"))
    assert lim.suggest("b1")["key"] == "ae-0001-tiny"
    lim.on_trial_complete("b1", result={"key": "ae-0001-tiny", "gfd": 2.0})
    # --resume: Tune restarts t0 itself (its table holds it unfinished); the limiter's live set, as Tune saved
    # and restored it, does not hold t0
    s.revive(["ae-0000"], [], resumed={"ae-0000"})
    lim.set_state(lim.get_state())
    assert not lim.live_trials
    assert lim.suggest("x") is None  # waits for the restarted trial
    lim.on_trial_complete("t0", result=_ae("ae-0000"))  # dropped by the limiter: t0 is not live to it
    assert s.aes["ae-0000"]["status"] == "running"
    relay.on_trial_complete(0, [], _trial("t0", _ae("ae-0000")))  # what Tune's callbacks get
    assert s.aes["ae-0000"]["status"] == "trained"
    assert lim.suggest("b0")["key"] == "ae-0000-tiny"  # the AE trial spawns its base trial
    relay.on_trial_complete(0, [], _trial("b0", {"key": "ae-0000-tiny", "gfd": 1.0}))
    lim.on_trial_complete("b0", result={"key": "ae-0000-tiny", "gfd": 1.0})  # the limiter's own call: no-op
    assert s.counts() == {"ae_done": 2, "base_done": 2}
    assert s.suggest("y") == s.FINISHED


def test_the_relay_passes_errors_and_pending_stops_as_tune_does():
    s = SpawningSearcher(_grid(), ["tiny"])
    relay = CompletionRelay(s)
    s.suggest("t0"), s.suggest("t1")
    relay.on_trial_error(0, [], _trial("t0", _ae("ae-0000")))  # an error, whatever its last result
    relay.on_trial_complete(0, [], _trial("t1", _ae("ae-0001"), status="PENDING"))  # stopped before it ran
    assert s.aes["ae-0000"]["status"] == "failed" and s.aes["ae-0001"]["status"] == "failed"
