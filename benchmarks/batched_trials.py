"""Issue 23's last lever, measured before anything is built: N small trials of one stage trained as one batched
program, against one trial's own step, side by side in one process.

    python benchmarks/batched_trials.py --preset small --image-size 32 --channels 1 --batch 128 \
        --trials 6 18 --modes eager reduce-overhead --programs stacked --out benchmarks/results/h200-batched-trials.json
    python benchmarks/batched_trials.py --stage base --batch 256 ...   # the base models (stage 2) alike

A sweep's autoencoders share one architecture: loss factor and sigmoid bias are 0-d buffers of `AEObjective`,
and everything else that differs between trials (weights, optimizer state, data order, noise) is per-trial
state; its base models share theirs too (`BaseObjective`, the same bias and schedule, each trial its own
latents). So N trials can take their optimizer steps as one program, in one of two ways (`--programs`):
- `stacked` (`ulsweep/models/stacked.py`): one network whose every layer holds the N trials' weights stacked,
  fed the N batches one after another on the batch dimension (a linear layer becomes one batched matmul, a
  convolution one grouped convolution); it compiles as an ordinary graph, with the fused attention kernels;
- `vmap`: `torch.func.stack_module_state` stacks the weights and buffers along a new leading dimension, and
  `vmap(grad(loss))` computes every trial's gradient in one pass.
Either way AdamW, whose update is elementwise, steps the stacked tensors as N independent optimizers would. What
is not elementwise is done per trial: the gradient clipping (each trial's own global norm; for `stacked`
compiled with the step in the compiled modes) and the EMA (elementwise too, with the shared step-dependent
decay). One batched step costs one trial's launch overhead for N trials' arithmetic.

Rows, per `--modes` (the library's `train.compile` values), each with its first step's seconds (compilation and
CUDA-graph capture included; the compile caches are reset between rows) and, on a GPU, its peak memory:
- `one trial`: the library's own step of one trial (`benchmarks/train_step.py`'s `step_stage1` / `step_stage2`:
  the objective compiled by `compile_module`, `TrainState.optimizer_step`), images (latents) per second;
- `stacked N` / `vmap N`: N trials' steps as one program (compiled whole with `torch.compile` in that mode, under
  the library's autocast), aggregate images/s over the N trials, and its ratio to the `one trial` row of the same
  mode. Session 17's rows were named `batched N`: the vmapped program, then without autocast (fp32).
`--check-steps K` (default 3) first trains N trials both ways from the same initial weights, data and noise, with
dropout off (the programs draw other dropout masks than the loop does), for each program, and reports the
largest relative difference of the first step's gradients and of the weights after K steps: the batched program
must be the same N trials. Each row lists the operators vmap had no batching rule for (`vmap_fallback_ops`: it
loops over the trials there; on CPU the attention).
Prints a table and writes JSON (after every row). Absolute numbers are only meaningful on a GPU (compare
`packing.py`'s rows of N processes per GPU, with and without MPS).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import os
import re
import sys
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, ".."))

from timing import run_env, sync, write_results  # noqa: E402
from train_step import (MODES, STAGES, add_model_args, bench_experiment, latent_shape, profile_step,  # noqa: E402
                        set_dropout)

from ulsweep.models.stacked import clip_trials  # noqa: E402
from ulsweep.train.build import base_schedule, build_autoencoder, build_base_model  # noqa: E402
from ulsweep.train.runtime import make_runtime  # noqa: E402
from ulsweep.train.stage1 import AEObjective  # noqa: E402
from ulsweep.train.stage2 import BaseObjective  # noqa: E402
from ulsweep.train.state import EMA, lr_at  # noqa: E402

# loss factors and biases the stacked trials get in turn (lf_sweep's grid): every trial trains another objective
LOSS_FACTORS = (1.5, 1.75, 2.0, 3.0, 4.0)
BIASES = (-2.0, 0.0, 2.0)


def trial_objectives(exp, stage: str, n: int, channels: int, device: torch.device, dropout: float | None = None):
    """n objectives of one architecture, each with its own initial weights (stage 1: and its own loss factor
    and bias)."""
    s, out = exp.data.image_size, []
    for i in range(n):
        torch.manual_seed(i)
        if stage == "ae":
            ae = set_dropout(build_autoencoder(exp.ae, channels), dropout).to(device)
            obj = AEObjective(ae, exp.ae.loss, (channels, s, s), latent_shape(exp))
            obj.loss_factor.fill_(LOSS_FACTORS[i % len(LOSS_FACTORS)])
            obj.sigmoid_bias.fill_(BIASES[(i // len(LOSS_FACTORS)) % len(BIASES)])
        else:
            bc = exp.base_models[0]
            net = set_dropout(build_base_model(bc, latent_shape(exp)[0]), dropout).to(device)
            obj = BaseObjective(net, base_schedule(exp.ae.loss, bc), bc.loss.sigmoid_bias, latent_shape(exp))
        out.append(obj)
    return out


def input_shape(exp, stage: str, channels: int) -> tuple[int, ...]:
    """One training example: an image (stage 1) or a latent (stage 2)."""
    s = exp.data.image_size
    return (channels, s, s) if stage == "ae" else latent_shape(exp)


def optim_of(exp, stage: str):
    return exp.ae.optim if stage == "ae" else exp.base_models[0].optim


class BatchedTrials:
    """N trials of one architecture as one program (see the module docstring): stacked weights and buffers,
    their gradients from one vmapped call, one AdamW over the stacked tensors, per-trial clipping and EMA."""

    def __init__(self, objectives: list[torch.nn.Module], optim, rt, compile_mode: str | bool = False,
                 attention: str = "library"):
        from torch.func import functional_call, grad, stack_module_state, vmap
        from torch.nn.attention import SDPBackend, sdpa_kernel

        self.oc, self.rt, self.step_count = optim, rt, 0
        params, self.buffers = stack_module_state(objectives)
        self.params = {k: v.detach() for k, v in params.items()}  # leaves the optimizer steps
        self.dims = objectives[0].dims
        template = copy.deepcopy(objectives[0]).to("meta")

        # "math": attention as matmuls and softmax, which vmap batches; the fused kernels' backwards have no
        # batching rule on the GPU (session 17: vmap ran the efficient-attention backward one trial at a time)
        self.attention = attention
        pick = (lambda: sdpa_kernel(SDPBackend.MATH)) if attention == "math" else contextlib.nullcontext

        def loss(p, b, x, noise):  # one trial's loss, per pixel as TrainState's callers scale it
            with pick():
                return functional_call(template, (p, b), (x, noise))["total"].mean() / self.dims

        grads = vmap(grad(loss), randomness="different")
        self.grads = torch.compile(grads, mode=compile_mode) if compile_mode else grads
        self.opt = torch.optim.AdamW(list(self.params.values()), lr=optim.lr, betas=optim.betas,
                                     weight_decay=optim.weight_decay, foreach=True)
        self.ema = EMA(torch.nn.Module(), optim.ema_std)  # its decay() only; the shadow is the stacked copy below
        self.shadow = {k: v.clone() for k, v in self.params.items()}

    def gradients(self, x: torch.Tensor, noise: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every trial's gradient, stacked (N, ...), by name; no step."""
        with torch.enable_grad(), self.rt.autocast():
            return self.grads(self.params, self.buffers, x, noise)

    @torch.no_grad()
    def step(self, x: torch.Tensor, noise: dict[str, torch.Tensor]) -> torch.Tensor:
        """One optimizer step of every trial: x (N, B, ...) images or latents, noise entries (N, B, ...); returns
        the N gradient norms before clipping."""
        with torch.enable_grad(), self.rt.autocast():
            g = self.grads(self.params, self.buffers, x, noise)
        grads = [g[k] for k in self.params]
        norms = torch.stack([t.float().pow(2).flatten(1).sum(1) for t in grads]).sum(0).sqrt()  # (N,)
        if self.oc.grad_clip > 0:  # each trial's own min(1, max_norm / (|g| + 1e-6)), as clip_gradients
            div = ((norms + 1e-6) / self.oc.grad_clip).clamp_min(1.0)
            grads = [t / div.view(-1, *[1] * (t.dim() - 1)) for t in grads]
        for p, t in zip(self.params.values(), grads):
            p.grad = t
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step_count, self.oc)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.step_count += 1
        keys = list(self.params)
        torch._foreach_lerp_([self.shadow[k] for k in keys], [self.params[k] for k in keys],
                             1.0 - self.ema.decay(self.step_count))
        return norms


