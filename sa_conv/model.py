"""The paper's model: 2x2 space-to-depth, Linear(12 -> hidden), post-LN BERT layers, mean pool, classifier.

    image (B, 3, 32, 32) -> space-to-depth (B, 16, 16, 12) -> Linear(12 -> 400)
    -> 6 x [ x = LN(x + dropout(Dense(MHSA(x))));  x = LN(x + dropout(Dense(GELU(Dense(x))))) ]
    -> mean over the 16 x 16 grid -> Linear(400 -> classes)

Registered as the family `sa_conv` (keyword `attention`) and as `sa_quadratic`,
`sa_quadratic_aniso`, `sa_learned` and `sa_learned_content`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from common.registry import ArgumentError, register_model
from sa_conv.attention import ATTENTIONS, DROPOUT_MASKS, INITS, GaussianScores, ImageSelfAttention, init_bert_
from sa_conv.attention import _RelativeTables


class BertLayer(nn.Module):
    """One post-LN transformer layer on a (B, H, W, hidden) grid (LayerNorm after each residual sum)."""

    def __init__(self, hidden: int, heads: int, intermediate: int, attention: str, grid: tuple[int, int],
                 embedding_size: int | None, dropout: float, attention_dropout: float, layer_norm_eps: float,
                 attention_dropout_mask: str = "per_image"):
        super().__init__()
        self.attention = ImageSelfAttention(hidden, heads, attention, grid, embedding_size, attention_dropout,
                                            attention_dropout_mask)
        self.attention_output = nn.Linear(hidden, hidden)
        self.attention_norm = nn.LayerNorm(hidden, eps=layer_norm_eps)
        self.intermediate = nn.Linear(hidden, intermediate)
        self.output = nn.Linear(intermediate, hidden)
        self.output_norm = nn.LayerNorm(hidden, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attention_norm(x + self.dropout(self.attention_output(self.attention(x))))
        return self.output_norm(x + self.dropout(self.output(F.gelu(self.intermediate(x)))))


class SelfAttentionImageClassifier(nn.Module):
    """Cordonnier et al.'s fully attentional classifier on a space-to-depth grid.

    `image_size` is the input the model is built for: its grid (image_size / 2) sizes the learned relative
    tables and is the grid gauss_viz draws. Gaussian models run on any even input size. `init`: see
    sa_conv.attention.INITS (the Gaussian centres and spreads are drawn the same way under both).
    """

    def __init__(self, num_classes: int = 10, attention: str = "quadratic", layers: int = 6, heads: int = 9,
                 hidden: int = 400, intermediate: int = 512, dropout: float = 0.1, attention_dropout: float = 0.1,
                 layer_norm_eps: float = 1e-12, image_size: int = 32, in_channels: int = 3,
                 embedding_size: int | None = None, block: int = 2, init: str = "torch_default",
                 attention_dropout_mask: str = "per_image"):
        super().__init__()
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
        if image_size % block:
            raise ValueError(f"image_size {image_size} is not divisible by the space-to-depth block {block}")
        self.block, self.attention = block, attention
        self.grid = (image_size // block, image_size // block)
        self.embed = nn.Linear(in_channels * block * block, hidden)
        self.layers = nn.ModuleList(
            BertLayer(hidden, heads, intermediate, attention, self.grid, embedding_size, dropout, attention_dropout,
                      layer_norm_eps, attention_dropout_mask) for _ in range(layers))
        self.classifier = nn.Linear(hidden, num_classes)
        if init == "bert":
            init_bert_(self)  # Linear and LayerNorm; the tables below
        for m in self.modules():
            if isinstance(m, _RelativeTables):
                m.init_tables(init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] % self.block or x.shape[-2] % self.block:
            raise ValueError(f"input {tuple(x.shape[-2:])} is not divisible by the space-to-depth block {self.block}")
        x = F.pixel_unshuffle(x, self.block).permute(0, 2, 3, 1)  # (B, H/2, W/2, 4C), channels (c, dy, dx)
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x)
        return self.classifier(x.mean((1, 2)))

    def epoch_images(self) -> dict[str, torch.Tensor]:
        """The engine's per-epoch TensorBoard image: every Gaussian head's contours, one panel per layer."""
        if not any(isinstance(m, GaussianScores) for m in self.modules()):
            return {}
        from sa_conv.gauss_viz import draw_gaussian_heads, figure_to_tensor  # matplotlib only when drawn

        return {"gaussian_heads": figure_to_tensor(draw_gaussian_heads(self, dpi=72))}

    def figures(self) -> dict:
        """The `gauss_viz` figure task, for models with Gaussian heads (common/models/hooks.py)."""
        if not any(isinstance(m, GaussianScores) for m in self.modules()):
            return {}
        from sa_conv.gauss_viz import draw_gaussian_heads

        return {"gauss_viz": lambda title, dpi: draw_gaussian_heads(self, title=f"Gaussian heads, {title}", dpi=dpi)}


def build(num_classes: int, attention: str, layers: int, heads: int, hidden: int, intermediate: int, dropout: float,
          attention_dropout: float, layer_norm_eps: float, image_size: int, embedding_size: int | None,
          init: str = "torch_default", attention_dropout_mask: str = "per_image", in_chans: int = 3,
          block: int = 2) -> SelfAttentionImageClassifier:
    """Check the options a config can set (each error names its key), then build."""
    if init not in INITS:
        raise ArgumentError(f"init must be one of {', '.join(INITS)}, got {init!r}", key="init")
    if attention_dropout_mask not in DROPOUT_MASKS:
        raise ArgumentError(f"attention_dropout_mask must be one of {', '.join(DROPOUT_MASKS)}, "
                            f"got {attention_dropout_mask!r}", key="attention_dropout_mask")
    if attention not in ATTENTIONS:
        raise ArgumentError(f"attention must be one of {', '.join(ATTENTIONS)}, got {attention!r}", key="attention")
    for key, value in (("layers", layers), ("heads", heads), ("hidden", hidden), ("intermediate", intermediate)):
        if not isinstance(value, int) or value < 1:
            raise ArgumentError(f"{key} must be an integer >= 1, got {value!r}", key=key)
    if not isinstance(block, int) or block < 1:
        raise ArgumentError(f"block must be an integer >= 1 (the space-to-depth side), got {block!r}", key="block")
    if not isinstance(image_size, int) or image_size < block or image_size % block:
        raise ArgumentError(f"image_size must be a multiple of block ({block}x{block} space-to-depth), got "
                            f"{image_size!r}", key="image_size")
    for key, value in (("dropout", dropout), ("attention_dropout", attention_dropout)):
        if not 0.0 <= value < 1.0:
            raise ArgumentError(f"{key} must be in [0, 1), got {value!r}", key=key)
    if attention in ("learned_query", "learned_content"):
        if hidden % 2:
            raise ArgumentError(f"attention {attention!r} needs an even hidden size ([row, col] embeddings of "
                                f"hidden/2 each), got {hidden}", key="hidden")
        if embedding_size is not None and 2 * embedding_size != hidden:
            raise ArgumentError(f"attention {attention!r}: embedding_size must be hidden/2 = {hidden // 2} "
                                f"(q.r with head dim = hidden), got {embedding_size}", key="embedding_size")
    if embedding_size is not None and (not isinstance(embedding_size, int) or embedding_size < 1):
        raise ArgumentError(f"embedding_size must be an integer >= 1, got {embedding_size!r}", key="embedding_size")
    return SelfAttentionImageClassifier(num_classes, attention, layers, heads, hidden, intermediate, dropout,
                                        attention_dropout, layer_norm_eps, image_size, in_channels=in_chans,
                                        embedding_size=embedding_size, block=block, init=init,
                                        attention_dropout_mask=attention_dropout_mask)


@register_model
def sa_conv(num_classes: int = 10, attention: str = "quadratic", layers: int = 6, heads: int = 9, hidden: int = 400,
            intermediate: int = 512, dropout: float = 0.1, attention_dropout: float = 0.1,
            layer_norm_eps: float = 1e-12, image_size: int = 32, embedding_size: int | None = None,
            init: str = "torch_default", attention_dropout_mask: str = "per_image", in_chans: int = 3,
            block: int = 2) -> SelfAttentionImageClassifier:
    """The paper's model with any attention variant: quadratic, quadratic_aniso, learned, learned_query,
    learned_content. embedding_size: per-axis width of the learned row/column tables (default hidden for
    `learned`, hidden/2 for the q.r variants). init: "torch_default" (the official code's) or "bert".
    attention_dropout_mask: "per_image" or "shared" (one mask for the batch, the official code's).
    block: the space-to-depth side (the paper's 2; 4 gives a 16x shorter sequence, for small budgets)."""
    return build(num_classes, attention, layers, heads, hidden, intermediate, dropout, attention_dropout,
                 layer_norm_eps, image_size, embedding_size, init, attention_dropout_mask, in_chans, block)


@register_model
def sa_quadratic(num_classes: int = 10, layers: int = 6, heads: int = 9, hidden: int = 400, intermediate: int = 512,
                 dropout: float = 0.1, attention_dropout: float = 0.1, layer_norm_eps: float = 1e-12,
                 image_size: int = 32, init: str = "torch_default",
                 attention_dropout_mask: str = "per_image", in_chans: int = 3) -> SelfAttentionImageClassifier:
    """Isotropic Gaussian heads (12,086,844 params on CIFAR-10, the official count)."""
    return build(num_classes, "quadratic", layers, heads, hidden, intermediate, dropout, attention_dropout,
                 layer_norm_eps, image_size, None, init, attention_dropout_mask, in_chans)


@register_model
def sa_quadratic_aniso(num_classes: int = 10, layers: int = 6, heads: int = 9, hidden: int = 400,
                       intermediate: int = 512, dropout: float = 0.1, attention_dropout: float = 0.1,
                       layer_norm_eps: float = 1e-12, image_size: int = 32, init: str = "torch_default",
                       attention_dropout_mask: str = "per_image", in_chans: int = 3) -> SelfAttentionImageClassifier:
    """Anisotropic Gaussian heads, Sigma^-1 = S S^T (12,087,006 params on CIFAR-10)."""
    return build(num_classes, "quadratic_aniso", layers, heads, hidden, intermediate, dropout, attention_dropout,
                 layer_norm_eps, image_size, None, init, attention_dropout_mask, in_chans)


@register_model
def sa_learned(num_classes: int = 10, layers: int = 6, heads: int = 9, hidden: int = 400, intermediate: int = 512,
               dropout: float = 0.1, attention_dropout: float = 0.1, layer_norm_eps: float = 1e-12,
               image_size: int = 32, embedding_size: int | None = None, init: str = "torch_default",
               attention_dropout_mask: str = "per_image", in_chans: int = 3) -> SelfAttentionImageClassifier:
    """Learned relative 2-D embeddings, positional only, w.r (12,278,682 params on CIFAR-10, the official count)."""
    return build(num_classes, "learned", layers, heads, hidden, intermediate, dropout, attention_dropout,
                 layer_norm_eps, image_size, embedding_size, init, attention_dropout_mask, in_chans)


@register_model
def sa_learned_content(num_classes: int = 10, layers: int = 6, heads: int = 9, hidden: int = 400,
                       intermediate: int = 512, dropout: float = 0.1, attention_dropout: float = 0.1,
                       layer_norm_eps: float = 1e-12, image_size: int = 32, init: str = "torch_default",
                       attention_dropout_mask: str = "per_image", in_chans: int = 3) -> SelfAttentionImageClassifier:
    """Learned relative 2-D embeddings with content, q.k + q.r (29,484,282 params on CIFAR-10, the official count)."""
    return build(num_classes, "learned_content", layers, heads, hidden, intermediate, dropout, attention_dropout,
                 layer_norm_eps, image_size, None, init, attention_dropout_mask, in_chans)
