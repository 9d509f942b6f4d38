"""AACN as a backbone mixer: kappa and upsilon turned into key and value widths.

The paper sets the attention widths as fractions of the output channels,
kappa = d_k / F_out and upsilon = d_v / F_out ("kappa = 2 upsilon = 0.2":
kappa 0.2, upsilon 0.1, the reading the parameter counts fit), with N_h = 8
heads and at least 20 dimensions per key head. `attention_widths` rounds each
width to the nearest multiple of the head count (ties up, at least one per
head), then raises d_k to min_key_head_dim * heads. The minimum is what makes
the counts fit: in a ResNet-50 bottleneck of width 128, kappa alone gives
d_kh = 3.
"""

from __future__ import annotations

import math

from aacn.layer import AugmentedConv2d
from common.registry import register_mixer


def attention_widths(out_channels: int, kappa: float, upsilon: float, heads: int,
                     min_key_head_dim: int = 0) -> tuple[int, int]:
    """(dk, dv) for a layer with `out_channels` outputs; both multiples of `heads`, dv <= out_channels."""
    def per_head(fraction: float) -> int:
        return max(1, math.floor(fraction * out_channels / heads + 0.5))  # nearest, ties up

    dk = heads * max(per_head(kappa), min_key_head_dim)
    dv = heads * min(per_head(upsilon), out_channels // heads)
    return dk, dv


@register_mixer(name="aa")
def aa_mixer(in_channels: int, out_channels: int, stride: int = 1, kappa: float = 0.2, upsilon: float = 0.1,
             heads: int = 8, min_key_head_dim: int = 20, relative: bool = True, kernel_size: int = 3,
             max_size: int | tuple[int, int] = 64) -> AugmentedConv2d:
    """The backbone's spatial mixer slot filled with an attention-augmented convolution.

    max_size: the largest attention grid of the layers built with these options
    (a network gives each stage its own options, sized for that stage's grid;
    see AugmentedConv2d).
    """
    dk, dv = attention_widths(out_channels, kappa, upsilon, heads, min_key_head_dim)
    return AugmentedConv2d(in_channels, out_channels, kernel_size, dk, dv, heads, relative=relative,
                           stride=stride, max_size=max_size)
