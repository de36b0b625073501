"""Fixtures shared by several test modules (plain helpers live in tests/helpers.py)."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for modules whose tensors are tiny: on a busy 2-core machine OpenMP's threads
    only add synchronization (single ops measured up to 1000x slower with two). Opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
