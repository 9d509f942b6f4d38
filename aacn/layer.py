"""The attention-augmented convolution of Bello et al. (2019).

    AAConv(X) = concat_channels[ Conv_k(X) (out - d_v channels),  MHA(X) W_O (d_v channels) ]

MHA: one 1x1 conv gives q, k, v (2 d_k + d_v channels, split into `heads`
heads: head n owns channels [n d, (n+1) d) of each); q is scaled by
d_kh**-0.5, which scales the relative logits too; every query attends to every
position of the grid (`aacn.attention`); the merged heads go through a 1x1
conv W_O (d_v -> d_v).
"""

from __future__ import annotations

import torch
from torch import nn

from aacn.attention import attention_probabilities, relative_attention
from aacn.relative import RelativeTables
from common.inspect.capture import AttentionLayer


def split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, heads*d, H, W) -> (B, heads, H*W, d): head n owns channels [n*d, (n+1)*d)."""
    b, c, h, w = t.shape
    return t.reshape(b, heads, c // heads, h * w).transpose(-1, -2)


def merge_heads(t: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, heads, H*W, d) -> (B, heads*d, H, W), the inverse of `split_heads`.

    The transpose matters: reshaping (heads, H*W, d) straight to channels would
    mix positions into channels whenever d > 1 (a trap of public code).
    """
    b, heads, length, d = t.shape
    return t.transpose(-1, -2).reshape(b, heads * d, *grid)


class AugmentedConv2d(AttentionLayer, nn.Module):
    """Attention-augmented convolution on a (B, in_channels, H, W) map; any H and W.

    dk, dv: total key and value widths (each divisible by `heads`); the
    convolution gets the other out_channels - dv output channels (none when
    dv == out_channels: a fully attentional layer).
    relative: add the 2-D relative logits (tables shared by all heads).
    max_size: the largest attention grid the layer will see, int or (H, W); it
    sizes the relative tables (2H-1 and 2W-1 offsets), and a larger grid is a
    clear error. With stride 2 it is the pooled grid, ceil(H/2) x ceil(W/2).
    stride: 1 or 2. With 2 the convolution is strided and the attention runs on
    the input average-pooled 2x2 (ceil mode, so both branches give
    ceil(H/2) x ceil(W/2), also for odd sizes): queries, keys and values all
    live on the pooled grid. This is the usual choice; the paper's text does not
    settle it.

    Biases: none anywhere, since a BatchNorm follows in every network here.
    Weight init is left to the backbone (Kaiming for the convolutions); the
    relative tables initialise themselves (std d_kh**-0.5).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dk: int, dv: int, heads: int,
                 relative: bool = True, stride: int = 1, max_size: int | tuple[int, int] = 64):
        super().__init__()
        if heads < 1 or dk % heads or dv % heads or dk < heads or dv < heads:
            raise ValueError(f"dk ({dk}) and dv ({dv}) must be positive multiples of heads ({heads})")
        if not 0 < dv <= out_channels:
            raise ValueError(f"dv ({dv}) must be in 1..out_channels ({out_channels})")
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd (same padding), got {kernel_size}")
        self.dk, self.dv, self.heads, self.stride = dk, dv, heads, stride
        self.scale = (dk // heads) ** -0.5
        conv_channels = out_channels - dv
        self.conv = nn.Conv2d(in_channels, conv_channels, kernel_size, stride=stride, padding=kernel_size // 2,
                              bias=False) if conv_channels else None
        self.pool = nn.AvgPool2d(2, ceil_mode=True) if stride == 2 else nn.Identity()
        self.qkv = nn.Conv2d(in_channels, 2 * dk + dv, 1, bias=False)
        self.out = nn.Conv2d(dv, dv, 1, bias=False)  # W_O
        self.relative = RelativeTables(dk // heads, max_size) if relative else None

    def project(self, x: torch.Tensor) -> tuple:
        """Unscaled q, k, v per head of the pooled input, its grid, and the relative tables (or Nones)."""
        x = self.pool(x)
        grid = tuple(x.shape[-2:])
        tables = self.relative.tables(grid) if self.relative is not None else (None, None)  # checks the grid
        q, k, v = torch.split(self.qkv(x), [self.dk, self.dk, self.dv], dim=1)
        return split_heads(q, self.heads), split_heads(k, self.heads), split_heads(v, self.heads), grid, tables

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """The attention branch alone: MHA(X) W_O, (B, dv, H', W').

        The d_kh**-0.5 scaling of q is applied to whole logits, q . k and
        q . r alike, which is the same thing and costs nothing inside SDPA
        (no scaled copy of q, and no in-place scaling of a split view, which
        breaks backward: a trap of public code).
        """
        q, k, v, grid, tables = self.project(x)
        if self.recording:
            # The fused path returns no probabilities; build them only when asked for.
            self.record(lambda index: attention_probabilities(q, k, grid, self.scale, *tables, index), grid, grid)
        return self.out(merge_heads(relative_attention(q, k, v, grid, self.scale, *tables), grid))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attention = self.attend(x)
        if self.conv is None:
            return attention
        return torch.cat([self.conv(x), attention], dim=1)

    def extra_repr(self) -> str:
        return f"dk={self.dk}, dv={self.dv}, heads={self.heads}, stride={self.stride}"
