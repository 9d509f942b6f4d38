"""Registered ViT models: `vit` with every option, and presets of it.

| model | image / patch | grid | dim | depth | heads x head_dim | MLP | variants |
|---|---|---|---|---|---|---|---|
| vit_cifar | 32 / 4 | 8x8 | 192 | 9 | 12 x 16 | 384 | (Lee et al.'s ViT) |
| vit_cifar_spt_lsa | 32 / 4 | 8x8 | 192 | 9 | 12 x 16 | 384 | SPT + LSA |
| vit_re | 32 / 2 | 16x16 | 400 | 6 | 9 x 44 | 512 | (the [Re] study's size) |

A preset is `vit` with other defaults, so a config can still set any option (e.g. `pool: mean`).
"""

from __future__ import annotations

import inspect

from common.registry import register_model
from vit.model import VisionTransformer


@register_model
def vit(image_size=32, patch_size: int = 4, dim: int = 192, depth: int = 9, heads: int = 12,
        head_dim: int | None = None, mlp_ratio: float = 2.0, mlp_dim: int | None = None, pool: str = "cls",
        spt: bool = False, spt_shift: int | None = None, spt_directions: str = "diagonal", lsa: bool = False,
        qkv_bias: bool = False, drop_path: float = 0.1, drop_path_mode: str = "uniform", dropout: float = 0.0,
        attn_dropout: float = 0.0, emb_dropout: float = 0.0, num_classes: int = 10,
        in_chans: int = 3, init: str = "small_head") -> VisionTransformer:
    """Vision Transformer.

    image_size: int or [H, W], the input size (the position embedding has one entry per patch);
    head_dim: default dim // heads; mlp_dim: default dim * mlp_ratio; pool: "cls" (a learned CLS token) or
    "mean" (mean of the patch tokens, no CLS token); spt: Shifted Patch Tokenization, shifting by spt_shift
    pixels (default half a patch) in the "diagonal" or "cardinal" directions; lsa: Locality Self-Attention;
    drop_path: stochastic-depth rate, the same in every block ("uniform") or rising from 0 ("linear");
    init: "small_head" (truncated-normal 0.02 classifier, position embedding and CLS token; Xavier-uniform
    elsewhere) or "official" (Lee et al.'s: Xavier-normal everywhere, N(0, 1) position embedding and CLS token).
    """
    return VisionTransformer(**locals())


def _preset(name: str, doc: str, **defaults) -> None:
    """Register `name`: `vit` with other default options (and the same signature, so configs are checked)."""
    signature = inspect.signature(vit)
    params = [p.replace(default=defaults.get(p.name, p.default)) for p in signature.parameters.values()]

    def factory(**options) -> VisionTransformer:
        return vit(**{**defaults, **options})

    factory.__name__ = factory.__qualname__ = name
    factory.__doc__ = doc
    factory.__signature__ = signature.replace(parameters=params)
    register_model(factory, name=name)


_preset("vit_cifar", "Lee et al.'s CIFAR ViT: dim 192, depth 9, 12 heads, MLP ratio 2, patch 4, CLS token.")
_preset("vit_cifar_spt_lsa", "vit_cifar with Shifted Patch Tokenization and Locality Self-Attention.",
        spt=True, lsa=True)
_preset("vit_re", "The [Re] study's size: patch 2 (16x16 grid), dim 400, depth 6, 9 heads of 44, MLP 512.",
        patch_size=2, dim=400, depth=6, heads=9, mlp_dim=512)