class StackedTrials:
    """N trials of one architecture as one network (`ulsweep.models.stacked.stack`: every layer's weights
    stacked, the trials' batches one after another on the batch dimension), compiled like one trial's objective
    by the library's `compile_module`; the library's fused AdamW and EMA over the stacked tensors (its
    `TrainState.apply_gradients`: elementwise, so N trials' own), after each trial's own clipping (`clip_trials`)."""

    def __init__(self, objectives: list[torch.nn.Module], optim, rt, compile_mode: str | bool = False,
                 attention: str = "library", regions: str = "whole"):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from ulsweep.models.stacked import stack
        from ulsweep.train.runtime import compile_module
        from ulsweep.train.state import TrainState

        self.n, self.oc, self.rt = len(objectives), optim, rt
        # "math": attention as matmuls and softmax, which Inductor fuses, in place of the fused kernels SDPA picks
        # (on the GPU cuDNN's flash kernels, slow on the base model's sequences of 16 and 64 tokens?)
        self.pick = (lambda: sdpa_kernel(SDPBackend.MATH)) if attention == "math" else contextlib.nullcontext
        self.net = stack(objectives, STACK_CONV[0])
        self.dims = objectives[0].dims
        if compile_mode and regions == "blocks":
            self.model, self.regions = self.net, compile_blocks(self.net, compile_mode, rt)
        else:
            self.model = compile_module(self.net, compile_mode, rt)
        self.ts = TrainState(self.net, optim, rt, seed=0)  # the library's AdamW and EMA over the stacked tensors

    def backward(self, x: torch.Tensor, noise: dict[str, torch.Tensor]) -> None:
        """The sum of the N trials' losses backwards: trial k's gradient is its own loss's (no shared weight)."""
        with self.rt.autocast(), self.pick():
            losses = self.model(x.flatten(0, 1), {k: v.flatten(0, 1) for k, v in noise.items()})["total"]
        (losses.view(self.n, -1).mean(1).sum() / self.dims).backward()

    def gradients(self, x: torch.Tensor, noise: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every trial's gradient, stacked (N, ...), by name; no step."""
        self.backward(x, noise)
        out = {k: p.grad.clone() for k, p in self.net.named_parameters()}
        self.ts.opt.zero_grad(set_to_none=True)
        return out

    def step(self, x: torch.Tensor, noise: dict[str, torch.Tensor]) -> torch.Tensor:
        """One optimizer step of every trial: x (N, B, ...), noise entries (N, B, ...); returns the N gradient
        norms before clipping."""
        self.backward(x, noise)
        norms = clip_trials([p.grad for p in self.net.parameters()], self.n, self.oc.grad_clip)  # the library's
        self.ts.apply_gradients()
        return norms

    @property
    def params(self) -> dict[str, torch.Tensor]:  # stacked (N, ...), under the trials' own names
        return {k: v.detach() for k, v in self.net.named_parameters()}


def compile_blocks(net: torch.nn.Module, setting, rt) -> int:
    """Regional compilation (`--regions blocks`): every transformer and residual block of `net` compiled on its
    own (`nn.Module.compile`, in place), the rest of the step eager. Blocks of one configuration are one graph
    to Dynamo (their parameters are its inputs), so each distinct block compiles once, where the whole step's
    graph holds every block's copy; the compile then scales with the distinct blocks, not all of them. Returns
    how many blocks it compiled."""
    from ulsweep.models.layers import ResBlock, TransformerBlock
    from ulsweep.train.runtime import compile_mode

    mode = compile_mode(setting, rt)
    blocks = [m for m in net.modules() if isinstance(m, (TransformerBlock, ResBlock))]
    # one code object (the block's forward) meets every distinct block shape: more than Dynamo's default 8
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 4 * len(blocks))
    for m in blocks:
        m.compile(mode=mode, dynamic=False)
    return len(blocks)


