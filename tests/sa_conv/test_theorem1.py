"""Theorem 1: conv_as_attention(conv, alpha) tends to the conv as alpha grows, down to float64 round-off."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from sa_conv import conv_as_attention
from sa_conv.theorem1 import QuadraticAttention2d, kernel_shifts, quadratic_encoding, relative_error

ALPHAS = [0.5, 1, 2, 4, 8, 16, 24]


def conv64(kernel_size, d_in=3, d_out=5, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Conv2d(d_in, d_out, kernel_size, padding=kernel_size // 2, bias=bias).double()


@pytest.mark.parametrize("kernel_size,shape", [(3, (6, 9)), (5, (7, 5))])
def test_error_falls_with_alpha_to_float64_round_off(kernel_size, shape):
    conv = conv64(kernel_size)
    x = torch.randn(2, 3, *shape, dtype=torch.float64)
    layer = conv_as_attention(conv, 40.0)
    assert isinstance(layer, QuadraticAttention2d) and layer.heads == kernel_size ** 2
    assert layer(x).shape == conv(x).shape
    errors = [relative_error(conv, conv_as_attention(conv, a), x) for a in ALPHAS]
    assert all(later < earlier for earlier, later in zip(errors, errors[1:]))
    assert all(later < 0.3 * earlier for earlier, later in zip(errors[2:], errors[3:]))  # ~exp(-alpha)
    assert errors[0] > 0.1
    assert relative_error(conv, layer, x) < 1e-12


def test_any_input_and_no_bias():
    conv = conv64(3, d_in=2, d_out=4, bias=False)
    layer = conv_as_attention(conv, 40.0)
    for x in (torch.randn(1, 2, 1, 1, dtype=torch.float64), torch.randn(3, 2, 4, 11, dtype=torch.float64),
              torch.zeros(1, 2, 3, 3, dtype=torch.float64)):
        assert torch.allclose(layer(x), conv(x), rtol=0, atol=1e-12)


def test_head_dim_below_d_out_expresses_the_first_d_h_channels():
    # min(D_h, D_out): each head passes D_h channels, so only D_h output channels can be the conv's.
    conv = conv64(3, d_in=3, d_out=5)
    x = torch.randn(2, 3, 5, 6, dtype=torch.float64)
    layer = conv_as_attention(conv, 40.0, head_dim=2)
    assert layer.head_dim == 2 and layer.value.shape == (9, 3, 2)
    y = layer(x)
    assert torch.allclose(y[:, :2], conv(x)[:, :2], rtol=0, atol=1e-12)
    assert torch.equal(y[:, 2:], torch.zeros_like(y[:, 2:]))
    wide = conv_as_attention(conv, 40.0, head_dim=8)  # D_h > D_out: all D_out channels
    assert relative_error(conv, wide, x) < 1e-12


def test_scores_are_the_quadratic_encoding():
    # v_h . r_delta = -alpha ||delta - Delta_h||^2 + alpha ||Delta_h||^2 with r_delta = (||delta||^2, dy, dx).
    r = quadratic_encoding(3, 4, padding=1, dtype=torch.float64)
    assert r.shape == (12, 30, 3)
    layer = conv_as_attention(conv64(3), 2.0)
    delta = r[..., 1:]
    for h, shift in enumerate(kernel_shifts(3)):
        shift = torch.tensor(shift, dtype=torch.float64)
        want = -2.0 * ((delta - shift) ** 2).sum(-1) + 2.0 * (shift ** 2).sum()
        assert torch.allclose(r @ layer.v[h].detach(), want)


def test_float32_plateaus_at_its_round_off():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    assert relative_error(conv, conv_as_attention(conv, 40.0), torch.randn(1, 3, 8, 8)) < 1e-5


@pytest.mark.parametrize("conv,match", [
    (nn.Conv2d(2, 2, 4, padding=2), "odd square kernel"),
    (nn.Conv2d(2, 2, 3, padding=1, stride=2), "stride 1"),
    (nn.Conv2d(2, 2, 3, padding=0), "zero padding"),
    (nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), "zero padding"),
])
def test_convs_outside_the_theorem_are_refused(conv, match):
    with pytest.raises(ValueError, match=match):
        conv_as_attention(conv, 10.0)


def test_figure_is_shipped():
    assert (Path(__import__("sa_conv").__file__).parent / "theorem1.png").stat().st_size > 10_000
