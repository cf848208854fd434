"""Speed-ups that lean on torch internals, gathered in one place, each with a checked fallback.

Each feature, the private API it uses, its probe, and the plain path it falls back to:

- One-pass rows (`install_choices`): Inductor's heuristics hook (`torch._inductor.choices.InductorChoices`,
  `V.set_choices_handler`, `config.inductor_choices_class`). Probe: the imports, `set_choices_handler`,
  `SizeVarAllocator.statically_known_leq`, `config.triton.persistent_reductions`, and
  `InductorChoices.should_use_persistent_reduction(features, cooperative_reduction)`; at compile time, that
  the kernel features have what the heuristic reads. Plain path: Inductor's own heuristics.
- CUDA-graph state for new threads (`cuda_graph_state_for_this_thread`): `torch._inductor.cudagraph_trees.local`
  and `torch._C._stash_obj_in_tls` / `_is_key_in_tls` / `_get_obj_in_tls`. Probe: the module, its thread-local
  and the three functions; after the set-up, that the TLS stash returns the state. Plain path: compile mode
  "default" instead of "reduce-overhead" in a thread without that state (`runtime.compile_mode`).
- Clipping in fused AdamW (`clip_gradients`): the optimizer's `grad_scale` attribute (GradScaler's). Probe, once
  per optimizer class and device type: a fused step of a 1-element optimizer with gradient 4 and grad_scale 2
  must equal one with gradient 2. Plain path: the gradients divided in place (`torch._foreach_div_`), the
  arithmetic of clip_grad_norm_.
- DDP graph splitting (`set_ddp_graph_splitting`): `torch._dynamo.config.optimize_ddp`. Probe: the setting
  exists and `torch._dynamo.utils.get_optimize_ddp_mode` reads the mode back. Plain path: Dynamo's setting
  left as it is.

A failed probe falls back with one `AccelFallbackWarning` (a RuntimeWarning) per feature and process, saying
what is missing and what runs instead; `fallbacks()` lists them. warnings rather than logging: a warning reaches
stderr in Ray workers without any logging set-up, tests can catch it, and `-W error::...AccelFallbackWarning`
turns a fallback into a failure where one must not happen. Probes run once per process (per optimizer class
and device type for clipping), on first use.

Settings are arguments with the library's values as defaults (`ONE_PASS_MAX_ROW`, `OPTIMIZE_DDP`, both read
by `runtime.compile_module`'s signature); the benchmarks pass others to measure them side by side.

Inductor's reduction heuristic: Inductor compiles a reduction over rows into a one-pass ("persistent") kernel
that holds a row in registers when the row is short enough: up to 1,024 elements when it can show that the
rows lie contiguously in memory, up to 64 otherwise; longer rows get a loop that reads its input twice (once
for the statistic, once to normalize). The QK-RMSNorm reads q and k as strided slices of the fused QKV
projection, so Inductor cannot show contiguity: with heads of 128 channels its rule gives the norm's forward
two passes, at 2.0-2.4x the GPU time of one (H200, `benchmarks/block.py --kernels`). `ShortRowsInOnePass`
keeps every row of up to `max_row` elements in one pass, whatever its layout.
"""
from __future__ import annotations

import functools
import inspect
import re
import threading
import warnings
from typing import Final

# Rows of up to this many elements are reduced in one pass (0: Inductor's own rule).
ONE_PASS_MAX_ROW: Final = 128
# torch._dynamo.config.optimize_ddp for compiled steps under DDP: "no_optimization" compiles the forward and
# the backward as one graph each and all-reduces the gradients after the backward; "ddp_optimizer" splits the
# graph at every 25-MB bucket so that all-reduce overlaps the backward, at the price of fusion across the
# splits (paper base model, 2 x H200: 91.7% vs 87.6% scaling; benchmarks/README.md).
OPTIMIZE_DDP: Final = "no_optimization"


class AccelFallbackWarning(RuntimeWarning):
    """A speed-up of this module is off in this process: torch lacks the private API it needs."""