def unfold_conv_forward(self, x: torch.Tensor) -> torch.Tensor:
    """`StackedConv2d.forward` as im2col and one batched matmul over the K trials, in place of the grouped
    convolution (`--conv unfold`): (K*B, C, H, W) -> (K*B, out, H', W')."""
    import torch.nn.functional as F

    if self.groups != 1:
        raise ValueError("--conv unfold takes convolutions of one group")
    kh, kw = self.weight.shape[-2:]
    h, w = x.shape[-2:]
    ho = (h + 2 * self.padding[0] - self.dilation[0] * (kh - 1) - 1) // self.stride[0] + 1
    wo = (w + 2 * self.padding[1] - self.dilation[1] * (kw - 1) - 1) // self.stride[1] + 1
    cols = F.unfold(x, (kh, kw), dilation=self.dilation, padding=self.padding, stride=self.stride)  # (K*B, C*kh*kw, L)
    cols = cols.unflatten(0, (self.k, -1)).transpose(2, 3)  # (K, B, L, C*kh*kw)
    wt = self.weight.flatten(2).transpose(1, 2)  # (K, C*kh*kw, out)
    y = torch.bmm(cols.flatten(1, 2), wt)  # (K, B*L, out)
    if self.bias is not None:
        y = y + self.bias.unsqueeze(1)
    return y.unflatten(1, (-1, ho, wo)).permute(0, 1, 4, 2, 3).flatten(0, 1)


