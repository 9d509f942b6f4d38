"""bench/neighborhood_bound.py: the fused CPU kernel with its data in the caches, projected to the bench's shapes."""

from __future__ import annotations

import pytest

from common.ops import neighborhood_cpu
from tests.helpers import load_bench


def test_every_shape_of_the_bench_gets_a_projected_share_of_the_gemm(capsys):
    if not neighborhood_cpu.ensure_built(warn=False):
        pytest.skip(f"the fused CPU kernel is unavailable: {neighborhood_cpu.problem()}")
    bound = load_bench("neighborhood_bound")
    assert bound.main(["--repeats", "1", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "projected to 1 thread;" in lines[0] and "GEMM 1024^3 on 1 thread " in lines[0]
    rows = {line[:14].strip(): line[14:].split() for line in lines[2:]}
    assert list(rows) == list(bound.SHAPES)
    for name, (batch, heads, *_) in bound.SHAPES.items():
        per_plane, planes, projected, rate, share = rows[name]
        assert int(planes) == batch * heads
        # projected = per plane x planes / threads (1 here), as printed (us -> ms, rounded)
        assert float(projected) == pytest.approx(float(per_plane) * batch * heads / 1e3, rel=0.01, abs=0.01)
        assert float(rate) > 0 and 0 < float(share.rstrip("%")) < 1000