_fallbacks: dict[str, str] = {}  # feature -> why it fell back (what was warned), once per process
_fallbacks_lock = threading.Lock()


def fall_back(feature: str, why: str, instead: str) -> None:
    """Warn once per process that `feature` is off (`why`) and `instead` runs."""
    with _fallbacks_lock:
        if feature in _fallbacks:
            return
        _fallbacks[feature] = why
    warnings.warn(f"ulsweep.train.accel: {feature} off, {instead} instead: {why} (torch "
                  f"{_torch_version()})", AccelFallbackWarning, stacklevel=3)


def fallbacks() -> dict[str, str]:
    """The features that fell back in this process, with why."""
    with _fallbacks_lock:
        return dict(_fallbacks)


def _torch_version() -> str:
    import torch

    return torch.__version__


# --- Inductor's reduction heuristic -------------------------------------------------------------------------

ONE_PASS = "one-pass rows (ulsweep's InductorChoices)"


def one_pass(short_row: bool, inductor_says: bool, persistent_enabled: bool, cooperative: bool) -> bool:
    """Whether a reduction runs in one pass: where Inductor says so, and for short rows unless one-pass
    kernels are switched off (`triton.persistent_reductions`) or the reduction is cooperative (a row split
    over several blocks)."""
    return inductor_says or (short_row and persistent_enabled and not cooperative)


@functools.cache
def choices_problem() -> str | None:
    """What keeps ulsweep's InductorChoices from working with this torch (None: nothing)."""
    try:
        from torch._inductor import config
        from torch._inductor.choices import InductorChoices
        from torch._inductor.sizevars import SizeVarAllocator
        from torch._inductor.virtualized import V
    except ImportError as e:
        return f"cannot import {e.name or e}"
    if not callable(getattr(V, "set_choices_handler", None)):
        return "torch._inductor.virtualized.V has no set_choices_handler"
    if not callable(getattr(SizeVarAllocator, "statically_known_leq", None)):
        return "SizeVarAllocator has no statically_known_leq"
    if not hasattr(getattr(config, "triton", None), "persistent_reductions"):
        return "torch._inductor.config has no triton.persistent_reductions"
    method = getattr(InductorChoices, "should_use_persistent_reduction", None)
    if method is None:
        return "InductorChoices has no should_use_persistent_reduction"
    try:
        params = [n for n in inspect.signature(method).parameters if n != "self"]
    except (TypeError, ValueError):
        return "the signature of InductorChoices.should_use_persistent_reduction cannot be read"
    if params != ["features", "cooperative_reduction"]:
        return f"InductorChoices.should_use_persistent_reduction takes {params}, not (features, cooperative_reduction)"
    return None


def choices_class(max_row: int = ONE_PASS_MAX_ROW) -> type:
    """ulsweep's `InductorChoices`: Inductor's heuristics but for one-pass rows of up to `max_row` elements.
    One class per `max_row` (Inductor makes the instances itself, `config.inductor_choices_class`), the same
    class object however the row count is passed (pickle insists)."""
    return _choices_class(int(max_row))


@functools.cache
def _choices_class(max_row: int) -> type:
    from torch._inductor import config
    from torch._inductor.choices import InductorChoices
    from torch._inductor.virtualized import V

    class ShortRowsInOnePass(InductorChoices):
        def __init__(self):
            super().__init__()
            self.max_row = max_row

        def should_use_persistent_reduction(self, features, cooperative_reduction: bool) -> bool:
            says = super().should_use_persistent_reduction(features, cooperative_reduction)
            try:
                short = V.graph.sizevars.statically_known_leq(features.reduction_numel, self.max_row)
            except (AttributeError, TypeError) as e:  # kernel features or size variables of another shape
                fall_back(ONE_PASS, f"should_use_persistent_reduction: {type(e).__name__}: {e}",
                          "Inductor's own reduction heuristics")
                return says
            return one_pass(short, says, config.triton.persistent_reductions, cooperative_reduction)

        def uuid(self) -> str:  # the FX graph cache's key, in torch versions that ask for it
            return f"ulsweep-one-pass-rows-{self.max_row}"

    # a module attribute (see __getattr__), so that Inductor can pickle its config for the cache key
    ShortRowsInOnePass.__qualname__ = ShortRowsInOnePass.__name__ = f"ShortRowsInOnePass{max_row}"
    ShortRowsInOnePass.__module__ = __name__
    return ShortRowsInOnePass


