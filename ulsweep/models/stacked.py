"""K networks of one architecture as one network: issue 23's batched program for a sweep's small trials.

A sweep's trials mostly share their shapes (a loss factor or a sigmoid bias changes none), and a small trial
leaves most of a GPU idle: its kernels are too small to fill it (the small stage-1 step at batch 128 uses 3.5% of
an H200's bf16 peak with CUDA graphs, benchmarks/results/h200-batched-trials-ae-s17.json). `stack([m_1 .. m_K])`
returns one module that computes all K of them in kernels K times as large:

- every layer with weights holds the K trials' weights stacked on a new leading dimension (K, ...), and
- activations carry the K trials' batches one after the other on the batch dimension: (K*B, ...), trial k's
  examples at rows [k*B, (k+1)*B).

Layers without weights (activations, LayerNorm without affine, attention, dropout, reshapes, the positional
embeddings) run unchanged on the (K*B, ...) tensors, so the architecture's own code needs no change and compiles
as one ordinary graph, with the fused attention kernels (`torch.func.vmap` over stacked weights, the other way,
ran the attention backward one trial at a time and compiled slower: 204 s against 156 s for four small
autoencoders on 2 CPU cores, and not within 280 s with CUDA graphs on an H200; benchmarks/batched_trials.py).
The layers with weights become:

    nn.Linear        y_k = x_k W_k^T + b_k          one batched matmul (bmm) over K, then the bias
    nn.Conv2d        y_k = conv(x_k, W_k) + b_k     one grouped convolution, the K trials as K groups (x moved to
                                                    (B, K*C, H, W) and back); or, `conv="loop"`, K ordinary
                                                    convolutions, each on its trial's rows
    nn.GroupNorm     normalize, then gamma_k, beta_k per trial
    RMSNorm          normalize, then gamma_k per trial (ulsweep's, layers.py)

Any other module that holds its own parameters is refused with its name. Buffers are stacked too ((K, ...); a
trial's 0-d loss factor becomes a (K,) vector): code that mixes a stacked buffer with per-example values expands
it with `per_example`.

Trial k's outputs, losses and gradients are those of m_k alone on its own rows (up to the rounding of a batched
kernel against a single one; tests/test_stacked.py). Since no weight is shared, the gradient of the sum of the K
losses is each trial's own gradient, and elementwise optimizers (AdamW) and EMAs step the stacked tensors as K
independent ones would; only what reduces over all weights, the gradient norm of clipping, must be taken per
trial (`trial_norms`, `clip_trials`). `unstack(module, k)` gives trial k's state dict, under the original names.
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ulsweep.models.layers import RMSNorm


def per_example(value: Tensor, batch: int) -> Tensor:
    """A per-trial value as a per-example one: a 0-d tensor stays as it is (one trial); a (K,) vector becomes
    (batch,) with trial k's value on rows [k*batch/K, (k+1)*batch/K)."""
    if value.dim() == 0:
        return value
    k = value.shape[0]
    if value.dim() != 1 or batch % k:
        raise ValueError(f"per-trial value of shape {tuple(value.shape)} does not divide a batch of {batch}")
    return value.repeat_interleave(batch // k)


def _trials(x: Tensor, k: int) -> Tensor:
    """(K*B, ...) -> (K, B, ...), a view."""
    if x.shape[0] % k:
        raise ValueError(f"a batch of {x.shape[0]} rows is not {k} trials' batches of one size")
    return x.unflatten(0, (k, -1))


def _stack(tensors: list[Tensor]) -> nn.Parameter:
    return nn.Parameter(torch.stack([t.detach() for t in tensors]))


class StackedLinear(nn.Module):
    """K nn.Linear layers of one shape: weight (K, out, in), bias (K, out) or None."""

    def __init__(self, layers: list[nn.Linear]):
        super().__init__()
        self.k, self.in_features, self.out_features = len(layers), layers[0].in_features, layers[0].out_features
        self.weight = _stack([m.weight for m in layers])
        self.bias = _stack([m.bias for m in layers]) if layers[0].bias is not None else None

    def forward(self, x: Tensor) -> Tensor:  # (K*B, ..., in) -> (K*B, ..., out)
        xs = _trials(x, self.k).reshape(self.k, -1, self.in_features)  # (K, B*..., in)
        y = torch.bmm(xs, self.weight.transpose(1, 2))  # (K, B*..., out)
        if self.bias is not None:
            # added after the matmul rather than as baddbmm's input, which aten first writes out in full, broadcast
            # to (K, B*..., out) (an extra pass over the output, eager even in a compiled graph: 3.8 of the 56.7 ms
            # of lf_sweep's 18 stacked base models' step on an H100); compiled, the add fuses into the next kernel
            y = y + self.bias.unsqueeze(1)
        return y.reshape(*x.shape[:-1], self.out_features)


CONVS = ("grouped", "loop")  # how a StackedConv2d runs (resources.stack_conv)


class StackedConv2d(nn.Module):
    """K nn.Conv2d layers of one configuration: weight (K, out, in/groups, kh, kw), bias (K, out) or None. `conv`:
    grouped runs them as one grouped convolution, the K trials as K groups, its input moved to (B, K*C, H, W) and
    its output back; loop as K ordinary convolutions, trial k's on its own rows (K*B, ...)[k*B:(k+1)*B], no moves
    but K kernels."""

    def __init__(self, layers: list[nn.Conv2d], conv: str = "grouped"):
        super().__init__()
        c = layers[0]
        if c.padding_mode != "zeros" or isinstance(c.padding, str):
            raise ValueError(f"stacked convolutions take numeric zero padding, not {c.padding!r}/{c.padding_mode!r}")
        if conv not in CONVS:
            raise ValueError(f"stacked convolutions run as one of {CONVS}, not {conv!r}")
        self.k, self.out_channels, self.conv = len(layers), c.out_channels, conv
        self.stride, self.padding, self.dilation, self.groups = c.stride, c.padding, c.dilation, c.groups
        self.weight = _stack([m.weight for m in layers])
        self.bias = _stack([m.bias for m in layers]) if c.bias is not None else None

    def extra_repr(self) -> str:  # the default's repr as before (the compile gate's key holds it)
        return "" if self.conv == "grouped" else f"conv={self.conv}"

    def forward(self, x: Tensor) -> Tensor:  # (K*B, C, H, W) -> (K*B, out, H', W')
        if self.conv == "loop":
            xs = _trials(x, self.k)  # (K, B, C, H, W), a view: trial k's rows are contiguous
            return torch.cat([F.conv2d(xs[i], self.weight[i], None if self.bias is None else self.bias[i],
                                       self.stride, self.padding, self.dilation, self.groups) for i in range(self.k)])
        xg = _trials(x, self.k).transpose(0, 1).flatten(1, 2)  # (B, K*C, H, W)
        bias = None if self.bias is None else self.bias.flatten()
        y = F.conv2d(xg, self.weight.flatten(0, 1), bias, self.stride, self.padding, self.dilation,
                     self.groups * self.k)  # (B, K*out, H', W')
        return y.unflatten(1, (self.k, self.out_channels)).transpose(0, 1).flatten(0, 1)


class StackedGroupNorm(nn.Module):
    """K affine nn.GroupNorm layers: the normalization as one, then each trial's scale and shift (K, C)."""

    def __init__(self, layers: list[nn.GroupNorm]):
        super().__init__()
        g = layers[0]
        if not g.affine:
            raise ValueError("a GroupNorm without weights needs no stacking")
        self.k, self.num_groups, self.eps = len(layers), g.num_groups, g.eps
        self.weight = _stack([m.weight for m in layers])
        self.bias = _stack([m.bias for m in layers])

    def forward(self, x: Tensor) -> Tensor:  # (K*B, C, ...)
        y = _trials(F.group_norm(x, self.num_groups, None, None, self.eps), self.k)  # (K, B, C, ...)
        shape = (self.k, 1, -1) + (1,) * (x.dim() - 2)
        return (y * self.weight.view(shape) + self.bias.view(shape)).flatten(0, 1)


class StackedRMSNorm(nn.Module):
    """K RMSNorm layers (ulsweep's: the weight in the input's dtype) over the last dimension: the normalization
    as one, then each trial's scale (K, D)."""

    def __init__(self, layers: list[RMSNorm]):
        super().__init__()
        r = layers[0]
        if len(r.normalized_shape) != 1 or r.weight is None:
            raise ValueError(f"stacked RMSNorm takes one normalized dimension with a weight, not "
                             f"{tuple(r.normalized_shape)}")
        self.k, self.normalized_shape, self.eps = len(layers), tuple(r.normalized_shape), r.eps
        self.weight = _stack([m.weight for m in layers])

    def forward(self, x: Tensor) -> Tensor:  # (K*B, ..., D)
        y = _trials(F.rms_norm(x, self.normalized_shape, None, self.eps), self.k)  # (K, B, ..., D)
        w = self.weight.to(x.dtype).view((self.k,) + (1,) * (x.dim() - 1) + (-1,))
        return (y * w).flatten(0, 1)


# exact types: a subclass may use its weights otherwise (torch's own nn.RMSNorm does not cast them)
STACKED = {nn.Linear: StackedLinear, nn.Conv2d: StackedConv2d, nn.GroupNorm: StackedGroupNorm,
           RMSNorm: StackedRMSNorm}
PLAIN = {v: k for k, v in STACKED.items()}


def stack(modules: list[nn.Module], conv: str = "grouped") -> nn.Module:
    """One module that runs the K `modules` (one architecture) on (K*B, ...) inputs, trial k on rows
    [k*B, (k+1)*B): a copy of the first with every layer that has weights replaced by its stacked form, and every
    buffer stacked to (K, ...); `conv`, how its convolutions run (StackedConv2d). The modules themselves are left
    as they were."""
    if not modules:
        raise ValueError("stack needs at least one module")
    first = modules[0]
    for i, m in enumerate(modules[1:], 1):
        if type(m) is not type(first) or repr(m) != repr(first):
            raise ValueError(f"module {i} ({type(m).__name__}) is not of the architecture of module 0 "
                             f"({type(first).__name__}): only trials of one architecture stack")

    def stacked(cls, layers: list[nn.Module]) -> nn.Module:
        return cls(layers, conv) if cls is StackedConv2d else cls(layers)

    if type(first) in STACKED:  # a bare layer
        return stacked(STACKED[type(first)], list(modules))
    out = copy.deepcopy(first)
    named = [dict(m.named_modules()) for m in modules]
    for name, sub in list(out.named_modules()):
        if not list(sub.parameters(recurse=False)):
            continue
        cls = STACKED.get(type(sub))
        if cls is None:
            raise ValueError(f"{name or type(out).__name__}: a {type(sub).__name__} holds parameters of its own; "
                             f"stack knows {', '.join(c.__name__ for c in STACKED)}")
        parent, _, attr = name.rpartition(".")
        setattr(out.get_submodule(parent), attr, stacked(cls, [n[name] for n in named]))
    saved = first.state_dict()  # holds the persistent buffers only
    for name, _ in list(out.named_buffers()):
        parent, _, attr = name.rpartition(".")
        out.get_submodule(parent).register_buffer(attr, torch.stack([m.get_buffer(name) for m in modules]),
                                                  persistent=name in saved)
    return out


def _plain_layer(layer: nn.Module) -> nn.Module:
    """The ordinary layer of a stacked one, holding trial 0's weights."""
    w = layer.weight
    kw = {"device": w.device, "dtype": w.dtype}
    if isinstance(layer, StackedLinear):
        out = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, **kw)
    elif isinstance(layer, StackedConv2d):
        out = nn.Conv2d(w.shape[2] * layer.groups, layer.out_channels, tuple(w.shape[3:]), layer.stride, layer.padding,
                        layer.dilation, layer.groups, bias=layer.bias is not None, **kw)
    elif isinstance(layer, StackedGroupNorm):
        out = nn.GroupNorm(layer.num_groups, w.shape[1], layer.eps, affine=True, **kw)
    else:
        out = RMSNorm(layer.normalized_shape, layer.eps, **kw)
    load_trial(out, layer, 0)
    return out.train(layer.training).requires_grad_(w.requires_grad)


