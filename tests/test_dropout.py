"""ulsweep's dropout (ulsweep/models/dropout.py): a NumPy Philox-4x32-10 against Random123's known answers;
the Triton keep-mask kernel bit-exact against that reference (Triton's interpreter on CPU, the compiled
kernel on CUDA), its rate and the independence of neighbouring draws; the fallback to `F.dropout` outside
torch.compile; the compiled CUDA path end to end (gpu)."""
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

ROOT = Path(__file__).resolve().parents[1]
HAVE_TRITON = importlib.util.find_spec("triton") is not None

M0, M1 = 0xD2511F53, 0xCD9E8D57  # Philox-4x32 round multipliers
W0, W1 = 0x9E3779B9, 0xBB67AE85  # key increments (Weyl sequence)
MASK32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(ctr: list[np.ndarray], key: tuple[int, int]) -> list[np.ndarray]:
    """Philox-4x32 with 10 rounds (Salmon et al., SC'11) on uint32 counter words; NumPy, vectorised."""
    c = [np.asarray(w, dtype=np.uint64) for w in ctr]
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for _ in range(10):
        p0, p1 = np.uint64(M0) * c[0], np.uint64(M1) * c[2]  # < 2^64: exact in uint64
        c = [(p1 >> np.uint64(32)) ^ c[1] ^ k0, p1 & MASK32, (p0 >> np.uint64(32)) ^ c[3] ^ k1, p0 & MASK32]
        k0, k1 = (k0 + np.uint64(W0)) & MASK32, (k1 + np.uint64(W1)) & MASK32
    return [w.astype(np.uint32) for w in c]


def reference_bits(seed: int, n: int, p: float) -> np.ndarray:
    """The packed keep-mask the kernel must produce: byte c comes from the Philox call with counter
    (c_lo, c_hi, 0, 0) and key (seed_lo, seed_hi); its words r0..r3 give the 16-bit uniforms
    u_0..u_7 = r0_lo, r0_hi, r1_lo, ..., r3_hi, and bit j is u_j >= round(p * 2^16)."""
    c = np.arange((n + 7) // 8, dtype=np.uint64)
    r = philox4x32_10([c & MASK32, c >> np.uint64(32), np.zeros_like(c), np.zeros_like(c)],
                      (seed & 0xFFFFFFFF, seed >> 32))
    u = [h for w in r for h in (w & 0xFFFF, w >> 16)]
    return sum((uj >= round(p * 65536)).astype(np.uint8) << j for j, uj in enumerate(u)).astype(np.uint8)


def keep_of(bits: np.ndarray, n: int) -> np.ndarray:
    return np.unpackbits(bits, bitorder="little")[:n].astype(bool)


def test_philox_reference_gives_random123s_known_answers():
    assert [int(w[0]) for w in philox4x32_10([[0]] * 4, (0, 0))] == \
        [0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8]
    ones = 0xFFFFFFFF
    assert [int(w[0]) for w in philox4x32_10([[ones]] * 4, (ones, ones))] == \
        [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD]
    pi = [[0x243F6A88], [0x85A308D3], [0x13198A2E], [0x03707344]]
    assert [int(w[0]) for w in philox4x32_10(pi, (0xA4093822, 0x299F31D0))] == \
        [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]


# (seed, n, p): a seed with high bits set, n not a multiple of 8 and its bytes not of BLOCK; a large mask
# for the statistics; a second seed; p = 0.5
CASES = [(0x5DEECE66D1234567, 2 * 8 * D.BLOCK + 773, 0.1), (1, 1 << 20, 0.1), (2, 1 << 20, 0.1),
         (3, 1 << 16, 0.5)]
_SCRIPT = """
import json, sys, numpy as np, torch
from ulsweep.models import dropout as D
cases, out = json.loads(sys.argv[1]), sys.argv[2]
dev = "cuda" if torch.cuda.is_available() else "cpu"
np.savez(out, *[torch.ops.ulsweep.keep_bits(torch.tensor(s, dtype=torch.int64, device=dev), n, p).cpu().numpy()
                for s, n, p in cases])
"""


@pytest.fixture(scope="module")
def kernel_masks(tmp_path_factory):
    """The kernel's masks for CASES: compiled on CUDA, else through Triton's interpreter (TRITON_INTERPRET=1
    must be set before the kernel is defined, hence a subprocess)."""
    if not HAVE_TRITON:
        pytest.skip("triton is not installed (CUDA builds of torch ship it)")
    out = tmp_path_factory.mktemp("mask") / "masks.npz"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(CASES), str(out)], check=True, env=env, cwd=ROOT,
                   timeout=600)
    with np.load(out) as z:
        return [z[f"arr_{i}"] for i in range(len(CASES))]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_keep_bits_kernel_matches_the_reference_bit_for_bit(kernel_masks, case):
    seed, n, p = CASES[case]
    got = kernel_masks[case]
    assert got.dtype == np.uint8 and got.shape == ((n + 7) // 8,)
    want = reference_bits(seed, n, p)
    assert np.array_equal(got, want), f"{np.count_nonzero(got != want)} of {got.size} bytes differ"


def test_keep_mask_rate_and_independence(kernel_masks):
    n, p = CASES[1][1], D.quantized_rate(CASES[1][2])
    drop = ~keep_of(kernel_masks[1], n)
    tol = 5 * math.sqrt(p * (1 - p) / n)  # 5 sigma of a binomial proportion
    assert abs(drop.mean() - p) < tol
    assert abs((~keep_of(kernel_masks[3], CASES[3][1])).mean() - 0.5) < 5 * math.sqrt(0.25 / CASES[3][1])
    # pairs drawn from one Philox call (halves of one word, neighbouring words) and from neighbouring calls
    # are dropped together with probability p^2
    call = drop.reshape(-1, 8)  # (Philox call, uniform j)
    for a, b in [(call[:, 0], call[:, 1]), (call[:, 1], call[:, 2]), (call[:, 3], call[:, 4]),
                 (call[:-1], call[1:])]:
        both = (a & b).mean()
        assert abs(both - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / a.size), both
    # another seed gives another mask: they disagree on a fraction 2 p (1 - p)
    differ = (keep_of(kernel_masks[1], n) != keep_of(kernel_masks[2], n)).mean()
    assert abs(differ - 2 * p * (1 - p)) < 5 * math.sqrt(2 * p * (1 - p) / n)


def test_unpacking_puts_bit_j_of_byte_c_at_element_8c_plus_j():
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 256, 13, dtype=np.uint8)
    keep = D.unpack_keep(torch.from_numpy(bits), [4, 5, 5])  # 100 of the 104 bits
    assert keep.dtype == torch.bool and keep.shape == (4, 5, 5)
    assert np.array_equal(keep.reshape(-1).numpy(), keep_of(bits, 100))
    assert D.unpack_keep(torch.tensor([0b00000101], dtype=torch.uint8), [3]).tolist() == [True, False, True]


