"""The Vision Transformer (Dosovitskiy et al. 2020) with the small-data switches of Lee et al. (2021).

    tokens = [CLS,] embed(patches) + pos          embed: linear, or Shifted Patch Tokenization (spt)
    tokens = tokens + DropPath(Attn(LN(tokens)))  pre-LN blocks; Attn optionally Locality Self-Attention (lsa)
    tokens = tokens + DropPath(MLP(LN(tokens)))
    logits = Linear(LN(tokens)[CLS or mean over patches])

One class; the registered models (`vit_cifar`, `vit_cifar_spt_lsa`, `vit_re`) are presets of its options,
and every option can be overridden from a config's `model:` block.
"""

from __future__ import annotations

import torch
from torch import nn

from common.errors import UserError
from vit.attention import TokenSelfAttention
from vit.tokens import PatchEmbedding, ShiftedPatchTokenization


# "small_head": Xavier-uniform Linear layers, a truncated-normal (0.02) classifier, position embedding and CLS
# token, so the loss starts at ln(classes). "official": Lee et al.'s init (see VisionTransformer._init_official).
INITS = ("small_head", "official")


class DropPath(nn.Module):
    """Stochastic depth: drop a residual branch for a whole sample with probability p (scaled by 1/(1-p))."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"p={self.p}"


class MLP(nn.Sequential):
    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim),
                         nn.Dropout(dropout))


class Block(nn.Module):
    """Pre-LN transformer block."""

    def __init__(self, dim: int, mlp_dim: int, drop_path: float, dropout: float, **attention):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TokenSelfAttention(dim, proj_dropout=dropout, **attention)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, mlp_dim, dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def _pair(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else tuple(size)


class VisionTransformer(nn.Module):
    """ViT for images of a fixed `image_size` cut into `patch_size` patches; see `vit` for the options."""

    def __init__(self, image_size=32, patch_size: int = 4, dim: int = 192, depth: int = 9, heads: int = 12,
                 head_dim: int | None = None, mlp_ratio: float = 2.0, mlp_dim: int | None = None,
                 pool: str = "cls", spt: bool = False, spt_shift: int | None = None,
                 spt_directions: str = "diagonal", lsa: bool = False, qkv_bias: bool = False,
                 drop_path: float = 0.0, drop_path_mode: str = "uniform", dropout: float = 0.0,
                 attn_dropout: float = 0.0, emb_dropout: float = 0.0, num_classes: int = 10, in_chans: int = 3,
                 init: str = "small_head"):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
        self.image_size = _pair(image_size)
        h, w = self.image_size
        if h % patch_size or w % patch_size:
            raise ValueError(f"image_size {h}x{w} is not a multiple of patch_size {patch_size}")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool must be 'cls' or 'mean', got {pool!r}")
        if drop_path_mode not in ("uniform", "linear"):
            raise ValueError(f"drop_path_mode must be 'uniform' or 'linear', got {drop_path_mode!r}")
        self.patch_size, self.pool = patch_size, pool
        self.grid = (h // patch_size, w // patch_size)
        prefix = 1 if pool == "cls" else 0

        if spt:
            self.patch_embed = ShiftedPatchTokenization(in_chans, dim, patch_size, spt_shift, spt_directions)
        else:
            self.patch_embed = PatchEmbedding(in_chans, dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if prefix else None
        self.pos_embed = nn.Parameter(torch.zeros(1, prefix + self.grid[0] * self.grid[1], dim))
        self.emb_drop = nn.Dropout(emb_dropout)
        # "linear" (DeiT) raises the drop rate from 0 at the first block to drop_path at the last;
        # "uniform" (Lee et al.) uses drop_path everywhere.
        rates = [drop_path * (i / max(depth - 1, 1) if drop_path_mode == "linear" else 1.0) for i in range(depth)]
        mlp_dim = mlp_dim or int(round(dim * mlp_ratio))
        self.blocks = nn.Sequential(*(
            Block(dim, mlp_dim, rate, dropout, heads=heads, grid=self.grid, prefix_tokens=prefix,
                  head_dim=head_dim, qkv_bias=qkv_bias, locality=lsa, attn_dropout=attn_dropout)
            for rate in rates))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        if init == "official":
            self._init_official()
        else:
            self._init_weights()

    def _init_official(self) -> None:
        """Lee et al.'s code (models/vit.py init_weights, applied to every module): every Linear Xavier-normal
        with zero bias, the classifier included; LayerNorm 1 and 0; the position embedding and CLS token
        N(0, 1) (torch.randn)."""
        nn.init.normal_(self.pos_embed, std=1.0)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1.0)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        # A small head starts the loss at ln(classes); Xavier here gives logits of std ~1 on unit-variance
        # features (the original ViT zero-initialises it, which leaves only the head to learn at step one).
        nn.init.trunc_normal_(self.head.weight, std=0.02)

    def _check_input(self, x: torch.Tensor) -> None:
        if tuple(x.shape[-2:]) != self.image_size:
            h, w = x.shape[-2:]
            raise UserError(f"this ViT was built for {self.image_size[0]}x{self.image_size[1]} images and got "
                            f"{h}x{w}: set model.image_size: {h if h == w else [h, w]} (its position embedding "
                            f"has one entry per patch)")

    def forward_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> the final normalised tokens (B, [1 +] patches, dim)."""
        self._check_input(x)
        tokens = self.patch_embed(x)
        if self.cls_token is not None:
            tokens = torch.cat([self.cls_token.expand(len(tokens), -1, -1), tokens], dim=1)
        tokens = self.emb_drop(tokens + self.pos_embed)
        return self.norm(self.blocks(tokens))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.forward_tokens(x)
        pooled = tokens[:, 0] if self.pool == "cls" else tokens.mean(1)
        return self.head(pooled)
