"""What a fresh trial process spends before it trains at speed (issue 23): the parts of its first steps.

On one H200 (session 17, `wall.sh` with `train.gate_compile: eager`) lf_sweep's autoencoders that trained
uncompiled while another compiled took 17-20 s from their setup to the end of their first (eager) step, against
55 ms for a warm eager step. This measures where that goes. Each row starts P fresh processes at once (a sweep's
first wave starts so), each of which builds lf_sweep's trial step as the loop does and records, synchronizing the
device after each part:

    import_s     from the process's start to torch and ulsweep imported
    runtime_s    make_runtime: the device, the CUDA context (torch.cuda.init), TF32 and cuDNN settings
    build_s      the autoencoder and its TrainState (AdamW, EMA) on the device, a batch on it
    forward_s    the first step's forward (losses), with cuDNN's algorithm search when cudnn.benchmark is on
    backward_s   its backward and optimizer step (AdamW, clipping, EMA)
    second_s     the second step, whole
    steady_s     the median of the next 10 steps

Variants (`--variants`): `library` (the trial's settings: cudnn.benchmark on), `no-cudnn-benchmark`
(cudnn.benchmark off after make_runtime), `eager-module-loading` (CUDA_MODULE_LOADING=EAGER: every kernel of
the CUDA libraries loaded with the context instead of at its first launch), `beside-compile` (the library's
settings while one more process, started 5 s earlier, compiles the same step cold with the trials' mode,
`reduce-overhead` on CUDA, as the first trial of a sweep does while `gate_compile: eager` trials take their
uncompiled steps; its seconds are `compiler_s`, and it is not among the P).

    python benchmarks/first_step.py --preset small --image-size 32 --channels 1 --downsample 4 \\
        --latent-channels 8 --batch 128 --processes 1 5 --out benchmarks/results/h200-first-step.json

Prints a table (per variant and P: the median over the P processes, and the slowest one's first step) and writes
JSON after every row. CPU rows time the same parts without the GPU's, and say little.
"""
from __future__ import annotations

import time

T_START = time.time()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = {"library": {}, "no-cudnn-benchmark": {}, "eager-module-loading": {"CUDA_MODULE_LOADING": "EAGER"},
            "beside-compile": {}}
COMPILER_HEAD_START_S = 5.0  # beside-compile: the compiling process starts this long before the others
PARTS = ("import_s", "runtime_s", "build_s", "forward_s", "backward_s", "second_s", "steady_s")


