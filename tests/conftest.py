import os

import pytest
import torch

# Two cores on CI: keep torch from oversubscribing them when Ray or helpers run beside a test.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


@pytest.fixture(scope="module")
def one_thread():
    """Small CPU work runs faster on one thread; on a busy 2-core machine two OpenMP threads can be ~10x
    slower (spin-waiting). Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def digits_cache(tmp_path_factory):
    """builtin datasets materialised once per session in a private cache."""
    d = tmp_path_factory.mktemp("ulsweep-cache")
    old = os.environ.get("ULSWEEP_CACHE")
    os.environ["ULSWEEP_CACHE"] = str(d)
    yield d
    if old is None:
        os.environ.pop("ULSWEEP_CACHE", None)
    else:
        os.environ["ULSWEEP_CACHE"] = old
