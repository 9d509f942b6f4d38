"""SASA's FLOPs: the layer and the stem count their formulas, and ResNet-26 with either stem counts within 10%
of the paper's Table 1 at 224x224."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from common.inspect.timing import count_macs
from sasa import BlockSelfAttention2d, LocalSelfAttention2d
from tests.helpers import metafile_entry, paper_gflops


@pytest.mark.parametrize("stem", ["imagenet", "attention"])
def test_resnet26_counts_the_papers_flops(stem):
    ours, paper, counts = paper_gflops(metafile_entry("sasa", "sasa_resnet26", stem=stem))
    assert abs(ours / paper - 1) < 0.10, (ours, paper)
    assert counts["attention_flops.neighborhood_attention"] > 0


@pytest.mark.parametrize("backend", ["reference", "tiled"])
def test_layer_counts_projections_and_the_neighbourhood_formula(backend):
    torch.manual_seed(0)
    c_in, c_out, k, h, w = 6, 8, 3, 5, 7
    layer = LocalSelfAttention2d(c_in, c_out, kernel_size=k, heads=2, backend=backend)
    projections = 3 * h * w * c_in * c_out
    attention = h * w * k * k * (c_out + c_out + c_out)  # q.k, q.r and the weighted sum of v, all heads
    assert count_macs(layer, (c_in, h, w)) == projections + attention
    x = torch.randn(2, c_in, h, w, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        layer(x).sum().backward()
    backward = counter.get_flop_counts()["Global"]
    assert {str(op): n for op, n in backward.items() if "attention" in str(op)} == {
        "attention_flops.neighborhood_attention": 2 * 2 * attention,
        "attention_flops.neighborhood_attention_backward": 4 * 2 * attention}


def test_stem_attention_counts_its_formula():
    torch.manual_seed(0)
    c_in, c_out, s, h, w = 3, 16, 4, 8, 12
    stem = BlockSelfAttention2d(c_in, c_out, block_size=s, heads=4)
    projections = 2 * h * w * c_in * c_out + h * w * c_in * c_out  # q, k, and the spatially aware values
    attention = h * w * s * s * 3 * c_out  # q.k, q.r and the weighted sum of v over each pixel's block
    mixture = s * s * (16 * 4 + 4 * c_out * c_in)  # p(a, b, m) and the mixed value matrices, once per image
    assert count_macs(stem, (c_in, h, w)) == projections + attention + mixture
