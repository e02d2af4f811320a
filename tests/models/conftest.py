"""Model tests run tiny networks: one intra-op thread avoids thread overhead and oversubscription
when the CPU is shared (they are 3-10x slower with the default thread pool on a loaded 2-core box)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
