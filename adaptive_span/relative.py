"""Relative row/column embeddings on the keys, sized for the largest window and cropped to the current one.

The embedding of window offset (dy, dx) is [row(dy), col(dx)], each half the head width, shared by the
heads: every head's q . r sees both the row and the column offset (the public code splits them across
channel groups instead, so half of its heads only see rows and half only columns). A layer whose window
changes during training (adaptive span) keeps one table for the largest window and uses its centre: offset
dy always reads the same row, whatever the current window.
"""

from __future__ import annotations

import torch
from torch import nn

from common.models.weight_decay import mark_no_weight_decay


class CroppedRelativeEmbedding2d(nn.Module):
    """Row and column tables of `max_size` (odd) offsets x dim/2; `forward(k)` gives the (k, k, dim) table of
    the centred k x k window, indexed [dy + k//2, dx + k//2] (the `rel_pos` layout of
    `common.ops.neighborhood.neighborhood_attention`).

    Init std 1, no weight decay: the table is added to the keys, which are O(1) per channel at init, so
    position and content start on the same scale (the convention of the sasa package).
    """

    def __init__(self, max_size: int, dim: int, std: float = 1.0):
        super().__init__()
        if max_size < 1 or max_size % 2 == 0:
            raise ValueError(f"the largest window must be odd and >= 1, got {max_size}")
        if dim % 2:
            raise ValueError(f"the relative embedding needs an even head dimension, got {dim}")
        self.row = nn.Parameter(torch.randn(max_size, dim // 2) * std)
        self.col = nn.Parameter(torch.randn(max_size, dim // 2) * std)
        mark_no_weight_decay(self.row, self.col)

    @property
    def max_size(self) -> int:
        return self.row.shape[0]

    def forward(self, kernel_size: int) -> torch.Tensor:
        if kernel_size % 2 == 0 or not 1 <= kernel_size <= self.max_size:
            raise ValueError(f"window must be odd and <= {self.max_size}, got {kernel_size}")
        start = (self.max_size - kernel_size) // 2
        rows = self.row[start:start + kernel_size, None, :].expand(-1, kernel_size, -1)
        cols = self.col[None, start:start + kernel_size, :].expand(kernel_size, -1, -1)
        return torch.cat([rows, cols], dim=-1)
