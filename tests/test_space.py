"""Search spaces, trial experiments, and the shipped experiment files."""
from __future__ import annotations

from pathlib import Path

import pytest

from ulsweep.config import ConfigError, SearchConfig, experiment_from_dict, load_experiment, to_dict
from ulsweep.sweep.space import (find_base, grid_points, optuna_distributions, parse_space, planned_overrides,
                                 trial_experiment, validate_space)

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((REPO / "experiments").glob("*.yaml"))


@pytest.mark.parametrize("path", EXPERIMENTS, ids=[p.name for p in EXPERIMENTS])
def test_every_experiment_file_loads_and_its_space_is_valid(path):
    exp = load_experiment(path)
    validate_space(exp, file=str(path))
    plan = planned_overrides(exp.search, exp.ae.train.seed)
    for ov in plan or []:
        trial_experiment(to_dict(exp), ov)


def test_shipped_experiments_cover_the_paper_tables():
    names = {p.name for p in EXPERIMENTS}
    assert {"quickstart.yaml", "lf_sweep.yaml", "channels.yaml", "downsampling.yaml", "ablations.yaml"} <= names
    lf = load_experiment(REPO / "experiments" / "lf_sweep.yaml")
    plan = planned_overrides(lf.search, 0)
    assert len(plan) == 18  # Fig. 8: 3 sigmoid biases x 5 loss factors, then 3 of them with a second seed
    assert len({(p["ae.loss.sigmoid_bias"], p["ae.loss.loss_factor"], p.get("ae.train.seed", 0)) for p in plan}) == 18
    assert sum(p.get("ae.train.seed", 0) == 1 for p in plan) == 3
    assert {p["ae.loss.loss_factor"] for p in plan} == {1.5, 1.75, 2.0, 3.0, 4.0}
    assert {p["ae.loss.sigmoid_bias"] for p in plan} == {-2.0, 0.0, 2.0}
    assert lf.data.path == "builtin:fashion-mnist" and lf.data.image_size == 32
    assert (lf.ae.model.preset, lf.ae.model.downsample, lf.ae.model.latent_channels) == ("small", 4, 8)
    ch = load_experiment(REPO / "experiments" / "channels.yaml")
    chans = {p["ae.model.latent_channels"] for p in planned_overrides(ch.search, 0)}
    assert min(chans) == 4 and max(chans) == 64
    ds = load_experiment(REPO / "experiments" / "downsampling.yaml")
    assert len({p["ae.model.downsample"] for p in planned_overrides(ds.search, 0)}) >= 2
    ab = load_experiment(REPO / "experiments" / "ablations.yaml")
    exps = [trial_experiment(to_dict(ab), p) for p in planned_overrides(ab.search, 0)]
    assert any(e.ae.loss.stop_grad_prior for e in exps)  # Table 6 A
    assert any(e.ae.loss.logsnr_z0 == 10 for e in exps)  # Table 6 B
    assert any(not e.ae.loss.stop_grad_prior and e.ae.loss.logsnr_z0 == 5 for e in exps)  # baseline


def test_grid_points_cartesian_first_key_slowest():
    params = parse_space({"a.b": {"values": [1, 2]}, "c": {"values": ["x", "y", "z"]}})
    pts = grid_points(params)
    assert len(pts) == 6
    assert pts[:3] == [{"a.b": 1, "c": "x"}, {"a.b": 1, "c": "y"}, {"a.b": 1, "c": "z"}]


def test_repeats_vary_the_seed():
    s = SearchConfig(method="grid", space={"ae.loss.loss_factor": {"values": [1.5, 2.0]}}, num_samples=3)
    plan = planned_overrides(s, base_seed=10)
    assert len(plan) == 6
    assert [p.get("ae.train.seed") for p in plan] == [None, None, 11, 11, 12, 12]


def test_extra_points_follow_the_grid_and_are_validated():
    space = {"ae.loss.loss_factor": {"values": [1.5, 2.0]}}
    s = SearchConfig(method="grid", space=space, points=({"ae.loss.loss_factor": 4.0, "ae.train.seed": 1},))
    assert planned_overrides(s, base_seed=0) == [{"ae.loss.loss_factor": 1.5}, {"ae.loss.loss_factor": 2.0},
                                                 {"ae.loss.loss_factor": 4.0, "ae.train.seed": 1}]
    with pytest.raises(ConfigError, match="only for methods none and grid") as e:
        SearchConfig(method="optuna-tpe", space={"ae.loss.loss_factor": {"low": 1.0, "high": 4.0}},
                     metrics=("bpp",), points=({"ae.train.seed": 1},))
    assert e.value.key.endswith("points")
    base = {"search": {"method": "grid", "metrics": ["gfd"], "modes": ["min"], "space": space}}
    bad = experiment_from_dict(base, {"search.points": [{"ae.loss.loss_factor": -1.0}]})
    with pytest.raises(ConfigError, match="refused") as e:
        validate_space(bad)
    assert "loss_factor" in e.value.key
    with pytest.raises(ConfigError, match="cannot change the search"):
        validate_space(experiment_from_dict(base, {"search.points": [{"search.num_samples": 2}]}))


