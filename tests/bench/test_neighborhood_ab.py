"""bench/neighborhood_ab.py: two builds of the fused CPU kernel timed against each other in one process."""

from __future__ import annotations

import subprocess

import pytest

from common.ops import neighborhood_cpu
from tests.helpers import REPO, load_bench

KERNEL = REPO / "common" / "ops" / "csrc" / "neighborhood_cpu.cpp"


def test_ratios_read_variant_over_base():
    ab = load_bench("neighborhood_ab")
    assert ab.ratios([1.0, 2.0, 3.0], [2.0, 4.0, 6.0]) == (2.0, 2.0)  # a variant twice as slow reads 2
    # the two measures differ when the noise does: medians 1 -> 2, rounds' ratios 3, 1, 0.5
    assert ab.ratios([1.0, 1.0, 4.0], [3.0, 1.0, 2.0]) == (2.0, 1.0)


@pytest.mark.parametrize("args, says", [
    (["no-such-revision", str(KERNEL)], "neither a file nor a git revision"),
    ([str(REPO / "README.md"), str(KERNEL)], "does not register the neighborhood_cpu ops"),
    ([str(KERNEL), str(KERNEL), "--rounds", "0"], "--rounds and --threads must be at least 1"),
])
def test_bad_input_is_one_line_and_exit_2(args, says, capsys):
    ab = load_bench("neighborhood_ab")
    assert ab.main(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and says in err


def test_a_git_revision_reads_the_kernel_at_that_revision():
    if subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    ab = load_bench("neighborhood_ab")
    committed = subprocess.run(["git", "-C", str(REPO), "show", "HEAD:common/ops/csrc/neighborhood_cpu.cpp"],
                               capture_output=True, text=True, check=True).stdout
    source, label = ab.read_source("HEAD")
    assert source == committed and label.startswith("HEAD (")


def test_the_same_source_is_one_build_run_as_both(capsys):
    if not neighborhood_cpu.ensure_built(warn=False):
        pytest.skip(f"the fused CPU kernel is unavailable: {neighborhood_cpu.problem()}")
    ab = load_bench("neighborhood_ab")
    shape = "B=16, 4x4, d=16"
    assert ab.main([str(KERNEL), str(KERNEL), "--shape", shape, "--rounds", "1", "--threads", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "(the same build: an A/A run)" in lines[0] and "1 thread," in lines[0]
    assert lines[2].startswith(shape)
    base_ms, variant_ms, of_medians, of_rounds, diff, _load = (float(x) for x in lines[2][len(shape):].split())
    assert base_ms > 0 and variant_ms > 0
    assert of_medians == pytest.approx(variant_ms / base_ms, rel=0.01) and of_rounds == pytest.approx(of_medians)
    assert diff == 0.0  # one build: bitwise the same results
