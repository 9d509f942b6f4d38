"""The SASA layer: multi-head local self-attention over a k x k window with relative embeddings.

    y_ij = sum_{ab in N_k(i,j)} softmax_ab( s q_ij . (k_ab + r_{a-i, b-j}) ) v_ab,   per head

with q, k, v 1x1 projections (no bias), s = d_head**-0.5, and r the row/column
offset embedding of `sasa.relative`. Registered as the backbone mixer `sasa`.
"""

from __future__ import annotations

import torch
from torch import nn

from common.inspect.capture import AttentionLayer
from common.ops.neighborhood import attend_and_record, even_head_dim, merge_heads, split_heads
from common.registry import register_mixer
from sasa.relative import RelativeEmbedding2d


class LocalSelfAttention2d(AttentionLayer, nn.Module):
    """Stand-alone self-attention (Ramachandran et al. 2019) on a (B, C, H, W) feature map.

    - Heads split the `out_channels` of q, k and v; each head's logit is a true
      dot product over its d_head = out_channels / heads channels, so the head
      count matters (the public per-channel softmax makes it a no-op).
    - q is scaled by d_head**-0.5. The paper writes no scale; without it the
      logits grow like sqrt(d_head) at init and the softmax starts saturated.
    - Relative embedding: [row(dy), col(dx)] (each d_head/2 wide), shared by all
      heads, added to the keys (see `sasa.relative`).
    - border="mask" excludes out-of-image neighbours from the softmax; "zeros"
      treats them as zero keys and values, like the public code.
    - stride > 1: a stride x stride average pool right after the attention.
    - backend: passed to `common.ops.neighborhood.neighborhood_attention` ("auto"
      picks the fastest registered one).

    Weight init is left to the backbone (the ResNet's Kaiming init covers the
    1x1 projections); the relative embedding initialises itself.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 7, heads: int = 8, stride: int = 1,
                 border: str = "mask", backend: str = "auto"):
        super().__init__()
        head_dim = even_head_dim(out_channels, heads)
        if stride < 1:
            raise ValueError(f"stride must be >= 1, got {stride}")
        self.kernel_size, self.heads, self.head_dim = kernel_size, heads, head_dim
        self.border, self.backend = border, backend
        self.scale = head_dim ** -0.5
        self.query = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.key = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.value = nn.Conv2d(in_channels, out_channels, 1, bias=False)
        self.relative = RelativeEmbedding2d(kernel_size, head_dim)
        self.pool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = split_heads(self.query(x), self.heads) * self.scale
        k = split_heads(self.key(x), self.heads)
        v = split_heads(self.value(x), self.heads)
        # Cast so bf16 autocast keeps one dtype inside the op (the table is an fp32 parameter).
        rel_pos = self.relative().to(q.dtype)
        out = attend_and_record(self, q, k, v, self.kernel_size, rel_pos=rel_pos, border=self.border,
                                backend=self.backend)
        return self.pool(merge_heads(out))

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, heads={self.heads}, border={self.border!r}, backend={self.backend!r}"


@register_mixer(name="sasa")
def sasa_mixer(in_channels: int, out_channels: int, stride: int = 1, kernel_size: int = 7, heads: int = 8,
               border: str = "mask", backend: str = "auto") -> LocalSelfAttention2d:
    """The backbone's spatial mixer slot filled with a SASA layer (the mixer calling convention)."""
    return LocalSelfAttention2d(in_channels, out_channels, kernel_size=kernel_size, heads=heads, stride=stride,
                                border=border, backend=backend)