def __getattr__(name: str):
    m = re.fullmatch(r"ShortRowsInOnePass(\d+)", name)
    if m:  # built on first use: importing Inductor takes seconds
        return choices_class(int(m.group(1)))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def compile_phase_totals() -> dict[str, float] | None:
    """Seconds this process's torch.compile has spent so far by phase (Dynamo's `compile_times`: tracing,
    AOTAutograd, Inductor's lowering and code generation, the wait for its parallel kernel compiles, the loading
    of compiled code, ...; phases nest, e.g. `compile_fx_inner` holds `GraphLowering.run`), summed over its
    compiles. None where this torch lacks the function or returns another form (`torch._dynamo.utils` is
    private)."""
    try:
        from torch._dynamo.utils import compile_times

        names, values = compile_times(repr="csv", aggregate=True)
        return {str(n): float(v) for n, v in zip(names, values, strict=True)}
    except Exception:  # noqa: BLE001 - a changed private API costs the report only
        return None


def compile_phase_seconds(top: int = 24, least: float = 1.0,
                          since: dict[str, float] | None = None) -> dict[str, float] | None:
    """The `top` longest phases of `compile_phase_totals`, of at least `least` s, rounded; `since`: totals taken
    before, subtracted (the compiles since then). A cold compile of lf_sweep's 18 stacked autoencoders' step took
    ~190 s on one H100 beside their training (session 28); on this project's 2-core CPU box
    (benchmarks/compile_phases.py, benchmarks/results/cpu-compile-phases-s28.json) the forward 92 s and the
    backward 74 s, of which Inductor's code generation 66 s and the wait for the C++ compiler 65 s, against 66 and
    56 s for one autoencoder. None where the totals are."""
    totals = compile_phase_totals()
    if totals is None:
        return None
    phases = {n: v - (since or {}).get(n, 0.0) for n, v in totals.items()}
    longest = sorted(((v, n) for n, v in phases.items() if v >= least), reverse=True)[:top]
    return {n: round(v, 1) for v, n in longest}


def preload_inductor() -> threading.Thread:
    """Import the Dynamo and Inductor modules that this process's first compile imports (`install_choices`, then
    torch.compile's wrapper) in a daemon thread started now, beside other set-up work; join it before compiling.
    On the H100 of session 40 they were 4.2 s of a stacked group's first step (`first_step_resume_s`), beside 18
    trial processes and a precompile task starting; 0.8-2.2 s on this project's 2-core box. A failure here is left
    to the compile to report."""

    def run() -> None:
        try:
            import torch._dynamo  # noqa: F401
            import torch._inductor.compile_fx  # noqa: F401 - torch.compile's wrapper imports it (its backend)
            choices_problem()  # Inductor's config, choices, sizevars and virtualized modules
        except Exception:  # noqa: BLE001 - the compile imports them again and says what is wrong
            pass

    thread = threading.Thread(target=run, name="ulsweep-inductor-import", daemon=True)
    thread.start()
    return thread


