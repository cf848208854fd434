"""A group's per-member gradient clipping, three ways side by side (issue 23).

    python benchmarks/clip_trials.py experiments/lf_sweep.yaml --members 18 --out benchmarks/results/clip.json

A group of K stacked trials clips each member's gradient by its own global norm (`ulsweep.models.stacked.
clip_trials`). Until session 29 the library compiled that function beside the step (a second graph, whose cold
compile held up a group's first compiled step: 68 s of lf_sweep's autoencoders' on 2 CPU cores); since, it runs
uncompiled: the gradients' rows concatenated in chunks for the norms, one division a tensor. Rows, for the stacked
gradients of lf_sweep's autoencoder and base model (random values of the parameters' shapes, fp32 as the library
keeps them):

- `per-tensor`: the function as it was, a norm and a division per gradient tensor, uncompiled;
- `per-tensor compiled`: the same through torch.compile (`compile_s`: its cold compile, in an Inductor cache of
  this run's own, empty at the start);
- `library`: the library's `clip_trials`.

`ms` is the median of `--repeats` timed calls (CUDA-synchronized on a GPU) after warm-up; `max_rel_diff` the
largest relative difference of the clipped gradients and the norms from `per-tensor`'s. Prints a table and writes
JSON. CPU times are not GPU ones: on a GPU the uncompiled rows are bound by kernel launches.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
# an Inductor cache of this run's own, so that the compiled row's first call compiles cold
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="ulsweep-clip-inductor-"))

import torch  # noqa: E402

from timing import run_env, time_calls, write_results  # noqa: E402  (benchmarks/timing.py)


def per_tensor_clip(grads: list[torch.Tensor], k: int, max_norm: float) -> torch.Tensor:
    """The per-member clipping as the library had it until session 29: per gradient tensor, the squared norm of
    each member's slice, then each tensor divided by its members' factors."""
    norms = torch.stack([g.float().pow(2).reshape(k, -1).sum(1) for g in grads]).sum(0).sqrt()
    if max_norm > 0:
        div = ((norms + 1e-6) / max_norm).clamp_min(1.0)
        for g in grads:
            g.div_(div.view(-1, *[1] * (g.dim() - 1)).to(g.dtype))
    return norms


def stacked_shapes(experiment: str, stage: str, overrides: list[str]) -> list[torch.Size]:
    """The parameter shapes of the stage's network as one member of a group has them (the group's stacked tensors
    add the leading K)."""
    from ulsweep.config import load_experiment, parse_overrides
    from ulsweep.train.build import build_autoencoder, build_base_model, latent_shape
    from ulsweep.sweep.precompile import _image_shape

    exp = load_experiment(experiment, parse_overrides(overrides))
    if stage == "ae":
        net = build_autoencoder(exp.ae, _image_shape(exp)[0])
    else:
        net = build_base_model(exp.base_models[0], latent_shape(exp)[0])
    return [p.shape for p in net.parameters()]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


PROGRAMS = ["per-tensor", "per-tensor compiled", "library"]


def rows_for(stage: str, shapes: list[torch.Size], k: int, device: torch.device, max_norm: float,
             warmup: int, repeats: int, programs: list[str] = PROGRAMS) -> list[dict]:
    from ulsweep.models.stacked import clip_trials

    gen = torch.Generator(device).manual_seed(0)
    # members of different gradient sizes, so that some are clipped and some are not
    scale = torch.logspace(-2, 1, k, device=device)
    base = [torch.randn(k, *s, generator=gen, device=device) * scale.view(-1, *[1] * len(s)) for s in shapes]
    ref_grads = [g.clone() for g in base]
    ref_norms = per_tensor_clip(ref_grads, k, max_norm)
    fns = {"per-tensor": per_tensor_clip, "per-tensor compiled": torch.compile(per_tensor_clip, dynamic=False),
           "library": clip_trials}
    out = []
    for name in programs:
        fn = fns[name]
        grads = [g.clone() for g in base]
        t0 = time.perf_counter()
        norms = fn(grads, k, max_norm)
        if device.type == "cuda":
            torch.cuda.synchronize()
        first_s = time.perf_counter() - t0
        diff = max([rel(norms, ref_norms)] + [rel(a, b) for a, b in zip(grads, ref_grads)])
        work = [g.clone() for g in base]  # timed calls clip these again and again: the same work every call
        secs = time_calls(lambda fn=fn, work=work: fn(work, k, max_norm), device, warmup, repeats)
        out.append({"stage": stage, "members": k, "tensors": len(shapes), "program": name,
                    "ms": 1e3 * sorted(secs)[len(secs) // 2], "first_call_s": first_s,
                    "compile_s": first_s if name.endswith("compiled") else None, "max_rel_diff": diff})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("experiment")
    p.add_argument("--members", type=int, default=18)
    p.add_argument("--stages", nargs="+", default=["ae", "base"], choices=["ae", "base"])
    p.add_argument("--programs", nargs="+", default=PROGRAMS, choices=PROGRAMS)
    p.add_argument("--max-norm", type=float, default=1.0)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--set", action="append", help="KEY=VALUE override of the experiment")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    rows = []
    for stage in args.stages:
        shapes = stacked_shapes(args.experiment, stage, args.set or [])
        rows += rows_for(stage, shapes, args.members, device, args.max_norm, args.warmup, args.repeats, args.programs)
    print(f"{'stage':<6}{'K':>4}{'tensors':>9}  {'program':<21}{'ms':>9}{'compile s':>11}{'max rel diff':>14}")
    for r in rows:
        c = f"{r['compile_s']:.1f}" if r["compile_s"] is not None else "-"
        print(f"{r['stage']:<6}{r['members']:>4}{r['tensors']:>9}  {r['program']:<21}{r['ms']:>9.3f}{c:>11}"
              f"{r['max_rel_diff']:>14.2e}")
    write_results(args.out, run_env(args) | {"device": str(device)}, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
