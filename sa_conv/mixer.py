"""The paper's Gaussian-head attention layer in the ResNet backbone's spatial mixer slot (`mixer: gaussian`).

Each head h mixes the full input vector of every key with the positional weights softmax_k of
-1/2 s_h^2 |delta - Delta_h|^2 (attention.py); the value projection maps the concatenated heads to the block's
width. A stride is an average pool after the attention, as SASA's layers downsample. This is the form the
quickstart uses (configs/quickstart/sa_conv.yaml says why the paper's BERT network is not used there).
"""

from __future__ import annotations

import torch
from torch import nn

from common.registry import register_mixer
from sa_conv.attention import ImageSelfAttention


class GaussianAttentionMixer(nn.Module):
    """(B, C_in, H, W) -> (B, C_out, H / stride, W / stride) through isotropic (or anisotropic) Gaussian heads."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, heads: int = 9,
                 anisotropic: bool = False):
        super().__init__()
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.attention = ImageSelfAttention(in_channels, heads, "quadratic_aniso" if anisotropic else "quadratic",
                                            out_features=out_channels)
        self.pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.attention(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))


@register_mixer(name="gaussian")
def gaussian_mixer(in_channels: int, out_channels: int, stride: int = 1, heads: int = 9,
                   anisotropic: bool = False) -> GaussianAttentionMixer:
    """The backbone's spatial mixer slot filled with Gaussian attention heads (the mixer calling convention)."""
    return GaussianAttentionMixer(in_channels, out_channels, stride=stride, heads=heads, anisotropic=anisotropic)
