"""ulsweep.models.stacked: K trials of one architecture as one network must be the K trials, row block by row
block, in losses and gradients, and refuse what it cannot stack."""
import copy

import pytest
import torch
from torch import nn

from ulsweep.config import experiment_from_dict
from ulsweep.models.stacked import StackedConv2d, per_example, stack, trial_norms, unstack
from ulsweep.train.build import base_schedule, build_autoencoder, build_base_model
from ulsweep.train.stage1 import AEObjective
from ulsweep.train.stage2 import BaseObjective

B = 4  # examples per trial


def ae_objective(seed: int, lf: float, b: float, **loss) -> AEObjective:
    exp = experiment_from_dict({"ae": {"model": {"preset": "tiny", "downsample": 4, "latent_channels": 2},
                                       "loss": {"loss_factor": lf, "sigmoid_bias": b, **loss}}})
    torch.manual_seed(seed)
    return AEObjective(build_autoencoder(exp.ae, 1), exp.ae.loss, (1, 16, 16), (2, 4, 4))


def base_objective(seed: int) -> BaseObjective:
    exp = experiment_from_dict({"ae": {"model": {"preset": "tiny", "downsample": 4, "latent_channels": 2}},
                                "base_models": [{"name": "b", "model": {"preset": "tiny"}}]})
    torch.manual_seed(seed)
    bc = exp.base_models[0]
    return BaseObjective(build_base_model(bc, 2), base_schedule(exp.ae.loss, bc), bc.loss.sigmoid_bias, (2, 4, 4))


def trial_inputs(objectives, shape):
    """Each trial's own batch and noise from its own generator, and the stacked program's (K*B, ...) inputs."""
    gens = [torch.Generator().manual_seed(100 + k) for k in range(len(objectives))]
    xs = [torch.rand(B, *shape, generator=g) * 2 - 1 for g in gens]
    noises = [o.draw_noise(B, g) for o, g in zip(objectives, gens)]
    return xs, noises, torch.cat(xs), {k: torch.cat([n[k] for n in noises]) for k in noises[0]}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("stage, conv", [("ae", "grouped"), ("ae", "loop"), ("base", "grouped")])
def test_stacked_trials_have_each_trials_own_losses_gradients_and_norms(stage, conv, one_thread):
    """Three trials with their own weights (and, for autoencoders, their own loss factor and sigmoid bias): the
    stacked network's losses on trial k's rows are trial k's, the gradient of the summed losses is each trial's
    own, and trial_norms gives each trial's global gradient norm; with the convolutions grouped or one per trial
    (resources.stack_conv)."""
    if stage == "ae":
        objs, shape = [ae_objective(k, lf, b) for k, (lf, b) in enumerate([(1.5, -2.0), (2.0, 0.0), (4.0, 2.0)])], \
            (1, 16, 16)
    else:
        objs, shape = [base_objective(k) for k in range(3)], (2, 4, 4)
    st = stack(objs, conv)
    assert all(m.conv == conv for m in st.modules() if isinstance(m, StackedConv2d))
    xs, noises, x, noise = trial_inputs(objs, shape)
    losses = st(x, noise)["total"]
    refs = [o(xk, nk)["total"] for o, xk, nk in zip(objs, xs, noises)]
    assert rel(losses, torch.cat(refs)) < 1e-6
    assert rel(refs[0], refs[1]) > 1e-3  # the trials differ, so a mixed-up row block would show
    losses.view(3, B).mean(1).sum().backward()
    for r in refs:
        r.mean().backward()
    grads = dict(st.named_parameters())
    for k, o in enumerate(objs):
        for name, p in o.named_parameters():
            assert rel(grads[name].grad[k], p.grad) < 1e-5, (k, name)
    norms = trial_norms([p.grad for p in st.parameters()], 3)
    want = torch.stack([torch.nn.utils.get_total_norm([p.grad for p in o.parameters()]) for o in objs])
    assert torch.allclose(norms, want, rtol=1e-5)


def test_stacked_buffers_carry_each_trials_loss_factor_and_bias(one_thread):
    objs = [ae_objective(0, 1.5, -2.0), ae_objective(0, 3.0, 2.0)]  # same weights: only the buffers differ
    st = stack(objs)
    assert st.loss_factor.tolist() == [1.5, 3.0] and st.sigmoid_bias.tolist() == [-2.0, 2.0]
    xs, noises, x, noise = trial_inputs(objs, (1, 16, 16))
    out = st(x, noise)["decoder"]
    assert rel(out, torch.cat([o(xk, nk)["decoder"] for o, xk, nk in zip(objs, xs, noises)])) < 1e-6


