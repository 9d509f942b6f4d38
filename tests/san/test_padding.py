"""Reflection against zero padding in a whole attention layer: the border differs, the interior does not."""

from __future__ import annotations

import pytest
import torch

from san import SelfAttention2d
from tests.san.brute_force import randomise


@pytest.mark.parametrize("mode", ["pairwise", "patchwise"])
def test_reflection_and_zeros_differ_only_at_the_border(mode):
    reflected, zeros = (randomise(SelfAttention2d(6, 4, 16, 5, mode=mode, padding=p)) for p in ("reflection", "zeros"))
    zeros.load_state_dict(reflected.state_dict())
    x = torch.randn(1, 6, 9, 10)
    with torch.no_grad():  # eval mode: batch norms use running statistics, so pixels do not interact
        diff = (reflected(x) - zeros(x)).abs().amax(1)[0]
    r = 2
    assert diff[r:-r, r:-r].max() < 1e-5  # every window inside the image: the same pixels and positions
    border = torch.ones_like(diff, dtype=torch.bool)
    border[r:-r, r:-r] = False
    assert (diff[border] > 1e-4).all()


def test_reflection_needs_a_map_larger_than_the_window_radius():
    m = SelfAttention2d(6, 4, 16, 7, padding="reflection")
    with pytest.raises(ValueError, match="reflection padding of 3 needs a feature map larger than 3"):
        m(torch.randn(1, 6, 3, 3))
    SelfAttention2d(6, 4, 16, 7, padding="zeros")(torch.randn(1, 6, 3, 3))  # zeros has no such limit
