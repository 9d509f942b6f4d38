"""bench/neighborhood.py: which backends it times on each device (the first GPU run timed `fused_cpu` on CUDA,
where it only ran `tiled` again)."""

from __future__ import annotations

import torch

from tests.helpers import load_bench


def test_each_device_times_its_own_backends():
    bench = load_bench("neighborhood")
    on_cuda = bench.backends_for(torch.device("cuda"), "headline")
    assert "fused_cpu" not in on_cuda and {"reference", "tiled"} <= set(on_cuda)
    on_cpu = bench.backends_for(torch.device("cpu"), "headline")
    assert "triton" not in on_cpu and {"reference", "tiled"} <= set(on_cpu)
    assert "reference" not in bench.backends_for(torch.device("cpu"), "kernel 3")  # seconds per step there