def test_unstack_gives_each_trial_back_under_its_own_names(one_thread):
    objs = [base_objective(k) for k in range(3)]
    st = stack(objs)
    with torch.no_grad():
        for p in st.parameters():
            p.add_(torch.randn_like(p))  # a trained stack: every trial moved its own way
    for k in range(3):
        fresh = base_objective(7)
        fresh.load_state_dict(unstack(st, k))  # strict: every name, every shape
        xs, noises, x, noise = trial_inputs(objs, (2, 4, 4))
        rows = st(x, noise)["total"][k * B:(k + 1) * B]
        assert rel(fresh(xs[k], noises[k])["total"], rows) < 1e-6


def test_stack_leaves_its_modules_as_they_were(one_thread):
    objs = [base_objective(k) for k in range(2)]
    before = [copy.deepcopy(o.state_dict()) for o in objs]
    stack(objs)
    for o, sd in zip(objs, before):
        assert all(torch.equal(v, sd[k]) for k, v in o.state_dict().items())
        assert not any(type(m).__name__.startswith("Stacked") for m in o.modules())


def test_stack_refuses_other_architectures_and_other_loss_settings(one_thread):
    with pytest.raises(ValueError, match="module 1 .* architecture"):
        stack([ae_objective(0, 1.5, 0.0), base_objective(0)])
    # the loss factor and bias are per-trial tensors; any other loss setting is baked into the program
    stack([ae_objective(0, 1.5, 0.0), ae_objective(1, 4.0, 2.0)])
    with pytest.raises(ValueError, match="module 1 .* architecture"):
        stack([ae_objective(0, 1.5, 0.0), ae_objective(1, 1.5, 0.0, logsnr_z0=10.0)])


def test_stack_names_a_layer_it_cannot_stack():
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(3))

    net = nn.Sequential(nn.Linear(3, 3), Scaled())
    with pytest.raises(ValueError, match=r"^1: a Scaled holds parameters of its own"):
        stack([net, copy.deepcopy(net)])


@pytest.mark.parametrize("conv", ["grouped", "loop"])
def test_stacked_conv_keeps_stride_padding_and_groups(conv, one_thread):
    convs = [nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2) for _ in range(3)]
    st = stack([nn.Sequential(c) for c in convs], conv)
    x = torch.randn(3 * 2, 4, 9, 9)
    want = torch.cat([c(xk) for c, xk in zip(convs, x.split(2))])
    assert st(x).shape == (6, 6, 5, 5) and rel(st(x), want) < 1e-6


def test_the_stacked_convolutions_way_is_in_its_repr_but_the_defaults(one_thread):
    """The compile gate keys a program by its repr: the loop's differs from the grouped one's, which stays as it
    was before the setting (so the caches of earlier sweeps still serve it); an unknown way is refused."""
    convs = [nn.Conv2d(2, 2, 3) for _ in range(2)]
    assert "conv=" not in repr(stack(convs)) and repr(stack(convs)) == repr(stack(convs, "grouped"))
    assert "conv=loop" in repr(stack(convs, "loop"))
    with pytest.raises(ValueError, match="'unfold'"):
        stack(convs, "unfold")


def test_a_bare_layer_stacks_and_buffers_keep_their_persistence(one_thread):
    layers = [nn.Linear(3, 2) for _ in range(2)]
    st = stack(layers)
    x = torch.randn(2 * 5, 3)
    assert rel(st(x), torch.cat([m(xk) for m, xk in zip(layers, x.split(5))])) < 1e-6
    objs = [ae_objective(0, 1.5, 0.0), ae_objective(1, 2.0, 0.0)]
    st = stack(objs)
    assert "loss_factor" not in st.state_dict() and "loss_factor" in dict(st.named_buffers())  # non-persistent


def test_per_example_spreads_a_per_trial_value_over_its_rows():
    assert per_example(torch.tensor(2.0), 8).dim() == 0
    assert per_example(torch.tensor([1.0, 2.0]), 6).tolist() == [1.0] * 3 + [2.0] * 3
    with pytest.raises(ValueError, match=r"shape \(4,\) does not divide a batch of 6"):
        per_example(torch.ones(4), 6)