def test_quantized_rate_is_within_half_a_step_of_the_rate():
    for p in np.linspace(0, 0.99, 199):
        q = D.quantized_rate(float(p))
        assert abs(q - p) <= 2.0 ** -17 and (q * 65536).is_integer()
    assert D.quantized_rate(0.1) == 6554 / 65536


def test_outside_compile_it_is_torchs_dropout():
    x = torch.randn(64, 33)
    m = D.Dropout(0.3)
    assert isinstance(m, torch.nn.Dropout) and m.p == 0.3 and not D.fast_path(x)
    torch.manual_seed(7)
    y = m(x)
    torch.manual_seed(7)
    assert torch.equal(y, F.dropout(x, 0.3, training=True))
    m.eval()
    assert m(x) is x
    assert D.Dropout(0.0).train()(x) is x


def test_a_bad_rate_names_the_value():
    with pytest.raises(ValueError, match="1.5"):
        D.Dropout(1.5)


def test_the_networks_use_it():
    from ulsweep.models.layers import Attention, Mlp, ResBlock, TransformerBlock

    for m in (Attention(32, 2, 0.1), Mlp(32, 64, 0.1), ResBlock(32, 32, dropout=0.1),
              TransformerBlock(32, 2, 16, dropout=0.1)):
        drops = [d for d in m.modules() if isinstance(d, torch.nn.Dropout)]
        assert drops and all(type(d) is D.Dropout and d.p == 0.1 for d in drops)


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and HAVE_TRITON), reason="needs CUDA and Triton")
def test_compiled_cuda_dropout_takes_the_mask_kernel():
    """Kept values are scaled by 1 / (1 - p_q), p_q = 6554 / 65536, which fp32 tells apart from 1 / (1 - p):
    so the compiled function took the Triton mask; the gradient is the same mask and scale."""
    p, pq = 0.1, D.quantized_rate(0.1)
    x = torch.randn(4096, 1024, device="cuda", requires_grad=True)
    y = torch.compile(lambda t: D.dropout(t, p))(x)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - pq) < 5 * math.sqrt(pq * (1 - pq) / x.numel())
    torch.testing.assert_close(y[kept], x[kept] / (1 - pq), rtol=2e-7, atol=0)
    assert not torch.allclose(y[kept], x[kept] / (1 - p), rtol=2e-7, atol=0)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, kept.float() / (1 - pq), rtol=2e-7, atol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and HAVE_TRITON), reason="needs CUDA and Triton")
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_compiled_masks_change_every_call_and_follow_torchs_seed(mode):
    """Every call draws a new mask (also when replayed as a CUDA graph); the seed comes from torch's CUDA
    generator, so torch.manual_seed reproduces a mask (what a resumed run relies on)."""
    p, pq = 0.1, D.quantized_rate(0.1)
    x = torch.ones(1 << 20, device="cuda")
    f = torch.compile(lambda t: D.dropout(t, p) != 0, mode=mode)
    masks = []
    for seed in (0, 0, 0, 1):  # call 1 and 2 without reseeding in between, then 0 again, then 1
        if len(masks) != 1:
            torch.manual_seed(seed)
        masks.append(f(x).clone())
    differ = (masks[0] != masks[1]).float().mean().item()
    assert abs(differ - 2 * pq * (1 - pq)) < 5 * math.sqrt(2 * pq * (1 - pq) / x.numel())
    assert torch.equal(masks[0], masks[2]) and not torch.equal(masks[0], masks[3])


