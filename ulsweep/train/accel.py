"""Speed-ups that lean on torch internals, gathered in one place.

- Inductor's reduction heuristic (`ShortRowsInOnePass`, through its `InductorChoices` hook), below.
- torch.compile's CUDA-graph state for threads other than the importing one (`cuda_graph_state_for_this_thread`).
- Gradient clipping folded into fused AdamW through its `grad_scale` attribute (`clip_gradients`).
- How a compiled step meets DDP's gradient buckets (`set_ddp_graph_splitting`).

Inductor's reduction heuristic:

Inductor compiles a reduction over rows into a one-pass ("persistent") kernel that holds a row in registers
when the row is short enough: up to 1,024 elements when it can show that the rows lie contiguously in
memory, up to 64 otherwise; longer rows get a loop that reads its input twice (once for the statistic, once
to normalize). The QK-RMSNorm reads q and k as strided slices of the fused QKV projection, so Inductor cannot
show contiguity: with heads of 64 channels its forward is one pass, with heads of 128 it was two, at 2.0-2.4x
the GPU time (H200, `benchmarks/block.py --kernels`). `ShortRowsInOnePass` keeps every row of up to
`ONE_PASS_MAX_ROW` elements in one pass, whatever its layout.
"""
from __future__ import annotations

import functools

# Rows of up to this many elements are reduced in one pass (0: Inductor's own rule). Read when a module is
# compiled; `benchmarks/train_step.py --one-pass-rows` measures settings side by side.
ONE_PASS_MAX_ROW = 128


def one_pass(short_row: bool, inductor_says: bool, persistent_enabled: bool, cooperative: bool) -> bool:
    """Whether a reduction runs in one pass: where Inductor says so, and for short rows unless one-pass
    kernels are switched off (`triton.persistent_reductions`) or the reduction is cooperative (a row split
    over several blocks)."""
    return inductor_says or (short_row and persistent_enabled and not cooperative)


@functools.cache
def choices_class() -> type:
    """ulsweep's `InductorChoices`: Inductor's heuristics but for one-pass short rows (its `max_row` is
    ONE_PASS_MAX_ROW when an instance is made)."""
    from torch._inductor import config
    from torch._inductor.choices import InductorChoices
    from torch._inductor.virtualized import V

    class ShortRowsInOnePass(InductorChoices):
        def __init__(self):
            super().__init__()
            self.max_row = ONE_PASS_MAX_ROW

        def should_use_persistent_reduction(self, features, cooperative_reduction: bool) -> bool:
            says = super().should_use_persistent_reduction(features, cooperative_reduction)
            short = V.graph.sizevars.statically_known_leq(features.reduction_numel, self.max_row)
            return one_pass(short, says, config.triton.persistent_reductions, cooperative_reduction)

        def uuid(self) -> str:  # the FX graph cache's key, in torch versions that ask for it
            return f"ulsweep-one-pass-rows-{self.max_row}"

    # a module attribute (see __getattr__), so that Inductor can pickle its config for the cache key
    ShortRowsInOnePass.__qualname__, ShortRowsInOnePass.__module__ = "ShortRowsInOnePass", __name__
    return ShortRowsInOnePass


def __getattr__(name: str):
    if name == "ShortRowsInOnePass":  # built on first use: importing Inductor takes ~2 s
        return choices_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def install_choices() -> None:
    """Make the next compiles in this thread (and, where torch has `inductor_choices_class`, in this process)
    follow ONE_PASS_MAX_ROW. Called by `compile_module`. Only Inductor's Triton (GPU) kernels ask."""
    from torch._inductor import config
    from torch._inductor.choices import InductorChoices
    from torch._inductor.virtualized import V

    ours = choices_class()
    if ONE_PASS_MAX_ROW > 0:
        if hasattr(config, "inductor_choices_class"):  # every thread, and part of the graph cache's key
            config.inductor_choices_class = ours
        V.set_choices_handler(ours())  # this thread, from now on
        return
    # Inductor's own rule again; heuristics that someone else installed stay
    if getattr(config, "inductor_choices_class", None) is ours:
        config.inductor_choices_class = None
    if isinstance(V.choices, ours):
        V.set_choices_handler(InductorChoices())


def cuda_graph_state_for_this_thread() -> None:
    """Give this thread torch.compile's CUDA-graph-tree state. torch 2.11 sets it up only in the thread that
    imported torch._inductor.cudagraph_trees and fails with an AssertionError in any other (a reused Tune
    actor runs each trial in a new thread); later versions do the same set-up lazily, as here."""
    import collections
    import threading

    import torch
    from torch._inductor import cudagraph_trees as cgt

    if hasattr(cgt.local, "tree_manager_containers") or torch._C._is_key_in_tls("tree_manager_containers"):
        return
    cgt.local.tree_manager_containers = {}
    cgt.local.tree_manager_locks = collections.defaultdict(threading.Lock)
    # stashed so that autograd's backward threads, which copy this thread's TLS, find the same state
    torch._C._stash_obj_in_tls("tree_manager_containers", cgt.local.tree_manager_containers)
    torch._C._stash_obj_in_tls("tree_manager_locks", cgt.local.tree_manager_locks)


def clip_gradients(opt, max_norm: float):
    """Scale the gradients of `opt`'s parameters by min(1, max_norm / (|g| + 1e-6)) (as clip_grad_norm_; no
    clipping for max_norm <= 0) and return the total norm |g| before clipping. A fused optimizer takes the
    factor as its `grad_scale` divisor (the attribute GradScaler sets), which folds it into the AdamW kernel:
    for the 347M-parameter base model on an H200 the 0.8-ms pass over the gradients goes and AdamW takes 0.5 ms
    longer."""
    import torch

    grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
    gnorm = torch.nn.utils.get_total_norm(grads)
    if max_norm <= 0:
        return gnorm
    divisor = ((gnorm + 1e-6) / max_norm).clamp_min(1.0)
    if opt.defaults.get("fused"):
        opt.grad_scale = divisor.to(torch.float32)
    else:
        torch._foreach_div_(grads, divisor)
    return gnorm


# How a compiled step meets DDP's gradient buckets (torch._dynamo.config.optimize_ddp): "no_optimization"
# compiles the forward and the backward as one graph each and all-reduces the gradients after the backward;
# "ddp_optimizer" splits the graph at every 25-MB bucket so that all-reduce overlaps the backward, at the price
# of fusion across the splits (paper base model, 2 x H200: 91.7% vs 87.6% scaling; benchmarks/README.md).
DDP_COMPILE = "no_optimization"


def set_ddp_graph_splitting(mode: str | None = None) -> None:
    import torch

    torch._dynamo.config.optimize_ddp = mode or DDP_COMPILE
