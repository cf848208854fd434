"""make_runtime's CUDA branch on a GPU-less box: torch.cuda reports one device, setting it does nothing, and
torch's global cuDNN / TF32 flags that the branch sets are restored afterwards (shared by test_train and
test_settings)."""
from __future__ import annotations

import contextlib

import pytest
import torch


@contextlib.contextmanager
def fake_cuda_device():
    backends = (torch.backends.cudnn, "benchmark"), (torch.backends.cudnn, "allow_tf32"), \
        (torch.backends.cuda.matmul, "allow_tf32")
    saved = [getattr(obj, name) for obj, name in backends]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda, "is_available", lambda: True)
        mp.setattr(torch.cuda, "device_count", lambda: 1)
        mp.setattr(torch.cuda, "set_device", lambda device: None)
        try:
            yield
        finally:  # plain setattr: the cuBLAS flags module cannot be monkeypatched (no delattr on undo)
            for (obj, name), value in zip(backends, saved):
                setattr(obj, name, value)