def test_compile_setting_accepts_modes_and_refuses_others():
    exp = experiment_from_dict({}, {"ae.train.compile": "reduce-overhead"})
    assert exp.ae.train.compile == "reduce-overhead"
    assert experiment_from_dict({}, {"ae.train.compile": True}).ae.train.compile is True
    with pytest.raises(ConfigError) as e:
        experiment_from_dict({}, {"ae.train.compile": "fast"})
    assert e.value.key == "ae.train.compile" and e.value.value == "fast"


def test_optuna_distributions():
    import optuna.distributions as od

    d = optuna_distributions(parse_space({"x": {"low": 0.1, "high": 1.0, "log": True},
                                          "n": {"low": 2, "high": 8, "int": True, "step": 2},
                                          "c": {"values": [4, 8]}}))
    assert isinstance(d["x"], od.FloatDistribution) and d["x"].log
    assert isinstance(d["n"], od.IntDistribution) and d["n"].step == 2
    assert isinstance(d["c"], od.CategoricalDistribution) and d["c"].choices == (4, 8)


@pytest.mark.parametrize("space, key, words", [
    ({"ae.loss.loss_factor": {"low": 2.0, "high": 1.0}}, "search.space.ae.loss.loss_factor.high", "must exceed"),
    ({"ae.loss.loss_factor": {"values": []}}, "search.space.ae.loss.loss_factor.values", "non-empty"),
    ({"ae.loss.loss_factor": {"vals": [1]}}, "search.space.ae.loss.loss_factor", "unknown field"),
    ({"ae.loss.loss_factor": 1.5}, "search.space.ae.loss.loss_factor", "expected"),
    ({"ae.loss.loss_factor": {"low": 0.0, "high": 1.0, "log": True}}, "search.space.ae.loss.loss_factor.low", "> 0"),
])
def test_space_shape_errors_name_the_key(space, key, words):
    with pytest.raises(ConfigError) as e:
        experiment_from_dict({"search": {"method": "optuna-tpe", "space": space, "metrics": ["gfd"],
                                         "modes": ["min"]}})
    assert e.value.key == key and words in e.value.message


def test_grid_needs_values():
    with pytest.raises(ConfigError, match="method grid needs"):
        experiment_from_dict({"search": {"method": "grid", "space": {"ae.loss.loss_factor": {"low": 1, "high": 2}}}})


def test_tpe_takes_one_metric():
    with pytest.raises(ConfigError, match="optuna-nsga2"):
        experiment_from_dict({"search": {"method": "optuna-tpe", "space": {"x": {"values": [1]}},
                                         "metrics": ["a", "b"], "modes": ["min", "min"]}})


def test_validate_space_catches_unknown_keys_and_refused_values():
    base = {"search": {"method": "grid", "metrics": ["gfd"], "modes": ["min"]}}
    bad_key = experiment_from_dict(base, {"search.space": {"ae.loss.loss_facter": {"values": [2.0]}}})
    with pytest.raises(ConfigError) as e:
        validate_space(bad_key)
    assert e.value.key == "search.space.ae.loss.loss_facter" and "loss_factor" in e.value.message
    bad_value = experiment_from_dict(base, {"search.space": {"ae.model.downsample": {"values": [4, 3]}}})
    with pytest.raises(ConfigError) as e:
        validate_space(bad_value)
    assert e.value.key == "search.space.ae.model.downsample" and e.value.value == 3
    nested = experiment_from_dict(base, {"search.space": {"search.num_samples": {"values": [2]}}})
    with pytest.raises(ConfigError, match="cannot change the search"):
        validate_space(nested)


def test_trial_experiment_sets_dotted_keys_and_finds_bases():
    exp = experiment_from_dict({"base_models": [{"name": "s"}, {"name": "m", "model": {"preset": "medium"}}]})
    t = trial_experiment(to_dict(exp), {"ae.loss.loss_factor": 3.0, "ae.model.latent_channels": 16})
    assert t.ae.loss.loss_factor == 3.0 and t.ae.model.latent_channels == 16
    assert find_base(t, "m").model.preset == "medium"
    with pytest.raises(ConfigError):
        find_base(t, "x")
