"""One intra-op thread for the SAN tests.

They run many small ops (the per-offset aggregation, 1x1 convs on small maps). On the shared
2-core machine, two OpenMP threads per op spend most of their time waiting for each other when
other jobs hold a core: the six CIFAR training steps took 80 s with 2 threads and 8 s with 1.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
