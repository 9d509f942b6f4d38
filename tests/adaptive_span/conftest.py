"""One intra-op thread for the adaptive-span tests (as in tests/san).

Their ops are tiny; on the shared 2-core machine two OpenMP threads per op mostly wait for each other when
other jobs hold a core: one forward+backward of the tiny training test's network took 3.5 s with 2 threads
and 0.07 s with 1.
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
