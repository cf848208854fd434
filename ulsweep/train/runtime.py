"""Where and how a training run executes: device and precision, this rank's slice of a global batch under
torch.distributed (Ray Train's DDP), and torch.compile."""
from __future__ import annotations

import contextlib
import os
import sys
import threading
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ulsweep.config import TrainConfig
from ulsweep.train import accel


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # autocast dtype, None for fp32
    rank: int
    world: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def synchronize(self) -> None:
        """Wait for the device's queued work (a no-op on CPU)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)


def make_runtime(train: TrainConfig) -> Runtime:
    """Pick device and precision; under torch.distributed (Ray Train) use the local rank's GPU."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    want = train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but CUDA is not available on this machine")
    if want == "cuda" or (want == "auto" and torch.cuda.is_available()):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device("cuda", local % max(torch.cuda.device_count(), 1))
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        # fixed training shapes: the autotuner's search at each conv shape's first call pays off over a long run
        torch.backends.cudnn.benchmark = train.cudnn_benchmark
    else:
        device = torch.device("cpu")
    if train.precision == "bf16" or (train.precision == "auto" and device.type == "cuda"):
        amp = torch.bfloat16
    else:
        amp = None
    return Runtime(device, amp, rank, world)


def require_gpus(resources, who: str, why: str) -> None:
    """`who`, a process that trains or compiles for trials training on GPUs (`resources.gpus_per_worker` > 0) and
    reserves none itself (a sweep's precompile task, a stacked group's actor: placed on a GPU node seeing its GPUs,
    ulsweep/sweep/precompile.py `gpu_node_options`), fails where it sees no GPU, saying so and `why` it must."""
    if resources.gpus_per_worker > 0 and not torch.cuda.is_available():
        raise RuntimeError(f"{who} sees no GPU (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}) but "
                           f"its trials train on GPUs (resources.gpus_per_worker {resources.gpus_per_worker:g}): {why}")


def shard(batch: torch.Tensor, rt: Runtime) -> torch.Tensor:
    """This rank's contiguous slice of a global batch (all ranks draw the same global batch)."""
    if rt.world == 1:
        return batch
    n = batch.shape[0]
    if n % rt.world:
        raise ValueError(f"global batch {n} is not divisible by the {rt.world} workers")
    k = n // rt.world
    return batch[rt.rank * k:(rt.rank + 1) * k]


def all_reduce_mean(x: torch.Tensor, rt: Runtime) -> torch.Tensor:
    if rt.world > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= rt.world
    return x


def wrap_ddp(module: nn.Module, rt: Runtime) -> nn.Module:
    if rt.world == 1:
        return module
    ids = [rt.device.index] if rt.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(module, device_ids=ids)


def compile_module(module: nn.Module, setting: bool | str, rt: Runtime, *,
                   one_pass_max_row: int = accel.ONE_PASS_MAX_ROW,
                   optimize_ddp: str = accel.OPTIMIZE_DDP) -> nn.Module:
    """torch.compile per `train.compile` (False: the module itself), in the mode `compile_mode` picks, with
    Inductor reducing rows of up to `one_pass_max_row` elements in one pass (0: Inductor's own rule;
    `accel.install_choices`); under DDP (more than one worker) with Dynamo's `optimize_ddp` set to how the
    compiled step meets DDP's gradient buckets (`accel.set_ddp_graph_splitting`). The defaults are the
    library's; the benchmarks pass others. Either falls back to torch's own behaviour, with one warning,
    where this torch lacks what it needs."""
    mode = compile_mode(setting, rt)
    if mode is None:
        return module
    if rt.world > 1:
        accel.set_ddp_graph_splitting(optimize_ddp)
    accel.install_choices(one_pass_max_row)
    # static shapes: a run's step never changes shape, and a reused process that meets a second architecture
    # (resources.reuse_processes) compiles it as a fresh process would instead of a dynamic-shape graph
    return torch.compile(module, mode=mode, dynamic=False)


_cuda_graph_owner: threading.Thread | None = None  # the one thread of this process that may use CUDA graphs
_cuda_graph_owner_lock = threading.Lock()


def compile_mode(setting: bool | str, rt: Runtime) -> str | None:
    """The torch.compile mode for `train.compile` (None: no compile). "reduce-overhead" replays the compiled
    forward and backward as CUDA graphs; it needs CUDA and one process per model, so it falls back to the
    default mode on CPU and under DDP (which splits the graph at its buckets), and in every thread of a
    process but the first that asked for it: with torch 2.11 on an H200, a second thread's training fails in
    CUDA-graph capture ("operation failed due to a previous error during capture") after the first thread's
    run succeeded. A sweep therefore gives each CUDA-graph trial its own process, or with
    `resources.reuse_processes` (auto, on) runs all trials of a process in one thread (ulsweep/sweep/trial_thread.py).
    The owner thread too gets the default mode where it lacks torch.compile's CUDA-graph state and this torch
    cannot set it up (`accel.cuda_graph_state_for_this_thread`, one warning)."""
    global _cuda_graph_owner
    if setting is False:
        return None
    mode = "default" if setting is True else setting
    if mode == "reduce-overhead" and (rt.device.type != "cuda" or rt.world > 1):
        mode = "default"
    if mode == "reduce-overhead":
        me = threading.current_thread()
        with _cuda_graph_owner_lock:
            if _cuda_graph_owner is None:
                _cuda_graph_owner = me
        if _cuda_graph_owner is not me:
            print(f"note: train.compile=reduce-overhead -> default in thread {me.name!r}: this process already "
                  f"uses CUDA graphs in thread {_cuda_graph_owner.name!r}", file=sys.stderr, flush=True)
            return "default"
        if not accel.cuda_graph_state_for_this_thread():  # this torch cannot set the thread up (one warning)
            return "default"
    return mode


def device_memory() -> dict[str, float]:
    """This process's peak CUDA memory (GiB): allocated by tensors and reserved by the caching allocator;
    {} without CUDA. With several trials packed on one GPU, the GPU's own memory (system metrics) is their sum;
    a stacked group's members each report the group's process (ulsweep/train/group.py)."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return {}
    return {"gpu_mem_peak_gb": torch.cuda.max_memory_allocated() / 2**30,
            "gpu_mem_reserved_peak_gb": torch.cuda.max_memory_reserved() / 2**30}
