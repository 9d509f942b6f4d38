"""Relative position embeddings of SASA: one table for row offsets, one for column offsets.

The embedding of offset (dy, dx) is the concatenation [row(dy), col(dx)], each
half the head width, so every head's dot product q . r sees both the row and
the column offset. (Splitting rows and columns across channel groups instead
would leave half the heads blind to one axis, a trap of public code.)
"""

from __future__ import annotations

import torch
from torch import nn

from common.models.weight_decay import mark_no_weight_decay


class RelativeEmbedding2d(nn.Module):
    """Learned row/column offset embeddings for a `size` x `size` window, shared by all heads.

    Calling it returns the (size, size, dim) table indexed [dy + size//2, dx + size//2],
    the layout `common.ops.neighborhood.neighborhood_attention` takes as `rel_pos`.

    Init std 1: the table is added to the keys, whose channels are O(1) at init
    (unit-variance BN outputs through a Kaiming-initialised 1x1 projection), so
    position and content contribute to the logits on the same scale from the
    first step. It is excluded from weight decay: it holds a few hundred numbers,
    and decaying it would only pull the layer towards position-blind attention.
    """

    def __init__(self, size: int, dim: int, std: float = 1.0):
        super().__init__()
        if dim % 2:
            raise ValueError(f"the relative embedding needs an even head dimension, got {dim}")
        self.row = nn.Parameter(torch.randn(size, dim // 2) * std)
        self.col = nn.Parameter(torch.randn(size, dim // 2) * std)
        mark_no_weight_decay(self.row, self.col)

    @property
    def size(self) -> int:
        return self.row.shape[0]

    def forward(self) -> torch.Tensor:
        k = self.size
        rows = self.row[:, None, :].expand(k, k, -1)
        cols = self.col[None, :, :].expand(k, k, -1)
        return torch.cat([rows, cols], dim=-1)
