"""rFD / gFD as training runs compute them (ulsweep.train.evaluation): the numbers are pinned to the
computation they replaced, reference statistics through the cache, then the Fréchet distance."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from test_metrics import MeanPoolExtractor  # the toy extractor of the pipeline tests (no weights, exact)
from ulsweep.metrics.fid import (RefStatsCache, fd_between, feature_stats, frechet_distance, metric_name,
                                 reference_stats, stats_from_features)
from ulsweep.train.evaluation import generation_fd_of, reconstruction_fd_of

pytestmark = pytest.mark.usefixtures("one_thread")  # fixture in conftest.py


def _images(n, seed, offset=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256 - offset, (n, 1, 16, 16), generator=g, dtype=torch.uint8)
    return x + offset


def _previous_computation(ext, real_u8, fake_u8, dataset_hash, split, cache_dir, kind):
    """What evaluation.py computed before it called fid.py's pipelines (kept here as the reference)."""
    ref = reference_stats(ext, real_u8, 256, RefStatsCache(cache_dir), dataset_hash, split)
    return {metric_name(kind, ext): fd_between(ref, feature_stats(ext, fake_u8.split(256)))}


@pytest.fixture()
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("ULSWEEP_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_reconstruction_fd_of_is_unchanged_and_cached(cache_env):
    ext = MeanPoolExtractor()
    real = _images(600, seed=0)  # 600 = 256 + 256 + 88: the batching matters to the last bit
    recon = (real.int() * 3 // 4 + 20).to(torch.uint8)
    want = _previous_computation(ext, real, recon, "d" * 64, "test@16", str(cache_env / "old"), "r")
    got = reconstruction_fd_of(ext, real, recon, "d" * 64, "test@16")
    assert got == want  # bit for bit
    direct = frechet_distance(*_mu_sigma(ext(real)), *_mu_sigma(ext(recon)), device="cpu")
    assert got["rfd_toy"] == pytest.approx(direct, rel=1e-9) and got["rfd_toy"] > 1e-3
    files = list((cache_env / "cache" / "refstats").iterdir())
    assert len(files) == 1 and files[0].name.startswith("toy-test@16-600-")
    ext.calls = 0
    assert reconstruction_fd_of(ext, real, recon, "d" * 64, "test@16") == got
    assert ext.calls == len(recon)  # the real images' statistics came from the cache


def test_generation_fd_of_is_unchanged_and_cached(cache_env):
    ext = MeanPoolExtractor()
    ref, samples = _images(300, seed=1), _images(700, seed=2, offset=30)
    want = _previous_computation(ext, ref, samples, "e" * 64, "test@16", str(cache_env / "old"), "g")
    got = generation_fd_of(ext, samples, ref, "e" * 64, "test@16")
    assert got == want
    direct = frechet_distance(*_mu_sigma(ext(ref)), *_mu_sigma(ext(samples)), device="cpu")
    assert got["gfd_toy"] == pytest.approx(direct, rel=1e-9) and got["gfd_toy"] > 1e-3
    ext.calls = 0
    assert generation_fd_of(ext, samples, ref, "e" * 64, "test@16") == got
    assert ext.calls == len(samples)


def test_the_cache_key_tells_datasets_and_splits_apart(cache_env):
    ext, real = MeanPoolExtractor(), _images(40, seed=3)
    recon = real // 2
    reconstruction_fd_of(ext, real, recon, "d" * 64, "test@16")
    other = _images(40, seed=4)
    for dataset_hash, split in (("f" * 64, "test@16"), ("d" * 64, "train@16")):
        assert reconstruction_fd_of(ext, other, recon, dataset_hash, split) == \
            {"rfd_toy": fd_between(stats_from_features(ext(other)), stats_from_features(ext(recon)))}


def _mu_sigma(feats):
    x = feats.double().numpy()
    return x.mean(0), np.cov(x, rowvar=False)


def test_both_extractors_side_by_side(cache_env):
    """`eval.extractor: both`: rFID/gFID and the domain FD in one dict, each what its extractor gives alone."""
    from ulsweep.metrics.features import INCEPTION_SHA256

    std, dom = MeanPoolExtractor("inception", sha=INCEPTION_SHA256), MeanPoolExtractor("digits", sha="cd" * 32)
    real = _images(64, seed=5)
    recon, samples = real // 2, _images(80, seed=6, offset=20)
    got = reconstruction_fd_of((std, dom), real, recon, "d" * 64, "test@16")
    assert set(got) == {"rfid", "rfd_digits"}
    assert got == {**reconstruction_fd_of(std, real, recon, "d" * 64, "test@16"),
                   **reconstruction_fd_of(dom, real, recon, "d" * 64, "test@16")}
    gen = generation_fd_of([std, dom], samples, real, "d" * 64, "test@16")
    assert set(gen) == {"gfid", "gfd_digits"} and gen["gfid"] > 1e-3
    assert gen["gfd_digits"] == generation_fd_of(dom, samples, real, "d" * 64, "test@16")["gfd_digits"]


def test_load_eval_extractor_both(monkeypatch):
    from ulsweep.config import ConfigError, experiment_from_dict
    from ulsweep.metrics.features import INCEPTION_SHA256
    from ulsweep.train import evaluation

    calls = []
    monkeypatch.setattr(evaluation, "load_inception",
                        lambda w: calls.append(("inception", w)) or MeanPoolExtractor("inception", INCEPTION_SHA256))
    monkeypatch.setattr(evaluation, "ensure_domain_extractor", lambda exp, device: "/cache/digits.pt")
    monkeypatch.setattr(evaluation, "load_domain_extractor",
                        lambda p, sha: calls.append(("domain", p, sha)) or MeanPoolExtractor("digits"))
    exp = experiment_from_dict({"eval": {"extractor": "both", "inception_weights": "/w/default_1.pt",
                                         "extractor_epochs": 2}})
    got = evaluation.load_eval_extractor(exp, torch.device("cpu"))
    assert [e.name for e in got] == ["inception", "digits"] and not any(e.training for e in got)
    assert calls == [("inception", "/w/default_1.pt"), ("domain", "/cache/digits.pt", None)]
    assert [e.precision for e in got] == ["tf32", "tf32"]  # eval.feature_precision's default
    exact = experiment_from_dict({"eval": {"extractor": "both", "feature_precision": "fp32"}})
    assert [e.precision for e in evaluation.load_eval_extractor(exact, torch.device("cpu"))] == ["fp32", "fp32"]
    with pytest.raises(ConfigError, match="eval.feature_precision"):
        experiment_from_dict({"eval": {"feature_precision": "bf16"}})
    with pytest.raises(ConfigError, match="eval.inception_weights"):  # only inception and both read it
        experiment_from_dict({"eval": {"extractor": "domain", "inception_weights": "w.pt"}})


def test_auto_extractor_is_inception_on_cuda_and_the_domain_one_elsewhere(capsys):
    from ulsweep.train import evaluation
    assert evaluation.resolve_auto_extractor("auto", torch.device("cuda")) == "inception"
    assert "standard FID Inception" in capsys.readouterr().err
    assert evaluation.resolve_auto_extractor("auto", torch.device("cpu")) == "domain"
    assert "not FID" in capsys.readouterr().err
    for spec in ("inception", "domain", "both", "none", "/x/digits.pt"):
        assert evaluation.resolve_auto_extractor(spec, torch.device("cuda")) == spec


@pytest.mark.parametrize("extractor,metric,ok", [
    ("inception", "gfd_fmnist", False), ("none", "small/rfd_fmnist", False), ("domain", "gfid", False),
    ("/x/fmnist.pt", "rfid", False), ("both", "gfid", True), ("both", "gfd_fmnist", True),
    ("auto", "gfid", True), ("domain", "small/gfd_fmnist", True), ("inception", "bpp", True)])
def test_search_metric_must_come_from_the_extractor(extractor, metric, ok):
    from ulsweep.config import ConfigError, experiment_from_dict
    raw = {"eval": {"extractor": extractor}, "search": {"metrics": [metric]}}
    if ok:
        experiment_from_dict(raw, file="exp.yaml")
        return
    with pytest.raises(ConfigError, match=f"search.metrics.*is not computed with eval.extractor: {extractor}"):
        experiment_from_dict(raw, file="exp.yaml")


def test_scored_in_order_yields_each_members_score_in_order_at_most_n_at_once_the_first_alone():
    """A group's members scored two at a time (on a GPU): in order, never more than `scorers` at once, the first
    alone (the others find the reference statistics it cached), the caller's grad mode in the threads; on a CPU one
    after another; an error is raised at its member."""
    import threading
    import time

    from ulsweep.train.evaluation import scored_in_order

    lock, now, most, log = threading.Lock(), [0], [0], []

    def score(i):
        with lock:
            now[0] += 1
            most[0] = max(most[0], now[0])
            log.append(("start", i, now[0]))
        time.sleep(0.05 * (i % 3))  # later members may finish first
        with lock:
            now[0] -= 1
        return i * 10, torch.is_grad_enabled()

    members = [0, 2, 3, 5, 6, 7, 9]
    with torch.no_grad():
        got = list(scored_in_order(score, members, torch.device("cpu"), scorers=2))
    assert [g for g, _ in got] == [i * 10 for i in members]
    assert not any(grad for _, grad in got)
    assert most[0] == 2 and log[0] == ("start", 0, 1) and log[1][1] == 2  # the first alone, then two at once
    now[0], most[0] = 0, 0
    assert [g for g, _ in scored_in_order(score, members, torch.device("cpu"))] == [i * 10 for i in members]
    assert most[0] == 1  # a CPU: one after another

    def failing(i):
        if i == 3:
            raise ValueError("member 3")
        return i

    it = scored_in_order(failing, members, torch.device("cpu"), scorers=2)
    assert [next(it), next(it)] == [0, 2]
    with pytest.raises(ValueError, match="member 3"):
        next(it)


def test_a_groups_members_scored_two_at_a_time_get_the_very_metrics_of_one_after_another(cache_env, monkeypatch):
    """`evaluate_aes` and `evaluate_bases` of stacked members with an extractor: scored two at a time in threads
    (as on a GPU) each member's metrics and images are those scored one after another, to the last bit."""
    import functools

    from ulsweep.config import experiment_from_dict
    from ulsweep.models.stacked import stack
    from ulsweep.train import evaluation, stage1, stage2
    from ulsweep.train.build import build_autoencoder, build_base_model

    exps, aes, bases = [], [], []
    for k in range(4):
        exps.append(experiment_from_dict({
            "ae": {"model": {"preset": "tiny", "downsample": 4, "latent_channels": 2},
                   "loss": {"loss_factor": 1.5 + k}, "train": {"seed": k, "sample_steps": 2, "eval_t_per_image": 1}},
            "base_models": [{"name": "b", "model": {"preset": "tiny"},
                             "train": {"seed": k, "sample_steps": 2, "eval_images": 8, "eval_t_per_image": 1}}],
            "eval": {"gfd_samples": 40, "gfd_reference_images": 24},
            "resources": {"num_workers": 0, "stack_trials": 4, "stack_sampling": "stacked"}}))
        torch.manual_seed(k)
        aes.append(build_autoencoder(exps[-1].ae, 1).eval())
        bases.append(build_base_model(exps[-1].base_models[0], 2).eval())
    x = torch.rand(24, 1, 16, 16, generator=torch.Generator().manual_seed(9)) * 2 - 1
    stacked_ae, stacked_base = stack(aes).eval(), stack(bases).eval()
    bcs = [e.base_models[0] for e in exps]

    def both(ext):
        ae = list(stage1.evaluate_aes(stacked_ae, x, exps, True, ext, "d" * 64))
        base = list(stage2.evaluate_bases(stacked_base, stacked_ae, exps, exps[0], bcs, x, (2, 4, 4), ext, "d" * 64))
        return [(m, images) for m, images, _ in ae + base]

    serial = both(MeanPoolExtractor())
    two = functools.partial(evaluation.scored_in_order, scorers=2)
    monkeypatch.setattr(stage1, "scored_in_order", two)
    monkeypatch.setattr(stage2, "scored_in_order", two)
    threaded = both(MeanPoolExtractor())
    assert threaded == serial
    assert len({m["rfd_toy"] for m, _ in serial[:4]}) == 4 and len({m["gfd_toy"] for m, _ in serial[4:]}) == 4


def test_eval_batch_shapes_are_the_full_batch_and_each_counts_rest():
    from ulsweep.train.evaluation import EVAL_BATCH, eval_batch_shapes

    assert EVAL_BATCH == 256
    assert eval_batch_shapes((1, 32, 32), [2000]) == [(208, 1, 32, 32), (256, 1, 32, 32)]  # 7 x 256 + 208
    assert eval_batch_shapes((3, 8, 8), [10000, 10000]) == [(16, 3, 8, 8), (256, 3, 8, 8)]
    assert eval_batch_shapes((1, 4, 4), [100, 512, 0]) == [(100, 1, 4, 4), (256, 1, 4, 4)]
    assert eval_batch_shapes((1, 4, 4), []) == []


class ShapeRecorder(MeanPoolExtractor):
    """The toy extractor, noting each call's shape and thread."""

    def __init__(self, name="toy"):
        super().__init__(name)
        self.seen = []

    def forward(self, images_u8):
        import threading

        self.seen.append((tuple(images_u8.shape), threading.current_thread().name))
        return super().forward(images_u8)


def test_extractor_ahead_loads_and_warms_each_extractor_in_a_thread_and_the_evaluation_takes_it(cache_env,
                                                                                                monkeypatch):
    """`extractor_ahead`: the extractors loaded in a thread of their own and each called WARM_CALLS times at each
    shape before the evaluation takes them; an evaluation given the future scores as with the loaded extractors,
    to the last bit; a load's error is raised where the evaluation takes it."""
    from ulsweep.config import experiment_from_dict
    from ulsweep.train import evaluation, stage1
    from ulsweep.train.build import build_autoencoder

    made = []
    monkeypatch.setattr(evaluation, "load_eval_extractor",
                        lambda exp, device: made.append(ShapeRecorder()) or made[-1])
    exp = experiment_from_dict({"ae": {"model": {"preset": "tiny", "downsample": 4, "latent_channels": 2},
                                       "train": {"sample_steps": 2, "eval_t_per_image": 1}},
                                "eval": {"extractor": "inception"}})
    shapes = evaluation.eval_batch_shapes((1, 16, 16), [300])
    ahead = evaluation.extractor_ahead(exp, torch.device("cpu"), shapes)
    got = evaluation.resolve_extractor(ahead)
    assert got is made[0] and [s for s, _ in got.seen] == [(44, 1, 16, 16)] * 3 + [(256, 1, 16, 16)] * 3
    assert {t for _, t in got.seen} and all(t.startswith("ulsweep-extractor") for _, t in got.seen)

    torch.manual_seed(0)
    ae = build_autoencoder(exp.ae, 1).eval()
    x = torch.rand(20, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    loaded = list(stage1.evaluate_aes(ae, x, [exp], True, MeanPoolExtractor(), "d" * 64))
    warmed = list(stage1.evaluate_aes(ae, x, [exp], True, evaluation.extractor_ahead(exp, torch.device("cpu"), []),
                                      "d" * 64))
    assert [(m, images) for m, images, _ in warmed] == [(m, images) for m, images, _ in loaded]
    assert "seconds/extractor" not in warmed[0][2]  # a disabled timer: nothing timed

    def broken(exp, device):
        raise FileNotFoundError("no weights (injected)")

    monkeypatch.setattr(evaluation, "load_eval_extractor", broken)
    ahead = evaluation.extractor_ahead(exp, torch.device("cpu"), shapes)
    with pytest.raises(FileNotFoundError, match="injected"):
        list(stage1.evaluate_aes(ae, x, [exp], True, ahead, "d" * 64))


def test_extractor_ahead_trains_a_missing_domain_extractor_in_the_callers_thread(cache_env, monkeypatch):
    """No extractor: None. A domain extractor not yet cached is trained (here: loaded) at once in the caller's
    thread, not beside the evaluation; once cached, it is loaded ahead."""
    import threading

    from ulsweep.config import experiment_from_dict
    from ulsweep.train import evaluation

    threads = []
    monkeypatch.setattr(evaluation, "load_eval_extractor",
                        lambda exp, device: threads.append(threading.current_thread()) or MeanPoolExtractor())
    none = experiment_from_dict({"eval": {"extractor": "none"}})
    assert evaluation.extractor_ahead(none, torch.device("cpu"), [(4, 1, 8, 8)]) is None and threads == []
    exp = experiment_from_dict({"data": {"path": "builtin:digits"}, "eval": {"extractor": "domain"}})
    got = evaluation.extractor_ahead(exp, torch.device("cpu"), [(4, 1, 8, 8)])
    assert isinstance(got, MeanPoolExtractor) and threads == [threading.current_thread()]
    path = evaluation.domain_extractor_path(exp)
    (cache_env / "cache" / "extractors").mkdir(parents=True, exist_ok=True)
    open(path, "wb").close()
    ahead = evaluation.extractor_ahead(exp, torch.device("cpu"), [(4, 1, 8, 8)])
    assert isinstance(evaluation.resolve_extractor(ahead), MeanPoolExtractor)
    assert threads[1] is not threading.current_thread()


def test_extractor_ahead_caches_the_reference_statistics_the_first_score_then_reads(cache_env, monkeypatch):
    """`extractor_ahead`'s `references`: their statistics computed into the reference cache beside the evaluation,
    so that a member's rFD finds them there (no pass over the real images) and comes out as without them."""
    from ulsweep.config import experiment_from_dict
    from ulsweep.train import evaluation

    ext = MeanPoolExtractor()
    monkeypatch.setattr(evaluation, "load_eval_extractor", lambda exp, device: ext)
    exp = experiment_from_dict({"eval": {"extractor": "inception"}})
    real, fake = _images(40, 1), _images(40, 2)
    want = reconstruction_fd_of(MeanPoolExtractor(), real, fake, "e" * 64, "test@16")  # computes and caches it
    for p in (cache_env / "cache" / "refstats").iterdir():
        p.unlink()
    ahead = evaluation.extractor_ahead(exp, torch.device("cpu"), [], [(real, "e" * 64, "test@16")])
    got = evaluation.resolve_extractor(ahead)
    assert got is ext and ext.calls == 40  # the reference's 40 images, once
    assert reconstruction_fd_of(ext, real, fake, "e" * 64, "test@16") == want
    assert ext.calls == 80  # the reconstructions' 40 only: the reference came from the cache
