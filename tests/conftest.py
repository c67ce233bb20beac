"""Shared test setup."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    # the tests use tiny tensors: a second intra-op thread only adds spin-wait overhead, which turns into
    # 10-50x slowdowns when another process shares the two cores
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
