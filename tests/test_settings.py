"""Every setting acts or is refused.

- Every leaf key of the experiment schema is read by the training loops, the sweep or the report, unless it is
  on the commented allow-list below: a key added to the schema and read nowhere fails this file.
- The settings that once did nothing now act (base-model sampler, base-model eval_every, the MSE decoder's
  lambda with a schedule shift), each shown by its effect.
- Settings that have no effect in the context the rest of the experiment sets are refused with a located error.
"""
from __future__ import annotations

import dataclasses
import sys
import typing

import pytest
import torch

from ulsweep import config as C
from ulsweep.config import ConfigError, experiment_from_dict

SECTIONS = [C.DataConfig, C.ScheduleConfig, C.AEModelConfig, C.AELossConfig, C.OptimConfig, C.TrainConfig,
            C.AEStageConfig, C.BaseModelConfig, C.BaseLossConfig, C.BaseStageConfig, C.SearchConfig,
            C.ResourcesConfig, C.TrackingConfig, C.EvalConfig, C.ExperimentConfig]

# Keys that no code reads as an attribute, and why that is right. Nothing else may be missing.
ALLOWED_UNREAD = {
    # enforced when the config is loaded: a grid larger than the budget is refused (SearchConfig.__post_init__)
    "search.max_trials": "a budget checked at load time",
}


def leaf_keys(cls=C.ExperimentConfig, prefix: str = "") -> list[str]:
    """Dotted leaf keys of the schema; `base_models[].` stands for every base model."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        args = typing.get_args(tp)
        if dataclasses.is_dataclass(tp):
            out += leaf_keys(tp, f"{prefix}{f.name}.")
        elif typing.get_origin(tp) is tuple and args and dataclasses.is_dataclass(args[0]):
            out += leaf_keys(args[0], f"{prefix}{f.name}[].")
        else:
            out.append(prefix + f.name)
    return out


class ReadTracer:
    """Records which config leaves ulsweep's code (outside ulsweep.config itself, whose validation and
    serialization read every field) reads, by dotted key. Config objects get their key when an experiment is
    built: every section below an ExperimentConfig is registered by walking it."""

    def __init__(self):
        self.paths: dict[int, tuple[object, str]] = {}  # id -> (object, dotted prefix); objects kept alive
        self.read: set[str] = set()

    def register(self, exp) -> None:
        def walk(obj, prefix):
            self.paths[id(obj)] = (obj, prefix)
            for f in dataclasses.fields(obj):
                v = object.__getattribute__(obj, f.name)
                if dataclasses.is_dataclass(v):
                    walk(v, f"{prefix}{f.name}.")
                elif isinstance(v, tuple) and v and dataclasses.is_dataclass(v[0]):
                    for item in v:
                        walk(item, f"{prefix}{f.name}[].")
        walk(exp, "")

    def install(self, monkeypatch) -> None:
        tracer = self

        def getattribute(obj, name):
            value = object.__getattribute__(obj, name)
            fields = type(obj).__dataclass_fields__
            if name in fields and not dataclasses.is_dataclass(value) and not (
                    isinstance(value, tuple) and value and dataclasses.is_dataclass(value[0])):
                caller = sys._getframe(1).f_globals.get("__name__", "")
                if caller.startswith("ulsweep.") and not caller.startswith("ulsweep.config"):
                    entry = tracer.paths.get(id(obj))
                    if entry is not None and entry[0] is obj:
                        tracer.read.add(entry[1] + name)
            return value

        for cls in SECTIONS:
            monkeypatch.setattr(cls, "__getattribute__", getattribute)
        post_init = C.ExperimentConfig.__post_init__

        def registering_post_init(exp):
            post_init(exp)
            tracer.register(exp)

        monkeypatch.setattr(C.ExperimentConfig, "__post_init__", registering_post_init)


def tiny(ae_loss=None, ae_train=None, base_train=None, eval_=None, **top):
    train = {"steps": 2, "batch_size": 8, "log_every": 1, "eval_images": 8, "eval_t_per_image": 2,
             "sample_steps": 2}
    return experiment_from_dict({
        "name": "settings",
        "data": {"path": "builtin:digits", "image_size": 16},
        "ae": {"model": {"preset": "tiny", "downsample": 4, "latent_channels": 2}, "loss": ae_loss or {},
               "train": {**train, **(ae_train or {})}},
        "base_models": [{"name": "b", "train": {**train, **(base_train or {})}}],
        "eval": eval_ or {"extractor": "none"}, **top})


def test_leaf_keys_cover_every_section():
    keys = leaf_keys()
    assert len(keys) == len(set(keys)) > 60
    assert {"ae.loss.decoder_schedule.shift", "base_models[].train.sampler", "search.max_trials"} <= set(keys)
    assert not set(ALLOWED_UNREAD) - set(keys), "the allow-list names keys that are not in the schema"


def _read_on_cuda(exp) -> None:
    """make_runtime's CUDA branch (cuDNN and TF32 settings) on this GPU-less box: only the device is faked."""
    from fakecuda import fake_cuda_device  # tests/fakecuda.py

    from ulsweep.train.runtime import make_runtime

    with fake_cuda_device():
        for train in (exp.ae.train, exp.base_models[0].train):
            assert make_runtime(train).device.type == "cuda"


