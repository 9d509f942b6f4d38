"""The SASA layer: the paper's formula per head, relative embeddings on the keys, borders, shapes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from common.inspect.capture import record_attention
from sasa import LocalSelfAttention2d


def layer(in_channels=4, out_channels=8, kernel_size=3, heads=2, **kwargs):
    torch.manual_seed(0)
    return LocalSelfAttention2d(in_channels, out_channels, kernel_size=kernel_size, heads=heads, **kwargs)


def by_hand(m: LocalSelfAttention2d, x: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """y_ij of the paper for batch item 0, written out pixel by pixel (mask border rule)."""
    q, k, v = (proj.weight[:, :, 0, 0] @ x[0].flatten(1) for proj in (m.query, m.key, m.value))
    height, width = x.shape[-2:]
    d, r = m.head_dim, m.kernel_size // 2
    out = torch.zeros(q.shape[0])
    for h in range(m.heads):
        ch = slice(h * d, (h + 1) * d)
        logits, values = [], []
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                a, b = i + dy, j + dx
                if 0 <= a < height and 0 <= b < width:
                    rel = torch.cat([m.relative.row[dy + r], m.relative.col[dx + r]])
                    logits.append(d ** -0.5 * q[ch, i * width + j] @ (k[ch, a * width + b] + rel))
                    values.append(v[ch, a * width + b])
        out[ch] = torch.stack(logits).softmax(0) @ torch.stack(values)
    return out


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_matches_the_formula_written_out(backend):
    m, x = layer(backend=backend), torch.randn(1, 4, 5, 6)
    y = m(x)
    with torch.no_grad():
        for i, j in [(2, 3), (0, 0), (4, 5)]:  # interior, and two clipped corners
            assert torch.allclose(y[0, :, i, j], by_hand(m, x, i, j), atol=1e-5)


def test_head_count_changes_the_result():
    # The same weights split into 1 or 4 heads; equal scales, no positions: only the
    # per-head dot product differs. A per-channel softmax would give equal outputs.
    one, four = layer(out_channels=16, heads=1), layer(out_channels=16, heads=4)
    for proj in ("query", "key", "value"):
        getattr(four, proj).weight.data.copy_(getattr(one, proj).weight.data)
    for m in (one, four):
        m.scale = 0.5
        torch.nn.init.zeros_(m.relative.row), torch.nn.init.zeros_(m.relative.col)
    x = torch.randn(1, 4, 6, 6)
    assert (one(x) - four(x)).abs().max() > 1e-3


def test_translation_equivariant_away_from_borders():
    m, x, (sy, sx) = layer(), torch.randn(1, 4, 12, 12), (2, 3)
    shifted = torch.randn_like(x)
    shifted[..., sy:, sx:] = x[..., :-sy, :-sx]
    r = m.kernel_size // 2
    y, y_shifted = m(x), m(shifted)
    assert torch.allclose(y_shifted[..., sy + r:12 - r, sx + r:12 - r], y[..., r:12 - r - sy, r:12 - r - sx],
                          atol=1e-5)


@pytest.mark.parametrize("border", ["mask", "zeros"])
def test_border_rule(border):
    m = layer(kernel_size=5, border=border)
    with record_attention(m) as maps:
        m(torch.randn(1, 4, 6, 7))
    mass_inside = maps[0].weights.sum((-2, -1))  # the dense map holds only in-image keys
    if border == "mask":
        assert torch.allclose(mass_inside, torch.ones(1))
    else:  # zero-padded keys still take weight exp(q . r): the public code's behaviour
        assert mass_inside[..., 0, 0].max() < 1 - 1e-4
        assert torch.allclose(mass_inside[..., 2:4, 2:5], torch.ones(1))


def test_gradients_reach_row_and_column_embeddings():
    m = layer()
    m(torch.randn(2, 4, 6, 6)).square().sum().backward()
    assert m.relative.row.grad.abs().sum() > 0 and m.relative.col.grad.abs().sum() > 0


def test_relative_embedding_is_added_to_the_keys_and_seen_by_every_head():
    # Zero key projection and a constant query: logits are q . r alone. The embedding prefers
    # row offset +1 and column offset -1; every head must find that one offset (a head that
    # saw only rows or only columns would split its weight over three).
    m = layer(heads=2)
    torch.nn.init.zeros_(m.key.weight)
    torch.nn.init.constant_(m.query.weight, 1 / 4)
    for table, preferred in ((m.relative.row, 2), (m.relative.col, 0)):  # index = offset + 1
        torch.nn.init.zeros_(table)
        table.data[preferred] = 5.0
    with record_attention(m) as maps:
        m(torch.ones(1, 4, 5, 5))
    weights = maps[0].weights[0, :, 2, 2]  # (heads, 5, 5) for the query (2, 2)
    for head in weights:
        assert head[3, 1] > 0.9


@pytest.mark.parametrize("size", [(12, 20), (13, 21)])
def test_stride_two_and_non_square_inputs(size):
    m1, m2 = layer(), layer(stride=2)
    x = torch.randn(2, 4, *size)
    y1, y2 = m1(x), m2(x)
    assert y1.shape == (2, 8, *size) and y2.shape == (2, 8, size[0] // 2, size[1] // 2)
    assert torch.allclose(y2, F.avg_pool2d(y1, 2), atol=1e-6)  # the pool comes right after the attention


def test_rejects_head_splits_it_cannot_embed():
    with pytest.raises(ValueError, match="divisible"):
        LocalSelfAttention2d(4, 10, heads=4)
    with pytest.raises(ValueError, match="even"):
        LocalSelfAttention2d(4, 12, heads=4)