def test_member_generators_draw_each_members_rows_from_its_own_generator():
    from ulsweep.diffusion import MemberGenerators
    from ulsweep.diffusion.noise import rand, randn

    gens = MemberGenerators([torch.Generator().manual_seed(s) for s in (3, 4)])
    z, u = randn((6, 2), gens), rand(4, gens)  # rows 0-2 and 0-1 member 0's, the rest member 1's
    for k, s in enumerate((3, 4)):
        g = torch.Generator().manual_seed(s)
        assert torch.equal(z[3 * k:3 * k + 3], torch.randn(3, 2, generator=g))  # in the order it drew them alone
        assert torch.equal(u[2 * k:2 * k + 2], torch.rand(2, generator=g))
    g = torch.Generator().manual_seed(3)
    assert torch.equal(randn((2, 2), g), torch.randn(2, 2, generator=torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match=r"shape \(5,\) does not split into 2 members"):
        rand(5, gens)


def group_resources(sampling: str) -> dict:
    """A group's resources, its members sampled as `sampling` says (resources.stack_sampling)."""
    return {"num_workers": 0, "stack_trials": 3, "stack_sampling": sampling}


@pytest.mark.parametrize("prior,sampling", [("diffusion", "each"), ("normal", "each"), ("diffusion", "stacked")])
def test_a_stacked_evaluation_gives_each_member_its_own_evaluation(prior, sampling, one_thread):
    """`evaluate_aes` of three stacked autoencoders (their own weights, loss factor, bias and seed) runs the
    bits/pixel once for all of them and the reconstructions member after member through one ordinary
    autoencoder (each) or once for all (stacked), and gives each member the metrics and images of `evaluate_ae`
    of its autoencoder alone: the same noise, drawn from its own generator; member after member, the very
    same images."""
    from ulsweep.train.stage1 import evaluate_ae, evaluate_aes

    exps, aes = [], []
    for k, (lf, b) in enumerate([(1.5, -2.0), (2.0, 0.0), (4.0, 2.0)]):
        exps.append(experiment_from_dict({
            "ae": {"model": {"preset": "tiny", "downsample": 4, "latent_channels": 2},
                   "loss": {"loss_factor": lf, "sigmoid_bias": b, "prior": prior},
                   "train": {"seed": k, "sample_steps": 3, "sampler": "ancestral",
                             **({"eval_t_per_image": 2} if prior == "diffusion" else {})}},
            "resources": group_resources(sampling)}))
        torch.manual_seed(k)
        aes.append(build_autoencoder(exps[-1].ae, 1).eval())
    x = torch.rand(12, 1, 16, 16, generator=torch.Generator().manual_seed(9)) * 2 - 1
    stacked = stack(aes).eval()
    each = list(evaluate_aes(stacked, x, exps))
    assert len(each) == 3
    for (m, images, _), ae, exp in zip(each, aes, exps):
        m_alone, images_alone = evaluate_ae(ae, x, exp)
        assert set(m) == set(m_alone)
        for key in ("bpp", "bpp_se", "psnr"):
            assert m[key] == pytest.approx(m_alone[key], rel=1e-4), key
        assert images.keys() == images_alone.keys()
        if sampling == "each":
            assert m["psnr"] == m_alone["psnr"] and images == images_alone
    assert len({round(m["psnr"], 4) for m, _, _ in each}) == 3  # three different autoencoders


@pytest.mark.parametrize("sampling", ["each", "stacked"])
def test_a_stacked_base_evaluation_gives_each_member_its_own_samples(sampling, one_thread):
    """`evaluate_bases` of three stacked base models on three stacked frozen autoencoders: each member's
    bits/pixel and samples are those of `evaluate_base` of its own pair alone (member after member: the same
    PNG bytes); a member in `skip` gets nothing, and the others are unchanged by it."""
    from ulsweep.train.stage2 import evaluate_base, evaluate_bases

    exps, aes, bases = [], [], []
    for k in range(3):
        exps.append(experiment_from_dict({
            "ae": {"model": {"preset": "tiny", "downsample": 4, "latent_channels": 2},
                   "loss": {"loss_factor": 1.5 + k}, "train": {"sample_steps": 3}},
            "base_models": [{"name": "b", "model": {"preset": "tiny"},
                             "train": {"seed": k, "sample_steps": 3, "eval_images": 8, "eval_t_per_image": 2}}],
            "resources": group_resources(sampling)}))
        torch.manual_seed(k)
        aes.append(build_autoencoder(exps[-1].ae, 1).eval())
        bases.append(build_base_model(exps[-1].base_models[0], 2).eval())
    bcs = [e.base_models[0] for e in exps]
    x = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(9)) * 2 - 1
    stacked_base, stacked_ae = stack(bases).eval(), stack(aes).eval()
    together = list(evaluate_bases(stacked_base, stacked_ae, exps, exps[0], bcs, x, (2, 4, 4)))
    assert len(together) == 3
    for (m, images, _), base, ae, exp, bc in zip(together, bases, aes, exps, bcs):
        m_alone, images_alone = evaluate_base(base, ae, exp, exp, bc, x, (2, 4, 4))
        assert m["base_bpp"] == pytest.approx(m_alone["base_bpp"], rel=1e-4)
        assert images.keys() == images_alone.keys() == {"samples.png"}
        if sampling == "each":
            assert images == images_alone
    assert len({images["samples.png"] for _, images, _ in together}) == 3
    skipped = list(evaluate_bases(stacked_base, stacked_ae, exps, exps[0], bcs, x, (2, 4, 4), skip={1}))
    assert [m["base_bpp"] for m, _, _ in skipped] == [together[0][0]["base_bpp"], together[2][0]["base_bpp"]]
    assert [i for _, i, _ in skipped] == [together[0][1], together[2][1]]


