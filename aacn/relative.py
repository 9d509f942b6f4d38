"""AACN's two-dimensional relative position tables, one per axis, shared by all heads.

For a query at (y_i, x_i) and a key at (y_j, x_j) the paper adds

    S_H[i, j] = q_i . r^H[y_j - y_i]      and      S_W[i, j] = q_i . r^W[x_j - x_i]

to the content logit q_i . k_j. `RelativeTables` holds r^H and r^W;
`aacn.attention` turns them into H + W logits per query, never (HW x HW).

Table size. A table must exist before the first input arrives (an optimiser
holds its parameters), so it is sized from a declared maximum grid
(max_height, max_width): 2 * max - 1 offsets per axis. A smaller grid uses the
central rows of the tables (offsets -(n-1)..n-1); a larger one is an error that
says which size to declare.
"""

from __future__ import annotations

import torch
from torch import nn

from common.models.weight_decay import mark_no_weight_decay


def pair(size: int | tuple[int, int] | list[int]) -> tuple[int, int]:
    """An int or an (H, W) pair as an (H, W) tuple."""
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


class RelativeTables(nn.Module):
    """Learned row and column offset tables, shared by all heads.

    head_dim: d_kh, the width of one head's queries.
    max_size: the largest attention grid, int or (H, W); tables get 2H-1 and 2W-1 rows.

    Init std d_kh**-0.5, as in the paper. The tables are excluded from weight
    decay: decaying them only pulls the layer towards position-blind attention
    (the same choice as SASA's embeddings in this repository).
    """

    def __init__(self, head_dim: int, max_size: int | tuple[int, int]):
        super().__init__()
        self.max_height, self.max_width = pair(max_size)
        if self.max_height < 1 or self.max_width < 1:
            raise ValueError(f"max_size must be positive, got {max_size}")
        std = head_dim ** -0.5
        self.height = nn.Parameter(torch.randn(2 * self.max_height - 1, head_dim) * std)
        self.width = nn.Parameter(torch.randn(2 * self.max_width - 1, head_dim) * std)
        mark_no_weight_decay(self.height, self.width)

    def check_grid(self, height: int, width: int) -> None:
        if height > self.max_height or width > self.max_width:
            raise ValueError(
                f"attention grid {height}x{width} is larger than the declared max_size "
                f"{self.max_height}x{self.max_width} of the relative tables (they hold offsets up to "
                f"+-{self.max_height - 1} rows and +-{self.max_width - 1} columns); build the layer with "
                f"max_size >= ({height}, {width})")

    def tables(self, grid: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """The parts an H x W grid uses: r^H (2H-1, d) and r^W (2W-1, d), offset o at index o + H-1 (o + W-1).

        A method, not `forward`: the results are views of parameters, which module
        hooks (FlopCounterMode's module tracker) reject under no_grad.
        """
        height, width = grid
        self.check_grid(height, width)
        rows = self.height[self.max_height - height:self.max_height + height - 1]
        cols = self.width[self.max_width - width:self.max_width + width - 1]
        return rows, cols

    def extra_repr(self) -> str:
        return f"max_size=({self.max_height}, {self.max_width}), head_dim={self.height.shape[1]}"