def child(a, spawned_at: float) -> dict:
    """One fresh process: the parts of its first steps (seconds)."""
    sys.path.insert(0, HERE)
    sys.path.insert(0, os.path.join(HERE, ".."))
    import torch

    from timing import sync
    from train_step import bench_experiment, latent_shape

    from ulsweep.train.build import build_autoencoder
    from ulsweep.train.runtime import compile_module, make_runtime
    from ulsweep.train.stage1 import AEObjective
    from ulsweep.train.state import TrainState

    t = {"import_s": time.time() - spawned_at}
    t0 = time.perf_counter()
    exp = bench_experiment(a)
    rt = make_runtime(exp.ae.train)
    if rt.device.type == "cuda":
        torch.cuda.init()
        sync(rt.device)
    if a.variant == "no-cudnn-benchmark":
        torch.backends.cudnn.benchmark = False
    t["runtime_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    s = exp.data.image_size
    ae = build_autoencoder(exp.ae, a.channels).to(rt.device)
    ts = TrainState(ae, exp.ae.optim, rt, seed=0)
    objective = AEObjective(ae, exp.ae.loss, (a.channels, s, s), latent_shape(exp))
    if a.compiler:  # beside-compile's compiling process: the trials' compiled step, whose first call compiles
        objective = compile_module(objective, "reduce-overhead" if rt.device.type == "cuda" else "default", rt)
    x = torch.rand(a.batch, a.channels, s, s, device=rt.device) * 2 - 1
    sync(rt.device)
    t["build_s"] = time.perf_counter() - t0

    def forward():
        with rt.autocast():
            return objective(x, objective.draw_noise(a.batch, ts.gen))["total"].mean() / objective.dims

    t0 = time.perf_counter()
    loss = forward()
    sync(rt.device)
    t["forward_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ts.optimizer_step(loss)
    sync(rt.device)
    t["backward_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ts.optimizer_step(forward())
    sync(rt.device)
    t["second_s"] = time.perf_counter() - t0
    steady = []
    for _ in range(10):
        t0 = time.perf_counter()
        ts.optimizer_step(forward())
        sync(rt.device)
        steady.append(time.perf_counter() - t0)
    t["steady_s"] = statistics.median(steady)
    return t


def run_row(a, argv: list[str], variant: str, processes: int) -> dict:
    """P fresh processes of `variant` started at once; their parts, and per part the median over them."""
    # the node's cores shared out as Ray does for trials (OMP_NUM_THREADS = a trial's CPUs), not each process
    # spinning up a thread per core
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // processes)), **VARIANTS[variant]}
    procs, compiler, t_compiler = [], None, time.time()
    if variant == "beside-compile":
        cache = tempfile.mkdtemp(prefix="first-step-inductor-")  # cold, as a sweep's first compile
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", "--variant", variant, "--compiler",
               "--spawned-at", repr(t_compiler)]
        compiler = subprocess.Popen(cmd, env={**env, "TORCHINDUCTOR_CACHE_DIR": cache}, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
        time.sleep(COMPILER_HEAD_START_S)
    for _ in range(processes):
        cmd = [sys.executable, os.path.abspath(__file__), *argv, "--child", "--variant", variant,
               "--spawned-at", repr(time.time())]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    per, errors = [], []
    for p in procs:
        out, err = p.communicate(timeout=a.timeout_s)
        line = [ln for ln in out.splitlines() if ln.startswith("{")]
        if p.returncode == 0 and line:
            per.append(json.loads(line[-1]))
        else:
            errors.append(f"rc {p.returncode}: {err.strip()[-300:]}")
    row = {"variant": variant, "processes": processes, "per_process": per, "errors": errors}
    if compiler is not None:
        out, err = compiler.communicate(timeout=a.timeout_s)
        row["compiler_s"] = time.time() - t_compiler
        if compiler.returncode != 0:
            errors.append(f"compiler rc {compiler.returncode}: {err.strip()[-300:]}")
    for k in PARTS:
        if per:
            row[k] = statistics.median(r[k] for r in per)
    if per:
        row["first_step_max_s"] = max(r["forward_s"] + r["backward_s"] for r in per)
    return row


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    sys.path.insert(0, HERE)
    from train_step import add_model_args

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--processes", type=int, nargs="+", default=[1, 5], help="fresh processes started at once")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--timeout-s", type=float, default=600.0, help="longest wait for one row's processes")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", default="library", choices=list(VARIANTS), help=argparse.SUPPRESS)
    p.add_argument("--spawned-at", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--compiler", action="store_true", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        print(json.dumps(child(a, a.spawned_at if a.spawned_at is not None else T_START)), flush=True)
        return 0
    from timing import run_env, write_results

    # the children get the model's arguments, not the parent's own (and write no file)
    passed = _without(argv, {"--out": 1, "--processes": len(a.processes), "--variants": len(a.variants)})
    rows, env = [], run_env(a)
    print(f"{'variant':>22} {'P':>3} " + " ".join(f"{k[:-2]:>9}" for k in PARTS) + f" {'1st max':>8}  errors")
    for variant in a.variants:
        for n in a.processes:
            row = run_row(a, passed, variant, n)
            rows.append(row)
            cells = " ".join(f"{row[k]:>9.3f}" if k in row else f"{'-':>9}" for k in PARTS)
            worst = f"{row['first_step_max_s']:>8.2f}" if "first_step_max_s" in row else f"{'-':>8}"
            beside = f"  (compiler {row['compiler_s']:.0f} s)" if "compiler_s" in row else ""
            print(f"{variant:>22} {n:>3} {cells} {worst}  {len(row['errors']) or ''}{beside}", flush=True)
            for e in row["errors"][:2]:
                print(f"    {e}", flush=True)
            write_results(a.out, env, rows)
    return 0 if all(not r["errors"] for r in rows) else 1


def _without(argv: list[str], flags: dict[str, int]) -> list[str]:
    """argv without the named flags and the values each takes (the parent's own options)."""
    out, skip = [], 0
    for x in argv:
        if skip:
            if x.startswith("--"):
                skip = 0
            else:
                skip -= 1
                continue
        if x in flags:
            skip = flags[x]
            continue
        out.append(x)
    return out


if __name__ == "__main__":
    sys.exit(main())
