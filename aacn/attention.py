"""Global multi-head attention with AACN's relative logits, exact, in one fused SDPA call.

With s = d_kh**-0.5, the logit of query i = (y, x) and key j = (r, c) is

    l_ij = s (q_i . k_j + A_H[i, r] + A_W[i, c]),   A_H[i, r] = q_i . r^H[r - y],   A_W[i, c] = q_i . r^W[c - x]

(the paper scales q, so the relative terms are scaled too). The per-axis
logits A_H (H per query) and A_W (W per query) come from `axis_logits`: one
matrix product of q with both tables gives every offset's logit, and strided
views re-index them by absolute key row and column. Nothing of size
(HW x HW) is built from them:

- `relative_attention` writes l_ij as one dot product. With
  q'_i = [q_i, A_H[i, :], A_W[i, :]] and k'_j = [k_j, onehot(r), onehot(c)],
  s q'_i . k'_j = l_ij exactly, so one fused
  `torch.nn.functional.scaled_dot_product_attention` call with no mask and
  scale s computes the exact AA attention and saves only q', k', v, the output
  and the log-sum-exp for backward. The price: H + W more dimensions in q'.k'.
- `attention_probabilities` builds the probabilities for the attention-capture
  contract (and the tests): the per-axis logits broadcast-added to q k^T.

Cost of `relative_attention`, counted by torch.utils.flop_counter whatever the
SDPA kernel (`relative_attention_macs`, convention in common/inspect/flops.py):
B * heads * HW * (HW * (d_k + d_v) + (H + W) * d_k) multiply-accumulates:
q . k and the weighted sum of v for every query-key pair, and the H row and
W column logits q_i . r of every query. Not the fused call's padding, one-hot
columns or unused table offsets; not the softmax or the logit additions.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common.inspect.flops import counted_op

# Flash attention (CPU and CUDA) needs one head width for q, k and v, so all three are zero-padded to a
# common width; a multiple of 8 was ~8% faster than an unaligned one on CPU (74 -> 80 at 32x32, dk_h 10).
HEAD_DIM_MULTIPLE = 8


def axis_logits(q: torch.Tensor, grid: tuple[int, int], rows: torch.Tensor, cols: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-axis relative logits of every query of an H x W grid, unscaled.

    q: (B, heads, H*W, d); rows: r^H (2H-1, d) and cols: r^W (2W-1, d), offset
    o at index o + H-1 (o + W-1). Returns views A_H (B, heads, H, W, H) with
    [.., y, x, r] = q_(y,x) . r^H[r - y], and A_W (B, heads, H, W, W) with
    [.., y, x, c] = q_(y,x) . r^W[c - x].
    """
    height, width = grid
    # u[.., i, m]: the logit of query i for every offset of both tables, one matrix product.
    u = (q @ torch.cat([rows, cols]).to(q.dtype).T).contiguous()  # tables fp32, q bf16 under autocast
    row_len = u.shape[-1]  # 2H-1 + 2W-1
    b_stride, n_stride = u.stride(0), u.stride(1)
    size = (u.shape[0], u.shape[1], height, width)
    # Query (y, x) reads its row-offset logits from position H-1-y of its own row of u (offsets -y..H-1-y),
    # and its column-offset logits from 2H-1 + W-1-x: a skewed but non-overlapping strided view.
    a_h = u.as_strided(size + (height,), (b_stride, n_stride, width * row_len - 1, row_len, 1),
                       u.storage_offset() + height - 1)
    a_w = u.as_strided(size + (width,), (b_stride, n_stride, width * row_len, row_len - 1, 1),
                       u.storage_offset() + 2 * height - 1 + width - 1)
    return a_h, a_w


def key_coordinates(height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    """(H, W, H + W): [onehot(row), onehot(col)] of every key position, dtype and device of `like`."""
    rows = torch.eye(height, dtype=like.dtype, device=like.device)[:, None, :].expand(height, width, height)
    cols = torch.eye(width, dtype=like.dtype, device=like.device)[None, :, :].expand(height, width, width)
    return torch.cat([rows, cols], dim=-1)


def _concat_padded(parts: list[torch.Tensor], width: int) -> torch.Tensor:
    """Concatenate along the last dim and zero-pad it to `width`, in one copy."""
    used = sum(p.shape[-1] for p in parts)
    if used < width:
        parts = parts + [parts[0].new_zeros(*parts[0].shape[:-1], width - used)]
    return torch.cat(parts, dim=-1)


def relative_attention_macs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int], scale: float,
                            rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> int:
    """Multiply-accumulates of `relative_attention` (see the module docstring); its FLOPs are twice this."""
    b, heads, length, dk = q.shape
    relative = (grid[0] + grid[1]) * dk if rows is not None else 0
    return b * heads * length * (k.shape[2] * (dk + v.shape[-1]) + relative)


@counted_op("aacn_relative_attention", macs=relative_attention_macs)
def relative_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int], scale: float,
                       rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> torch.Tensor:
    """softmax_j(scale (q_i . k_j + A_H[i, row j] + A_W[i, col j])) v_j for every query, via one SDPA call.

    q, k: (B, heads, H*W, d_k), unscaled; v: (B, heads, H*W, d_v); rows r^H
    (2H-1, d_k) and cols r^W (2W-1, d_k), or both None (no relative logits).
    Returns (B, heads, H*W, d_v).
    """
    if (rows is None) != (cols is None):
        raise ValueError("give both relative tables or neither")
    q_parts, k_parts = [q], [k]
    if rows is not None:
        a_h, a_w = axis_logits(q, grid, rows, cols)
        b, heads, length, dim = q.shape
        q_parts = [q.reshape(b, heads, *grid, dim), a_h, a_w]  # concatenated on the grid: a_h, a_w not copied
        k_parts = [k.reshape(b, heads, *grid, dim), key_coordinates(*grid, k).expand(b, heads, *grid, -1)]
    value_dim = v.shape[-1]
    needed = max(sum(p.shape[-1] for p in q_parts), value_dim)
    width = -(-needed // HEAD_DIM_MULTIPLE) * HEAD_DIM_MULTIPLE
    q_full = _concat_padded(q_parts, width).flatten(2, -2)
    k_full = _concat_padded(k_parts, width).flatten(2, -2)
    out = F.scaled_dot_product_attention(q_full, k_full, F.pad(v, (0, width - value_dim)), scale=scale)
    return out[..., :value_dim]


def attention_logits(q: torch.Tensor, k: torch.Tensor, grid: tuple[int, int], scale: float,
                     rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
                     query_index: torch.Tensor | None = None) -> torch.Tensor:
    """Dense logits (B, heads, Q, H, W) of the queries in `query_index` (all when None): q k^T with the
    per-axis relative logits broadcast-added, times scale; no (HW x HW) relative tensor is built."""
    index = slice(None) if query_index is None else query_index.to(q.device)
    logits = (q[:, :, index] @ k.transpose(-1, -2)).unflatten(-1, grid)
    if rows is not None:
        a_h, a_w = (a.flatten(2, 3)[:, :, index] for a in axis_logits(q, grid, rows, cols))
        logits = logits + a_h[..., :, None] + a_w[..., None, :]
    return logits * scale


def attention_probabilities(q: torch.Tensor, k: torch.Tensor, grid: tuple[int, int], scale: float,
                            rows: torch.Tensor | None = None, cols: torch.Tensor | None = None,
                            query_index: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax over the key grid of `attention_logits`: (B, heads, Q, H, W), each map sums to 1."""
    logits = attention_logits(q, k, grid, scale, rows, cols, query_index)
    return logits.flatten(-2).softmax(-1).view_as(logits)
