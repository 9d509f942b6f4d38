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


def test_a_shape_whose_gemm_ran_slow_is_flagged_with_its_share_against_the_fastest_round():
    bench = load_bench("neighborhood")
    medians = {"headline": 171e9, "kernel 3": 90e9, "d=32": 0.86 * 180e9}
    assert bench.unsteady_gemm(medians, 180e9) == {"kernel 3": 0.5}  # 0.86 and 0.95: a quiet run's spread
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        bench.report_unsteady(medians, {"headline": 0.25, "kernel 3": 0.16, "d=32": 0.30}, 180e9)
    lines = out.getvalue().split("\n")
    assert ("GEMM GFLOP/s (median) by shape: headline 171.0; kernel 3 90.0; d=32 154.8; "
            "fastest round of the run 180.0") in lines
    flagged = [line for line in lines if line.startswith("UNSTEADY")]
    assert len(flagged) == 1
    assert flagged[0].startswith("UNSTEADY kernel 3: its GEMM ran at 50% of this run's fastest round")
    assert "its 16.0% of the GEMM is not a result (8.0% against the fastest round)" in flagged[0]


def test_a_run_slowed_throughout_is_flagged_against_its_fastest_round():
    bench = load_bench("neighborhood")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        bench.report_unsteady({"headline": 143e9}, {"headline": 0.279}, 185e9)
    assert "UNSTEADY headline: its GEMM ran at 77% of this run's fastest round" in out.getvalue()