def test_every_setting_is_read(tmp_path, digits_cache, monkeypatch):
    """Train both stages in-process under a few configurations that between them reach every code path
    that reads settings; every schema leaf must have been read (or be on the allow-list)."""
    from ulsweep.train.evaluation import load_eval_extractor
    from ulsweep.train.stage1 import train_autoencoder
    from ulsweep.train.stage2 import train_base

    tracer = ReadTracer()
    tracer.install(monkeypatch)
    exps = [
        tiny(ae_train={"eval_every": 1, "ckpt_every": 1}, base_train={"eval_every": 1, "ckpt_every": 1},
             eval_={"extractor": "auto", "extractor_epochs": 1, "gfd_samples": 8, "gfd_reference_images": 8}),
        tiny(ae_loss={"decoder": "mse", "prior": "normal"}, ae_train={"sample_steps": 32, "eval_t_per_image": 4}),
        tiny(ae_loss={"stop_grad_prior": True}),
    ]
    for i, exp in enumerate(exps):
        ae = train_autoencoder(exp, str(tmp_path / f"ae{i}"))
        if i == 0:
            train_base(exp, exp.base_models[0], ae.checkpoint, str(tmp_path / f"base{i}"))
    with pytest.raises(Exception):  # no Inception weights here; the setting is read on the way
        load_eval_extractor(tiny(eval_={"extractor": "inception", "inception_weights": str(tmp_path / "no.pt")}),
                            torch.device("cpu"))
    _read_on_cuda(exps[0])
    _read_by_the_sweep(tracer, tmp_path)
    unread = sorted(set(leaf_keys()) - tracer.read - set(ALLOWED_UNREAD))
    assert not unread, f"settings no code reads (make them act, or refuse them, or allow-list them): {unread}"


def _read_by_the_sweep(tracer, tmp_path) -> None:
    """The sweep driver's steps up to Tune's fit (its own reads of search, tracking and storage), and what a
    trial process builds from the resources section, with the production functions and without starting Ray."""
    import io

    from ulsweep.sweep import driver, lineage, worker
    from ulsweep.sweep.trial import make_trainer, trial_resources, worker_config

    exp = tiny(search={"method": "optuna-tpe", "space": {"ae.loss.loss_factor": {"low": 1.0, "high": 4.0}},
                       "num_samples": 2, "metrics": ["bpp"], "modes": ["min"], "max_failures": 1, "seed": 3},
               resources={"num_workers": 1, "backend": "gloo", "driver_cpus": 0.5, "max_worker_failures": 1},
               tracking={"experiment": "settings", "artifact_location": str(tmp_path / "artifacts")},
               storage=str(tmp_path / "runs"))
    run_dir, state, ident = driver._open_run_dir(exp, None, resume=False)
    assert driver._start_mps(exp, run_dir, None, io.StringIO()) is None  # resources.mps: off
    uri = lineage.tracking_uri_of(exp, state, None, run_dir)
    run = lineage.open_sweep_run(exp, run_dir, uri, state, ident, io.StringIO())
    driver._make_tuner(exp, run_dir, run, "fake", resume=False)  # TuneConfig and RunConfig from search
    driver._searcher(exp).suggest("trial-0")  # Optuna's sampler, seeded from search.seed
    assert driver.precompile.jobs(exp) == []  # resources.precompile: auto, and no base model compiles
    trial_resources(exp.resources)
    wcfg = worker_config(exp, exp.resources, "ae", "ae-0000", run_dir, uri, run.sweep_id, "fake")
    make_trainer(wcfg, exp.resources, storage_path=run_dir, name="ae-0000", in_tune=False)
    assert worker._cuda_wait(exp.resources) is None  # the trial process's first read; auto: CUDA's own
    stacked = tiny(search={"method": "grid", "space": {"ae.loss.loss_factor": {"values": [1.5, 4.0]}},
                           "metrics": ["bpp"], "modes": ["min"]},
                   resources={"num_workers": 0, "stack_trials": 2, "stack_wait_s": 5})
    (keys,) = driver.stacking.plan(stacked)  # resources.stack_trials; the group's actor gets stack_wait_s
    args = driver.stacking.trainer_args(stacked, run_dir, 0, keys)
    assert args[2] == 5 and [d["ae"]["loss"]["loss_factor"] for d in args[5]] == [1.5, 4.0]  # its planned members
    # its members' base trials form a group: their results go to the trials together
    assert driver.stacking.base_plan(stacked) == [[f"{k}-{b.name}" for k in keys] for b in stacked.base_models]
    assert args[6] is True
    from ulsweep.diffusion.noise import seeded
    from ulsweep.models.stacked import stack
    from ulsweep.train.build import build_autoencoder
    from ulsweep.train.stage1 import reconstruct_images

    ae = stack([build_autoencoder(stacked.ae, 1) for _ in range(2)]).eval()
    recon, _ = reconstruct_images(ae, torch.zeros(2, 1, 16, 16), stacked, seeded([0, 1], "cpu"), 2)
    assert recon.shape == (2, 2, 1, 16, 16)  # a group's sampling, as resources.stack_sampling says
    from ulsweep.models.stacked import StackedConv2d
    from ulsweep.train.group import build_networks
    from ulsweep.train.runtime import make_runtime

    objective, _ = build_networks([stacked, stacked], make_runtime(stacked.ae.train), (1, 16, 16))
    assert {m.conv for m in objective.modules() if isinstance(m, StackedConv2d)} == {"grouped"}  # resources.stack_conv


