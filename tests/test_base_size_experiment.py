"""experiments/base_size.yaml and experiments/bias_pairs.yaml (issue 22) plan what the issue asks for, on the
setup of experiments/lf_sweep.yaml (loading and space validity of every file: tests/test_config.py,
tests/test_space.py)."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ulsweep.config import load_experiment, to_dict
from ulsweep.sweep.space import planned_overrides, trial_experiment

REPO = Path(__file__).resolve().parents[1]


def _trials(name):
    exp = load_experiment(REPO / "experiments" / name)
    return exp, [trial_experiment(to_dict(exp), ov) for ov in planned_overrides(exp.search, exp.ae.train.seed)]


def test_base_size_plan():
    exp, trials = _trials("base_size.yaml")
    lf = load_experiment(REPO / "experiments" / "lf_sweep.yaml")
    # same data and autoencoder as the Fig. 8 run, only the loss varies
    assert exp.data == lf.data and exp.eval.extractor == lf.eval.extractor
    assert dataclasses.replace(exp.ae, loss=lf.ae.loss) == lf.ae
    assert {t.ae.loss.sigmoid_bias for t in trials} == {0.0}
    factors = sorted({t.ae.loss.loss_factor for t in trials})
    assert len(factors) >= 6 and {1.3, 2.1} <= set(factors) and max(factors) >= 4.0
    assert [b.model.preset for b in exp.base_models] == ["small", "medium", "large"]
    # a second seed at three loss factors, for the autoencoder and every base model alike
    repeats = [t for t in trials if t.ae.train.seed != 0]
    assert len(trials) == len(factors) + 3 and len({t.ae.loss.loss_factor for t in repeats}) == 3
    assert all({b.train.seed for b in t.base_models} == {t.ae.train.seed} for t in trials)
    assert len({(b.train.steps, b.train.batch_size, b.optim) for b in exp.base_models}) == 1  # only the net differs


def test_bias_pairs_plan():
    exp, trials = _trials("bias_pairs.yaml")
    lf = load_experiment(REPO / "experiments" / "lf_sweep.yaml")
    pairs = sorted((t.ae.loss.sigmoid_bias, t.ae.loss.loss_factor, t.ae.train.seed) for t in trials)
    assert pairs == [(-2.0, 2.0, s) for s in (0, 1, 2)] + [(0.0, 1.5, s) for s in (0, 1, 2)]
    # the autoencoder trains 4x longer, otherwise as in the Fig. 8 run; its base model is the Fig. 8 run's
    assert exp.ae.train.steps == 4 * lf.ae.train.steps
    assert dataclasses.replace(exp.ae.train, steps=lf.ae.train.steps, ckpt_every=lf.ae.train.ckpt_every) == lf.ae.train
    # evaluated as there; whether sampling runs compiled changes its speed, not what it computes (the published
    # bias-pairs run sampled uncompiled), and its precision moves gFID far less than a seed (lf_sweep samples in
    # bf16 since session 25; the bias-pairs run was published in fp32, as it stays)
    assert exp.base_models == lf.base_models
    assert exp.eval.sample_precision == "fp32" and lf.eval.sample_precision == "bf16"
    assert dataclasses.replace(exp.eval, sample_compile=lf.eval.sample_compile, sample_precision="bf16") == lf.eval
    assert all(b.train.seed == t.ae.train.seed for t in trials for b in t.base_models)


@pytest.mark.parametrize("name", ["base_size.yaml", "bias_pairs.yaml"])
def test_header_states_a_time_estimate(name):
    head = (REPO / "experiments" / name).read_text().split("\nname:")[0]
    assert "Time on one H200" in head and "min" in head