def install_choices(max_row: int = ONE_PASS_MAX_ROW) -> bool:
    """Make the next compiles in this thread (and, where torch has `inductor_choices_class`, in this process)
    reduce rows of up to `max_row` elements in one pass; 0: Inductor's own rule again (heuristics that someone
    else installed stay). Returns whether ulsweep's heuristic is installed: False for 0, and, after one
    warning, where `choices_problem()` finds this torch's Inductor unlike what it needs. Called by
    `compile_module`. Only Inductor's Triton (GPU) kernels ask."""
    problem = choices_problem()
    if problem is not None:
        if max_row > 0:
            fall_back(ONE_PASS, problem, "Inductor's own reduction heuristics")
        return False
    from torch._inductor import config
    from torch._inductor.choices import InductorChoices
    from torch._inductor.virtualized import V

    if max_row > 0:
        ours = choices_class(max_row)
        if hasattr(config, "inductor_choices_class"):  # every thread, and part of the graph cache's key
            config.inductor_choices_class = ours
        V.set_choices_handler(ours())  # this thread, from now on
        return True
    current = getattr(config, "inductor_choices_class", None)
    if isinstance(current, type) and current.__module__ == __name__:
        config.inductor_choices_class = None
    if type(V.choices).__module__ == __name__:
        V.set_choices_handler(InductorChoices())
    return False


# --- CUDA-graph state in new threads ------------------------------------------------------------------------

CUDA_GRAPHS = "CUDA-graph state for new threads"


@functools.cache
def cuda_graph_state_problem() -> str | None:
    """What keeps `cuda_graph_state_for_this_thread` from setting up a thread with this torch (None: nothing)."""
    import torch

    try:
        from torch._inductor import cudagraph_trees as cgt
    except ImportError as e:
        return f"cannot import {e.name or e}"
    if not isinstance(getattr(cgt, "local", None), threading.local):
        return "torch._inductor.cudagraph_trees has no thread-local `local`"
    missing = [n for n in ("_stash_obj_in_tls", "_is_key_in_tls", "_get_obj_in_tls")
               if not callable(getattr(torch._C, n, None))]
    return f"torch._C has no {', '.join(missing)}" if missing else None


def cuda_graph_state_for_this_thread() -> bool:
    """Give this thread torch.compile's CUDA-graph-tree state; return whether the thread may use CUDA graphs.
    torch 2.11 sets the state up only in the thread that imported torch._inductor.cudagraph_trees and fails
    with an AssertionError in any other (a reused Tune actor runs each trial in a new thread); later versions
    do the same set-up lazily, as here. False (after one warning per process) where the thread lacks the state
    and this torch lacks what setting it up needs, or the set-up did not take."""
    import collections

    import torch

    problem = cuda_graph_state_problem()
    if problem is None:
        from torch._inductor import cudagraph_trees as cgt

        if hasattr(cgt.local, "tree_manager_containers") or torch._C._is_key_in_tls("tree_manager_containers"):
            return True
        cgt.local.tree_manager_containers = {}
        cgt.local.tree_manager_locks = collections.defaultdict(threading.Lock)
        # stashed so that autograd's backward threads, which copy this thread's TLS, find the same state
        torch._C._stash_obj_in_tls("tree_manager_containers", cgt.local.tree_manager_containers)
        torch._C._stash_obj_in_tls("tree_manager_locks", cgt.local.tree_manager_locks)
        if torch._C._get_obj_in_tls("tree_manager_containers") is cgt.local.tree_manager_containers:
            return True
        del cgt.local.tree_manager_containers, cgt.local.tree_manager_locks  # no half-made state
        problem = "torch._C._get_obj_in_tls does not return the state stashed with _stash_obj_in_tls"
    elif _has_cuda_graph_state():  # the thread that imported cudagraph_trees needs no set-up
        return True
    fall_back(CUDA_GRAPHS, problem, 'compile mode "default" in threads without that state')
    return False


def _has_cuda_graph_state() -> bool:
    try:
        from torch._inductor import cudagraph_trees as cgt

        return hasattr(cgt.local, "tree_manager_containers")
    except (ImportError, AttributeError):
        return False


# --- clipping folded into fused AdamW -----------------------------------------------------------------------

FUSED_CLIP = "clipping in fused AdamW's grad_scale"


