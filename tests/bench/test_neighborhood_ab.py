"""bench/neighborhood_ab.py: two builds of the fused CPU kernel timed against each other in one process."""

from __future__ import annotations

import subprocess

import pytest
import torch

from common.ops import jit_build, neighborhood_cpu
from common.ops import neighborhood as nb
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


def test_a_build_calls_its_own_ops():
    """The kernel's autograd op calls its forward and backward ops by name: a renamed build must call its own, not
    the library's (a variant would otherwise be timed with the base's kernel behind its autograd)."""
    if not neighborhood_cpu.ensure_built(warn=False):
        pytest.skip(f"the fused CPU kernel is unavailable: {neighborhood_cpu.problem()}")
    ab = load_bench("neighborhood_ab")
    namespace = ab.load_build(KERNEL.read_text(), [])
    renamed = (jit_build.cache_root() / "neighborhood_ab" / f"{namespace}.cpp").read_text()
    assert f'"{namespace}::forward"' in renamed and f'"{namespace}::backward"' in renamed
    assert '"neighborhood_cpu::' not in renamed
    q, k, v = (torch.randn(1, 2, 5, 6, 4, requires_grad=True) for _ in range(3))
    out = getattr(torch.ops, namespace).attention(q, k, v, None, None, 3, True, False)[0]
    want = nb.reference_attention(q, k, v, 3)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    for got, expected in zip(torch.autograd.grad(out.sum(), (q, k, v)), torch.autograd.grad(want.sum(), (q, k, v))):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