def plain(module: nn.Module) -> nn.Module:
    """One trial's network of a stacked module as an ordinary module of the original architecture (stack's
    layers replaced back, its buffers of one trial), holding trial 0's weights: `load_trial` puts another trial's
    in. Where a trial's work is large enough to fill the device alone, the ordinary network runs it in kernels a
    stacked one does not reach: a group's sampling, member by member (ulsweep/train/stage1.py, stage2.py)."""
    memo: dict[int, object] = {}
    for sub in module.modules():
        if type(sub) in PLAIN:
            memo[id(sub)] = _plain_layer(sub)
    for _, buf in module.named_buffers():
        memo.setdefault(id(buf), buf[0].clone())
    return copy.deepcopy(module, memo)  # what the memo holds is taken as it is: no trial's weights are copied twice


@torch.no_grad()
def load_trial(plain_module: nn.Module, stacked: nn.Module, k: int) -> nn.Module:
    """Copy trial k's weights and buffers of `stacked` into `plain_module` (of `plain(stacked)`), in place: a
    compiled `plain_module` keeps its compiled code. Returns it."""
    src = dict(stacked.named_parameters()) | dict(stacked.named_buffers())
    for name, t in [*plain_module.named_parameters(), *plain_module.named_buffers()]:
        t.copy_(src[name][k])
    return plain_module


