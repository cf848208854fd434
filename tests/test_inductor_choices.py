"""ulsweep's one change to Inductor's heuristics (ulsweep/train/inductor.py): short rows in one pass.

The decision on CPU; on a GPU, the QK-RMSNorm of 128-channel heads compiled to a one-pass kernel with it and
to a two-pass kernel without it (Inductor's own rule), read from the generated code."""
from __future__ import annotations

import pickle

import pytest
import torch

from ulsweep.train import inductor


@pytest.fixture
def restore_choices():
    saved = inductor.ONE_PASS_MAX_ROW
    yield
    inductor.ONE_PASS_MAX_ROW = saved
    inductor.install_choices()


def test_one_pass_for_short_rows_unless_inductor_forbids_it():
    assert inductor.one_pass(True, False, True, False)  # short row, Inductor said no: one pass
    assert inductor.one_pass(False, True, True, False)  # Inductor's own yes stands
    assert not inductor.one_pass(False, False, True, False)  # long row: Inductor's no stands
    assert not inductor.one_pass(True, False, False, False)  # triton.persistent_reductions off
    assert not inductor.one_pass(True, False, True, True)  # cooperative: a row spans several blocks


def test_install_sets_and_removes_the_handler(restore_choices):
    from torch._inductor.choices import InductorChoices
    from torch._inductor.virtualized import V

    inductor.ONE_PASS_MAX_ROW = 256
    inductor.install_choices()
    assert isinstance(V.choices, inductor.choices_class()) and V.choices.max_row == 256
    # Inductor pickles its config (which holds the class on newer torch) for its cache key
    assert pickle.loads(pickle.dumps(inductor.choices_class())) is inductor.choices_class()
    inductor.ONE_PASS_MAX_ROW = 0
    inductor.install_choices()
    assert type(V.choices) is InductorChoices


def _qk_norm_forward_kernels(max_row: int) -> list[str]:
    """Names of the generated Triton kernels that normalize q and k in a compiled attention layer's training
    step (the backward's kernels and the weight-gradient sums over all tokens are left out). 32,768 rows:
    Inductor's own rule looks at the memory layout only for fewer rows."""
    import re

    from torch._inductor.utils import run_and_get_code

    from ulsweep.models.layers import Attention

    inductor.ONE_PASS_MAX_ROW = max_row
    inductor.install_choices()
    torch._dynamo.reset()
    attn = torch.compile(Attention(512, 4).cuda())  # heads of 128 channels
    x = torch.randn(8, 1024, 512, device="cuda", requires_grad=True)

    def step():
        with torch.autocast("cuda", torch.bfloat16):
            attn(x).float().square().mean().backward()

    with torch._inductor.config.patch(fx_graph_cache=False):
        _, code = run_and_get_code(step)
    names = re.findall(r"def (triton_\w+)\(", "\n".join(code))
    return [k for k in names if "rms_norm" in k and "unbind" in k and "backward" not in k and "sum" not in k]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Inductor's Triton kernels need CUDA")
def test_qk_norm_of_128_channel_heads_is_one_pass_on_the_gpu(restore_choices):
    ours, inductors = _qk_norm_forward_kernels(128), _qk_norm_forward_kernels(0)
    assert ours and all(k.startswith("triton_per_") for k in ours), ours
    assert inductors and all(k.startswith("triton_red_") for k in inductors), inductors  # what it replaces
