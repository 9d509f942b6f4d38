"""The position term of pairwise attention: p_i - p_j for every pixel i and footprint pixel j.

The paper encodes positions as the horizontal and vertical coordinates normalised to [-1, 1],
passed through a trainable 1x1 conv (2 -> 2 channels): p = W c + b. The difference p_i - p_j is
concatenated to the relation delta(x_i, x_j) before gamma. The bias b cancels in the difference;
the conv keeps it so that the parameter count is the official one.

Footprint pixel j follows the padding rule (`san.footprint`): with reflection it is the mirrored
pixel, so its position is that pixel's; with zeros it lies outside the image and keeps its
geometric coordinate (the [-1, 1] grid extended at the same spacing).
"""

from __future__ import annotations

import torch
from torch import nn

from san.footprint import neighbour_index


def _coordinate(index: torch.Tensor, size: int, dtype: torch.dtype) -> torch.Tensor:
    """Normalised coordinate of pixel index t on an axis of `size` pixels: -1 at 0, +1 at size - 1."""
    return index.to(dtype) * (2.0 / max(size - 1, 1)) - 1.0


class RelativePosition(nn.Module):
    """Returns p_i - p_j as a (1, 2, k*k, H*W) tensor, (y, x) channels, offsets row-major."""

    def __init__(self, kernel_size: int, padding: str):
        super().__init__()
        self.kernel_size, self.padding = kernel_size, padding
        self.proj = nn.Conv2d(2, 2, 1)

    def forward(self, height: int, width: int, device=None) -> torch.Tensor:
        k, dtype = self.kernel_size, self.proj.weight.dtype
        ys = torch.arange(height, device=device)
        xs = torch.arange(width, device=device)
        centre = torch.stack([_coordinate(ys, height, dtype)[:, None].expand(height, width),
                              _coordinate(xs, width, dtype)[None, :].expand(height, width)])  # (2, H, W)
        ny = _coordinate(neighbour_index(height, k, self.padding, device), height, dtype)  # (H, k)
        nx = _coordinate(neighbour_index(width, k, self.padding, device), width, dtype)  # (W, k)
        near = torch.stack([ny.t()[:, None, :, None].expand(k, k, height, width),
                            nx.t()[None, :, None, :].expand(k, k, height, width)])  # (2, k, k, H, W)
        p_centre = self.proj(centre.reshape(1, 2, 1, height * width))
        p_near = self.proj(near.reshape(1, 2, k * k, height * width))
        return p_centre - p_near