def test_plain_gives_each_trial_back_as_an_ordinary_network(one_thread):
    """`plain` of a stacked autoencoder is the original architecture (no stacked layer, the same state dict
    names and shapes); `load_trial` makes it trial k, output for output, in place (its tensors stay the same)."""
    from ulsweep.models.stacked import STACKED, load_trial, plain

    objectives = [ae_objective(k, 1.5 + k, 0.0) for k in range(3)]
    nets = [o.ae.eval() for o in objectives]
    stacked = stack(nets).eval()
    one = plain(stacked)
    assert not any(type(m).__name__.startswith("Stacked") for m in one.modules())
    assert {k: v.shape for k, v in one.state_dict().items()} == {k: v.shape for k, v in nets[0].state_dict().items()}
    assert any(type(m) in STACKED for m in one.modules())
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    tensors = [t.data_ptr() for t in one.parameters()]
    for k in (2, 0, 1):
        assert load_trial(one, stacked, k) is one
        with torch.no_grad():
            assert torch.equal(one.encoder(x), nets[k].encoder(x)), k
        assert all(torch.equal(a, b) for a, b in zip(one.state_dict().values(), nets[k].state_dict().values()))
    assert [t.data_ptr() for t in one.parameters()] == tensors
    assert sum(t.numel() for t in stacked.parameters()) == 3 * sum(t.numel() for t in one.parameters())


def test_stacked_generation_gives_each_member_its_own_samples(one_thread):
    """`generate` of three stacked base models and frozen autoencoders (members=3, each member's generator):
    member k's images are those of its base model and autoencoder sampling alone, up to rounding."""
    from ulsweep.diffusion import MemberGenerators
    from ulsweep.train.stage2 import generate

    exp = experiment_from_dict({"ae": {"model": {"preset": "tiny", "downsample": 4, "latent_channels": 2},
                                       "train": {"sample_steps": 3}},
                                "base_models": [{"name": "b", "model": {"preset": "tiny"},
                                                 "train": {"sample_steps": 3}}]})
    bc, aes, bases = exp.base_models[0], [], []
    for k in range(3):
        torch.manual_seed(k)
        aes.append(build_autoencoder(exp.ae, 1).eval())
        bases.append(build_base_model(bc, 2).eval())
    gens = MemberGenerators([torch.Generator().manual_seed(10 + k) for k in range(3)])
    images = generate(stack(bases).eval(), stack(aes).eval(), exp, bc, 5, (2, 4, 4), (1, 16, 16), gens, 9,
                      members=3)
    assert images.shape == (3, 5, 1, 16, 16) and images.dtype == torch.uint8
    for k in range(3):
        alone = generate(bases[k], aes[k], exp, bc, 5, (2, 4, 4), (1, 16, 16), torch.Generator().manual_seed(10 + k),
                         3)
        diff = (images[k].int() - alone.int()).abs()
        assert diff.max() <= 1 and diff.float().mean() < 0.01, k
    assert not torch.equal(images[0], images[1])


