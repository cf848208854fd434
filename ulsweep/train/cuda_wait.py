"""How a process's CPU thread waits for its GPU (`resources.cuda_wait`).

CUDA decides per context whether a thread that waits for the device to finish (a synchronize, a `.item()`) spins
on its core, yields it, or sleeps on an OS primitive. Its default ("auto") spins whenever the
process has fewer active contexts than the machine has cores, which is always the case for a trial process.
Packed trials may therefore each hold a core busy waiting: one H200 sweep of 18 packed trials (session 21) kept
the machine's 16 cores 96% busy while the GPU was shared, and the compile, the imports and the evaluation of
other trials ran on what was left. `benchmarks/cuda_wait.py` measures how much of a core each policy burns.

The policy is a flag of the device's primary context (the one torch uses), so it is set through the CUDA driver
API (`cuDevicePrimaryCtxSetFlags`, public, loaded from libcuda by ctypes) before torch first touches the
device. Where the driver refuses to change a context already active with another policy, the process keeps
that policy and `apply` warns and says so.
"""
from __future__ import annotations

import ctypes
import warnings

# CUcontext scheduling flags (cuda.h: CU_CTX_SCHED_*)
POLICIES = {"auto": 0x0, "spin": 0x1, "yield": 0x2, "block": 0x4}
SCHED_MASK = 0x7


class CudaWaitWarning(UserWarning):
    """`resources.cuda_wait` could not be applied; the process waits as CUDA's own default has it."""


def _libcuda():
    return ctypes.CDLL("libcuda.so.1")


def _check(rc: int, call: str) -> None:
    if rc != 0:
        raise OSError(f"{call} returned CUDA error {rc}")


def apply(policy: str, lib=None) -> dict[int, str]:
    """Set how this process waits for every visible GPU: {device ordinal: outcome}, an outcome being "set",
    "as set" (already so: a reused process) or "kept <policy>" (the context was active with another policy and
    the driver refused the change). "auto" leaves CUDA's default alone ({}). Without a CUDA driver it warns
    (`CudaWaitWarning`) and returns {}."""
    if policy not in POLICIES:
        raise ValueError(f"resources.cuda_wait: {policy!r} is not one of {sorted(POLICIES)}")
    if policy == "auto":
        return {}
    want = POLICIES[policy]
    try:
        lib = lib or _libcuda()
        _check(lib.cuInit(0), "cuInit")
        count = ctypes.c_int()
        _check(lib.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
    except OSError as e:
        warnings.warn(f"resources.cuda_wait: {policy} not applied, no usable CUDA driver here ({e})",
                      CudaWaitWarning, stacklevel=2)
        return {}
    names = {v: k for k, v in POLICIES.items()}
    out = {}
    for ordinal in range(count.value):
        dev, flags, active = ctypes.c_int(), ctypes.c_uint(), ctypes.c_int()
        _check(lib.cuDeviceGet(ctypes.byref(dev), ordinal), "cuDeviceGet")
        _check(lib.cuDevicePrimaryCtxGetState(dev, ctypes.byref(flags), ctypes.byref(active)),
               "cuDevicePrimaryCtxGetState")
        if flags.value & SCHED_MASK == want:
            out[ordinal] = "as set"
            continue
        rc = lib.cuDevicePrimaryCtxSetFlags(dev, ctypes.c_uint((flags.value & ~SCHED_MASK) | want))
        if rc == 0:
            out[ordinal] = "set"
        else:
            kept = names.get(flags.value & SCHED_MASK, hex(flags.value & SCHED_MASK))
            out[ordinal] = f"kept {kept}"
            warnings.warn(f"resources.cuda_wait: {policy} not applied to GPU {ordinal}: its primary context "
                          f"(active: {bool(active.value)}) has {kept}, and the driver refused the change (CUDA "
                          f"error {rc})", CudaWaitWarning, stacklevel=2)
    return out
