"""The aggregation y_i = sum_j alpha_ij (.) beta_j with channel-shared weights: against a loop, gradients, padding."""

from __future__ import annotations

import pytest
import torch

from san.aggregation import aggregate, aggregate_unfold
from san.footprint import fold_reflected, neighbour_index, pad, pad_adjoint

K, GROUPS, SHARE, H, W = 3, 2, 3, 4, 5


def inputs(dtype=torch.float32, requires_grad=False):
    torch.manual_seed(0)
    weights = torch.randn(2, GROUPS, K * K, H, W, dtype=dtype, requires_grad=requires_grad)
    values = torch.randn(2, GROUPS * SHARE, H, W, dtype=dtype, requires_grad=requires_grad)
    return weights, values


def by_loop(weights, values, padding):
    """Channel c uses weight group c mod G; outside pixels are mirrored or zero."""
    out = torch.zeros_like(values)
    r = K // 2
    ny, nx = neighbour_index(H, K, padding), neighbour_index(W, K, padding)
    for c in range(values.shape[1]):
        for i in range(H):
            for j in range(W):
                for a in range(K):
                    for b in range(K):
                        y, x = ny[i, a], nx[j, b]
                        if 0 <= y < H and 0 <= x < W:
                            out[:, c, i, j] += weights[:, c % GROUPS, a * K + b, i, j] * values[:, c, y, x]
    assert r == 1
    return out


@pytest.mark.parametrize("padding", ["reflection", "zeros"])
def test_shared_channels_match_a_loop(padding):
    weights, values = inputs()
    expected = by_loop(weights, values, padding)
    assert torch.allclose(aggregate(weights, values, K, padding), expected, atol=1e-5)
    assert torch.allclose(aggregate_unfold(weights, values, K, padding), expected, atol=1e-5)


@pytest.mark.parametrize("padding", ["reflection", "zeros"])
def test_hand_written_backward_passes_gradcheck(padding):
    weights, values = inputs(torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, v: aggregate(w, v, K, padding), (weights, values))


def test_reflection_and_zeros_differ_only_at_the_border():
    weights, values = inputs()
    reflected, zeros = (aggregate(weights, values, K, p) for p in ("reflection", "zeros"))
    interior = (..., slice(1, H - 1), slice(1, W - 1))
    assert torch.equal(reflected[interior], zeros[interior])
    border = torch.ones(H, W, dtype=torch.bool)
    border[1:H - 1, 1:W - 1] = False
    assert ((reflected - zeros).abs()[..., border] > 1e-4).all()


def test_reflected_offsets_fold_onto_the_mirrored_pixel():
    # Pixel (0, 0), window 3 x 3: offset (-1, -1) reads pixel (1, 1), i.e. offset (+1, +1).
    weights = torch.zeros(1, 1, H, W, K * K)
    weights[0, 0, 0, 0, 0] = 1.0
    folded = fold_reflected(weights, K)
    assert folded[0, 0, 0, 0, 8] == 1.0 and folded.sum() == 1.0


@pytest.mark.parametrize("radius", [1, 2, 3])
@pytest.mark.parametrize("padding", ["reflection", "zeros"])
def test_pad_adjoint_is_the_gradient_of_pad(padding, radius):
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(2, 3, 4 + 2 * radius, 5 + 2 * radius, dtype=torch.float64)
    expected, = torch.autograd.grad(pad(x, radius, padding), x, grad)
    assert torch.allclose(pad_adjoint(grad, radius, padding), expected)
