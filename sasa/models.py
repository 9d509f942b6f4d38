"""SASA ResNets: every bottleneck's 3x3 conv replaced by the `sasa` mixer, 2x2 average-pool downsampling.

`stem` picks the paper's two ImageNet variants and a CIFAR one:
"imagenet" (7x7 conv stem, "conv stem + attention" in Table 1), "attention"
(the attention stem: "full attention"), "cifar" (3x3 conv, 32x32) and
"attention_cifar" (the attention stem without its max pool, 32x32).
"""

from __future__ import annotations

from common.models.resnet import ResNet
from common.registry import ArgumentError, register_model

STEMS = ("imagenet", "attention", "cifar", "attention_cifar")


def sasa_resnet(layers: tuple, num_classes: int, stem: str, kernel_size: int, heads: int, border: str,
                backend: str, in_chans: int = 3) -> ResNet:
    """A bottleneck ResNet (widths 64..512) whose spatial mixers are SASA layers."""
    if stem not in STEMS:
        raise ArgumentError(f"stem must be one of {', '.join(STEMS)}, got {stem!r}", key="stem")
    mixer_kwargs = {"kernel_size": kernel_size, "heads": heads, "border": border, "backend": backend}
    return ResNet(block="bottleneck", layers=layers, widths=(64, 128, 256, 512), stem=stem, stem_width=64,
                  num_classes=num_classes, in_chans=in_chans, mixer="sasa", mixer_kwargs=mixer_kwargs,
                  downsample="avgpool")


@register_model
def sasa_resnet26(num_classes: int = 1000, stem: str = "imagenet", kernel_size: int = 7, heads: int = 8,
                  border: str = "mask", backend: str = "auto", in_chans: int = 3) -> ResNet:
    """SASA ResNet-26 (bottleneck [1,2,4,1]): 10.3M parameters on ImageNet with either stem."""
    return sasa_resnet((1, 2, 4, 1), num_classes, stem, kernel_size, heads, border, backend, in_chans)


@register_model
def sasa_resnet38(num_classes: int = 1000, stem: str = "imagenet", kernel_size: int = 7, heads: int = 8,
                  border: str = "mask", backend: str = "auto", in_chans: int = 3) -> ResNet:
    """SASA ResNet-38 (bottleneck [2,3,5,2]): 14.1M parameters on ImageNet with either stem."""
    return sasa_resnet((2, 3, 5, 2), num_classes, stem, kernel_size, heads, border, backend, in_chans)


@register_model
def sasa_resnet50(num_classes: int = 1000, stem: str = "imagenet", kernel_size: int = 7, heads: int = 8,
                  border: str = "mask", backend: str = "auto", in_chans: int = 3) -> ResNet:
    """SASA ResNet-50 (bottleneck [3,4,6,3]): 18.0M parameters on ImageNet with either stem."""
    return sasa_resnet((3, 4, 6, 3), num_classes, stem, kernel_size, heads, border, backend, in_chans)
