"""One ResNet backbone for every method: the spatial mixer is a name, not a class.

Each residual block has exactly one "spatial mixer" slot: the 3x3 conv of a
bottleneck, or the 3x3 convs of a basic block. The mixer is built from
`common.registry.MIXERS` by name (`conv` here; `sasa`, adaptive-span and
attention-augmented mixers come from their packages), so comparing methods
means changing `mixer=` on the same network.

Downsampling: `downsample="stride"` passes the stride to the mixer (the usual
conv ResNet); `downsample="avgpool"` runs the mixer at full resolution and
follows it with a 2x2 average pool, which is how local attention layers
downsample (SASA, adaptive span).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from common.registry import create_mixer, create_stem, register_mixer, register_model, register_stem


@register_mixer(name="conv")
class ConvMixer(nn.Conv2d):
    """The baseline mixer: a bias-free k x k convolution with 'same' padding."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, kernel_size: int = 3):
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=kernel_size // 2, bias=False)


@register_stem(name="imagenet")
def imagenet_stem(in_channels: int, out_channels: int, norm_act: bool = True) -> nn.Module:
    """7x7 stride-2 conv, BN, ReLU, 3x3 stride-2 max pool: /4 resolution."""
    layers = [nn.Conv2d(in_channels, out_channels, 7, stride=2, padding=3, bias=False)]
    if norm_act:
        layers += [nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.MaxPool2d(3, stride=2, padding=1))


