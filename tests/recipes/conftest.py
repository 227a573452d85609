"""One intra-op thread for these tiny models: on a shared 2-core machine, two OpenMP threads on
ops this small spend most of their time waiting for each other (30x slower under load)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