# ---------------------------------------------------------------------------------------------------------
# the settings that did nothing now act


def _tiny_models(exp):
    from ulsweep.train.build import build_autoencoder, build_base_model

    torch.manual_seed(0)
    ae = build_autoencoder(exp.ae, 1).eval()
    base = build_base_model(exp.base_models[0], exp.ae.model.latent_channels).eval()
    return ae, base


@pytest.mark.parametrize("network", ["base", "decoder"])
def test_sampler_settings_choose_the_sampler(network):
    """base_models[].train.sampler picks the base model's sampler (auto = ancestral), ae.train.sampler the
    decoder's (auto = DDIM): the same seed gives the same images for auto and its sampler, others for the
    other one."""
    from ulsweep.train.stage2 import generate

    def images(sampler):
        key = "base_models.0.train.sampler" if network == "base" else "ae.train.sampler"
        exp = experiment_from_dict(C.to_dict(tiny()), {key: sampler})
        ae, base = _tiny_models(exp)
        gen = torch.Generator().manual_seed(3)
        return generate(base, ae, exp, exp.base_models[0], 4, (2, 4, 4), (1, 16, 16), gen)

    auto, same = images("auto"), images("ancestral" if network == "base" else "ddim")
    other = images("ddim" if network == "base" else "ancestral")
    assert torch.equal(auto, same)
    assert not torch.equal(auto, other)


@pytest.mark.parametrize("rows, recon_calls, gen_calls", [(3, [3, 3, 3], [3, 3, 3]), (5, [4, 4], [4, 4]),
                                                         (64, [8], [7])])
def test_sample_batch_sets_the_size_of_every_sampling_call(rows, recon_calls, gen_calls):
    """eval.sample_batch: the evaluation reconstructs its 8 images and generates 7 in the fewest calls of one size
    of at most sample_batch images (so a compiled network meets one shape), and returns exactly 8 and 7."""
    from ulsweep.train.stage1 import reconstruct_images
    from ulsweep.train.stage2 import generate_members

    exp = tiny(eval_={"extractor": "none", "sample_batch": rows})
    ae, base = _tiny_models(exp)
    seen = {"decoder": [], "base": []}
    for name, net in (("decoder", ae.decoder), ("base", base)):
        net.register_forward_hook(lambda m, i, o, name=name: seen[name].append(i[0].shape[0]))
    x = torch.rand(8, 1, 16, 16) * 2 - 1
    recon, _ = reconstruct_images(ae, x, exp, torch.Generator().manual_seed(0))
    steps = exp.ae.train.sample_steps
    assert recon.shape == x.shape and seen["decoder"] == [n for n in recon_calls for _ in range(steps)]
    seen["decoder"].clear()
    [images] = generate_members(base, ae, exp, exp, exp.base_models[0], 7, (2, 4, 4), (1, 16, 16),
                                torch.Generator().manual_seed(0))
    assert images.shape == (7, 1, 16, 16)
    assert set(seen["base"]) == set(seen["decoder"]) == set(gen_calls)
    assert len(seen["decoder"]) == len(gen_calls) * steps