@pytest.mark.parametrize("stage", ["ae", "base"])
def test_a_stacked_objective_traces_as_one_graph(stage, one_thread):
    """torch.compile sees a group's stacked objective as one graph, with no break: a break would split the
    compiled step (and its CUDA graphs) in pieces with Python between them."""
    import torch._dynamo

    from ulsweep.diffusion import MemberGenerators
    from ulsweep.train.group import GroupObjective

    objs = [ae_objective(k, lf, 0.0) for k, lf in enumerate((1.5, 4.0))] if stage == "ae" else \
        [base_objective(k) for k in range(2)]
    group = GroupObjective(objs)
    gens = MemberGenerators([torch.Generator().manual_seed(k) for k in range(2)])
    x = torch.rand(2 * B, *((1, 16, 16) if stage == "ae" else (2, 4, 4)))
    explained = torch._dynamo.explain(lambda x, noise: group(x, noise)["total"].mean())(x, group.draw_noise(B, gens))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_a_compiled_plain_network_samples_with_the_weights_load_trial_put_in(one_thread):
    """A group compiles its one ordinary sampling network once and loads each member's weights into it
    (`load_trial`, in place): the compiled code must read them, not keep the first member's as constants, and
    must not compile again for each member."""
    import torch._dynamo

    from ulsweep.models.stacked import load_trial, plain

    exp = experiment_from_dict({"ae": {"model": {"preset": "tiny", "downsample": 4, "latent_channels": 2}},
                                "base_models": [{"name": "b", "model": {"preset": "tiny"}}]})
    nets = []
    for k in range(3):
        torch.manual_seed(k)
        nets.append(build_base_model(exp.base_models[0], 2).eval())
        for p in nets[-1].parameters():
            p.data.normal_(0, 0.05)  # the zero-initialized output layer would make every member's output 0
    stacked = stack(nets).eval()
    one = plain(stacked)
    compiled = torch.compile(one)
    x, lam = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(1)), torch.zeros(4)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch.no_grad():
        outs = []
        for k in (0, 1, 2, 0):
            load_trial(one, stacked, k)
            outs.append(compiled(x, lam))
            assert rel(outs[-1], nets[k](x, lam)) < 1e-5, k
    assert rel(outs[0], outs[1]) > 1e-2  # the members differ
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize("chunk", [None, 10])
def test_each_trial_is_clipped_by_its_own_norm_as_clip_grad_norm_clips_it_alone(chunk, monkeypatch):
    """clip_trials on K stacked gradients against torch's clip_grad_norm_ on each trial's own: the same norms and
    gradients, with the tensors' norms taken in one concatenation or in chunks of a few elements; bf16 gradients
    get float32 norms."""
    import ulsweep.models.stacked as st

    if chunk:
        monkeypatch.setattr(st, "NORM_CHUNK", chunk)
    k, shapes = 4, [(3, 5), (7,), (2, 3, 3, 3), (1,)]
    gen = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.01, 0.05, 2.0, 40.0])  # trials below and above max_norm 1
    stacked = [torch.randn(k, *s, generator=gen) * scale.view(-1, *[1] * len(s)) for s in shapes]
    alone = [[torch.nn.Parameter(g[j].clone()) for g in stacked] for j in range(k)]
    want = []
    for params, grads in zip(alone, zip(*[g.clone() for g in stacked])):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        want.append(torch.nn.utils.clip_grad_norm_(params, 1.0))
    norms = st.clip_trials(stacked, k, 1.0)
    assert norms.dtype == torch.float32 and torch.allclose(norms, torch.stack(want), rtol=1e-6)
    assert bool((norms[:2] < 1).all()) and bool((norms[2:] > 1).all())  # both cases are exercised
    for j in range(k):
        for g, p in zip(stacked, alone[j]):
            assert torch.allclose(g[j], p.grad, rtol=1e-6, atol=0), j
    half = [torch.ones(2, 3, dtype=torch.bfloat16) * torch.tensor([[3.0], [1e-3]], dtype=torch.bfloat16)]
    got = trial_norms(half, 2)
    assert got.dtype == torch.float32 and torch.allclose(got, torch.tensor([3.0, 1e-3]) * 3 ** 0.5, rtol=1e-2)
    assert torch.equal(st.clip_trials([], k, 1.0), torch.zeros(k))
