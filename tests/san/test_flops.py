"""SAN's FLOPs: both formulations of the aggregation count B * C * H * W * k^2 multiply-accumulates (it is all
element-wise work to the plain counter), and SAN10 counts within 10% of the paper's multiply-adds."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from san.aggregation import aggregate, aggregate_unfold, aggregation_macs
from tests.helpers import metafile_entry, paper_gflops

K, GROUPS, SHARE, H, W = 3, 2, 3, 4, 5


@pytest.mark.parametrize("fn", [aggregate, aggregate_unfold])
def test_aggregation_counts_its_formula_forward_and_backward(fn):
    torch.manual_seed(0)
    weights = torch.randn(2, GROUPS, K * K, H, W, requires_grad=True)
    values = torch.randn(2, GROUPS * SHARE, H, W, requires_grad=True)
    macs = 2 * GROUPS * SHARE * H * W * K * K
    assert aggregation_macs(weights, values, K, "reflection") == macs
    with FlopCounterMode(display=False) as counter:
        out = fn(weights, values, K, "reflection")
        grads = torch.autograd.grad(out.square().sum(), [weights, values])
    assert {str(op).split(".")[-1]: n for op, n in counter.get_flop_counts()["Global"].items()} == {
        "san_aggregation": 2 * macs, "san_aggregation_backward": 4 * macs}
    plain = fn(weights, values, K, "reflection")
    torch.testing.assert_close(out, plain, rtol=0, atol=0)
    torch.testing.assert_close(grads, torch.autograd.grad(plain.square().sum(), [weights, values]), rtol=0, atol=0)


def test_san10_counts_the_papers_multiply_adds():
    ours, paper, counts = paper_gflops(metafile_entry("san", "san10_patchwise", stem="imagenet",
                                                      relation="concatenation"))
    assert abs(ours / paper - 1) < 0.10, (ours, paper)
    assert counts["attention_flops.san_aggregation"] > 0