@register_stem(name="cifar")
def cifar_stem(in_channels: int, out_channels: int, norm_act: bool = True, stride: int = 1) -> nn.Module:
    """3x3 conv (BN, ReLU unless the blocks are pre-activation): full resolution, or 1/stride of it
    (`stem_kwargs: {stride: 2}`: small networks whose attention runs on a coarser grid)."""
    layers = [nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)]
    if norm_act:
        layers += [nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class MixerSpec:
    """How blocks build their mixer: name, options, and where downsampling happens."""

    def __init__(self, name: str, kwargs: dict | None, downsample: str):
        if downsample not in ("stride", "avgpool"):
            raise ValueError(f"downsample must be 'stride' or 'avgpool', got {downsample!r}")
        self.name, self.kwargs, self.downsample = name, dict(kwargs or {}), downsample

    def build(self, in_channels: int, out_channels: int, stride: int) -> nn.Module:
        if self.downsample == "avgpool" and stride > 1:
            mixer = create_mixer(self.name, in_channels, out_channels, stride=1, **self.kwargs)
            # ceil_mode: an odd grid (7 -> 4) keeps the size of the strided 1x1 shortcut beside it.
            return nn.Sequential(mixer, nn.AvgPool2d(stride, ceil_mode=True))
        return create_mixer(self.name, in_channels, out_channels, stride=stride, **self.kwargs)


def _shortcut(in_channels: int, out_channels: int, stride: int, with_norm: bool) -> nn.Module | None:
    if stride == 1 and in_channels == out_channels:
        return None
    layers = [nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)]
    if with_norm:
        layers.append(nn.BatchNorm2d(out_channels))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """Two 3x3 mixers (post-activation), or BN-ReLU-mixer twice (pre-activation, as in WRN).

    `mixers="first"` puts the configured mixer only in the first slot and a 3x3
    conv in the second (how AA-WRN augments "the first conv of every block").
    """

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int, mixer: MixerSpec,
                 preact: bool = False, dropout: float = 0.0, mixers: str = "all"):
        super().__init__()
        second = mixer if mixers == "all" else MixerSpec("conv", None, "stride")
        self.preact = preact
        self.mix1 = mixer.build(in_channels, planes, stride)
        self.bn1 = nn.BatchNorm2d(in_channels if preact else planes)
        self.mix2 = second.build(planes, planes, 1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.shortcut = _shortcut(in_channels, planes, stride, with_norm=not preact)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        if self.preact:
            act = self.relu(self.bn1(x))
            identity = x if self.shortcut is None else self.shortcut(act)
            out = self.mix1(act)
            out = self.mix2(self.dropout(self.relu(self.bn2(out))))
            return out + identity
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.relu(self.bn1(self.mix1(x)))
        out = self.bn2(self.mix2(self.dropout(out)))
        return self.relu(out + identity)

    def last_norm(self) -> nn.BatchNorm2d | None:
        return None if self.preact else self.bn2


class Bottleneck(nn.Module):
    """1x1 reduce, spatial mixer (carries the stride), 1x1 expand x4; post-activation."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int, mixer: MixerSpec,
                 preact: bool = False, dropout: float = 0.0, mixers: str = "all"):
        super().__init__()
        if preact:
            raise ValueError("pre-activation is implemented for basic blocks only")
        out_channels = planes * self.expansion
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, planes, 1, bias=False), nn.BatchNorm2d(planes),
                                    nn.ReLU(inplace=True))
        self.mix = mixer.build(planes, planes, stride)
        self.bn = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.expand = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn_out = nn.BatchNorm2d(out_channels)
        self.shortcut = _shortcut(in_channels, out_channels, stride, with_norm=True)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        identity = x if self.shortcut is None else self.shortcut(x)
        out = self.relu(self.bn(self.mix(self.reduce(x))))
        out = self.bn_out(self.expand(self.dropout(out)))
        return self.relu(out + identity)

    def last_norm(self) -> nn.BatchNorm2d:
        return self.bn_out


BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}


INITS = ("kaiming", "torch_default")
HEAD_INITS = ("torch_default", "normal")


class ResNet(nn.Module):
    """Stem, stages of residual blocks, global average pool, linear classifier.

    mixer: a mixer name for every stage, or one name per stage.
    mixer_kwargs: options passed to every mixer (e.g. kernel_size, heads), or one
    dict per stage (e.g. attention tables sized for each stage's grid).
    widths: the `planes` of each stage (bottleneck output = 4 x planes).
    preact: pre-activation basic blocks (WRN); the stem then has no BN/ReLU
    and a final BN-ReLU precedes the pool.
    init: "kaiming" (every conv Kaiming-normal, fan_out, as torchvision and mmpretrain) or "torch_default"
    (PyTorch's own layer init, as the CIFAR ResNets of kuangliu/pytorch-cifar and the official attention-cnn
    and adaptive-span code use; a mixer that sets its own init keeps it).
    head_init: the classifier's init, which `init` leaves alone: "torch_default" (PyTorch's Linear,
    U(+-1/sqrt(features)) for weight and bias) or "normal" (weight N(0, 0.01^2), bias 0: mmpretrain's
    LinearClsHead, whose smaller logits at init the official CIFAR recipe starts from).
    """

    def __init__(self, block: str = "bottleneck", layers: Sequence[int] = (3, 4, 6, 3),
                 widths: Sequence[int] = (64, 128, 256, 512), strides: Sequence[int] | None = None,
                 stem: str = "imagenet", stem_width: int = 64, num_classes: int = 1000, in_chans: int = 3,
                 mixer: str | Sequence[str] = "conv", mixer_kwargs: dict | Sequence[dict] | None = None,
                 downsample: str = "stride", preact: bool = False, dropout: float = 0.0,
                 basic_mixers: str = "all", zero_init_residual: bool = False, stem_kwargs: dict | None = None,
                 init: str = "kaiming", head_init: str = "torch_default"):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
        if head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {', '.join(HEAD_INITS)}, got {head_init!r}")
        if block not in BLOCKS:
            raise ValueError(f"block must be one of {sorted(BLOCKS)}, got {block!r}")
        if len(widths) != len(layers):
            raise ValueError(f"widths ({len(widths)}) and layers ({len(layers)}) must have the same length")
        strides = tuple(strides) if strides is not None else (1,) + (2,) * (len(layers) - 1)
        mixers = [mixer] * len(layers) if isinstance(mixer, str) else list(mixer)
        options = [mixer_kwargs] * len(layers) if mixer_kwargs is None or isinstance(mixer_kwargs, dict) \
            else list(mixer_kwargs)
        if len(strides) != len(layers) or len(mixers) != len(layers) or len(options) != len(layers):
            raise ValueError("strides, per-stage mixers and per-stage mixer_kwargs need one entry per stage")
        block_cls = BLOCKS[block]
        self.stem = create_stem(stem, in_chans, stem_width, norm_act=not preact, **(stem_kwargs or {}))
        stages, channels = [], stem_width
        for planes, depth, stride, name, kwargs in zip(widths, layers, strides, mixers, options):
            spec = MixerSpec(name, kwargs, downsample)
            blocks = []
            for i in range(depth):
                blocks.append(block_cls(channels, planes, stride if i == 0 else 1, spec, preact=preact,
                                        dropout=dropout, mixers=basic_mixers))
                channels = planes * block_cls.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.final_act = nn.Sequential(nn.BatchNorm2d(channels), nn.ReLU(inplace=True)) if preact else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        self.num_features = channels
        self._init_weights(zero_init_residual, init, head_init)

    def _init_weights(self, zero_init_residual: bool, init: str, head_init: str) -> None:
        if init == "kaiming":
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.ones_(m.weight)
                    nn.init.zeros_(m.bias)
        if zero_init_residual:
            # Each residual branch starts as zero, so every block is the identity at init.
            for m in self.modules():
                norm = m.last_norm() if isinstance(m, (BasicBlock, Bottleneck)) else None
                if norm is not None:
                    nn.init.zeros_(norm.weight)
        if head_init == "normal":
            nn.init.normal_(self.fc.weight, std=0.01)
            nn.init.zeros_(self.fc.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.final_act(self.stages(self.stem(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.forward_features(x)), 1))


# ---------------------------------------------------------------------------- registered networks


@register_model
def resnet(block: str = "basic", layers: Sequence[int] = (2, 2, 2, 2), widths: Sequence[int] = (64, 128, 256, 512),
           strides: Sequence[int] | None = None, stem: str = "cifar", stem_width: int = 64, num_classes: int = 10,
           in_chans: int = 3, mixer: str | Sequence[str] = "conv", mixer_kwargs: dict | Sequence[dict] | None = None,
           downsample: str = "stride", preact: bool = False, dropout: float = 0.0, basic_mixers: str = "all",
           zero_init_residual: bool = False, stem_kwargs: dict | None = None, init: str = "kaiming",
           head_init: str = "torch_default") -> ResNet:
    """Any ResNet from its configuration: the way to define small or custom networks in YAML."""
    return ResNet(block=block, layers=layers, widths=widths, strides=strides, stem=stem, stem_width=stem_width,
                  num_classes=num_classes, in_chans=in_chans, mixer=mixer, mixer_kwargs=mixer_kwargs,
                  downsample=downsample, preact=preact, dropout=dropout, basic_mixers=basic_mixers,
                  zero_init_residual=zero_init_residual, stem_kwargs=stem_kwargs, init=init,
                  head_init=head_init)


def _standard(block: str, layers: tuple, **options) -> ResNet:
    return ResNet(block=block, layers=layers, widths=(64, 128, 256, 512), stem_width=64, **options)


@register_model
def resnet18(num_classes: int = 1000, stem: str = "imagenet", mixer: str = "conv", mixer_kwargs: dict | None = None,
             downsample: str = "stride", in_chans: int = 3, zero_init_residual: bool = False,
             init: str = "kaiming", head_init: str = "torch_default") -> ResNet:
    """ResNet-18 (basic [2,2,2,2]); with stem='cifar' and 10 classes, the 11.17M CIFAR network."""
    return _standard("basic", (2, 2, 2, 2), num_classes=num_classes, stem=stem, mixer=mixer,
                     mixer_kwargs=mixer_kwargs, downsample=downsample, in_chans=in_chans,
                     zero_init_residual=zero_init_residual, init=init, head_init=head_init)


@register_model
def resnet26(num_classes: int = 1000, stem: str = "imagenet", mixer: str = "conv", mixer_kwargs: dict | None = None,
             downsample: str = "stride", in_chans: int = 3, zero_init_residual: bool = False,
             init: str = "kaiming", head_init: str = "torch_default") -> ResNet:
    """ResNet-26 (bottleneck [1,2,4,1]): 13.7M parameters on ImageNet."""
    return _standard("bottleneck", (1, 2, 4, 1), num_classes=num_classes, stem=stem, mixer=mixer,
                     mixer_kwargs=mixer_kwargs, downsample=downsample, in_chans=in_chans,
                     zero_init_residual=zero_init_residual, init=init, head_init=head_init)


@register_model
def resnet38(num_classes: int = 1000, stem: str = "imagenet", mixer: str = "conv", mixer_kwargs: dict | None = None,
             downsample: str = "stride", in_chans: int = 3, zero_init_residual: bool = False,
             init: str = "kaiming", head_init: str = "torch_default") -> ResNet:
    """ResNet-38 (bottleneck [2,3,5,2]): 19.6M parameters on ImageNet."""
    return _standard("bottleneck", (2, 3, 5, 2), num_classes=num_classes, stem=stem, mixer=mixer,
                     mixer_kwargs=mixer_kwargs, downsample=downsample, in_chans=in_chans,
                     zero_init_residual=zero_init_residual, init=init, head_init=head_init)


@register_model
def resnet50(num_classes: int = 1000, stem: str = "imagenet", mixer: str = "conv", mixer_kwargs: dict | None = None,
             downsample: str = "stride", in_chans: int = 3, zero_init_residual: bool = False,
             init: str = "kaiming", head_init: str = "torch_default") -> ResNet:
    """ResNet-50 (bottleneck [3,4,6,3]): 25.6M parameters on ImageNet."""
    return _standard("bottleneck", (3, 4, 6, 3), num_classes=num_classes, stem=stem, mixer=mixer,
                     mixer_kwargs=mixer_kwargs, downsample=downsample, in_chans=in_chans,
                     zero_init_residual=zero_init_residual, init=init, head_init=head_init)


@register_model
def wrn28_10(num_classes: int = 100, dropout: float = 0.0, mixer: str | Sequence[str] = "conv",
             mixer_kwargs: dict | Sequence[dict] | None = None,
             basic_mixers: str = "all", in_chans: int = 3, init: str = "kaiming",
             head_init: str = "torch_default") -> ResNet:
    """Wide ResNet-28-10 (Zagoruyko & Komodakis): pre-activation basic blocks, 4 per stage, widths 160/320/640."""
    return ResNet(block="basic", layers=(4, 4, 4), widths=(160, 320, 640), strides=(1, 2, 2), stem="cifar",
                  stem_width=16, num_classes=num_classes, in_chans=in_chans, mixer=mixer, mixer_kwargs=mixer_kwargs,
                  preact=True, dropout=dropout, basic_mixers=basic_mixers, init=init,
                  head_init=head_init)
