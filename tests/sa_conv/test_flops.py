"""Self-attention as convolution, FLOPs: the attention layer counts the formula of the module docstring for every
kind of score; q.r counts its H row and W column logits per query, not the products over every table row."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from common.inspect.timing import count_macs
from sa_conv.attention import ATTENTIONS, ImageSelfAttention, relative_logits, relative_logits_macs

HIDDEN, HEADS, GRID = 8, 3, (4, 5)


def docstring_macs(attention: str) -> int:
    q, (h, w), e = GRID[0] * GRID[1], GRID, HIDDEN // 2
    macs = HEADS * q * q * HIDDEN + q * HEADS * HIDDEN * HIDDEN  # weighted sums, W_value
    projection = q * HIDDEN * HEADS * HIDDEN
    macs += {"quadratic": 0,
             "quadratic_aniso": HEADS * 2 * 2 * 2,  # the 2x2 precision S S^T of each head
             "learned": HEADS * (2 * h - 1 + 2 * w - 1) * HIDDEN,
             "learned_query": projection + HEADS * q * (h + w) * e,
             "learned_content": 2 * projection + HEADS * q * (h + w) * e + HEADS * q * q * HIDDEN}[attention]
    return macs


@pytest.mark.parametrize("attention", ATTENTIONS)
def test_layer_counts_the_docstring_formula(attention):
    torch.manual_seed(0)
    layer = ImageSelfAttention(HIDDEN, HEADS, attention=attention, grid=GRID)
    assert count_macs(layer, (*GRID, HIDDEN)) == docstring_macs(attention)


def test_relative_logits_count_their_formula_and_keep_their_gradients():
    torch.manual_seed(0)
    layer = ImageSelfAttention(HIDDEN, HEADS, attention="learned_query", grid=(6, 7))
    scores = layer.scores
    q = torch.randn(2, HEADS, *GRID, HIDDEN, requires_grad=True)
    index = scores.offset_index(*GRID, q.device)
    macs = 2 * HEADS * GRID[0] * GRID[1] * (GRID[0] + GRID[1]) * (HIDDEN // 2)
    assert relative_logits_macs(q, scores.row, scores.col, *index) == macs
    with FlopCounterMode(display=False) as counter:
        out = relative_logits(q, scores.row, scores.col, *index)
        grads = torch.autograd.grad(out.square().sum(), [q, scores.row, scores.col])
    assert {str(op).split(".")[-1]: n for op, n in counter.get_flop_counts()["Global"].items()} == {
        "sa_conv_relative_logits": 2 * macs, "sa_conv_relative_logits_backward": 4 * macs}
    plain = relative_logits(q, scores.row, scores.col, *index)
    torch.testing.assert_close(grads, torch.autograd.grad(plain.square().sum(), [q, scores.row, scores.col]),
                               rtol=0, atol=0)