@functools.cache
def grad_scale_problem(opt_class: type, device_type: str) -> str | None:
    """What keeps a fused `opt_class` on `device_type` from dividing its gradients by `grad_scale` (None:
    nothing): one step of a 1-element optimizer with gradient 4 and grad_scale 2 against one with gradient 2
    (eps 1 makes Adam's step depend on the gradient's scale: 1 - 4/5 vs 1 - 2/3)."""
    import torch

    dev = torch.device(device_type)
    try:
        params = [torch.ones(1, device=dev, requires_grad=True) for _ in range(2)]
        for p, g in zip(params, (4.0, 2.0)):
            p.grad = torch.full_like(p, g)
        scaled, plain = (opt_class([p], lr=1.0, eps=1.0, weight_decay=0.0, fused=True) for p in params)
        scaled.grad_scale = torch.tensor(2.0, device=dev)
        scaled.step()
        plain.step()
    except Exception as e:  # noqa: BLE001 - any failure of the fused step means: not usable
        return f"a fused {opt_class.__name__} step with grad_scale failed: {type(e).__name__}: {e}"
    if not torch.allclose(params[0].detach(), params[1].detach()) or params[1].item() == 1.0:
        return f"fused {opt_class.__name__} on {device_type} ignores grad_scale"
    return None


def clip_gradients(opt, max_norm: float):
    """Scale the gradients of `opt`'s parameters by min(1, max_norm / (|g| + 1e-6)) (as clip_grad_norm_; no
    clipping for max_norm <= 0) and return the total norm |g| before clipping. A fused Adam/AdamW takes the
    factor as its `grad_scale` divisor (the attribute GradScaler sets), which folds it into the AdamW kernel:
    for the 347M-parameter base model on an H200 the 0.8-ms pass over the gradients goes and AdamW takes 0.5 ms
    longer. Other optimizers, and fused ones whose step does not honour grad_scale (`grad_scale_problem`, one
    warning), get the gradients divided in place."""
    import torch

    grads = [p.grad for group in opt.param_groups for p in group["params"] if p.grad is not None]
    gnorm = torch.nn.utils.get_total_norm(grads)
    if max_norm <= 0:
        return gnorm
    divisor = ((gnorm + 1e-6) / max_norm).clamp_min(1.0)
    if opt.defaults.get("fused") and isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
        problem = grad_scale_problem(type(opt), gnorm.device.type)
        if problem is None:
            opt.grad_scale = divisor.to(torch.float32)
            return gnorm
        fall_back(FUSED_CLIP, problem, "gradients divided before the step")
    torch._foreach_div_(grads, divisor)
    return gnorm


# --- how a compiled step meets DDP's gradient buckets --------------------------------------------------------

DDP_SPLITTING = "Dynamo's optimize_ddp setting"


@functools.cache
def optimize_ddp_problem(mode: str) -> str | None:
    """What keeps Dynamo from taking `mode` as its optimize_ddp setting (None: nothing)."""
    import torch

    try:
        import torch._dynamo.utils as dynamo_utils

        if not hasattr(torch._dynamo.config, "optimize_ddp"):
            return "torch._dynamo.config has no optimize_ddp"
        with torch._dynamo.config.patch(optimize_ddp=mode):
            read = dynamo_utils.get_optimize_ddp_mode()
    except Exception as e:  # noqa: BLE001 - missing function, refused value: not usable
        return f"optimize_ddp={mode!r}: {type(e).__name__}: {e}"
    return None if read == mode else f"optimize_ddp={mode!r} reads back as {read!r}"


def set_ddp_graph_splitting(mode: str = OPTIMIZE_DDP) -> bool:
    """Set torch._dynamo.config.optimize_ddp to `mode` for the compiles that follow; returns whether it did
    (False, after one warning, where Dynamo does not take it: its setting stays)."""
    import torch

    problem = optimize_ddp_problem(mode)
    if problem is not None:
        fall_back(DDP_SPLITTING, problem, "Dynamo's own setting")
        return False
    torch._dynamo.config.optimize_ddp = mode
    return True