def channels_last_conv_forward(self, x: torch.Tensor) -> torch.Tensor:
    """`StackedConv2d.forward` with the grouped convolution's input in channels-last memory (`--conv
    channels-last`): cuDNN's NHWC kernels for grouped convolutions."""
    import torch.nn.functional as F

    xg = _trials_first(x, self.k).contiguous(memory_format=torch.channels_last)
    bias = None if self.bias is None else self.bias.flatten()
    y = F.conv2d(xg, self.weight.flatten(0, 1), bias, self.stride, self.padding, self.dilation, self.groups * self.k)
    return y.unflatten(1, (self.k, self.out_channels)).transpose(0, 1).flatten(0, 1)


def nhwc_conv_forward(self, x: torch.Tensor) -> torch.Tensor:
    """`StackedConv2d.forward` with the grouped convolution's input and weight in channels-last memory made by
    the one copy the library's transpose makes anyway (`--conv nhwc`): the K trials' channels side by side in
    each pixel, (B, H, W, K, C) in memory, which is (B, K*C, H, W) channels-last as a view; cuDNN's grouped
    kernels run on NHWC, which it otherwise converts to and from at every call."""
    import torch.nn.functional as F

    k = self.k
    xg = x.unflatten(0, (k, -1)).permute(1, 3, 4, 0, 2).contiguous()  # (B, H, W, K, C), the one copy
    xg = xg.permute(0, 3, 4, 1, 2).flatten(1, 2)  # (B, K*C, H, W), channels-last strides: a view
    w = self.weight.flatten(0, 1).contiguous(memory_format=torch.channels_last)
    bias = None if self.bias is None else self.bias.flatten()
    y = F.conv2d(xg, w, bias, self.stride, self.padding, self.dilation, self.groups * k)  # (B, K*out, H', W')
    return y.unflatten(1, (k, self.out_channels)).transpose(0, 1).reshape(-1, self.out_channels, *y.shape[-2:])


def _trials_first(x: torch.Tensor, k: int) -> torch.Tensor:
    return x.unflatten(0, (k, -1)).transpose(0, 1).flatten(1, 2)  # (K*B, C, H, W) -> (B, K*C, H, W)


# grouped and loop: the library's own (resources.stack_conv); the others replace StackedConv2d.forward
CONVS = {"grouped": None, "loop": None, "unfold": unfold_conv_forward, "channels-last": channels_last_conv_forward,
         "nhwc": nhwc_conv_forward}
STACK_CONV = ["grouped"]  # the library's way for the stacked programs built now (`stacked_conv`)


@contextlib.contextmanager
def stacked_conv(kind: str):
    """The stacked programs built while the block runs with their convolutions as the `--conv` variant: the library's
    grouped or loop (resources.stack_conv), or StackedConv2d's forward replaced by one of the others."""
    from ulsweep.models.stacked import StackedConv2d

    original, library = StackedConv2d.forward, STACK_CONV[0]
    if CONVS[kind] is not None:
        StackedConv2d.forward = CONVS[kind]
    else:
        STACK_CONV[0] = kind
    try:
        yield
    finally:
        StackedConv2d.forward, STACK_CONV[0] = original, library


