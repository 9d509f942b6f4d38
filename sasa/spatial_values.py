"""Spatially aware value projection of the SASA attention stem.

    v_ab = ( sum_m p(a, b, m) W_V^m ) x_ab,   p(a, b, m) = softmax_m( (emb_row(a) + emb_col(b)) . nu^m )

(a, b) is the pixel's position inside its block (the stem's attention and
max-pool window), so p depends on where a pixel sits in the block, like a
convolution's weights depend on where a pixel sits in its kernel. That is what
lets the stem learn edge-like features that content-only attention over RGB
pixels cannot. p is one scalar per mixture and position, shared by all heads
and channels.
"""

from __future__ import annotations

import torch
from torch import nn


class SpatiallyAwareValues(nn.Module):
    """1x1 value projection whose matrix is a position-dependent convex mix of `mixtures` matrices.

    Input (B, C_in, H, W) with H and W multiples of `block_size`; output (B, C_out, H, W).
    """

    def __init__(self, in_channels: int, out_channels: int, block_size: int = 4, mixtures: int = 4,
                 embed_dim: int = 16):
        super().__init__()
        self.block_size = block_size
        self.weight = nn.Parameter(torch.empty(mixtures, out_channels, in_channels))
        # Unit-variance init for the position embeddings, 1/sqrt(dim) for nu: the mixture
        # logits start O(1), so p starts different per position but far from one-hot.
        self.emb_row = nn.Parameter(torch.randn(block_size, embed_dim))
        self.emb_col = nn.Parameter(torch.randn(block_size, embed_dim))
        self.nu = nn.Parameter(torch.randn(mixtures, embed_dim) * embed_dim ** -0.5)
        # The same fan-in scale as a 1x1 conv under Kaiming init (ReLU gain).
        nn.init.normal_(self.weight, std=(2.0 / in_channels) ** 0.5)

    def mixture(self) -> torch.Tensor:
        """p(a, b, m): (block, block, mixtures), a softmax over m."""
        position = self.emb_row[:, None, :] + self.emb_col[None, :, :]
        return (position @ self.nu.t()).softmax(-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        s = self.block_size
        # Mixing the matrices first costs one C_out x C_in product per pixel, not one per mixture.
        per_position = torch.einsum("abm,moc->aboc", self.mixture(), self.weight).to(x.dtype)
        blocks = x.reshape(b, c, h // s, s, w // s, s)
        out = torch.einsum("nciajb,aboc->noiajb", blocks, per_position)
        return out.reshape(b, -1, h, w)
