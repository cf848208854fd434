"""Bad input is refused before anything starts, with a message naming file, key and value; the config
loader never fails with anything but ConfigError (property tests). Cases already in tests/test_config.py
and tests/test_data.py (loss factor <= 0, downsample, latent channels, wrong types, unknown keys, YAML
syntax, empty grid space, Parquet schema/size/corruption/empty split) are not repeated here."""
from __future__ import annotations

import json
import math
import string

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ulsweep.cli import main
from ulsweep.config import ConfigError, check_data, experiment_from_dict, load_experiment, to_dict
from ulsweep.data import write_dataset
from ulsweep.sweep.space import planned_overrides, validate_space

GRID = {"method": "grid", "space": {"ae.loss.loss_factor": {"values": [1.5, 2, 3]},
                                    "ae.loss.sigmoid_bias": {"values": [-2, 0, 2]}}, "max_trials": 8}


def test_grid_larger_than_the_budget_is_refused(tmp_path):
    p = tmp_path / "g.yaml"
    p.write_text(yaml.safe_dump({"search": GRID}))
    with pytest.raises(ConfigError) as e:
        load_experiment(str(p))
    assert str(e.value) == (f"{p}: search.space: 9 AE trials (3 x 3 points x 1 sample(s)) exceed the budget "
                            "search.max_trials=8 (got 9)")
    assert load_experiment(str(p), {"search.max_trials": 9}).search.max_trials == 9
    with pytest.raises(ConfigError, match=r"search.num_samples: 5 AE trials \(num_samples=5\) exceed the budget search.max_trials=4 \(got 5\)"):
        experiment_from_dict({"search": {"method": "optuna-tpe", "num_samples": 5, "max_trials": 4, "metrics": ["bpp"],
                                         "space": {"ae.loss.loss_factor": {"low": 1, "high": 4}}}})


@pytest.mark.parametrize("cmd", [["run"], ["train", "ae"]])
def test_unknown_dataset_path_fails_before_anything_starts(tmp_path, capsys, monkeypatch, cmd):
    monkeypatch.chdir(tmp_path)
    p = tmp_path / "d.yaml"
    p.write_text(yaml.safe_dump({"name": "d", "data": {"path": str(tmp_path / "nope")}}))
    assert main([*cmd, str(p)]) == 2
    err = capsys.readouterr().err
    assert f"{p}: data.path: no such dataset directory (got '{tmp_path / 'nope'}')" in err
    assert not (tmp_path / "runs").exists()  # no run dir, no MLflow store, no Ray


def test_dataset_without_a_split_or_manifest_is_a_config_error(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(ConfigError, match=r"data.path: not a dataset directory \(no dataset.json"):
        check_data(experiment_from_dict({"data": {"path": str(tmp_path / "plain")}}), file="x.yaml")
    imgs = np.zeros((4, 1, 8, 8), np.uint8)
    write_dataset(str(tmp_path / "ds"), "ds", {"train": (imgs, np.zeros(4, np.int64))})
    with pytest.raises(ConfigError, match=r"x.yaml: data.path: has no split\(s\) \['test'\] \(splits: train\)"):
        check_data(experiment_from_dict({"data": {"path": str(tmp_path / "ds"), "image_size": 8}}), file="x.yaml")
    (tmp_path / "ds" / "dataset.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"data.path: invalid dataset: .*dataset.json: not valid JSON"):
        check_data(experiment_from_dict({"data": {"path": str(tmp_path / "ds"), "image_size": 8}}))
    with pytest.raises(ConfigError, match=r"data.path: unknown builtin dataset; available: builtin:digits"):
        check_data(experiment_from_dict({"data": {"path": "builtin:imagenet"}}))


# ----------------------------------------------------------------------------------------------
# property tests: anything in, a valid config or ConfigError out

SECTIONS = to_dict(experiment_from_dict({}))
KEYS = sorted({k for sec in SECTIONS.values() if isinstance(sec, dict) for k in sec} | set(SECTIONS) |
              {"loss_factor", "downsample", "latent_channels", "image_size", "values", "low", "high", "method",
               "space", "steps", "preset", "name", "path", "betas", "max_trials", "ae.loss.loss_factor"})
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(allow_nan=True),
                    st.text(string.printable, max_size=12), st.sampled_from(["tiny", "grid", "cosine", "min", "auto"]),
                    st.dates(), st.binary(max_size=4))
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=8), st.integers(-3, 3), st.booleans(), st.none())
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(keys, inner, max_size=4)), max_leaves=20)


def _mutated_default(draw_path, value):
    d = json.loads(json.dumps(SECTIONS))
    node = d
    for k in draw_path[:-1]:
        if not isinstance(node, dict) or not isinstance(node.get(k), dict):
            break
        node = node[k]
    if isinstance(node, dict):
        node[draw_path[-1]] = value
    return d


def _accept(raw, **kw):
    try:
        exp = experiment_from_dict(raw, **kw)
    except ConfigError:
        return
    validate_and_plan(exp)


def validate_and_plan(exp):
    try:
        validate_space(exp)
        planned_overrides(exp.search, exp.ae.train.seed)
    except ConfigError:
        pass


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(st.dictionaries(keys, values, max_size=5))
def test_any_mapping_loads_or_raises_config_error(raw):
    _accept(raw)


@FAST
@given(st.lists(st.sampled_from(KEYS), min_size=1, max_size=3), values)
def test_one_bad_value_deep_in_a_valid_config_loads_or_raises_config_error(path, value):
    _accept(_mutated_default(path, value))


@FAST
@given(st.dictionaries(st.sampled_from(["ae.loss.loss_factor", "search.space", "base_models.0.name", "data",
                                        "ae..x", "", "resources.num_workers", "base_models.9.x"]), values,
                       max_size=3))
def test_any_overrides_load_or_raise_config_error(overrides):
    _accept({}, overrides=overrides)


@FAST
@given(st.text(string.printable + "äλ\t", max_size=200))
def test_any_yaml_text_loads_or_raises_config_error(tmp_path_factory, text):
    p = tmp_path_factory.getbasetemp() / "prop.yaml"
    p.write_text(text)
    try:
        validate_and_plan(load_experiment(str(p)))
    except ConfigError:
        pass


@FAST
@given(values)
def test_any_yaml_document_of_a_search_section_loads_or_raises_config_error(tmp_path_factory, search):
    p = tmp_path_factory.getbasetemp() / "prop-search.yaml"
    try:
        text = yaml.safe_dump({"search": search})
    except yaml.YAMLError:
        return
    p.write_text(text)
    try:
        validate_and_plan(load_experiment(str(p)))
    except ConfigError:
        pass


def test_property_strategies_reach_both_outcomes():
    """The strategies above are not vacuous: they produce valid configs and refused ones."""
    ok = experiment_from_dict(_mutated_default(["ae", "loss", "loss_factor"], 2))
    assert ok.ae.loss.loss_factor == 2.0
    for bad in (math.inf, 10**400, "x", None, [1]):
        with pytest.raises(ConfigError, match="ae.loss.loss_factor"):
            experiment_from_dict(_mutated_default(["ae", "loss", "loss_factor"], bad))