def profile_summary(prof: dict, top: int = 8) -> str:
    kinds = ", ".join(f"{k} {v:.0%}" for k, v in prof["by_kind_frac_of_gpu"].items())
    kernels = "\n".join(f"      {v:7.2f} ms  {k}" for k, v in list(prof["top_kernels_ms"].items())[:top])
    return f"    GPU busy {prof['gpu_busy_frac']:.0%} of the profiled wall; by kind: {kinds}\n{kernels}"


def make_program(kind: str, objectives: list[torch.nn.Module], optim, rt, compile_mode: str | bool = False,
                 attention: str = "library", regions: str = "whole"):
    """The N trials as one program: "vmap" (BatchedTrials) or "stacked" (StackedTrials, compiled whole or by
    `regions`), both under the runtime's autocast as the library's step."""
    if kind == "stacked":
        return StackedTrials(objectives, optim, rt, compile_mode, attention, regions)
    return BatchedTrials(objectives, optim, rt, compile_mode, attention)


def stacked_noise(objective, n: int, batch: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One draw of n trials' noise, (n, batch, ...) each: the Gaussian noise in one call, and each trial's
    diffusion times (`t`, `t_*`) stratified over its own batch as `low_discrepancy_times` does for one trial,
    t_i = (u + i / B) mod 1 with the trial's own u (split from one stratified draw of n * B, a trial would see
    only a 1/n slice of the times)."""
    flat = objective.draw_noise(n * batch, gen)
    out = {k: v.view(n, batch, *v.shape[1:]) for k, v in flat.items()}
    for k in [k for k in out if k == "t" or k.startswith("t_")]:
        u = torch.rand(n, 1, generator=gen, device=gen.device)
        out[k] = torch.remainder(u + torch.arange(batch, device=gen.device) / batch, 1.0)
    return out


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def check(exp, stage: str, n: int, batch: int, channels: int, steps: int, device: torch.device,
          attention: str = "library", program: str = "vmap") -> dict:
    """The batched program (`program`: "vmap" or "stacked", uncompiled, in fp32) against n trials stepped one by one with the library's TrainState, from the same
    weights, data and noise (dropout off): the largest relative differences of the first step's gradients and
    of the weights after `steps` steps (each relative to that tensor's largest magnitude), and the tensors that
    have them. TF32 is off while it runs: its 1e-3 rounding would move both programs' gradients apart and flip
    AdamW's first, sign-like steps in weights that are still near zero (0.33 on an H200 with TF32 on; zero-
    initialised output convolutions are all such weights). The runtime is made first: `make_runtime` turns TF32
    on for CUDA, and until session 21 it did so inside the check (1.01 on an H200)."""
    rt = dataclasses.replace(make_runtime(exp.ae.train), amp_dtype=None)  # fp32, as the trials stepped below
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        return _check(exp, rt, stage, n, batch, channels, steps, device, attention, program)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _check(exp, rt, stage: str, n: int, batch: int, channels: int, steps: int, device: torch.device,
           attention: str, program: str) -> dict:
    from ulsweep.train.state import TrainState

    objs = trial_objectives(exp, stage, n, channels, device, dropout=0.0)
    oc = optim_of(exp, stage)
    batched = make_program(program, copy.deepcopy(objs), oc, rt, attention=attention)
    states = [TrainState(o, oc, rt, seed=0) for o in objs]  # an objective's parameters are its network's
    gen = torch.Generator(device).manual_seed(1)
    grad_err = weight_err = -1.0  # below any difference, so that the worst tensors are always named
    grad_at = weight_at = ""
    for k in range(steps):
        x = torch.rand(n, batch, *input_shape(exp, stage, channels), generator=gen, device=device) * 2 - 1
        noise = stacked_noise(objs[0], n, batch, gen)
        if k == 0:
            g = batched.gradients(x, noise)
        batched.step(x, noise)
        for i, (o, ts) in enumerate(zip(objs, states)):
            loss = o(x[i], {key: v[i] for key, v in noise.items()})["total"].mean() / o.dims
            if k == 0:
                loss.backward(retain_graph=True)
                for name, p in o.named_parameters():
                    if (d := rel_diff(g[name][i], p.grad)) > grad_err:
                        grad_err, grad_at = d, name
                o.zero_grad(set_to_none=True)
            ts.optimizer_step(loss)
    for i, o in enumerate(objs):
        for name, p in o.named_parameters():
            if (d := rel_diff(batched.params[name][i], p.detach())) > weight_err:
                weight_err, weight_at = d, name
    return {"program": program, "stage": stage, "trials": n, "steps": steps, "max_rel_grad_diff": grad_err, "grad_tensor": grad_at,
            "max_rel_weight_diff": weight_err, "weight_tensor": weight_at}


def fallback_ops(caught) -> list[str]:
    """The operators vmap had no batching rule for (it then loops over the trials), from its warnings."""
    ops = {m.group(1) for w in caught if (m := re.search(r"batching rule for (\w+::\w+)", str(w.message)))}
    return sorted(ops)


def time_steps(step, device: torch.device, seconds: float, warmup: int) -> tuple[float, int, float]:
    """(seconds, steps) of a timed window of at least `seconds` after `warmup` untimed steps, and how long the
    first of those took (compilation and CUDA-graph capture included)."""
    t0 = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    sync(device)
    t0, k = time.perf_counter(), 0
    while True:
        step()
        k += 1
        if k % 5 == 0:
            sync(device)
            if time.perf_counter() - t0 >= seconds:
                return time.perf_counter() - t0, k, first


def batched_step(exp, stage: str, n: int, batch: int, channels: int, mode: str, device: torch.device,
                 attention: str = "library", program: str = "vmap", regions: str = "whole", search: bool = True):
    """The step of `n` trials as one `program`; `search`: cuDNN's timed algorithm search (the runtime's
    train.cudnn_benchmark, on in the trials) or, off, its heuristics."""
    objs = trial_objectives(exp, stage, n, channels, device)
    rt = make_runtime(exp.ae.train)
    torch.backends.cudnn.benchmark = search and torch.backends.cudnn.benchmark
    bt = make_program(program, objs, optim_of(exp, stage), rt, MODES[mode], attention, regions)
    gen = torch.Generator(device).manual_seed(0)
    x = torch.rand(n, batch, *input_shape(exp, stage, channels), generator=gen, device=device) * 2 - 1

    def step():
        bt.step(x, stacked_noise(objs[0], n, batch, gen))

    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--stage", default="ae", choices=["ae", "base"], help="autoencoders (stage 1) or base models")
    p.add_argument("--batch", type=int, default=128, help="images (latents) per trial and step")
    p.add_argument("--trials", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--modes", nargs="+", default=["eager"], choices=list(MODES))
    p.add_argument("--seconds", type=float, default=10.0, help="timed window per row")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--check-steps", type=int, default=3, help="0 skips the check")
    p.add_argument("--check-trials", type=int, default=2)
    p.add_argument("--check-batch", type=int, default=8)
    p.add_argument("--programs", nargs="+", default=["stacked", "vmap"], choices=["stacked", "vmap"],
                   help="how N trials become one program: stacked layers (ulsweep.models.stacked) or torch.func.vmap")
    p.add_argument("--conv", nargs="+", default=["grouped"], choices=list(CONVS),
                   help="stacked rows: the stacked convolutions as the library's grouped convolution, as im2col + "
                        "one batched matmul (unfold), grouped on channels-last input (channels-last), grouped on "
                        "the channels-last layout the transpose's one copy makes (nhwc), or one ordinary "
                        "convolution per trial on its own rows (loop); one row each")
    p.add_argument("--cudnn-search", nargs="+", default=["on"], choices=["on", "off"],
                   help="stacked rows with cuDNN's timed algorithm search (train.cudnn_benchmark, on in the trials) "
                        "and/or with its heuristics (off: a compiled row's graph comes from the first row's caches, "
                        "its first step then shows what the search costs); one row each")
    p.add_argument("--regions", nargs="+", default=["whole"], choices=["whole", "blocks"],
                   help="compiled stacked rows: the whole step as one graph (the library's), or each transformer "
                        "and residual block compiled on its own, the rest eager (regional compilation: each "
                        "distinct block compiles once); one row each, with its first step's seconds")
    p.add_argument("--no-baseline", action="store_true", help="leave out the `one trial` rows (their compilation "
                   "time), and with them the ratios")
    p.add_argument("--profile", action="store_true", help="after each row's timed window, a GPU-time breakdown "
                   "of 5 steps by kernel kind (use compile mode `default`: CUDA graphs hide their kernels)")
    p.add_argument("--attention", default="library", choices=["library", "math"],
                   help="the batched programs' attention: the library's (SDPA picks a fused kernel) or SDPA's math "
                        "backend (matmuls and softmax: vmap batches them, Inductor fuses them)")
    a = p.parse_args(argv)
    exp = bench_experiment(a)
    device = make_runtime(exp.ae.train).device
    rows, checked = [], {}
    for program in a.programs if a.check_steps else []:
        c = checked[program] = check(exp, a.stage, a.check_trials, a.check_batch, a.channels, a.check_steps, device,
                                     a.attention, program)
        print(f"check of {program}: {c['trials']} trials, {c['steps']} steps: gradients within "
              f"{c['max_rel_grad_diff']:.2e} ({c['grad_tensor']}), weights within {c['max_rel_weight_diff']:.2e} "
              f"({c['weight_tensor']}; relative to each tensor's largest magnitude, TF32 off)")
    env = run_env(a) | {"check": checked}
    print(f"{'mode':>16} {'program':>11} {'images/s':>10} {'per trial':>10} {'vs one':>7} {'ms/step':>8} "
          f"{'1st step':>8}")
    for mode in a.modes:
        base = None
        variants = [] if a.no_baseline else [
            ("one trial", 1, "grouped", "whole", "on", lambda: STAGES[a.stage](exp, a.batch, mode, a.channels)[0])]
        convs = a.conv if a.stage == "ae" else ["grouped"]  # the base model has no convolution
        regions = a.regions if mode != "eager" else ["whole"]
        variants += [(f"{program} {n}" + (f" {conv}" if conv != "grouped" else "")
                      + (f" {region}" if region != "whole" else "") + ("" if search == "on" else " no-search"),
                      n, conv, region, search,
                      lambda n=n, program=program, region=region, search=search: batched_step(
                          exp, a.stage, n, a.batch, a.channels, mode, device, a.attention, program, region,
                          search == "on"))
                     for program in a.programs for n in a.trials
                     for conv in (convs if program == "stacked" else ["grouped"])
                     for region in (regions if program == "stacked" else ["whole"])
                     for search in (a.cudnn_search if program == "stacked" else ["on"])]
        for name, n, conv, region, search, build in variants:
            row = {"stage": a.stage, "mode": mode, "program": name, "trials": n, "batch_per_trial": a.batch,
                   "attention": a.attention if name != "one trial" else "library", "conv": conv, "regions": region,
                   "cudnn_search": search}
            try:
                with warnings.catch_warnings(record=True) as caught, stacked_conv(conv):
                    warnings.simplefilter("always")
                    # a fresh compile per row: Dynamo caches per code object, and the stacked objective's forward,
                    # met again at another batch size, would otherwise be recompiled with dynamic shapes
                    torch.compiler.reset()
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats(device)
                    step = build()
                    secs, k, first = time_steps(step, device, a.seconds, a.warmup)
                    if a.profile:
                        row["profile"] = profile_step(step, device)
            except Exception as e:  # noqa: BLE001 - a mode that does not compile is a row, not the end
                row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                print(f"{mode:>16} {name:>11}  failed: {row['error'][:100]}")
                rows.append(row)
                write_results(a.out, env, rows)
                continue
            row["vmap_fallback_ops"] = fallback_ops(caught)
            ips = n * a.batch * k / secs
            base = ips if name == "one trial" else base
            row |= {"images_per_s": ips, "per_trial_images_per_s": ips / n, "ms_per_step": 1000 * secs / k,
                    "ratio_to_one_trial": ips / base if base else None, "first_step_s": first,
                    "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}
            rows.append(row)
            write_results(a.out, env, rows)  # row by row: a call's time limit keeps what was measured
            ratio = f"{row['ratio_to_one_trial']:.2f}x" if base else "n/a"
            print(f"{mode:>16} {name:>11} {ips:>10.0f} {ips / n:>10.0f} {ratio:>7} {1000 * secs / k:>8.1f} "
                  f"{first:>7.1f}s"
                  + (f"  vmap ran one trial at a time: {', '.join(row['vmap_fallback_ops'])}"
                     if row["vmap_fallback_ops"] else ""))
            if "profile" in row:
                print(profile_summary(row["profile"]))
    write_results(a.out, env, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
