"""SASA's attention stem, registered as backbone stems `attention` (ImageNet) and `attention_cifar`.

Paper: self-attention within each 4x4 spatial block of the image, with
spatially aware values, then batch norm, then a 4x4 max pool. How this package
reads it (the paper leaves the details to its released code):

- The attention window of a pixel is the non-overlapping 4x4 block it lies in
  (all 16 pixels), which is exactly the 4x4 stride-4 max-pool window: "the
  attention receptive field aligns with the max pooling window".
- emb_row(a), emb_col(b) of the value mixture are indexed by the pixel's
  position (a, b) in 0..3 inside that block ("pooling-window aligned").
- The logits use the relative row/column embeddings of the SASA layer, over
  the offsets -3..3 a block allows.
- Output: 64 channels (what the ResNet stages expect) at /4 resolution, like
  the 7x7-stride-2 + max-pool conv stem. 4 heads (d_head 16), m = 4 mixtures.
- No ReLU: the paper's stem is attention, BN, max pool; the max pool is its
  nonlinearity.

`attention_cifar` keeps 32x32: the same 4x4-block attention and BN, then a ReLU
in place of the max pool, mirroring the 3x3 conv `cifar` stem (conv, BN, ReLU).
"""

from __future__ import annotations

from torch import nn

from common.registry import register_stem
from sasa.block_attention import BlockSelfAttention2d


@register_stem(name="attention")
def attention_stem(in_channels: int, out_channels: int, norm_act: bool = True, block_size: int = 4, heads: int = 4,
                   mixtures: int = 4) -> nn.Module:
    """Block attention with spatially aware values, BN, block_size x block_size max pool: /4 resolution."""
    layers = [BlockSelfAttention2d(in_channels, out_channels, block_size, heads, mixtures)]
    if norm_act:
        layers.append(nn.BatchNorm2d(out_channels))
    # ceil_mode: a partial last block (size not a multiple of 4) still gives one output, as its attention did.
    return nn.Sequential(*layers, nn.MaxPool2d(block_size, ceil_mode=True))


@register_stem(name="attention_cifar")
def attention_cifar_stem(in_channels: int, out_channels: int, norm_act: bool = True, block_size: int = 4,
                         heads: int = 4, mixtures: int = 4) -> nn.Module:
    """Block attention with spatially aware values, BN, ReLU: full resolution (for 32x32 inputs)."""
    layers = [BlockSelfAttention2d(in_channels, out_channels, block_size, heads, mixtures)]
    if norm_act:
        layers += [nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)
