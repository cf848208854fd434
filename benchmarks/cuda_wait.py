"""CPU a process burns while its GPU works, per `resources.cuda_wait` policy (issue 23; GPU only).

Each policy runs in a fresh process (the policy is set before torch makes its CUDA context) and times two
ways of waiting:
- `sync`: a few large matmuls queued, then one synchronize (a trial's `.item()` every log_every steps);
- `queue`: many small matmuls, more than CUDA's launch queue holds, so the thread waits inside the launches
  (a packed trial whose share of the GPU is smaller than what its thread can launch).
Per row: wall seconds, CPU seconds of the process (user + system) and their ratio: ~1 is a core held busy
waiting. Prints a table and writes JSON.
    python benchmarks/cuda_wait.py --out benchmarks/results/h200-cuda-wait.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from provenance import commit  # noqa: E402

CHILD = textwrap.dedent("""
    import json, resource, sys, time
    import torch
    from ulsweep.train import cuda_wait
    policy, seconds = sys.argv[1], float(sys.argv[2])
    outcome = cuda_wait.apply(policy)
    dev = torch.device("cuda")
    big = torch.randn(8192, 8192, device=dev)
    small = torch.randn(1024, 1024, device=dev)

    def cpu_s():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def timed(n_big, n_small):
        torch.cuda.synchronize()
        w0, c0 = time.perf_counter(), cpu_s()
        for _ in range(n_big):
            big @ big
        for _ in range(n_small):
            small @ small
        torch.cuda.synchronize()
        return time.perf_counter() - w0, cpu_s() - c0

    timed(2, 100)  # cuBLAS handles and kernels loaded
    w, _ = timed(4, 0)
    n_big = max(4, int(4 * seconds / w))
    w, _ = timed(0, 2000)
    n_small = max(2000, int(2000 * seconds / w))
    rows = []
    for name, nb, ns in (("sync", n_big, 0), ("queue", 0, n_small)):
        wall, cpu = timed(nb, ns)
        rows.append({"policy": policy, "wait": name, "kernels": nb + ns, "wall_s": wall, "cpu_s": cpu,
                     "cpu_per_wall": cpu / wall, "outcome": {str(k): v for k, v in outcome.items()}})
    print(json.dumps(rows))
""")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policies", nargs="+", default=["auto", "spin", "yield", "block"])
    ap.add_argument("--seconds", type=float, default=3.0, help="GPU work per row (s)")
    ap.add_argument("--out", default="cuda-wait.json")
    a = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("cuda_wait.py measures how a process waits for a GPU: no CUDA device here")
    rows = []
    for policy in a.policies:
        out = subprocess.run([sys.executable, "-c", CHILD, policy, str(a.seconds)], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"policy {policy} failed:\n{out.stderr[-3000:]}")
        rows += json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{'policy':>7} {'wait':>6} {'kernels':>8} {'wall s':>7} {'CPU s':>7} {'CPU/wall':>9}  outcome")
    for r in rows:
        print(f"{r['policy']:>7} {r['wait']:>6} {r['kernels']:>8} {r['wall_s']:>7.2f} {r['cpu_s']:>7.2f} "
              f"{r['cpu_per_wall']:>9.2f}  {r['outcome']}")
    env = {"torch": torch.__version__, "python": sys.version.split()[0], "gpu": torch.cuda.get_device_name(0),
           "commit": commit(), "args": vars(a)}
    Path(a.out).write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
