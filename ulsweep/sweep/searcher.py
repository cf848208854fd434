"""A Tune Searcher that wraps Optuna and spawns base-model trials from finished autoencoder trials.

Every Tune trial is one *job*, named by a stable key:
    AE job    `ae-0003`        config {"kind": "ae", "key", "overrides"}
    base job  `ae-0003-tiny`   config {"kind": "base", "key", "ae_key", "base", "ae_checkpoint", "ae_run_id"}
When an AE trial completes, its base jobs (one per `base_models` entry) are queued and handed out ahead of
new AE suggestions. The AE's Optuna objective is told only when all its base jobs have reported (or right
away when the experiment has no base models). Tune saves this object (`save`/`restore`) together with its
trial table, so a resumed sweep neither loses nor repeats spawned jobs; completions are idempotent by key.

Plain Python + Optuna: unit-testable without Ray (Tune's `Searcher` base class is imported only).
"""
from __future__ import annotations

import logging
import math
import pickle
from typing import Callable, Collection, Sequence

from ray.tune.search import Searcher

from ulsweep.testing import faults
from ulsweep.config import SearchConfig
from ulsweep.sweep.space import optuna_distributions, parse_space, planned_overrides

log = logging.getLogger(__name__)

# Result keys the searcher keeps from a finished trial (everything numeric is kept too).
_KEEP_STR = ("key", "kind", "checkpoint", "mlflow_run_id", "ae_key", "base")


def ae_key(index: int) -> str:
    return f"ae-{index:04d}"


def base_key(ae: str, base: str) -> str:
    return f"{ae}-{base}"


def _slim(result: dict | None) -> dict:
    """Numbers and the few strings we need; Tune's bookkeeping (config, timestamps, ...) dropped."""
    out = {}
    for k, v in (result or {}).items():
        if k in _KEEP_STR and isinstance(v, str):
            out[k] = v
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and k not in (
                "timestamp", "time_this_iter_s", "time_total_s", "pid", "training_iteration",
                "time_since_restore", "iterations_since_restore", "timesteps_total", "episodes_total"):
            out[k] = float(v)
    return out