def unstack(module: nn.Module, k: int) -> dict[str, Tensor]:
    """Trial k's state dict, under the names of the unstacked module (loadable with `load_state_dict`)."""
    return {name: t[k] for name, t in module.state_dict().items()}


NORM_CHUNK = 1 << 26  # gradient elements concatenated at once for the per-trial norms: 256 MiB of float32 scratch


def _squares(rows: list[Tensor]) -> Tensor:
    """sum over the (K, n_i) `rows` of each row's squared L2 norm: (K,), float32, in two kernels (one copy)."""
    flat = torch.cat(rows, 1) if len(rows) > 1 else rows[0]
    return torch.linalg.vector_norm(flat, dim=1, dtype=torch.float32).square()


def trial_norms(params: list[Tensor], k: int) -> Tensor:
    """Each trial's global L2 norm over the stacked tensors `params` (their gradients, say): (K,), float32.

    |g_k| = sqrt(sum_i |p_i[k]|^2): the tensors as (K, n_i) rows concatenated, up to NORM_CHUNK elements at a
    time, and each chunk's row norms in one reduction: a few kernels a step where a reduction per tensor takes
    hundreds (lf_sweep's autoencoder has 298 weight tensors), with no compile."""
    if not params:
        return torch.zeros(k)
    squares, rows, size = [], [], 0
    for p in params:
        rows.append(p.reshape(k, -1))
        size += p.numel()
        if size >= NORM_CHUNK:
            squares.append(_squares(rows))
            rows, size = [], 0
    if rows:
        squares.append(_squares(rows))
    return torch.stack(squares).sum(0).sqrt()


def clip_trials(grads: list[Tensor], k: int, max_norm: float) -> Tensor:
    """Scale each trial's gradients (the rows of the stacked tensors `grads`, in place) by its own
    min(1, max_norm / (|g_k| + 1e-6)), as one trial's clipping does (none for max_norm <= 0); returns the K norms
    before clipping. Uncompiled and without a host sync: `trial_norms`, then one division a tensor by the K
    factors. (Compiled, as until session 29, it was a second graph for every group to compile: 66.7 s for
    lf_sweep's autoencoders on an H100, benchmarks/clip_trials.py.)"""
    norms = trial_norms(grads, k)
    if max_norm > 0 and grads:
        div = ((norms + 1e-6) / max_norm).clamp_min(1.0)
        shaped: dict[int, Tensor] = {}  # the factors as (K, 1, ...) for tensors of each number of dimensions
        for g in grads:
            if g.dim() not in shaped:
                shaped[g.dim()] = div.view(-1, *[1] * (g.dim() - 1))
            g.div_(shaped[g.dim()])
    return norms
