"""ulsweep's fused bias + GELU + dropout (ulsweep/models/gelu.py): the erfc approximation against the
float64 closed form over the whole range; the Triton kernels' forward and backward (through autograd)
against a float64 reference built from the exact normal CDF (Triton's interpreter on CPU, the compiled
kernels on CUDA); the compiled MLP on CUDA against the eager one (gpu)."""
from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ulsweep.models import dropout as D
from ulsweep.models import gelu as G
from ulsweep.models.layers import Mlp

ROOT = Path(__file__).resolve().parents[1]
HAVE_TRITON = importlib.util.find_spec("triton") is not None
BF16_ULP = 2.0 ** -7  # relative spacing of bf16 numbers: one rounding step (the interpreter truncates)
TINY = torch.finfo(torch.bfloat16).tiny  # smallest normal bf16 (and fp32) number, 1.2e-38


def test_erfc_approximation_keeps_its_relative_accuracy_into_the_far_tail():
    z = torch.linspace(0.0, 26.0, 200_001, dtype=torch.float64)  # erfc(26) ~ 1e-296: still a normal double
    rel = (G.erfc_reference(z) - torch.special.erfc(z)).abs() / torch.special.erfc(z)
    assert rel.max() < 1.2e-7


def normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Phi(x) = erfc(-x / sqrt 2) / 2 in float64: accurate in the lower tail, where 1 + erf(x / sqrt 2)
    cancels to 0 (F.gelu in float64 returns -0.0 below x ~ -8.3; the kernel does not)."""
    return 0.5 * torch.special.erfc(-x / math.sqrt(2.0))


# (rows, columns, p, seed): tiles cut at both edges (columns: a multiple of 8, as `fast_path` requires); several backward row-programs (rows > BWD_ROWS) without
# dropout; a wide row at p = 0.5
CASES = [(37, 296, 0.1, 0), (2 * G.BWD_ROWS + 89, 264, 0.0, 1), (40, 2048, 0.5, 2)]
_SCRIPT = """
import json, sys, numpy as np, torch
from ulsweep.models import dropout as D, gelu as G
cases, out = json.loads(sys.argv[1]), sys.argv[2]
dev = "cuda" if torch.cuda.is_available() else "cpu"
arrays = {}
for i, (m, n, p, seed) in enumerate(cases):
    gen = torch.Generator().manual_seed(seed)
    h = (4 * torch.randn(m, n, generator=gen)).to(torch.bfloat16).to(dev).requires_grad_()
    h.data[0, :4] = torch.tensor([-12.0, -9.0, 0.0, 7.5])  # deep lower tail, zero, saturated
    b = (0.5 * torch.randn(n, generator=gen)).to(dev).requires_grad_()
    b.data[:4] = 0.0
    bits = torch.randint(0, 256, ((m * n + 7) // 8,), generator=gen, dtype=torch.uint8).to(dev)
    bits[0] = 255  # the first 8 elements are kept
    g = torch.randn(m, n, generator=gen).to(torch.bfloat16).to(dev)
    y = torch.ops.ulsweep.bias_gelu_dropout(h, b, bits, p)
    y.backward(g)
    for k, v in dict(h=h, b=b, bits=bits, g=g, y=y, dh=h.grad, db=b.grad).items():
        arrays[f"{i}_{k}"] = v.detach().float().cpu().numpy() if v.is_floating_point() else v.cpu().numpy()
np.savez(out, **arrays)
"""


@pytest.fixture(scope="module")
def kernel_runs(tmp_path_factory):
    """Forward and backward of the op for CASES: compiled Triton on CUDA, else Triton's interpreter (set
    before the kernels are defined, hence a subprocess)."""
    if not HAVE_TRITON:
        pytest.skip("triton is not installed (CUDA builds of torch ship it)")
    out = tmp_path_factory.mktemp("gelu") / "runs.npz"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(CASES), str(out)], check=True, env=env, cwd=ROOT,
                   timeout=600)
    with np.load(out) as z:
        return [{k: torch.from_numpy(z[f"{i}_{k}"]) for k in ("h", "b", "bits", "g", "y", "dh", "db")}
                for i in range(len(CASES))]


def reference(run: dict, p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, dh, keep) in float64: y = keep / (1 - p_q) * x Phi(x), dh = keep / (1 - p_q) * g (Phi + x phi)."""
    x = run["h"].double() + run["b"].double()
    keep = D.unpack_keep(run["bits"], x.shape) if p > 0 else torch.ones_like(x, dtype=torch.bool)
    factor = keep / (1.0 - D.quantized_rate(p))
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)
    return factor * x * normal_cdf(x), factor * run["g"].double() * (normal_cdf(x) + x * pdf), keep


