"""AA-ResNet-50 (ImageNet) and AA-WRN-28-10 (CIFAR-100) on the shared backbone.

Both use the paper's attention setting: kappa 0.2, upsilon 0.1, 8 heads, at
least 20 dimensions per key head, relative logits (see `aacn.mixer`).

- aa_resnet50: the 3x3 conv of every bottleneck in the last three stages
  (grids 28, 14 and 7 at 224x224) is augmented; the first stage (56x56) stays a
  plain conv. The paper names that placement, and the counts fit it: 25.79M
  parameters (paper 25.8M); augmenting all four stages gives 25.89M, and the
  same rule on ResNet-101 gives 45.39M (paper 45.4M). The stride-2 blocks
  attend over the 2x2-pooled input (see AugmentedConv2d), so a stage's first
  block attends on the stage's own grid.
- aa_wrn28_10: the first 3x3 conv of every pre-activation block (12 layers; the
  public code augments all 28 convs and has 206M parameters): 36.33M
  parameters (paper 36.2M, WRN-28-10 36.5M).

Each stage gets its own mixer options, so every layer's relative tables are
sized for its own stage's attention grid.
"""

from __future__ import annotations

import math

from common.models.resnet import ResNet, wrn28_10
from common.registry import register_model


def aa_options(kappa: float, upsilon: float, heads: int, min_key_head_dim: int, relative: bool,
               max_size: int) -> dict:
    return {"kappa": kappa, "upsilon": upsilon, "heads": heads, "min_key_head_dim": min_key_head_dim,
            "relative": relative, "max_size": max_size}


@register_model
def aa_resnet50(num_classes: int = 1000, image_size: int = 224, kappa: float = 0.2, upsilon: float = 0.1,
                heads: int = 8, min_key_head_dim: int = 20, relative: bool = True, in_chans: int = 3) -> ResNet:
    """AA-ResNet-50: bottleneck [3,4,6,3], the last three stages' 3x3 convs augmented; 25.8M parameters.

    image_size: the largest input side; it sizes each stage's relative tables
    for that stage's grid (28, 14, 7 at 224).
    """
    grids = [math.ceil(image_size / 2 ** s) for s in (3, 4, 5)]  # stages 2-4: 28, 14, 7 at 224
    options = [{}] + [aa_options(kappa, upsilon, heads, min_key_head_dim, relative, max_size=g) for g in grids]
    return ResNet(block="bottleneck", layers=(3, 4, 6, 3), widths=(64, 128, 256, 512), stem="imagenet",
                  stem_width=64, num_classes=num_classes, in_chans=in_chans,
                  mixer=["conv", "aa", "aa", "aa"], mixer_kwargs=options, downsample="stride")


@register_model
def aa_wrn28_10(num_classes: int = 100, dropout: float = 0.0, image_size: int = 32, kappa: float = 0.2,
                upsilon: float = 0.1, heads: int = 8, min_key_head_dim: int = 20, relative: bool = True,
                in_chans: int = 3) -> ResNet:
    """AA-WRN-28-10: the first conv of each of the 12 pre-activation blocks augmented; 36.3M parameters.

    image_size: the largest input side, the first stage's grid (32 on CIFAR).
    """
    options = [aa_options(kappa, upsilon, heads, min_key_head_dim, relative, max_size=math.ceil(image_size / 2 ** s))
               for s in (0, 1, 2)]  # the three stages' grids: 32, 16, 8 on CIFAR
    return wrn28_10(num_classes=num_classes, dropout=dropout, mixer="aa", mixer_kwargs=options,
                    basic_mixers="first", in_chans=in_chans)
