"""bench/neighborhood_bound.py: the fused CPU kernel's two bounds on the bench's shapes, cache-resident arithmetic
and the kernel-1 floor."""

from __future__ import annotations

import contextlib
import io

import pytest

from common.ops import neighborhood_cpu
from tests.helpers import load_bench


@pytest.fixture(scope="module")
def report():
    """The bench's two tables at --repeats 1 on one thread: {table title: {shape: columns}}, and the lines."""
    if not neighborhood_cpu.ensure_built(warn=False):
        pytest.skip(f"the fused CPU kernel is unavailable: {neighborhood_cpu.problem()}")
    bound = load_bench("neighborhood_bound")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert bound.main(["--repeats", "1", "--threads", "1"]) == 0
    lines = [line for line in out.getvalue().splitlines() if line]
    split = next(i for i, line in enumerate(lines) if line.startswith("The floor:"))
    # the floor table ends where the GEMM's rates (and any UNSTEADY lines) begin
    end = next(i for i, line in enumerate(lines) if line.startswith("GEMM GFLOP/s (median) by shape:"))
    tables = {}
    for title, part in (("cache", lines[:split]), ("floor", lines[split:end])):
        tables[title] = {line[:14].strip(): line[14:].split() for line in part[2:] if not line.startswith("  ")}
    return bound, tables, lines


def test_every_shape_of_the_bench_gets_a_projected_share_of_the_gemm(report):
    bound, tables, lines = report
    assert "projected to 1 thread;" in lines[0] and "GEMM 1024^3 on 1 thread " in lines[0]
    rows = tables["cache"]
    assert list(rows) == list(bound.SHAPES)
    for name, (batch, heads, *_) in bound.SHAPES.items():
        per_plane, planes, projected, rate, share = rows[name]
        assert int(planes) == batch * heads
        # projected = per plane x planes / threads (1 here), as printed (us -> ms, rounded)
        assert float(projected) == pytest.approx(float(per_plane) * batch * heads / 1e3, rel=0.01, abs=0.01)
        assert float(rate) > 0 and 0 < float(share.rstrip("%")) < 1000


def test_the_floor_bounds_each_shape_by_its_kernel_1_step(report):
    bound, tables, lines = report
    rows = tables["floor"]
    assert list(rows) == list(bound.SHAPES)
    for name in bound.SHAPES:
        step, kernel_1, ratio, share, ceiling = rows[name]
        assert float(ratio) == pytest.approx(float(kernel_1) / float(step), rel=0.02, abs=0.01)
        share, ceiling = float(share.rstrip("%")), float(ceiling.rstrip("%"))
        # the same FLOPs over each time: share / ceiling = kernel-1 time / step time (from the ms columns: the
        # ratio column's two decimals are up to 3% off at k=11, where it reads about 0.18)
        assert share == pytest.approx(ceiling * float(kernel_1) / float(step), rel=0.01, abs=0.1)
        out_of_reach = [line for line in lines if line.startswith(f"  {name}: even at kernel 1")]
        if abs(ceiling - 100 * bound.GEMM_SHARE_TARGET) > 0.05:  # printed to 0.1 point: on the line, either way
            assert bool(out_of_reach) == (ceiling < 100 * bound.GEMM_SHARE_TARGET)

