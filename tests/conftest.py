"""Fixtures shared by several test modules (plain helpers live in tests/helpers.py)."""
import os

import pytest
import torch


def pytest_configure(config):
    """`make test` runs one pytest-xdist worker per core: each worker, and every CLI it starts (the variable is
    inherited), gets one OpenMP thread unless OMP_NUM_THREADS says otherwise, so that two workers do not
    run four threads on two cores."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules whose tensors are tiny: on a busy 2-core machine OpenMP's threads
    only add synchronization (single ops measured up to 1000x slower with two). Opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
