"""Every pairwise relation and patchwise variant against the paper's equations written out per pixel."""

from __future__ import annotations

import pytest
import torch

from san import SelfAttention2d
from san.relations import PAIRWISE, PATCHWISE
from tests.san.brute_force import pairwise_pixel, patchwise_pixel, randomise


def layer(mode, relation, padding, kernel_size=5, **kwargs):
    # 16 value channels in 4 groups of 4, so sharing is visible; k = 5, so reflection mirrors 2 deep
    return randomise(SelfAttention2d(6, 4, 16, kernel_size, mode=mode, relation=relation, share_planes=4,
                                     padding=padding, **kwargs))


# the four corners, an edge pixel, and the two pixels whose 5 x 5 window lies inside the 5 x 6 map
PIXELS = [(0, 0), (0, 5), (4, 0), (4, 5), (1, 3), (2, 2), (2, 3)]


def check_pixels(m, by_hand):
    x = torch.randn(2, 6, 5, 6)
    with torch.no_grad():
        y = m(x)
        for i, j in PIXELS:
            assert torch.allclose(y[0, :, i, j], by_hand(m, x, i, j), atol=1e-4, rtol=1e-4), (i, j)


@pytest.mark.parametrize("padding", ["reflection", "zeros"])
@pytest.mark.parametrize("relation", PAIRWISE)
def test_pairwise_relation_matches_the_equation(relation, padding):
    check_pixels(layer("pairwise", relation, padding), pairwise_pixel)


def test_pairwise_without_the_position_term():
    m = layer("pairwise", "subtraction", "zeros", position=False)
    assert m.weights.position is None and m.weights.gamma.bn1.num_features == 4
    check_pixels(m, pairwise_pixel)


@pytest.mark.parametrize("padding", ["reflection", "zeros"])
@pytest.mark.parametrize("relation", PATCHWISE)
def test_patchwise_variant_matches_the_equation(relation, padding):
    kernel_size = 3 if relation == "clique" else 5  # the clique has k^4 terms per pixel
    check_pixels(layer("patchwise", relation, padding, kernel_size), patchwise_pixel)


@pytest.mark.parametrize("mode, relation, width", [
    ("pairwise", "summation", 4 + 2), ("pairwise", "concatenation", 8 + 2), ("pairwise", "dot", 1 + 2),
    ("patchwise", "star", 9), ("patchwise", "clique", 81), ("patchwise", "concatenation", 4 * 10)])
def test_gamma_input_widths(mode, relation, width):
    m = SelfAttention2d(6, 4, 16, 3, mode=mode, relation=relation)
    assert m.weights.gamma.bn1.num_features == width


@pytest.mark.parametrize("mode, relation", [("pairwise", "star"), ("patchwise", "subtraction"), ("pairwise", "sum")])
def test_relation_must_belong_to_the_mode(mode, relation):
    with pytest.raises(ValueError, match=f"{mode} relation must be one of"):
        SelfAttention2d(6, 4, 16, 3, mode=mode, relation=relation)