def test_sampling_calls_are_the_fewest_of_one_size_within_the_batch():
    """`sample_rows`: the images a call may hold (eval.sample_batch, by default by the image size);
    `sampling_calls(n, rows, members)`: every call holds each member's `size` images, all calls one size, at most
    `rows` images a call (a member at least one), as few calls as that allows, and less than one image a call
    sampled in surplus."""
    import math

    from ulsweep.train.sampling import sampling_calls

    from ulsweep.train.sampling import sample_rows

    assert [sample_rows(None, (c, s, s)) for c, s in ((1, 32), (3, 32), (3, 512), (1, 16), (3, 8192))] == \
        [4096, 4096, 16, 16384, 1]  # eval.sample_batch's default: 4,096 images' worth of 32x32 pixels a call
    assert sample_rows(300, (3, 512, 512)) == 300  # a set one is taken as it is
    assert sampling_calls(10000, 4096) == (3334, 3)  # lf_sweep's generations, member by member
    assert sampling_calls(2000, 4096) == (2000, 1)  # its reconstructions
    assert sampling_calls(2000, 4096, 18) == (223, 9)  # a stacked group of 18: 227 rows a member at most
    assert sampling_calls(5, 2, 4) == (1, 5)
    for n in (1, 7, 64, 1000, 2001):
        for rows in (1, 3, 100, 4096):
            for members in (1, 2, 18):
                size, calls = sampling_calls(n, rows, members)
                assert size * members <= max(rows, members) and calls == math.ceil(n / max(1, rows // members))
                assert 0 <= size * calls - n < calls


def test_sample_precision_runs_the_sampling_networks_in_bf16_and_leaves_bits_per_pixel_alone():
    """eval.sample_precision: bf16 runs the networks under bf16 autocast while they sample (reconstructions for
    PSNR, generations), fp32 does not; the bits/pixel estimates, which run before with the same generator, are
    bit-identical either way, and the samples move only by bf16 rounding."""
    from torch import nn

    from ulsweep.train.stage1 import evaluate_ae
    from ulsweep.train.stage2 import evaluate_base

    torch.manual_seed(1)
    x = torch.rand(8, 1, 16, 16) * 2 - 1

    def evaluate(precision):
        exp = tiny(eval_={"extractor": "none", "sample_precision": precision})
        ae, base = _tiny_models(exp)
        torch.manual_seed(2)
        with torch.no_grad():  # away from the zero-initialized output layers, which make every output 0
            for p in (*ae.parameters(), *base.parameters()):
                p.add_(torch.randn_like(p) * 0.05)
        dtypes = {"decoder": set(), "base": set()}
        for name, net in (("decoder", ae.decoder), ("base", base)):
            for m in net.modules():
                if isinstance(m, (nn.Linear, nn.Conv2d)):
                    m.register_forward_hook(lambda m, i, o, name=name: dtypes[name].add(o.dtype))
        ae_metrics, _ = evaluate_ae(ae, x, exp, with_images=False)
        base_metrics, images = evaluate_base(base, ae, exp, exp, exp.base_models[0], x, (2, 4, 4))
        return ae_metrics, base_metrics, dtypes

    ae32, base32, dt32 = evaluate("fp32")
    ae16, base16, dt16 = evaluate("bf16")
    assert dt32 == {"decoder": {torch.float32}, "base": {torch.float32}}
    assert dt16 == {"decoder": {torch.bfloat16}, "base": {torch.float32, torch.bfloat16}}  # base: bpp in fp32
    assert (ae16["bpp"], base16["base_bpp"]) == (ae32["bpp"], base32["base_bpp"])
    assert ae16["psnr"] != ae32["psnr"] and abs(ae16["psnr"] - ae32["psnr"]) < 0.5, (ae16["psnr"], ae32["psnr"])


def test_base_model_eval_every_evaluates_during_training(tmp_path, digits_cache):
    from ulsweep.train.stage1 import train_autoencoder
    from ulsweep.train.stage2 import train_base

    logged = []

    class Hooks:
        def log_metrics(self, step, metrics):
            logged.append((step, set(metrics)))

        def checkpoint_saved(self, step, path, metrics):
            pass

        def should_stop(self):
            return False

    exp = tiny(base_train={"steps": 3, "eval_every": 1})
    ae = train_autoencoder(exp, str(tmp_path / "ae"))
    train_base(exp, exp.base_models[0], ae.checkpoint, str(tmp_path / "base"), Hooks())
    evals = [step for step, keys in logged if "eval_base_bpp" in keys]
    assert evals == [1, 2, 3]  # every step, the last one by the final evaluation


def test_mse_decoder_is_decoded_at_the_lambda_it_was_trained_at():
    """The Table 5 MSE decoder sees lambda = logsnr_min + shift in training and in decoding alike."""
    from ulsweep.train.sampling import decode
    from ulsweep.train.stage1 import AEObjective

    exp = tiny(ae_loss={"decoder": "mse", "decoder_schedule": {"logsnr_min": -10.0, "shift": 2.0}},
               ae_train={"sample_steps": 32})
    ae, _ = _tiny_models(exp)
    seen = []
    real = ae.decoder.forward
    ae.decoder.forward = lambda x_t, lam, z0: (seen.append(lam.unique().tolist()), real(x_t, lam, z0))[1]
    objective = AEObjective(ae, exp.ae.loss, (1, 16, 16), (2, 4, 4))
    x = torch.rand(2, 1, 16, 16) * 2 - 1
    objective(x, objective.draw_noise(2, torch.Generator().manual_seed(0)))
    decode(ae.decoder, torch.randn(2, 2, 4, 4), (1, 16, 16), exp.ae.loss, steps=2)
    assert seen == [[-8.0], [-8.0]]


# ---------------------------------------------------------------------------------------------------------
# settings without effect in their context are refused


@pytest.mark.parametrize("raw, key", [
    ({"ae": {"loss": {"decoder": "mse", "sigmoid_bias": 1.0}}}, "ae.loss.sigmoid_bias"),
    ({"ae": {"loss": {"decoder": "mse", "decoder_schedule": {"kind": "linear"}}}}, "ae.loss.decoder_schedule.kind"),
    ({"ae": {"loss": {"decoder": "mse"}, "train": {"sampler": "ddim"}}}, "ae.train.sampler"),
    ({"ae": {"loss": {"decoder": "mse"}, "train": {"sample_steps": 8}}}, "ae.train.sample_steps"),
    ({"ae": {"loss": {"mse_logsnr": 4.0}}}, "ae.loss.mse_logsnr"),
    ({"ae": {"loss": {"prior": "normal", "logsnr_z1": -10.0}}}, "ae.loss.logsnr_z1"),
    ({"ae": {"loss": {"prior": "normal"}, "train": {"eval_t_per_image": 8}}}, "ae.train.eval_t_per_image"),
    ({"ae": {"loss": {"normal_kl_weight": 0.1}}}, "ae.loss.normal_kl_weight"),
    ({"resources": {"num_workers": 0, "driver_cpus": 0.5}}, "resources.driver_cpus"),
    ({"resources": {"num_workers": 0, "backend": "gloo"}}, "resources.backend"),
    ({"eval": {"extractor": "none", "gfd_samples": 10}}, "eval.gfd_samples"),
    ({"eval": {"extractor": "none", "feature_precision": "fp32"}}, "eval.feature_precision"),
    ({"eval": {"extractor": "inception", "extractor_epochs": 2}}, "eval.extractor_epochs"),
    ({"eval": {"extractor": "domain", "inception_weights": "w.pt"}}, "eval.inception_weights"),
    ({"search": {"method": "grid", "space": {"ae.loss.loss_factor": {"values": [1.5]}}, "seed": 3}},
     "search.seed"),
])
def test_settings_without_effect_are_refused(raw, key):
    with pytest.raises(ConfigError, match="has no effect") as e:
        experiment_from_dict(raw, file="exp.yaml")
    assert str(e.value).startswith(f"exp.yaml: {key}: has no effect")


@pytest.mark.parametrize("raw", [
    {"ae": {"loss": {"decoder": "mse", "mse_logsnr": 4.0, "decoder_schedule": {"shift": 1.0}}}},
    {"ae": {"loss": {"stop_grad_prior": True, "normal_kl_weight": 0.1}}},
    {"ae": {"loss": {"prior": "normal", "sigmoid_bias": 1.0}, "train": {"sampler": "ancestral"}}},
    {"resources": {"num_workers": 1, "driver_cpus": 0.5, "max_worker_failures": 5, "backend": "gloo"}},
    {"resources": {"num_workers": 0, "max_worker_failures": 5}},  # restarts of a dead trial process
    {"eval": {"extractor": "auto", "extractor_epochs": 2, "extractor_sha256": "ab" * 32}},
    {"search": {"method": "optuna-tpe", "space": {"ae.loss.loss_factor": {"low": 1.0, "high": 2.0}}, "seed": 3}},
])
def test_the_same_settings_are_accepted_where_they_act(raw):
    experiment_from_dict(raw)
