"""The attention stem: attention inside 4x4 blocks with spatially aware values, then BN and max pool."""

from __future__ import annotations

import pytest
import torch

from common.inspect.capture import record_attention
from common.registry import create_stem
from sasa import BlockSelfAttention2d


def attention(out_channels=8, heads=2):
    torch.manual_seed(0)
    return BlockSelfAttention2d(3, out_channels, block_size=4, heads=heads)


def by_hand(m: BlockSelfAttention2d, x: torch.Tensor, i: int, j: int) -> torch.Tensor:
    """The stem attention at pixel (i, j) of batch item 0, over the 16 pixels of its 4x4 block."""
    q, k = (proj.weight[:, :, 0, 0] @ x[0].flatten(1) for proj in (m.query, m.key))
    v = m.value(x)[0].flatten(1)
    width, d = x.shape[-1], q.shape[0] // m.heads
    keys = [(a, b) for a in range(i // 4 * 4, i // 4 * 4 + 4) for b in range(j // 4 * 4, j // 4 * 4 + 4)]
    out = torch.zeros(q.shape[0])
    for h in range(m.heads):
        ch = slice(h * d, (h + 1) * d)
        logits = torch.stack([d ** -0.5 * q[ch, i * width + j] @ (
            k[ch, a * width + b] + torch.cat([m.relative.row[a - i + 3], m.relative.col[b - j + 3]]))
            for a, b in keys])
        out[ch] = logits.softmax(0) @ torch.stack([v[ch, a * width + b] for a, b in keys])
    return out


def test_matches_the_formula_written_out():
    m, x = attention(), torch.randn(1, 3, 8, 12)
    y = m(x)
    with torch.no_grad():
        for i, j in [(0, 0), (5, 6), (7, 11), (2, 9)]:
            assert torch.allclose(y[0, :, i, j], by_hand(m, x, i, j), atol=1e-5)


def test_attention_stays_inside_each_block():
    m, x = attention(), torch.randn(1, 3, 8, 12)
    changed = x.clone()
    changed[..., 5, 6] += 3.0  # a pixel of the block rows 4..7, columns 4..7
    moved = (m(changed) - m(x)).abs().amax(1)[0] > 1e-6
    expected = torch.zeros(8, 12, dtype=torch.bool)
    expected[4:8, 4:8] = True
    assert torch.equal(moved, expected)


def test_values_are_spatially_aware():
    m = attention()
    flat = torch.ones(1, 3, 8, 8)  # every pixel the same colour
    v = m.value(flat)[0]
    assert not torch.allclose(v[:, 0, 0], v[:, 1, 2])  # position in the block matters ...
    assert torch.allclose(v[:, 1, 2], v[:, 5, 6])  # ... and only the position in the block
    p = m.value.mixture()
    assert p.shape == (4, 4, 4) and torch.allclose(p.sum(-1), torch.ones(1))
    x = torch.randn(1, 3, 8, 8)
    before = m(x)
    with torch.no_grad():
        m.value.nu.add_(torch.randn_like(m.value.nu))
    assert (m(x) - before).abs().max() > 1e-4


@pytest.mark.parametrize("stem, size, expected", [
    ("attention", (32, 24), (8, 6)),
    ("attention", (30, 22), (8, 6)),  # partial last blocks: padded keys masked, pooled with ceil_mode
    ("attention_cifar", (32, 32), (32, 32)),
])
def test_stem_output_width_and_resolution(stem, size, expected):
    torch.manual_seed(0)
    out = create_stem(stem, 3, 64)(torch.randn(2, 3, *size))
    assert out.shape == (2, 64, *expected)


def test_stem_attention_is_recorded_inside_the_blocks():
    m = attention()
    with record_attention(m) as maps:
        m(torch.randn(2, 3, 10, 7))
    w = maps[0].weights
    assert w.shape == (2, 2, 10, 7, 10, 7) and torch.allclose(w.sum((-2, -1)), torch.ones(1))
    assert (w[:, :, 9, 6] > 0).sum((-2, -1)).eq(2 * 3).all()  # corner query: its partial block is 2x3
    block = torch.zeros(10, 7, dtype=torch.bool)
    block[4:8, 0:4] = True
    assert torch.equal(w[0, 0, 5, 2] > 0, block)
