import os

import pytest
import torch

# Two cores on CI: keep torch from oversubscribing them when Ray or helpers run beside a test, and under
# pytest-xdist (pyproject's addopts) share the cores between the test processes.
_PROCESSES = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _PROCESSES)))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def pytest_collection_modifyitems(config, items):
    """Files with the most end-to-end (`slow`) tests first, the rest in their own order: xdist's two processes
    take whole files in this order (--dist loadfile), and a long file started last would run on alone."""
    weight: dict = {}
    for it in items:
        weight[it.path] = weight.get(it.path, 0) + bool(it.get_closest_marker("slow"))
    items.sort(key=lambda it: -weight[it.path])  # stable: a file's tests keep their order


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
