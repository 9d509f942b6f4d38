"""AACN attention maths: relative logits against a double loop, the fused SDPA path against an explicit softmax."""

from __future__ import annotations

import pytest
import torch

from aacn.attention import attention_logits, axis_logits, relative_attention
from aacn.relative import RelativeTables

GRID = (3, 5)  # non-square on purpose: rows and columns must not be confused


def random_inputs(grid=GRID, batch=2, heads=2, dk=4, dv=3, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    length = grid[0] * grid[1]
    q, k = (torch.randn(batch, heads, length, dk, dtype=dtype) for _ in range(2))
    v = torch.randn(batch, heads, length, dv, dtype=dtype)
    return q, k, v


def logits_by_loops(q, k, grid, row_table, col_table, row_center, col_center):
    """l[b, n, i, j] = q_i . k_j + q_i . r^H[y_j - y_i] + q_i . r^W[x_j - x_i], position by position."""
    height, width = grid
    b, n, length, _ = q.shape
    out = torch.zeros(b, n, length, length, dtype=q.dtype)
    for i in range(length):
        for j in range(length):
            dy, dx = j // width - i // width, j % width - i % width
            rel = row_table[dy + row_center] + col_table[dx + col_center]
            out[:, :, i, j] = (q[:, :, i] * (k[:, :, j] + rel)).sum(-1)
    return out


def test_relative_logits_equal_a_double_loop_over_positions():
    q, k, _ = random_inputs()
    tables = RelativeTables(head_dim=4, max_size=(4, 7)).double()  # larger than the grid: central rows used
    rows, cols = tables.tables(GRID)
    expected = logits_by_loops(q, k, GRID, tables.height, tables.width, row_center=3, col_center=6)
    got = attention_logits(q, k, GRID, 1.0, rows, cols)  # (B, heads, HW, H, W)
    assert torch.allclose(got.flatten(-2), expected, atol=1e-12)


def test_axis_logits_are_indexed_by_query_position_and_key_row_or_column():
    q, _, _ = random_inputs()
    rows, cols = torch.randn(5, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
    a_h, a_w = axis_logits(q, GRID, rows, cols)
    assert a_h.shape == (2, 2, 3, 5, 3) and a_w.shape == (2, 2, 3, 5, 5)
    for y, x in [(0, 0), (1, 3), (2, 4)]:
        query = q[:, :, y * 5 + x]
        for r in range(3):
            assert torch.allclose(a_h[:, :, y, x, r], query @ rows[r - y + 2])
        for c in range(5):
            assert torch.allclose(a_w[:, :, y, x, c], query @ cols[c - x + 4])


@pytest.mark.parametrize("relative", [True, False])
def test_fused_path_equals_explicit_softmax_in_fp64(relative):
    q, k, v = random_inputs()
    leaves = [q, k, v]
    rows = cols = None
    if relative:
        rows, cols = torch.randn(5, 4, dtype=torch.float64), torch.randn(9, 4, dtype=torch.float64)
        leaves += [rows, cols]
    for t in leaves:
        t.requires_grad_()
    scale = 4 ** -0.5
    fused = relative_attention(q, k, v, GRID, scale, rows, cols)
    logits = q @ k.transpose(-1, -2)
    if relative:
        logits = logits + logits_by_loops(q, torch.zeros_like(k), GRID, rows, cols, 2, 4)
    explicit = (scale * logits).softmax(-1) @ v
    assert torch.allclose(fused, explicit, atol=1e-12)
    upstream = torch.randn_like(fused)
    grads_fused = torch.autograd.grad(fused, leaves, upstream)
    grads_explicit = torch.autograd.grad(explicit, leaves, upstream)
    for a, b in zip(grads_fused, grads_explicit):
        assert torch.allclose(a, b, atol=1e-10)


def test_fused_path_saves_nothing_quadratic_for_backward():
    # 8 x 8 grid: the (HW x HW) maps of 2 images x 2 heads are 2*2*64*64 elements; the fused path keeps
    # q', k', v' and the output, each 2*2*64*24 (head width 4 + 8 + 8 = 20, padded to 24).
    grid = (8, 8)
    q, k, v = random_inputs(grid, dtype=torch.float32)
    rows, cols = torch.randn(15, 4), torch.randn(15, 4)
    for t in (q, k, v, rows, cols):
        t.requires_grad_()
    sizes = []

    def pack(t):
        sizes.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        relative_attention(q, k, v, grid, 0.5, rows, cols)
    assert sizes and max(sizes) < 2 * 2 * 64 * 64


def test_half_the_tables_must_not_be_given():
    q, k, v = random_inputs()
    with pytest.raises(ValueError, match="both"):
        relative_attention(q, k, v, GRID, 1.0, rows=torch.zeros(5, 4, dtype=torch.float64))
