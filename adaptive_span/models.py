"""The paper's CIFAR-100 networks (Parker et al. 2020, appendix A.3): adaptive_span_small/medium/large.

A halved-width bottleneck ResNet: conv 3x3 stem 3 -> 32 at 32x32, bottleneck width = planes, output
4 x planes, downsampling by a 2x2 average pool right after the spatial mixer. `attention` picks the mixer:

- "adaptive": adaptive-span attention (mixer `adaptive_span`); options heads, R, max_span, span_penalty,
  span_init, ring_offset, border, backend;
- "local": fixed-window local attention (mixer `adaptive_span` with adaptive=False); options kernel_size,
  heads, border, backend;
- "conv": a 3x3 convolution (mixer `conv`); option kernel_size.

An option that the chosen variant does not use is an error (e.g. kernel_size with "adaptive", whose window
is learned). Unset options take the defaults below (the seed's best medium recipe where it names one).
"""

from __future__ import annotations

from common.models.resnet import ResNet
from common.registry import ArgumentError, register_model

ARCHITECTURES = {  # planes per stage, blocks per stage, stride per stage
    "small": ((32, 64, 128), (1, 1, 1), (2, 2, 2)),
    "medium": ((32, 64, 128, 256), (1, 1, 1, 1), (1, 2, 2, 2)),
    "large": ((32, 64, 128, 256), (1, 3, 4, 1), (1, 2, 2, 2)),
}

# Each variant's options and their defaults. max_span 5 is the public code's value for CIFAR-100, R 2 and
# span_penalty 0.01 the seed's best adaptive recipe, span_init 0.1 the public code's initial z (config.py's
# --z_init default, which model.py passes to every AttentionConv; AttentionConv's own default 0.3 is never
# used), kernel 5 the seed's best local recipe.
VARIANTS = {
    "adaptive": {"heads": 4, "R": 2.0, "max_span": 5, "span_penalty": 0.01, "span_init": 0.1, "ring_offset": 0,
                 "border": "mask", "backend": "auto"},
    "local": {"kernel_size": 5, "heads": 4, "border": "mask", "backend": "auto"},
    "conv": {"kernel_size": 3},
}


def adaptive_span_resnet(size: str, num_classes: int = 100, attention: str = "adaptive", init: str = "kaiming",
                         in_chans: int = 3, **options) -> ResNet:
    """One of the paper's three networks with the chosen spatial mixer; options set to None take defaults.

    init: "kaiming" (every conv Kaiming-normal) or "torch_default", the public code's: PyTorch's layer init
    everywhere except the attention's q, k, v (Kaiming-normal, fan_out, in both modes)."""
    if attention not in VARIANTS:
        raise ArgumentError(f"attention must be one of {', '.join(VARIANTS)}, got {attention!r}", key="attention")
    defaults = VARIANTS[attention]
    for key, value in options.items():
        if value is not None and key not in defaults:
            raise ArgumentError(f"option '{key}' does not apply to attention={attention!r}; it takes "
                                f"{', '.join(defaults)}", key=key)
    chosen = {key: options.get(key) if options.get(key) is not None else value for key, value in defaults.items()}
    if attention == "conv":
        mixer, mixer_kwargs = "conv", chosen
    else:
        mixer, mixer_kwargs = "adaptive_span", {"adaptive": attention == "adaptive", **chosen}
    widths, layers, strides = ARCHITECTURES[size]
    return ResNet(block="bottleneck", layers=layers, widths=widths, strides=strides, stem="cifar", stem_width=32,
                  num_classes=num_classes, in_chans=in_chans, mixer=mixer, mixer_kwargs=mixer_kwargs,
                  downsample="avgpool", init=init)


def _factory(size: str):
    def build(num_classes: int = 100, attention: str = "adaptive", kernel_size: int | None = None,
              heads: int | None = None, R: float | None = None, max_span: int | None = None,
              span_penalty: float | None = None, span_init: float | None = None, ring_offset: int | None = None,
              border: str | None = None, backend: str | None = None, init: str = "kaiming",
              in_chans: int = 3) -> ResNet:
        return adaptive_span_resnet(size, num_classes, attention, init, in_chans, kernel_size=kernel_size,
                                    heads=heads, R=R, max_span=max_span, span_penalty=span_penalty, span_init=span_init,
                                    ring_offset=ring_offset, border=border, backend=backend)

    planes, blocks, strides = ARCHITECTURES[size]
    build.__name__ = f"adaptive_span_{size}"
    build.__doc__ = (f"The paper's {size} CIFAR-100 network: planes {planes}, blocks {blocks}, strides {strides}; "
                     f"attention = 'adaptive' | 'local' | 'conv'.")
    return register_model(build)


adaptive_span_small = _factory("small")
adaptive_span_medium = _factory("medium")
adaptive_span_large = _factory("large")