@pytest.mark.parametrize("case", range(len(CASES)))
def test_forward_is_the_exact_gelu_to_bf16_rounding(kernel_runs, case):
    run, p = kernel_runs[case], CASES[case][2]
    want, _, keep = reference(run, p)
    got = run["y"].double()
    assert (got[~keep] == 0).all()  # dropped where the mask says
    normal = keep & (want.abs() >= TINY)  # below bf16's normal range the result may flush to zero
    assert (got[normal] != 0).all()
    assert ((got - want).abs()[normal] <= BF16_ULP * want.abs()[normal]).all()
    assert (got[keep & ~normal].abs() <= TINY).all()  # flushed, subnormal, or rounded up to TINY
    assert got[0, 0] < 0 and got[0, 1] < 0  # the lower tail stays negative and non-zero: x Phi(x) at -12, -9


@pytest.mark.parametrize("case", range(len(CASES)))
def test_backward_gives_the_exact_derivative_and_the_bias_gradient(kernel_runs, case):
    run, p = kernel_runs[case], CASES[case][2]
    _, want, _ = reference(run, p)
    got = run["dh"].double()
    # bf16 rounding of the result, plus fp32 cancellation in Phi + x phi near its zero (x ~ -0.75)
    scale = run["g"].double().abs() / (1.0 - D.quantized_rate(p))
    assert ((got - want).abs() <= BF16_ULP * want.abs() + 1e-6 * scale + TINY).all()
    # the bias gradient sums the fp32 dh before rounding: close to the float64 sum of the exact dh
    db_want = want.sum(0)
    assert ((run["db"].double() - db_want).abs() <= 1e-5 * want.abs().sum(0) + 1e-6).all()


def test_mlp_outside_compile_is_linear_gelu_dropout():
    mlp = Mlp(16, 64, dropout=0.0)
    x = torch.randn(3, 5, 16)
    assert not G.fast_path(x, 64)
    torch.testing.assert_close(mlp(x), mlp.fc2(F.gelu(mlp.fc1(x))))


@pytest.mark.skipif(not (torch.cuda.is_available() and HAVE_TRITON), reason="needs CUDA and Triton")
def test_compiled_cuda_mlp_takes_the_fused_kernels_and_matches_eager(monkeypatch):
    calls = []
    real = G.bias_gelu_dropout
    monkeypatch.setattr(G, "bias_gelu_dropout", lambda *a, **k: calls.append(1) or real(*a, **k))
    torch.manual_seed(0)
    mlp = Mlp(256, 1024, dropout=0.0).cuda()
    x = torch.randn(8, 64, 256, device="cuda", requires_grad=True)
    with torch.autocast("cuda", torch.bfloat16):
        y_eager = mlp(x)
    gx_eager, gb_eager = torch.autograd.grad(y_eager.float().square().sum(), (x, mlp.fc1.bias))
    torch._dynamo.reset()
    with torch.autocast("cuda", torch.bfloat16):
        y = torch.compile(mlp)(x)
    gx, gb = torch.autograd.grad(y.float().square().sum(), (x, mlp.fc1.bias))
    assert calls, "the compiled MLP did not take the fused kernels"
    torch.testing.assert_close(y.float(), y_eager.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(gx, gx_eager, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(gb, gb_eager, rtol=5e-2, atol=5e-2)
