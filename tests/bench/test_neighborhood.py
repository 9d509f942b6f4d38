"""bench/neighborhood.py: which backends it times on each device (the first GPU run timed `fused_cpu` on CUDA,
where it only ran `tiled` again), and which shapes' shares of the GEMM it flags as measured on a busy machine."""

from __future__ import annotations

import contextlib
import io

import torch

from tests.helpers import load_bench


def test_each_device_times_its_own_backends():
    bench = load_bench("neighborhood")
    on_cuda = bench.backends_for(torch.device("cuda"), "headline")
    assert "fused_cpu" not in on_cuda and {"reference", "tiled"} <= set(on_cuda)
    on_cpu = bench.backends_for(torch.device("cpu"), "headline")
    assert "triton" not in on_cpu and {"reference", "tiled"} <= set(on_cpu)
    assert "reference" not in bench.backends_for(torch.device("cpu"), "kernel 3")  # seconds per step there


def test_a_shape_whose_gemm_ran_slow_is_flagged_with_its_share_against_the_fastest():
    bench = load_bench("neighborhood")
    rates = {"headline": 180e9, "kernel 3": 90e9, "d=32": 0.86 * 180e9}
    assert bench.unsteady_gemm(rates) == {"kernel 3": 0.5}  # 0.86 of the fastest is within a quiet run's spread
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        bench.report_unsteady(rates, {"headline": 0.25, "kernel 3": 0.16, "d=32": 0.30})
    lines = out.getvalue().split("\n")
    assert "GEMM GFLOP/s by shape: headline 180.0; kernel 3 90.0; d=32 154.8" in lines
    flagged = [line for line in lines if line.startswith("UNSTEADY")]
    assert len(flagged) == 1 and flagged[0].startswith("UNSTEADY kernel 3: its GEMM ran at 50% of this run's fastest")
    assert "its 16.0% of the GEMM is not a result (8.0% against the fastest)" in flagged[0]


def test_one_shape_alone_has_nothing_to_be_compared_with():
    bench = load_bench("neighborhood")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        bench.report_unsteady({"headline": 90e9}, {"headline": 0.3})
    assert out.getvalue() == ""
