"""Search spaces over dotted config keys, and the experiment a trial runs.

A space maps dotted keys of the experiment (e.g. `ae.loss.loss_factor`) to one of
    {values: [...]}                  categorical / grid axis
    {low: a, high: b, log: bool}     float
    {low: a, high: b, int: true}     integer (optional step)
A trial's experiment is the sweep's experiment dict with those keys set, validated again by
`experiment_from_dict`, so a bad value from a space is reported with its key.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ulsweep.config import (BaseStageConfig, ConfigError, ExperimentConfig, SearchConfig,
                            experiment_from_dict, to_dict)
from ulsweep.config.errors import NO_VALUE, key_join

SEED_KEY = "ae.train.seed"  # incremented for the repeats of `none` / `grid` when num_samples > 1


@dataclass(frozen=True)
class Param:
    key: str  # dotted config key
    kind: str  # "categorical" | "float" | "int"
    values: tuple = ()
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: int | None = None


def parse_space(space: Mapping[str, Any]) -> list[Param]:
    """Space entries -> Params, in file order. Shapes were checked by SearchConfig already."""
    out = []
    for key, spec in space.items():
        if "values" in spec:
            out.append(Param(key, "categorical", values=tuple(spec["values"])))
        elif spec.get("int"):
            out.append(Param(key, "int", low=spec["low"], high=spec["high"], log=bool(spec.get("log")),
                             step=spec.get("step")))
        else:
            out.append(Param(key, "float", low=float(spec["low"]), high=float(spec["high"]),
                             log=bool(spec.get("log"))))
    return out


def optuna_distributions(params: Sequence[Param]) -> dict:
    import optuna.distributions as od

    dists = {}
    for p in params:
        if p.kind == "categorical":
            dists[p.key] = od.CategoricalDistribution(list(p.values))
        elif p.kind == "int":
            dists[p.key] = od.IntDistribution(int(p.low), int(p.high), log=p.log, step=p.step or 1)
        else:
            dists[p.key] = od.FloatDistribution(p.low, p.high, log=p.log)
    return dists


def grid_points(params: Sequence[Param]) -> list[dict[str, Any]]:
    """Cartesian product of the `values` axes, first key varying slowest."""
    for p in params:
        if p.kind != "categorical":
            raise ConfigError("method grid needs {values: [...]}", key=key_join("search.space", p.key))
    axes = [[(p.key, v) for v in p.values] for p in params]
    return [dict(combo) for combo in itertools.product(*axes)]


def planned_overrides(search: SearchConfig, base_seed: int) -> list[dict[str, Any]] | None:
    """The AE trials' overrides for `none` / `grid` (in order, then `search.points`), None for optuna."""
    if search.method == "none":
        points: list[dict[str, Any]] = [{}]
    elif search.method == "grid":
        points = grid_points(parse_space(search.space))
    else:
        return None
    reps = []
    for r in range(search.num_samples):
        for pt in points:
            reps.append({**pt, SEED_KEY: pt.get(SEED_KEY, base_seed) + r} if r else dict(pt))
    return reps + [dict(pt) for pt in search.points]


def trial_experiment(raw: Mapping[str, Any], overrides: Mapping[str, Any],
                     file: str | None = None) -> ExperimentConfig:
    """The experiment an AE trial runs: `raw` (the sweep's resolved experiment dict) with overrides set."""
    return experiment_from_dict(raw, dict(overrides), file=file)


def find_base(exp: ExperimentConfig, name: str) -> BaseStageConfig:
    for b in exp.base_models:
        if b.name == name:
            return b
    raise ConfigError(f"no base model named {name!r}", key="base_models", value=[b.name for b in exp.base_models])


def validate_space(exp: ExperimentConfig, file: str | None = None) -> None:
    """Check every space key against the experiment by building the experiment at the space's corners.

    Raises ConfigError naming `search.space.<key>` when a key does not exist or a value is refused.
    """
    raw = to_dict(exp)
    params = parse_space(exp.search.space)
    for p in params:
        if p.key.split(".")[0] == "search":
            raise ConfigError("a search space cannot change the search itself", key=key_join("search.space", p.key),
                              file=file)
        probes = list(p.values) if p.kind == "categorical" else [p.low, p.high]
        if p.kind == "int":
            probes = [int(v) for v in probes]
        for v in probes:
            try:
                experiment_from_dict(raw, {p.key: v})
            except ConfigError as e:
                raise ConfigError(f"value {v!r} is refused: {e.message}" + (f" (at {e.key})" if e.key else ""),
                                  key=key_join("search.space", p.key), value=v, file=file) from None
    for i, pt in enumerate(exp.search.points):
        for key in pt:
            if key.split(".")[0] == "search":
                raise ConfigError("a point cannot change the search itself", key=f"search.points[{i}].{key}",
                                  file=file)
        try:
            experiment_from_dict(raw, pt)
        except ConfigError as e:
            value = {"value": e.value} if e.value is not NO_VALUE else {}
            if e.key in pt:  # one of the point's own keys
                raise ConfigError(f"refused: {e.message}", key=key_join(f"search.points[{i}]", e.key), file=file,
                                  **value) from None
            at = f" (at {e.key})" if e.key else ""
            raise ConfigError(f"this point {pt} is refused{at}: {e.message}", key=f"search.points[{i}]", file=file,
                              **value) from None
    if exp.search.method == "grid":  # combinations can be invalid even if each value alone is fine
        for ov in grid_points(params):
            try:
                experiment_from_dict(raw, ov)
            except ConfigError as e:
                at = f" (at {e.key})" if e.key else ""
                raise ConfigError(f"grid point {ov} is refused{at}: {e.message}", key="search.space", file=file,
                                  **({} if e.value is NO_VALUE else {"value": e.value})) from None