STAND_IN_CALLS: list[int] = []  # element counts the stand-in mask op was called with


@pytest.fixture
def stand_in_mask(monkeypatch):
    """The fast path on CPU: `fast_path` forced on and the mask kernel replaced by a custom op of the same
    signature that draws its bytes with torch's CPU generator (the real kernel is CUDA-only)."""
    if not hasattr(torch.ops.ulsweep_test, "keep_bits"):
        # torch 2.14: a custom op registered before this module is imported breaks Inductor's decompositions
        importlib.import_module("torch._inductor.decomposition")

        @torch.library.custom_op("ulsweep_test::keep_bits", mutates_args=())
        def stand_in(seed: torch.Tensor, n: int, p: float) -> torch.Tensor:
            STAND_IN_CALLS.append(n)
            return torch.randint(0, 256, ((n + 7) // 8,), dtype=torch.uint8)

        stand_in.register_fake(lambda seed, n, p: torch.empty(((n + 7) // 8,), dtype=torch.uint8))
    monkeypatch.setattr(D, "fast_path", lambda x: True)
    monkeypatch.setattr(torch.ops.ulsweep, "keep_bits", torch.ops.ulsweep_test.keep_bits, raising=False)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_the_backward_keeps_the_packed_mask_not_one_byte_an_element(stand_in_mask):
    """Among the tensors the compiled forward saves for the backward there is the packed mask (n / 8 bytes)
    and no boolean of n elements."""
    from ulsweep.models.layers import TransformerBlock

    block = TransformerBlock(32, 2, 16, dropout=0.1)
    f = torch.compile(lambda x, c: block(x, c).square().sum())
    x, c = torch.randn(4, 16, 32), torch.randn(4, 16)
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = f(x, c)
    loss.backward()
    # three dropouts, packed: attention and MLP outputs (4 x 16 x 32 / 8), MLP hidden (4 x 16 x 128 / 8);
    # (the 8 bit shifts of the unpacking may be saved too)
    packed = sorted(s[1] for s in saved if s[0] == torch.uint8 and s[1] > 8)
    assert packed == [256, 256, 1024], saved
    assert not [s for s in saved if s[0] == torch.bool], saved


def test_compiled_ddp_with_the_packed_mask_matches_the_compiled_module(stand_in_mask, tmp_path):
    """A DDP trial compiles its objective with the library's DDP setting (`compile_module`, world > 1): the
    fast-path dropout (custom op + checkpointed unpacking) traces under DDP and gives the gradients of the
    compiled module alone for the same seed (one gloo process stands in for the group)."""
    import torch.distributed as dist

    from ulsweep.models.layers import TransformerBlock
    from ulsweep.train.runtime import Runtime, compile_module

    torch.manual_seed(0)
    block = TransformerBlock(32, 2, 16, dropout=0.1)
    x, c = torch.randn(4, 16, 32), torch.randn(4, 16)
    grads = []
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        with torch._dynamo.config.patch(optimize_ddp="ddp_optimizer"):  # restored afterwards
            for world, module in ((1, block), (2, torch.nn.parallel.DistributedDataParallel(block))):
                f = compile_module(module, "default", Runtime(torch.device("cpu"), None, 0, world))
                block.zero_grad()
                torch.manual_seed(1)
                STAND_IN_CALLS.clear()
                f(x, c).square().sum().backward()
                grads.append([p.grad.clone() for p in block.parameters()])
                assert sorted(STAND_IN_CALLS) == [2048, 2048, 8192]  # the three dropouts drew packed masks
                torch._dynamo.reset()
    finally:
        dist.destroy_process_group()
    assert any((g != 0).any() for g in grads[0])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
