"""One change to Inductor's kernel heuristics, made through its hook for them (`InductorChoices`).

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
