"""bench/neighborhood.py: which backends it times on each device (the first GPU run timed `fused_cpu` on CUDA,
where it only ran `tiled` again), and which shapes' shares of the GEMM it flags as measured on a busy machine."""

from __future__ import annotations

import contextlib
import io

import torch

from common.inspect.rounds import Workload
from tests.helpers import load_bench


def test_each_device_times_its_own_backends():
    bench = load_bench("neighborhood")
    on_cuda = bench.backends_for(torch.device("cuda"), "headline")
    assert "fused_cpu" not in on_cuda and {"reference", "tiled"} <= set(on_cuda)
    on_cpu = bench.backends_for(torch.device("cpu"), "headline")
    assert "triton" not in on_cpu and {"reference", "tiled"} <= set(on_cpu)
    assert "reference" not in bench.backends_for(torch.device("cpu"), "kernel 3")  # seconds per step there


def record(gemm_rate, share, gemm_best=180e9, **spread):
    return {"gemm_rate": gemm_rate, "gemm_best": gemm_best, "share": share,
            "spread": {"fused_cpu": 1.05, "conv3x3": 1.1, **spread}}


def test_a_shape_whose_gemm_ran_slow_is_flagged_with_its_share_against_the_fastest_round():
    bench = load_bench("neighborhood")
    records = {"headline": record(171e9, 0.25), "kernel 3": record(90e9, 0.16), "d=32": record(0.86 * 180e9, 0.30)}
    assert bench.disturbed(records["headline"], 180e9) == [] == bench.disturbed(records["d=32"], 180e9)
    assert bench.disturbed(records["kernel 3"], 180e9) == [
        "its GEMM ran at 50% of this run's fastest round (against which its share is 8.0%)"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        bench.report_unsteady(records)  # the run's fastest GEMM round: 180 GFLOP/s, from the records
    lines = out.getvalue().split("\n")
    assert ("GEMM GFLOP/s (median) by shape: headline 171.0; kernel 3 90.0; d=32 154.8; "
            "fastest round of the run 180.0") in lines
    flagged = [line for line in lines if line.startswith("UNSTEADY")]
    assert len(flagged) == 1 and flagged[0].startswith("UNSTEADY kernel 3: its GEMM ran at 50%")
    assert "so this shape's figures (its 16.0% of the GEMM among them) are not results" in flagged[0]


def test_a_run_slowed_throughout_is_flagged_against_its_fastest_round():
    bench = load_bench("neighborhood")
    assert bench.disturbed(record(143e9, 0.279), 185e9)[0].startswith("its GEMM ran at 77% of this run's fastest")


def test_a_step_whose_rounds_were_mostly_slowed_is_flagged_though_its_gemm_ran_steadily():
    bench = load_bench("neighborhood")
    assert bench.disturbed(record(178e9, 0.178, fused_cpu=1.84), 185e9) == [
        "fused_cpu's median is 1.84x its fastest round"]
    assert bench.disturbed(record(178e9, 0.178, fused_cpu=1.2), 185e9) == []  # a quiet run's spread


def test_steadiness_reads_the_rounds():
    bench = load_bench("neighborhood")
    gemm = Workload("gemm", lambda: None, samples=[[0.02], [0.01], [0.04]])
    step = Workload("fused_cpu", lambda: None, samples=[[0.003], [0.006], [0.009]])
    got = bench.steadiness({"gemm": gemm, "fused_cpu": step}, 0.25, ["fused_cpu"])
    flops = 2 * bench.GEMM_N ** 3
    assert got == {"gemm_rate": flops / 0.02, "gemm_best": flops / 0.01, "share": 0.25, "spread": {"fused_cpu": 2.0}}
