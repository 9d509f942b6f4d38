"""The seed's small CIFAR-100 study: three convolutions (64, 128, 192) against three AA-convolutions.

The seed gives only the widths and the results (61.6% top-1 in 100 epochs for
the convs, 59.82% in 35 epochs for the AA-convs), so the net is ours:

    [mixer 3x3 -> BN -> ReLU -> 2x2 max pool]  64 channels, 32 -> 16
    [mixer 3x3 -> BN -> ReLU -> 2x2 max pool] 128 channels, 16 -> 8
    [mixer 3x3 -> BN -> ReLU]                 192 channels,  8
    global average pool -> linear

`mixer` is `conv` for cnn3 and `aa` for aa_cnn3, from the same registry as the
ResNets; each AA layer's relative tables are sized for its own grid
(32, 16, 8 at image_size 32). AA defaults: the paper's kappa 0.2 and upsilon
0.1 with 4 heads (8 heads would leave one value channel per head at 64
outputs) and at least 8 dimensions per key head (20 would give the first layer,
with 3 input channels, 80 key channels for 64 outputs): d_k / d_v = 32/8,
32/12, 40/20 for the three layers. Parameters at 100 classes: cnn3 316,708;
aa_cnn3 306,832.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from common.registry import create_mixer, register_model

WIDTHS = (64, 128, 192)


class ThreeLayerNet(nn.Module):
    """Three mixer-BN-ReLU layers (max pool after the first two), global average pool, linear."""

    def __init__(self, mixer: str, mixer_kwargs: dict | None = None, num_classes: int = 100, in_chans: int = 3,
                 image_size: int | None = None):
        super().__init__()
        layers, channels = [], in_chans
        for i, width in enumerate(WIDTHS):
            options = dict(mixer_kwargs or {})
            if image_size is not None:  # attention mixers: tables sized for this layer's grid
                options["max_size"] = math.ceil(image_size / 2 ** i)
            layers += [create_mixer(mixer, channels, width, **options), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
            if i < len(WIDTHS) - 1:
                layers.append(nn.MaxPool2d(2))
            channels = width
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


@register_model
def cnn3(num_classes: int = 100, in_chans: int = 3) -> ThreeLayerNet:
    """Three 3x3 convolutions (64, 128, 192 channels): the conv side of the seed's CIFAR-100 study."""
    return ThreeLayerNet("conv", num_classes=num_classes, in_chans=in_chans)


@register_model
def aa_cnn3(num_classes: int = 100, image_size: int = 32, kappa: float = 0.2, upsilon: float = 0.1, heads: int = 4,
            min_key_head_dim: int = 8, relative: bool = True, in_chans: int = 3) -> ThreeLayerNet:
    """cnn3 with every convolution attention-augmented: the AA side of the seed's CIFAR-100 study."""
    options = {"kappa": kappa, "upsilon": upsilon, "heads": heads, "min_key_head_dim": min_key_head_dim,
               "relative": relative}
    return ThreeLayerNet("aa", options, num_classes=num_classes, in_chans=in_chans, image_size=image_size)