class SpawningSearcher(Searcher):
    """Optuna (TPE / NSGA-II) or a fixed plan (grid / none) for AE trials + spawned base-model trials.

    on_objective(ae_record) is called (in the Tune driver) when an AE's objective is known, on_skip(keys) with
    the keys of the base trials that a failed AE trial will not spawn (its stacked base groups stop waiting for
    them, ulsweep/sweep/stacking.py); both must be picklable (Tune pickles the searcher with the Tuner).
    """

    def __init__(self, search: SearchConfig, base_names: Sequence[str], base_seed: int = 0,
                 on_objective: Callable[[dict], None] | None = None,
                 on_skip: Callable[[list[str]], None] | None = None):
        super().__init__(metric=None, mode=None)
        self.search = search
        self.base_names = list(base_names)
        self.on_objective = on_objective
        self.on_skip = on_skip  # told the keys of the base trials a failed AE trial will never spawn
        self._plan = planned_overrides(search, base_seed)  # None for optuna methods
        self._total = len(self._plan) if self._plan is not None else search.num_samples
        self._params = parse_space(search.space)
        self._study = None  # created lazily (optuna import), pickled with the searcher
        self.aes: dict[str, dict] = {}  # AE key -> record (see _new_ae)
        self.queue: list[tuple[str, str]] = []  # (AE key, base name) waiting to be suggested
        self.trial_keys: dict[str, str] = {}  # Tune trial id -> job key
        self.next_index = 0
        self.redo: list[str] = []  # failed AE keys revived by a resume (revive()), suggested again first

    # ------------------------------------------------------------------ Optuna
    def _get_study(self):
        if self._study is None:
            import optuna

            optuna.logging.set_verbosity(optuna.logging.WARNING)
            directions = ["minimize" if m == "min" else "maximize" for m in self.search.modes]
            if self.search.method == "optuna-nsga2":
                sampler = optuna.samplers.NSGAIISampler(seed=self.search.seed)
            elif self.search.method == "optuna-tpe":
                sampler = optuna.samplers.TPESampler(seed=self.search.seed)
            else:  # grid / none: points are enqueued; the sampler never draws
                sampler = optuna.samplers.RandomSampler(seed=self.search.seed)
            self._study = optuna.create_study(directions=directions, sampler=sampler)
        return self._study

    @property
    def study(self):
        """The Optuna study holding every AE trial (params, objective values, state)."""
        return self._get_study()

    # ------------------------------------------------------------------ Tune API
    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True  # objectives come from our own config, not Tune's metric/mode

    def suggest(self, trial_id: str) -> dict | str | None:
        if trial_id in self.trial_keys:  # Tune asks once per id; be safe anyway
            log.warning("suggest() called twice for trial %s", trial_id)
        if self.queue:
            ae, base = self.queue.pop(0)
            rec = self.aes[ae]
            rec["bases"][base]["status"] = "running"
            key = base_key(ae, base)
            self.trial_keys[trial_id] = key
            return {"kind": "base", "key": key, "ae_key": ae, "base": base,
                    "ae_checkpoint": rec["result"].get("checkpoint", ""),
                    "ae_run_id": rec["result"].get("mlflow_run_id", ""),
                    "overrides": dict(rec["overrides"])}
        if self.redo:
            key = self.redo.pop(0)
            self.trial_keys[trial_id] = key
            return {"kind": "ae", "key": key, "overrides": dict(self.aes[key]["overrides"])}
        if self.next_index < self._total:
            return self._suggest_ae(trial_id)
        if self.pending():
            return None  # AE trials may still spawn base trials: wait
        return Searcher.FINISHED

    def _suggest_ae(self, trial_id: str) -> dict:
        study = self._get_study()
        dists = optuna_distributions(self._params)
        if self._plan is not None:
            point = self._plan[self.next_index]
            fixed = {k: v for k, v in point.items() if k in dists}
            study.enqueue_trial(fixed, skip_if_exists=False)
            trial = study.ask(dists)
            overrides = dict(point)
        else:
            trial = study.ask(dists)
            overrides = dict(trial.params)
        key = ae_key(self.next_index)
        self.next_index += 1
        self.aes[key] = {"key": key, "index": self.next_index - 1, "overrides": overrides,
                         "optuna_number": trial.number, "status": "running", "result": None,
                         "bases": {b: {"status": "waiting", "result": None} for b in self.base_names},
                         "objective": None}
        self.trial_keys[trial_id] = key
        return {"kind": "ae", "key": key, "overrides": overrides}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        key = self.trial_keys.get(trial_id)
        if key is not None:  # fault-injection points (tests): the driver dies during a trial
            faults.point("driver.ae_result" if key in self.aes else "driver.base_result", key)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        key = self.trial_keys.get(trial_id) or (result or {}).get("key")
        if key is None:
            log.warning("completion of unknown trial %s ignored", trial_id)
            return
        if key in self.aes:
            self._ae_complete(key, result, error)
            return
        for ae, rec in self.aes.items():
            for base in rec["bases"]:
                if base_key(ae, base) == key:
                    self._base_complete(ae, base, result, error)
                    return
        log.warning("completion of unknown job %s ignored", key)

    # ------------------------------------------------------------------ bookkeeping
    def _ae_complete(self, key: str, result: dict | None, error: bool) -> None:
        rec = self.aes[key]
        if rec["status"] != "running":
            return  # already handled (idempotent across resume)
        slim = _slim(result)
        if error or not slim.get("checkpoint"):
            rec["status"], rec["result"] = "failed", slim or None
            for b in rec["bases"].values():
                b["status"] = "skipped"
            self._tell(rec, None)
            if self.on_skip is not None and rec["bases"]:
                self.on_skip([base_key(key, b) for b in rec["bases"]])
            return
        rec["status"], rec["result"] = "trained", slim
        if not self.base_names:
            self._finish(rec)
            return
        for base in self.base_names:
            rec["bases"][base]["status"] = "queued"
            self.queue.append((key, base))
        faults.point("driver.ae_complete", key)  # tests: the driver dies between an AE and its bases

    def _base_complete(self, ae: str, base: str, result: dict | None, error: bool) -> None:
        rec = self.aes[ae]
        b = rec["bases"][base]
        if b["status"] in ("done", "failed", "skipped"):
            return
        slim = _slim(result)
        b["status"] = "failed" if (error or not slim) else "done"
        b["result"] = slim or None
        if all(x["status"] in ("done", "failed") for x in rec["bases"].values()):
            self._finish(rec)

    def objective_values(self, rec: dict) -> list[float] | None:
        """One value per search metric from the AE result and its base results; None if any is missing."""
        values = []
        bases = {n: b["result"] for n, b in rec["bases"].items() if b["status"] == "done" and b["result"]}
        for m in self.search.metrics:
            if "/" in m:
                bname, metric = m.split("/", 1)
                v = (bases.get(bname) or {}).get(metric)
            else:
                from_bases = [r[m] for r in bases.values() if m in r]
                if from_bases:
                    v = sum(from_bases) / len(from_bases)
                else:
                    v = (rec["result"] or {}).get(m)
            if v is None or not math.isfinite(v):
                return None
            values.append(float(v))
        return values

    def _finish(self, rec: dict) -> None:
        failed_bases = [n for n, b in rec["bases"].items() if b["status"] == "failed"]
        values = None if failed_bases else self.objective_values(rec)
        if values is None:
            rec["status"] = "failed" if failed_bases else "no_objective"
            log.warning("%s: no objective (%s)", rec["key"],
                        f"base trial(s) {failed_bases} failed" if failed_bases
                        else f"metrics {list(self.search.metrics)} not reported")
        else:
            rec["status"] = "done"
        self._tell(rec, values)

    def _tell(self, rec: dict, values: list[float] | None) -> None:
        import optuna

        rec["objective"] = values
        study = self._get_study()
        if values is None:
            study.tell(rec["optuna_number"], state=optuna.trial.TrialState.FAIL)
        else:
            study.tell(rec["optuna_number"], values if len(values) > 1 else values[0])
        if self.on_objective is not None:
            try:
                self.on_objective(rec)
            except Exception as e:  # tracking must never take the search down
                log.warning("on_objective(%s) failed: %s", rec["key"], e)

    # ------------------------------------------------------------------ resume
    def revivable(self, deterministic: Callable[[str], bool]) -> tuple[list[str], list[tuple[str, str]]]:
        """(AE keys, (AE key, base) pairs) of the trials that failed for a reason a retry may change:
        `deterministic(key)` is True for a trial whose failure would recur (its failure.json)."""
        aes, bases = [], []
        for key, rec in self.aes.items():
            if rec["status"] == "failed" and all(b["status"] == "skipped" for b in rec["bases"].values()):
                if not deterministic(key):
                    aes.append(key)  # the AE trial itself failed (its base trials never ran)
                continue
            bases += [(key, b) for b, st in rec["bases"].items()
                      if st["status"] == "failed" and not deterministic(base_key(key, b))]
        return aes, bases

    def revive(self, aes: Sequence[str], bases: Sequence[tuple[str, str]], resumed: Collection[str] = ()) -> None:
        """Hand these failed trials out again, under their keys (a resume after a passing fault: storage
        read-only or full, a training process killed once too often). A revived AE trial spawns its base
        trials when it completes; its Optuna trial, told FAIL, is replaced by a new one with the same
        parameters, told the objective at the end. Keys in `resumed` are trials that Tune restarts itself
        (its table holds them unfinished): their records wait for them instead of handing out new ones."""
        for key in aes:
            rec = self.aes[key]
            rec.update(status="running", result=None, objective=None)
            rec["bases"] = {b: {"status": "waiting", "result": None} for b in self.base_names}
            self._reopen_optuna(rec)
            if key not in self.redo and key not in resumed:
                self.redo.append(key)
        for key, base in bases:
            rec = self.aes[key]
            again = base_key(key, base) in resumed
            rec["bases"][base] = {"status": "running" if again else "queued", "result": None}
            if rec["status"] != "trained":
                rec.update(status="trained", objective=None)
                self._reopen_optuna(rec)
            if not again and (key, base) not in self.queue:
                self.queue.append((key, base))

    def _reopen_optuna(self, rec: dict) -> None:
        """A new Optuna trial with `rec`'s parameters where its trial was told already."""
        study = self._get_study()
        number = rec.get("optuna_number")
        if number is not None and not study.trials[number].state.is_finished():
            return
        dists = optuna_distributions(self._params)
        study.enqueue_trial({k: v for k, v in rec["overrides"].items() if k in dists}, skip_if_exists=False)
        rec["optuna_number"] = study.ask(dists).number

    # ------------------------------------------------------------------ queries
    def pending(self) -> bool:
        """Jobs handed out or queued whose outcome is still unknown."""
        return bool(self.queue or self.redo) or any(r["status"] in ("running", "trained") for r in self.aes.values())

    def is_finished(self) -> bool:
        return self.next_index >= self._total and not self.pending()

    def ranked(self) -> list[dict]:
        """AE records with an objective, best first (by the first metric)."""
        done = [r for r in self.aes.values() if r["objective"] is not None]
        sign = 1.0 if self.search.modes[0] == "min" else -1.0
        return sorted(done, key=lambda r: sign * r["objective"][0])

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.aes.values():
            out[f"ae_{r['status']}"] = out.get(f"ae_{r['status']}", 0) + 1
            for b in r["bases"].values():
                out[f"base_{b['status']}"] = out.get(f"base_{b['status']}", 0) + 1
        return out

    # ------------------------------------------------------------------ persistence
    def get_state(self) -> dict:
        return {"aes": self.aes, "queue": self.queue, "trial_keys": self.trial_keys,
                "next_index": self.next_index, "study": self._study, "redo": self.redo}

    def set_state(self, state: dict) -> None:
        """Restore get_state()'s dict; ValueError (nothing changed) when it is not one."""
        check_state(state)
        self.aes = state["aes"]
        self.queue = [tuple(q) for q in state["queue"]]
        self.trial_keys = state["trial_keys"]
        self.next_index = state["next_index"]
        self._study = state["study"]
        self.redo = list(state.get("redo", []))  # absent from states saved before revival existed

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump(self.get_state(), f)

    def restore(self, checkpoint_path: str) -> None:
        """Load a save()d state; ValueError naming the file when it is damaged."""
        try:
            with open(checkpoint_path, "rb") as f:
                state = pickle.load(f)
            self.set_state(state)
        except Exception as e:  # unpickling garbage raises about any type
            raise ValueError(f"{checkpoint_path}: damaged searcher state ({type(e).__name__}: {e})"[:400]) from None


_STATE_TYPES = {"aes": dict, "queue": list, "trial_keys": dict, "next_index": int}


def check_state(state) -> None:
    """ValueError unless `state` has the shape of SpawningSearcher.get_state()."""
    if not isinstance(state, dict):
        raise ValueError(f"expected a dict, got {type(state).__name__}")
    for key, typ in _STATE_TYPES.items():
        if not isinstance(state.get(key), typ):
            raise ValueError(f"{key!r} is missing or not a {typ.__name__}")
    for key, rec in state["aes"].items():
        if not isinstance(rec, dict) or not {"key", "index", "status", "bases", "overrides"} <= set(rec):
            raise ValueError(f"AE record {key!r} is not a searcher record")
    if not isinstance(state.get("redo", []), list) or not set(state.get("redo", [])) <= set(state["aes"]):
        raise ValueError("'redo' is not a list of AE keys of the state")
    study = state.get("study")
    if study is not None and type(study).__name__ != "Study":
        raise ValueError(f"'study' is a {type(study).__name__}, not an Optuna study")
