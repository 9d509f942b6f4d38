"""AugmentedConv2d: branch layout, head bookkeeping, any H x W, stride 2, the declared maximum, attention capture."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import aacn.layer
from aacn import AugmentedConv2d
from common.inspect.capture import record_attention


def layer(relative=True, stride=1, max_size=8, out_channels=12, dv=8, heads=2, dk=8, seed=0):
    # dv / heads = 4 channels per value head: a merge without the transpose would mix space into channels.
    torch.manual_seed(seed)
    return AugmentedConv2d(4, out_channels, 3, dk=dk, dv=dv, heads=heads, relative=relative, stride=stride,
                           max_size=max_size).double()


def test_output_is_the_conv_branch_then_the_attention_branch():
    m, x = layer(), torch.randn(2, 4, 5, 7, dtype=torch.float64)
    y = m(x)
    assert y.shape == (2, 12, 5, 7)
    assert torch.equal(y[:, :4], m.conv(x)) and torch.allclose(y[:, 4:], m.attend(x))


def test_attention_branch_without_relative_logits_is_equivariant_to_circular_shifts():
    # Global attention without positions commutes with any relabelling of the positions, a
    # circular shift included; scrambled heads (space reshaped into channels) would break it.
    m, x = layer(relative=False), torch.randn(2, 4, 5, 7, dtype=torch.float64)
    shifted = torch.roll(x, shifts=(2, 3), dims=(2, 3))
    assert torch.allclose(m.attend(shifted), torch.roll(m.attend(x), shifts=(2, 3), dims=(2, 3)), atol=1e-12)


def test_attention_branch_without_relative_logits_is_equivariant_to_position_permutations():
    m, x = layer(relative=False), torch.randn(2, 4, 5, 7, dtype=torch.float64)
    perm = torch.randperm(35, generator=torch.Generator().manual_seed(1))
    permuted = x.flatten(2)[..., perm].view_as(x)
    expected = m.attend(x).flatten(2)[..., perm]
    assert torch.allclose(m.attend(permuted).flatten(2), expected, atol=1e-12)


def test_relative_logits_break_the_permutation_symmetry():
    # The control for the two tests above: with positions, permuting the input changes more than the order.
    m, x = layer(relative=True), torch.randn(1, 4, 5, 7, dtype=torch.float64)
    perm = torch.randperm(35, generator=torch.Generator().manual_seed(1))
    permuted = x.flatten(2)[..., perm].view_as(x)
    assert not torch.allclose(m.attend(permuted).flatten(2), m.attend(x).flatten(2)[..., perm], atol=1e-6)


@pytest.mark.parametrize("size", [(5, 8), (8, 3), (1, 6)])
def test_any_height_and_width_up_to_the_declared_maximum(size):
    m = layer(max_size=(8, 8))
    assert m(torch.randn(1, 4, *size, dtype=torch.float64)).shape == (1, 12, *size)


def test_a_grid_beyond_the_declared_maximum_is_a_clear_error():
    m = layer(max_size=(6, 8))
    with pytest.raises(ValueError, match=r"grid 7x8 is larger than the declared max_size 6x8.*max_size >= \(7, 8\)"):
        m(torch.randn(1, 4, 7, 8, dtype=torch.float64))


@pytest.mark.parametrize("size", [(8, 6), (7, 9)])
def test_stride_two_attends_over_the_2x2_average_pooled_input(size):
    strided, plain = layer(stride=2, max_size=5), layer(stride=1, max_size=5)
    plain.load_state_dict(strided.state_dict())
    x = torch.randn(2, 4, *size, dtype=torch.float64)
    out_size = ((size[0] + 1) // 2, (size[1] + 1) // 2)  # ceil: both branches agree on odd sizes
    y = strided(x)
    assert y.shape == (2, 12, *out_size)
    assert torch.allclose(y[:, :4], F.conv2d(x, strided.conv.weight, stride=2, padding=1))
    assert torch.allclose(y[:, 4:], plain.attend(F.avg_pool2d(x, 2, ceil_mode=True)), atol=1e-12)
    with record_attention(strided) as maps:
        strided(x)
    assert maps[0].weights.shape == (2, 2, *out_size, *out_size)


def test_gradients_reach_both_relative_tables_and_every_weight():
    m = layer()
    m(torch.randn(2, 4, 5, 6, dtype=torch.float64)).square().sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    # A 5 x 6 grid uses offsets -4..4 and -5..5 of the tables sized for 8 x 8; the rest get no gradient.
    assert m.relative.height.grad[3:12].abs().sum(1).min() > 0 and m.relative.height.grad[:3].abs().sum() == 0


def test_a_fully_attentional_layer_has_no_conv_branch():
    m = layer(out_channels=8, dv=8)
    assert m.conv is None and m(torch.randn(1, 4, 4, 4, dtype=torch.float64)).shape == (1, 8, 4, 4)


def test_capture_contract_dense_maps_and_chosen_queries(monkeypatch):
    m, x = layer(), torch.randn(2, 4, 5, 7, dtype=torch.float64)
    calls = []
    original = aacn.layer.attention_probabilities
    monkeypatch.setattr(aacn.layer, "attention_probabilities", lambda *a: calls.append(1) or original(*a))
    m(x)
    assert not calls  # nothing recording: no probabilities are built
    with record_attention(m) as maps:
        y = m(x)
    assert torch.allclose(y, m(x))  # recording changes nothing
    dense = maps[0].weights
    assert dense.shape == (2, 2, 5, 7, 5, 7)
    assert torch.allclose(dense.sum((-2, -1)), torch.ones(1), atol=1e-6)
    with record_attention(m, queries=[(0, 0), (4, 6), (2, 3)]) as maps:
        m(x)
    chosen = maps[0].weights
    assert chosen.shape == (2, 2, 3, 5, 7)
    assert torch.allclose(chosen, dense[:, :, [0, 4, 2], [0, 6, 3]], atol=1e-6)


def test_recorded_maps_are_the_probabilities_the_output_uses():
    m, x = layer(), torch.randn(1, 4, 4, 5, dtype=torch.float64)
    with record_attention(m) as maps:
        branch = m.attend(x)
    _, _, v, grid, _ = m.project(x)
    weights = maps[0].weights.double().flatten(2, 3).flatten(-2)  # (B, heads, HW, HW)
    by_hand = m.out(aacn.layer.merge_heads(weights @ v, grid))
    assert torch.allclose(branch, by_hand, atol=1e-6)


def test_channels_last_gives_the_same_result():
    # The ImageNet dataset base trains channels_last.
    m, x = layer(), torch.randn(2, 4, 7, 6, dtype=torch.float64)
    y = m(x)
    m_cl = m.to(memory_format=torch.channels_last)
    assert torch.allclose(m_cl(x.to(memory_format=torch.channels_last)), y, atol=1e-12)


def test_bf16_autocast_runs():
    m = layer().float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(torch.randn(1, 4, 6, 6))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


@pytest.mark.parametrize("kwargs, message", [
    (dict(dk=6, heads=4), "multiples of heads"),
    (dict(dv=16, out_channels=12), "out_channels"),
    (dict(stride=3), "stride"),
])
def test_rejects_settings_it_cannot_build(kwargs, message):
    with pytest.raises(ValueError, match=message):
        layer(**kwargs)
