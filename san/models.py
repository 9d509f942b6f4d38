"""SAN10/15/19, pairwise and patchwise: the networks of the paper's Table 1, and a CIFAR layout.

Network (the official architecture, whose parameter counts these reproduce exactly):

    stem     1x1 conv 3 -> 64 (no bias), BN, ReLU
    stage s  [2x2 max pool], 1x1 conv (no bias) to width c_s, n_s SAN bottlenecks, BN, ReLU
             widths 64, 256, 512, 1024, 2048; kernels 3, 7, 7, 7, 7
    head     global average pool, linear

SAN bottleneck (pre-activation): x + conv1x1(ReLU(BN(SA(ReLU(BN(x)))))) with SA the self-attention
operation on rel_planes = c/16, out_planes = mid = c/4, share_planes = 8; the 1x1 conv (mid -> c)
has a bias, as in the official code.

Layouts (`stem`): "imagenet" pools before every stage, 224 -> 112, 56, 28, 14, 7. At 32x32 that
gives 16, 8, 4, 2, 1, and reflection padding of 3 cannot work below 4x4 (the official code
crashes). "cifar" drops the first two pools, the way CIFAR ResNets drop the ImageNet stem's /4:
stages run at 32, 32, 16, 8, 4, each still larger than the window radius 3.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from common.registry import ArgumentError, register_model
from san.attention import DEFAULT_RELATION, MODES, SelfAttention2d
from san.footprint import PADDINGS

DEPTHS = {10: (2, 1, 2, 4, 1), 15: (3, 2, 3, 5, 2), 19: (3, 3, 4, 6, 3)}
WIDTHS = (64, 256, 512, 1024, 2048)
KERNELS = (3, 7, 7, 7, 7)
LAYOUTS = {"imagenet": (True, True, True, True, True), "cifar": (False, False, True, True, True)}  # pool per stage


def _norm_act(channels: int) -> list[nn.Module]:
    return [nn.BatchNorm2d(channels), nn.ReLU(inplace=True)]


INITS = ("kaiming", "torch_default")


class Bottleneck(nn.Module):
    """The pre-activation SAN block of width c: BN-ReLU, self-attention to c/4, BN-ReLU, 1x1 conv to c, + x."""

    def __init__(self, channels: int, kernel_size: int, **attention):
        super().__init__()
        mid = channels // 4
        self.norm_in = nn.Sequential(*_norm_act(channels))
        self.attention = SelfAttention2d(channels, channels // 16, mid, kernel_size, **attention)
        self.norm_mid = nn.Sequential(*_norm_act(mid))
        self.expand = nn.Conv2d(mid, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.expand(self.norm_mid(self.attention(self.norm_in(x))))


class SAN(nn.Module):
    """Stem, stages of SAN bottlenecks, pool, classifier; see the module docstring.

    stem_kernel: the stem convolution's size (1, the paper's, by default; 3 gives a CIFAR-style stem).

    `attention` options (mode, relation, padding, position, share_planes, backend) go to every
    self-attention layer. `pools` says which stages are entered by a 2x2 max pool. init: "kaiming" (the
    project's backbone convention: Kaiming fan-out convs with zero biases, unit BN) or "torch_default"
    (PyTorch's layer init, the official code's, which applies no init of its own).
    """

    def __init__(self, layers: Sequence[int], widths: Sequence[int] = WIDTHS, kernels: Sequence[int] = KERNELS,
                 pools: Sequence[bool] = LAYOUTS["imagenet"], num_classes: int = 1000, in_chans: int = 3,
                 init: str = "kaiming", stem_kernel: int = 1, **attention):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
        if not len(layers) == len(widths) == len(kernels) == len(pools):
            raise ValueError("layers, widths, kernels and pools need one entry per stage")
        self.stem = nn.Sequential(nn.Conv2d(in_chans, widths[0], stem_kernel, padding=stem_kernel // 2, bias=False),
                                  *_norm_act(widths[0]))
        stages, channels = [], widths[0]
        for depth, width, kernel_size, pooled in zip(layers, widths, kernels, pools):
            stages.append(nn.Sequential(nn.MaxPool2d(2) if pooled else nn.Identity(),
                                        nn.Conv2d(channels, width, 1, bias=False),
                                        *[Bottleneck(width, kernel_size, **attention) for _ in range(depth)],
                                        *_norm_act(width)))
            channels = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.num_features = channels
        if init == "kaiming":
            self._init_weights()

    def _init_weights(self) -> None:
        # The project's backbone convention (common/models/resnet.py): Kaiming fan-out convs, unit BN.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.forward_features(x)), 1))


def _check_attention(mode: str, relation: str, padding: str) -> None:
    """Option errors name the option (config files point at it)."""
    if mode not in MODES:
        raise ArgumentError(f"mode must be one of {', '.join(MODES)}, got {mode!r}", key="mode")
    if relation not in MODES[mode]:
        raise ArgumentError(f"{mode} relation must be one of {', '.join(MODES[mode])}, got {relation!r}",
                            key="relation")
    if padding not in PADDINGS:
        raise ArgumentError(f"padding must be one of {', '.join(PADDINGS)}, got {padding!r}", key="padding")


def _check_init(init: str) -> None:
    if init not in INITS:
        raise ArgumentError(f"init must be one of {', '.join(INITS)}, got {init!r}", key="init")


def san_preset(depth: int, mode: str, num_classes: int, stem: str, relation: str, padding: str,
               position: bool = True, init: str = "kaiming", in_chans: int = 3) -> SAN:
    """SAN-`depth` of the paper with `mode` attention in the `stem` layout."""
    if stem not in LAYOUTS:
        raise ArgumentError(f"stem must be one of {', '.join(LAYOUTS)}, got {stem!r}", key="stem")
    _check_attention(mode, relation, padding)
    _check_init(init)
    return SAN(DEPTHS[depth], pools=LAYOUTS[stem], num_classes=num_classes, in_chans=in_chans, init=init, mode=mode,
               relation=relation, padding=padding, position=position)


@register_model
def san(layers: Sequence[int] = (1, 1, 1), widths: Sequence[int] = (32, 64, 128), kernels: Sequence[int] = (3, 3, 3),
        pools: Sequence[bool] = (False, True, True), mode: str = "pairwise", relation: str | None = None,
        padding: str = "reflection", position: bool = True, share_planes: int = 8, stem_kernel: int = 1,
        num_classes: int = 10, in_chans: int = 3, init: str = "kaiming") -> SAN:
    """Any SAN from its configuration (small networks in YAML, data-efficiency studies): blocks, width, window
    and entry pool (a 2x2 max pool) per stage, and the stem convolution's size (1 as in the paper, or e.g. 3).
    relation: default subtraction (pairwise) or concatenation (patchwise); position only applies to pairwise.

    A block of width c attends with c/16 relation and c/4 output channels in groups of share_planes, so
    widths must be multiples of 4 * share_planes (and of 16). A stage's window must fit its grid with
    reflection padding (k // 2 < the grid side)."""
    relation = relation or DEFAULT_RELATION.get(mode, "")
    _check_attention(mode, relation, padding)
    _check_init(init)
    if not len(layers) == len(widths) == len(kernels) == len(pools):
        raise ArgumentError(f"layers, widths, kernels and pools need one entry per stage, got {len(layers)}, "
                            f"{len(widths)}, {len(kernels)} and {len(pools)}", key="widths")
    for width in widths:
        if not isinstance(width, int) or width % 16 or (width // 4) % share_planes:
            raise ArgumentError(f"every width must be a multiple of 16 and of 4 * share_planes "
                                f"({4 * share_planes}), got {width!r}", key="widths")
    for k in kernels:
        if not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ArgumentError(f"every kernel must be an odd integer >= 1, got {k!r}", key="kernels")
    if not isinstance(stem_kernel, int) or stem_kernel < 1 or stem_kernel % 2 == 0:
        raise ArgumentError(f"stem_kernel must be an odd integer >= 1, got {stem_kernel!r}", key="stem_kernel")
    return SAN(layers, widths, kernels, pools, num_classes=num_classes, in_chans=in_chans, init=init,
               stem_kernel=stem_kernel, mode=mode, relation=relation, padding=padding, position=position,
               share_planes=share_planes)


PAIRWISE_DEFAULT, PATCHWISE_DEFAULT = DEFAULT_RELATION["pairwise"], DEFAULT_RELATION["patchwise"]


@register_model
def san10_pairwise(num_classes: int = 1000, stem: str = "imagenet", relation: str = PAIRWISE_DEFAULT,
                   padding: str = "reflection", position: bool = True, init: str = "kaiming",
                   in_chans: int = 3) -> SAN:
    """SAN10 pairwise (blocks 2,1,2,4,1): 10,531,848 parameters on ImageNet with subtraction."""
    return san_preset(10, "pairwise", num_classes, stem, relation, padding, position, init, in_chans)


@register_model
def san15_pairwise(num_classes: int = 1000, stem: str = "imagenet", relation: str = PAIRWISE_DEFAULT,
                   padding: str = "reflection", position: bool = True, init: str = "kaiming",
                   in_chans: int = 3) -> SAN:
    """SAN15 pairwise (blocks 3,2,3,5,2): 14,065,436 parameters on ImageNet with subtraction."""
    return san_preset(15, "pairwise", num_classes, stem, relation, padding, position, init, in_chans)


@register_model
def san19_pairwise(num_classes: int = 1000, stem: str = "imagenet", relation: str = PAIRWISE_DEFAULT,
                   padding: str = "reflection", position: bool = True, init: str = "kaiming",
                   in_chans: int = 3) -> SAN:
    """SAN19 pairwise (blocks 3,3,4,6,3): 17,596,156 parameters on ImageNet with subtraction."""
    return san_preset(19, "pairwise", num_classes, stem, relation, padding, position, init, in_chans)


@register_model
def san10_patchwise(num_classes: int = 1000, stem: str = "imagenet", relation: str = PATCHWISE_DEFAULT,
                    padding: str = "reflection", init: str = "kaiming", in_chans: int = 3) -> SAN:
    """SAN10 patchwise (blocks 2,1,2,4,1): 11,841,124 parameters on ImageNet with concatenation."""
    return san_preset(10, "patchwise", num_classes, stem, relation, padding, init=init, in_chans=in_chans)


@register_model
def san15_patchwise(num_classes: int = 1000, stem: str = "imagenet", relation: str = PATCHWISE_DEFAULT,
                    padding: str = "reflection", init: str = "kaiming", in_chans: int = 3) -> SAN:
    """SAN15 patchwise (blocks 3,2,3,5,2): 16,181,310 parameters on ImageNet with concatenation."""
    return san_preset(15, "patchwise", num_classes, stem, relation, padding, init=init, in_chans=in_chans)


@register_model
def san19_patchwise(num_classes: int = 1000, stem: str = "imagenet", relation: str = PATCHWISE_DEFAULT,
                    padding: str = "reflection", init: str = "kaiming", in_chans: int = 3) -> SAN:
    """SAN19 patchwise (blocks 3,3,4,6,3): 20,518,470 parameters on ImageNet with concatenation."""
    return san_preset(19, "patchwise", num_classes, stem, relation, padding, init=init, in_chans=in_chans)
