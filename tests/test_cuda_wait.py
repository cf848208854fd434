"""resources.cuda_wait: the CUDA driver calls it makes (against a stand-in driver that keeps the primary contexts'
flags as the real one does), what the config accepts, and on a GPU the flag torch's context ends up with."""
import ctypes
import subprocess
import sys
import textwrap

import pytest
import torch

from ulsweep.train import cuda_wait

CUDA_ERROR_PRIMARY_CONTEXT_ACTIVE = 708


class StandInDriver:
    """cuInit, cuDeviceGetCount, cuDeviceGet, cuDevicePrimaryCtxGetState and cuDevicePrimaryCtxSetFlags over a
    list of (flags, active) per device; `refuse_active`: SetFlags fails on an active context (older drivers)."""

    def __init__(self, contexts, refuse_active=False):
        self.contexts = [list(c) for c in contexts]
        self.refuse_active = refuse_active
        self.set_calls = []

    def cuInit(self, flags):
        return 0

    def cuDeviceGetCount(self, count):
        count._obj.value = len(self.contexts)
        return 0

    def cuDeviceGet(self, dev, ordinal):
        dev._obj.value = ordinal
        return 0

    def cuDevicePrimaryCtxGetState(self, dev, flags, active):
        flags._obj.value, active._obj.value = self.contexts[dev.value]
        return 0

    def cuDevicePrimaryCtxSetFlags(self, dev, flags):
        self.set_calls.append((dev.value, flags.value))
        if self.refuse_active and self.contexts[dev.value][1]:
            return CUDA_ERROR_PRIMARY_CONTEXT_ACTIVE
        self.contexts[dev.value][0] = flags.value
        return 0


def test_block_sets_the_scheduling_bits_of_every_device_and_keeps_the_others():
    lmem = 0x10  # CU_CTX_LMEM_RESIZE_TO_MAX: not a scheduling flag, must survive
    drv = StandInDriver([(lmem, 0), (0x4, 1), (0x1, 0)])
    assert cuda_wait.apply("block", drv) == {0: "set", 1: "as set", 2: "set"}
    assert drv.set_calls == [(0, lmem | 0x4), (2, 0x4)]
    assert [c[0] for c in drv.contexts] == [lmem | 0x4, 0x4, 0x4]
    assert cuda_wait.apply("spin", drv) == {0: "set", 1: "set", 2: "set"}
    assert [c[0] & cuda_wait.SCHED_MASK for c in drv.contexts] == [0x1, 0x1, 0x1]


def test_an_active_context_the_driver_will_not_change_is_kept_with_a_warning_naming_it():
    drv = StandInDriver([(0x0, 1), (0x0, 0)], refuse_active=True)
    with pytest.warns(cuda_wait.CudaWaitWarning, match=r"GPU 0: its primary context \(active: True\) has auto.*708"):
        assert cuda_wait.apply("block", drv) == {0: "kept auto", 1: "set"}


def test_auto_calls_nothing_unknown_policies_are_refused_and_no_driver_warns():
    drv = StandInDriver([(0x0, 0)])
    assert cuda_wait.apply("auto", drv) == {} and drv.set_calls == []
    with pytest.raises(ValueError, match="resources.cuda_wait: 'sleep'"):
        cuda_wait.apply("sleep", drv)

    class NoDriver:
        def cuInit(self, flags):
            raise OSError("libcuda.so.1: cannot open shared object file")

    with pytest.warns(cuda_wait.CudaWaitWarning, match="block not applied, no usable CUDA driver"):
        assert cuda_wait.apply("block", NoDriver()) == {}


def test_config_refuses_cuda_wait_without_gpus_and_the_laptop_fallback_resets_it():
    import io

    from ulsweep.config import ConfigError, experiment_from_dict
    from ulsweep.sweep.driver import fit_to_local_machine

    with pytest.raises(ConfigError, match=r"resources\.cuda_wait.*without GPUs"):
        experiment_from_dict({}, {"resources.cuda_wait": "block"})
    exp = experiment_from_dict({}, {"resources.gpus_per_worker": 0.05, "resources.cuda_wait": "block"})
    assert exp.resources.cuda_wait == "block"
    local = fit_to_local_machine(exp, {"CPU": 2.0}, started_here=True, out=io.StringIO())
    assert local.resources.cuda_wait == "auto" and local.resources.gpus_per_worker == 0


def test_worker_reports_the_outcome_in_the_trials_timings(monkeypatch):
    from ulsweep.sweep import worker

    from ulsweep.config import ResourcesConfig

    assert worker._cuda_wait(ResourcesConfig()) is None
    monkeypatch.setattr(cuda_wait, "_libcuda", lambda: StandInDriver([(0x0, 0), (0x4, 1)]))
    assert worker._cuda_wait(ResourcesConfig(gpus_per_worker=0.05, cuda_wait="block")) == "block: as set, set"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_torch_context_on_the_gpu_has_the_flag_set_before_it():
    code = textwrap.dedent("""
        import ctypes, torch
        from ulsweep.train import cuda_wait
        print(cuda_wait.apply("block"))
        torch.ones(1, device="cuda").sum().item()  # torch makes the primary context current
        flags = ctypes.c_uint()
        assert ctypes.CDLL("libcuda.so.1").cuCtxGetFlags(ctypes.byref(flags)) == 0
        print(flags.value & cuda_wait.SCHED_MASK)
        print(cuda_wait.apply("block"))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert "'set'" in lines[0] and lines[1] == str(cuda_wait.POLICIES["block"]) and "'as set'" in lines[2]
