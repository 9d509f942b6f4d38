"""Self-attention inside non-overlapping s x s blocks: the attention of SASA's stem.

Every pixel attends to the s*s pixels of the block it lies in (itself included),
with the relative row/column embeddings of `sasa.relative` (offsets -(s-1)..s-1)
added to the keys and spatially aware values (`sasa.spatial_values`). The
blocks are the stem's max-pool windows: the paper aligns the attention
receptive field with the pooling window. This is not the centred sliding window
of `common.ops.neighborhood` (an even s has no centre), but it is cheap enough as
a batched s*s x s*s product that no special kernel is needed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.inspect.capture import AttentionLayer, windows_to_dense
from sasa.relative import RelativeEmbedding2d
from sasa.spatial_values import SpatiallyAwareValues


def to_blocks(t: torch.Tensor, heads: int, s: int) -> torch.Tensor:
    """(B, heads*d, H, W) -> (B, heads, H/s, W/s, s*s, d), block pixels row-major."""
    b, c, h, w = t.shape
    t = t.reshape(b, heads, c // heads, h // s, s, w // s, s)
    return t.permute(0, 1, 3, 5, 4, 6, 2).reshape(b, heads, h // s, w // s, s * s, c // heads)


def from_blocks(t: torch.Tensor, s: int) -> torch.Tensor:
    """(B, heads, H/s, W/s, s*s, d) -> (B, heads*d, H, W), the inverse of `to_blocks`."""
    b, heads, nh, nw, _, d = t.shape
    t = t.reshape(b, heads, nh, nw, s, s, d).permute(0, 1, 6, 2, 4, 3, 5)
    return t.reshape(b, heads * d, nh * s, nw * s)


def pair_offsets(s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(s*s, s*s) row and column offsets key - query, shifted to 0..2s-2, for every pair in a block."""
    a = torch.arange(s).repeat_interleave(s)  # row of each block position
    b = torch.arange(s).repeat(s)  # column
    return a[None, :] - a[:, None] + s - 1, b[None, :] - b[:, None] + s - 1


class BlockSelfAttention2d(AttentionLayer, nn.Module):
    """Multi-head attention within each s x s block, q scaled by d_head**-0.5 like `LocalSelfAttention2d`.

    Sizes that are not multiples of s get a partial last block: the image is
    zero-padded to the next multiple and the padded keys are masked out.
    """

    def __init__(self, in_channels: int, out_channels: int, block_size: int = 4, heads: int = 4, mixtures: int = 4):
        super().__init__()
        if out_channels % heads or (out_channels // heads) % 2:
            raise ValueError(f"out_channels ({out_channels}) / heads ({heads}) must be an even integer")
        self.block_size, self.heads = block_size, heads
        self.scale = (out_channels // heads) ** -0.5
        self.query = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.key = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.value = SpatiallyAwareValues(in_channels, out_channels, block_size, mixtures)
        self.relative = RelativeEmbedding2d(2 * block_size - 1, out_channels // heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s, (height, width) = self.block_size, x.shape[-2:]
        pad_h, pad_w = -height % s, -width % s
        x = F.pad(x, (0, pad_w, 0, pad_h))
        q = to_blocks(self.query(x), self.heads, s) * self.scale
        k = to_blocks(self.key(x), self.heads, s)
        v = to_blocks(self.value(x), self.heads, s)
        dy, dx = (t.to(x.device) for t in pair_offsets(s))
        rel = self.relative()[dy, dx].to(q.dtype)  # (s*s, s*s, d): r[key offset from query]
        logits = q @ k.transpose(-1, -2) + torch.einsum("...qd,qkd->...qk", q, rel)
        if pad_h or pad_w:
            logits = logits.masked_fill(~self._inside(height, width, x.device), float("-inf"))
        weights = logits.softmax(-1)
        if self.recording:
            self._record(weights, height, width)
        return from_blocks(weights @ v, s)[..., :height, :width]

    def _inside(self, height: int, width: int, device) -> torch.Tensor:
        """(H/s, W/s, 1, s*s) bool: is each key of each (padded) block inside the image?"""
        s = self.block_size
        valid = torch.zeros(1, 1, height + -height % s, width + -width % s, dtype=torch.bool, device=device)
        valid[..., :height, :width] = True
        return to_blocks(valid, 1, s)[0, 0, :, :, None, :, 0]

    def _record(self, weights: torch.Tensor, height: int, width: int) -> None:
        """Recast block weights as (2s-1)^2 windows centred on each query, then scatter them densely."""
        s = self.block_size
        window = 2 * s - 1
        dy, dx = pair_offsets(s)
        slot = (dy * window + dx).to(weights.device).expand(*weights.shape)
        windows = weights.new_zeros(*weights.shape[:-1], window * window).scatter_(-1, slot, weights)
        b, heads, nh, nw = windows.shape[:4]
        windows = windows.reshape(b, heads, nh, nw, s, s, -1).permute(0, 1, 2, 4, 3, 5, 6)
        windows = windows.reshape(b, heads, nh * s, nw * s, -1)[:, :, :height, :width]
        grid = (height, width)
        self.record(lambda index: windows_to_dense(windows, window, grid, index), grid, grid)
